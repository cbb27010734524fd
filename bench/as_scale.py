"""The AS at scale: grant latency, memory, database size and start-up, 1,000 to 100,000 resources.

For each size (R resources, C consumers: 1,000 and 100, 10,000 and 1,000, 100,000 and 10,000;
with ``--quick`` 1,000 and 100, 3,000 and 300, 10,000 and 1,000) a fresh AS state is generated in
this process through the AS's own store API, as the admin CLI and the endpoints write it (PSKs and
access secrets encrypted by the vault, one audit record per change), in bulk transactions
(:meth:`Store.add_devices`, :meth:`Store.register_resources`, :meth:`Store.add_grants`: one
commit per 2,000 records instead of one each, which would take hours at the largest size):

- R / 100 producers with 100 resources each (``scale-p<j>/r<i>``, rotation period one hour, so
  nothing rotates during the run), each resource with its active and pre-active epoch;
- C consumers with 5 grants each: 4 single resources drawn at random, and one producer's
  resources by pattern (``scale-p<j>/*``, 100 resources); 5 C grants in all.

Then a real AS process (``oscar-as serve``, rate limit out of the way) starts on
the state, and from this process a sample of consumers (40; 100 in a full run) not seen before,
one after the other, each its own DTLS client context and identity:

- ``handshake``: DTLS handshake and one ``GET /.well-known/core`` (excluded from the grant
  latencies);
- ``grant``: ``GET /secret`` of 8 resources it may read (its 4 single grants and 4 of its pattern
  grant), each the first delivery of that epoch to that consumer, so each is audited, durably,
  before the secret leaves;
- ``repeat``: the same 8 again (already delivered: read-only);
- ``list``: ``GET /resources`` once (the resources it may read, 104).

Measured per size: those latencies (p50/p99 over the sample), the AS's VmRSS after start-up and
after the sample, the database on disk (``as.db``, ``-wal`` and ``-shm`` after generation), the
generation time, the AS start-up (spawn to its "serving" log line), and its idle CPU (ms of CPU
per second over a few seconds without requests: the once-a-second scheduler and the change
poll). Figures without baseline, lower is better; then the growth of each from the smallest to the
largest size (value: largest, baseline: smallest), no target; and a plot against R.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import statistics
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiocoap import GET, Context, Message, error

from . import Figure, Plot, Settings
from .testbed import Testbed, cpu_seconds, free_port

__all__ = ["run"]

SIZES = ((1_000, 100), (10_000, 1_000), (100_000, 10_000))
QUICK_SIZES = ((1_000, 100), (3_000, 300), (10_000, 1_000))
RESOURCES_PER_PRODUCER = 100
SINGLE_GRANTS = 4  # plus one pattern grant over one producer's resources
ROTATION_PERIOD = 3600
#: Records per bulk transaction while generating.
BULK = 2000
#: Resources each sampled consumer asks for (first deliveries, then again).
ASKED = 8
REQUEST_TIMEOUT = 5.0
READY = b"serving coaps://"


def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def _disk_bytes(state: Path) -> int:
    return sum(
        (state / name).stat().st_size
        for name in ("as.db", "as.db-wal", "as.db-shm")
        if (state / name).exists()
    )


# --- generating the state -------------------------------------------------------------------------


@dataclass
class Generated:
    resources: int
    consumers: int
    grants: int
    seconds: float
    disk_bytes: int
    psks: dict[str, bytes]
    #: consumer -> the resources it may read: its single grants, then its pattern's resources
    readable: dict[str, list[str]]


def _producer(j: int) -> str:
    return f"scale-p{j}"


def _resource(j: int, i: int) -> str:
    return f"{_producer(j)}/r{i}"


async def _generate(state: Path, resources: int, consumers: int, rng: random.Random) -> Generated:
    from authz_server.ca import init_state
    from authz_server.store import Resource

    began = time.perf_counter()
    now = int(time.time())
    producers = max(1, resources // RESOURCES_PER_PRODUCER)
    store = await init_state(state, as_uri="coaps://127.0.0.1", now=now)
    try:
        await store.add_devices(
            [(_producer(j), "producer", os.urandom(16)) for j in range(producers)], now
        )
        ids = [(j, i) for j in range(producers) for i in range(resources // producers)]  # R in all
        for start in range(0, len(ids), BULK):
            await store.register_resources(
                [
                    Resource(_resource(j, i), _producer(j), 0, "ccm-es256", 60,
                             ROTATION_PERIOD, now)
                    for j, i in ids[start : start + BULK]
                ]
            )  # fmt: skip
        psks = {f"scale-c{k}": os.urandom(16) for k in range(consumers)}
        names = list(psks)
        for start in range(0, len(names), BULK):
            await store.add_devices(
                [(name, "consumer", psks[name]) for name in names[start : start + BULK]], now
            )
        readable: dict[str, list[str]] = {}
        grants: list[tuple[str, str, int | None]] = []
        per_producer = resources // producers
        for name in names:
            singles = [_resource(*ids[n]) for n in rng.sample(range(len(ids)), SINGLE_GRANTS)]
            j = rng.randrange(producers)
            grants.extend((name, rid, None) for rid in singles)
            grants.append((name, f"{_producer(j)}/*", None))
            pattern = [_resource(j, i) for i in rng.sample(range(per_producer), ASKED)]
            readable[name] = singles + [r for r in pattern if r not in singles]
        for start in range(0, len(grants), BULK):
            await store.add_grants(grants[start : start + BULK], now)
    finally:
        await store.close()
    return Generated(
        resources=len(ids),
        consumers=consumers,
        grants=len(grants),
        seconds=time.perf_counter() - began,
        disk_bytes=_disk_bytes(state),
        psks=psks,
        readable=readable,
    )


# --- the AS process and the sample ----------------------------------------------------------------


def _start(
    bed: Testbed, name: str, state: Path, port: int
) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn the AS; seconds until its log says it serves."""
    argv = ["-m", "authz_server", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
            "--rate", "1000000", "--burst", "1000000", "--log-level", "info"]  # fmt: skip
    began = time.perf_counter()
    process = bed.launch(name, argv)
    deadline = began + 300
    while time.perf_counter() < deadline and process.poll() is None:
        if READY in bed.log(name).encode():
            return process, time.perf_counter() - began
        time.sleep(0.01)
    raise RuntimeError(f"the AS did not start:\n{bed.log(name)[-2000:]}")


