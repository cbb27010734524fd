"""The AS store at scale: bulk provisioning, and no per-request or once-a-second work that grows
with the resources, grants or devices.

- Bulk methods (``add_devices``, ``register_resources``, ``add_grants``) do what the single ones
  do, all or nothing.
- The scheduler's queries, a consumer's and a producer's listings, the point reads of a grant and
  an enrolment's id check cost about the same at 2,000 resources as at 200 (counted in SQLite VM
  instructions, and in the rows PostgreSQL's scans visit, which do not depend on the machine).
- The due time kept with the active epoch (schema 3) always agrees with its definition, and is
  filled in when an older database is migrated.
- A consumer's listing is exactly what ``may_read`` decides, resource by resource.
- The server's credentials reload decrypts only the PSKs of devices new to it.

Every test that takes ``backing`` (or the ``store`` on it) runs twice, on SQLite and on PostgreSQL
(a fresh database on the session's private server, tests/pg_harness.py), with the same assertions;
the PostgreSQL runs start a process (``PROCESS_PARAMS`` in tests/tiers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from pg_harness import Backing

from authz_server.ca import CertificateAuthority, init_state
from authz_server.envelope import Envelope
from authz_server.server import ServeOptions, _Server
from authz_server.store import Conflict, Resource, Store, StoreError

NOW = 1_800_000_000
HOUR = 3600


async def new_store(path: Path, database: str | None = None) -> Store:
    return await init_state(path, as_uri="coaps://127.0.0.1:5684", now=NOW, database=database)


@pytest_asyncio.fixture
async def store(backing: Backing) -> AsyncIterator[Store]:
    s = await new_store(backing.state, backing.database)
    yield s
    await s.close()


def audit_of(records: list[Any], action: str) -> list[tuple[str, str]]:
    return [(r.actor, r.subject) for r in records if r.action == action]


# --- bulk provisioning ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_bulk_enrolment_is_all_or_nothing(store: Store) -> None:
    await store.add_device("Sensor-1", "producer", os.urandom(16), NOW)
    with pytest.raises(Conflict, match="'sensor-1' exists already"):
        await store.add_devices(
            [("a-1", "consumer", os.urandom(16)), ("sensor-1", "consumer", os.urandom(16))], NOW
        )
    with pytest.raises(Conflict, match="listed twice"):
        await store.add_devices(
            [("b-1", "consumer", os.urandom(16)), ("B-1", "consumer", os.urandom(16))], NOW
        )
    with pytest.raises(ValueError):
        await store.add_devices([("c-1", "consumer", b"k"), ("c-2", "admin", b"k")], NOW)
    assert [d.id for d in await store.devices()] == ["Sensor-1"]
    psks = {f"c-{i}": os.urandom(16) for i in range(5)}
    await store.add_devices([(d, "consumer", p) for d, p in psks.items()], NOW)
    assert await store.active_psks(list(psks)) == psks
    records = await store.audit_records()
    assert audit_of(records, "enroll")[1:] == [("admin", d) for d in psks]
    assert (await store.verify_audit())[0]


@pytest.mark.asyncio
async def test_bulk_registration_is_all_or_nothing_and_as_one_by_one(store: Store) -> None:
    await store.add_device("p", "producer", os.urandom(16), NOW)
    await store.register_resource(Resource("p/a", "p", 0, "ccm-es256", 60, HOUR, NOW))
    batch = [Resource(f"p/r{i}", "p", 0, "ccm-es256", 60, HOUR * i, NOW) for i in range(4)]
    with pytest.raises(Conflict, match="'p/a' is registered already"):
        await store.register_resources([*batch, Resource("p/a", "p", 0, "ccm-es256", 60, 0, NOW)])
    with pytest.raises(Conflict, match="listed twice"):
        await store.register_resources([*batch, batch[0]])
    assert [r.id for r in await store.resources()] == ["p/a"]
    await store.register_resources(batch)
    for resource in batch:
        assert await store.resource(resource.id) == resource
        assert [(e.epoch, e.state) for e in await store.epochs(resource.id)] == [
            (1, "active"),
            (2, "pre-active"),
        ]
        active = await store.epoch(resource.id, with_secret=True)
        upcoming = await store.epoch(resource.id, 2, with_secret=True)
        assert active is not None and upcoming is not None
        assert len(active.secret or b"") == 32 and active.secret != upcoming.secret
    # rotation periods 0 (never), 1 h, 2 h, 3 h
    assert await store.due_rotations(NOW + HOUR) == ["p/a", "p/r1"]
    assert await store.due_rotations(NOW + 3 * HOUR) == ["p/a", "p/r1", "p/r2", "p/r3"]


@pytest.mark.asyncio
async def test_bulk_grants_are_all_or_nothing_and_readmit_as_one_by_one(store: Store) -> None:
    await store.add_devices(
        [("p", "producer", b"k" * 16), ("c1", "consumer", b"k" * 16),
         ("c2", "consumer", b"k" * 16), ("px", "proxy", b"k" * 16)],
        NOW,
    )  # fmt: skip
    await store.register_resources([Resource(f"p/r{i}", "p", 0, "ccm-es256", 60, 0, NOW)
                                    for i in range(3)])  # fmt: skip
    with pytest.raises(Conflict, match="'px' is not an active consumer"):
        await store.add_grants([("c1", "p/*", None), ("px", "p/*", None)], NOW)
    assert await store.grants() == []
    await store.add_grants([("c1", "p/*", None), ("c2", "p/r1", NOW + 50)], NOW)
    assert await store.may_read("c1", "p/r2", 1, NOW) and await store.may_read("c2", "p/r1", 1, NOW)
    assert await store.revoke_grants("c1", None, NOW + 1) == ["p/r0", "p/r1", "p/r2"]
    # Two grants in one batch cover p/r0: it is readmitted (and rotated) once.
    rotated = await store.add_grants([("c1", "p/r0", None), ("c1", "p/*", None)], NOW + 2)
    assert rotated == ["p/r0", "p/r1", "p/r2"]
    records = [r for r in await store.audit_records() if r.action == "grant"]
    assert [r.detail["rotated"] for r in records[-2:]] == [["p/r0"], ["p/r1", "p/r2"]]
    for rid in ("p/r0", "p/r1", "p/r2"):
        assert not await store.may_read("c1", rid, 2, NOW + 3)  # shut out while revoked
        assert await store.may_read("c1", rid, 3, NOW + 3)  # back in from the new epoch
    assert (await store.verify_audit())[0]


# --- nothing grows with the size ------------------------------------------------------------------


async def populate(
    path: Path, resources: int, database: str | None = None
) -> tuple[Store, list[str]]:
    """A state of resources/100 producers, resources/10 consumers with a pattern grant and two
    single grants each, a revoked grant, and one retired epoch per resource."""
    rng = random.Random(resources)
    s = await new_store(path, database)
    producers = [f"p{j}" for j in range(resources // 100)]
    consumers = [f"c{k}" for k in range(resources // 10)]
    await s.add_devices([(p, "producer", os.urandom(16)) for p in producers], NOW)
    await s.add_devices([(c, "consumer", os.urandom(16)) for c in consumers], NOW)
    ids = [f"{p}/r{i}" for p in producers for i in range(100)]
    await s.register_resources([Resource(r, r.split("/")[0], 0, "ccm-es256", 60, HOUR, NOW)
                                for r in ids])  # fmt: skip
    grants: list[tuple[str, str, int | None]] = []
    for c in consumers:
        grants.append((c, f"{rng.choice(producers)}/*", None))
        grants.extend((c, rid, NOW + 10 * HOUR) for rid in rng.sample(ids, 2))
    await s.add_grants(grants, NOW)
    for rid in ids:  # one deactivated epoch each: the history the destruction index skips
        await s.keyring.advance(rid, NOW + 1)
    return s, consumers


class Steps:
    """SQLite VM instructions run on a connection (in units of ``every``)."""

    every = 50

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        self.count += 1
        return 0


async def steps(store: Store, work: Callable[[], Awaitable[object]]) -> int:
    counter = Steps()
    await store.db._conn.set_progress_handler(counter, Steps.every)
    assert store.db._reader is not None
    store.db._reader.set_progress_handler(counter, Steps.every)
    try:
        await work()
    finally:
        await store.db._conn.set_progress_handler(None, Steps.every)
        store.db._reader.set_progress_handler(None, Steps.every)
    return counter.count * Steps.every


class Rows:
    """The rows PostgreSQL's scans visited for the statements of a connection (each scan's rows
    returned and removed by its filters, times its loops), from the plans ``auto_explain``
    sends it as notices: the counterpart of SQLite's VM instructions (buffers are not: an index
    lookup touches one page per level, so 100 lookups cost twice the pages once the index grows
    a level).

    Counted with the planner held to index paths and nested loops (sequential and bitmap scans,
    hash and merge joins a last resort). On tables of a few pages it rightly scans them whole
    (200 resources' epochs are 12 pages), and which plan it picks moves with its statistics:
    a bare count would compare plans, not work. Held so, the count answers SQLite's question:
    is there a plan whose work an index bounds (a statement no index serves still scans its
    table, and shows as grown)? Whether the planner takes it on a given table is its cost
    model's call, made by the statistics of a big table.
    """

    #: Each connection's session, while counting: every statement's plan, with its buffers.
    ON = (
        "SET enable_seqscan = off",
        "SET enable_bitmapscan = off",
        "SET enable_hashjoin = off",
        "SET enable_mergejoin = off",
        "LOAD 'auto_explain'",
        "SET auto_explain.log_min_duration = 0",
        "SET auto_explain.log_analyze = on",
        "SET auto_explain.log_buffers = on",
        "SET auto_explain.log_timing = off",
        "SET auto_explain.log_format = 'json'",
        "SET auto_explain.log_level = 'notice'",
    )
    OFF = ("SET auto_explain.log_min_duration = -1", "RESET ALL")

    def __init__(self) -> None:
        self.count = 0
        self.plans = 0

    def __call__(self, conn: object, message: Any) -> None:
        text = str(message.message)
        if "plan:" not in text:
            return
        self.plans += 1
        self.count += self.visited(json.loads(text.split("plan:", 1)[1])["Plan"])

    @classmethod
    def visited(cls, node: dict[str, Any]) -> int:
        own = 0
        if node["Node Type"].endswith("Scan"):
            per_loop = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            per_loop += node.get("Rows Removed by Index Recheck", 0)
            own = round(per_loop * node["Actual Loops"])
        return own + sum(cls.visited(child) for child in node.get("Plans", ()))


async def rows_visited(store: Store, work: Callable[[], Awaitable[object]]) -> int:
    backend = store.db
    # Every reader connection made first (each is made on its first use): more point reads at
    # once than there are readers.
    await asyncio.gather(*(store.device("nobody") for _ in range(16)))
    assert backend._readers is not None and backend._conn is not None  # type: ignore[attr-defined]
    conns = [backend._conn, *backend._readers._open]  # type: ignore[attr-defined]
    counter = Rows()
    for conn in conns:
        for statement in Rows.ON:
            await conn.execute(statement)
        conn.add_log_listener(counter)
    try:
        await work()
        for _ in range(3):  # the listeners are called soon after each notice
            await asyncio.sleep(0)
    finally:
        for conn in conns:
            conn.remove_log_listener(counter)
            for statement in Rows.OFF:
                await conn.execute(statement)
    assert counter.plans > 0  # the counting saw the statements
    return counter.count


async def cost(backing: Backing, store: Store, work: Callable[[], Awaitable[object]]) -> int:
    """What ``work`` costs the database, in units that do not depend on the machine: SQLite's VM
    instructions, the rows PostgreSQL's scans visited."""
    return await (rows_visited if backing.postgres else steps)(store, work)


#: What may be added to twice the small state's cost before a cost counts as grown.
SLACK = {"sqlite": 500, "postgresql": 20}


def measured_work(s: Store, consumer: str) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "due rotations": lambda: s.due_rotations(NOW + 60),
        "destruction": lambda: s.destroy_expired(NOW + 60, 86_400),
        "grant expiry": lambda: s.expire_grants(NOW + 60),
        "consumer listing": lambda: s.readable_resources(consumer, NOW + 60),
        "producer listing": lambda: s.live_resources("p1"),
        "secret view": lambda: s.secret_view(consumer, "p1/r5", None, NOW),
        "device": lambda: s.device(consumer),
        "enrolment": lambda: s.add_device("new-one", "consumer", b"k" * 16, NOW),
        "credentials reload": lambda: s.active_psks(["c1", "c2"]),
    }


