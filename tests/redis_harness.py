"""A private Redis server for the tests: Debian's ``redis-server`` (``make deps`` installs it) on a
free loopback port, its configuration, log and RDB file in a temporary directory, run in the
foreground and known by its PID; stopped and its directory removed at the end.

::

    with RedisServer(password="s3cret") as server:   # or RedisServer(...).start() ... .stop()
        url = server.url                              # redis://:s3cret@127.0.0.1:PORT/0
        server.client().keys()                        # what an operator of the Redis sees

Options: ``password`` (``requirepass``), ``user=(name, password)`` (an ACL user with every right;
the ``default`` user is then off), ``tls`` (a CA and a server certificate for 127.0.0.1 made here;
the plain port is closed, :attr:`RedisServer.ca_file` is what clients trust), ``persistent`` (a
graceful stop writes the RDB file, a start reads it: :meth:`RedisServer.restart`).

The configuration is a file in the temporary directory (0600), not the command line: no password
shows in ``ps``, and no argument needs Redis's quoting. Without ``persistent`` the server saves
nothing by itself; the RDB is written uncompressed (``rdbcompression no``) so that
:meth:`RedisServer.dump_bytes` shows every stored byte as a thief with the dump would read it.

The server never outlives the session: :meth:`RedisServer.stop` from the fixture's finalizer or
``__exit__``, every server still running stopped at exit (``atexit``), and, when started from the
main thread, SIGKILL from the kernel if the test process itself dies (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["RedisServer", "find_redis_server"]

#: Every server made and not yet :meth:`RedisServer.stop`-ped (stopped at exit).
_LIVE: set[RedisServer] = set()


def find_redis_server() -> str | None:
    """The ``redis-server`` binary on PATH, or None."""
    return shutil.which("redis-server")


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quoted(value: str) -> str:
    """A configuration-file argument (Redis's ``sdssplitargs``): double-quoted, escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


class RedisServer:
    """One private server; :meth:`start` runs it, :meth:`stop` ends it and removes its files."""

    def __init__(
        self,
        *,
        password: str | None = None,
        user: tuple[str, str] | None = None,
        tls: bool = False,
        persistent: bool = False,
    ) -> None:
        if password is not None and user is not None:
            raise ValueError("give a password (requirepass) or an ACL user, not both")
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("redis-server is not installed (make deps installs it)")
        self.binary = binary
        self.password = password
        self.user = user
        self.tls = tls
        self.persistent = persistent
        self.dir = Path(tempfile.mkdtemp(prefix="oscar-redis-"))
        self.port = _free_tcp_port()
        self.ca_file: Path | None = None
        self.rdb = self.dir / "dump.rdb"
        self.log = self.dir / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        _LIVE.add(self)
        if tls:
            self.ca_file = self._make_certificates()
        self._write_config()

    def __repr__(self) -> str:  # no password
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self.port}, tls={self.tls}, {state})"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the URLs clients use -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL of database 0: ``redis://[[USER]:PASS@]127.0.0.1:PORT/0``, or with TLS
        ``rediss://…/0?ssl_ca_certs=CA`` (redis-py's ``from_url`` takes the query argument)."""
        return self.url_for(0)

    def url_for(self, db: int = 0) -> str:
        auth = ""
        if self.user is not None:
            auth = f"{quote(self.user[0], safe='')}:{quote(self.user[1], safe='')}@"
        elif self.password is not None:
            auth = f":{quote(self.password, safe='')}@"
        if not self.tls:
            return f"redis://{auth}127.0.0.1:{self.port}/{db}"
        assert self.ca_file is not None
        return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_ca_certs={quote(str(self.ca_file))}"

    def client(self, db: int = 0) -> redis.Redis:
        """A synchronous client, for a test that reads or writes behind the proxy's back."""
        return redis.Redis.from_url(self.url_for(db), socket_timeout=10)

    # --- the process ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The running server's process id; RuntimeError if it is not running."""
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("the Redis server is not running")
        return self._process.pid

    def start(self, timeout: float = 15.0) -> Self:
        """Run the server (again, after :meth:`halt` or :meth:`kill`: same port, same options,
        same files) and return once it answers PING. RuntimeError with the log's tail if it
        exits or does not answer within ``timeout``."""
        if self.running:
            raise RuntimeError("the Redis server is already running")
        command = [self.binary, str(self.dir / "redis.conf")]
        if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
            # The kernel kills the server when the thread that started it ends: only the main
            # thread lives as long as the test process.
            command = ["setpriv", "--pdeathsig", "KILL", "--", *command]
        self._process = subprocess.Popen(  # our own arguments: the configuration file
            command,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self._process.returncode}:\n{self.log_tail()}"
                    )
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {timeout} s")
                time.sleep(0.005)  # polling for the listening socket; nothing to await
        finally:
            probe.close()

    def halt(self, timeout: float = 30.0) -> None:
        """Stop the server as an operator does (SIGTERM: a graceful shutdown, which writes the
        RDB file when ``persistent``), keeping its files for :meth:`start`."""
        if not self.running:
            return
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"redis-server ignored SIGTERM:\n{self.log_tail()}") from None
        if code != 0:
            raise RuntimeError(f"redis-server stopped with {code}:\n{self.log_tail()}")

    def restart(self, timeout: float = 30.0) -> None:
        """:meth:`halt` then :meth:`start` on the same port: with ``persistent``, every key
        written before is there again."""
        self.halt(timeout)
        self.start(timeout)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, saving nothing; :meth:`start` runs it again."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        """End the server (SIGKILL) and remove its directory; the object is finished."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        _LIVE.discard(self)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def dump_bytes(self) -> bytes:
        """The RDB file after a ``SAVE``: every key and value as a stolen dump holds them
        (uncompressed)."""
        with self.client() as c:
            c.save()
        return self.rdb.read_bytes()

    # --- configuration and certificates ---------------------------------------------------------

    def _write_config(self) -> None:
        lines = [
            "bind 127.0.0.1",
            f"dir {_quoted(str(self.dir))}",
            "dbfilename dump.rdb",
            f"logfile {_quoted(str(self.log))}",
            "appendonly no",
            "rdbcompression no",
            'save "3600 1"' if self.persistent else 'save ""',
            "daemonize no",
        ]
        if self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {_quoted(str(self.dir / 'server.crt'))}",
                f"tls-key-file {_quoted(str(self.dir / 'server.key'))}",
                f"tls-ca-cert-file {_quoted(str(self.ca_file))}",
                "tls-auth-clients no",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.password is not None:
            lines.append(f"requirepass {_quoted(self.password)}")
        if self.user is not None:
            name, password = self.user
            lines += [
                "user default off",
                f"user {_quoted(name)} on {_quoted('>' + password)} ~* &* +@all",
            ]
        path = self.dir / "redis.conf"
        path.touch(mode=0o600)
        path.write_text("\n".join(lines) + "\n")

    def _make_certificates(self) -> Path:
        """A CA and a server certificate for 127.0.0.1 (IP SAN), valid for a day."""
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OSCAR test Redis CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        ca_file = self.dir / "ca.crt"
        ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (self.dir / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = self.dir / "server.key"
        key_file.touch(mode=0o600)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return ca_file


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()
