"""Where a large object and its plaintext wait while they are checked: bounded memory, private
files, nothing left behind.

- :class:`Assembly` takes an object's bytes as its blocks arrive (:func:`consumer.coap.assemble`'s
  sink). Up to ``threshold`` bytes it keeps them in memory (a small object is opened as before,
  at once); past it, it spills them to a spool file and from then on also feeds them to an
  :class:`oscar.streaming.ObjectReader`, which checks the size limit and the headers and hashes
  the signed message as they come. The spool file is made with mode 0600 (``mkstemp``) in the
  state directory (or the system's temporary directory for a consumer without one) and removed
  by :meth:`Assembly.close`, whatever happened.
- :class:`Output` is where the plaintext of a large object goes: a temporary file (0600) beside
  the destination, renamed over it by :meth:`Output.commit` only once every check has passed
  (signature, freshness and the AEAD tag: :func:`oscar.opening.open_verified_stream`), removed
  by :meth:`Output.discard` otherwise. A reader of the destination never sees a partial or
  unauthenticated plaintext.

What this module does not do: CoAP (:mod:`consumer.coap`) or the checks (:mod:`consumer.pipeline`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from oscar.aeadstream import Pass
from oscar.streaming import ObjectReader, StreamedObject

__all__ = ["PIECE", "SPOOL_THRESHOLD", "Assembly", "Output"]

#: Objects larger than this are spooled and read as they arrive; smaller ones stay in memory.
SPOOL_THRESHOLD = 1 << 20
#: Bytes read from a spool at a time.
PIECE = 1 << 16


class Assembly:
    """One object's bytes as they arrive (see the module docstring). :meth:`feed` raises
    :class:`~oscar.errors.InvalidObject` once the object is known to be unacceptable, OSError
    when the spool cannot be written."""

    def __init__(
        self, *, max_size: int, directory: Path | None, threshold: int = SPOOL_THRESHOLD
    ) -> None:
        self._max_size = max_size
        self._directory = directory
        self._threshold = threshold
        self._memory = bytearray()
        self._reader: ObjectReader | None = None
        self._file: int | None = None
        self._path: str | None = None

    def __repr__(self) -> str:
        return f"Assembly(spilled={self.spilled})"

    @property
    def spilled(self) -> bool:
        """Whether the object went past the threshold (and so to the spool file)."""
        return self._reader is not None

    @property
    def data(self) -> bytes:
        """The object, when it stayed in memory."""
        if self.spilled:
            raise ValueError("the object was spooled")
        return bytes(self._memory)

    def feed(self, data: bytes) -> None:
        if self._reader is None:
            self._memory += data
            if len(self._memory) <= self._threshold:
                return
            self._spill()
            return
        self._reader.feed(data)
        self._write(data)

    def _spill(self) -> None:
        if self._directory is not None:
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".spool-", dir=self._directory)  # 0600
        self._file, self._path = fd, path
        data, self._memory = bytes(self._memory), bytearray()
        self._reader = ObjectReader(max_size=self._max_size)
        self._reader.feed(data)
        self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._file, view) if self._file is not None else len(view)
            view = view[written:]

    def finish(self) -> StreamedObject:
        """The spooled object, read whole; :class:`InvalidObject` when it is incomplete."""
        if self._reader is None:
            raise ValueError("the object was not spooled")
        return self._reader.finish()

    def ciphertext(self, obj: StreamedObject) -> Pass:
        """A pass over ``obj``'s ciphertext in the spool, :data:`PIECE` bytes at a time; each
        call starts again (its own file descriptor)."""
        path = self._path
        if path is None:
            raise ValueError("the object was not spooled")
        start, length = obj.ciphertext_offset, obj.ciphertext_length

        def read() -> Iterator[bytes]:
            with open(path, "rb") as f:
                f.seek(start)
                left = length
                while left:
                    piece = f.read(min(PIECE, left))
                    if not piece:
                        return  # shorter than announced: aeadstream refuses it
                    left -= len(piece)
                    yield piece

        return read

    def close(self) -> None:
        """Remove the spool file, if any (idempotent)."""
        fd, self._file = self._file, None
        path, self._path = self._path, None
        if fd is not None:
            os.close(fd)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class Output:
    """The plaintext of one object on its way to ``destination`` (see the module docstring).
    OSError when the temporary file cannot be made or written."""

    def __init__(self, destination: str | os.PathLike[str]) -> None:
        self.destination = Path(destination)
        directory = self.destination.parent
        fd, path = tempfile.mkstemp(
            prefix=f".{self.destination.name}.", suffix=".part", dir=directory
        )
        self._fd: int | None = fd
        self._path = path
        self.length = 0

    def __repr__(self) -> str:
        return f"Output({str(self.destination)!r}, length={self.length})"

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError("the output is closed")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.length += len(data)

    def commit(self) -> None:
        """Make the plaintext the destination's content: flushed to disk, then renamed."""
        fd, self._fd = self._fd, None
        if fd is None:
            raise ValueError("the output is closed")
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._path, self.destination)
        with contextlib.suppress(OSError):  # the rename's durability: best effort
            dir_fd = os.open(self.destination.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def discard(self) -> None:
        """Remove the temporary file, nothing released (idempotent; after commit, nothing)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
