"""A proxy cluster's observations and Redis failures, as real processes on loopback (issue 16).

One world per module: a private Redis (persistent: its RDB survives a graceful restart), an AS,
the real producer ``meter`` (file-backed resources: a new file content is a new object) behind a
relay that counts what reaches it, and three instances of one proxy bundle (``--cluster``, the
producer reverse-mapped at ``/meter``). Consumers are the real library, or raw CoAP where what the
proxy answers matters more than what a consumer accepts (the consumer hides a rollback).

The tests run in order: observations shared across the instances; the observing instance killed
(another takes over); Redis restarted under load; Redis restarted empty; the logs of it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import GET, PUT, Context, Message
from aiocoap.numbers.codes import Code
from as_harness import free_port
from proxy_harness import ProxyProcess, dtls_context, send
from redis_harness import RedisServer
from system_harness import Deployment, ProducerProcess, coap_get, wait_until, write_atomic

from consumer import Consumer
from oscar import ProtectedObject
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_AGE = 10  # the producer's Max-Age: an upstream observation silent for longer registers again
PROXY_ID = "cache-1"
LEASE_LINE = "upstream for the cluster"  # "observing <rid> upstream for the cluster"
OUTAGE_LINE = "unreachable ("  # "cluster store ... unreachable (why): serving what ..."
RESYNC_LINE = "reachable again; resynchronized"


class NatRelay:
    """A UDP relay in front of the producer for several clients (the instances): one upstream
    socket per client address, so that each gets its own answers and notifications. Counts the
    requests reaching the producer (``requests``: (code, has ETag, has Observe))."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.requests: list[tuple[str, bool, bool]] = []
        self._listen: Any = None
        self._upstreams: dict[Any, socket.socket] = {}

    async def start(self) -> NatRelay:
        relay = self

        class Listen(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay.from_client(data, addr)

        self.port = free_port()
        self._listen, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Listen, local_addr=("127.0.0.1", self.port)
        )
        return self

    @property
    def address(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def observe_registrations(self) -> int:
        return sum(1 for _, _, observe in self.requests if observe)

    def from_client(self, data: bytes, addr: Any) -> None:
        with contextlib.suppress(Exception):
            message = Message.decode(data)
            if message.code.is_request():
                self.requests.append(
                    (message.code.dotted, bool(message.opt.etags), message.opt.observe == 0)
                )
        upstream = self._upstreams.get(addr)
        if upstream is None:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            upstream.setblocking(False)
            upstream.connect(("127.0.0.1", self.upstream_port))
            self._upstreams[addr] = upstream
            asyncio.get_running_loop().add_reader(upstream.fileno(), self._drain, upstream, addr)
        with contextlib.suppress(OSError):
            upstream.send(data)

    def _drain(self, upstream: socket.socket, addr: Any) -> None:
        while True:
            try:
                data = upstream.recv(65536)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error of an earlier datagram
                continue
            self._listen.sendto(data, addr)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for upstream in self._upstreams.values():
            loop.remove_reader(upstream.fileno())
            upstream.close()
        if self._listen is not None:
            self._listen.close()


@dataclass
class World:
    root: Path
    d: Deployment
    producer: ProducerProcess
    relay: NatRelay
    redis: RedisServer
    config: Path
    proxies: list[ProxyProcess]
    files: dict[str, Path]
    warm: Path
    meter_link: bytes

    def instance(self, name: str) -> ProxyProcess:
        return ProxyProcess(
            self.root / f"{PROXY_ID}.json",
            self.root / name,
            "--config",
            str(self.config),
            "--cluster",
            self.redis.url,
            "--reverse",
            f"meter={self.relay.address}",
        )

    def consumers(self, n: int, tag: str) -> list[Consumer]:
        out = []
        for i in range(n):
            state = self.root / f"{tag}-{i}"
            shutil.copytree(self.warm, state)
            out.append(Consumer(self.root / "c1.json", state))
        return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("proxy-cluster")
    d = Deployment(root)
    for device_id, role in [("meter", "producer"), ("c1", "consumer"), (PROXY_ID, "proxy")]:
        d.enroll(role, device_id)
    d.grant("c1", "meter/*")
    d.start_as()
    files = {name: root / f"{name}.txt" for name in ("energy", "power", "water")}
    files["energy"].write_bytes(b"energy 1 kWh")
    files["power"].write_bytes(b"power 100 W")
    files["water"].write_bytes(b"water 1 l")
    producer = ProducerProcess(
        root / "meter.json",
        root / "meter",
        *(arg for name, path in files.items() for arg in ("--resource", f"{name}={path}")),
        "--interval",
        "0.05",
        "--max-age",
        str(MAX_AGE),
    )
    redis = RedisServer(persistent=True)
    relay: NatRelay | None = None
    proxies: list[ProxyProcess] = []
    try:
        redis.start()
        producer.start()
        relay = await NatRelay(producer.port).start()
        config = root / "proxy.toml"
        config.write_text("[limits]\nupstream_timeout = 1.0\nupstream_backoff = 1.0\n")
        meter = AsClient(Bundle.load(root / "meter.json"))
        try:
            meter_link = await meter.link(PROXY_ID)
        finally:
            await meter.close()
        world = World(
            root, d, producer, relay, redis, config, proxies, files, root / "warm", meter_link
        )
        proxies.extend(world.instance(f"proxy-{i}") for i in range(3))
        await asyncio.to_thread(wait_until, lambda: producer.log().count("now sealing") >= 3, 20)
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in proxies))
        async with Consumer(root / "c1.json", world.warm) as warm:
            for name in files:
                await warm.get(producer.uri(f"meter/{name}"))
        yield world
    finally:
        for proxy in proxies:
            proxy.kill()
        producer.kill()
        if relay is not None:
            relay.close()
        redis.stop()
        d.close()


