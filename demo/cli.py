"""``oscar-demo``: a whole OSCAR system on loopback, walked through in under a minute.

::

    oscar-demo                  # run the story (see demo.story), stop everything, exit
    oscar-demo --keep-running   # then leave the system up and print commands to try; Ctrl-C ends
    oscar-demo --keep-state     # keep the temporary directory (bundles, state, logs) afterwards

An AS, two producers, the proxy and two consumers run as separate processes on 127.0.0.1, with
their state in a fresh temporary directory, enrolled through the real admin CLI. Each step is
shown as it happens (:mod:`demo.view`).

Exit status: 0 when every step went as it should (and, with ``--keep-running``, after the Ctrl-C
that ends it), 1 when a step failed (it is shown, with the tail of the log that says why), 2 for
bad usage, 130 when interrupted (SIGINT or SIGTERM) before the end. In every case each process
the demo started is stopped, and the directory removed unless ``--keep-state``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .children import installed
from .story import Story
from .system import LocalSystem
from .view import Interrupted, LiveLog, StepFailed

__all__ = ["build_parser", "main"]

PROG = "oscar-demo"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a whole OSCAR system on loopback (an AS, two producers, a proxy, two "
        "consumers, each its own process) and walk through what it does: readings end to end, "
        "a sleeping producer, a rotation, a revocation, the audit log.",
        epilog="exit status: 0 every step ok, 1 a step failed, 2 bad usage, 130 interrupted",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="after the story, leave the system up and print commands to try; Ctrl-C stops it",
    )
    parser.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the temporary directory (bundles, state directories, logs) and say where",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = LiveLog.for_stream(sys.stdout)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    system: LocalSystem | None = None
    status = 0
    exploring = False
    try:
        system = LocalSystem.create()
        log.line(
            log.paint(f"{PROG}: ", "bold") + "OSCAR on 127.0.0.1, every part its own process; "
            f"state and logs in {system.root}"
        )
        story = Story(system, log)
        story.run()
        log.line()
        log.line(
            log.paint(f"{log.marks['ok']} every step went as it should", "ok")
            + f" ({log.elapsed():.1f} s)"
        )
        if args.keep_running:
            exploring = True
            _explore(story, log)
    except StepFailed:
        status = 1
        log.line()
        hint = "" if args.keep_state else " (--keep-state keeps the logs to look into)"
        log.line(log.paint(f"{log.marks['fail']} the demo failed", "fail") + hint)
    except Interrupted:
        status = 0 if exploring else 130
        log.line()
        log.line("interrupted" if status else "Ctrl-C: ending")
    finally:
        for s in previous:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        try:
            if system is not None:
                _close(system, log, keep=args.keep_state)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return status


def _close(system: LocalSystem, log: LiveLog, *, keep: bool) -> None:
    began = time.monotonic()
    count = sum(1 for c in system.children if c.process.poll() is None)
    killed = system.close(keep_dir=keep)
    where = f"kept {system.root}" if keep else f"removed {system.root}"
    forced = f" ({', '.join(killed)} killed)" if killed else ""
    log.line(f"stopped {count} processes{forced} in {time.monotonic() - began:.1f} s; {where}")


def _explore(story: Story, log: LiveLog) -> None:
    """Print commands to try, then wait for Ctrl-C, reporting a process that ends meanwhile."""
    system = story.system
    log.line()
    log.line(log.paint("The system stays up. Try, from another shell:", "bold"))
    for what, command in story.commands():
        log.line(log.paint(f"  # {what}", "dim"))
        log.line(f"  {command}")
    log.line()
    log.line(log.paint("For operators (on loopback):", "bold"))
    for what, url in story.endpoints():
        log.line(f"  {what}: {url}")
    running = [c for c in system.children if c.process.poll() is None]
    log.line()
    log.line(
        "running: " + ", ".join(f"{c.name} (pid {c.process.pid}, log {c.log})" for c in running)
    )
    bin_dir = Path(installed("consumer")).parent
    if bin_dir != Path():  # not on PATH: the full paths above, or put them on it
        log.line(f"(or type the names after: export PATH={shlex.quote(str(bin_dir))}:$PATH)")
    log.line(
        "consumer exit status: 0 ok (with a warning line when a proxy's stale copy was answered "
        "with the newest reading held), 1 rejected, 2 usage, 3 access denied, 4 not found, "
        "refused, timed out, unreachable or a stale copy"
    )
    log.line(log.paint("Ctrl-C stops everything and cleans up.", "bold"))
    reported: set[str] = set()
    while True:
        time.sleep(0.5)
        for child in running:
            if child.name not in reported and child.process.poll() is not None:
                reported.add(child.name)
                log.line(f"{child.name} exited {child.process.returncode}; see {child.log}")
