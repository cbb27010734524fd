"""The PostgreSQL backend of the AS store (:class:`.backend.Backend`), over asyncpg: its
connections, migrations and transactions; the one place where asyncpg's and PostgreSQL's errors
are translated into the store's (:class:`~.schema.DatabaseError`, or :class:`~.schema.StoreError`
for a database that cannot be reached or is not usable).

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
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg

from . import postgres, redacted
from .backend import Params, Row, SnapshotReader, Transaction
from .schema import DatabaseError, DatabaseUnavailable, StoreError

__all__ = ["MAINTENANCE_TIMEOUT", "PostgresBackend", "is_lost"]

_T = TypeVar("_T")

#: Reader connections of the request path's point reads.
READERS = 4
#: Seconds to wait for a connection to the server.
CONNECT_TIMEOUT = 10.0
#: Seconds to wait for a connection again after one was lost (a request waits on it).
RECONNECT_TIMEOUT = 2.0
#: The first and the longest wait between two attempts to connect again.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
#: Seconds a statement may go unanswered before its connection is taken for lost (the default of
#: the URL's ``command_timeout`` query parameter).
COMMAND_TIMEOUT = 5.0
#: The longest ``command_timeout`` a URL may ask for.
COMMAND_TIMEOUT_MAX = 3600.0
#: Seconds a graceful close may take (then the connection is dropped).
CLOSE_TIMEOUT = 1.0
#: Seconds a migration's or a VACUUM's statement may take.
MAINTENANCE_TIMEOUT = 600.0
#: Seconds beyond the server's own ``lock_timeout`` that a wait for the write lock may take.
LOCK_WAIT_MARGIN = 2.0
_ROWS = re.compile(r"(\d+)$")


_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)
#: Errors that say the connection (or the server) is gone, or left in a state nobody can know,
#: whatever state the connection shows.
_LOST = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InternalClientError,  # the protocol out of step (a session ended under a query)
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError, ConnectionFailureError, …
    asyncpg.CannotConnectNowError,  # the server is starting or shutting down
    asyncpg.AdminShutdownError,  # pg_ctl stop -m fast: the server ends every session
    asyncpg.CrashShutdownError,
)


def is_lost(exc: BaseException, conn: asyncpg.Connection | None) -> bool:
    return isinstance(exc, _LOST) or (conn is not None and conn.is_closed())


def _detail(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):  # its text is empty
        return "no answer from the server in time"
    return str(exc) or type(exc).__name__


def _error(exc: BaseException, conn: asyncpg.Connection | None = None) -> DatabaseError:
    if is_lost(exc, conn):
        return DatabaseUnavailable(f"database unavailable: {_detail(exc)}")
    return DatabaseError(f"database error: {exc}")


@contextlib.contextmanager
def _translated(conn: asyncpg.Connection | None = None) -> Iterator[None]:
    """asyncpg's and the server's errors as :class:`DatabaseError`, a lost connection's as
    :class:`DatabaseUnavailable`."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        raise _error(exc, conn) from None


