"""PostgreSQL stopped and started again under a running AS (issue 15): the AS answers 5.03 with a
Max-Age while the database is away (not 5.00, not a hang), stays up, logs one warning and no
traceback, reconnects with backoff once the server is back, and has lost nothing it accepted.

And the backend under it, in process: a transaction cut by a lost connection fails whole, a lost
writer or reader connects again at the next call, and while the server is down each call fails
at once (no connect attempted inside the backoff).

Real processes only: ``oscar-as serve`` on a private cluster of its own (tests/pg_harness.py),
stopped with ``pg_ctl stop -m fast`` and started again on the same port and data directory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
import pytest_asyncio
from aiocoap import GET, POST
from as_harness import AsEnv, Client, as_env, now, resource_body
from pg_harness import PgCluster

from authz_server.ca import init_state
from authz_server.store import DatabaseUnavailable, Resource

_T = TypeVar("_T")


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A cluster of this test's own: stopping it must not touch the session's."""
    started = PgCluster.start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def database(cluster: PgCluster) -> str:
    return cluster.new_database()


@pytest_asyncio.fixture
async def env(tmp_path: Path, cluster: PgCluster, database: str) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, (cluster, database)) as environment:
        yield environment


async def until(call: Callable[[], Awaitable[_T]], timeout: float = 10.0) -> _T:
    """``call`` again until the backend is connected again (a lost connection is only seen when
    used: that call fails, a later one reconnects)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def answer(client: Client, path: str, **query: str) -> tuple[str, object, int | None]:
    response = await client.send(client.message(GET, path, query), timeout=10.0)
    return response.code.dotted, response.payload, response.opt.max_age


@pytest.mark.asyncio
async def test_postgresql_restarting_gets_5_03_then_everything_accepted_is_still_there(
    env: AsEnv, cluster: PgCluster
) -> None:
    t = now()
    await env.device("p", "producer")
    await env.device("c", "consumer")
    await env.store.register_resources([Resource("p/a", "p", 50, "ccm-es256", 60, 0, t)])
    await env.store.add_grant("c", "p/*", None, t)
    server = env.server()
    other = env.server()  # stopped while the database is away
    producer, consumer = await env.client(server, "p"), await env.client(server, "c")
    # Accepted before: a registration through the AS, and a first delivery (audited).
    assert (await producer.call(POST, "resources", body=resource_body("b")))[0] == "2.01"
    code, before = await consumer.get("secret", r="p/a")
    assert code == "2.05" and before["epoch"] == 1
    env.keep(before["secret"])

    cluster.halt()
    started = time.monotonic()
    for _ in range(3):  # each at once (the backoff refuses without waiting), never 5.00
        code, _payload, max_age = await answer(consumer, "secret", r="p/a")
        assert code == "5.03"
        assert max_age is not None and 1 <= max_age <= 5
    registered = await producer.call(POST, "resources", body=resource_body("c"))
    assert registered == ("5.03", {"error": "the database is unavailable; retry later"})
    assert time.monotonic() - started < 5
    await asyncio.sleep(2)  # the watcher ticks every 0.2 s meanwhile
    assert server.proc is not None and server.proc.poll() is None  # still serving
    assert other.stop() == 0  # SIGTERM with the database away: a clean exit all the same
    assert "Traceback" not in other.log(), other.log()
    text = server.log()
    assert text.count("the database is unavailable") == 1, text  # once, not once a tick
    assert "Traceback" not in text and "background work failed" not in text, text

    cluster.resume()
    back = time.monotonic()
    while True:
        code, payload, _ = await answer(consumer, "secret", r="p/a")
        if code == "2.05":
            break
        assert code == "5.03" and time.monotonic() - back < 10, (code, payload)
        await asyncio.sleep(0.2)
    code, after = await consumer.get("secret", r="p/a")
    assert (code, after["epoch"], after["secret"]) == ("2.05", 1, before["secret"])
    code, listed = await producer.get("resources")
    assert code == "2.05" and {r["resource"] for r in listed["resources"]} == {"p/a", "p/b"}
    assert (await producer.call(POST, "resources", body=resource_body("c")))[0] == "2.01"
    await asyncio.sleep(0.5)  # a tick or two: the watcher has seen the database again
    assert "the database is reachable again" in server.log()

    # Nothing accepted before is lost, and the chain verifies (the test's own store reconnects).
    assert await until(lambda: env.store.resource("p/b")) is not None
    epoch = await until(lambda: env.store.epoch("p/a"))
    assert epoch is not None and epoch.epoch == 1
    records = await until(env.store.audit_records)
    assert [r.subject for r in records if r.action == "secret" and r.actor == "c"] == ["p/a"]
    ok, summary = await until(env.store.verify_audit)
    assert ok, summary


async def terminate(cluster: PgCluster, *pids: int) -> None:
    """End server sessions as an operator (or a server crash) would."""
    conn = await asyncpg.connect(cluster.url())
    try:
        for pid in pids:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_transaction_cut_by_a_lost_connection_fails_whole_and_the_next_call_reconnects(
    tmp_path: Path, cluster: PgCluster, database: str
) -> None:
    store = await init_state(
        tmp_path / "state", as_uri="coaps://127.0.0.1", now=now(), database=database
    )
    db = store.db
    try:
        with pytest.raises(DatabaseUnavailable):
            async with db.transaction():
                await db.execute("CREATE TABLE probe (n integer)")
                await db.execute("INSERT INTO probe VALUES (1)")
                row = await db.one("SELECT pg_backend_pid()")
                await terminate(cluster, row[0])
                await db.execute("INSERT INTO probe VALUES (2)")
        # The next call connects again; nothing of the cut transaction was applied.
        assert await db.one("SELECT to_regclass('probe')") == (None,)
        async with db.transaction():
            await db.execute("CREATE TABLE probe (n integer)")
        assert await db.one("SELECT to_regclass('probe')::text") == ("probe",)
        # A lost reader: that read fails, the next one connects again.
        pids = [r[0] for r in await db.all(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )]  # fmt: skip
        await terminate(cluster, *pids)
        answers: list[str] = []
        for _ in range(8):  # every reader once at least (the four are handed out in turn)
            try:
                await db.lookup("SELECT 1")
                answers.append("ok")
            except DatabaseUnavailable:
                answers.append("lost")
        # (a reader asyncpg already saw closed connects again before its read, without a loss)
        assert answers[-4:] == ["ok"] * 4, answers
        now_open = {r[0] for r in await db.all(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )}  # fmt: skip
        assert len(now_open) >= 4 and not now_open & set(pids), (now_open, pids)
        # The server gone: each call fails at once, no connect attempted inside the backoff.
        cluster.halt()
        with pytest.raises(DatabaseUnavailable):
            await db.one("SELECT 1")
        started = time.monotonic()
        for _ in range(100):
            with pytest.raises(DatabaseUnavailable):
                await db.one("SELECT 1")
            with pytest.raises(DatabaseUnavailable):
                await db.lookup("SELECT 1")
        assert time.monotonic() - started < 5  # at most one refused connect per backoff
        cluster.resume()
        assert await until(lambda: db.one("SELECT 1")) == (1,)
        assert await until(lambda: db.lookup("SELECT 1")) == (1,)
        assert (await store.verify_audit())[0]
    finally:
        await store.close()
