"""Durable ingest (issue 17): the consumer's freshness state is committed in groups, many readings
per save (one fsync), each reading released only once the save holding it is on disk.

The group commit's rules are tested in process on a real state directory
(:class:`~consumer.commit.FreshnessCommits` over a :class:`~consumer.store.ConsumerStore`); a
disk that refuses is a real one (a file size limit, so the write fails with EFBIG). The crash
test runs a real consumer process on a stream of readings, many in flight, kills it with SIGKILL
at random moments, starts it again on the same state directory with the same objects, and checks
that nothing released before a kill is ever released again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from consumer_harness import HUMIDITY, READER, TEMPERATURE, World, build_world

from consumer import Consumer, StaleCopy
from consumer.commit import FreshnessCommits
from consumer.store import ConsumerStore
from oscar.errors import InvalidObject
from oscar_io.bundle import Bundle
from oscar_io.statefiles import SealedFile

R1, R2 = "sensor-1/a", "sensor-1/b"


def on_disk(state: Path, key: bytes) -> dict[str, list[int]]:
    """The freshness state as a new process would read it."""
    value = SealedFile(state / "freshness", key, "consumer freshness").load()
    return dict(value or {})


@contextlib.contextmanager
def refusing_disk() -> Iterator[None]:
    """Every file this process writes refuses a byte more than 16 (EFBIG): a real write that
    fails, leaving the files already there as they are."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# --- the group commit, in process ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_readings_share_saves_and_each_waits_for_its_own(tmp_path: Path) -> None:
    key = os.urandom(32)
    store = ConsumerStore(tmp_path / "s", key)
    commits = FreshnessCommits(store)
    seen_on_disk: list[bool] = []

    async def reading(rid: str, seq: int) -> None:
        done = commits.accept(rid, 1, seq, f"{rid}/{seq}".encode())
        assert done is not None
        await commits.settled(done)
        # Released: its freshness must be on disk already, whatever else is still waiting.
        seen_on_disk.append(tuple(on_disk(tmp_path / "s", key)[rid]) >= (1, seq))

    # A group of one is saved at once, alone.
    await reading(R1, 1)
    assert (commits.saves, commits.committed) == (1, 1)

    # 100 readings in flight: the first starts a save, the 99 checked meanwhile share the next.
    await asyncio.gather(*(reading(rid, seq) for seq in range(2, 52) for rid in (R1, R2)))
    assert commits.committed == 101
    assert commits.saves <= 3, commits  # 1 + (1 and 99), whatever the machine's speed
    assert seen_on_disk == [True] * 101
    assert on_disk(tmp_path / "s", key) == {R1: [1, 51], R2: [1, 51]}
    assert store.freshness.newest(R1) == (1, 51)
    again = ConsumerStore(tmp_path / "s", key)  # another process: it sees all of it
    assert again.freshness.newest(R2) == (1, 51)
    assert again.held(R1) == (1, 51, b"sensor-1/a/51")  # the newest of each resource is held


@pytest.mark.asyncio
async def test_a_replay_within_a_group_is_refused(tmp_path: Path) -> None:
    store = ConsumerStore(tmp_path / "s", os.urandom(32))
    commits = FreshnessCommits(store)
    first = commits.accept(R1, 2, 5, b"x")
    assert first is not None and commits.newest(R1) == (2, 5)
    assert store.freshness.newest(R1) is None  # accepted in memory, not committed yet
    assert commits.waiting(R1, (2, 5)) is first
    for epoch, seq in ((2, 5), (2, 4), (1, 9)):  # the same, older, an older epoch: all refused
        with pytest.raises(InvalidObject):
            commits.accept(R1, epoch, seq, b"y")
    newer = commits.accept(R1, 2, 6, b"z")
    other = commits.accept(R2, 1, 1, b"w")  # another resource is not concerned
    assert newer is not None and other is not None
    await asyncio.gather(commits.settled(first), commits.settled(newer), commits.settled(other))
    assert store.freshness.newest(R1) == (2, 6) and commits.waiting(R1, (2, 5)) is None
    with pytest.raises(InvalidObject):  # and once committed, as before
        commits.accept(R1, 2, 6, b"z")