@dataclass
class Sample:
    handshake: list[float] = field(default_factory=list)
    grant: list[float] = field(default_factory=list)
    repeat: list[float] = field(default_factory=list)
    listing: list[float] = field(default_factory=list)
    failed: int = 0


async def _consumer(port: int, name: str, psk: bytes, readable: list[str], sample: Sample) -> None:
    """One consumer's requests, timed; every answer must be 2.05."""
    uri = f"coaps://127.0.0.1:{port}"
    ctx = await Context.create_client_context(transports=["tinydtls"])
    ctx.client_credentials.load_from_dict(
        {f"{uri}/*": {"dtls": {"psk": psk, "client-identity": name.encode()}}}
    )

    async def timed(path: str, query: tuple[str, ...] = ()) -> float:
        message = Message(code=GET, uri=f"{uri}/{path}")
        if query:
            message.opt.uri_query = query
        start = time.perf_counter()
        response = await asyncio.wait_for(ctx.request(message).response, REQUEST_TIMEOUT)
        took = time.perf_counter() - start
        if not response.code.is_successful():
            raise RuntimeError(f"{name} GET /{path} {query}: {response.code}")
        return took

    try:
        handshake = await timed(".well-known/core")
        asked = readable[:ASKED]
        grant = [await timed("secret", (f"r={rid}",)) for rid in asked]
        repeat = [await timed("secret", (f"r={rid}",)) for rid in asked]
        listing = await timed("resources")
    finally:
        await ctx.shutdown()
    sample.handshake.append(handshake)
    sample.grant.extend(grant)
    sample.repeat.extend(repeat)
    sample.listing.append(listing)


