"""The proxy's fast observations (proxy/fastobserve.py): the same bytes and limits as aiocoap's.

Two proxy sites on aiocoap server contexts in this process (see test_proxy_fastpath.py), one
with the fast path on and one with it off, hold the same entries; raw UDP clients register with
``Observe: 0`` (NON and CON) on both, the same new objects are stored in both, and what each
client receives is compared byte for byte (message IDs of the server's own sequence are masked,
and checked to follow aiocoap's sequence), with the counters and the limits' state; then every
way an observation ends (ICMP, RST, deregistration, re-registration, CON timeouts, shutdown).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code
from as_harness import free_port
from test_proxy_fastpath import NOW, PUBLISHED, REVERSED, Served, make_site, request

from oscar.objects import object_etag
from oscar_io import aiocoap_fixes
from proxy.entry import Entry

_OBSERVE, _ECHO = 6, 252
RID = "pub-2/observed"
_seq = iter(range(1 << 40, (1 << 40) + 1_000_000))  # newer than any of make_site


def new_entry(rid: str = RID, size: int = 120, *, fresh: float = 60.0) -> Entry:
    seq = next(_seq)
    return Entry(
        resource_id=rid,
        obj=os.urandom(size),
        epoch=1,
        seq=seq,
        exp=int(NOW) + 3600,
        etag=object_etag(rid, 1, seq),
        kid=b"kid",
        serial=1,
        upstream=f"coap://127.0.0.1:9/{rid}" if rid.startswith("sensor-1/") else None,
        upstream_etag=None,
        fresh_until=NOW + fresh,
    )


def observe(rid: str | None = RID, **kwargs: Any) -> bytes:
    """A NON registration (``Observe: 0``) unless told otherwise."""
    kwargs.setdefault("mtype", 1)
    more = (*kwargs.pop("more", ()), (_OBSERVE, kwargs.pop("observe", b"")))
    return request(rid, more=more, **kwargs)


class Pair:
    """The fast site and the slow site, and a way to do the same to both."""

    def __init__(self, fast: Served, slow: Served) -> None:
        self.fast, self.slow = fast, slow
        self.both = (fast, slow)

    async def store(self, entry: Entry) -> None:
        for served in self.both:
            assert await served.site.proxy.store(entry)

    def counters(self, served: Served) -> dict[str, int]:
        doc = served.site.proxy.counters()
        keys = ("hits", "observers", "observations_declined", "upstream_observations")
        return {k: doc[k] for k in keys}


async def _served(port: int) -> Served:
    site, clock = make_site(port)
    context = await Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    return Served(site, clock, context, port)


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[Pair]:
    aiocoap_fixes.apply()  # as the proxy's serve() does
    fast, slow = await _served(free_port()), await _served(free_port())
    slow.fast.enabled = False  # installed, but aiocoap answers every datagram
    held = [new_entry(), new_entry(REVERSED)]  # the same entries on both sites
    for served in (fast, slow):
        for entry in held:
            served.site.proxy.cache.put(entry)
    try:
        yield Pair(fast, slow)
    finally:
        for served in (fast, slow):
            served.close()
            await served.context.shutdown()
            await served.site.proxy.close()


async def receive(sock: socket.socket, timeout: float = 3.0) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), timeout)


def masked(data: bytes) -> bytes:
    return data[:2] + b"MI" + data[4:]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def observers(served: Served) -> int:
    return served.site.proxy.relays.observers


# --- registration and notifications -------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "shape",
    ["path", "token0", "token8", "etag-other", "etag-new", "proxy-uri"],
)
async def test_registration_and_notifications_same_bytes(pair: Pair, shape: str) -> None:
    """The answer (Observe 0) and three notifications (a small object, one of 2,000 bytes sent
    whole as aiocoap sends it, one stale on arrival: looked up as the slow path renders it)
    are the same bytes; the counters are the same."""
    objects = [new_entry(), new_entry(size=2000), new_entry(fresh=-1.0)]
    rid, kwargs = RID, {}
    if shape == "token0":
        kwargs = {"token": b""}
    elif shape == "token8":
        kwargs = {"token": b"12345678"}
    elif shape == "etag-other":
        kwargs = {"etags": (b"nope",)}
    elif shape == "etag-new":  # a registration naming the next object's ETag: a 2.03 later
        kwargs = {"etags": (objects[0].etag,)}
    elif shape == "proxy-uri":
        rid = REVERSED
        objects = [new_entry(REVERSED), new_entry(REVERSED, 300)]
        kwargs = {"proxy_uri": f"coap://127.0.0.1:9/{REVERSED}"}
    received: dict[bool, list[bytes]] = {}
    for served in pair.both:
        sock = await served.proven()
        reg = observe(None if shape == "proxy-uri" else rid, mid=0x5151, **kwargs)
        got = [await served.exchange(sock, reg)]
        for entry in objects:
            assert await served.site.proxy.store(entry)
            got.append(await receive(sock))
        received[served is pair.fast] = got
    fast, slow = received[True], received[False]
    assert [masked(d) for d in fast] == [masked(d) for d in slow]
    first = Message.decode(fast[0])
    assert first.opt.observe == 0 and first.mtype.name == "NON"
    numbers = [Message.decode(d).opt.observe for d in fast[1:]]
    assert numbers == list(range(1, len(objects) + 1))
    if shape == "etag-new":
        assert Message.decode(fast[1]).code == Code.VALID
    mids = [int.from_bytes(d[2:4], "big") for d in fast]  # aiocoap's sequence, one by one
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(mids))
    assert pair.fast.fast.observe.by_key and not pair.slow.fast.observe.by_key
    assert pair.counters(pair.fast) == pair.counters(pair.slow)
    assert pair.counters(pair.fast)["observers"] == 1
    assert pair.fast.site.proxy.counters()["fast_observers"] == 1


@pytest.mark.asyncio
async def test_other_observe_values_go_to_aiocoap(pair: Pair) -> None:
    served = pair.fast
    sock = await served.proven()
    before = served.fast.answered
    answer = Message.decode(await served.exchange(sock, observe(mid=0x601, observe=b"\x00")))
    assert answer.opt.observe == 0  # Observe 0 in a longer form: aiocoap's registration
    assert served.fast.answered == before and not served.fast.observe.by_key
    assert observers(served) == 1
    await served.site.proxy.store(new_entry())
    assert Message.decode(await receive(sock)).opt.observe == 1  # notified by aiocoap


# --- CON registrations ------------------------------------------------------------------------


def ack(note: bytes) -> bytes:
    return bytes([0x60, 0]) + note[2:4]


@pytest.mark.asyncio
async def test_con_registration_and_notifications_same_bytes(pair: Pair) -> None:
    """A CON registration: the answer piggybacked on the ACK, then CON notifications, each
    acknowledged; a second new object while the first notification waits for its ACK goes
    out only after that ACK (one exchange in flight per peer, as aiocoap)."""
    objects = [new_entry(), new_entry(size=400), new_entry(size=50)]
    loop = asyncio.get_running_loop()
    received: dict[bool, list[bytes]] = {}
    for served in pair.both:
        sock = await served.proven()
        got = [await served.exchange(sock, observe(mtype=0, mid=0x6000, token=b"con"))]
        assert len(served.fast.observe) == (1 if served.fast.enabled else 0)
        assert await served.site.proxy.store(objects[0])
        got.append(await receive(sock))
        await loop.sock_sendall(sock, ack(got[-1]))
        assert await served.site.proxy.store(objects[1])
        got.append(await receive(sock))  # not acknowledged yet:
        assert await served.site.proxy.store(objects[2])
        assert await served.nothing(sock, 0.3)  # the next one waits for the ACK
        await loop.sock_sendall(sock, ack(got[-1]))
        got.append(await receive(sock))
        await loop.sock_sendall(sock, ack(got[-1]))
        assert await served.nothing(sock, 0.2)  # acknowledged: nothing sent again
        received[served is pair.fast] = got
    fast, slow = received[True], received[False]
    assert fast[0] == slow[0]  # the ACK carries the request's message ID
    assert [masked(d) for d in fast] == [masked(d) for d in slow]
    kinds = [(Message.decode(d).mtype.name, Message.decode(d).opt.observe) for d in fast]
    assert kinds == [("ACK", 0), ("CON", 1), ("CON", 2), ("CON", 3)]
    assert len(pair.fast.fast.observe) == 1 and not pair.fast.fast.observe.pending
    assert pair.counters(pair.fast) == pair.counters(pair.slow)


@pytest.mark.asyncio
async def test_acks_reach_the_fast_path_beside_an_aiocoap_observation_on_the_empty_token(
    pair: Pair,
) -> None:
    """An empty ACK has no token: aiocoap holding a request on the empty token from the same
    peer must not keep the fast path from seeing the ACKs of its CON notifications."""
    served = pair.fast
    loop = asyncio.get_running_loop()
    sock = await served.proven()
    slow = await served.exchange(sock, observe(mid=0x6400, token=b"", observe=b"\x00"))
    assert Message.decode(slow).opt.observe == 0 and not served.fast.observe.by_key
    await served.exchange(sock, observe(mtype=0, mid=0x6401, token=b"f"))
    assert len(served.fast.observe) == 1 and observers(served) == 2
    for number in (1, 2):
        await served.site.proxy.store(new_entry())
        notes = {Message.decode(d).token: d for d in [await receive(sock), await receive(sock)]}
        assert Message.decode(notes[b"f"]).opt.observe == number
        await loop.sock_sendall(sock, ack(notes[b"f"]))
        await until(lambda: not served.fast.observe.pending)


@pytest.fixture
def quick_retransmissions(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiocoap's transmission parameters (read by both paths) made short."""
    from aiocoap.numbers.constants import TransportTuning

    monkeypatch.setattr(TransportTuning, "ACK_TIMEOUT", 0.1)
    monkeypatch.setattr(TransportTuning, "MAX_RETRANSMIT", 2)


