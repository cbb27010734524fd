"""The proxy's fast path (proxy/fastpath.py): the same bytes as aiocoap's path, never a crash.

In memory first (``FastPath.answer`` on datagrams), then on loopback: the proxy's real site
(``ProxySite``) on aiocoap's server context in this process, with a memory-only cache whose
entries are set by hand (the fast path serves bytes, it never looks inside them), and raw UDP
sockets as clients (each proving its address with the Echo exchange first, as a real client does)
so that the exact bytes of both answers can be compared: fast path on, and off.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import Context, Message
from aiocoap.numbers.codes import Code
from as_harness import free_port
from hypothesis import given
from hypothesis import strategies as st

from oscar.objects import object_etag
from proxy.cache import Cache
from proxy.config import Limits, ProxyConfig
from proxy.core import Proxy
from proxy.entry import Entry
from proxy.fastpath import UNSOLICITED_LIMIT, FastPath
from proxy.server import ProxySite
from testkit import RawUdpClients
from testkit import coap_option as option

NOW = 1_800_000_000.0
REVERSED = "sensor-1/temperature"  # under the --reverse prefix sensor-1
PUBLISHED = "pub-2/reading"  # published to the proxy, no upstream
LARGE = "sensor-1/large"
STALE = "pub-2/stale"
EXPIRED = "pub-2/expired"
SHORT = "pub-2/short"  # exp before the end of its freshness: Max-Age from exp
HOST = "127.0.0.1:40000"
TOKENS = [bytes(range(1, 1 + n)) for n in range(9)]

_ETAG, _URI_PATH, _PROXY_URI, _OBSERVE, _ECHO = 4, 11, 35, 6, 252


def request(
    path: str | None = REVERSED,
    *,
    mid: int = 0x1234,
    token: bytes = b"\x01\x02\x03\x04",
    mtype: int = 0,
    code: int = 1,
    proxy_uri: str | None = None,
    etags: tuple[bytes, ...] = (),
    more: tuple[tuple[int, bytes], ...] = (),
    extra: bytes = b"",
) -> bytes:
    """A request datagram built by hand (aiocoap would refuse to build the odd ones)."""
    options = [(_ETAG, e) for e in etags] + list(more)
    if path is not None:
        options += [(_URI_PATH, s.encode()) for s in path.split("/")]
    if proxy_uri is not None:
        options.append((_PROXY_URI, proxy_uri.encode()))
    data = bytes([0x40 | mtype << 4 | len(token), code]) + struct.pack("!H", mid) + token
    number = 0
    for n, value in sorted(options, key=lambda o: o[0]):
        data += option(n - number, value)
        number = n
    return data + extra


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


_seq = iter(range(1, 1_000_000))


def entry(
    rid: str, size: int = 206, *, fresh: float = 60.0, life: int = 3600, upstream: Any = ...
) -> Entry:
    seq = next(_seq)
    if upstream is ...:
        upstream = f"coap://127.0.0.1:9/{rid}" if rid.startswith("sensor-1/") else None
    return Entry(
        resource_id=rid,
        obj=os.urandom(size),
        epoch=1,
        seq=seq,
        exp=int(NOW) + life,
        etag=object_etag(rid, 1, seq),
        kid=b"kid",
        serial=1,
        upstream=upstream,
        upstream_etag=None,
        fresh_until=NOW + fresh,
    )


def make_site(port: int = 5683) -> tuple[ProxySite, Clock]:
    clock = Clock()
    config = ProxyConfig(
        bundle=Path("/nonexistent/bundle"),
        state=Path("/nonexistent/state"),
        listen=("127.0.0.1", port),
        reverse={"sensor-1": "coap://127.0.0.1:9"},
        dtls=False,
        limits=Limits(upstream_timeout=2.0),
    )
    proxy = Proxy(config, clock=clock)
    proxy._cache = Cache(None, max_entries=100, max_bytes=1 << 24)
    for e in (
        entry(REVERSED),
        entry(PUBLISHED, 100),
        entry(LARGE, UNSOLICITED_LIMIT + 1),
        entry(STALE, fresh=-1.0),
        entry(EXPIRED, life=-1),
        entry(SHORT, life=5),
    ):
        proxy.cache.put(e)
    return ProxySite(proxy), clock


def held(site: ProxySite, rid: str) -> Entry:
    e = site.proxy.cache.in_memory(rid)
    assert e is not None
    return e


# --- in memory ------------------------------------------------------------------------------------


@pytest.fixture
def fast() -> FastPath:
    site, _ = make_site()
    site.addresses.prove(HOST, site.addresses.challenge(HOST))
    return FastPath(site)


def test_a_hit_gets_the_object_etag_and_max_age_and_counts(fast: FastPath) -> None:
    e = held(fast.site, REVERSED)
    answer = fast.answer(request(mid=0xBEEF, token=b"tok"), HOST)
    assert answer is not None
    message = Message.decode(answer)
    assert message.mtype.name == "ACK" and message.mid == 0xBEEF and message.token == b"tok"
    assert message.code == Code.CONTENT and message.opt.content_format == 18
    assert message.opt.etag == e.etag and message.opt.max_age == 60 and message.payload == e.obj
    assert fast.proxy.stats.hits == fast.proxy.stats.fast_hits == 1
    valid = Message.decode(fast.answer(request(etags=(b"other", e.etag)), HOST) or b"")
    assert valid.code == Code.VALID and valid.opt.etag == e.etag and valid.payload == b""
    assert fast.proxy.stats.hits == 2
    short = Message.decode(fast.answer(request(SHORT), HOST) or b"")
    assert short.opt.max_age == 5  # what is left before exp


def test_unproven_addresses_get_no_fast_answer(fast: FastPath) -> None:
    assert fast.answer(request(), "127.0.0.1:40001") is None
    assert fast.proxy.stats.hits == 0


@pytest.mark.parametrize(
    "data",
    [
        request(code=3),  # PUT
        request(code=2),  # POST
        request(mtype=2),  # ACK
        request(mtype=3),  # RST
        request(LARGE),  # block-wise
        request(STALE),  # stale: aiocoap revalidates or serves it as stale
        request(EXPIRED),
        request("sensor-1/nothing"),  # a miss
        request("nothing"),  # not a resource id
        request(".well-known/oscar-stats"),
        request(more=((_OBSERVE, b"\x01"),)),  # a deregistration
        request(more=((_OBSERVE, b"\x00"),)),  # Observe 0, not in its shortest form
        request(more=((_OBSERVE, b""), (_OBSERVE, b""))),
        request(more=((_ECHO, b"12345678"),)),
        request(more=((23, b"\x06"),)),  # Block2
        request(more=((17, b"\x12"),)),  # Accept
        request(more=((3, b"host"),)),  # Uri-Host
        request(more=((39, b"coap"),)),  # Proxy-Scheme
        request(etags=(b"",)),  # an empty ETag
        request(etags=(b"123456789",)),  # a 9-byte ETag
        request(None, proxy_uri=f"coap://127.0.0.1:9/{REVERSED}", more=((_URI_PATH, b"x"),)),
        request(None, proxy_uri=f"coaps://127.0.0.1/{REVERSED}"),
        request(None, proxy_uri=f"coap://127.0.0.1/{REVERSED}?q=1"),
        request(None, proxy_uri="coap:///sensor-1/temperature"),
        request(extra=b"\xff" + b"payload"),
        request(extra=b"\xff"),
        request(extra=bytes([0xE0, 0x00])),  # truncated extended delta
        bytes([0x48, 0x01, 0, 1]) + b"tok",  # token announced longer than the datagram
        bytes([0x49, 0x01, 0, 1]) + bytes(9) + request()[8:],  # 9-byte token
        bytes([0x80, 0x01, 0, 1]),  # version 2
        bytes([0x40, 0x01, 0]),
        b"\xff\xfe" + request()[2:] + b"\xff",  # junk in the path's place
        request("sensor-1/\xe9t\xe9"),  # a path that is no resource id (not ASCII)
        bytes([0x40, 0x01, 0, 1]) + option(11, b"sensor-1") + option(0, b"\xff\xfe"),  # not UTF-8
    ],
)
def test_everything_else_goes_to_aiocoap(fast: FastPath, data: bytes) -> None:
    assert fast.answer(data, HOST) is None
    assert fast.proxy.stats.hits == 0


def test_proxy_uri_and_uri_path_name_the_same_entry(fast: FastPath) -> None:
    uri = f"coap://127.0.0.1:5999/{REVERSED}"
    by_uri = fast.answer(request(None, proxy_uri=uri), HOST)
    assert by_uri is not None and by_uri == fast.answer(request(), HOST)


def _check_answer(fast: FastPath, data: bytes) -> None:
    """The fast path answered ``data`` only if aiocoap parses it as a GET it would serve."""
    answer = fast.answer(data, HOST)
    if answer is None:
        return
    if answer == b"":  # taken: an ACK or RST, or a NON repeating a registration's message ID
        assert (data[0] >> 4) & 3 in (1, 2, 3)
        return
    parsed = Message.decode(data)
    assert parsed.code == Code.GET and parsed.mtype.name in ("CON", "NON")
    assert parsed.payload == b"" and len(parsed.token) <= 8
    numbers = {o.number for o in parsed.opt.option_list()}
    assert numbers <= {_ETAG, _URI_PATH, _PROXY_URI, _OBSERVE}
    if _OBSERVE in numbers:  # a registration (proxy.fastobserve)
        assert parsed.opt.observe == 0
        assert Message.decode(answer).opt.observe in (0, None)
    response = Message.decode(answer)
    assert response.token == parsed.token
    if parsed.mtype.name == "CON":
        assert response.mid == parsed.mid and response.mtype.name == "ACK"


def test_every_truncation_of_valid_requests(fast: FastPath) -> None:
    fast.hook.message_manager = _Mids()
    e = held(fast.site, REVERSED)
    for data in (
        request(),
        request(token=b"12345678", etags=(e.etag,), mtype=1),
        request(None, proxy_uri=f"coap://[::1]:5683/{REVERSED}"),
    ):
        for cut in range(len(data) + 1):
            _check_answer(fast, data[:cut])


class _Mids:
    """aiocoap's message ID sequence, for NON answers in memory."""

    def __init__(self) -> None:
        self.mid = 7

    def _next_message_id(self) -> int:
        self.mid = (self.mid + 1) & 0xFFFF
        return self.mid


