"""Large objects through the proxy: transfer time of 1 MiB (and 64 KiB) beside plain aiocoap.

A real AS, producer (``python -m producer``, profile ``a128gcm-es256``: AES-CCM cannot seal more
than 64 KiB, content format 42) and proxy (``python -m proxy --no-dtls``, ``--reverse
bench-producer=coap://...``, default limits) on 127.0.0.1. The producer serves values of 1 MiB and
64 KiB (random bytes; the producer's largest value is 1 MiB) under several resource names, one
per cold fetch, so each miss finds the proxy's cache empty for it. The client is an aiocoap client
context in this process (Block2 assembled by aiocoap, as a consumer's transport does; no verify
or decrypt, which is measured in ``seal_open``/``consumer_open``). Per size and repetition:

- ``proxy-miss``: a GET through the proxy of a resource it has not cached: the proxy fetches the
  object from the producer block by block, verifies it, stores it (memory and the encrypted disk
  cache), then serves it block by block;
- ``proxy-hit``: the same GET again: served from the proxy's cache;
- ``producer``: the GET straight to the producer;
- baseline ``plain``: :mod:`bench.plain_server` (``--file``) serving exactly the bytes of the
  protected object, content format 18, block-wise the same way.

Each is the time from sending the request to the last block assembled; aiocoap's blocks are
1,024 bytes, one confirmable exchange each, one after the other (1,025 for 1 MiB). The proxy's
Echo challenge (RFC 9175) is answered once, before timing, and its trust (the producer's
certificate, the CRL) warmed with a small object. Medians over 5 repetitions, the order of the
cases alternating (one repetition with ``--quick``). Printed too: the serving process's CPU
seconds per transfer.

Rows: transfer seconds against the plain server's, lower is better; no issue sets a target.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import NamedTuple

from aiocoap import GET, Context, Message

from oscar.objects import ProtectedObject

from . import Figure, Settings
from .testbed import Testbed, cpu_seconds, free_port

__all__ = ["run"]

PRODUCER = "bench-producer"
PROXY = "bench-proxy"
SIZES = (1 << 20, 64 << 10)
PROFILE = "a128gcm-es256"
MAX_AGE = 600
TIMEOUT = 120.0
BLOCK = 1024


def _label(size: int) -> str:
    return f"{size >> 20}MiB" if size >= 1 << 20 else f"{size >> 10}KiB"


class Sample(NamedTuple):
    seconds: float
    cpu: float
    payload: bytes


class Servers(NamedTuple):
    proxy: str
    proxy_pid: int
    producer: str
    producer_pid: int
    plain: str
    plain_pid: int


async def _request(ctx: Context, uri: str, echo: bytes | None = None) -> Message:
    message = Message(code=GET, uri=uri)
    if echo is not None:
        message.opt.echo = echo
    response: Message = await asyncio.wait_for(ctx.request(message).response, TIMEOUT)
    return response


async def _get(ctx: Context, uri: str) -> bytes:
    """The payload of a GET (answering an Echo challenge once); RuntimeError unless 2.05."""
    response = await _request(ctx, uri)
    if response.code.dotted == "4.01" and response.opt.echo is not None:
        response = await _request(ctx, uri, response.opt.echo)
    if response.code.dotted != "2.05":
        raise RuntimeError(f"GET {uri}: {response.code}")
    payload: bytes = response.payload
    return payload


async def _timed(ctx: Context, uri: str, pid: int) -> Sample:
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    payload = await _get(ctx, uri)
    seconds = time.perf_counter() - start
    return Sample(seconds, cpu_seconds(pid) - cpu, payload)


async def _first_object(ctx: Context, uri: str, timeout: float = 60.0) -> bytes:
    """The producer's object once it has one (it answers 5.03 until it has sealed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await _request(ctx, uri)
        if response.code.dotted == "2.05":
            payload: bytes = response.payload
            return payload
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{uri}: no object within {timeout:g} s")


async def _measure(servers: Servers, size: int, reps: int) -> dict[str, list[Sample]]:
    """``reps`` transfers of each case, alternating; the samples per case."""
    label = _label(size)
    ctx = await Context.create_client_context(transports=["udp6"])
    try:
        # Untimed: the Echo handshake and the proxy's trust (certificate, CRL), with a small
        # object.
        await _get(ctx, f"{servers.proxy}/{PRODUCER}/warm")
        samples: dict[str, list[Sample]] = {}
        for i in range(reps):
            cold = f"{servers.proxy}/{PRODUCER}/{label}-{i + 1}"
            cases = [
                ("proxy-miss", cold, servers.proxy_pid),
                ("proxy-hit", cold, servers.proxy_pid),
                ("producer", f"{servers.producer}/{PRODUCER}/{label}-0", servers.producer_pid),
                ("plain", f"{servers.plain}/o{label}", servers.plain_pid),
            ]
            if i % 2:  # the other way round, the hit still after its miss
                cases = [*cases[3:1:-1], *cases[:2]]
            for name, uri, pid in cases:
                samples.setdefault(name, []).append(await _timed(ctx, uri, pid))
        return samples
    finally:
        await ctx.shutdown()


