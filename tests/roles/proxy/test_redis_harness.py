"""The private Redis servers the proxy cluster's tests run on (tests/redis_harness.py): each URL
the harness gives works with redis-py's asyncio client (plain, AUTH with a password, an ACL user,
TLS with the harness's CA), the wrong credentials and a client without the CA are refused, a
graceful restart keeps what was written, a kill keeps only what was saved, and nothing is left
behind."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import redis
import redis.asyncio
from redis_harness import RedisServer


async def _ping(url: str) -> bool:
    client = redis.asyncio.from_url(url, socket_timeout=5)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_a_plain_url_works_with_the_asyncio_client_and_names_its_database(
    redis_server: RedisServer,
) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.asyncio.from_url(redis_server.url_for(db=3))
    try:
        assert await client.ping()
        await client.set("written", b"through the asyncio client")
    finally:
        await client.aclose()
    with redis_server.client(db=3) as behind, redis_server.client() as db0:
        assert behind.get("written") == b"through the asyncio client"
        assert db0.dbsize() == 0


@pytest.mark.asyncio
async def test_a_password_url_works_and_a_wrong_or_missing_password_is_refused(
    redis_servers: Callable[..., RedisServer],
) -> None:
    password = "p@ss:w/rd %"  # every character the URL must escape
    server = redis_servers(password=password)
    assert await _ping(server.url)
    assert password not in repr(server)
    with pytest.raises(redis.AuthenticationError):
        await _ping(f"redis://:wrong@127.0.0.1:{server.port}/0")
    with pytest.raises(redis.AuthenticationError):
        await _ping(f"redis://127.0.0.1:{server.port}/0")


@pytest.mark.asyncio
async def test_an_acl_user_url_works_and_the_default_user_is_off(
    redis_servers: Callable[..., RedisServer],
) -> None:
    server = redis_servers(user=("proxy-a", "s3cret"))
    assert server.url == f"redis://proxy-a:s3cret@127.0.0.1:{server.port}/0"
    client = redis.asyncio.from_url(server.url)
    try:
        assert await client.acl_whoami() == "proxy-a"
    finally:
        await client.aclose()
    with pytest.raises(redis.AuthenticationError):
        await _ping(f"redis://proxy-a:wrong@127.0.0.1:{server.port}/0")
    with pytest.raises(redis.AuthenticationError):
        await _ping(f"redis://127.0.0.1:{server.port}/0")


@pytest.mark.asyncio
async def test_a_tls_url_works_with_the_harness_ca_and_fails_without_it(
    redis_servers: Callable[..., RedisServer],
) -> None:
    server = redis_servers(tls=True)
    assert server.ca_file is not None and server.url.startswith("rediss://127.0.0.1:")
    assert await _ping(server.url)
    # The system's trust store does not know the harness's CA: verification fails.
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await _ping(f"rediss://127.0.0.1:{server.port}/0")
    # No plain protocol on the TLS port (and no plain port at all).
    with pytest.raises(redis.ConnectionError):
        await _ping(f"redis://127.0.0.1:{server.port}/0?socket_timeout=2")


@pytest.mark.asyncio
async def test_a_graceful_restart_keeps_the_keys_and_a_kill_keeps_only_what_was_saved(
    redis_servers: Callable[..., RedisServer],
) -> None:
    server = redis_servers(persistent=True)
    port, pid = server.port, server.pid
    with server.client() as c:
        c.set("before restart", b"kept")
    server.restart()
    assert (server.port, server.running) == (port, True) and server.pid != pid
    with server.client() as c:
        assert c.get("before restart") == b"kept"
        c.set("after restart", b"lost with the kill")
    server.kill()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        await _ping(server.url)
    server.start()
    assert server.port == port and await _ping(server.url)
    with server.client() as c:
        assert c.get("before restart") == b"kept"
        assert c.get("after restart") is None


def test_the_dump_holds_every_value_uncompressed_and_stop_leaves_nothing() -> None:
    server = RedisServer().start()
    try:
        value = b"plaintext " * 200  # LZF would shrink this to a few bytes
        with server.client() as c:
            c.set("some key", value)
        dump = server.dump_bytes()
        assert dump.startswith(b"REDIS") and value in dump and b"some key" in dump
        pid, directory = server.pid, server.dir
    finally:
        server.stop()
    assert not directory.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
