"""The failure run: during a stream of readings, kill -9 and restart each role in turn.

AS, producer (serving through the proxy's reverse mapping and publishing to it over DTLS), proxy
and consumer are separate processes; the consumer is one ``oscar-consumer get --json`` process per
reading, sharing one state directory. Afterwards: no reading accepted that failed a check (every
value is one the producer was given, and (epoch, seq) never goes back), no reading lost beyond
each outage (fresh values again soon after every restart), no seq reused (one value per (epoch,
seq)), the audit chain verifies, and the proxy's cache survived its own kill -9.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from as_harness import ROOT
from proxy_harness import ProxyProcess
from system_harness import Deployment, ProducerProcess, write_atomic


@dataclass
class Reading:
    at: float
    value: int
    epoch: int
    seq: int


class Stream:
    """The writer (a new value every 0.1 s) and the readers (one consumer process at a time)."""

    def __init__(self, d: Deployment, value: Path, uri: str) -> None:
        self.d, self.value, self.uri = d, value, uri
        self.written: dict[int, float] = {0: time.monotonic()}  # the file starts at 0
        self.readings: list[Reading] = []
        self.failures: list[tuple[float, int, str]] = []
        self.current: asyncio.subprocess.Process | None = None
        self.killed = 0
        self._stop = asyncio.Event()

    async def write(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            self.written[n] = time.monotonic()
            write_atomic(self.value, str(n).encode())
            await asyncio.sleep(0.1)

    async def read(self) -> None:
        while not self._stop.is_set():
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "consumer",
                "--bundle", str(self.d.root / "c1.json"), "--state", str(self.d.root / "c1-state"),
                "--timeout", "3", "get", "--json", self.uri,
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            self.current = process
            out, err = await process.communicate()
            self.current = None
            if process.returncode == 0:
                doc = json.loads(out)
                self.readings.append(
                    Reading(time.monotonic(), int(doc["value"]), doc["epoch"], doc["seq"])
                )
            elif process.returncode != -signal.SIGKILL:
                self.failures.append((time.monotonic(), process.returncode or 0, err.decode()))
            await asyncio.sleep(0.05)

    def kill_consumer(self) -> bool:
        if self.current is not None and self.current.returncode is None:
            self.current.send_signal(signal.SIGKILL)
            self.killed += 1
            return True
        return False

    def stop(self) -> None:
        self._stop.set()

    def fresh_after(self, moment: float) -> Reading | None:
        """The first reading of a value written after ``moment``."""
        for reading in self.readings:
            if self.written.get(reading.value, 0.0) > moment:
                return reading
        return None


@pytest.mark.asyncio
async def test_kill_9_and_restart_each_role_during_a_stream_of_readings(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    d = Deployment(tmp_path)
    request.addfinalizer(d.close)  # whatever fails below, no AS is left running
    d.enroll("proxy", "cloud")
    producer_bundle = d.enroll("producer", "meter")
    d.enroll("consumer", "c1")
    d.grant("c1", "meter/*")
    d.start_as()
    value = tmp_path / "power.txt"
    value.write_bytes(b"0")
    proxy = ProxyProcess(d.root / "cloud.json", tmp_path / "proxy")
    producer = ProducerProcess(
        producer_bundle,
        tmp_path / "producer",
        "--resource",
        f"power={value}",
        "--interval",
        "0.05",
        "--max-age",
        "1",
        "--publish",
        f"cloud=coaps://127.0.0.1:{proxy.port + 1}",
    )
    proxy.args = ("--reverse", f"meter=coap://127.0.0.1:{producer.port}")
    request.addfinalizer(producer.kill)
    request.addfinalizer(proxy.kill)
    stream = Stream(d, value, proxy.uri("meter/power"))
    outages: list[tuple[str, float]] = []
    try:
        await asyncio.to_thread(proxy.start)
        await asyncio.to_thread(producer.start)
        tasks = [asyncio.create_task(stream.write()), asyncio.create_task(stream.read())]

        async def flowing(since: float) -> None:
            """Until a fresh reading after ``since`` (at most 8 s: the bound asserted below),
            then a second more of the stream."""
            deadline = time.monotonic() + 8.0
            while stream.fresh_after(since) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)

        await flowing(time.monotonic())

        async def outage(role: str, kill: object, start: object) -> None:
            began = time.monotonic()
            await asyncio.to_thread(kill)  # type: ignore[arg-type]
            await asyncio.sleep(1.0)
            await asyncio.to_thread(start)  # type: ignore[arg-type]
            outages.append((role, began))
            await flowing(began + 1.0)

        assert d.server is not None
        await outage("as", d.server.kill, d.start_as)
        await outage("producer", producer.kill, producer.start)
        await outage("proxy", proxy.kill, proxy.start)
        began = time.monotonic()
        for _ in range(100):
            if stream.kill_consumer():
                break
            await asyncio.sleep(0.02)
        outages.append(("consumer", began))
        await flowing(began + 1.0)
        stream.stop()
        await asyncio.gather(*tasks)
    finally:
        stream.stop()
        if stream.current is not None and stream.current.returncode is None:
            stream.current.kill()
        producer.kill()
        proxy.kill()

    readings = stream.readings
    assert len(readings) >= 30, f"only {len(readings)} readings: {stream.failures[:3]}"
    assert stream.killed == 1
    # nothing accepted that failed a check: every value was written, and nothing went back
    for before, after in itertools.pairwise(readings):
        assert (after.epoch, after.seq) >= (before.epoch, before.seq), (before, after)
        assert after.value >= before.value, (before, after)
    assert all(r.value in stream.written for r in readings)
    # no seq reused: one value per (epoch, seq)
    by_version: dict[tuple[int, int], int] = {}
    for r in readings:
        assert by_version.setdefault((r.epoch, r.seq), r.value) == r.value, r
    # nothing lost beyond each outage: fresh values again within a few seconds of each restart
    for role, began in outages:
        fresh = stream.fresh_after(began + 1.0)
        assert fresh is not None, f"no fresh reading after the {role} came back"
        assert fresh.at - began < 8.0, f"{role}: fresh again only after {fresh.at - began:.1f} s"
    # the audit chain verifies; the proxy's cache survived its kill -9 (it serves without origin)
    audit = d.admin("audit", "--verify", check=False)
    assert audit.returncode == 0, audit.stderr + audit.stdout
    # the proxy's cache survives a kill -9 and serves with the producer gone
    producer.kill()
    proxy.kill()
    await asyncio.to_thread(proxy.start)
    try:
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consumer",
            "--bundle", str(d.root / "c1.json"), "--state", str(d.root / "c1-state"),
            "get", "--json", proxy.uri("meter/power"),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await status.communicate()
    finally:
        proxy.kill()
        d.close()
    assert status.returncode == 0, err.decode()
    assert int(json.loads(out)["value"]) >= readings[-1].value
    assert "Traceback" not in proxy.log() and "Traceback" not in producer.log()
