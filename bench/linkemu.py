"""A link emulator for the network benchmarks: a userspace relay on loopback adding delay and loss.

::

    python -m bench.linkemu --rtt-ms 50 --loss 0.01 --seed 1 \\
        --udp 127.0.0.1:LPORT=127.0.0.1:TPORT [...] --tcp 127.0.0.1:LPORT=127.0.0.1:TPORT [...]

This kernel has no ``tc netem``, so the link is a relay process between the two ends, each
``--udp``/``--tcp`` mapping a listening address to a target. It prints ``linkemu ready`` when
serving, and on SIGTERM or SIGINT one line of counters (``linkemu stats ...``) before exiting.

- **UDP**, datagram by datagram: each datagram from a client to ``LPORT`` is sent on to the target
  from a socket of that client's own (one per client address, so the target sees one peer per
  client), and each answer back from ``LPORT`` to the client. Every datagram, in each direction,
  is dropped with probability ``--loss`` (a :class:`random.Random` seeded with ``--seed``: the
  same run drops the same datagrams), else sent after the one-way delay ``RTT / 2``. Each
  datagram has its own timer (the event loop's timer heap): datagrams in flight overlap, the
  delay never serializes them. ``--rate-mbit`` adds a bottleneck per direction: a datagram is
  sent once the ones before it have been "transmitted" at that rate, then delayed.
- **TCP**, a byte-stream proxy: the relay accepts, connects to the target, and holds the client's
  bytes for one RTT (the handshake a real link would cost), then relays each chunk read in either
  direction after the one-way delay, in order. The relay's own connections are on loopback, so
  their congestion control never sees the emulated RTT; the relay models it instead, per
  direction: at most ``cwnd`` bytes in flight (sent and not yet "acknowledged", which happens one
  RTT after sending), ``cwnd`` starting at 10 segments of 1,448 bytes and growing by the bytes
  acknowledged (slow start, doubling per RTT) up to ``--tcp-window`` (4 MiB). Loss on TCP is the
  sender kernel's business and is not emulated packet by packet: each 1,448-byte segment of a
  chunk is lost with probability ``--loss``, and a chunk with a loss arrives one RTT later (a fast
  retransmit) and halves ``cwnd``, which then grows by one segment per RTT (Reno's congestion
  avoidance). An approximation: no timeouts, no SACK, one retransmission round and one halving
  per chunk (up to 64 KiB) whatever its number of losses.

The relay's own CPU is small (one ``sendto`` and one timer per datagram) and the benchmark
measures it from ``/proc/PID/stat``. What it does not do: reorder or duplicate datagrams, jitter,
or emulate anything but loopback addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

__all__ = ["Link", "main", "open_relays"]

MSS = 1448
INITIAL_CWND = 10 * MSS


class Link:
    """One emulated link's parameters and counters, shared by every relay of the process."""

    def __init__(
        self, rtt: float, loss: float, seed: int, rate: float | None, window: int = 4 << 20
    ) -> None:
        self.window = window
        self.delay = rtt / 2
        self.rtt = rtt
        self.loss = loss
        self.rate = rate  # bytes per second, or None
        self.rng = random.Random(seed)
        self.sent = 0
        self.dropped = 0
        self.tcp_bytes = 0
        self.tcp_losses = 0

    def lost(self) -> bool:
        return self.loss > 0 and self.rng.random() < self.loss


class _Direction:
    """Per-direction bottleneck: when the next datagram may start, at ``Link.rate``."""

    def __init__(self) -> None:
        self.busy_until = 0.0


class _UdpFront(asyncio.DatagramProtocol):
    """The listening socket: one :class:`_UdpSession` per client address."""

    def __init__(self, link: Link, target: tuple[str, int]) -> None:
        self.link = link
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[Any, _UdpSession] = {}
        self.up = _Direction()
        self.down = _Direction()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def close(self) -> None:
        """Close the listening socket and every client's socket towards the target."""
        if self.transport is not None:
            self.transport.close()
        for session in self.sessions.values():
            if session.transport is not None:
                session.transport.close()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        session = self.sessions.get(addr)
        if session is None:
            session = self.sessions[addr] = _UdpSession(self, addr)
            session.task = asyncio.get_running_loop().create_task(session.open())
        session.forward_up(data)

    def schedule(self, direction: _Direction, send: Any, data: bytes, *args: Any) -> None:
        """Drop ``data`` or call ``send(data, *args)`` after the delay (and the bottleneck)."""
        link = self.link
        if link.lost():
            link.dropped += 1
            return
        link.sent += 1
        delay = link.delay
        if link.rate is not None:
            now = time.monotonic()
            start = max(now, direction.busy_until)
            direction.busy_until = start + len(data) / link.rate
            delay += direction.busy_until - now
        if delay <= 0:
            send(data, *args)
        else:
            asyncio.get_running_loop().call_later(delay, send, data, *args)


