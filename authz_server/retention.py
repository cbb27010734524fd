"""The audit retention a running AS applies by itself (issue 13, finding 5).

Every ``every`` seconds (and once :data:`FIRST_DELAY` seconds after the start, or sooner if
``every`` is shorter), the records dated more than ``days`` days ago are pruned with
:meth:`authz_server.store.Store.prune_audit`, the function ``oscar-as audit prune`` uses: behind a
MACed checkpoint, so ``oscar-as audit --verify`` goes on verifying from it, with a ``prune``
record (actor ``as``) appended to the chain.

It never holds the database for long: a run prunes at most :data:`STEP` records (so the
transaction that finds them reads that many rows at most), deleted in batches of their own
transaction each; a run that hit :data:`STEP` is followed by the next one after
:data:`CATCH_UP` seconds rather than ``every`` (a first start on a long log catches up in steps,
requests served in between). It is a task of its own, not a step of the change watcher, so a long
prune never delays a revocation taking effect.

Several AS instances on one database prune once per ``every`` between them: a run prunes
nothing if the checkpoint (whoever wrote it) is younger than ``every`` seconds, decided inside
the prune's write transaction; only this instance's own catch-up runs go on regardless.

One info line per run that pruned something (how many records, up to which, dated before when);
nothing for a run that found nothing. A failed run is one warning line (the error's text, never
a record) and is tried again after ``min(every, RETRY)`` seconds. ``days`` = 0 keeps every record
(the task returns at once).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from .store import Store

__all__ = ["CATCH_UP", "FIRST_DELAY", "RETRY", "STEP", "keep_audit"]

log = logging.getLogger("oscar.as")

#: Seconds from the start to the first run: the reconnections of a restart go first.
FIRST_DELAY = 10.0
#: Records one run prunes at most.
STEP = 100_000
#: Seconds to the next run after a run that pruned :data:`STEP` records.
CATCH_UP = 1.0
#: Seconds to the next try after a failed run (or ``every`` if that is shorter).
RETRY = 60.0


def _iso(moment: int) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def prune_once(
    store: Store, days: float, now: int, *, min_interval: float | None = None
) -> tuple[int, int]:
    """One run: prune the records dated before ``now - days``, at most :data:`STEP` of them;
    nothing if the checkpoint is younger than ``min_interval`` seconds (see
    :meth:`authz_server.store.Store.prune_audit`). Returns (the last pruned record's seq or 0,
    records deleted); logs what it did."""
    before = now - math.ceil(days * 86_400)
    through, deleted = await store.prune_audit(
        before, now, actor="as", limit=STEP, min_interval=min_interval
    )
    if through:
        log.info(
            "audit retention: pruned %d records up to record %d (dated before %s, %s days); "
            "the log is verified from the checkpoint at record %d",
            deleted,
            through,
            _iso(before),
            f"{days:g}",
            through,
        )
    return through, deleted


async def keep_audit(
    store: Store, days: float, every: float, clock: Callable[[], float] = time.time
) -> None:
    """Apply the retention of ``days`` days every ``every`` seconds, until cancelled."""
    if not days:
        return
    delay = min(FIRST_DELAY, every)
    catching_up = False
    while True:
        await asyncio.sleep(delay)
        delay = every
        try:
            _, deleted = await prune_once(
                store, days, int(clock()), min_interval=None if catching_up else every
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database locked or failing: the next run tries again
            delay = min(every, RETRY)
            log.warning(
                "audit retention: the prune failed (%s: %s); trying again in %g s",
                type(exc).__name__,
                exc,
                delay,
            )
            continue
        catching_up = deleted >= STEP
        if catching_up:
            delay = CATCH_UP