@given(data=st.binary(max_size=80))
def test_random_bytes_never_raise(data: bytes) -> None:
    site, _ = make_site()
    site.addresses.prove(HOST, site.addresses.challenge(HOST))
    fast = FastPath(site)
    fast.hook.message_manager = _Mids()
    for candidate in (data, request()[:4] + data, request() + data):
        _check_answer(fast, candidate)


@given(position=st.integers(0, 40), value=st.integers(0, 255))
def test_mutated_requests(position: int, value: int) -> None:
    site, _ = make_site()
    site.addresses.prove(HOST, site.addresses.challenge(HOST))
    fast = FastPath(site)
    fast.hook.message_manager = _Mids()
    data = bytearray(request(etags=(b"abcd",)))
    if position < len(data):
        data[position] = value
        _check_answer(fast, bytes(data))


# --- on loopback: the real site, fast path on and off ---------------------------------------------


class Served(RawUdpClients):
    """The proxy site on a server context, its fast path, and raw client sockets."""

    def __init__(self, site: ProxySite, clock: Clock, context: Any, port: int) -> None:
        super().__init__(port)
        self.site, self.clock, self.context = site, clock, context
        self.fast = FastPath(site)
        assert self.fast.install(context)
        self._mid = 0x100

    def mid(self) -> int:
        self._mid += 1
        return self._mid

    async def proven(self) -> socket.socket:
        """A client that answered its Echo challenge (through aiocoap, as any client)."""
        sock = self.client()
        challenge = Message.decode(await self.exchange(sock, request(PUBLISHED, mid=self.mid())))
        assert challenge.code == Code.UNAUTHORIZED and challenge.opt.echo is not None
        again = request(PUBLISHED, mid=self.mid(), more=((_ECHO, challenge.opt.echo),))
        assert Message.decode(await self.exchange(sock, again)).code == Code.CONTENT
        return sock


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    port = free_port()
    site, clock = make_site(port)
    context = await Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    s = Served(site, clock, context, port)
    try:
        yield s
    finally:
        s.close()
        await context.shutdown()
        await site.proxy.close()


