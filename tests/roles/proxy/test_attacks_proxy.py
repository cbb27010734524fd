"""Attacks on the caching proxy (issue 8), each against real processes on loopback: a real AS,
real proxy processes, stand-in origins serving hand-made objects, raw UDP clients.

- cache poisoning: PUTs by a device that does not own the resource, plain-CoAP PUTs, and origins
  answering with another resource's object, an older object, a signature by a key the AS never
  certified, by another producer's certified key, by a revoked producer;
- signature malleability: ECDSA's twin (r, n - s) of an object, published and fetched, and given
  to a consumer;
- spoofed-source amplification: every path from an unproven address;
- cache exhaustion: many and large objects, published and fetched; rollback after eviction;
- unknown signers: a budget for the proxy's certificate lookups at the AS.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import GET, PUT, Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from aiocoap.resource import Site
from as_harness import free_port
from cryptography.hazmat.primitives import serialization
from proxy_harness import (
    CountingRelay,
    ProxyProcess,
    RawClient,
    StandIn,
    StandInResource,
    dtls_context,
    send,
)
from system_harness import Deployment, coap_get

from consumer import Consumer
from oscar import (
    AccessSecret,
    Part,
    ProtectedObject,
    Sealer,
    certs,
    object_etag,
    open_parts,
    profile_by_name,
    seal_parts,
)
from oscar.algorithms import PrivateKey
from oscar_io.asclient import AsClient
from oscar_io.aswire import KeyState
from oscar_io.bundle import Bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROXY_ID = "cache-1"
#: The order of the P-256 group: (r, n - s) verifies wherever (r, s) does.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def now() -> int:
    return int(time.time())


@dataclass
class World:
    root: Path
    d: Deployment
    standin: StandIn
    relay: CountingRelay
    proxy: ProxyProcess
    keys: dict[str, PrivateKey]
    states: dict[str, KeyState]
    links: dict[str, bytes]
    seqs: dict[str, int] = field(default_factory=dict)

    def seal(
        self,
        resource_id: str,
        plaintext: bytes = b"21 C",
        *,
        seq: int | None = None,
        key: PrivateKey | None = None,
        producer: str | None = None,
        secret: AccessSecret | None = None,
        lifetime: int = 600,
        profile: str = "ccm-es256",
    ) -> bytes:
        """An object of ``resource_id`` (by default the next seq, signed by its owner)."""
        producer = producer or resource_id.partition("/")[0]
        if seq is None:
            seq = self.seqs[resource_id] = self.seqs.get(resource_id, 100) + 1
        state = self.states.get(resource_id)
        if secret is None:
            secret = state.active.secret if state else AccessSecret(os.urandom(32))
        epoch = state.active.epoch if state else 1
        t = now()
        return Sealer(
            secret=secret,
            producer_id=producer,
            resource_id=resource_id,
            epoch=epoch,
            signing_key=key or self.keys[producer],
            profile=profile_by_name(profile),
        ).seal(seq=seq, iat=t, exp=t + lifetime, content_format=0, plaintext=plaintext)


async def _certify(bundle: Path, key: PrivateKey, device_id: str) -> AsClient:
    client = AsClient(Bundle.load(bundle))
    csr = certs.make_csr(key, device_id).public_bytes(serialization.Encoding.DER)
    await client.request_certificate(csr)
    return client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("attacks")
    d = Deployment(root)
    for device_id, role in [
        ("sensor", "producer"),
        ("other", "producer"),
        ("gone", "producer"),
        ("c1", "consumer"),
        (PROXY_ID, "proxy"),
    ]:
        d.enroll(role, device_id)
    d.grant("c1", "sensor/*")
    d.start_as()
    keys = {name: certs.generate_signing_key() for name in ("sensor", "other", "gone")}
    states: dict[str, KeyState] = {}
    links: dict[str, bytes] = {}
    for name in ("sensor", "other", "gone", "c1"):
        if name == "c1":
            client = AsClient(Bundle.load(root / "c1.json"))
        else:
            client = await _certify(root / f"{name}.json", keys[name], name)
        try:
            if name == "sensor":
                await client.register(
                    "twin", content_format=0, profile="ccm-es256", max_age=60, rotation_period=0
                )
                states["sensor/twin"] = await client.keys("sensor/twin")
            if name != "gone":
                links[name] = await client.link(PROXY_ID)
        finally:
            await client.close()
    d.admin("revoke", "--device", "gone")  # its certificate goes on the CRL
    standin = await StandIn().start()
    relay = await CountingRelay(standin.port).start()
    config = root / "proxy.toml"
    config.write_text("[limits]\nupstream_timeout = 1.0\nupstream_backoff = 1.0\n")
    proxy = ProxyProcess(
        root / f"{PROXY_ID}.json",
        root / "proxy-state",
        "--config",
        str(config),
        "--reverse",
        f"sensor={relay.address}",
        "--log-level",
        "debug",
    )
    world = World(root, d, standin, relay, proxy, keys, states, links)
    try:
        await asyncio.to_thread(proxy.start)
        yield world
    finally:
        proxy.kill()
        relay.close()
        await standin.close()
        d.close()


@pytest_asyncio.fixture(loop_scope="module")
async def secure(world: World) -> AsyncIterator[Context]:
    """The consumer c1 over DTLS to the proxy (proven by its handshake)."""
    ctx = await dtls_context(world.proxy, "c1", world.links["c1"])
    yield ctx
    await ctx.shutdown()


async def stats(proxy: ProxyProcess) -> dict[str, int]:
    response = await coap_get(proxy.uri(".well-known/oscar-stats"))
    assert response.code == Code.CONTENT
    doc: dict[str, int] = json.loads(response.payload)
    return doc


def forward(proxy: ProxyProcess, target: str) -> Message:
    message = Message(code=GET, uri=f"{proxy.secure_address}/")
    message.opt.uri_path = ()
    message.opt.proxy_uri = target
    return message


def held(proxy: ProxyProcess, resource_id: str) -> Message:
    """A GET of what the proxy holds for ``resource_id`` (no upstream: not reverse-mapped)."""
    return Message(code=GET, uri=f"{proxy.secure_address}/{resource_id}")


def put(proxy: ProxyProcess, resource_id: str, data: bytes, *, secure: bool = True) -> Message:
    base = proxy.secure_address if secure else proxy.address
    return Message(code=PUT, uri=f"{base}/{resource_id}", payload=data, content_format=18)


def twin(obj: bytes) -> bytes:
    """The same object with its ES256 signature (r, s) replaced by (r, n - s)."""
    signature = ProtectedObject.from_bytes(obj).sign1.signature
    assert len(signature) == 64 and obj.endswith(signature)
    s = int.from_bytes(signature[32:], "big")
    return obj[:-32] + (P256_N - s).to_bytes(32, "big")


# --- cache poisoning ---------------------------------------------------------------------------


async def test_no_device_but_the_owner_over_dtls_can_publish(world: World, secure: Context) -> None:
    rid = "sensor/poison-put"
    owner = await dtls_context(world.proxy, "sensor", world.links["sensor"])
    other = await dtls_context(world.proxy, "other", world.links["other"])
    plain = await Context.create_client_context()
    try:
        good = world.seal(rid, b"owner's")
        assert (await send(owner, put(world.proxy, rid, good))).code == Code.CHANGED
        before = await stats(world.proxy)
        newer = world.seal(rid, b"newer, by the owner's key")
        # another enrolled producer, over DTLS: even with a valid object of the owner
        assert (await send(other, put(world.proxy, rid, newer))).code == Code.FORBIDDEN
        mine = world.seal("other/x", producer="other")
        assert (await send(other, put(world.proxy, rid, mine))).code == Code.FORBIDDEN
        # a consumer over DTLS, and plain CoAP
        assert (await send(secure, put(world.proxy, rid, newer))).code == Code.FORBIDDEN
        response = await send(plain, put(world.proxy, rid, newer, secure=False))
        assert response.code == Code.FORBIDDEN
        # a device publishing another producer's object under its own name: not its object
        response = await send(other, put(world.proxy, "other/x", newer))
        assert response.code == Code.BAD_REQUEST
        after = await stats(world.proxy)
        assert after["publish_refused"] == before["publish_refused"] + 4
        assert after["published"] == before["published"]
        assert (await send(secure, held(world.proxy, rid))).payload == good
        assert (await send(secure, held(world.proxy, "other/x"))).code == Code.NOT_FOUND
    finally:
        for ctx in (owner, other, plain):
            await ctx.shutdown()


async def test_a_multi_part_object_is_verified_cached_and_served_without_being_read(
    world: World, secure: Context
) -> None:
    """Issue 19's objects of several parts (oscar.parts) pass the proxy as single-part ones do:
    verified without any secret (the owner's signature over every part), cached and served byte
    for byte, opened by whoever holds a part's secret and by nobody else; one signed by another
    key, or older than the one held, is refused and changes nothing."""
    rid = "sensor/parts"
    clinicians, operators = AccessSecret(os.urandom(32)), AccessSecret(os.urandom(32))

    def sealed(seq: int, key: PrivateKey | None = None) -> bytes:
        t = now()
        return seal_parts(
            parts=[
                Part("public", b"ward 3", 0),
                Part("measurements", b"HR 72", 0, secret=clinicians, epoch=1),
                Part("location", b"room 12", 0, secret=operators, epoch=1),
            ],
            producer_id="sensor", resource_id=rid, seq=seq, iat=t, exp=t + 600,
            signing_key=key or world.keys["sensor"], profile=profile_by_name("a128gcm-es256"),
        )  # fmt: skip

    owner = await dtls_context(world.proxy, "sensor", world.links["sensor"])
    try:
        before = await stats(world.proxy)
        obj = sealed(5)
        assert (await send(owner, put(world.proxy, rid, obj))).code == Code.CHANGED
        served = (await send(secure, held(world.proxy, rid))).payload
        assert served == obj
        reading = open_parts(
            served,
            secrets=lambda r, part, e: clinicians if part == "measurements" else None,
            signer=world.keys["sensor"].public_key(),
            now=now(),
            resource_id=rid,
        )
        assert reading.part("measurements").plaintext == b"HR 72"  # type: ignore[union-attr]
        assert reading.part("public").plaintext == b"ward 3"  # type: ignore[union-attr]
        assert reading.not_granted == ("location",)
        forged = sealed(6, key=world.keys["other"])  # a valid object, of the wrong signer
        assert (await send(owner, put(world.proxy, rid, forged))).code == Code.BAD_REQUEST
        assert (await send(owner, put(world.proxy, rid, sealed(4)))).code == Code.BAD_REQUEST
        assert (await send(secure, held(world.proxy, rid))).payload == obj
        after = await stats(world.proxy)
        assert after["published"] == before["published"] + 1
        assert after["rejected"] >= before["rejected"] + 2
    finally:
        await owner.shutdown()


async def test_no_origin_can_replace_or_create_an_entry_with_an_object_it_may_not_give(
    world: World, secure: Context
) -> None:
    rid, elsewhere = "sensor/poison-fetch", "sensor/elsewhere"
    resource = world.standin.resource(rid)
    target = world.standin.uri(rid)
    good = world.seal(rid, b"good")
    good_seq = world.seqs[rid]
    resource.serve(good)  # Max-Age 0: every request goes to the origin
    first = await send(secure, forward(world.proxy, target))
    assert first.payload == good
    uncertified = certs.generate_signing_key()
    bad = {
        "another resource's object": world.seal(elsewhere, b"elsewhere", seq=good_seq + 50),
        "older (rollback)": world.seal(rid, b"older", seq=good_seq - 1),
        "a key the AS never certified": world.seal(rid, seq=good_seq + 51, key=uncertified),
        "another producer's certified key": world.seal(
            rid, seq=good_seq + 52, key=world.keys["other"]
        ),
    }
    for kind, obj in bad.items():
        before = await stats(world.proxy)
        resource.serve(obj)
        response = await send(secure, forward(world.proxy, target))
        assert response.code == Code.CONTENT and response.payload == good, kind
        assert response.opt.etag == first.opt.etag, kind
        assert (await stats(world.proxy))["rejected"] == before["rejected"] + 1, kind

    # none may create an entry either: a resource the proxy holds nothing for
    fresh = "sensor/poison-new"
    fresh_resource = world.standin.resource(fresh)
    entries = (await stats(world.proxy))["memory_entries"]
    for kind, obj in bad.items():
        fresh_resource.serve(obj if kind != "older (rollback)" else world.seal(elsewhere))
        response = await send(secure, forward(world.proxy, world.standin.uri(fresh)))
        assert response.code == Code.BAD_GATEWAY, kind
        assert (await stats(world.proxy))["memory_entries"] == entries, kind

    # an object that passes is the newest: a newer one replaces, one in between does not
    newer = world.seal(rid, b"newer", seq=good_seq + 10)
    resource.serve(newer)
    response = await send(secure, forward(world.proxy, target))
    assert response.payload == newer
    assert response.opt.etag == object_etag(rid, 1, good_seq + 10)
    resource.serve(world.seal(rid, b"between", seq=good_seq + 5))
    assert (await send(secure, forward(world.proxy, target))).payload == newer


async def test_a_revoked_producer_can_neither_create_nor_replace_an_entry(
    world: World, secure: Context
) -> None:
    rid = "gone/meter"
    resource = world.standin.resource(rid)
    before = await stats(world.proxy)
    resource.serve(world.seal(rid, b"from a revoked producer"))
    response = await send(secure, forward(world.proxy, world.standin.uri(rid)))
    assert response.code == Code.BAD_GATEWAY
    assert (await send(secure, held(world.proxy, rid))).code == Code.NOT_FOUND
    assert (await stats(world.proxy))["rejected"] == before["rejected"] + 1


# --- malleability ------------------------------------------------------------------------------


async def test_the_ecdsa_twin_of_an_object_is_the_same_object_everywhere(
    world: World, secure: Context
) -> None:
    """(r, n - s) verifies as well as (r, s): the twin is accepted as valid, but it is the same
    (resource, epoch, seq), so it is the same object: one entry, one ETag, and the proxy keeps
    serving the bytes it saw first (a re-signed copy is not news; keeping the first also means
    no observer is notified and no ETag-keyed client sees a change)."""
    rid = "sensor/twin"
    epoch = world.states[rid].active.epoch
    owner = await dtls_context(world.proxy, "sensor", world.links["sensor"])
    try:
        # published: the original, then its twin
        obj = world.seal(rid, b"twin 1")
        other = twin(obj)
        assert other != obj
        assert (
            ProtectedObject.from_bytes(other).metadata == ProtectedObject.from_bytes(obj).metadata
        )
        assert (await send(owner, put(world.proxy, rid, obj))).code == Code.CHANGED
        before = await stats(world.proxy)
        assert (await send(owner, put(world.proxy, rid, other))).code == Code.CHANGED
        after = await stats(world.proxy)
        assert after["published"] == before["published"]  # not new
        assert after["rejected"] == before["rejected"]  # a valid signature, though
        assert after["memory_entries"] == before["memory_entries"]
        served = await send(secure, held(world.proxy, rid))
        assert served.payload == obj
        assert served.opt.etag == object_etag(rid, epoch, world.seqs[rid])
        # the twin of a newer object, published first, then its original: the twin is kept
        newer = world.seal(rid, b"twin 2")
        assert (await send(owner, put(world.proxy, rid, twin(newer)))).code == Code.CHANGED
        assert (await send(owner, put(world.proxy, rid, newer))).code == Code.CHANGED
        served = await send(secure, held(world.proxy, rid))
        assert served.payload == twin(newer)
        assert served.opt.etag == object_etag(rid, epoch, world.seqs[rid])
    finally:
        await owner.shutdown()

    # from an origin: the original, then its twin
    fetched = "sensor/twin-fetched"
    resource = world.standin.resource(fetched)
    obj = world.seal(fetched, b"fetched", secret=AccessSecret(os.urandom(32)))
    resource.serve(obj)
    first = await send(secure, forward(world.proxy, world.standin.uri(fetched)))
    assert first.payload == obj
    before = await stats(world.proxy)
    resource.serve(twin(obj))
    again = await send(secure, forward(world.proxy, world.standin.uri(fetched)))
    assert again.payload == obj and again.opt.etag == first.opt.etag
    after = await stats(world.proxy)
    assert after["rejected"] == before["rejected"]
    assert after["memory_entries"] == before["memory_entries"]
    # revalidation by ETag gives 2.03 whichever copy the client holds
    message = forward(world.proxy, world.standin.uri(fetched))
    message.opt.etags = (first.opt.etag,)
    assert (await send(secure, message)).code == Code.VALID


async def test_a_consumer_takes_the_twin_as_the_same_object(world: World) -> None:
    """The consumer names objects by (epoch, seq), not bytes: the twin is neither a second
    acceptance nor a rollback, in a single reading and in an observed stream."""
    rid = "sensor/twin"
    resource = world.standin.resource(rid)
    obj = world.seal(rid, b"stream 1")
    async with Consumer(world.root / "c1.json", world.root / "c1-state") as consumer:
        assert (await consumer.open_object(obj, rid)).plaintext == b"stream 1"
        assert (await consumer.open_object(twin(obj), rid)).plaintext == b"stream 1"
        readings: list[bytes] = []

        async def watch() -> None:
            async for reading in consumer.observe(world.standin.uri(rid)):
                readings.append(reading.plaintext)
                if reading.plaintext == b"stream 2":
                    return

        resource.serve(obj, max_age=60)
        task = asyncio.create_task(watch())
        for _ in range(100):
            if readings:
                break
            await asyncio.sleep(0.05)
        resource.serve(twin(obj), max_age=60)
        await asyncio.sleep(0.3)
        resource.serve(world.seal(rid, b"stream 2"), max_age=60)
        await asyncio.wait_for(task, 10)
    assert readings == [b"stream 1", b"stream 2"]


# --- spoofed-source amplification --------------------------------------------------------------


async def test_an_unproven_address_gets_nothing_larger_than_its_request_and_no_upstream_work(
    world: World, secure: Context
) -> None:
    # something cached (a large object too, for Block2) and something not
    big = "sensor/amplify-big"
    world.standin.resource(big).serve(
        world.seal(big, os.urandom(3000), profile="a128gcm-es256"), max_age=600
    )
    small = "sensor/amplify"
    world.standin.resource(small).serve(world.seal(small), max_age=600)
    for rid in (big, small):
        assert (await send(secure, held(world.proxy, rid))).code == Code.CONTENT  # reverse map
    world.standin.resource("sensor/amplify-miss").serve(world.seal("sensor/amplify-miss"))
    requests: dict[str, Any] = {
        "cached hit": lambda: Message(code=GET, uri_path=("sensor", "amplify")),
        "miss": lambda: Message(code=GET, uri_path=("sensor", "amplify-miss")),
        "Proxy-Uri to the origin": lambda: Message(
            code=GET, proxy_uri=world.relay.address + "/sensor/amplify-miss"
        ),
        "Proxy-Uri to anywhere": lambda: Message(code=GET, proxy_uri="coap://192.0.2.1/sensor/x"),
        "Block2, block 1": lambda: Message(
            code=GET,
            uri_path=("sensor", "amplify-big"),
            block2=BlockOption.BlockwiseTuple(1, False, 6),
        ),
        "Block2, block 0": lambda: Message(
            code=GET,
            uri_path=("sensor", "amplify-big"),
            block2=BlockOption.BlockwiseTuple(0, False, 4),
        ),
        "Observe": lambda: Message(code=GET, uri_path=("sensor", "amplify"), observe=0),
        "Observe, a miss": lambda: Message(
            code=GET, uri_path=("sensor", "amplify-miss"), observe=0
        ),
        "a forged Echo": lambda: Message(code=GET, uri_path=("sensor", "amplify"), echo=bytes(8)),
        "tiny: s/t": lambda: Message(code=GET, uri_path=("s", "t")),
        "short: cam/big": lambda: Message(code=GET, uri_path=("cam", "big")),
        "a bad target": lambda: Message(code=GET, proxy_uri="http://a/b/c"),
        "a bad Proxy-Uri": lambda: Message(code=GET, proxy_uri="coap://[::1/x/y"),
    }
    before, upstream = await stats(world.proxy), len(world.relay.requests)
    asked = {rid: r.requests for rid, r in world.standin.resources.items()}
    for kind, make in requests.items():
        client = RawClient(world.proxy.port, fresh=True)  # a new, unproven address each time
        try:
            request, reply, decoded = await asyncio.to_thread(client.exchange, make())
        finally:
            client.close()
        if kind.startswith(("tiny", "short")):  # within RFC 9175's three times
            assert len(reply) <= len(request) + 6 and len(reply) <= 3 * len(request), kind
        else:
            assert len(reply) <= len(request), (kind, len(reply), len(request), decoded)
        assert decoded.payload == b"", kind
        if kind.startswith("a bad"):
            assert decoded.code in (Code.BAD_REQUEST, Code.PROXYING_NOT_SUPPORTED), kind
        elif kind == "Block2, block 1":  # aiocoap: no transfer of this client's to continue
            assert decoded.code in (Code.UNAUTHORIZED, Code.REQUEST_ENTITY_INCOMPLETE), kind
        else:
            assert decoded.code == Code.UNAUTHORIZED, kind
            assert decoded.opt.echo is not None, kind
    await asyncio.sleep(0.3)
    after = await stats(world.proxy)
    assert len(world.relay.requests) == upstream  # no fetch, no observation upstream
    assert after["upstream_requests"] == before["upstream_requests"]
    assert after["upstream_observations"] == before["upstream_observations"]
    assert after["rejected"] == before["rejected"]  # nothing checked: no AS lookup
    assert {rid: r.requests for rid, r in world.standin.resources.items() if rid in asked} == asked

    # the counters: plain CoAP from loopback only (no off-host spoofed source gets there)
    client = RawClient(world.proxy.port)
    try:
        message = Message(code=GET, uri_path=(".well-known", "oscar-stats"))
        _, _, decoded = await asyncio.to_thread(client.exchange, message)
        assert decoded.code == Code.CONTENT
    finally:
        client.close()


# --- cache exhaustion --------------------------------------------------------------------------


def _rss_kib(proxy: ProxyProcess) -> int:
    return proxy.rss_kib()


async def test_many_and_large_objects_keep_every_limit_and_the_newest_entries_served(
    world: World, tmp_path: Path
) -> None:
    config = tmp_path / "small.toml"
    config.write_text(
        "[limits]\nmemory_entries = 40\nmemory_bytes = 1000000\n"
        "disk_entries = 60\ndisk_bytes = 2000000\nupstream_timeout = 2.0\n"
    )
    proxy = ProxyProcess(
        world.root / f"{PROXY_ID}.json", tmp_path / "state", "--config", str(config)
    )
    await asyncio.to_thread(proxy.start)
    owner = await dtls_context(proxy, "sensor", world.links["sensor"])
    secret = AccessSecret(os.urandom(32))
    try:
        first = world.seal("sensor/x0", b"the first", seq=10, secret=secret)
        assert (await send(owner, put(proxy, "sensor/x0", first))).code == Code.CHANGED
        rss_start = _rss_kib(proxy)
        big = os.urandom(60_000)
        # 160 objects for a cache of 100: beyond both limits, within the 200 resources whose
        # newest version is remembered after eviction (Cache.max_versions)
        for i in range(1, 131):
            rid = f"sensor/x{i}"
            data = big if i % 5 == 0 else b"small"
            obj = world.seal(rid, data, secret=secret, profile="a128gcm-es256")
            assert (await send(owner, put(proxy, rid, obj), 20)).code == Code.CHANGED, i
        # fetched ones too: forward proxying of distinct resources of one origin
        for i in range(30):
            rid = f"sensor/y{i}"
            world.standin.resource(rid).serve(world.seal(rid, secret=secret))
            response = await send(owner, forward(proxy, world.standin.uri(rid)))
            assert response.code == Code.CONTENT, i
        doc = json.loads((await coap_get(proxy.uri(".well-known/oscar-stats"))).payload)
        assert doc["memory_entries"] <= 40 and doc["disk_entries"] <= 60
        assert doc["published"] == 131 and doc["evictions"] > 0
        written = doc  # the live counters have the byte counts
        assert written["memory_bytes"] <= 1_000_000 and written["disk_bytes"] <= 2_000_000
        assert written["disk_entries"] <= 60
        growth = _rss_kib(proxy) - rss_start
        assert growth < 40_000, growth  # KiB: bounded by the limits, not by what came in
        # the newest are served; the oldest were evicted (least recently used first)
        for rid, expected in (("sensor/y29", Code.CONTENT), ("sensor/x130", Code.CONTENT),
                              ("sensor/x1", Code.NOT_FOUND)):  # fmt: skip
            assert (await send(owner, held(proxy, rid))).code == expected, rid
        assert (await send(owner, held(proxy, "sensor/x0"))).code == Code.NOT_FOUND

        # after its eviction, an older object of x0 is still a rollback; the same one is fine
        older = world.seal("sensor/x0", b"older", seq=9, secret=secret)
        response = await send(owner, put(proxy, "sensor/x0", older))
        assert response.code == Code.BAD_REQUEST
        assert (await send(owner, held(proxy, "sensor/x0"))).code == Code.NOT_FOUND
        assert (await send(owner, put(proxy, "sensor/x0", first))).code == Code.CHANGED
        assert (await send(owner, held(proxy, "sensor/x0"))).payload == first
        # and from an origin
        rid = "sensor/x5"
        assert (await send(owner, held(proxy, rid))).code == Code.NOT_FOUND  # evicted
        world.standin.resource(rid).serve(world.seal(rid, seq=100, secret=secret))
        response = await send(owner, forward(proxy, world.standin.uri(rid)))
        assert response.code == Code.BAD_GATEWAY
    finally:
        await owner.shutdown()
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


# --- unknown signers ---------------------------------------------------------------------------


async def test_junk_objects_with_random_kids_spend_a_bounded_budget_of_as_lookups(
    world: World, tmp_path: Path
) -> None:
    config = tmp_path / "budget.toml"
    config.write_text(
        "[limits]\nsigner_lookups = 6\nsigner_lookups_per_origin = 4\nupstream_timeout = 2.0\n"
    )
    proxy = ProxyProcess(
        world.root / f"{PROXY_ID}.json", tmp_path / "state", "--config", str(config)
    )
    await asyncio.to_thread(proxy.start)
    client = await dtls_context(proxy, "c1", world.links["c1"])
    second = StandIn()
    second.ctx = None
    try:
        # a real producer's object first: its certificate is then known (one lookup)
        rid = "sensor/budget"
        good = world.seal(rid, secret=AccessSecret(os.urandom(32)))
        world.standin.resource(rid).serve(good)
        assert (await send(client, forward(proxy, world.standin.uri(rid)))).payload == good
        junk = world.standin.resource("sensor/junk")

        async def junk_round(uri: str, resource: Any, n: int) -> None:
            for _ in range(n):
                resource.serve(world.seal("sensor/junk", key=certs.generate_signing_key()))
                response = await send(client, forward(proxy, uri))
                assert response.code in (Code.BAD_GATEWAY, Code.CONTENT), response

        await junk_round(world.standin.uri("sensor/junk"), junk, 8)
        doc = json.loads((await coap_get(proxy.uri(".well-known/oscar-stats"))).payload)
        # 3 of this origin's 4 lookups were left after the good object's; the rest refused
        assert doc["signer_lookups_refused"] == 5, doc
        # another origin (another loopback host): its own budget, within what is left in all
        site = Site()
        other_junk = StandInResource()
        site.add_resource(("sensor", "junk"), other_junk)
        port = free_port()
        second.ctx = await Context.create_server_context(
            site, bind=("127.0.0.2", port), transports=["udp6"]
        )
        await junk_round(f"coap://127.0.0.2:{port}/sensor/junk", other_junk, 4)
        doc = json.loads((await coap_get(proxy.uri(".well-known/oscar-stats"))).payload)
        # 6 in all: 4 spent by the first origin, 2 left for the second
        assert doc["signer_lookups_refused"] == 5 + 2, doc
        # a known signer costs nothing: still served, verified
        newer = world.seal(rid, secret=AccessSecret(os.urandom(32)))
        world.standin.resource(rid).serve(newer)
        assert (await send(client, forward(proxy, world.standin.uri(rid)))).payload == newer
    finally:
        await second.close()
        await client.shutdown()
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()
