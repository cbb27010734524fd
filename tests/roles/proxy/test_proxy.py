"""The caching proxy (issue 5), as real processes on loopback against a real AS: no mocks.

One deployment per module: an AS (admin CLI), the real producer ``meter`` behind a counting relay
(reverse-mapped at ``/meter``), a stand-in producer ``sensor`` serving hand-sealed objects
(forward proxying with Proxy-Uri), the proxy ``cache-1`` at debug log level, and consumers whose
warm state (certificates, CRL, secrets) is copied so that many of them do not load the AS.
The test that stops the producer runs last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import sqlite3
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import GET, POST, PUT, Context, Message
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives import serialization
from proxy_harness import (
    CountingRelay,
    ProxyProcess,
    RawClient,
    StandIn,
    dtls_context,
    free_port_pair,
    send,
)
from system_harness import Deployment, ProducerProcess, coap_get, run, wait_until, write_atomic

from consumer import Consumer
from oscar import AccessSecret, ProtectedObject, Sealer, certs, object_etag
from oscar.algorithms import PrivateKey
from oscar_io.asclient import AsClient
from oscar_io.aswire import KeyState
from oscar_io.bundle import Bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_AGE = 3  # the real producer's Max-Age: the proxy refetches (revalidates) after it
PROXY_ID = "cache-1"


def now() -> int:
    return int(time.time())


@dataclass
class World:
    root: Path
    d: Deployment
    producer: ProducerProcess
    relay: CountingRelay
    standin: StandIn
    proxy: ProxyProcess
    sensor_key: PrivateKey
    other_key: PrivateKey
    keys: dict[str, KeyState]
    links: dict[str, bytes]
    warm: Path
    files: dict[str, Path]
    plaintexts: list[bytes] = field(default_factory=list)
    objects: list[bytes] = field(default_factory=list)
    _seq: int = 100
    metrics_port: int = 0

    def seal(
        self,
        resource_id: str,
        plaintext: bytes = b"22.5 C",
        *,
        seq: int | None = None,
        upcoming: bool = False,
        key: PrivateKey | None = None,
        lifetime: int = 600,
        age: int = 0,
        secret: AccessSecret | None = None,
        epoch: int | None = None,
    ) -> bytes:
        """An object of a ``sensor`` resource (newest seq unless ``seq`` is given)."""
        if seq is None:
            self._seq += 1
            seq = self._seq
        state = self.keys.get(resource_id)
        if secret is None:
            assert state is not None and state.next is not None
            chosen = state.next if upcoming else state.active
            secret, epoch = chosen.secret, chosen.epoch
        t = now() - age
        obj = Sealer(
            secret=secret,
            producer_id="sensor",
            resource_id=resource_id,
            epoch=epoch if epoch is not None else 1,
            signing_key=key or self.sensor_key,
        ).seal(seq=seq, iat=t, exp=t + lifetime, content_format=0, plaintext=plaintext)
        self.plaintexts.append(plaintext)
        self.objects.append(obj)
        return obj

    def consumers(self, n: int, tag: str) -> list[Consumer]:
        """``n`` library consumers (c1), each with its own copy of the warm state."""
        out = []
        for i in range(n):
            state = self.root / f"{tag}-{i}"
            shutil.copytree(self.warm, state)
            out.append(Consumer(self.root / "c1.json", state))
        return out


async def _certify(client: AsClient, key: PrivateKey, device_id: str) -> None:
    csr = certs.make_csr(key, device_id).public_bytes(serialization.Encoding.DER)
    await client.request_certificate(csr)


SENSOR_RESOURCES = ("fetched", "published", "stale", "rollback", "frozen")


async def _devices(
    world_root: Path,
) -> tuple[PrivateKey, PrivateKey, dict[str, KeyState], dict[str, bytes]]:
    sensor = AsClient(Bundle.load(world_root / "sensor.json"))
    other = AsClient(Bundle.load(world_root / "other.json"))
    reader = AsClient(Bundle.load(world_root / "c1.json"))
    meter = AsClient(Bundle.load(world_root / "meter.json"))
    sensor_key, other_key = certs.generate_signing_key(), certs.generate_signing_key()
    try:
        await _certify(sensor, sensor_key, "sensor")
        await _certify(other, other_key, "other")
        keys = {}
        for path in SENSOR_RESOURCES:
            await sensor.register(
                path, content_format=0, profile="ccm-es256", max_age=60, rotation_period=0
            )
            keys[f"sensor/{path}"] = await sensor.keys(f"sensor/{path}")
        links = {
            "sensor": await sensor.link(PROXY_ID),
            "other": await other.link(PROXY_ID),
            "c1": await reader.link(PROXY_ID),
            "meter": await meter.link(PROXY_ID),
        }
    finally:
        for client in (sensor, other, reader, meter):
            await client.close()
    return sensor_key, other_key, keys, links


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("proxy")
    d = Deployment(root)
    for device_id, role in [
        ("meter", "producer"),
        ("sensor", "producer"),
        ("other", "producer"),
        ("solar", "producer"),
        ("c1", "consumer"),
        (PROXY_ID, "proxy"),
        ("cache-2", "proxy"),
    ]:
        d.enroll(role, device_id)
    for pattern in ("meter/*", "sensor/*", "solar/*"):
        d.grant("c1", pattern)
    d.start_as()
    files = {"power": root / "power.txt", "energy": root / "energy.txt"}
    files["power"].write_bytes(b"power 100 W")
    files["energy"].write_bytes(b"energy 1 kWh")
    producer = ProducerProcess(
        root / "meter.json",
        root / "meter",
        "--resource",
        f"power={files['power']}",
        "--resource",
        f"energy={files['energy']}",
        "--interval",
        "0.05",
        "--max-age",
        str(MAX_AGE),
    )
    producer.start()
    relay = await CountingRelay(producer.port).start()
    standin = await StandIn().start()
    sensor_key, other_key, keys, links = await _devices(root)
    config = root / "proxy.toml"
    metrics_port = free_tcp_port()
    config.write_text(
        f'metrics = "127.0.0.1:{metrics_port}"\n'
        "[limits]\nupstream_timeout = 1.0\nupstream_backoff = 1.0\n"
    )
    proxy = ProxyProcess(
        root / f"{PROXY_ID}.json",
        root / "proxy-state",
        "--config",
        str(config),
        "--reverse",
        f"meter={relay.address}",
        "--log-level",
        "debug",
    )
    world = World(
        root, d, producer, relay, standin, proxy, sensor_key, other_key, keys, links,
        root / "warm", files, metrics_port=metrics_port,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_until, lambda: producer.log().count("now sealing") >= 2, 20)
        await asyncio.to_thread(proxy.start)
        async with Consumer(root / "c1.json", world.warm) as warm:
            for path in ("power", "energy"):
                await warm.get(producer.uri(f"meter/{path}"))
            for rid in keys:  # secrets of the sensor resources, cached
                await warm.open_object(world.seal(rid, b"warm-up"), rid)
        yield world
    finally:
        proxy.kill()
        producer.kill()
        relay.close()
        await standin.close()
        d.close()


async def stats(world: World) -> dict[str, int]:
    response = await coap_get(world.proxy.uri(".well-known/oscar-stats"))
    assert response.code == Code.CONTENT
    doc: dict[str, int] = json.loads(response.payload)
    return doc


@pytest_asyncio.fixture(loop_scope="module")
async def secure(world: World) -> AsyncIterator[Context]:
    """The consumer c1 over DTLS to the proxy (verified by its handshake: no Echo)."""
    ctx = await dtls_context(world.proxy, "c1", world.links["c1"])
    yield ctx
    await ctx.shutdown()


def via_proxy(world: World, target: str) -> Message:
    """A GET to the proxy's DTLS port with Proxy-Uri ``target``."""
    message = Message(code=GET, uri=f"{world.proxy.secure_address}/")
    message.opt.uri_path = ()
    message.opt.proxy_uri = target
    return message


