"""The processes of a local OSCAR system and the temporary directory they live in.

::

    system = LocalSystem.create()
    try:
        system.run("as-init", "authz_server", "init", "--state", str(system.path("as")))
        system.spawn("as", "authz_server", "serve", ..., ready="serving coaps://")
        ...
    finally:
        system.close(keep_dir=False)

Every process is ``python -m <module> ...`` with the interpreter running the demo, its working
directory the temporary directory, in a session of its own (so that a Ctrl-C at the terminal
reaches the demo only, which then stops each child in order) and, on Linux, set to get SIGTERM
should the demo itself die without cleaning up. Long-running ones write their output to
``<name>.log`` there; short ones (admin commands, consumers) are run to the end with their output
captured. :meth:`LocalSystem.close` stops them all (SIGTERM, then SIGKILL after a few seconds),
then any child process of the demo still there, then removes the directory.

What it does not do: know anything of OSCAR beyond how to start a process and wait for a line
in its log; the story is in :mod:`demo.story`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .view import StepFailed

__all__ = ["Finished", "LocalSystem", "free_port", "free_port_pair"]

#: Where the demo package lives: put on the children's PYTHONPATH, so that ``-m producer`` and
#: the others import from the same place as the demo even when it runs from a source tree.
_PACKAGES = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A port on 127.0.0.1 that is free now for UDP and for TCP (the kernel's UDP pick), at least
    2: aiocoap's DTLS server serves on its bind port + 1, so port - 1 must be a valid bind port;
    CoAP over TCP (``--tcp``) listens on the same number, and a UDP pick can be a TCP port in use
    (another connection's ephemeral port, say).

    Shared with the tests and the benchmarks."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port >= 2 and _tcp_free(port):
            return port


def _tcp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel's pick): for ``--metrics``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def free_port_pair() -> int:
    """A port P on 127.0.0.1 such that P and P + 1 are both free now, for UDP (plain CoAP and
    DTLS) and TCP (CoAP over TCP and TLS)."""
    while True:
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        if not _tcp_free(port + 1):  # CoAP over TLS listens there (``--tls``)
            continue
        return port


def _death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child receive SIGTERM when the demo dies (Linux ``prctl``),
    or None where that is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


@dataclass
class Child:
    """A process started by the demo: its name in the story, the process, its log (or None)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path | None
    #: Stopped after all the others (the AS: the others may talk to it while they stop).
    stop_last: bool = False


@dataclass(frozen=True)
class Finished:
    """A short process that ran to its end."""

    returncode: int
    stdout: str
    stderr: str


class LocalSystem:
    """A temporary directory and the processes started in it; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[Child] = []
        self._preexec = _death_signal()
        self._env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGES), os.environ.get("PYTHONPATH", "")) if p
        )

    @classmethod
    def create(cls) -> LocalSystem:
        return cls(Path(tempfile.mkdtemp(prefix="oscar-demo-")))

    def path(self, name: str) -> Path:
        return self.root / name

    def command(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def _popen(self, name: str, argv: list[str], log: Path | None) -> Child:
        if log is not None:
            with open(log, "ab") as out:
                process = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
                    argv,
                    cwd=self.root,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=self._preexec,  # the demo has one thread
                )
        else:
            process = subprocess.Popen(  # noqa: S603
                argv,
                cwd=self.root,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    # --- short processes ----------------------------------------------------------------------

    def run(self, name: str, module: str, *args: str, timeout: float = 30.0) -> Finished:
        """Run ``python -m MODULE ARGS`` to its end; StepFailed if it takes over ``timeout``."""
        child = self._popen(name, self.command(module, *args), None)
        try:
            out, err = child.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop(child, grace=1.0)
            raise StepFailed(f"{name} did not finish within {timeout:g} s") from None
        self.children.remove(child)
        return Finished(
            child.process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        )

    def check(self, name: str, module: str, *args: str, timeout: float = 30.0) -> Finished:
        """:meth:`run`, and StepFailed (with its stderr) unless it exits 0."""
        result = self.run(name, module, *args, timeout=timeout)
        if result.returncode != 0:
            raise StepFailed(f"{name} exited {result.returncode}", result.stderr or result.stdout)
        return result

    def start(self, name: str, module: str, *args: str, stop_last: bool = False) -> Child:
        """Start ``python -m MODULE ARGS`` with its output in ``<name>.log``; return at once."""
        child = self._popen(name, self.command(module, *args), self.path(f"{name}.log"))
        child.stop_last = stop_last
        return child

    def start_piped(self, name: str, module: str, *args: str) -> Child:
        """Start ``python -m MODULE ARGS`` with stdout and stderr piped to the demo."""
        return self._popen(name, self.command(module, *args), None)

    # --- long-running processes ---------------------------------------------------------------

    def wait_for(self, child: Child, text: str, timeout: float = 30.0, offset: int = 0) -> str:
        """Wait until ``child``'s log holds ``text`` after ``offset``; return the log from
        ``offset``. StepFailed (with the log's tail) if it exits first or takes too long."""
        if child.log is None:
            raise ValueError(f"{child.name} has no log")
        deadline = time.monotonic() + timeout
        while True:
            log = self.read_log(child, offset)
            if text in log:
                return log
            if child.process.poll() is not None:
                raise StepFailed(
                    f"{child.name} exited {child.process.returncode} (log: {child.log})",
                    tail(log),
                )
            if time.monotonic() > deadline:
                raise StepFailed(f"{child.name}: no {text!r} within {timeout:g} s", tail(log))
            time.sleep(0.05)

    def read_log(self, child: Child, offset: int = 0) -> str:
        if child.log is None or not child.log.exists():
            return ""
        with open(child.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_size(self, child: Child) -> int:
        return child.log.stat().st_size if child.log is not None and child.log.exists() else 0

    def spawn(
        self, name: str, module: str, *args: str, ready: str, stop_last: bool = False
    ) -> Child:
        """:meth:`start`, then :meth:`wait_for` ``ready``."""
        child = self.start(name, module, *args, stop_last=stop_last)
        self.wait_for(child, ready)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> int:
        """Stop one child (SIGTERM; SIGKILL after ``grace`` seconds); return its exit status."""
        status = self._stop(child, grace)
        with contextlib.suppress(ValueError):
            self.children.remove(child)
        return status

    def _stop(self, child: Child, grace: float) -> int:
        process = child.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        return process.returncode

    # --- the end ------------------------------------------------------------------------------

    def close(self, *, keep_dir: bool, grace: float = 5.0) -> list[str]:
        """Stop every child: SIGTERM to all (those marked ``stop_last`` once the others are
        gone), SIGKILL to those still running ``grace`` seconds later; then any other child
        process of the demo; then remove the directory unless ``keep_dir``. Returns the names
        of the children that had to be killed."""
        children, self.children = self.children, []
        killed: list[str] = []
        for wave in (
            [c for c in children if not c.stop_last],
            [c for c in children if c.stop_last],
        ):
            for child in wave:
                if child.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.terminate()
            deadline = time.monotonic() + grace
            for child in wave:
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    killed.append(child.name)
                    child.process.kill()
                    child.process.wait()
                for stream in (child.process.stdout, child.process.stderr):
                    if stream is not None:
                        stream.close()
        for pid in _children_of(os.getpid()):  # started, but a signal came before it was listed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if not keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)
        return killed


def _children_of(pid: int) -> Sequence[int]:
    """The pids of the processes whose parent is ``pid`` (Linux /proc; none elsewhere)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