@pytest.mark.asyncio
@pytest.mark.usefixtures("quick_retransmissions")
async def test_an_unacknowledged_con_notification_is_retransmitted_then_ends_it(
    pair: Pair,
) -> None:
    """No ACK: the notification is sent again MAX_RETRANSMIT times, the same bytes, then the
    peer's observations end (aiocoap: the exchange timed out), on both paths."""
    entry = new_entry()
    received: dict[bool, list[bytes]] = {}
    for served in pair.both:
        sock = await served.proven()
        got = [await served.exchange(sock, observe(mtype=0, mid=0x6100, token=b"r"))]
        assert len(served.fast.observe) == (1 if served.fast.enabled else 0)
        assert await served.site.proxy.store(entry)
        got += [await receive(sock) for _ in range(3)]
        await until(lambda s=served: observers(s) == 0)
        assert await served.nothing(sock, 0.3)
        received[served is pair.fast] = got
    fast, slow = received[True], received[False]
    assert fast[1] == fast[2] == fast[3]  # retransmissions: the same message
    assert [masked(d) for d in fast] == [masked(d) for d in slow]
    assert not pair.fast.fast.observe.by_key and not pair.fast.fast.observe.pending
    assert pair.counters(pair.fast) == pair.counters(pair.slow)


@pytest.mark.asyncio
async def test_rst_to_a_con_notification_ends_the_observation_alike(pair: Pair) -> None:
    loop = asyncio.get_running_loop()
    for served in pair.both:
        sock = await served.proven()
        await served.exchange(sock, observe(mtype=0, mid=0x6200, token=b"t"))
        assert observers(served) == 1
        assert len(served.fast.observe) == (1 if served.fast.enabled else 0)
        await served.site.proxy.store(new_entry())
        note = await receive(sock)
        await loop.sock_sendall(sock, bytes([0x70, 0]) + note[2:4])
        await until(lambda s=served: observers(s) == 0)
        await served.site.proxy.store(new_entry())
        assert await served.nothing(sock, 0.3)
    assert not pair.fast.fast.observe.pending
    assert pair.counters(pair.fast) == pair.counters(pair.slow)