def published(world: World, resource_id: str, **kwargs: Any) -> Message:
    return Message(code=GET, uri=f"{world.proxy.secure_address}/{resource_id}", **kwargs)


# --- one upstream fetch per Max-Age ------------------------------------------------------------


async def test_hundred_consumers_cause_one_upstream_fetch_per_max_age(world: World) -> None:
    uri = world.proxy.uri("meter/power")
    consumers = world.consumers(100, "crowd")
    try:
        await asyncio.gather(*(c.start() for c in consumers))
        for batch in range(2):
            before, seen = await stats(world), len(world.relay.requests)
            started = time.monotonic()
            readings = await asyncio.gather(*(c.get(uri) for c in consumers))
            elapsed = time.monotonic() - started
            assert [r.plaintext for r in readings] == [b"power 100 W"] * 100
            after = await stats(world)
            # one fetch per Max-Age: one, unless a very loaded machine took longer than that
            allowed = 1 + int(elapsed // MAX_AGE)
            assert 1 <= len(world.relay.requests) - seen <= allowed, world.relay.requests[seen:]
            assert 1 <= after["upstream_requests"] - before["upstream_requests"] <= allowed
            method, with_etag, _ = world.relay.requests[seen]
            if batch == 0:  # the first: a miss, fetched whole
                assert (method, with_etag) == ("0.01", False)
                assert "2.05" in world.relay.responses[-allowed:]
                assert 1 <= after["misses"] - before["misses"] <= allowed
            else:  # after Max-Age: revalidated with the producer's ETag, 2.03
                assert (method, with_etag) == ("0.01", True)
                assert world.relay.responses[-allowed:] == ["2.03"] * allowed
                assert 1 <= after["revalidations"] - before["revalidations"] <= allowed
            # each address proves itself once (verified addresses are remembered)
            challenges = after["echo_challenges"] - before["echo_challenges"]
            assert challenges == (100 if batch == 0 else 0)
            await asyncio.sleep(MAX_AGE + 0.5)
    finally:
        await asyncio.gather(*(c.close() for c in consumers))


# --- verify before cache -----------------------------------------------------------------------


def _bad_objects(world: World, rid: str, good_seq: int) -> dict[str, bytes]:
    good = world.seal(rid, b"not cached", seq=good_seq + 1)
    parsed = ProtectedObject.from_bytes(good)
    at_ciphertext = good.index(parsed.encrypt0.ciphertext) + 2
    flipped = {}
    for name, position in (("ciphertext", at_ciphertext), ("signature", len(good) - 1)):
        data = bytearray(good)
        data[position] ^= 0x01
        flipped[f"flipped {name}"] = bytes(data)
    return {
        **flipped,
        "replayed": world.seal(rid, b"pt-older-0x53", seq=good_seq - 1),
        "wrong owner": world.seal(rid, b"pt-another-0x54", seq=good_seq + 2, key=world.other_key),
        "expired": world.seal(rid, b"pt-expired-0x51", seq=good_seq + 3, lifetime=60, age=120),
        "future": world.seal(rid, b"pt-future-0x52", seq=good_seq + 4, age=-3600),
        "other resource": world.seal("sensor/stale", b"pt-elsewhere-0x55", seq=good_seq + 5),
        "junk": b"\xd2\x84junk",
    }


async def test_objects_refused_on_fetch_and_the_good_one_kept(
    world: World, secure: Context
) -> None:
    rid = "sensor/fetched"
    resource = world.standin.resource(rid)
    target = world.standin.uri(rid)
    good = world.seal(rid, b"fetched 1")
    good_seq = ProtectedObject.from_bytes(good).metadata.seq
    resource.serve(good)  # Max-Age 0: every request goes upstream
    async with Consumer(world.root / "c1.json", world.warm) as consumer:
        reading = await consumer.get(target, proxy=world.proxy.address)
    assert reading.plaintext == b"fetched 1"
    first = await send(secure, via_proxy(world, target))
    assert first.payload == good
    for kind, bad in _bad_objects(world, rid, good_seq).items():
        before, asked = await stats(world), resource.requests
        resource.serve(bad)
        response = await send(secure, via_proxy(world, target))
        assert resource.requests == asked + 1, kind  # it did go upstream
        assert response.code == Code.CONTENT and response.payload == good, kind
        assert response.opt.etag == first.opt.etag, kind
        assert (await stats(world))["rejected"] == before["rejected"] + 1, kind

    # the same (epoch, seq) signed again: other bytes, neither replacing the entry nor its ETag
    again = world.seal(rid, b"fetched 1", seq=good_seq, age=5)  # other iat: other bytes
    assert again != good
    resource.serve(again)
    response = await send(secure, via_proxy(world, target))
    assert response.payload == good and response.opt.etag == first.opt.etag

    newer = world.seal(rid, b"fetched 2")
    resource.serve(newer)
    response = await send(secure, via_proxy(world, target))
    assert response.payload == newer and response.opt.etag != first.opt.etag


async def test_a_rollback_to_an_older_epoch_is_refused_on_fetch(
    world: World, secure: Context
) -> None:
    rid = "sensor/rollback"
    resource = world.standin.resource(rid)
    target = world.standin.uri(rid)
    upcoming = world.seal(rid, b"next epoch", upcoming=True)
    resource.serve(upcoming)
    assert (await send(secure, via_proxy(world, target))).payload == upcoming
    before = await stats(world)
    resource.serve(world.seal(rid, b"older epoch, higher seq"))
    response = await send(secure, via_proxy(world, target))
    assert response.payload == upcoming
    assert (await stats(world))["rejected"] == before["rejected"] + 1


async def test_objects_refused_on_publish_and_only_the_owner_publishes_over_dtls(
    world: World, secure: Context
) -> None:
    rid = "sensor/published"
    owner = await dtls_context(world.proxy, "sensor", world.links["sensor"])
    other = await dtls_context(world.proxy, "other", world.links["other"])
    plain = await Context.create_client_context()
    uri = f"{world.proxy.secure_address}/{rid}"

    def put(data: bytes, base: str = uri, **options: Any) -> Message:
        options.setdefault("content_format", 18)
        return Message(code=PUT, uri=base, payload=data, **options)

    try:
        assert (await send(secure, published(world, rid))).code == Code.NOT_FOUND
        good = world.seal(rid, b"published 1")
        good_seq = ProtectedObject.from_bytes(good).metadata.seq
        response = await send(owner, put(good))
        assert response.code == Code.CHANGED
        served = await send(secure, published(world, rid))
        assert served.payload == good
        assert served.opt.etag == object_etag(rid, world.keys[rid].active.epoch, good_seq)
        async with Consumer(world.root / "c1.json", world.warm) as consumer:
            reading = await consumer.get(world.proxy.uri(rid))  # plain CoAP, with Echo
        assert reading.plaintext == b"published 1"

        for kind, bad in _bad_objects(world, rid, good_seq).items():
            before = await stats(world)
            response = await send(owner, put(bad))
            assert (response.code, response.payload) == (Code.BAD_REQUEST, b"object rejected"), kind
            assert (await send(secure, published(world, rid))).payload == good, kind
            assert (await stats(world))["published"] == before["published"], kind

        again = world.seal(rid, b"published 1", seq=good_seq, age=5)
        assert (await send(owner, put(again))).code == Code.CHANGED
        served = await send(secure, published(world, rid))
        assert served.payload == good and served.opt.etag == object_etag(
            rid, world.keys[rid].active.epoch, good_seq
        )

        before = await stats(world)
        newer = world.seal(rid, b"published 2")
        assert (await send(other, put(newer))).code == Code.FORBIDDEN  # not its resource
        assert (await send(plain, put(newer, world.proxy.uri(rid)))).code == Code.FORBIDDEN
        assert (await send(owner, put(newer, content_format=0))).code == (
            Code.UNSUPPORTED_CONTENT_FORMAT
        )
        assert (await send(secure, published(world, rid))).payload == good
        assert (await stats(world))["publish_refused"] == before["publish_refused"] + 2

        assert (await send(owner, put(newer))).code == Code.CHANGED
        assert (await send(secure, published(world, rid))).payload == newer
        upcoming = world.seal(rid, b"published 3", upcoming=True)
        assert (await send(owner, put(upcoming))).code == Code.CHANGED
        rollback = world.seal(rid, b"older epoch")
        response = await send(owner, put(rollback))
        assert (response.code, response.payload) == (Code.BAD_REQUEST, b"object rejected")
        assert (await send(secure, published(world, rid))).payload == upcoming
    finally:
        for ctx in (owner, other, plain):
            await ctx.shutdown()


async def test_no_origin_can_keep_an_entry_fresh_for_longer_than_max_fresh(
    world: World, secure: Context
) -> None:
    """A forward-proxy client naming an origin of its own that claims a huge Max-Age must not
    freeze the shared entry: freshness is capped (limits.max_fresh, 300 s by default)."""
    rid = "sensor/frozen"
    resource = world.standin.resource(rid)
    resource.serve(world.seal(rid, b"v1", lifetime=3600), max_age=1_000_000)
    response = await send(secure, via_proxy(world, world.standin.uri(rid)))
    assert response.code == Code.CONTENT
    assert response.opt.max_age is not None and 250 <= response.opt.max_age <= 300


async def test_the_newest_valid_object_is_served_while_the_upstream_fails_until_its_exp(
    world: World, secure: Context
) -> None:
    rid = "sensor/stale"
    resource = world.standin.resource(rid)
    target = world.standin.uri(rid)
    obj = world.seal(rid, b"short-lived", lifetime=4)
    exp = ProtectedObject.from_bytes(obj).metadata.exp
    resource.serve(obj)
    assert (await send(secure, via_proxy(world, target))).payload == obj
    resource.error = Code.SERVICE_UNAVAILABLE
    before = await stats(world)
    response = await send(secure, via_proxy(world, target))
    assert response.code == Code.CONTENT and response.payload == obj
    assert response.opt.max_age is not None and response.opt.max_age <= exp - now() + 1
    assert (await stats(world))["stale_served"] > before["stale_served"]
    await asyncio.sleep(max(0.0, exp - time.time()) + 1.2)
    response = await send(secure, via_proxy(world, target))
    assert response.code == Code.BAD_GATEWAY and response.payload == b""


# --- no amplification --------------------------------------------------------------------------


async def test_unverified_plain_clients_get_an_echo_challenge_not_the_object(
    world: World, secure: Context
) -> None:
    client = RawClient(world.proxy.port, fresh=True)
    try:
        for message in (
            lambda: Message(code=GET, uri_path=("meter", "power")),
            lambda: Message(code=GET, proxy_uri=world.producer.uri("meter/power")),
            lambda: Message(code=GET, uri_path=("meter", "power"), observe=0),
        ):
            challenged = RawClient(world.proxy.port, fresh=True)  # a new address each time
            try:
                request, reply, decoded = await asyncio.to_thread(challenged.exchange, message())
            finally:
                challenged.close()
            assert decoded.code == Code.UNAUTHORIZED
            assert decoded.opt.echo is not None and decoded.payload == b""
            assert len(reply) <= 3 * len(request)

        _, _, challenge = await asyncio.to_thread(
            client.exchange, Message(code=GET, uri_path=("meter", "power"))
        )
        echo = challenge.opt.echo
        request, reply, decoded = await asyncio.to_thread(
            client.exchange, Message(code=GET, uri_path=("meter", "power"), echo=echo)
        )
        assert decoded.code == Code.CONTENT and decoded.opt.content_format == 18
        assert ProtectedObject.from_bytes(decoded.payload).metadata.resource_id == "meter/power"
        assert len(reply) > 3 * len(request)  # only now that the address is verified
        # an Echo made for another address proves nothing
        other = RawClient(world.proxy.port, fresh=True)
        try:
            _, _, decoded = await asyncio.to_thread(
                other.exchange, Message(code=GET, uri_path=("meter", "power"), echo=echo)
            )
        finally:
            other.close()
        assert decoded.code == Code.UNAUTHORIZED
    finally:
        client.close()
    response = await send(secure, published(world, "meter/power"))  # DTLS: no challenge
    assert response.code == Code.CONTENT and response.opt.echo is None


async def test_a_verified_plain_clients_hits_take_the_fast_path(world: World) -> None:
    """The running proxy answers a verified client's cache hits on its fast path
    (proxy/fastpath.py; tests/roles/proxy/test_proxy_fastpath.py compares the bytes)."""
    client = RawClient(world.proxy.port, fresh=True)
    get = lambda **kw: Message(code=GET, uri_path=("meter", "power"), **kw)  # noqa: E731
    try:
        _, _, challenge = await asyncio.to_thread(client.exchange, get())
        _, _, first = await asyncio.to_thread(client.exchange, get(echo=challenge.opt.echo))
        assert first.code == Code.CONTENT  # through aiocoap: this request proved the address
        before = await stats(world)
        _, _, again = await asyncio.to_thread(client.exchange, get())
        _, _, valid = await asyncio.to_thread(client.exchange, get(etag=first.opt.etag))
        after = await stats(world)
    finally:
        client.close()
    assert again.code == Code.CONTENT and again.payload == first.payload
    assert valid.code == Code.VALID and valid.opt.etag == first.opt.etag
    assert after["fast_hits"] - before["fast_hits"] == 2
    assert after["hits"] - before["hits"] >= 2


# --- observation relay -------------------------------------------------------------------------


async def test_fifty_observers_share_one_upstream_observation_even_across_a_producer_restart(
    world: World,
) -> None:
    uri = world.proxy.uri("meter/energy")
    consumers = world.consumers(50, "watch")
    seen: list[list[bytes]] = [[] for _ in consumers]
    registrations = sum(1 for r in world.relay.requests if r[2])

    async def watch(i: int, consumer: Consumer) -> None:
        async for reading in consumer.observe(uri):
            seen[i].append(reading.plaintext)

    def all_have(value: bytes) -> bool:
        return all(value in values for values in seen)

    tasks = [asyncio.create_task(watch(i, c)) for i, c in enumerate(consumers)]
    try:
        for _ in range(300):
            if all_have(b"energy 1 kWh"):
                break
            await asyncio.sleep(0.05)
        assert all_have(b"energy 1 kWh")
        doc = await stats(world)
        assert doc["observers"] == 50 and doc["upstream_observations"] == 1
        assert sum(1 for r in world.relay.requests if r[2]) == registrations + 1
        for value in (b"energy 2 kWh", b"energy 3 kWh"):
            write_atomic(world.files["energy"], value)
            for _ in range(200):
                if all_have(value):
                    break
                await asyncio.sleep(0.05)
            assert all_have(value), [v[-1:] for v in seen]
        assert all(values == [b"energy 1 kWh", b"energy 2 kWh", b"energy 3 kWh"] for values in seen)

        # the producer restarts: it has forgotten the proxy's observation; the proxy notices
        await asyncio.to_thread(world.producer.stop)
        await asyncio.to_thread(world.producer.start)
        write_atomic(world.files["energy"], b"energy 4 kWh")
        for _ in range(300):
            if all_have(b"energy 4 kWh"):
                break
            await asyncio.sleep(0.05)
        assert all_have(b"energy 4 kWh"), [v[-1:] for v in seen]
        assert (await stats(world))["upstream_observations"] == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in consumers))
    # the observers are gone; the proxy learns it when it next notifies them (RST / ICMP),
    # and then ends its own upstream observation
    write_atomic(world.files["energy"], b"energy 5 kWh")
    for _ in range(100):
        doc = await stats(world)
        if doc["upstream_observations"] == 0:
            break
        await asyncio.sleep(0.05)
    assert doc["upstream_observations"] == 0 and doc["observers"] == 0, json.dumps(doc)


