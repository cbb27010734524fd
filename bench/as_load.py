"""What the AS benchmarks share: a fresh AS state to serve, ``oscar-as serve`` started on it,
DTLS clients of its consumers, and the closed loop of requests that measures rate and latency.

- :func:`prepare`: one producer, one resource :data:`RESOURCE` and ``fresh`` more
  (``bench-producer/n<i>``), :data:`CONSUMERS` consumers granted them all; on SQLite in the state
  directory or on an empty PostgreSQL database (``database``, recorded in the state directory as
  ``oscar-as init --database`` does);
- :func:`start_as`: ``python -m authz_server serve`` on that state, rate limit out of the way,
  returned once it logs that it serves;
- :func:`client`: an aiocoap DTLS client context with one consumer's PSK;
- :func:`load`: every client repeats a request (:func:`grant`, say) for a number of seconds, the
  next one as soon as the last is answered; requests/s over all clients and each latency.

Used by :mod:`bench.as_grants` and :mod:`bench.as_cluster`. What it does not do: decide what to
measure or report figures.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from aiocoap import GET, Context, Message

__all__ = [
    "CONSUMERS",
    "FRESH",
    "PRODUCER",
    "RESOURCE",
    "Target",
    "client",
    "grant",
    "load",
    "percentile",
    "prepare",
    "start_as",
]

PRODUCER = "bench-producer"
RESOURCE = f"{PRODUCER}/reading"
#: Resources each client may ask for once, for first deliveries (enough for as_grants' full run).
FRESH = 5000
CONSUMERS = 50

#: A request's path and query, given the client's number.
Target = Callable[[int], tuple[str, tuple[str, ...]]]


def grant(index: int) -> tuple[str, tuple[str, ...]]:
    """The grant every client asks for again and again: ``GET /secret?r=`` :data:`RESOURCE`."""
    return "secret", (f"r={RESOURCE}",)


async def prepare(
    state: Path, *, database: str | None = None, fresh: int = FRESH
) -> dict[str, bytes]:
    """Make the AS state (see the module docstring); each consumer's PSK by device id."""
    from authz_server.ca import init_state
    from authz_server.store import Resource

    now = int(time.time())
    store = await init_state(state, as_uri="coaps://127.0.0.1", now=now, database=database)
    try:
        await store.add_device(PRODUCER, "producer", os.urandom(16), now)
        ids = [RESOURCE, *(f"{PRODUCER}/n{i}" for i in range(fresh))]
        await store.register_resources(
            [Resource(rid, PRODUCER, 0, "ccm-es256", 60, 0, now) for rid in ids]
        )
        psks = {f"bench-consumer-{i}": os.urandom(16) for i in range(CONSUMERS)}
        await store.add_devices([(name, "consumer", psk) for name, psk in psks.items()], now)
        await store.add_grants([(name, f"{PRODUCER}/*", None) for name in psks], now)
        return psks
    finally:
        await store.close()


def start_as(state: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``oscar-as serve`` on ``state`` at 127.0.0.1:``port`` (its output in ``log_path``), once
    serving. RuntimeError with the log's tail if it exits or is not serving within 20 s (the
    process is killed then)."""
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "authz_server", "serve", "--state", str(state),
             "--listen", f"127.0.0.1:{port}", "--rate", "1000000", "--burst", "1000000",
             "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if b"serving coaps://" in log_path.read_bytes():
            return server
        if server.poll() is not None:
            break
        time.sleep(0.05)
    server.kill()
    server.wait()
    raise RuntimeError("the AS did not start: " + log_path.read_text(errors="replace")[-2000:])


async def client(port: int, device: str, psk: bytes) -> Context:
    """A DTLS client context of ``device`` for the AS at 127.0.0.1:``port``."""
    ctx = await Context.create_client_context(transports=["tinydtls"])
    ctx.client_credentials.load_from_dict(
        {f"coaps://127.0.0.1:{port}/*": {"dtls": {"psk": psk, "client-identity": device.encode()}}}
    )
    return ctx


async def load(
    clients: Sequence[Context], ports: Sequence[int], target: Target, seconds: float
) -> tuple[float, list[float]]:
    """Requests/s over all clients and every request's latency, each client (``clients[i]``
    talking to the AS at ``ports[i]``) looping ``seconds``. RuntimeError on an answer that is not
    a success."""
    latencies: list[float] = []

    async def loop(index: int, ctx: Context, port: int) -> int:
        done = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            path, query = target(index)
            message = Message(code=GET, uri=f"coaps://127.0.0.1:{port}/{path}")
            if query:
                message.opt.uri_query = query
            start = time.perf_counter()
            response = await ctx.request(message).response
            latencies.append(time.perf_counter() - start)
            if not response.code.is_successful():
                raise RuntimeError(f"{path} {query}: {response.code}")
            done += 1
        return done

    start = time.perf_counter()
    counts = await asyncio.gather(
        *(loop(i, ctx, port) for i, (ctx, port) in enumerate(zip(clients, ports, strict=True)))
    )
    return sum(counts) / (time.perf_counter() - start), latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]
