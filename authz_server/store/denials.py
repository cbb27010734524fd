"""Denials counted rather than written one by one: a bounded, pure tally (no I/O, no clock).

A refused request (4.01, 4.03) used to be one fsynced audit record each: 50 a second per device at
the rate limit, millions a day, with names the requester chose. Here they are tallied per *window*
of one (device, action, reason):

- a window opens with the first denial of its key; the first denials of up to
  :data:`IMMEDIATE_SUBJECTS` distinct subjects (the names asked for) in it are written at once, as
  before (the evidence that something was refused never waits);
- every later denial is counted in memory: how many, the first and last time, and how many per
  subject for up to :data:`SAMPLED_SUBJECTS` subjects (the rest only as a number, ``others``);
- when the window ends (``interval`` seconds after it opened) its count becomes one aggregate
  record; if anything was counted the key goes on with a fresh window that writes nothing at once
  (a flood yields one record per interval), else the key is forgotten (the next denial is
  written at once again);
- at most :data:`MAX_WINDOWS` windows are open: the store writes every aggregate early
  (:meth:`DenialTally.drain`) rather than let a new key in past that.

Memory is bounded by :data:`MAX_WINDOWS` x (:data:`IMMEDIATE_SUBJECTS` + :data:`SAMPLED_SUBJECTS`)
names of at most :data:`MAX_NAME` characters, whatever is asked. The device id is the one the DTLS
session authenticated; the action and reason come from the AS's code; only the subject is chosen
by the requester, and it is cut to :data:`MAX_NAME` characters.

An aggregate record: actor and action as the denials', subject the one subject counted or ``*``,
result ``denied``, detail ``{"reason", "count", "from", "to", "subjects": {name: count},
"others"}``.
The denials of a window are the ones written at once plus ``count``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "IMMEDIATE_SUBJECTS",
    "MAX_NAME",
    "MAX_WINDOWS",
    "SAMPLED_SUBJECTS",
    "DenialTally",
]

#: Subjects of a fresh window whose first denial is written at once.
IMMEDIATE_SUBJECTS = 8
#: Subjects counted by name in an aggregate; the others only as a number.
SAMPLED_SUBJECTS = 8
#: Windows (device, action, reason) open at once.
MAX_WINDOWS = 4096
#: Characters kept of a requester's name (resource and device ids are shorter).
MAX_NAME = 64

#: (actor, action, subject, result, detail, at): a record for the audit chain.
Entry = tuple[str, str, str, str, dict[str, Any], int]
_Key = tuple[str, str, str]  # (actor, action, reason)


def bounded(name: str) -> str:
    """A requester's name cut to :data:`MAX_NAME` characters."""
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


@dataclass(slots=True)
class _Window:
    end: float
    immediate: bool  # whether first denials of new subjects are written at once
    written: set[str] = field(default_factory=set)
    count: int = 0
    first: int = 0
    last: int = 0
    subjects: dict[str, int] = field(default_factory=dict)
    others: int = 0


class DenialTally:
    """Open windows in the order they end (a window that goes on moves to the back)."""

    __slots__ = ("_windows", "interval")

    def __init__(self, interval: float = 60.0) -> None:
        if not interval > 0:
            raise ValueError("the denial interval must be positive")
        self.interval = float(interval)
        self._windows: dict[_Key, _Window] = {}

    def __repr__(self) -> str:
        return f"DenialTally(interval={self.interval:g}, windows={len(self._windows)})"

    def __len__(self) -> int:
        return len(self._windows)

    def full_for(self, actor: str, action: str, reason: str) -> bool:
        """Whether noting this denial would open a window past :data:`MAX_WINDOWS`."""
        return len(self._windows) >= MAX_WINDOWS and (actor, action, reason) not in self._windows

    def note(self, actor: str, action: str, subject: str, reason: str, now: int) -> bool:
        """Tally one denial; True if it must be written at once (else it was counted).

        Past :data:`MAX_WINDOWS` (see :meth:`full_for`) it is written at once, untracked.
        """
        subject = bounded(subject)
        key = (actor, action, reason)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= MAX_WINDOWS:
                return True
            window = self._windows[key] = _Window(end=now + self.interval, immediate=True)
        if (
            window.immediate
            and subject not in window.written
            and len(window.written) < IMMEDIATE_SUBJECTS
        ):
            window.written.add(subject)
            return True
        if window.count == 0:
            window.first = now
        window.count += 1
        window.last = now
        if subject in window.subjects or len(window.subjects) < SAMPLED_SUBJECTS:
            window.subjects[subject] = window.subjects.get(subject, 0) + 1
        else:
            window.others += 1
        return False

    def next_end(self) -> float | None:
        """When the first open window ends, or None."""
        return next((w.end for w in self._windows.values()), None)

    def due(self, now: float) -> list[Entry]:
        """The aggregate records of the windows ended by ``now``; those go on or are forgotten."""
        entries: list[Entry] = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if window.end > now:
                break
            del self._windows[key]
            if window.count:
                entries.append(_aggregate(key, window, int(now)))
                end = max(window.end, now) + self.interval
                self._windows[key] = _Window(end=end, immediate=False)
        return entries

    def drain(self, now: float) -> list[Entry]:
        """Every window's aggregate record now (at shutdown, or when the table is full); all
        windows are forgotten."""
        entries = [_aggregate(k, w, int(now)) for k, w in self._windows.items() if w.count]
        self._windows.clear()
        return entries

    def pending(self) -> int:
        """Denials counted and not yet written (what a kill -9 now would lose)."""
        return sum(w.count for w in self._windows.values())


def _aggregate(key: _Key, window: _Window, now: int) -> Entry:
    actor, action, reason = key
    one = len(window.subjects) == 1 and not window.others
    subject = next(iter(window.subjects)) if one else "*"
    detail = {
        "reason": reason,
        "count": window.count,
        "from": window.first,
        "to": window.last,
        "subjects": dict(window.subjects),
        "others": window.others,
    }
    return (actor, action, subject, "denied", detail, now)
