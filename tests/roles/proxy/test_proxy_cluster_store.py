"""The cluster store (proxy.cluster) against a real private redis-server: what two instances of
one proxy identity share, what another identity or a thief with the dump cannot use, and how an
instance behaves while the server is away."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from redis_harness import RedisServer

from proxy.cluster import ClusterError, ClusterStore, ClusterUnavailable, Verdict
from proxy.entry import Entry

pytestmark = pytest.mark.asyncio

KEY = os.urandom(32)
RID = "sensor-7/heart-rate"
SECRET_BYTES = b"\x84\x43\xa1\x01\x26" + b"object-bytes-" * 8


def entry(epoch: int, seq: int, *, rid: str = RID, fresh: float = 60.0) -> Entry:
    now = time.time()
    return Entry(
        resource_id=rid,
        obj=SECRET_BYTES + bytes([epoch, seq]),
        epoch=epoch,
        seq=seq,
        exp=int(now) + 3600,
        etag=b"\x01" * 8,
        kid=b"kid-of-sensor-7",
        serial=123456789,
        upstream=f"coap://127.0.0.1:5683/{rid}",
        upstream_etag=None,
        fresh_until=now + fresh,
    )


async def store(url: str, key: bytes = KEY) -> ClusterStore:
    cluster = ClusterStore(url, key)
    await cluster.open()
    return cluster


async def test_two_instances_share_entries_events_and_the_newest_version(
    redis_server: RedisServer,
) -> None:
    a, b = await store(redis_server.url), await store(redis_server.url)
    seen: list[Entry] = []
    b.on_object = seen.append
    try:
        assert await b.get(RID) is None
        assert await a.put(entry(1, 5)) is Verdict.NEW
        got = await b.get(RID)
        assert got is not None and got.version == (1, 5) and got.obj == entry(1, 5).obj
        for _ in range(100):  # the event reaches b's memory layer
            if seen:
                break
            await asyncio.sleep(0.02)
        assert [e.version for e in seen] == [(1, 5)]
        # anti-rollback: no instance stores older than any instance stored
        assert await b.put(entry(1, 4)) is Verdict.OLDER
        assert await b.put(entry(0, 99)) is Verdict.OLDER
        assert (await a.get(RID)).version == (1, 5)  # type: ignore[union-attr]
        assert await b.put(entry(1, 5)) is Verdict.SAME
        assert await b.put(entry(2, 0)) is Verdict.NEW
        assert (await a.get(RID)).version == (2, 0)  # type: ignore[union-attr]
        # a refresh of the same version renews its freshness for everyone
        renewed = entry(2, 0, fresh=250.0)
        assert await a.put(renewed, refresh=True) is Verdict.SAME
        got = await b.get(RID)
        assert got is not None and abs(got.fresh_until - renewed.fresh_until) < 0.002
    finally:
        await a.close()
        await b.close()


async def test_the_server_holds_no_name_no_object_byte_and_no_key(
    redis_server: RedisServer,
) -> None:
    a = await store(redis_server.url)
    try:
        await a.put(entry(3, 1))
        assert await a.lock(RID, "coap://127.0.0.1:5683/x", 5.0) is not None
        assert await a.lease(RID, "coap://127.0.0.1:5683/x")
        assert await a.take("fetched from 127.0.0.1", 10, 60)
        await a.report()
        dump = redis_server.dump_bytes()
        raw = redis_server.client()
        everything = b"".join(k + (raw.dump(k) or b"") for k in raw.keys("*"))
    finally:
        await a.close()
    for haystack in (dump, everything):
        assert b"sensor-7" not in haystack
        assert b"heart-rate" not in haystack
        assert b"object-bytes" not in haystack
        assert b"kid-of-sensor-7" not in haystack
        assert b"127.0.0.1" not in haystack  # no upstream URI, no origin name
        assert KEY not in haystack


async def test_another_identity_cannot_read_or_use_the_database(redis_server: RedisServer) -> None:
    a = await store(redis_server.url)
    try:
        await a.put(entry(1, 1))
        with pytest.raises(ClusterError, match="another proxy cluster"):
            await store(redis_server.url, os.urandom(32))
        # the same database number of another Redis is fine; another database of this one too
        other = await store(redis_server.url_for(db=1), os.urandom(32))
        await other.close()
    finally:
        await a.close()


async def test_a_database_holding_foreign_keys_is_refused(redis_server: RedisServer) -> None:
    redis_server.client(db=2).set("session:42", "somebody else's")
    with pytest.raises(ClusterError, match="not a proxy cluster"):
        await store(redis_server.url_for(db=2))
    assert redis_server.client(db=2).keys("*") == [b"session:42"]  # left as it was


async def test_a_value_moved_to_another_key_or_altered_is_a_miss(redis_server: RedisServer) -> None:
    a = await store(redis_server.url)
    try:
        await a.put(entry(1, 1, rid="p/a"))
        await a.put(entry(1, 1, rid="p/b"))
        raw = redis_server.client()
        keys = sorted(k for k in raw.keys("oscar:o:*"))
        first, second = raw.get(keys[0]), raw.get(keys[1])
        raw.set(keys[0], second)  # swapped: each now under the other's key
        raw.set(keys[1], first)
        assert await a.get("p/a") is None
        assert await a.get("p/b") is None
        raw.set(keys[0], b"\x01" + bytes(60))
        assert await a.get("p/a") is None
    finally:
        await a.close()


async def test_single_flight_lock_and_relay_lease(redis_server: RedisServer) -> None:
    a, b = await store(redis_server.url), await store(redis_server.url)
    src = "coap://127.0.0.1:5683/" + RID
    try:
        lock = await a.lock(RID, src, 5.0)
        assert lock is not None
        assert await b.lock(RID, src, 5.0) is None
        waited = asyncio.create_task(b.changed(RID, src, 5.0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await a.unlock(lock)
        await waited
        assert time.monotonic() - started < 1.0  # woken by the release, not the timeout
        assert await b.lock(RID, src, 5.0) is not None
        # the lease: one holder, renewable, taken over once it runs out
        assert await a.lease(RID, src)
        assert not await b.lease(RID, src)
        assert await a.lease(RID, src)
        await asyncio.sleep(2.3)  # LEASE_TTL without renewal: the holder is gone
        assert await b.lease(RID, src)
        assert not await a.lease(RID, src)
    finally:
        await a.close()
        await b.close()


async def test_the_lookup_budget_is_the_clusters(redis_server: RedisServer) -> None:
    a, b = await store(redis_server.url), await store(redis_server.url)
    try:
        spent = [await (a if i % 2 else b).take("fetched from h", 4, 100) for i in range(6)]
        assert spent == [True] * 4 + [False] * 2  # 4 per origin, whichever instance asks
        assert await a.take("fetched from other", 4, 100)
    finally:
        await a.close()
        await b.close()


async def test_counters_are_summed_over_live_instances(redis_server: RedisServer) -> None:
    a, b = await store(redis_server.url), await store(redis_server.url)
    a.counters = lambda: {"hits": 3, "misses": 1}
    b.counters = lambda: {"hits": 4, "misses": 0}
    try:
        await a.report()
        totals = await b.report()
        assert totals == {"instances": 2, "hits": 7, "misses": 1}
    finally:
        await a.close()
        await b.close()


async def test_an_outage_refuses_at_once_and_the_store_comes_back_resynchronized() -> None:
    server = RedisServer().start()
    a = await store(server.url)
    resyncs: list[float] = []

    async def resync() -> None:
        assert await a.put(entry(5, 5)) is Verdict.NEW  # the restarted server was empty
        resyncs.append(time.monotonic())  # once done: the test reads it back at once

    a.on_resync = resync
    try:
        await a.put(entry(5, 5))
        server.kill()
        with pytest.raises(ClusterUnavailable):
            await a.get(RID)
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable):
            await a.put(entry(5, 6))
        assert time.monotonic() - started < 0.1  # refused at once while down
        assert a.stats.refused >= 2 and not a.up
        server.start()
        for _ in range(100):
            if a.up and resyncs:
                break
            await asyncio.sleep(0.05)
        assert a.up and resyncs
        assert (await a.get(RID)).version == (5, 5)  # type: ignore[union-attr]
        assert await a.put(entry(5, 4)) is Verdict.OLDER
    finally:
        await a.close()
        server.stop()


async def test_bad_urls_and_silent_servers_are_clear_errors(redis_servers) -> None:  # type: ignore[no-untyped-def]
    secured = redis_servers(password="pa55-word")
    with pytest.raises(ClusterError) as wrong:
        await store(secured.url.replace("pa55-word", "guess"))
    assert "pa55-word" not in str(wrong.value) and "guess" not in str(wrong.value)
    good = await store(secured.url)
    await good.close()
    with pytest.raises(ClusterError, match="cannot use the cluster store"):
        await store("redis://127.0.0.1:1/0")


async def test_resync_takes_what_the_store_holds_newer_and_tells_the_observers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """An instance back from an outage it alone had missed events in: what the store holds newer
    replaces its memory (news for its observers); an entry the store holds newer but no longer
    has is dropped (the next lookup reads the store)."""
    from proxy import shared
    from proxy.cache import Cache
    from proxy.config import ProxyConfig
    from proxy.core import Proxy

    config = ProxyConfig(bundle=tmp_path / "b", state=tmp_path / "s", listen=("127.0.0.1", 9))
    proxy = Proxy(config)
    proxy._cache = Cache(None, max_entries=10, max_bytes=1 << 20)
    news: list[str] = []
    proxy.on_new_object.append(news.append)
    a, b = await store(redis_server.url), await store(redis_server.url)
    try:
        proxy.cache.put(entry(1, 1), persist=False)
        proxy.cache.put(entry(1, 1, rid="p/gone"), persist=False)
        proxy.cache.put(entry(1, 1, rid="p/mine"), persist=False)
        await b.put(entry(1, 2))
        await b.put(entry(1, 3, rid="p/gone"))
        redis_server.client().delete(*redis_server.client().keys("oscar:o:*"))
        await b.put(entry(1, 2))  # RID's newer entry is there again; p/gone's is not
        await shared.resync(proxy, a)
        assert proxy.cache.in_memory(RID).version == (1, 2)  # type: ignore[union-attr]
        assert news == [RID]
        assert proxy.cache.in_memory("p/gone") is None
        assert (await a.get("p/mine")).version == (1, 1)  # type: ignore[union-attr]  # put back
    finally:
        await a.close()
        await b.close()
