"""The proxy at scale: memory, hit latency, restart time and disk size at 1,000 to 100,000 objects.

A real AS (admin CLI) with a producer and a proxy enrolled. The producer's side runs here: its
ES256 key, its certificate from the AS CA (``POST /cert`` through
:class:`~oscar_io.asclient.AsClient`), and one 64 B text reading sealed with
:class:`oscar.Sealer` for each of N resources ``bench-producer/r<i>`` (lifetime one day). The
access secret is random: the proxy never holds one and never asks the AS whether a resource is
registered, so registering N resources would change nothing the proxy does.

The cache is filled by the proxy's own code in this process: a :class:`proxy.Proxy` on the proxy's
state directory and bundle takes each object through :meth:`proxy.Proxy.publish`, the path of a
PUT: every check of verify-before-cache (decoding, signer certificate from the AS CA, revocation,
signature, times, rollback), then the encrypted disk cache. Only CoAP and DTLS are left out,
which would cost minutes at 100,000 objects and make no difference to the cache. The sizes grow
one after the other (the objects of the smaller size stay), and this in-process proxy is closed
before a real proxy process (``python -m proxy --no-dtls``, default limits) starts on the state:

- restart: from just before the spawn to the first 2.05 for a random key, polling with a
  confirmable GET every 10 ms from a bare UDP socket (answering the 4.01 Echo challenge, RFC 9175,
  as any plain-CoAP client must); median of 2 starts (3 in a full run); VmRSS at that moment;
- first touch: sequential confirmable GETs, from one bare UDP socket, of the first
  min(N, memory_entries) keys once each: each is a hit read from the disk cache (the proxy loads
  nothing at start); VmRSS afterwards (``rss``: the entries the memory limit allows, and what
  aiocoap keeps of every exchange for its EXCHANGE_LIFETIME of 247 s);
- hits: 1,000 (2,000) sequential GETs of keys drawn at random from all N: latency p50/p99 and
  GET/s. With N within the memory limit (default 10,000) all come from memory; beyond it, most
  from the disk cache (LRU in memory, 10,000 of N). The VmRSS growth over these GETs, which add
  no entry up to 10,000 (beyond, as many go as come), is printed per request: aiocoap's share;
- on disk: the size of ``cache.db`` (after a clean shutdown: no WAL) per object.

Also, in this process: the Python heap per entry held in memory (``tracemalloc`` around loading
up to 10,000 entries from the disk cache into a :class:`proxy.cache.Cache`), beside the object's
size, and the same estimated from the proxy's VmRSS (less aiocoap's share per request; SQLite's
page cache, up to 2 MiB, and the allocator's slack are in it).

Figures per size, without baseline (lower is better, except GET/s); memory and disk per entry at
the largest size against the object's size; the growth from the smallest to the largest size
(value: largest, baseline: smallest); and a plot. No issue sets a target: what matters is that
nothing but the disk grows with N.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import socket
import statistics
import subprocess
import time
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from aiocoap import CON, GET, Message
from cryptography.hazmat.primitives.serialization import Encoding

import oscar
from oscar import certs
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from proxy import Limits, Proxy, ProxyConfig
from proxy.cache import Cache

from . import Figure, Plot, Settings
from .testbed import Testbed, free_port

__all__ = ["run"]

PRODUCER = "bench-producer"
PROXY = "bench-proxy"
SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (300, 1_000, 3_000)
READING = b"temperature=21.5C humidity=40.2% pressure=1013.2hPa wind=3.1m/s\n"[:64]
LIFETIME = 86_400
POLL = 0.01
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 2.0
#: 2.05 Content and 4.01 Unauthorized, as the second byte of a CoAP header.
CONTENT = 0x45
UNAUTHORIZED = 0x81


def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- the producer's side and the fill ---------------------------------------------------------


class Producer:
    """The producer's key, certified by the AS CA; seals one object per resource."""

    def __init__(self, signing_key: certs.SigningKey) -> None:
        self.signing_key = signing_key
        self.secret = oscar.AccessSecret(os.urandom(32))

    @classmethod
    async def provision(cls, bundle: Bundle) -> Producer:
        private_key = certs.generate_signing_key()
        async with AsClient(bundle) as client:
            csr = certs.make_csr(private_key, PRODUCER).public_bytes(Encoding.DER)
            await client.request_certificate(csr)
        return cls(certs.SigningKey.from_private_key(private_key))

    def seal(self, index: int, now: int) -> tuple[str, bytes]:
        resource_id = f"{PRODUCER}/r{index}"
        sealer = oscar.Sealer(
            secret=self.secret,
            producer_id=PRODUCER,
            resource_id=resource_id,
            epoch=1,
            signing_key=self.signing_key,
        )
        obj = sealer.seal(seq=1, iat=now, exp=now + LIFETIME, content_format=0, plaintext=READING)
        return resource_id, obj