@pytest.mark.asyncio
async def test_a_repeated_con_registration_gets_the_same_ack(pair: Pair) -> None:
    for served in pair.both:
        sock = await served.proven()
        reg = observe(mtype=0, mid=0x6300, token=b"d")
        first = await served.exchange(sock, reg)
        await served.site.proxy.store(new_entry())
        note = await receive(sock)
        await asyncio.get_running_loop().sock_sendall(sock, ack(note))
        # A retransmission of the registration (its ACK lost): the same ACK again (aiocoap's
        # stored response, or ours), not a new registration with the newer object.
        assert await served.exchange(sock, reg) == first
        await served.site.proxy.store(new_entry())
        assert Message.decode(await receive(sock)).opt.observe == 2 and observers(served) == 1


@pytest.mark.asyncio
async def test_many_observers_each_notified_once(pair: Pair) -> None:
    served = pair.fast
    socks = [await served.proven() for _ in range(5)]
    for n, sock in enumerate(socks):
        answer = await served.exchange(sock, observe(mid=0x700 + n, token=bytes([n])))
        assert Message.decode(answer).opt.observe == 0
    assert len(served.fast.observe) == 5 == observers(served)
    entry = new_entry()
    await served.site.proxy.store(entry)
    for sock in socks:
        note = Message.decode(await receive(sock))
        assert note.opt.observe == 1 and note.payload == entry.obj
    assert all([await served.nothing(sock, 0.1) for sock in socks])


