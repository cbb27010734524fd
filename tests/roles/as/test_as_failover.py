"""Devices fail over between AS instances (issue 15): a bundle lists two ``oscar-as serve``
processes on one PostgreSQL database; the device library (:class:`~oscar_io.asclient.AsClient`)
asks the first, moves to the second when the first does not answer, comes back to the first
later, and honours the Max-Age of a 5.03.

Real processes only: the AS instances (tests/as_harness.py, one state directory and so one master
key and database URL), PostgreSQL (the session's cluster; a private one where it is halted), DTLS.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from as_harness import AsEnv, AsProcess, as_env
from cryptography import x509
from pg_harness import PgCluster

from authz_server.cli import main
from authz_server.store import Resource
from demo.system import free_port
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from oscar_io.errors import AsUnavailable

RID = "p/a"
#: The come-back time of the clients here (300 s by default): long enough for the steps between
#: leaving A and looking for the return, short for a test.
COME_BACK = 8.0


class CountingClient(AsClient):
    """The device library as it is, noting each request it sends: (monotonic time, AS URI)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[float, str]] = []

    async def _ask(self, index: int, *args: Any, **kwargs: Any) -> Any:
        self.sent.append((time.monotonic(), self.failover.instances[index].uri))
        return await super()._ask(index, *args, **kwargs)


def bundle(env: AsEnv, device_id: str, *servers: AsProcess) -> Bundle:
    """A bundle as ``oscar-as enroll`` writes it for ``init --as-uri A --as-uri B``."""
    ca = x509.load_pem_x509_certificate((env.state / "ca.pem").read_bytes())
    uris = tuple(server.uri for server in servers)
    return Bundle(
        device_id, env.roles[device_id], uris[0], device_id, env.psks[device_id], ca, uris
    )


async def started(env: AsEnv, client: AsClient) -> AsClient:
    await client.start()
    env.clients.append(client)
    return client


async def fleet(env: AsEnv, *, start: bool = True) -> tuple[AsProcess, AsProcess]:
    """A producer with one resource, a consumer granted it, and two AS instances (started, or
    with their ports chosen only)."""
    t = int(time.time())
    await env.device("p", "producer")
    await env.device("c", "consumer")
    await env.store.register_resources([Resource(RID, "p", 50, "ccm-es256", 60, 0, t)])
    await env.store.add_grant("c", "p/*", None, t)
    if start:
        return env.server(), env.server()
    servers = [AsProcess(env.state, env.tmp / f"as{i}.log") for i in range(2)]
    for server in servers:
        server.port = free_port()
    return servers[0], servers[1]


def serve(env: AsEnv, *servers: AsProcess) -> None:
    for server in servers:
        server.start(port=server.port)
        env.servers.append(server)


@pytest_asyncio.fixture
async def env(tmp_path: Path, pg_cluster: PgCluster, pg_database: str) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, (pg_cluster, pg_database)) as environment:
        yield environment