async def _sample(port: int, generated: Generated, count: int, rng: random.Random) -> Sample:
    sample = Sample()
    names = rng.sample(sorted(generated.psks), min(len(generated.psks), count * 2))
    for name in names:
        if len(sample.handshake) >= count:
            break
        try:
            await _consumer(port, name, generated.psks[name], generated.readable[name], sample)
        except (
            TimeoutError,
            OSError,
            error.NetworkError,
        ) as exc:  # aiocoap's DTLS client now and then loses one
            sample.failed += 1
            print(f"    {name}: {type(exc).__name__}; the next consumer instead", flush=True)
    if len(sample.handshake) < count // 2:
        raise RuntimeError(f"only {len(sample.handshake)} of {count} consumers were served")
    return sample


@dataclass
class Measured:
    resources: int
    consumers: int
    grants: int
    generate_s: float
    disk_mib: float
    disk_after_mib: float
    startup_ms: float
    rss_start_mib: float
    rss_mib: float
    idle_cpu_ms_per_s: float
    handshake_ms: float
    grant_p50_ms: float
    grant_p99_ms: float
    repeat_p50_ms: float
    repeat_p99_ms: float
    list_p50_ms: float
    sampled: int
    failed: int


def _measure(
    bed: Testbed, resources: int, consumers: int, settings: Settings, rng: random.Random
) -> Measured:
    state = bed.dir / f"state-{resources}"
    generated = asyncio.run(_generate(state, resources, consumers, rng))
    port = free_port()
    name = f"as-{resources}"
    process, startup = _start(bed, name, state, port)
    try:
        rss_start = _rss_kib(process.pid)
        count = 40 if settings.quick else 100
        sample = asyncio.run(_sample(port, generated, count, rng))
        rss = _rss_kib(process.pid)
        idle = 2.0 if settings.quick else 5.0
        cpu_before = cpu_seconds(process.pid)
        time.sleep(idle)
        idle_cpu = (cpu_seconds(process.pid) - cpu_before) / idle
    finally:
        bed.stop(process)
    disk_after = _disk_bytes(state)  # with the deliveries the sample added (and their audit)
    return Measured(
        resources=generated.resources,
        consumers=consumers,
        grants=generated.grants,
        generate_s=generated.seconds,
        disk_mib=generated.disk_bytes / 2**20,
        disk_after_mib=disk_after / 2**20,
        startup_ms=startup * 1e3,
        rss_start_mib=rss_start / 1024,
        rss_mib=rss / 1024,
        idle_cpu_ms_per_s=idle_cpu * 1e3,
        handshake_ms=statistics.median(sample.handshake) * 1e3,
        grant_p50_ms=_percentile(sample.grant, 0.5) * 1e3,
        grant_p99_ms=_percentile(sample.grant, 0.99) * 1e3,
        repeat_p50_ms=_percentile(sample.repeat, 0.5) * 1e3,
        repeat_p99_ms=_percentile(sample.repeat, 0.99) * 1e3,
        list_p50_ms=_percentile(sample.listing, 0.5) * 1e3,
        sampled=len(sample.handshake),
        failed=sample.failed,
    )


# --- figures --------------------------------------------------------------------------------------

#: (attribute, figure name, unit) of the figures per size, lower is better for all.
_FIGURES = (
    ("grant_p50_ms", "grant-p50", "ms"),
    ("grant_p99_ms", "grant-p99", "ms"),
    ("repeat_p50_ms", "repeat-p50", "ms"),
    ("repeat_p99_ms", "repeat-p99", "ms"),
    ("list_p50_ms", "list-p50", "ms"),
    ("handshake_ms", "handshake", "ms"),
    ("rss_mib", "rss", "MiB"),
    ("disk_mib", "db", "MiB"),
    ("startup_ms", "startup", "ms"),
    ("generate_s", "generate", "s"),
    ("idle_cpu_ms_per_s", "idle-cpu", "ms/s"),
)