# --- limits -------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mtype", [1, 0], ids=["NON", "CON"])
async def test_observers_per_client_declined_identically(pair: Pair, mtype: int) -> None:
    """Over ``observers_per_client``, the GET is answered without Observe on both paths; the
    declined client is not notified, the others are (CON: one after the other's ACK)."""
    entry = new_entry()
    loop = asyncio.get_running_loop()
    received: dict[bool, list[bytes]] = {}
    for served in pair.both:
        relays = served.site.proxy.relays
        relays.limits = dataclasses.replace(relays.limits, observers_per_client=2)
        sock = await served.proven()
        got = []
        for n in range(3):
            reg = observe(mid=0x800 + n, token=bytes([n + 1]), mtype=mtype)
            got.append(await served.exchange(sock, reg))
        assert relays.declined == 1 and observers(served) == 2
        assert await served.site.proxy.store(entry)
        notes = []
        for _ in range(2):
            notes.append(await receive(sock))
            if mtype == 0:
                await loop.sock_sendall(sock, ack(notes[-1]))
        got += sorted(notes, key=lambda d: d[4])
        assert await served.nothing(sock, 0.2)
        received[served is pair.fast] = got
    fast, slow = received[True], received[False]
    assert [masked(d) for d in fast] == [masked(d) for d in slow]
    assert Message.decode(fast[2]).opt.observe is None  # declined: no Observe
    assert [Message.decode(d).token for d in fast[3:]] == [b"\x01", b"\x02"]
    assert pair.counters(pair.fast) == pair.counters(pair.slow)
    assert len(pair.fast.fast.observe) == 2


# --- ends ---------------------------------------------------------------------------------------


async def _registered(served: Served, token: bytes = b"ob") -> tuple[socket.socket, bytes]:
    sock = await served.proven()
    answer = await served.exchange(sock, observe(mid=0x900, token=token))
    assert Message.decode(answer).opt.observe == 0
    assert observers(served) == 1
    assert len(served.fast.observe) == (1 if served.fast.enabled else 0)  # fast where on
    return sock, answer


@pytest.mark.asyncio
async def test_icmp_error_ends_the_observation(pair: Pair) -> None:
    """The client's socket closed: the next notification brings an ICMP port unreachable, and
    the observer is released on both paths (aiocoap's error queue, hooked for fast ones)."""
    for served in pair.both:
        sock, _ = await _registered(served)
        sock.close()
        served.sockets.remove(sock)
        await served.site.proxy.store(new_entry())
        await until(lambda s=served: observers(s) == 0)
        await served.site.proxy.store(new_entry())
        assert observers(served) == 0
    assert not pair.fast.fast.observe.by_key
    assert pair.fast.site.proxy.counters()["fast_observers"] == 0
    assert pair.counters(pair.fast) == pair.counters(pair.slow)


@pytest.mark.asyncio
async def test_deregistration_with_observe_1_is_answered_and_releases(pair: Pair) -> None:
    received = {}
    for served in pair.both:
        sock, _ = await _registered(served)
        dereg = observe(mid=0x901, token=b"ob", observe=b"\x01")
        answer = await served.exchange(sock, dereg)
        await until(lambda s=served: observers(s) == 0)
        await served.site.proxy.store(new_entry())
        assert await served.nothing(sock, 0.2)
        received[served is pair.fast] = answer
    assert masked(received[True]) == masked(received[False])
    assert Message.decode(received[True]).opt.observe is None
    assert pair.counters(pair.fast) == pair.counters(pair.slow)


