"""aiocoap is pinned (pyproject.toml) because OSCAR repairs some of its internals in place; each
repair applies only to the version it was written against and switches itself off otherwise.
These tests fail when the installed aiocoap is one the repairs were not written for, so an
upgrade is a decision (re-check each repair, then extend its version set), never a silent loss
of the fixes (tracebacks when observers leave, doubled DTLS events, unbounded request memory)."""

from __future__ import annotations

import asyncio
import gc

import aiocoap
import pytest
from aiocoap import GET, Context, Message

from oscar_io import aiocoap_fixes, dtls_client
from producer import duplicates


def test_the_installed_aiocoap_is_the_one_the_repairs_were_written_for() -> None:
    version = aiocoap.meta.version
    assert version in aiocoap_fixes.FIXED_VERSIONS
    assert version in dtls_client.FIXED_VERSIONS
    assert version in duplicates.VERSIONS


def test_every_repair_applies() -> None:
    assert aiocoap_fixes.apply()
    assert aiocoap_fixes.apply()  # idempotent
    assert dtls_client.apply()


@pytest.mark.asyncio
async def test_the_producer_bounds_aiocoaps_request_memory() -> None:
    ctx = await Context.create_server_context(None, bind=("127.0.0.1", 0), transports=["udp6"])
    try:
        assert duplicates.bound(ctx)
    finally:
        await ctx.shutdown()
    await asyncio.sleep(0)


@pytest.mark.asyncio
@pytest.mark.parametrize("steps", [0, 1, 2, 3])
async def test_a_dtls_context_shuts_down_while_its_connection_is_still_starting(
    steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiocoap's DTLS connection raised AttributeError (``_retransmission_task``) when shut down
    before its socket was made, and so did the context's shutdown: an AS client that dropped its
    context then (``AsClient.reset`` after a failure) ended the producer's task that follows a
    resource's keys. Each step lets the connection's start go a little further (0 to 2: before
    its socket; 3: its handshake under way)."""
    unraisable: list[object] = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    dtls_client.apply()
    ctx = await Context.create_client_context(transports=["tinydtls"])
    uri = "coaps://127.0.0.1:9/x"  # nothing listens there: the handshake never completes
    ctx.client_credentials.load_from_dict(
        {"coaps://127.0.0.1:9/*": {"dtls": {"psk": b"k" * 16, "client-identity": b"id"}}}
    )
    request = ctx.request(Message(code=GET, uri=uri))
    for _ in range(steps):
        await asyncio.sleep(0)
    await ctx.shutdown()  # raised AttributeError for steps 0 to 2 before the repair
    with pytest.raises(aiocoap.error.LibraryShutdown):
        await request.response
    del request, ctx
    gc.collect()  # the connection's __del__ shuts it down again: no exception there either
    assert not unraisable
