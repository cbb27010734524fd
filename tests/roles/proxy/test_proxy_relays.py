"""The proxy's observation relays under attack (issue 13, finding 1), against real processes: a real
AS, a real proxy process with small relay limits, stand-in origins serving genuine objects (the
producer ``sensor`` and replicas of it), "victim" UDP sockets that never serve anything, and raw
clients, each on a loopback address of its own (one client each for the per-client limits).

What holds: a relay goes only toward an origin that served the object (or the reverse target);
relays are bounded in all and per client; each ends with the last observation attached to it,
so that what a client leaves behind is gone once it has gone (counted at the origins too); the
proxy's memory stays bounded under thousands of registrations.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import Message
from aiocoap.numbers.codes import Code
from as_harness import free_port
from cryptography.hazmat.primitives import serialization
from proxy_harness import ObserveClient, ProxyProcess, StandIn
from system_harness import Deployment, coap_get

from oscar import AccessSecret, Sealer, certs, profile_by_name
from oscar.algorithms import PrivateKey
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROXY_ID = "cache-1"
RELAYS, RELAYS_PER_CLIENT, OBSERVERS_PER_CLIENT = 4, 3, 40
#: Served fresh for a minute by the producer (reverse-mapped): lookups of it are cache hits.
STEADY = "sensor/temperature"
#: Served with Max-Age 0 by the producer and five replicas: every lookup asks the named origin.
VOLATILE = "sensor/humidity"


class _Counting(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams += 1


@dataclass
class World:
    root: Path
    d: Deployment
    key: PrivateKey
    secret: AccessSecret
    producer: StandIn
    replicas: list[StandIn]
    victims: list[tuple[int, _Counting, Any]]
    proxy: ProxyProcess
    seq: int = 100

    def seal(self, resource_id: str) -> bytes:
        self.seq += 1
        t = int(time.time())
        return Sealer(
            secret=self.secret,
            producer_id="sensor",
            resource_id=resource_id,
            epoch=1,
            signing_key=self.key,
            profile=profile_by_name("ccm-es256"),
        ).seal(seq=self.seq, iat=t, exp=t + 600, content_format=0, plaintext=b"21 C")

    def serve_new(self, resource_id: str) -> None:
        """A new object of ``resource_id`` at every origin that serves it (observers notified)."""
        obj = self.seal(resource_id)
        if resource_id == STEADY:
            self.producer.resource(STEADY).serve(obj, max_age=60)
        else:
            for origin in (self.producer, *self.replicas):
                origin.resource(VOLATILE).serve(obj, max_age=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("relays")
    d = Deployment(root)
    d.enroll("producer", "sensor")
    d.enroll("proxy", PROXY_ID)
    d.start_as()
    key = certs.generate_signing_key()
    client = AsClient(Bundle.load(root / "sensor.json"))
    try:
        csr = certs.make_csr(key, "sensor").public_bytes(serialization.Encoding.DER)
        await client.request_certificate(csr)
    finally:
        await client.close()
    producer = await StandIn().start()
    replicas = [await StandIn().start() for _ in range(5)]
    loop = asyncio.get_running_loop()
    victims = []
    for _ in range(40):
        port = free_port()
        transport, protocol = await loop.create_datagram_endpoint(
            _Counting, local_addr=("127.0.0.1", port)
        )
        victims.append((port, protocol, transport))
    config = root / "proxy.toml"
    config.write_text(
        "[limits]\nupstream_timeout = 1.0\nupstream_backoff = 1.0\n"
        f"relays = {RELAYS}\nrelays_per_client = {RELAYS_PER_CLIENT}\n"
        f"observers_per_client = {OBSERVERS_PER_CLIENT}\n"
    )
    proxy = ProxyProcess(
        root / f"{PROXY_ID}.json",
        root / "proxy-state",
        "--config",
        str(config),
        "--reverse",
        f"sensor=coap://127.0.0.1:{producer.port}",
        "--log-level",
        "debug",
    )
    world = World(root, d, key, AccessSecret(os.urandom(32)), producer, replicas, victims, proxy)
    world.serve_new(STEADY)
    world.serve_new(VOLATILE)
    try:
        await asyncio.to_thread(proxy.start)
        yield world
    finally:
        proxy.kill()
        for _, _, transport in victims:
            transport.close()
        for origin in (producer, *replicas):
            await origin.close()
        d.close()


async def stats(world: World) -> dict[str, int]:
    response = await coap_get(world.proxy.uri(".well-known/oscar-stats"))
    assert response.code == Code.CONTENT
    doc: dict[str, int] = json.loads(response.payload)
    return doc


async def settle(world: World, **expected: int) -> dict[str, int]:
    """The counters once they show ``expected`` (within 20 s: a loaded box), else as they are."""
    deadline = time.monotonic() + 20
    while True:
        doc = await stats(world)
        if all(doc[k] == v for k, v in expected.items()) or time.monotonic() > deadline:
            return doc
        await asyncio.sleep(0.3)


async def leave(world: World, *clients: ObserveClient, resource_id: str) -> None:
    """``clients`` go away; a new object makes the proxy notify them and learn it (ICMP)."""
    for client in clients:
        client.close()
    world.serve_new(resource_id)


def observed(reply: Message) -> bool:
    return reply.code == Code.CONTENT and reply.opt.observe is not None


async def test_origins_that_never_served_the_object_get_no_observation(world: World) -> None:
    """One client proves its address once, then observes the resource through 40 origins it
    names that never served it: none of them gets a datagram (no relay, nor a fetch: the entry is
    fresh), its observations share the producer's relay, and once it has gone that relay is the
    other client's alone; after the last observer, none is left (also at the producer)."""
    producer = world.producer.resource(STEADY)
    legit = ObserveClient(world.proxy.port, "127.0.0.2")
    attacker = ObserveClient(world.proxy.port, "127.0.0.3")
    reply = await asyncio.to_thread(legit.observe, world.producer.uri(STEADY))
    assert observed(reply)
    assert (await settle(world, upstream_observations=1))["upstream_observations"] == 1
    for port, _, _ in world.victims:
        reply = await asyncio.to_thread(attacker.observe, f"coap://127.0.0.1:{port}/{STEADY}")
        assert observed(reply), port  # observed, from what the producer sends
    doc = await stats(world)
    assert doc["observers"] == 41 and doc["upstream_observations"] == 1
    # each client's first registration carried its Echo (aiocoap's path); the 39 others: fast
    assert doc["fast_observers"] == 39
    await asyncio.sleep(1.5)  # what the proxy would send the victims has had time to arrive
    assert [v.datagrams for _, v, _ in world.victims] == [0] * len(world.victims)

    registrations = producer.registrations
    await leave(world, attacker, resource_id=STEADY)
    doc = await settle(world, observers=1)
    assert doc["observers"] == 1 and doc["upstream_observations"] == 1
    assert producer.registrations == registrations  # one relay, kept: no new registration
    await leave(world, legit, resource_id=STEADY)
    doc = await settle(world, observers=0, upstream_observations=0)
    assert doc["observers"] == 0 and doc["upstream_observations"] == 0
    assert doc["fast_observers"] == 0
    assert [v.datagrams for _, v, _ in world.victims] == [0] * len(world.victims)


