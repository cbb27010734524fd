"""Cache hits through the OSCAR proxy beside a plain CoAP server, and requests spared upstream.

A real AS, producer (``python -m producer``) and proxy (``python -m proxy --no-dtls``, enrolled
with role ``proxy``, ``--reverse bench-producer=coap://...``) on 127.0.0.1. The proxy's upstream
is a small counting UDP relay in this process (a thread) in front of the producer: it forwards
datagrams both ways, one upstream socket per client, and counts the GET requests that pass
(a retransmission, same source and message ID, once).

(a) Cache hits: GET/s of a protected object (64 B and 1 KiB readings sealed under the default
profile) from the proxy's cache, beside a plain aiocoap server process (:mod:`bench.plain_server`,
``--file``) serving exactly the object's bytes (content format 18, ETag, Max-Age). The load is
``producer_get``'s: 8 client contexts with 4 confirmable GETs in flight each; windows of 1 s (2.5 s
in a full run) alternate between the servers for 2 rounds (4), best window kept. The proxy must
not amplify towards an unverified address (RFC 9175): each client context first answers its 4.01
Echo challenge once, untimed; a challenge during the load is answered the same way and counted.
Printed above the rows: each server's CPU time per GET, and the proxy's hits and misses over the
windows (from ``/.well-known/oscar-stats``). Target: a ratio of at least 0.9.

The proxy answers a verified client's hit of the 64 B reading's object from its fast path
(:mod:`proxy.fastpath`); with aiocoap client contexts as the load, the client is the bound there,
which is why (c) exists.

(c) Fast-path hits: the 64 B reading's object from the proxy under :func:`bench.udpload.run_load`
(raw UDP sockets, 16 with 4 confirmable GETs in flight each, every answer checked; each socket
answers its Echo challenge once first, untimed), beside the plain aiocoap server sending the same
bytes under the same load, and beside a second proxy started with ``OSCAR_PROXY_FASTPATH=off``
(the same hits through aiocoap's message layer). Windows as in (a). Target (issue 16): at least
10 times the plain server's GET/s, per core (each server is one process, one thread). The code
of (c) is :mod:`bench.proxy_fast`.

(b) Requests reaching the producer when N = 1, 10, 100 consumers each read once: N
``consumer.Consumer`` instances (the library, ``state_dir=None``: each fetches the certificate,
CRL and access secret from the AS, verifies and decrypts), at most 16 at a time, either through
the proxy (reverse mapping) or straight to the producer, both through the relay. Each N reads its
own resource, so the proxy's cache starts cold. Expected: 1 through the proxy (one per Max-Age, 60
s; the readings take far less), N without. The rows give readings per producer request (bigger is
better), so ``ours / baseline`` is (GETs direct) / (GETs through the proxy), target N.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

from aiocoap import GET, Context, Message

from consumer import Consumer, TransportError
from demo.system import free_port_pair
from oscar_io.bundle import Bundle
from proxy.fastpath import FASTPATH_ENV

from . import Figure, Settings
from .proxy_fast import FAST_SIZE, FastTarget, proxy_stats, run_fast
from .testbed import Testbed, cpu_seconds, free_port

__all__ = ["run"]

PRODUCER = "bench-producer"
PROXY = "bench-proxy"
CONSUMER = "bench-consumer"
SIZES = (64, 1024)
CONTEXTS = 8
IN_FLIGHT = 4
#: Proxy GET/s (cache hits) ÷ plain GET/s the proxy should reach.
TARGET_RATIO = 0.9
CONSUMER_COUNTS = (1, 10, 100)
#: Consumers of (b) reading at the same time.
CONCURRENT_CONSUMERS = 4
#: A consumer whose reading fails with a TransportError starts over as a new Consumer, at most
#: this many times in all: now and then (a few in a few hundred) a consumer's request to the AS
#: goes unanswered (aiocoap's DTLS, see the README). A retry's GET is counted like any other.
ATTEMPTS = 3
MAX_AGE = 60
#: aiocoap's largest block: a longer payload goes out block-wise.
BLOCK_SIZE = 1024


def _label(size: int) -> str:
    return f"{size // 1024}KiB" if size >= 1024 and size % 1024 == 0 else f"{size}B"


def _reading(size: int) -> bytes:
    """A text reading of exactly ``size`` bytes."""
    line = b"temperature=21.5C humidity=40.2% pressure=1013.2hPa\n"
    return (line * (size // len(line) + 1))[:size]


class CountingRelay:
    """A UDP relay on 127.0.0.1 in front of ``upstream``, run by a thread; counts GET requests.

    Each client address gets its own upstream socket, so the server sees as many source ports as
    there are clients. A GET is counted once per (client address, message ID): retransmissions
    are counted apart.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.gets = 0
        self.retransmissions = 0
        self._seen: set[tuple[Any, bytes]] = set()
        self._to_upstream: dict[Any, socket.socket] = {}
        self._to_client: dict[socket.socket, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="relay", daemon=True)
        self._thread.start()

    def take_counts(self) -> tuple[int, int]:
        """GETs and retransmitted GETs since the last call."""
        with self._lock:
            counts = self.gets, self.retransmissions
            self.gets = self.retransmissions = 0
            self._seen.clear()
        return counts

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._selector.close()
        for sock in [self.sock, *self._to_client]:
            sock.close()

    def _count(self, data: bytes, client: Any) -> None:
        # CoAP version 1 and code 0.01 (GET): first byte's top bits, second byte.
        if len(data) < 4 or data[0] >> 6 != 1 or data[1] != 1:
            return
        key = (client, data[2:4])
        with self._lock:
            if key in self._seen:
                self.retransmissions += 1
            else:
                self._seen.add(key)
                self.gets += 1

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if sock is self.sock:
                        data, client = sock.recvfrom(65535)
                        up = self._to_upstream.get(client)
                        if up is None:
                            up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                            up.connect(self.upstream)
                            self._to_upstream[client] = up
                            self._to_client[up] = client
                            self._selector.register(up, selectors.EVENT_READ)
                        self._count(data, client)
                        up.send(data)
                    else:
                        data = sock.recv(65535)
                        self._from_upstream(data)
                        self.sock.sendto(data, self._to_client[sock])
                except OSError:  # the producer's port unreachable for a moment: drop it
                    continue

    def _from_upstream(self, data: bytes) -> None:
        """Called with each datagram from the upstream before it is relayed (nothing here)."""


