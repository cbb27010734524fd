"""Large objects over CoAP over TCP and TLS end to end: a real AS, an embedded producer serving UDP,
TCP and TLS, consumers choosing TCP by the announced size and falling back to UDP, and TLS with
certificates the AS issued."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import GET, PUT, Context, Message
from aiocoap.numbers.codes import Code
from as_harness import free_port
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from proxy_harness import ProxyProcess
from system_harness import Deployment, coap_get

from consumer import Consumer
from oscar import certs
from oscar_io import coaptcp
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from oscar_io.coaperrors import TransportError
from producer import Producer, ProducerConfig, PublishTarget, ResourceSpec

IMAGE = os.urandom(1 << 20)  # 1 MiB: well above the TCP threshold
SMALL = os.urandom(8 << 10)  # 8 KiB: block-wise over UDP, below the threshold
BIG = os.urandom(3 << 20)  # 3 MiB: past the consumer's spool threshold (1 MiB)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("tcp"))
    d.enroll("consumer", "reader")
    d.enroll("producer", "camera-client")  # known to the AS from its start (no race)
    d.enroll("producer", "camera-revoked")
    d.start_as()
    yield d
    d.close()


@dataclass
class Served:
    producer: Producer
    port: int
    reader: Path

    def uri(self, path: str) -> str:
        return f"coap://127.0.0.1:{self.port}/{self.producer.device_id}/{path}"


_count = iter(range(100))


async def start_producer(d: Deployment, tmp: Path, *, tcp: bool, tls: bool) -> Served:
    device_id = f"camera-{next(_count)}"
    port = free_port()
    bundle = d.enroll("producer", device_id)
    d.grant("reader", f"{device_id}/*")
    config = ProducerConfig(
        bundle=bundle,
        state=tmp / device_id,
        listen=("127.0.0.1", port),
        resources=[
            ResourceSpec("image", content_format=42, profile="a128gcm-es256"),
            ResourceSpec("small", content_format=42, profile="a128gcm-es256"),
            ResourceSpec("big", content_format=42, profile="a128gcm-es256"),
        ],
        tcp=tcp,
        tls=tls,
    )
    producer = Producer(config)
    await producer.start()
    sealed = {path: asyncio.Event() for path in ("image", "small", "big")}
    for path, event in sealed.items():
        producer.resources[path].on_change.append(lambda *_, e=event: e.set())  # type: ignore[misc]
    producer.update("image", IMAGE)
    producer.update("small", SMALL)
    producer.update("big", BIG)
    for path, event in sealed.items():  # sealed once the AS has given the secret
        if producer.resources[path].obj is None:
            await asyncio.wait_for(event.wait(), 10)
    return Served(producer, port, d.root / "reader.json")


@pytest_asyncio.fixture
async def served(deployment: Deployment, tmp_path: Path) -> AsyncIterator[Served]:
    s = await start_producer(deployment, tmp_path, tcp=True, tls=True)
    try:
        yield s
    finally:
        await s.producer.stop()


@pytest.mark.asyncio
async def test_a_large_object_comes_over_tcp_and_opens_as_over_udp(served: Served) -> None:
    async with Consumer(served.reader, tcp_threshold=None) as udp_only:
        over_udp = await udp_only.get(served.uri("image"))
        assert udp_only.tcp.fetched == 0
    async with Consumer(served.reader) as consumer:  # the default threshold: 32 KiB
        over_tcp = await consumer.get(served.uri("image"))
        assert consumer.tcp.fetched == 1 and consumer.tcp.fallbacks == 0
        small = await consumer.get(served.uri("small"))  # 8 KiB, announced: stays on UDP
        assert consumer.tcp.fetched == 1
    assert over_tcp.plaintext == over_udp.plaintext == IMAGE
    assert over_tcp.metadata == over_udp.metadata
    assert small.plaintext == SMALL
    async with Consumer(served.reader, tcp_threshold=0) as eager:  # every block-wise object
        assert (await eager.get(served.uri("small"))).plaintext == SMALL
        assert eager.tcp.fetched == 1


@pytest.mark.asyncio
async def test_an_object_past_the_spool_threshold_comes_over_tcp_into_the_spool(
    served: Served, tmp_path: Path
) -> None:
    """Over TCP as over UDP, a large object's BERT blocks go to the spool as they arrive
    (consumer.spool; nothing held whole), and get_file writes the plaintext once it is checked."""
    async with Consumer(served.reader) as consumer:
        out = tmp_path / "big.bin"
        metadata = await consumer.get_file(served.uri("big"), out)
        assert consumer.tcp.fetched == 1 and consumer.tcp.fallbacks == 0
        assert out.read_bytes() == BIG and metadata.resource_id.endswith("/big")
    async with Consumer(served.reader, tcp_threshold=None) as udp_only:
        assert (await udp_only.get(served.uri("big"))).plaintext == BIG


@pytest.mark.asyncio
async def test_without_tcp_at_the_producer_the_consumer_falls_back_to_udp(
    deployment: Deployment, tmp_path: Path
) -> None:
    served = await start_producer(deployment, tmp_path, tcp=False, tls=False)
    try:
        async with Consumer(served.reader) as consumer:
            assert (await consumer.get(served.uri("image"))).plaintext == IMAGE
            assert consumer.tcp.fetched == 0 and consumer.tcp.fallbacks == 1
            # The refused peer rests: the next large object does not try TCP again.
            assert (await consumer.get(served.uri("image"))).plaintext == IMAGE
            assert consumer.tcp.fallbacks == 1
    finally:
        await served.producer.stop()


async def as_certificate(bundle: Bundle) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) the AS issues the device over DTLS, as a producer asks."""
    key = certs.generate_signing_key()
    async with AsClient(bundle) as client:
        der = await client.request_certificate(
            certs.make_csr(key, bundle.device_id).public_bytes(Encoding.DER)
        )
    pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
    return pem, certs.private_key_pem(key)