@pytest.mark.asyncio
async def test_a_device_continues_through_the_other_instance_and_comes_back(
    env: AsEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """A is killed with -9: the next requests (ten at once) are served by B within seconds (one
    info line says so), a /keys observation on A is lost and made again on B; A started again
    is asked first once the come-back time has passed, and serves."""
    a, b = await fleet(env, start=False)
    # A consumer enrolled by the admin CLI, its bundle listing both instances.
    path = env.tmp / "reader.json"
    argv = ["enroll", "--state", str(env.state), "--role", "consumer", "--id", "reader"]
    argv += ["--out", str(path), "--as-uri", a.uri, "--as-uri", b.uri]
    assert await asyncio.to_thread(main, argv) == 0  # main runs its own event loop
    reader = Bundle.load(path)
    assert reader.as_uris == (a.uri, b.uri)
    env.psks["reader"] = reader.psk
    await env.store.add_grant("reader", "p/*", None, int(time.time()))
    serve(env, a, b)
    consumer = await started(env, CountingClient(reader, come_back=COME_BACK))
    producer = await started(env, AsClient(bundle(env, "p", a, b), come_back=COME_BACK))
    first = await consumer.secret(RID)
    env.keep(first.secret.value)
    assert consumer.as_uri == a.uri and a.uri in repr(consumer)
    watch = producer.watch_keys(RID, liveness=0.5)
    state = await anext(watch)
    assert state.active.epoch == first.epoch

    caplog.set_level(logging.INFO, logger="oscar.asclient")
    a.kill()
    killed = time.monotonic()
    grants = await asyncio.gather(*(consumer.secret(RID) for _ in range(10)))  # at once
    took = time.monotonic() - killed
    assert {grant.secret for grant in grants} == {first.secret} and took < 5.0, took
    assert consumer.as_uri == b.uri and b.uri in repr(consumer)
    moves = [r.getMessage() for r in caplog.records if r.name == "oscar.asclient"]
    assert moves == [f"AS {b.uri} now, was {a.uri} (no answer)"]
    assert all(reader.psk.hex() not in r.getMessage() for r in caplog.records)
    sent = len(consumer.sent)
    assert (await consumer.secret(RID)).secret == first.secret
    assert [uri for _, uri in consumer.sent[sent:]] == [b.uri]  # A is not asked first again
    # The observation on A is noticed lost (liveness + PING_TIMEOUT), and made again on B.
    with pytest.raises(AsUnavailable):
        await asyncio.wait_for(anext(watch), 10)
    await watch.aclose()
    watch = producer.watch_keys(RID, liveness=0.5)
    assert (await asyncio.wait_for(anext(watch), 5)).active.epoch == first.epoch
    assert producer.as_uri == b.uri
    assert time.monotonic() - killed < 10.0
    await watch.aclose()

    a.start(port=a.port)  # the same address, as an operator restarts it
    assert time.monotonic() - killed < COME_BACK
    await asyncio.sleep(max(0.0, killed + took + COME_BACK - time.monotonic()))  # the point
    caplog.clear()
    sent = len(consumer.sent)
    assert (await consumer.secret(RID)).secret == first.secret
    assert [uri for _, uri in consumer.sent[sent:]] == [a.uri]
    assert consumer.as_uri == a.uri
    moves = [r.getMessage() for r in caplog.records if r.name == "oscar.asclient"]
    assert moves == [f"AS {a.uri} now, was {b.uri} (the preferred AS again)"]

    # A halted host sends no ICMP error, only silence: A stopped (SIGSTOP) keeps its port, and
    # the client gives it ATTEMPT_TIMEOUT seconds before B serves.
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        halted = time.monotonic()
        assert (await consumer.secret(RID)).secret == first.secret
        took = time.monotonic() - halted
        assert consumer.as_uri == b.uri
        assert AsClient.ATTEMPT_TIMEOUT - 0.1 <= took < AsClient.ATTEMPT_TIMEOUT + 2.0, took
    finally:
        a.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A cluster of this test's own: halting it must not touch the session's."""
    started_cluster = PgCluster.start()
    try:
        yield started_cluster
    finally:
        started_cluster.stop()


@pytest.fixture
def database(cluster: PgCluster) -> str:
    return cluster.new_database()


@pytest.mark.asyncio
async def test_a_5_03_max_age_is_honoured_on_every_instance(
    tmp_path: Path, cluster: PgCluster, database: str
) -> None:
    """PostgreSQL halted: both instances answer 5.03 with Max-Age; the client asks each once,
    then raises AsUnavailable with ``retry_after`` without sending anything, sends nothing to an
    instance before its Max-Age has passed, and gets the secret once PostgreSQL is back."""
    async with as_env(tmp_path, (cluster, database)) as env:
        a, b = await fleet(env)
        client = await started(env, CountingClient(bundle(env, "c", a, b)))
        first = await client.secret(RID)
        env.keep(first.secret.value)

        cluster.halt()
        busy_since = time.monotonic()
        with pytest.raises(AsUnavailable) as caught:
            await client.secret(RID)
        assert caught.value.code == "5.03"
        wait = caught.value.retry_after
        assert wait is not None and 1 <= wait <= 5
        assert [uri for _, uri in client.sent[1:]] == [a.uri, b.uri]  # each asked once
        sent = len(client.sent)
        with pytest.raises(AsUnavailable) as again:  # at once, nothing sent
            await client.secret(RID)
        assert again.value.code == "5.03" and again.value.retry_after is not None
        assert 0 < again.value.retry_after <= wait
        assert len(client.sent) == sent
        assert time.monotonic() - busy_since < wait

        cluster.resume()
        deadline = time.monotonic() + 30
        while True:  # a caller's retry loop: retry_after is its least delay
            try:
                grant = await client.secret(RID)
                break
            except AsUnavailable as exc:
                assert time.monotonic() < deadline, exc
                await asyncio.sleep(exc.retry_after or 0.5)
        assert grant.secret == first.secret
        # After each 5.03, that instance was asked again only when its Max-Age had passed.
        last: dict[str, float] = {}
        for moment, uri in client.sent[1:]:
            if uri in last:
                assert moment - last[uri] >= wait - 0.05, (uri, moment - last[uri])
            last[uri] = moment
