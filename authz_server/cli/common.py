"""What the ``oscar-as`` commands share: the program's name, the exit-1 error, argument types,
running a body on the state directory's store, and the terminal output (tables, JSON, times).

What it does not do: define a command (the other modules of :mod:`authz_server.cli`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import re
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from oscar.names import MAX_RESOURCE_ID, is_device_id
from oscar_io.bundle import MAX_AS_URIS, check_as_uri
from oscar_io.errors import UsageError

from ..store import Store

__all__ = [
    "AUDIT_FIELDS",
    "DEFAULT_AS_URI",
    "DEVICE_FIELDS",
    "EPOCH_FIELDS",
    "GRANT_FIELDS",
    "PROG",
    "RESOURCE_FIELDS",
    "Handler",
    "Refused",
    "UsageError",
    "as_uri_arg",
    "as_uris_arg",
    "days",
    "epoch_runs",
    "iso",
    "listed",
    "not_negative",
    "pick",
    "positive",
    "print_json",
    "printable",
    "resource_pattern",
    "run_on_store",
    "table",
    "time_arg",
    "with_store",
]

PROG = "oscar-as"
DEFAULT_AS_URI = "coaps://127.0.0.1:5684"

Handler = Callable[[argparse.Namespace, int], int]
T = TypeVar("T")


class Refused(Exception):
    """The state says no, other than through the store's NoSuchRecord/Conflict (exit 1)."""


# --- input ---------------------------------------------------------------------------------------

_PATTERN_SEGMENT = re.compile(r"[A-Za-z0-9._~*-]+")


def resource_pattern(text: str) -> str:
    """A grant pattern: ``<producer id>/`` and path segments that may hold ``*``."""
    producer, sep, path = text.partition("/")
    if (
        len(text) > MAX_RESOURCE_ID
        or not sep
        or not is_device_id(producer)
        or not all(_PATTERN_SEGMENT.fullmatch(s) and s not in (".", "..") for s in path.split("/"))
    ):
        raise UsageError(
            "a resource pattern is '<producer id>/<path>' whose path segments are made of "
            "A-Z a-z 0-9 . _ ~ - and '*' (matching anything, '/' included), for example "
            "'sensor-1/*'"
        )
    return text


def time_arg(text: str, now: int, flag: str = "--until", *, future: bool = True) -> int:
    """Unix seconds, or ISO 8601 with an explicit UTC offset (``2030-01-01T00:00:00Z``); in the
    future (or, with ``future`` false, not in it)."""
    if re.fullmatch(r"[0-9]{1,12}", text):
        moment = int(text)
    else:
        try:
            parsed = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise UsageError(
                f"{flag} is seconds since 1970 or ISO 8601 with a UTC offset, "
                "such as 2030-01-01T00:00:00Z"
            )
        moment = int(parsed.timestamp())
    if future and moment <= now:
        raise UsageError(f"{flag} is in the past")
    if not future and moment > now:
        raise UsageError(f"{flag} is in the future")
    return moment


def as_uri_arg(text: str) -> str:
    """An ``--as-uri`` value, checked as a bundle's ``as_uri`` is when a device loads it
    (:func:`oscar_io.bundle.check_as_uri`): nothing recorded that no device could use."""
    if not check_as_uri(text):
        raise UsageError("--as-uri must be coaps://HOST[:PORT], for example " + DEFAULT_AS_URI)
    return text


def as_uris_arg(texts: Sequence[str] | None) -> list[str]:
    """The ``--as-uri`` values (repeatable; none: :data:`DEFAULT_AS_URI`), each checked by
    :func:`as_uri_arg`: at most :data:`~oscar_io.bundle.MAX_AS_URIS`, no AS twice, in order."""
    uris = [as_uri_arg(text) for text in texts or [DEFAULT_AS_URI]]
    if len(uris) > MAX_AS_URIS:
        raise UsageError(f"--as-uri may be given at most {MAX_AS_URIS} times")
    seen: set[str] = set()
    for uri in uris:
        key = uri.rstrip("/")
        if key in seen:
            raise UsageError(f"--as-uri {uri} is given twice; list each AS instance once")
        seen.add(key)
    return uris


def positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        value = kind(text)
        if not value > 0:  # type: ignore[operator]
            raise ValueError
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


def not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


not_negative.__name__ = "non-negative int"


def days(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # nan and inf too
        raise ValueError
    return int(value) if value.is_integer() else value


days.__name__ = "number of days"


# --- state ---------------------------------------------------------------------------------------


async def with_store(
    state: Path, body: Callable[[Store], Awaitable[T]], database: str | None = None
) -> T:
    """``body`` on the state directory's store (its recorded database, or ``database``)."""
    store = await Store.open(state, database=database)
    try:
        return await body(store)
    finally:
        await store.close()


def run_on_store(args: argparse.Namespace, body: Callable[[Store], Awaitable[T]]) -> T:
    return asyncio.run(with_store(args.state, body, getattr(args, "database", None)))


# --- output --------------------------------------------------------------------------------------

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """Text for the terminal: control, format and separator characters escaped."""
    text = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cf", "Zl", "Zp") else c for c in text
    )


def iso(moment: object) -> str:
    if not isinstance(moment, int):
        return "-"
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# What listings show, by name: an allowlist, so that no secret field can slip into one.
DEVICE_FIELDS = ("id", "role", "status", "enrolled_at", "revoked_at")
RESOURCE_FIELDS = (
    *("id", "producer_id", "content_format", "profile", "max_age", "rotation_period"),
    "registered_at",
)
EPOCH_FIELDS = ("epoch", "state", "created_at", "activated_at", "deactivated_at")
GRANT_FIELDS = ("id", "consumer_id", "pattern", "until", "granted_at", "revoked_at")
AUDIT_FIELDS = ("seq", "at", "actor", "action", "subject", "result", "detail")


def pick(record: object, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(record, name) for name in names}


def table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, times: Sequence[str] = ()
) -> None:
    """Aligned columns under an upper-case header; columns named in ``times`` as ISO 8601."""
    shown = [
        [iso(c) if name in times else printable(c) for name, c in zip(header, row, strict=True)]
        for row in rows
    ]
    cells = [[name.upper() for name in header], *shown]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def listed(items: list[str]) -> str:
    return ", ".join(printable(i) for i in items) if items else "none"


def epoch_runs(epochs: list[tuple[int, str]]) -> str:
    """``1-40 destroyed, 41 deactivated, 42 active``: runs of consecutive epochs in one state."""
    runs: list[list[Any]] = []
    for number, state in epochs:
        if runs and runs[-1][2] == state and runs[-1][1] == number - 1:
            runs[-1][1] = number
        else:
            runs.append([number, number, state])
    return ", ".join(
        f"{first}{'' if first == last else f'-{last}'} {state}" for first, last, state in runs
    )
