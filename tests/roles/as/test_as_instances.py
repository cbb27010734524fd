"""The running AS instances' heartbeats (issue 18, the console's "each instance's health"), on
SQLite and PostgreSQL (``backing``): a beat is one upsert that is not a change, rows unseen for an
hour are pruned, a clean stop removes its row, two stores on one database see each other's rows;
the server's heartbeat task goes on when the database refuses a beat; the overview's section
(healthy or not responding, every value escaped); ``ServeOptions.heartbeat``'s bounds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
from pg_harness import Backing

from authz_server.admin.health import instances_section
from authz_server.ca import CertificateAuthority, init_state
from authz_server.server import ServeOptions, _Server
from authz_server.store import Instance, Store
from authz_server.store.instances import PRUNE_AFTER, STALE_AFTER

NOW = 1_800_000_000.0


def instance(name: str, seen_at: float = NOW, **facts: object) -> Instance:
    return Instance(name, f"127.0.0.1:{5684 + len(name)}", "host-1", 4242, NOW - 60, seen_at, 0.5,
                    dict(facts))  # fmt: skip


@pytest_asyncio.fixture
async def store(backing: Backing) -> Store:
    s = await init_state(
        backing.state, as_uri="coaps://127.0.0.1:5684", now=int(NOW), database=backing.database
    )
    yield s
    await s.close()


@pytest.mark.asyncio
async def test_beats_are_upserts_that_change_nothing_else_and_old_rows_go(
    store: Store, backing: Backing
) -> None:
    changes, head = await store.changes(), await store.audit_head()
    await store.beat(instance("a", devices=3, database=True))
    await store.beat(instance("bb", seen_at=NOW - 10))
    await store.beat(replace(instance("a", devices=4), seen_at=NOW + 1))  # the next beat of a
    listed = await store.instance_list()
    assert [i.id for i in listed] == ["a", "bb"]  # by address
    a = listed[0]
    assert (a.seen_at, a.started_at, a.facts) == (NOW + 1, NOW - 60, {"devices": 4})
    assert (a.address, a.host, a.pid, a.every) == ("127.0.0.1:5685", "host-1", 4242, 0.5)
    # Not a change (no server reloads for a beat), not audited.
    assert (await store.changes(), await store.audit_head()) == (changes, head)
    # Health: within STALE_AFTER of its own periods.
    assert a.healthy(NOW + 1 + STALE_AFTER * 0.5) and not a.healthy(NOW + 1.01 + STALE_AFTER * 0.5)
    # A beat an hour after bb's last one prunes it; a clean stop removes a's row.
    await store.beat(replace(a, seen_at=NOW - 10 + PRUNE_AFTER + 1))
    assert [i.id for i in await store.instance_list()] == ["a"]
    await store.remove_instance("a")
    assert await store.instance_list() == []
    assert (await backing.execute("SELECT count(*) FROM instances"))[0][0] == 0


@pytest.mark.asyncio
async def test_two_stores_on_one_database_list_each_others_instances(
    store: Store, backing: Backing
) -> None:
    other = await Store.open(backing.state, database=backing.database)
    try:
        await store.beat(instance("a"))
        await other.beat(instance("bb"))
        assert [i.id for i in await store.instance_list()] == ["a", "bb"]
        assert [i.id for i in await other.instance_list()] == ["a", "bb"]
    finally:
        await other.close()


@pytest.mark.asyncio
async def test_the_heartbeat_task_goes_on_when_the_database_refuses_a_beat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    store = await init_state(state, as_uri="coaps://127.0.0.1:5684", now=int(time.time()))
    ca = await CertificateAuthority.load(store)
    server = _Server(store, ca, ServeOptions(heartbeat=0.05))
    me = Instance("me", "127.0.0.1:5684", "h", 1, time.time(), time.time(), 0.05)
    task = asyncio.create_task(server.heartbeat(me))
    try:
        deadline = time.monotonic() + 5
        while not await store.instance_list():
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.02)
        (row,) = await store.instance_list()
        assert row.facts == {"database": True, "connections": 0, "devices": 0, "observations": 0}
        first = row.seen_at
        while (await store.instance_list())[0].seen_at == first:  # it beats again
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        with caplog.at_level(logging.WARNING, "oscar.as"):
            await store.close()  # every beat from now on fails
            await asyncio.sleep(0.3)  # six periods
        assert not task.done()  # the server goes on
        warnings = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
        assert len(warnings) == 1, warnings  # logged once, not per beat
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.close()


def test_the_overview_section_tells_healthy_from_stale_and_escapes_everything() -> None:
    now = NOW + 1
    evil = "<script>alert(1)</script>"
    rows = [
        instance("a", connections=2, devices=5, observations=1, database=True),
        Instance("bb", evil, evil + "-host", 7, NOW - 60, NOW - 30, 0.5, {"database": False}),
    ]
    rows[1].facts["devices"] = evil
    html = instances_section(rows, now)
    assert "(1 of 2 healthy)" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.index("127.0.0.1:5685") < html.index("&lt;script&gt;")  # healthy first
    assert html.count(">healthy</span>") == 1 and html.count(">not responding</span>") == 1
    assert html.count(">unreachable</span>") == 1  # bb's database, at its last tick
    assert "31.0 s ago" in html and "1.0 s ago" in html
    assert "5 devices allowed" in html and "- devices allowed" in html  # not a count: -
    assert "no AS instance" in instances_section([], now)


def test_the_heartbeat_period_is_bounded() -> None:
    assert ServeOptions().heartbeat == 5.0
    for bad in (0, -1, 61, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="heartbeat"):
            ServeOptions(heartbeat=bad)  # type: ignore[arg-type]
