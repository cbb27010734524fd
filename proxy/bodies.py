"""The proxy's store of large bodies (verified objects over 1 MiB): on disk, encrypted, by blocks.

A body is spooled to disk as it arrives (:meth:`BodyStore.spool`, :class:`BodyWriter`), never held
whole in memory, committed under its resource and version once verified, and then served in
ranges (:meth:`BodyStore.read`). The at-rest format, one file per resource in the directory::

    name    HMAC-SHA256(index key, resource id UTF-8)[:16].hex()   (no resource name in clear)
    file    0x01 || salt (16 random bytes, chosen at spool time)
            || chunk 0 || chunk 1 || ... || chunk n-1 || meta || len(meta) (4 bytes, big-endian)
    chunk i Sealer(file key).seal(plaintext[i*CHUNK : (i+1)*CHUNK],
                                  context = salt || i (8 bytes, big-endian) || last (0x00 | 0x01))
    meta    Sealer(file key).seal(CBOR [resource id, epoch, seq, length], context = salt || b"meta")

with index key = HKDF-SHA256(storage key, "OSCAR proxy bodies index"), data key = the same with
"OSCAR proxy bodies data", and file key = HKDF-SHA256(data key, "OSCAR proxy body", salt = salt).
Every chunk but the last holds CHUNK bytes, so chunk i lies at ``17 + i * (CHUNK + OVERHEAD)``;
the last holds 1 to CHUNK bytes and is flagged last, and the file's size must be exactly the one
its meta implies: a truncated or extended file, a chunk moved within a file or from another one
(another salt, so another key), an altered byte anywhere do not open. The meta is read first, so
no byte is served from a file that is not the asked resource's body at the asked version.

Crash safety: a spool is ``<random>.part`` (mode 0600, O_EXCL), written, fsynced and renamed over
the resource's file, then the directory is fsynced: a crash leaves the old body or the new one.
Leftover ``.part`` files are removed at the next start. The store is bounded by ``max_bytes``:
after each commit the least recently used bodies (by mtime, which reads refresh at most once a
minute) are removed, never the one just committed.

Failures: :class:`BodyError` (missing, another version, unreadable, altered); a body that fails
to authenticate (or is another resource's) is removed and logged once at warning. A version
mismatch removes nothing (a newer body may just have replaced the one asked for).

What this module does not do: verify objects (the caller does, before committing), keep bodies in
memory beyond a small LRU of decrypted chunks (:data:`CACHED_CHUNKS`), or know about CoAP.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from oscar import cbor
from oscar.keys import hkdf_sha256
from oscar_io.errors import StateError
from oscar_io.sealing import OVERHEAD, Sealer, SealError
from oscar_io.statefiles import private_dir

__all__ = ["CACHED_CHUNKS", "CHUNK", "MAX_SPOOLS", "BodyError", "BodyStore", "BodyWriter"]

log = logging.getLogger("oscar.proxy")

#: Plaintext bytes per sealed chunk.
CHUNK = 1 << 16
#: Spools open at once (bodies being taken in), beyond which :meth:`BodyStore.spool` refuses.
MAX_SPOOLS = 16
#: Decrypted chunks kept for in-order block reads (16 chunks: 1 MiB).
CACHED_CHUNKS = 16
_FORMAT = b"\x01"
_SALT = 16
_HEADER = len(_FORMAT) + _SALT
_SEALED = CHUNK + OVERHEAD
_MAX_META = 2048  # the meta of the longest resource id (255 characters, 1020 bytes) is below
_NAME = re.compile(r"[0-9a-f]{32}")
_TOUCH_SECONDS = 60


class BodyError(Exception):
    """A body cannot be read: missing, another version, altered or truncated (names no secret)."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise SealError("short read")
    return data


class _Corrupt(Exception):
    """Internal: the file is not a sound body (removed by the caller)."""


