"""The transfers of the network benchmark (:mod:`bench.network`), one function per kind, and the
rules that keep a run bounded (caps, estimates).

Every transfer goes through the link emulator's relay (:mod:`bench.linkemu`): ``Relay`` holds the
relay's listening port for each server endpoint. What a transfer gives back is a :class:`Result`:
its seconds and a ``kind``:

- ``measured``: done, the bytes checked;
- ``over``: not done within the cap; ``seconds`` is the cap, a lower bound ("> cap");
- ``estimate``: not run, because :func:`plan` expects it over the cap (from the next smaller size
  of at least 100 KiB, time times size ratio: block-wise time grows with the number of blocks);
- ``limit``: refused by a size limit (the producer's largest value, the proxy's or the
  consumer's largest object): ``seconds`` is 0, no time;
- ``fail``: the transfer failed (a publishing PUT that timed out and is being retried).

Kinds of transfer: the consumer library's ``get`` (:func:`consumer_get`: producer or proxy,
windowed Block2, verify and decrypt included), aiocoap's block-wise GET (:func:`aiocoap_get`),
libcoap's ``coap-client`` (:func:`libcoap_argv`, :func:`libcoap_get`), a TCP copy
(:func:`tcp_copy`). Publishing is in :mod:`bench.network` (it needs the publisher process).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "COAP_CLIENT",
    "EXTRAPOLATE_FROM",
    "Result",
    "aiocoap_get",
    "label",
    "libcoap_argv",
    "libcoap_get",
    "plan",
    "show",
    "tcp_copy",
    "tcp_server",
    "timed",
]

COAP_CLIENT = "/usr/bin/coap-client-openssl"
#: libcoap 4.3.1's block flags: COAP_BLOCK_USE_LIBCOAP (1) + COAP_BLOCK_TRY_Q_BLOCK (4): Q-Block
#: (RFC 9177) where the server takes it, else plain Block2. This version has no ``-Q`` option, and
#: with 4.3.1's coap-server its Q-Block2 GET still moves one block per round trip (measured).
LIBCOAP_BLOCK_FLAGS = "5"
#: The smallest size whose time is extrapolated (64 B is all latency, no blocks).
EXTRAPOLATE_FROM = 100 << 10


def label(size: int) -> str:
    if size >= 1 << 20:
        return f"{size >> 20}MiB"
    return f"{size >> 10}KiB" if size >= 1 << 10 else f"{size}B"


class Result(NamedTuple):
    seconds: float
    kind: str  # "measured", "over", "estimate", "limit", "fail"


def show(result: Result | None) -> str:
    """The table cell of a result."""
    if result is None:
        return "n/a"
    if result.kind == "over":
        return f"> {result.seconds:g}"
    if result.kind == "estimate":
        return f"~{result.seconds:.0f} est"
    if result.kind in ("limit", "fail"):
        return result.kind
    return f"{result.seconds:.3f}"


def plan(
    size: int, previous: tuple[int, Result] | None, cap: float, *, estimate: bool = True
) -> Result | None:
    """What to report instead of running a transfer of ``size``, or None to run it.

    ``previous`` is the same case's result at the next smaller size on the same link. Over the
    cap there means over here too; a size limit there means one here; an estimate (its time
    times the size ratio, from at least :data:`EXTRAPOLATE_FROM`) over the cap is reported, not
    run (unless ``estimate`` is false: then it runs up to the cap)."""
    if previous is None:
        return None
    prev_size, prev = previous
    if prev.kind in ("over", "limit", "fail"):
        return Result(cap if prev.kind == "over" else 0.0, prev.kind)
    if estimate and prev_size >= EXTRAPOLATE_FROM:
        guess = prev.seconds * size / prev_size
        if guess > cap:
            return Result(guess, "estimate")
    return None


async def timed(transfer: Awaitable[bytes], want: bytes, cap: float, what: str) -> Result:
    """Run one transfer for at most ``cap`` seconds; its seconds once its bytes are checked."""
    start = time.perf_counter()
    try:
        got = await asyncio.wait_for(transfer, cap)
    except TimeoutError:
        return Result(cap, "over")
    seconds = time.perf_counter() - start
    if got != want:
        raise RuntimeError(f"{what}: {len(got)} bytes, not the {len(want)} expected")
    return Result(seconds, "measured")


# --- CoAP ---------------------------------------------------------------------------------------


async def aiocoap_get(ctx: Any, uri: str) -> bytes:
    """The payload of a GET, aiocoap assembling Block2 (answering the proxy's Echo challenge);
    RuntimeError unless 2.05."""
    from aiocoap import GET, Message

    response = await ctx.request(Message(code=GET, uri=uri)).response
    if response.code.dotted == "4.01" and response.opt.echo is not None:
        message = Message(code=GET, uri=uri)
        message.opt.echo = response.opt.echo
        response = await ctx.request(message).response
    if response.code.dotted != "2.05":
        raise RuntimeError(f"GET {uri}: {response.code}")
    payload: bytes = response.payload
    return payload


async def first_block(ctx: Any, uri: str) -> tuple[bytes | None, str]:
    """The ETag of the first block of ``uri`` (no block-wise transfer) and its code."""
    from aiocoap import GET, Message

    response = await ctx.request(Message(code=GET, uri=uri), handle_blockwise=False).response
    if response.code.dotted == "4.01" and response.opt.echo is not None:
        message = Message(code=GET, uri=uri)
        message.opt.echo = response.opt.echo
        response = await ctx.request(message, handle_blockwise=False).response
    return response.opt.etag, response.code.dotted


def consumer_get(consumer: Any, uri: str) -> Callable[[], Awaitable[bytes]]:
    """A transfer by the consumer library: fetch, verify, decrypt; the plaintext."""

    async def get() -> bytes:
        reading = await consumer.get(uri)
        plaintext: bytes = reading.plaintext
        return plaintext

    return get


# --- libcoap ------------------------------------------------------------------------------------


def libcoap_argv(uri: str, out: Path, cap: float) -> list[str]:
    """``coap-client`` fetching ``uri`` into ``out`` with 1 KiB blocks, Q-Block tried, giving up
    after the cap (``-B``: whole seconds, rounded up)."""
    return [
        COAP_CLIENT, "-m", "get", "-b", "1024", "-L", LIBCOAP_BLOCK_FLAGS,
        "-B", str(int(cap) + 1), "-o", str(out), uri,
    ]  # fmt: skip


async def libcoap_get(uri: str, out: Path, cap: float, size: int) -> bytes:
    """The bytes ``coap-client`` wrote; ``TimeoutError`` when it gave up (``-B``) with fewer than
    ``size`` bytes, RuntimeError if it failed otherwise (cancelled: the process is killed)."""
    out.unlink(missing_ok=True)
    start = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *libcoap_argv(uri, out, cap),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await process.communicate()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    got = out.read_bytes() if out.exists() else b""
    if len(got) == size:
        return got
    if time.monotonic() - start >= cap:
        raise TimeoutError  # -B gave up: a partial file
    raise RuntimeError(
        f"coap-client: exit {process.returncode}, {len(got)} of {size} bytes: {stderr[-300:]!r}"
    )


# --- TCP ----------------------------------------------------------------------------------------


async def tcp_copy(port: int, size: int) -> bytes:
    """Connect, ask for ``size`` bytes (8 bytes, big-endian), read them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(size.to_bytes(8, "big"))
        await writer.drain()
        return await reader.readexactly(size)
    finally:
        writer.close()


async def tcp_server(data: dict[int, bytes]) -> asyncio.Server:
    """The TCP copy's server: each connection asks for a size and gets ``data[size]``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(8), "big")
            writer.write(data[size])
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)
