"""AS grants on SQLite, on PostgreSQL, and on two instances sharing one PostgreSQL database.

Three cases, all up at once on 127.0.0.1, each with a fresh AS state made by
:func:`bench.as_load.prepare` (as ``oscar-as init --state DIR [--database URL]`` then the admin
commands would), each AS started as ``oscar-as serve --state DIR --listen …``:

- ``sqlite``: one instance, SQLite in its state directory (the default);
- ``pg-1``: one instance on a PostgreSQL database;
- ``pg-2``: two instances on another database of the same server, both on one state directory
  (so one ``master.key`` and one recorded database URL), each with its own ``--listen``; the
  clients alternate between them.

PostgreSQL is a private server started for the run (:mod:`demo.pgserver`), durable (every commit
flushed, PostgreSQL's default, as SQLite's audited deliveries are). Each case has :data:`CLIENTS`
DTLS clients (one consumer each), which first get their grant once (the audited first delivery)
and keep their DTLS session for the run (:attr:`Case.remotes`); then windows of grants
(``GET /secret?r=bench-producer/reading``, answered with the secret: :func:`bench.as_load.grant`)
alternate between the cases, so that a burst of other load on the shared machine slows every case
rather than one. Per case: grants/s (the best window), p99
latency (all windows), and the CPU seconds of the case's AS process(es) over the windows
(``/proc/PID/stat``) divided by the grants served; beside it, printed, the CPU of the PostgreSQL
backends serving that case's database (what SQLite does inside the AS process, PostgreSQL does
partly in its own). Issue 15's target: PostgreSQL's AS CPU per grant ≤ 1.5 times SQLite's.

Then the failover of ``pg-2``: the devices' own client (:class:`oscar_io.asclient.AsClient`, a
bundle listing A then B) asks for its grant in a loop; instance A is killed (SIGKILL); the
figure is the time from the kill to the first grant B answers.

All processes run on one 2-core machine with the client: rates measure client and AS together, and
two instances cannot serve more than one when the client is the bottleneck; CPU per grant is the
AS's own cost, whatever the client.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from aiocoap import GET, Context, Message
from cryptography import x509

from demo.pgserver import PgServer
from demo.system import free_port
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

from . import Figure, Settings
from .as_load import RESOURCE, client, grant, load, percentile, prepare, start_as
from .testbed import cpu_seconds

__all__ = ["run"]

#: DTLS clients per case (spread over both instances of ``pg-2``).
CLIENTS = 20
#: Issue 15's target: PostgreSQL's AS CPU per grant at most this many times SQLite's, as a ratio
#: (SQLite's CPU / ours, bigger is better): 1 / 1.5, rounded up.
MAX_CPU_FACTOR = 1.5
CPU_MIN_RATIO = 0.667
#: Issue 15's target: from the kill of one instance to the first grant by the other, seconds.
FAILOVER_TARGET = 5.0


@dataclass
class Case:
    """One configuration: its AS processes, the port of each client's AS, what was measured."""

    name: str
    servers: list[Popen[bytes]]
    ports: list[int]
    psks: dict[str, bytes] = field(repr=False)
    database: str | None = None
    pg: PgServer | None = None
    clients: list[Context] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)
    #: Each client's DTLS connection, held: aiocoap keeps its client connections in a
    #: WeakValueDictionary, so one that no message refers to (a client idle while the other cases
    #: run) is closed and the next request makes a new handshake (and, past the AS's 4 sessions
    #: per device, closes an older one).
    remotes: list[object] = field(default_factory=list)
    best: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0
    pg_cpu: float = 0.0
    grants: int = 0

    def as_cpu(self) -> float:
        return sum(cpu_seconds(s.pid) for s in self.servers)

    def backend_cpu(self) -> float:
        """CPU seconds so far of the live PostgreSQL backends connected to this case's database."""
        if self.pg is None or self.database is None:
            return 0.0
        return _backend_cpu(self.pg.postmaster_pid(), self.database.rsplit("/", 1)[1])

    def us_per_grant(self, cpu: float) -> float:
        return cpu / self.grants * 1e6 if self.grants else float("nan")


