"""The audit log's growth and retention: denials tallied, pruning behind a checkpoint, verification.

On real databases, in process (the store's own API and its SQL file); the AS process flooded
with denied requests is in ``test_as_audit_flood.py``. The tests on a store run on SQLite and on
PostgreSQL (``as_database``); the tampering and schema-3 migration tests stay on SQLite: they
edit the SQLite file with sqlite3 (PostgreSQL's own tampering and migration tests are in
``test_as_store.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import random
import sqlite3
import time
from pathlib import Path

import pytest
import pytest_asyncio
from pg_harness import PgCluster

from authz_server.ca import init_state
from authz_server.store import Store
from authz_server.store import audit as audit_module
from authz_server.store.audit import audit_bytes
from authz_server.store.denials import (
    IMMEDIATE_SUBJECTS,
    MAX_NAME,
    MAX_WINDOWS,
    SAMPLED_SUBJECTS,
    DenialTally,
)
from authz_server.store.sqlite import MIGRATIONS, split_script
from oscar import cbor

NOW = 1_800_000_000
DAY = 86_400
BEGIN = NOW - 30 * DAY  # when the test states are made (their first record)


def url(as_database: tuple[PgCluster, str] | None) -> str | None:
    return None if as_database is None else as_database[1]


@pytest_asyncio.fixture
async def store(tmp_path: Path, as_database: tuple[PgCluster, str] | None) -> Store:
    """A new AS's store, on SQLite and then on PostgreSQL (``as_database``)."""
    s = await init_state(
        tmp_path / "state", as_uri="coaps://127.0.0.1:5684", now=BEGIN, database=url(as_database)
    )
    yield s
    await s.close()


def denied(records: list) -> list:
    return [r for r in records if r.result == "denied"]


def total(records: list) -> int:
    """Denials a list of records accounts for: one per record written at once, plus counts."""
    return sum(r.detail.get("count", 1) for r in denied(records))