class _Backoff:
    """When the next attempt to connect again may be made: :data:`BACKOFF_FIRST` after the
    first failure, doubling to :data:`BACKOFF_MAX`; at once after a success."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._delay = 0.0
        self._next = 0.0

    def ready(self) -> float:
        """Seconds until an attempt may be made (0: now)."""
        return max(0.0, self._next - self._monotonic())

    def failed(self) -> None:
        self._delay = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._delay * 2))
        self._next = self._monotonic() + self._delay

    def succeeded(self) -> None:
        self._delay = 0.0
        self._next = 0.0

    async def connect(
        self, url: str, settings: Mapping[str, str] = postgres.CONNECTION_SETTINGS
    ) -> asyncpg.Connection:
        """A new connection, unless the last attempt failed too recently
        (:class:`DatabaseUnavailable` then, at once: the event loop never waits on it)."""
        wait = self.ready()
        if wait:
            raise DatabaseUnavailable(f"database unavailable: connecting again in {wait:.1f} s")
        try:
            conn = await _connect(url, RECONNECT_TIMEOUT, settings)
        except (*_DRIVER_ERRORS, ValueError) as exc:
            self.failed()
            raise DatabaseUnavailable(f"database unavailable: {_detail(exc)}") from None
        self.succeeded()
        return conn


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


async def _close(conn: asyncpg.Connection) -> None:
    """Close gracefully, or (a server that does not answer within :data:`CLOSE_TIMEOUT`) not."""
    try:
        await conn.close(timeout=CLOSE_TIMEOUT)
    except _DRIVER_ERRORS:
        conn.terminate()


def _split_url(url: str) -> tuple[str, float]:
    """The URL as asyncpg takes it (without ``command_timeout``, which it would send the server
    as a setting) and the command timeout it asks for; ValueError for a bad one."""
    parts = urlsplit(url)
    if "command_timeout" not in parts.query:
        return url, COMMAND_TIMEOUT
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [value for key, value in query if key == "command_timeout"]
    if not given:
        return url, COMMAND_TIMEOUT
    try:
        seconds = float(given[-1])
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= COMMAND_TIMEOUT_MAX:
        raise ValueError(
            f"command_timeout must be a number of seconds, more than 0 and at most "
            f"{COMMAND_TIMEOUT_MAX:.0f}"
        )
    kept = urlencode([(key, value) for key, value in query if key != "command_timeout"])
    return parts._replace(query=kept).geturl(), seconds


def command_timeout(url: str) -> float:
    """The command timeout a database URL asks for (:data:`COMMAND_TIMEOUT` if none)."""
    return _split_url(url)[1]


def _lock_wait(url: str) -> float:
    """Seconds to wait for the write lock: the server's ``lock_timeout`` and a margin (it ends
    the wait itself), or the command timeout if that is longer."""
    server = float(postgres.CONNECTION_SETTINGS["lock_timeout"].removesuffix("s"))
    return max(command_timeout(url), server + LOCK_WAIT_MARGIN)


async def _connect(
    url: str,
    timeout: float = CONNECT_TIMEOUT,
    settings: Mapping[str, str] = postgres.CONNECTION_SETTINGS,
) -> asyncpg.Connection:
    dsn, seconds = _split_url(url)
    return await asyncpg.connect(
        dsn, timeout=timeout, command_timeout=seconds, server_settings=dict(settings)
    )


#: The point-read connections' sessions: read-only, as SQLite's reader (``mode=ro``) is, so a
#: statement that reached a reader by mistake changes nothing.
READER_SETTINGS = {**postgres.CONNECTION_SETTINGS, "default_transaction_read_only": "on"}


class _Snapshot:
    """:class:`.backend.SnapshotReader` over one connection, on the worker thread's own loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: asyncpg.Connection) -> None:
        self._loop = loop
        self._conn = conn

    def one(self, sql: str, params: Params = ()) -> Row:
        with _translated():
            row = self._loop.run_until_complete(self._conn.fetchrow(*_args(sql, params)))
        return None if row is None else tuple(row)

    def batches(self, sql: str, params: Params, size: int) -> Iterator[list[Row]]:
        with _translated():
            cursor = self._loop.run_until_complete(self._conn.cursor(*_args(sql, params)))
        while True:
            with _translated():
                rows = self._loop.run_until_complete(cursor.fetch(size))
            if not rows:
                return
            yield [tuple(row) for row in rows]