# --- bad input ---------------------------------------------------------------------------------


async def test_bad_requests_get_clear_answers_and_no_traceback(
    world: World, secure: Context
) -> None:
    client = RawClient(world.proxy.port)
    cases = [
        (Message(code=GET, proxy_uri="coap://127.0.0.1:99999/sensor/x"), Code.BAD_REQUEST),
        (Message(code=GET, proxy_uri="coap://[::1/sensor/x"), Code.BAD_REQUEST),
        (Message(code=GET, proxy_uri="coap://127.0.0.1/sensor/x?q=1"), Code.BAD_REQUEST),
        (Message(code=GET, proxy_uri="coap:///sensor/x"), Code.BAD_REQUEST),
        (Message(code=GET, proxy_uri="coap://127.0.0.1/nothing"), Code.BAD_REQUEST),
        (Message(code=GET, proxy_uri="coaps://127.0.0.1/sensor/x"), Code.PROXYING_NOT_SUPPORTED),
        (Message(code=GET, proxy_uri="http://127.0.0.1/sensor/x"), Code.PROXYING_NOT_SUPPORTED),
        (Message(code=GET, uri_path=("nothing",)), Code.NOT_FOUND),
        (Message(code=GET, uri_path=("sensor", "unknown")), Code.NOT_FOUND),
        (Message(code=POST, uri_path=("sensor", "x"), payload=b"x"), Code.METHOD_NOT_ALLOWED),
    ]
    try:
        for message, expected in cases:
            _, _, reply = await asyncio.to_thread(client.exchange, message)
            if message.opt.uri_path == ("sensor", "unknown"):
                # an unproven address is challenged before any lookup; with the Echo, the answer
                assert reply.code == Code.UNAUTHORIZED and reply.opt.echo is not None, reply
                message.opt.echo = reply.opt.echo
                _, _, reply = await asyncio.to_thread(client.exchange, message)
            assert reply.code == expected, (message, reply)
        # the last one: a GET whose Uri-Path option is not UTF-8 (aiocoap raises in its receive
        # callback; the proxy logs one info line instead of an ERROR traceback)
        for junk in (b"", b"\x40", b"\xff" * 40, os.urandom(300), b"\x50\x01\x12\x34\xb2\xff\xfe"):
            client.sock.send(junk)
    finally:
        client.close()
    owner = await dtls_context(world.proxy, "sensor", world.links["sensor"])
    try:
        for payload in (b"", b"\xa0", os.urandom(200)):
            put = Message(code=PUT, uri=f"{world.proxy.secure_address}/sensor/published",
                          payload=payload, content_format=18)  # fmt: skip
            response = await send(owner, put)
            assert (response.code, response.payload) == (Code.BAD_REQUEST, b"object rejected")
    finally:
        await owner.shutdown()
    assert (await send(secure, published(world, "meter/power"))).code == Code.CONTENT  # alive
    log = world.proxy.log()
    assert "Traceback" not in log and " ERROR " not in log


