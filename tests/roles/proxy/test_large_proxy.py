"""Large objects through the proxy (issue 7), real processes on loopback against a real AS.

A 1 MiB object (A128GCM: AES-CCM stops at 64 KiB) travels block-wise from a stand-in producer
through the proxy to a consumer, which verifies and decrypts it; the second reading is a hit.
The proxy assembles an upstream Block2 transfer itself, a fetch or a block-wise notification of
its upstream observation: never past the largest object there can be, and never from blocks that
do not belong together (out of order, another ETag).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import ACK, GET, NON, Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography.hazmat.primitives import serialization
from proxy_harness import CountingRelay, ProxyProcess, StandIn
from system_harness import Deployment, coap_get, wait_until

from consumer import Consumer
from oscar import Sealer, certs, profile_by_name
from oscar.objects import DEFAULT_MAX_OBJECT_SIZE
from oscar_io.asclient import AsClient
from oscar_io.blockwise import DEFAULT_WINDOW
from oscar_io.bundle import Bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROFILE = "a128gcm-es256"
#: The proxy's limits.block_window here: not the default, so a test sees the limit used.
WINDOW = DEFAULT_WINDOW - 3
#: The proxy's limits.max_object_size here: above the default (1 MiB + 4 KiB), so that objects
#: over a mebibyte go through and the cut-off is this limit, not the default.
LIMIT = (2 << 20) + 4096


@dataclass
class World:
    root: Path
    d: Deployment
    standin: StandIn
    relay: CountingRelay
    raw: RawBlockServer
    observable: RawObservable
    proxy: ProxyProcess
    sealers: dict[str, Sealer]

    @property
    def sealer(self) -> Sealer:
        return self.sealers["big"]


class RawBlockServer(asyncio.DatagramProtocol):
    """Answers every GET with a block of ``payload``: as asked, or broken as ``mode`` says
    (``"etag"``: another ETag from block 2 on; ``"order"``: the block after the one asked;
    ``"slow"``: each answer 50 ms late, counting the requests waiting for one)."""

    def __init__(self) -> None:
        self.payload = os.urandom(5000)
        self.mode = "etag"
        self.transport: Any = None
        self.port = 0
        self.waiting = 0
        self.most_waiting = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        request = Message.decode(data)
        asked = request.opt.block2
        number = 0 if asked is None else asked.block_number
        if self.mode == "order" and number > 0:
            number += 1
        start = number * 1024
        chunk = self.payload[start : start + 1024]
        reply = Message(code=Code.CONTENT, payload=chunk, content_format=18)
        reply.mtype, reply.mid, reply.token = ACK, request.mid, request.token
        reply.opt.etag = b"B" if self.mode == "etag" and number >= 2 else b"A"
        reply.opt.block2 = BlockOption.BlockwiseTuple(number, start + 1024 < len(self.payload), 6)
        if self.mode != "slow":
            self.transport.sendto(reply.encode(), addr)
            return
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)

        def send() -> None:
            self.waiting -= 1
            self.transport.sendto(reply.encode(), addr)

        asyncio.get_running_loop().call_later(0.05, send)


class RawObservable(asyncio.DatagramProtocol):
    """Serves one object, notifying its observer of each new one block-wise: block 0 with
    Observe (NON), the rest when asked for (RFC 7959 §2.6)."""

    def __init__(self) -> None:
        self.obj = b""
        self.observer: tuple[Any, bytes] | None = None
        self.number = 1
        self.continuations = 0
        self.transport: Any = None
        self.port = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def _block(self, number: int, observe: int | None) -> Message:
        chunk = self.obj[number * 1024 : (number + 1) * 1024]
        message = Message(code=Code.CONTENT, payload=chunk, content_format=18, max_age=60)
        message.opt.etag = hashlib.sha256(self.obj).digest()[:8]
        message.opt.observe = observe
        if len(self.obj) > 1024:
            more = (number + 1) * 1024 < len(self.obj)
            message.opt.block2 = BlockOption.BlockwiseTuple(number, more, 6)
        return message

    def serve(self, obj: bytes) -> None:
        self.obj = obj
        if self.observer is not None:
            self.number += 1
            notification = self._block(0, self.number)
            notification.mtype, notification.mid = NON, self.number
            notification.token = self.observer[1]
            self.transport.sendto(notification.encode(), self.observer[0])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        request = Message.decode(data)
        if request.code != Code.GET:
            return
        asked = request.opt.block2
        number = 0 if asked is None else asked.block_number
        if request.opt.observe == 0:
            self.observer = (addr, request.token)
        elif number > 0:
            self.continuations += 1
        reply = self._block(number, self.number if request.opt.observe == 0 else None)
        reply.mtype, reply.mid, reply.token = ACK, request.mid, request.token
        self.transport.sendto(reply.encode(), addr)


async def _sealers(root: Path, *paths: str) -> dict[str, Sealer]:
    """A signing key certified by the AS for ``sensor``, and a sealer per registered resource."""
    client = AsClient(Bundle.load(root / "sensor.json"))
    key = certs.generate_signing_key()
    sealers = {}
    try:
        csr = certs.make_csr(key, "sensor").public_bytes(serialization.Encoding.DER)
        await client.request_certificate(csr)
        for path in paths:
            await client.register(
                path, content_format=42, profile=PROFILE, max_age=60, rotation_period=0
            )
            active = (await client.keys(f"sensor/{path}")).active
            sealers[path] = Sealer(
                secret=active.secret,
                producer_id="sensor",
                resource_id=f"sensor/{path}",
                epoch=active.epoch,
                signing_key=key,
                profile=profile_by_name(PROFILE),
            )
    finally:
        await client.close()
    return sealers


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("large")
    d = Deployment(root)
    for device_id, role in [("sensor", "producer"), ("c1", "consumer"), ("cache-1", "proxy")]:
        d.enroll(role, device_id)
    d.grant("c1", "sensor/*")
    d.start_as()
    standin = await StandIn().start()
    relay = await CountingRelay(standin.port).start()
    loop = asyncio.get_running_loop()
    raw, observable = RawBlockServer(), RawObservable()
    transport, _ = await loop.create_datagram_endpoint(lambda: raw, local_addr=("127.0.0.1", 0))
    transport2, _ = await loop.create_datagram_endpoint(
        lambda: observable, local_addr=("127.0.0.1", 0)
    )
    config = root / "proxy.toml"  # a window other than the default: the limit is the one used
    config.write_text(f"[limits]\nblock_window = {WINDOW}\nmax_object_size = {LIMIT}\n")
    proxy = ProxyProcess(
        root / "cache-1.json",
        root / "proxy-state",
        "--config",
        str(config),
        "--reverse",
        f"sensor={relay.address}",
        "--reverse",
        f"broken=coap://127.0.0.1:{raw.port}",
        "--log-level",
        "debug",
    )
    try:
        sealers = await _sealers(root, "big", "film", "reel")
        await asyncio.to_thread(proxy.start)
        yield World(root, d, standin, relay, raw, observable, proxy, sealers)
    finally:
        proxy.kill()
        transport.close()
        transport2.close()
        relay.close()
        await standin.close()
        d.close()


async def stats(world: World) -> dict[str, int]:
    response = await coap_get(world.proxy.uri(".well-known/oscar-stats"))
    doc: dict[str, int] = json.loads(response.payload)
    return doc


async def proxy_get(uri: str, timeout: float = 60.0) -> Message:
    """A plain-CoAP GET from one client context, answering the proxy's Echo challenge."""
    ctx = await Context.create_client_context(transports=["udp6"])
    try:
        response = await asyncio.wait_for(ctx.request(Message(code=GET, uri=uri)).response, 10)
        if response.code == Code.UNAUTHORIZED and response.opt.echo is not None:
            again = Message(code=GET, uri=uri, echo=response.opt.echo)
            response = await asyncio.wait_for(ctx.request(again).response, timeout)
        return response
    finally:
        await ctx.shutdown()


