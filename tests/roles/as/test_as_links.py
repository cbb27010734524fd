"""Link PSKs between the proxy and producers/consumers: ``GET /link`` and ``GET /links``.

A real AS process, real DTLS clients (:class:`AsClient` for the calls under test, the harness's raw
:class:`Client` where a request must be malformed). At teardown every server must exit 0 on
SIGTERM and log no traceback, and neither its log nor the database files may hold any PSK the test
saw (AS PSKs and link PSKs alike).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2
import pytest
import pytest_asyncio
from aiocoap import GET
from as_harness import AsEnv, as_env, enroll, now
from pg_harness import PgCluster

from authz_server.api_links import links_etag
from authz_server.envelope import Envelope
from authz_server.store import Store
from oscar.keys import hkdf_sha256
from oscar_io.errors import AccessDenied

EVIL = "'; DROP TABLE devices; --"


@pytest_asyncio.fixture
async def env(tmp_path: Path, as_database: tuple[PgCluster, str] | None) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, as_database) as environment:  # on SQLite, then on PostgreSQL
        yield environment


async def audit(store: Store, action: str) -> list[tuple[str, str, str, dict[str, object]]]:
    return [
        (r.actor, r.subject, r.result, r.detail)
        for r in await store.audit_records()
        if r.action == action
    ]


@pytest.mark.asyncio
async def test_producers_and_consumers_get_link_psks_the_proxy_gets_them_all(env: AsEnv) -> None:
    for device_id, role in [
        ("proxy-1", "proxy"),
        ("proxy-2", "proxy"),
        ("sensor-1", "producer"),
        ("reader-1", "consumer"),
    ]:
        await env.device(device_id, role)
    server = env.server()
    producer = await env.as_client(server, "sensor-1")
    consumer = await env.as_client(server, "reader-1")
    proxy = await env.as_client(server, "proxy-1")

    p1 = await producer.link("proxy-1")
    c1 = await consumer.link("proxy-1")
    p2 = await producer.link("proxy-2")
    env.keep(p1, c1, p2)
    assert len(p1) == len(c1) == len(p2) == 16
    assert len({p1, c1, p2}) == 3  # per device and per proxy
    assert p1 not in env.psks.values() and c1 not in env.psks.values()
    assert await producer.link("proxy-1") == p1  # stable

    links = await proxy.links()
    assert links == {"sensor-1": p1, "reader-1": c1}  # no proxy, and the same bytes
    proxy2 = await env.as_client(server, "proxy-2")
    links2 = await proxy2.links()
    env.keep(*links2.values())
    assert links2["sensor-1"] == p2 and links2["reader-1"] != c1

    # A device enrolled while the AS runs is in the next /links at once.
    await env.device("reader-2", "consumer")
    assert set(await proxy.links()) == {"sensor-1", "reader-1", "reader-2"}

    # One audit record per first (device, proxy) delivery, none for repeats; none holds a PSK.
    assert await audit(env.store, "link") == [
        ("sensor-1", "proxy-1", "ok", {}),
        ("reader-1", "proxy-1", "ok", {}),
        ("sensor-1", "proxy-2", "ok", {}),
    ]
    records = [r for r in await audit(env.store, "links") if r[0] == "proxy-1"]
    assert [r[3]["devices"] for r in records] == [2, 3]  # once per device set, not per poll

    # /.well-known/core lists both.
    raw = await env.client(server, "reader-1")
    code, wkc = await raw.get(".well-known/core")
    assert code == "2.05"
    assert b'</link>;rt="oscar.as.link";ct=60' in wkc
    assert b'</links>;rt="oscar.as.links";ct=60' in wkc

    # /links carries an ETag over the device id set.
    raw_proxy = await env.client(server, "proxy-1")
    response = await raw_proxy.send(raw_proxy.message(GET, "links"))
    assert response.code.dotted == "2.05"
    assert response.opt.etag == links_etag(await env.store.link_psks("proxy-1"))


@pytest.mark.asyncio
async def test_link_psks_survive_a_restart(env: AsEnv) -> None:
    await env.device("proxy-1", "proxy")
    await env.device("reader-1", "consumer")
    server = env.server()
    first = await (await env.as_client(server, "reader-1")).link("proxy-1")
    links = await (await env.as_client(server, "proxy-1")).links()
    env.keep(first)
    assert server.stop() == 0
    again = env.server()
    assert await (await env.as_client(again, "reader-1")).link("proxy-1") == first
    assert await (await env.as_client(again, "proxy-1")).links() == links
    # The first delivery was audited once, not again after the restart.
    assert await audit(env.store, "link") == [("reader-1", "proxy-1", "ok", {})]


@pytest.mark.asyncio
async def test_refusals_are_4_03_and_audited(env: AsEnv) -> None:
    for device_id, role in [
        ("proxy-1", "proxy"),
        ("proxy-2", "proxy"),
        ("sensor-1", "producer"),
        ("reader-1", "consumer"),
        ("reader-2", "consumer"),
    ]:
        await env.device(device_id, role)
    await env.store.revoke_device("proxy-2", now())
    server = env.server()
    proxy = await env.as_client(server, "proxy-1")
    consumer = await env.as_client(server, "reader-1")

    with pytest.raises(AccessDenied) as refused:
        await proxy.link("proxy-1")
    assert refused.value.code == "4.03"
    with pytest.raises(AccessDenied):
        await consumer.links()
    answers = []
    for target in ("ghost-1", "reader-2", "sensor-1", "proxy-2"):  # unknown, not proxies, revoked
        with pytest.raises(AccessDenied) as refused:
            await consumer.link(target)
        answers.append((refused.value.code, str(refused.value)))
    assert len(set(answers)) == 1  # the same answer: nothing leaks about which ids exist
    assert answers[0][0] == "4.03"

    denied = [
        (r.actor, r.action, r.subject, r.detail["reason"])
        for r in await env.store.audit_records()
        if r.result == "denied"
    ]
    assert denied == [
        ("proxy-1", "link", "proxy-1", "only producers and consumers"),
        ("reader-1", "links", "reader-1", "only proxies"),
        ("reader-1", "link", "ghost-1", "no such proxy"),
        ("reader-1", "link", "reader-2", "no such proxy"),
        ("reader-1", "link", "sensor-1", "no such proxy"),
        ("reader-1", "link", "proxy-2", "no such proxy"),
    ]
    assert [r for r in await audit(env.store, "link") if r[2] == "ok"] == []


@pytest.mark.asyncio
async def test_malformed_proxy_ids_change_nothing(env: AsEnv) -> None:
    await env.device("proxy-1", "proxy")
    await env.device("reader-1", "consumer")
    server = env.server()
    raw = await env.client(server, "reader-1")
    before = (await env.store.changes(), len(await env.store.audit_records()))
    for query in (
        {"proxy": EVIL},
        {"proxy": "p" * 33},
        {"proxy": ""},
        {"proxy": "proxy-1/x"},
        {"proxy": "proxy-1", "x": "1"},
        {},
    ):
        code, body = await raw.get("link", **query)
        assert code in ("4.00", "4.03"), (query, code)
        assert "psk" not in body
    code, _ = await raw.get("links", proxy="proxy-1")  # /links takes no query
    assert code == "4.00"
    assert (await env.store.changes(), len(await env.store.audit_records())) == before
    assert [d.id for d in await env.store.devices()] == ["proxy-1", "reader-1"]
    client = await env.as_client(server, "reader-1")
    with pytest.raises(ValueError):
        await client.link(EVIL)  # refused before it leaves the device


@pytest.mark.asyncio
async def test_a_revoked_consumer_leaves_the_proxys_links(env: AsEnv) -> None:
    await env.device("proxy-1", "proxy")
    await env.device("sensor-1", "producer")
    await env.device("reader-1", "consumer")
    server = env.server()
    proxy = await env.as_client(server, "proxy-1")
    links = await proxy.links()
    env.keep(*links.values())
    assert set(links) == {"sensor-1", "reader-1"}
    etag = links_etag(links)
    await env.store.revoke_device("reader-1", now())
    assert await proxy.links() == {"sensor-1": links["sensor-1"]}
    assert links_etag(await env.store.link_psks("proxy-1")) != etag
    raw = await env.client(server, "sensor-1")
    code, _ = await raw.get("link", proxy="proxy-1")
    assert code == "2.05"
    await env.store.revoke_device("proxy-1", now())
    code, _ = await raw.get("link", proxy="proxy-1")  # a revoked proxy gets no new links
    assert code == "4.03"


@pytest.mark.asyncio
async def test_links_for_hundreds_of_devices_arrive_whole(env: AsEnv) -> None:
    await env.device("proxy-1", "proxy")
    await env.device("reader-0", "consumer")
    for n in range(1, 300):  # straight through the store: 300 handshakes would add nothing
        await enroll(env.store, f"reader-{n}", "consumer")
    server = env.server()
    links = await (await env.as_client(server, "proxy-1")).links()
    assert len(links) == 300
    assert set(links) == {f"reader-{n}" for n in range(300)}
    assert len(set(links.values())) == 300
    assert links["reader-0"] == await (await env.as_client(server, "reader-0")).link("proxy-1")
    env.keep(links["reader-0"], links["reader-299"])
    raw = await env.client(server, "proxy-1")
    response = await raw.send(raw.message(GET, "links"))
    assert len(response.payload) > 8 * 1024  # far past one block: Block2 carried it


def test_link_psk_derivation_is_the_documented_one() -> None:
    master = bytes(range(32))
    vault = Envelope(master, Envelope.new_wrapped_data_key(master))
    link_key = hkdf_sha256(vault._data_key, b"OSCAR link key", 32)
    info = cbor2.dumps(["OSCAR link", "proxy-1", "sensor-1"])
    expected = hmac.new(link_key, info, "sha256").digest()[:16]
    assert vault.link_psk("proxy-1", "sensor-1") == expected
    assert vault.link_psk("proxy-1", "sensor-1") != vault.link_psk("proxy-2", "sensor-1")
    for proxy_id, device_id in [("proxy-1", "proxy-1"), (EVIL, "sensor-1"), ("proxy-1", "")]:
        with pytest.raises(ValueError):
            vault.link_psk(proxy_id, device_id)
