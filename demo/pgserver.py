"""A private PostgreSQL server on loopback, for the tests and the benchmarks: Debian's server
binaries, a temporary data directory, a free TCP port on 127.0.0.1, trust authentication for
127.0.0.1 only; run as the ``postgres`` system user when we are root (the server refuses root).

::

    server = PgServer.start()
    try:
        url = server.new_database()   # postgresql://postgres@127.0.0.1:PORT/as_...
        ...
    finally:
        server.stop()                 # stops it and removes its directory

:meth:`PgServer.halt` and :meth:`PgServer.resume` stop and start the same server again (same port,
same data). ``tests/pg_harness.py`` builds the tests' cluster on this class.

What it does not do: tune the server beyond a test's needs, accept connections from anything but
127.0.0.1, or keep anything after :meth:`PgServer.stop`.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

__all__ = ["PgServer", "find_bin"]


def find_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (the newest installed major), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(path: str) -> int:
    try:
        return int(Path(path).parent.parent.name)
    except ValueError:
        return 0


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One running server; :meth:`start` makes it, :meth:`stop` removes it."""

    def __init__(self, bin_dir: Path, root: Path, port: int, *, durable: bool = False) -> None:
        self.durable = durable
        self.bin = bin_dir
        self.root = root
        self.data = root / "data"
        self.port = port
        self._count = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, data={str(self.data)!r})"

    @classmethod
    def start(cls, *, durable: bool = False) -> Self:
        """Start a server; with ``durable``, every commit is flushed to the disk (PostgreSQL's
        default; without it the server skips the fsyncs, which only a crash of the machine
        needs). RuntimeError if PostgreSQL is not installed; CalledProcessError if initdb or
        pg_ctl fails (nothing is left behind)."""
        bin_dir = find_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (make deps installs it)")
        root = Path(tempfile.mkdtemp(prefix="oscar-pg-"))
        server = cls(bin_dir, root, _free_tcp_port(), durable=durable)
        try:
            server._init_and_start()
        except BaseException:
            server.stop()
            raise
        return server

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _init_and_start(self) -> None:
        if os.geteuid() == 0:  # the server's user must reach and own its directory
            entry = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o711)  # noqa: S103 (traversable, not listable, by the server)
            for parent in self.root.parents:
                if not parent.stat().st_mode & 0o001:
                    raise RuntimeError(f"{parent} is not traversable by the postgres user")
            self.data.mkdir(mode=0o700)
            os.chown(self.data, entry.pw_uid, entry.pw_gid)
        else:
            self.data.mkdir(mode=0o700)
        subprocess.run(  # noqa: S603 (PostgreSQL's own binaries, our arguments)
            [*self._as_owner(), str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
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
        subprocess.run(  # noqa: S603 (PostgreSQL's own binaries, our arguments)
            [*self._as_owner(), str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
             "-l", str(self.data / "server.log"), "-o", options, "start"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def halt(self) -> None:
        """Stop the server as an operator does (``pg_ctl stop -m fast``: every session ended,
        open transactions rolled back, a clean shutdown), keeping its data for :meth:`resume`."""
        subprocess.run(  # noqa: S603 (PostgreSQL's own binaries, our arguments)
            [*self._as_owner(), str(self.bin / "pg_ctl"), "-D", str(self.data),
             "-m", "fast", "-w", "-t", "60", "stop"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (immediate shutdown) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run(  # noqa: S603 (PostgreSQL's own binaries, our arguments)
                [*self._as_owner(), str(self.bin / "pg_ctl"), "-D", str(self.data),
                 "-m", "immediate", "-w", "stop"],
                check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)

    def postmaster_pid(self) -> int:
        """The running server's main process id (from ``postmaster.pid``); OSError if stopped."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

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
        import asyncpg  # the [postgres] extra: only who starts a server needs it

        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
