"""aiocoap is pinned (pyproject.toml) because OSCAR repairs some of its internals in place; each
repair applies only to the version it was written against and switches itself off otherwise.
These tests fail when the installed aiocoap is one the repairs were not written for, so an
upgrade is a decision (re-check each repair, then extend its version set), never a silent loss
of the fixes (tracebacks when observers leave, doubled DTLS events, unbounded request memory)."""

from __future__ import annotations

import asyncio

import aiocoap
import pytest
from aiocoap import Context

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