@pytest.mark.asyncio
async def test_a_put_over_tls_with_a_revoked_certificate_is_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The TLS handshake checks the chain only; the proxy checks the CRL before a PUT over TLS
    (a device revoked after its certificate was issued: 4.03, before any look at the object)."""
    bundle = Bundle.load(deployment.root / "camera-revoked.json")
    cert_pem, key_pem = await as_certificate(bundle)
    deployment.admin("revoke", "--device", "camera-revoked")
    proxy = ProxyProcess(deployment.enroll("proxy", "proxy-crl"), tmp_path / "proxy", "--tls")
    proxy.start()
    context = await coaptcp.client_context(
        coaptcp.client_tls(bundle.ca_certificate, cert_pem, key_pem)
    )
    try:
        uri = coaptcp.tcp_uri(proxy.uri("camera-revoked/image"), tls=True)
        put = Message(code=PUT, uri=uri, payload=b"\xd2" * 40, content_format=18)
        answer = await coaptcp.put(context, put, timeout=5.0, peer=uri, expect_device="proxy-crl")
        assert answer.code == Code.FORBIDDEN
    finally:
        await context.shutdown()
        proxy.stop()
    assert "certificate revoked" in proxy.log()


@pytest.mark.asyncio
async def test_tls_with_certificates_the_as_issued(
    deployment: Deployment, served: Served, tmp_path: Path
) -> None:
    """A device holding a certificate from the AS CA (here a producer's, asked for over DTLS as
    a producer does) fetches over coaps+tcp and checks the server is the producer; a client
    without one is refused in the handshake."""
    bundle = Bundle.load(deployment.root / "camera-client.json")
    cert_pem, key_pem = await as_certificate(bundle)
    rid_uri = served.uri("image")
    udp = await Context.create_client_context(transports=["udp6"])
    try:
        raw_udp = (await udp.request(Message(code=GET, uri=rid_uri)).response).payload
    finally:
        await udp.shutdown()
    tls_uri = coaptcp.tcp_uri(rid_uri, tls=True)
    good = await coaptcp.client_context(
        coaptcp.client_tls(bundle.ca_certificate, cert_pem, key_pem)
    )
    anonymous = await coaptcp.client_context(coaptcp.client_tls(bundle.ca_certificate))
    try:
        response = await coaptcp.fetch(
            good,
            Message(code=GET, uri=tls_uri),
            max_size=4 << 20,
            timeout=5.0,
            peer=tls_uri,
            expect_device=served.producer.device_id,
        )
        assert response.payload == raw_udp  # the same protected bytes
        with pytest.raises(TransportError):
            await coaptcp.fetch(
                anonymous, Message(code=GET, uri=tls_uri), max_size=4 << 20, timeout=5.0, peer="p"
            )
    finally:
        await good.shutdown()
        await anonymous.shutdown()


def tcp_connections(producer: Producer) -> int:
    """Connections the producer's CoAP over TCP listener holds now."""
    for interface in producer.server.tcp.request_interfaces:
        pool = getattr(interface.token_interface, "_pool", None)
        if pool is not None:
            return len(pool)
    raise AssertionError("no TCP listener")


