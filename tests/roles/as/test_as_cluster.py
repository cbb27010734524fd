"""Two ``oscar-as serve`` instances on one PostgreSQL database (issue 15, active-active): what the
admin CLI changes through one reaches the other within a second, and the database stopping under
them (restarted, or gone silent) gives 5.03, never a hang, a 5.00 or a crash.

Each instance polls the database's change counter every ``tick`` (0.2 s) and, on a change, reloads
the credentials (a revoked device's sessions end) and notifies ``/keys`` observers whose epochs
changed (authz_server/server.py). Measured here on both instances, from the exit of the admin
CLI's command and from the commit of another process's store (the CLI exits a little after its
commit), to the effect:

- a revocation (``oscar-as revoke --device``) ends the device's open DTLS session on both;
- a rotation (``oscar-as rotate``) notifies ``/keys`` observers on both, and a scheduled rotation
  done by one instance reaches the other's observers;
- an enrolment (``oscar-as enroll``) lets the new device connect to both.

Then, on a cluster of the module's own: PostgreSQL restarted (``pg_ctl stop -m fast``, start)
while clients keep asking both instances for a secret; and the server stopped with SIGSTOP (a
server that went silent: the connections stay open, nothing answers), where the command timeout
turns the wait into 5.03, an instance stopped meanwhile still exits at once, and the lost
connections are made again once the server answers.

Real processes, real PostgreSQL (tests/pg_harness.py), real DTLS; no sleep stands for an event
(the log lines and responses are awaited), except the pauses that make up the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import GET
from aiocoap.error import NetworkError
from as_harness import ROOT, AsEnv, AsProcess, Client, Observation, as_env, decode, now, refused
from pg_harness import PgCluster

from authz_server.ca import init_state
from authz_server.store import DatabaseUnavailable, Resource, StoreError
from authz_server.store.postgres_backend import PostgresBackend
from authz_server.store.postgres_connections import (
    COMMAND_TIMEOUT,
    READERS,
    command_timeout,
    split_url,
)

#: The bound the issue sets for a change to reach every instance.
WITHIN = 1.0


@pytest_asyncio.fixture
async def env(tmp_path: Path, pg_cluster: PgCluster, pg_database: str) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, (pg_cluster, pg_database)) as environment:
        yield environment


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PgCluster]:
    """A cluster of this module's own: stopping it must not touch the session's."""
    started = PgCluster.start()
    try:
        yield started
    finally:
        with contextlib.suppress(OSError):
            _signal_server(started, signal.SIGCONT)
        started.stop()


@pytest.fixture
def own_database(own_cluster: PgCluster) -> str:
    return own_cluster.new_database()


@pytest_asyncio.fixture
async def own_env(
    tmp_path: Path, own_cluster: PgCluster, own_database: str
) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, (own_cluster, own_database)) as environment:
        yield environment


# --- helpers -------------------------------------------------------------------------------------


async def admin(env: AsEnv, *args: str) -> float:
    """Run ``oscar-as ARGS --state STATE`` (the admin CLI, a process of its own); the moment
    (monotonic) it exited, status 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authz_server", *args, "--state", str(env.state),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    exited = time.monotonic()
    assert proc.returncode == 0, output.decode(errors="replace")
    return exited


async def log_line(server: AsProcess, text: str, timeout: float = 10.0) -> float:
    """The moment (monotonic) ``text`` is first seen in the server's log (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{server.log()}"
        await asyncio.sleep(0.01)
    return time.monotonic()


def _signal_server(cluster: PgCluster, signum: int) -> list[int]:
    """Send ``signum`` to the cluster's postmaster, then to each of its children (read from
    /proc); their pids."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signum)  # first: it forks no new child meanwhile
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            children.append(int(entry.name))
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return [postmaster, *children]


async def _secret_loop(
    client: Client, codes: list[tuple[float, str]], stop: asyncio.Event, pause: float = 0.05
) -> None:
    """GET /secret, then a ``pause``, until ``stop``; each answer's (moment, code), "timeout" for
    none."""
    while not stop.is_set():
        try:
            response = await client.send(client.message(GET, "secret", {"r": "p/a"}), 10)
            codes.append((time.monotonic(), response.code.dotted))
        except (TimeoutError, NetworkError):
            codes.append((time.monotonic(), "timeout"))
        await asyncio.sleep(pause)