# --- counters ----------------------------------------------------------------------------------


async def test_counters_from_the_cli_and_from_loopback(world: World) -> None:
    doc = await stats(world)
    expected = {"hits", "misses", "revalidations", "upstream_requests", "rejected", "published"}
    expected |= {"publish_refused", "echo_challenges", "stale_served", "memory_entries"}
    assert expected <= doc.keys()
    assert doc["upstream_requests"] >= 2 and doc["rejected"] >= 10 and doc["published"] >= 2
    state = str(world.proxy.state)
    result = await asyncio.to_thread(run, "-m", "proxy", "stats", "--state", state, "--json")
    live = json.loads(result.stdout)  # live: no second of delay
    assert live["upstream_requests"] >= doc["upstream_requests"]
    assert live["rejected"] >= doc["rejected"] and live["disk_entries"] >= 4
    # one more challenge: the CLI shows it at once (the counters are asked of the running proxy)
    client = RawClient(world.proxy.port, fresh=True)
    try:
        message = Message(code=GET, uri_path=("meter", "power"))
        _, _, reply = await asyncio.to_thread(client.exchange, message)
    finally:
        client.close()
    assert reply.code == Code.UNAUTHORIZED
    result = await asyncio.to_thread(run, "-m", "proxy", "stats", "--state", state)
    rows = [line.split() for line in result.stdout.splitlines()]
    assert {row[0] for row in rows} == set(live)
    assert all(len(row) == 2 and row[1].isdigit() for row in rows)
    counted = {row[0]: int(row[1]) for row in rows}["echo_challenges"]
    assert counted == live["echo_challenges"] + 1
    assert not (world.proxy.state / "stats.json").exists()  # nothing rewritten every second


