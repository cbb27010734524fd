"""The connections, migrations, transactions and metadata of the AS database.

:class:`Database` is the base of :class:`authz_server.store.Store`: it opens the file (WAL,
``synchronous=FULL``, ``secure_delete``), migrates the schema forward, runs each transaction whole
under a lock. The audit chain is in :mod:`.audit`; record-specific queries live in the
subclasses.

Two connections: the writer (aiosqlite: every statement is a hop to its worker thread and back,
about 0.1 to 0.4 ms of the event loop's time each) for transactions and scans, and a read-only
one used on the event loop's thread for the point reads of the request path
(:meth:`Database._lookup`: a device, a secret view; 10 to 20 microseconds each). Both see only
committed transactions, so neither caches anything: what the admin CLI commits is seen by the
next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from oscar.keys import ACCESS_SECRET_LENGTH
from oscar_io.errors import StateError
from oscar_io.statefiles import private_dir

from ..envelope import Envelope, MasterKeyError, VaultError, read_master_key
from .schema import (
    CA_KEY_CONTEXT,
    DB_NAME,
    MASTER_KEY_NAME,
    MIGRATIONS,
    SCHEMA_VERSION,
    Conflict,
    StoreError,
    split_script,
)

__all__ = ["Database", "json_list"]

_D = TypeVar("_D", bound="Database")


class _Transaction:
    """What a transaction's body may still decide: whether it counts as a change."""

    __slots__ = ("count",)

    def __init__(self, count: bool) -> None:
        self.count = count


