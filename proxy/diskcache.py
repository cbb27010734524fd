"""The proxy's SQLite cache backend: verified entries in one file, encrypted at rest.

:class:`DiskCache` is the first :class:`~proxy.backend.CacheBackend`:

- table ``objects(id, blob, size, used)``: ``id`` = HMAC-SHA256(index key, resource id)[:16],
  ``blob`` = the CBOR entry (:meth:`~proxy.entry.Entry.to_cbor`) sealed by
  :class:`oscar_io.sealing.Sealer` under the data key with ``id`` as its context
  (``0x01 || nonce || AES-256-GCM``). Neither a resource name nor an object byte is in clear, and
  an entry cannot be moved to another row undetected. Rows written before the one sealing recipe
  (``nonce || AES-256-GCM``, the same key and context) still open (``legacy=True``): a cache
  survives the upgrade, and each row is rewritten in the current form when its entry is next
  stored;
- table ``meta``: a check value of the storage key, so a file made under another key is refused
  at start with a clear error instead of being served from or overwritten; and the totals
  (entries, bytes), written in the same transaction as every change, so that opening the file
  reads no row of ``objects``;
- bounded by ``max_entries`` / ``max_bytes``, least recently stored out first.

Nothing is loaded at start, and opening a cache of 100,000 entries takes as long as opening an
empty one (the file's integrity check runs in a thread meanwhile, see :class:`DiskCache`).

The keys come from the proxy's storage key (derived from its bundle), so a stolen cache file alone
reveals nothing. Disk work is synchronous (small writes, WAL, ``synchronous=NORMAL``): a crash may
lose the last objects written, never corrupt the rest, and the proxy refetches what it lost.
``sqlite3`` errors are translated here: :class:`~oscar_io.errors.StateError` when opening, a logged
miss (or the disk cache turned off) afterwards.

What this module does not do: keep anything in memory beyond the writes held during the integrity
check (:mod:`proxy.cache` does), or verify objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from oscar import cbor
from oscar.keys import hkdf_sha256
from oscar_io.errors import StateError
from oscar_io.sealing import Sealer, SealError

from .entry import Entry

__all__ = ["MAX_HELD", "DiskCache"]

log = logging.getLogger("oscar.proxy")

#: Writes held in memory while the disk cache's integrity check runs (the oldest go beyond).
MAX_HELD = 10_000

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


class DiskCache:
    """The encrypted SQLite file (see the module docstring): a :class:`~proxy.backend.CacheBackend`.

    Opening it costs the same at any size: the schema, the key check and the totals (a ``meta``
    row kept with every write) are read, nothing else. The file's integrity check (``PRAGMA
    quick_check``, which reads every page: 60 ms for 100,000 small entries here, a second or
    more at the 1 GiB limit) runs meanwhile in a thread of its own, on a read-only connection.
    Until it has passed, entries are read from the file as usual (each is authenticated anyway)
    and writes are held in memory (the newest per resource, at most :data:`MAX_HELD`); the first
    call after it passed writes them. If it fails, the file is left as it was, the disk cache is
    off for the rest of the run, and the log says so: the proxy goes on from memory.
    """

    def __init__(self, path: Path, storage_key: bytes, *, max_entries: int, max_bytes: int) -> None:
        self.path = Path(path)
        self._sealer = Sealer(hkdf_sha256(storage_key, b"OSCAR proxy cache data", 32))
        self._index_key = hkdf_sha256(storage_key, b"OSCAR proxy cache index", 32)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        #: Entries evicted to keep within the limits, since the start.
        self.evictions = 0
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
            filled = existed and self._check_existing(check)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
            if self._db.execute("SELECT 1 FROM meta WHERE name = 'check'").fetchone() is None:
                self._db.execute("INSERT INTO meta VALUES ('check', ?)", (check,))
            self._count, self._size, stored = self._totals()
            if not stored and not filled:
                self._store_totals(self._count, self._size)
        except (sqlite3.DatabaseError, StateError) as exc:
            self._db.close()
            if isinstance(exc, StateError):
                raise
            raise StateError(f"{self.path} is not a usable cache database: {exc}") from None
        #: Writes waiting for the integrity check (None: a delete).
        self._held: dict[str, Entry | None] = {}
        self._totals_stored = stored or not filled
        self._failed: str | None = None
        self._verdict = "ok"
        self._checker: threading.Thread | None = None
        if filled:
            self._verdict = "not checked"
            self._checker = threading.Thread(
                target=self._integrity_check, name="cache check", daemon=True
            )
            self._checker.start()

    def __repr__(self) -> str:
        return f"DiskCache({str(self.path)!r}, entries={self._count})"

    def _check_existing(self, check: bytes) -> bool:
        """Read-only checks of an existing file: StateError unless it is this key's cache or
        holds no table at all (a file made but never filled). True if it holds the tables.

        Reading the schema makes SQLite check the file's header: a file that is not a database
        at all is refused here. Damage further in is for :meth:`_integrity_check`."""
        tables = {
            row[0]
            for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return False
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
        return True

    def _totals(self) -> tuple[int, int, bool]:
        """(entries, bytes, True) from the ``meta`` row; counted for a file written before the
        row was kept (False: stored once the file may be written)."""
        row = self._db.execute("SELECT value FROM meta WHERE name = 'totals'").fetchone()
        if row is not None and isinstance(row[0], str):
            count, _, size = row[0].partition(" ")
            if count.isdigit() and size.isdigit():
                return int(count), int(size), True
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM objects"
        ).fetchone()
        return int(count), int(size), False

    def _integrity_check(self) -> None:
        """In the checker thread: PRAGMA quick_check on a read-only connection of its own, at
        the lowest CPU priority (Linux: per thread), so as not to slow the start or the serving."""
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                row = db.execute("PRAGMA quick_check").fetchone()
            finally:
                db.close()
            self._verdict = "ok" if row is not None and row[0] == "ok" else f"{row and row[0]}"
        except sqlite3.Error as exc:
            self._verdict = str(exc)

    def writable(self, *, wait: bool = False) -> bool:
        """Whether the file may be written: its integrity check passed (``wait``: wait for it).
        The first call after the check ended writes what was held meanwhile, or turns the disk
        cache off."""
        checker = self._checker
        if checker is not None:
            if wait:
                checker.join()
            if checker.is_alive():
                return False
            checker.join()
            self._checker = None
            if self._verdict != "ok":
                self._failed = self._verdict
                self._held.clear()
                log.error(
                    "%s is corrupt (%s): the disk cache is off and the file left as it is; "
                    "move it away and restart to start with an empty one",
                    self.path,
                    self._verdict,
                )
            else:
                if not self._totals_stored:
                    with self._transaction():
                        self._store_totals(self._count, self._size)
                    self._totals_stored = True
                held, self._held = self._held, {}
                for resource_id, entry in held.items():
                    if entry is None:
                        self._delete(resource_id)
                    else:
                        self.evictions += self._put(entry)
        return self._failed is None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _id(self, resource_id: str) -> bytes:
        return hmac.new(self._index_key, resource_id.encode(), hashlib.sha256).digest()[:16]

    def get(self, resource_id: str) -> Entry | None:
        if not self.writable() and self._failed is not None:
            return None
        if resource_id in self._held:
            return self._held[resource_id]
        key = self._id(resource_id)
        try:
            row = self._db.execute("SELECT blob FROM objects WHERE id = ?", (key,)).fetchone()
        except sqlite3.DatabaseError as exc:
            log.error("reading %s failed (%s); treated as a miss", self.path, exc)
            return None
        if row is None:
            return None
        try:
            plain = self._sealer.open(bytes(row[0]), key, legacy=True)
            entry = Entry.from_cbor(cbor.loads(plain, max_items=64))
        except (SealError, ValueError):
            log.error("a cache entry fails authentication; ignored")
            return None
        if entry.resource_id != resource_id:
            log.error("a cache entry is filed under another resource; ignored")
            return None
        return entry

    def put(self, entry: Entry) -> int:
        """Store (replace) an entry; returns how many old entries were evicted."""
        if self.writable():
            evicted = self._put(entry)
            self.evictions += evicted
            return evicted
        if self._failed is None:
            self._held.pop(entry.resource_id, None)
            self._held[entry.resource_id] = entry
            while len(self._held) > MAX_HELD:
                self._held.pop(next(iter(self._held)))
        return 0

    def _put(self, entry: Entry) -> int:
        key = self._id(entry.resource_id)
        blob = self._sealer.seal(cbor.dumps(entry.to_cbor()), key)
        with self._transaction():
            row = self._db.execute("SELECT size FROM objects WHERE id = ?", (key,)).fetchone()
            self._db.execute(
                "INSERT OR REPLACE INTO objects (id, blob, size, used) VALUES (?, ?, ?, ?)",
                (key, blob, len(blob), time.time_ns()),
            )
            count = self._count + (row is None)
            size = self._size - (0 if row is None else row[0]) + len(blob)
            evicted = 0
            while count > self.max_entries or size > self.max_bytes:
                old = self._db.execute(
                    "SELECT id, size FROM objects ORDER BY used LIMIT 1"
                ).fetchone()
                if old is None:
                    break
                self._db.execute("DELETE FROM objects WHERE id = ?", (old[0],))
                count, size, evicted = count - 1, size - old[1], evicted + 1
            self._store_totals(count, size)
        self._count, self._size = count, size
        return evicted

    def _store_totals(self, count: int, size: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('totals', ?)", (f"{count} {size}",))

    def delete(self, resource_id: str) -> None:
        if self.writable():
            self._delete(resource_id)
        elif self._failed is None:
            self._held[resource_id] = None

    def _delete(self, resource_id: str) -> None:
        key = self._id(resource_id)
        with self._transaction():
            row = self._db.execute("SELECT size FROM objects WHERE id = ?", (key,)).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM objects WHERE id = ?", (key,))
            count, size = self._count - 1, self._size - row[0]
            self._store_totals(count, size)
        self._count, self._size = count, size

    def __len__(self) -> int:
        return int(self._count)

    @property
    def size(self) -> int:
        return int(self._size)

    @property
    def failed(self) -> str | None:
        """Why the disk cache is off (its integrity check failed), or None."""
        return self._failed

    def close(self) -> None:
        """Write what is held (after waiting for the integrity check) and close the file."""
        if self.writable(wait=True):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
