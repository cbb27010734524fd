"""The proxy's cluster mode (``--cluster redis://...``) beside single mode, in one run (issue 16).

A real AS and producer (``--max-age 60``) on 127.0.0.1, the producer behind a counting UDP relay
in this process (:class:`bench.proxy_hits.CountingRelay`, here also timing the notifications it
carries); a private ``redis-server`` (:mod:`bench.redisbox`); proxies with one bundle, each with
its own state directory, all ``--no-dtls`` with ``--reverse bench-producer=coap://RELAY``:
``single`` and ``single-b``/``single-c`` (no ``--cluster``: the SQLite cache), ``cluster-a``,
``-b``, ``-c`` (``--cluster`` to the Redis), and, with ``OSCAR_PROXY_FASTPATH=off``,
``single-slow`` and ``cluster-slow`` (a fourth cluster member).

(a) Hits: the 64 B reading's object under :func:`bench.udpload.run_load` (16 raw UDP sockets, 4
GETs in flight each, every answer checked, Echo proven first, untimed) on ``single`` and on
``cluster-a``; then on ``single-slow`` and ``cluster-slow`` (aiocoap's message layer). Windows
of 1 s (2.5 s full) alternate between the targets, 2 rounds (4), best window kept. GET/s, and the
proxy process's CPU time per GET (``/proc/PID/stat`` utime + stime before and after the window).
Target: cluster at most 1.3 times single's CPU per GET (a hit is served from the instance's
memory layer). Printed beside: Redis's CPU over the cluster windows and ``cluster_reads`` during
them (0 expected), and the CPU of two idle instances (``single-b``, ``cluster-b``: the cluster's
background work, heartbeats, leases and counters). On a 2-core machine the load generator (this
process) takes most of one core and shares the machine with the proxy and Redis: GET/s is bound
by the load as much as by the proxy; CPU per GET is the fairer measure.

(b) Upstream fetches: 100 readers (raw UDP sockets on 100 loopback addresses, NON GETs, each
answering its Echo challenge, the answer's bytes compared with the object) of a resource nobody
read before, all at once, spread round-robin over ``cluster-a/b/c``; the relay counts the GETs
reaching the producer. Beside it: 100 readers on ``single`` (one instance), and 100 spread over
three instances without ``--cluster`` (``single``, ``-b``, ``-c``), each on a fresh resource.
Expected: 1 fetch per Max-Age in cluster mode, as on one instance; 3 for three independent ones.

(c) Notification latency: observers (raw UDP sockets, Observe: 0 after the Echo round trip,
CON notifications acknowledged), 9 (30 in a full run) on ``single``, then as many spread over
``cluster-a/b/c`` (one of them holds the upstream observation's lease; the others learn new values
from Redis's channel). The producer's file gets N new values (10, 40 in a full run; one more
first, untimed, while the proxy sets its upstream observation up), each after every observer had
the previous one. Latency: from the relay forwarding the producer's notification (the producer's
send, the first after the write) to each observer's receipt, all on this process's monotonic
clock. In the cluster phase ``single`` still observes upstream (its observers gone): the producer
sends both notifications back to back, and the first one the relay forwards is taken. The file's
value reaches the producer within its 0.25 s poll tick, not part of the figure (printed).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from aiocoap import GET, NON, Message

from proxy.fastpath import FASTPATH_ENV

from . import Figure, Settings
from .proxy_fast import FastResult, FastTarget, _stats_of, fast_load
from .proxy_hits import CountingRelay, _first_object, _reading
from .redisbox import RedisBox
from .testbed import Testbed, cpu_seconds, free_port

__all__ = ["run"]

PRODUCER = "bench-producer"
PROXY = "bench-proxy"
MAX_AGE = 60
READERS = 100
#: Single CPU per hit ÷ cluster CPU per hit: at least 0.77, cluster at most 1.3 times single
#: (issue 16).
CPU_TARGET = 0.77
_ACK, _CON = 2, 0


class TimedRelay(CountingRelay):
    """:class:`CountingRelay` that also notes when it forwards a producer's notification (a CON
    or NON 2.05 from upstream), on :func:`time.monotonic`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.notified: list[float] = []
        super().__init__(upstream)

    def _from_upstream(self, data: bytes) -> None:
        if len(data) > 4 and data[0] >> 4 & 3 in (0, 1) and data[1] == 0x45:
            self.notified.append(time.monotonic())

    def sent_after(self, moment: float) -> float | None:
        return next((t for t in self.notified if t > moment), None)