@contextlib.asynccontextmanager
async def secret_load(
    clients: list[Client], pause: float = 0.05
) -> AsyncIterator[list[list[tuple[float, str]]]]:
    """Each client asks for ``p/a``'s secret again and again meanwhile; yields each one's
    answers (moment, code), complete once the block is left."""
    stop = asyncio.Event()
    codes: list[list[tuple[float, str]]] = [[] for _ in clients]
    tasks = [
        asyncio.create_task(_secret_loop(client, got, stop, pause))
        for client, got in zip(clients, codes, strict=True)
    ]
    try:
        yield codes
    finally:
        stop.set()
        await asyncio.gather(*tasks)


# --- a change through the admin CLI reaches both instances within a second -----------------------


@pytest.mark.asyncio
async def test_a_revocation_through_the_cli_ends_the_devices_session_on_both_instances(
    env: AsEnv,
) -> None:
    """Under load: other consumers keep asking both instances for a secret meanwhile (each
    request a write: its delivery), so the instances' change polls wait their turn on the
    database connection they share with those writes."""
    t = now()
    busy = [f"busy{n}" for n in range(4)]
    for device in ("doomed", "fine", "second", *busy):
        await env.device(device, "consumer")
    await env.device("p", "producer")
    await env.store.register_resources([Resource("p/a", "p", 50, "ccm-es256", 60, 0, t)])
    for device in busy:
        await env.store.add_grant(device, "p/*", None, t)
    a, b = env.server(), env.server()
    doomed_a, doomed_b = await env.client(a, "doomed"), await env.client(b, "doomed")
    fine_b, second_b = await env.client(b, "fine"), await env.client(b, "second")
    for client in (doomed_a, doomed_b, fine_b, second_b):
        assert (await client.get("crl"))[0] == "2.05"  # a session open on each instance
    loaders = [await env.client((a, b)[n % 2], device) for n, device in enumerate(busy)]
    async with secret_load(loaders, pause=0.005) as codes:
        await asyncio.sleep(0.5)
        exited = await admin(env, "revoke", "--device", "doomed")
        ended = "ended 1 session(s) of doomed"
        ended_a, ended_b = await asyncio.gather(log_line(a, ended), log_line(b, ended))
        print(f"revocation: ended on A {ended_a - exited:+.3f} s, B {ended_b - exited:+.3f} s")
        assert ended_a - exited <= WITHIN and ended_b - exited <= WITHIN
        assert await refused(doomed_b, "crl") and await refused(doomed_a, "crl")
        again = await env.client(b, "doomed")
        assert await refused(again, "crl")  # and no new session either
        assert (await fine_b.get("crl"))[0] == "2.05"

        # From the commit itself (the CLI exits a little after it): another process's store.
        await env.store.revoke_device("second", now())
        committed = time.monotonic()
        ended_b = await log_line(b, "ended 1 session(s) of second")
        print(f"revocation: session ended on B {ended_b - committed:.3f} s after the commit")
        assert ended_b - committed <= WITHIN
        assert await refused(second_b, "crl")
    served = [at for got in codes for at, code in got if code == "2.05"]
    print(f"revocation: under {len(served) / (max(served) - min(served)):.0f} deliveries/s")
    assert {code for got in codes for _, code in got} <= {"2.05", "4.29"}  # 4.29: rate limit
    assert len(served) > 100