async def test_the_metrics_endpoint_serves_the_live_counters(world: World) -> None:
    """``metrics = "HOST:PORT"`` in the TOML file: the counters as Prometheus families, each
    between the values ``/.well-known/oscar-stats`` showed just before and just after."""
    before = await stats(world)
    async with Consumer(world.root / "c1.json", world.warm) as reader:
        await reader.get(world.proxy.uri("meter/power"))  # a hit or a miss: counted either way
    text = await asyncio.to_thread(_scrape, world.metrics_port)
    after = await stats(world)

    def series(name: str) -> float:
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in the scrape"
        return float(match.group(1))

    pairs = {
        "oscar_proxy_cache_misses_total": "misses",
        "oscar_proxy_upstream_fetches_total": "upstream_requests",
        "oscar_proxy_objects_rejected_total": "rejected",
        "oscar_proxy_objects_verified_total": "verified",
        "oscar_proxy_echo_challenges_total": "echo_challenges",
        'oscar_proxy_publications_total{outcome="accepted"}': "published",
        'oscar_proxy_publications_total{outcome="refused"}': "publish_refused",
        'oscar_proxy_cache_entries{tier="disk"}': "disk_entries",
        'oscar_proxy_cache_entries{tier="large"}': "large_entries",
        'oscar_proxy_cache_bytes{tier="large"}': "large_bytes",
    }
    for name, key in pairs.items():
        assert before[key] <= series(name) <= after[key], (name, before[key], after[key])
    hits = series('oscar_proxy_cache_hits_total{path="fast"}')
    hits += series('oscar_proxy_cache_hits_total{path="slow"}')
    assert before["hits"] <= hits <= after["hits"]
    assert after["hits"] + after["misses"] > before["hits"] + before["misses"]  # the read above
    assert series("process_open_fds") > 0
    assert after["verified"] >= 4  # the fetched and published objects of the tests before
    assert series("oscar_proxy_dtls_sessions") >= 1  # the publishers' and readers' sessions
    # Answers through aiocoap (the fast path's are its hits): the read above took that way or
    # the fast one; each is counted by outcome, with its time.
    answered = sum(
        float(v)
        for k, v in re.findall(r"^(oscar_proxy_requests_total\{[^}]*\}) (\S+)$", text, re.M)
    )
    assert answered == series("oscar_proxy_request_seconds_count") > 0
    assert "meter" not in text and "sensor" not in text  # no resource name in a label


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- nothing readable in the proxy's files or log ----------------------------------------------


