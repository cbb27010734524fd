"""What the store's components need from a database: the interface a backend implements.

The components (:mod:`.registry`, :mod:`.keyring`, :mod:`.access`, :mod:`.audit`,
:mod:`.deliveries`) hold one :class:`Backend` and run the statements of its ``sql`` module (for
SQLite :mod:`.sqlite`, run by :mod:`.sqlite_backend`; for PostgreSQL :mod:`.postgres`, run by
:mod:`.postgres_backend`); they never import a database driver.

The contract every backend keeps:

- a transaction is whole (all of it or none of it, whatever kills the process) and serialized
  with every other transaction of the process; reads made outside it wait until it ends, reads
  made inside it (by the task that runs it) see its writes;
- :meth:`Backend.lookup` is a point read by key for the request path: it sees every committed
  transaction and none half done, and never waits for a writer;
- each failure of the database itself (locked too long, I/O, damaged) is raised as
  :class:`~.schema.DatabaseError`, translated in the backend's module only; a backend raises no
  exception of its driver.

What this module does not do: run anything (it holds the interface and its small types only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import ModuleType
from typing import Any, Protocol, TypeVar

__all__ = ["Backend", "Params", "Row", "SnapshotReader", "Transaction"]

#: A row as the driver gives it, indexable by column position (``one`` and ``lookup`` give None
#: when there is no row).
Row = Any
#: Statement parameters: positional (``?``) or named (``:name``).
Params = Sequence[Any] | Mapping[str, Any]

_T = TypeVar("_T")


class Transaction:
    """What a transaction's body may still decide: whether it counts as a change (the counter
    the running server polls, see :meth:`authz_server.store.Store.changes`)."""

    __slots__ = ("count",)

    def __init__(self, count: bool) -> None:
        self.count = count


class SnapshotReader(Protocol):
    """Reads inside one read-only snapshot, in a worker thread (see :meth:`Backend.snapshot`)."""

    def one(self, sql: str, params: Params = ()) -> Row: ...

    def batches(self, sql: str, params: Params, size: int) -> Iterator[list[Row]]:
        """The rows of ``sql``, ``size`` at a time (memory stays flat however many)."""
        ...


class Backend(Protocol):
    """One database handle shared by every component of a store."""

    #: The statements, one named constant each (the shape of :mod:`.sqlite`).
    sql: ModuleType

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        ...

    def transaction(self, *, count: bool = True) -> AbstractAsyncContextManager[Transaction]:
        """One whole write transaction; it bumps the change counter unless ``count`` (or the
        yielded :attr:`Transaction.count`) is false."""
        ...

    async def one(self, sql: str, params: Params = ()) -> Row:
        """The first row, read once no other task's transaction is running."""
        ...

    async def all(self, sql: str, params: Params = ()) -> list[Row]:
        """Every row, read once no other task's transaction is running."""
        ...

    async def lookup(self, sql: str, params: Params = ()) -> Row:
        """One row by key, for the request path: committed state, no waiting for writers."""
        ...

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement (inside the caller's transaction); the rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement per row (inside the caller's transaction)."""
        ...

    async def returning(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement that returns rows (``RETURNING``), inside a transaction."""
        ...

    async def erase_freed(self) -> None:
        """Make sure overwritten data (destroyed secrets, erased PSKs) lingers in no file."""
        ...

    async def snapshot(self, read: Callable[[SnapshotReader], _T]) -> _T:
        """``read`` in a worker thread, on a read-only connection of its own, in one snapshot."""
        ...

    async def close(self) -> None:
        """Close; closing twice is harmless."""
        ...
