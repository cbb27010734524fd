"""The proxy's cache backends against one contract (proxy/backend.py): no process, no socket.

Each test runs against every backend: today's SQLite file (:class:`proxy.diskcache.DiskCache`) and
a reference key-value backend written here (a dict standing in for a remote store such as a
Redis-protocol server: keys by keyed hash, values sealed by oscar_io.sealing), which shows that the
interface is enough for a second backend. A new backend joins by adding a fixture parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from oscar import cbor
from oscar.keys import hkdf_sha256
from oscar_io.errors import StateError
from oscar_io.sealing import Sealer, SealError
from proxy.backend import CacheBackend
from proxy.cache import Cache
from proxy.diskcache import DiskCache
from proxy.entry import Entry

KEY = bytes(range(32))
log = logging.getLogger("oscar.proxy")


def entry(i: int, size: int = 100, seq: int = 1, upstream: str | None = None) -> Entry:
    return Entry(
        resource_id=f"sensor-1/r{i}",
        obj=os.urandom(size),
        epoch=1,
        seq=seq,
        exp=2_000_000_000,
        etag=os.urandom(8),
        kid=bytes(8),
        serial=1 << 150,
        upstream=upstream,
        upstream_etag=None,
        fresh_until=1_700_000_060.0,
    )


class KeyValueBackend:
    """A reference backend over a dict of key → sealed value (what a Redis-protocol backend keeps
    on the server), bounded, least recently stored out first."""

    def __init__(self, storage_key: bytes, *, max_entries: int, max_bytes: int) -> None:
        self._sealer = Sealer(hkdf_sha256(storage_key, b"OSCAR proxy cache data", 32))
        self._index_key = hkdf_sha256(storage_key, b"OSCAR proxy cache index", 32)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.evictions = 0
        self.values: OrderedDict[bytes, bytes] = OrderedDict()

    def _id(self, resource_id: str) -> bytes:
        return hmac.new(self._index_key, resource_id.encode(), hashlib.sha256).digest()[:16]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.values.values())

    def __len__(self) -> int:
        return len(self.values)

    def get(self, resource_id: str) -> Entry | None:
        key = self._id(resource_id)
        blob = self.values.get(key)
        if blob is None:
            return None
        try:
            found = Entry.from_cbor(cbor.loads(self._sealer.open(blob, key), max_items=64))
        except (SealError, ValueError):
            log.error("a cache entry fails authentication; ignored")
            return None
        if found.resource_id != resource_id:
            log.error("a cache entry is filed under another resource; ignored")
            return None
        return found

    def put(self, item: Entry) -> int:
        key = self._id(item.resource_id)
        self.values.pop(key, None)
        self.values[key] = self._sealer.seal(cbor.dumps(item.to_cbor()), key)
        evicted = 0
        while len(self.values) > self.max_entries or self.size > self.max_bytes:
            self.values.popitem(last=False)
            evicted += 1
        self.evictions += evicted
        return evicted

    def delete(self, resource_id: str) -> None:
        self.values.pop(self._id(resource_id), None)

    def close(self) -> None:
        pass


class Raw(Protocol):
    """Reach into a backend's storage, as an attacker with the file (or the server) would."""

    def items(self) -> list[tuple[bytes, bytes]]: ...

    def set(self, key: bytes, value: bytes) -> None: ...


@dataclass
class Made:
    backend: CacheBackend
    raw: Raw
    #: Another backend over the same storage (the same one for a store without a file).
    reopen: Callable[[], CacheBackend]


class _SqliteRaw:
    def __init__(self, path: Path) -> None:
        self.path = path

    def items(self) -> list[tuple[bytes, bytes]]:
        with sqlite3.connect(self.path) as db:
            rows = db.execute("SELECT id, blob FROM objects ORDER BY id").fetchall()
        db.close()
        return [(bytes(k), bytes(v)) for k, v in rows]

    def set(self, key: bytes, value: bytes) -> None:
        with sqlite3.connect(self.path) as db:
            db.execute("UPDATE objects SET blob = ? WHERE id = ?", (value, key))
        db.close()