@pytest.mark.asyncio
async def test_the_scheduler_listings_and_point_reads_do_not_grow_with_the_state(
    backing: Backing, tmp_path: Path
) -> None:
    costs: list[dict[str, int]] = []
    for size in (200, 2000):
        database = backing.database
        if backing.cluster is not None and size > 200:  # a second database (asyncio.run inside)
            database = await asyncio.to_thread(backing.cluster.new_database)
        try:
            s, consumers = await populate(tmp_path / f"s{size}", size, database)
            try:
                work = measured_work(s, consumers[3])
                costs.append({name: await cost(backing, s, run) for name, run in work.items()})
            finally:
                await s.close()
        finally:
            if backing.cluster is not None and database != backing.database:
                await asyncio.to_thread(backing.cluster.drop_database, database)
    small, large = costs
    slack = SLACK[backing.name]
    grown = {n: (small[n], large[n]) for n in small if large[n] > 2 * small[n] + slack}
    print(backing.name, small, large)
    assert grown == {}, f"cost at 200 and 2,000 resources ({backing.name}): {grown}"


@pytest.mark.asyncio
async def test_a_resources_history_of_epochs_does_not_slow_its_reads(
    store: Store, backing: Backing
) -> None:
    """Rotated hourly for a year, a resource has 8,760 epochs; reads of the live ones use the
    indexes of active and live epochs, not the whole history (here: 400 rotations)."""
    await store.add_devices([("p", "producer", b"k" * 16), ("c", "consumer", b"k" * 16)], NOW)
    await store.register_resources(
        [Resource(r, "p", 0, "ccm-es256", 60, HOUR, NOW) for r in ("p/fresh", "p/old")]
    )
    await store.add_grant("c", "p/*", None, NOW)
    for i in range(400):
        await store.keyring.advance("p/old", NOW + i)

    def reads(rid: str) -> dict[str, Callable[[], Awaitable[object]]]:
        return {
            "secret view": lambda: store.secret_view("c", rid, None, NOW + 500),
            "active epoch": lambda: store.epoch(rid, with_secret=True),
            "live epochs": lambda: store.live_epochs([rid]),
            "rotation": lambda: store.rotate(rid, NOW + 500, actor="as", reason="test"),
        }

    fresh = {name: await cost(backing, store, run) for name, run in reads("p/fresh").items()}
    old = {name: await cost(backing, store, run) for name, run in reads("p/old").items()}
    slack = SLACK[backing.name]
    grown = {n: (fresh[n], old[n]) for n in fresh if old[n] > 2 * fresh[n] + slack}
    print(backing.name, fresh, old)
    assert grown == {}, f"cost, fresh resource and 400 rotations ({backing.name}): {grown}"


