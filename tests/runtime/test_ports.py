"""Two daemons on one port: every daemon refuses a UDP port another process holds.

aiocoap binds with SO_REUSEPORT, so without a check a second AS, producer or proxy on a port in use
said "serving" and the kernel split the traffic between the two silently. Real processes here: the
first daemon is started for real, the second must exit non-zero with one line naming the address.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from as_harness import ROOT
from proxy_harness import ProxyProcess
from system_harness import PYTHON, Deployment, ProducerProcess

from oscar_io.ports import (
    PortInUse,
    ensure_alone_on_port,
    ensure_port_free,
    others_on_port,
    parse_listen,
)


def second(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def assert_refused(result: subprocess.CompletedProcess[str], address: str) -> None:
    assert result.returncode == 1, result.stderr  # a runtime condition: systemd tries again
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert address in lines[0] and "in use" in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "serving" not in result.stdout + result.stderr


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path / "one")
    yield d
    d.close()


def test_a_second_as_on_the_same_port_refuses_to_start(
    deployment: Deployment, tmp_path: Path
) -> None:
    first = deployment.start_as()
    other = Deployment(tmp_path / "two")
    result = second(
        "-m",
        "authz_server",
        "serve",
        "--state",
        str(other.as_state),
        "--listen",
        f"127.0.0.1:{first.port}",
    )
    assert_refused(result, f"127.0.0.1:{first.port}")
    assert first.proc is not None and first.proc.poll() is None  # the first one goes on


def test_a_second_producer_on_the_same_port_refuses_to_start(
    deployment: Deployment, tmp_path: Path
) -> None:
    bundle = deployment.enroll("producer", "meter")
    deployment.start_as()
    value = tmp_path / "value.txt"
    value.write_bytes(b"1")
    first = ProducerProcess(bundle, tmp_path / "p1", "--resource", f"power={value}")
    first.start()
    try:
        clone = ProducerProcess(
            bundle, tmp_path / "p2", "--resource", f"power={value}", port=first.port
        )
        result = second(*clone.command()[1:])
        assert_refused(result, f"127.0.0.1:{first.port}")
        assert first.proc is not None and first.proc.poll() is None
    finally:
        first.kill()


def test_a_second_proxy_on_the_same_ports_refuses_to_start(
    deployment: Deployment, tmp_path: Path
) -> None:
    bundle = deployment.enroll("proxy", "cloud")
    deployment.start_as()
    first = ProxyProcess(bundle, tmp_path / "x1")
    first.start(wait_for="serving")
    try:
        clone = ProxyProcess(bundle, tmp_path / "x2", port=first.port)
        result = second(*clone.command()[1:])
        assert_refused(result, f"127.0.0.1:{first.port}")
        assert first.proc is not None and first.proc.poll() is None
    finally:
        first.kill()


def _reuseport_socket(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def test_the_probe_sees_a_socket_bound_with_so_reuseport() -> None:
    held = _reuseport_socket("127.0.0.1")
    try:
        port = held.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port} is already in use"):
            ensure_port_free("127.0.0.1", port)
        with pytest.raises(PortInUse):
            ensure_port_free("0.0.0.0", port)  # noqa: S104 (the wildcard overlaps it)
    finally:
        held.close()
    ensure_port_free("127.0.0.1", port)  # free again


def test_after_the_bind_another_process_on_the_port_is_seen() -> None:
    """The race the probe cannot close: both bound with SO_REUSEPORT, each sees the other."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            "s.bind(('::ffff:127.0.0.1', 0))\n"
            "print(s.getsockname()[1], flush=True)\n"
            "time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        mine = _reuseport_socket("127.0.0.1", port)  # shares the port, as aiocoap would
        try:
            assert others_on_port("127.0.0.1", port) == 1
            assert others_on_port("127.0.0.2", port) == 0  # another address does not overlap
            with pytest.raises(PortInUse, match="also held by another process"):
                ensure_alone_on_port("127.0.0.1", port)
        finally:
            mine.close()
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    deadline = time.monotonic() + 5
    while others_on_port("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.05)
    ensure_alone_on_port("127.0.0.1", port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5683", ("127.0.0.1", 5683)),
        ("[::1]:5684", ("::1", 5684)),
        ("localhost:1", ("localhost", 1)),
        ("host:65535", ("host", 65535)),
    ],
)
def test_parse_listen_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["", "5683", ":5683", "host:", "host:0", "host:65536", "host:x", "::1:5683", "[::1]"]
)
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(text)


def test_parse_listen_bounds() -> None:
    assert parse_listen("h:2", lowest=2) == ("h", 2)
    with pytest.raises(ValueError, match="from 2 to 65534"):
        parse_listen("h:1", lowest=2, highest=65534)