@pytest.mark.asyncio
async def test_a_failed_save_fails_its_readings_and_changes_nothing_else(tmp_path: Path) -> None:
    key = os.urandom(32)
    state = tmp_path / "s"
    store = ConsumerStore(state, key)
    commits = FreshnessCommits(store)
    done = commits.accept(R1, 1, 1, b"one")
    assert done is not None
    await commits.settled(done)
    before = (state / "freshness").read_bytes()

    with refusing_disk():
        failing = [commits.accept(R1, 1, seq, b"x") for seq in (2, 3)]
        failing.append(commits.accept(R2, 1, 7, b"y"))
        await commits.close()  # both saves end; their failure is their readings', not the closer's
        outcomes = await asyncio.gather(
            *(commits.settled(f) for f in failing if f is not None), return_exceptions=True
        )
    assert len(outcomes) == 3
    assert all(isinstance(o, OSError) for o in outcomes), outcomes  # never released
    # Nothing else changed: the file, the committed state, and nothing is left waiting.
    assert (state / "freshness").read_bytes() == before
    assert store.freshness.newest(R1) == (1, 1) and store.freshness.newest(R2) is None
    assert commits.newest(R1) == (1, 1) and commits.newest(R2) is None
    assert not [p for p in state.iterdir() if p.name.startswith(".")]  # no temporary file left

    # The readings that failed were never accepted: offered again, they are.
    retry = [commits.accept(R1, 1, 2, b"x"), commits.accept(R2, 1, 7, b"y")]
    await asyncio.gather(*(commits.settled(f) for f in retry if f is not None))
    assert on_disk(state, key) == {R1: [1, 2], R2: [1, 7]}


@pytest.mark.asyncio
async def test_a_reading_another_process_superseded_is_refused(tmp_path: Path) -> None:
    key = os.urandom(32)
    mine, theirs = ConsumerStore(tmp_path / "s", key), ConsumerStore(tmp_path / "s", key)
    their_commits = FreshnessCommits(theirs)
    done = their_commits.accept(R1, 1, 9, b"nine")
    assert done is not None
    await their_commits.settled(done)

    commits = FreshnessCommits(mine)  # its memory has not seen (1, 9)
    older, newer = commits.accept(R1, 1, 5, b"five"), commits.accept(R1, 1, 10, b"ten")
    assert older is not None and newer is not None
    with pytest.raises(InvalidObject) as refused:
        await commits.settled(older)
    assert "another process" in refused.value.reason
    await commits.settled(newer)  # newer than theirs: it stands
    assert mine.freshness.newest(R1) == (1, 10)
    assert mine.held(R1) == (1, 10, b"ten")


@pytest.mark.asyncio
async def test_a_caller_that_stops_waiting_does_not_stop_the_save(tmp_path: Path) -> None:
    key = os.urandom(32)
    store = ConsumerStore(tmp_path / "s", key)
    commits = FreshnessCommits(store)

    async def reading(seq: int) -> None:
        done = commits.accept(R1, 1, seq, b"x")
        assert done is not None
        await commits.settled(done)

    first = asyncio.ensure_future(reading(1))
    second = asyncio.ensure_future(reading(2))
    await asyncio.sleep(0)  # both accepted
    first.cancel()
    await second
    with pytest.raises(asyncio.CancelledError):
        await first
    await commits.close()
    assert on_disk(tmp_path / "s", key) == {R1: [1, 2]}


def test_in_memory_a_reading_is_committed_at_once() -> None:
    store = ConsumerStore(None, os.urandom(32))
    commits = FreshnessCommits(store)
    assert commits.accept(R1, 1, 1, b"x") is None
    assert store.freshness.newest(R1) == (1, 1) and store.held(R1) == (1, 1, b"x")
    with pytest.raises(InvalidObject):
        commits.accept(R1, 1, 1, b"x")


# --- kill -9 of a consumer ingesting a stream ---------------------------------------------------

