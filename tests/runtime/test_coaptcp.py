"""CoAP over TCP and TLS (oscar_io.coaptcp) with real aiocoap contexts on loopback: the same bytes
as over UDP in BERT blocks, mutual TLS under one CA refusing everyone else, bounds, ports."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import GET, Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.resource import Resource, Site
from as_harness import free_port
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from oscar import certs
from oscar_io import coaptcp, tcproute
from oscar_io.coaperrors import TransportError
from oscar_io.ports import PortInUse

OBJECT = os.urandom((1 << 20) + 4321)  # a MiB and a bit: two BERT blocks


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str = "OSCAR AS CA") -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        cert = certs.make_ca_certificate(
            key, name, serial=1, not_before=now - 60, not_after=now + 3600
        )
        return cls(key, cert)

    def issue(self, device_id: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a device, as the AS issues them (oscar.certs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        cert = certs.issue_certificate(
            certs.make_csr(key, device_id),
            device_id,
            self.cert,
            self.key,
            serial=int.from_bytes(os.urandom(8), "big"),
            not_before=now - 60,
            not_after=now + 3600,
        )
        return cert.public_bytes(Encoding.PEM), certs.private_key_pem(key)


class Blob(Resource):  # type: ignore[misc]
    """The object, block-wise as aiocoap serves it; records the Block2 option of every request."""

    def __init__(self, payload: bytes = OBJECT, size2: int | None = None) -> None:
        super().__init__()
        self.blocks: list[tuple[str, Any]] = []
        self.payload, self.size2 = payload, size2

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        self.blocks.append((getattr(request.remote, "scheme", "coap"), request.opt.block2))
        await super().render_to_pipe(pipe)

    async def render_get(self, request: Message) -> Message:
        response = Message(code=Code.CONTENT, payload=self.payload, etag=b"e1", content_format=18)
        if self.size2 is not None:
            response.opt.size2 = self.size2
        return response


@dataclass
class Server:
    port: int
    blob: Blob
    ca: Ca
    udp: Any
    tcp: Any


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca.make()


@pytest_asyncio.fixture
async def server(ca: Ca) -> AsyncIterator[Server]:
    blob = Blob()
    site = Site()
    site.add_resource(("blob",), blob)
    port = free_port()
    tls = coaptcp.server_tls(*ca.issue("sensor-1"), ca.cert)
    udp = await Context.create_server_context(site, bind=("127.0.0.1", port), transports=["udp6"])
    tcp = await coaptcp.serve(site, "127.0.0.1", port, tcp=True, tls=tls)
    try:
        yield Server(port, blob, ca, udp, tcp)
    finally:
        await tcp.shutdown()
        await udp.shutdown()


async def get(
    uri: str,
    tls: Any = None,
    *,
    max_size: int = 4 << 20,
    expect_device: str | None = None,
) -> Message:
    context = await coaptcp.client_context(tls)
    try:
        return await coaptcp.fetch(
            context,
            Message(code=GET, uri=uri),
            max_size=max_size,
            timeout=5.0,
            peer=uri,
            expect_device=expect_device,
        )
    finally:
        await context.shutdown()


@pytest.mark.asyncio
async def test_a_large_object_over_tcp_and_tls_is_the_same_bytes_as_over_udp(
    server: Server,
) -> None:
    udp = await Context.create_client_context(transports=["udp6"])
    try:
        over_udp = await udp.request(
            Message(code=GET, uri=f"coap://127.0.0.1:{server.port}/blob")
        ).response
    finally:
        await udp.shutdown()
    assert over_udp.payload == OBJECT
    server.blob.blocks.clear()

    plain = await get(coaptcp.tcp_uri(f"coap://127.0.0.1:{server.port}/blob"))
    cert, key = server.ca.issue("proxy-1")
    tls = coaptcp.client_tls(server.ca.cert, cert, key)
    secured = await get(
        coaptcp.tcp_uri(f"coap://127.0.0.1:{server.port}/blob", tls=True),
        tls,
        expect_device="sensor-1",
    )
    for response in (plain, secured):
        assert response.code == Code.CONTENT
        assert response.payload == over_udp.payload == OBJECT
        assert response.opt.etag == b"e1" and response.opt.block2 is None
    # Two BERT blocks each (szx 7, 1023 KiB and the rest), not 1,029 blocks of 1 KiB.
    schemes = [scheme for scheme, _ in server.blob.blocks]
    assert schemes == ["coap+tcp"] * 2 + ["coaps+tcp"] * 2
    later = [block2 for _, block2 in server.blob.blocks if block2 is not None]
    assert [(b.block_number, b.size_exponent) for b in later] == [(1023, 7), (1023, 7)]


@pytest.mark.asyncio
async def test_tls_server_refuses_a_client_without_a_certificate_of_the_as_ca(
    server: Server,
) -> None:
    uri = coaptcp.tcp_uri(f"coap://127.0.0.1:{server.port}/blob", tls=True)
    with pytest.raises(TransportError):  # no client certificate at all
        await get(uri, coaptcp.client_tls(server.ca.cert))
    stranger = Ca.make("another CA")
    with pytest.raises(TransportError):  # a certificate of another CA
        await get(uri, coaptcp.client_tls(server.ca.cert, *stranger.issue("proxy-1")))
    assert server.blob.blocks == []  # no request reached the resource


@pytest.mark.asyncio
async def test_client_refuses_a_server_of_another_ca_or_another_device(ca: Ca) -> None:
    stranger = Ca.make("another CA")
    site = Site()
    blob = Blob()
    site.add_resource(("blob",), blob)
    port = free_port()
    # The server trusts our CA for clients, but presents a certificate of another CA.
    tls = coaptcp.server_tls(*stranger.issue("sensor-1"), ca.cert)
    context = await coaptcp.serve(site, "127.0.0.1", port, tcp=False, tls=tls)
    try:
        uri = coaptcp.tcp_uri(f"coap://127.0.0.1:{port}/blob", tls=True)
        tls = coaptcp.client_tls(ca.cert, *ca.issue("proxy-1"))
        with pytest.raises(TransportError, match="certificate verify failed"):
            await get(uri, tls)
        assert blob.blocks == []
    finally:
        await context.shutdown()


@pytest.mark.asyncio
async def test_the_tls_peer_must_be_the_device_expected(server: Server) -> None:
    uri = coaptcp.tcp_uri(f"coap://127.0.0.1:{server.port}/blob", tls=True)
    tls = coaptcp.client_tls(server.ca.cert, *server.ca.issue("proxy-1"))
    with pytest.raises(TransportError, match="is not sensor-2"):
        await get(uri, tls, expect_device="sensor-2")


@pytest.mark.asyncio
async def test_the_size_limit_holds_over_tcp(server: Server) -> None:
    uri = coaptcp.tcp_uri(f"coap://127.0.0.1:{server.port}/blob")
    with pytest.raises(coaptcp.BrokenBert, match="size limit"):
        await get(uri, max_size=512 << 10)  # the first BERT block is 1023 KiB
    assert len(server.blob.blocks) == 1  # the second block was never asked for
    with pytest.raises(coaptcp.BrokenBert, match="size limit"):
        await get(uri, max_size=1 << 20)  # the object is a MiB and a bit: its second block
    assert len(server.blob.blocks) == 3


@pytest.mark.asyncio
async def test_nothing_listening_on_tcp_is_a_transport_error_at_once() -> None:
    uri = f"coap+tcp://127.0.0.1:{free_port()}/blob"
    started = time.monotonic()
    with pytest.raises(TransportError):
        await get(uri)
    assert time.monotonic() - started < 2.0


@pytest.mark.asyncio
async def test_a_tcp_port_in_use_is_refused_before_binding() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(PortInUse, match=r"TCP port 127\.0\.0\.1:"):
            await coaptcp.serve(Site(), "127.0.0.1", port, tcp=True)


def test_tcp_uris_keep_the_port_number_and_tls_takes_the_next() -> None:
    assert coaptcp.tcp_uri("coap://h/a/b") == "coap+tcp://h:5683/a/b"
    assert coaptcp.tcp_uri("coap://h:7000/a/b", tls=True) == "coaps+tcp://h:7001/a/b"
    assert coaptcp.tcp_uri("coap://[::1]:7000/a") == "coap+tcp://[::1]:7000/a"
    with pytest.raises(ValueError):
        coaptcp.tcp_uri("coaps://h/a")


def test_a_key_that_does_not_match_the_certificate_is_refused(ca: Ca) -> None:
    cert, _ = ca.issue("sensor-1")
    _, other_key = ca.issue("sensor-1")
    with pytest.raises(ValueError, match="do not load"):
        coaptcp.server_tls(cert, other_key, ca.cert)


@pytest.mark.asyncio
async def test_no_listener_asked_for_is_an_error() -> None:
    with pytest.raises(ValueError):
        await coaptcp.serve(Site(), "127.0.0.1", free_port(), tcp=False)
    await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_with_size2_several_bert_blocks_are_in_flight_and_a_short_announce_is_refused(
    ca: Ca,
) -> None:
    big = os.urandom(5 << 20)
    honest, short, huge = Blob(big, len(big)), Blob(big, 2 << 20), Blob(big, 64 << 20)
    site = Site()
    site.add_resource(("honest",), honest)
    site.add_resource(("short",), short)
    site.add_resource(("huge",), huge)
    port = free_port()
    context = await coaptcp.serve(site, "127.0.0.1", port, tcp=True)
    try:
        response = await get(f"coap+tcp://127.0.0.1:{port}/honest", max_size=8 << 20)
        assert response.payload == big
        numbers = [b.block_number for _, b in honest.blocks if b is not None]
        assert numbers == [1023 * k for k in range(1, 6)]  # 5 MiB + 0: blocks of 1023 KiB
        with pytest.raises(coaptcp.BrokenBert, match="more than the size it announced"):
            await get(f"coap+tcp://127.0.0.1:{port}/short", max_size=8 << 20)
        with pytest.raises(coaptcp.BrokenBert, match="announced"):
            await get(f"coap+tcp://127.0.0.1:{port}/huge", max_size=8 << 20)
        assert len(huge.blocks) == 1  # refused on its first block's Size2
    finally:
        await context.shutdown()


@pytest.mark.asyncio
async def test_a_wildcard_listener_serves_ipv4_and_ipv6_clients() -> None:
    """asyncio would bind ``::`` v6-only: the wildcard becomes every family, as UDP's is."""
    site = Site()
    blob = Blob(b"small", None)
    site.add_resource(("blob",), blob)
    port = free_port()
    context = await coaptcp.serve(site, "::", port, tcp=True)
    try:
        for host in ("127.0.0.1", "[::1]"):
            assert (await get(f"coap+tcp://{host}:{port}/blob")).payload == b"small"
    finally:
        await context.shutdown()