def _backend_cpu(postmaster: int, database: str) -> float:
    """Sum over the postmaster's children whose process title names ``database``."""
    total = 0.0
    needle = f" {database} ".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != postmaster:
                continue
            if needle not in Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" "):
                continue
            total += cpu_seconds(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return total


def _grant_request(port: int) -> Message:
    message = Message(code=GET, uri=f"coaps://127.0.0.1:{port}/secret")
    message.opt.uri_query = (f"r={RESOURCE}",)
    return message


async def _connect(case: Case) -> None:
    """Each case's clients, spread over its instances; each gets its first delivery now, and
    its DTLS connection is held for the run (see :attr:`Case.remotes`)."""
    for i, device in enumerate(list(case.psks)[:CLIENTS]):
        port = case.ports[i % len(case.ports)]
        ctx = await client(port, device, case.psks[device])
        response = await ctx.request(_grant_request(port)).response
        if not response.code.is_successful():
            raise RuntimeError(f"{case.name}: first grant: {response.code}")
        case.clients.append(ctx)
        case.client_ports.append(port)
        case.remotes.append(response.remote)
    await load(case.clients, case.client_ports, grant, 0.5)


async def _measure(cases: list[Case], settings: Settings) -> None:
    window = 0.3 if settings.quick else 1.0
    windows = 3 if settings.quick else 8
    for case in cases:
        await _connect(case)
    for _ in range(windows):
        for case in cases:
            cpu, pg_cpu = case.as_cpu(), case.backend_cpu()
            rate, latencies = await load(case.clients, case.client_ports, grant, window)
            case.cpu += case.as_cpu() - cpu
            case.pg_cpu += case.backend_cpu() - pg_cpu
            case.grants += len(latencies)
            case.best = max(case.best, rate)
            case.latencies.extend(latencies)
    for case in cases:
        for ctx in case.clients:
            await ctx.shutdown()
        case.clients.clear()
        case.remotes.clear()


async def _failover(
    ports: tuple[int, int], victim: Popen[bytes], device: str, psk: bytes, state: Path
) -> tuple[float, str]:
    """Seconds from SIGKILL of A (``victim``, at ``ports[0]``) to a grant answered by B, asked
    by the devices' own client (:class:`oscar_io.asclient.AsClient` with a bundle listing A then
    B, as ``oscar-as enroll --as-uri A --as-uri B`` writes it); and what it did."""
    uris = tuple(f"coaps://127.0.0.1:{port}" for port in ports)
    ca = x509.load_pem_x509_certificate((state / "ca.pem").read_bytes())
    bundle = Bundle(device, "consumer", uris[0], device, psk, ca, as_uris=uris)
    killed: list[float] = []

    def kill() -> None:
        killed.append(time.perf_counter())
        os.kill(victim.pid, signal.SIGKILL)

    client = AsClient(bundle)
    try:
        asyncio.get_running_loop().call_later(0.3, kill)
        deadline = time.perf_counter() + 30
        while True:
            await client.secret(RESOURCE)
            if client.as_uri == uris[1]:
                if not killed:
                    raise RuntimeError("the client left A before it was killed")
                return time.perf_counter() - killed[0], "AsClient, two-instance bundle"
            if time.perf_counter() > deadline:
                raise RuntimeError("the client did not reach B within 30 s of the kill")
    finally:
        if not killed:  # an error before the kill: A goes anyway (run() restarts it)
            victim.kill()
        victim.wait()
        await client.close()


def _start_case(
    name: str, tmp: Path, instances: int, pg: PgServer | None, started: list[Popen[bytes]]
) -> Case:
    state = tmp / f"{name}-state"
    database = None if pg is None else pg.new_database()
    psks = asyncio.run(prepare(state, database=database, fresh=0))
    servers, ports = [], []
    for i in range(instances):
        ports.append(free_port())
        servers.append(start_as(state, ports[-1], tmp / f"{name}-{i}.log"))
        started.append(servers[-1])
    return Case(name, servers, ports, psks, database, pg)


def _figures(cases: list[Case]) -> Iterator[Figure]:
    sqlite = cases[0]
    base_cpu = sqlite.us_per_grant(sqlite.cpu)
    base_p99 = percentile(sqlite.latencies, 0.99) * 1e3
    for case in cases:
        cpu = case.us_per_grant(case.cpu)
        pg_cpu = case.us_per_grant(case.pg_cpu)
        p99 = percentile(case.latencies, 0.99) * 1e3
        print(
            f"  {case.name}: {len(case.servers)} AS, {case.grants} grants in the windows; AS CPU "
            f"{cpu:.0f} us/grant" + (f", PostgreSQL backends {pg_cpu:.0f} us/grant (AS + "
            f"PostgreSQL {cpu + pg_cpu:.0f})" if case.pg else "") + f"; p50 "
            f"{percentile(case.latencies, 0.5) * 1e3:.1f} ms, p99 {p99:.1f} ms",
            flush=True,
        )  # fmt: skip
        first = case is sqlite
        label = "the sqlite case, same run"
        yield Figure(
            f"cluster/{case.name}/grants",
            case.best,
            "grants/s",
            None if first else label,
            None if first else sqlite.best,
        )
        yield Figure(
            f"cluster/{case.name}/p99",
            p99,
            "ms",
            None if first else label,
            None if first else base_p99,
            lower_is_better=True,
        )
        yield Figure(
            f"cluster/{case.name}/as-cpu-per-grant",
            cpu,
            "us/grant",
            None if first else f"{label} (target: <= {MAX_CPU_FACTOR:g}x it)",
            None if first else base_cpu,
            min_ratio=None if first else CPU_MIN_RATIO,
            lower_is_better=True,
        )
        if case.pg:
            yield Figure(f"cluster/{case.name}/pg-cpu-per-grant", pg_cpu, "us/grant")


def run(settings: Settings) -> Iterator[Figure]:
    """Start PostgreSQL and four AS processes, measure, stop them; yield the figures."""
    started: list[Popen[bytes]] = []
    pg = PgServer.start(durable=True)
    try:
        with tempfile.TemporaryDirectory(prefix="oscar-bench-cluster-") as name:
            tmp = Path(name)
            cases = [
                _start_case("sqlite", tmp, 1, None, started),
                _start_case("pg-1", tmp, 1, pg, started),
                _start_case("pg-2", tmp, 2, pg, started),
            ]
            asyncio.run(_measure(cases, settings))
            yield from _figures(cases)
            pair = cases[2]
            runs = []
            device = next(iter(pair.psks))
            for _ in range(1 if settings.quick else 3):
                seconds, reason = asyncio.run(
                    _failover(
                        (pair.ports[0], pair.ports[1]),
                        pair.servers[0],
                        device,
                        pair.psks[device],
                        tmp / "pg-2-state",
                    )
                )
                runs.append(seconds)
                print(f"  failover: {seconds:.2f} s ({reason})", flush=True)
                pair.ports[0] = free_port()  # A again, for the next run
                pair.servers[0] = start_as(
                    tmp / "pg-2-state", pair.ports[0], tmp / f"pg-2-0-{len(runs)}.log"
                )
                started.append(pair.servers[0])
            yield Figure(
                "cluster/failover-kill-to-grant",
                max(runs),
                "s",
                "issue 15's bound; the devices' AsClient, a bundle listing A then B",
                FAILOVER_TARGET,
                min_ratio=1.0,
                lower_is_better=True,
            )
            if len(runs) > 1:
                print(f"  failover over {len(runs)} runs: median {statistics.median(runs):.2f} s")
            for server in started:
                if server.poll() is None:
                    server.terminate()
            for server in started:
                server.wait(timeout=10)
    finally:
        for server in started:
            if server.poll() is None:
                server.kill()
                server.wait()
        pg.stop()
