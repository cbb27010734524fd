"""``oscar-proxy stats`` asks the running proxy for its live counters (issue 13), over a Unix socket
in the state directory (:mod:`proxy.statsock`): real proxy processes, the real CLI.

- a counter changes and the next ``stats`` shows it (no second-old file); the socket is 0600;
- a DTLS-only proxy answers too (no plain-CoAP endpoint needed);
- a socket left by a proxy killed with SIGKILL: ``stats`` says no proxy answers, and the next
  proxy on that state directory replaces it; a second proxy on a state directory in use is
  refused with one line; a state path too long for a socket address works.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiocoap import GET, Message
from aiocoap.numbers.codes import Code
from as_harness import ROOT
from proxy_harness import ProxyProcess, RawClient
from system_harness import Deployment, run

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROXY_ID = "cache-1"


@dataclass
class World:
    root: Path
    d: Deployment
    bundle: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("stats")
    d = Deployment(root)
    bundle = d.enroll("proxy", PROXY_ID)
    d.start_as()
    try:
        yield World(root, d, bundle)
    finally:
        d.close()


def start(proxy: ProxyProcess) -> None:
    proxy.start(wait_for="serving")  # no device is linked to it: no "link keys" line


def stats_cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("-m", "proxy", "stats", "--state", str(state), *args, check=False)


def counters(state: Path) -> dict[str, int]:
    result = stats_cli(state, "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, int] = json.loads(result.stdout)
    return doc


def challenge(proxy: ProxyProcess) -> None:
    """One plain-CoAP GET from a new address: the proxy answers 4.01 and counts a challenge."""
    client = RawClient(proxy.port, fresh=True)
    try:
        _, _, reply = client.exchange(Message(code=GET, uri_path=("meter", "power")))
    finally:
        client.close()
    assert reply.code == Code.UNAUTHORIZED


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


async def test_each_stats_shows_the_counters_as_they_are_now(world: World) -> None:
    proxy = ProxyProcess(world.bundle, world.root / "live")
    await asyncio.to_thread(start, proxy)
    try:
        socket_file = proxy.state / "stats.sock"
        assert stat.S_ISSOCK(socket_file.lstat().st_mode)
        assert stat.S_IMODE(socket_file.lstat().st_mode) == 0o600
        for expected in range(1, 4):  # at once, several times within one second
            await asyncio.to_thread(challenge, proxy)
            doc = await asyncio.to_thread(counters, proxy.state)
            assert doc["echo_challenges"] == expected, doc
        assert not (proxy.state / "stats.json").exists()
    finally:
        assert await asyncio.to_thread(proxy.stop) == 0
    assert not socket_file.exists()  # removed at a clean stop
    one_line_error(await asyncio.to_thread(stats_cli, proxy.state), 1, "no ", "stats.sock")


async def test_a_dtls_only_proxy_answers_stats(world: World) -> None:
    proxy = ProxyProcess(world.bundle, world.root / "dtls-only", "--no-plain")
    await asyncio.to_thread(start, proxy)
    try:
        doc = await asyncio.to_thread(counters, proxy.state)
        assert doc["echo_challenges"] == 0 and "upstream_observations" in doc
    finally:
        proxy.stop()


async def test_a_socket_left_by_a_killed_proxy_and_a_second_proxy_on_the_same_state(
    world: World,
) -> None:
    state = world.root / "killed"
    first = ProxyProcess(world.bundle, state)
    await asyncio.to_thread(start, first)
    first.kill()  # SIGKILL: the socket file stays
    assert stat.S_ISSOCK((state / "stats.sock").lstat().st_mode)
    result = await asyncio.to_thread(stats_cli, state)
    one_line_error(result, 1, "no proxy answers")

    again = ProxyProcess(world.bundle, state, port=first.port)
    await asyncio.to_thread(start, again)  # replaces the stale socket
    try:
        await asyncio.to_thread(challenge, again)
        assert (await asyncio.to_thread(counters, state))["echo_challenges"] == 1
        other = ProxyProcess(world.bundle, state)  # another port, the same state directory
        command = other.command()
        result = await asyncio.to_thread(
            subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        one_line_error(result, 1, "another oscar-proxy uses")
        assert (await asyncio.to_thread(counters, state))["echo_challenges"] == 1  # still ours
    finally:
        assert await asyncio.to_thread(again.stop) == 0


async def test_a_state_path_too_long_for_a_socket_address(world: World) -> None:
    state = world.root / ("d" * 60) / ("e" * 60) / "state"
    assert len(os.fsencode(state / "stats.sock")) > 108
    state.parent.mkdir(parents=True, mode=0o700)
    proxy = ProxyProcess(world.bundle, state)
    await asyncio.to_thread(start, proxy)
    try:
        await asyncio.to_thread(challenge, proxy)
        assert (await asyncio.to_thread(counters, state))["echo_challenges"] == 1
    finally:
        assert await asyncio.to_thread(proxy.stop) == 0
