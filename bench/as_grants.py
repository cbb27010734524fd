"""AS access-secret grants per second over DTLS, beside a DTLS GET of a static resource.

One AS process (``oscar-as serve``) on 127.0.0.1 with a fresh state: one producer,
one resource ``bench-producer/reading`` and 5,000 more (``bench-producer/n<i>``), and 50 consumers
each granted them all (rate limit raised out of the way). For 1, 10 and 50 concurrent clients,
each a DTLS client context of its own consumer (so message IDs and sessions are spread as aiocoap
needs), every client repeats a request in windows of 0.25 s (0.5 s in a full run) that alternate
between the kinds, 4 windows of each (8 in a full run); the best window of each kind is kept, so a
burst of other load on the machine slows both kinds rather than one:

- ``grant``: ``GET /secret?r=bench-producer/reading``: authenticate, check the device and the
  grant in SQLite, decrypt the secret, answer in CBOR. Each client has had that secret once
  before the windows (its first delivery is audited, the later ones are not): the steady state
  of a consumer asking again;
- ``first``: ``GET /secret?r=bench-producer/n<i>``, a resource the client has not asked for
  before, so each is a first delivery, audited durably (an fsync'd transaction; concurrent ones
  share it) before the secret leaves: what consumers ask once per epoch;
- baseline ``static``: ``GET /.well-known/core`` on the same server, same clients, same run: the
  DTLS and CoAP cost with (almost) no work of ours (the device check only).

Reported per concurrency: grants/s and first deliveries/s against static GETs/s (the target,
issue 7's, is on ``grant``); grant latency p50/p99 over all ``grant`` windows; and the AS's CPU
time per request of each kind (``/proc/PID/stat`` around each window), as a row of its own
(``grants-cpu``: grants per AS CPU second against static GETs per AS CPU second, the same target).
On a 2-core machine the client process, as busy per request as the AS, shares the CPU with it, so
the rates measure both together; the CPU row measures the AS alone: its capacity, whatever the
client. Then DTLS handshakes/s: a new client context, handshake and one GET, one after the other.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiocoap import GET, Context, Message, error

from demo.system import free_port

from . import Figure, Settings
from .as_load import FRESH, PRODUCER, Target, client, load, percentile, prepare, start_as
from .as_load import grant as _grant
from .testbed import cpu_seconds

__all__ = ["run"]

CONCURRENCY = (1, 10, 50)
#: Grants/s ÷ static GET/s the AS should reach (issue 7's target).
TARGET_RATIO = 0.7


async def _load(
    clients: list[Context], port: int, target: Target, seconds: float
) -> tuple[float, list[float]]:
    """:func:`bench.as_load.load` with every client on the one AS at ``port``."""
    return await load(clients, [port] * len(clients), target, seconds)


@dataclass
class Kind:
    """One kind of request over the windows: best rate, latencies, server CPU per request."""

    target: Target
    best: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0
    requests: int = 0

    @property
    def cpu_per_request_us(self) -> float:
        return self.cpu / self.requests * 1e6 if self.requests else float("nan")


def _static(index: int) -> tuple[str, tuple[str, ...]]:
    return ".well-known/core", ()


class Fresh:
    """Each client's next resource never asked for before, over all concurrencies (client
    ``i`` is the same consumer at each); after FRESH of them, repeats (counted)."""

    def __init__(self, clients: int) -> None:
        self.asked = [0] * clients
        self.repeats = 0

    def __call__(self, index: int) -> tuple[str, tuple[str, ...]]:
        n = self.asked[index]
        self.asked[index] += 1
        if n >= FRESH:
            self.repeats += 1
        return "secret", (f"r={PRODUCER}/n{n % FRESH}",)


async def _measure(port: int, pid: int, psks: dict[str, bytes], settings: Settings) -> list[Figure]:
    window = 0.25 if settings.quick else 0.5
    windows = 4 if settings.quick else 8
    figures = []
    names = list(psks)
    fresh = Fresh(len(names))
    for concurrency in CONCURRENCY:
        clients = [await client(port, n, psks[n]) for n in names[:concurrency]]
        kinds = {
            "static": Kind(_static),
            "grant": Kind(_grant),
            "first": Kind(fresh),
        }
        try:
            await _load(clients, port, _static, 0.3)  # handshakes, warm-up
            await _load(clients, port, _grant, 0.2)  # each client's first delivery of RESOURCE
            for _ in range(windows):
                for kind in kinds.values():
                    cpu = cpu_seconds(pid)
                    rate, latencies = await _load(clients, port, kind.target, window)
                    kind.cpu += cpu_seconds(pid) - cpu
                    kind.requests += len(latencies)
                    kind.best = max(kind.best, rate)
                    kind.latencies.extend(latencies)
        finally:
            for ctx in clients:
                await ctx.shutdown()
        static, grant, first = kinds["static"], kinds["grant"], kinds["first"]
        print(
            f"  {concurrency:>2} clients: grant latency p50 "
            f"{percentile(grant.latencies, 0.5) * 1e3:.1f} ms, p99 "
            f"{percentile(grant.latencies, 0.99) * 1e3:.1f} ms ({len(grant.latencies)} grants); "
            f"first delivery p50 {percentile(first.latencies, 0.5) * 1e3:.1f} ms, p99 "
            f"{percentile(first.latencies, 0.99) * 1e3:.1f} ms. AS CPU per request: static "
            f"{static.cpu_per_request_us:.0f} us, grant {grant.cpu_per_request_us:.0f} us, "
            f"first delivery {first.cpu_per_request_us:.0f} us",
            flush=True,
        )
        baseline = "DTLS GET /.well-known/core, same server and clients"
        figures.append(
            Figure(
                f"grants/{concurrency}-clients",
                grant.best,
                "grants/s",
                baseline,
                static.best,
                min_ratio=TARGET_RATIO,
            )
        )
        figures.append(
            Figure(
                f"grants-cpu/{concurrency}-clients",
                1e6 / grant.cpu_per_request_us,
                "grants/CPU-s",
                "static GETs per AS CPU second, same windows",
                1e6 / static.cpu_per_request_us,
                min_ratio=TARGET_RATIO,
            )
        )
        figures.append(
            Figure(
                f"grants-first/{concurrency}-clients", first.best, "grants/s", baseline, static.best
            )
        )
    if fresh.repeats:
        print(f"  ({fresh.repeats} 'first' requests were repeats: FRESH is too small)")
    return figures


async def _handshakes(port: int, psks: dict[str, bytes], settings: Settings) -> float:
    """Handshakes/s, one after the other. aiocoap's DTLS client now and then loses a handshake
    (see producer_cpu): such a one is given up after 5 s, counted, and not in the rate."""
    count = 20 if settings.quick else 60
    device, psk = next(iter(psks.items()))
    done, lost, spent = 0, 0, 0.0
    while done < count and lost < 5:
        start = time.perf_counter()
        ctx = await client(port, device, psk)
        try:
            message = Message(code=GET, uri=f"coaps://127.0.0.1:{port}/crl")
            response = await asyncio.wait_for(ctx.request(message).response, 5.0)
        except (TimeoutError, OSError, error.NetworkError):
            lost += 1
            continue
        finally:
            await ctx.shutdown()
        if not response.code.is_successful():
            raise RuntimeError(f"/crl: {response.code}")
        done += 1
        spent += time.perf_counter() - start
    if lost:
        print(f"  ({lost} handshakes lost by the DTLS client, left out)")
    return done / spent if spent else 0.0


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS, measure, stop it; yield three figures per concurrency."""
    with tempfile.TemporaryDirectory(prefix="oscar-bench-as-") as tmp:
        state = Path(tmp) / "state"
        psks = asyncio.run(prepare(state))
        port = free_port()
        server = start_as(state, port, Path(tmp) / "as.log")
        try:
            figures = asyncio.run(_measure(port, server.pid, psks, settings))
            yield from figures
            rate = asyncio.run(_handshakes(port, psks, settings))
            print(f"  DTLS handshakes (new context + handshake + GET /crl): {rate:,.0f}/s")
            print(f"  server CPU time so far: {cpu_seconds(server.pid):.1f} s")
        finally:
            server.terminate()
            server.wait(timeout=10)