class _Readers:
    """A few connections for point reads, each used by one task at a time, each made on its
    first use. Not asyncpg's pool: its release runs a reset query (a round trip) after every
    use, which doubled a point read's time; these connections hold no state between reads to
    reset (autocommit, no session settings changed)."""

    def __init__(self, url: str, size: int, backoff: _Backoff) -> None:
        self._url = url
        self._backoff = backoff
        #: Each slot holds a connection, or None until one is made (by the next read that takes
        #: the slot): at first, and once its connection was lost.
        self._idle: asyncio.Queue[asyncpg.Connection | None] = asyncio.Queue()
        for _ in range(size):
            self._idle.put_nowait(None)
        self._open: set[asyncpg.Connection] = set()

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """The row, as a plain asyncpg call; :class:`DatabaseError` (or
        :class:`DatabaseUnavailable`) for a failure, the lost connection dropped."""
        conn = await self._idle.get()
        try:
            if conn is None or conn.is_closed():
                self._drop(conn)
                conn = None
                conn = await self._backoff.connect(self._url, READER_SETTINGS)
                self._open.add(conn)
            try:
                return await conn.fetchrow(sql, *args)
            except _DRIVER_ERRORS as exc:
                error = _error(exc, conn)
                if isinstance(error, DatabaseUnavailable):
                    self._drop(conn)
                    conn = None
                raise error from None
        finally:
            self._idle.put_nowait(conn)

    def _drop(self, conn: asyncpg.Connection | None) -> None:
        if conn is not None:
            self._open.discard(conn)
            conn.terminate()

    async def close(self) -> None:
        await asyncio.gather(*(_close(conn) for conn in self._open))
        self._open.clear()


class PostgresBackend:
    """The AS database on a PostgreSQL server. Made by :meth:`create` or :meth:`open`."""

    sql: ModuleType = postgres

    def __init__(self, url: str, conn: asyncpg.Connection, readers: _Readers | None) -> None:
        self.url = url
        self._conn: asyncpg.Connection | None = conn
        self._readers = readers
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._closed = False
        self._backoff = readers._backoff if readers is not None else _Backoff()
        self._lock_wait = _lock_wait(url)

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
            with _translated():
                async with conn.transaction():
                    await conn.execute(postgres.MIGRATION_LOCK, timeout=_lock_wait(url))
                    if await cls._version(conn) != 0:
                        raise Conflict(f"the database {redacted(url)} holds an AS already")
                    await cls.migrate_locked(conn, url)
                    await conn.executemany(
                        postgres.META_INSERT, [postgres.meta_params(k, v) for k, v in first]
                    )
            return cls(url, conn, _Readers(url, READERS, _Backoff()))
        except BaseException:
            await conn.close()
            raise

    @classmethod
    async def open(cls, url: str) -> PostgresBackend:
        """Connect to an existing AS database, migrated forward; :class:`StoreError` if it
        cannot be reached or is not an AS database of a version this program knows."""
        conn = await cls.connect(url)
        try:
            with _translated():
                async with conn.transaction():
                    await conn.execute(postgres.MIGRATION_LOCK, timeout=_lock_wait(url))
                    if await cls._version(conn) == 0:
                        raise StoreError(
                            f"no AS database at {redacted(url)}; run 'oscar-as init' with it"
                        )
                    await cls.migrate_locked(conn, url)
            return cls(url, conn, _Readers(url, READERS, _Backoff()))
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
            return await _connect(url)
        except (*_DRIVER_ERRORS, ValueError) as exc:
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
        if self._readers is not None:
            readers, self._readers = self._readers, None
            await readers.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await _close(conn)

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
        """:func:`_translated` on the writer: a lost writer is dropped, to connect again."""
        try:
            yield
        except _DRIVER_ERRORS as exc:
            error = _error(exc, conn)
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
                        await conn.execute(postgres.WRITE_LOCK, timeout=self._lock_wait)
                    yield tx
                    with self._on_writer(conn):
                        if tx.count:
                            await conn.execute(postgres.COUNT_CHANGE)
                        await conn.execute(postgres.COMMIT)
                except BaseException:
                    with contextlib.suppress(*_DRIVER_ERRORS):
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
        Inside the task's own transaction (which readers cannot see), as :meth:`one`."""
        readers = self._readers
        if readers is None or self._in_own_transaction():
            return await self.one(sql, params)
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
            with _translated():
                conn = loop.run_until_complete(_connect(self.url))
            try:
                with _translated():
                    loop.run_until_complete(conn.execute(postgres.BEGIN_READ))
                try:
                    return read(_Snapshot(loop, conn))
                finally:
                    with _translated():
                        loop.run_until_complete(conn.execute(postgres.COMMIT))
            finally:
                loop.run_until_complete(conn.close())
        finally:
            loop.close()
