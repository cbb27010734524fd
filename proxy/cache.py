"""The proxy's cache: verified objects per resource, in memory (LRU) and on disk (encrypted).

An :class:`Entry` is one object the proxy has verified (:mod:`proxy.core`) with what it needs to
serve it: its (epoch, seq), ``exp``, ETag, signer, where it came from and until when it is fresh.

:class:`Cache` keeps entries in memory up to ``max_entries`` / ``max_bytes`` (least recently used
out first) and writes each new one to :class:`DiskCache`, an SQLite file that is encrypted at rest:

- table ``objects(id, blob, size, used)``: ``id`` = HMAC-SHA256(index key, resource id)[:16],
  ``blob`` = nonce || AES-256-GCM(data key, CBOR entry, aad = id). Neither a resource name nor an
  object byte is in clear, and an entry cannot be moved to another row undetected;
- table ``meta``: a check value of the storage key, so a file made under another key is refused
  at start with a clear error instead of being served from or overwritten;
- bounded by ``max_disk_entries`` / ``max_disk_bytes``, least recently stored out first.

The keys come from the proxy's storage key (derived from its bundle), so a stolen cache file alone
reveals nothing. Disk work is synchronous (small writes, WAL, ``synchronous=NORMAL``): a crash may
lose the last objects written, never corrupt the rest, and the proxy refetches what it lost.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authz_server.client import StateError
from oscar import cbor
from oscar.keys import hkdf_sha256

__all__ = ["Cache", "DiskCache", "Entry"]

log = logging.getLogger("oscar.proxy")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    id BLOB PRIMARY KEY,
    blob BLOB NOT NULL,
    size INTEGER NOT NULL,
    used INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_used ON objects(used);
"""


@dataclass(frozen=True, slots=True, repr=False)
class Entry:
    """A verified object and how to serve it."""

    resource_id: str
    obj: bytes
    epoch: int
    seq: int
    exp: int
    etag: bytes
    kid: bytes
    serial: int | None
    #: The URI it was fetched from (None: published to the proxy).
    upstream: str | None
    #: The ETag the upstream gave it (for revalidation), if any.
    upstream_etag: bytes | None
    #: Wall-clock second until which it is fresh (stored time + Max-Age).
    fresh_until: float

    def __repr__(self) -> str:
        return f"Entry({self.resource_id!r}, epoch={self.epoch}, seq={self.seq})"

    @property
    def version(self) -> tuple[int, int]:
        return (self.epoch, self.seq)

    def refreshed(self, fresh_until: float) -> Entry:
        return replace(self, fresh_until=fresh_until)

    def to_cbor(self) -> list[Any]:
        return [
            self.resource_id,
            self.obj,
            self.epoch,
            self.seq,
            self.exp,
            self.etag,
            self.kid,
            None if self.serial is None else _serial_bytes(self.serial),
            self.upstream,
            self.upstream_etag,
            int(self.fresh_until),
        ]

    @classmethod
    def from_cbor(cls, doc: Any) -> Entry:
        if not isinstance(doc, list) or len(doc) != 11:
            raise ValueError("not a cache entry")
        rid, obj, epoch, seq, exp, etag, kid, serial, upstream, upstream_etag, fresh = doc
        if not (
            isinstance(rid, str)
            and isinstance(obj, bytes)
            and all(type(v) is int for v in (epoch, seq, exp, fresh))
            and isinstance(etag, bytes)
            and isinstance(kid, bytes)
            and (serial is None or isinstance(serial, bytes))
            and (upstream is None or isinstance(upstream, str))
            and (upstream_etag is None or isinstance(upstream_etag, bytes))
        ):
            raise ValueError("not a cache entry")
        number = None if serial is None else int.from_bytes(serial, "big")
        return cls(rid, obj, epoch, seq, exp, etag, kid, number, upstream, upstream_etag, fresh)


