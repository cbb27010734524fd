"""A private PostgreSQL cluster for the tests: the server of :mod:`demo.pgserver` (Debian's
binaries, a temporary data directory, a free loopback port, trust authentication on 127.0.0.1
only, run as the ``postgres`` system user when the tests run as root), stopped and removed at the
end. Each test gets a database of its own (:meth:`PgCluster.new_database`); the files that hold
it can be read as a thief with the disk would (:meth:`PgCluster.database_bytes`).

No mock: the AS store's tests run against this server exactly as against SQLite.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg

from demo.pgserver import PgServer, find_bin

__all__ = ["BACKENDS", "Backing", "PgCluster", "find_bin"]


class PgCluster(PgServer):
    """One running cluster (:class:`demo.pgserver.PgServer`: :meth:`start` makes it, :meth:`stop`
    removes it), and what the tests read of it behind the store's back."""

    async def files_of(self, url: str, *, wal: bool = True) -> list[Path]:
        """The files that hold a database's data, after a checkpoint: its directory, the shared
        catalog, and the WAL (unless ``wal`` is false)."""
        name = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute("CHECKPOINT")
            oid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = $1", name)
        finally:
            await conn.close()
        dirs = [self.data / "global", self.data / "base" / str(oid)]
        if wal:
            dirs.append(self.data / "pg_wal")
        return [p for d in dirs for p in d.rglob("*") if p.is_file()]

    async def database_bytes(self, url: str, *, wal: bool = True) -> bytes:
        """Everything :meth:`files_of` holds, as a thief with the disk would read it."""
        return b"".join(p.read_bytes() for p in await self.files_of(url, wal=wal))


# --- the AS store's tests on either backend -----------------------------------------------------

BACKENDS = ("sqlite", "postgresql")


class Backing:
    """What a store test needs to know of the database under it, beyond the store: the
    ``database`` argument of ``init_state``/``Store.open`` (None: SQLite in the state
    directory), raw statements behind the store's back (an attacker with the database), and the
    bytes a thief with the disk reads."""

    def __init__(
        self, name: str, state: Path, url: str | None = None, cluster: PgCluster | None = None
    ) -> None:
        self.name = name
        self.state = state
        self.database = url
        self.cluster = cluster

    def __repr__(self) -> str:
        return f"Backing({self.name})"

    @property
    def postgres(self) -> bool:
        return self.database is not None

    def sql(self, text: str) -> str:
        """A test's statement written with ``?`` parameters, in this backend's dialect."""
        if not self.postgres:
            return text
        parts = text.split("?")
        return parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], 1))

    async def execute(self, text: str, *args: object) -> list[tuple[object, ...]]:
        """One statement (``?`` parameters) on a connection of its own, committed."""
        if self.database is None:
            con = sqlite3.connect(self.state / "as.db")
            try:
                rows = con.execute(text, args).fetchall()
                con.commit()
                return rows
            finally:
                con.close()
        conn = await asyncpg.connect(self.database)
        try:
            return [tuple(r) for r in await conn.fetch(self.sql(text), *args)]
        finally:
            await conn.close()

    async def drop_trigger(self, name: str) -> None:
        await self.execute(f"DROP TRIGGER {name}" + (" ON audit" if self.postgres else ""))

    async def set_head(self, value: bytes) -> None:
        if self.postgres:
            await self.execute("UPDATE meta SET bytes = ? WHERE key = 'audit_head'", value)
        else:
            await self.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", value)

    async def raw_bytes(self, *, wal: bool = True) -> bytes:
        """Every file that holds the database, as read from the disk (SQLite: the WAL folded in
        first; PostgreSQL: after a checkpoint, the database's files, the catalog and, unless
        ``wal`` is false, the WAL)."""
        if self.database is None:
            con = sqlite3.connect(self.state / "as.db")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.close()
            return b"".join(
                p.read_bytes() for p in self.state.iterdir() if p.name.startswith("as.db")
            )
        assert self.cluster is not None
        return await self.cluster.database_bytes(self.database, wal=wal)
