"""Observe notifications from the proxy: CPU per notification, fast path beside aiocoap's path.

One proxy per case, in this process: the proxy's own site (:class:`proxy.server.ProxySite` on
aiocoap's udp6 server context, the fast path :class:`proxy.fastpath.FastPath` installed on it,
``oscar_io.aiocoap_fixes`` applied, as ``oscar-proxy`` runs them) over a memory-only cache, no
bundle and no upstream: the objects are published to it (:meth:`proxy.core.Proxy.store`, as a PUT
or a fetched object ends), 235 random bytes each (the size of ``proxy_hits``' 64 B reading's
object; the proxy never looks inside). For a case of N observers, 2 N raw UDP sockets on
127.0.0.1, each its own port: each proves its address (a GET, the 4.01 Echo challenge, the GET
again with the Echo, RFC 9175) and registers (GET with ``Observe: 0``, NON or CON). The first N
register with the fast path on, for resource ``bench-pub/fast``, and are held by the fast path
(:mod:`proxy.fastobserve`); the other N with it off (``FastPath.enabled`` False, the switch
``OSCAR_PROXY_FASTPATH=off`` stands for), for ``bench-pub/slow``, and are held by aiocoap's
``ObservableResource``. Each answer must carry ``Observe: 0``.

A window stores K new objects of one resource, one at a time, with the fast path on for
``fast``'s windows and off for ``slow``'s (nothing of the fast path runs then but one test); for
each object, this process's CPU time (``time.process_time``) from just before the store until the
N notifications were handed to the socket (NON), or until the N clients' empty ACKs were received
and handled (CON: the notifications are confirmable, and the ACK's handling is part of each). The
windows alternate, fast and slow, for several rounds, after an untimed warm-up; each side's best
(lowest) window is kept. Figure: CPU per notification, fast path against aiocoap's path, lower is
better. It includes the store itself (one memory-cache put, the new-object hooks), shared by the N
notifications; printed beside it: the same store with no observer.

The clients are not this process: a child process (this module as ``__main__``, the sockets'
descriptors passed to it) reads every datagram at once, checks each notification (2.05, the
registration's token, an Observe number above the last, CON or NON as registered), acknowledges
the CON ones, and counts them; after each window every one of its N sockets must have received
exactly K. So this process's CPU is the proxy's work and the event loop's, nothing of the
clients'.

Not measured here: DTLS (the fast path is plain CoAP only), the SQLite disk cache's write of
each new object (same on both paths), the upstream observation that brings new objects in, and
the 2.03 a registration naming the new ETag gets. No issue sets a target for notifications.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import IO, Any, NamedTuple

from aiocoap import Context, Message

from oscar.objects import object_etag
from oscar_io import aiocoap_fixes
from oscar_io.coapfast import option
from proxy.cache import Cache
from proxy.config import Limits, ProxyConfig
from proxy.core import Proxy
from proxy.entry import Entry
from proxy.fastobserve import Observer
from proxy.fastpath import FastPath
from proxy.server import ProxySite

from . import Figure, Settings
from .testbed import free_port

__all__ = ["run"]

#: (observers N, CON registrations) per case.
CASES = ((50, False), (200, False), (50, True), (200, True))
OBJECT_SIZE = 235
FAST, SLOW, ALONE = "bench-pub/fast", "bench-pub/slow", "bench-pub/alone"
TOKEN = b"\x0b\x5e"
#: Seconds a window may take before the run fails (a notification or an ACK lost).
WINDOW_TIMEOUT = 30.0
#: Registrations set up at once.
SETUP_BATCH = 25
_OBSERVE, _URI_PATH, _ECHO = 6, 11, 252
_SEQ = count(1)


class Side(NamedTuple):
    name: str
    resource_id: str
    fast: bool


SIDES = (Side("fast", FAST, True), Side("aiocoap", SLOW, False))


class Window(NamedTuple):
    cpu_per_note: float  # seconds of CPU per notification
    wall_per_object: float  # median seconds from the store to the window's end for one object


# --- the proxy and its sends ----------------------------------------------------------------------


class Meter:
    """Counts events (sends, or ACKs handled) and resolves a future at the ``want``-th."""

    def __init__(self) -> None:
        self.count = 0
        self.want = 0
        self.done: asyncio.Future[None] | None = None

    def arm(self, want: int) -> asyncio.Future[None]:
        self.count, self.want = 0, want
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def fail(self, why: str) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(RuntimeError(f"{why}: {self.count} of {self.want}"))

    def tick(self) -> None:
        self.count += 1
        if self.done is not None and self.count >= self.want and not self.done.done():
            self.done.set_result(None)


class Served:
    """A proxy site on a server context with its fast path; its sends and ACKs counted."""

    def __init__(self, observers: int) -> None:
        self.port = free_port()
        config = ProxyConfig(
            bundle=Path("/nonexistent/bundle"),  # never opened: no AS, no upstream
            state=Path("/nonexistent/state"),
            listen=("127.0.0.1", self.port),
            dtls=False,
            limits=Limits(observers_per_client=2 * observers + 8),  # all on 127.0.0.1
        )
        self.proxy = Proxy(config)
        # What Proxy.open() sets up, less the bundle and the disk: a cache in memory only.
        self.proxy._cache = Cache(None, max_entries=16, max_bytes=1 << 20)
        self.site = ProxySite(self.proxy)
        self.sends, self.acks = Meter(), Meter()
        self.context: Any = None
        self.fast: FastPath | None = None

    async def start(self) -> FastPath:
        self.context = await Context.create_server_context(
            self.site, bind=("127.0.0.1", self.port), transports=["udp6"]
        )
        fast = self.fast = FastPath(self.site)
        if not fast.install(self.context):
            raise RuntimeError("the fast path could not be installed on this aiocoap")
        # aiocoap's sends (its notifications), the fast path's (FastObserve.send), and the
        # datagrams received (counted after the fast path's hook and aiocoap handled them).
        interface, observe = fast.hook.interface, fast.observe
        aiocoap_send, fast_send = interface.send, observe.send
        received = interface.datagram_msg_received
        sends, acks = self.sends, self.acks

        def counted_aiocoap_send(message: Any) -> None:
            aiocoap_send(message)
            sends.tick()

        def counted_fast_send(data: bytes, observer: Observer) -> bool:
            sent = fast_send(data, observer)
            sends.tick()
            return sent

        def counted_received(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
            received(data, ancdata, flags, address)
            if len(data) == 4 and data[0] & 0x30 == 0x20:  # an empty ACK
                acks.tick()

        interface.send = counted_aiocoap_send
        observe.send = counted_fast_send
        interface.datagram_msg_received = counted_received
        return fast

    def put(self, resource_id: str) -> Entry:
        now = time.time()
        seq = next(_SEQ)
        return Entry(
            resource_id=resource_id,
            obj=os.urandom(OBJECT_SIZE),
            epoch=1,
            seq=seq,
            exp=int(now) + 3600,
            etag=object_etag(resource_id, 1, seq),
            kid=b"bench",
            serial=1,
            upstream=None,
            upstream_etag=None,
            fresh_until=now + 60,
        )

    def idle(self) -> bool:
        """No CON notification of either path waits for its ACK."""
        assert self.fast is not None
        return (
            not self.fast.observe.pending and not self.fast.hook.message_manager._active_exchanges
        )

    async def close(self) -> None:
        if self.context is not None:
            await self.context.shutdown()
        await self.proxy.close()


# --- the observers' setup (untimed) ---------------------------------------------------------------


def _request(
    resource_id: str,
    mid: int,
    token: bytes,
    *,
    con: bool,
    observe: bool = False,
    echo: bytes | None = None,
) -> bytes:
    data = bytearray([(0x40 if con else 0x50) | len(token), 0x01]) + mid.to_bytes(2, "big") + token
    number = 0
    if observe:
        data += option(_OBSERVE, b"")
        number = _OBSERVE
    for segment in resource_id.split("/"):
        data += option(_URI_PATH - number, segment.encode())
        number = _URI_PATH
    if echo is not None:
        data += option(_ECHO - number, echo)
    return bytes(data)


async def _exchange(sock: socket.socket, data: bytes) -> Message:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)
    return Message.decode(await asyncio.wait_for(loop.sock_recv(sock, 4096), 5))


async def _observer(port: int, resource_id: str, con: bool) -> socket.socket:
    """A socket that proved its address and registered for ``resource_id``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", port))
    mid = int.from_bytes(os.urandom(2), "big")
    challenge = await _exchange(sock, _request(resource_id, mid, b"e1", con=True))
    if challenge.code.dotted != "4.01" or challenge.opt.echo is None:
        raise RuntimeError(f"{resource_id}: {challenge.code}, not an Echo challenge")
    again = _request(resource_id, (mid + 1) & 0xFFFF, b"e2", con=True, echo=challenge.opt.echo)
    if (await _exchange(sock, again)).code.dotted != "2.05":
        raise RuntimeError(f"{resource_id}: no 2.05 after the Echo exchange")
    registration = _request(resource_id, (mid + 2) & 0xFFFF, TOKEN, con=con, observe=True)
    answer = await _exchange(sock, registration)
    if answer.code.dotted != "2.05" or answer.opt.observe != 0:
        raise RuntimeError(f"{resource_id}: registration answered {answer.code} without Observe")
    return sock