def gets(world: World) -> int:
    return sum(1 for code, _, _ in world.relay.requests if code == "0.01")


async def test_a_mebibyte_goes_through_the_proxy_block_wise_then_is_a_hit(world: World) -> None:
    plaintext = os.urandom(1 << 20)
    obj = world.sealer.seal(seq=1, iat=0, exp=2_000_000_000, content_format=42,
                            plaintext=plaintext)  # fmt: skip
    world.standin.resource("sensor/big").serve(obj, max_age=60)
    before, blocks = await stats(world), gets(world)
    async with Consumer(world.root / "c1.json") as consumer:
        reading = await consumer.get(world.proxy.uri("sensor/big"))
        assert reading.plaintext == plaintext
        # every block fetched once, and (no Size2) at most a window's worth asked past the end
        fetched = gets(world) - blocks
        assert -(-len(obj) // 1024) <= fetched < -(-len(obj) // 1024) + WINDOW
        again = await consumer.get(world.proxy.uri("sensor/big"))
        assert again.plaintext == plaintext
    after = await stats(world)
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] >= 1
    assert after["upstream_requests"] - before["upstream_requests"] == 1
    assert gets(world) - blocks == fetched  # the hit asked the upstream nothing


async def test_an_upstream_transfer_larger_than_any_object_is_cut_off(world: World) -> None:
    junk = os.urandom(LIMIT + 200 * 1024)
    world.standin.resource("sensor/huge").serve(junk, max_age=60)
    blocks = gets(world)
    response = await proxy_get(world.proxy.uri("sensor/huge"))
    assert response.code == Code.BAD_GATEWAY
    fetched = gets(world) - blocks
    # Past 1 MiB it is spooled and read as it arrives (proxy.large): junk is refused there,
    # before the limit (a real object announcing more than the limit would be too).
    assert fetched <= (1 << 20) // 1024 + WINDOW + 1 < len(junk) // 1024
    # refused at its headers (which reason depends on the random junk's first bytes)
    assert "rejected an object for sensor/huge: " in world.proxy.log()