class Database:
    """The AS database file. Open with :meth:`open`; every method is a short transaction."""

    def __init__(
        self, db: aiosqlite.Connection, vault: Envelope, reader: sqlite3.Connection | None = None
    ) -> None:
        self._db = db
        self._vault = vault
        # One connection serves every coroutine of the process, and SQLite transactions do not
        # nest: the lock keeps each transaction whole, and readers out of it while it runs.
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        # A second, read-only connection for the point reads of the request path (see _lookup).
        self._reader = reader

    @staticmethod
    def _new_secret() -> bytes:
        """A fresh access secret: 32 bytes from the operating system's CSPRNG."""
        return os.urandom(ACCESS_SECRET_LENGTH)

    def __repr__(self) -> str:
        return "Store(<open>)"

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    async def create(cls: type[_D], state_dir: Path, master_key: bytes) -> _D:
        """Make the database of a new state directory (which must not hold one)."""
        path = state_dir / DB_NAME
        try:  # 0600 whatever the umask (SQLite gives -wal and -shm the same mode); no link
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            raise Conflict(f"{path} exists already") from None
        db = await cls._connect(path)
        try:
            await cls._migrate(db)
            wrapped = Envelope.new_wrapped_data_key(master_key)
            await db.execute("INSERT INTO meta VALUES ('data_key', ?)", (wrapped,))
            await db.execute("INSERT INTO meta VALUES ('changes', 0)")
            await db.commit()
            return cls(db, Envelope(master_key, wrapped), _connect_reader(path))
        except BaseException:
            await db.close()
            raise

    @classmethod
    async def open(cls: type[_D], state_dir: Path) -> _D:
        """Open an existing state directory; :class:`StoreError` saying what is wrong otherwise."""
        if os.path.lexists(state_dir):  # refused unless private (client.private_dir)
            try:
                private_dir(state_dir, create=False)
            except StateError as exc:
                raise StoreError(str(exc)) from None
        path = state_dir / DB_NAME
        if not path.is_file():
            raise StoreError(f"no AS database at {path}; run 'oscar-as init --state {state_dir}'")
        try:
            master_key = read_master_key(state_dir / MASTER_KEY_NAME)
        except MasterKeyError as exc:
            raise StoreError(str(exc)) from None
        db = await cls._connect(path)
        try:
            await cls._migrate(db)
            row = await (await db.execute("SELECT value FROM meta WHERE key='data_key'")).fetchone()
            if row is None:
                raise StoreError("the database has no data key: it is not an AS database")
            try:
                vault = Envelope(master_key, bytes(row[0]))
            except VaultError:
                raise StoreError("the master key does not open this database") from None
            return cls(db, vault, _connect_reader(path))
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise StoreError(f"the database {path} is unusable: {exc}") from None
        except BaseException:
            await db.close()
            raise

    @staticmethod
    async def _connect(path: Path) -> aiosqlite.Connection:
        db = None
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA secure_delete=ON")
            await db.execute("PRAGMA busy_timeout=10000")
            await db.execute("PRAGMA journal_size_limit=0")
            # Grant patterns match in SQL exactly as in Python (fnmatch, case-sensitive).
            await db.create_function("oscar_match", 2, _match, deterministic=True)
        except sqlite3.DatabaseError as exc:
            if db is not None:
                await db.close()  # its worker thread would keep the process alive
            raise StoreError(f"the database {path} is unusable: {exc}") from None
        return db

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        version = (await (await db.execute("PRAGMA user_version")).fetchone() or (0,))[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema {version}, newer than this program's {SCHEMA_VERSION}"
            )
        for number in range(version, SCHEMA_VERSION):
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in split_script(MIGRATIONS[number]):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version={number + 1}")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        """Close the database; closing twice is harmless."""
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.close()
        if self._db is not None:
            db, self._db = self._db, None  # type: ignore[assignment]
            await db.close()

    # --- transactions ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self, *, count: bool = True) -> AsyncIterator[_Transaction]:
        """One whole transaction (``BEGIN IMMEDIATE`` … ``COMMIT``; ``ROLLBACK`` on any error).

        It bumps the change counter unless ``count`` (or the yielded ``tx.count``) is false. The
        lock keeps other coroutines out until it ends, their reads included (see :meth:`_read`).
        """
        tx = _Transaction(count)
        async with self._lock:
            self._owner = asyncio.current_task()
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield tx
                    if tx.count:
                        await self._db.execute(
                            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                            "WHERE key = 'changes'"
                        )
                    await self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await self._db.execute("ROLLBACK")
                    raise
            finally:
                self._owner = None

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[None]:
        """Wait for another task's transaction to end, so no read sees it half done; inside the
        reader's own transaction, go ahead."""
        if self._owner is not None and self._owner is asyncio.current_task():
            yield
            return
        async with self._lock:
            yield

    async def _erase_freed(self) -> None:
        """Fold the WAL into the database and truncate it, so that the old versions of pages a
        destruction or revocation overwrote do not linger in ``as.db-wal``."""
        async with self._lock:
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def changes(self) -> int:
        """A counter that grows with every committed change (the admin CLI's included)."""
        row = await (
            await self._db.execute("SELECT value FROM meta WHERE key='changes'")
        ).fetchone()
        return int(row[0]) if row else 0

    async def _one(self, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()) -> Any:
        bound = params if isinstance(params, Mapping) else tuple(params)
        async with self._read():
            return await (await self._db.execute(sql, bound)).fetchone()

    async def _lookup(self, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()) -> Any:
        """One row, read at once on the calling (event loop) thread through the read-only
        connection: for the point reads of the request path (a device, a secret view), where
        :meth:`_one`'s two hops to the worker thread and back cost more than the query.

        The statement runs in a read transaction of its own (autocommit, cursor closed at once),
        so it sees every transaction committed before it, by this process or the admin CLI, and
        none half done; a WAL reader waits for no writer. Inside the task's own transaction (which
        the reader cannot see), or if the reader is busy (a WAL recovery, say), it reads as
        :meth:`_one` does. Only for reads by key: a scan here would stall the event loop.
        """
        reader = self._reader
        if reader is None or (self._owner is not None and self._owner is asyncio.current_task()):
            return await self._one(sql, params)
        bound = params if isinstance(params, Mapping) else tuple(params)
        try:
            cursor = reader.execute(sql, bound)
            try:
                return cursor.fetchone()
            finally:
                cursor.close()  # ends the statement, and with it the read transaction
        except sqlite3.OperationalError:
            return await self._one(sql, params)

    async def _all(self, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()) -> list[Any]:
        bound = params if isinstance(params, Mapping) else tuple(params)
        async with self._read():
            return list(await (await self._db.execute(sql, bound)).fetchall())

    # --- meta ------------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> bytes | None:
        row = await self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else bytes(row[0]) if isinstance(row[0], bytes) else row[0]

    async def set_meta(self, key: str, value: bytes | str | int) -> None:
        async with self._transaction():
            await self._db.execute(
                "INSERT INTO meta VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def set_ca_key(self, pem: bytes) -> None:
        await self.set_meta("ca_key", self._vault.encrypt(pem, CA_KEY_CONTEXT))

    async def ca_key(self) -> bytes:
        blob = await self.get_meta("ca_key")
        if not isinstance(blob, bytes):
            raise StoreError("the database holds no CA key")
        try:
            return self._vault.decrypt(blob, CA_KEY_CONTEXT)
        except VaultError as exc:
            raise StoreError(str(exc)) from None


#: How long a point read on the event loop waits for a lock (only a WAL recovery or the last
#: connection's checkpoint takes one that stops readers) before it goes the worker thread's way.
_READER_BUSY_MS = 20


def _connect_reader(path: Path) -> sqlite3.Connection | None:
    """The read-only connection of :meth:`Database._lookup`, or None if it cannot be had (then
    every read takes the worker thread). Opened after the writer, which made the WAL files."""
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
        reader.execute(f"PRAGMA busy_timeout={_READER_BUSY_MS}")
        reader.execute("PRAGMA query_only=ON")
        reader.create_function("oscar_match", 2, _match, deterministic=True)
    except sqlite3.Error:
        reader.close()
        return None
    return reader


def json_list(items: Iterable[Any]) -> str:
    """One SQL parameter holding a list, for ``IN (SELECT value FROM json_each(?))``: bulk
    statements bind the whole list as data, never build SQL from it."""
    return json.dumps(list(items))


def _match(name: object, pattern: object) -> int:
    return int(isinstance(name, str) and isinstance(pattern, str) and fnmatchcase(name, pattern))
