"""``oscar-as migrate``: a SQLite AS copied to PostgreSQL answers as before; a target that is not
empty, a bad URL, a server that does not answer or refuses the login, and a copy that fails
midway change nothing.

Every test here but two (a bad URL, the table list) uses the session's private PostgreSQL server
(tests/pg_harness.py) and so starts a process (tests/tiers.py); one runs ``oscar-as serve`` on the
migrated state.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from as_harness import AsProcess, Client
from pg_harness import PgCluster

from authz_server.ca import init_state
from authz_server.cli import main
from authz_server.store import Instance, Resource, Store, postgres
from authz_server.store.migrate import EPHEMERAL, TABLES

NOW = int(time.time())
T0 = NOW - 10 * 86_400  # the state directory's first days, pruned from the audit log
TEMP, HUMID, OTHER = "sensor-1/temperature", "sensor-1/humidity", "sensor-2/pressure"
PARTED = "sensor-2/vitals"  # a resource with parts (schema 7)
ERROR_LINE = re.compile(r"^oscar-as migrate: error: \S[^\n]*\n$")
PASSWORD = "s3cret-Pa55word"


def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    return code, out, err


async def populate(state: Path) -> dict[str, bytes]:
    """A SQLite AS with a bit of everything; returns the PSKs handed out."""
    store = await init_state(state, as_uri="coaps://127.0.0.1:5684", now=T0)
    psks: dict[str, bytes] = {}
    try:
        for device, role in [
            ("sensor-1", "producer"),
            ("sensor-2", "producer"),
            ("phone-1", "consumer"),
            ("phone-2", "consumer"),
            ("phone-3", "consumer"),
            ("cloud-1", "proxy"),
        ]:
            psks[device] = os.urandom(16)
            await store.add_device(device, role, psks[device], T0)
        await store.add_certificate(0xC1, "sensor-1", b"k" * 8, b"der-1", T0, NOW + 9999, T0)
        await store.add_certificate(0xC3, "phone-3", b"m" * 8, b"der-3", T0, NOW + 9999, T0)
        await store.register_resources(
            [
                Resource(TEMP, "sensor-1", 50, "ccm-es256", 60, 3600, NOW - 100),
                Resource(HUMID, "sensor-1", 50, "ccm-es256", 60, 0, NOW - 100),
                Resource(OTHER, "sensor-2", 50, "ccm-es256", 60, 3600, NOW - 100),
            ]
        )
        await store.parts.register_resource(
            Resource(PARTED, "sensor-2", 50, "ccm-es256", 60, 0, NOW - 100),
            [("pub", "plain"), ("a", "encrypted"), ("b", "encrypted")],
        )
        await store.parts.grant("phone-1", PARTED, "a", NOW - 80)
        await store.parts.grant("phone-2", PARTED, "b", NOW - 80)  # revoked below: an exclusion
        await store.add_grant("phone-1", "sensor-1/*", None, NOW - 90)
        await store.add_grant("phone-2", "sensor-1/*", None, NOW - 90)
        await store.add_grant("phone-3", TEMP, NOW + 86_400, NOW - 90)
        await store.rotate(TEMP, NOW - 50, actor="admin", reason="test")
        await store.destroy_expired(NOW - 10, 20)  # epoch 1 of TEMP: destroyed
        await store.revoke_grants("phone-2", None, NOW - 5)  # rotations and exclusions
        await store.compromise(HUMID, None, NOW - 4)
        await store.revoke_device("phone-3", NOW - 3)
        await store.record_delivery("phone-1", TEMP, 3, NOW - 2)
        await store.record_link_delivery("sensor-1", "cloud-1", NOW - 2)
        ADMIN_TOKENS[:] = [await store.issue_admin_token("ops", None, NOW - 2)]
        await store.audit_denial("phone-3", "secret", TEMP, "unknown device", NOW - 1)
        await store.audit_denial("phone-3", "secret", TEMP, "unknown device", NOW - 1)
        await store.flush_denials(drain=True)
        # A running instance's heartbeat: ephemeral, not copied (EPHEMERAL).
        await store.beat(Instance("i-1", "127.0.0.1:5684", "h", 1, NOW - 2, NOW - 1, 5.0))
        through, deleted = await store.prune_audit(T0 + 1, NOW)
        assert through > 0 and deleted == through  # a checkpoint, the oldest records gone
    finally:
        await store.close()
    return psks


#: The admin token populate issued (the copy must accept it).
ADMIN_TOKENS: list[str] = []


async def answers(store: Store) -> dict[str, Any]:
    """What a store says about everything :func:`populate` made."""
    epochs = {}
    for resource in await store.resources():
        epochs[resource.id] = [
            await store.epoch(e.resource_id, e.epoch, with_secret=True)
            for e in await store.epochs(resource.id)
        ]
    return {
        "devices": await store.devices(),
        "psks": await store.active_psks(),
        "resources": await store.resources(),
        "epochs": epochs,
        "grants": await store.grants(),
        "parts": await store.parts.parts(PARTED),
        "part_epochs": await store.parts.live_epochs(PARTED),
        "part_grants": await store.parts.grants(),
        "part_views": [
            await store.parts.view(c, PARTED, p, e, NOW)
            for c in ("phone-1", "phone-2")
            for p in ("a", "b")
            for e in (1, 2)
        ],
        "excluded": await store.excluded_resources("phone-2"),
        "readable": await store.readable_resources("phone-1", NOW),
        "may_read": [
            await store.may_read(c, TEMP, e, NOW)
            for c in ("phone-1", "phone-2", "phone-3")
            for e in (2, 3, 4)
        ],
        "certificate": await store.certificate(device_id="sensor-1", now=NOW),
        "revoked": await store.revoked_certificates(NOW),
        "links": await store.link_psks("cloud-1"),
        "audit": await store.audit_records(),
        "head": await store.audit_head(),
        "verify": await store.verify_audit(),
        "changes": await store.changes(),
        "ca_key": await store.ca_key(),
        "meta": [await store.get_meta(k) for k in ("ca_cert", "as_uri")],
        "admins": await store.admin_list(),
        "admin_of_token": [await store.admin_of_token(t, NOW) for t in ADMIN_TOKENS],
    }


async def read(state: Path, database: str | None = None) -> dict[str, Any]:
    store = await Store.open(state, database=database)
    try:
        return await answers(store)
    finally:
        await store.close()


async def count_tables(url: str) -> dict[str, int]:
    """The rows of every AS table in the database at ``url`` ({} when there is none)."""
    conn = await asyncpg.connect(url)
    try:
        present = {r[0] for r in await conn.fetch(postgres.SCHEMA_TABLES)}
        return {t: await conn.fetchval(postgres.count_rows(t)) for t in TABLES if t in present}
    finally:
        await conn.close()


async def objects(url: str) -> list[str]:
    """The names of the database's tables and functions of its own (not PostgreSQL's)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "UNION ALL SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        )
        return sorted(r[0] for r in rows)
    finally:
        await conn.close()