def connections(context: Any) -> int:
    for interface in context.request_interfaces:
        pool = getattr(interface.token_interface, "_pool", None)
        if pool is not None:
            return len(pool)
    raise AssertionError("no TCP listener")


@pytest.mark.asyncio
async def test_a_route_keeps_connections_to_a_bounded_number_of_peers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_PEERS distinct peers, a Route closes every connection it holds (aiocoap keeps
    them until the peer closes): a forward proxy's clients cannot make it hold unboundedly many."""
    monkeypatch.setattr(tcproute, "MAX_PEERS", 2)
    blob = Blob(b"\xd2" * 3000, 3000)
    site = Site()
    site.add_resource(("blob",), blob)
    servers = []
    route = tcproute.Route(0, timeout=5.0, max_size=1 << 20)
    try:
        for _ in range(3):
            port = free_port()
            servers.append(await coaptcp.serve(site, "127.0.0.1", port, tcp=True))
            uri = f"coap+tcp://127.0.0.1:{port}/blob"
            got = await route.fetch(Message(code=GET, uri=uri), f"127.0.0.1:{port}", "blob")
            assert got is not None and got.payload == blob.payload
        assert route.fetched == 3
        deadline = time.monotonic() + 5.0
        while connections(servers[0]) or connections(servers[1]):  # released by the route
            assert time.monotonic() < deadline, "the first peers' connections stay open"
            await asyncio.sleep(0.02)
        assert connections(servers[2]) == 1
    finally:
        await route.close()
        for server in servers:
            await server.shutdown()