@pytest.mark.asyncio
async def test_a_rotation_notifies_keys_observers_on_both_instances(env: AsEnv) -> None:
    t = now()
    await env.device("p", "producer")
    await env.store.register_resources(
        [
            Resource("p/manual", "p", 50, "ccm-es256", 60, 0, t),
            # rotated every 2 s by whichever instance's schedule runs first
            Resource("p/timed", "p", 50, "ccm-es256", 60, 2, t),
        ]
    )
    a, b = env.server(), env.server()
    on_a, on_b = await env.client(a, "p"), await env.client(b, "p")
    manual = [Observation(on_a, "p/manual"), Observation(on_b, "p/manual")]
    firsts = [doc for _, doc in await asyncio.gather(*(o.first() for o in manual))]
    assert [f["active"]["epoch"] for f in firsts] == [1, 1]

    exited = await admin(env, "rotate", "--resource", "p/manual")
    (at_a, note_a), (at_b, note_b) = await asyncio.gather(*(o.arrival() for o in manual))
    print(f"rotation (CLI): observer on A {at_a - exited:+.3f} s, B {at_b - exited:+.3f} s")
    assert note_a["active"]["epoch"] == note_b["active"]["epoch"] == 2
    assert note_a["active"]["secret"] == note_b["active"]["secret"]
    assert at_a - exited <= WITHIN and at_b - exited <= WITHIN
    env.keep(note_a["active"]["secret"], note_a["next"]["secret"])
    # From the commit itself (the CLI exits a little after it): another process's store.
    await env.store.rotate("p/manual", now(), actor="admin", reason="test")
    committed = time.monotonic()
    (at_a, note_a), (at_b, note_b) = await asyncio.gather(*(o.arrival() for o in manual))
    print(f"rotation: observer on A {at_a - committed:.3f} s, B {at_b - committed:.3f} s after")
    assert note_a["active"]["epoch"] == note_b["active"]["epoch"] == 3
    assert at_a - committed <= WITHIN and at_b - committed <= WITHIN
    env.keep(note_a["next"]["secret"])

    # A rotation one instance's schedule makes reaches the other's observers (its poll).
    timed = [Observation(on_a, "p/timed"), Observation(on_b, "p/timed")]
    firsts = [doc for _, doc in await asyncio.gather(*(o.first() for o in timed))]
    (at_a, note_a), (at_b, note_b) = await asyncio.gather(*(o.arrival() for o in timed))
    while note_a["active"]["epoch"] != note_b["active"]["epoch"]:  # one a rotation behind
        if note_a["active"]["epoch"] < note_b["active"]["epoch"]:
            at_a, note_a = await timed[0].arrival()
        else:
            at_b, note_b = await timed[1].arrival()
    print(f"rotation (schedule): observers on A and B {abs(at_a - at_b):.3f} s apart")
    assert abs(at_a - at_b) <= WITHIN
    env.keep(note_a["active"]["secret"], note_a["next"]["secret"])
    for first in firsts:
        env.keep(first["active"]["secret"], first["next"]["secret"])


@pytest.mark.asyncio
async def test_a_device_enrolled_through_the_cli_connects_to_both_instances(
    env: AsEnv, tmp_path: Path
) -> None:
    a, b = env.server(), env.server()
    bundle_path = tmp_path / "newbie.json"
    exited = await admin(
        env, "enroll", "--role", "consumer", "--id", "newbie", "--out", str(bundle_path)
    )
    line = "device newbie may connect"
    loaded_a, loaded_b = await asyncio.gather(log_line(a, line), log_line(b, line))
    psk = bytes.fromhex(json.loads(bundle_path.read_text())["psk_hex"])
    env.psks["newbie"] = psk  # checked absent from logs and the database at teardown
    on_a, on_b = await env.client(a, "newbie"), await env.client(b, "newbie")
    codes = await asyncio.gather(on_a.get("crl"), on_b.get("crl"))
    served = time.monotonic()
    print(
        f"enrolment: credentials on A {loaded_a - exited:+.3f} s, B {loaded_b - exited:+.3f} s;"
        f" served on both {served - exited:+.3f} s"
    )
    assert [code for code, _ in codes] == ["2.05", "2.05"]
    assert loaded_a - exited <= WITHIN and loaded_b - exited <= WITHIN
    assert served - exited <= WITHIN + 1.0  # the two DTLS handshakes and requests on top

    # From the commit itself (the CLI exits a little after it): another process's store.
    await env.device("second", "consumer")
    committed = time.monotonic()
    line = "device second may connect"
    loaded_a, loaded_b = await asyncio.gather(log_line(a, line), log_line(b, line))
    print(f"enrolment: on A {loaded_a - committed:.3f} s, B {loaded_b - committed:.3f} s after")
    assert loaded_a - committed <= WITHIN and loaded_b - committed <= WITHIN
    assert (await (await env.client(b, "second")).get("crl"))[0] == "2.05"


# --- PostgreSQL going away under two instances ---------------------------------------------------