async def stats(proxy: ProxyProcess) -> dict[str, int]:
    response = await coap_get(proxy.uri(".well-known/oscar-stats"))
    assert response.code == Code.CONTENT
    doc: dict[str, int] = json.loads(response.payload)
    return doc


async def all_stats(proxies: list[ProxyProcess]) -> list[dict[str, int]]:
    return list(await asyncio.gather(*(stats(p) for p in proxies)))


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``predicate`` (sync or async) until true; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


class Watchers:
    """Library consumers observing a resource, each through one instance; what each received
    (plaintext, time.monotonic() of arrival)."""

    def __init__(self, consumers: list[Consumer], uris: list[str]) -> None:
        self.consumers = consumers
        self.uris = uris
        self.seen: list[list[tuple[bytes, float]]] = [[] for _ in consumers]
        self.tasks = [asyncio.create_task(self._watch(i)) for i in range(len(consumers))]

    async def _watch(self, i: int) -> None:
        async for reading in self.consumers[i].observe(self.uris[i]):
            self.seen[i].append((reading.plaintext, time.monotonic()))

    def values(self, i: int) -> list[bytes]:
        return [value for value, _ in self.seen[i]]

    def have(self, value: bytes, among: list[int] | None = None) -> bool:
        indexes = range(len(self.consumers)) if among is None else among
        return all(value in self.values(i) for i in indexes)

    def arrivals(self, value: bytes, among: list[int]) -> list[float]:
        return [next(t for v, t in self.seen[i] if v == value) for i in among]

    async def wait(self, value: bytes, timeout: float, among: list[int] | None = None) -> None:
        def missing() -> list[list[bytes]]:
            indexes = range(len(self.consumers)) if among is None else among
            return [self.values(i)[-2:] for i in indexes if value not in self.values(i)]

        try:
            await until(lambda: self.have(value, among), timeout, f"every observer has {value!r}")
        except AssertionError:
            failed = [t.exception() for t in self.tasks if t.done() and not t.cancelled()]
            raise AssertionError(
                f"{value!r} missing at {missing()[:5]}; ended: {failed[:3]}"
            ) from None

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.consumers))


async def watchers(world: World, rid: str, per_instance: int, tag: str) -> Watchers:
    n = per_instance * len(world.proxies)
    consumers = world.consumers(n, tag)
    uris = [world.proxies[i % len(world.proxies)].uri(rid) for i in range(n)]
    return Watchers(consumers, uris)