# --- raw CoAP clients ---------------------------------------------------------------------------


class Clients:
    """``n`` UDP sockets on loopback addresses of their own (127.0.3.x: a client each for the
    proxy's per-address limits), socket ``i`` talking to ``ports[i % len(ports)]``."""

    def __init__(self, n: int, ports: list[int]) -> None:
        self.socks: list[socket.socket] = []
        for i in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.0.{3 + i // 250}.{1 + i % 250}", 0))
            sock.connect(("127.0.0.1", ports[i % len(ports)]))
            sock.setblocking(False)
            self.socks.append(sock)
        self._mid = 0x1000

    def close(self) -> None:
        for sock in self.socks:
            sock.close()

    def _send(self, i: int, path: tuple[str, ...], observe: bool, echo: bytes | None) -> bytes:
        self._mid = (self._mid + 1) & 0xFFFF
        token = self._mid.to_bytes(2, "big") + i.to_bytes(2, "big")
        message = Message(mtype=NON, code=GET, uri_path=path, mid=self._mid, token=token)
        if observe:
            message.opt.observe = 0
        if echo is not None:
            message.opt.echo = echo
        self.socks[i].send(message.encode())
        return token

    def receive(self, timeout: float) -> list[tuple[int, float, Message]]:
        """(socket index, monotonic time, message) of what arrives within ``timeout`` s;
        CON messages acknowledged."""
        got: list[tuple[int, float, Message]] = []
        index = {sock.fileno(): i for i, sock in enumerate(self.socks)}
        readable, _, _ = select.select(self.socks, [], [], timeout)
        for sock in readable:
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                now = time.monotonic()
                if len(data) >= 4 and data[0] >> 4 & 3 == _CON:
                    sock.send(bytes([0x60, 0]) + data[2:4])
                got.append((index[sock.fileno()], now, Message.decode(data)))
        return got

    def get_all(
        self, path: tuple[str, ...], *, observe: bool, timeout: float = 15.0
    ) -> list[bytes]:
        """A GET from every socket at once, each answering its Echo challenge; the payloads."""
        tokens = {i: self._send(i, path, observe, None) for i in range(len(self.socks))}
        payloads: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout
        while len(payloads) < len(self.socks) and (left := deadline - time.monotonic()) > 0:
            for i, _, reply in self.receive(left):
                if reply.token != tokens.get(i) or not reply.code.is_response():
                    continue
                if reply.code.dotted == "4.01" and reply.opt.echo is not None:
                    tokens[i] = self._send(i, path, observe, reply.opt.echo)
                elif reply.code.dotted == "2.05":
                    payloads[i] = reply.payload
                else:
                    raise RuntimeError(f"GET /{'/'.join(path)}: {reply.code}")
        if len(payloads) < len(self.socks):
            raise RuntimeError(f"{len(self.socks) - len(payloads)} GETs unanswered")
        return [payloads[i] for i in range(len(self.socks))]


# --- (a) hits -----------------------------------------------------------------------------------


def _hits(
    settings: Settings, targets: list[FastTarget], size: int, redis_pid: int
) -> tuple[dict[str, FastResult], dict[str, float]]:
    """Alternating windows; each target's best, and Redis's CPU per GET in that window."""
    window = 1.0 if settings.quick else 2.5
    rounds = 2 if settings.quick else 4
    for target in targets:
        fast_load(target, size, 0.3)
    best: dict[str, FastResult] = {}
    redis: dict[str, float] = {}
    for i in range(rounds):
        for target in targets if i % 2 == 0 else reversed(targets):
            before = cpu_seconds(redis_pid)
            result = fast_load(target, size, window)
            redis_cpu = cpu_seconds(redis_pid) - before
            if target.name not in best or result.rate > best[target.name].rate:
                best[target.name] = result
                redis[target.name] = redis_cpu / max(1, round(result.rate * window))
    return best, redis


def _run_hits(
    settings: Settings,
    targets: list[FastTarget],
    size: int,
    redis_pid: int,
    port_a: int,
    idle: dict[str, int],
) -> Iterator[Figure]:
    before = _stats(port_a)
    idle_before = {name: cpu_seconds(pid) for name, pid in idle.items()}
    start = time.monotonic()
    best, redis = _hits(settings, targets, size, redis_pid)
    seconds = time.monotonic() - start
    idle_cpu = {name: cpu_seconds(pid) - idle_before[name] for name, pid in idle.items()}
    after = _stats(port_a)
    change = {k: after.get(k, 0) - before.get(k, 0) for k in ("hits", "fast_hits", "cluster_reads")}
    print(
        "  hits, raw UDP load: "
        + ", ".join(f"{n} {r.rate:,.0f} GET/s" for n, r in best.items())
        + ". Proxy CPU per GET: "
        + ", ".join(f"{n} {r.cpu_per_get * 1e6:.1f} us" for n, r in best.items())
        + ". Redis CPU per GET: "
        + ", ".join(f"{n} {v * 1e6:.2f} us" for n, v in redis.items())
        + f". cluster-a over the windows: {change['hits']:,} hits ({change['fast_hits']:,} "
        f"fast), cluster_reads +{change['cluster_reads']}. Idle instances meanwhile ("
        f"{seconds:.0f} s): "
        + ", ".join(f"{n} {c / seconds * 1e3:.1f} ms CPU/s" for n, c in idle_cpu.items()),
        flush=True,
    )
    for path, single, cluster in (
        ("fast", "single", "cluster"),
        ("aiocoap", "single-slow", "cluster-slow"),
    ):
        yield Figure(
            f"proxy-cluster/hit/{path}",
            best[cluster].rate,
            "GET/s",
            f"single mode (SQLite cache), {path} path",
            best[single].rate,
        )
        yield Figure(
            f"proxy-cluster/hit/{path}/cpu",
            best[cluster].cpu_per_get * 1e6,
            "us proxy CPU per GET",
            f"single mode (SQLite cache), {path} path",
            best[single].cpu_per_get * 1e6,
            min_ratio=CPU_TARGET,
            lower_is_better=True,
        )


def _stats(port: int) -> dict[str, int]:
    return asyncio.run(_stats_of(port))


# --- (b) upstream fetches -----------------------------------------------------------------------


def _fetches(relay: TimedRelay, ports: list[int], resource: str, expected: bytes) -> int:
    clients = Clients(READERS, ports)
    try:
        relay.take_counts()
        payloads = clients.get_all((PRODUCER, resource), observe=False)
        gets, _ = relay.take_counts()
    finally:
        clients.close()
    if any(p != expected for p in payloads):
        raise RuntimeError(f"{resource}: a reader got other bytes than the object")
    return gets


# --- (c) notification latency -------------------------------------------------------------------


def _latencies(
    relay: TimedRelay, ports: list[int], observers: int, value: Path, values: int, tag: str
) -> tuple[list[float], list[float], dict[int, list[float]]]:
    """Seconds from the producer's send, and from the file's write, to each receipt; the
    first by instance (index in ``ports``)."""
    clients = Clients(observers, ports)
    try:
        last = clients.get_all((PRODUCER, "live"), observe=True)
        from_send: list[float] = []
        from_write: list[float] = []
        by_instance: dict[int, list[float]] = {n: [] for n in range(len(ports))}
        for k in range(values + 1):  # value 0 untimed: the proxy observes upstream meanwhile
            value.write_bytes(_reading(64)[:-12] + f"{tag}{k:>10}\n".encode()[-11:])
            written = time.monotonic()
            received: dict[int, float] = {}
            deadline = written + 10.0
            while len(received) < observers and (left := deadline - time.monotonic()) > 0:
                for i, at, message in clients.receive(left):
                    if message.code.dotted == "2.05" and message.payload != last[i]:
                        last[i] = message.payload
                        received.setdefault(i, at)
            if len(received) < observers:
                raise RuntimeError(f"{observers - len(received)} observers missed value {k}")
            sent = relay.sent_after(written)
            if sent is None:
                raise RuntimeError("no notification from the producer seen by the relay")
            if k:
                from_send += [at - sent for at in received.values()]
                from_write += [at - written for at in received.values()]
                for i, at in received.items():
                    by_instance[i % len(ports)].append(at - sent)
    finally:
        clients.close()
    return from_send, from_write, by_instance


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# --- the run ------------------------------------------------------------------------------------


def run(settings: Settings) -> Iterator[Figure]:
    relay: TimedRelay | None = None
    with Testbed("oscar-bench-cluster-") as bed:
        try:
            box = RedisBox(bed.dir / "redis").start()
            try:
                bundles = bed.start_as({PRODUCER: "producer", PROXY: "proxy"})
                port = free_port()
                live = bed.write("live.txt", _reading(64))
                argv = ["-m", "producer", "--bundle", str(bundles[PRODUCER]),
                        "--state", str(bed.dir / "producer-state"),
                        "--listen", f"127.0.0.1:{port}", "--content-format", "0",
                        "--max-age", str(MAX_AGE), "--interval", "0.05", "--log-level", "info",
                        "--resource", f"live={live}"]  # fmt: skip
                for name in ("hot", "f-cluster", "f-single", "f-three"):
                    argv += ["--resource", f"{name}={bed.write(f'{name}.txt', _reading(64))}"]
                bed.spawn("producer", argv, ready=f"producer {PRODUCER} ready".encode())
                relay = TimedRelay(("127.0.0.1", port))
                base = f"coap://127.0.0.1:{port}/{PRODUCER}"
                objects = {
                    n: asyncio.run(_first_object(f"{base}/{n}")) for n in ("hot", "f-cluster")
                }
                objects.update(
                    {n: asyncio.run(_first_object(f"{base}/{n}")) for n in ("f-single", "f-three")}
                )
                yield from _measure(settings, bed, bundles[PROXY], relay, box, objects, live)
            finally:
                box.stop()
        finally:
            if relay is not None:
                relay.close()


def _measure(
    settings: Settings,
    bed: Testbed,
    bundle: Path,
    relay: TimedRelay,
    box: RedisBox,
    objects: dict[str, bytes],
    live: Path,
) -> Iterator[Figure]:
    ports: dict[str, int] = {}
    pids: dict[str, int] = {}

    def proxy(name: str, cluster: bool, fastpath: bool = True) -> None:
        ports[name] = free_port()
        argv = ["-m", "proxy", "--bundle", str(bundle), "--state", str(bed.dir / f"{name}-state"),
                "--listen", f"127.0.0.1:{ports[name]}", "--no-dtls",
                "--reverse", f"{PRODUCER}=coap://127.0.0.1:{relay.port}"]  # fmt: skip
        if cluster:
            argv += ["--cluster", box.url]
        if not fastpath:
            os.environ[FASTPATH_ENV] = "off"
        try:
            pids[name] = bed.spawn(name, argv, ready=b"serving coap://").pid
        finally:
            os.environ.pop(FASTPATH_ENV, None)

    for name in ("single", "single-b", "single-c"):
        proxy(name, cluster=False)
    proxy("single-slow", cluster=False, fastpath=False)
    for name in ("cluster-a", "cluster-b", "cluster-c"):
        proxy(name, cluster=True)
    proxy("cluster-slow", cluster=True, fastpath=False)

    path = f"{PRODUCER}/hot"
    targets = [
        FastTarget(name, f"coap://127.0.0.1:{ports[name]}/{path}", pids[name])
        for name in ("single", "cluster-a", "single-slow", "cluster-slow")
    ]
    targets = [t._replace(name="cluster") if t.name == "cluster-a" else t for t in targets]
    idle = {name: pids[name] for name in ("single-b", "cluster-b")}
    yield from _run_hits(settings, targets, len(objects["hot"]), box.pid, ports["cluster-a"], idle)

    cluster = [ports[n] for n in ("cluster-a", "cluster-b", "cluster-c")]
    three = [ports[n] for n in ("single", "single-b", "single-c")]
    fetched = {
        "cluster": _fetches(relay, cluster, "f-cluster", objects["f-cluster"]),
        "single": _fetches(relay, [ports["single"]], "f-single", objects["f-single"]),
        "three": _fetches(relay, three, "f-three", objects["f-three"]),
    }
    print(
        f"  {READERS} readers at once, GETs reaching the producer (Max-Age {MAX_AGE} s): "
        f"3 cluster instances {fetched['cluster']}, 1 single-mode instance {fetched['single']}, "
        f"3 single-mode instances {fetched['three']}",
        flush=True,
    )
    yield Figure(
        f"proxy-cluster/fetches/{READERS}-on-3",
        READERS / max(fetched["cluster"], 1),
        "readings per producer GET",
        "one single-mode instance",
        READERS / max(fetched["single"], 1),
        min_value=READERS,
    )
    yield Figure(
        f"proxy-cluster/fetches/{READERS}/vs-3-single",
        READERS / max(fetched["cluster"], 1),
        "readings per producer GET",
        "three single-mode instances (no --cluster)",
        READERS / max(fetched["three"], 1),
    )

    per_instance = 3 if settings.quick else 10
    values = 10 if settings.quick else 40
    observers = 3 * per_instance
    single_send, single_write, _ = _latencies(
        relay, [ports["single"]], observers, live, values, "s"
    )
    cluster_send, cluster_write, by_instance = _latencies(
        relay, cluster, observers, live, values, "c"
    )
    names = ("cluster-a", "cluster-b", "cluster-c")
    holder = [n for n in names if b"upstream for the cluster" in bed.log(n).encode()]
    rows = {"single": (single_send, single_write), "cluster": (cluster_send, cluster_write)}
    print(
        f"  {observers} observers, {values} new values; latency from the producer's send "
        + ", ".join(
            f"{n} p50 {_percentile(s, 50) * 1e3:.1f} ms p99 {_percentile(s, 99) * 1e3:.1f} ms"
            for n, (s, _) in rows.items()
        )
        + "; from the file's write (the producer's 0.25 s poll tick included): "
        + ", ".join(f"{n} p50 {_percentile(w, 50) * 1e3:.0f} ms" for n, (_, w) in rows.items())
        + "; cluster by instance: "
        + ", ".join(
            f"{names[n]} p50 {_percentile(v, 50) * 1e3:.1f} ms" for n, v in by_instance.items()
        )
        + f" (upstream observer: {', '.join(holder) or 'none logged'})",
        flush=True,
    )
    for q in (50, 99):
        yield Figure(
            f"proxy-cluster/notify/p{q}",
            _percentile(cluster_send, q) * 1e3,
            f"ms from producer send, {observers} observers on 3 instances",
            "the same number of observers on one single-mode proxy",
            _percentile(single_send, q) * 1e3,
            lower_is_better=True,
        )
