"""A real AS process flooded with denied requests: the audit log grows by a bounded number of
records whose counts add up to the denials answered, after a clean stop; after a kill -9 the
first records of the burst are there and the chain verifies, only the counts are lost.

Each test runs twice, the AS on SQLite then on PostgreSQL (``as_database``, tests/conftest.py):
the denials' tally and its records are the store's, and the same on both."""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from as_harness import AsEnv, Client, as_env
from pg_harness import PgCluster

from authz_server.store import Store
from authz_server.store.denials import IMMEDIATE_SUBJECTS

#: Denied requests sent per test; each used to be an fsynced record of its own.
FLOOD = 400
#: In flight at once.
CONCURRENCY = 16


@pytest_asyncio.fixture
async def env(tmp_path: Path, as_database: tuple[PgCluster, str] | None) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, as_database) as environment:  # on SQLite, then on PostgreSQL
        yield environment


async def flood(client: Client, count: int) -> dict[str, int]:
    """``count`` GET /secret for names the client makes up; the response codes counted."""
    rng = random.Random(13)
    names = [
        "p1/" + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 40)))
        for _ in range(count)
    ]
    codes: dict[str, int] = {}
    queue = list(names)

    async def worker() -> None:
        while queue:
            name = queue.pop()
            code, _ = await client.get("secret", r=name)
            codes[code] = codes.get(code, 0) + 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return codes


async def denials(store: Store, actor: str) -> list:
    return [r for r in await store.audit_records() if r.actor == actor and r.result == "denied"]


async def setup(env: AsEnv) -> Client:
    await env.device("p1", "producer")
    await env.device("c1", "consumer")  # no grant: every /secret is a 4.03
    server = env.server("--rate", "5000", "--burst", "5000")
    return await env.client(server, "c1")


@pytest.mark.asyncio
async def test_a_flood_of_denials_is_a_few_records_with_exact_counts(env: AsEnv) -> None:
    client = await setup(env)
    codes = await flood(client, FLOOD)
    assert codes == {"4.03": FLOOD}
    # While it runs: the first denials of the burst are on disk already, nothing else.
    written = await denials(env.store, "c1")
    assert len(written) == IMMEDIATE_SUBJECTS
    assert all(r.detail == {"reason": "no grant for this epoch"} for r in written)
    assert env.servers[0].stop() == 0  # SIGTERM: the counts are written on the way out
    records = await denials(env.store, "c1")
    # One aggregate per minute the flood lasted (it lasts seconds; a loaded box gets slack).
    assert IMMEDIATE_SUBJECTS + 1 <= len(records) <= IMMEDIATE_SUBJECTS + 3
    aggregates = [r for r in records if "count" in r.detail]
    assert len(records) - len(aggregates) == IMMEDIATE_SUBJECTS
    assert IMMEDIATE_SUBJECTS + sum(r.detail["count"] for r in aggregates) == FLOOD
    for r in aggregates:
        assert r.subject == "*" and r.detail["reason"] == "no grant for this epoch"
        assert len(r.detail["subjects"]) <= 8 and all(len(s) <= 64 for s in r.detail["subjects"])
    ok, summary = await env.store.verify_audit()
    assert ok, summary


@pytest.mark.asyncio
async def test_a_kill_9_loses_only_the_counts_of_the_open_interval(env: AsEnv) -> None:
    client = await setup(env)
    assert await flood(client, FLOOD) == {"4.03": FLOOD}
    server = env.servers.pop()
    server.kill()
    records = await denials(env.store, "c1")
    # What a kill -9 loses: the denials counted in the open interval (here all but the first
    # few of the burst, which were written before they were answered).
    assert len(records) == IMMEDIATE_SUBJECTS
    assert not any("count" in r.detail for r in records)
    ok, summary = await env.store.verify_audit()
    assert ok, summary
    # The AS starts again on the same state and tallies afresh.
    server = env.server("--rate", "5000", "--burst", "5000")
    client = await env.client(server, "c1")
    assert await flood(client, 20) == {"4.03": 20}
    assert server.stop() == 0
    records = await denials(env.store, "c1")
    assert len(records) - IMMEDIATE_SUBJECTS == IMMEDIATE_SUBJECTS + 1
    assert (await env.store.verify_audit())[0]
