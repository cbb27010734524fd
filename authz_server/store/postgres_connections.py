"""Connections to PostgreSQL for the AS store's backend (:mod:`.postgres_backend`): how one is
made (the URL's ``command_timeout``, the session settings), how long each kind of statement may
wait, the backoff between attempts to connect again, the point-read connections, and the one
translation of asyncpg's and the server's errors into the store's (:class:`DatabaseError`; a lost
connection or a silent server :class:`DatabaseUnavailable`).

Nothing here knows a table or a transaction: :mod:`.postgres_backend` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg

from . import postgres
from .schema import DatabaseError, DatabaseUnavailable

__all__ = [
    "BACKOFF_MAX",
    "CLOSE_TIMEOUT",
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DRIVER_ERRORS",
    "MAINTENANCE_TIMEOUT",
    "READERS",
    "READER_SETTINGS",
    "RECONNECT_TIMEOUT",
    "Backoff",
    "Coalescer",
    "Readers",
    "close_quietly",
    "command_timeout",
    "connect",
    "error_of",
    "is_lost",
    "lock_wait",
    "split_url",
    "translated",
]

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

DRIVER_ERRORS = (
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


def error_of(exc: BaseException, conn: asyncpg.Connection | None = None) -> DatabaseError:
    if is_lost(exc, conn):
        return DatabaseUnavailable(f"database unavailable: {_detail(exc)}")
    return DatabaseError(f"database error: {exc}")


@contextlib.contextmanager
def translated(conn: asyncpg.Connection | None = None) -> Iterator[None]:
    """asyncpg's and the server's errors as :class:`DatabaseError`, a lost connection's as
    :class:`DatabaseUnavailable`."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise error_of(exc, conn) from None


class Backoff:
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
            conn = await connect(url, RECONNECT_TIMEOUT, settings)
        except (*DRIVER_ERRORS, ValueError) as exc:
            self.failed()
            raise DatabaseUnavailable(f"database unavailable: {_detail(exc)}") from None
        self.succeeded()
        return conn


async def close_quietly(conn: asyncpg.Connection) -> None:
    """Close gracefully, or (a server that does not answer within :data:`CLOSE_TIMEOUT`) not."""
    try:
        await conn.close(timeout=CLOSE_TIMEOUT)
    except DRIVER_ERRORS:
        conn.terminate()


def split_url(url: str) -> tuple[str, float]:
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
    return split_url(url)[1]


def lock_wait(url: str) -> float:
    """Seconds to wait for the write lock: the server's ``lock_timeout`` and a margin (it ends
    the wait itself), or the command timeout if that is longer."""
    server = float(postgres.CONNECTION_SETTINGS["lock_timeout"].removesuffix("s"))
    return max(command_timeout(url), server + LOCK_WAIT_MARGIN)


async def connect(
    url: str,
    timeout: float = CONNECT_TIMEOUT,
    settings: Mapping[str, str] = postgres.CONNECTION_SETTINGS,
) -> asyncpg.Connection:
    dsn, seconds = split_url(url)  # ValueError of its own: says what, quotes no value
    try:
        return await asyncpg.connect(
            dsn, timeout=timeout, command_timeout=seconds, server_settings=dict(settings)
        )
    except ValueError:  # asyncpg's text may quote a parameter of the URL (a password, even)
        raise ValueError(
            "the database URL has a parameter asyncpg does not take, or a value it refuses"
        ) from None


#: Point reads sent together in one statement at most (:class:`Coalescer`).
COALESCE_LIMIT = 64

#: The point-read connections' sessions: read-only, as SQLite's reader (``mode=ro``) is, so a
#: statement that reached a reader by mistake changes nothing.
READER_SETTINGS = {**postgres.CONNECTION_SETTINGS, "default_transaction_read_only": "on"}


class Readers:
    """A few connections for point reads, each used by one task at a time, each made on its
    first use. Not asyncpg's pool: its release runs a reset query (a round trip) after every
    use, which doubled a point read's time; these connections hold no state between reads to
    reset (autocommit, no session settings changed)."""

    def __init__(self, url: str, size: int, backoff: Backoff) -> None:
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
        return await self._call("fetchrow", sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Every row, as :meth:`fetchrow` reads one."""
        return cast(list[Any], await self._call("fetch", sql, args))

    async def _call(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        conn = await self._idle.get()
        try:
            if conn is None or conn.is_closed():
                self._drop(conn)
                conn = None
                conn = await self._backoff.connect(self._url, READER_SETTINGS)
                self._open.add(conn)
            try:
                return await getattr(conn, method)(sql, *args)
            except DRIVER_ERRORS as exc:
                error = error_of(exc, conn)
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
        await asyncio.gather(*(close_quietly(conn) for conn in self._open))
        self._open.clear()


def _each(exc: Exception) -> DatabaseError:
    """An error of the same kind as ``exc`` for each read of a failed statement."""
    if isinstance(exc, DatabaseError):
        return type(exc)(*exc.args)
    return DatabaseError(f"database error: {type(exc).__name__}")


class Coalescer:
    """Point reads of one kind that arrive while such a read is on its way to the server, sent
    together as one statement (:data:`.postgres.COALESCED`): a round trip costs the AS more CPU
    than the statement (asyncpg's protocol, two system calls, the event loop's turns), so under
    load many requests share one. A read that finds none running is sent at once (by a task
    that then sends whatever gathered meanwhile, :data:`COALESCE_LIMIT` at a time, until
    nothing waits): no read waits for a timer, and each is answered from a statement that began
    after it was asked (it sees every commit made before). A failed statement fails each of its
    reads with the same kind of error."""

    def __init__(self, readers: Readers) -> None:
        self._readers = readers
        #: Per batch statement: the reads waiting (their parameters, their future).
        self._waiting: dict[str, list[tuple[Sequence[Any], asyncio.Future[Any]]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    async def fetchrow(self, batch: str, params: Sequence[Any]) -> Any:
        """The row of ``params`` (one value per array of ``batch``), without the number."""
        if self._closed:
            raise DatabaseError("database error: the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(batch, []).append((params, future))
        if batch not in self._tasks:
            self._tasks[batch] = asyncio.ensure_future(self._send(batch))
        return await future

    async def _send(self, batch: str) -> None:
        waiting = self._waiting[batch]
        try:
            while waiting:
                reads = [read for read in waiting[:COALESCE_LIMIT] if not read[1].done()]
                del waiting[:COALESCE_LIMIT]
                if not reads:
                    continue
                values = zip(*(params for params, _ in reads), strict=True)
                arrays = [list(column) for column in values]
                try:
                    rows = await self._readers.fetch(batch, *arrays)
                except Exception as exc:  # DatabaseError (or DatabaseUnavailable) for each
                    for _, future in reads:
                        if not future.done():
                            future.set_exception(_each(exc))
                    continue
                except BaseException:  # cancelled: the store is closing
                    for _, future in [*reads, *waiting]:
                        if not future.done():
                            future.set_exception(DatabaseError("database error: interrupted"))
                    waiting.clear()
                    raise
                found = {row[0]: row for row in rows}
                for number, (_, future) in enumerate(reads, 1):
                    if future.done():
                        continue
                    row = found.get(number)
                    if row is None:  # the statement gives one row per read: never
                        future.set_exception(DatabaseError("database error: a read got no row"))
                    else:
                        future.set_result(tuple(row)[1:])
        finally:
            del self._tasks[batch]

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for waiting in self._waiting.values():
            for _, future in waiting:
                if not future.done():
                    future.set_exception(DatabaseError("database error: the store is closed"))
            waiting.clear()
