"""Real AS processes and real DTLS clients for the AS tests (no fixtures here; plain helpers).

- :func:`make_state` / :func:`enroll`: a state directory and devices, through the store itself;
- :class:`AsProcess`: ``oscar-as serve`` (``python -m authz_server serve``) on 127.0.0.1 with
  its log in a file;
- :class:`Client`: one device's aiocoap DTLS client context, with CBOR in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiocoap import GET, Context, Message
from aiocoap.error import NetworkError
from aiocoap.numbers.constants import TransportTuning
from cryptography import x509
from pg_harness import PgCluster

from authz_server.ca import init_state
from authz_server.store import Store
from demo.system import free_port
from oscar import cbor
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

ROOT = Path(__file__).resolve().parent.parent


class FastFail(TransportTuning):
    """Gives up on a request after about 0.6 s instead of about 90 s (failed handshakes)."""

    ACK_TIMEOUT = 0.2
    MAX_RETRANSMIT = 1


#: The profile test resources register with.
PROFILE = "ccm-es256"


def resource_body(path: str, **overrides: Any) -> dict[str, Any]:
    """A ``POST /resources`` body for ``path``; ``overrides`` replace fields."""
    body: dict[str, Any] = {
        "path": path,
        "content_format": 50,
        "profile": PROFILE,
        "max_age": 60,
        "rotation_period": 0,
    }
    body.update(overrides)
    return body


def now() -> int:
    return int(time.time())


async def make_state(state_dir: Path, database: str | None = None) -> None:
    store = await init_state(state_dir, as_uri="coaps://127.0.0.1", now=now(), database=database)
    await store.close()


async def enroll(store: Store, device_id: str, role: str) -> bytes:
    """Enroll a device; returns its fresh 16-byte PSK."""
    psk = os.urandom(16)
    await store.add_device(device_id, role, psk, now())
    return psk


class Daemon:
    """One role's server process on 127.0.0.1, its output in a log file (appended across
    restarts). Subclasses give :meth:`command`; :meth:`start` waits for a line of the log."""

    ready = "serving"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0, wait_for: str | None = None) -> None:
        wait_for = wait_for or self.ready
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if wait_for in self.log()[offset:]:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{type(self).__name__} did not start:\n" + self.log()[offset:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_kib(self, field: str = "VmRSS") -> int:
        """The process's resident memory now (``VmHWM``: its peak since the start or since
        :meth:`reset_peak`), in KiB."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {field}")

    def reset_peak(self) -> None:
        """Reset the process's peak resident memory (VmHWM) to what it holds now."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as clear:
            clear.write("5")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class AsProcess(Daemon):
    """One AS server process."""

    ready = "serving coaps://"

    def __init__(self, state_dir: Path, log_path: Path, *args: str) -> None:
        super().__init__(log_path)
        self.state_dir = state_dir
        self.args = args
        self.port = 0

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "authz_server",
            "serve",
            "--state",
            str(self.state_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.args,
        ]

    def start(self, port: int | None = None, timeout: float = 20.0) -> None:  # type: ignore[override]
        self.port = port or free_port()
        super().start(timeout)

    @property
    def uri(self) -> str:
        return f"coaps://127.0.0.1:{self.port}"


class Client:
    """A device talking to the AS over DTLS-PSK."""

    def __init__(self, ctx: Context, uri: str, device_id: str) -> None:
        self.ctx = ctx
        self.uri = uri
        self.id = device_id

    @classmethod
    async def connect(cls, server: AsProcess, device_id: str, psk: bytes) -> Client:
        ctx = await Context.create_client_context(transports=["tinydtls"])
        ctx.client_credentials.load_from_dict(
            {f"{server.uri}/*": {"dtls": {"psk": psk, "client-identity": device_id.encode()}}}
        )
        return cls(ctx, server.uri, device_id)

    def message(
        self,
        code: Any,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        *,
        payload: bytes | None = None,
        **options: Any,
    ) -> Message:
        """A request; query items go into Uri-Query options as they are (no URI escaping), a
        ``body`` is CBOR-encoded, a ``payload`` is sent raw."""
        if payload is None and body is not None:
            payload = cbor.dumps(body)
        message = Message(code=code, uri=f"{self.uri}/{path}", payload=payload or b"", **options)
        if query:
            message.opt.uri_query = tuple(f"{k}={v}" for k, v in query.items())
        if payload and message.opt.content_format is None:
            message.opt.content_format = 60
        return message

    async def send(self, message: Message, timeout: float = 10.0) -> Message:
        return await asyncio.wait_for(self.ctx.request(message).response, timeout)

    async def call(
        self,
        code: Any,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        **kwargs: Any,
    ) -> tuple[str, Any]:
        """(dotted response code, decoded CBOR payload or raw bytes)."""
        response = await self.send(self.message(code, path, query, body, **kwargs))
        return response.code.dotted, decode(response)

    async def get(self, path: str, **query: Any) -> tuple[str, Any]:
        return await self.call(GET, path, query or None)

    async def close(self) -> None:
        await self.ctx.shutdown()


def decode(response: Message) -> Any:
    if response.opt.content_format == 60:
        return cbor.loads(response.payload)
    return response.payload


@dataclass
class AsEnv:
    """One test's AS: a state directory, its store (changed as the admin CLI would), server
    processes and device clients; :func:`as_env` checks them at teardown."""

    tmp: Path
    state: Path
    store: Store
    psks: dict[str, bytes] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    #: Secrets the test saw: no log line and no database byte may hold them.
    seen: list[bytes] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)
    servers: list[AsProcess] = field(default_factory=list)
    #: The store's database when it is not the state directory's SQLite file: (cluster, URL).
    postgres: tuple[PgCluster, str] | None = None

    async def device(self, device_id: str, role: str) -> bytes:
        self.psks[device_id] = await enroll(self.store, device_id, role)
        self.roles[device_id] = role
        return self.psks[device_id]

    def server(self, *args: str) -> AsProcess:
        server = AsProcess(self.state, self.tmp / f"as{len(self.servers)}.log", *args)
        server.start()
        self.servers.append(server)
        return server

    async def client(self, server: AsProcess, device_id: str, psk: bytes | None = None) -> Client:
        """A raw DTLS client (any request, malformed ones included)."""
        client = await Client.connect(server, device_id, psk or self.psks[device_id])
        self.clients.append(client)
        return client

    async def as_client(self, server: AsProcess, device_id: str) -> AsClient:
        """The device-side library client, with a bundle like the one enroll writes."""
        ca = x509.load_pem_x509_certificate((self.state / "ca.pem").read_bytes())
        bundle = Bundle(
            device_id, self.roles[device_id], server.uri, device_id, self.psks[device_id], ca
        )
        client = AsClient(bundle)
        await client.start()
        self.clients.append(client)
        return client

    def keep(self, *secrets: bytes) -> None:
        self.seen.extend(secrets)

    async def database_bytes(self) -> bytes:
        """The files that hold the database (PostgreSQL: its data files, catalog and WAL)."""
        if self.postgres is not None:
            cluster, url = self.postgres
            return await cluster.database_bytes(url)
        return b"".join(p.read_bytes() for p in sorted(self.state.glob("as.db*")))


@contextlib.asynccontextmanager
async def as_env(
    tmp_path: Path, postgres: tuple[PgCluster, str] | None = None
) -> AsyncIterator[AsEnv]:
    """An :class:`AsEnv` (on SQLite, or on the PostgreSQL database ``postgres`` names: (cluster,
    URL)); afterwards every server exited 0 on SIGTERM with no traceback, and no PSK or secret the
    test saw is in a log (raw or hex) or in the database files."""
    state = tmp_path / "state"
    await make_state(state, None if postgres is None else postgres[1])
    store = await Store.open(state)
    env = AsEnv(tmp_path, state, store, postgres=postgres)
    try:
        yield env
    finally:
        for client in env.clients:
            await client.close()
        await store.close()
        secrets = [*env.psks.values(), *env.seen]
        for server in env.servers:
            status = server.stop()
            text = server.log()
            assert status == 0, text
            assert "Traceback" not in text, text
            for secret in secrets:
                assert secret.hex() not in text
                assert repr(secret)[2:-1] not in text
        stored = await env.database_bytes()
        for secret in secrets:
            assert secret not in stored
            assert secret.hex().encode() not in stored


async def refused(client: Client, path: str, **query: Any) -> bool:
    """True if the request got no response at all (failed handshake, ended session) or 4.01."""
    try:
        response = await client.send(
            client.message(GET, path, query or None, transport_tuning=FastFail()), timeout=5
        )
    except (TimeoutError, NetworkError):
        return True
    return response.code.dotted == "4.01"


class Observation:
    """A ``/keys`` observation: the first response, then each notification (with its arrival,
    :func:`time.monotonic`, from :meth:`arrival`)."""

    def __init__(self, client: Client, resource_id: str) -> None:
        self.request = client.ctx.request(
            client.message(GET, "keys", {"r": resource_id}, observe=0)
        )
        self._notes = self.request.observation.__aiter__()

    async def first(self) -> tuple[str, Any]:
        response = await asyncio.wait_for(self.request.response, 10)
        return response.code.dotted, decode(response)

    async def next(self, timeout: float = 5.0) -> Any:
        return (await self.arrival(timeout))[1]

    async def arrival(self, timeout: float = 10.0) -> tuple[float, Any]:
        note = await asyncio.wait_for(self._notes.__anext__(), timeout)
        arrived = time.monotonic()
        assert note.code.dotted == "2.05"
        return arrived, decode(note)

    def cancel(self) -> None:
        self.request.observation.cancel()
