"""A proxy's stale cache is not an attack: real AS, producer, proxy and consumer CLI processes.

A consumer reads through the proxy (the proxy caches the object for the producer's Max-Age), the
value changes, the consumer reads directly from the producer, then through the proxy again: the
proxy still serves the older copy. That copy is valid but older than what this consumer accepted,
so it is never accepted (DESIGN §4); the consumer says so on one warning line (what the proxy
holds, what it has seen, when the proxy's copy is fresh again) and gives the newest reading it
holds, checked again now. Issue 13: this used to be "object rejected: rollback ..." (exit 1).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from as_harness import ROOT, free_port
from system_harness import Deployment, ProducerProcess, write_atomic

WARNING = "oscar-consumer: warning: "


@dataclass
class Path3:
    """A deployment with one producer (value in a file, Max-Age 30 s) and a forward proxy."""

    d: Deployment
    value: Path
    producer: ProducerProcess
    proxy: asyncio.subprocess.Process
    proxy_uri: str
    proxy_log: Path

    @property
    def target(self) -> str:
        return self.producer.uri("meter/v")

    async def consumer(self, *args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumer",
            "--bundle",
            str(self.d.root / "c1.json"),
            "--state",
            str(self.d.root / "c1-state"),
            "--timeout",
            "10",
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


@pytest_asyncio.fixture
async def path3(tmp_path: Path) -> AsyncIterator[Path3]:
    d = Deployment(tmp_path)
    try:
        d.enroll("proxy", "cloud")
        bundle = d.enroll("producer", "meter")
        d.enroll("consumer", "c1")
        d.grant("c1", "meter/*")
        d.start_as()
        value = tmp_path / "v.txt"
        value.write_bytes(b"one")
        producer = ProducerProcess(
            bundle,
            tmp_path / "producer",
            "--resource",
            f"v={value}",
            "--interval",
            "0.1",
            "--max-age",
            "30",
        )
        producer.start()
        port = free_port()
        proxy_log = tmp_path / "proxy.log"
        with open(proxy_log, "ab") as log:
            proxy = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "--bundle",
                str(tmp_path / "cloud.json"),
                "--state",
                str(tmp_path / "proxy"),
                "--listen",
                f"127.0.0.1:{port}",
                "--no-dtls",
                cwd=ROOT,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        try:
            for _ in range(400):
                if "serving" in proxy_log.read_text():
                    break
                await asyncio.sleep(0.05)
            yield Path3(d, value, producer, proxy, f"coap://127.0.0.1:{port}", proxy_log)
        finally:
            proxy.terminate()
            await proxy.wait()
            producer.kill()
        assert "Traceback" not in proxy_log.read_text()
    finally:
        d.close()


@pytest.mark.asyncio
async def test_a_stale_proxy_copy_gives_the_newest_reading_held_and_says_so(
    path3: Path3,
) -> None:
    p = path3
    status, out, err = await p.consumer("get", "--proxy", p.proxy_uri, p.target)
    assert (status, out, err) == (0, "one", "")  # the proxy now holds "one" for 30 s

    write_atomic(p.value, b"two")
    for _ in range(100):  # the producer looks at the file every 0.1 s
        status, out, err = await p.consumer("get", p.target)  # directly from the producer
        assert (status, err) == (0, ""), err
        if out == "two":
            break
        await asyncio.sleep(0.1)
    assert out == "two"

    # Through the proxy again: its copy of "one" is older than what this consumer has seen.
    status, out, err = await p.consumer("get", "--json", "--proxy", p.proxy_uri, p.target)
    assert status == 0, err
    assert '"value": "two"' in out and "one" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(WARNING), err
    line = lines[0]
    assert "rejected" not in line and "rollback" not in line
    match = re.search(
        r"served meter/v epoch (\d+) seq (\d+), older than epoch (\d+) seq (\d+) this consumer "
        r"accepted before.* refreshes it within (\d+) s \(its Max-Age\); showing the newest "
        r"reading held \(epoch \3 seq \4\)$",
        line,
    )
    assert match is not None, line
    assert line.startswith(WARNING + p.proxy_uri + " served")
    served, seen = (int(match[1]), int(match[2])), (int(match[3]), int(match[4]))
    assert served < seen
    assert 0 < int(match[5]) <= 30

    # observe through the proxy: the stale first answer gives the newest reading held too.
    status, out, err = await p.consumer("observe", "--count", "1", "--proxy", p.proxy_uri, p.target)
    assert (status, out) == (0, "two\n"), err
    assert err.startswith(WARNING) and len(err.splitlines()) == 1, err
