"""Copying a state directory's SQLite database to PostgreSQL (``oscar-as migrate``), whole and
checked, and pointing the state directory at the copy.

:func:`migrate` in order:

1. a directory that records a database URL already is refused; the target is reached and must
   hold no AS: none of the tables or functions the migrations make, in the schema the AS would
   use (other objects of the database are left alone); else :class:`Conflict`, the target
   unchanged;
2. the source is the state directory's SQLite file, opened as every command opens it (the master
   key must open it; an older schema is migrated forward in place, a newer one refused before
   anything is written);
3. the source is read in one read transaction (a snapshot: what an AS or admin command commits
   meanwhile is not half in it): its tables and columns must be :data:`TABLES` (and the
   :data:`EPHEMERAL` ones, which are not copied), its audit chain
   must verify; then, in one PostgreSQL transaction, the schema is made at the current version
   (the migrations of :mod:`.postgres`, under their advisory lock), every row of every table is
   copied verbatim (``COPY``; ciphertexts stay sealed under the master key, which never enters
   the database), the grants' identity is set past the last id, and before ``COMMIT`` the row
   counts per table and the audit chain (same head, same summary) are checked on the target
   inside the transaction, and the source must not have changed since the snapshot (its change
   counter and audit head): anything wrong rolls it all back, leaving the target empty;
4. after the commit the copy is opened as a store (``Store.open``: the master key opens it) and
   checked again (counts, audit chain with the source's head, change counter);
5. only then ``DIR/database.url`` (0600) names the target, so every later command and ``serve``
   with ``--state DIR`` use it. The SQLite file is left as it is, a fallback copy.

Errors: :class:`~.schema.Conflict` for a target that holds an AS (or its names) or a directory
already on PostgreSQL; :class:`~.schema.StoreError` for everything else (a bad URL, a server
that cannot be reached or refuses the login, a source of a newer schema or a broken chain, a copy
that fails or does not verify). Messages name the database by :func:`~authz_server.store.redacted`
URL, never with its password, and hold no row's value.

What it does not do: copy from PostgreSQL to anything (or SQLite to SQLite), touch the source
(beyond the forward migration opening it does), or stop a running AS: stop it first; one that
writes during the copy makes the copy fail, empty (step 3). A write in the moment between the
last check and ``database.url`` would stay in the SQLite file only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from oscar_io.statefiles import atomic_write

from . import Store, check_database_url, postgres, recorded_database, redacted, sqlite
from .audit import walk_chain
from .backend import Params, Row, SnapshotReader
from .parts_schema import TABLES as PARTS_TABLES
from .postgres_backend import PostgresBackend
from .postgres_connections import DRIVER_ERRORS, MAINTENANCE_TIMEOUT, close_quietly, is_lost
from .schema import DATABASE_NAME, DB_NAME, Conflict, StoreError

__all__ = ["COPY_BATCH", "EPHEMERAL", "TABLES", "Migrated", "migrate"]

_T = TypeVar("_T")

#: Every table of the schema (version 7) and its columns, as SQLite has them; in the order a copy
#: fills them (parents before children). PostgreSQL's ``meta`` has the value in typed columns
#: (:func:`.postgres.meta_params`). A table or column the source has and this does not name,
#: or the reverse, stops a copy before anything is written.
TABLES: dict[str, tuple[str, ...]] = {
    "meta": ("key", "value"),
    "devices": ("id", "role", "psk", "status", "enrolled_at", "revoked_at"),
    "certificates": (
        *("serial", "device_id", "kid", "der"),
        *("not_before", "not_after", "issued_at", "revoked_at"),
    ),
    "resources": (
        *("id", "producer_id", "content_format", "profile"),
        *("max_age", "rotation_period", "registered_at"),
    ),
    "epochs": (
        *("resource_id", "epoch", "state", "secret", "created_at"),
        *("activated_at", "deactivated_at", "rotate_at"),
    ),
    "grants": ("id", "consumer_id", "pattern", "until", "granted_at", "revoked_at"),
    "exclusions": ("consumer_id", "resource_id", "from_epoch", "to_epoch", "created_at"),
    "deliveries": ("device_id", "resource_id", "epoch", "delivered_at"),
    "audit": ("seq", "at", "actor", "action", "subject", "result", "detail", "chain"),
    "audit_checkpoint": ("id", "seq", "chain", "at", "mac"),
    "admins": ("name", "token_hash", "created_at", "expires_at", "revoked_at"),
    **PARTS_TABLES,
}
#: Tables of the schema a copy leaves empty: the running instances' heartbeats (each instance
#: writes its row again on the new database; a copy is made with the AS stopped anyway).
EPHEMERAL = ("instances",)
_TARGET_META = ("key", "bytes", "text", "number")
#: Rows sent per ``COPY``.
COPY_BATCH = 5000


@dataclass(frozen=True)
class Migrated:
    """What was copied: rows per table (the same on both sides), the audit chain's head and the
    verification's summary (the same on both sides), the change counter."""

    rows: dict[str, int]
    head: tuple[int, bytes]
    audit: str
    changes: int

    @property
    def total(self) -> int:
        return sum(self.rows.values())


