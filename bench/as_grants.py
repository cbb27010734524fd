"""AS access-secret grants per second over DTLS, beside a DTLS GET of a static resource.

One AS process (``python -m authz_server.server``) on 127.0.0.1 with a fresh state: one producer,
one resource, and 50 consumers each granted it (rate limit raised out of the way). For 1, 10 and 50
concurrent clients, each a DTLS client context of its own consumer (so message IDs and sessions are
spread as aiocoap needs), every client repeats a request for a fixed time:

- ``grant``: ``GET /secret?r=RESOURCE``: authenticate, check the device and the grant in SQLite,
  decrypt the secret, answer in CBOR;
- baseline ``static``: ``GET /.well-known/core`` on the same server, same clients, same run: the
  DTLS and CoAP cost with (almost) no work of ours.

Reported per concurrency: grants/s, static GETs/s, their ratio, and grant latency p50/p99. Then
DTLS handshakes/s: a new client context, handshake and one GET, one after the other.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from aiocoap import GET, Context, Message

from demo.system import free_port

from . import Figure, Settings

__all__ = ["run"]

PRODUCER = "bench-producer"
RESOURCE = f"{PRODUCER}/reading"
CONSUMERS = 50
CONCURRENCY = (1, 10, 50)
#: Grants/s ÷ static GET/s the AS should reach (issue 7's target).
TARGET_RATIO = 0.7


async def _prepare(state: Path) -> dict[str, bytes]:
    from authz_server.ca import init_state
    from authz_server.store import Resource

    now = int(time.time())
    store = await init_state(state, as_uri="coaps://127.0.0.1", now=now)
    try:
        await store.add_device(PRODUCER, "producer", os.urandom(16), now)
        await store.register_resource(Resource(RESOURCE, PRODUCER, 0, "ccm-es256", 60, 0, now))
        psks = {}
        for i in range(CONSUMERS):
            name = f"bench-consumer-{i}"
            psks[name] = os.urandom(16)
            await store.add_device(name, "consumer", psks[name], now)
            await store.add_grant(name, f"{PRODUCER}/*", None, now)
        return psks
    finally:
        await store.close()


async def _client(port: int, device: str, psk: bytes) -> Context:
    ctx = await Context.create_client_context(transports=["tinydtls"])
    ctx.client_credentials.load_from_dict(
        {f"coaps://127.0.0.1:{port}/*": {"dtls": {"psk": psk, "client-identity": device.encode()}}}
    )
    return ctx


async def _load(
    clients: list[Context], port: int, path: str, query: tuple[str, ...], seconds: float
) -> tuple[float, list[float]]:
    """Requests/s over all clients and every request's latency, each client looping ``seconds``."""
    latencies: list[float] = []
    uri = f"coaps://127.0.0.1:{port}/{path}"

    async def loop(ctx: Context) -> int:
        done = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            message = Message(code=GET, uri=uri)
            if query:
                message.opt.uri_query = query
            start = time.perf_counter()
            response = await ctx.request(message).response
            latencies.append(time.perf_counter() - start)
            if not response.code.is_successful():
                raise RuntimeError(f"{path}: {response.code}")
            done += 1
        return done

    start = time.perf_counter()
    counts = await asyncio.gather(*(loop(ctx) for ctx in clients))
    return sum(counts) / (time.perf_counter() - start), latencies


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def _measure(port: int, psks: dict[str, bytes], settings: Settings) -> list[Figure]:
    seconds = 1.0 if settings.quick else 3.0
    figures = []
    names = list(psks)
    for concurrency in CONCURRENCY:
        clients = [await _client(port, n, psks[n]) for n in names[:concurrency]]
        try:
            await _load(clients, port, ".well-known/core", (), 0.3)  # handshakes, warm-up
            query = (f"r={RESOURCE}",)
            best_grant, best_static, latencies = 0.0, 0.0, []
            for _ in range(1 if settings.quick else 2):
                static, _ = await _load(clients, port, ".well-known/core", (), seconds)
                grant, lat = await _load(clients, port, "secret", query, seconds)
                best_static = max(best_static, static)
                if grant > best_grant:
                    best_grant, latencies = grant, lat
        finally:
            for ctx in clients:
                await ctx.shutdown()
        p50 = _percentile(latencies, 0.5) * 1e3
        p99 = _percentile(latencies, 0.99) * 1e3
        print(
            f"  {concurrency:>2} clients: grant latency p50 {p50:.1f} ms, p99 {p99:.1f} ms "
            f"({len(latencies)} grants)",
            flush=True,
        )
        figures.append(
            Figure(
                f"grants/{concurrency}-clients",
                best_grant,
                "grants/s",
                "DTLS GET /.well-known/core, same server and clients",
                best_static,
                min_ratio=TARGET_RATIO,
            )
        )
    return figures


async def _handshakes(port: int, psks: dict[str, bytes], settings: Settings) -> float:
    count = 20 if settings.quick else 60
    device, psk = next(iter(psks.items()))
    start = time.perf_counter()
    for _ in range(count):
        ctx = await _client(port, device, psk)
        response = await ctx.request(
            Message(code=GET, uri=f"coaps://127.0.0.1:{port}/crl")
        ).response
        if not response.code.is_successful():
            raise RuntimeError(f"/crl: {response.code}")
        await ctx.shutdown()
    return count / (time.perf_counter() - start)


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS, measure, stop it; yield one figure per concurrency."""
    with tempfile.TemporaryDirectory(prefix="oscar-bench-as-") as tmp:
        state = Path(tmp) / "state"
        psks = asyncio.run(_prepare(state))
        port = free_port()
        log = open(Path(tmp) / "as.log", "wb")  # noqa: SIM115 (closed below)
        server = subprocess.Popen(
            [sys.executable, "-m", "authz_server.server", "--state", str(state),
             "--listen", f"127.0.0.1:{port}", "--rate", "1000000", "--burst", "1000000",
             "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait_until_serving(Path(tmp) / "as.log", server)
            figures = asyncio.run(_measure(port, psks, settings))
            yield from figures
            rate = asyncio.run(_handshakes(port, psks, settings))
            print(f"  DTLS handshakes (new context + handshake + GET /crl): {rate:,.0f}/s")
            cpu = _server_cpu(server.pid)
            if cpu is not None:
                print(f"  server CPU time so far: {cpu:.1f} s")
        finally:
            server.terminate()
            server.wait(timeout=10)
            log.close()


def _wait_until_serving(log: Path, server: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"serving coaps://" in log.read_bytes():
            return
        if server.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("the AS did not start: " + log.read_text(errors="replace")[-2000:])


def _server_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