@pytest.mark.asyncio
async def test_the_proxy_serves_a_large_object_over_tcp_and_refuses_a_put_there(
    deployment: Deployment, served: Served, tmp_path: Path
) -> None:
    """A proxy with ``--tcp``: its upstream fetch of the large object goes over TCP (the
    producer offers it), the consumer's first block comes over UDP (with the Echo challenge),
    the object over TCP from the proxy's cache, the same plaintext; a PUT over TCP has no DTLS
    identity and is refused."""
    rid = f"{served.producer.device_id}/image"
    proxy = ProxyProcess(
        deployment.enroll("proxy", "proxy-tcp"),
        tmp_path / "proxy",
        "--tcp",
        "--reverse",
        f"{served.producer.device_id}=coap://127.0.0.1:{served.port}",
    )
    proxy.start()
    try:
        assert tcp_connections(served.producer) == 0
        async with Consumer(served.reader) as consumer:
            reading = await consumer.get(proxy.uri(rid))
            assert reading.plaintext == IMAGE
            assert consumer.tcp.fetched == 1 and consumer.tcp.fallbacks == 0
            # As a forward proxy: the same Proxy-Uri to the proxy's TCP port.
            forwarded = await consumer.get(served.uri("image"), proxy=proxy.address)
            assert forwarded.plaintext == IMAGE and consumer.tcp.fetched == 2
        assert tcp_connections(served.producer) == 1  # the proxy's, kept for the next fetch
        context = await coaptcp.client_context()
        try:
            put = Message(
                code=PUT,
                uri=coaptcp.tcp_uri(proxy.uri(rid)),
                payload=b"\xd2" * 40,
                content_format=18,
            )
            answer = await coaptcp.fetch(context, put, max_size=1 << 20, timeout=5.0, peer="p")
            assert answer.code == Code.FORBIDDEN
        finally:
            await context.shutdown()
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


