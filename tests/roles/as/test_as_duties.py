"""The duties a running AS does by itself happen once, however many instances run them on one
database (issue 15, active-active): scheduled rotation, grant expiry, destruction after the
retention and the audit retention's prune each decide inside their write transaction (under the
database's write lock) whether they are still due, so the second instance finds nothing to do.

Several independent :class:`Store` objects on one database (each its own connections, as
separate AS processes have) run the server's own schedule (:meth:`_Server.schedule`) and the
audit retention's run (:func:`retention.prune_once`) concurrently, round after round; on SQLite
(two stores on one file: the admin CLI racing a server is the same case) and on PostgreSQL
(``as_database``; those runs start a process, see ``PROCESS_PARAMS`` in tests/tiers.py). Every
due rotation, expiry and destruction is done once (epoch numbers, audit records) and the audit
chain verifies. Then the same with real ``oscar-as serve`` processes: two instances on one
database, each running its once-a-second schedule on its own clock.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from as_harness import AsEnv, as_env
from pg_harness import PgCluster

from authz_server import api_keys, retention
from authz_server.ca import CertificateAuthority, init_state
from authz_server.cli import main
from authz_server.server import ServeOptions, _Server
from authz_server.store import Resource, Store

NOW = 1_800_000_000
PERIOD = 10  # seconds between two scheduled rotations of each resource
ROUNDS = 12  # rounds of the schedule, PERIOD apart
RESOURCES = [f"p/r{i:02d}" for i in range(16)]
CONSUMERS = [f"c{i}" for i in range(4)]
INSTANCES = 3


@pytest_asyncio.fixture
async def stores(
    tmp_path: Path, as_database: tuple[PgCluster, str] | None
) -> AsyncIterator[list[Store]]:
    """:data:`INSTANCES` stores opened on one new AS database, each with its own connections."""
    state = tmp_path / "state"
    first = await init_state(
        state,
        as_uri="coaps://127.0.0.1",
        now=NOW,
        database=None if as_database is None else as_database[1],
    )
    opened = [first]
    try:
        for _ in range(INSTANCES - 1):
            opened.append(await Store.open(state))
        yield opened
    finally:
        for store in opened:
            await store.close()


async def servers_on(stores: list[Store], options: ServeOptions) -> list[_Server]:
    return [_Server(store, await CertificateAuthority.load(store), options) for store in stores]


@pytest.mark.asyncio
async def test_each_due_rotation_expiry_and_destruction_happens_once(
    stores: list[Store], tmp_path: Path
) -> None:
    store = stores[0]
    await store.add_device("p", "producer", b"p" * 16, NOW)
    await store.register_resources(
        [Resource(rid, "p", 0, "ccm-es256", 60, PERIOD, NOW) for rid in RESOURCES]
    )
    # Grants that expire in rounds 2, 4, 6 and 8 (each alone covers every resource).
    for n, consumer in enumerate(CONSUMERS):
        await store.add_device(consumer, "consumer", bytes([n + 1]) * 16, NOW)
        await store.add_grant(consumer, "p/*", NOW + PERIOD * (2 * n + 2) - 1, NOW)
    # Retired epochs are destroyed 2 periods after their deactivation.
    servers = await servers_on(stores, ServeOptions(retention=2 * PERIOD))
    done = []
    for round_ in range(1, ROUNDS + 1):
        now = NOW + PERIOD * round_
        done.append(await asyncio.gather(*(server.schedule(now) for server in servers)))
    assert all(any(flags) for flags in done)  # each round, something was done by someone

    # Each round moved each resource on by exactly one epoch: the schedule's rotation, or in a
    # round where a grant expired, the expiry's (which leaves the rotation not due).
    for rid in RESOURCES:
        active = await store.epoch(rid)
        assert active is not None and active.epoch == 1 + ROUNDS, rid
        assert len(await store.epochs(rid)) == ROUNDS + 2
    records = await store.audit_records()
    expiries = [r for r in records if r.action == "expire-grant"]
    assert sorted(r.subject for r in expiries) == CONSUMERS  # each grant ended once
    assert all(r.detail["rotated"] == RESOURCES for r in expiries)
    rotations = Counter((r.subject, r.at) for r in records if r.action == "rotate")
    assert set(rotations.values()) == {1}
    assert len(rotations) == len(RESOURCES) * (ROUNDS - len(CONSUMERS))
    destroyed = Counter((r.subject, r.detail["epoch"]) for r in records if r.action == "destroy")
    assert set(destroyed.values()) == {1}
    # Epochs deactivated in rounds 1 .. ROUNDS-2 are past the retention by the last round.
    assert len(destroyed) == len(RESOURCES) * (ROUNDS - 2)
    for other in stores[1:]:
        assert await other.audit_records() == records
    ok, summary = await store.verify_audit()
    assert ok, summary
    # ``oscar-as audit --verify`` on the state directory, as an operator runs it (a thread: it
    # runs an event loop of its own).
    command = ["audit", "--verify", "--state", str(tmp_path / "state")]
    assert await asyncio.to_thread(main, command) == 0


@pytest.mark.asyncio
async def test_the_admin_clis_rotate_due_and_the_schedule_rotate_once_between_them(
    stores: list[Store],
) -> None:
    store = stores[0]
    await store.add_device("p", "producer", b"p" * 16, NOW)
    await store.register_resources(
        [Resource(rid, "p", 0, "ccm-es256", 60, PERIOD, NOW) for rid in RESOURCES]
    )
    servers = await servers_on(stores[:1], ServeOptions())
    for round_ in range(1, ROUNDS + 1):
        now = NOW + PERIOD * round_

        async def admin(other: Store, now: int = now) -> list[int | None]:
            return [
                await other.rotate_if_due(rid, now, actor="admin", reason="due")
                for rid in await other.due_rotations(now)
            ]

        _, *admins = await asyncio.gather(
            servers[0].schedule(now), *(admin(other) for other in stores[1:])
        )
        assert all(epoch is None or epoch == round_ + 1 for done in admins for epoch in done)
    rotations = Counter(
        (r.subject, r.at) for r in await store.audit_records() if r.action == "rotate"
    )
    assert set(rotations.values()) == {1} and len(rotations) == len(RESOURCES) * ROUNDS
    assert (await store.verify_audit())[0]


@pytest.mark.asyncio
async def test_the_audit_retention_prunes_once_between_instances(stores: list[Store]) -> None:
    """Each instance's hourly run, at nearly the same time: the first prunes, the others find a
    checkpoint younger than the hour and do nothing; an hour later, one prune again."""
    store = stores[0]
    every = 3600.0
    for hour in range(4):  # the runs come a little more than an hour apart
        now = NOW + 3660 * (hour + 1)
        for i in range(5):  # records dated now: past the hour's retention at the next run
            await store.audit("admin", "test", f"new-{hour}-{i}", "ok", {}, now)
        results = await asyncio.gather(
            *(
                retention.prune_once(other, 1 / 24, now + n, min_interval=every)
                for n, other in enumerate(stores)
            )
        )
        assert sum(1 for through, _ in results if through) == 1, (hour, results)
    prunes = [r for r in await store.audit_records() if r.action == "prune"]
    assert len(prunes) == 1  # the records before the last checkpoint are pruned: the last one
    ok, summary = await store.verify_audit()
    assert ok, summary
    # A run that catches up (no min_interval) goes on at once; the admin CLI's prune likewise.
    assert (await retention.prune_once(stores[1], 0.0001, NOW + 3660 * 5))[0]


@pytest_asyncio.fixture
async def env(tmp_path: Path, as_database: tuple[PgCluster, str] | None) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, as_database) as environment:  # on SQLite, then on PostgreSQL
        yield environment


@pytest.mark.asyncio
async def test_two_as_processes_rotate_each_due_resource_once(env: AsEnv) -> None:
    """Two ``oscar-as serve`` on one database, 300 resources due every 2 s (a schedule run
    takes long enough for the two instances' runs to overlap): in 8 s each rotation is done by
    one of them (two rotations of a resource are at least the period apart; doing one twice
    would put them in the same second), and the chain verifies."""
    period, begin = 2, int(time.time())
    resources = [f"p/many{i:03d}" for i in range(300)]
    await env.device("p", "producer")
    await env.store.register_resources(
        [Resource(rid, "p", 0, "ccm-es256", 60, period, begin) for rid in resources]
    )
    servers = [env.server(), env.server()]
    await asyncio.sleep(8)
    for server in servers:
        assert server.stop() == 0
    records = await env.store.audit_records()
    times: dict[str, list[int]] = {rid: [] for rid in resources}
    for record in records:
        if record.action == "rotate":
            assert (record.actor, record.detail["reason"]) == ("as", "schedule")
            times[record.subject].append(record.at)
    for rid, moments in times.items():
        assert len(moments) >= 2, (rid, moments)
        gaps = [later - earlier for earlier, later in itertools.pairwise(moments)]
        assert min(gaps) >= period, (rid, moments)
        active = await env.store.epoch(rid)
        assert active is not None and active.epoch == 1 + len(moments)
    # Each rotation an instance logged is one in the chain (which of the two does a round
    # depends on their phases: the first to run after a resource fell due).
    logs = [server.log() for server in servers]
    assert sum(text.count("(schedule)") for text in logs) == sum(map(len, times.values()))
    ok, summary = await env.store.verify_audit()
    assert ok, summary


@pytest.mark.asyncio
async def test_a_due_rotation_on_request_and_the_schedule_rotate_once_between_them(
    stores: list[Store],
) -> None:
    """A consumer asking for the pre-active epoch of a resource whose rotation is due makes the
    instance it asks rotate at once (``api_keys.rotate_if_due``), while the schedules of the
    instances (this one's included) find the same rotation due: one of them rotates, once."""
    store = stores[0]
    await store.add_device("p", "producer", b"p" * 16, NOW)
    await store.register_resources(
        [Resource(rid, "p", 0, "ccm-es256", 60, PERIOD, NOW) for rid in RESOURCES]
    )
    servers = await servers_on(stores, ServeOptions())
    for round_ in range(1, 4):
        now = NOW + PERIOD * round_
        resources = [await store.resource(rid) for rid in RESOURCES]
        on_request = [
            api_keys.rotate_if_due(server.endpoints, resource, round_ + 1, now)  # the pre-active
            for server in servers
            for resource in resources
        ]
        await asyncio.gather(*on_request, *(server.schedule(now) for server in servers))
        for rid in RESOURCES:
            active = await store.epoch(rid)
            assert active is not None and active.epoch == 1 + round_, (rid, round_)
    rotations = Counter(
        (r.subject, r.at) for r in await store.audit_records() if r.action == "rotate"
    )
    assert set(rotations.values()) == {1} and len(rotations) == len(RESOURCES) * 3
    assert (await store.verify_audit())[0]
