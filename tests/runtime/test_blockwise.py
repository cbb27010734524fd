"""oscar_io.blockwise against a real aiocoap server in this process: a payload served block-wise
comes back byte-identical with several blocks in flight (never more than the window), and a
transfer whose blocks do not make one object, or make one too large, fails with nothing returned."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest
import pytest_asyncio
from aiocoap import CON, GET, Context, Message, resource
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from demo.system import free_port
from oscar_io.blockwise import (
    DEFAULT_WINDOW,
    IN_FLIGHT_VERSIONS,
    BrokenTransfer,
    TooLarge,
    allow_in_flight,
    answer,
    check_window,
    fetch_rest,
)


class Blocks(resource.Resource):
    """Serves ``payload`` block by block itself (no aiocoap assembly, so every block request is
    rendered and counted), each answer ``delay`` seconds late, broken as ``mode`` says."""

    def __init__(self) -> None:
        super().__init__()
        self.payload = b""
        self.mode = ""
        self.size2 = False
        self.delay = 0.0
        self.requests: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.hold = asyncio.Event()

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_get(self, request: Any) -> Message:
        asked = request.opt.block2
        number, szx = (0, 6) if asked is None else (asked.block_number, asked.size_exponent)
        self.requests.append(number)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)  # the service time: what a window overlaps
            if self.mode == "silent" and number == 3:
                await self.hold.wait()
            return self._block(number, szx)
        finally:
            self.in_flight -= 1

    def _block(self, number: int, szx: int) -> Message:
        size = 16 << szx
        if self.mode == "range" and number >= 2:
            number += 1
        start = number * size
        endless = self.mode == "endless"
        if start >= len(self.payload) and not endless and number != 0:
            return Message(code=Code.BAD_REQUEST, payload=b"Block request out of bounds")
        chunk = os.urandom(size) if endless else self.payload[start : start + size]
        if self.mode == "short" and number == 2:
            chunk = chunk[:-1]
        more = endless or start + size < len(self.payload)
        reply = Message(code=Code.CONTENT, payload=chunk)
        reply.opt.etag = b"other" if self.mode == "etag" and number >= 3 else b"etag-one"
        reply.opt.block2 = BlockOption.BlockwiseTuple(number, more, szx)
        if self.size2 and number == 0 and not endless:
            reply.opt.size2 = len(self.payload)
        return reply


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[Blocks, Context, str]]:
    blocks = Blocks()
    site = resource.Site()
    site.add_resource(["big"], blocks)
    port = free_port()
    server = await Context.create_server_context(
        site, bind=("127.0.0.1", port), transports=["udp6"]
    )
    client = await Context.create_client_context()
    try:
        yield blocks, client, f"coap://127.0.0.1:{port}/big"
    finally:
        blocks.hold.set()
        await client.shutdown()
        await server.shutdown()


async def fetch(
    client: Context,
    uri: str,
    *,
    window: int = DEFAULT_WINDOW,
    max_size: int = 1 << 20,
    szx: int = 6,
    timeout: float = 2.0,
) -> bytes:
    """What the proxy and the consumer do: block 0, then :func:`fetch_rest` with one timeout
    per exchange."""
    request = Message(code=GET, uri=uri)
    request.opt.block2 = BlockOption.BlockwiseTuple(0, False, szx)
    first = await asyncio.wait_for(answer(client, request), 5)
    assert first.code == Code.CONTENT

    async def ask(number: int, size_exponent: int) -> Any:
        follow = request.copy(
            mid=None,
            token=None,
            remote=first.remote,
            block2=BlockOption.BlockwiseTuple(number, False, size_exponent),
            mtype=CON,
        )
        return await asyncio.wait_for(answer(client, follow), timeout)

    assert allow_in_flight(client, window)
    return await fetch_rest(first, ask, max_size=max_size, window=window)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [8 * 1024, 8 * 1024 + 1, 500, 1024, 100 * 1024 - 7])
@pytest.mark.parametrize("size2", [False, True])
async def test_a_payload_comes_back_byte_identical(
    served: tuple[Blocks, Context, str], size: int, size2: bool
) -> None:
    blocks, client, uri = served
    blocks.payload, blocks.size2 = os.urandom(size), size2
    got = await fetch(client, uri)
    assert hashlib.sha256(got).digest() == hashlib.sha256(blocks.payload).digest()
    count = -(-size // 1024)
    assert set(range(count)) <= set(blocks.requests)
    assert len(blocks.requests) == len(set(blocks.requests))  # no block asked for twice
    if size2:
        assert len(blocks.requests) == count  # nothing asked for past the announced end
    else:
        assert len(blocks.requests) < count + DEFAULT_WINDOW  # a window past the end at most


@pytest.mark.asyncio
async def test_a_smaller_block_size_asked_for_is_kept(served: tuple[Blocks, Context, str]) -> None:
    blocks, client, uri = served
    blocks.payload = os.urandom(5000)
    assert await fetch(client, uri, szx=4) == blocks.payload  # 256-byte blocks
    assert len(set(blocks.requests)) >= 5000 // 256 + 1


@pytest.mark.asyncio
@pytest.mark.parametrize("window", [1, 4, 8])
async def test_never_more_than_the_window_in_flight(
    served: tuple[Blocks, Context, str], window: int
) -> None:
    blocks, client, uri = served
    blocks.payload, blocks.size2, blocks.delay = os.urandom(64 * 1024), True, 0.02
    assert await fetch(client, uri, window=window) == blocks.payload
    # block 0 alone, then the window (the server sees them all: a 20 ms render overlaps them)
    assert blocks.most_in_flight == window


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "error", "says"),
    [
        ("etag", BrokenTransfer, "changed during"),
        ("short", BrokenTransfer, "shorter than its size"),
        ("range", BrokenTransfer, "out of order"),
        ("endless", TooLarge, "larger than any object"),
    ],
)
async def test_a_broken_transfer_fails_with_nothing_returned(
    served: tuple[Blocks, Context, str], mode: str, error: type[Exception], says: str
) -> None:
    blocks, client, uri = served
    blocks.payload, blocks.mode = os.urandom(20 * 1024), mode
    with pytest.raises(error) as info:
        await fetch(client, uri, max_size=16 * 1024)
    assert says in str(info.value)
    if mode == "endless":  # no block asked for that would start past the limit
        assert max(blocks.requests) < 16


@pytest.mark.asyncio
async def test_an_announced_size_over_the_limit_asks_for_nothing_more(
    served: tuple[Blocks, Context, str],
) -> None:
    blocks, client, uri = served
    blocks.payload, blocks.size2 = os.urandom(20 * 1024), True
    with pytest.raises(TooLarge, match="announced"):
        await fetch(client, uri, max_size=16 * 1024)
    assert blocks.requests == [0]


@pytest.mark.asyncio
async def test_a_block_that_never_comes_times_out_and_the_rest_is_cancelled(
    served: tuple[Blocks, Context, str],
) -> None:
    blocks, client, uri = served
    blocks.payload, blocks.mode = os.urandom(40 * 1024), "silent"
    with pytest.raises(TimeoutError):
        await fetch(client, uri, window=4, timeout=0.5)
    assert max(blocks.requests) <= 3 + 4  # the window never moved past block 3


@pytest.mark.asyncio
async def test_late_answers_to_cancelled_requests_leave_no_error(
    served: tuple[Blocks, Context, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Requests past the end are cancelled while their answers arrive: aiocoap must not see a
    cancelled future (its receive path would log ``InvalidStateError`` with a traceback)."""
    blocks, client, uri = served
    errors: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    caplog.set_level(logging.WARNING)
    try:
        for size in (3 * 1024 + 1, 9 * 1024, 17 * 1024 - 1, 2 * 1024):
            blocks.payload = os.urandom(size)
            assert await fetch(client, uri, window=16) == blocks.payload
        # the late answers' turn to arrive (what is checked is their absence)
        await asyncio.sleep(0.3)
    finally:
        loop.set_exception_handler(None)
    assert errors == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert len(blocks.requests) > 4 + 3 + 9 + 17 + 2  # requests past the end were made


