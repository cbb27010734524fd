"""Three proxy instances of one bundle on one private Redis (``--cluster``), as real processes on
loopback against a real AS and a real producer (tests/cluster_harness.py): a shared cache, one
upstream fetch per Max-Age cluster-wide, shared anti-rollback memory, nothing readable in Redis,
counters summed over the instances; and what a bad, unreachable or foreign store gets.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis
from aiocoap import GET, PUT, Context, Message
from aiocoap.numbers.codes import Code
from cluster_harness import OTHER_PROXY, PROXY_ID, ClusterWorld, cluster_world
from proxy_harness import ProxyProcess, free_port_pair, send
from redis_harness import RedisServer
from system_harness import run

from consumer import Consumer
from oscar import ProtectedObject, object_etag

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_AGE = 4  # the meter's Max-Age: one upstream fetch per MAX_AGE seconds cluster-wide
SECRET = "pa55-w0rd-never-shown"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ClusterWorld]:
    async with cluster_world(tmp_path_factory.mktemp("cluster"), max_age=MAX_AGE) as world:
        yield world


@pytest_asyncio.fixture(loop_scope="module")
async def reader(world: ClusterWorld) -> AsyncIterator[Context]:
    """The consumer c1 over DTLS to every instance (verified by its handshake: no Echo)."""
    ctx = await world.dtls("c1")
    yield ctx
    await ctx.shutdown()


def get(proxy: ProxyProcess, resource_id: str) -> Message:
    return Message(code=GET, uri=f"{proxy.secure_address}/{resource_id}")


def via(proxy: ProxyProcess, target: str) -> Message:
    """A GET to ``proxy``'s DTLS port with Proxy-Uri ``target`` (forward proxying)."""
    message = Message(code=GET, uri=f"{proxy.secure_address}/")
    message.opt.uri_path = ()
    message.opt.proxy_uri = target
    return message


def put(proxy: ProxyProcess, resource_id: str, data: bytes) -> Message:
    return Message(
        code=PUT, uri=f"{proxy.secure_address}/{resource_id}", payload=data, content_format=18
    )


# --- the shared cache ----------------------------------------------------------------------------


async def test_a_miss_through_a_is_a_hit_through_b_and_c_with_the_producer_gone(
    world: ClusterWorld, reader: Context
) -> None:
    a, b, c = world.proxies
    rid = "meter/energy"
    seen, started = len(world.relay.requests), time.monotonic()
    first = await send(reader, get(a, rid))
    assert first.code == Code.CONTENT and first.opt.content_format == 18
    world.objects.append(first.payload)
    assert len(world.relay.requests) == seen + 1  # A's miss went upstream
    world.relay.gate_open = False  # the producer is unreachable from here on
    try:
        for proxy in (b, c):
            response = await send(reader, get(proxy, rid))
            assert response.code == Code.CONTENT, proxy
            assert (response.payload, response.opt.etag) == (first.payload, first.opt.etag)
        async with Consumer(world.root / "c1.json", world.warm) as consumer:
            for proxy in (b, c):  # plain CoAP, Echo answered; verified and decrypted
                reading = await consumer.get(proxy.uri(rid))
                assert reading.plaintext == b"energy 1 kWh"
        # not one request from B or C (all within Max-Age of A's fetch, as the timing shows)
        elapsed = time.monotonic() - started
        assert len(world.relay.requests) == seen + 1, (world.relay.requests[seen:], elapsed)
    finally:
        world.relay.gate_open = True
    docs = await world.all_stats()
    assert docs[0]["upstream_requests"] == 1 and docs[0]["misses"] == 1
    for doc in docs[1:]:
        assert doc["upstream_requests"] == 0 and doc["misses"] == 0, doc
        # from A's event into memory, or read from the store on a local miss
        assert doc["hits"] >= 2 and doc["cluster_events"] + doc["cluster_reads"] >= 1, doc


