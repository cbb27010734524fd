"""The network benchmarks' link emulator (bench.linkemu), run in the test's own event loop: it adds
the delay per datagram without serializing them, drops datagrams at the rate asked, and delays a
TCP stream by the handshake and request round trips without altering its bytes."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from as_harness import ROOT

# bench/ is not an installed package (as in test_as_flood).
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
from bench.linkemu import Link, open_relays

HOST = "127.0.0.1"


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []
        self.event = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((time.monotonic(), data))
        self.event.set()


@asynccontextmanager
async def _udp_link(link: Link) -> AsyncIterator[tuple[Any, _Client]]:
    """An echo server behind a relay for ``link``; a client socket sending to the relay."""
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(HOST, 0))
    target = echo.get_extra_info("sockname")[:2]
    [(listen, close)] = await open_relays(link, [((HOST, 0), target)], [])
    client = _Client()
    transport, _ = await loop.create_datagram_endpoint(lambda: client, remote_addr=listen)
    try:
        yield transport, client
    finally:
        transport.close()
        close()
        echo.close()


async def _wait_for(client: _Client, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(client.received) < count and time.monotonic() < deadline:
        client.event.clear()
        try:
            await asyncio.wait_for(client.event.wait(), deadline - time.monotonic())
        except TimeoutError:
            break


@pytest.mark.asyncio
async def test_udp_delay_is_per_datagram_not_serialized() -> None:
    rtt = 0.2
    async with _udp_link(Link(rtt, 0.0, 1, None)) as (transport, client):
        start = time.monotonic()
        for i in range(30):
            transport.sendto(i.to_bytes(2, "big"))
        await _wait_for(client, 30, 5.0)
    times = [t - start for t, _ in client.received]
    assert sorted(int.from_bytes(d, "big") for _, d in client.received) == list(range(30))
    assert min(times) >= rtt * 0.95  # each answer waited one round trip...
    assert max(times) < rtt + 0.5  # ...but together: serialized would be 30 RTT, 6 s


@pytest.mark.asyncio
async def test_udp_loss_drops_about_the_rate_asked() -> None:
    # Each echo crosses the link twice: it survives with probability 0.8 ** 2 = 0.64.
    async with _udp_link(Link(0.0, 0.2, 7, None)) as (transport, client):
        for i in range(400):
            transport.sendto(i.to_bytes(2, "big"))
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # no burst larger than the socket buffers
        await asyncio.sleep(0.3)
    assert 200 <= len(client.received) <= 310, len(client.received)


@pytest.mark.asyncio
async def test_tcp_copy_pays_handshake_and_request_and_keeps_bytes() -> None:
    rtt = 0.1
    data = os.urandom(300_000)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    target = server.sockets[0].getsockname()[:2]
    [(listen, close)] = await open_relays(Link(rtt, 0.0, 1, None), [], [((HOST, 0), target)])
    try:
        start = time.monotonic()
        reader, writer = await asyncio.open_connection(*listen)
        writer.write(b"12345678")
        got = await asyncio.wait_for(reader.read(-1), 10)
        elapsed = time.monotonic() - start
        writer.close()
    finally:
        close()
        server.close()
    assert got == data
    # Handshake and request: 2 RTT; slow start from 10 segments: 300 kB needs 5 more windows.
    assert 2 * rtt * 0.95 <= elapsed < 2 * rtt + 6 * rtt + 1.0, elapsed