# --- (a) cache hits ---------------------------------------------------------------------------


class Target(NamedTuple):
    name: str
    uri: str
    pid: int


class Result(NamedTuple):
    rate: float
    cpu_per_get: float
    challenges: int


async def _get(ctx: Context, uri: str) -> tuple[Message, int]:
    """A GET that answers an Echo challenge (4.01 + Echo) once; (response, challenges met)."""
    response = await asyncio.wait_for(ctx.request(Message(code=GET, uri=uri)).response, 30)
    challenges = 0
    if response.code.dotted == "4.01" and response.opt.echo is not None:
        challenges = 1
        message = Message(code=GET, uri=uri)
        message.opt.echo = response.opt.echo
        response = await asyncio.wait_for(ctx.request(message).response, 30)
    if response.code.dotted != "2.05":
        raise RuntimeError(f"GET {uri}: {response.code}")
    return response, challenges


async def _first_object(uri: str, timeout: float = 30.0) -> bytes:
    """The producer's object once it has one (it answers 5.03 until the AS sent the keys)."""
    ctx = await Context.create_client_context(transports=["udp6"])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = await asyncio.wait_for(ctx.request(Message(code=GET, uri=uri)).response, 10)
            if response.code.dotted == "2.05":
                payload: bytes = response.payload
                return payload
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{uri}: no object within {timeout:g} s")
    finally:
        await ctx.shutdown()