@pytest.mark.asyncio
async def test_requests_over_the_contexts_limit_wait_their_turn(
    served: tuple[Blocks, Context, str],
) -> None:
    """Six requests at once to a peer with a limit of three: three outstanding, the rest queued
    by aiocoap (NSTART) and answered all the same."""
    blocks, client, uri = served
    blocks.payload, blocks.delay = os.urandom(8 * 1024), 0.03
    assert allow_in_flight(client, 3)

    def block(number: int) -> Message:
        message = Message(code=GET, uri=uri)
        message.mtype = CON
        message.opt.block2 = BlockOption.BlockwiseTuple(number, False, 6)
        return message

    answers = await asyncio.wait_for(
        asyncio.gather(*(answer(client, block(n)) for n in range(6))), 10
    )
    assert [a.opt.block2.block_number for a in answers] == list(range(6))
    assert [a.payload for a in answers] == [
        blocks.payload[n * 1024 : (n + 1) * 1024] for n in range(6)
    ]
    assert blocks.most_in_flight == 3


def test_the_installed_aiocoap_is_the_one_allow_in_flight_was_written_for() -> None:
    assert aiocoap.meta.version in IN_FLIGHT_VERSIONS


def test_a_window_must_be_a_small_positive_number() -> None:
    assert check_window(1) == 1 and check_window(64) == 64
    for bad in (0, -1, 65, True, 2.0):
        with pytest.raises(ValueError, match="blocks in flight"):
            check_window(bad)  # type: ignore[arg-type]