async def migrate(state_dir: Path, url: str) -> Migrated:
    """Copy the SQLite database of ``state_dir`` to the empty PostgreSQL database at ``url``,
    check the copy, and record ``url`` in the state directory (see the module docstring)."""
    check_database_url(url)
    if recorded_database(state_dir) is not None:
        raise Conflict(
            f"{state_dir} uses a PostgreSQL database already ({DATABASE_NAME}); migrate copies "
            f"a state directory's SQLite file ({DB_NAME})"
        )
    conn = await PostgresBackend.connect(url)  # StoreError naming the redacted URL
    try:
        with _translated(url, "reading", conn=conn):
            await _refuse_an_as(conn, url)  # at once, before the source is opened
        source = await Store.open(state_dir)  # no URL recorded: its SQLite file
        try:
            copied = await _copy(source, conn, url)
        finally:
            await source.close()
    finally:  # committed or rolled back already
        await close_quietly(conn)
    await _check_copy(state_dir, url, copied)
    atomic_write(state_dir / DATABASE_NAME, url.encode() + b"\n", 0o600)
    return copied


#: What the driver raises for a value it cannot encode in a column's type (a ``COPY`` row).
_VALUE_ERRORS = (TypeError, ValueError, OverflowError)


@contextlib.contextmanager
def _translated(
    url: str, doing: str, rows: bool = False, conn: asyncpg.Connection | None = None
) -> Iterator[None]:
    """The driver's errors (with ``rows``, a row's value it cannot encode too) as one
    :class:`StoreError` line: the server's or the connection's own message (they name objects,
    not values), never the text of a value the driver could not encode."""
    caught: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, *(_VALUE_ERRORS if rows else ()))
    try:
        yield
    except caught as exc:
        if isinstance(exc, _VALUE_ERRORS):  # asyncpg's own DataError too: it quotes the value
            detail = f"a row holds a value its column's type does not take ({type(exc).__name__})"
        elif isinstance(exc, asyncio.TimeoutError):
            detail = "timed out"
        elif is_lost(exc, conn):
            detail = f"the connection was lost ({type(exc).__name__})" + (
                "; the copy may or may not be committed: look before migrating again"
                if doing.startswith("committing")
                else "; nothing was committed"
            )
        else:  # the server's message, or the connection's state ("connection is closed")
            detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise StoreError(f"{doing} the database {redacted(url)} failed: {detail}") from None


async def _refuse_an_as(conn: asyncpg.Connection, url: str) -> None:
    """:class:`Conflict` unless the target holds none of the AS's tables and functions."""
    present = [r[0] for r in await conn.fetch(postgres.OBJECTS_PRESENT, postgres.SCHEMA_OBJECTS)]
    if not present:
        return
    where = f"the database {redacted(url)}"
    if "schema_version" in present:
        version = await conn.fetchval(postgres.USER_VERSION)
        if version:
            known = "" if version == postgres.SCHEMA_VERSION else (
                f"; this program's is {postgres.SCHEMA_VERSION}"
            )  # fmt: skip
            raise Conflict(
                f"{where} holds an AS already (schema {version}{known}); migrate copies into "
                "a database without one"
            )
    raise Conflict(
        f"{where} holds {', '.join(present)} already; migrate copies into a database without "
        "the AS's tables and functions"
    )