class BodyStore:
    """The directory of large bodies (see the module docstring); safe to share between threads."""

    def __init__(
        self, directory: Path, storage_key: bytes, *, max_bytes: int, max_spools: int = MAX_SPOOLS
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._max_spools = max_spools
        #: Spools open now (bodies being taken in): at most max_spools.
        self.spooling = 0
        self._count = self._total = 0
        try:
            private_dir(self._dir)
            for entry in os.scandir(self._dir):
                if entry.name.endswith(".part"):
                    os.unlink(entry.path)
            self._recount()
        except OSError as exc:
            raise StateError(
                f"the proxy's body directory {self._dir} cannot be used: {exc.strerror}"
            ) from None
        self._index_key = hkdf_sha256(storage_key, b"OSCAR proxy bodies index", 32)
        self._data_key = hkdf_sha256(storage_key, b"OSCAR proxy bodies data", 32)
        self._lock = threading.Lock()
        self._chunks: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()

    def __repr__(self) -> str:
        return f"BodyStore({self._count} bodies, {self._total} of {self._max_bytes} bytes)"

    @property
    def total_bytes(self) -> int:
        """Bytes of the committed bodies' files on disk."""
        return self._total

    def __len__(self) -> int:
        """The committed bodies."""
        return self._count

    def spool(self) -> BodyWriter:
        """A new spool file; OSError if it cannot be made, or (EBUSY) if ``max_spools`` are open
        already: the disk that transfers under way take is bounded too (each by the object size
        limit), not only the bodies kept."""
        with self._lock:
            if self.spooling >= self._max_spools:
                raise OSError(errno.EBUSY, "too many large objects being taken in at once")
            self.spooling += 1
        try:
            return self._spool()
        except BaseException:
            self._released()
            raise

    def _released(self) -> None:
        with self._lock:
            self.spooling -= 1

    def _spool(self) -> BodyWriter:
        salt = secrets.token_bytes(_SALT)
        path = self._dir / f"{secrets.token_hex(16)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            _write_all(fd, _FORMAT + salt)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return BodyWriter(self, fd, path, salt, self._file_sealer(salt))

    def read(self, resource_id: str, version: tuple[int, int], offset: int, length: int) -> bytes:
        """The body's bytes ``[offset, offset + length)``, fewer at its end, ``b""`` past it.

        Raises :class:`BodyError` (see the module docstring), ValueError for a negative range."""
        if offset < 0 or length < 0:
            raise ValueError("a body range is not negative")
        fd, inode, salt, sealer, size = self._open(resource_id, version)
        try:
            end = min(offset + length, size)
            last = (size - 1) // CHUNK
            parts = []
            for index in range(offset // CHUNK, (end - 1) // CHUNK + 1 if offset < end else 0):
                plain = self._chunk(fd, salt, sealer, index, index == last, size)
                start = index * CHUNK
                parts.append(plain[max(offset - start, 0) : end - start])
            return b"".join(parts)
        except _Corrupt:
            self._corrupt(resource_id, inode)
        finally:
            os.close(fd)

    def size(self, resource_id: str, version: tuple[int, int]) -> int:
        """The body's length; :class:`BodyError` as :meth:`read`."""
        fd, _inode, _salt, _sealer, size = self._open(resource_id, version)
        os.close(fd)
        return size

    def discard(self, resource_id: str) -> None:
        """Remove the resource's body if there is one."""
        with self._lock:
            self._remove(self._path(resource_id), None)

    # Internals.

    def _path(self, resource_id: str) -> str:
        # a str, not a Path: pathlib would intern every name it parses, on each read
        digest = hmac.new(self._index_key, resource_id.encode(), hashlib.sha256).digest()
        return os.path.join(self._dir, digest[:16].hex())

    def _file_sealer(self, salt: bytes) -> Sealer:
        return Sealer(hkdf_sha256(self._data_key, b"OSCAR proxy body", 32, salt=salt))

    def _open(
        self, resource_id: str, version: tuple[int, int]
    ) -> tuple[int, int, bytes, Sealer, int]:
        """The open body file (fd, inode, salt, sealer, length) after its meta was checked."""
        try:
            fd = os.open(self._path(resource_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BodyError(f"no body of {resource_id}") from None
        except OSError as exc:
            raise BodyError(f"the body of {resource_id} cannot be read: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            salt, sealer, meta = self._meta(fd, info.st_size)
            if meta[0] != resource_id:
                raise _Corrupt  # a file copied or renamed to another resource's name
            if (meta[1], meta[2]) != tuple(version):
                raise BodyError(f"the body of {resource_id} is of another version")
            if time.time() - info.st_mtime >= _TOUCH_SECONDS:
                with contextlib.suppress(OSError):  # only the eviction order would suffer
                    os.utime(fd)  # refreshed at most once a minute
        except _Corrupt:
            os.close(fd)
            self._corrupt(resource_id, info.st_ino)
        except OSError as exc:  # fstat: _meta turns every failure of its reads into _Corrupt
            os.close(fd)
            raise BodyError(f"the body of {resource_id} cannot be read: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_ino, salt, sealer, meta[3]

    def _meta(self, fd: int, file_size: int) -> tuple[bytes, Sealer, tuple[str, int, int, int]]:
        try:
            header = _pread(fd, _HEADER, 0)
            meta_length = int.from_bytes(_pread(fd, 4, file_size - 4), "big")
            if header[:1] != _FORMAT or not OVERHEAD < meta_length <= _MAX_META:
                raise _Corrupt
            salt, sealer = header[1:], self._file_sealer(header[1:])
            sealed = _pread(fd, meta_length, file_size - 4 - meta_length)
            meta = cbor.loads(sealer.open(sealed, salt + b"meta"))
        except (SealError, cbor.MalformedCBOR, OSError, ValueError):
            raise _Corrupt from None
        match meta:
            case [str(resource_id), int(epoch), int(seq), int(size)] if size > 0:
                pass
            case _:
                raise _Corrupt
        if file_size != _HEADER + size + -(-size // CHUNK) * OVERHEAD + meta_length + 4:
            raise _Corrupt  # truncated or extended
        return salt, sealer, (resource_id, epoch, seq, size)

    def _corrupt(self, resource_id: str, inode: int) -> NoReturn:
        with self._lock:
            self._remove(self._path(resource_id), inode)
            with contextlib.suppress(OSError):
                self._recount()  # a file altered on disk may have changed size behind our back
        log.warning("proxy body of %s failed to authenticate: removed", resource_id)
        raise BodyError(f"the body of {resource_id} is altered or truncated")

    def _chunk(
        self, fd: int, salt: bytes, sealer: Sealer, index: int, last: bool, size: int
    ) -> bytes:
        key = (salt, index)
        with self._lock:
            plain = self._chunks.get(key)
            if plain is not None:
                self._chunks.move_to_end(key)
                return plain
        sealed_length = (size - index * CHUNK if last else CHUNK) + OVERHEAD
        context = salt + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")
        try:
            plain = sealer.open(_pread(fd, sealed_length, _HEADER + index * _SEALED), context)
        except (SealError, OSError):
            raise _Corrupt from None
        with self._lock:
            self._chunks[key] = plain
            while len(self._chunks) > CACHED_CHUNKS:
                self._chunks.popitem(last=False)
        return plain

    def _recount(self) -> None:
        sizes = [
            e.stat(follow_symlinks=False).st_size
            for e in os.scandir(self._dir)
            if _NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False)
        ]
        self._count, self._total = len(sizes), sum(sizes)

    def _remove(self, path: str, inode: int | None) -> None:
        """Remove ``path`` (only if it is still ``inode``, when given); the lock is held."""
        try:
            info = os.stat(path, follow_symlinks=False)
            if inode is not None and info.st_ino != inode:
                return  # replaced by a commit meanwhile: not the file found unsound
            os.unlink(path)
        except FileNotFoundError:
            return
        self._count -= 1
        self._total -= info.st_size

    def _committed(self, spool: Path, resource_id: str) -> None:
        """Rename ``spool`` over the resource's file, then evict down to ``max_bytes``."""
        target = self._path(resource_id)
        size = spool.stat().st_size
        with self._lock:
            try:
                replaced: int | None = os.stat(target, follow_symlinks=False).st_size
            except FileNotFoundError:
                replaced = None
            os.rename(spool, target)  # the old body or the new one, never neither
            if replaced is None:
                self._count += 1
            self._total += size - (replaced or 0)
            _fsync_dir(self._dir)
            if self._total > self._max_bytes:
                self._evict(keep=os.path.basename(target))

    def _evict(self, keep: str) -> None:
        files = []
        for entry in os.scandir(self._dir):
            if _NAME.fullmatch(entry.name) and entry.name != keep:
                try:
                    files.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                except FileNotFoundError:
                    continue
        for _mtime, name in sorted(files):
            if self._total <= self._max_bytes:
                break
            self._remove(os.path.join(self._dir, name), None)


class BodyWriter:
    """One body being spooled (from :meth:`BodyStore.spool`); holds at most one chunk of plaintext.

    A context manager: leaving it without :meth:`commit` aborts."""

    def __init__(self, store: BodyStore, fd: int, path: Path, salt: bytes, sealer: Sealer) -> None:
        self._store, self._fd, self._path = store, fd, path
        self._salt, self._sealer = salt, sealer
        self._buffer = bytearray()
        self._index = 0
        self._received = 0
        self._done = False

    def __repr__(self) -> str:
        return f"BodyWriter({self._received} bytes{', done' if self._done else ''})"

    def __enter__(self) -> BodyWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()

    @property
    def received(self) -> int:
        """Plaintext bytes written so far."""
        return self._received

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; each full chunk is sealed and written once more data follows it (the
        last chunk is flagged at commit). OSError propagates (the spool is removed: the writer is
        aborted); RuntimeError after commit/abort."""
        self._check()
        view = memoryview(data)
        try:
            while view:
                if len(self._buffer) == CHUNK:
                    self._flush(last=False)
                take = CHUNK - len(self._buffer)
                self._buffer += view[:take]
                view = view[take:]
        except BaseException:
            self.abort()
            raise
        self._received += len(data)

    def commit(self, resource_id: str, version: tuple[int, int]) -> int:
        """Make the body the resource's, at ``version``, durably; return its length.

        ValueError for an empty body or a bad resource id or version (the spool is removed);
        OSError propagates (the spool is removed, the older body stays); RuntimeError if the writer
        was already committed or aborted."""
        self._check()
        try:
            epoch, seq = version
            if (
                not self._received
                or type(resource_id) is not str
                or not 0 < len(resource_id) <= 255
            ):
                raise ValueError("a body is not empty; its resource id is 1 to 255 characters")
            if min(epoch, seq) < 0:
                raise ValueError("a body's version is two non-negative integers")
            self._flush(last=True)
            meta = self._sealer.seal(
                cbor.dumps([resource_id, epoch, seq, self._received]), self._salt + b"meta"
            )
            _write_all(self._fd, meta + len(meta).to_bytes(4, "big"))
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._store._committed(self._path, resource_id)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._store._released()
        return self._received

    def abort(self) -> None:
        """Remove the spool file (idempotent; nothing after a commit)."""
        if self._done:
            return
        self._done = True
        self._store._released()
        self._buffer = bytearray()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):  # the spool goes in any case
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def _check(self) -> None:
        if self._done:
            raise RuntimeError("this body writer was already committed or aborted")

    def _flush(self, *, last: bool) -> None:
        context = self._salt + self._index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")
        _write_all(self._fd, self._sealer.seal(bytes(self._buffer), context))
        self._index += 1
        self._buffer.clear()
