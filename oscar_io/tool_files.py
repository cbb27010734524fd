"""The files of the ``oscar`` operator tool: read an input, write an output, create a key file.

``-`` stands for stdin or stdout. Every failure is a :class:`~oscar_io.errors.UsageError` naming the
file and the operating system's reason, never its content.

What this module does not do: decide what goes in a file (:mod:`oscar_io.tool` does), or keep state
between runs.
"""

from __future__ import annotations

import os
import sys
import tempfile

from .errors import UsageError

__all__ = ["create_file", "read_file", "write_file"]


def read_file(path: str, what: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def write_file(path: str, data: bytes, what: str) -> None:
    if path == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise UsageError(f"cannot write {what} {path!r}: {exc.strerror or exc}") from None


def _write_fd(fd: int, data: bytes, mode: int) -> None:
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have taken bits away
        f.write(data)


def create_file(path: str, data: bytes, mode: int, *, force: bool, what: str) -> None:
    """Write a new file with exactly ``mode``; an existing one is replaced only with ``force``."""
    if path == "-":
        write_file(path, data, what)
        return
    try:
        if not force:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                raise UsageError(f"{path!r} exists; use --force to replace it") from None
            written = path
        else:
            # Through a new file and a rename: the result has ``mode`` whatever the old file's was,
            # and no reader ever sees half a key.
            fd, written = tempfile.mkstemp(
                dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}."
            )
        try:
            _write_fd(fd, data, mode)
            if written != path:
                os.replace(written, path)
        except BaseException:
            os.unlink(written)  # no half-written key left behind to block the next attempt
            raise
    except OSError as exc:
        raise UsageError(f"cannot write {what} {path!r}: {exc.strerror or exc}") from None