async def _load(clients: list[Context], target: Target, seconds: float) -> Result:
    """GET/s over all clients, and the server's CPU seconds per GET, in one window."""
    challenges = 0

    async def loop(ctx: Context) -> int:
        nonlocal challenges
        done = 0
        while time.perf_counter() < deadline:
            challenges += (await _get(ctx, target.uri))[1]
            done += 1
        return done

    cpu_before = cpu_seconds(target.pid)
    start = time.perf_counter()
    deadline = start + seconds
    counts = await asyncio.gather(*(loop(ctx) for ctx in clients for _ in range(IN_FLIGHT)))
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(target.pid) - cpu_before
    total = sum(counts)
    return Result(total / elapsed, cpu / total, challenges)


async def _hits(
    targets: list[Target], obj: bytes, proxy_port: int, settings: Settings
) -> tuple[dict[str, Result], dict[str, int], int]:
    """Alternating windows over ``targets``: each one's best window, the proxy's counter
    changes over all windows, and the Echo challenges of the handshakes."""
    window = 1.0 if settings.quick else 2.5
    rounds = 2 if settings.quick else 4
    clients = [await Context.create_client_context(transports=["udp6"]) for _ in range(CONTEXTS)]
    try:
        handshakes = 0
        for target in targets:  # the Echo handshake per client context, check the answers
            for ctx in clients:
                response, challenged = await _get(ctx, target.uri)
                handshakes += challenged
                if response.payload != obj:
                    raise RuntimeError(f"{target.uri}: not the object's bytes")
        for target in targets:  # warm up
            await _load(clients, target, 0.3)
        before = await proxy_stats(clients[0], proxy_port)
        best: dict[str, Result] = {}
        for i in range(rounds):
            for target in targets if i % 2 == 0 else reversed(targets):
                result = await _load(clients, target, window)
                if target.name not in best or result.rate > best[target.name].rate:
                    best[target.name] = result
        after = await proxy_stats(clients[0], proxy_port)
        change = {k: after[k] - before[k] for k in ("hits", "misses", "upstream_requests")}
        return best, change, handshakes
    finally:
        for ctx in clients:
            await ctx.shutdown()


# --- (b) requests reaching the producer -------------------------------------------------------


class Spared(NamedTuple):
    gets: int
    retransmissions: int
    upstream_requests: int | None
    seconds: float
    dtls_errors: int
    retries: list[str]


