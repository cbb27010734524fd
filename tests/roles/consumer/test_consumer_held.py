"""The newest accepted objects a consumer holds (issue 13): bounded, one file per resource, never
in the way of a normal read.

Store-level tests run in process on a state directory; the read tests use a real AS process and a
stand-in producer (:mod:`consumer_harness`), as :mod:`test_consumer` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from consumer_harness import HUMIDITY, READER, TEMPERATURE, ProducerStandIn, World, build_world

from consumer import Consumer, StaleCopy
from consumer.store import DEFAULT_MAX_HELD_BYTES, DEFAULT_MAX_OBJECTS, ConsumerStore
from oscar_io.bundle import Bundle
from oscar_io.statefiles import MAX_STATE_FILE

MIB = 1 << 20


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = build_world(tmp_path_factory.mktemp("held"))
    try:
        yield world
    finally:
        status = world.server.stop()
        assert status == 0, world.server.log()


def held_files(state: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in (state / "held").iterdir()}


# --- the store, in process ----------------------------------------------------------------------


def test_accepting_writes_only_that_resources_entry(tmp_path: Path) -> None:
    key = os.urandom(32)
    store = ConsumerStore(tmp_path / "state", key)
    store.put_held(TEMPERATURE, 1, 1, b"t-1")
    store.put_held(HUMIDITY, 1, 1, b"h-1")
    before = held_files(tmp_path / "state")
    assert len(before) == 2
    for name in before:  # names and contents say nothing of the resource or the object
        data = (tmp_path / "state" / "held" / name).read_bytes()
        assert TEMPERATURE.split("/")[-1] not in name and HUMIDITY.split("/")[-1] not in name
        assert TEMPERATURE.encode() not in data and b"t-1" not in data and b"h-1" not in data

    store.put_held(HUMIDITY, 1, 2, b"h-2")
    store.put_held(HUMIDITY, 1, 2, b"h-2")  # the same again: nothing written
    store.put_held(HUMIDITY, 1, 1, b"h-1")  # older than held: nothing written
    after = held_files(tmp_path / "state")
    assert after.keys() == before.keys()
    changed = {
        n
        for n in after
        if (after[n].st_ino, after[n].st_mtime_ns) != (before[n].st_ino, before[n].st_mtime_ns)
    }
    assert len(changed) == 1  # humidity's file only, written once (a new inode per write)
    [name] = changed
    assert after[name].st_ino != before[name].st_ino

    again = ConsumerStore(tmp_path / "state", key)  # another process
    assert again.held(HUMIDITY) == (1, 2, b"h-2") and again.held(TEMPERATURE) == (1, 1, b"t-1")
    assert again.held("sensor-1/none") is None


def test_a_newer_object_held_by_another_process_is_kept(tmp_path: Path) -> None:
    key = os.urandom(32)
    mine, theirs = ConsumerStore(tmp_path / "s", key), ConsumerStore(tmp_path / "s", key)
    theirs.freshness.accept(TEMPERATURE, 1, 3)
    theirs.save_freshness(TEMPERATURE)
    theirs.put_held(TEMPERATURE, 1, 3, b"three")
    mine.put_held(TEMPERATURE, 1, 2, b"two")  # accepted before theirs, written after
    assert mine.held(TEMPERATURE) == (1, 3, b"three")


def test_held_objects_are_bounded_by_count_and_bytes(tmp_path: Path) -> None:
    key = os.urandom(32)
    store = ConsumerStore(tmp_path / "s", key, max_objects=3, max_held_bytes=1000)
    for i in range(5):
        store.put_held(f"sensor-1/r{i}", 1, 1, bytes([i]) * 100)
    assert len(held_files(tmp_path / "s")) == 3
    assert [store.held(f"sensor-1/r{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    store.put_held("sensor-1/big", 1, 1, b"x" * 900)  # within the budget: the oldest go
    assert store.held("sensor-1/big") == (1, 1, b"x" * 900)
    assert sum(s.st_size for s in held_files(tmp_path / "s").values()) <= 1000 + 100
    store.put_held("sensor-1/big", 1, 2, b"x" * 1001)  # over the budget: not held, nor the older
    assert store.held("sensor-1/big") is None

    memory = ConsumerStore(None, key, max_objects=2, max_held_bytes=250)
    for i in range(4):
        memory.put_held(f"sensor-1/r{i}", 1, 1, b"m" * 100)
    assert [memory.held(f"sensor-1/r{i}") is not None for i in range(4)] == [
        False,
        False,
        True,
        True,
    ]


def test_the_single_objects_file_of_earlier_versions_is_removed(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / "objects").write_bytes(b"\0" * 100)  # unreadable: it would stop the consumer
    (state / "objects").chmod(0o600)
    store = ConsumerStore(state, os.urandom(32))
    assert not (state / "objects").exists() and store.held(TEMPERATURE) is None


# --- reads, against a real AS -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_many_large_objects_held_do_not_break_later_reads(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    """More large objects than one state file may hold: the oldest go, reads go on."""
    state = tmp_path / "state"
    bundle = Bundle.load(world.bundle(READER))
    store = ConsumerStore(state, bundle.state_key("consumer"))
    count = MAX_STATE_FILE // MIB + 6  # all in one file: over what a state file may be
    for i in range(count):
        store.put_held(f"sensor-1/big{i}", 1, 1, os.urandom(MIB))
    files = held_files(state)
    assert len(files) <= DEFAULT_MAX_OBJECTS
    assert sum(s.st_size for s in files.values()) <= DEFAULT_MAX_HELD_BYTES + MIB
    assert store.held(f"sensor-1/big{count - 1}") is not None

    first, newer = world.seal(b'{"t": 1}'), world.seal(b'{"t": 2}')
    producer.publish(TEMPERATURE, newer)
    async with Consumer(bundle, state) as consumer:
        assert (await consumer.get(producer.uri())).plaintext == b'{"t": 2}'
        producer.publish(TEMPERATURE, first)
        stale: list[bool] = []
        reading = await consumer.get(producer.uri(), on_stale=lambda _, i: stale.append(i))
        assert reading.plaintext == b'{"t": 2}' and stale == [True]


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", ["flipped", "truncated", "oversized", "swapped"])
async def test_a_bad_held_entry_does_not_break_a_normal_read(
    world: World,
    producer: ProducerStandIn,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    state = tmp_path / "state"
    first, newer = world.seal(b'{"t": 1}'), world.seal(b'{"t": 2}')
    other = world.seal(b'{"h": 1}', HUMIDITY)
    async with Consumer(world.bundle(READER), state) as consumer:
        await consumer.open_object(other, HUMIDITY)
        before = held_files(state)
        await consumer.open_object(newer, TEMPERATURE)
    [name] = held_files(state).keys() - before.keys()
    path = state / "held" / name

    def spoil() -> None:
        if damage == "flipped":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 1
            path.write_bytes(bytes(data))
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[:20])
        elif damage == "oversized":
            os.truncate(path, MAX_STATE_FILE + 1)
        else:  # a valid file of another resource under this resource's name
            [theirs] = before
            path.write_bytes((state / "held" / theirs).read_bytes())

    spoil()
    producer.publish(TEMPERATURE, newer)
    async with Consumer(world.bundle(READER), state) as consumer:
        # A normal read never reads what is held.
        assert (await consumer.get(producer.uri())).plaintext == b'{"t": 2}'
        spoil()  # (that read wrote the entry again: it had not been written by this process)
        producer.publish(TEMPERATURE, first)
        with caplog.at_level(logging.INFO, logger="oscar.consumer"), pytest.raises(StaleCopy):
            await consumer.get(producer.uri())
        dropped = [r for r in caplog.records if "the reading held is dropped" in r.getMessage()]
        assert len(dropped) == 1 and dropped[0].levelno == logging.WARNING
        assert not path.exists()
        # Said once: the stale copy itself (raised to the caller) is one info line.
        said = [r for r in caplog.records if "older than" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.INFO, caplog.text
        # And the next newer object is held again.
        producer.publish(TEMPERATURE, world.seal(b'{"t": 3}'))
        assert (await consumer.get(producer.uri())).plaintext == b'{"t": 3}'
        assert path.exists()


@pytest.mark.asyncio
async def test_a_stale_first_notification_without_a_held_reading_is_reported_once(
    world: World, producer: ProducerStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, newer = world.seal(b'{"t": 1}'), world.seal(b'{"t": 2}')
    async with Consumer(world.bundle(READER), tmp_path / "state", timeout=5) as consumer:
        await consumer.open_object(newer, TEMPERATURE)
        consumer.store._held.drop(TEMPERATURE)  # type: ignore[union-attr]
        producer.publish(TEMPERATURE, first)
        resource = producer.resource(TEMPERATURE)
        observation = consumer.observe(producer.uri())

        async def first_value() -> bytes:
            async for reading in observation:
                return reading.plaintext
            raise AssertionError("the observation ended")

        with caplog.at_level(logging.INFO, logger="oscar.consumer"):
            task = asyncio.ensure_future(first_value())
            try:
                await asyncio.wait_for(resource.observed.wait(), 10)
                await wait_for_record(caplog, "older than")
                producer.publish(TEMPERATURE, world.seal(b'{"t": 3}'))
                assert await asyncio.wait_for(task, 10) == b'{"t": 3}'
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await observation.aclose()
        said = [r for r in caplog.records if "older than" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING, caplog.text


async def wait_for_record(caplog: pytest.LogCaptureFixture, text: str) -> None:
    deadline = time.monotonic() + 10
    while not any(text in r.getMessage() for r in caplog.records):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no log record with {text!r}")
        await asyncio.sleep(0.02)