async def unobserve(world: World, rid: str, value: bytes) -> None:
    """After the observers left: a new value makes every instance notice (ICMP) and end its
    relay; wait until none holds one."""
    write_atomic(world.files[rid.split("/")[1]], value)

    async def none_left() -> bool:
        docs = await all_stats(world.proxies)
        return all(doc["upstream_observations"] == 0 and doc["observers"] == 0 for doc in docs)

    await until(none_left, 15, "every instance ended its relays")


# --- observations ------------------------------------------------------------------------------


async def test_fifty_observers_over_three_instances_share_one_upstream_observation(
    world: World,
) -> None:
    before_docs = await all_stats(world.proxies)
    registrations = world.relay.observe_registrations()
    watch = await watchers(world, "meter/energy", 17, "fifty")  # 51: 17 per instance
    try:
        await watch.wait(b"energy 1 kWh", 30)
        for value in (b"energy 2 kWh", b"energy 3 kWh"):
            write_atomic(world.files["energy"], value)
            await watch.wait(value, 15)
        expected = [b"energy 1 kWh", b"energy 2 kWh", b"energy 3 kWh"]
        assert all(watch.values(i) == expected for i in range(len(watch.consumers)))
        # one upstream observation in the cluster: one registration reached the producer, one
        # lease taken; every instance holds a relay (the two others on standby)
        assert world.relay.observe_registrations() == registrations + 1, world.relay.requests
        docs = await all_stats(world.proxies)
        taken = [
            a["cluster_leases_taken"] - b["cluster_leases_taken"]
            for a, b in zip(docs, before_docs, strict=True)
        ]
        assert sorted(taken) == [0, 0, 1], taken
        assert [doc["observers"] for doc in docs] == [17, 17, 17]
        assert [doc["upstream_observations"] for doc in docs] == [1, 1, 1]
        assert [doc["cluster_leases_held"] for doc in docs] == taken  # the holder observes
        holder = world.proxies[taken.index(1)]
        assert holder.log().count(f"observing meter/energy {LEASE_LINE}") == 1
        for proxy in world.proxies:
            if proxy is not holder:
                assert f"observing meter/energy {LEASE_LINE}" not in proxy.log()

        async def summed() -> bool:  # the cluster-wide sums, refreshed every 2 s
            doc = await stats(world.proxies[0])
            return doc.get("all_observers") == 51 and doc.get("all_instances") == 3

        await until(summed, 10, "all_observers 51 over 3 instances")
    finally:
        await watch.close()
    await unobserve(world, "meter/energy", b"energy 4 kWh")


async def test_kill_9_of_the_observing_instance_another_takes_over_within_five_seconds(
    world: World,
) -> None:
    before_docs = await all_stats(world.proxies)
    registrations = world.relay.observe_registrations()
    watch = await watchers(world, "meter/power", 6, "killed")
    try:
        await watch.wait(b"power 100 W", 30)
        write_atomic(world.files["power"], b"power 101 W")
        await watch.wait(b"power 101 W", 15)
        docs = await all_stats(world.proxies)
        taken = [
            a["cluster_leases_taken"] - b["cluster_leases_taken"]
            for a, b in zip(docs, before_docs, strict=True)
        ]
        assert sorted(taken) == [0, 0, 1], taken
        assert world.relay.observe_registrations() == registrations + 1
        dead = taken.index(1)
        survivors = [i for i in range(len(world.proxies)) if i != dead]
        among = [i for i in range(len(watch.consumers)) if i % len(world.proxies) != dead]

        await asyncio.to_thread(world.proxies[dead].kill)
        killed = time.monotonic()
        write_atomic(world.files["power"], b"power 102 W")
        await watch.wait(b"power 102 W", 20, among)
        delays = [t - killed for t in watch.arrivals(b"power 102 W", among)]
        print(
            f"\ntakeover after kill -9: first observer {min(delays):.2f} s, "
            f"last {max(delays):.2f} s ({len(among)} observers on 2 instances)"
        )
        assert max(delays) <= 5.0, delays
        write_atomic(world.files["power"], b"power 103 W")
        await watch.wait(b"power 103 W", 10, among)
        for i in among:
            values = watch.values(i)
            assert values == [b"power 100 W", b"power 101 W", b"power 102 W", b"power 103 W"]
        # the new holder is one of the survivors, and it registered upstream once
        after = await all_stats([world.proxies[i] for i in survivors])
        taken = [
            a["cluster_leases_taken"] - before_docs[i]["cluster_leases_taken"]
            for a, i in zip(after, survivors, strict=True)
        ]
        assert sorted(taken) == [0, 1], taken
        assert world.relay.observe_registrations() == registrations + 2
    finally:
        await watch.close()
    await asyncio.to_thread(world.proxies[dead].start)  # the third instance again, for the rest


