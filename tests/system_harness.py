"""Whole deployments for the producer/consumer tests: real processes on loopback, no mocks.

- :class:`Deployment`: an AS state made and devices enrolled with the real admin CLI
  (``python -m authz_server``), and the AS server process (:class:`as_harness.AsProcess`);
- :class:`ProducerProcess`: ``python -m producer`` with its log in a file;
- :func:`coap_get`: one plain CoAP request from the test process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiocoap import GET, Context, Message
from as_harness import ROOT, AsProcess, Daemon, free_port

PYTHON = sys.executable


def run(*args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PYTHON, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args[:3]} exited {result.returncode}:\n{result.stderr}")
    return result


class Deployment:
    """An AS (state, process) and the bundles of the devices enrolled on it."""

    def __init__(self, root: Path, *as_args: str) -> None:
        self.root = root
        self.as_state = root / "as"
        self.as_port = free_port()
        self.as_args = as_args
        self.server: AsProcess | None = None
        run(
            "-m",
            "authz_server",
            "init",
            "--state",
            str(self.as_state),
            "--as-uri",
            f"coaps://127.0.0.1:{self.as_port}",
        )

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return run("-m", "authz_server", command, "--state", str(self.as_state), *rest, check=check)

    def enroll(self, role: str, device_id: str) -> Path:
        bundle = self.root / f"{device_id}.json"
        self.admin("enroll", "--role", role, "--id", device_id, "--out", str(bundle))
        return bundle

    def grant(self, consumer: str, pattern: str) -> None:
        self.admin("grant", "--consumer", consumer, "--resource", pattern)

    def start_as(self) -> AsProcess:
        if self.server is None:
            self.server = AsProcess(
                self.as_state,
                self.root / "as.log",
                "--min-rotation-period",
                "1",
                "--tick",
                "0.1",
                *self.as_args,
            )
        self.server.start(self.as_port)
        return self.server

    def stop_as(self) -> None:
        if self.server is not None:
            self.server.stop()

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()


class ProducerProcess(Daemon):
    """``python -m producer`` on 127.0.0.1."""

    ready = "ready"

    def __init__(self, bundle: Path, state: Path, *args: str, port: int | None = None) -> None:
        super().__init__(state.parent / f"{state.name}.log")
        self.bundle = bundle
        self.state = state
        self.args = args
        self.port = port or free_port()
        self.started_at = 0.0

    def command(self) -> list[str]:
        return [
            PYTHON,
            "-m",
            "producer",
            "--bundle",
            str(self.bundle),
            "--state",
            str(self.state),
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.args,
        ]

    def start(self, timeout: float = 30.0, wait_for: str | None = None) -> None:
        self.started_at = time.monotonic()
        super().start(timeout, wait_for)

    def uri(self, resource_id: str) -> str:
        return f"coap://127.0.0.1:{self.port}/{resource_id}"


async def coap_get(uri: str, timeout: float = 10.0, **options: Any) -> Message:
    """One GET from a fresh client context (closed afterwards)."""
    ctx = await Context.create_client_context()
    try:
        request = ctx.request(Message(code=GET, uri=uri, **options))
        return await asyncio.wait_for(request.response, timeout)
    finally:
        await ctx.shutdown()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace a file's content in one step (as a sensor daemon would)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
