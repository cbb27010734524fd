"""The demo's child processes as the story sees them: the installed command that runs each
module, a child's output read line by line against a deadline, and a file replaced in one step."""

from __future__ import annotations

import os
import select
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .system import Child
from .view import StepFailed

__all__ = ["ENTRY_POINTS", "installed", "lines", "stderr_of", "write_atomic"]


#: The installed command of each module (pyproject.toml, ``[project.scripts]``).
ENTRY_POINTS = {
    "authz_server": "oscar-as",
    "consumer": "oscar-consumer",
    "producer": "oscar-producer",
    "proxy": "oscar-proxy",
    "oscar": "oscar",
}


def installed(module: str) -> str:
    """How to type ``module``'s installed command: its name when that name on ``PATH`` is the
    one beside the interpreter running the demo (``.venv/bin``), else that file's full path."""
    name = ENTRY_POINTS[module]
    beside = Path(sys.executable).parent / name  # not resolved: the venv's bin, not the base's
    found = shutil.which(name)
    if found is not None and Path(found).absolute() == beside.absolute():
        return name
    return str(beside) if beside.exists() else name


def lines(child: Child, timeout: float) -> Iterator[str]:
    """The lines ``child`` writes to stdout, until it ends or ``timeout`` seconds pass
    (StepFailed then, with its stderr)."""
    if child.process.stdout is None:
        raise ValueError("the child's stdout is not a pipe")
    fd = child.process.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode(errors="replace")
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepFailed(f"{child.name}: no answer within {timeout:g} s", stderr_of(child))
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                child.process.wait()
                raise StepFailed(
                    f"{child.name} exited {child.process.returncode}", stderr_of(child)
                )
            buffer += chunk


def stderr_of(child: Child) -> str:
    if child.process.stderr is None or child.process.poll() is None:
        return ""
    return child.process.stderr.read().decode(errors="replace")


def write_atomic(path: Path, text: str) -> None:
    """Replace a file's content in one step, as a sensor daemon would."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
