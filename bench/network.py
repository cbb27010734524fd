"""Objects on emulated links: the consumer library against aiocoap, libcoap and a TCP copy.

Issue 17's matrix in one run. A real AS, producer (profile ``a128gcm-es256``), proxy (plain CoAP
for consumers, DTLS for publishing, ``--reverse`` to the producer, ``[limits] block_window``) and
a publishing producer, all on 127.0.0.1; between the client and each server a link emulator
(:mod:`bench.linkemu`, a separate process, restarted for every link; its ports stay the same for
the run): RTT 0, 10 and 50 ms, loss 0 and 1 % (``--quick``: RTT 0 and 50 ms, no loss). Objects of
64 B, 100 KiB, 1 MiB, 10 MiB (``--quick``: not 10 MiB). The columns (:data:`CASES`):

- ``prod-w8``, ``prod-w64``: the consumer library (:class:`consumer.Consumer`, ``block_window``
  8 and 64) getting the object from the producer: windowed Block2, verify and decrypt included;
- ``hit-w8``, ``hit-w64``: the same from the proxy's cache (warmed before, off the link);
- ``publish``: the publishing producer gets a new value (its file rewritten), seals it and PUTs
  it to the proxy over DTLS through the link; once the proxy holds it (its ETag, polled off the
  link), the consumer (W = 64) gets it from the proxy through the link: the whole time;
- ``aiocoap``: :mod:`bench.plain_server` serving exactly the object's bytes, aiocoap's block-wise;
- ``libcoap``: ``coap-client`` fetching the same bytes from libcoap's ``coap-server`` (Q-Block
  tried, see :mod:`bench.netcases`);
- ``tcp``: the ceiling, a plain TCP copy of the same bytes through the relay's emulated TCP.

On lossy links the W = 8 columns are not run (``-``). Objects over the producer's largest value
(``producer.config.MAX_VALUE_SIZE``) give ``limit`` in the columns of ours; the 10 MiB baselines
then move random bytes of that size. The proxy and the consumer get a 64 MiB object limit where
they take one (``[limits] max_object_size``, ``Consumer(max_object_size=)``).

Bounded time (:func:`bench.netcases.plan`): each transfer has a cap (60 s; 30 s on lossy links;
``--quick`` 10 s) and is reported as ``> cap`` past it; one whose smaller size went over is not
run, nor one whose estimate from the next smaller size is over the cap (``~N est``). The TCP copy
always runs; so does the target case (ours, 10 MiB, 1 % loss, RTT 0) up to 120 s.

Extension point, "ours over coap+tcp": add to :data:`ENDPOINTS` the producer's (or proxy's)
coap+tcp port as a ``"tcp"`` endpoint (the relay then carries it with its emulated TCP) and one
``Case`` to :data:`CASES` naming that endpoint: the consumer's URI becomes ``coap+tcp://``. The
producer's own flag for listening on TCP is the only other line (in :func:`_setup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from aiocoap import Context

from . import Figure, Plot, Settings
from .netcases import (
    Result,
    aiocoap_get,
    consumer_get,
    first_block,
    label,
    libcoap_get,
    plan,
    tcp_copy,
    tcp_server,
    timed,
)
from .netreport import Link, figures, print_table
from .testbed import Testbed, cpu_seconds, free_port

__all__ = ["CASES", "ENDPOINTS", "Case", "run"]

PRODUCER = "bench-producer"
PUBLISHER = "bench-pub"
PROXY = "bench-proxy"
CONSUMER = "bench-consumer"
PROFILE = "a128gcm-es256"
SIZES = (64, 100 << 10, 1 << 20, 10 << 20)
BIG_WINDOW = 64
#: The object limit asked of the consumer and the proxy (where the proxy takes one).
MAX_OBJECT = (64 << 20) + 4096
CAP, LOSS_CAP, QUICK_CAP, TARGET_CAP = 60.0, 30.0, 10.0, 120.0
COAP_SERVER = "/usr/bin/coap-server-openssl"


@dataclass(frozen=True)
class Case:
    """One column: ``kind`` is ``consumer`` (the consumer library, ``window`` blocks in flight,
    at ``endpoint``), ``publish``, ``aiocoap``, ``libcoap`` or ``tcp``."""

    name: str
    kind: str
    endpoint: str
    window: int = BIG_WINDOW
    lossy: bool = True  # run on lossy links too
    #: The consumer takes large objects over CoAP over TCP (its default threshold): the
    #: producer listens on TCP too, and the relay carries TCP on the UDP port's number.
    tcp: bool = False

    @property
    def ours(self) -> bool:
        return self.kind in ("consumer", "publish")


#: Relay endpoints: name -> protocol ("udp": datagrams, "tcp": the emulated TCP stream).
ENDPOINTS = {
    "producer": "udp",
    "proxy": "udp",
    "proxy-dtls": "udp",
    "plain": "udp",
    "libcoap": "udp",
    "tcp": "tcp",
    "producer-tcp": "tcp",  # the producer's coap+tcp port: the same number as its UDP port
    "proxy-tls": "tcp",  # the proxy's coaps+tcp port: the same number as its DTLS port
}
#: What the publisher logs when a publication failed (and is retried): not its "over TLS
#: failed (...); over DTLS instead", which is a fall-back, not a failure.
PUBLISH_FAILED = "failed: "
#: Key of the consumer that takes large objects over TCP in ``Bed.consumers`` (0: aiocoap's
#: context; the others by their window, UDP only).
TCP_CONSUMER = -1

CASES = (
    Case("prod-tcp", "consumer", "producer", tcp=True),
    Case("prod-w8", "consumer", "producer", 8, lossy=False),
    Case("prod-w64", "consumer", "producer"),
    Case("hit-w8", "consumer", "proxy", 8, lossy=False),
    Case("hit-w64", "consumer", "proxy"),
    Case("publish", "publish", "proxy"),
    Case("aiocoap", "aiocoap", "plain"),
    Case("libcoap", "libcoap", "libcoap"),
    Case("tcp", "tcp", "tcp"),
)
#: The case the targets are judged on.
OURS = "prod-tcp"


@dataclass
class Bed:
    """What the transfers need: servers' ports, objects, plaintexts, consumers."""

    bed: Testbed
    ports: dict[str, int]  # endpoint -> the server's port
    objs: dict[int, bytes]  # size -> the protected object (random bytes past the producer's max)
    plain: dict[int, bytes]  # size -> the plaintext, for sizes the producer serves
    bundles: dict[str, Path]
    producer_max: int
    consumers: dict[int, Any] = field(default_factory=dict)  # window -> Consumer
    relay: dict[str, int] = field(default_factory=dict)  # endpoint -> the relay's port
    publish_etag: bytes | None = None
    publish_value: bytes = b""
    notes: set[str] = field(default_factory=set)


