"""State files: the one way every role (AS, producer, consumer, proxy) keeps what it must remember.

- :func:`private_dir`: opens (or makes, mode 0700) a state directory, refused unless it is this
  user's and holds nothing of another's and no symbolic link; a wider mode of its own is repaired.
- :func:`atomic_write`: all or nothing, durably, through an exclusive temporary file with a random
  name (mode 0600 from the first byte); a symbolic link at the target is replaced, never followed.
- :func:`read_state_file`: reads without following a symbolic link or blocking on a FIFO, refuses
  another user's file (and, for private files, one others can read).
- :class:`SealedFile`: a small state file encrypted and authenticated (AES-256-GCM) under a key
  derived from the bundle's PSK. A stolen state directory without the bundle reveals nothing; a
  tampered or truncated file is refused, never half-read.

Errors: :class:`StateError` (one line, naming the file; never its content).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from oscar import cbor

from .errors import StateError
from .sealing import Sealer, SealError

__all__ = [
    "MAX_STATE_FILE",
    "SealedFile",
    "StateError",
    "atomic_write",
    "private_dir",
    "read_bounded",
    "read_state_file",
]

log = logging.getLogger("oscar.state")


# --- sealed state files --------------------------------------------------------------------------


class SealedFile:
    """One state file: a CBOR value sealed by :mod:`oscar_io.sealing` (context: the file's
    label), mode 0600. Files of earlier releases (``nonce || ciphertext``) still load.

    :meth:`save` writes a temporary file, fsyncs it, renames it over the old one and fsyncs the
    directory, so a crash leaves the old or the new content, never a mix.
    """

    def __init__(self, path: Path, key: bytes, label: str) -> None:
        self.path = Path(path)
        self._sealer = Sealer(key)
        self._aad = cbor.dumps(["OSCAR state file", label])

    def __repr__(self) -> str:
        return f"SealedFile({str(self.path)!r})"

    def load(self) -> Any:
        """The stored value, or None when the file does not exist; :class:`StateError` when it
        cannot be authenticated or decoded, or is a symbolic link or another user's file."""
        blob = read_state_file(self.path)
        if blob is None:
            return None
        try:
            plain = self._sealer.open(blob, self._aad, legacy=True)
        except SealError:
            raise StateError(
                f"{self.path} fails authentication: corrupt, tampered with, or written under "
                "another bundle (remove it to start over)"
            ) from None
        try:
            return cbor.loads(plain, max_items=1_000_000)
        except ValueError:
            raise StateError(f"{self.path} holds malformed data") from None

    def save(self, value: Any) -> None:
        """Replace the content atomically and durably; OSError if the disk refuses."""
        atomic_write(self.path, self._sealer.seal(cbor.dumps(value), self._aad))


# --- state directories and the files in them -----------------------------------------------------
#
# A state directory is private: owned by the process's user, mode 0700, holding nothing of another
# user's and no symbolic link. Checked once when a role opens it; after that nobody but this user
# (and root) can add a name to it. Temporary files are made exclusively (random name, O_EXCL,
# O_NOFOLLOW, mode 0600 from the first byte) and files are read without following a symbolic link,
# so a name planted while a directory was open to others can neither receive nor redirect a secret.

#: Flags for reading a state file: a symbolic link fails (ELOOP), a FIFO does not block the open.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: State files are small; a bigger one is refused rather than read into memory.
MAX_STATE_FILE = 64 << 20


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` all or nothing, durably, with ``mode``.

    The temporary file is made by :func:`tempfile.mkstemp` in the same directory (an unpredictable
    name, O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600 from the first byte) and given ``mode`` only once
    written; the rename replaces a symbolic link at ``path`` rather than writing through it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # never leave a copy (a private key, say) under the temporary name
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state_file(path: Path, *, private: bool = False) -> bytes | None:
    """The content of a file in a state directory, or None when there is none.

    :class:`StateError` when it is a symbolic link (never followed), not a regular file, another
    user's, over :data:`MAX_STATE_FILE`, unreadable, or (``private``) open to group or others.
    """
    path = Path(path)
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(f"{path} is a symbolic link: refusing to follow it") from None
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StateError(f"{path} is not a regular file")
        _check_owner(path, info, "file")
        if private and info.st_mode & 0o077:
            raise StateError(f"{path} is readable by others: chmod 600 it")
        try:
            data = read_bounded(f, MAX_STATE_FILE, info.st_size)
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_STATE_FILE:
        raise StateError(f"{path} is over {MAX_STATE_FILE} bytes")
    return data


def read_bounded(f: BinaryIO, limit: int, size_hint: int) -> bytes:
    """At most ``limit + 1`` bytes of ``f`` (one more than allowed: the caller refuses it).

    ``f.read(n)`` allocates ``n`` bytes before reading: with ``limit`` as ``n``, each read of a
    small state file (every freshness save) or a producer's value file (every poll) made a 64 MiB
    allocation. This reads the size the file had (``size_hint``, from fstat) and one byte more,
    then, only if the file grew meanwhile, goes on in 1 MiB pieces up to the bound."""
    want = min(limit, max(size_hint, 0)) + 1
    first = f.read(want)
    if len(first) < want or len(first) > limit:
        return first
    pieces, total = [first], len(first)
    while total <= limit:
        piece = f.read(min(1 << 20, limit + 1 - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)


def _check_owner(path: Path, info: os.stat_result, what: str) -> None:
    uid = os.geteuid()
    if info.st_uid != uid:
        raise StateError(
            f"the state {what} {path} belongs to uid {info.st_uid}, not to this user "
            f"(uid {uid}): refusing it"
        )


def private_dir(path: Path, *, create: bool = True) -> Path:
    """Create (mode 0700) or check a state directory; :class:`StateError` when it is unsafe.

    Refused: a symbolic link, anything but a directory, a directory of another user, and one that
    holds a symbolic link or another user's file (planted while it was open to others, or left by
    an admin command run as root). A directory of this user's with a wider mode than 0700 (a
    plain ``mkdir`` gives 0755) is closed to 0700 before its entries are checked (and stays so
    when it is then refused), with a warning when it is accepted.
    The checks are made on the directory as opened (O_NOFOLLOW), so it cannot be swapped between
    check and repair. OSError when it cannot be made or read.
    """
    path = Path(path)
    if create and not os.path.lexists(path):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise StateError(
                f"the state directory {path} is a symbolic link: refusing it (name the real "
                "directory)"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise StateError(f"{path} is not a directory") from None
        raise
    try:
        info = os.fstat(fd)
        _check_owner(path, info, "directory")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            # Closed first, then checked: nothing can be planted between the check and the repair.
            # A directory refused below stays closed (ours, and safer so).
            os.fchmod(fd, 0o700)
        with os.scandir(fd) as entries:
            for entry in entries:
                held = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(held.st_mode):
                    raise StateError(
                        f"the state directory {path} holds a symbolic link {entry.name!r}: "
                        "nothing in it is followed; refusing it (remove the link)"
                    )
                if held.st_uid != info.st_uid:
                    raise StateError(
                        f"the state directory {path} holds {entry.name!r} of uid {held.st_uid}, "
                        "not of its owner: refusing it (remove what its owner did not put there)"
                    )
        if mode & 0o077:
            log.warning("the state directory %s had mode %04o: made it 0700", path, mode)
    finally:
        os.close(fd)
    return path