async def _copy(source: Store, conn: asyncpg.Connection, url: str) -> Migrated:
    """Step 3 of the module docstring: one snapshot of the source, one transaction on the
    target, committed only if every check holds."""
    loop = asyncio.get_running_loop()

    def on_loop(work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` on the event loop (which awaits the snapshot's thread) and wait."""
        return asyncio.run_coroutine_threadsafe(work, loop).result()

    async def begin() -> None:
        await conn.execute(postgres.BEGIN)
        await conn.execute(postgres.MIGRATION_LOCK)  # as init takes it: one of them wins
        await _refuse_an_as(conn, url)
        await PostgresBackend.migrate_locked(conn, url)
        for table, columns in TABLES.items():
            found = tuple(r[0] for r in await conn.fetch(postgres.TABLE_COLUMNS, table))
            if found != (_TARGET_META if table == "meta" else columns):
                raise StoreError(f"the new schema's table {table} is not the one migrate knows")

    def read(reader: SnapshotReader) -> Migrated:
        """In the snapshot's thread: check the source, then send every row (batches)."""
        copied = _read_source(reader, source)
        with _translated(url, "making the schema in", conn=conn):
            on_loop(begin())
        for table, columns in TABLES.items():
            sent = 0
            target = _TARGET_META if table == "meta" else columns
            for rows in reader.batches(sqlite.table_rows(table, columns), (), COPY_BATCH):
                if table == "meta":
                    rows = [_meta_row(row) for row in rows]
                with _translated(url, f"copying the table {table} to", rows=True, conn=conn):
                    on_loop(
                        conn.copy_records_to_table(
                            table, records=rows, columns=target, timeout=MAINTENANCE_TIMEOUT
                        )
                    )
                sent += len(rows)
            if sent != copied.rows[table]:
                raise StoreError(f"the table {table} changed while it was read")
        return copied

    try:
        copied = await source.db.snapshot(read)
        with _translated(url, "checking the copy in", conn=conn):
            await conn.execute(postgres.GRANT_IDS_SET)
            for table, count in copied.rows.items():
                found = await conn.fetchval(postgres.count_rows(table))
                if found != count:
                    raise StoreError(f"the copy of {table} has {found} rows, the source {count}")
            intact, summary = await asyncio.to_thread(
                walk_chain, _InTransaction(conn, on_loop), postgres, source.envelope, copied.head
            )
            if not intact or summary != copied.audit:
                raise StoreError(f"the copy's audit chain does not verify: {summary}")
        if await source.changes() != copied.changes or await source.audit_head() != copied.head:
            raise StoreError(
                "the SQLite database changed during the copy (an AS or an admin command wrote "
                "to it): stop them and migrate again"
            )
        with _translated(url, "committing the copy to", conn=conn):
            await conn.execute(postgres.COMMIT)
    except BaseException:
        if not conn.is_closed() and conn.is_in_transaction():
            with contextlib.suppress(*DRIVER_ERRORS):
                await conn.execute(postgres.ROLLBACK)
        raise
    return copied


def _read_source(reader: SnapshotReader, source: Store) -> Migrated:
    """The source's schema checked against :data:`TABLES`, its rows counted and its audit chain
    verified, in the snapshot."""
    version = reader.one(sqlite.USER_VERSION)[0]
    if version != sqlite.SCHEMA_VERSION:  # opening migrated it: only a newer program's writes
        raise StoreError(f"the SQLite database has schema {version}, not {sqlite.SCHEMA_VERSION}")
    tables = [r[0] for rows in reader.batches(sqlite.SCHEMA_TABLES, (), 100) for r in rows]
    tables = [table for table in tables if table not in EPHEMERAL]
    if sorted(tables) != sorted(TABLES):
        extra = sorted(set(tables) ^ set(TABLES))
        raise StoreError(f"the SQLite database's tables differ from the schema's: {extra}")
    for table, columns in TABLES.items():
        found = tuple(r[0] for rows in reader.batches(sqlite.TABLE_COLUMNS, (table,), 100)
                      for r in rows)  # fmt: skip
        if found != columns:
            raise StoreError(f"the SQLite table {table} has the columns {found}, not {columns}")
    rows = {table: int(reader.one(sqlite.count_rows(table))[0]) for table in TABLES}
    intact, summary = walk_chain(reader, sqlite, source.envelope, None)
    if not intact:
        raise StoreError(f"the SQLite database's audit chain is broken: {summary}; not copied")
    last = reader.one(sqlite.LAST_RECORD)
    head = (0, b"") if last is None else (int(last[0]), bytes(last[1]))
    changes = reader.one(sqlite.CHANGES)
    return Migrated(rows, head, summary, int(changes[0]) if changes else 0)


def _meta_row(row: Row) -> tuple[Any, ...]:
    key, value = row
    try:
        return postgres.meta_params(key, value)
    except TypeError:
        raise StoreError(f"the meta row {key!r} holds a {type(value).__name__}") from None


class _InTransaction:
    """:class:`.backend.SnapshotReader` over the target's open transaction, for the audit
    verification in a worker thread (each call runs on the event loop)."""

    def __init__(
        self, conn: asyncpg.Connection, on_loop: Callable[[Coroutine[Any, Any, Any]], Any]
    ) -> None:
        self._conn = conn
        self._on_loop = on_loop

    def one(self, sql: str, params: Params = ()) -> Row:
        row = self._on_loop(self._conn.fetchrow(sql, *_positional(params)))
        return None if row is None else tuple(row)

    def batches(self, sql: str, params: Params, size: int) -> Iterator[list[Row]]:
        async def cursor() -> Any:
            return await self._conn.cursor(sql, *_positional(params))

        opened = self._on_loop(cursor())
        while rows := self._on_loop(opened.fetch(size)):
            yield [tuple(row) for row in rows]


def _positional(params: Params) -> Sequence[Any]:
    if not isinstance(params, Sequence):
        raise TypeError("positional parameters only")
    return params


async def _check_copy(state_dir: Path, url: str, copied: Migrated) -> None:
    """Step 4: the committed copy, opened as every command will open it, answers as the source."""
    store = await Store.open(state_dir, database=url)
    try:
        problems = []
        for table, count in copied.rows.items():
            found = (await store.db.one(store.db.sql.count_rows(table)))[0]
            if found != count:
                problems.append(f"{table} has {found} rows, the source {count}")
        intact, summary = await store.verify_audit(copied.head if copied.head[0] else None)
        if not intact or summary != copied.audit:
            problems.append(f"the audit chain: {summary}")
        if await store.changes() != copied.changes:
            problems.append("the change counter differs")
    finally:
        await store.close()
    if problems:
        raise StoreError(
            f"the copy in {redacted(url)} does not answer as the source ({'; '.join(problems)}); "
            f"{DATABASE_NAME} not written: {state_dir} still uses its SQLite file"
        )
