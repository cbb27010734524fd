"""Part (c) of :mod:`bench.proxy_hits`: the proxy's fast-path hits under a raw UDP load.

The 64 B reading's object from the proxy under :func:`bench.udpload.run_load` (raw UDP sockets,
each answering the proxy's Echo challenge once first, untimed), beside the plain aiocoap server
sending the same bytes and a second proxy with ``OSCAR_PROXY_FASTPATH=off`` under the same load;
alternating windows, each target's best kept. :mod:`bench.proxy_hits` starts the processes.

Two figures carry issue 16's target (at least 10 times the plain server, per core): GET/s, and
server CPU time per GET (the per-core measure: on a 2-core machine the load generator in this
process takes most of a core itself, so at the fast path's rates GET/s can be bound by the load
as much as by the server).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import NamedTuple

from aiocoap import GET, Context, Message

from . import Figure, Settings
from .testbed import cpu_seconds
from .udpload import run_load

__all__ = ["FAST_SIZE", "FAST_TARGET_RATIO", "FastTarget", "proxy_stats", "run_fast"]

#: Fast-path GET/s ÷ plain GET/s of the same bytes (issue 16), and the load.
FAST_TARGET_RATIO = 10.0
FAST_SIZE = 64
SOCKETS = 16
IN_FLIGHT = 4


class FastTarget(NamedTuple):
    name: str
    uri: str
    pid: int


class FastResult(NamedTuple):
    rate: float
    cpu_per_get: float
    resent: int


def _label(size: int) -> str:
    return f"{size // 1024}KiB" if size >= 1024 and size % 1024 == 0 else f"{size}B"


def fast_load(target: FastTarget, size: int, seconds: float) -> FastResult:
    """One window of :func:`bench.udpload.run_load` on ``target`` (proxies: from verified
    addresses); GET/s and the server's CPU seconds per GET."""
    rest = target.uri.removeprefix("coap://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    prove = target.name != "plain"
    cpu_before = cpu_seconds(target.pid)
    result = run_load(
        (host, int(port)), path, size, seconds, sockets=SOCKETS, in_flight=IN_FLIGHT, prove=prove
    )
    cpu = cpu_seconds(target.pid) - cpu_before
    if result.errors or not result.gets:
        raise RuntimeError(f"{target.uri}: {result.errors} bad answers, {result.gets} GETs")
    return FastResult(result.rate, cpu / result.gets, result.resent)


def run_fast(
    settings: Settings, targets: list[FastTarget], obj: bytes, proxy_port: int
) -> Iterator[Figure]:
    window = 1.0 if settings.quick else 2.5
    rounds = 2 if settings.quick else 4
    before = asyncio.run(_stats_of(proxy_port))
    for target in targets:  # warm up (the second proxy's first GET fetches), check the answers
        fast_load(target, len(obj), 0.3)
    best: dict[str, FastResult] = {}
    for i in range(rounds):
        for target in targets if i % 2 == 0 else reversed(targets):
            result = fast_load(target, len(obj), window)
            if target.name not in best or result.rate > best[target.name].rate:
                best[target.name] = result
    after = asyncio.run(_stats_of(proxy_port))
    fast_hits, hits = (after[k] - before[k] for k in ("fast_hits", "hits"))
    print(
        f"  {_label(FAST_SIZE)} reading, object {len(obj)} B, raw UDP load: "
        + ", ".join(f"{n} {r.rate:,.0f} GET/s" for n, r in best.items())
        + ". Server CPU per GET: "
        + ", ".join(f"{n} {r.cpu_per_get * 1e6:.0f} us" for n, r in best.items())
        + f". Proxy over the windows: {hits:,} hits, {fast_hits:,} of them on the fast path"
        + (
            f"; {resent} requests resent"
            if (resent := sum(r.resent for r in best.values()))
            else ""
        ),
        flush=True,
    )
    yield Figure(
        f"proxy-fast-hit/{_label(FAST_SIZE)}",
        best["fast"].rate,
        "GET/s",
        f"plain aiocoap server, the object's {len(obj)} B",
        best["plain"].rate,
        min_ratio=FAST_TARGET_RATIO,
    )
    yield Figure(
        f"proxy-fast-hit/{_label(FAST_SIZE)}/cpu",
        best["fast"].cpu_per_get * 1e6,
        "us CPU per GET",
        f"plain aiocoap server, the object's {len(obj)} B",
        best["plain"].cpu_per_get * 1e6,
        min_ratio=FAST_TARGET_RATIO,
        lower_is_better=True,
    )
    yield Figure(
        f"proxy-fast-hit/{_label(FAST_SIZE)}/aiocoap-path",
        best["fast"].rate,
        "GET/s",
        "the same proxy's hits through aiocoap (OSCAR_PROXY_FASTPATH=off)",
        best["aiocoap-path"].rate,
    )


async def _stats_of(port: int) -> dict[str, int]:
    ctx = await Context.create_client_context(transports=["udp6"])
    try:
        return await proxy_stats(ctx, port)
    finally:
        await ctx.shutdown()


async def proxy_stats(ctx: Context, port: int) -> dict[str, int]:
    uri = f"coap://127.0.0.1:{port}/.well-known/oscar-stats"
    response = await asyncio.wait_for(ctx.request(Message(code=GET, uri=uri)).response, 10)
    if response.code.dotted != "2.05":
        raise RuntimeError(f"GET {uri}: {response.code}")
    stats: dict[str, int] = json.loads(response.payload)
    return stats