def _scheme(endpoint: str) -> str:
    return "coap+tcp" if ENDPOINTS[endpoint] == "tcp" else "coap"


async def _transfer(b: Bed, case: Case, size: int, cap: float) -> Result:
    """One transfer of ``case`` through the relay."""
    from oscar.errors import InvalidObject
    from oscar_io.coaperrors import TransportError

    port = b.relay[case.endpoint]
    obj = b.objs[size]
    uri = f"coap://127.0.0.1:{port}/o{label(size)}"
    if case.kind == "aiocoap":
        return await timed(aiocoap_get(b.consumers[0], uri), obj, cap, "aiocoap")
    if case.kind == "libcoap":
        out = b.bed.dir / "libcoap.out"
        return await timed(libcoap_get(uri, out, cap, len(obj)), obj, cap, "libcoap")
    if case.kind == "tcp":
        return await timed(tcp_copy(port, len(obj)), obj, cap, "tcp")
    if size > b.producer_max:
        b.notes.add(f"limit: the producer's largest value is {b.producer_max} bytes")
        return Result(0.0, "limit")
    consumer = b.consumers[TCP_CONSUMER if case.tcp else case.window]
    uri = f"{_scheme(case.endpoint)}://127.0.0.1:{port}/{PRODUCER}/{label(size)}"
    try:
        if case.kind == "publish":
            return await asyncio.wait_for(_publish(b, size, cap), cap + 1)
        return await timed(consumer_get(consumer, uri)(), b.plain[size], cap, case.name)
    except (InvalidObject, TransportError) as exc:
        b.notes.add(f"{case.name} {label(size)}: {exc}")
        return Result(0.0, "fail")
    except TimeoutError:
        return Result(cap, "over")