@pytest.mark.asyncio
async def test_with_a_sink_blocks_go_there_and_a_failure_after_the_first_is_not_a_fall_back() -> (
    None
):
    """A consumer spooling a large object (consumer.spool) takes its BERT blocks as they come:
    the answer's payload stays empty. Once the sink has had bytes, a broken transfer is raised:
    falling back to UDP would feed the sink the object again from its start."""
    big = os.urandom(3 << 20)
    site = Site()
    site.add_resource(("honest",), Blob(big, len(big)))
    site.add_resource(("short",), Blob(big, 2 << 20))  # announces less than it sends
    site.add_resource(("whole",), Blob(b"one message", None))
    port = free_port()
    context = await coaptcp.serve(site, "127.0.0.1", port, tcp=True)
    route = tcproute.Route(0, timeout=5.0, max_size=8 << 20)
    try:
        for path, expected in (("honest", big), ("whole", b"one message")):
            pieces: list[bytes] = []
            message = Message(code=GET, uri=f"coap+tcp://127.0.0.1:{port}/{path}")
            answer = await route.fetch(message, f"127.0.0.1:{port}", path, pieces.append)
            assert answer is not None and answer.payload == b""
            assert b"".join(pieces) == expected
            assert max(len(p) for p in pieces) <= 1023 << 10  # a BERT block at most
        fed: list[bytes] = []
        message = Message(code=GET, uri=f"coap+tcp://127.0.0.1:{port}/short")
        with pytest.raises(coaptcp.BrokenBert, match="more than the size it announced"):
            await route.fetch(message, f"127.0.0.1:{port}", "short", fed.append)
        assert fed  # it had bytes: raised, not None (UDP would start the sink over)
        assert route.fallbacks == 1
    finally:
        await route.close()
        await context.shutdown()
