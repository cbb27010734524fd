"""A real AS, real producers' credentials and a stand-in producer for the consumer tests.

- :func:`build_world`: an AS state directory with a producer (``sensor-1``, with a certificate, two
  registered resources and their key state, all obtained over DTLS with :class:`AsClient` as the
  producer would), a second certified producer (``sensor-2``), consumers with and without grants,
  their bundle files (mode 0600, the JSON of ``oscar-as enroll``), and the running AS process.
- :class:`ProducerStandIn`: an aiocoap server on loopback serving protected objects at
  ``/<producer>/<path>`` with content format 18, ETag and Max-Age, observable; a stand-in for the
  real producer, which is written apart from the consumer.
- :class:`ForwardProxy`: a tiny forward proxy that requires Proxy-Uri and forwards the GET.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiocoap import GET, Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.resource import ObservableResource, Resource, Site
from as_harness import ROOT, AsProcess, enroll, free_port, make_state
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authz_server.store import Store
from oscar import AccessSecret, Sealer, certs, object_etag
from oscar.algorithms import PrivateKey
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

PRODUCER = "sensor-1"
OTHER_PRODUCER = "sensor-2"
REVOKED_PRODUCER = "sensor-3"  # certified, then revoked
READER = "reader-1"
FRESH_READER = "reader-2"  # granted, used by one test only: its audit trail shows what it asked
STRANGER = "stranger"  # enrolled, no grant
TEMPERATURE = f"{PRODUCER}/temperature"
HUMIDITY = f"{PRODUCER}/humidity"
CONTENT_FORMAT = 50  # application/json


def now() -> int:
    return int(time.time())


@dataclass
class World:
    """Everything the consumer tests share: one AS, its producers' keys, the consumers' bundles."""

    tmp: Path
    as_state: Path
    server: AsProcess
    bundles: dict[str, Path]
    psks: dict[str, bytes]
    producer_key: PrivateKey
    other_key: PrivateKey
    ca: x509.Certificate
    revoked_key: PrivateKey
    revoked_cert: bytes = b""
    secrets: dict[str, tuple[int, AccessSecret]] = field(default_factory=dict)
    next_epoch: dict[str, tuple[int, AccessSecret]] = field(default_factory=dict)
    _seq: int = 0

    def bundle(self, device_id: str) -> Path:
        return self.bundles[device_id]

    def sealer(
        self,
        resource_id: str = TEMPERATURE,
        *,
        key: PrivateKey | None = None,
        producer_id: str = PRODUCER,
        upcoming: bool = False,
    ) -> Sealer:
        epoch, secret = (self.next_epoch if upcoming else self.secrets)[resource_id]
        return Sealer(
            secret=secret,
            producer_id=producer_id,
            resource_id=resource_id,
            epoch=epoch,
            signing_key=key or self.producer_key,
        )

    def seal(
        self,
        plaintext: bytes,
        resource_id: str = TEMPERATURE,
        *,
        seq: int | None = None,
        lifetime: int = 600,
        age: int = 0,
        content_format: int = CONTENT_FORMAT,
        **sealer: Any,
    ) -> bytes:
        """An object of ``resource_id`` with a new seq (increasing across the whole module, so
        that any test's object is newer than every earlier test's) unless ``seq`` is given.
        It was issued ``age`` seconds ago and expires ``lifetime`` seconds after that."""
        if seq is None:
            self._seq += 1
            seq = self._seq
        t = now() - age
        return self.sealer(resource_id, **sealer).seal(
            seq=seq, iat=t, exp=t + lifetime, content_format=content_format, plaintext=plaintext
        )

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq


def write_bundle(
    path: Path, device_id: str, role: str, as_uri: str, psk: bytes, ca_pem: str
) -> Path:
    doc = {
        "id": device_id,
        "role": role,
        "as_uri": as_uri,
        "psk_identity": device_id,
        "psk_hex": psk.hex(),
        "ca_cert_pem": ca_pem,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    return path


async def _certify(client: AsClient, key: PrivateKey, device_id: str) -> bytes:
    csr = certs.make_csr(key, device_id).public_bytes(serialization.Encoding.DER)
    return await client.request_certificate(csr)


async def _prepare(tmp: Path) -> tuple[dict[str, bytes], Path]:
    state = tmp / "as-state"
    await make_state(state)
    store = await Store.open(state)
    try:
        psks = {
            device_id: await enroll(store, device_id, role)
            for device_id, role in [
                (PRODUCER, "producer"),
                (OTHER_PRODUCER, "producer"),
                (REVOKED_PRODUCER, "producer"),
                (READER, "consumer"),
                (FRESH_READER, "consumer"),
                (STRANGER, "consumer"),
                ("cache-1", "proxy"),
            ]
        }
        for reader in (READER, FRESH_READER):
            await store.add_grant(reader, f"{PRODUCER}/*", None, now())
    finally:
        await store.close()
    return psks, state


async def _producers(world: World) -> None:
    producer = AsClient(Bundle.load(world.bundle(PRODUCER)))
    other = AsClient(Bundle.load(world.bundle(OTHER_PRODUCER)))
    revoked = AsClient(Bundle.load(world.bundle(REVOKED_PRODUCER)))
    try:
        await _certify(producer, world.producer_key, PRODUCER)
        await _certify(other, world.other_key, OTHER_PRODUCER)
        world.revoked_cert = await _certify(revoked, world.revoked_key, REVOKED_PRODUCER)
        for rid in (TEMPERATURE, HUMIDITY):
            path = rid.split("/", 1)[1]
            await producer.register(
                path,
                content_format=CONTENT_FORMAT,
                profile="ccm-es256",
                max_age=60,
                rotation_period=0,
            )
            keys = await producer.keys(rid)
            assert keys.next is not None  # always set in a reply from the AS
            world.secrets[rid] = (keys.active.epoch, keys.active.secret)
            world.next_epoch[rid] = (keys.next.epoch, keys.next.secret)
    finally:
        for client in (producer, other, revoked):
            await client.close()
    store = await Store.open(world.as_state)
    try:
        await store.revoke_device(REVOKED_PRODUCER, now())
    finally:
        await store.close()


def build_world(tmp: Path) -> World:
    """Set up the AS and the producers (see the module docstring); the caller stops the server."""
    psks, as_state = asyncio.run(_prepare(tmp))
    server = AsProcess(as_state, tmp / "as.log")
    server.start()
    ca_pem = (as_state / "ca.pem").read_text()
    roles = {
        PRODUCER: "producer",
        OTHER_PRODUCER: "producer",
        REVOKED_PRODUCER: "producer",
        "cache-1": "proxy",
    }
    bundles = {
        device_id: write_bundle(
            tmp / f"{device_id}.json",
            device_id,
            roles.get(device_id, "consumer"),
            server.uri,
            psk,
            ca_pem,
        )
        for device_id, psk in psks.items()
    }
    world = World(
        tmp=tmp,
        as_state=as_state,
        server=server,
        bundles=bundles,
        psks=psks,
        producer_key=certs.generate_signing_key(),
        other_key=certs.generate_signing_key(),
        revoked_key=certs.generate_signing_key(),
        ca=x509.load_pem_x509_certificate(ca_pem.encode()),
    )
    try:
        asyncio.run(_producers(world))
    except BaseException:
        server.stop()
        raise
    return world


# --- the stand-in producer -----------------------------------------------------------------------


class ObjectResource(ObservableResource):
    """One resource: serves the latest published object (or an error code), observable."""

    def __init__(self) -> None:
        super().__init__()
        self.data: bytes | None = None
        self.etag = b""
        self.error: Code | None = None
        self.requests = 0
        self.observed = asyncio.Event()

    def publish(self, data: bytes, etag: bytes = b"\0" * 8) -> None:
        self.data, self.etag, self.error = data, etag, None
        self.updated_state()

    def fail(self, code: Code) -> None:
        """Answer ``code`` from now on; observers get it as their last notification."""
        self.error = code
        self.updated_state()

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        await super().add_observation(request, serverobservation)
        self.observed.set()

    async def render_get(self, request: Message) -> Message:
        self.requests += 1
        if self.error is not None or self.data is None:
            return Message(code=self.error or Code.NOT_FOUND)
        response = Message(payload=self.data, content_format=18)
        response.opt.etag = self.etag
        response.opt.max_age = 60
        return response


class ProducerStandIn:
    """An aiocoap server on 127.0.0.1 with one :class:`ObjectResource` per resource id."""

    def __init__(self) -> None:
        self.site = Site()
        self.resources: dict[str, ObjectResource] = {}
        self.port = 0
        self.ctx: Context | None = None

    async def start(self) -> ProducerStandIn:
        self.port = free_port()
        self.ctx = await Context.create_server_context(
            self.site, bind=("127.0.0.1", self.port), transports=["udp6"]
        )
        return self

    def resource(self, resource_id: str) -> ObjectResource:
        if resource_id not in self.resources:
            self.resources[resource_id] = ObjectResource()
            self.site.add_resource(tuple(resource_id.split("/")), self.resources[resource_id])
        return self.resources[resource_id]

    def publish(self, resource_id: str, data: bytes) -> None:
        """Serve ``data`` at ``/<resource_id>``; the ETag is the object's, as a producer's."""
        from oscar import ProtectedObject

        try:
            m = ProtectedObject.from_bytes(data).metadata
            etag = object_etag(m.resource_id, m.epoch, m.seq)
        except Exception:  # a deliberately broken object
            etag = b"\0" * 8
        self.resource(resource_id).publish(data, etag)

    def uri(self, resource_id: str = TEMPERATURE) -> str:
        return f"coap://127.0.0.1:{self.port}/{resource_id}"

    @property
    def address(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.ctx is not None:
            await self.ctx.shutdown()


class ForwardProxy(Resource):
    """A forward proxy in a few lines: refuses requests without Proxy-Uri, forwards the GET."""

    def __init__(self) -> None:
        super().__init__()
        self.forwarded: list[str] = []
        self.port = 0
        self.server: Context | None = None
        self.client: Context | None = None

    async def start(self) -> ForwardProxy:
        self.port = free_port()
        self.client = await Context.create_client_context(transports=["udp6"])
        self.server = await Context.create_server_context(
            self, bind=("127.0.0.1", self.port), transports=["udp6"]
        )
        return self

    async def render(self, request: Message) -> Message:
        target = request.opt.proxy_uri
        if target is None or request.code != GET:
            return Message(code=Code.BAD_REQUEST)
        assert self.client is not None
        self.forwarded.append(target)
        upstream = await asyncio.wait_for(
            self.client.request(Message(code=GET, uri=target)).response, 5
        )
        response = Message(code=upstream.code, payload=upstream.payload)
        response.opt.content_format = upstream.opt.content_format
        response.opt.etag = upstream.opt.etag
        return response

    @property
    def address(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    async def close(self) -> None:
        for ctx in (self.server, self.client):
            if ctx is not None:
                await ctx.shutdown()


@dataclass(frozen=True)
class Result:
    """What one ``python -m consumer`` run gave."""

    code: int
    out: bytes
    err: str

    @property
    def error(self) -> str:
        """The one error line (and checks that it is one line)."""
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        match = ERROR_LINE.match(lines[0])
        assert match is not None, self.err
        return lines[0][match.end() :]


#: The start of the consumer CLI's one-line errors.
ERROR_LINE = re.compile(r"oscar-consumer(?: [a-z]+)?: error: ")


async def cli(
    world: World, state: Path | None, *args: str, bundle: Path | None = None, timeout: float = 60
) -> Result:
    """Run ``python -m consumer`` with the reader's bundle (unless told otherwise); killed after
    ``timeout``. Checks that no PSK of the world reached its stderr."""
    argv = ["--bundle", str(bundle or world.bundle(READER))]
    if state is not None:
        argv += ["--state", str(state)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        *argv,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    text = err.decode()
    for psk in world.psks.values():
        assert psk.hex() not in text
    return Result(proc.returncode, out, text)