def _check(samples: dict[str, list[Sample]], obj: bytes) -> None:
    """Every transfer gave a whole object: the direct ones exactly the producer's bytes, the
    proxy's one object of the same resource and length (each cold resource is its own)."""
    for name, runs in samples.items():
        for sample in runs:
            if name in ("producer", "plain") and sample.payload != obj:
                raise RuntimeError(f"{name}: not the object's bytes")
            if len(sample.payload) != len(obj):
                raise RuntimeError(f"{name}: {len(sample.payload)} bytes, not {len(obj)}")
    for miss, hit in zip(samples["proxy-miss"], samples["proxy-hit"], strict=True):
        if miss.payload != hit.payload:
            raise RuntimeError("the proxy's hit is not the object it fetched")
    ProtectedObject.from_bytes(samples["proxy-hit"][0].payload)


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS, a producer, a proxy and a plain server; yield the transfer figures."""
    logging.getLogger("coap").setLevel(logging.ERROR)
    reps = 1 if settings.quick else 5
    with Testbed("oscar-bench-large-") as bed, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "DTLS module did not shut down", UserWarning)
        bundles = bed.start_as({PRODUCER: "producer", PROXY: "proxy"})
        port = free_port()
        argv = ["-m", "producer", "--bundle", str(bundles[PRODUCER]),
                "--state", str(bed.dir / "producer-state"), "--listen", f"127.0.0.1:{port}",
                "--profile", PROFILE, "--content-format", "42", "--max-age", str(MAX_AGE),
                "--resource", f"warm={bed.write('warm.bin', os.urandom(64))}",
                "--log-level", "info"]  # fmt: skip
        for size in SIZES:
            label = _label(size)
            value = bed.write(f"{label}.bin", os.urandom(size))
            argv += [arg for i in range(reps + 1) for arg in ("--resource", f"{label}-{i}={value}")]
        producer_process = bed.spawn(
            "producer", argv, ready=f"producer {PRODUCER} ready".encode(), timeout=60
        )
        producer = f"coap://127.0.0.1:{port}"

        async def objects() -> dict[int, bytes]:
            ctx = await Context.create_client_context(transports=["udp6"])
            try:
                return {
                    size: await _first_object(ctx, f"{producer}/{PRODUCER}/{_label(size)}-0")
                    for size in SIZES
                }
            finally:
                await ctx.shutdown()

        objs = asyncio.run(objects())
        proxy_port = free_port()
        proxy = bed.spawn(
            "proxy",
            ["-m", "proxy", "--bundle", str(bundles[PROXY]), "--state", str(bed.dir / "proxy"),
             "--listen", f"127.0.0.1:{proxy_port}", "--no-dtls",
             "--reverse", f"{PRODUCER}=coap://127.0.0.1:{port}"],
            ready=b"serving coap://",
        )  # fmt: skip
        plain_port = free_port()
        plain_argv = ["-m", "bench.plain_server", "--listen", f"127.0.0.1:{plain_port}",
                      "--content-format", "18"]  # fmt: skip
        for size, obj in objs.items():
            label = _label(size)
            plain_argv += ["--file", f"o{label}={bed.write(f'o{label}.cose', obj)}"]
        plain = bed.spawn("plain", plain_argv, ready=b"plain server ready")
        servers = Servers(
            f"coap://127.0.0.1:{proxy_port}", proxy.pid, producer, producer_process.pid,
            f"coap://127.0.0.1:{plain_port}", plain.pid,
        )  # fmt: skip

        for size in SIZES:
            label = _label(size)
            obj = objs[size]
            samples = asyncio.run(_measure(servers, size, reps))
            _check(samples, obj)
            median = {name: statistics.median(s.seconds for s in runs)
                      for name, runs in samples.items()}  # fmt: skip
            cpu = {name: statistics.median(s.cpu for s in runs) for name, runs in samples.items()}
            blocks = -(-len(obj) // BLOCK)
            print(
                f"  {label}: object {len(obj):,} B, {blocks} blocks of {BLOCK} B. Seconds "
                + "; ".join(
                    f"{name} {', '.join(f'{s.seconds:.2f}' for s in runs)}"
                    for name, runs in samples.items()
                )
                + ". Serving process CPU per transfer: "
                + ", ".join(f"{name} {cpu[name]:.2f} s" for name in samples)
                + f". Plain: {len(obj) / median['plain'] / 1024:.0f} KiB/s, "
                f"{median['plain'] / blocks * 1e3:.2f} ms per block",
                flush=True,
            )
            base = f"plain aiocoap server, the object's {len(obj):,} B block-wise"
            for name in ("proxy-hit", "proxy-miss", "producer"):
                yield Figure(f"transfer/{label}/{name}", median[name], "s", base,
                             median["plain"], lower_is_better=True)  # fmt: skip