# --- the active epoch's due time ---------------------------------------------------------------


async def due_by_definition(backing: Backing, now: int) -> list[str]:
    """What schema 2 computed: active epochs that have lived their resource's rotation period
    (read on a connection of its own, behind the store's back)."""
    rows = await backing.execute(
        "SELECT r.id FROM resources r JOIN epochs e ON e.resource_id = r.id "
        "WHERE e.state = 'active' AND r.rotation_period > 0 "
        "AND e.activated_at + r.rotation_period <= ? ORDER BY r.id",
        now,
    )
    return [str(r) for (r,) in rows]


@pytest.mark.asyncio
async def test_the_due_time_agrees_with_its_definition_through_every_change(
    store: Store, backing: Backing
) -> None:
    rng = random.Random(11)
    await store.add_devices(
        [("p", "producer", b"k" * 16), ("q", "producer", b"k" * 16), ("c", "consumer", b"k" * 16)],
        NOW,
    )
    periods = [0, 60, 600, HOUR]
    await store.register_resources(
        [Resource(f"{o}/r{i}", o, 0, "ccm-es256", 60, periods[i % 4], NOW)
         for o in ("p", "q") for i in range(8)]
    )  # fmt: skip
    ids = [r.id for r in await store.resources()]
    t = NOW
    for step in range(60):
        t += rng.choice([0, 30, 120, 700])
        action = rng.random()
        rid = rng.choice(ids)
        with contextlib.suppress(StoreError):  # a retired resource: nothing to rotate
            if action < 0.3:
                for due in await store.due_rotations(t):
                    await store.rotate(due, t, actor="as", reason="schedule")
            elif action < 0.5:
                await store.rotate(rid, t, actor="admin", reason="manual")
            elif action < 0.65:
                states = {e.state: e.epoch for e in await store.epochs(rid)}
                target = states.get("pre-active") if rng.random() < 0.3 else None
                await store.compromise(rid, target, t)
            elif action < 0.8:
                await store.add_grant("c", rng.choice(["p/*", "q/*", rid]), None, t)
            elif action < 0.95:
                await store.revoke_grants("c", None, t)
        if step == 45:
            await store.revoke_device("q", t)  # its resources lose their active epochs
        for later in (t, t + 59, t + 60, t + 600, t + HOUR):
            expected = await due_by_definition(backing, later)
            assert await store.due_rotations(later) == expected, (step, later)


