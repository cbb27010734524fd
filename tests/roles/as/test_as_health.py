"""Two ``oscar-as serve`` instances on one PostgreSQL database, heartbeats every 0.5 s: the admin
console of one (fetched over HTTPS, the AS CA trusted) lists both as healthy; the other killed
with SIGKILL shows "not responding" once three of its periods have passed, the first staying
healthy; a clean stop removes an instance's row.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from as_harness import AsProcess, as_env
from pg_harness import PgCluster

from demo.system import free_port

PERIOD = 0.5


def row_of(page: str, address: str) -> str:
    """The overview's table row that names ``address`` ('' if none)."""
    rows = [r for r in page.split("<tr>") if f"<td>{address}</td>" in r]
    assert len(rows) <= 1, rows
    return rows[0] if rows else ""


@pytest.mark.asyncio
async def test_the_overview_shows_each_instance_healthy_then_a_killed_one_stale(
    tmp_path: Path, pg_cluster: PgCluster, pg_database: str
) -> None:
    async with as_env(tmp_path, (pg_cluster, pg_database)) as env:
        token = await env.store.issue_admin_token("alice", None, int(time.time()))
        admin = free_port()
        first = env.server("--heartbeat", str(PERIOD), "--admin", str(admin))
        second = AsProcess(env.state, tmp_path / "second.log", "--heartbeat", str(PERIOD))
        second.start()
        try:
            base = f"https://127.0.0.1:{admin}"
            context = ssl.create_default_context(cafile=str(env.state / "ca.pem"))
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                cookie_jar=aiohttp.CookieJar(unsafe=True),
            ) as client:
                async with client.post(
                    base + "/login", data={"token": token}, headers={"Origin": base}
                ) as response:
                    assert response.status == 200

                async def overview() -> str:
                    async with client.get(base + "/") as response:
                        assert response.status == 200
                        return await response.text()

                a, b = f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"
                deadline = time.monotonic() + 10
                page = await overview()
                while "(2 of 2 healthy)" not in page:  # the second's first beat may be due
                    assert time.monotonic() < deadline, page
                    await asyncio.sleep(0.1)
                    page = await overview()
                for address in (a, b):
                    assert ">healthy</span>" in row_of(page, address)
                    assert "database reachable" in row_of(page, address)

                second.kill()  # SIGKILL: no clean stop, its row stays and goes stale
                killed = time.monotonic()
                while ">not responding</span>" not in row_of(page, b):
                    assert time.monotonic() < killed + 10, page
                    await asyncio.sleep(0.1)
                    page = await overview()
                stale_after = time.monotonic() - killed
                assert "(1 of 2 healthy)" in page
                assert ">healthy</span>" in row_of(page, a)
                # Three periods after its last beat (at most one period before the kill).
                assert stale_after >= 3 * PERIOD - PERIOD - 0.1, stale_after
        finally:
            second.kill()
        # A clean stop removes the instance's row; the killed one's stays (pruned after an hour).
        assert first.stop() == 0
        listed = await env.store.instance_list()
        assert [i.address for i in listed] == [b]
        assert re.fullmatch(r"[0-9a-f]{16}", listed[0].id)