async def _observers(port: int, resource_id: str, n: int, con: bool) -> list[socket.socket]:
    socks: list[socket.socket] = []
    while len(socks) < n:
        batch = min(SETUP_BATCH, n - len(socks))
        socks += await asyncio.gather(*(_observer(port, resource_id, con) for _ in range(batch)))
    return socks


# --- the clients' process -------------------------------------------------------------------------


class Clients:
    """The child process that reads the observers' sockets (see the module docstring)."""

    def __init__(self, socks: list[socket.socket]) -> None:
        fds = [s.fileno() for s in socks]
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, *map(str, fds)],
            pass_fds=fds,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._line() != "ready":
            raise RuntimeError("the clients' process did not start")

    def _line(self) -> str:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        return stdout.readline().strip()

    def take(self) -> dict[int, list[int]]:
        """Per descriptor, [CON, NON, bad] datagrams since the last call (all sockets read)."""
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write("count\n")
        stdin.flush()
        return {int(fd): counts for fd, counts in json.loads(self._line()).items()}

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _observe_number(data: bytes) -> int | None:
    """The Observe option's value in the datagram ``data``, None if it has none."""
    pos, number, end = 4 + (data[0] & 0x0F), 0, len(data)
    while pos < end and data[pos] != 0xFF:
        delta, length = data[pos] >> 4, data[pos] & 0x0F
        pos += 1
        if delta == 13:
            delta, pos = 13 + data[pos], pos + 1
        elif delta == 14:
            delta, pos = 269 + int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        if length == 13:
            length, pos = 13 + data[pos], pos + 1
        elif length == 14:
            length, pos = 269 + int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        number += delta
        if number == _OBSERVE:
            return int.from_bytes(data[pos : pos + length], "big")
        if number > _OBSERVE:
            return None
        pos += length
    return None


