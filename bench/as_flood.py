"""New DTLS handshakes and established sessions at the AS, with and without a junk-hello flood.

One AS process (``oscar-as serve``, default connection cap of 1,024) on 127.0.0.1.
Four consumers hold established sessions; another device makes the new handshakes. Two phases,
the same measurements in each:

- ``no flood``: nothing else reaches the AS;
- ``flood``: a separate process (``python -m bench.as_flood PORT RATE SECONDS SOURCES``) sends
  DTLS ClientHellos without a cookie, each with a fresh random, round-robin from ``SOURCES``
  (4,096) UDP sockets, so from 4,096 source ports, paced at ``RATE`` (10,000) datagrams/s. It
  never answers a HelloVerifyRequest, as a sender of spoofed datagrams cannot. Four times the
  cap in source ports: a table that admitted each new source would evict one entry per datagram,
  the cost issue 13 measured. Loopback only; the flood stops at the end of the phase, and on its
  own after ``FLOOD_LIMIT`` seconds whatever happens.

The phases alternate in windows (2 of 2.5 s each quick, 3 of 5 s full), so a burst of other
load on the machine falls on both rather than one; a flood window starts ``SETTLE`` s after its
flood. In each window, at the same time:
new handshakes one after the other, 30 ms apart (a new client context, handshake and
``GET /crl``: the time to the response, a handshake given up after
``HANDSHAKE_TIMEOUT`` s counted as failed and at that time), and each established session
repeating ``GET /crl`` every 20 ms (latency per request; a request unanswered after 5 s counted
as failed). Reported: handshake p50 and p99 with the flood beside without it (target: the flood's
p99 at most three times the no-flood p99, issue 13), established-session GET p50/p99 the same
way, the rate the flood reached, and the AS's CPU share and RSS during the flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiocoap import GET, Context, Message, error

from demo.system import free_port

from . import Figure, Settings
from .testbed import cpu_seconds

__all__ = ["client_hello", "finish_flood", "flood", "run", "start_flood"]

RATE = 10_000  # junk datagrams/s
SOURCES = 4096  # source ports the flood comes from
FLOOD_LIMIT = 120.0  # seconds: the flooder stops on its own after this
HANDSHAKE_TIMEOUT = 10.0
ESTABLISHED = 4
SETTLE = 1.5  # seconds of flood before a flood window is measured
#: Flood p99 over no-flood p99 of a new handshake may be at most 3 (issue 13).
MAX_SLOWDOWN = 3.0


def client_hello(random: bytes, cookie: bytes = b"", record_seq: int = 0) -> bytes:
    """One DTLS 1.2 ClientHello record offering TLS_PSK_WITH_AES_128_CCM_8, as a client's first."""
    body = (
        b"\xfe\xfd" + random + b"\x00" + bytes([len(cookie)]) + cookie + b"\x00\x02\xc0\xa8\x01\x00"
    )
    size = len(body).to_bytes(3, "big")
    handshake = b"\x01" + size + b"\x00\x00" + b"\x00\x00\x00" + size
    record = handshake + body
    return (
        b"\x16\xfe\xfd\x00\x00"
        + record_seq.to_bytes(6, "big")
        + len(record).to_bytes(2, "big")
        + record
    )


def flood(
    port: int, rate: float, seconds: float, sources: int, stop: Callable[[], bool] = lambda: False
) -> tuple[int, float]:
    """Send ClientHellos to 127.0.0.1:``port`` round-robin from ``sources`` sockets at ``rate``
    per second for ``seconds`` or until ``stop()``. Returns (datagrams sent, seconds taken)."""
    sockets = []
    try:
        for _ in range(sources):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            sockets.append(s)
        hellos = [client_hello(os.urandom(32), record_seq=i) for i in range(509)]
        target = ("127.0.0.1", port)
        sent = 0
        start = time.monotonic()
        end = start + seconds
        while (now := time.monotonic()) < end and not stop():
            due = int((now - start) * rate)
            while sent < due:
                with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                    # (a full send buffer, or an earlier ICMP error: the datagram is lost)
                    sockets[sent % sources].sendto(hellos[sent % len(hellos)], target)
                sent += 1
            time.sleep(0.001)
        return sent, time.monotonic() - start
    finally:
        for s in sockets:
            s.close()