async def _fill(producer: Producer, config: ProxyConfig, start: int, stop: int) -> float:
    """Publish the objects of resources ``start`` to ``stop - 1`` through an in-process proxy on
    the state directory; seconds taken."""
    proxy = Proxy(config)
    proxy.open()
    began = time.perf_counter()
    try:
        now = int(time.time())
        for index in range(start, stop):
            resource_id, obj = producer.seal(index, now)
            if not await proxy.publish(resource_id, obj, None):
                raise RuntimeError(f"the proxy did not take {resource_id}")
    finally:
        await proxy.close()
    return time.perf_counter() - began


def _heap_per_entry(config: ProxyConfig, count: int) -> tuple[float, int]:
    """Python heap bytes per entry held in a :class:`Cache` (loaded from the disk cache), and
    the objects' mean size."""
    proxy = Proxy(config)
    proxy.open()
    try:
        disk = proxy.cache.disk
        assert disk is not None
        keys = [f"{PRODUCER}/r{i}" for i in range(count)]
        cache = Cache(disk, max_entries=count, max_bytes=1 << 40)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for key in keys:
            cache.get(key)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        sizes = [len(e.obj) for e in cache.entries()]
        if len(sizes) != count:
            raise RuntimeError(f"{len(sizes)} of {count} entries loaded from the disk cache")
        return (after - before) / count, sum(sizes) // count
    finally:
        asyncio.run(proxy.close())


# --- a bare CoAP client -------------------------------------------------------------------------