def _serve_clients(fds: list[int]) -> None:
    """The child: read every datagram, check, acknowledge CON notifications, count; on
    ``count`` from stdin, read what is left and print the counts; exit at EOF."""
    socks = {fd: socket.socket(fileno=fd) for fd in fds}
    counts: dict[int, list[int]] = {}
    last: dict[int, int] = dict.fromkeys(fds, 0)
    poller = select.epoll()
    for fd, sock in socks.items():
        sock.setblocking(False)
        poller.register(fd, select.EPOLLIN)
    poller.register(sys.stdin.fileno(), select.EPOLLIN)

    def drain(fd: int) -> None:
        sock = socks[fd]
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            kind = data[0] >> 4 & 0x03 if data else 3  # 0 CON, 1 NON
            tkl = data[0] & 0x0F if data else 0
            seen = counts.setdefault(fd, [0, 0, 0])
            number = _observe_number(data) if len(data) >= 4 + tkl else None
            if (
                kind > 1
                or data[1] != 0x45
                or data[4 : 4 + tkl] != TOKEN
                or number is None
                or (number <= last[fd])
            ):
                seen[2] += 1
                continue
            last[fd] = number
            seen[kind] += 1
            if kind == 0:
                sock.send(bytes((0x60, 0x00)) + data[2:4])

    print("ready", flush=True)
    while True:
        for fd, _ in poller.poll():
            if fd in socks:
                drain(fd)
                continue
            line = sys.stdin.readline()
            if not line:
                return
            for each in socks:
                drain(each)
            print(json.dumps(counts), flush=True)
            counts = {}


# --- the measurement ------------------------------------------------------------------------------


async def _window(served: Served, side: Side, observers: int, objects: int, con: bool) -> Window:
    fast = served.fast
    assert fast is not None
    fast.enabled = side.fast
    cpu, walls = 0.0, []
    meter = served.acks if con else served.sends
    what = "ACKs handled" if con else "notifications sent"
    # One timer per window, not per object: a lost notification or ACK fails the run.
    watchdog = asyncio.get_running_loop().call_later(
        WINDOW_TIMEOUT, meter.fail, f"{side.name}: {what} within {WINDOW_TIMEOUT} s"
    )
    try:
        for _ in range(objects):
            entry = served.put(side.resource_id)
            done = meter.arm(observers)
            wall, start = time.perf_counter(), time.process_time()
            if not await served.proxy.store(entry):
                raise RuntimeError(f"{side.resource_id}: the new object was not stored")
            await done
            cpu += time.process_time() - start
            walls.append(time.perf_counter() - wall)
    finally:
        watchdog.cancel()
        served.acks.done = served.sends.done = None
    if not served.idle():
        raise RuntimeError(f"{side.name}: CON notifications unacknowledged after the window")
    return Window(cpu / (objects * observers), statistics.median(walls))