async def _readings(
    bundle: Bundle, uri: str, n: int, expected: bytes, relay: CountingRelay, proxy_port: int | None
) -> Spared:
    """``n`` consumers read ``uri`` once each; the GETs the relay saw meanwhile."""
    limit = asyncio.Semaphore(CONCURRENT_CONSUMERS)
    dtls_errors = 0

    def exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Count aiocoap 0.4.17's DTLS client error (a second "connected" event in a handshake
        sets a finished future: InvalidStateError, raised through DTLSSocket's callback) rather
        than print its traceback; the request then waits for a CoAP retransmission."""
        nonlocal dtls_errors
        exc = context.get("exception")
        if isinstance(exc, SystemError) and isinstance(exc.__cause__, asyncio.InvalidStateError):
            dtls_errors += 1
        else:
            loop.default_exception_handler(context)

    asyncio.get_running_loop().set_exception_handler(exception_handler)

    retries: list[str] = []

    async def one() -> None:
        async with limit:
            for attempt in range(ATTEMPTS):
                try:
                    async with Consumer(bundle, None) as consumer:
                        reading = await consumer.get(uri)
                    break
                except TransportError as exc:  # see CONSUMER_RETRIES
                    if attempt == ATTEMPTS - 1:
                        raise
                    retries.append(str(exc))
            if reading.plaintext != expected:
                raise RuntimeError(f"{uri}: wrong plaintext")

    stats_ctx = await Context.create_client_context(transports=["udp6"])
    try:
        before = await proxy_stats(stats_ctx, proxy_port) if proxy_port is not None else None
        relay.take_counts()
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        seconds = time.perf_counter() - start
        gets, retransmissions = relay.take_counts()
        upstream = None
        if before is not None and proxy_port is not None:
            after = await proxy_stats(stats_ctx, proxy_port)
            upstream = after["upstream_requests"] - before["upstream_requests"]
        return Spared(gets, retransmissions, upstream, seconds, dtls_errors, retries)
    finally:
        await stats_ctx.shutdown()


# --- the run ------------------------------------------------------------------------------------


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS, a producer behind a relay, a proxy and a plain server; yield the figures."""
    logging.getLogger("coap").setLevel(logging.ERROR)
    relay: CountingRelay | None = None
    with Testbed("oscar-bench-proxy-") as bed, warnings.catch_warnings():
        # aiocoap's DTLS client, closing a consumer's session with the AS: noise here.
        warnings.filterwarnings("ignore", "DTLS module did not shut down", UserWarning)
        try:
            bundles = bed.start_as(
                {PRODUCER: "producer", PROXY: "proxy", CONSUMER: "consumer"},
                grants=[(CONSUMER, f"{PRODUCER}/*")],
            )
            port = free_port()
            argv = ["-m", "producer", "--bundle", str(bundles[PRODUCER]),
                    "--state", str(bed.dir / "producer-state"), "--listen", f"127.0.0.1:{port}",
                    "--content-format", "0", "--max-age", str(MAX_AGE),
                    "--log-level", "info"]  # fmt: skip
            for size in SIZES:
                file = bed.write(f"r{_label(size)}.txt", _reading(size))
                argv += ["--resource", f"r{_label(size)}={file}"]
            reading = _reading(64)
            for n in CONSUMER_COUNTS:
                argv += ["--resource", f"n{n}={bed.write(f'n{n}.txt', reading)}"]
            bed.spawn("producer", argv, ready=f"producer {PRODUCER} ready".encode())
            relay = CountingRelay(("127.0.0.1", port))

            proxy_port = free_port_pair()
            proxy = bed.spawn(
                "proxy",
                ["-m", "proxy", "--bundle", str(bundles[PROXY]),
                 "--state", str(bed.dir / "proxy-state"), "--listen", f"127.0.0.1:{proxy_port}",
                 "--reverse", f"{PRODUCER}=coap://127.0.0.1:{relay.port}", "--no-dtls"],
                ready=b"serving coap://",
            )  # fmt: skip
            base = f"coap://127.0.0.1:{port}/{PRODUCER}"
            objects = {s: asyncio.run(_first_object(f"{base}/r{_label(s)}")) for s in SIZES}
            plain_port = free_port()
            argv = ["-m", "bench.plain_server", "--listen", f"127.0.0.1:{plain_port}",
                    "--content-format", "18"]  # fmt: skip
            for size in SIZES:
                argv += ["--file", f"o{size}={bed.write(f'o{size}.cose', objects[size])}"]
            plain = bed.spawn("plain", argv, ready=b"plain server ready")

            yield from _run_hits(settings, objects, proxy.pid, proxy_port, plain.pid, plain_port)
            slow_port = free_port_pair()
            os.environ[FASTPATH_ENV] = "off"
            try:
                slow = bed.spawn(
                    "proxy-slow",
                    ["-m", "proxy", "--bundle", str(bundles[PROXY]),
                     "--state", str(bed.dir / "proxy-slow-state"),
                     "--listen", f"127.0.0.1:{slow_port}",
                     "--reverse", f"{PRODUCER}=coap://127.0.0.1:{relay.port}", "--no-dtls"],
                    ready=b"serving coap://",
                )  # fmt: skip
            finally:
                del os.environ[FASTPATH_ENV]
            path = f"{PRODUCER}/r{_label(FAST_SIZE)}"
            fast_targets = [
                FastTarget("fast", f"coap://127.0.0.1:{proxy_port}/{path}", proxy.pid),
                FastTarget("aiocoap-path", f"coap://127.0.0.1:{slow_port}/{path}", slow.pid),
                FastTarget("plain", f"coap://127.0.0.1:{plain_port}/o{FAST_SIZE}", plain.pid),
            ]
            yield from run_fast(settings, fast_targets, objects[FAST_SIZE], proxy_port)
            bundle = Bundle.load(bundles[CONSUMER])
            yield from _run_spared(bundle, reading, relay, proxy_port)
        finally:
            if relay is not None:
                relay.close()


