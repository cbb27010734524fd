"""A throwaway local testbed for the benchmarks that need real processes: an AS, producers, the
plain CoAP server of :mod:`bench.plain_server`, all on 127.0.0.1.

::

    with Testbed("oscar-bench-get-") as bed:
        bundles = bed.start_as(devices={"p": "producer", "c": "consumer"}, grants=[("c", "p/*")])
        producer = bed.spawn("producer", ["-m", "producer", ...], ready=b"producer p ready")
        ... cpu_seconds(producer.pid) ...

Everything lives in one temporary directory: the AS state, the credentials bundles (made with the
admin CLI, ``python -m authz_server init|enroll|grant``, as an operator would), each process's log
file. :meth:`Testbed.close` (also on leaving the ``with`` block, error or not) terminates every
process it started, killing those that do not stop within a few seconds, and removes the directory.

What it does not do: measure anything, or talk CoAP itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from demo.system import free_port

__all__ = ["ROOT", "Testbed", "cpu_seconds", "free_port"]

#: The repository root: processes run from here so that ``-m producer`` and the like import.
ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from ``/proc/PID/stat``.

    The resolution is one clock tick (``SC_CLK_TCK``, 10 ms on Linux): measure long enough.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a process (SIGTERM, then SIGKILL after 5 s); nothing if it has ended."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Testbed:
    """A temporary directory and the processes started in it; see the module docstring."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: dict[str, Path] = {}
        self.as_uri = ""

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL), remove the directory."""
        processes, self._processes = self._processes, []
        for _, process in processes:
            if process.poll() is None:
                process.terminate()
        for _, process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- the AS -----------------------------------------------------------------------------------

    def admin(self, *args: str) -> None:
        """One ``python -m authz_server`` admin command; RuntimeError if it fails."""
        result = subprocess.run(
            [sys.executable, "-m", "authz_server", *args],
            cwd=ROOT,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"authz_server {args[0]} failed: {result.stderr.decode(errors='replace')[-500:]}"
            )

    def start_as(
        self, devices: dict[str, str], grants: Iterable[tuple[str, str]] = ()
    ) -> dict[str, Path]:
        """Make an AS state with ``devices`` (id -> role) and ``grants`` ((consumer, pattern)),
        start the AS and return each device's bundle file. The rate limit is raised out of the
        way (a benchmark is not an attack)."""
        port = free_port()
        self.as_uri = f"coaps://127.0.0.1:{port}"
        state = self.dir / "as-state"
        self.admin("init", "--state", str(state), "--as-uri", self.as_uri)
        bundles = {}
        for device_id, role in devices.items():
            bundles[device_id] = self.dir / f"{device_id}.bundle.json"
            self.admin(
                "enroll", "--state", str(state), "--role", role, "--id", device_id,
                "--out", str(bundles[device_id]),
            )  # fmt: skip
        for consumer, pattern in grants:
            self.admin(
                "grant", "--state", str(state), "--consumer", consumer, "--resource", pattern
            )
        self.spawn(
            "as",
            ["-m", "authz_server", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
             "--rate", "1000000", "--burst", "1000000", "--log-level", "info"],
            ready=b"serving coaps://",
        )  # fmt: skip
        return bundles

    # --- processes --------------------------------------------------------------------------------

    def spawn(
        self, name: str, argv: Sequence[str], *, ready: bytes, timeout: float = 30.0
    ) -> subprocess.Popen[bytes]:
        """Start ``python ARGV`` with its output in ``<name>.log``; return once that log holds
        ``ready``. RuntimeError (with the log's tail) if the process exits or is not ready in
        time; the process is stopped by :meth:`close` either way."""
        process = self.launch(name, argv)
        log_path = self._logs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in log_path.read_bytes():
                return process
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start:\n{self.log(name)[-2000:]}")

    def launch(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``python ARGV`` with its output in ``<name>.log`` and return at once (the caller
        finds out when it is ready); the process is stopped by :meth:`close`."""
        log_path = self.dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        self._processes.append((name, process))
        self._logs[name] = log_path
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Stop one process started here (:func:`stop_process`)."""
        stop_process(process)

    def log(self, name: str) -> str:
        path = self._logs.get(name)
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def write(self, name: str, data: bytes) -> Path:
        """A file in the testbed directory (a producer's value, say)."""
        path = self.dir / name
        path.write_bytes(data)
        return path