def _needles(world: World) -> dict[str, bytes]:
    needles: dict[str, bytes] = {}
    for rid in ("meter/power", "meter/energy", *world.keys):
        needles[f"resource {rid}"] = rid.encode()
    for i, obj in enumerate(world.objects):
        parsed = ProtectedObject.from_bytes(obj)
        needles[f"object {i}"] = obj
        needles[f"ciphertext {i}"] = parsed.encrypt0.ciphertext
        needles[f"signature {i}"] = parsed.sign1.signature
    return needles


def _search(blob: bytes, needles: dict[str, bytes]) -> list[str]:
    return [name for name, needle in needles.items() if needle in blob]


async def test_the_state_directory_holds_no_resource_name_and_no_object_bytes(
    world: World, secure: Context
) -> None:
    served = await send(secure, published(world, "meter/power"))
    needles = _needles(world)
    needles["served meter/power"] = served.payload
    needles["its ciphertext"] = ProtectedObject.from_bytes(served.payload).encrypt0.ciphertext
    files = [p for p in world.proxy.state.rglob("*") if p.is_file()]
    assert "cache.db" in {p.name for p in files}
    for path in files:
        assert _search(path.read_bytes(), needles) == [], path


async def test_the_debug_log_holds_no_plaintext_secret_or_link_key(world: World) -> None:
    log = world.proxy.log().encode()
    bundle = json.loads((world.root / f"{PROXY_ID}.json").read_text())
    values = [b"power 100 W", b"solar 5 kW"] + [b"energy %d kWh" % i for i in range(1, 5)]
    needles = {f"plaintext {p!r}": p for p in {*world.plaintexts, *values}}
    for device_id, psk in world.links.items():
        needles[f"link key of {device_id}"] = psk
        needles[f"link key of {device_id} (hex)"] = psk.hex().encode()
        needles[f"link key of {device_id} (repr)"] = repr(psk)[2:-1].encode()
    needles["the proxy's PSK (hex)"] = bundle["psk_hex"].encode()
    needles["the proxy's PSK"] = bytes.fromhex(bundle["psk_hex"])
    for rid, state in world.keys.items():
        needles[f"secret of {rid}"] = bytes(state.active.secret.value)
    assert b" DEBUG " in log  # it did run at debug level
    assert _search(log, needles) == []


