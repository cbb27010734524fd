"""The proxy's cache at scale (issue 7), in memory and on a real SQLite file: no processes.

Opening a filled cache reads its totals, not its rows; nothing is loaded at start, and what is
loaded later is still authenticated entry by entry; the file's integrity check runs beside the
serving (writes wait for it; a file that fails it is left alone and the disk cache is off);
``memory_bytes`` counts what entries really take in memory.
"""

from __future__ import annotations

import gc
import logging
import os
import sqlite3
import threading
import tracemalloc
from pathlib import Path

import pytest

from proxy.cache import ENTRY_OVERHEAD, Cache, DiskCache, Entry, footprint

KEY = bytes(range(32))
LIMIT = 1 << 30


def entry(i: int, size: int = 235, seq: int = 1) -> Entry:
    """An entry as the proxy makes them (the object's bytes need not verify here)."""
    return Entry(
        resource_id=f"sensor-1/r{i}",
        obj=os.urandom(size),
        epoch=1,
        seq=seq,
        exp=2_000_000_000,
        etag=os.urandom(8),
        kid=bytes(8),
        serial=1 << 150,
        upstream=None,
        upstream_etag=None,
        fresh_until=1_700_000_060.0,
    )


def disk(path: Path, cls: type[DiskCache] = DiskCache) -> DiskCache:
    return cls(path, KEY, max_entries=100_000, max_bytes=LIMIT)


def filled(path: Path, n: int, size: int = 235) -> list[Entry]:
    entries = [entry(i, size) for i in range(n)]
    cache = disk(path)
    for e in entries:
        cache.put(e)
    cache.close()
    return entries


def totals_row(path: Path) -> str:
    with sqlite3.connect(path) as db:
        value: str = db.execute("SELECT value FROM meta WHERE name = 'totals'").fetchone()[0]
    db.close()
    return value


# --- opening ---------------------------------------------------------------------------------