# --- Redis away ----------------------------------------------------------------------------------


async def ask(ctx: Context, make: Callable[[], Message], timeout: float = 5.0) -> Message:
    """A request and its answer, after one Echo round trip if the proxy challenges."""
    response = await send(ctx, make(), timeout)
    if response.code == Code.UNAUTHORIZED and response.opt.echo is not None:
        message = make()
        message.opt.echo = response.opt.echo
        response = await send(ctx, message, timeout)
    return response


async def raw_get(ctx: Context, uri: str) -> Message:
    return await ask(ctx, lambda: Message(code=GET, uri=uri))


def version(payload: bytes) -> tuple[int, int]:
    metadata = ProtectedObject.from_bytes(payload).metadata
    return (metadata.epoch, metadata.seq)


class Readers:
    """Raw CoAP readers going round the instances and resources: every answer's code, counted
    (during an outage too), and the versions each reader got per resource, which must never go
    back."""

    def __init__(self, world: World, rids: tuple[str, ...], n: int) -> None:
        self.world = world
        self.rids = rids
        self.codes: dict[str, int] = {}
        self.outage_codes: dict[str, int] = {}
        self.outage = False
        self.rollbacks: list[str] = []
        self._stop = False
        self.tasks = [asyncio.create_task(self._read(k)) for k in range(n)]

    async def _read(self, k: int) -> None:
        ctx = await Context.create_client_context()
        last: dict[str, tuple[int, int]] = {}
        proxies = self.world.proxies
        j = 0
        try:
            while not self._stop:
                proxy, rid = proxies[(k + j) % len(proxies)], self.rids[j % len(self.rids)]
                j += 1
                try:
                    response = await raw_get(ctx, proxy.uri(rid))
                    code = response.code.dotted
                except TimeoutError:
                    code = "timeout"
                for counts in (self.codes, self.outage_codes) if self.outage else (self.codes,):
                    counts[code] = counts.get(code, 0) + 1
                if code == "2.05":
                    got = version(response.payload)
                    if got < last.get(rid, got):
                        self.rollbacks.append(f"reader {k}: {rid} {last[rid]} then {got}")
                    last[rid] = got
                await asyncio.sleep(0.01)
        finally:
            await ctx.shutdown()

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self.tasks)


def log_count(proxy: ProxyProcess, text: str) -> int:
    return proxy.log().count(text)


async def resynchronized(world: World, outages: list[int], resyncs: list[int]) -> None:
    """Wait until every instance counted one more outage, logged its resynchronization and is
    up again."""

    async def done() -> bool:
        docs = await all_stats(world.proxies)
        return all(
            doc["cluster_up"] == 1
            and doc["cluster_outages"] == before + 1
            and log_count(proxy, RESYNC_LINE) == logged + 1
            for doc, before, logged, proxy in zip(
                docs, outages, resyncs, world.proxies, strict=True
            )
        )

    await until(done, 15, "every instance resynchronized")


async def outage_counts(world: World) -> tuple[list[int], list[int], list[int]]:
    docs = await all_stats(world.proxies)
    return (
        [doc["cluster_outages"] for doc in docs],
        [log_count(p, RESYNC_LINE) for p in world.proxies],
        [log_count(p, OUTAGE_LINE) for p in world.proxies],
    )


