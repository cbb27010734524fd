"""A private PostgreSQL cluster for the tests: Debian's server binaries, a temporary data
directory, a free loopback port, trust authentication on 127.0.0.1 only; started as the
``postgres`` system user when the tests run as root (the server refuses root), stopped and
removed at the end. Each test gets a database of its own (:meth:`PgCluster.new_database`).

No mock: the AS store's tests run against this server exactly as against SQLite.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

__all__ = ["BACKENDS", "Backing", "PgCluster", "find_bin"]


def find_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (the newest installed major), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(path: str) -> int:
    try:
        return int(Path(path).parent.parent.name)
    except ValueError:
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One running cluster; :meth:`start` makes it, :meth:`stop` removes it."""

    def __init__(self, bin_dir: Path, root: Path, port: int, *, durable: bool = False) -> None:
        self.durable = durable
        self.bin = bin_dir
        self.root = root
        self.data = root / "data"
        self.port = port
        self._count = 0

    def __repr__(self) -> str:
        return f"PgCluster(port={self.port}, data={str(self.data)!r})"

    @classmethod
    def start(cls, *, durable: bool = False) -> PgCluster:
        """Start a cluster; with ``durable``, every commit is flushed to the disk (PostgreSQL's
        default; the tests' cluster skips the fsyncs, which only a crash of the machine
        needs)."""
        bin_dir = find_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (make deps installs it)")
        root = Path(tempfile.mkdtemp(prefix="oscar-pg-"))
        cluster = cls(bin_dir, root, _free_port(), durable=durable)
        try:
            cluster._init_and_start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _init_and_start(self) -> None:
        root_user = os.geteuid() == 0
        if root_user:  # the server's user must reach and own its directory
            entry = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o711)  # noqa: S103 (traversable, not listable, by the server)
            for parent in self.root.parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    raise RuntimeError(f"{parent} is not traversable by the postgres user")
            self.data.mkdir(mode=0o700)
            os.chown(self.data, entry.pw_uid, entry.pw_gid)
        else:
            self.data.mkdir(mode=0o700)
        run = self._as_owner()
        subprocess.run(
            [*run, str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.resume()

    def resume(self) -> None:
        """Start the server (again, after :meth:`halt`): same port, same data directory."""
        options = (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=200"
        )
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        subprocess.run(
            [*self._as_owner(), str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
             "-l", str(self.data / "server.log"), "-o", options, "start"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def halt(self) -> None:
        """Stop the server as an operator does (``pg_ctl stop -m fast``: every session ended,
        open transactions rolled back, a clean shutdown), keeping its data for :meth:`resume`."""
        subprocess.run(
            [*self._as_owner(), str(self.bin / "pg_ctl"), "-D", str(self.data),
             "-m", "fast", "-w", "-t", "60", "stop"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*self._as_owner(), str(self.bin / "pg_ctl"), "-D", str(self.data),
                 "-m", "immediate", "-w", "stop"],
                check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        self._count += 1
        name = f"as_{os.getpid()}_{self._count}_{time.monotonic_ns() % 10**6}"
        asyncio.run(self._execute(f'CREATE DATABASE "{name}"'))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        asyncio.run(self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    async def _execute(self, statement: str) -> None:
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

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