class _DictRaw:
    def __init__(self, backend: KeyValueBackend) -> None:
        self.backend = backend

    def items(self) -> list[tuple[bytes, bytes]]:
        return sorted(self.backend.values.items())

    def set(self, key: bytes, value: bytes) -> None:
        self.backend.values[key] = value


def _make(kind: str, tmp_path: Path, max_entries: int, max_bytes: int) -> Made:
    if kind == "sqlite":
        path = tmp_path / "cache.db"

        def reopen() -> CacheBackend:
            return DiskCache(path, KEY, max_entries=max_entries, max_bytes=max_bytes)

        return Made(reopen(), _SqliteRaw(path), reopen)
    backend = KeyValueBackend(KEY, max_entries=max_entries, max_bytes=max_bytes)
    return Made(backend, _DictRaw(backend), lambda: backend)


BACKENDS = ["sqlite", "key-value"]


@pytest.fixture(params=BACKENDS)
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Made]:
    m = _make(request.param, tmp_path, max_entries=1000, max_bytes=1 << 30)
    yield m
    m.backend.close()


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_an_entry_comes_back_as_stored_and_the_newest_write_wins(made: Made) -> None:
    backend = made.backend
    assert backend.get("sensor-1/r0") is None and len(backend) == 0
    first = entry(0, upstream="coap://[::1]:5683/sensor-1/r0")
    backend.put(first)
    got = backend.get(first.resource_id)
    assert got == first and got is not first
    newer = entry(0, seq=2)
    assert backend.put(newer) == 0
    assert backend.get(first.resource_id) == newer and len(backend) == 1
    backend.delete(first.resource_id)
    backend.delete(first.resource_id)  # twice: nothing to forget
    assert backend.get(first.resource_id) is None and len(backend) == 0 and backend.size == 0


def test_size_counts_what_is_stored(made: Made) -> None:
    for i in range(5):
        made.backend.put(entry(i))
    assert made.backend.size == sum(len(v) for _, v in made.raw.items())
    assert len(made.backend) == 5


def test_nothing_is_in_clear(made: Made) -> None:
    stored = [entry(i) for i in range(3)]
    for e in stored:
        made.backend.put(e)
    for key, value in made.raw.items():
        for e in stored:
            assert e.resource_id.encode() not in key + value
            assert e.obj not in value and e.etag not in value


def test_a_tampered_or_moved_value_is_a_miss_logged_without_its_bytes(
    made: Made, caplog: pytest.LogCaptureFixture
) -> None:
    stored = [entry(i) for i in range(3)]
    for e in stored:
        made.backend.put(e)
    rows = made.raw.items()
    flipped = bytearray(rows[0][1])
    flipped[-1] ^= 1
    made.raw.set(rows[0][0], bytes(flipped))
    made.raw.set(rows[2][0], rows[1][1])  # an authentic value under another key
    backend = made.reopen()
    try:
        served = [backend.get(e.resource_id) for e in stored]
        assert sum(got is None for got in served) == 2
        assert all(got is None or got in stored for got in served)
        assert caplog.text.count("fails authentication") == 2
        assert all(e.obj.hex() not in caplog.text for e in stored)
    finally:
        if backend is not made.backend:
            backend.close()


def test_the_limits_evict_the_least_recently_stored(kind: str, tmp_path: Path) -> None:
    made = _make(kind, tmp_path, max_entries=3, max_bytes=1 << 30)
    try:
        evicted = [made.backend.put(entry(i)) for i in range(5)]
        assert evicted == [0, 0, 0, 1, 1] and made.backend.evictions == 2
        assert [made.backend.get(f"sensor-1/r{i}") is None for i in range(5)] == [
            True,
            True,
            False,
            False,
            False,
        ]
    finally:
        made.backend.close()
    (tmp_path / "b").mkdir()
    made = _make(kind, tmp_path / "b", max_entries=100, max_bytes=1000)
    try:
        made.backend.put(entry(0, size=400))
        made.backend.put(entry(1, size=400))
        assert made.backend.put(entry(2, size=400)) >= 1 and made.backend.size <= 1000
        assert made.backend.get("sensor-1/r2") is not None
    finally:
        made.backend.close()