async def _both(
    served: Served, sock: socket.socket, make: Any, *, hits: bool = True
) -> tuple[bytes, bytes, int]:
    """``make(mid)``'s request answered by the fast path, then by aiocoap (fast path off), from
    ``sock``; (fast answer, aiocoap's answer, datagrams the fast path answered of the two).
    The answers are compared whole: a CON answer's message ID is the request's, and each of
    the two requests has its own; a NON answer's is the server's (see :func:`_same`)."""
    before = served.fast.answered
    counted = served.site.proxy.stats.hits
    answers = []
    for enabled in (True, False):
        served.fast.enabled = enabled
        mid = served.mid()
        data = make(mid)
        answer = await served.exchange(sock, data)
        if data[0] >> 4 & 3 == 0:  # CON: the ACK carries the request's message ID
            assert answer[2:4] == data[2:4]
            answer = answer[:2] + b"MI" + answer[4:]
        answers.append(answer)
    served.fast.enabled = True
    if hits:
        assert served.site.proxy.stats.hits - counted == 2  # counted alike on both paths
    return answers[0], answers[1], served.fast.answered - before


def _same(fast: bytes, slow: bytes, data: bytes) -> None:
    """The same bytes; for a NON answer, whose message ID is the server's, the fast path's
    was taken from aiocoap's sequence: aiocoap's next answer has the next one."""
    if data[0] >> 4 & 3 == 1:
        assert fast[:2] + fast[4:] == slow[:2] + slow[4:]
        assert int.from_bytes(slow[2:4], "big") == (int.from_bytes(fast[2:4], "big") + 1) & 0xFFFF
    else:
        assert fast == slow


