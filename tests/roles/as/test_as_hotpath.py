"""The AS's request path without thread hops: point reads on the event loop's thread, and first
deliveries that share a commit.

- What the admin CLI (``python -m authz_server``, a process of its own writing the same database)
  changes takes effect for the very next request: a revoked grant or device, a new grant, a
  rotation; in process (:class:`Endpoints` on a store) and against a real AS process.
- The read-only connection of ``Database._lookup``: sees every commit at once, never a
  transaction half done nor waits for one, sees the task's own transaction through the writer,
  falls back to the worker thread when busy, cannot write, keeps no read transaction open.
- PostgreSQL: secret views asked at once share one statement, each answer what its own
  statement says, and none joins a statement sent before a commit it must see.
- Grouped first deliveries: one transaction for those asked at once, each audited once and in
  order, durable before the caller returns; a failed batch fails each caller and records
  nothing.

Every test that takes ``store`` (on ``backing``) or ``env`` runs twice, on SQLite and on PostgreSQL
(a fresh database on the session's private server, tests/pg_harness.py), with the same
assertions; the PostgreSQL runs start a process (``PROCESS_PARAMS`` in tests/tiers.py). The
SQLite read-only connection's own tests (its worker-thread fallback, ``sqlite3`` on the file) stay
on SQLite; the same properties of PostgreSQL's reader connections have tests of their own.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from as_harness import AsEnv, as_env, now
from pg_harness import Backing, PgCluster

from authz_server.api import Endpoints, Forbidden, NotFound, Unauthorized
from authz_server.ca import CertificateAuthority, init_state
from authz_server.messages import Request
from authz_server.store import DatabaseError, Resource, Store, StoreError
from authz_server.store import deliveries as deliveries_module
from oscar import cbor

ROOT = Path(__file__).resolve().parents[3]
NOW = 1_800_000_000
PRODUCER, CONSUMER, OTHER = "sensor-1", "phone-1", "phone-2"
RID = "sensor-1/temperature"


async def new_store(state: Path, database: str | None = None) -> Store:
    s = await init_state(state, as_uri="coaps://127.0.0.1:5684", now=NOW, database=database)
    await s.add_device(PRODUCER, "producer", os.urandom(16), NOW)
    await s.add_device(CONSUMER, "consumer", os.urandom(16), NOW)
    await s.add_device(OTHER, "consumer", os.urandom(16), NOW)
    await s.register_resource(Resource(RID, PRODUCER, 0, "ccm-es256", 60, 3600, NOW))
    return s


@pytest_asyncio.fixture
async def store(backing: Backing) -> AsyncIterator[Store]:
    """The store, on SQLite then on PostgreSQL; the state directory names its database, so the
    admin CLI and ``Store.open`` on it find the same one."""
    s = await new_store(backing.state, backing.database)
    yield s
    await s.close()


@pytest_asyncio.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await new_store(tmp_path / "state")
    yield s
    await s.close()


def postgresql_only() -> pytest.MarkDecorator:
    """The ``backing`` fixture on PostgreSQL only (a test of what only PostgreSQL has)."""
    return pytest.mark.parametrize("backing", ["postgresql"], indirect=True)


#: A grant written behind the store's methods, in a transaction a test holds open.
GRANT_INSERT = (
    "INSERT INTO grants (consumer_id, pattern, until, granted_at, revoked_at) "
    "VALUES (?, 'sensor-1/*', NULL, ?, NULL)"
)


def admin(state: Path, *argv: str) -> None:
    """One admin CLI command as its own process, as an operator runs it; returns after it exits."""
    result = subprocess.run(
        [sys.executable, "-m", "authz_server", *argv, "--state", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def secret_request(device: str, *query: str) -> Request:
    return Request(device, "GET", ("secret",), (f"r={RID}", *query))


async def endpoints(store: Store) -> Endpoints:
    # The CLI stamps its changes with the wall clock; the endpoints must agree on "now".
    return Endpoints(store, await CertificateAuthority.load(store), clock=lambda: int(time.time()))


# --- the admin CLI's changes, for the very next request -----------------------------------------


@pytest.mark.asyncio
async def test_a_grant_revoked_by_the_admin_cli_is_refused_at_the_next_request(
    store: Store, tmp_path: Path
) -> None:
    await store.add_grant(CONSUMER, "sensor-1/*", None, int(time.time()))
    api = await endpoints(store)
    for _ in range(3):  # whatever the request path keeps, it has seen this device and grant
        reply = await api.handle(secret_request(CONSUMER))
        assert cbor.loads(reply.payload)["epoch"] == 1
    admin(tmp_path / "state", "revoke", "--consumer", CONSUMER)
    with pytest.raises(Forbidden):
        await api.handle(secret_request(CONSUMER))
    # The revocation rotated the resource: the new epoch is refused as well.
    with pytest.raises(Forbidden):
        await api.handle(secret_request(CONSUMER, "e=2"))


@pytest.mark.asyncio
async def test_a_device_revoked_by_the_admin_cli_is_unauthorized_at_the_next_request(
    store: Store, tmp_path: Path
) -> None:
    await store.add_grant(CONSUMER, "sensor-1/*", None, int(time.time()))
    api = await endpoints(store)
    for _ in range(3):
        await api.handle(secret_request(CONSUMER))
        await api.handle(Request(CONSUMER, "GET", (".well-known", "core")))
    assert CONSUMER in api.known  # GET /secret reads its status in its own point read
    admin(tmp_path / "state", "revoke", "--device", CONSUMER)
    with pytest.raises(Unauthorized):  # the known device's status, read with the grants
        await api.handle(secret_request(CONSUMER))
    assert CONSUMER not in api.known
    with pytest.raises(Unauthorized):
        await api.handle(secret_request(CONSUMER))
    with pytest.raises(Unauthorized):
        await api.handle(Request(CONSUMER, "GET", (".well-known", "core")))
    refusals = [r for r in await store.audit_records() if r.actor == CONSUMER and r.result != "ok"]
    assert refusals and all(r.detail.get("reason") == "inactive" for r in refusals), refusals


@pytest.mark.asyncio
async def test_a_known_device_revoked_since_is_refused_4_01_whatever_else_is_wrong(
    store: Store,
) -> None:
    """A device ``GET /secret`` knows (its status is read in the view) that was revoked since,
    asking something that is refused before the view (a malformed query; a producer asking for
    another's resource), gets the 4.01 of an inactive device, audited, not that refusal."""
    api = await endpoints(store)
    with pytest.raises(Forbidden):  # no grant: refused, but authenticated (now known)
        await api.handle(secret_request(OTHER))
    with pytest.raises(NotFound):  # its own resource: not registered
        await api.handle(Request(PRODUCER, "GET", ("secret",), ("r=sensor-1/none",)))
    assert {OTHER, PRODUCER} <= set(api.known)
    await store.revoke_device(OTHER, int(time.time()))
    await store.revoke_device(PRODUCER, int(time.time()))
    with pytest.raises(Unauthorized):
        await api.handle(Request(OTHER, "GET", ("secret",), ("x=1",)))
    with pytest.raises(Unauthorized):
        await api.handle(Request(PRODUCER, "GET", ("secret",), ("r=phone-9/x",)))
    assert not {OTHER, PRODUCER} & set(api.known)
    denied = {r.actor for r in await store.audit_records() if r.detail.get("reason") == "inactive"}
    assert {OTHER, PRODUCER} <= denied


@pytest.mark.asyncio
async def test_a_grant_added_by_the_admin_cli_is_honoured_at_the_next_request(
    store: Store, tmp_path: Path
) -> None:
    api = await endpoints(store)
    for _ in range(2):
        with pytest.raises(Forbidden):
            await api.handle(secret_request(OTHER))
    admin(tmp_path / "state", "grant", "--consumer", OTHER, "--resource", RID)
    assert cbor.loads((await api.handle(secret_request(OTHER))).payload)["resource"] == RID


@pytest.mark.asyncio
async def test_a_rotation_by_the_admin_cli_is_served_at_the_next_request(
    store: Store, tmp_path: Path
) -> None:
    await store.add_grant(CONSUMER, "sensor-1/*", None, int(time.time()))
    api = await endpoints(store)
    before = [cbor.loads((await api.handle(secret_request(CONSUMER))).payload) for _ in range(3)]
    assert {(b["epoch"], b["secret"]) for b in before} == {(1, before[0]["secret"])}
    admin(tmp_path / "state", "rotate", "--resource", RID)
    after = cbor.loads((await api.handle(secret_request(CONSUMER))).payload)
    pre_active = await store.epoch(RID, 2, with_secret=True)
    assert pre_active is not None
    assert (after["epoch"], after["state"]) == (2, "active")
    assert after["secret"] == pre_active.secret != before[0]["secret"]
    # The old epoch stays readable (deactivated) to those entitled.
    old = cbor.loads((await api.handle(secret_request(CONSUMER, "e=1"))).payload)
    assert (old["state"], old["secret"]) == ("deactivated", before[0]["secret"])


@pytest_asyncio.fixture
async def env(tmp_path: Path, as_database: tuple[PgCluster, str] | None) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, as_database) as environment:  # on SQLite, then on PostgreSQL
        yield environment