async def _publish(b: Bed, size: int, cap: float) -> Result:
    """A new value of ``size`` for the publisher, until the consumer has it from the proxy.

    A new ETag at the proxy is the sign to fetch; an object that is not the new value (one the
    publisher was still retrying when the case before gave up on it) means wait for the next."""
    value = os.urandom(size)
    direct = f"coap://127.0.0.1:{b.ports['proxy']}/{PUBLISHER}/obj"
    uri = f"coap://127.0.0.1:{b.relay['proxy']}/{PUBLISHER}/obj"
    failures = b.bed.log("publisher").count(PUBLISH_FAILED)
    start = time.perf_counter()
    _write_value(b, value)
    while time.perf_counter() - start < cap:
        etag, code = await first_block(b.consumers[0], direct)
        if code == "2.05" and etag != b.publish_etag:
            b.publish_etag = etag
            rest = cap - (time.perf_counter() - start)
            got = await asyncio.wait_for(b.consumers[BIG_WINDOW].get(uri), rest)
            if got.plaintext == value:
                return Result(time.perf_counter() - start, "measured")
            continue
        if b.bed.log("publisher").count(PUBLISH_FAILED) > failures:
            b.notes.add("publish: " + b.bed.log("publisher").strip().splitlines()[-1][-200:])
            return Result(0.0, "fail")
        await asyncio.sleep(0.01)  # polling the proxy off the link: it has no event to await
    return Result(cap, "over")


def _write_value(b: Bed, value: bytes) -> None:
    """The publisher's value file, replaced at once (never read half written)."""
    tmp = b.bed.dir / "pub.tmp"
    tmp.write_bytes(value)
    tmp.replace(b.bed.dir / "pub.bin")


def _start_publisher(b: Bed) -> subprocess.Popen[bytes]:
    """The publishing producer, through the relay to the proxy's DTLS port; ready once the proxy
    holds its first object."""
    b.publish_value = os.urandom(64)
    _write_value(b, b.publish_value)
    argv = ["-m", "producer", "--bundle", str(b.bundles[PUBLISHER]),
            "--state", str(b.bed.dir / "publisher-state"), "--profile", PROFILE,
            "--resource", f"obj={b.bed.dir / 'pub.bin'}", "--content-format", "42",
            "--interval", "0.05", "--max-age", "3600", "--log-level", "info",
            "--publish", f"{PROXY}=coaps://127.0.0.1:{b.relay['proxy-dtls']}"]  # fmt: skip
    return b.bed.spawn("publisher", argv, ready=f"producer {PUBLISHER} ready".encode(), timeout=60)


async def _wait_published(b: Bed, timeout: float) -> bool:
    """Whether the publisher's first value reached the proxy within ``timeout`` (read by the
    consumer off the link)."""
    direct = f"coap://127.0.0.1:{b.ports['proxy']}/{PUBLISHER}/obj"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        etag, code = await first_block(b.consumers[0], direct)
        if code == "2.05" and etag != b.publish_etag:
            b.publish_etag = etag
            with contextlib.suppress(Exception):  # tried again until the deadline
                reading = await b.consumers[BIG_WINDOW].get(direct)
                if reading.plaintext == b.publish_value:
                    return True
        await asyncio.sleep(0.05)  # polling the proxy off the link: it has no event to await
    return False


def _cap(link: Link, quick: bool) -> float:
    return QUICK_CAP if quick else LOSS_CAP if link.loss else CAP


async def _measure_link(
    b: Bed, link: Link, sizes: tuple[int, ...], quick: bool
) -> dict[tuple[int, str], Result]:
    """Every case and size through one relay process for ``link``."""
    argv = ["-m", "bench.linkemu", "--rtt-ms", str(link.rtt_ms), "--loss", str(link.loss),
            "--seed", "17"]  # fmt: skip
    for name, proto in ENDPOINTS.items():
        argv += [f"--{proto}", f"127.0.0.1:{b.relay[name]}=127.0.0.1:{b.ports[name]}"]
    emu = b.bed.spawn(f"linkemu-{link.label}", argv, ready=b"linkemu ready")
    cpu = cpu_seconds(emu.pid)
    publisher = await asyncio.to_thread(_start_publisher, b)
    results: dict[tuple[int, str], Result] = {}
    start = time.monotonic()
    try:
        published = await _wait_published(b, 60)
        if not published:
            b.notes.add(f"publish {link.label}: the publisher's first object never came")
        for i, size in enumerate(sizes):
            for case in CASES:
                if link.loss and not case.lossy:
                    continue
                if case.kind == "publish" and not published:
                    results[size, case.name] = Result(0.0, "fail")
                    continue
                cap = _cap(link, quick)
                target = case.name == OURS and link.loss and link.rtt_ms == 0 and size == sizes[-1]
                previous = (sizes[i - 1], results[sizes[i - 1], case.name]) if i else None
                # Ours up to 1 MiB always runs (to the cap): the subject, not a baseline.
                extrapolate = not (case.kind == "consumer" and size <= 1 << 20)
                instead = plan(size, previous, cap, estimate=extrapolate)
                if case.kind == "tcp":
                    instead = None
                if case.ours and size > b.producer_max:
                    b.notes.add(f"limit: the producer's largest value is {b.producer_max} bytes")
                    instead = Result(0.0, "limit")
                if target and not quick and (instead is None or instead.kind != "limit"):
                    cap, instead = TARGET_CAP, None
                if instead is None:
                    instead = await _transfer(b, case, size, cap)
                results[size, case.name] = instead
    finally:
        used = cpu_seconds(emu.pid) - cpu
        b.bed.stop(publisher)
        b.bed.stop(emu)
    log = b.bed.log(f"linkemu-{link.label}")
    stats = [line for line in log.splitlines() if line.startswith("linkemu stats")]
    print(
        f"  link {link.label}: {time.monotonic() - start:.0f} s, relay CPU {used:.2f} s; "
        + (stats[0].removeprefix("linkemu stats ") if stats else "relay log:\n" + log[-3000:]),
        flush=True,
    )
    return results


