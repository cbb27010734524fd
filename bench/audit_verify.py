"""``oscar-as audit --verify`` on a 10-million-record audit log, and pruning it.

An AS state directory is made (``init``), then its audit table is filled in bulk with a valid
chain: records as the AS writes them (secret deliveries, grants, denials with and without counts;
1,000 devices, 30 days), chained with the state's own audit key, inserted by ``executemany`` in
one transaction with ``synchronous=OFF`` and a rollback journal (then back to WAL, as the AS
keeps it). 10,000,000 records (1,000,000 with ``--quick``).

Then, each as a process of its own, as an admin runs them, timed from spawn to exit with its peak
RSS (``ru_maxrss`` of the child):

- ``oscar-as audit --verify``: the whole chain, streamed (a batch of rows at a time in a worker
  thread, one read snapshot);
- ``oscar-as audit prune --before T`` for the older half, and ``--verify`` again (from the
  checkpoint).

Baseline: the verification as it was before issue 13 (``async for`` over an aiosqlite cursor, one
thread hop per row, :func:`oscar.cbor.dumps` and ``hmac.new`` per record), on the first 200,000
records (50,000 quick), per record; ours per record over the whole log beside it.

No issue sets a target; lower is better.
"""

from __future__ import annotations

import asyncio
import re
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiosqlite

from oscar import cbor

from . import Figure, Settings
from .testbed import ROOT, Testbed

__all__ = ["run"]

FULL_RECORDS = 10_000_000
QUICK_RECORDS = 1_000_000
BASELINE_RECORDS, QUICK_BASELINE_RECORDS = 200_000, 50_000
DEVICES = 1000
SPAN = 30 * 86_400  # the records' dates: the last 30 days


def _records(count: int, start_seq: int, start_chain: bytes, vault: object, begin: int) -> Iterator[
    tuple[int, int, str, str, str, str, str, bytes]
]:  # fmt: skip
    """``count`` records after (start_seq, start_chain), chained as the AS chains them."""
    from authz_server.store.audit import audit_bytes

    chain_of = vault.chain_function()  # type: ignore[attr-defined]
    chain = start_chain
    kinds = [
        ("secret", "ok", '{"epoch":%d}'),
        ("secret", "denied", '{"reason":"no grant for this epoch"}'),
        ("keys", "denied", '{"reason":"not the owner"}'),
        (
            "secret",
            "denied",
            '{"count":%d,"from":1,"others":0,"reason":"no grant for this epoch",'
            '"subjects":{"p-1/a":1},"to":2}',
        ),
        ("grant", "ok", '{"pattern":"p-7/*","rotated":[],"until":null}'),
    ]
    for i in range(count):
        seq = start_seq + 1 + i
        at = begin + (i * SPAN) // count
        action, result, detail = kinds[i % len(kinds)]
        if "%d" in detail:
            detail = detail % (i % 977)
        actor = f"device-{i % DEVICES}"
        subject = f"p-{i % 97}/temperature-{i % 13}"
        chain = chain_of(chain, audit_bytes(seq, at, actor, action, subject, result, detail))
        yield (seq, at, actor, action, subject, result, detail, chain)