@pytest.mark.asyncio
async def test_reregistration_on_the_same_token_starts_over(pair: Pair) -> None:
    received: dict[bool, list[bytes]] = {}
    objects = [new_entry(), new_entry()]
    for served in pair.both:
        sock, first = await _registered(served)
        await served.site.proxy.store(objects[0])
        got = [first, await receive(sock)]
        got.append(await served.exchange(sock, observe(mid=0x902, token=b"ob")))
        assert observers(served) == 1
        await served.site.proxy.store(objects[1])
        got.append(await receive(sock))
        received[served is pair.fast] = got
    fast, slow = received[True], received[False]
    assert [masked(d) for d in fast] == [masked(d) for d in slow]
    assert [Message.decode(d).opt.observe for d in fast] == [0, 1, 0, 1]
    assert pair.counters(pair.fast) == pair.counters(pair.slow)


@pytest.mark.asyncio
async def test_a_repeated_registration_message_is_a_duplicate(pair: Pair) -> None:
    for served in pair.both:
        sock, _ = await _registered(served)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, observe(mid=0x900, token=b"ob"))  # the same message ID
        assert await served.nothing(sock, 0.2)
        await served.site.proxy.store(new_entry())
        assert Message.decode(await receive(sock)).opt.observe == 1
        assert observers(served) == 1


@pytest.mark.asyncio
async def test_rst_to_a_notification_ends_a_fast_observation(pair: Pair) -> None:
    """RFC 7641 §3.6: a RST to a notification removes the observer. The fast path does; aiocoap
    0.4.17 ignores a RST to a NON notification and keeps notifying (checked here, so that an
    aiocoap that changes this is noticed)."""
    loop = asyncio.get_running_loop()
    for served in pair.both:
        sock, _ = await _registered(served)
        await served.site.proxy.store(new_entry())
        note = await receive(sock)
        await loop.sock_sendall(sock, bytes([0x70, 0]) + note[2:4])
        if served is pair.fast:
            await until(lambda s=served: observers(s) == 0)
            await served.site.proxy.store(new_entry())
            assert await served.nothing(sock, 0.2)
        else:
            await served.site.proxy.store(new_entry())
            assert Message.decode(await receive(sock)).opt.observe == 2
            assert observers(served) == 1
    assert pair.fast.fast.hook.taken >= 1


@pytest.mark.asyncio
async def test_a_rst_naming_no_fast_message_goes_to_aiocoap(pair: Pair) -> None:
    served = pair.fast
    sock, answer = await _registered(served)
    other = (int.from_bytes(answer[2:4], "big") + 1000) & 0xFFFF
    assert served.fast.answer(bytes([0x70, 0]) + other.to_bytes(2, "big"), "1.2.3.4:5") is None
    await asyncio.get_running_loop().sock_sendall(sock, bytes([0x70, 0]) + answer[2:4][::-1])
    await served.site.proxy.store(new_entry())
    assert Message.decode(await receive(sock)).opt.observe == 1


@pytest.mark.asyncio
async def test_relays_held_and_released_alike(pair: Pair) -> None:
    """An observation of a reverse-mapped resource holds its relay (an upstream observation),
    on both paths alike, and gives it back at its end."""
    uri = f"coap://127.0.0.1:9/{REVERSED}"
    for served in pair.both:
        sock = await served.proven()
        reg = observe(None, mid=0xA00, token=b"r", proxy_uri=uri)
        assert Message.decode(await served.exchange(sock, reg)).opt.observe == 0
        assert served.site.proxy.relays.relays == 1
        await served.exchange(sock, request(REVERSED, mid=0xA01, token=b"r", mtype=1))
        await until(lambda s=served: s.site.proxy.relays.relays == 0)
        assert observers(served) == 0
    assert pair.counters(pair.fast) == pair.counters(pair.slow)