def _proxy_config(bed: Testbed) -> Path:
    """``[limits]``: the big window upstream, and the object limit where the proxy takes one."""
    from proxy.config import Limits

    lines = ["[limits]", f"block_window = {BIG_WINDOW}"]
    if "max_object_size" in {f.name for f in fields(Limits)}:
        lines.append(f"max_object_size = {MAX_OBJECT}")
    return bed.write("proxy.toml", ("\n".join(lines) + "\n").encode())


def _setup(bed: Testbed, sizes: tuple[int, ...], stack: contextlib.ExitStack) -> Bed:
    """Start the AS, producer, proxy, plain server, coap-server (stopped by ``stack``)."""
    from producer.config import MAX_VALUE_SIZE

    bundles = bed.start_as(
        {PRODUCER: "producer", PUBLISHER: "producer", PROXY: "proxy", CONSUMER: "consumer"},
        grants=[(CONSUMER, f"{PRODUCER}/*"), (CONSUMER, f"{PUBLISHER}/*")],
    )
    ports = {name: free_port() for name in ENDPOINTS}
    ports["producer-tcp"] = ports["producer"]  # coap+tcp on the UDP port's number
    plain: dict[int, bytes] = {}
    argv = ["-m", "producer", "--bundle", str(bundles[PRODUCER]),
            "--state", str(bed.dir / "producer-state"),
            "--listen", f"127.0.0.1:{ports['producer']}", "--tcp",
            "--profile", PROFILE, "--content-format", "42", "--max-age", "3600",
            "--log-level", "info"]  # fmt: skip
    for size in sizes:
        if size <= MAX_VALUE_SIZE:
            plain[size] = os.urandom(size)
            argv += ["--resource", f"{label(size)}={bed.write(f'{label(size)}.bin', plain[size])}"]
    bed.spawn("producer", argv, ready=f"producer {PRODUCER} ready".encode(), timeout=60)
    bed.spawn(
        "proxy",
        ["-m", "proxy", "--bundle", str(bundles[PROXY]), "--state", str(bed.dir / "proxy"),
         "--listen", f"127.0.0.1:{ports['proxy']}", "--config", str(_proxy_config(bed)),
         "--reverse", f"{PRODUCER}=coap://127.0.0.1:{ports['producer']}", "--tls"],
        ready=b"serving coap://",
    )  # fmt: skip
    ports["proxy-dtls"] = ports["proxy"] + 1
    ports["proxy-tls"] = ports["proxy"] + 1  # TLS publishing: TCP, the DTLS port's number
    b = Bed(bed, ports, {}, plain, bundles, MAX_VALUE_SIZE)
    server = subprocess.Popen(
        [COAP_SERVER, "-A", "127.0.0.1", "-p", str(ports["libcoap"]), "-d", "20", "-L", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(bed.stop, server)
    return b


async def _fetch_objects(b: Bed, sizes: tuple[int, ...]) -> None:
    """Each object from the producer (waiting for it), the proxy's cache warmed with it."""
    ctx = b.consumers[0]
    for size in sizes:
        if size > b.producer_max:
            b.objs[size] = os.urandom(size)
            continue
        uri = f"coap://127.0.0.1:{b.ports['producer']}/{PRODUCER}/{label(size)}"
        deadline = time.monotonic() + 60
        while size not in b.objs:
            with contextlib.suppress(RuntimeError):
                b.objs[size] = await aiocoap_get(ctx, uri)
            if size not in b.objs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{uri}: no object")
                await asyncio.sleep(0.2)
        hit = await aiocoap_get(
            ctx, f"coap://127.0.0.1:{b.ports['proxy']}/{PRODUCER}/{label(size)}"
        )
        if hit != b.objs[size]:
            raise RuntimeError("the proxy's object is not the producer's")


def _serve_baselines(b: Bed) -> None:
    """The plain aiocoap server and coap-server holding each object's bytes."""
    argv = ["-m", "bench.plain_server", "--listen", f"127.0.0.1:{b.ports['plain']}",
            "--content-format", "18"]  # fmt: skip
    for size, obj in b.objs.items():
        path = b.bed.write(f"o{label(size)}.cose", obj)
        argv += ["--file", f"o{label(size)}={path}"]
        uri = f"coap://127.0.0.1:{b.ports['libcoap']}/o{label(size)}"
        put = ["/usr/bin/coap-client-openssl", "-m", "put", "-b", "1024", "-L", "5", "-B", "60",
               "-f", str(path), uri]  # fmt: skip
        for attempt in range(20):  # coap-server prints nothing when ready
            if subprocess.run(put, timeout=120, capture_output=True).returncode == 0:
                break
            time.sleep(0.1 * attempt)
    b.bed.spawn("plain", argv, ready=b"plain server ready")


class Measured(NamedTuple):
    results: dict[Link, dict[tuple[int, str], Result]]
    direct_1mib: float | None  # the consumer's 1 MiB from the producer, no relay (best of 3)
    objs: dict[int, bytes]


def _measure(settings: Settings, bed: Testbed, stack: contextlib.ExitStack) -> Measured:
    sizes = SIZES[:3] if settings.quick else SIZES
    rtts = (0, 50) if settings.quick else (0, 10, 50)
    losses = (0.0,) if settings.quick else (0.0, 0.01)
    links = [Link(rtt, loss) for loss in losses for rtt in rtts]
    b = _setup(bed, sizes, stack)

    async def all_links() -> Measured:
        from consumer import Consumer
        from consumer.transport import DEFAULT_TCP_THRESHOLD

        b.consumers[0] = await Context.create_client_context(transports=["udp6"])
        await _fetch_objects(b, sizes)
        await asyncio.to_thread(_serve_baselines, b)
        server = await tcp_server({len(o): o for o in b.objs.values()})
        b.ports["tcp"] = server.sockets[0].getsockname()[1]
        b.relay = {name: free_port() for name in ENDPOINTS}
        b.relay["producer-tcp"] = b.relay["producer"]  # the consumer's TCP: the same number
        b.relay["proxy-tls"] = b.relay["proxy-dtls"]  # the publisher's TLS: the same number
        direct: float | None = None
        try:
            for key in (8, BIG_WINDOW, TCP_CONSUMER):
                b.consumers[key] = Consumer(
                    b.bundles[CONSUMER], None, block_window=max(key, BIG_WINDOW),
                    max_object_size=MAX_OBJECT, timeout=TARGET_CAP,
                    tcp_threshold=DEFAULT_TCP_THRESHOLD if key == TCP_CONSUMER else None,
                )  # fmt: skip
                await b.consumers[key].start()
                for size in b.plain:  # the secrets from the AS, off the link
                    uri = f"coap://127.0.0.1:{b.ports['producer']}/{PRODUCER}/{label(size)}"
                    await b.consumers[key].get(uri)
            if 1 << 20 in b.plain:  # best of 3 for each consumer, straight to the producer
                uri = f"coap://127.0.0.1:{b.ports['producer']}/{PRODUCER}/1MiB"
                times = []
                for key in (8, BIG_WINDOW, TCP_CONSUMER) * 3:
                    got = await timed(
                        consumer_get(b.consumers[key], uri)(), b.plain[1 << 20], 30, "1MiB"
                    )
                    times.append(got.seconds)
                direct = min(times)
            results = {link: await _measure_link(b, link, sizes, settings.quick) for link in links}
        finally:
            server.close()
            for key, client in b.consumers.items():
                await (client.shutdown() if key == 0 else client.close())
        for note in sorted(b.notes):
            print(f"  note: {note}")
        return Measured(results, direct, b.objs)

    return asyncio.run(all_links())


def run(settings: Settings) -> Iterator[Figure | Plot]:
    """Start the servers; per emulated link, every case and size; yield the figures and plot."""
    logging.getLogger("coap").setLevel(logging.ERROR)
    logging.getLogger("oscar.consumer").setLevel(logging.ERROR)
    with (
        Testbed("oscar-bench-network-") as bed,
        contextlib.ExitStack() as stack,
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "DTLS module did not shut down", UserWarning)
        measured = _measure(settings, bed, stack)
    sizes = sorted(measured.objs)
    print_table(measured.results, sizes, [c.name for c in CASES], OURS)
    yield from figures(measured.results, sizes, [c.name for c in CASES], OURS, measured.direct_1mib)
