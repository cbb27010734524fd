"""The proxy's store of large bodies (proxy/bodies.py): in process, on a temporary directory.

Round trips at the chunk boundaries, every way a file on disk can be altered (each refused, the
file removed), versions, eviction, crash leftovers, and the memory bounds of writing and reading.
"""

from __future__ import annotations

import logging
import os
import random
import stat
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from oscar_io.errors import StateError
from oscar_io.sealing import OVERHEAD, Sealer
from proxy.bodies import CACHED_CHUNKS, CHUNK, BodyError, BodyStore

KEY = bytes(range(32))
RID = "sensor-1/camera"
V1 = (1, 7)
HEADER = 17  # format byte and salt
SEALED = CHUNK + OVERHEAD


def data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def store_at(path: Path, max_bytes: int = 1 << 30, key: bytes = KEY) -> BodyStore:
    return BodyStore(path, key, max_bytes=max_bytes)


def put(
    store: BodyStore, rid: str, body: bytes, version: tuple[int, int] = V1, step: int = 1000
) -> int:
    with store.spool() as writer:
        for i in range(0, len(body), step):
            writer.write(body[i : i + step])
        assert writer.received == len(body)
        return writer.commit(rid, version)


def files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.endswith(".part"))


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 5 * (1 << 20) + 3])
def test_bodies_of_every_shape_read_back_in_blocks_and_in_ranges(tmp_path: Path, size: int) -> None:
    store = store_at(tmp_path)
    body = data(size, seed=size)
    assert put(store, RID, body, step=777) == size
    assert store.size(RID, V1) == size
    assert store.total_bytes == (tmp_path / files(tmp_path)[0].name).stat().st_size
    blocks = [store.read(RID, V1, i, 1024) for i in range(0, size, 1024)]
    assert b"".join(blocks) == body
    rng = random.Random(size)
    for _ in range(50):
        offset, length = rng.randrange(size + 10), rng.randrange(3 * CHUNK)
        assert store.read(RID, V1, offset, length) == body[offset : offset + length]
    assert store.read(RID, V1, size, 10) == b""
    assert store.read(RID, V1, 0, 0) == b""
    assert store_at(tmp_path).read(RID, V1, 0, size) == body  # after a restart too