def sqlite_bytes(state: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(state.glob("as.db*")))


# --- a populated AS, migrated ------------------------------------------------------------------


def test_a_populated_sqlite_as_migrated_answers_the_same_on_postgresql(
    tmp_path: Path, pg_cluster: PgCluster, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    psks = asyncio.run(populate(state))
    # The admin CLI's changes go in as well.
    code, _, err = run(
        "grant", "--state", str(state), "--consumer", "phone-1", "--resource", "sensor-2/*",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    before = asyncio.run(read(state))
    assert before["verify"][0] and "after the checkpoint" in before["verify"][1]
    assert before["admin_of_token"][0].name == "ops"  # the copy must let it in too
    states = {e.state for epochs in before["epochs"].values() for e in epochs}
    assert states == {"destroyed", "deactivated", "compromised", "active", "pre-active"}
    source_counts = _sqlite_counts(state)
    assert all(source_counts[t] > 0 for t in TABLES), source_counts
    sqlite_before = sqlite_bytes(state)

    code, out, err = run("migrate", "--state", str(state), "--to", pg_database, capsys=capsys)
    assert code == 0 and err == "", err
    total = sum(source_counts.values())
    assert f"({total} in all)" in out and "the same on both sides" in out
    assert f"audit log intact on both sides: {before['verify'][1]}" in out
    head = before["head"]
    assert f"head {head[0]}:{head[1].hex()}" in out
    assert "fallback copy" in out and str(state / "as.db") in out
    assert (state / "database.url").read_text() == pg_database + "\n"
    assert stat.S_IMODE((state / "database.url").stat().st_mode) == 0o600
    assert sqlite_bytes(state) == sqlite_before  # the SQLite file untouched, kept

    assert asyncio.run(count_tables(pg_database)) == source_counts
    assert (
        _sqlite_count(state, "instances") == 1
        and asyncio.run(count_rows(pg_database, "instances")) == 0
    )  # the heartbeats are not copied: each instance writes its own again
    after = asyncio.run(read(state))  # the state directory now opens PostgreSQL
    assert after == before
    assert (state / "master.key").exists()
    # No secret of the store on the PostgreSQL disk: only ciphertexts went over.
    cluster_bytes = asyncio.run(pg_cluster.database_bytes(pg_database))
    secrets = [e.secret for epochs in before["epochs"].values() for e in epochs if e.secret]
    secrets += [*psks.values(), before["ca_key"]]
    for secret in secrets:
        assert secret not in cluster_bytes

    # Later writes on PostgreSQL: the grant ids and the audit chain go on from the copy's.
    code, _, err = run(
        "grant", "--state", str(state), "--consumer", "phone-1", "--resource", "sensor-9/*",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    grants = asyncio.run(read(state))["grants"]
    assert [g[0] for g in grants] == list(range(1, len(grants) + 1))
    code, out, _ = run("audit", "--verify", "--state", str(state), capsys=capsys)
    assert code == 0 and "chain intact" in out
    # A second migrate: the directory is on PostgreSQL already.
    code, out, err = run("migrate", "--state", str(state), "--to", pg_database, capsys=capsys)
    assert code == 1 and ERROR_LINE.fullmatch(err) and "already" in err and out == ""


def test_oscar_as_serve_on_the_migrated_state_hands_out_the_same_secret(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    psks = asyncio.run(populate(state))
    before = asyncio.run(read(state))
    active = next(e for e in before["epochs"][TEMP] if e.state == "active")
    assert run("migrate", "--state", str(state), "--to", pg_database, capsys=capsys)[0] == 0
    server = AsProcess(state, tmp_path / "as.log")
    server.start()
    try:

        async def ask() -> tuple[str, Any]:
            client = await Client.connect(server, "phone-1", psks["phone-1"])
            try:
                return await client.get("secret", r=TEMP)
            finally:
                await client.close()

        code, reply = asyncio.run(ask())
        assert code == "2.05"
        assert (reply["epoch"], reply["secret"]) == (active.epoch, active.secret)
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "Traceback" not in log and active.secret.hex() not in log


# --- refusals: nothing changed -----------------------------------------------------------------


def test_a_target_holding_an_as_or_its_names_is_refused_and_unchanged(
    tmp_path: Path, pg_cluster: PgCluster, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    asyncio.run(populate(state))
    sqlite_before = sqlite_bytes(state)

    def refused(url: str, reason: str) -> None:
        code, out, err = run("migrate", "--state", str(state), "--to", url, capsys=capsys)
        assert (code, out) == (1, ""), err
        assert ERROR_LINE.fullmatch(err) and reason in err, err
        assert not (state / "database.url").exists()
        assert sqlite_bytes(state) == sqlite_before

    # Another AS (oscar-as init --database) on the target.
    async def other_as() -> None:
        store = await init_state(
            tmp_path / "other", as_uri="coaps://x", now=NOW, database=pg_database
        )
        await store.close()

    asyncio.run(other_as())
    held = asyncio.run(count_tables(pg_database))
    refused(pg_database, "holds an AS already (schema 7)")
    assert asyncio.run(count_tables(pg_database)) == held
    # The same AS of another schema version.
    asyncio.run(_execute(pg_database, "UPDATE schema_version SET version = 3"))
    refused(pg_database, "holds an AS already (schema 3; this program's is 7)")
    asyncio.run(_execute(pg_database, "UPDATE schema_version SET version = 99"))
    refused(pg_database, "(schema 99; this program's is 7)")
    assert asyncio.run(count_tables(pg_database)) == held
    # A database with a table of an AS's name (another application's): refused, untouched.
    clash = pg_cluster.new_database()
    try:
        asyncio.run(_execute(clash, "CREATE TABLE devices (name TEXT)"))
        asyncio.run(_execute(clash, "INSERT INTO devices VALUES ('lamp')"))
        refused(clash, "holds devices already")
        assert asyncio.run(objects(clash)) == ["devices"]
    finally:
        pg_cluster.drop_database(clash)


def test_a_source_of_a_newer_schema_is_refused_untouched(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    asyncio.run(populate(state))
    con = sqlite3.connect(state / "as.db")
    con.execute("PRAGMA user_version = 9")
    con.close()
    sqlite_before = sqlite_bytes(state)
    code, out, err = run("migrate", "--state", str(state), "--to", pg_database, capsys=capsys)
    assert (code, out) == (2, "") and ERROR_LINE.fullmatch(err), err
    assert "schema 9, newer than this program's 7" in err
    assert sqlite_bytes(state) == sqlite_before
    assert asyncio.run(objects(pg_database)) == []
    assert not (state / "database.url").exists()


def test_a_source_of_an_older_schema_is_migrated_forward_then_copied(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from authz_server.envelope import Envelope, create_master_key
    from authz_server.store import sqlite

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    master = create_master_key(state / "master.key")
    con = sqlite3.connect(state / "as.db")
    for statement in sqlite.split_script(sqlite.MIGRATIONS[0]):  # version 1 only
        con.execute(statement)
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO meta VALUES ('data_key', ?)", (Envelope.new_wrapped_data_key(master),))
    con.execute("INSERT INTO meta VALUES ('changes', 7)")
    con.execute("INSERT INTO devices VALUES ('old-1', 'consumer', NULL, 'revoked', 1, 2)")
    con.commit()
    con.close()
    code, out, err = run("migrate", "--state", str(state), "--to", pg_database, capsys=capsys)
    assert code == 0, err
    assert "audit log intact on both sides: empty" in out
    con = sqlite3.connect(state / "as.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == 7  # as any command would do
    con.close()
    after = asyncio.run(read_devices(state))
    assert after == (["old-1"], 7)


async def read_devices(state: Path) -> tuple[list[str], int]:
    store = await Store.open(state)
    try:
        return [d.id for d in await store.devices()], await store.changes()
    finally:
        await store.close()


def test_a_silent_server_and_a_wrong_password_are_one_clear_line(
    tmp_path: Path, pg_cluster: PgCluster, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    asyncio.run(populate(state))
    sqlite_before = sqlite_bytes(state)

    def fails(url: str, status: int, reason: str) -> str:
        code, out, err = run("migrate", "--state", str(state), "--to", url, capsys=capsys)
        assert (code, out) == (status, ""), err
        assert ERROR_LINE.fullmatch(err) and reason in err, err
        assert not (state / "database.url").exists()
        assert sqlite_bytes(state) == sqlite_before
        return err

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = fails(f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/as", 2, "cannot connect")
    assert "u:***@127.0.0.1" in err
    # A server that asks this user for a password, given the wrong one.
    asyncio.run(_execute(pg_cluster.url(), f"CREATE ROLE migrator LOGIN PASSWORD '{PASSWORD}x'"))
    hba = pg_cluster.data / "pg_hba.conf"
    rules = hba.read_text()
    try:
        hba.write_text("host all migrator 127.0.0.1/32 scram-sha-256\n" + rules)
        asyncio.run(_execute(pg_cluster.url(), "SELECT pg_reload_conf()"))
        url = pg_database.replace("postgres@", f"migrator:{PASSWORD}@")
        asyncio.run(_refused_login(url))
        err = fails(url, 2, "password authentication failed")
        assert "migrator:***@" in err
    finally:
        hba.write_text(rules)
        asyncio.run(_execute(pg_cluster.url(), "SELECT pg_reload_conf()"))
        asyncio.run(_execute(pg_cluster.url(), "DROP ROLE migrator"))
    assert asyncio.run(objects(pg_database)) == []


@pytest.mark.parametrize("where", ["schema", "rows", "connection"])
def test_a_copy_failing_midway_leaves_the_target_empty_and_the_state_on_sqlite(
    tmp_path: Path,
    pg_cluster: PgCluster,
    pg_database: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    state = tmp_path / "state"
    asyncio.run(populate(state))
    if where == "connection":
        # The migration's session killed by the server's administrator when the copy reaches
        # the audit table, every table before it sent (the point chosen through the statement
        # the copy asks for; the kill is PostgreSQL's own).
        from authz_server.store import sqlite

        statement = sqlite.table_rows

        def kill_at_audit(table: str, columns: Any) -> str:
            if table == "audit":
                asyncio.run(_terminate_others(pg_cluster.url(), pg_database))
            return statement(table, columns)

        monkeypatch.setattr(sqlite, "table_rows", kill_at_audit)
        reasons = ["copying the table audit to the database", "the connection was lost"]
    elif where == "schema":
        # Another application's index under a name the migrations use: the schema is half made
        # when it clashes.
        asyncio.run(_execute(pg_database, "CREATE TABLE lamps (until BIGINT)"))
        asyncio.run(_execute(pg_database, "CREATE INDEX grants_until ON lamps (until)"))
        reasons = ["making the schema in the database", 'relation "grants_until" already exists']
    else:
        # A row PostgreSQL does not take (SQLite keeps a text in an integer column), in a table
        # copied after the others.
        con = sqlite3.connect(state / "as.db")
        con.execute("INSERT INTO deliveries VALUES ('phone-1', 'sensor-1/x', 1, 'soon')")
        con.commit()
        con.close()
        reasons = ["copying the table deliveries to the database", "a row holds a value"]
    before = asyncio.run(objects(pg_database))
    sqlite_before = sqlite_bytes(state)
    code, out, err = run("migrate", "--state", str(state), "--to", pg_database, capsys=capsys)
    assert (code, out) == (2, "") and ERROR_LINE.fullmatch(err), err
    assert all(reason in err for reason in reasons) and "soon" not in err
    assert asyncio.run(objects(pg_database)) == before  # rolled back whole: nothing of the AS
    assert not (state / "database.url").exists()
    assert sqlite_bytes(state) == sqlite_before
    code, out, _ = run("audit", "--verify", "--state", str(state), capsys=capsys)
    assert code == 0 and "chain intact" in out  # the state directory goes on, on SQLite


def test_a_writer_during_the_copy_makes_it_fail_empty(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from authz_server.store import migrate as module

    state = tmp_path / "state"
    asyncio.run(populate(state))
    real = module._read_source

    def read_then_write(reader: Any, source: Store) -> Any:
        copied = real(reader, source)  # the snapshot is taken: another process writes now
        con = sqlite3.connect(state / "as.db", timeout=10)
        con.execute("UPDATE meta SET value = value + 1 WHERE key = 'changes'")
        con.commit()
        con.close()
        return copied

    monkeypatch.setattr(module, "_read_source", read_then_write)
    with pytest.raises(module.StoreError, match="changed during the copy"):
        asyncio.run(module.migrate(state, pg_database))
    assert asyncio.run(objects(pg_database)) == []
    assert not (state / "database.url").exists()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root@127.0.0.1/as",
        "postgresql://u@127.0.0.1:5432",
        f"postgresql://u:{PASSWORD}@h:0x/a",
    ],
)
def test_a_bad_target_url_is_a_usage_error_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    state = tmp_path / "state"
    asyncio.run(populate(state))
    sqlite_before = sqlite_bytes(state)
    code, out, err = run("migrate", "--state", str(state), "--to", url, capsys=capsys)
    assert (code, out) == (2, "") and ERROR_LINE.fullmatch(err), err
    assert "--to: " in err and "URL" in err
    assert sqlite_bytes(state) == sqlite_before and not (state / "database.url").exists()


def test_tables_are_every_table_and_column_of_the_sqlite_schema() -> None:
    """A migration that adds a table or a column fails here until TABLES names it (migrate
    refuses such a source at run time too, and checks the target's columns)."""
    from authz_server.store import sqlite

    con = sqlite3.connect(":memory:")
    for script in sqlite.MIGRATIONS:
        for statement in sqlite.split_script(script):
            con.execute(statement)
    tables = [r[0] for r in con.execute(sqlite.SCHEMA_TABLES)]
    assert sorted(tables) == sorted((*TABLES, *EPHEMERAL))
    assert set(EPHEMERAL) < set(postgres.SCHEMA_OBJECTS)
    for table, columns in TABLES.items():
        assert tuple(r[0] for r in con.execute(sqlite.TABLE_COLUMNS, (table,))) == columns
    assert set(TABLES) < set(postgres.SCHEMA_OBJECTS)
    con.close()


# --- helpers -----------------------------------------------------------------------------------


def _sqlite_count(state: Path, table: str) -> int:
    con = sqlite3.connect(state / "as.db")
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
    finally:
        con.close()


async def count_rows(url: str, table: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(postgres.count_rows(table)))
    finally:
        await conn.close()


def _sqlite_counts(state: Path) -> dict[str, int]:
    con = sqlite3.connect(state / "as.db")
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # noqa: S608
    finally:
        con.close()


async def _execute(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _terminate_others(admin: str, url: str) -> None:
    """End every session on the database at ``url`` (``pg_terminate_backend``)."""
    conn = await asyncpg.connect(admin)
    try:
        ended = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
            url.rsplit("/", 1)[1],
        )
        assert ended >= 1
    finally:
        await conn.close()


async def _refused_login(url: str) -> None:
    """Wait until the server has read its new rules (the wrong password is refused)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = await asyncpg.connect(url)
        except asyncpg.InvalidPasswordError:
            return
        await conn.close()
        assert time.monotonic() < deadline, "the server did not take the new pg_hba.conf"
        await asyncio.sleep(0.05)