class BareClient:
    """Confirmable GETs one at a time from one UDP socket; answers the proxy's Echo challenge
    (the first 4.01 with an Echo option) by repeating the request with it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.mid = random.randrange(0x10000)
        self.challenges = 0
        self.retransmissions = 0

    def close(self) -> None:
        self.sock.close()

    def _request(self, path: tuple[str, ...], echo: bytes | None) -> Message:
        self.mid = (self.mid + 1) & 0xFFFF
        return _get(self.mid, path, echo)

    def _exchange(self, request: Message) -> Message:
        data = request.encode()
        for _ in range(4):
            self.sock.send(data)
            deadline = time.perf_counter() + REQUEST_TIMEOUT
            while (left := deadline - time.perf_counter()) > 0:
                self.sock.settimeout(left)
                try:
                    reply = self.sock.recv(65536)
                except TimeoutError:
                    break
                if len(reply) >= 4 and reply[2:4] == request.mid.to_bytes(2, "big"):
                    return Message.decode(reply)
            self.retransmissions += 1
        raise RuntimeError(f"GET /{'/'.join(request.opt.uri_path)}: no answer")

    def get(self, path: tuple[str, ...]) -> Message:
        """The answer to a GET of ``path`` (after an Echo challenge, if one came)."""
        response = self._exchange(self._request(path, None))
        if response.code.dotted == "4.01" and response.opt.echo is not None:
            self.challenges += 1
            response = self._exchange(self._request(path, response.opt.echo))
        return response

    def timed_gets(self, paths: list[tuple[str, ...]]) -> tuple[list[float], float]:
        """Latencies (s) of one GET of each path in turn, and the seconds for all of them."""
        latencies = []
        clock = time.perf_counter
        began = clock()
        for path in paths:
            start = clock()
            response = self.get(path)
            latencies.append(clock() - start)
            if response.code.dotted != "2.05":
                raise RuntimeError(f"GET /{'/'.join(path)}: {response.code}")
        return latencies, clock() - began


def _path(index: int) -> tuple[str, ...]:
    return (PRODUCER, f"r{index}")


def _get(mid: int, path: tuple[str, ...], echo: bytes | None) -> Message:
    """A confirmable GET with this message ID (and token), Echo option if given."""
    request = Message(code=GET)
    request.mtype, request.mid, request.token = CON, mid, mid.to_bytes(2, "big")
    request.opt.uri_path = path
    if echo is not None:
        request.opt.echo = echo
    return request


# --- the proxy process --------------------------------------------------------------------------


class Start(NamedTuple):
    seconds: float
    rss_kib: int


def _start_proxy(
    bed: Testbed, argv: list[str], port: int, path: tuple[str, ...]
) -> tuple[subprocess.Popen[bytes], Start]:
    """Spawn the proxy; poll it with GETs of ``path`` until it answers 2.05 (Echo answered)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        start = time.perf_counter()
        process = bed.launch("proxy", argv)
        deadline = start + START_TIMEOUT
        mid = 0
        echo: bytes | None = None
        while True:
            now = time.perf_counter()
            if now > deadline or process.poll() is not None:
                raise RuntimeError(f"proxy: no 2.05 answer:\n{bed.log('proxy')[-2000:]}")
            mid = (mid + 1) & 0xFFFF
            sock.sendto(_get(mid, path, echo).encode(), ("127.0.0.1", port))
            next_poll = now + POLL
            while (left := next_poll - time.perf_counter()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(4096)
                except (TimeoutError, ConnectionRefusedError):
                    break
                if len(data) >= 2 and data[1] == CONTENT:
                    seconds = time.perf_counter() - start
                    return process, Start(seconds, _status(process.pid)["VmRSS"])
                if len(data) >= 2 and data[1] == UNAUTHORIZED:
                    echo = Message.decode(data).opt.echo
                    break  # ask again at once, with the Echo value
    finally:
        sock.close()


class Measured(NamedTuple):
    objects: int
    fill_seconds: float
    restart_ms: float
    restart_all_ms: list[float]
    rss_start_mib: float
    rss_mib: float
    touched: int
    cold_p50_ms: float
    cold_p99_ms: float
    p50_ms: float
    p99_ms: float
    rate: float
    #: VmRSS growth per request of the random-key pass (aiocoap keeps each exchange 247 s).
    per_request: float
    disk_bytes: int
    heap_per_entry: float
    object_size: int
    challenges: int
    retransmissions: int

    @property
    def rss_per_entry(self) -> float:
        """VmRSS growth per entry brought into memory by the first touches, less what the
        requests themselves left behind (``per_request``)."""
        grown = (self.rss_mib - self.rss_start_mib) * 2**20
        return (grown - self.per_request * self.touched) / self.touched


def _measure(
    bed: Testbed,
    config: ProxyConfig,
    objects: int,
    fill_seconds: float,
    settings: Settings,
    rng: random.Random,
) -> Measured:
    port = config.listen[1]
    argv = ["-m", "proxy", "--bundle", str(config.bundle), "--state", str(config.state),
            "--listen", f"127.0.0.1:{port}", "--no-dtls", "--log-level", "warning"]  # fmt: skip
    disk_bytes = (config.state / "cache.db").stat().st_size
    starts = []
    for _ in range(1 if settings.quick else 2):
        process, started = _start_proxy(bed, argv, port, _path(rng.randrange(objects)))
        bed.stop(process)
        starts.append(started)
    process, started = _start_proxy(bed, argv, port, _path(rng.randrange(objects)))
    starts.append(started)
    client = BareClient(port)
    try:
        touched = min(objects, config.limits.memory_entries)
        cold, _ = client.timed_gets([_path(i) for i in range(touched)])
        rss_kib = _status(process.pid)["VmRSS"]
        draws = 1000 if settings.quick else 2000
        hot, seconds = client.timed_gets([_path(rng.randrange(objects)) for _ in range(draws)])
        per_request = (_status(process.pid)["VmRSS"] - rss_kib) * 1024 / draws
    finally:
        client.close()
        bed.stop(process)
    heap, object_size = _heap_per_entry(config, min(objects, 10_000))
    restarts = [s.seconds * 1e3 for s in starts]
    return Measured(
        objects=objects,
        fill_seconds=fill_seconds,
        restart_ms=statistics.median(restarts),
        restart_all_ms=restarts,
        rss_start_mib=started.rss_kib / 1024,
        rss_mib=rss_kib / 1024,
        touched=touched,
        cold_p50_ms=_percentile(cold, 0.5) * 1e3,
        cold_p99_ms=_percentile(cold, 0.99) * 1e3,
        p50_ms=_percentile(hot, 0.5) * 1e3,
        p99_ms=_percentile(hot, 0.99) * 1e3,
        rate=draws / seconds,
        per_request=per_request,
        disk_bytes=disk_bytes,
        heap_per_entry=heap,
        object_size=object_size,
        challenges=client.challenges,
        retransmissions=client.retransmissions,
    )


# --- the run ------------------------------------------------------------------------------------


def _figures(m: Measured) -> Iterator[Figure]:
    n = _count(m.objects)
    yield Figure(f"proxy-scale/{n}/rss", m.rss_mib, "MiB", lower_is_better=True)
    yield Figure(f"proxy-scale/{n}/hit-p50", m.p50_ms, "ms", lower_is_better=True)
    yield Figure(f"proxy-scale/{n}/hit-p99", m.p99_ms, "ms", lower_is_better=True)
    yield Figure(f"proxy-scale/{n}/hit-rate", m.rate, "GET/s")
    yield Figure(f"proxy-scale/{n}/restart", m.restart_ms, "ms", lower_is_better=True)
    yield Figure(f"proxy-scale/{n}/disk", m.disk_bytes / 2**20, "MiB", lower_is_better=True)


def _growth(small: Measured, large: Measured) -> Iterator[Figure]:
    base = f"the same at {small.objects:,} objects"
    tag = f"proxy-scale/growth-{_count(small.objects)}-{_count(large.objects)}"
    pairs = (
        ("rss-at-start", small.rss_start_mib, large.rss_start_mib, "MiB"),
        ("rss", small.rss_mib, large.rss_mib, "MiB"),
        ("hit-p50", small.p50_ms, large.p50_ms, "ms"),
        ("hit-p99", small.p99_ms, large.p99_ms, "ms"),
        ("restart", small.restart_ms, large.restart_ms, "ms"),
        ("disk-per-object", small.disk_bytes / small.objects, large.disk_bytes / large.objects,
         "B"),
    )  # fmt: skip
    for what, low, high, unit in pairs:
        yield Figure(f"{tag}/{what}", high, unit, base, low, lower_is_better=True)
    yield Figure(f"{tag}/hit-rate", large.rate, "GET/s", base, small.rate)


def _per_entry(m: Measured) -> Iterator[Figure]:
    size = f"the object ({m.object_size} B)"
    yield Figure("proxy-scale/memory-per-entry", m.heap_per_entry, "B", size, m.object_size,
                 lower_is_better=True)  # fmt: skip
    yield Figure("proxy-scale/disk-per-entry", m.disk_bytes / m.objects, "B", size,
                 m.object_size, lower_is_better=True)  # fmt: skip


def _plot(results: list[Measured]) -> Plot:
    def series(attr: str) -> list[tuple[float, float]]:
        return [(float(m.objects), float(getattr(m, attr))) for m in results]

    return Plot(
        name="proxy-scale",
        title="The proxy holding N cached objects (default limits: 10,000 in memory)",
        xlabel="cached objects",
        ylabel="",
        series={
            "memory|at the first hit after a restart": series("rss_start_mib"),
            "memory|after touching min(N, 10,000) keys": series("rss_mib"),
            "latency|hit p50, random keys": series("p50_ms"),
            "latency|hit p99, random keys": series("p99_ms"),
            "latency|first touch p50 (from disk)": series("cold_p50_ms"),
            "restart|spawn to the first hit": series("restart_ms"),
        },
        logx=True,
        panels=(("memory", "VmRSS (MiB)"), ("latency", "ms"), ("restart", "ms")),
    )


def run(settings: Settings) -> Iterator[Figure | Plot]:
    """Start an AS; fill the proxy's cache to each size, start the proxy on it; yield figures."""
    logging.getLogger("coap").setLevel(logging.ERROR)
    sizes = QUICK_SIZES if settings.quick else SIZES
    limits = Limits()
    if sizes[-1] > limits.disk_entries:
        raise RuntimeError(f"{sizes[-1]:,} objects exceed the default disk_entries")
    rng = random.Random(7)
    results: list[Measured] = []
    with Testbed("oscar-bench-proxy-scale-") as bed, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "DTLS module did not shut down", UserWarning)
        bundles = bed.start_as({PRODUCER: "producer", PROXY: "proxy"})
        producer = asyncio.run(Producer.provision(Bundle.load(bundles[PRODUCER])))
        config = ProxyConfig(
            bundle=bundles[PROXY],
            state=bed.dir / "proxy-state",
            listen=("127.0.0.1", free_port()),
            dtls=False,
            limits=limits,
        )
        filled = 0
        for size in sizes:
            fill_seconds = asyncio.run(_fill(producer, config, filled, size))
            filled = size
            m = _measure(bed, config, size, fill_seconds, settings, rng)
            results.append(m)
            print(
                f"  {size:,} objects of {m.object_size} B (filled in {fill_seconds:.1f} s). "
                f"Restart {', '.join(f'{r:.0f}' for r in m.restart_all_ms)} ms. VmRSS at the "
                f"first hit {m.rss_start_mib:.1f} MiB, after first touches of {m.touched:,} "
                f"keys {m.rss_mib:.1f} MiB: about {m.rss_per_entry:.0f} B per entry beside "
                f"{m.per_request:.0f} B per request kept by aiocoap (Python heap per entry "
                f"{m.heap_per_entry:.0f} B). First touch (from disk) p50 {m.cold_p50_ms:.2f} ms "
                f"p99 {m.cold_p99_ms:.2f} ms. On disk {m.disk_bytes / size:.0f} B per object. "
                f"Echo challenges {m.challenges}, retransmissions {m.retransmissions}",
                flush=True,
            )
            yield from _figures(m)
        yield from _per_entry(results[-1])
        yield from _growth(results[0], results[-1])
        yield _plot(results)