@pytest.mark.asyncio
async def test_a_running_as_refuses_a_grant_the_admin_cli_revoked_on_the_same_session(
    env: AsEnv,
) -> None:
    """No poll interval between the CLI's commit and the refusal: the very next request on an
    open DTLS session is refused."""
    await env.device(PRODUCER, "producer")
    await env.device(CONSUMER, "consumer")
    await env.store.register_resource(Resource(RID, PRODUCER, 0, "ccm-es256", 60, 0, now()))
    await env.store.add_grant(CONSUMER, "sensor-1/*", None, now())
    server = env.server("--tick", "60")  # the change poll would not notice for a minute
    client = await env.client(server, CONSUMER)
    for _ in range(3):
        code, body = await client.get("secret", r=RID)
        assert code == "2.05"
        env.keep(body["secret"])
    admin(env.state, "revoke", "--consumer", CONSUMER)
    assert await client.get("secret", r=RID) == ("4.03", {"error": "no grant for this epoch"})


# --- the read-only connection of the request path -------------------------------------------------


@pytest.mark.asyncio
async def test_a_point_read_sees_another_connections_commit_at_once(
    store: Store, tmp_path: Path
) -> None:
    assert (await store.device(CONSUMER)).status == "active"  # type: ignore[union-attr]
    other = await Store.open(tmp_path / "state")  # the admin CLI's connection
    try:
        await other.revoke_device(CONSUMER, NOW + 1)
    finally:
        await other.close()
    assert (await store.device(CONSUMER)).status == "revoked"  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_a_point_read_neither_sees_nor_waits_for_another_tasks_transaction(
    store: Store, backing: Backing
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def writer() -> None:
        async with store.db.transaction():
            await store.db.execute(backing.sql(GRANT_INSERT), (CONSUMER, NOW))
            started.set()
            await release.wait()

    task = asyncio.create_task(writer())
    await started.wait()
    # Answered at once, from the last committed state: the grant is not there yet.
    view = await asyncio.wait_for(store.secret_view(CONSUMER, RID, None, NOW), 1.0)
    assert not view.granted
    release.set()
    await task
    assert (await store.secret_view(CONSUMER, RID, None, NOW)).granted


@pytest.mark.asyncio
async def test_a_point_read_inside_the_tasks_own_transaction_sees_its_writes(
    store: Store, backing: Backing
) -> None:
    async with store.db.transaction():
        await store.db.execute(backing.sql(GRANT_INSERT), (CONSUMER, NOW))
        assert (await store.secret_view(CONSUMER, RID, None, NOW)).granted


class BusyReader:
    """A read-only connection that is always busy (as during a WAL recovery)."""

    def __init__(self) -> None:
        self.tries = 0

    def execute(self, *args: Any) -> Any:
        self.tries += 1
        raise sqlite3.OperationalError("database is locked")

    def close(self) -> None:
        pass


# SQLite only: the worker thread is SQLite's (PostgreSQL's readers are a pool a read waits for).
@pytest.mark.asyncio
async def test_a_busy_point_read_goes_through_the_worker_thread(sqlite_store: Store) -> None:
    store = sqlite_store
    await store.add_grant(CONSUMER, "sensor-1/*", None, NOW)
    reader, busy = store.db._reader, BusyReader()
    store.db._reader = busy  # type: ignore[assignment]
    try:
        view = await store.secret_view(CONSUMER, RID, None, NOW)
        device = await store.device(OTHER)
    finally:
        store.db._reader = reader
    assert busy.tries == 2
    assert view.readable and view.epoch is not None and len(view.epoch.secret or b"") == 32
    assert device is not None and device.role == "consumer"


# SQLite only: sqlite3's connection and a WAL checkpoint on the file; PostgreSQL's below.
@pytest.mark.asyncio
async def test_the_point_read_connection_cannot_write_and_holds_no_snapshot(
    sqlite_store: Store, tmp_path: Path
) -> None:
    store = sqlite_store
    reader = store.db._reader
    assert reader is not None
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("UPDATE devices SET status = 'revoked'")
    for _ in range(5):
        await store.device(CONSUMER)
        await store.secret_view(CONSUMER, RID, None, NOW)
    assert not reader.in_transaction
    # A snapshot left open would keep a checkpoint from resetting the WAL.
    await store.add_grant(CONSUMER, "sensor-1/*", None, NOW)
    other = sqlite3.connect(tmp_path / "state" / "as.db")
    try:
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        other.close()
    assert busy == 0


async def readers_of(store: Store) -> list[asyncpg.Connection]:
    """PostgreSQL's point-read connections (idle: no read is running), every one of them made
    first (each is made on its first use) by more concurrent point reads than there are."""
    await asyncio.gather(*(store.device(CONSUMER) for _ in range(16)))
    readers = store.db._readers  # type: ignore[attr-defined]
    assert readers is not None and len(readers._open) >= 1
    return list(readers._open)


@postgresql_only()
@pytest.mark.asyncio
async def test_the_point_read_connections_hold_no_transaction_on_postgresql(
    store: Store, backing: Backing
) -> None:
    """The counterpart of SQLite's snapshot check: a reader left inside a transaction would pin
    an old snapshot (its xmin holds back VACUUM, as a snapshot holds SQLite's checkpoint)."""
    await store.add_grant(CONSUMER, "sensor-1/*", None, NOW)
    for _ in range(10):
        await asyncio.gather(
            *(store.secret_view(CONSUMER, RID, None, NOW) for _ in range(6)),
            store.device(CONSUMER),
        )
    pids = [conn.get_server_pid() for conn in await readers_of(store)]
    rows = await backing.execute(
        "SELECT pid, state, backend_xmin IS NULL, xact_start IS NULL FROM pg_stat_activity "
        "WHERE pid = ANY(?::int[])",
        pids,
    )
    assert sorted(rows) == sorted((pid, "idle", True, True) for pid in pids)


@postgresql_only()
@pytest.mark.asyncio
async def test_more_point_reads_at_once_than_reader_connections_are_all_answered_on_postgresql(
    store: Store,
) -> None:
    """The counterpart of SQLite's busy reader falling back to the worker thread: a read that
    finds every reader connection taken waits for one, and is answered, not failed."""
    await store.add_grant(CONSUMER, "sensor-1/*", None, NOW)
    readers = len(await readers_of(store))
    views = await asyncio.wait_for(
        asyncio.gather(*(store.secret_view(CONSUMER, RID, None, NOW) for _ in range(8 * readers))),
        10.0,
    )
    assert len(views) == 8 * readers and all(v.readable for v in views)
    secrets = {v.epoch.secret for v in views if v.epoch is not None}
    assert len(secrets) == 1 and len(secrets.pop() or b"") == 32


@postgresql_only()
@pytest.mark.asyncio
async def test_the_point_read_connections_cannot_write_on_postgresql(store: Store) -> None:
    """The counterpart of SQLite's read-only (``mode=ro``) reader: a statement that reached a
    reader by mistake could not change anything."""
    for conn in await readers_of(store):
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("UPDATE devices SET status = 'revoked' WHERE id = $1", CONSUMER)
    assert (await store.device(CONSUMER)).status == "active"  # type: ignore[union-attr]


# --- PostgreSQL: concurrent secret views coalesced into one statement -----------------------


def count_reader_statements(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the statements the store's reader connections run (one item per statement, the
    number of rows it returned)."""
    readers = store.db._readers  # type: ignore[attr-defined]
    calls: list[int] = []
    call = readers._call

    async def counted(method: str, sql: str, args: tuple[Any, ...]) -> Any:
        result = await call(method, sql, args)
        calls.append(len(result) if method == "fetch" else 1)
        return result

    monkeypatch.setattr(readers, "_call", counted)
    return calls


@postgresql_only()
@pytest.mark.asyncio
async def test_concurrent_secret_views_share_one_statement_and_agree_with_one_each(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views asked at once go to PostgreSQL as one statement (a round trip costs the AS more CPU
    than the statement), and each answer is what its own statement (VIEW_OF_ACTIVE or
    VIEW_OF_EPOCH, read through the writer) says, over devices active, revoked and unknown,
    grants live, expired and revoked, exclusions, and epochs in every state."""
    await store.add_device("phone-3", "consumer", os.urandom(16), NOW)
    await store.add_device("gone", "consumer", os.urandom(16), NOW)
    await store.register_resource(Resource("sensor-1/other", PRODUCER, 0, "ccm-es256", 60, 0, NOW))
    await store.add_grant(CONSUMER, "sensor-1/*", None, NOW)
    await store.add_grant(OTHER, "sensor-1/temp*", NOW + 5, NOW)  # expires at NOW + 5
    await store.add_grant("gone", "*", None, NOW)
    await store.add_grant("phone-3", "sensor-1/*", None, NOW)
    await store.rotate(RID, NOW + 1, actor="admin", reason="test")  # epochs 1, 2, 3 (pre-active)
    await store.revoke_grants("phone-3", None, NOW + 2)  # excluded from the next epochs
    await store.add_grant("phone-3", "sensor-1/*", None, NOW + 3)  # readmitted, a new epoch
    await store.compromise(RID, 2, NOW + 3)
    await store.revoke_device("gone", NOW + 4)
    epochs = {e.epoch: e.state for e in await store.epochs(RID)}
    assert len(set(epochs.values())) >= 3, epochs  # several states among the epochs
    asked = [
        (device, resource, epoch, when)
        for device in (CONSUMER, OTHER, "phone-3", "gone", "nobody", PRODUCER)
        for resource in (RID, "sensor-1/other", "sensor-1/none")
        for epoch in (None, 1, 2, 3, max(epochs), max(epochs) + 1)
        for when in (NOW + 4, NOW + 10)
    ]
    sql = store.db.sql
    expected = []
    for device, resource, epoch, when in asked:
        params = {"device": device, "resource": resource, "epoch": epoch, "now": when}
        statement = sql.VIEW_OF_ACTIVE if epoch is None else sql.VIEW_OF_EPOCH
        expected.append(await store.db.one(statement, params))  # the writer: not coalesced
    calls = count_reader_statements(store, monkeypatch)
    views = await asyncio.gather(*(store.secret_view(*one) for one in asked))
    assert len(calls) < len(asked) / 10, calls  # 432 views in a few statements
    assert sum(calls) == len(asked)
    for one, view, row in zip(asked, views, expected, strict=True):
        resource = None if row[0] is None else Resource(*row[0:7])
        assert view.resource == resource, one
        epoch = view.epoch
        found = None
        if epoch is not None:
            found = (epoch.epoch, epoch.state, epoch.created_at)
            found += (epoch.activated_at, epoch.deactivated_at)
        assert found == (None if row[7] is None else tuple(row[7:12])), one
        assert (epoch is not None and epoch.secret is not None) == (row[12] is not None), one
        assert (view.granted, view.excluded, view.active) == (row[13], row[14], row[15]), one
    assert any(v.readable for v in views) and not all(v.readable for v in views)
    assert any(v.active for v in views) and not all(v.active for v in views)


@postgresql_only()
@pytest.mark.asyncio
async def test_a_view_asked_after_a_commit_sees_it_even_with_a_statement_under_way(
    store: Store, tmp_path: Path
) -> None:
    """A coalesced read never joins a statement already sent: what was committed before it was
    asked is in its answer (a revocation by the admin CLI, here, while views keep coming)."""
    now_ = int(time.time())
    await store.add_grant(CONSUMER, "sensor-1/*", None, now_)
    stop = asyncio.Event()

    async def keep_reading() -> None:  # the same view: none may answer a later one
        while not stop.is_set():
            await store.secret_view(CONSUMER, RID, None, now_)

    readers = [asyncio.ensure_future(keep_reading()) for _ in range(8)]
    try:
        assert (await store.secret_view(CONSUMER, RID, None, now_)).readable
        await asyncio.to_thread(admin, tmp_path / "state", "revoke", "--consumer", CONSUMER)
        views = await asyncio.gather(
            *(store.secret_view(CONSUMER, RID, None, int(time.time())) for _ in range(20))
        )
        assert not any(view.readable for view in views)
    finally:
        stop.set()
        await asyncio.gather(*readers)


# --- first deliveries that share a commit -----------------------------------------------------


def count_transactions(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = store.db.transaction

    def counted(**kw: Any) -> Any:
        calls[0] += 1
        return original(**kw)

    monkeypatch.setattr(store.db, "transaction", counted)
    return calls


@pytest.mark.asyncio
async def test_deliveries_asked_at_once_share_a_commit_each_audited_once_in_order(
    store: Store, backing: Backing, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions = count_transactions(store, monkeypatch)
    asked = [(f"dev-{i % 10}", RID, 1 + i // 10) for i in range(30)]
    asked.insert(5, asked[0])  # asked twice at once: the first is the first time
    results = await asyncio.gather(
        *(store.record_delivery(d, r, e, NOW + i) for i, (d, r, e) in enumerate(asked))
    )
    assert results == [True] * 5 + [False] + [True] * 25
    assert 1 <= transactions[0] <= 3  # not one per delivery
    records = [r for r in await store.audit_records() if r.action == "secret"]
    assert [(r.actor, r.subject, r.detail["epoch"]) for r in records] == [
        a for i, a in enumerate(asked) if i != 5
    ]
    assert [r.at for r in records] == [NOW + i for i in range(len(asked)) if i != 5]
    assert (await store.verify_audit())[0]
    # Committed when the callers return: another connection sees every one.
    assert await backing.execute("SELECT COUNT(*) FROM deliveries") == [(30,)]
    # And asked again, none is the first time.
    again = await asyncio.gather(*(store.record_delivery(d, r, e, NOW) for d, r, e in asked))
    assert not any(again)


@pytest.mark.asyncio
async def test_a_batch_holds_at_most_max_batch_deliveries(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deliveries_module, "MAX_BATCH", 7)
    transactions = count_transactions(store, monkeypatch)
    results = await asyncio.gather(
        *(store.record_delivery(f"dev-{i}", RID, 1, NOW) for i in range(50))
    )
    assert all(results)
    assert transactions[0] >= 50 // 7
    assert len([r for r in await store.audit_records() if r.action == "secret"]) == 50


@pytest.mark.asyncio
async def test_a_failed_batch_fails_each_of_its_callers_and_records_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = store.audit_log.append_many
    failures = [1]

    async def failing(records: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise DatabaseError("disk I/O error")
        await original(records)

    monkeypatch.setattr(store.audit_log, "append_many", failing)
    results = await asyncio.gather(
        *(store.record_delivery(f"dev-{i}", RID, 1, NOW) for i in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, DatabaseError) for r in results)
    assert [r for r in await store.audit_records() if r.action == "secret"] == []
    assert (await store.db.all("SELECT COUNT(*) FROM deliveries"))[0][0] == 0
    # The store goes on: the next ones are recorded.
    assert await store.record_delivery("dev-0", RID, 1, NOW)
    assert len([r for r in await store.audit_records() if r.action == "secret"]) == 1


@pytest.mark.asyncio
async def test_a_cancelled_batch_leader_fails_the_others_with_a_store_error(
    store: Store,
) -> None:
    async with store.db._lock:  # the store is busy: the leader waits for it
        leader = asyncio.create_task(store.record_delivery("dev-0", RID, 1, NOW))
        await asyncio.sleep(0)
        follower = asyncio.create_task(store.record_delivery("dev-1", RID, 1, NOW))
        await asyncio.sleep(0)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
    with pytest.raises(StoreError):
        await follower
    assert await store.record_delivery("dev-1", RID, 1, NOW)  # and the store goes on