def _cases(served: Served) -> Iterator[tuple[str, Any]]:
    uri = f"coap://127.0.0.1:9/{REVERSED}"
    for rid in (REVERSED, PUBLISHED, SHORT):
        e = held(served.site, rid)
        for etags in ((), (e.etag,), (b"nope",), (b"nope", e.etag)):
            for mtype in (0, 1):
                for token in TOKENS:
                    yield (
                        rid,
                        lambda mid, r=rid, t=token, m=mtype, g=etags: request(
                            r, mid=mid, token=t, mtype=m, etags=g
                        ),
                    )
    for mtype in (0, 1):
        yield REVERSED, lambda mid, m=mtype: request(None, mid=mid, mtype=m, proxy_uri=uri)


@pytest.mark.asyncio
async def test_differential_same_bytes_with_and_without_the_fast_path(served: Served) -> None:
    """CON and NON, tokens of 0 to 8 bytes, with and without (matching) ETags, Uri-Path of a
    reverse-mapped and of a published resource, Proxy-Uri; then other Max-Age values."""
    sock = await served.proven()
    compared = 0
    for _, make in _cases(served):
        fast, slow, answered = await _both(served, sock, make)
        _same(fast, slow, make(0))
        assert answered == 1
        compared += 1
    assert compared > 200
    for now, max_age in ((NOW + 52.5, 7), (NOW + 59.7, 0)):
        served.clock.now = now
        fast, slow, answered = await _both(served, sock, lambda mid: request(mid=mid))
        assert fast == slow and answered == 1
        assert Message.decode(fast).opt.max_age == max_age


@pytest.mark.asyncio
async def test_unproven_stale_and_expired_get_aiocoaps_answer(served: Served) -> None:
    before = served.fast.answered
    unproven = served.client()
    challenge = Message.decode(await served.exchange(unproven, request(mid=served.mid())))
    assert challenge.code == Code.UNAUTHORIZED and challenge.opt.echo is not None
    assert served.site.proxy.stats.echo_challenges == 1
    sock = await served.proven()
    for rid in (STALE, EXPIRED, LARGE):
        make = lambda mid, r=rid: request(r, mid=mid)  # noqa: E731
        fast, slow, answered = await _both(served, sock, make, hits=False)
        assert answered == 0  # both through aiocoap: the same meaning
        assert Message.decode(fast).code == Message.decode(slow).code
    stale = Message.decode(fast := await served.exchange(sock, request(STALE, mid=served.mid())))
    assert stale.code == Code.CONTENT and stale.opt.max_age == 0  # published: stale until exp
    assert served.fast.answered == before


