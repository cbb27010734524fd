"""The PostgreSQL backend of the AS store (:class:`.backend.Backend`), over asyncpg: its
migrations and transactions, over the connections of :mod:`.postgres_connections` (which also
translates asyncpg's and PostgreSQL's errors into the store's :class:`~.schema.DatabaseError`;
a database that cannot be reached or is not usable at open is a :class:`~.schema.StoreError`).

The same shape as :mod:`.sqlite_backend`, so that the store behaves the same on both:

- one writer connection for transactions and for the reads of :meth:`PostgresBackend.one` and
  :meth:`PostgresBackend.all`, behind an asyncio lock (a read waits for another task's
  transaction to end; inside its own it sees its writes);
- every write transaction takes one advisory lock first (:data:`.postgres.WRITE_LOCK`), so the
  writers of every process on the database (the server, the admin CLI) are serialized as SQLite's
  ``BEGIN IMMEDIATE`` serializes them;
- a small pool of reader connections for the point reads of the request path
  (:meth:`PostgresBackend.lookup`): each statement sees every committed transaction and none half
  done (READ COMMITTED, autocommit) and never waits for a writer (MVCC);
- the audit verification (:meth:`PostgresBackend.snapshot`) runs in a worker thread on its own
  connection and event loop, in one ``REPEATABLE READ READ ONLY`` transaction, a cursor's batch
  at a time;
- what a destruction freed (:meth:`PostgresBackend.erase_freed`): PostgreSQL has no
  ``secure_delete``; the statements overwrite the secret with zeros before clearing it, and a
  ``VACUUM`` of the tables that held it prunes the dead row versions (their space made reusable,
  not zeroed). Old versions may remain in free space of a page, in the WAL until it is recycled,
  and in base backups and standbys: only ciphertext under the master key, which never enters the
  database (docs/DECISIONS.md).

A lost connection (the server stopped, restarting, the network cut) fails the call with
:class:`~.schema.DatabaseUnavailable`; so does a server that went silent (its host gone, a network
partition, the server process stopped): a statement that gets no answer within the command
timeout (:data:`COMMAND_TIMEOUT`, 5 s; ``?command_timeout=SECONDS`` in the URL sets another) is
taken for a lost connection. The wait for the write lock, which the server itself bounds
(``lock_timeout``), gets a little more than that bound; migrations and ``VACUUM`` get
:data:`MAINTENANCE_TIMEOUT`. In every case the connection is dropped and a later call connects
again, no sooner than a backoff (0.1 s doubling to 5 s) after the last failed attempt, so that a
server that is down costs one refused connect per backoff, not one per request. (TCP keepalives
would only notice a dead idle connection sooner; asyncpg has no option for them, and a
connection is only waited on while a statement runs, which the command timeout bounds.)
A transaction the loss interrupts never committed, so PostgreSQL rolled it back, and it is
reported as failed (a loss during ``COMMIT`` itself is reported as failed too, though the server
may have committed it: what the AS writes is idempotent or re-read inside its next transaction).
A transaction never reconnects midway: only a call that begins afresh does.

The reader connections are made on first use, not when the store opens: the admin CLI, which
reads through the writer, holds one connection, not five.

Every SQL text it runs is in :mod:`.postgres`. What it does not do: know a table (the components
do), or hold a key (the envelope does).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar, cast

import asyncpg

from . import postgres, redacted
from .backend import Params, Row, SnapshotReader, Transaction
from .postgres_connections import (
    DRIVER_ERRORS,
    MAINTENANCE_TIMEOUT,
    READERS,
    Backoff,
    Coalescer,
    Readers,
    close_quietly,
    connect,
    error_of,
    lock_wait,
    translated,
)
from .schema import DatabaseError, DatabaseUnavailable, StoreError

__all__ = ["PostgresBackend"]

_T = TypeVar("_T")

_ROWS = re.compile(r"(\d+)$")


def _bind(sql: str, params: Params) -> tuple[str, Sequence[Any]]:
    """The statement as asyncpg takes it (a plain str) and its positional arguments (a mapping
    bound in a :class:`.postgres.Named` statement's order)."""
    if type(sql) is str:
        if isinstance(params, Mapping):
            raise ValueError("named parameters for a statement without names")
        return sql, params
    names = getattr(sql, "names", ())
    args = [params[name] for name in names] if isinstance(params, Mapping) else params
    return str.__str__(sql), args


def _args(sql: str, params: Params) -> list[Any]:
    """The statement and its arguments, as one list to call asyncpg with."""
    text, args = _bind(sql, params)
    return [text, *args]


def _rows_changed(status: str) -> int:
    found = _ROWS.search(status or "")
    return int(found.group(1)) if found else -1


class _Snapshot:
    """:class:`.backend.SnapshotReader` over one connection, on the worker thread's own loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: asyncpg.Connection) -> None:
        self._loop = loop
        self._conn = conn

    def one(self, sql: str, params: Params = ()) -> Row:
        with translated():
            row = self._loop.run_until_complete(self._conn.fetchrow(*_args(sql, params)))
        return None if row is None else tuple(row)

    def batches(self, sql: str, params: Params, size: int) -> Iterator[list[Row]]:
        with translated():
            cursor = self._loop.run_until_complete(self._conn.cursor(*_args(sql, params)))
        while True:
            with translated():
                rows = self._loop.run_until_complete(cursor.fetch(size))
            if not rows:
                return
            yield [tuple(row) for row in rows]


class PostgresBackend:
    """The AS database on a PostgreSQL server. Made by :meth:`create` or :meth:`open`."""

    sql: ModuleType = postgres

    def __init__(self, url: str, conn: asyncpg.Connection, readers: Readers | None) -> None:
        self.url = url
        self._conn: asyncpg.Connection | None = conn
        self._readers = readers
        self._coalescer = None if readers is None else Coalescer(readers)
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._closed = False
        self._backoff = readers._backoff if readers is not None else Backoff()
        self.lock_wait = lock_wait(url)

    def __repr__(self) -> str:
        return f"PostgresBackend({redacted(self.url)!r})"

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    async def create(cls, url: str, first: Sequence[tuple[str, Any]]) -> PostgresBackend:
        """Make the schema in an empty database and the ``meta`` rows ``first`` (key, value), in
        one commit; :class:`~.schema.Conflict` if the database holds an AS already."""
        from .schema import Conflict

        conn = await cls.connect(url)
        try:
            with translated():
                async with conn.transaction():
                    await conn.execute(postgres.MIGRATION_LOCK, timeout=lock_wait(url))
                    if await cls._version(conn) != 0:
                        raise Conflict(f"the database {redacted(url)} holds an AS already")
                    await cls.migrate_locked(conn, url)
                    await conn.executemany(
                        postgres.META_INSERT, [postgres.meta_params(k, v) for k, v in first]
                    )
            return cls(url, conn, Readers(url, READERS, Backoff()))
        except BaseException:
            await conn.close()
            raise

    @classmethod
    async def open(cls, url: str) -> PostgresBackend:
        """Connect to an existing AS database, migrated forward; :class:`StoreError` if it
        cannot be reached or is not an AS database of a version this program knows."""
        conn = await cls.connect(url)
        try:
            with translated():
                async with conn.transaction():
                    await conn.execute(postgres.MIGRATION_LOCK, timeout=lock_wait(url))
                    if await cls._version(conn) == 0:
                        raise StoreError(
                            f"no AS database at {redacted(url)}; run 'oscar-as init' with it"
                        )
                    await cls.migrate_locked(conn, url)
            return cls(url, conn, Readers(url, READERS, Backoff()))
        except DatabaseError as exc:
            await conn.close()
            detail = str(exc).removeprefix("database error: ")
            raise StoreError(f"the database {redacted(url)} is unusable: {detail}") from None
        except BaseException:
            await conn.close()
            raise

    @staticmethod
    async def connect(url: str) -> asyncpg.Connection:
        """A connection of its own to ``url``, with the backend's timeouts; :class:`StoreError`
        naming the redacted URL (also for :mod:`.migrate`)."""
        try:
            return await connect(url)
        except (*DRIVER_ERRORS, ValueError) as exc:
            raise StoreError(f"cannot connect to the database {redacted(url)}: {exc}") from None

    @staticmethod
    async def _version(conn: asyncpg.Connection) -> int:
        """The schema version (0: no AS schema), inside the migration lock's transaction."""
        await conn.execute(postgres.SCHEMA_TABLE)
        version = await conn.fetchval(postgres.USER_VERSION)
        if version is None:
            await conn.execute(postgres.SCHEMA_VERSION_FIRST)
            return 0
        return int(version)

    @classmethod
    async def migrate_locked(cls, conn: asyncpg.Connection, url: str) -> None:
        """Every migration from the database's version on, inside the caller's transaction,
        which holds the migration lock: all of them or none."""
        version = await cls._version(conn)
        if version > postgres.SCHEMA_VERSION:
            raise StoreError(
                f"the database {redacted(url)} has schema {version}, newer than this "
                f"program's {postgres.SCHEMA_VERSION}"
            )
        for number in range(version, postgres.SCHEMA_VERSION):
            for statement in postgres.split_script(postgres.MIGRATIONS[number]):
                await conn.execute(statement, timeout=MAINTENANCE_TIMEOUT)
            await conn.execute(postgres.SCHEMA_VERSION_SET, number + 1)

    async def close(self) -> None:
        self._closed = True
        if self._coalescer is not None:
            coalescer, self._coalescer = self._coalescer, None
            await coalescer.close()
        if self._readers is not None:
            readers, self._readers = self._readers, None
            await readers.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await close_quietly(conn)

    @property
    def closed(self) -> bool:
        return self._closed

    def _writer(self) -> asyncpg.Connection:
        """The writer connection as it is (inside a transaction: never a new one, which would
        run the rest of the transaction's statements outside it)."""
        if self._closed:
            raise DatabaseError("database error: the store is closed")
        if self._conn is None:
            raise DatabaseUnavailable("database unavailable: the connection was lost")
        return self._conn

    async def _fresh_writer(self) -> asyncpg.Connection:
        """The writer connection at the start of a call (under the lock, outside a
        transaction): connected again if it was lost, no sooner than the backoff allows."""
        if self._closed:
            raise DatabaseError("database error: the store is closed")
        conn = self._conn
        if conn is not None and conn.is_closed():
            self._lose(conn)
            conn = None
        if conn is None:
            conn = self._conn = await self._backoff.connect(self.url)
        return conn

    def _lose(self, conn: asyncpg.Connection) -> None:
        """Drop the writer connection (lost, or in a state nobody can know after a timeout)."""
        if self._conn is conn:
            self._conn = None
        conn.terminate()

    @contextlib.contextmanager
    def _on_writer(self, conn: asyncpg.Connection) -> Iterator[None]:
        """:func:`translated` on the writer: a lost writer is dropped, to connect again."""
        try:
            yield
        except DRIVER_ERRORS as exc:
            error = error_of(exc, conn)
            if isinstance(error, DatabaseUnavailable):
                self._lose(conn)
            raise error from None

    # --- transactions ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self, *, count: bool = True) -> AsyncIterator[Transaction]:
        """One whole transaction (``BEGIN``, the write lock, … ``COMMIT``; ``ROLLBACK`` on any
        error); it bumps the change counter unless ``count`` (or ``tx.count``) is false."""
        tx = Transaction(count)
        async with self._lock:
            self._owner = asyncio.current_task()
            try:
                conn = await self._fresh_writer()
                with self._on_writer(conn):
                    await conn.execute(postgres.BEGIN)
                try:
                    with self._on_writer(conn):
                        await conn.execute(postgres.WRITE_LOCK, timeout=self.lock_wait)
                    yield tx
                    with self._on_writer(conn):
                        if tx.count:
                            await conn.execute(postgres.COUNT_CHANGE)
                        await conn.execute(postgres.COMMIT)
                except BaseException:
                    with contextlib.suppress(*DRIVER_ERRORS):
                        if self._conn is conn and not self._conn.is_closed():
                            await self._conn.execute(postgres.ROLLBACK)
                    raise
            finally:
                self._owner = None

    def _in_own_transaction(self) -> bool:
        return self._owner is not None and self._owner is asyncio.current_task()

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[asyncpg.Connection]:
        """The writer connection for a read: the transaction's own, or (once no other task's
        transaction runs) the writer, connected again if it was lost."""
        if self._in_own_transaction():
            yield self._writer()
            return
        async with self._lock:
            yield await self._fresh_writer()

    async def erase_freed(self) -> None:
        """VACUUM the tables whose secrets a destruction or revocation overwrote: their dead row
        versions pruned (see the module docstring for what PostgreSQL does not offer)."""
        async with self._lock:
            conn = await self._fresh_writer()
            with self._on_writer(conn):
                for statement in postgres.ERASE_FREED:
                    await conn.execute(statement, timeout=MAINTENANCE_TIMEOUT)

    # --- statements ------------------------------------------------------------------------------

    async def one(self, sql: str, params: Params = ()) -> Row:
        async with self._read() as conn:
            with self._on_writer(conn):
                row = await conn.fetchrow(*_args(sql, params))
        return None if row is None else tuple(row)

    async def all(self, sql: str, params: Params = ()) -> list[Row]:
        async with self._read() as conn:
            with self._on_writer(conn):
                rows = await conn.fetch(*_args(sql, params))
        return [tuple(row) for row in rows]

    async def lookup(self, sql: str, params: Params = ()) -> Row:
        """One row by key from a reader connection: committed state, no waiting for writers.
        Inside the task's own transaction (which readers cannot see), as :meth:`one`. The
        statements :data:`.postgres.COALESCED` names are read together with the same kind's
        reads of other tasks (:class:`.postgres_connections.Coalescer`)."""
        readers = self._readers
        if readers is None or self._in_own_transaction():
            return await self.one(sql, params)
        coalesced = postgres.COALESCED.get(sql)
        if coalesced is not None and self._coalescer is not None and isinstance(params, Mapping):
            batch, names = coalesced
            return cast(Row, await self._coalescer.fetchrow(batch, [params[n] for n in names]))
        row = await readers.fetchrow(*_args(sql, params))
        return None if row is None else tuple(row)

    async def execute(self, sql: str, params: Params = ()) -> int:
        conn = self._writer()
        with self._on_writer(conn):
            return _rows_changed(await conn.execute(*_args(sql, params)))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        conn = self._writer()
        with self._on_writer(conn):
            await conn.executemany(sql, list(rows))

    async def returning(self, sql: str, params: Params = ()) -> list[Row]:
        conn = self._writer()
        with self._on_writer(conn):
            rows = await conn.fetch(*_args(sql, params))
        return [tuple(row) for row in rows]

    async def snapshot(self, read: Callable[[SnapshotReader], _T]) -> _T:
        return await asyncio.to_thread(self._snapshot, read)

    def _snapshot(self, read: Callable[[SnapshotReader], _T]) -> _T:
        loop = asyncio.new_event_loop()
        try:
            with translated():
                conn = loop.run_until_complete(connect(self.url))
            try:
                with translated():
                    loop.run_until_complete(conn.execute(postgres.BEGIN_READ))
                try:
                    return read(_Snapshot(loop, conn))
                finally:
                    with translated():
                        loop.run_until_complete(conn.execute(postgres.COMMIT))
            finally:
                loop.run_until_complete(conn.close())
        finally:
            loop.close()