async def test_an_object_over_a_mebibyte_within_the_configured_limit(world: World) -> None:
    """limits.max_object_size lets a 1.5 MiB object through the proxy (fetched, verified,
    cached, served block-wise); the consumer spools it and reads it as it arrives."""
    plaintext = os.urandom(3 << 19)
    assert len(plaintext) > DEFAULT_MAX_OBJECT_SIZE
    obj = world.sealers["reel"].seal(
        seq=1, iat=0, exp=2_000_000_000, content_format=42, plaintext=plaintext
    )
    world.standin.resource("sensor/reel").serve(obj, max_age=60)
    async with Consumer(world.root / "c1.json") as consumer:
        reading = await consumer.get(world.proxy.uri("sensor/reel"))
    assert reading.plaintext == plaintext


@pytest.mark.parametrize(
    ("mode", "logged"),
    [("etag", "changed during its Block2 transfer"), ("order", "out of order")],
)
async def test_blocks_that_do_not_belong_together_are_refused(
    world: World, mode: str, logged: str
) -> None:
    world.raw.mode = mode
    uri = world.proxy.uri(f"broken/{mode}")
    response = await proxy_get(uri)
    assert response.code == Code.BAD_GATEWAY
    assert logged in world.proxy.log()
    log = world.proxy.log()
    assert "Traceback" not in log and world.raw.payload.hex()[:64] not in log


async def test_the_blocks_of_an_upstream_answer_are_asked_for_several_at_a_time(
    world: World,
) -> None:
    """The proxy asks for the blocks after block 0 a window at a time (its configured
    ``limits.block_window``), not one per round trip: the slow upstream has a whole window waiting
    for an answer at the same time (without Size2 the window goes past the end of the 5-block
    answer, and those are dropped)."""
    world.raw.mode, world.raw.most_waiting = "slow", 0
    await proxy_get(world.proxy.uri("broken/slow"))  # not an object: what counts is the fetch
    assert world.raw.most_waiting == WINDOW


async def test_a_block_wise_notification_is_assembled_checked_and_cached(world: World) -> None:
    """An upstream that notifies block-wise (RFC 7959 §2.6: block 0 with Observe, the rest on
    request without it; aiocoap's server cannot, so a datagram-level stand-in does): the proxy's
    upstream observation assembles each new object, checks it and caches it; one larger than
    any object is cut off and dropped, and the observation goes on."""
    small, large = os.urandom(300), os.urandom(100 * 1024)
    seal = world.sealers["film"].seal
    observable = world.observable
    observable.serve(seal(seq=200, iat=0, exp=2_000_000_000, content_format=42, plaintext=small))
    target = f"coap://127.0.0.1:{observable.port}/sensor/film"
    async with Consumer(world.root / "c1.json") as consumer:
        observation = consumer.observe(target, proxy=world.proxy.address)
        assert (await asyncio.wait_for(anext(observation), 30)).plaintext == small
        before = await stats(world)

        observable.serve(os.urandom(LIMIT + 100 * 1024))
        await asyncio.to_thread(wait_until, lambda: "is dropped" in world.proxy.log(), 30)
        assert observable.continuations <= LIMIT // 1024 + 1

        observable.continuations = 0
        observable.serve(seal(seq=201, iat=0, exp=2_000_000_000, content_format=42,
                              plaintext=large))  # fmt: skip
        await asyncio.to_thread(
            wait_until, lambda: observable.continuations >= len(large) // 1024, 20
        )
        await observation.aclose()  # aiocoap's server cannot notify it block-wise downstream
        reading = await consumer.get(target, proxy=world.proxy.address)
        assert reading.plaintext == large and reading.metadata.seq == 201
    after = await stats(world)
    assert after["upstream_requests"] == before["upstream_requests"]  # no fetch: the relay