async def test_observers_that_leave_take_no_other_observer_with_them(world: World) -> None:
    """Ten observers leave while ten stay, all of one resource: the next object reaches the ten
    that stay and they stay observed. (aiocoap charged the ICMP error of a notification to a
    socket that had gone to whichever peer the proxy sent to next: see
    oscar_io.aiocoap_fixes.)"""
    uri = world.producer.uri(STEADY)
    stay = [ObserveClient(world.proxy.port, f"127.0.1.{i}") for i in range(1, 11)]
    go = [ObserveClient(world.proxy.port, f"127.0.2.{i}") for i in range(1, 11)]
    for client in (*stay, *go):
        assert observed(await asyncio.to_thread(client.observe, uri))
    assert (await stats(world))["observers"] == 20
    await leave(world, *go, resource_id=STEADY)
    for client in stay:
        notification = await asyncio.to_thread(client.notification)
        assert notification.code == Code.CONTENT and notification.opt.observe is not None
    doc = await settle(world, observers=10)
    assert doc["observers"] == 10 and doc["upstream_observations"] == 1
    await leave(world, *stay, resource_id=STEADY)
    doc = await settle(world, observers=0, upstream_observations=0)
    assert doc["observers"] == 0 and doc["upstream_observations"] == 0


async def test_relays_are_bounded_per_client_and_in_all_and_end_with_their_last_observer(
    world: World,
) -> None:
    """Five replicas serve the genuine object (Max-Age 0: each lookup asks the named one), so a
    relay toward each is allowed: a client gets three (its bound), then its observations are
    answered without Observe; a second client gets the fourth relay (the bound in all), not the
    fifth. When the first client has gone, its three relays end, and the replicas they observed
    get no registration again, while the one still held keeps registering (Max-Age 0)."""
    uris = [replica.uri(VOLATILE) for replica in world.replicas]
    first = ObserveClient(world.proxy.port, "127.0.0.4")
    second = ObserveClient(world.proxy.port, "127.0.0.5")
    replies = [await asyncio.to_thread(first.observe, uri) for uri in uris]
    assert [observed(r) for r in replies] == [True] * 3 + [False] * 2
    assert all(r.code == Code.CONTENT for r in replies)  # declined observations still get the GET
    doc = await settle(world, upstream_observations=3)
    assert doc["upstream_observations"] == 3 and doc["observations_declined"] >= 2
    assert observed(await asyncio.to_thread(second.observe, uris[3]))
    reply = await asyncio.to_thread(second.observe, uris[4])
    assert reply.code == Code.CONTENT and not observed(reply)  # 4 relays in all
    assert (await stats(world))["upstream_observations"] == RELAYS

    await leave(world, first, resource_id=VOLATILE)
    doc = await settle(world, upstream_observations=1)
    assert doc["upstream_observations"] == 1 and doc["observers"] == 1
    await asyncio.sleep(1.0)  # a registration under way when the relay ended has arrived
    before = [replica.resource(VOLATILE).registrations for replica in world.replicas]
    await asyncio.sleep(6.0)  # Max-Age 0: a live relay registers again within 3 s
    after = [replica.resource(VOLATILE).registrations for replica in world.replicas]
    assert after[:3] == before[:3]  # the relays the first client held are gone at the origins
    assert after[3] > before[3]  # the second client's relay is alive (and would be counted)
    assert observed(await asyncio.to_thread(second.observe, uris[4]))  # room again

    await leave(world, second, resource_id=VOLATILE)
    doc = await settle(world, upstream_observations=0, observers=0)
    assert doc["upstream_observations"] == 0 and doc["observers"] == 0