async def make_schema_2(backing: Backing, data_key: bytes) -> None:
    """A database as schema 2 left it (no due times kept), in the backing's dialect."""
    from authz_server.store import postgres, sqlite

    if backing.database is None:
        db = sqlite3.connect(backing.state / "as.db")
        for script in sqlite.MIGRATIONS[:2]:
            for statement in sqlite.split_script(script):
                db.execute(statement)
        db.execute("PRAGMA user_version = 2")
        db.execute("INSERT INTO meta VALUES ('data_key', ?)", (data_key,))
        db.execute("INSERT INTO meta VALUES ('changes', 0)")
        db.commit()
        db.close()
        return
    conn = await asyncpg.connect(backing.database)
    try:
        for script in postgres.MIGRATIONS[:2]:
            await conn.execute(script)
        await conn.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        await conn.execute("INSERT INTO schema_version VALUES (2)")
        await conn.execute("INSERT INTO meta (key, bytes) VALUES ('data_key', $1)", data_key)
        await conn.execute("INSERT INTO meta (key, number) VALUES ('changes', 0)")
    finally:
        await conn.close()
    (backing.state / "database.url").write_text(backing.database)


@pytest.mark.asyncio
async def test_a_schema_2_database_gets_its_due_times_on_migration(backing: Backing) -> None:
    from authz_server.envelope import create_master_key

    state = backing.state
    state.mkdir(mode=0o700)
    master = create_master_key(state / "master.key")
    await make_schema_2(backing, Envelope.new_wrapped_data_key(master))
    await backing.execute("INSERT INTO devices VALUES ('p', 'producer', NULL, 'active', 1, NULL)")
    for rid, period in (("p/hourly", HOUR), ("p/never", 0), ("p/daily", 86_400)):
        await backing.execute("INSERT INTO resources VALUES (?, 'p', 0, 'ccm-es256', 60, ?, ?)",
                              rid, period, NOW)  # fmt: skip
        await backing.execute("INSERT INTO epochs VALUES (?, 1, 'deactivated', NULL, ?, ?, ?)",
                              rid, NOW, NOW, NOW + 5)  # fmt: skip
        await backing.execute("INSERT INTO epochs VALUES (?, 2, 'active', NULL, ?, ?, NULL)",
                              rid, NOW, NOW + 5)  # fmt: skip
    s = await Store.open(state)
    try:
        assert await s.due_rotations(NOW + 5 + HOUR - 1) == []
        assert await s.due_rotations(NOW + 5 + HOUR) == ["p/hourly"]
        assert await s.due_rotations(NOW + 5 + 86_400) == ["p/daily", "p/hourly"]
    finally:
        await s.close()
    if backing.postgres:
        listed = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    else:
        listed = "SELECT name FROM sqlite_master WHERE type = 'index'"
    indexes = {str(name) for (name,) in await backing.execute(listed)}
    assert {"epochs_due", "epochs_active", "epochs_live", "epochs_retired", "resources_producer",
            "grants_until", "devices_folded"} <= indexes  # fmt: skip


