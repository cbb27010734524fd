"""The SQLite backend of the AS store (:class:`.backend.Backend`): one file in WAL mode, its
connections, migrations and transactions; the one place where sqlite3 and aiosqlite errors are
translated into the store's (:class:`~.schema.DatabaseError`, or :class:`~.schema.StoreError`
for a file that cannot be opened).

Two connections: the writer (aiosqlite: every statement is a hop to its worker thread and back,
about 0.1 to 0.4 ms of the event loop's time each) for transactions and scans, and a read-only
one used on the event loop's thread for the point reads of the request path
(:meth:`SqliteBackend.lookup`: a device, a secret view; 10 to 20 microseconds each). Both see only
committed transactions, so neither caches anything: what the admin CLI commits is seen by the
next read.

Every SQL text it runs is in :mod:`.sqlite`. What it does not do: know a table (the components
do), or hold a key (the envelope does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import aiosqlite

from . import sqlite
from .backend import Params, Row, SnapshotReader, Transaction
from .schema import Conflict, DatabaseError, StoreError

__all__ = ["SqliteBackend"]

_T = TypeVar("_T")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """sqlite3's errors (aiosqlite raises the same) as :class:`DatabaseError`."""
    try:
        yield
    except sqlite3.Error as exc:
        raise DatabaseError(f"database error: {exc}") from None


def _bound(params: Params) -> Any:
    return params if isinstance(params, Mapping) else tuple(params)


