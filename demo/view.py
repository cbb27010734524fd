"""The demo's live log: one line per step, with a mark, the time since the start and how long
the step took.

::

    log = LiveLog.for_stream(sys.stdout)
    log.section(2, "Readings flow end to end")
    with log.step("alice reads meter-1/power directly") as step:
        ...
        step.done('alice reads meter-1/power directly: "230.4 W" (epoch 1, seq 2)')

On a terminal a step shows as ``…`` while it runs and is rewritten in place when it ends; when
the output is piped, only finished lines are written, so a log file reads the same as the screen.
Color (and the in-place rewrite) only on a terminal, and never when ``NO_COLOR`` is set
(https://no-color.org). Marks fall back to ASCII when the stream cannot encode them.

What it does not do: decide anything about the story, or talk to any process.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["Interrupted", "LiveLog", "Step", "StepFailed"]


class StepFailed(Exception):
    """A step of the story did not go as it should: the message says what happened, ``details``
    (the tail of a log, a process's stderr) is shown under it."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt, so that nothing
    catches it by accident on its way out)."""


class Step:
    """A running step; :meth:`done` sets the line shown when it ends well."""

    def __init__(self, text: str) -> None:
        self.text = text

    def done(self, text: str) -> None:
        self.text = text


_COLORS = {"ok": "32", "fail": "31", "dim": "2", "bold": "1", "run": "33"}


class LiveLog:
    """Writes the story to ``out``; see the module docstring."""

    def __init__(
        self,
        out: TextIO,
        *,
        color: bool,
        live: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.color = color
        self.live = live
        self.clock = clock
        self.started = clock()
        try:
            "✓✗…─".encode(out.encoding or "ascii")
            self.marks = {"ok": "✓", "fail": "✗", "run": "…", "rule": "─"}
        except (UnicodeEncodeError, LookupError):
            self.marks = {"ok": "+", "fail": "x", "run": ".", "rule": "-"}

    @classmethod
    def for_stream(cls, out: TextIO) -> LiveLog:
        """Color and in-place lines if ``out`` is a terminal and ``NO_COLOR`` is unset or empty."""
        tty = out.isatty()
        return cls(out, color=tty and not os.environ.get("NO_COLOR"), live=tty)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def paint(self, text: str, style: str) -> str:
        return f"\033[{_COLORS[style]}m{text}\033[0m" if self.color else text

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def write(self, text: str) -> None:
        """Write and flush; once the reader has gone (``oscar-demo | head``), into /dev/null,
        so that the story still ends, and cleans up, as it should."""
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)

    def section(self, number: int, title: str) -> None:
        self.line()
        self.line(self.paint(f"{number}. {title}", "bold"))

    def note(self, text: str) -> None:
        """An indented line under the current step (no mark)."""
        self.line(" " * 11 + self.paint(text, "dim"))

    def _prefix(self, mark: str, style: str) -> str:
        return f"{self.paint(f'{self.elapsed():6.1f}s', 'dim')}  {self.paint(mark, style)} "

    @contextmanager
    def step(self, text: str) -> Iterator[Step]:
        """Run a step: ✓ and its final text when the block ends; ✗ and the error's message (and
        its details, dimmed) when it raises :class:`StepFailed`, ✗ and "interrupted" on
        :class:`Interrupted` or KeyboardInterrupt (both re-raised). Any other exception clears
        the running line and passes through."""
        step = Step(text)
        began = self.clock()
        if self.live:
            width = shutil.get_terminal_size((100, 24)).columns
            pending = f"{self.elapsed():6.1f}s  {self.marks['run']} {text}"[: max(width - 1, 10)]
            self.write(pending)
        try:
            yield step
        except StepFailed as exc:
            self._end(self._prefix(self.marks["fail"], "fail") + f"{step.text}: {exc}")
            for detail in exc.details.rstrip().splitlines():
                self.line(" " * 11 + self.paint(detail, "dim"))
            raise
        except (Interrupted, KeyboardInterrupt):
            self._end(self._prefix(self.marks["fail"], "fail") + f"{step.text}: interrupted")
            raise
        except BaseException:
            if self.live:
                self.write("\r\033[K")
            raise
        took = self.paint(f"({self.clock() - began:.1f}s)", "dim")
        self._end(self._prefix(self.marks["ok"], "ok") + f"{step.text}  {took}")

    def _end(self, text: str) -> None:
        self.line(("\r\033[K" if self.live else "") + text)