def test_one_large_write_is_chunked_like_many_small_ones(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    body = data(2 * CHUNK + 9)
    put(store, RID, body, step=len(body))
    assert store.read(RID, V1, 0, len(body)) == body
    # exactly three sealed chunks before the meta: the third (9 bytes) flagged last
    raw = files(tmp_path)[0].read_bytes()
    meta_length = int.from_bytes(raw[-4:], "big")
    assert len(raw) == HEADER + 2 * SEALED + 9 + OVERHEAD + meta_length + 4


def test_another_version_is_refused_and_the_body_kept(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    body = data(CHUNK + 1)
    put(store, RID, body)
    for other in [(1, 6), (1, 8), (2, 7), (0, 0)]:
        with pytest.raises(BodyError, match="another version"):
            store.read(RID, other, 0, 10)
        with pytest.raises(BodyError, match="another version"):
            store.size(RID, other)
    assert store.read(RID, V1, 0, len(body)) == body
    with pytest.raises(BodyError, match="no body"):
        store.read("sensor-1/other", V1, 0, 10)


def test_a_newer_commit_replaces_the_older(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    put(store, RID, data(3 * CHUNK, seed=1), version=(1, 1))
    newer = data(CHUNK + 5, seed=2)
    put(store, RID, newer, version=(1, 2))
    with pytest.raises(BodyError, match="another version"):
        store.read(RID, (1, 1), 0, 10)
    assert store.read(RID, (1, 2), 0, len(newer)) == newer
    assert len(files(tmp_path)) == 1
    assert store.total_bytes == files(tmp_path)[0].stat().st_size
    assert "1 bodies" in repr(store)


def _flip(raw: bytearray, at: int) -> bytearray:
    raw[at] ^= 0x01
    return raw


ALTERATIONS = {
    "format byte": lambda raw: _flip(raw, 0),
    "salt": lambda raw: _flip(raw, 5),
    "first chunk": lambda raw: _flip(raw, HEADER + 100),
    "middle chunk": lambda raw: _flip(raw, HEADER + SEALED + 7),
    "last chunk": lambda raw: _flip(raw, HEADER + 2 * SEALED + 3),
    "meta": lambda raw: _flip(raw, len(raw) - 10),
    "meta length": lambda raw: _flip(raw, len(raw) - 1),
    "truncated by a byte": lambda raw: raw[:-1],
    "last chunk cut off": lambda raw: (
        raw[: HEADER + 2 * SEALED] + raw[-(int.from_bytes(raw[-4:], "big") + 4) :]
    ),
    "extended": lambda raw: raw[:-4] + b"\0" + raw[-4:],
    "junk before the meta": lambda raw: (
        raw[: HEADER + 2 * SEALED + 100 + OVERHEAD]
        + b"junk"
        + raw[HEADER + 2 * SEALED + 100 + OVERHEAD :]
    ),
    "chunks swapped": lambda raw: (
        raw[:HEADER]
        + raw[HEADER + SEALED : HEADER + 2 * SEALED]
        + raw[HEADER : HEADER + SEALED]
        + raw[HEADER + 2 * SEALED :]
    ),
    "empty": lambda raw: b"",
}


@pytest.mark.parametrize("how", list(ALTERATIONS))
def test_an_altered_file_is_refused_and_removed(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_at(tmp_path)
    body = data(2 * CHUNK + 100)
    put(store, RID, body)
    put(store, "sensor-1/other", data(10))
    (path,) = [p for p in files(tmp_path) if p.stat().st_size > CHUNK]
    path.write_bytes(bytes(ALTERATIONS[how](bytearray(path.read_bytes()))))
    with caplog.at_level(logging.WARNING, logger="oscar.proxy"):
        with pytest.raises(BodyError):
            # the whole body: a flip in any chunk is met; the meta is checked before any byte
            store.read(RID, V1, 0, len(body))
        with pytest.raises(BodyError, match="no body"):
            store.read(RID, V1, 0, 1)
    assert not path.exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"proxy body of {RID} failed to authenticate: removed"
    ]
    assert store.total_bytes == files(tmp_path)[0].stat().st_size  # the other body, alone
    assert store.read("sensor-1/other", V1, 0, 10) == data(10)


def test_a_file_copied_to_another_resources_name_is_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    put(store, "sensor-1/a", data(CHUNK, seed=1))
    put(store, "sensor-1/b", data(CHUNK, seed=2))
    a, b = (Path(store._path(r)) for r in ("sensor-1/a", "sensor-1/b"))
    os.replace(a, b)
    with pytest.raises(BodyError, match="altered"):
        store.read("sensor-1/b", V1, 0, 10)
    assert not b.exists()
    assert store.total_bytes == 0
    assert files(tmp_path) == []


def test_a_chunk_from_another_file_does_not_open(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    put(store, "sensor-1/a", data(2 * CHUNK, seed=1))
    put(store, "sensor-1/b", data(2 * CHUNK, seed=2))
    a, b = (Path(store._path(r)) for r in ("sensor-1/a", "sensor-1/b"))
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    b.write_bytes(raw_b[:HEADER] + raw_a[HEADER : HEADER + SEALED] + raw_b[HEADER + SEALED :])
    assert store.read("sensor-1/b", V1, CHUNK, 10) == data(2 * CHUNK, seed=2)[CHUNK : CHUNK + 10]
    with pytest.raises(BodyError, match="altered"):
        store.read("sensor-1/b", V1, 0, 10)
    assert not b.exists()


def test_another_storage_key_reads_nothing(tmp_path: Path) -> None:
    put(store_at(tmp_path), RID, data(CHUNK + 1))
    (path,) = files(tmp_path)
    other = store_at(tmp_path, key=bytes(32))
    with pytest.raises(BodyError, match="no body"):  # another index key: another file name
        other.read(RID, V1, 0, 10)
    os.replace(path, other._path(RID))  # given the name it would look for, it does not open
    with pytest.raises(BodyError, match="altered"):
        other.read(RID, V1, 0, 10)
    assert files(tmp_path) == []


def test_eviction_keeps_the_bound_and_the_newest(tmp_path: Path) -> None:
    body = data(CHUNK * 2)
    one = HEADER + 2 * SEALED  # plus the meta: the bound below holds three bodies, not four
    store = store_at(tmp_path, max_bytes=3 * one + 600)
    for i in range(3):
        put(store, f"sensor-1/r{i}", body)
    paths = [Path(store._path(f"sensor-1/r{i}")) for i in range(3)]
    old = time.time() - 3600
    for age, path in enumerate(paths):  # r0 oldest, then r1, r2
        os.utime(path, (old + age, old + age))
    store.read("sensor-1/r0", V1, 0, 1)  # an hour old: refreshed by the read
    put(store, "sensor-1/r3", body)
    assert store.total_bytes <= 3 * one + 600
    assert not paths[1].exists()  # the least recently used
    assert paths[0].exists() and paths[2].exists()
    assert store.read("sensor-1/r3", V1, 0, len(body)) == body
    assert store.total_bytes == sum(p.stat().st_size for p in files(tmp_path))


def test_a_body_over_the_bound_is_kept_when_just_committed(tmp_path: Path) -> None:
    store = store_at(tmp_path, max_bytes=CHUNK)
    put(store, "sensor-1/a", data(10))
    put(store, "sensor-1/b", data(CHUNK * 2))
    assert store.read("sensor-1/b", V1, 0, 2 * CHUNK) == data(CHUNK * 2)
    with pytest.raises(BodyError, match="no body"):
        store.read("sensor-1/a", V1, 0, 1)
    assert len(files(tmp_path)) == 1


def test_leftover_spools_are_removed_at_start_and_not_counted(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    body = data(CHUNK + 3)
    put(store, RID, body)
    committed = store.total_bytes
    writer = store.spool()  # a crash in the middle of the next version
    writer.write(data(3 * CHUNK))
    (part,) = tmp_path.glob("*.part")
    assert stat.S_IMODE(part.stat().st_mode) == 0o600
    again = store_at(tmp_path)
    assert not part.exists()
    assert again.total_bytes == committed
    assert again.read(RID, V1, 0, len(body)) == body
    assert "1 bodies" in repr(again)


def test_abort_removes_the_spool_and_a_writer_finishes_once(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    with store.spool() as writer:
        writer.write(b"x" * (CHUNK + 1))
        assert list(tmp_path.glob("*.part"))
    assert list(tmp_path.iterdir()) == []  # left without commit: aborted
    writer.abort()  # idempotent
    with pytest.raises(RuntimeError):
        writer.write(b"y")
    committed = store.spool()
    committed.write(b"z")
    assert committed.commit(RID, V1) == 1
    committed.abort()  # nothing after a commit
    assert store.read(RID, V1, 0, 5) == b"z"
    for call in (lambda: committed.write(b"z"), lambda: committed.commit(RID, V1)):
        with pytest.raises(RuntimeError):
            call()
    empty = store.spool()
    with pytest.raises(ValueError):
        empty.commit("sensor-1/empty", V1)
    assert list(tmp_path.glob("*.part")) == []
    assert store.total_bytes == files(tmp_path)[0].stat().st_size


def test_nothing_in_clear_on_disk_and_no_key_in_reprs(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    pattern = b"RECOGNISABLE-PLAINTEXT-" * 10_000
    put(store, RID, pattern, step=4096)
    raw = b"".join(p.read_bytes() for p in files(tmp_path))
    assert b"RECOGNISABLE" not in raw
    assert RID.encode() not in raw and b"camera" not in raw
    assert not any("camera" in p.name for p in tmp_path.iterdir())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.iterdir())
    writer = store.spool()
    for text in (repr(store), repr(writer)):
        assert KEY.hex() not in text and "key" not in text.lower()
        assert str(tmp_path) not in text
    writer.abort()


def test_the_directory_is_private_and_an_unusable_one_refused(tmp_path: Path) -> None:
    store_at(tmp_path / "bodies")
    assert stat.S_IMODE((tmp_path / "bodies").stat().st_mode) == 0o700
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StateError, match="not a directory"):
        store_at(tmp_path / "file")


def test_discard_is_idempotent(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    put(store, RID, data(CHUNK))
    store.discard(RID)
    store.discard(RID)
    assert store.total_bytes == 0 and files(tmp_path) == []
    with pytest.raises(BodyError, match="no body"):
        store.size(RID, V1)


def test_a_writer_holds_at_most_a_chunk(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    block = data(1024)
    tracemalloc.start()
    try:
        with store.spool() as writer:
            for _ in range(16 * 1024):  # 16 MiB in 1 KiB writes
                writer.write(block)
            writer.commit(RID, V1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert store.size(RID, V1) == 16 << 20


def test_reading_in_order_decrypts_each_chunk_once_within_the_cache_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_at(tmp_path)
    body = data(5 << 20)
    put(store, RID, body, step=CHUNK)
    opened = []
    real_open = Sealer.open

    def counting_open(self: Sealer, blob: bytes, context: bytes, *, legacy: bool = False) -> bytes:
        opened.append(len(blob))
        return real_open(self, blob, context, legacy=legacy)

    monkeypatch.setattr(Sealer, "open", counting_open)
    tracemalloc.start()
    try:
        same = all(
            store.read(RID, V1, i, 1024) == body[i : i + 1024] for i in range(0, len(body), 1024)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert same
    assert len([n for n in opened if n > 1000]) == len(body) // CHUNK  # each chunk once
    assert len(store._chunks) == CACHED_CHUNKS
    assert peak < (CACHED_CHUNKS + 6) * CHUNK  # the cache and a chunk or two being opened


def test_a_bad_commit_changes_nothing(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    put(store, RID, data(10))
    before = store.total_bytes
    for rid, version in [(RID, (-1, 2)), ("x" * 256, V1), ("", V1), (RID, (1,))]:
        writer = store.spool()
        writer.write(b"new")
        with pytest.raises((ValueError, TypeError)):
            writer.commit(rid, version)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError):  # the writer is finished, its spool removed
            writer.write(b"more")
    assert list(tmp_path.glob("*.part")) == []
    assert store.total_bytes == before
    assert store.read(RID, V1, 0, 10) == data(10)


def test_a_failed_write_removes_the_spool(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    writer = store.spool()
    writer.write(data(100))
    os.close(writer._fd)  # the disk fails under it (EBADF stands for EIO or ENOSPC)
    with pytest.raises(OSError):
        writer.write(data(2 * CHUNK))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        writer.commit(RID, V1)


def test_reads_beside_commits_in_threads_never_see_a_torn_body(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_at(tmp_path)
    bodies = {seq: data(CHUNK + 17, seed=seq) for seq in range(1, 41)}
    put(store, RID, bodies[1], version=(1, 1))
    newest = [1]
    outcomes: list[str] = []

    def reader() -> None:
        while newest[0] < 40:
            seq = newest[0]
            try:
                got = store.read(RID, (1, seq), 0, CHUNK + 17)
            except BodyError as exc:
                outcomes.append(str(exc))
                continue
            outcomes.append("same" if got == bodies[seq] else "different")

    thread = threading.Thread(target=reader)
    with caplog.at_level(logging.WARNING, logger="oscar.proxy"):
        thread.start()
        try:
            for seq in range(2, 41):
                put(store, RID, bodies[seq], version=(1, seq), step=CHUNK)
                newest[0] = seq
        finally:
            newest[0] = 40  # the reader stops even if a commit failed
            thread.join()
    assert "same" in outcomes
    assert all(o == "same" or o.endswith("is of another version") for o in outcomes)
    assert caplog.records == []
    assert store.read(RID, (1, 40), 0, CHUNK + 17) == bodies[40]
    assert len(files(tmp_path)) == 1
