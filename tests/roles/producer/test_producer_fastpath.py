"""The producer's fast path (producer/fastpath.py): same answers as aiocoap, never a crash.

In memory first (``FastPath.answer`` on datagrams), then on loopback: the producer's real server
(``producer.server.serve``) in this process, with a stand-in producer whose objects are set by
hand (the fast path serves bytes, it never looks inside them), and raw UDP sockets as clients so
that the exact bytes of both answers can be compared: fast path on, and off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import GET, Context, Message
from aiocoap.numbers.codes import Code
from as_harness import free_port
from hypothesis import given
from hypothesis import strategies as st

from oscar.objects import object_etag
from producer.config import ResourceSpec
from producer.fastpath import UNSOLICITED_LIMIT, FastPath
from producer.published import Published
from producer.server import FASTPATH_ENV, ObjectResource, ProducerContext, serve
from testkit import RawUdpClients
from testkit import coap_option as option

DEVICE = "sensor-9"
#: A path segment long enough for an extended option length (13 + 1 byte).
LONG = "a-rather-long-segment-name"
NOW = 1_800_000_000
#: Object sizes: a 64 B reading's object, both sides of aiocoap's unsolicited block-wise limit,
#: a few blocks, and a block boundary.
SIZES = (206, UNSOLICITED_LIMIT, UNSOLICITED_LIMIT + 1, 3000, 2048)


class StandIn:
    """What the server needs of a Producer: an id, resources and a clock (pinned). As a
    :class:`producer.published.Host` it is partial: these objects are set by hand, never sealed."""

    def __init__(self, paths: tuple[str, ...], now: int = NOW) -> None:
        self.device_id = DEVICE
        self.clock = now
        self.resources = {p: Published(self, ResourceSpec(p)) for p in paths}  # type: ignore[arg-type]

    def now(self) -> int:
        return self.clock


_seq = iter(range(1, 1_000_000))


def reseal(published: Published, obj: bytes, *, lifetime: int = 3600) -> None:
    """What ``Published.reseal`` does with a new object, without sealing."""
    now = published.now()
    seq = next(_seq)
    published.obj, published.iat, published.exp = obj, now, now + lifetime
    published.epoch, published.seq = 1, seq
    published.etag = object_etag(published.resource_id, 1, seq)
    for notify in published.on_change:
        notify()


def uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def request(
    path: str = f"{DEVICE}/temperature",
    *,
    mid: int = 0x1234,
    token: bytes = b"\x01\x02\x03\x04",
    block2: tuple[int, int, int] | None = None,
    mtype: int = 0,
    code: int = 1,
    before: tuple[tuple[int, bytes], ...] = (),
    extra: bytes = b"",
) -> bytes:
    """A request datagram built by hand (aiocoap would refuse to build the odd ones):
    ``before`` holds options numbered below Uri-Path, ``extra`` raw bytes after Block2."""
    data = bytes([0x40 | mtype << 4 | len(token), code]) + struct.pack("!H", mid) + token
    number = 0
    for n, value in before:
        data += option(n - number, value)
        number = n
    for segment in path.split("/"):
        data += option(11 - number, segment.encode())
        number = 11
    if block2 is not None:
        num, more, szx = block2
        data += option(23 - number, uint(num << 4 | more << 3 | szx))
    return data + extra


def decode(data: bytes) -> Message:
    return Message.decode(data)


def meaning(message: Message) -> tuple[Any, ...]:
    """What an answer says: type, code, token, options, payload (not the message ID, which a
    NON answer gets from the server)."""
    options = [(int(o.number), o.encode()) for o in message.opt.option_list()]
    return message.mtype, message.code, message.token, options, message.payload


# --- in memory ------------------------------------------------------------------------------------


@pytest.fixture
def stand_in() -> StandIn:
    producer = StandIn(("temperature", "room/a/humidity", LONG))
    reseal(producer.resources["temperature"], os.urandom(206))
    reseal(producer.resources[LONG], os.urandom(100))
    return producer


@pytest.fixture
def fast(stand_in: StandIn) -> FastPath:
    routes = {}
    for published in stand_in.resources.values():
        path = (DEVICE, *published.spec.path.split("/"))
        routes[tuple(s.encode() for s in path)] = ObjectResource(published)
    return FastPath(routes)


def test_answers_a_get_with_the_object_etag_and_max_age(stand_in: StandIn, fast: FastPath) -> None:
    published = stand_in.resources["temperature"]
    answer = fast.answer(request(mid=0xBEEF, token=b"tok"))
    assert answer is not None
    message = decode(answer)
    assert message.mtype.name == "ACK" and message.mid == 0xBEEF and message.token == b"tok"
    assert message.code == Code.CONTENT
    assert message.opt.content_format == 18
    assert message.opt.etag == published.etag
    assert message.opt.max_age == 60
    assert message.opt.block2 is None
    assert message.payload == published.obj
    stand_in.clock = published.exp - 7  # Max-Age shortened to the object's exp
    assert decode(fast.answer(request()) or b"").opt.max_age == 7
    stand_in.clock = published.exp
    assert decode(fast.answer(request()) or b"").opt.max_age == 0
    stand_in.clock = published.exp + 1  # expired: aiocoap's 5.03
    assert fast.answer(request()) is None


def test_empty_token_and_eight_byte_token(fast: FastPath) -> None:
    for token in (b"", b"12345678"):
        answer = fast.answer(request(token=token))
        assert answer is not None and decode(answer).token == token


def test_only_objects_in_one_message_are_answered(stand_in: StandIn, fast: FastPath) -> None:
    """A block-wise transfer is aiocoap's (its Block2 cache finishes a transfer with the object of
    block 0 even if the producer re-seals meanwhile); block 0 asked for with a size the whole
    object fits in is answered whole, without Block2, as aiocoap answers it."""
    published = stand_in.resources["room/a/humidity"]
    path = f"{DEVICE}/room/a/humidity"
    reseal(published, os.urandom(UNSOLICITED_LIMIT + 1))
    assert fast.answer(request(path)) is None  # unasked: block-wise, aiocoap's
    assert fast.answer(request(path, block2=(0, 0, 6))) is None
    reseal(published, os.urandom(UNSOLICITED_LIMIT))
    whole = decode(fast.answer(request(path)) or b"")
    assert whole.payload == published.obj and whole.opt.block2 is None
    reseal(published, os.urandom(200))
    fits = decode(fast.answer(request(path, block2=(0, 0, 4))) or b"")  # 256-byte blocks
    assert fits.payload == published.obj and fits.opt.block2 is None
    assert fast.answer(request(path, block2=(0, 0, 3))) is None  # 128-byte blocks: two
    assert fast.answer(request(path, block2=(1, 0, 3))) is None  # a later block
    assert fast.answer(request(path, block2=(0, 1, 6))) is None  # M set in a request
    assert fast.answer(request(path, block2=(0, 0, 7))) is None  # BERT


def test_a_new_object_is_served_at_once(stand_in: StandIn, fast: FastPath) -> None:
    published = stand_in.resources["temperature"]
    before = decode(fast.answer(request()) or b"")
    new = os.urandom(300)
    reseal(published, new)
    after = decode(fast.answer(request()) or b"")
    assert after.payload == new and after.opt.etag == published.etag != before.opt.etag


@pytest.mark.parametrize(
    "data",
    [
        request(mtype=1),  # NON
        request(code=2),  # POST
        request(f"{DEVICE}/nothing"),  # 4.04
        request(f"{DEVICE}/temperature/"),  # trailing empty segment
        request(".well-known/core"),
        request(extra=option(0, b"x")),  # one more Uri-Path segment
        request(extra=bytes([0xFF]) + b"payload"),
        request(extra=bytes([0xFF])),  # payload marker, no payload
        request(extra=option(17 - 11, b"\x12")),  # Accept
        request(extra=option(15 - 11, b"a=b")),  # Uri-Query
        request(extra=option(28 - 11, b"")),  # Size2
        request(extra=option(258 - 11, b"\x02")),  # No-Response
        request(extra=option(65000 - 11, b"")),  # unknown option
        request(block2=(0, 0, 6), extra=option(0, b"\x06")),  # Block2 twice
        request(block2=(0, 0, 6), extra=option(27 - 23, b"\x06")),  # Block1
        bytes([0x44, 0x01, 0, 1]) + b"tok",  # token announced longer than the datagram
        bytes([0x80, 0x01, 0, 1]),  # version 2
        bytes([0x40, 0x01, 0]),  # three bytes
    ],
)
def test_everything_else_goes_to_aiocoap(fast: FastPath, data: bytes) -> None:
    assert fast.answer(data) is None


def test_options_before_uri_path_go_to_aiocoap(fast: FastPath) -> None:
    for number, value in ((1, b"x"), (3, b"host"), (4, b"12345678"), (5, b""), (6, b""), (7, b"")):
        assert fast.answer(request(before=((number, value),))) is None, number


@pytest.mark.parametrize("tkl", range(9, 16))
def test_token_lengths_9_to_15_go_to_aiocoap(fast: FastPath, tkl: int) -> None:
    data = bytearray(request(token=bytes(8)))
    data[0] = 0x40 | tkl
    assert fast.answer(bytes(data)) is None
    assert fast.answer(bytes(data) + bytes(tkl - 8)) is None


def test_reserved_nibble_15_and_extended_fields(fast: FastPath) -> None:
    path = request()[8:]
    header = bytes([0x40, 0x01, 0, 1])
    assert fast.answer(header + bytes([0xF1, 0x00]) + path) is None  # delta 15
    assert fast.answer(header + bytes([0xBF]) + path) is None  # length 15
    assert fast.answer(header + bytes([0x1F])) is None
    # extended lengths: 13 + 1 byte, and 269 + 2 bytes
    data = request(f"{DEVICE}/{LONG}", token=b"")
    assert data[4 + len(DEVICE) + 1] == 0x0D
    assert fast.answer(data) is not None
    for cut in range(len(data)):
        assert fast.answer(data[:cut]) is None
    data = request(f"{DEVICE}/{'q' * 300}", token=b"")
    assert data[4 + len(DEVICE) + 1] == 0x0E
    assert fast.answer(data) is None  # a valid request, but no such resource
    # extended deltas: an option numbered 11 + 13 + x, or 11 + 269 + x, after the path
    assert fast.answer(request(extra=bytes([0xD0, 0x02]))) is None
    assert fast.answer(request(extra=bytes([0xE0, 0x00, 0x02]))) is None
    assert fast.answer(request(extra=bytes([0xE0, 0x00]))) is None  # truncated


def test_out_of_order_options_go_to_aiocoap(fast: FastPath) -> None:
    # Block2 first, then the path with delta 0: that is Block2 repeated, not a Uri-Path.
    data = bytes([0x40, 0x01, 0, 1]) + option(23, b"\x06")
    data += option(0, DEVICE.encode()) + option(0, b"temperature")
    assert fast.answer(data) is None


def _check_answer(fast: FastPath, data: bytes) -> None:
    """The fast path answered ``data`` only if aiocoap parses it as the request it served."""
    answer = fast.answer(data)
    if answer is None:
        return
    parsed = Message.decode(data)
    assert parsed.code == GET and parsed.mtype.name == "CON" and parsed.payload == b""
    assert len(parsed.token) <= 8
    assert tuple(s.encode() for s in parsed.opt.uri_path) in fast._routes
    assert {o.number for o in parsed.opt.option_list()} <= {11, 23}
    response = Message.decode(answer)
    assert response.mid == parsed.mid and response.token == parsed.token


def test_every_truncation_of_valid_requests(fast: FastPath) -> None:
    for data in (
        request(),
        request(token=b"12345678", block2=(0, 0, 6)),
        request(f"{DEVICE}/room/a/humidity", block2=(70000, 0, 2)),
    ):
        for cut in range(len(data) + 1):
            _check_answer(fast, data[:cut])


@given(data=st.binary(max_size=80))
def test_random_bytes_never_raise(data: bytes) -> None:
    producer = StandIn(("temperature",))
    reseal(producer.resources["temperature"], b"x" * 50)
    published = producer.resources["temperature"]
    fast = FastPath({(DEVICE.encode(), b"temperature"): ObjectResource(published)})
    for candidate in (data, request()[:4] + data, request() + data):
        _check_answer(fast, candidate)


@given(position=st.integers(0, 40), value=st.integers(0, 255))
def test_mutated_requests(position: int, value: int) -> None:
    producer = StandIn(("temperature",))
    reseal(producer.resources["temperature"], b"x" * 2000)
    fast = FastPath(
        {(DEVICE.encode(), b"temperature"): ObjectResource(producer.resources["temperature"])}
    )
    data = bytearray(request(block2=(1, 0, 5)))
    if position < len(data):
        data[position] = value
        _check_answer(fast, bytes(data))


# --- on loopback: the real server, fast path on and off ------------------------------------------


class Served(RawUdpClients):
    """A running server of a stand-in producer, and raw client sockets."""

    def __init__(self, producer: StandIn, context: ProducerContext, port: int) -> None:
        super().__init__(port)
        self.producer = producer
        self.context = context

    @property
    def fast(self) -> FastPath:
        assert self.context.fast_path is not None
        return self.context.fast_path


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    producer = StandIn(("temperature", *(f"s{size}" for size in SIZES)))
    reseal(producer.resources["temperature"], os.urandom(206))
    for size in SIZES:
        reseal(producer.resources[f"s{size}"], os.urandom(size))
    port = free_port()
    context = await serve(DEVICE, producer.resources.values(), "127.0.0.1", port)
    s = Served(producer, context, port)
    try:
        yield s
    finally:
        s.close()
        await context.shutdown()


def _requests_for(path: str, size: int) -> Iterator[list[bytes]]:
    """Sequences of requests (each sequence from one client) covering one object."""
    yield [request(path, mid=1, token=b""), request(path, mid=2, token=b"12345678")]
    blocks = (size + 1023) // 1024
    yield [request(path, mid=10 + i, token=b"ab", block2=(i, 0, 6)) for i in range(blocks)]
    # unasked block-wise start, then the client's follow-ups
    if size > UNSOLICITED_LIMIT:
        yield [request(path, mid=30, token=b"t0")] + [
            request(path, mid=30 + i, token=b"t%d" % i, block2=(i, 0, 6)) for i in range(1, blocks)
        ]
    for szx in (0, 3, 5):
        count = min((size + (16 << szx) - 1) // (16 << szx), 12)
        yield [request(path, mid=100 + i, token=b"z", block2=(i, 0, szx)) for i in range(count)]


@pytest.mark.asyncio
async def test_differential_same_bytes_with_and_without_the_fast_path(served: Served) -> None:
    """Every request of each sequence, answered by the fast path and by aiocoap: the same bytes
    (a fresh client socket per sequence and side, so that aiocoap's per-remote state matches)."""
    compared = fast_answered = 0
    for name in ("temperature", *(f"s{size}" for size in SIZES)):
        obj = served.producer.resources[name].obj
        assert obj is not None
        for sequence in _requests_for(f"{DEVICE}/{name}", len(obj)):
            answers: dict[bool, list[bytes]] = {}
            for enabled in (True, False):
                served.fast.enabled = enabled
                before = served.fast.answered
                sock = served.client()
                answers[enabled] = [await served.exchange(sock, data) for data in sequence]
                answered = served.fast.answered - before
                if not enabled or len(obj) > UNSOLICITED_LIMIT:
                    assert answered == 0  # block-wise transfers are aiocoap's
                fast_answered += answered
            assert answers[True] == answers[False], (name, sequence)
            compared += len(sequence)
    assert compared > 100 and fast_answered >= 10
    published = served.producer.resources["temperature"]
    for clock in (published.exp - 3, published.exp):  # Max-Age 3, then 0 (an empty option)
        served.producer.clock = clock
        answers = {}
        for enabled in (True, False):
            served.fast.enabled = enabled
            answers[enabled] = await served.exchange(
                served.client(), request(f"{DEVICE}/temperature")
            )
        assert answers[True] == answers[False]
        assert decode(answers[True]).opt.max_age == published.exp - clock


@pytest.mark.asyncio
async def test_fall_through_cases_answer_as_before(served: Served) -> None:
    published = served.producer.resources["temperature"]
    path = f"{DEVICE}/temperature"
    validate = request(path, before=((4, published.etag),))
    cases = [
        request(path, mtype=1),  # NON
        validate,  # ETag validation: 2.03
        request(path, extra=option(17 - 11, b"\x12")),  # Accept 18
        request(f"{DEVICE}/nothing"),
        request(".well-known/core"),
        request(path, block2=(5, 0, 6)),  # past the end: aiocoap's error
    ]
    for data in cases:
        answers = []
        for enabled in (True, False):
            served.fast.enabled = enabled
            before = served.fast.answered
            answers.append(decode(await served.exchange(served.client(), data)))
            assert served.fast.answered == before
        assert meaning(answers[0]) == meaning(answers[1])
    served.fast.enabled = True
    assert decode(await served.exchange(served.client(), validate)).code == Code.VALID
    served.producer.clock = published.exp + 1  # expired: 5.03 from aiocoap
    unavailable = decode(await served.exchange(served.client(), request(path)))
    assert unavailable.code == Code.SERVICE_UNAVAILABLE


@pytest.mark.asyncio
async def test_a_get_right_after_a_reseal_and_observers_still_notified(served: Served) -> None:
    published = served.producer.resources["temperature"]
    path = f"{DEVICE}/temperature"
    ctx = await Context.create_client_context(transports=["udp6"])
    try:
        uri = f"coap://127.0.0.1:{served.port}/{path}"
        observation = ctx.request(Message(code=GET, uri=uri, observe=0))
        first = await asyncio.wait_for(observation.response, 5)
        assert first.opt.observe is not None and first.payload == published.obj
        notifications = aiter(observation.observation)
        proof = await asyncio.wait_for(anext(notifications), 5)  # the current object, CON
        assert proof.payload == published.obj
        sock = served.client()
        for i in range(3):
            new = os.urandom(150 + i)
            reseal(published, new)
            answer = decode(await served.exchange(sock, request(path, mid=50 + i)))
            assert answer.payload == new and answer.opt.etag == published.etag
            notification = await asyncio.wait_for(anext(notifications), 5)
            assert notification.payload == new
        observation.observation.cancel()
    finally:
        await ctx.shutdown()


@pytest.mark.asyncio
async def test_a_request_on_an_observed_token_goes_to_aiocoap(served: Served) -> None:
    path = f"{DEVICE}/temperature"
    sock = served.client()
    observe = request(path, mid=1, token=b"obs", before=((6, b""),))
    first = decode(await served.exchange(sock, observe))
    assert first.opt.observe is not None
    loop = asyncio.get_running_loop()
    proof = decode(await asyncio.wait_for(loop.sock_recv(sock, 4096), 5))  # CON, the same object
    assert proof.opt.observe is not None and proof.payload == first.payload
    before = served.fast.answered
    plain = decode(await served.exchange(sock, request(path, mid=2, token=b"obs")))
    assert plain.code == Code.CONTENT and plain.opt.observe is None
    assert served.fast.answered == before  # aiocoap took it (and ended the observation)
    other = decode(await served.exchange(sock, request(path, mid=3, token=b"new")))
    assert other.code == Code.CONTENT
    assert served.fast.answered == before + 1


@pytest.mark.asyncio
async def test_malformed_datagrams_never_stop_the_server(served: Served) -> None:
    sock = served.client()
    valid = request(token=b"12345678", block2=(0, 0, 6))
    rng = random.Random(7)
    junk = [valid[:cut] for cut in range(len(valid))]
    junk += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))) for _ in range(200)]
    for tkl in range(9, 16):
        junk.append(bytes([0x40 | tkl, 0x01, 0, 9]) + bytes(tkl) + request()[8:])
    junk.append(bytes([0x40, 0x01, 0, 9]) + bytes([0xF1, 0x00]) + request()[4:])
    loop = asyncio.get_running_loop()
    for data in junk:
        await loop.sock_sendall(sock, data)
    await asyncio.sleep(0.3)
    while not await served.nothing(sock, 0.05):
        pass  # aiocoap's answers to junk (RSTs, 4.xx), if any
    answer = decode(await served.exchange(sock, request(mid=0x4242)))
    assert answer.code == Code.CONTENT and answer.mid == 0x4242