async def test_a_hundred_consumers_over_three_instances_cause_one_fetch_per_max_age(
    world: ClusterWorld,
) -> None:
    rid = "meter/power"
    consumers = world.consumers(100, "crowd")
    uris = [world.proxies[i % 3].uri(rid) for i in range(100)]  # round robin
    try:
        await asyncio.gather(*(c.start() for c in consumers))
        for batch in range(2):
            before, seen = await world.all_stats(), len(world.relay.requests)
            started = time.monotonic()
            readings = await asyncio.gather(
                *(c.get(u) for c, u in zip(consumers, uris, strict=True))
            )
            elapsed = time.monotonic() - started
            assert [r.plaintext for r in readings] == [b"power 100 W"] * 100
            after = await world.all_stats()
            delta = {
                k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in after[0]
            }
            fetched = world.relay.requests[seen:]
            # one fetch per Max-Age cluster-wide: one, unless a loaded machine took longer
            allowed = 1 + int(elapsed // MAX_AGE)
            why = (batch, fetched, world.relay.responses[-len(fetched) :], elapsed, delta)
            assert 1 <= len(fetched) <= allowed, why
            assert delta["upstream_requests"] == len(fetched), why
            if batch == 0:  # a miss, fetched whole by one instance; the others waited for it
                assert fetched[0][:2] == ("0.01", False)
                assert world.relay.responses[-len(fetched) :][0] == "2.05"
                assert delta["misses"] == len(fetched) and delta["revalidations"] == 0
                assert delta["echo_challenges"] == 100  # each address proves itself once
            else:  # after Max-Age: revalidated with the producer's ETag by one instance
                assert all(request[:2] == ("0.01", True) for request in fetched), fetched
                assert world.relay.responses[-len(fetched) :] == ["2.03"] * len(fetched)
                assert delta["revalidations"] == len(fetched) and delta["misses"] == 0
                assert delta["echo_challenges"] == 0
            if batch == 0:
                await asyncio.sleep(MAX_AGE + 0.5)
    finally:
        await asyncio.gather(*(c.close() for c in consumers))


# --- anti-rollback memory ------------------------------------------------------------------------


async def test_an_instance_refuses_a_published_object_older_than_another_instance_took(
    world: ClusterWorld, reader: Context
) -> None:
    a, b, c = world.proxies
    rid = "sensor/published-reading"
    owner = await world.dtls("sensor")
    try:
        newer = world.seal(rid, b"published 2")
        seq = ProtectedObject.from_bytes(newer).metadata.seq
        older = world.seal(rid, b"published 1", seq=seq - 1)
        assert (await send(owner, put(a, rid, newer))).code == Code.CHANGED
        before = await world.stats(b)
        response = await send(owner, put(b, rid, older))  # B never saw this resource itself
        assert (response.code, response.payload) == (Code.BAD_REQUEST, b"object rejected")
        after = await world.stats(b)
        assert after["rejected"] == before["rejected"] + 1
        assert after["published"] == before["published"]
        etag = object_etag(rid, world.keys[rid].active.epoch, seq)
        for proxy in (a, b, c):
            served = await send(reader, get(proxy, rid))
            assert (served.code, served.payload, served.opt.etag) == (Code.CONTENT, newer, etag)
        async with Consumer(world.root / "c1.json", world.warm) as consumer:
            assert (await consumer.get(c.uri(rid))).plaintext == b"published 2"
    finally:
        await owner.shutdown()

    # The entry gone from the store (as at its exp), its version still there: an instance that
    # never held the resource (nor heard of it) is refused the older object by the store alone.
    with world.redis.client() as client:
        assert client.delete(world.entry_key(rid)) == 1
    late = world.instance(world.root / "instance-late")
    await asyncio.to_thread(late.start)
    owner = await world.dtls("sensor", late)
    try:
        before = await world.stats(late)
        response = await send(owner, put(late, rid, older))
        assert (response.code, response.payload) == (Code.BAD_REQUEST, b"object rejected")
        assert (await world.stats(late))["rejected"] == before["rejected"] + 1
        newest = world.seal(rid, b"published 3")
        assert (await send(owner, put(late, rid, newest))).code == Code.CHANGED
        for proxy in (a, b, c):
            assert (await send(reader, get(proxy, rid))).payload == newest
    finally:
        await owner.shutdown()
        assert await asyncio.to_thread(late.stop) == 0  # its counters leave the cluster's sums


async def test_an_instance_refuses_a_fetched_object_older_than_another_instance_took(
    world: ClusterWorld, reader: Context
) -> None:
    a, b, c = world.proxies
    rid = "sensor/fetched-reading"
    resource = world.standin.resource(rid)
    target = world.standin.uri(rid)
    newer = world.seal(rid, b"fetched 2")
    seq = ProtectedObject.from_bytes(newer).metadata.seq
    resource.serve(newer)  # Max-Age 0: every request goes upstream
    assert (await send(reader, via(a, target))).payload == newer
    resource.serve(world.seal(rid, b"fetched 1", seq=seq - 1))  # the origin rolls back
    before, asked = await world.stats(b), resource.requests
    response = await send(reader, via(b, target))
    assert resource.requests == asked + 1  # B did fetch the older one, and refused it
    assert (response.code, response.payload) == (Code.CONTENT, newer)
    assert (await world.stats(b))["rejected"] == before["rejected"] + 1
    newest = world.seal(rid, b"fetched 3")
    resource.serve(newest)
    assert (await send(reader, via(c, target))).payload == newest
    assert (await send(reader, via(a, target))).payload == newest


# --- counters ------------------------------------------------------------------------------------


async def test_cluster_wide_counters_are_the_sums_of_the_instances(world: ClusterWorld) -> None:
    names = ("hits", "upstream_requests", "rejected", "published")
    for _ in range(60):  # each instance reports every 2 s
        docs = await world.all_stats()
        sums = {name: sum(doc[name] for doc in docs) for name in names}
        if all(
            doc.get("all_instances") == 3
            and all(doc.get(f"all_{name}") == sums[name] for name in names)
            for doc in docs
        ):
            break
        await asyncio.sleep(0.25)
    for doc in docs:
        assert doc["all_instances"] == 3 and doc["cluster_up"] == 1, doc
        assert {name: doc[f"all_{name}"] for name in names} == sums, (doc, sums)
    # (requests that waited for a fetch, here or on another instance, count as neither hits
    # nor misses: hence not 200 hits for the hundred consumers' two rounds)
    assert sums["hits"] >= 4 and sums["rejected"] >= 2 and sums["published"] >= 1
    # every request that reached the meter came from an instance, and was counted there
    assert sums["upstream_requests"] >= len(world.relay.requests) >= 3
    for proxy in world.proxies:  # and the instances ran cleanly
        assert "Traceback" not in proxy.log() and " ERROR " not in proxy.log()


# --- what the Redis holds ------------------------------------------------------------------------

_KEY_SHAPE = re.compile(rb"oscar:(cluster|b:total|n:[0-9a-f]{16}|[ovlrb]:[0-9a-f]{32})")


def _needles(world: ClusterWorld) -> dict[str, bytes]:
    needles: dict[str, bytes] = {}
    for rid in ("meter/power", "meter/energy", *world.keys):
        needles[f"resource {rid}"] = rid.encode()
        for segment in rid.split("/"):
            needles[f"segment {segment}"] = segment.encode()
    for i, obj in enumerate(world.objects):
        parsed = ProtectedObject.from_bytes(obj)
        m = parsed.metadata
        needles[f"object {i}"] = obj
        needles[f"ciphertext {i}"] = parsed.encrypt0.ciphertext
        needles[f"signature {i}"] = parsed.sign1.signature
        needles[f"etag {i}"] = object_etag(m.resource_id, m.epoch, m.seq)
        for at in range(0, len(obj) - 16, 8):
            needles[f"object {i} [{at}:{at + 16}]"] = obj[at : at + 16]
    plaintexts = {b"power 100 W", b"energy 1 kWh", *world.plaintexts}
    needles |= {f"plaintext {p!r}": p for p in plaintexts if len(p) >= 5}
    for name, port in (
        ("relay", world.relay.port),
        ("producer", world.producer.port),
        ("stand-in", world.standin.port),
    ):
        needles[f"{name} address"] = f"127.0.0.1:{port}".encode()
        needles[f"{name} uri"] = f"coap://127.0.0.1:{port}".encode()
    return needles


def _everything(client: redis.Redis) -> dict[bytes, bytes]:
    """Every key of the database and its value, as an operator reads them."""
    out: dict[bytes, bytes] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            value = client.get(key) or b""
        elif kind == b"hash":
            value = b"".join(k + b"=" + v for k, v in client.hgetall(key).items())
        else:
            value = client.dump(key) or b""
        out[key] = value
    return out


async def test_redis_holds_no_resource_name_no_object_byte_no_plaintext_no_upstream(
    world: ClusterWorld, reader: Context
) -> None:
    for proxy in world.proxies:  # the objects as served: needles too
        for rid in ("meter/power", "meter/energy"):
            response = await send(reader, get(proxy, rid))
            assert response.code == Code.CONTENT
            world.objects.append(response.payload)
    needles = _needles(world)
    with world.redis.client() as client:
        stored = await asyncio.to_thread(_everything, client)
    kinds = {key.split(b":")[1] for key in stored}
    assert {b"cluster", b"o", b"v", b"n"} <= kinds, sorted(stored)
    assert sum(1 for key in stored if key.startswith(b"oscar:o:")) >= 4
    for key, value in stored.items():
        assert _KEY_SHAPE.fullmatch(key), key
        found = [name for name, needle in needles.items() if needle in key or needle in value]
        assert found == [], (key, found)
    dump = await asyncio.to_thread(world.redis.dump_bytes)
    assert b"oscar:cluster" in dump  # it is the dump of this database
    assert [name for name, needle in needles.items() if needle in dump] == []


# --- bad, unreachable, foreign stores ------------------------------------------------------------


def _proxy_cli(*args: str) -> Any:
    return run("-m", "proxy", *args, check=False)


def _one_line(result: Any, status: int, *secrets: str) -> str:
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oscar-proxy"), result.stderr
    for secret in (SECRET, *secrets):
        assert secret not in result.stderr and secret not in result.stdout
    return lines[0]


def _start(world: ClusterWorld, state: Path, cluster: str, bundle: str = PROXY_ID) -> Any:
    return _proxy_cli(
        "--bundle", str(world.root / f"{bundle}.json"), "--state", str(state),
        "--listen", f"127.0.0.1:{free_port_pair()}", "--no-dtls", "--cluster", cluster,
    )  # fmt: skip


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BAD_URLS = [
    "",
    "http://x",
    "redis://",
    f"redis://:{SECRET}@127.0.0.1:99999/0",
    f"redis://:{SECRET}@127.0.0.1/notanumber",
    f"redis://:{SECRET}@127.0.0.1:6379/0?bogus=1",
    f"redis://:{SECRET}@127.0.0.1:6379/0?socket_timeout=999",
    f"redis://:{SECRET}@127.0.0.1:6379/0#fragment",
    f"redis://:{SECRET}/x@127.0.0.1:6379/0",  # a '/' in the password: not percent-encoded
]


async def test_bad_cluster_urls_exit_2_with_one_line_and_no_password(
    world: ClusterWorld, tmp_path: Path
) -> None:
    bad = BAD_URLS
    results = await asyncio.gather(
        *(asyncio.to_thread(_start, world, tmp_path / f"s{i}", url) for i, url in enumerate(bad))
    )
    for i, (url, result) in enumerate(zip(bad, results, strict=True)):
        line = _one_line(result, 2)
        assert "cluster" in line, (url, line)
        assert not (tmp_path / f"s{i}").exists(), url
    # the same in the configuration file
    config = tmp_path / "proxy.toml"
    config.write_text(f'cluster = "redis://:{SECRET}@127.0.0.1:99999/0"\n')
    result = await asyncio.to_thread(
        _proxy_cli, "--bundle", str(world.bundle), "--state", str(tmp_path / "t"),
        "--listen", f"127.0.0.1:{free_port_pair()}", "--config", str(config),
    )  # fmt: skip
    _one_line(result, 2)
    assert not (tmp_path / "t").exists()


def _snapshot(client: redis.Redis) -> dict[bytes, tuple[bytes, int]]:
    return {key: (client.dump(key) or b"", client.pttl(key)) for key in client.scan_iter()}


async def test_an_unreachable_or_foreign_store_exits_1_and_changes_nothing(
    world: ClusterWorld, tmp_path: Path
) -> None:
    nowhere = f"redis://:{SECRET}@127.0.0.1:{_free_tcp_port()}/0"
    line = _one_line(await asyncio.to_thread(_start, world, tmp_path / "nowhere", nowhere), 1)
    assert "cluster" in line

    foreign = world.redis.client(4)  # a database holding keys that are not a cluster's
    foreign.set("invoices:2026", "mine")
    other = world.redis.client(5)  # one holding another cluster's check value
    other.set("oscar:cluster", "0" * 64)
    try:
        for client, db, expected in ((foreign, 4, "not a proxy cluster"), (other, 5, "another")):
            before = _snapshot(client)
            url = world.redis.url_for(db)
            line = _one_line(await asyncio.to_thread(_start, world, tmp_path / f"db{db}", url), 1)
            assert expected in line, line
            assert _snapshot(client) == before
    finally:
        foreign.flushdb()
        other.flushdb()
        foreign.close()
        other.close()

    # the world's database, where the instances of another bundle ran: refused by cache-2
    with world.redis.client() as client:
        check = client.get("oscar:cluster")
        counters = sorted(client.scan_iter(match="oscar:n:*"))
        result = await asyncio.to_thread(
            _start, world, tmp_path / "cache-2", world.redis.url, OTHER_PROXY
        )
        assert "another proxy cluster" in _one_line(result, 1)
        assert client.get("oscar:cluster") == check
        assert sorted(client.scan_iter(match="oscar:n:*")) == counters


# --- AUTH and TLS --------------------------------------------------------------------------------


async def _serves_through(world: ClusterWorld, proxy: ProxyProcess, server: RedisServer) -> None:
    await asyncio.to_thread(proxy.start, wait_for="serving")  # plain CoAP only: no link keys
    try:
        async with Consumer(world.root / "c1.json", world.warm) as consumer:
            reading = await consumer.get(proxy.uri("meter/power"))
        assert reading.plaintext == b"power 100 W"
        doc = await world.stats(proxy)
        assert doc["cluster_up"] == 1 and doc["cluster_writes"] >= 1
        with server.client() as client:
            assert any(k.startswith(b"oscar:o:") for k in client.scan_iter())
    finally:
        assert await asyncio.to_thread(proxy.stop) == 0


async def test_auth_and_tls_urls_work_and_a_wrong_password_exits_1_unseen(
    world: ClusterWorld, tmp_path: Path
) -> None:
    user = RedisServer(user=("oscar-proxy", SECRET))
    tls = RedisServer(tls=True, password=SECRET + "-tls")
    try:
        await asyncio.gather(asyncio.to_thread(user.start), asyncio.to_thread(tls.start))
        assert tls.url.startswith("rediss://") and "ssl_ca_certs=" in tls.url
        # an ACL user, its URL in the configuration file (0600) as DEPLOY advises
        config = tmp_path / "proxy.toml"
        config.touch(mode=0o600)
        config.write_text(f"cluster = {json.dumps(user.url)}\n")
        by_user = ProxyProcess(
            world.bundle, tmp_path / "user", "--config", str(config),
            "--reverse", f"meter={world.relay.address}", "--no-dtls",
        )  # fmt: skip
        # TLS with requirepass, on the command line
        over_tls = world.instance(tmp_path / "tls", "--no-dtls", cluster=tls.url)
        await _serves_through(world, by_user, user)
        await _serves_through(world, over_tls, tls)
        for proxy in (by_user, over_tls):
            assert SECRET not in proxy.log() and "Traceback" not in proxy.log()

        wrong = user.url.replace(SECRET, "wrong-" + SECRET[::-1])
        result = await asyncio.to_thread(_start, world, tmp_path / "wrong", wrong)
        line = _one_line(result, 1, "wrong-" + SECRET[::-1])
        assert "cluster" in line
        no_ca = tls.url.split("?")[0]  # TLS without the CA: the server is not trusted
        assert "cluster" in _one_line(
            await asyncio.to_thread(_start, world, tmp_path / "ca", no_ca), 1
        )
    finally:
        user.stop()
        tls.stop()