def test_the_totals_are_kept_with_every_write_and_read_back_on_opening(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    entries = filled(path, 50)
    with sqlite3.connect(path) as db:
        count, size = db.execute("SELECT count(*), sum(size) FROM objects").fetchone()
    db.close()
    assert count == 50
    assert totals_row(path) == f"50 {size}"

    cache = disk(path)
    assert (len(cache), cache.size) == (50, size)
    assert cache.writable(wait=True)
    cache.put(entries[0])  # a replacement: same count
    cache.delete(entries[1].resource_id)
    cache.close()
    with sqlite3.connect(path) as db:
        count, size = db.execute("SELECT count(*), sum(size) FROM objects").fetchone()
    db.close()
    assert count == 49 and totals_row(path) == f"49 {size}"


def test_a_file_without_totals_is_counted_once(tmp_path: Path) -> None:
    """A cache written before the totals were kept: counted on opening, the count stored once
    the integrity check passed, even if nothing else is written."""
    path = tmp_path / "cache.db"
    filled(path, 20)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM meta WHERE name = 'totals'")
        size = db.execute("SELECT sum(size) FROM objects").fetchone()[0]
    db.close()
    cache = disk(path)
    assert (len(cache), cache.size) == (20, size)
    assert cache.writable(wait=True)
    cache.close()
    assert totals_row(path) == f"20 {size}"


def test_opening_reads_no_row_of_the_objects(tmp_path: Path) -> None:
    """The totals row is what opening believes: bend it, and the count follows (so no scan)."""
    path = tmp_path / "cache.db"
    filled(path, 30)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '12345 678' WHERE name = 'totals'")
    db.close()
    cache = disk(path)
    assert (len(cache), cache.size) == (12345, 678)
    cache.close()


# --- lazy loading -------------------------------------------------------------------------------


def test_nothing_is_loaded_at_start_and_a_tampered_entry_is_still_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.db"
    entries = filled(path, 10)
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, blob FROM objects ORDER BY id").fetchall()
        first, second = rows[0], rows[1]
        flipped = bytearray(first[1])
        flipped[40] ^= 1
        db.execute("UPDATE objects SET blob = ? WHERE id = ?", (bytes(flipped), first[0]))
        # another entry's (authentic) blob filed under a third row
        db.execute("UPDATE objects SET blob = ? WHERE id = ?", (second[1], rows[2][0]))
    db.close()

    cache = Cache(disk(path), max_entries=100, max_bytes=LIMIT)
    assert len(cache) == 0  # lazy: nothing in memory until asked for
    served = {e.resource_id: cache.get(e.resource_id) for e in entries}
    refused = [rid for rid, got in served.items() if got is None]
    assert len(refused) == 2
    for e in entries:
        got = served[e.resource_id]
        assert got is None or (got.obj, got.etag) == (e.obj, e.etag)
    assert len(cache) == 8
    assert caplog.text.count("fails authentication") == 2
    assert all(e.obj.hex() not in caplog.text for e in entries)
    cache.close()


# --- the integrity check -------------------------------------------------------------------------


class SlowCheck(DiskCache):
    """A disk cache whose integrity check waits for ``release`` (then passes or fails)."""

    release = threading.Event()
    verdict = "ok"

    def _integrity_check(self) -> None:
        self.release.wait(10)
        self._verdict = self.verdict


def test_writes_during_the_check_are_held_then_written(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    entries = filled(path, 5)
    SlowCheck.release = threading.Event()
    cache = disk(path, SlowCheck)
    newer = entry(0, seq=2)
    cache.put(newer)
    cache.put(entry(7))
    cache.delete(entries[1].resource_id)
    assert not cache.writable()
    assert totals_row(path).startswith("5 ")  # nothing written yet
    got = cache.get(newer.resource_id)
    assert got is not None and got.seq == 2
    assert cache.get(entries[1].resource_id) is None
    assert cache.get(entries[2].resource_id) is not None  # reads go on from the file

    SlowCheck.release.set()
    assert cache.writable(wait=True)
    assert len(cache) == 5  # +1 (r7), -1 (r1)
    cache.close()
    again = disk(path)
    stored = again.get(newer.resource_id)
    assert stored is not None and stored.seq == 2
    assert again.get(entries[1].resource_id) is None
    assert again.get("sensor-1/r7") is not None
    again.close()


def test_held_writes_are_written_on_close(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    filled(path, 3)
    SlowCheck.release = threading.Event()
    cache = disk(path, SlowCheck)
    cache.put(entry(3))
    threading.Timer(0.05, SlowCheck.release.set).start()
    cache.close()  # waits for the check
    assert totals_row(path).startswith("4 ")


def test_a_corrupt_page_turns_the_disk_cache_off_and_leaves_the_file_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.db"
    entries = filled(path, 400, size=1000)
    data = bytearray(path.read_bytes())
    page = 4096
    middle = (len(data) // page // 2) * page
    data[middle : middle + page] = b"\xff" * page  # a b-tree page of objects, now garbage
    path.write_bytes(bytes(data))
    before = path.read_bytes()

    with caplog.at_level(logging.ERROR, logger="oscar.proxy"):
        cache = Cache(disk(path), max_entries=100, max_bytes=LIMIT)  # opens: header and schema
        assert cache.disk is not None
        assert not cache.disk.writable(wait=True)
        assert cache.disk.failed
        assert "is corrupt" in caplog.text
        cache.put(entry(1000))  # kept in memory only
        assert cache.get("sensor-1/r1000") is not None
        assert cache.get(entries[0].resource_id) is None  # the disk is off
        cache.close()
    assert path.read_bytes() == before


# --- memory ---------------------------------------------------------------------------------------


def test_memory_bytes_count_what_entries_take() -> None:
    one = footprint(entry(0))
    assert one == 235 + len("sensor-1/r0") + ENTRY_OVERHEAD
    cache = Cache(None, max_entries=1000, max_bytes=3 * one + 10)
    for i in range(5):
        cache.put(entry(i))
    assert len(cache) == 3 and cache.evictions == 2
    assert cache.memory_bytes == sum(footprint(e) for e in cache.entries())


def test_the_counted_footprint_is_close_to_the_memory_an_entry_takes(tmp_path: Path) -> None:
    """ENTRY_OVERHEAD against tracemalloc: entries loaded from the disk, as the proxy holds them."""
    path = tmp_path / "cache.db"
    entries = filled(path, 2000)
    cache = Cache(disk(path), max_entries=10_000, max_bytes=LIMIT)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for e in entries:
            cache.get(e.resource_id)
        gc.collect()
        taken = (tracemalloc.get_traced_memory()[0] - before) / len(entries)
    finally:
        tracemalloc.stop()
    counted = cache.memory_bytes / len(entries)
    assert 0.75 * taken <= counted <= 1.5 * taken, (taken, counted)
    cache.close()


def test_the_default_limits_hold_a_hundred_thousand_objects() -> None:
    from proxy import Limits

    limits = Limits()
    assert limits.disk_entries >= 100_000
    assert limits.disk_bytes >= 100_000 * 500  # a 64 B reading takes about 460 B on disk