def _figures(m: Measured) -> Iterator[Figure]:
    for attr, what, unit in _FIGURES:
        name = f"as-scale/{_count(m.resources)}-resources/{what}"
        yield Figure(name, getattr(m, attr), unit, lower_is_better=True)


def _growth(small: Measured, large: Measured) -> Iterator[Figure]:
    base = f"the same at {small.resources:,} resources, {small.consumers:,} consumers"
    tag = f"as-scale/growth-{_count(small.resources)}-{_count(large.resources)}"
    for attr, what, unit in _FIGURES:
        if attr == "generate_s":
            continue  # the work itself grows with the size: shown per size above
        yield Figure(
            f"{tag}/{what}", getattr(large, attr), unit, base, getattr(small, attr),
            lower_is_better=True,
        )  # fmt: skip


def _plot(results: list[Measured]) -> Plot:
    def series(attr: str) -> list[tuple[float, float]]:
        return [(float(m.resources), float(getattr(m, attr))) for m in results]

    return Plot(
        name="as-scale",
        title="The AS with R resources and R/10 consumers (5 grants each)",
        xlabel="resources",
        ylabel="",
        series={
            "latency|grant p50 (first delivery, audited)": series("grant_p50_ms"),
            "latency|grant p99 (first delivery, audited)": series("grant_p99_ms"),
            "latency|grant p50 (repeat)": series("repeat_p50_ms"),
            "latency|GET /resources p50": series("list_p50_ms"),
            "memory|VmRSS after start-up": series("rss_start_mib"),
            "memory|VmRSS after the sample": series("rss_mib"),
            "disk|database (as.db, -wal, -shm)": series("disk_mib"),
        },
        logx=True,
        panels=(("latency", "ms"), ("memory", "VmRSS (MiB)"), ("disk", "MiB")),
    )


def run(settings: Settings) -> Iterator[Figure | Plot]:
    """Generate each size, start an AS on it, sample; yield figures, growth and a plot."""
    logging.getLogger("coap").setLevel(logging.CRITICAL)
    rng = random.Random(7)
    results: list[Measured] = []
    with Testbed("oscar-bench-as-scale-") as bed, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "DTLS module did not shut down", UserWarning)
        for resources, consumers in QUICK_SIZES if settings.quick else SIZES:
            m = _measure(bed, resources, consumers, settings, rng)
            results.append(m)
            print(
                f"  {m.resources:,} resources, {m.consumers:,} consumers, {m.grants:,} grants: "
                f"generated in {m.generate_s:.1f} s, {m.disk_mib:.1f} MiB on disk "
                f"({m.disk_after_mib:.1f} MiB after the run); AS start-up "
                f"{m.startup_ms:.0f} ms, VmRSS {m.rss_start_mib:.1f} MiB, after the sample "
                f"{m.rss_mib:.1f} MiB, idle CPU {m.idle_cpu_ms_per_s:.1f} ms/s. {m.sampled} "
                f"consumers ({m.failed} lost to the DTLS client): handshake {m.handshake_ms:.1f}"
                f" ms, grant p50 {m.grant_p50_ms:.2f} p99 {m.grant_p99_ms:.2f} ms, repeat p50 "
                f"{m.repeat_p50_ms:.2f} p99 {m.repeat_p99_ms:.2f} ms, /resources p50 "
                f"{m.list_p50_ms:.2f} ms",
                flush=True,
            )
            yield from _figures(m)
            shutil.rmtree(bed.dir / f"state-{resources}", ignore_errors=True)  # up to 100s of MiB
        yield from _growth(results[0], results[-1])
        yield _plot(results)
