"""Producer CPU time to serve N consumers one reading each: OSCAR against DTLS per consumer.

Two server processes on 127.0.0.1, measured in the same run:

- OSCAR: a real AS and producer process (``python -m producer``, plain CoAP over ``udp6``) with one
  64 B text reading, sealed once under the default profile. Each consumer is a fresh aiocoap
  client context (its own source port) sending one confirmable GET for the protected object.
- DTLS baseline: :mod:`bench.plain_server` with only aiocoap's ``tinydtls_server`` transport,
  serving the same 64 B reading in plaintext, with one PSK per consumer identity (100 of them).
  Each consumer is a fresh client context with its own identity and PSK: a full DTLS-PSK
  handshake, one GET, and the session closed (close_notify) when the context shuts down.
  aiocoap's DTLS server keeps an entry per source address and never forgets it, and now and then
  a new consumer's handshake goes unanswered once a few hundred have been served (most likely when
  the OS hands out a source port an earlier consumer used): each measurement gets a new DTLS
  server process, and a consumer without an answer after 2 s tries again with a new client
  context (counted and printed; the server CPU of failed attempts is included).

For N = 1, 10 and 100, the N consumers of a round run concurrently; rounds repeat until about 200
readings (1,000 in a full run) have been served, so that the CPU time, read from
``/proc/PID/stat`` (utime + stime, 10 ms ticks) of the server process before and after, is long
enough to measure. Reported per N: server CPU seconds per round (N readings) for each, their ratio
DTLS / OSCAR, the servers' idle CPU rate (measured beforehand, not subtracted), and the UDP payload
bytes the server sent per round (counted as the consumers received them, handshakes included).
The sides alternate per N; a full run measures each twice and keeps the lower CPU time.

The figure rows give readings per server CPU second (bigger is better), so ``ours / baseline`` is
the ratio DTLS CPU / OSCAR CPU; the target printed is issue 7's, a ratio of at least 10 at N = 100
(overhead below -90 %).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from aiocoap import GET, Context, Message
from aiocoap import error as aiocoap_error
from aiocoap.transports import tinydtls, udp6

from . import Figure, Settings
from .testbed import Testbed, cpu_seconds, free_port

__all__ = ["run"]

PRODUCER = "bench-producer"
CONSUMER_COUNTS = (1, 10, 100)
READING = b"temperature=21.5C humidity=40.2% pressure=1013.2hPa wind=3.1m/s\n"[:64]
#: DTLS/OSCAR CPU ratio issue 7 asks for at N = 100.
TARGET_RATIO = 10.0
#: Consumers of a round that are fetching at the same time.
IN_FLIGHT = 16
#: A consumer that has no answer after this many seconds tries again with a new client context.
ATTEMPT_TIMEOUT = 2.0
ATTEMPTS = 4


class Side(NamedTuple):
    """One server under test and how a consumer reaches it."""

    name: str
    pid: int
    consumer: Callable[[int], Any]  # consumer index -> coroutine making one reading


class Measured(NamedTuple):
    cpu_per_round: float
    bytes_per_round: float
    rounds: int
    failed_attempts: int


class _ReceivedBytes:
    """Counts UDP payload bytes that client contexts of this process receive (what the server
    sent them), by wrapping the receive methods of aiocoap's udp6 and tinydtls client transports
    while counting. Those are aiocoap internals: if they move, bytes are simply not reported."""

    def __init__(self) -> None:
        self.total = 0
        self.working = True

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        targets = [
            (udp6.MessageInterfaceUDP6, "datagram_msg_received", 0),
            (tinydtls.DTLSClientConnection.SingleConnection, "datagram_received", 0),
        ]
        saved = []
        try:
            for cls, name, index in targets:
                original = getattr(cls, name)
                saved.append((cls, name, original))
                setattr(cls, name, self._wrap(original, index))
        except AttributeError:
            self.working = False
        try:
            yield
        finally:
            for cls, name, original in saved:
                setattr(cls, name, original)

    def _wrap(self, original: Callable[..., Any], index: int) -> Callable[..., Any]:
        counter = self

        def received(self: Any, *args: Any) -> Any:
            counter.total += len(args[index])
            return original(self, *args)

        return received


def _close_dtls_sessions(ctx: Context) -> None:
    """Send close_notify on every DTLS session of a client context.

    aiocoap's shutdown only drops a session (tinydtls ``resetPeer`` sends nothing); a consumer
    that is done should tell the server, as this one does. It reaches into aiocoap's internals:
    if they move, the sessions are simply left open.
    """
    with contextlib.suppress(AttributeError):
        for interface in ctx.request_interfaces:
            transport = interface.token_interface.message_interface.message_interface
            for connection in list(getattr(transport, "_pool", {}).values()):
                if connection._connection is not None:
                    connection._dtls_socket.close(connection._connection)


async def _one_reading(ctx_factory: Callable[[], Any], uri: str) -> int:
    """One consumer's reading, each attempt from a fresh client context (so a fresh source port);
    returns the number of failed attempts. RuntimeError after ``ATTEMPTS`` failures."""
    for failures in range(ATTEMPTS):
        ctx = await ctx_factory()
        try:
            request = ctx.request(Message(code=GET, uri=uri))
            response = await asyncio.wait_for(request.response, ATTEMPT_TIMEOUT)
            if response.code.dotted != "2.05":
                raise RuntimeError(f"GET {uri}: {response.code}")
            return failures
        except (TimeoutError, aiocoap_error.Error):  # no answer, or a DTLS alert
            continue
        finally:
            _close_dtls_sessions(ctx)
            # aiocoap 0.4.17 cannot shut down a DTLS connection whose start failed.
            with contextlib.suppress(AttributeError):
                await ctx.shutdown()
    raise RuntimeError(f"GET {uri}: no answer in {ATTEMPTS} attempts")


def _oscar_consumer(uri: str) -> Callable[[int], Any]:
    def consumer(index: int) -> Any:
        return _one_reading(lambda: Context.create_client_context(transports=["udp6"]), uri)

    return consumer


def _dtls_consumer(port: int, psks: dict[str, bytes]) -> Callable[[int], Any]:
    identities = list(psks)
    uri = f"coaps://127.0.0.1:{port}/reading"

    async def context(identity: str) -> Context:
        ctx = await Context.create_client_context(transports=["tinydtls"])
        ctx.client_credentials.load_from_dict(
            {
                f"coaps://127.0.0.1:{port}/*": {
                    "dtls": {"psk": psks[identity], "client-identity": identity.encode()}
                }
            }
        )
        return ctx

    def consumer(index: int) -> Any:
        identity = identities[index % len(identities)]
        return _one_reading(lambda: context(identity), uri)

    return consumer


async def _measure(side: Side, n: int, rounds: int, received: _ReceivedBytes) -> Measured:
    """Server CPU and bytes per round of ``n`` concurrent consumers, over ``rounds`` rounds."""
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def consumer(index: int) -> int:
        async with limit:
            failures: int = await side.consumer(index)
            return failures

    received.total = failed = 0
    with received.counting():
        cpu_before = cpu_seconds(side.pid)
        for _ in range(rounds):
            failed += sum(await asyncio.gather(*(consumer(i) for i in range(n))))
        cpu = cpu_seconds(side.pid) - cpu_before
    return Measured(cpu / rounds, received.total / rounds, rounds, failed)


def _idle_rate(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS, a producer and a DTLS server; yield one figure per N."""
    logging.getLogger("coap").setLevel(logging.ERROR)  # "Unhandled alert": every DTLS close
    with _quiet_failed_dtls_starts():
        yield from _run(settings)