def _serial_bytes(serial: int) -> bytes:
    """X.509 serials run to 160 bits: stored as bytes (CBOR integers stop at 64)."""
    return serial.to_bytes((serial.bit_length() + 7) // 8 or 1, "big")


class DiskCache:
    """The encrypted SQLite file (see the module docstring)."""

    def __init__(self, path: Path, storage_key: bytes, *, max_entries: int, max_bytes: int) -> None:
        self.path = Path(path)
        self._aead = AESGCM(hkdf_sha256(storage_key, b"OSCAR proxy cache data", 32))
        self._index_key = hkdf_sha256(storage_key, b"OSCAR proxy cache index", 32)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        check = hmac.new(self._index_key, b"OSCAR proxy cache check", "sha256").digest()
        existed = self.path.exists()
        if not existed:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StateError(f"{self.path} is not a usable cache database: {exc}") from None
        try:
            # Everything is checked with reads only before the first write: a file that is not
            # this proxy's cache (corrupt, another program's, another key's) is left as it was.
            if existed:
                self._check_existing(check)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
            if self._db.execute("SELECT 1 FROM meta WHERE name = 'check'").fetchone() is None:
                self._db.execute("INSERT INTO meta VALUES ('check', ?)", (check,))
        except (sqlite3.DatabaseError, StateError) as exc:
            self._db.close()
            if isinstance(exc, StateError):
                raise
            raise StateError(f"{self.path} is not a usable cache database: {exc}") from None
        self._count, self._size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM objects"
        ).fetchone()

    def __repr__(self) -> str:
        return f"DiskCache({str(self.path)!r}, entries={self._count})"

    def _check_existing(self, check: bytes) -> None:
        """Read-only checks of an existing file: StateError unless it is this key's cache or
        holds no table at all (a file made but never filled)."""
        ok = self._db.execute("PRAGMA quick_check").fetchone()
        if ok is None or ok[0] != "ok":
            raise StateError(f"{self.path} is corrupt (quick_check failed)")
        tables = {
            row[0]
            for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return
        if tables != {"meta", "objects"}:
            raise StateError(f"{self.path} is not a proxy cache (unknown tables)")
        row = self._db.execute("SELECT value FROM meta WHERE name = 'check'").fetchone()
        if row is None:
            if self._db.execute("SELECT 1 FROM objects LIMIT 1").fetchone():
                raise StateError(f"{self.path} holds objects but no key check")
        elif not hmac.compare_digest(bytes(row[0]), check):
            raise StateError(
                f"{self.path} was made under another storage key (another bundle?); "
                "move it away to start with an empty cache"
            )

    def _id(self, resource_id: str) -> bytes:
        return hmac.new(self._index_key, resource_id.encode(), hashlib.sha256).digest()[:16]

    def get(self, resource_id: str) -> Entry | None:
        key = self._id(resource_id)
        row = self._db.execute("SELECT blob FROM objects WHERE id = ?", (key,)).fetchone()
        if row is None:
            return None
        blob = bytes(row[0])
        try:
            plain = self._aead.decrypt(blob[:12], blob[12:], key)
            entry = Entry.from_cbor(cbor.loads(plain, max_items=64))
        except Exception:
            log.error("a cache entry fails authentication; ignored")
            return None
        if entry.resource_id != resource_id:
            log.error("a cache entry is filed under another resource; ignored")
            return None
        return entry

    def put(self, entry: Entry) -> int:
        """Store (replace) an entry; returns how many old entries were evicted."""
        key = self._id(entry.resource_id)
        nonce = os.urandom(12)
        blob = nonce + self._aead.encrypt(nonce, cbor.dumps(entry.to_cbor()), key)
        row = self._db.execute("SELECT size FROM objects WHERE id = ?", (key,)).fetchone()
        self._db.execute(
            "INSERT OR REPLACE INTO objects (id, blob, size, used) VALUES (?, ?, ?, ?)",
            (key, blob, len(blob), time.time_ns()),
        )
        if row is None:
            self._count += 1
        else:
            self._size -= row[0]
        self._size += len(blob)
        return self._evict()

    def _evict(self) -> int:
        evicted = 0
        while self._count > self.max_entries or self._size > self.max_bytes:
            row = self._db.execute("SELECT id, size FROM objects ORDER BY used LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM objects WHERE id = ?", (row[0],))
            self._count -= 1
            self._size -= row[1]
            evicted += 1
        return evicted

    def delete(self, resource_id: str) -> None:
        key = self._id(resource_id)
        row = self._db.execute("SELECT size FROM objects WHERE id = ?", (key,)).fetchone()
        if row is not None:
            self._db.execute("DELETE FROM objects WHERE id = ?", (key,))
            self._count -= 1
            self._size -= row[0]

    def __len__(self) -> int:
        return int(self._count)

    @property
    def size(self) -> int:
        return int(self._size)

    def close(self) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


class Cache:
    """Entries by resource id: memory in front of the disk."""

    def __init__(
        self,
        disk: DiskCache | None,
        *,
        max_entries: int,
        max_bytes: int,
    ) -> None:
        self.disk = disk
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._memory: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    def __repr__(self) -> str:
        return f"Cache(memory={len(self._memory)}, bytes={self._bytes})"

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    def get(self, resource_id: str) -> Entry | None:
        entry = self._memory.get(resource_id)
        if entry is not None:
            self._memory.move_to_end(resource_id)
            return entry
        if self.disk is None:
            return None
        entry = self.disk.get(resource_id)
        if entry is not None:
            self._remember(entry)
        return entry

    def put(self, entry: Entry, *, persist: bool = True) -> None:
        self._remember(entry)
        if persist and self.disk is not None:
            self.evictions += self.disk.put(entry)

    def touch(self, entry: Entry) -> None:
        """Replace an entry's serving state (fresh_until) in memory only."""
        if entry.resource_id in self._memory:
            self._memory[entry.resource_id] = entry

    def drop(self, resource_id: str) -> None:
        old = self._memory.pop(resource_id, None)
        if old is not None:
            self._bytes -= len(old.obj)
        if self.disk is not None:
            self.disk.delete(resource_id)

    def entries(self) -> list[Entry]:
        return list(self._memory.values())

    def _remember(self, entry: Entry) -> None:
        old = self._memory.pop(entry.resource_id, None)
        if old is not None:
            self._bytes -= len(old.obj)
        self._memory[entry.resource_id] = entry
        self._bytes += len(entry.obj)
        while self._memory and (
            len(self._memory) > self.max_entries or self._bytes > self.max_bytes
        ):
            _, gone = self._memory.popitem(last=False)
            self._bytes -= len(gone.obj)
            self.evictions += 1

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