@pytest.mark.asyncio
async def test_a_failing_fast_path_hands_over_to_aiocoap(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: FastPath, data: bytes) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(FastPath, "answer", broken)
    sock = served.client()
    with caplog.at_level(logging.ERROR, logger="oscar.producer"):
        for mid in (1, 2):
            answer = decode(await served.exchange(sock, request(mid=mid)))
            assert answer.code == Code.CONTENT and answer.mid == mid
    assert sum("fast path failed" in r.message for r in caplog.records) == 1  # logged once


@pytest.mark.asyncio
async def test_no_state_per_remote(served: Served) -> None:
    """Many consumers (source ports): the fast path keeps one encoding per resource, and
    aiocoap's message layer never saw them, so it holds nothing for them either."""
    for i in range(60):
        sock = served.client()
        assert decode(await served.exchange(sock, request(mid=i))).code == Code.CONTENT
        sock.close()
    served.sockets.clear()
    assert len(served.fast._encoded) <= len(served.producer.resources)
    manager = served.context.request_interfaces[0].token_interface
    assert len(manager._recent_messages) == 0  # aiocoap's deduplication memory


@pytest.mark.asyncio
async def test_the_environment_can_leave_it_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASTPATH_ENV, "off")
    producer = StandIn(("temperature",))
    reseal(producer.resources["temperature"], b"object")
    port = free_port()
    context = await serve(DEVICE, producer.resources.values(), "127.0.0.1", port)
    try:
        assert context.fast_path is None
        ctx = await Context.create_client_context(transports=["udp6"])
        try:
            uri = f"coap://127.0.0.1:{port}/{DEVICE}/temperature"
            response = await asyncio.wait_for(ctx.request(Message(code=GET, uri=uri)).response, 5)
            assert response.payload == b"object"
        finally:
            await ctx.shutdown()
    finally:
        await context.shutdown()