@pytest.mark.asyncio
async def test_postgresql_restarted_under_load_with_two_instances(
    own_env: AsEnv, own_cluster: PgCluster
) -> None:
    env, t = own_env, now()
    await env.device("p", "producer")
    consumers = [f"c{i}" for i in range(4)]
    for consumer in consumers:
        await env.device(consumer, "consumer")
    await env.store.register_resources([Resource("p/a", "p", 50, "ccm-es256", 60, 0, t)])
    for consumer in consumers:
        await env.store.add_grant(consumer, "p/*", None, t)
    a, b = env.server(), env.server()
    clients = [await env.client((a, b)[n % 2], c) for n, c in enumerate(consumers)]
    before = [await c.get("secret", r="p/a") for c in clients]  # delivered (and audited)
    assert {code for code, _ in before} == {"2.05"}
    secret = before[0][1]["secret"]
    env.keep(secret)

    async with secret_load(clients) as codes:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_cluster.halt)  # the load goes on meanwhile
        halted = time.monotonic()
        await asyncio.sleep(1.5)
        await asyncio.to_thread(own_cluster.resume)
        resumed = time.monotonic()
        # Both instances serve again: each client has a 2.05 after the restart.
        while not all(any(at > resumed and c == "2.05" for at, c in got) for got in codes):
            assert time.monotonic() - resumed < 10, [Counter(c for _, c in got) for got in codes]
            await asyncio.sleep(0.05)
        back = max(min(at for at, c in got if at > resumed and c == "2.05") for got in codes)
    print(f"PostgreSQL restart: both instances served again {back - resumed:.2f} s after start")
    for got in codes:
        assert set(c for _, c in got) <= {"2.05", "5.03"}, Counter(c for _, c in got)
        assert any(halted < at < resumed and c == "5.03" for at, c in got)  # while down
    for server in (a, b):  # (the watcher sees it at its next tick, maybe after a request)
        await log_line(server, "the database is reachable again")
        assert server.proc is not None and server.proc.poll() is None

    # Nothing confirmed before is lost: the same secret, each first delivery audited once.
    for client in clients:
        code, body = await client.get("secret", r="p/a")
        assert (code, body["epoch"], body["secret"]) == ("2.05", 1, secret)
    records = await _until_up(env.store.audit_records)
    delivered = Counter(r.actor for r in records if r.action == "secret" and r.subject == "p/a")
    assert delivered == Counter(consumers)
    ok, summary = await env.store.verify_audit()
    assert ok, summary


async def _until_up(call: Any, timeout: float = 10.0) -> Any:
    """``call()`` again until the test's own store has connected again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except DatabaseUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)


def test_the_command_timeout_is_5_s_unless_the_url_asks_for_another() -> None:
    base = "postgresql://as:pw@127.0.0.1:5432/as"
    assert command_timeout(base) == COMMAND_TIMEOUT == 5.0
    assert split_url(f"{base}?command_timeout=2.5") == (base, 2.5)
    kept = split_url(f"{base}?application_name=as1&command_timeout=1&sslmode=disable")
    assert kept == (f"{base}?application_name=as1&sslmode=disable", 1.0)
    for bad in ("0", "-1", "nan", "inf", "3601", "", "five"):
        with pytest.raises(ValueError, match="command_timeout must be"):
            command_timeout(f"{base}?command_timeout={bad}")


@pytest.mark.asyncio
async def test_a_bad_command_timeout_is_one_clear_error_without_the_password() -> None:
    with pytest.raises(StoreError) as caught:  # refused before any connection is tried
        await PostgresBackend.open("postgresql://as:hunter2@127.0.0.1:1/as?command_timeout=x")
    message = str(caught.value)
    assert "command_timeout must be a number of seconds" in message
    assert "hunter2" not in message and "***" in message


@pytest.mark.asyncio
async def test_a_store_holds_one_connection_until_it_reads_on_the_request_path(
    tmp_path: Path, pg_database: str
) -> None:
    """The readers are made on first use: the admin CLI (which reads through the writer) holds
    one connection, not five."""
    store = await init_state(
        tmp_path / "state", as_uri="coaps://127.0.0.1", now=now(), database=pg_database
    )
    count = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    try:
        assert await store.db.one(count) == (1,)
        assert await store.resource("p/a") is None  # a point read: one reader made
        assert await store.db.one(count) == (2,)
        await asyncio.gather(*(store.resource(f"p/{n}") for n in range(8)))
        assert (await store.db.one(count))[0] <= 1 + READERS
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_stopped_process_holding_the_write_lock_blocks_the_others_for_seconds_only(
    tmp_path: Path, pg_database: str
) -> None:
    """A session that took the cluster-wide write lock and then went quiet inside its
    transaction (its process stopped, its VM paused) is ended by the server after 5 s idle, so
    another instance's write waits for it, then goes through (before its ``lock_timeout``)."""
    from authz_server.store import postgres

    store = await init_state(
        tmp_path / "state", as_uri="coaps://127.0.0.1", now=now(), database=pg_database
    )
    frozen = await PostgresBackend.connect(pg_database)  # the AS's session settings
    try:
        await store.add_device("phone-1", "consumer", os.urandom(16), now())
        await frozen.execute(postgres.BEGIN)
        await frozen.execute(postgres.WRITE_LOCK)  # and then nothing more: "stopped"
        began = time.monotonic()
        await store.add_grant("phone-1", "p/*", None, now())
        waited = time.monotonic() - began
        assert 4.0 <= waited <= 9.0, waited  # the idle timeout (5 s), not the lock timeout
        assert [g[2] for g in await store.grants("phone-1")] == [
            "p/*"
        ]  # (id, consumer, pattern, …)
        with pytest.raises(Exception):  # noqa: B017 (the server ended that session)
            await frozen.execute("SELECT 1")
    finally:
        frozen.terminate()
        await store.close()


