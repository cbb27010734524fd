"""A private ``redis-server`` for a benchmark: loopback, a free TCP port, nothing saved.

::

    with RedisBox(bed.dir / "redis") as box:
        ... box.url ...  # redis://127.0.0.1:PORT/0
        ... cpu_seconds(box.pid) ...

Debian's ``redis-server`` (``make deps`` installs it), run in the foreground with a configuration
file in ``directory``; stopped (SIGTERM, then SIGKILL) on leaving the ``with`` block. No password:
the server listens on 127.0.0.1 only and lives as long as the benchmark. The tests' harness
(``tests/redis_harness.py``: AUTH, ACL users, TLS, restarts) is not importable from ``bench``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .testbed import stop_process

__all__ = ["RedisBox"]


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisBox:
    """One ``redis-server`` process; :meth:`start` returns once it answers PING."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("redis-server is not running")
        return self._process.pid

    def start(self, timeout: float = 10.0) -> RedisBox:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server on PATH (make deps installs it)")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.port = _free_tcp_port()
        config = self.directory / "redis.conf"
        config.write_text(
            f'bind 127.0.0.1\nport {self.port}\ndir {self.directory}\nsave ""\n'
            "appendonly no\ndaemonize no\nlogfile redis.log\n"
        )
        config.chmod(0o600)
        self._process = subprocess.Popen([binary, str(config)], cwd=self.directory)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)

    def __enter__(self) -> RedisBox:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
