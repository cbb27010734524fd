"""The AS's own audit retention catching up on a long log, and what a request waits meanwhile.

A state's audit log is filled with 1,000,000 records (300,000 with ``--quick``), all past a
retention of 1 day (the builder of :mod:`bench.audit_verify`, records over 30 days). Then, in one
process with the real store, as the AS runs it (:mod:`authz_server.retention`): runs of
:func:`~authz_server.retention.prune_once` (at most ``STEP`` records each, a second apart while a
run pruned a whole step) until nothing is left, while a probe appends an audit record every
10 ms, as a request that writes (a secret delivery) does: a write transaction that waits for the
store's lock. Its latency (p50, p99, max) during the catch-up beside the same probe with nothing
else running; the catch-up's duration, and ``oscar-as audit --verify`` afterwards.

No issue sets a target; lower is better. A prune holds the lock for one transaction at a time
(the run's search, then each batch of deletes), so the probe waits for one of those at most.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from . import Figure, Settings
from .audit_verify import SPAN, _admin, _build, _init
from .testbed import Testbed

__all__ = ["run"]

FULL_RECORDS = 1_000_000
QUICK_RECORDS = 300_000
PROBE_EVERY = 0.01
IDLE_SECONDS = 3.0


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max, in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1e3, p99 * 1e3, ordered[-1] * 1e3


async def _measure(
    state: Path, *, stepped: bool = True
) -> tuple[list[float], list[float], float, int, int]:
    """(idle probe latencies, probe latencies during the catch-up, catch-up seconds, runs,
    records pruned). ``stepped`` false: one unbounded prune, as ``oscar-as audit prune``."""
    from authz_server import retention
    from authz_server.store import Store

    logging.getLogger("oscar.as").setLevel(logging.WARNING)  # not a line per run here
    store = await Store.open(state)
    try:
        samples: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                started = time.perf_counter()
                await store.audit("bench", "probe", "x", "ok", {}, int(time.time()))
                samples.append(time.perf_counter() - started)
                await asyncio.sleep(PROBE_EVERY)

        task = asyncio.create_task(probe())
        await asyncio.sleep(IDLE_SECONDS)
        idle, samples[:] = list(samples), []
        started = time.perf_counter()
        runs = pruned = 0
        while not stepped:
            now = int(time.time())
            runs, (_, pruned) = 1, await store.prune_audit(now - 86_400, now, actor="as")
            break
        while stepped:  # the loop of retention.keep_audit, its hourly sleep left out
            runs += 1
            _, deleted = await retention.prune_once(store, 1, int(time.time()))
            pruned += deleted
            if deleted < retention.STEP:
                break
            await asyncio.sleep(retention.CATCH_UP)
        catch_up = time.perf_counter() - started
        done.set()
        await task
        return idle, samples, catch_up, runs, pruned
    finally:
        await store.close()


def run(settings: Settings) -> Iterator[Figure]:
    """Build the log, let the retention catch up under the probe; yield the figures."""
    count = QUICK_RECORDS if settings.quick else FULL_RECORDS
    label = f"{count / 1e6:g}M"
    with Testbed("oscar-bench-retention-") as bed:
        state = bed.dir / "state"
        begin = int(time.time()) - SPAN - 2 * 86_400
        asyncio.run(_init(state, begin))
        build_s = _build(state, count, begin)
        print(f"  built {count:,} records in {build_s:.1f} s", flush=True)
        shutil.copytree(state, bed.dir / "copy")
        _, whole, whole_s, _, _ = asyncio.run(_measure(bed.dir / "copy", stepped=False))
        print(f"  one unbounded prune (as the CLI's): {whole_s:.1f} s", flush=True)
        idle, busy, catch_up, runs, pruned = asyncio.run(_measure(state))
        print(
            f"  retention: {pruned:,} records pruned in {runs} runs, {catch_up:.1f} s; "
            f"probe {len(busy)} writes during, {len(idle)} idle",
            flush=True,
        )
        verify_s, _, out = _admin(state, "audit", "--verify")
        if "chain intact" not in out:
            raise RuntimeError(f"unexpected verify output: {out.strip()}")
        print(f"  verify afterwards: {verify_s:.1f} s: {out.strip()}", flush=True)

    idle_p50, idle_p99, idle_max = _quantiles(idle)
    busy_p50, busy_p99, busy_max = _quantiles(busy)
    whole_p50, whole_p99, whole_max = _quantiles(whole)
    yield Figure(
        f"audit retention catch-up, {label} records",
        catch_up,
        "s",
        baseline="one unbounded prune (oscar-as audit prune)",
        baseline_value=whole_s,
        lower_is_better=True,
    )
    for name, value, base, unbounded in (
        ("p50", busy_p50, idle_p50, whole_p50),
        ("p99", busy_p99, idle_p99, whole_p99),
        ("max", busy_max, idle_max, whole_max),
    ):
        yield Figure(
            f"audit write {name} during one unbounded prune",
            unbounded,
            "ms",
            baseline="the same writes, no prune running",
            baseline_value=base,
            lower_is_better=True,
        )
        yield Figure(
            f"audit write {name} during the retention's catch-up",
            value,
            "ms",
            baseline="the same writes, no prune running",
            baseline_value=base,
            lower_is_better=True,
        )