def start_flood(
    port: int, rate: float = RATE, seconds: float = FLOOD_LIMIT, sources: int = SOURCES
) -> subprocess.Popen[bytes]:
    """The flood in a process of its own; stop it with :func:`finish_flood`."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, "-m", "bench.as_flood", str(port), str(rate), str(seconds), str(sources)],
        cwd=root,
        stdout=subprocess.PIPE,
    )


def finish_flood(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Stop a flood (SIGTERM) and return (datagrams sent, seconds)."""
    if process.poll() is None:
        process.terminate()
    out, _ = process.communicate(timeout=30)
    sent, seconds = out.split()
    return int(sent), float(seconds)


def _main(argv: list[str]) -> None:
    port, rate, seconds, sources = int(argv[0]), float(argv[1]), float(argv[2]), int(argv[3])
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, frame: stopped.append(number))
    result = flood(port, rate, min(seconds, FLOOD_LIMIT), sources, stop=lambda: bool(stopped))
    print(*result, flush=True)


# --- the measurement -----------------------------------------------------------------------------


async def _prepare(state: Path) -> dict[str, bytes]:
    from authz_server.ca import init_state

    now = int(time.time())
    store = await init_state(state, as_uri="coaps://127.0.0.1", now=now)
    try:
        psks = {f"flood-bench-{i}": os.urandom(16) for i in range(ESTABLISHED + 1)}
        await store.add_devices([(name, "consumer", psk) for name, psk in psks.items()], now)
        return psks
    finally:
        await store.close()


async def _client(port: int, device: str, psk: bytes) -> Context:
    ctx = await Context.create_client_context(transports=["tinydtls"])
    ctx.client_credentials.load_from_dict(
        {f"coaps://127.0.0.1:{port}/*": {"dtls": {"psk": psk, "client-identity": device.encode()}}}
    )
    return ctx


async def _get_crl(ctx: Context, port: int, timeout: float) -> bool:
    message = Message(code=GET, uri=f"coaps://127.0.0.1:{port}/crl")
    try:
        response = await asyncio.wait_for(ctx.request(message).response, timeout)
    except (TimeoutError, OSError, error.NetworkError):
        return False
    return bool(response.code.is_successful())


@dataclass
class Phase:
    handshakes: list[float] = field(default_factory=list)  # seconds, failed ones at the timeout
    handshakes_failed: int = 0
    requests: list[float] = field(default_factory=list)
    requests_failed: int = 0

    def add(self, other: Phase) -> None:
        self.handshakes += other.handshakes
        self.handshakes_failed += other.handshakes_failed
        self.requests += other.requests
        self.requests_failed += other.requests_failed


