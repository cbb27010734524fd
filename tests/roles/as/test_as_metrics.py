"""The AS's Prometheus metrics (issue 18): ``oscar-as serve --metrics HOST:PORT``, scraped over
real HTTP from a real AS process, after real DTLS requests.

Each series is checked for its value, not its presence alone; the text must hold no device id,
no PSK and no resource name (per-resource labels are off by default).
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from as_harness import ROOT, AsEnv, as_env

from authz_server.metrics import AsMetrics, outcome_of


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        return str(answer.read().decode())


def value(text: str, series: str) -> float:
    """The value of one series (name and labels exactly as written), or an AssertionError."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not in the scrape"
    return float(match.group(1))


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path) as e:
        yield e


@pytest.mark.asyncio
async def test_the_as_counts_its_requests_by_endpoint_and_outcome_and_its_sessions(
    env: AsEnv,
) -> None:
    psk = await env.device("reader-7", "consumer")
    port = free_tcp_port()
    server = env.server("--metrics", f"127.0.0.1:{port}", "--rate", "0.01", "--burst", "4")
    client = await env.client(server, "reader-7")
    for _ in range(3):
        assert (await client.get("crl"))[0] == "2.05"
    assert (await client.get("no-such-endpoint"))[0] == "4.04"
    assert (await client.get("crl"))[0] == "4.29"  # the burst of 4 is spent

    text = await asyncio.to_thread(scrape, port)
    requests = "oscar_as_requests_total"
    assert value(text, f'{requests}{{endpoint="GET /crl",outcome="ok"}}') == 3
    assert value(text, f'{requests}{{endpoint="other",outcome="not_found"}}') == 1
    assert value(text, f'{requests}{{endpoint="GET /crl",outcome="rate_limited"}}') == 1
    assert value(text, 'oscar_as_request_seconds_count{endpoint="GET /crl"}') == 3
    assert value(text, 'oscar_as_request_seconds_bucket{endpoint="GET /crl",le="+Inf"}') == 3
    assert value(text, "oscar_as_dtls_connections") == 1
    assert value(text, "oscar_as_dtls_hellos_admitted_total") == 1
    assert value(text, "oscar_as_devices_allowed") == 1
    assert value(text, "oscar_as_database_up") == 1
    assert value(text, "process_cpu_seconds_total") > 0
    assert "reader-7" not in text and psk.hex() not in text
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(scrape, port, "/")
    assert refused.value.code == 404
    refused.value.close()

    # A second device: one more session and one more device allowed, read at the scrape.
    await env.device("reader-8", "consumer")
    await asyncio.sleep(0.5)  # the AS polls the store for changes every 0.2 s
    other = await env.client(server, "reader-8")
    assert (await other.get("crl"))[0] == "2.05"
    text = await asyncio.to_thread(scrape, port)
    assert value(text, "oscar_as_dtls_connections") == 2
    assert value(text, "oscar_as_devices_allowed") == 2
    assert value(text, f'{requests}{{endpoint="GET /crl",outcome="ok"}}') == 4


def _serve(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "authz_server", "serve", "--state", str(state), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.mark.asyncio
async def test_a_bad_or_taken_metrics_address_is_one_line_before_anything_starts(
    env: AsEnv,
) -> None:
    from demo.system import free_port

    listen = f"127.0.0.1:{free_port()}"
    bad = _serve(env.state, "--listen", listen, "--metrics", "localhost")
    assert bad.returncode == 2 and "--metrics" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _serve(env.state, "--listen", listen, "--metrics", f"127.0.0.1:{port}")
    assert busy.returncode == 1, busy.stderr
    assert f"--metrics 127.0.0.1:{port}" in busy.stderr and "Traceback" not in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1


def test_outcomes_and_per_resource_labels() -> None:
    assert [outcome_of(c) for c in ("2.05", "2.01", "4.01", "4.29", "4.00", "5.03", "5.00")] == [
        "ok", "ok", "unauthorized", "rate_limited", "bad_request", "unavailable", "error",
    ]  # fmt: skip
    plain = AsMetrics()
    plain.rotated("sensor-1/power", "schedule")
    assert plain.rotations.values == {("schedule",): 1}
    named = AsMetrics(per_resource=True)
    named.rotated("sensor-1/power", "schedule")
    named.rotated("sensor-1/power", "schedule")
    assert named.rotations.values == {("schedule", "sensor-1/power"): 2}