def test_the_memory_layer_reads_a_backend_only_on_a_miss(made: Made) -> None:
    made.backend.put(entry(7))
    cache = Cache(made.backend, max_entries=10, max_bytes=1 << 20)
    assert len(cache) == 0  # nothing loaded at start
    got = cache.get("sensor-1/r7")
    assert got is not None and len(cache) == 1
    assert cache.newest("sensor-1/r7") == (1, 1)
    cache.put(entry(8))
    assert made.backend.get("sensor-1/r8") is not None  # written through


# --- the SQLite backend only -------------------------------------------------------------------


def test_a_row_in_the_earlier_form_still_opens_and_is_rewritten_in_the_current_one(
    tmp_path: Path,
) -> None:
    """Before oscar_io.sealing, rows were nonce || AES-256-GCM (same key, same context): they open
    (legacy=True), so a cache survives the upgrade; the next store of the entry rewrites it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    path = tmp_path / "cache.db"
    cache = DiskCache(path, KEY, max_entries=10, max_bytes=1 << 20)
    old = entry(1)
    cache.put(old)
    cache.close()
    data_key = hkdf_sha256(KEY, b"OSCAR proxy cache data", 32)
    raw = _SqliteRaw(path)
    [(key, current)] = raw.items()
    assert current[:1] == b"\x01"  # the one recipe's version byte
    nonce = os.urandom(12)
    raw.set(key, nonce + AESGCM(data_key).encrypt(nonce, cbor.dumps(old.to_cbor()), key))

    cache = DiskCache(path, KEY, max_entries=10, max_bytes=1 << 20)
    assert cache.writable(wait=True)
    assert cache.get(old.resource_id) == old
    cache.put(old)
    cache.close()
    [(_, rewritten)] = raw.items()
    assert rewritten[:1] == b"\x01" and Sealer(data_key).open(rewritten, key) == cbor.dumps(
        old.to_cbor()
    )


def test_a_file_made_under_another_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    DiskCache(path, KEY, max_entries=10, max_bytes=1 << 20).close()
    with pytest.raises(StateError, match="another storage key"):
        DiskCache(path, bytes(32), max_entries=10, max_bytes=1 << 20)


def test_the_sqlite_backend_is_a_cache_backend(tmp_path: Path) -> None:
    backend: CacheBackend = DiskCache(tmp_path / "c.db", KEY, max_entries=1, max_bytes=1)
    reference: CacheBackend = KeyValueBackend(KEY, max_entries=1, max_bytes=1)
    assert len(backend) == len(reference) == 0
    backend.close()


def test_fresh_until_keeps_its_milliseconds_and_older_entries_still_read() -> None:
    """A cluster's instances share fresh_until: a whole second would make them find an entry
    stale up to a second early (and fetch again); entries of 11 items (whole seconds, written
    before) still read."""
    e = Entry(
        "p/r", b"obj", 1, 2, 1_900_000_000, b"e" * 8, b"k", None, None, None, 1_800_000_060.789
    )
    doc = cbor.loads(cbor.dumps(e.to_cbor()))
    back = Entry.from_cbor(doc)
    assert abs(back.fresh_until - 1_800_000_060.789) < 0.002 and back.fresh_until <= e.fresh_until
    assert Entry.from_cbor(doc[:11]).fresh_until == 1_800_000_060
    for bad in (1000, -1, "1", 1.5):
        with pytest.raises(ValueError, match="not a cache entry"):
            Entry.from_cbor([*doc[:11], bad])
