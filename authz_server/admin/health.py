"""The overview's "AS instances" section: each running instance's last heartbeat and health.

Every ``oscar-as serve`` process on the database writes a heartbeat row
(:mod:`authz_server.store.instances`); this lists them: address, host and pid, when it started,
when it was last seen, healthy (seen within :data:`~authz_server.store.instances.STALE_AFTER` of
its own heartbeat periods) or not responding (killed, hung, or cut off from the database), and
the facts it reported. One instance on SQLite, several on one PostgreSQL database. Every value
escaped; the facts are read as numbers and flags only.
"""

from __future__ import annotations

import datetime

from ..store import Instance
from .html import esc, table

__all__ = ["instances_section"]


def _moment(seconds: float) -> str:
    try:
        stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return "-"
    return esc(stamp.strftime("%Y-%m-%d %H:%M:%SZ"))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


#: The badges, fixed texts and classes (nothing of a row goes into them).
HEALTHY = '<span class="state state-healthy">healthy</span>'
NOT_RESPONDING = '<span class="state state-not-responding">not responding</span>'
UNREACHABLE = '<span class="state state-not-responding">unreachable</span>'


def _count(facts: dict[str, object], key: str) -> str:
    value = facts.get(key)
    return esc(value) if type(value) is int else "-"


def _facts(facts: dict[str, object]) -> str:
    """What the instance reported, one fact a line (counts as numbers only)."""
    database = facts.get("database")
    reached = "reachable" if database is True else UNREACHABLE if database is False else "-"
    return "<br>".join(
        (
            f"database {reached}",
            f"{_count(facts, 'connections')} DTLS connections",
            f"{_count(facts, 'devices')} devices allowed",
            f"{_count(facts, 'observations')} /keys observations",
        )
    )


def instances_section(instances: list[Instance], now: float) -> str:
    """The section's HTML: a heading and one row per instance (healthy ones first)."""
    healthy = sum(1 for i in instances if i.healthy(now))
    rows = [
        [
            esc(i.address),
            f"{esc(i.host)}<br>pid {esc(i.pid)}",
            _moment(i.started_at),
            f"{_moment(i.seen_at)}<br>{esc(_ago(now - i.seen_at))}",
            HEALTHY if i.healthy(now) else NOT_RESPONDING,
            _facts(i.facts),
        ]
        for i in sorted(instances, key=lambda i: (not i.healthy(now), i.address, i.started_at))
    ]
    header = ("address", "host", "started", "last seen", "health", "facts at the last beat")
    return f"<h2>AS instances ({esc(healthy)} of {esc(len(instances))} healthy)</h2>" + table(
        header, rows, "no AS instance is running on this database"
    )