@pytest.mark.asyncio
async def test_junk_and_truncated_datagrams_never_stop_the_server(served: Served) -> None:
    sock = await served.proven()
    valid = request(token=b"12345678", etags=(b"abcd",))
    rng = random.Random(7)
    junk = [valid[:cut] for cut in range(len(valid))]
    junk += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))) for _ in range(200)]
    for tkl in range(9, 16):
        junk.append(bytes([0x40 | tkl, 0x01, 0, 9]) + bytes(tkl) + request()[8:])
    loop = asyncio.get_running_loop()
    for data in junk:
        await loop.sock_sendall(sock, data)
    await asyncio.sleep(0.3)  # aiocoap's answers to junk (RSTs, 4.xx), if any, then drained
    while True:
        try:
            await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.05)
        except TimeoutError:
            break
    before = served.fast.answered
    answer = Message.decode(await served.exchange(sock, request(mid=0x4242)))
    assert answer.code == Code.CONTENT and answer.mid == 0x4242
    assert served.fast.answered == before + 1


# --- the site's own Block2 (proxy.server._fill: aiocoap's Block2 cache is not used) --------------


class _Remote:
    """A request's remote as aiocoap's UDP (szx 6 at most, 1,124 bytes) or TCP with BERT."""

    def __init__(self, *, bert: bool = False) -> None:
        self.maximum_block_size_exp = 7 if bert else 6
        self.maximum_payload_size = (1023 << 10) + 100 if bert else 1124
        self.hostinfo = HOST
        self.authenticated_claims = ()


async def _block(site: ProxySite, rid: str, block2: Any, *, bert: bool = False) -> Message:
    from aiocoap import GET
    from aiocoap.optiontypes import BlockOption

    request = Message(code=GET, uri_path=rid.split("/"))
    if block2 is not None:
        request.opt.block2 = BlockOption.BlockwiseTuple(*block2)
    request.remote = _Remote(bert=bert)
    return await site.render(request)


@pytest.mark.asyncio
async def test_the_site_cuts_each_block_itself_in_any_order() -> None:
    """Every block of a cached object is cut when asked for, in any order (several at once from
    a windowed client); a larger block than the transport takes is answered with the largest it
    does, numbered to match (RFC 7959 §2.3); BERT over TCP in 1 KiB units; past the end 4.00;
    Size2 on every block."""
    site, _ = make_site()
    site.addresses.prove(HOST, site.addresses.challenge(HOST))
    big = entry("pub-2/blocks", 5000)
    site.proxy.cache.put(big)
    rid = "pub-2/blocks"
    for number in (4, 0, 2):  # out of order
        answer = await _block(site, rid, (number, False, 6))
        assert answer.code == Code.CONTENT
        assert answer.payload == big.obj[number * 1024 : (number + 1) * 1024]
        assert answer.opt.block2.more == (number < 4) and answer.opt.size2 == 5000
    unasked = await _block(site, rid, None)  # larger than a datagram: block 0, szx 6
    assert (unasked.opt.block2.block_number, unasked.opt.block2.size_exponent) == (0, 6)
    assert unasked.payload == big.obj[:1024]
    small = await _block(site, rid, (9, False, 4))  # 256-byte blocks as asked
    assert small.payload == big.obj[9 * 256 : 10 * 256] and small.opt.block2.size_exponent == 4
    scaled = await _block(site, rid, (1, False, 7))  # BERT over UDP: 1 KiB blocks, block 1
    assert (scaled.opt.block2.block_number, scaled.opt.block2.size_exponent) == (1, 6)
    assert scaled.payload == big.obj[1024:2048]
    bert = await _block(site, rid, (1, False, 7), bert=True)  # over TCP: the rest in one
    assert bert.payload == big.obj[1024:] and not bert.opt.block2.more
    past = await _block(site, rid, (5, False, 6))
    assert past.code == Code.BAD_REQUEST