def tamper(path: Path, *statements: str | tuple[str, tuple]) -> None:
    """Edit the database as someone with the file would: the triggers are no obstacle. Each
    statement is SQL, or (SQL, parameters)."""
    db = sqlite3.connect(path)
    try:
        db.execute("DROP TRIGGER IF EXISTS audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for statement in statements:
            sql, params = (statement, ()) if isinstance(statement, str) else statement
            db.execute(sql, params)
        db.commit()
    finally:
        db.close()


# --- the tally, pure -----------------------------------------------------------------------------


def test_a_tally_writes_the_first_of_each_kind_and_counts_the_rest() -> None:
    tally = DenialTally(interval=60)
    assert tally.note("c1", "secret", "p/a", "no grant", NOW)  # first: written at once
    assert not tally.note("c1", "secret", "p/a", "no grant", NOW + 1)  # same again: counted
    assert tally.note("c1", "keys", "p/a", "not the owner", NOW + 1)  # another action
    assert tally.note("c2", "secret", "p/a", "no grant", NOW + 1)  # another device
    assert tally.note("c1", "secret", "p/b", "no grant", NOW + 2)  # another subject, early
    assert tally.pending() == 1 and len(tally) == 3
    assert tally.due(NOW + 59) == []
    [entry] = tally.due(NOW + 60)  # c1/secret's window ended with one counted
    assert entry == (
        "c1",
        "secret",
        "p/a",
        "denied",
        {"reason": "no grant", "count": 1, "from": NOW + 1, "to": NOW + 1,
         "subjects": {"p/a": 1}, "others": 0},
        NOW + 60,
    )  # fmt: skip
    assert tally.due(NOW + 61) == []  # the two opened at NOW + 1 end quiet: forgotten
    assert len(tally) == 1  # c1/secret goes on (something was counted)
    # A flood goes on in the continued window: nothing at once, one aggregate per interval.
    assert not any(tally.note("c1", "secret", f"p/{i}", "no grant", NOW + 61) for i in range(50))
    [entry] = tally.due(NOW + 120)
    assert entry[2] == "*" and entry[4]["count"] == 50
    assert len(entry[4]["subjects"]) == SAMPLED_SUBJECTS
    assert entry[4]["others"] == 50 - SAMPLED_SUBJECTS
    assert tally.due(NOW + 180) == [] and len(tally) == 0  # a quiet interval: forgotten
    assert tally.note("c1", "secret", "p/a", "no grant", NOW + 181)  # at once again


def test_a_tally_stays_bounded_whatever_the_names() -> None:
    tally = DenialTally(interval=60)
    rng = random.Random(1)
    written = 0
    for i in range(20_000):
        name = "p/" + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 300)))
        written += tally.note("c1", "secret", name, "no grant", NOW + i // 1000)
    assert written == IMMEDIATE_SUBJECTS  # the rest counted
    [entry] = tally.drain(NOW + 30)
    assert entry[4]["count"] == 20_000 - IMMEDIATE_SUBJECTS
    assert len(entry[4]["subjects"]) == SAMPLED_SUBJECTS
    assert all(len(s) <= MAX_NAME for s in entry[4]["subjects"])
    assert len(tally) == 0
    for i in range(MAX_WINDOWS):
        tally.note(f"d{i}", "secret", "p/a", "no grant", NOW)
    assert tally.full_for("new", "secret", "no grant")
    assert not tally.full_for("d1", "secret", "no grant")
    assert tally.note("new", "secret", "p/a", "no grant", NOW) and len(tally) == MAX_WINDOWS
    with pytest.raises(ValueError):
        DenialTally(interval=0)


# --- denials in the store ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_denials_are_aggregated_with_exact_counts(store: Store) -> None:
    for i in range(300):
        await store.audit_denial("c1", "secret", f"p/{i % 20}", "no grant", NOW + i // 100)
    await store.audit_denial("c1", "link", "x", "no such proxy", NOW)
    records = denied(await store.audit_records())
    assert len(records) == IMMEDIATE_SUBJECTS + 1  # nothing counted is written yet
    assert await store.flush_denials(NOW + 59) == 0
    assert await store.flush_denials(NOW + 60) == 1
    records = denied(await store.audit_records())
    assert len(records) == IMMEDIATE_SUBJECTS + 2 and total(records) == 301
    aggregate = records[-1]
    assert (aggregate.actor, aggregate.action, aggregate.subject) == ("c1", "secret", "*")
    assert aggregate.detail["count"] == 300 - IMMEDIATE_SUBJECTS
    assert (aggregate.detail["from"], aggregate.detail["to"]) == (NOW, NOW + 2)
    assert (await store.verify_audit())[0]


@pytest.mark.asyncio
async def test_counted_denials_are_written_by_the_timer_and_at_close(
    tmp_path: Path, as_database: tuple[PgCluster, str] | None
) -> None:
    state = tmp_path / "state"
    s = await init_state(
        state, as_uri="coaps://127.0.0.1:5684", now=BEGIN, database=url(as_database)
    )
    s.denials.interval = 0.5
    now = int(time.time())
    for _ in range(5):
        await s.audit_denial("c1", "secret", "p/a", "no grant", now)
    await asyncio.sleep(1.5)  # the window's end: its count is written without a close
    records = denied(await s.audit_records())
    assert [r.detail.get("count") for r in records] == [None, 4]
    for _ in range(3):  # the window goes on: counted, written at close
        await s.audit_denial("c1", "secret", "p/a", "no grant", now)
    s.denials.interval = 3600.0
    await s.audit_denial("c2", "secret", "p/a", "no grant", now)
    await s.audit_denial("c2", "secret", "p/a", "no grant", now)
    await s.close()
    s = await Store.open(state)
    try:
        records = denied(await s.audit_records())
        assert total(records) == 5 + 3 + 2
        assert (await s.verify_audit())[0]
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_counts_whose_write_failed_are_written_later(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(3):
        await store.audit_denial("c1", "secret", "p/a", "no grant", NOW)

    async def locked(self: object, records: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(audit_module.AuditLog, "append_many", locked)
    with pytest.raises(sqlite3.OperationalError):
        await store.flush_denials(NOW + 60)
    monkeypatch.undo()
    assert total(await store.audit_records()) == 1  # only the one written at once
    assert await store.flush_denials(NOW + 61) == 1  # the kept aggregate
    assert total(await store.audit_records()) == 3
    assert (await store.verify_audit())[0]


# --- the record's bytes and the chain function ---------------------------------------------------


def test_the_fast_record_encoding_is_the_cbor_encoding() -> None:
    rng = random.Random(3)
    texts = ["", "a", "x" * 23, "y" * 24, "z" * 255, "w" * 256, "é€😀", "v" * 70_000]
    numbers = [0, 1, 23, 24, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**64 - 1]
    for _ in range(500):
        fields = [rng.choice(numbers), rng.choice(numbers), *(rng.choice(texts) for _ in range(5))]
        assert audit_bytes(*fields) == cbor.dumps(fields)
    for odd in ([-1, 0], [1.5, 0], ["1", 0], [2**64, 0], [True, 0]):
        fields = [*odd, "a", "b", "c", "d", "e"]
        try:
            expected = cbor.dumps(fields)
        except (TypeError, ValueError, OverflowError):
            continue
        assert audit_bytes(*fields) == expected


@pytest.mark.asyncio
async def test_the_chain_function_is_the_chain(store: Store) -> None:
    vault = store.envelope
    chain = vault.chain_function()
    for previous, record in [(b"", b""), (b"p" * 32, b"r" * 100), (b"", b"x" * 5000)]:
        assert chain(previous, record) == vault.chain(previous, record)
    # A key longer than SHA-256's 64-byte block (RFC 2104 hashes it first) chains alike too.
    vault._audit_key = bytes(range(100))
    chain = vault.chain_function()
    expected = hmac.new(bytes(range(100)), b"p" * 32 + b"r" * 100, "sha256").digest()
    assert chain(b"p" * 32, b"r" * 100) == vault.chain(b"p" * 32, b"r" * 100) == expected


# --- pruning -------------------------------------------------------------------------------------


async def fill(store: Store, days: int, per_day: int) -> None:
    """Records dated NOW - days*DAY ... NOW, per_day a day."""
    for day in range(days, -1, -1):
        for i in range(per_day):
            await store.audit("admin", "test", f"r{day}-{i}", "ok", {"day": day}, NOW - day * DAY)


@pytest.mark.asyncio
async def test_prune_then_verify_passes(store: Store, tmp_path: Path) -> None:
    await fill(store, 10, 5)
    head_before = await store.audit_head()
    records = await store.audit_records()
    old = [r for r in records if r.at < NOW - 3 * DAY]
    through, deleted = await store.prune_audit(NOW - 3 * DAY, NOW)
    assert through == old[-1].seq and deleted == len(old)
    kept = await store.audit_records()
    assert kept[0].seq == through + 1 and all(r.at >= NOW - 3 * DAY for r in kept[:-1])
    prune = kept[-1]
    assert (prune.action, prune.detail) == (
        "prune",
        {"before": NOW - 3 * DAY, "through": through, "records": len(old)},
    )
    ok, summary = await store.verify_audit()
    assert ok, summary
    assert f"{len(kept)} records after the checkpoint at record {through}" in summary
    # A head recorded before the prune, still kept: fine; one pruned away: said so.
    assert (await store.verify_audit(head_before))[0]
    ok, summary = await store.verify_audit((through - 2, bytes(32)))
    assert not ok and "was pruned" in summary
    # Nothing older left: a second prune with the same date does nothing; later ones go on.
    assert await store.prune_audit(NOW - 3 * DAY, NOW) == (0, 0)
    await store.audit("admin", "test", "late", "ok", {}, NOW + 1)
    through2, _ = await store.prune_audit(NOW + 1, NOW + 2)
    assert through2 > through and (await store.verify_audit())[0]
    assert [r.subject for r in await store.audit_records()] == ["late", "audit"]


@pytest.mark.asyncio
async def test_tampering_after_a_prune_is_detected(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = state / "as.db"
    s = await init_state(state, as_uri="coaps://127.0.0.1:5684", now=BEGIN)
    try:
        await fill(s, 6, 3)
        await s.prune_audit(NOW - 4 * DAY, NOW)
        first = await s.prune_audit(NOW - 2 * DAY, NOW)  # two prunes: an older checkpoint exists
        assert first[1] > 0 and (await s.verify_audit())[0]
    finally:
        await s.close()
    db = sqlite3.connect(path)
    checkpoint = db.execute("SELECT seq, chain, at, mac FROM audit_checkpoint").fetchone()
    kept = [row[0] for row in db.execute("SELECT seq FROM audit ORDER BY seq")]
    # The trigger refuses to delete what the checkpoint does not cover.
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit WHERE seq = ?", (kept[0],))
    db.close()

    async def verdict() -> tuple[bool, str]:
        s = await Store.open(state)
        try:
            return await s.verify_audit()
        finally:
            await s.close()

    def restore() -> None:
        tamper(
            path,
            "DELETE FROM audit_checkpoint",
            ("INSERT INTO audit_checkpoint VALUES (1, ?, ?, ?, ?)", tuple(checkpoint)),
        )

    cases: list[tuple[str | tuple[str, tuple], str]] = [
        (("UPDATE audit SET subject = 'x' WHERE seq = ?", (kept[1],)), "was altered"),
        (("UPDATE audit SET at = 'x' WHERE seq = ?", (kept[1],)), "was altered"),
        (("UPDATE audit SET at = at + 0.5 WHERE seq = ?", (kept[1],)), "was altered"),
        (("UPDATE audit SET actor = x'00' WHERE seq = ?", (kept[1],)), "was altered"),
        (("UPDATE audit SET detail = 7 WHERE seq = ?", (kept[1],)), "was altered"),
        (("DELETE FROM audit WHERE seq = ?", (kept[0],)), f"record {kept[0]} is missing"),
        (("DELETE FROM audit WHERE seq = ?", (kept[2],)), f"record {kept[2]} is missing"),
        ("DELETE FROM audit_checkpoint", "record 1 is missing"),
        ("UPDATE audit_checkpoint SET seq = seq - 1", "checkpoint was altered"),
        ("UPDATE audit_checkpoint SET chain = zeroblob(32)", "checkpoint was altered"),
        ("UPDATE audit_checkpoint SET at = at + 1", "checkpoint was altered"),
        ("UPDATE audit_checkpoint SET mac = zeroblob(32)", "checkpoint was altered"),
    ]
    for statement, expected in cases:
        backup = path.with_suffix(".bak")
        backup.write_bytes(path.read_bytes())
        tamper(path, statement)
        ok, summary = await verdict()
        assert not ok and expected in summary, (statement, summary)
        path.write_bytes(backup.read_bytes())
        assert (await verdict())[0]
    restore()
    assert (await verdict())[0]
    # A checkpoint moved forward over kept records, with the chain value of the record it names
    # (a prune by someone without the key): the MAC does not hold.
    tamper(
        path,
        (
            "UPDATE audit_checkpoint SET seq = ?1, "
            "chain = (SELECT chain FROM audit WHERE seq = ?1)",
            (kept[1],),
        ),
        ("DELETE FROM audit WHERE seq <= ?", (kept[1],)),
    )
    ok, summary = await verdict()
    assert not ok and "checkpoint was altered" in summary


@pytest.mark.asyncio
async def test_an_older_checkpoint_put_back_is_detected(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = state / "as.db"
    s = await init_state(state, as_uri="coaps://127.0.0.1:5684", now=BEGIN)
    await fill(s, 6, 3)
    await s.prune_audit(NOW - 4 * DAY, NOW)
    await s.close()
    db = sqlite3.connect(path)
    older = db.execute("SELECT seq, chain, at, mac FROM audit_checkpoint").fetchone()
    db.close()
    s = await Store.open(state)
    await s.prune_audit(NOW - 1 * DAY, NOW)
    await s.close()
    tamper(
        path,
        "DELETE FROM audit_checkpoint",
        ("INSERT INTO audit_checkpoint VALUES (1, ?, ?, ?, ?)", tuple(older)),
    )
    s = await Store.open(state)
    try:
        ok, summary = await s.verify_audit()
        assert not ok and f"record {older[0] + 1} is missing" in summary
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_a_prune_cut_short_after_its_checkpoint_is_finished_later(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(store, 5, 4)

    async def crash(self: object) -> int:
        raise RuntimeError("killed")

    monkeypatch.setattr(audit_module.AuditLog, "_delete_pruned", crash)
    with pytest.raises(RuntimeError):
        await store.prune_audit(NOW - 2 * DAY, NOW)
    monkeypatch.undo()
    ok, summary = await store.verify_audit()  # the covered records are still there: skipped
    assert ok, summary
    records = await store.audit_records()
    assert records[0].at >= NOW - 2 * DAY  # not listed either
    monkeypatch.setattr(audit_module, "PRUNE_BATCH", 3)  # and deleted in batches
    assert (await store.prune_audit(NOW - 2 * DAY, NOW))[1] > 0
    assert (await store.verify_audit())[0]


@pytest.mark.asyncio
async def test_a_schema_3_database_is_migrated_and_prunes(tmp_path: Path) -> None:
    from authz_server.envelope import create_master_key

    state = tmp_path / "old"
    state.mkdir(mode=0o700)
    create_master_key(state / "master.key")
    s = await init_state(tmp_path / "new", as_uri="coaps://127.0.0.1:5684", now=BEGIN)
    await s.close()
    # A schema-3 database: the same rows, made by the first three migrations only.
    db = sqlite3.connect(state / "as.db")
    for script in MIGRATIONS[:3]:
        for statement in split_script(script):
            db.execute(statement)
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    (state / "master.key").write_bytes((tmp_path / "new" / "master.key").read_bytes())
    src = sqlite3.connect(tmp_path / "new" / "as.db")
    db = sqlite3.connect(state / "as.db")
    db.executemany("INSERT INTO meta VALUES (?, ?)", src.execute("SELECT * FROM meta"))
    db.executemany(
        "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)", src.execute("SELECT * FROM audit")
    )
    db.commit()
    db.close()
    src.close()
    s = await Store.open(state)
    try:
        assert (await s.verify_audit())[0]
        await fill(s, 3, 2)
        assert (await s.prune_audit(NOW - DAY, NOW))[1] > 0
        assert (await s.verify_audit())[0]
    finally:
        await s.close()


@pytest.mark.asyncio
async def test_verify_reads_one_snapshot_while_records_are_appended(store: Store) -> None:
    await fill(store, 2, 200)

    async def append() -> None:
        for i in range(200):
            await store.audit("admin", "test", f"x{i}", "ok", {}, NOW)

    results = await asyncio.gather(append(), *(store.verify_audit() for _ in range(5)))
    assert all(ok for ok, _ in results[1:]), results