@pytest.mark.asyncio
async def test_shutdown_releases_every_observation() -> None:
    aiocoap_fixes.apply()
    served = await _served(free_port())
    served.site.proxy.cache.put(new_entry())
    try:
        for n in range(3):
            sock = await served.proven()
            await served.exchange(sock, observe(mid=0xB00 + n, token=b"s"))
        assert observers(served) == 3 == len(served.fast.observe)
        await served.context.shutdown()
        assert observers(served) == 0 and not served.fast.observe.by_key
        assert served.fast.observe.closed
    finally:
        served.close()
        await served.site.proxy.close()


def test_the_registration_answer_in_memory() -> None:
    """The in-memory answer to a registration: Observe 0 between ETag and Content-Format."""
    site, _ = make_site()
    host = "127.0.0.1:40000"
    site.addresses.prove(host, site.addresses.challenge(host))
    from proxy.fastpath import FastPath

    fast = FastPath(site)

    class Mids:
        mid = 0

        def _next_message_id(self) -> int:
            self.mid += 1
            return self.mid

    fast.hook.message_manager = Mids()
    assert fast.answer(observe(PUBLISHED, token=b"t"), host) is None  # no address: aiocoap's
    address = ("::ffff:127.0.0.1", 40000, 0, 0)
    answer = fast.answer(observe(PUBLISHED, token=b"t"), host, address)
    assert answer is not None
    message = Message.decode(answer)
    assert message.opt.observe == 0 and message.mtype.name == "NON" and message.mid == 1
    held = site.proxy.cache.in_memory(PUBLISHED)
    assert held is not None and message.payload == held.obj
    # header, token, ETag (4), then Observe 0 (delta 2, empty), Content-Format 18 (delta 6)
    assert answer[5] == 0x48 and answer[14:17] == b"\x20\x61\x12"
    assert site.proxy.relays.observers == 1 and len(fast.observe) == 1
    repeat = observe(PUBLISHED, token=b"t", mid=0x1234)
    assert fast.answer(repeat, host, address) == b""  # the same NON message: a duplicate


# --- new objects from elsewhere, and ones the fast path cannot send -------------------------------


@pytest.mark.asyncio
async def test_objects_from_another_cluster_instance_are_notified_alike(pair: Pair) -> None:
    """In a cluster, another instance's new object reaches this one's memory through
    :func:`proxy.shared.take`, which calls the same ``on_new_object`` callbacks."""
    from proxy import shared

    objects = [new_entry(), new_entry(size=700)]
    received: dict[bool, list[bytes]] = {}
    for served in pair.both:
        sock, first = await _registered(served)
        got = [first]
        for entry in objects:
            shared.take(served.site.proxy, entry)
            got.append(await receive(sock))
        received[served is pair.fast] = got
    assert [masked(d) for d in received[True]] == [masked(d) for d in received[False]]
    assert [Message.decode(d).opt.observe for d in received[True]] == [0, 1, 2]
    assert pair.counters(pair.fast) == pair.counters(pair.slow)


@pytest.mark.asyncio
async def test_a_new_object_already_expired_ends_the_observation_alike(pair: Pair) -> None:
    """A new object past its ``exp`` is looked up as the slow path renders it: the upstream
    (nothing listens) gives nothing, the observer gets 5.02 with Max-Age 1 and no Observe, and
    its observation ends, on both paths."""
    expired = dataclasses.replace(new_entry(REVERSED), exp=int(NOW) - 1)
    received: dict[bool, list[bytes]] = {}
    for served in pair.both:
        sock = await served.proven()
        answer = await served.exchange(sock, observe(REVERSED, mid=0xC00, token=b"x"))
        assert Message.decode(answer).opt.observe == 0
        assert await served.site.proxy.store(expired)
        last = await receive(sock, timeout=10.0)
        await until(lambda s=served: observers(s) == 0)
        await served.site.proxy.store(new_entry(REVERSED))
        assert await served.nothing(sock, 0.2)
        received[served is pair.fast] = [answer, last]
    assert [masked(d) for d in received[True]] == [masked(d) for d in received[False]]
    last = Message.decode(received[True][1])
    assert last.code == Code.BAD_GATEWAY and last.opt.max_age == 1 and last.opt.observe is None
    assert not pair.fast.fast.observe.by_key