# --- a producer that publishes, one that stops -------------------------------------------------


async def test_a_real_producer_publishes_over_dtls_and_its_object_outlives_it(
    world: World, secure: Context
) -> None:
    value = world.root / "solar.txt"
    value.write_bytes(b"solar 5 kW")
    solar = ProducerProcess(
        world.root / "solar.json",
        world.root / "solar",
        "--resource",
        f"output={value}",
        "--publish",
        f"{PROXY_ID}={world.proxy.secure_address}",
    )
    await asyncio.to_thread(solar.start)
    try:
        for _ in range(200):
            response = await send(secure, published(world, "solar/output"))
            if response.code == Code.CONTENT:
                break
            await asyncio.sleep(0.1)
        assert response.code == Code.CONTENT
    finally:
        await asyncio.to_thread(solar.stop)
    async with Consumer(world.root / "c1.json") as consumer:
        reading = await consumer.get(world.proxy.uri("solar/output"))
    assert reading.plaintext == b"solar 5 kW"


async def test_producer_stopped_then_proxy_restarted_the_cache_still_serves(
    world: World,
) -> None:
    uri = world.proxy.uri("meter/power")
    async with Consumer(world.root / "c1.json") as consumer:
        assert (await consumer.get(uri)).plaintext == b"power 100 W"
        await asyncio.to_thread(world.producer.stop)
        await asyncio.sleep(MAX_AGE + 0.5)
        before = await stats(world)
        assert (await consumer.get(uri)).plaintext == b"power 100 W"
        assert (await stats(world))["stale_served"] > before["stale_served"]

        assert await asyncio.to_thread(world.proxy.stop) == 0
        await asyncio.to_thread(world.proxy.start)
        reading = await consumer.get(uri)
        assert reading.plaintext == b"power 100 W"
        doc = await stats(world)
        assert doc["disk_entries"] >= 4 and doc["stale_served"] >= 1
    log = world.proxy.log()
    assert "Traceback" not in log and " ERROR " not in log


# --- limits ------------------------------------------------------------------------------------