def _run_hits(
    settings: Settings,
    objects: dict[int, bytes],
    proxy_pid: int,
    proxy_port: int,
    plain_pid: int,
    plain_port: int,
) -> Iterator[Figure]:
    for size in SIZES:
        label, obj = _label(size), objects[size]
        targets = [
            Target("proxy", f"coap://127.0.0.1:{proxy_port}/{PRODUCER}/r{label}", proxy_pid),
            Target("plain", f"coap://127.0.0.1:{plain_port}/o{size}", plain_pid),
        ]
        best, change, handshakes = asyncio.run(_hits(targets, obj, proxy_port, settings))
        blocks = "" if len(obj) <= BLOCK_SIZE else ", 2 Block2 blocks per GET"
        late = sum(r.challenges for r in best.values())
        print(
            f"  {label} reading, object {len(obj)} B{blocks}. Server CPU per GET: "
            + ", ".join(f"{name} {r.cpu_per_get * 1e6:.0f} us" for name, r in best.items())
            + f". Proxy over the windows: {change['hits']:,} hits, {change['misses']} misses, "
            f"{change['upstream_requests']} upstream requests; Echo challenges: {handshakes} "
            f"at the handshakes, {late} in the best windows",
            flush=True,
        )
        yield Figure(
            f"proxy-hit/{label}",
            best["proxy"].rate,
            "GET/s",
            f"plain aiocoap server, the object's {len(obj)} B",
            best["plain"].rate,
            min_ratio=TARGET_RATIO,
        )


def _run_spared(
    bundle: Bundle, reading: bytes, relay: CountingRelay, proxy_port: int
) -> Iterator[Figure]:
    for n in CONSUMER_COUNTS:
        path = f"{PRODUCER}/n{n}"
        via_proxy = asyncio.run(
            _readings(
                bundle, f"coap://127.0.0.1:{proxy_port}/{path}", n, reading, relay, proxy_port
            )
        )
        direct = asyncio.run(
            _readings(bundle, f"coap://127.0.0.1:{relay.port}/{path}", n, reading, relay, None)
        )
        retransmitted = via_proxy.retransmissions + direct.retransmissions
        dtls_errors = via_proxy.dtls_errors + direct.dtls_errors
        retries = via_proxy.retries + direct.retries
        print(
            f"  N={n:<3} GETs at the producer: through the proxy {via_proxy.gets} (its "
            f"upstream_requests +{via_proxy.upstream_requests}, readings in "
            f"{via_proxy.seconds:.2f} s, Max-Age {MAX_AGE} s), direct {direct.gets} (in "
            f"{direct.seconds:.2f} s)"
            + (f"; {retransmitted} retransmissions not counted" if retransmitted else "")
            + (
                f"; {dtls_errors} DTLS client errors towards the AS (aiocoap: handshake "
                "'connected' twice)"
                if dtls_errors
                else ""
            )
            + (
                f"; consumers started over (GETs counted): {len(via_proxy.retries)} through the "
                f"proxy, {len(direct.retries)} direct ({'; '.join(sorted(set(retries)))})"
                if retries
                else ""
            ),
            flush=True,
        )
        yield Figure(
            f"producer-gets/{n}-consumers",
            n / max(via_proxy.gets, 1),
            "readings per producer GET",
            "the same consumers straight to the producer",
            n / max(direct.gets, 1),
            # Met when the proxy sends at most 1 / N of the direct GETs: 1 per Max-Age.
            min_ratio=n,
        )