async def test_thousands_of_registrations_keep_memory_and_relays_bounded(world: World) -> None:
    """3,000 Observe GETs from one proven client, each naming another origin that never served
    the object: at most ``observers_per_client`` are held, one relay (the producer's), and the
    proxy's RSS grows by a bounded amount; all is given back when the client has gone."""
    attacker = ObserveClient(world.proxy.port, "127.0.0.6")
    reply = await asyncio.to_thread(attacker.observe, world.producer.uri(STEADY), None)
    assert reply.code == Code.CONTENT  # the entry is cached (and fresh for a minute)
    rss = world.proxy.rss_kib()
    held = 0
    for i in range(3000):
        port = 20000 + i
        reply = await asyncio.to_thread(
            attacker.observe, f"coap://127.0.0.{7 + i % 200}:{port}/{STEADY}"
        )
        assert reply.code == Code.CONTENT, i
        held += observed(reply)
    assert held == OBSERVERS_PER_CLIENT
    doc = await stats(world)
    assert doc["observers"] == OBSERVERS_PER_CLIENT and doc["upstream_observations"] == 1
    growth = world.proxy.rss_kib() - rss
    assert growth < 16_000, growth  # KiB
    await leave(world, attacker, resource_id=STEADY)
    doc = await settle(world, observers=0, upstream_observations=0)
    assert doc["observers"] == 0 and doc["upstream_observations"] == 0