async def _phase(
    port: int, established: list[Context], device: tuple[str, bytes], seconds: float
) -> Phase:
    phase = Phase()
    end = time.perf_counter() + seconds

    async def handshakes() -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            ctx = await _client(port, *device)
            try:
                ok = await _get_crl(ctx, port, HANDSHAKE_TIMEOUT)
            finally:
                await ctx.shutdown()
            phase.handshakes.append(time.perf_counter() - start)
            phase.handshakes_failed += not ok
            await asyncio.sleep(0.03)

    async def requests(ctx: Context) -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            if await _get_crl(ctx, port, 5.0):
                phase.requests.append(time.perf_counter() - start)
            else:
                phase.requests_failed += 1
            await asyncio.sleep(0.02)

    await asyncio.gather(handshakes(), *(requests(ctx) for ctx in established))
    return phase


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _measure(port: int, pid: int, psks: dict[str, bytes], settings: Settings) -> list[Figure]:
    names = list(psks)
    established = [await _client(port, name, psks[name]) for name in names[:ESTABLISHED]]
    device = (names[-1], psks[names[-1]])
    windows, seconds = (2, 2.5) if settings.quick else (3, 5.0)
    calm, flooded = Phase(), Phase()
    sent, spent, cpu = 0, 0.0, 0.0
    try:
        for ctx in established:
            if not await _get_crl(ctx, port, 10.0):
                raise RuntimeError("an established session could not be set up")
        await _phase(port, established, device, 0.5)  # warm-up
        rss_before = _rss_mib(pid)
        for _ in range(windows):  # alternating, so both see the same machine conditions
            calm.add(await _phase(port, established, device, seconds))
            cpu_before = cpu_seconds(pid)
            flooder = start_flood(port)
            try:
                await asyncio.sleep(SETTLE)  # the table full of junk (if it takes any)
                flooded.add(await _phase(port, established, device, seconds))
            finally:
                window_sent, window_spent = finish_flood(flooder)
            sent, spent = sent + window_sent, spent + window_spent
            cpu += cpu_seconds(pid) - cpu_before
        cpu_share = cpu / spent
        rss_after = _rss_mib(pid)
    finally:
        for ctx in established:
            await ctx.shutdown()
    seconds = spent
    rate = sent / seconds
    for label, phase in (("no flood", calm), (f"flood {rate:,.0f}/s", flooded)):
        print(
            f"  {label}: handshakes p50 {_percentile(phase.handshakes, 0.5) * 1e3:.1f} ms, "
            f"p99 {_percentile(phase.handshakes, 0.99) * 1e3:.1f} ms, "
            f"failed {phase.handshakes_failed}/{len(phase.handshakes)}; established GET "
            f"p50 {_percentile(phase.requests, 0.5) * 1e3:.1f} ms, "
            f"p99 {_percentile(phase.requests, 0.99) * 1e3:.1f} ms, "
            f"failed {phase.requests_failed}/{len(phase.requests) + phase.requests_failed}"
        )
    print(
        f"  flood: {sent:,} datagrams in {seconds:.1f} s from {SOURCES} ports; AS CPU "
        f"{cpu_share:.0%} of a core; AS RSS {rss_before:.1f} -> {rss_after:.1f} MiB"
    )
    flood_name = f"flood {RATE:,}/s"
    figures = []
    for what, p in (("p50", 0.5), ("p99", 0.99)):
        figures.append(
            Figure(
                f"new handshake {what}, {flood_name}",
                _percentile(flooded.handshakes, p) * 1e3,
                "ms",
                "no flood",
                _percentile(calm.handshakes, p) * 1e3,
                min_ratio=1 / MAX_SLOWDOWN if what == "p99" else None,
                lower_is_better=True,
            )
        )
    for what, p in (("p50", 0.5), ("p99", 0.99)):
        figures.append(
            Figure(
                f"established GET {what}, {flood_name}",
                _percentile(flooded.requests, p) * 1e3,
                "ms",
                "no flood",
                _percentile(calm.requests, p) * 1e3,
                lower_is_better=True,
            )
        )
    figures.append(
        Figure("handshakes failed under the flood", flooded.handshakes_failed, "count",
               lower_is_better=True)
    )  # fmt: skip
    figures.append(
        Figure("established GETs failed under the flood", flooded.requests_failed, "count",
               lower_is_better=True)
    )  # fmt: skip
    figures.append(Figure("flood rate reached", rate, "datagrams/s", min_value=0.9 * RATE))
    figures.append(Figure("AS CPU during the flood", cpu_share * 100, "% of a core"))
    return figures


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS, measure both phases, stop it."""
    # aiocoap's DTLS client warns at each context shutdown after a handshake: noise here.
    warnings.filterwarnings("ignore", "DTLS module did not shut down", UserWarning)
    with tempfile.TemporaryDirectory(prefix="oscar-bench-flood-") as tmp:
        state = Path(tmp) / "state"
        psks = asyncio.run(_prepare(state))
        port = free_port()
        log_path = Path(tmp) / "as.log"
        log = open(log_path, "wb")  # noqa: SIM115 (closed below)
        server = subprocess.Popen(
            [sys.executable, "-m", "authz_server", "serve", "--state", str(state),
             "--listen", f"127.0.0.1:{port}", "--rate", "1000000", "--burst", "1000000"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while b"serving coaps://" not in log_path.read_bytes():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the AS did not start: " + log_path.read_text()[-2000:])
                time.sleep(0.05)
            yield from asyncio.run(_measure(port, server.pid, psks, settings))
        finally:
            server.terminate()
            server.wait(timeout=10)
            log.close()


if __name__ == "__main__":
    _main(sys.argv[1:])