@pytest.mark.asyncio
async def test_a_producer_publishes_a_large_object_to_the_proxy_over_tls(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A proxy with ``--tls`` (its certificate issued by the AS at start) takes a 1 MiB object
    PUT over TLS by its owner (the producer's AS certificate), serves it (over TCP to the
    consumer), refuses a PUT over TLS from a certified device that does not own the resource,
    and a client without a certificate in the handshake."""
    proxy = ProxyProcess(
        deployment.enroll("proxy", "proxy-tls"), tmp_path / "proxy", "--tcp", "--tls"
    )
    proxy.start()
    device_id = f"camera-{next(_count)}"
    bundle = deployment.enroll("producer", device_id)
    deployment.grant("reader", f"{device_id}/*")
    producer = Producer(
        ProducerConfig(
            bundle=bundle,
            state=tmp_path / device_id,
            resources=[ResourceSpec("image", content_format=42, profile="a128gcm-es256")],
            publish=[PublishTarget(proxy.secure_address, proxy="proxy-tls")],
        )
    )
    rid = f"{device_id}/image"
    try:
        await producer.start()
        producer.update("image", IMAGE)
        publisher = producer._publisher
        for _ in range(200):  # no event to await in another process: poll, 10 s at most
            if publisher.published_tls[0] or publisher.failures[0]:
                break
            await asyncio.sleep(0.05)
        assert publisher.published_tls == [1] and publisher.failures == [0]
        async with Consumer(deployment.root / "reader.json") as consumer:
            assert (await consumer.get(proxy.uri(rid))).plaintext == IMAGE
            assert consumer.tcp.fetched == 1
        client = Bundle.load(deployment.root / "camera-client.json")
        cert_pem, key_pem = await as_certificate(client)
        uri = coaptcp.tcp_uri(proxy.uri(rid), tls=True)
        stranger = await coaptcp.client_context(
            coaptcp.client_tls(client.ca_certificate, cert_pem, key_pem)
        )
        anonymous = await coaptcp.client_context(coaptcp.client_tls(client.ca_certificate))
        try:
            put = Message(code=PUT, uri=uri, payload=b"\xd2" * 40, content_format=18)
            answer = await coaptcp.put(
                stranger, put, timeout=5.0, peer=uri, expect_device="proxy-tls"
            )
            assert answer.code == Code.FORBIDDEN  # certified, but not the owner
            with pytest.raises(TransportError):
                await coaptcp.put(anonymous, put, timeout=5.0, peer=uri)
        finally:
            await stranger.shutdown()
            await anonymous.shutdown()
    finally:
        await producer.stop()
        proxy.stop()
    assert "Traceback" not in proxy.log()


#: Larger than anything the proxy may hold whole for a transfer: its memory must not follow it.
HUGE = os.urandom(40 << 20)


async def huge_producer(d: Deployment, tmp: Path, device_id: str, **config: Any) -> Producer:
    """An embedded producer of ``huge`` (40 MiB), sealed once started."""
    bundle = d.enroll("producer", device_id)
    d.grant("reader", f"{device_id}/*")
    spec = ResourceSpec("huge", content_format=42, profile="a128gcm-es256")
    producer = Producer(
        ProducerConfig(bundle=bundle, state=tmp / device_id, resources=[spec], **config)
    )
    await producer.start()
    sealed = asyncio.Event()
    producer.resources["huge"].on_change.append(lambda *_: sealed.set())  # type: ignore[misc]
    producer.update("huge", HUGE)
    await asyncio.wait_for(sealed.wait(), 20)
    return producer


@pytest.mark.asyncio
async def test_the_proxy_passes_a_40_mib_object_in_bounded_memory(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A 40 MiB object (``limits.max_object_size`` 64 MiB + 4 KiB) goes through the proxy both
    ways a proxy takes objects: fetched from its producer over TCP (BERT), and PUT by its owner
    over TLS. Each is spooled to disk as it arrives and checked as it passes, kept there sealed
    (no run of the object's bytes in the proxy's state), and served from there over TCP to a
    consumer that opens it; the proxy's peak memory grows by well under half the object (had
    it held the object whole, at least all of it)."""
    config = tmp_path / "proxy.toml"
    config.write_text("[limits]\nmax_object_size = 67112960\n")
    port = free_port()
    proxy = ProxyProcess(
        deployment.enroll("proxy", "proxy-huge"),
        tmp_path / "proxy",
        "--config",
        str(config),
        "--tcp",
        "--tls",
        "--reverse",
        f"huge-fetched=coap://127.0.0.1:{port}",
    )
    proxy.start()
    producers = []
    try:
        served = await huge_producer(
            deployment, tmp_path, "huge-fetched", listen=("127.0.0.1", port), tcp=True
        )
        producers.append(served)
        proxy.reset_peak()
        before = proxy.rss_kib()
        async with Consumer(deployment.root / "reader.json") as consumer:
            fetched = await consumer.get(proxy.uri(f"{served.device_id}/huge"))
            assert fetched.plaintext == HUGE and consumer.tcp.fetched == 1
            target = PublishTarget(proxy.secure_address, proxy="proxy-huge")
            publishing = await huge_producer(
                deployment, tmp_path, "huge-published", publish=[target]
            )
            producers.append(publishing)
            publisher = publishing._publisher
            for _ in range(400):  # no event to await in another process: poll, 20 s at most
                if publisher.published_tls[0] or publisher.failures[0]:
                    break
                await asyncio.sleep(0.05)
            assert publisher.published_tls == [1] and publisher.failures == [0]
            published = await consumer.get(proxy.uri(f"{publishing.device_id}/huge"))
            assert published.plaintext == HUGE and consumer.tcp.fetched == 2
        grown = proxy.rss_kib("VmHWM") - before
        assert grown < len(HUGE) // 2 // 1024, f"the proxy's peak memory grew by {grown} KiB"
        objects = [p.resources["huge"].obj for p in producers]
        bodies = sorted((tmp_path / "proxy" / "large").iterdir())
        assert len(bodies) == 2
        stats = json.loads((await coap_get(proxy.uri(".well-known/oscar-stats"))).payload)
        assert stats["large_entries"] == 2
        assert stats["large_bytes"] == sum(path.stat().st_size for path in bodies)
        for path in bodies:
            stored = path.read_bytes()
            assert len(stored) > len(HUGE)
            for obj in objects:
                assert obj is not None
                assert obj[4096:4160] not in stored and obj[-200:-136] not in stored
    finally:
        for producer in producers:
            await producer.stop()
        proxy.stop()
    assert "Traceback" not in proxy.log()