#: The consumer process: opens every object of the file (JSON: [resource, seq, hex]) in order,
#: WINDOW in flight, through the path notifications take (an object equal to the newest accepted
#: is skipped), and says what became of each, one line each, as soon as it is known.
CHILD = """
import asyncio, json, sys
from consumer import Consumer, InvalidObject

async def main(bundle, state, objects, window):
    items = json.loads(open(objects).read())
    gate = asyncio.Semaphore(window)

    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    async with Consumer(bundle, state) as consumer:
        async def one(rid, seq, data):
            async with gate:
                try:
                    reading = await consumer.pipeline.open(bytes.fromhex(data), rid, skip_same=True)
                except InvalidObject:
                    say(f"refused {rid} {seq}")
                    return
                if reading is None:
                    say(f"skipped {rid} {seq}")
                    return
                assert (reading.metadata.resource_id, reading.metadata.seq) == (rid, seq)
                say(f"released {rid} {seq}")

        await asyncio.gather(*(one(*item) for item in items))
        commits = consumer.pipeline.commits
        say(f"saves {commits.saves} {commits.committed}")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""
#: Objects per resource in the stream (two resources, interleaved), and readings in flight.
STREAM = 200
WINDOW = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = build_world(tmp_path_factory.mktemp("ingest"))
    try:
        yield world
    finally:
        status = world.server.stop()
        assert status == 0, world.server.log()


@pytest.mark.asyncio
async def test_readings_in_flight_of_one_resource_through_the_pipeline(
    world: World, tmp_path: Path
) -> None:
    """Real objects, many in flight: the newest waiting for its save refuses an older one and
    makes the same one wait for that save; nothing is returned before its freshness is on disk."""
    state = tmp_path / "state"
    key = Bundle.load(world.bundle(READER)).state_key("consumer")
    epoch = world.secrets[TEMPERATURE][0]
    objects = {seq: world.seal(b'{"n": %d}' % seq, seq=seq) for seq in (1, 4, 5, 6)}
    async with Consumer(world.bundle(READER), state) as consumer:
        await consumer.open_object(objects[1], TEMPERATURE)  # certificate, CRL, secret: cached

        async def reading(seq: int, *, skip_same: bool = False) -> str:
            try:
                got = await consumer.pipeline.open(objects[seq], TEMPERATURE, skip_same=skip_same)
            except StaleCopy:
                return "stale"
            if got is None:
                return "skipped"
            assert tuple(on_disk(state, key)[TEMPERATURE]) >= (epoch, seq)  # saved before
            return "released"

        outcomes = await asyncio.gather(
            reading(5), reading(5), reading(5, skip_same=True), reading(4), reading(6)
        )
        # The second 5 is the same object again (returned, once its save is done); the third,
        # as a notification, is skipped; 4 is older than the 5 in flight; 6 is news.
        assert outcomes == ["released", "released", "skipped", "stale", "released"]
        assert consumer.pipeline.commits.newest(TEMPERATURE) == (epoch, 6)
    assert on_disk(state, key)[TEMPERATURE] == [epoch, 6]


def run_consumer(world: World, state: Path, objects: Path, kill_after: int | None) -> list[str]:
    """Run the consumer on the stream; with ``kill_after``, SIGKILL it once it has released that
    many readings. Every line it wrote before it died."""
    args = [sys.executable, "-c", CHILD, str(world.bundle(READER)), str(state), str(objects)]
    proc = subprocess.Popen(
        [*args, str(WINDOW)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(60, proc.kill)  # a hung consumer fails the test, not the suite
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        released = 0
        for line in proc.stdout:
            lines.append(line.strip())
            released += line.startswith("released ")
            if kill_after is not None and released == kill_after:
                os.kill(proc.pid, signal.SIGKILL)  # mid-stream: saves and readings in flight
                break
        lines += [line.strip() for line in proc.stdout]  # what it wrote before it died
        _, err = proc.communicate()
    finally:
        watchdog.cancel()
    if kill_after is None:
        assert proc.returncode == 0, err
    else:
        assert proc.returncode == -signal.SIGKILL, err
    return lines


def test_nothing_released_before_a_kill_is_released_again(world: World, tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    epoch = {rid: world.secrets[rid][0] for rid in (TEMPERATURE, HUMIDITY)}
    stream = [
        [rid, seq, world.seal(b'{"n": %d}' % seq, rid, seq=seq).hex()]
        for seq in range(1, STREAM + 1)
        for rid in (TEMPERATURE, HUMIDITY)
    ]
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps(stream))
    state = tmp_path / "state"

    released: list[tuple[str, int]] = []  # over every run, in order
    kills = [rng.randint(1, 60) for _ in range(3)]
    for run, kill_after in enumerate([*kills, None]):
        lines = run_consumer(world, state, objects, kill_after)
        outcome = {}
        for line in lines:
            what, *rest = line.split()
            if what in ("released", "refused", "skipped"):
                outcome[(rest[0], int(rest[1]))] = what
        now = [k for k, what in outcome.items() if what == "released"]
        context = f"seed {seed}, run {run}, kills after {kills}"
        assert kill_after is None or len(now) >= kill_after, context
        # Nothing released in an earlier run comes out again: refused (older than the newest
        # on disk) or skipped (the newest itself), wherever this run got to.
        again = [k for k in released if outcome.get(k) == "released"]
        assert not again, f"released twice across a kill: {again[:5]} ({context})"
        assert all(outcome.get(k) in (None, "refused", "skipped") for k in released), context
        released += now
    assert len(released) == len(set(released))

    # The last run went through the whole stream: every object has an outcome, the newest of each
    # resource was released exactly once, and the state on disk says so.
    assert len(outcome) == 2 * STREAM, context
    stored = ConsumerStore(state, Bundle.load(world.bundle(READER)).state_key("consumer"))
    for rid in (TEMPERATURE, HUMIDITY):
        assert released.count((rid, STREAM)) == 1, context
        assert stored.freshness.newest(rid) == (epoch[rid], STREAM)
    # Many readings per save: the last run committed most of the stream in groups.
    [stats] = [line for line in lines if line.startswith("saves ")]
    saves, committed = map(int, stats.split()[1:])
    assert committed == sum(1 for what in outcome.values() if what == "released"), context
    assert committed >= 2 * saves, f"{stats} ({context})"