async def _store_alone(served: Served, objects: int) -> float:
    """CPU seconds of one store of a resource nobody observes (best of 3 runs of ``objects``)."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(objects):
            await served.proxy.store(served.put(ALONE))
        best = min(best, (time.process_time() - start) / objects)
    return best


def _check(taken: dict[int, list[int]], socks: list[socket.socket], want: int, con: bool) -> None:
    kind = 0 if con else 1
    for sock in socks:
        got = taken.get(sock.fileno(), [0, 0, 0])
        if got[kind] != want or sum(got) != want:
            raise RuntimeError(f"an observer received {got} (CON, NON, bad), not {want} notes")


async def _case(observers: int, con: bool, objects: int, rounds: int) -> dict[str, Any]:
    served = Served(observers)
    socks: list[socket.socket] = []
    clients: Clients | None = None
    try:
        fast = await served.start()
        served.proxy.cache.put(served.put(FAST))
        served.proxy.cache.put(served.put(SLOW))
        by_side: dict[str, list[socket.socket]] = {}
        for side in SIDES:
            fast.enabled = side.fast
            by_side[side.name] = await _observers(served.port, side.resource_id, observers, con)
            socks += by_side[side.name]
        fast.enabled = True
        if len(fast.observe) != observers or served.proxy.relays.observers != 2 * observers:
            raise RuntimeError(f"{len(fast.observe)} fast observers, not {observers}")
        clients = Clients(socks)
        for side in SIDES:  # warm up
            await _window(served, side, observers, 2, con)
        clients.take()
        hits_before = served.proxy.stats.hits, served.proxy.stats.fast_hits
        best: dict[str, Window] = {}
        for i in range(rounds):
            for side in SIDES if i % 2 == 0 else reversed(SIDES):
                window = await _window(served, side, observers, objects, con)
                _check(clients.take(), by_side[side.name], objects, con)
                if side.name not in best or window.cpu_per_note < best[side.name].cpu_per_note:
                    best[side.name] = window
        hits = served.proxy.stats.hits - hits_before[0]
        fast_hits = served.proxy.stats.fast_hits - hits_before[1]
        alone = await _store_alone(served, objects)
        return {"best": best, "hits": hits, "fast_hits": fast_hits, "alone": alone}
    finally:
        if clients is not None:
            clients.close()
        await served.close()
        for sock in socks:
            sock.close()


def run(settings: Settings) -> Iterator[Figure]:
    logging.getLogger("coap").setLevel(logging.ERROR)
    aiocoap_fixes.apply()  # as oscar-proxy does (part of aiocoap's path's cost)
    objects = 10 if settings.quick else 40
    rounds = 2 if settings.quick else 6
    for observers, con in CASES:
        mode = "con" if con else "non"
        result = asyncio.run(_case(observers, con, objects, rounds))
        best: dict[str, Window] = result["best"]
        print(
            f"  {observers} observers, {mode.upper()} registrations, {objects} objects of "
            f"{OBJECT_SIZE} B per window, {rounds} rounds. CPU per notification: "
            + ", ".join(f"{n} {w.cpu_per_note * 1e6:.1f} us" for n, w in best.items())
            + "; per object, store to last "
            + ("ACK handled" if con else "notification sent")
            + ": "
            + ", ".join(f"{n} {w.wall_per_object * 1e3:.2f} ms" for n, w in best.items())
            + f". The store alone (no observer): {result['alone'] * 1e6:.0f} us. Over the "
            f"windows: {result['hits']:,} hits, {result['fast_hits']:,} of them fast",
            flush=True,
        )
        yield Figure(
            f"proxy-notify/{observers}-observers/{mode}",
            best["fast"].cpu_per_note * 1e6,
            "us CPU per notification",
            "the same proxy's notifications through aiocoap (fast path off)",
            best["aiocoap"].cpu_per_note * 1e6,
            lower_is_better=True,
        )


if __name__ == "__main__":
    _serve_clients([int(fd) for fd in sys.argv[1:]])
