"""Shared fixtures and the hypothesis profile for the suite; the test tiers are in tiers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from consumer_harness import ProducerStandIn
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, settings
from pg_harness import BACKENDS, Backing, PgCluster
from redis_harness import RedisServer

from testkit import Pki, make_pki

# tiers: the check tier (--check-tier), the process marker, the guard against starting a process;
# pytester: test_tiers.py runs inner sessions with it.
pytest_plugins = ["tiers", "pytester"]

# Crypto calls vary in time on a loaded 2-core machine; deadlines would only make tests flaky.
settings.register_profile(
    "oscar", deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("oscar")


@pytest.fixture(scope="session")
def es256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def eddsa_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def pki() -> Pki:
    return make_pki()


@pytest_asyncio.fixture
async def producer() -> AsyncIterator[ProducerStandIn]:
    """A stand-in producer server (consumer tests); a module's own ``producer`` fixture wins."""
    stand_in = await ProducerStandIn().start()
    try:
        yield stand_in
    finally:
        await stand_in.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL server for the session (tests/pg_harness.py), started on first use
    (only by tests that PROCESS in tiers.py lets start a process), removed at the end."""
    cluster = PgCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_database(pg_cluster: PgCluster) -> Iterator[str]:
    """The URL of a fresh, empty database on :func:`pg_cluster`, dropped after the test."""
    url = pg_cluster.new_database()
    try:
        yield url
    finally:
        pg_cluster.drop_database(url)


@pytest.fixture(params=BACKENDS)
def as_database(request: pytest.FixtureRequest) -> tuple[PgCluster, str] | None:
    """The AS database of a test that takes it, which then runs twice: None (SQLite in the state
    directory), then (the session's PostgreSQL cluster, a fresh database on it); see
    ``as_harness.as_env``. Its PostgreSQL runs start a process (``PROCESS_PARAMS`` in tiers.py)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_cluster"), request.getfixturevalue("pg_database")


@pytest.fixture(params=BACKENDS)
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Backing:
    """An AS state directory ``tmp_path/state`` on SQLite, then on PostgreSQL (a fresh database
    on the session's private server); see :class:`pg_harness.Backing`."""
    if request.param == "sqlite":
        return Backing("sqlite", tmp_path / "state")
    return Backing(
        "postgresql",
        tmp_path / "state",
        request.getfixturevalue("pg_database"),
        request.getfixturevalue("pg_cluster"),
    )


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh private Redis server for the test (tests/redis_harness.py: plain, memory only, on a
    free loopback port; it starts in about 13 ms), stopped and removed after it. A test that
    needs AUTH, TLS or an RDB file makes its own ``RedisServer(...)``."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_servers() -> Iterator[Callable[..., RedisServer]]:
    """Makes started private Redis servers with ``RedisServer``'s options (``password``, ``user``,
    ``tls``, ``persistent``); every one is stopped and removed after the test."""
    made: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        server = RedisServer(**options)
        made.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in made:
            server.stop()