def _build(state: Path, count: int, begin: int) -> float:
    """Fill the state's audit table up to ``count`` records; returns the seconds it took."""
    from authz_server.store import Store

    async def vault_and_head() -> tuple[object, int, bytes]:
        store = await Store.open(state)
        try:
            seq, chain = await store.audit_head()
            return store.envelope, seq, chain
        finally:
            await store.close()

    vault, seq, chain = asyncio.run(vault_and_head())
    started = time.perf_counter()
    db = sqlite3.connect(state / "as.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        rows = _records(count - seq, seq, chain, vault, begin)
        db.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        last = db.execute("SELECT seq, chain FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'audit_head'", (cbor.dumps([last[0], last[1]]),)
        )
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    return time.perf_counter() - started


async def _init(state: Path, begin: int) -> None:
    """A new state directory whose first record (init) is dated ``begin``."""
    from authz_server.ca import init_state

    store = await init_state(state, as_uri="coaps://127.0.0.1:5684", now=begin)
    await store.close()


def _admin(state: Path, *argv: str) -> tuple[float, float, str]:
    """Run ``oscar-as ARGV --state STATE`` as a process: (seconds, peak RSS MiB, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "authz_server", *argv, "--state", str(state)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=3600,
    )
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if done.returncode != 0:
        raise RuntimeError(f"oscar-as {' '.join(argv)} failed: {done.stderr.strip()}")
    # ru_maxrss of the children is the largest so far: a smaller child does not show. Each
    # child's own peak is not available after the fact, so report the running maximum.
    return elapsed, max(peak, before) / 1024, done.stdout


def _old_verify_per_record(state: Path, limit: int) -> float:
    """Microseconds a record of the verification before issue 13, over ``limit`` records."""
    from authz_server.store import Store

    async def walk() -> float:
        store = await Store.open(state)
        try:
            vault = store.envelope
            db = await aiosqlite.connect(state / "as.db")
            try:
                started = time.perf_counter()
                previous, count = b"", 0
                async with db.execute(
                    "SELECT seq, at, actor, action, subject, result, detail, chain "
                    "FROM audit ORDER BY seq LIMIT ?",
                    (limit,),
                ) as cursor:
                    async for seq, at, actor, action, subject, result, detail, chain in cursor:
                        want = vault.chain(
                            previous, cbor.dumps([seq, at, actor, action, subject, result, detail])
                        )
                        if bytes(chain) != want:
                            raise RuntimeError(f"record {seq} does not verify")
                        previous, count = want, count + 1
                return (time.perf_counter() - started) / count * 1e6
            finally:
                await db.close()
        finally:
            await store.close()

    return asyncio.run(walk())


def run(settings: Settings) -> Iterator[Figure]:
    """Build the log, verify it, prune half, verify again; yield the figures."""
    count = QUICK_RECORDS if settings.quick else FULL_RECORDS
    sample = QUICK_BASELINE_RECORDS if settings.quick else BASELINE_RECORDS
    label = f"{count // 1_000_000}M"
    with Testbed("oscar-bench-audit-") as bed:
        state = bed.dir / "state"
        begin = int(time.time()) - SPAN - 60
        asyncio.run(_init(state, begin))
        build_s = _build(state, count, begin)
        size_mib = sum(p.stat().st_size for p in state.glob("as.db*")) / 2**20
        print(f"  built {count:,} records in {build_s:.1f} s ({size_mib:.0f} MiB)", flush=True)

        verify_s, verify_rss, out = _admin(state, "audit", "--verify")
        if f"{count} records, chain intact" not in out:
            raise RuntimeError(f"unexpected verify output: {out.strip()}")
        print(f"  verify: {verify_s:.1f} s, peak RSS {verify_rss:.0f} MiB", flush=True)
        old_us = _old_verify_per_record(state, sample)
        print(f"  old verify: {old_us:.1f} us/record over {sample:,}", flush=True)

        middle = begin + SPAN // 2
        prune_s, _, out = _admin(state, "audit", "prune", "--before", str(middle))
        print(f"  prune (half): {prune_s:.1f} s: {out.strip()}", flush=True)
        after_s, _, out = _admin(state, "audit", "--verify")
        print(f"  verify after the prune: {after_s:.1f} s: {out.strip()}", flush=True)
        found = re.search(r"intact: (\d+) records", out)
        kept = int(found.group(1)) if found else 0

    yield Figure(f"audit verify, {label} records", verify_s, "s", lower_is_better=True)
    yield Figure(
        "audit verify per record",
        verify_s / count * 1e6,
        "us",
        baseline="before issue 13 (row by row)",
        baseline_value=old_us,
        lower_is_better=True,
    )
    yield Figure(f"audit verify peak RSS, {label}", verify_rss, "MiB", lower_is_better=True)
    yield Figure(f"audit log build, {label} records", build_s, "s", lower_is_better=True)
    yield Figure(f"audit log on disk, {label}", size_mib, "MiB", lower_is_better=True)
    yield Figure(f"audit prune, {count // 2:,} records", prune_s, "s", lower_is_better=True)
    yield Figure(f"audit verify, {kept / 1e6:g}M after prune", after_s, "s", lower_is_better=True)