# --- a consumer's listing ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_consumers_listing_is_what_may_read_decides_for_each_resource(
    store: Store,
) -> None:
    rng = random.Random(5)
    await store.add_devices(
        [(p, "producer", b"k" * 16) for p in ("p1", "p2", "p10", "q")]
        + [(c, "consumer", b"k" * 16) for c in ("a", "b", "c")],
        NOW,
    )
    ids = [f"{p}/{n}" for p in ("p1", "p2", "p10", "q") for n in ("r1", "r2", "r12", "x", "r1.a")]
    await store.register_resources([Resource(r, r.split("/")[0], 0, "ccm-es256", 60, 0, NOW)
                                    for r in ids])  # fmt: skip
    patterns = ["*", "p1/*", "p1/r?", "p1/r[12]", "p1*/r1", "q/x", "p10/r1.a", "p2/*"]
    t = NOW
    for _ in range(40):
        t += 10
        consumer = rng.choice(["a", "b", "c"])
        action = rng.random()
        if action < 0.5:
            until = rng.choice([None, t + 5, t + 100])
            await store.add_grant(consumer, rng.choice(patterns), until, t)
        elif action < 0.7 and await store.grants(consumer):
            live = [g[2] for g in await store.grants(consumer) if g[5] is None]
            if live:
                await store.revoke_grants(consumer, rng.choice(live), t)
        elif action < 0.8:
            await store.rotate(rng.choice(ids), t, actor="as", reason="test")
        for c in ("a", "b", "c"):
            expected = []
            for rid in sorted(ids):
                active = await store.epoch(rid)
                if active is not None and await store.may_read(c, rid, active.epoch, t):
                    expected.append((rid, active.epoch))
            listed = [(r.id, e) for r, e in await store.readable_resources(c, t)]
            assert listed == expected, (c, t)