class _Snapshot:
    """:class:`.backend.SnapshotReader` over one sqlite3 connection."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con

    def one(self, sql: str, params: Params = ()) -> Row:
        return self._con.execute(sql, _bound(params)).fetchone()

    def batches(self, sql: str, params: Params, size: int) -> Iterator[list[Row]]:
        cursor = self._con.execute(sql, _bound(params))
        while rows := cursor.fetchmany(size):
            yield rows


class SqliteBackend:
    """The AS database file. Made by :meth:`create` or :meth:`open`."""

    sql: ModuleType = sqlite

    def __init__(
        self, path: Path, conn: aiosqlite.Connection, reader: sqlite3.Connection | None = None
    ) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = conn
        # One connection serves every coroutine of the process, and SQLite transactions do not
        # nest: the lock keeps each transaction whole, and readers out of it while it runs.
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        # A second, read-only connection for the point reads of the request path (see lookup).
        self._reader = reader

    def __repr__(self) -> str:
        return f"SqliteBackend({self.path.name!r})"

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    async def create(cls, path: Path, first: Sequence[tuple[str, Any]]) -> SqliteBackend:
        """Make the database file (which must not exist), its schema and the ``meta`` rows
        ``first`` (key, value), in one commit."""
        try:  # 0600 whatever the umask (SQLite gives -wal and -shm the same mode); no link
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            raise Conflict(f"{path} exists already") from None
        conn = await cls._connect(path)
        try:
            with _translated():
                await cls._migrate(conn)
                for key, value in first:
                    await conn.execute(sqlite.META_INSERT, (key, value))
                await conn.commit()
            return cls(path, conn, _connect_reader(path))
        except BaseException:
            await conn.close()
            raise

    @classmethod
    async def open(cls, path: Path) -> SqliteBackend:
        """Open an existing database file, migrated forward; :class:`StoreError` if unusable."""
        conn = await cls._connect(path)
        try:
            await cls._migrate(conn)
            return cls(path, conn, _connect_reader(path))
        except sqlite3.DatabaseError as exc:
            await conn.close()
            raise StoreError(f"the database {path} is unusable: {exc}") from None
        except BaseException:
            await conn.close()
            raise

    @staticmethod
    async def _connect(path: Path) -> aiosqlite.Connection:
        conn = None
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
            for pragma in sqlite.CONNECTION_PRAGMAS:
                await conn.execute(pragma)
            for name, arity, function in sqlite.FUNCTIONS:
                await conn.create_function(name, arity, function, deterministic=True)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                await conn.close()  # its worker thread would keep the process alive
            raise StoreError(f"the database {path} is unusable: {exc}") from None
        return conn

    @staticmethod
    async def _migrate(conn: aiosqlite.Connection) -> None:
        version = (await (await conn.execute(sqlite.USER_VERSION)).fetchone() or (0,))[0]
        if version > sqlite.SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema {version}, newer than this program's "
                f"{sqlite.SCHEMA_VERSION}"
            )
        for number in range(version, sqlite.SCHEMA_VERSION):
            await conn.execute(sqlite.BEGIN)
            try:
                for statement in sqlite.split_script(sqlite.MIGRATIONS[number]):
                    await conn.execute(statement)
                await conn.execute(sqlite.set_user_version(number + 1))
                await conn.execute(sqlite.COMMIT)
            except BaseException:
                await conn.execute(sqlite.ROLLBACK)
                raise

    async def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _writer(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise DatabaseError("database error: the store is closed")
        return self._conn

    # --- transactions ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self, *, count: bool = True) -> AsyncIterator[Transaction]:
        """One whole transaction (``BEGIN IMMEDIATE`` … ``COMMIT``; ``ROLLBACK`` on any error).

        It bumps the change counter unless ``count`` (or the yielded ``tx.count``) is false. The
        lock keeps other coroutines out until it ends, their reads included (see :meth:`_read`).
        """
        tx = Transaction(count)
        async with self._lock:
            self._owner = asyncio.current_task()
            try:
                conn = self._writer()
                with _translated():
                    await conn.execute(sqlite.BEGIN)
                try:
                    yield tx
                    with _translated():
                        if tx.count:
                            await conn.execute(sqlite.COUNT_CHANGE)
                        await conn.execute(sqlite.COMMIT)
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await conn.execute(sqlite.ROLLBACK)
                    raise
            finally:
                self._owner = None

    def _in_own_transaction(self) -> bool:
        return self._owner is not None and self._owner is asyncio.current_task()

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[None]:
        """Wait for another task's transaction to end, so no read sees it half done; inside the
        reader's own transaction, go ahead."""
        if self._in_own_transaction():
            yield
            return
        async with self._lock:
            yield

    async def erase_freed(self) -> None:
        """Fold the WAL into the database and truncate it, so that the old versions of pages a
        destruction or revocation overwrote do not linger in ``as.db-wal``."""
        async with self._lock:
            with _translated():
                await self._writer().execute(sqlite.ERASE_FREED)

    # --- statements ------------------------------------------------------------------------------

    async def one(self, sql: str, params: Params = ()) -> Row:
        async with self._read():
            with _translated():
                return await (await self._writer().execute(sql, _bound(params))).fetchone()

    async def all(self, sql: str, params: Params = ()) -> list[Row]:
        async with self._read():
            with _translated():
                rows = await (await self._writer().execute(sql, _bound(params))).fetchall()
            return list(rows)

    async def lookup(self, sql: str, params: Params = ()) -> Row:
        """One row, read at once on the calling (event loop) thread through the read-only
        connection: for the point reads of the request path (a device, a secret view), where
        :meth:`one`'s two hops to the worker thread and back cost more than the query.

        The statement runs in a read transaction of its own (autocommit, cursor closed at once),
        so it sees every transaction committed before it, by this process or the admin CLI, and
        none half done; a WAL reader waits for no writer. Inside the task's own transaction (which
        the reader cannot see), or if the reader is busy (a WAL recovery, say), it reads as
        :meth:`one` does. Only for reads by key: a scan here would stall the event loop.
        """
        reader = self._reader
        if reader is None or self._in_own_transaction():
            return await self.one(sql, params)
        try:
            cursor = reader.execute(sql, _bound(params))
            try:
                return cursor.fetchone()
            finally:
                cursor.close()  # ends the statement, and with it the read transaction
        except sqlite3.OperationalError:
            return await self.one(sql, params)
        except sqlite3.Error as exc:
            raise DatabaseError(f"database error: {exc}") from None

    async def execute(self, sql: str, params: Params = ()) -> int:
        with _translated():
            cursor = await self._writer().execute(sql, _bound(params))
            return int(cursor.rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with _translated():
            await self._writer().executemany(sql, rows)

    async def returning(self, sql: str, params: Params = ()) -> list[Row]:
        with _translated():
            cursor = await self._writer().execute(sql, _bound(params))
            rows = list(await cursor.fetchall())
            await cursor.close()
            return rows

    async def snapshot(self, read: Callable[[SnapshotReader], _T]) -> _T:
        return await asyncio.to_thread(self._snapshot, read)

    def _snapshot(self, read: Callable[[SnapshotReader], _T]) -> _T:
        with _translated():
            con = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
            )
            try:
                for pragma in sqlite.SNAPSHOT_PRAGMAS:
                    con.execute(pragma)
                con.execute(sqlite.BEGIN_READ)  # one read transaction: what it reads agrees
                try:
                    return read(_Snapshot(con))
                finally:
                    con.execute(sqlite.COMMIT)
            finally:
                con.close()


def _connect_reader(path: Path) -> sqlite3.Connection | None:
    """The read-only connection of :meth:`SqliteBackend.lookup`, or None if it cannot be had
    (then every read takes the worker thread). Opened after the writer, which made the WAL
    files."""
    try:
        reader = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,  # autocommit: no statement leaves a read transaction open
            check_same_thread=False,  # used from the event loop's thread, opened wherever
        )
    except sqlite3.Error:
        return None
    try:
        for pragma in sqlite.READER_PRAGMAS:
            reader.execute(pragma)
        for name, arity, function in sqlite.FUNCTIONS:
            reader.create_function(name, arity, function, deterministic=True)
    except sqlite3.Error:
        reader.close()
        return None
    return reader