#: The command timeout the silent-server test asks for in the database URL.
SILENT_TIMEOUT = 2.0


@pytest.mark.asyncio
async def test_a_silent_postgresql_gets_5_03_within_the_command_timeout_not_a_hang(
    own_env: AsEnv, own_cluster: PgCluster
) -> None:
    env, t = own_env, now()
    assert env.postgres is not None
    await env.device("p", "producer")
    await env.device("c", "consumer")
    await env.store.register_resources([Resource("p/a", "p", 50, "ccm-es256", 60, 0, t)])
    await env.store.add_grant("c", "p/*", None, t)
    url = f"{env.postgres[1]}?command_timeout={SILENT_TIMEOUT:g}"
    server, other = env.server("--database", url), env.server("--database", url)
    client = await env.client(server, "c")
    code, body = await client.get("secret", r="p/a")
    assert code == "2.05"
    env.keep(body["secret"])

    stopped = _signal_server(own_cluster, signal.SIGSTOP)
    try:
        answers = []
        for _ in range(3):
            started = time.monotonic()
            response = await client.send(client.message(GET, "secret", {"r": "p/a"}), 20)
            answers.append((response.code.dotted, response.opt.max_age, time.monotonic() - started))
        started = time.monotonic()
        assert await asyncio.to_thread(other.stop) == 0  # SIGTERM: its connections not waited on
        stopping = time.monotonic() - started
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    print("silent PostgreSQL: " + ", ".join(f"{c} in {s:.2f} s" for c, _, s in answers))
    for code, max_age, took in answers:
        assert code == "5.03" and max_age == 2
        # the command timeout, then (at worst) a connect that times out as well, and slack
        assert took <= 2 * SILENT_TIMEOUT + 2.0
    assert server.proc is not None and server.proc.poll() is None
    print(f"silent PostgreSQL: another instance stopped (SIGTERM) in {stopping:.2f} s")
    assert stopping < 2 * SILENT_TIMEOUT + 3.0

    resumed = time.monotonic()
    while True:
        response = await client.send(client.message(GET, "secret", {"r": "p/a"}), 20)
        if response.code.dotted == "2.05":
            break
        assert response.code.dotted == "5.03" and time.monotonic() - resumed < 10
        await asyncio.sleep(0.2)
    assert decode(response)["secret"] == body["secret"]
    print(f"silent PostgreSQL: served again {time.monotonic() - resumed:.2f} s after SIGCONT")
    await log_line(server, "the database is reachable again")
    assert server.log().count("the database is unavailable") == 1, server.log()
    assert "no answer from the server in time" in server.log()