class _UdpSession(asyncio.DatagramProtocol):
    """One client's socket towards the target."""

    def __init__(self, front: _UdpFront, client: Any) -> None:
        self.front = front
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] = []  # sent up before the socket was open
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, remote_addr=self.front.target)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        for data in self.pending:
            self.transport.sendto(data)
        self.pending.clear()

    def _send_up(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.sendto(data)

    def _send_down(self, data: bytes) -> None:
        if self.front.transport is not None:
            self.front.transport.sendto(data, self.client)

    def forward_up(self, data: bytes) -> None:
        self.front.schedule(self.front.up, self._send_up, data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.front.schedule(self.front.down, self._send_down, data)


async def _pump(link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Relay one direction of a TCP connection through the emulated link (module docstring)."""
    loop = asyncio.get_running_loop()
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = asyncio.Event()
    acked = asyncio.Event()
    state = {"inflight": 0, "cwnd": INITIAL_CWND, "ssthresh": link.window, "free_at": 0.0}

    def ack(n: int) -> None:
        state["inflight"] -= n
        if state["cwnd"] < state["ssthresh"]:  # slow start: doubles per RTT
            state["cwnd"] = min(state["cwnd"] + n, link.window)
        else:  # congestion avoidance: one segment more per RTT
            state["cwnd"] = min(state["cwnd"] + MSS * n // state["cwnd"], link.window)
        acked.set()

    async def read() -> None:
        while True:
            while state["inflight"] >= state["cwnd"]:
                acked.clear()
                await acked.wait()
            room = max(int(state["cwnd"] - state["inflight"]), 1)  # read(0) would mean EOF
            data = await reader.read(min(room, 65536))
            now = loop.time()
            if not data:
                queue.append((max(now, state["free_at"]) + link.delay, b""))
                ready.set()
                return
            link.tcp_bytes += len(data)
            due = now + link.delay
            segments = -(-len(data) // MSS)
            if link.loss > 0 and any(link.rng.random() < link.loss for _ in range(segments)):
                link.tcp_losses += 1
                due += link.rtt
                state["ssthresh"] = state["cwnd"] = max(state["cwnd"] // 2, 2 * MSS)
            due = max(due, state["free_at"])  # a stream stays in order
            state["free_at"] = due
            state["inflight"] += len(data)
            loop.call_at(due + link.delay, ack, len(data))  # its ACK, one RTT after sending
            queue.append((due, data))
            ready.set()

    async def write() -> None:
        while True:
            while not queue:
                ready.clear()
                await ready.wait()
            due, data = queue.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(read(), write())


async def _tcp_client(
    link: Link, target: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(*target)
    except OSError:
        writer.close()
        return
    for stream in (writer, up_writer):  # the relay's writes are the link's: no Nagle delay
        sock = stream.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if link.rtt > 0:
        await asyncio.sleep(link.rtt)  # the handshake's round trip
    try:
        await asyncio.gather(_pump(link, reader, up_writer), _pump(link, up_reader, writer))
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass  # a reset, or the relay stopping: asyncio's streams would log the cancellation
    finally:
        writer.close()
        up_writer.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise argparse.ArgumentTypeError(f"{text}: loopback addresses only")
    return host, int(port)


def _mapping(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, sep, target = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text}: expected LISTEN=TARGET")
    return _address(listen), _address(target)


Address = tuple[str, int]


async def open_relays(
    link: Link, udp: Sequence[tuple[Address, Address]], tcp: Sequence[tuple[Address, Address]]
) -> list[tuple[Address, Callable[[], None]]]:
    """Start a relay per (listen, target) pair in the running loop (port 0: any free port); per
    relay, UDP ones first, its listening address and the function closing it."""
    loop = asyncio.get_running_loop()
    relays: list[tuple[Address, Callable[[], None]]] = []
    for listen, target in udp:
        transport, front = await loop.create_datagram_endpoint(
            functools.partial(_UdpFront, link, target), local_addr=listen
        )
        relays.append((transport.get_extra_info("sockname")[:2], front.close))
    for listen, target in tcp:
        server = await asyncio.start_server(
            functools.partial(_tcp_client, link, target), *listen, reuse_address=True
        )
        relays.append((server.sockets[0].getsockname()[:2], server.close))
    return relays


async def _serve(args: argparse.Namespace) -> None:
    rate = None if args.rate_mbit is None else args.rate_mbit * 1e6 / 8
    link = Link(args.rtt_ms / 1000, args.loss, args.seed, rate, args.tcp_window)
    loop = asyncio.get_running_loop()
    closers = [close for _, close in await open_relays(link, args.udp, args.tcp)]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("linkemu ready", flush=True)
    await stop.wait()
    for close in closers:
        close()
    print(
        f"linkemu stats datagrams_sent={link.sent} datagrams_dropped={link.dropped} "
        f"tcp_bytes={link.tcp_bytes} tcp_chunks_lost={link.tcp_losses}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.linkemu", description=__doc__)
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time added")
    parser.add_argument("--loss", type=float, default=0.0, help="loss probability, 0 to 1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate-mbit", type=float, help="bottleneck per direction (UDP)")
    parser.add_argument("--tcp-window", type=int, default=4 << 20, help="largest TCP cwnd, bytes")
    parser.add_argument("--udp", type=_mapping, action="append", default=[], metavar="L=T")
    parser.add_argument("--tcp", type=_mapping, action="append", default=[], metavar="L=T")
    args = parser.parse_args(argv)
    if not 0 <= args.loss < 1:
        parser.error("--loss: from 0 to 1")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
