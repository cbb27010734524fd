"""Where a resource's values come from, besides code (``Producer.update``): a file, a command or a
callback, each looked at every ``interval`` seconds (:class:`~producer.config.ResourceSpec`).

- :class:`FileSource`: the file's content is a new value when its modification time, size or
  inode changed; a file over :data:`~producer.config.MAX_VALUE_SIZE` is refused once (until it
  changes again); a file that cannot be read is reported once (every look while the resource
  has no value yet).
- :func:`run`: a command's standard output (it must exit 0 within ``max(10, interval)`` seconds)
  or a callback's return value (bytes, or None for "no change"; it may be async), every
  ``interval`` seconds. A failure is one warning line; the loop goes on.

What it does not do: seal. A value goes to :meth:`~producer.published.Published.update`, which
seals it only when it differs from the current one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path

from oscar_io.statefiles import read_bounded

from .config import MAX_VALUE_SIZE, ResourceSpec

__all__ = ["FileSource", "read", "run"]

log = logging.getLogger("oscar.producer")


class FileSource:
    """A file looked at no more often than every ``interval`` seconds (monotonic clock)."""

    def __init__(self, path: Path, interval: float, name: str) -> None:
        self.path, self.interval, self.name = path, interval, name
        self._stat: tuple[int, int, int] | None = None
        self._next = 0.0

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r}, interval={self.interval})"

    def poll(self, now_mono: float, *, waiting: bool) -> bytes | None:
        """The file's content if it is time to look and it changed since the last look, else
        None. ``waiting``: the resource has no value yet (a missing file is then reported at
        every look, not only once)."""
        path = self.path
        if now_mono < self._next:
            return None
        self._next = now_mono + self.interval
        try:
            st = os.stat(path)
        except OSError as exc:
            if self._stat is not None or waiting:
                log.warning("%s: cannot read %s: %s", self.name, path, exc.strerror)
                self._stat = None
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._stat:
            return None
        if st.st_size > MAX_VALUE_SIZE:
            log.error("%s: %s is over the %d-byte limit", self.name, path, MAX_VALUE_SIZE)
            self._stat = key
            return None
        try:
            with open(path, "rb") as f:
                data = read_bounded(f, MAX_VALUE_SIZE, st.st_size)
        except OSError as exc:
            log.warning("%s: cannot read %s: %s", self.name, path, exc.strerror)
            return None
        self._stat = key
        return data


async def run(spec: ResourceSpec, name: str, update: Callable[[bytes], object]) -> None:
    """Read the command or callback of ``spec`` every ``interval`` seconds and hand each value
    to ``update``; runs until cancelled."""
    while True:
        try:
            value = await read(spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s: value source failed: %s", name, exc)
            value = None
        if value is not None:
            update(value)
        await asyncio.sleep(spec.interval)


async def read(spec: ResourceSpec) -> bytes | None:
    """One value from the callback or the command of ``spec`` (None: no change, or neither)."""
    if spec.callback is not None:
        result = spec.callback()
        if inspect.isawaitable(result):
            result = await result
        return None if result is None else bytes(result)
    if not spec.command:
        return None
    process = await asyncio.create_subprocess_exec(
        *spec.command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(max(10.0, spec.interval)):
            out = await _bounded_output(process)
            if out is not None:
                await process.wait()
    except TimeoutError:
        out = b""
    if process.returncode is None:  # timed out, or wrote too much: stopped, not waited for
        process.kill()
        await process.wait()
        if out is not None:
            raise RuntimeError("the command timed out")
    if out is None:  # more than a value may hold: stopped reading, not kept in memory
        raise RuntimeError(f"the command wrote more than {MAX_VALUE_SIZE} bytes")
    if process.returncode != 0:
        raise RuntimeError(f"the command exited with status {process.returncode}")
    return out


async def _bounded_output(process: asyncio.subprocess.Process) -> bytes | None:
    """The command's standard output, or None once it passes :data:`MAX_VALUE_SIZE`."""
    stdout = process.stdout
    if stdout is None:  # not piped: nothing to read
        return b""
    pieces, total = [], 0
    while piece := await stdout.read(1 << 20):
        total += len(piece)
        if total > MAX_VALUE_SIZE:
            return None
        pieces.append(piece)
    return b"".join(pieces)