async def test_redis_restarted_under_load_memory_served_the_rest_refused_then_resynchronized(
    world: World,
) -> None:
    watch = await watchers(world, "meter/energy", 2, "outage")
    outages, resyncs, lines = await outage_counts(world)
    ctx = await Context.create_client_context()
    secure = await dtls_context(world.proxies[0], "meter", world.meter_link)
    readers: Readers | None = None
    try:
        await watch.wait(b"energy 4 kWh", 30)
        current = await raw_get(ctx, world.producer.uri("meter/energy"))
        assert current.code == Code.CONTENT

        def put(payload: bytes) -> Message:
            return Message(
                code=PUT,
                uri=world.proxies[0].secure_address + "/meter/energy",
                payload=payload,
                content_format=18,
            )

        assert (await send(secure, put(current.payload))).code == Code.CHANGED  # the owner's
        readers = Readers(world, ("meter/energy", "meter/power"), 6)
        await until(lambda: sum(readers.codes.values()) >= 30, 10, "readers under way")

        await asyncio.to_thread(world.redis.halt)
        readers.outage = True
        await until(lambda: _all_down(world), 10, "every instance noticed the outage")
        # what an instance holds is served; what needs the cluster is refused (5.03)
        for proxy in world.proxies:
            miss = await raw_get(ctx, proxy.uri("meter/water"))
            assert miss.code == Code.SERVICE_UNAVAILABLE, miss
        refused = await send(secure, put(current.payload))
        assert refused.code == Code.SERVICE_UNAVAILABLE, refused
        served = sum(readers.outage_codes.values())
        await until(lambda: sum(readers.outage_codes.values()) >= served + 30, 10, "reads")
        readers.outage = False
        await asyncio.to_thread(world.redis.start)
        await resynchronized(world, outages, resyncs)
        await readers.stop()
        print(f"\nanswers: {readers.codes}; during the outage: {readers.outage_codes}")
        assert set(readers.codes) <= {"2.05", "5.03"}, readers.codes
        assert readers.outage_codes.get("2.05", 0) >= 30, readers.outage_codes
        assert not readers.rollbacks, readers.rollbacks[:5]

        # back: new values reach the observers on every instance; a miss is fetched again
        write_atomic(world.files["energy"], b"energy 5 kWh")
        await watch.wait(b"energy 5 kWh", 15)
        for proxy in world.proxies:
            found = await raw_get(ctx, proxy.uri("meter/water"))
            assert found.code == Code.CONTENT, found
        newest = await raw_get(ctx, world.producer.uri("meter/energy"))
        assert (await send(secure, put(newest.payload))).code == Code.CHANGED
        assert (await send(secure, put(current.payload))).code == Code.BAD_REQUEST  # older
        # one log line per instance for the outage, however many requests it refused
        docs = await all_stats(world.proxies)
        for proxy, doc, logged in zip(world.proxies, docs, lines, strict=True):
            assert log_count(proxy, OUTAGE_LINE) == logged + 1
            assert doc["cluster_refused"] >= 1
    finally:
        if readers is not None and not readers._stop:
            await readers.stop()
        await secure.shutdown()
        await ctx.shutdown()
        await watch.close()


async def _all_down(world: World) -> bool:
    return all(doc["cluster_up"] == 0 for doc in await all_stats(world.proxies))


async def test_redis_restarted_empty_gets_back_what_the_instances_hold_no_rollback(
    world: World,
) -> None:
    ctx = await Context.create_client_context()
    secure = await dtls_context(world.proxies[0], "meter", world.meter_link)
    late = world.instance("proxy-late")
    late_secure: Context | None = None
    try:
        old = (await raw_get(ctx, world.producer.uri("meter/water"))).payload
        write_atomic(world.files["water"], b"water 2 l")

        async def sealed() -> bool:
            response = await raw_get(ctx, world.producer.uri("meter/water"))
            return version(response.payload) > version(old)

        await until(sealed, 10, "the producer sealed water 2")
        new = (await raw_get(ctx, world.producer.uri("meter/water"))).payload
        message = Message(
            code=PUT,
            uri=world.proxies[0].secure_address + "/meter/water",
            payload=new,
            content_format=18,
        )
        assert (await send(secure, message)).code == Code.CHANGED

        async def everywhere() -> bool:  # the published object reached every instance
            answers = [await raw_get(ctx, p.uri("meter/water")) for p in world.proxies]
            return all(a.code == Code.CONTENT and a.payload == new for a in answers)

        await until(everywhere, 10, "every instance serves water 2")

        outages, resyncs, _ = await outage_counts(world)
        await asyncio.to_thread(world.redis.kill)
        world.redis.rdb.unlink(missing_ok=True)  # it comes back empty
        await until(lambda: _all_down(world), 10, "every instance noticed the outage")
        await asyncio.to_thread(world.redis.start)
        await resynchronized(world, outages, resyncs)
        with world.redis.client() as client:
            assert client.keys("oscar:v:*"), "the instances pushed nothing back"

        # an instance that never held anything: the cluster's memory refuses the older object
        await asyncio.to_thread(late.start)
        late_secure = await dtls_context(late, "meter", world.meter_link)
        message = Message(
            code=PUT, uri=late.secure_address + "/meter/water", payload=old, content_format=18
        )
        refused = await send(late_secure, message)
        assert refused.code == Code.BAD_REQUEST, refused
        served = await raw_get(ctx, late.uri("meter/water"))
        assert served.code == Code.CONTENT and served.payload == new
    finally:
        late.kill()
        for c in (late_secure, secure, ctx):
            if c is not None:
                await c.shutdown()