def test_a_pattern_covers_exactly_the_ids_its_prefix_range_holds() -> None:
    from authz_server.store.sqlite import prefix_range as _prefix_range

    ids = ["p1/a", "p1/b", "p10/a", "p1-x/a", "p/a", "q/a", "p1", "p2/a", "p0/a"]
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE r (id TEXT PRIMARY KEY)")
    db.executemany("INSERT INTO r VALUES (?)", [(i,) for i in ids])
    for pattern in ["p1/*", "p1*", "*", "p?/a", "p[12]/a", "p1/a", "[pq]/a", "é/*", ""]:
        low, high = _prefix_range(pattern)
        in_range = {
            i for (i,) in db.execute("SELECT id FROM r WHERE id >= ? AND id < ?", (low, high))
        }
        assert {i for i in ids if fnmatchcase(i, pattern)} <= in_range, pattern


# --- the server's credentials ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_credentials_reload_decrypts_only_new_devices(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.add_devices([(f"c{i}", "consumer", os.urandom(16)) for i in range(20)], NOW)
    await store.add_device("p", "producer", os.urandom(16), NOW)
    await store.register_resource(Resource("p/r", "p", 0, "ccm-es256", 60, 0, NOW))
    server = _Server(store, await CertificateAuthority.load(store), ServeOptions())
    decrypted: list[bytes] = []
    original = Envelope.decrypt

    def counting(self: Envelope, blob: bytes, context: bytes) -> bytes:
        decrypted.append(context)
        return original(self, blob, context)

    monkeypatch.setattr(Envelope, "decrypt", counting)
    await server.reload_credentials(initial=True)
    assert len(decrypted) == 21 and server.creds.device_ids() == {f"c{i}" for i in range(20)} | {
        "p"
    }
    decrypted.clear()
    await store.rotate("p/r", NOW + 1, actor="as", reason="schedule")  # a change, no new device
    await server.reload_credentials()
    assert decrypted == []
    await store.add_device("late", "consumer", os.urandom(16), NOW + 2)
    await store.revoke_device("c3", NOW + 2)
    await server.reload_credentials()
    assert decrypted == [b"psk\x00late"]
    assert "late" in server.creds.device_ids() and "c3" not in server.creds.device_ids()
    assert server.creds.find_dtls_psk(b"late")[1] == ":late"