@contextlib.contextmanager
def _quiet_failed_dtls_starts() -> Iterator[None]:
    """Keep aiocoap 0.4.17's tracebacks about DTLS connections whose start failed (its
    ``shutdown`` then raises AttributeError, from a task and from ``__del__``) off the report;
    the failed attempts themselves are counted and printed."""
    asyncio_log = logging.getLogger("asyncio")
    level, hook = asyncio_log.level, sys.unraisablehook

    def unraisable(info: Any) -> None:
        if not (
            isinstance(info.exc_value, AttributeError)
            and "_retransmission_task" in str(info.exc_value)
        ):
            hook(info)

    asyncio_log.setLevel(logging.CRITICAL)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        asyncio_log.setLevel(level)
        sys.unraisablehook = hook


def _run(settings: Settings) -> Iterator[Figure]:
    readings = 200 if settings.quick else 1000
    repeats = 1 if settings.quick else 2
    tick = 1 / os.sysconf("SC_CLK_TCK")
    with Testbed("oscar-bench-cpu-") as bed:
        bundles = bed.start_as({PRODUCER: "producer"})
        port = free_port()
        producer = bed.spawn(
            "producer",
            ["-m", "producer", "--bundle", str(bundles[PRODUCER]),
             "--state", str(bed.dir / "producer-state"), "--listen", f"127.0.0.1:{port}",
             "--resource", f"reading={bed.write('reading.txt', READING)}",
             "--content-format", "0", "--log-level", "info"],
            ready=f"producer {PRODUCER} ready".encode(),
        )  # fmt: skip
        psks = {f"consumer-{i}": os.urandom(16) for i in range(max(CONSUMER_COUNTS))}
        psk_file = bed.write(
            "psks.json", json.dumps({k: v.hex() for k, v in psks.items()}).encode()
        )
        dtls_servers: list[subprocess.Popen[bytes]] = []

        def fresh_dtls_side() -> Side:
            """A new DTLS server, warmed up (the old one stopped): see the module docstring."""
            for old in dtls_servers:
                bed.stop(old)
            dtls_port = free_port()  # aiocoap's DTLS server listens on its bind port + 1
            dtls = bed.spawn(
                f"dtls-{len(dtls_servers)}",
                ["-m", "bench.plain_server", "--listen", f"127.0.0.1:{dtls_port - 1}",
                 "--resource", f"reading={len(READING)}", "--dtls-psks", str(psk_file)],
                ready=b"plain server ready",
            )  # fmt: skip
            dtls_servers.append(dtls)
            side = Side("DTLS", dtls.pid, _dtls_consumer(dtls_port, psks))
            asyncio.run(_measure(side, 4, 2, _ReceivedBytes()))  # imports, first handshake
            return side

        oscar_uri = f"coap://127.0.0.1:{port}/{PRODUCER}/reading"
        oscar_side = Side("OSCAR", producer.pid, _oscar_consumer(oscar_uri))
        asyncio.run(_wait_for_object(oscar_uri))
        asyncio.run(_measure(oscar_side, 4, 2, _ReceivedBytes()))
        idle_time = 1.0 if settings.quick else 3.0
        idle = {
            "OSCAR": _idle_rate(producer.pid, idle_time),
            "DTLS": _idle_rate(fresh_dtls_side().pid, idle_time),
        }
        print(
            "  idle CPU (not subtracted): "
            + ", ".join(f"{name} {rate * 1e3:.1f} ms/s" for name, rate in idle.items()),
            flush=True,
        )
        sides: list[Callable[[], Side]] = [lambda: oscar_side, fresh_dtls_side]
        received = _ReceivedBytes()
        for n in CONSUMER_COUNTS:
            rounds = max(1, readings // n)
            best: dict[str, Measured] = {}
            for i in range(repeats):
                for make_side in sides if i % 2 == 0 else reversed(sides):
                    side = make_side()
                    result = asyncio.run(_measure(side, n, rounds, received))
                    if (
                        side.name not in best
                        or result.cpu_per_round < best[side.name].cpu_per_round
                    ):
                        best[side.name] = result
            oscar_result, dtls_result = best["OSCAR"], best["DTLS"]
            # A side that stayed under one clock tick in all its rounds is shown as one tick.
            oscar_cpu = max(oscar_result.cpu_per_round, tick / oscar_result.rounds)
            dtls_cpu = max(dtls_result.cpu_per_round, tick / dtls_result.rounds)
            sent = (
                f"; server sent {oscar_result.bytes_per_round / n:,.0f} B vs "
                f"{dtls_result.bytes_per_round / n:,.0f} B per consumer"
                if received.working
                else ""
            )
            retries = ", ".join(
                f"{r.failed_attempts} {name} consumers got no answer (or a DTLS alert) and retried"
                for name, r in best.items()
                if r.failed_attempts
            )
            print(
                f"  N={n:<3} ({rounds} rounds): CPU per round OSCAR {oscar_cpu * 1e3:.2f} ms, "
                f"DTLS {dtls_cpu * 1e3:.2f} ms, DTLS/OSCAR {dtls_cpu / oscar_cpu:.1f}x{sent}"
                + (f" ({retries})" if retries else ""),
                flush=True,
            )
            yield Figure(
                f"cpu/{n}-consumers",
                n / oscar_cpu,
                "readings per producer CPU second",
                "DTLS-PSK server, handshake per consumer",
                n / dtls_cpu,
                min_ratio=TARGET_RATIO,
            )


async def _wait_for_object(uri: str, timeout: float = 30.0) -> None:
    """Until the producer serves its object (5.03 until the AS sent the keys)."""
    ctx = await Context.create_client_context(transports=["udp6"])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = await asyncio.wait_for(ctx.request(Message(code=GET, uri=uri)).response, 10)
            if response.code.dotted == "2.05":
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{uri}: no object within {timeout:g} s")
    finally:
        await ctx.shutdown()
