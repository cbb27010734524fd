"""The audit retention the AS applies by itself (issue 13, finding 5): real AS processes on states
whose audit logs hold old records (dated in the past through the store's API, which takes the
time of each record) prune them, hourly by default and here every second, behind the checkpoint
``oscar-as audit --verify`` verifies from; records inside the retention stay; a failed prune is
one warning line and is tried again. In process: a prune bounded to a number of records, and the
AS's loop catching up in such steps. On SQLite and on PostgreSQL (``as_database``), but for the
failed prune (a trigger put into the SQLite file).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from as_harness import ROOT, AsProcess, Daemon
from pg_harness import PgCluster

from authz_server import retention
from authz_server.ca import init_state
from authz_server.cli import main
from authz_server.store import Store
from demo.system import free_port

DAY = 86_400
#: A line the AS logs for each run that pruned something.
PRUNED = "audit retention: pruned "
FAILED = "audit retention: the prune failed"


class CliServe(Daemon):
    """``oscar-as serve --config FILE`` (``python -m authz_server``), as an operator runs it."""

    ready = "serving coaps://"

    def __init__(self, config: Path, log_path: Path) -> None:
        super().__init__(log_path)
        self.config = config

    def command(self) -> list[str]:
        return [sys.executable, "-m", "authz_server", "serve", "--config", str(self.config)]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def verify_cli(state: Path) -> str:
    """``oscar-as audit --verify`` as a process of its own; its output (it must pass)."""
    done = subprocess.run(
        [sys.executable, "-m", "authz_server", "audit", "--verify", "--state", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def url(as_database: tuple[PgCluster, str] | None) -> str | None:
    return None if as_database is None else as_database[1]


async def old_state(state: Path, now: int, database: str | None = None) -> Store:
    """A state made 10 days ago whose log has records 10 and 5 days old, then 1 day old and
    new (``young-*``): with a retention of 2 days, everything before ``young-0`` is past it.
    On SQLite, or on the PostgreSQL database ``database`` (the state records it)."""
    store = await init_state(
        state, as_uri="coaps://127.0.0.1", now=now - 10 * DAY, database=database
    )
    await store.add_device("p1", "producer", b"\x01" * 16, now - 10 * DAY)
    for i in range(20):
        await store.audit("admin", "test", f"old-{i}", "ok", {}, now - 5 * DAY + i)
    await store.audit("admin", "test", "young-0", "ok", {}, now - 1 * DAY)
    await store.audit("admin", "test", "young-1", "ok", {}, now)
    return store


@pytest_asyncio.fixture
async def servers() -> AsyncIterator[list[Daemon]]:
    """Daemons started by the test; each must exit 0 on SIGTERM with no traceback. A test takes
    it after ``as_database``, so that they stop before their database is dropped."""
    started: list[Daemon] = []
    yield started
    for server in started:
        status = server.stop()
        text = server.log()
        assert status == 0, text
        assert "Traceback" not in text, text


def test_serve_refuses_a_bad_audit_retention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["serve", "--state", str(tmp_path / "none"), "--listen", "127.0.0.1:5684"]
    for value in ("-1", "nan", "inf", "a year", "1e400"):
        assert main([*base, f"--audit-retention={value}"]) == 2, value
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--audit-retention" in err
    for value in ("-1", "nan", "true", '"365"'):
        config = tmp_path / "as.toml"
        config.write_text(f"audit_retention = {value}\n")
        assert main([*base, "--config", str(config)]) == 2, value
        assert "audit_retention" in capsys.readouterr().err
    # The same as a process of its own, as systemd and the tests start the AS.
    command = [sys.executable, "-m", "authz_server", *base, "--audit-retention", "-1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--audit-retention" in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.asyncio
async def test_the_as_prunes_what_is_past_its_retention_by_itself(
    tmp_path: Path, as_database: tuple[PgCluster, str] | None, servers: list[Daemon]
) -> None:
    state, now = tmp_path / "state", int(time.time())
    store = await old_state(state, now, url(as_database))
    try:
        before = await store.audit_records()
        young = next(r.seq for r in before if r.subject == "young-0")
        config = tmp_path / "as.toml"
        # Every second, so the first run comes after 1 s, not retention.FIRST_DELAY (10 s: the
        # test waited for it); later runs find nothing and say nothing.
        config.write_text(
            f'state = "state"\nlisten = "127.0.0.1:{free_port()}"\naudit_retention = 2\n'
            "audit_prune_every = 1\n"
        )
        server = CliServe(config, tmp_path / "as.log")
        server.start()
        servers.append(server)
        wait_for(lambda: PRUNED in server.log(), 30, "the prune")
        line = next(x for x in server.log().splitlines() if PRUNED in x)
        assert f"pruned {young - 1} records up to record {young - 1} " in line
        assert "2 days" in line
        kept = await store.audit_records()
        assert [r.subject for r in kept[:2]] == ["young-0", "young-1"]
        assert kept[0].seq == young and len(kept) == len(before) - (young - 1) + 1
        prune = kept[-1]
        assert (prune.actor, prune.action, prune.subject, prune.result) == (
            "as",
            "prune",
            "audit",
            "ok",
        )
        assert now - 2 * DAY < prune.detail["before"] <= time.time() - 2 * DAY  # run's time
        assert (prune.detail["through"], prune.detail["records"]) == (young - 1, young - 1)
        out = verify_cli(state)
        assert f"{len(kept)} records after the checkpoint at record {young - 1}, chain" in out
    finally:
        await store.close()
    assert server.stop() == 0
    assert server.log().count("audit retention") == 1  # one line; later runs found nothing


@pytest.mark.asyncio
async def test_records_that_age_past_the_retention_while_it_runs_are_pruned(
    tmp_path: Path, as_database: tuple[PgCluster, str] | None, servers: list[Daemon]
) -> None:
    """A retention of 0.00005 day (4.32 s) applied every second: the state's records are new when
    the AS starts (the first run, after 1 s, finds nothing); a later run prunes them."""
    state = tmp_path / "state"
    store = await init_state(
        state, as_uri="coaps://127.0.0.1", now=int(time.time()), database=url(as_database)
    )
    try:
        made = [r.seq for r in await store.audit_records()]
        server = AsProcess(
            state, tmp_path / "as.log", "--audit-retention", "0.00005", "--audit-prune-every", "1"
        )
        started = time.monotonic()
        server.start()
        servers.append(server)
        wait_for(lambda: PRUNED in server.log(), 60, "the prune")
        assert time.monotonic() - started > 3.3  # not before the records were 4.32 s old
        kept = await store.audit_records()
        assert kept[0].seq == made[-1] + 1 and kept[0].action == "prune"
        assert kept[0].detail["through"] == made[-1]
        assert f"1 records after the checkpoint at record {made[-1]}" in verify_cli(state)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_failed_prune_is_logged_and_tried_again(
    tmp_path: Path, servers: list[Daemon]
) -> None:
    """SQLite only: the failure is a trigger put into the SQLite file with sqlite3."""
    state, now = tmp_path / "state", int(time.time())
    store = await old_state(state, now)
    try:
        count = len(await store.audit_records())
        database = sqlite3.connect(state / "as.db", isolation_level=None)
        database.execute(
            "CREATE TRIGGER refuse_checkpoint BEFORE INSERT ON audit_checkpoint "
            "BEGIN SELECT RAISE(ABORT, 'the checkpoint is refused for the test'); END"
        )
        server = AsProcess(
            state, tmp_path / "as.log", "--audit-retention", "2", "--audit-prune-every", "1"
        )
        server.start()
        servers.append(server)
        wait_for(lambda: server.log().count(FAILED) >= 2, 60, "two failed runs")
        assert "the checkpoint is refused for the test); trying again in 1 s" in server.log()
        assert len(await store.audit_records()) == count  # the transaction rolled back
        assert "chain intact" in verify_cli(state)
        database.execute("DROP TRIGGER refuse_checkpoint")
        database.close()
        wait_for(lambda: PRUNED in server.log(), 60, "the prune")
        assert [r.subject for r in await store.audit_records()][:2] == ["young-0", "young-1"]
        assert "after the checkpoint at record" in verify_cli(state)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_prune_bounded_to_a_number_of_records_goes_in_steps(
    tmp_path: Path, as_database: tuple[PgCluster, str] | None
) -> None:
    now = int(time.time())
    store = await old_state(tmp_path / "state", now, url(as_database))
    try:
        young = next(r.seq for r in await store.audit_records() if r.subject == "young-0")
        with pytest.raises(ValueError):
            await store.prune_audit(now - 2 * DAY, now, limit=0)
        assert await store.prune_audit(now - 2 * DAY, now, limit=5) == (5, 5)
        assert (await store.verify_audit())[0]
        assert await store.prune_audit(now - 2 * DAY, now, limit=5) == (10, 5)
        # The last step stops at the first record inside the retention, as an unbounded one.
        assert await store.prune_audit(now - 2 * DAY, now, limit=10_000) == (young - 1, young - 11)
        ok, summary = await store.verify_audit()
        assert ok and f"checkpoint at record {young - 1}" in summary
        assert await store.prune_audit(now - 2 * DAY, now, limit=5) == (0, 0)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_the_as_catches_up_in_steps_without_waiting_an_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_database: tuple[PgCluster, str] | None
) -> None:
    """The loop of the AS on a real store: with steps of 4 records and an hourly schedule, a
    run that pruned a whole step is followed by the next at once, until none is left."""
    now = int(time.time())
    store = await old_state(tmp_path / "state", now, url(as_database))
    monkeypatch.setattr(retention, "STEP", 4)
    monkeypatch.setattr(retention, "FIRST_DELAY", 0.0)
    monkeypatch.setattr(retention, "CATCH_UP", 0.01)
    try:
        young = next(r.seq for r in await store.audit_records() if r.subject == "young-0")
        task = asyncio.create_task(retention.keep_audit(store, 2, 3600.0, lambda: now))
        for _ in range(500):
            records = await store.audit_records()
            if records[0].subject == "young-0":
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        prunes = [r.detail for r in await store.audit_records() if r.action == "prune"]
        assert [p["records"] for p in prunes] == [4] * ((young - 1) // 4) + (
            [(young - 1) % 4] if (young - 1) % 4 else []
        )
        assert prunes[-1]["through"] == young - 1 and (await store.verify_audit())[0]
    finally:
        await store.close()