async def test_many_resources_keep_memory_and_disk_within_their_limits(world: World) -> None:
    config = world.root / "small.toml"
    config.write_text("[limits]\nmemory_entries = 3\ndisk_entries = 5\n")
    proxy = ProxyProcess(
        world.root / f"{PROXY_ID}.json", world.root / "small-state", "--config", str(config)
    )
    await asyncio.to_thread(proxy.start)
    owner = await dtls_context(proxy, "sensor", world.links["sensor"])
    secret = AccessSecret(os.urandom(32))
    try:
        for i in range(12):
            rid = f"sensor/r{i}"
            obj = world.seal(rid, b"many", secret=secret, epoch=1)
            put = Message(code=PUT, uri=f"{proxy.secure_address}/{rid}", payload=obj,
                          content_format=18)  # fmt: skip
            assert (await send(owner, put)).code == Code.CHANGED
        response = await coap_get(proxy.uri(".well-known/oscar-stats"))
        doc = json.loads(response.payload)
        assert doc["memory_entries"] == 3 and doc["disk_entries"] == 5
        assert doc["published"] == 12
        for i, expected in ((11, Code.CONTENT), (7, Code.CONTENT), (6, Code.NOT_FOUND),
                            (0, Code.NOT_FOUND)):  # fmt: skip
            get = Message(code=GET, uri=f"{proxy.secure_address}/sensor/r{i}")
            assert (await send(owner, get)).code == expected, i
        doc = json.loads((await coap_get(proxy.uri(".well-known/oscar-stats"))).payload)
        assert doc["memory_entries"] <= 3 and doc["disk_entries"] == 5
    finally:
        await owner.shutdown()
        await asyncio.to_thread(proxy.stop)


# --- bad configuration, bad state ----------------------------------------------------------------


def _proxy_cli(*args: str) -> Any:
    return run("-m", "proxy", *args, check=False)


def _one_line(result: Any, status: int) -> None:
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oscar-proxy"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "toml"),
    [
        ((), None),
        (("--listen", "nowhere"), None),
        (("--listen", "127.0.0.1:70000"), None),
        (("--reverse", "meter"), None),
        (("--reverse", "meter=http://127.0.0.1:5683"), None),
        (("--reverse", "meter=coap://127.0.0.1:5683/path"), None),
        (("--no-plain", "--no-dtls"), None),
        (("--bogus",), None),
        (("--listen", "0.0.0.0:5683"), None),
        ((), "not toml ["),
        ((), "[limits]\nmemory_entries = 0\n"),
        ((), "[limits]\nupstream_timeout = true\n"),
        ((), "[limits]\nupstream_timeout = 99999\n"),
        ((), "[limits]\nbogus = 1\n"),
        ((), "bogus = 1\n"),
        ((), "[reverse]\nmeter = 5\n"),
        (("--config", "/nonexistent/proxy.toml"), None),
    ],
)
async def test_bad_configuration_exits_2_with_one_line(
    world: World, tmp_path: Path, args: tuple[str, ...], toml: str | None
) -> None:
    full = ["--bundle", str(world.root / f"{PROXY_ID}.json"), "--state", str(tmp_path / "s")]
    if not any(a.startswith("--listen") for a in args):
        full += ["--listen", f"127.0.0.1:{free_port_pair()}"]
    if toml is not None:
        (tmp_path / "p.toml").write_text(toml)
        full += ["--config", str(tmp_path / "p.toml")]
    if args == ():
        full = full if toml is not None else []
    result = await asyncio.to_thread(_proxy_cli, *full, *args)
    _one_line(result, 2)
    assert not (tmp_path / "s").exists()


async def test_stats_without_a_proxy(tmp_path: Path) -> None:
    _one_line(await asyncio.to_thread(_proxy_cli, "stats"), 2)
    _one_line(await asyncio.to_thread(_proxy_cli, "stats", "--state", str(tmp_path)), 1)


def _start_fails(world: World, state: Path, bundle: str = PROXY_ID) -> Any:
    return _proxy_cli(
        "--bundle", str(world.root / f"{bundle}.json"), "--state", str(state),
        "--listen", f"127.0.0.1:{free_port_pair()}", "--no-dtls",
    )  # fmt: skip


def _snapshot(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}


async def test_a_corrupt_or_foreign_cache_is_refused_and_left_unchanged(
    world: World, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "cache.db").write_bytes(os.urandom(8192))
    before = _snapshot(state)
    result = await asyncio.to_thread(_start_fails, world, state)
    _one_line(result, 1)
    assert "cache" in result.stderr
    assert _snapshot(state) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    with sqlite3.connect(foreign / "cache.db") as db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    db.close()
    before = _snapshot(foreign)
    _one_line(await asyncio.to_thread(_start_fails, world, foreign), 1)
    assert _snapshot(foreign) == before

    # a cache made by this proxy, then opened under another proxy's bundle
    made = tmp_path / "made"
    proxy = ProxyProcess(world.root / f"{PROXY_ID}.json", made, "--no-dtls")
    await asyncio.to_thread(proxy.start, wait_for="serving")
    assert await asyncio.to_thread(proxy.stop) == 0
    before = _snapshot(made)
    assert "cache.db" in before
    result = await asyncio.to_thread(_start_fails, world, made, "cache-2")
    _one_line(result, 1)
    assert "another" in result.stderr
    assert _snapshot(made) == before