@pytest.mark.asyncio
async def test_concurrent_bulk_changes_and_reads_keep_the_store_consistent(store: Store) -> None:
    await store.add_device("p", "producer", b"k" * 16, NOW)
    await store.register_resources([Resource(f"p/r{i}", "p", 0, "ccm-es256", 60, 0, NOW)
                                    for i in range(20)])  # fmt: skip

    async def enroll(k: int) -> None:
        await store.add_devices([(f"c{k}-{i}", "consumer", b"k" * 16) for i in range(10)], NOW)
        await store.add_grants([(f"c{k}-{i}", "p/*", None) for i in range(10)], NOW)

    async def read(k: int) -> None:
        for i in range(20):
            await store.secret_view(f"c{k}-0", f"p/r{i}", None, NOW)

    await asyncio.gather(*(enroll(k) for k in range(5)), *(read(k) for k in range(5)))
    assert len(await store.devices()) == 51 and len(await store.grants()) == 50
    assert (await store.secret_view("c4-9", "p/r7", None, NOW)).readable
    assert (await store.verify_audit())[0]


class Observation:
    """What the site needs of an aiocoap observation: a trigger that counts."""

    def __init__(self) -> None:
        self.triggered = 0

    def trigger(self) -> None:
        self.triggered += 1


@pytest.mark.asyncio
async def test_observers_are_refreshed_in_one_read_and_only_after_a_change(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.add_device("p", "producer", b"k" * 16, NOW)
    ids = [f"p/r{i}" for i in range(30)]
    await store.register_resources([Resource(r, "p", 0, "ccm-es256", 60, HOUR, NOW) for r in ids])
    server = _Server(store, await CertificateAuthority.load(store), ServeOptions())
    site = server.site
    observations = {rid: Observation() for rid in ids}
    for rid, observation in observations.items():
        site._observers[rid] = {observation}
        site._fingerprints[rid] = await server.endpoints.key_fingerprint(rid)
    reads = [0]
    original = store.live_epochs

    async def counted(resource_ids: Any) -> dict[str, tuple[int, ...]]:
        reads[0] += 1
        return await original(resource_ids)

    monkeypatch.setattr(store, "live_epochs", counted)
    assert await site.refresh() == [] and reads == [1]
    # Nothing due: the once-a-second schedule reports no change (so no refresh follows).
    assert not await server.schedule(NOW + 10)
    await store.rotate("p/r7", NOW + 20, actor="admin", reason="manual")
    assert await site.refresh() == ["p/r7"] and reads == [2]
    assert [rid for rid, o in observations.items() if o.triggered] == ["p/r7"]
    # Due: the schedule rotates everything else and says so.
    assert await server.schedule(NOW + HOUR)
    assert sorted(await site.refresh()) == sorted(set(ids) - {"p/r7"})
    assert all(o.triggered == 1 for o in observations.values())