# --- what the logs say -------------------------------------------------------------------------


async def test_one_log_line_per_outage_and_no_traceback(world: World) -> None:
    docs = await all_stats(world.proxies)
    for proxy, doc in zip(world.proxies, docs, strict=True):
        text = proxy.log()
        life = text[text.rfind("(instance ") :]  # since its last start
        assert doc["cluster_outages"] >= 2
        assert life.count(OUTAGE_LINE) == doc["cluster_outages"], life
        assert "Traceback" not in text, text[text.find("Traceback") :][:2000]
    late = world.root / "proxy-late.log"  # the instance started after Redis came back empty
    assert not late.exists() or "Traceback" not in late.read_text()


# --- joining again after an empty restart --------------------------------------------------------


class _Gated:
    """A cluster store's Redis client whose monitor PING (``hold_ping``) or join-check SCAN
    (``hold_scan``: the unfiltered one) waits for ``go``; ``waiting`` is set when it does."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.hold_ping = self.hold_scan = False
        self.go, self.waiting = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def _hold(self) -> None:
        self.waiting.set()
        await self.go.wait()

    async def ping(self) -> Any:
        if self.hold_ping:
            await self._hold()
        return await self._client.ping()

    async def scan_iter(self, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        if self.hold_scan and "match" not in kwargs:
            await self._hold()
        async for key in self._client.scan_iter(*args, **kwargs):
            yield key


async def test_after_an_empty_restart_an_instance_racing_another_one_joins_again() -> None:
    """A sets the (lost) check value again; before its check that the database holds nothing
    foreign, B compares it, is back and writes what it holds. A must take B's keys for its own
    cluster's, not refuse the database (and delete the check value) for good."""
    from proxy.cluster import ClusterStore
    from proxy.entry import Entry
    from proxy.redisio import connect

    server = RedisServer().start()
    clients: list[_Gated] = []

    def gated(url: str, **options: Any) -> _Gated:
        clients.append(_Gated(connect(url, **options)))
        return clients[-1]

    key = b"k" * 32
    a, b = (
        ClusterStore(server.url, key, connect=gated),
        ClusterStore(server.url, key, connect=gated),
    )
    now = time.time()
    held = Entry(
        "meter/energy", b"object", 1, 7, int(now) + 600, b"e" * 8, b"kid", 1, None, None, now
    )

    async def push() -> None:
        await b.put(held)

    b.on_resync = push
    try:
        await a.open()
        await b.open()
        client_a, client_b = clients
        client_a.hold_scan, client_b.hold_ping = True, True
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)  # empty
        for store in (a, b):
            with contextlib.suppress(Exception):
                await store.get("meter/energy")  # both notice the outage
        await asyncio.wait_for(client_a.waiting.wait(), 10)  # A set the check value, not scanned
        client_b.go.set()
        await until(lambda: b.up and server.client().keys("oscar:v:*"), 10, "B back, pushed")
        client_a.go.set()
        await until(lambda: a.up, 10, "A joined again")
        assert server.client().get("oscar:cluster") is not None
        assert a.stats.outages == 1
    finally:
        await a.close()
        await b.close()
        server.stop()
