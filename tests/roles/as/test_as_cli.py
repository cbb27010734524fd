"""The ``oscar-as`` admin tool: every admin command, every error exit, and the module entry point.

Tests call :func:`authz_server.cli.main` in-process on a fresh state directory; resources are
registered straight through the store, since that is the server's job. One test runs
``python -m authz_server`` as a real subprocess. ``serve`` is tested only as far as its argument
and state checks, which come before the server is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509

from authz_server.cli import main
from authz_server.store import Resource, Store
from oscar import cbor
from oscar_io.bundle import Bundle

T = TypeVar("T")
PRODUCER, CONSUMER, OTHER, PROXY = "sensor-1", "phone-1", "phone-2", "cloud-1"
RID, RID2 = "sensor-1/temperature", "sensor-1/humidity"
ERROR_LINE = re.compile(r"^oscar-as(?: [a-z-]+)?: error: \S[^\n]*\n$")
BAD_IDS = ["'; DROP TABLE devices; --", "a/b", "x" * 33, "", "-lead", "tab\there", "é"]
BAD_PATTERNS = [
    "sensor-1",
    "sensor-1/",
    "*/temperature",
    "sensor-1/a?",
    "sensor-1/[ab]",
    "sensor-1/../x",
    "sensor-1//x",
    "sensor-1/x'; DROP TABLE grants; --",
    "sensor-1/" + "a" * 250,
]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs ``main`` and remembers every PSK it handed out, to check that no output leaks one."""

    capsys: pytest.CaptureFixture[str]
    state: Path
    psks: set[str] = field(default_factory=set)

    def run(self, *argv: str, state: bool = True) -> Result:
        code = main([*argv, "--state", str(self.state)] if state else list(argv))
        captured = self.capsys.readouterr()
        result = Result(code, captured.out, captured.err)
        self.assert_no_psk(result)
        return result

    def ok(self, *argv: str, **kw: Any) -> Result:
        result = self.run(*argv, **kw)
        assert result.code == 0, result.err
        assert result.err == ""
        return result

    def fail(self, code: int, *argv: str, **kw: Any) -> Result:
        result = self.run(*argv, **kw)
        assert result.code == code, (result.out, result.err)
        assert ERROR_LINE.fullmatch(result.err), result.err
        assert result.out == ""
        return result

    def assert_no_psk(self, result: Result) -> None:
        for psk in self.psks:
            assert psk not in result.out.lower() and psk not in result.err.lower()

    def enroll(self, role: str, device_id: str, out: Path | None = None) -> dict[str, Any]:
        out = out or self.state.parent / f"{device_id}.json"
        result = self.ok("enroll", "--role", role, "--id", device_id, "--out", str(out))
        assert device_id in result.out and str(out) in result.out
        bundle: dict[str, Any] = json.loads(out.read_text())
        self.psks.add(bundle["psk_hex"])
        self.assert_no_psk(result)
        return bundle

    def store(self, body: Callable[[Store], Awaitable[T]]) -> T:
        async def run() -> T:
            store = await Store.open(self.state)
            try:
                return await body(store)
            finally:
                await store.close()

        return asyncio.run(run())

    def register(self, rid: str, *, rotation: int = 3600, at: int | None = None) -> None:
        at = int(time.time()) if at is None else at
        resource = Resource(rid, rid.partition("/")[0], 0, "ccm-es256", 60, rotation, at)
        self.store(lambda s: s.register_resource(resource))

    def epochs(self, rid: str) -> list[tuple[int, str]]:
        return [(e.epoch, e.state) for e in self.store(lambda s: s.epochs(rid))]

    def snapshot(self) -> tuple[int, list[Any], list[Any], int]:
        async def body(s: Store) -> tuple[int, list[Any], list[Any], int]:
            return (
                await s.changes(),
                await s.devices(),
                await s.grants(),
                len(await s.audit_records()),
            )

        return self.store(body)


@pytest.fixture
def blank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys, tmp_path / "state")


@pytest.fixture
def cli(blank: Cli) -> Cli:
    blank.ok("init")
    return blank


@pytest.fixture
def fleet(cli: Cli) -> Cli:
    """A producer with two resources, two consumers and a proxy."""
    cli.enroll("producer", PRODUCER)
    cli.enroll("consumer", CONSUMER)
    cli.enroll("consumer", OTHER)
    cli.enroll("proxy", PROXY)
    cli.register(RID)
    cli.register(RID2)
    return cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- init ----------------------------------------------------------------------------------------


def test_init_makes_a_private_state_directory(blank: Cli) -> None:
    result = blank.ok("init", "--as-uri", "coaps://as.example:5684")
    state = blank.state
    assert mode(state) == 0o700
    assert mode(state / "master.key") == 0o600 and len((state / "master.key").read_bytes()) == 32
    assert (state / "as.db").is_file()
    ca = x509.load_pem_x509_certificate((state / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert str(state / "ca.pem") in result.out and "kid " in result.out
    assert (state / "master.key").read_bytes().hex() not in result.out
    assert blank.store(lambda s: s.get_meta("as_uri")) == "coaps://as.example:5684"


def test_init_twice_is_refused_and_changes_nothing(cli: Cli) -> None:
    key = (cli.state / "master.key").read_bytes()
    before = cli.snapshot()
    cli.fail(1, "init")
    assert (cli.state / "master.key").read_bytes() == key
    assert cli.snapshot() == before


def test_init_refuses_a_foreign_directory_and_a_bad_uri(blank: Cli) -> None:
    blank.state.mkdir()
    (blank.state / "notes.txt").write_text("mine")
    blank.fail(2, "init")
    assert sorted(p.name for p in blank.state.iterdir()) == ["notes.txt"]
    for uri in ["http://x:5684", "coaps://", "coaps://x:99999", "coaps://x/path", "coap://x"]:
        blank.state = blank.state.parent / "other"
        blank.fail(2, "init", "--as-uri", uri)
        assert not blank.state.exists()


def test_init_takes_an_empty_directory_and_makes_it_private(blank: Cli) -> None:
    blank.state.mkdir(mode=0o755)
    blank.ok("init")
    assert mode(blank.state) == 0o700


# --- enroll --------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["producer", "consumer", "proxy"])
def test_enroll_writes_a_private_bundle(cli: Cli, role: str) -> None:
    out = cli.state.parent / "bundle.json"
    bundle = cli.enroll(role, "dev-1", out)
    assert mode(out) == 0o600
    keys = {"id", "role", "as_uri", "as_uris", "psk_identity", "psk_hex", "ca_cert_pem"}
    assert set(bundle) == keys
    assert bundle["id"] == bundle["psk_identity"] == "dev-1"
    assert bundle["role"] == role
    assert bundle["as_uri"] == "coaps://127.0.0.1:5684"
    assert bundle["as_uris"] == ["coaps://127.0.0.1:5684"]
    assert bundle["ca_cert_pem"] == (cli.state / "ca.pem").read_text()
    psk = bytes.fromhex(bundle["psk_hex"])
    assert len(psk) == 16
    assert cli.store(lambda s: s.active_psks()) == {"dev-1": psk}
    devices = cli.store(lambda s: s.devices())
    assert [(d.id, d.role, d.status) for d in devices] == [("dev-1", role, "active")]


def test_every_device_gets_its_own_psk_and_the_as_uri_can_be_overridden(cli: Cli) -> None:
    a = cli.enroll("consumer", "a")
    out = cli.state.parent / "b.json"
    cli.ok("enroll", "--role", "consumer", "--id", "b", "--out", str(out), "--as-uri", "coaps://h")
    b = json.loads(out.read_text())
    cli.psks.add(b["psk_hex"])
    assert a["psk_hex"] != b["psk_hex"]
    assert (a["as_uri"], b["as_uri"]) == ("coaps://127.0.0.1:5684", "coaps://h")


A, B, C = "coaps://as-a.example:5684", "coaps://as-b.example:5684", "coaps://127.0.0.1:5784"


def uris(*listed: str) -> list[str]:
    return [arg for uri in listed for arg in ("--as-uri", uri)]


def test_init_lists_several_as_instances_and_bundles_carry_them_all(blank: Cli) -> None:
    result = blank.ok("init", *uris(A, B, C))
    assert f"{A}, {B}, {C}" in result.out
    assert blank.store(lambda s: s.get_meta("as_uri")) == A
    assert json.loads(blank.store(lambda s: s.get_meta("as_uris"))) == [A, B, C]
    record = blank.store(lambda s: s.audit_records())[-1]
    assert record.action == "init" and record.detail == {"as_uri": A, "as_uris": [A, B, C]}
    bundle = blank.enroll("consumer", CONSUMER)
    assert (bundle["as_uri"], bundle["as_uris"]) == (A, [A, B, C])
    loaded = Bundle.load(blank.state.parent / f"{CONSUMER}.json")
    assert (loaded.as_uri, loaded.as_uris) == (A, (A, B, C))
    # enroll's own --as-uri repeats too, and overrides the list for that bundle only
    out = blank.state.parent / "other.json"
    blank.ok("enroll", "--role", "producer", "--id", PRODUCER, "--out", str(out), *uris(C, A))
    other = json.loads(out.read_text())
    blank.psks.add(other["psk_hex"])
    assert (other["as_uri"], other["as_uris"]) == (C, [C, A])
    assert blank.enroll("proxy", PROXY)["as_uris"] == [A, B, C]


@pytest.mark.parametrize(
    "listed",
    [
        [A, B, A],
        [A, A + "/"],  # the same AS, spelt with a slash
        [f"coaps://as{i}.example" for i in range(9)],
        [A, "coap://as-b.example"],
        [A, "coaps://@as-b.example"],  # an empty user part: no device would load its bundle
        ["coaps://:@as-b.example"],
    ],
)
def test_init_refuses_a_repeated_or_bad_list_of_as_instances(blank: Cli, listed: list[str]) -> None:
    result = blank.fail(2, "init", *uris(*listed))
    assert "--as-uri" in result.err
    assert not blank.state.exists()


def test_a_state_from_before_the_list_enrolls_with_its_one_as_uri(cli: Cli) -> None:
    with sqlite3.connect(cli.state / "as.db") as db:
        db.execute("DELETE FROM meta WHERE key = 'as_uris'")
    bundle = cli.enroll("consumer", CONSUMER)
    default = "coaps://127.0.0.1:5684"
    assert (bundle["as_uri"], bundle["as_uris"]) == (default, [default])


def test_set_as_uris_changes_the_list_of_bundles_enrolled_after(cli: Cli) -> None:
    first = cli.enroll("consumer", CONSUMER)
    path = cli.state.parent / f"{CONSUMER}.json"
    before = path.read_bytes()
    snapshot = cli.snapshot()
    cli.fail(2, "set-as-uris", *uris(B, B))
    cli.fail(2, "set-as-uris")
    assert cli.snapshot() == snapshot
    cli.ok("set-as-uris", *uris(B, A))
    assert path.read_bytes() == before  # a bundle issued before keeps its list
    assert first["as_uris"] == ["coaps://127.0.0.1:5684"]
    later = cli.enroll("consumer", OTHER)
    assert (later["as_uri"], later["as_uris"]) == (B, [B, A])
    records = cli.store(lambda s: s.audit_records())
    assert [(r.action, r.detail) for r in records if r.action == "set-as-uris"] == [
        ("set-as-uris", {"as_uris": [B, A]})
    ]
    assert cli.store(lambda s: s.verify_audit())[0]


def test_enroll_to_stdout(cli: Cli) -> None:
    result = cli.run("enroll", "--role", "proxy", "--id", PROXY, "--out", "-")
    assert result.code == 0
    bundle = json.loads(result.out)
    assert bundle["id"] == PROXY and len(bytes.fromhex(bundle["psk_hex"])) == 16
    assert bundle["psk_hex"] not in result.err and PROXY in result.err


def test_enroll_refuses_a_duplicate_id_and_writes_no_bundle(cli: Cli) -> None:
    cli.enroll("consumer", CONSUMER)
    before = cli.snapshot()
    out = cli.state.parent / "again.json"
    for role in ("consumer", "producer"):
        cli.fail(1, "enroll", "--role", role, "--id", CONSUMER, "--out", str(out))
        assert not out.exists()
    assert cli.snapshot() == before


@pytest.mark.parametrize("bad", BAD_IDS)
def test_enroll_refuses_a_bad_id_and_changes_nothing(cli: Cli, bad: str) -> None:
    before = cli.snapshot()
    out = cli.state.parent / "bad.json"
    result = cli.fail(2, "enroll", "--role", "consumer", f"--id={bad}", "--out", str(out))
    assert "device id" in result.err
    assert not out.exists()
    assert cli.snapshot() == before


def test_enroll_refuses_to_overwrite_unless_forced(cli: Cli) -> None:
    out = cli.state.parent / "taken.json"
    out.write_text("precious")
    out.chmod(0o644)
    before = cli.snapshot()
    cli.fail(2, "enroll", "--role", "consumer", "--id", CONSUMER, "--out", str(out))
    assert out.read_text() == "precious" and cli.snapshot() == before
    cli.fail(2, "enroll", "--role", "consumer", "--id", CONSUMER, "--out", "/nonexistent/x.json")
    assert cli.snapshot() == before
    cli.ok("enroll", "--role", "consumer", "--id", CONSUMER, "--out", str(out), "--force")
    cli.psks.add(json.loads(out.read_text())["psk_hex"])
    assert mode(out) == 0o600
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


# --- grants and revocation -----------------------------------------------------------------------


def test_grant_and_list(fleet: Cli) -> None:
    fleet.ok("grant", "--consumer", CONSUMER, "--resource", "sensor-1/*")
    fleet.ok("grant", "--consumer", OTHER, "--resource", RID, "--until", "2100-01-01T00:00:00Z")
    fleet.ok("grant", "--consumer", OTHER, "--resource", "sensor-1/hum*", "--until", "4102444800")
    grants = json.loads(fleet.ok("grants", "--json").out)
    assert [(g["consumer_id"], g["pattern"], g["until"], g["status"]) for g in grants] == [
        (CONSUMER, "sensor-1/*", None, "active"),
        (OTHER, RID, 4102444800, "active"),
        (OTHER, "sensor-1/hum*", 4102444800, "active"),
    ]
    text = fleet.ok("grants", "--consumer", OTHER).out
    assert RID in text and "2100-01-01T00:00:00Z" in text and CONSUMER not in text
    now = int(time.time())
    assert fleet.store(lambda s: s.may_read(CONSUMER, RID2, 1, now))
    assert not fleet.store(lambda s: s.may_read(OTHER, "sensor-1/other", 1, now))


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_grant_refuses_a_bad_pattern(fleet: Cli, pattern: str) -> None:
    before = fleet.snapshot()
    result = fleet.fail(2, "grant", "--consumer", CONSUMER, "--resource", pattern)
    assert "pattern" in result.err
    assert fleet.snapshot() == before


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--consumer", "'; DROP TABLE grants; --", "--resource", "sensor-1/*"], 2),
        (["--consumer", CONSUMER, "--resource", "sensor-1/*", "--until", "1000000000"], 2),
        (["--consumer", CONSUMER, "--resource", "sensor-1/*", "--until", "2030-01-01"], 2),
        (["--consumer", CONSUMER, "--resource", "sensor-1/*", "--until", "tomorrow"], 2),
        (["--consumer", CONSUMER, "--resource", "sensor-1/*", "--until", "-5"], 2),
        (["--consumer", PRODUCER, "--resource", "sensor-1/*"], 1),
        (["--consumer", PROXY, "--resource", "sensor-1/*"], 1),
        (["--consumer", "nobody", "--resource", "sensor-1/*"], 1),
        (["--consumer", CONSUMER], 2),
    ],
)
def test_grant_refusals(fleet: Cli, argv: list[str], code: int) -> None:
    before = fleet.snapshot()
    fleet.fail(code, "grant", *argv)
    assert fleet.snapshot() == before


def test_revoke_a_grant_rotates_and_excludes(fleet: Cli) -> None:
    fleet.ok("grant", "--consumer", CONSUMER, "--resource", "sensor-1/*")
    fleet.ok("grant", "--consumer", OTHER, "--resource", "sensor-1/*")
    result = fleet.ok("revoke", "--consumer", CONSUMER, "--resource", "sensor-1/*")
    assert RID in result.out and RID2 in result.out
    assert fleet.epochs(RID) == [(1, "deactivated"), (2, "active"), (3, "pre-active")]
    now = int(time.time())
    assert fleet.store(lambda s: s.may_read(CONSUMER, RID, 1, now - 1)) is False  # grant gone
    assert fleet.store(lambda s: s.may_read(OTHER, RID, 2, now))
    fleet.fail(1, "revoke", "--consumer", CONSUMER, "--resource", "sensor-1/*")
    fleet.fail(1, "revoke", "--consumer", CONSUMER)
    fleet.fail(1, "revoke", "--consumer", OTHER, "--resource", "sensor-1/other")
    # Granted again: back in only from a new epoch, never the ones sealed while shut out.
    result = fleet.ok("grant", "--consumer", CONSUMER, "--resource", RID)
    assert "rotated" in result.out and RID in result.out
    assert fleet.epochs(RID)[-2:] == [(3, "active"), (4, "pre-active")]


def test_revoke_a_device(fleet: Cli) -> None:
    fleet.ok("grant", "--consumer", CONSUMER, "--resource", "sensor-1/*")
    result = fleet.ok("revoke", "--device", CONSUMER)
    assert RID in result.out
    devices = {d["id"]: d for d in json.loads(fleet.ok("devices", "--json").out)}
    assert devices[CONSUMER]["status"] == "revoked" and devices[CONSUMER]["revoked_at"]
    assert devices[OTHER]["status"] == "active"
    assert CONSUMER not in fleet.store(lambda s: s.active_psks())
    result = fleet.ok("revoke", "--device", PROXY)
    assert "rotated: none" in result.out
    before = fleet.snapshot()
    fleet.fail(1, "revoke", "--device", CONSUMER)
    fleet.fail(1, "revoke", "--device", "nobody")
    fleet.fail(1, "grant", "--consumer", CONSUMER, "--resource", "sensor-1/*")
    fleet.fail(2, "revoke", "--device", "a/b")
    fleet.fail(2, "revoke", "--device", OTHER, "--resource", "sensor-1/*")
    fleet.fail(2, "revoke", "--device", OTHER, "--consumer", OTHER)
    fleet.fail(2, "revoke", "--resource", "sensor-1/*")
    assert fleet.snapshot() == before


# --- rotation, compromise, destruction -----------------------------------------------------------


def test_rotate_and_list_resources(fleet: Cli) -> None:
    assert "epoch 2 active" in fleet.ok("rotate", "--resource", RID).out
    assert "epoch 3 active" in fleet.ok("rotate", "--resource", RID).out
    text = fleet.ok("resources").out
    line = next(line for line in text.splitlines() if line.startswith(RID + " "))
    assert "1-2 deactivated, 3 active, 4 pre-active" in line and PRODUCER in line
    listing = {r["id"]: r for r in json.loads(fleet.ok("resources", "--json").out)}
    assert [(e["epoch"], e["state"]) for e in listing[RID]["epochs"]] == [
        (1, "deactivated"),
        (2, "deactivated"),
        (3, "active"),
        (4, "pre-active"),
    ]
    assert [(e["epoch"], e["state"]) for e in listing[RID2]["epochs"]] == [
        (1, "active"),
        (2, "pre-active"),
    ]
    assert "secret" not in json.dumps(listing)
    records = fleet.store(lambda s: s.audit_records())
    assert [(r.actor, r.detail["reason"]) for r in records if r.action == "rotate"] == [
        ("admin", "manual"),
        ("admin", "manual"),
    ]


def test_rotate_refusals(fleet: Cli) -> None:
    before = fleet.snapshot()
    fleet.fail(1, "rotate", "--resource", "sensor-1/nothing")
    fleet.fail(2, "rotate", "--resource", "sensor-1/../x")
    fleet.fail(2, "rotate", "--resource", "sensor-1/*")
    fleet.fail(2, "rotate")
    fleet.fail(2, "rotate", "--resource", RID, "--due")
    assert fleet.snapshot() == before


def test_rotate_due(fleet: Cli) -> None:
    assert "no rotation due" in fleet.ok("rotate", "--due").out
    fleet.register("sensor-1/old", rotation=60, at=int(time.time()) - 120)
    result = fleet.ok("rotate", "--due")
    assert "sensor-1/old: epoch 2 active" in result.out and RID not in result.out
    assert fleet.epochs("sensor-1/old")[1] == (2, "active")


def test_compromise(fleet: Cli) -> None:
    result = fleet.ok("compromise", "--resource", RID)
    assert "epoch 1 compromised; epoch 2 active" in result.out
    assert fleet.epochs(RID) == [(1, "compromised"), (2, "active"), (3, "pre-active")]
    result = fleet.ok("compromise", "--resource", RID, "--epoch", "3")
    assert "epoch 3 compromised; epoch 2 active" in result.out
    assert fleet.epochs(RID)[-1] == (4, "pre-active")
    before = fleet.snapshot()
    fleet.fail(1, "compromise", "--resource", RID, "--epoch", "1")
    fleet.fail(1, "compromise", "--resource", RID, "--epoch", "99")
    fleet.fail(1, "compromise", "--resource", "sensor-1/nothing")
    fleet.fail(2, "compromise", "--resource", RID, "--epoch", "0")
    fleet.fail(2, "compromise", "--resource", RID, "--epoch", "two")
    fleet.fail(2, "compromise", "--resource", "no-slash")
    assert fleet.snapshot() == before


def test_destroy(fleet: Cli) -> None:
    fleet.ok("rotate", "--resource", RID)
    assert "nothing to destroy" in fleet.ok("destroy", "--retention", "3600").out
    assert f"destroyed {RID} epoch 1" in fleet.ok("destroy", "--retention", "0").out
    assert fleet.epochs(RID)[0] == (1, "destroyed")
    epoch = fleet.store(lambda s: s.epoch(RID, 1, with_secret=True))
    assert epoch is not None and epoch.secret is None
    fleet.fail(2, "destroy", "--retention", "-1")
    fleet.fail(2, "destroy")


# --- audit ---------------------------------------------------------------------------------------


def tamper(state: Path, *statements: str) -> None:
    """Edit the database as an attacker with file access would: triggers are no obstacle."""
    db = sqlite3.connect(state / "as.db")
    try:
        db.execute("DROP TRIGGER IF EXISTS audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


@pytest.fixture
def audited(fleet: Cli) -> Cli:
    fleet.ok("grant", "--consumer", CONSUMER, "--resource", "sensor-1/*")
    fleet.ok("revoke", "--consumer", CONSUMER)
    return fleet


def test_audit_lists_records(audited: Cli) -> None:
    lines = audited.ok("audit").out.splitlines()
    actions = [line.split()[3] for line in lines]
    assert actions[:5] == ["init", "enroll", "enroll", "enroll", "enroll"]
    assert actions[-3:] == ["register", "grant", "revoke-grant"]
    assert [int(line.split()[0]) for line in lines] == list(range(1, len(lines) + 1))
    records = json.loads(audited.ok("audit", "--json").out)
    assert [r["action"] for r in records] == actions
    assert records[-1]["detail"]["rotated"] == [RID2, RID]
    since = json.loads(audited.ok("audit", "--json", "--since", str(len(lines) - 2)).out)
    assert [r["seq"] for r in since] == [len(lines) - 1, len(lines)]
    assert f"{len(lines)} records, chain intact" in audited.ok("audit", "--verify").out


def test_audit_verify_detects_an_edited_record(audited: Cli) -> None:
    tamper(audited.state, 'UPDATE audit SET detail = \'{"role":"producer"}\' WHERE seq = 3')
    result = audited.fail(1, "audit", "--verify")
    assert "record 3 was altered" in result.err


def test_audit_verify_detects_a_deleted_record(audited: Cli) -> None:
    tamper(audited.state, "DELETE FROM audit WHERE seq = 4")
    assert "record 4 is missing" in audited.fail(1, "audit", "--verify").err


def test_audit_verify_detects_a_deleted_last_record(audited: Cli) -> None:
    tamper(audited.state, "DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)")
    assert "removed" in audited.fail(1, "audit", "--verify").err


def test_audit_head_recorded_elsewhere_detects_a_consistent_cut(audited: Cli) -> None:
    head = audited.ok("audit", "--head").out.strip()
    seq, chain = head.split(":")
    assert int(seq) > 3 and len(chain) == 64
    assert "chain intact" in audited.ok("audit", "--verify", "--expect", head).out
    # Cut the last two records and make the stored head agree, as a thief with the file would.
    cut = int(seq) - 2
    db = sqlite3.connect(audited.state / "as.db")
    chain_at_cut = db.execute("SELECT chain FROM audit WHERE seq = ?", (cut,)).fetchone()[0]
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute("DELETE FROM audit WHERE seq > ?", (cut,))
    db.execute(
        "UPDATE meta SET value = ? WHERE key = 'audit_head'",
        (cbor.dumps([cut, bytes(chain_at_cut)]),),
    )
    db.commit()
    db.close()
    audited.ok("audit", "--verify")  # consistent on its own ...
    result = audited.fail(1, "audit", "--verify", "--expect", head)  # ... not against the head
    assert "recorded head" in result.err
    audited.fail(2, "audit", "--verify", "--expect", "12:zz")
    audited.fail(2, "audit", "--expect", head)  # --expect goes with --verify


def test_audit_triggers_guard_against_plain_edits(audited: Cli) -> None:
    db = sqlite3.connect(audited.state / "as.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit WHERE seq = 1")
    db.close()
    audited.ok("audit", "--verify")


def test_audit_prune_keeps_the_chain_verifiable(audited: Cli) -> None:
    head = audited.ok("audit", "--head").out.strip()
    count = len(audited.ok("audit").out.splitlines())
    # Every record so far is dated now: a date an hour ago prunes nothing.
    hour_ago = str(int(time.time()) - 3600)
    assert "nothing to prune" in audited.ok("audit", "prune", "--before", hour_ago).out
    time.sleep(1.1)  # records are dated in whole seconds
    out = audited.ok("audit", "prune", "--before", str(int(time.time()))).out
    assert f"pruned the records up to {count} " in out and f"{count} deleted now" in out
    lines = audited.ok("audit").out.splitlines()
    assert len(lines) == 1 and " admin prune audit ok " in lines[0]
    verified = audited.ok("audit", "--verify").out
    assert f"1 records after the checkpoint at record {count}, chain intact" in verified
    assert "chain intact" in audited.ok("audit", "--verify", "--expect", head).out  # the checkpoint
    tamper(audited.state, "UPDATE audit SET detail = '{}'")
    assert "was altered" in audited.fail(1, "audit", "--verify").err
    assert "nothing to prune" in audited.ok("audit", "prune", "--older-than", "1").out


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "prune"],
        ["audit", "prune", "--before", "2999-01-01T00:00:00Z"],  # in the future
        ["audit", "prune", "--before", "yesterday"],
        ["audit", "prune", "--before", "1", "--older-than", "3"],
        ["audit", "prune", "--older-than", "0"],
        ["audit", "prune", "--before", "1", "--verify"],
        ["audit", "--before", "1"],
        ["audit", "purge"],
    ],
)
def test_audit_prune_refuses_bad_usage(audited: Cli, argv: list[str]) -> None:
    before = audited.ok("audit").out
    audited.fail(2, *argv)
    assert audited.ok("audit").out == before  # nothing changed


def test_serve_help_shows_every_default(blank: Cli) -> None:
    from authz_server.cli import SERVE_DEFAULTS
    from authz_server.server import ServeOptions

    # Every server option has its flag (one command line: python -m authz_server.server is gone).
    assert dataclasses.asdict(ServeOptions()) == SERVE_DEFAULTS
    parser = main_parser_actions("serve")
    for action in parser:
        if action.dest != "help":
            assert action.help and "(default: " in action.help, action.dest
    text = blank.ok("serve", "--help", state=False).out
    for flag, value in SERVE_DEFAULTS.items():
        assert f"(default: {value})" in text, flag
        assert f"--{flag.replace('_', '-')}" in text, flag


def main_parser_actions(command: str) -> list[argparse.Action]:
    from authz_server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices[command]._actions)


# --- the state directory -------------------------------------------------------------------------

READERS = [
    ["devices"],
    ["audit", "--verify"],
    ["resources", "--json"],
    ["grant", "--consumer", CONSUMER, "--resource", "sensor-1/*"],
    ["enroll", "--role", "consumer", "--id", "new-1", "--out", "-"],
]


@pytest.mark.parametrize("argv", READERS)
def test_missing_state(blank: Cli, argv: list[str]) -> None:
    assert "oscar-as init" in blank.fail(2, *argv).err


def test_enroll_into_a_missing_state_leaves_no_file(blank: Cli) -> None:
    out = blank.state.parent / "bundle.json"
    blank.fail(2, "enroll", "--role", "consumer", "--id", CONSUMER, "--out", str(out))
    assert not out.exists()


@pytest.mark.parametrize("argv", READERS)
def test_wrong_master_key(fleet: Cli, argv: list[str]) -> None:
    key = fleet.state / "master.key"
    key.write_bytes(bytes(32))
    assert "master key" in fleet.fail(2, *argv).err


@pytest.mark.parametrize("argv", READERS)
def test_exposed_or_missing_master_key(fleet: Cli, argv: list[str]) -> None:
    key = fleet.state / "master.key"
    key.chmod(0o644)
    assert "0600" in fleet.fail(2, *argv).err
    key.unlink()
    assert "master key" in fleet.fail(2, *argv).err


@pytest.mark.parametrize("argv", READERS)
def test_corrupt_database(fleet: Cli, argv: list[str]) -> None:
    for suffix in ("-wal", "-shm"):
        (fleet.state / f"as.db{suffix}").unlink(missing_ok=True)
    (fleet.state / "as.db").write_bytes(os.urandom(8192))
    assert "unusable" in fleet.fail(2, *argv).err


# --- serve, help, entry point --------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen",
    [
        "127.0.0.1",
        "127.0.0.1:",
        ":5684",
        "127.0.0.1:0",
        "127.0.0.1:1",
        "127.0.0.1:65536",
        "h:x",
        "::1:5684",
        "0.0.0.0:5684",
        "[::]:5684",
        "[::1:5684",
    ],
)
def test_serve_refuses_a_bad_listen_address(cli: Cli, listen: str) -> None:
    assert "--listen" in cli.fail(2, "serve", "--listen", listen).err


@pytest.mark.parametrize(
    "option",
    [
        ["--rate", "0"],
        ["--burst", "-1"],
        ["--max-connections", "x"],
        ["--log-level", "loud"],
        ["--retention", "-5"],
        ["--tick", "0"],
        ["--crl-validity", "0"],
        ["--audit-prune-every", "0"],
    ],
)
def test_serve_refuses_bad_options(cli: Cli, option: list[str]) -> None:
    cli.fail(2, "serve", "--listen", "127.0.0.1:5684", *option)


def test_serve_refuses_a_missing_state_before_starting(blank: Cli) -> None:
    blank.fail(2, "serve", "--listen", "127.0.0.1:5684")


@dataclass(frozen=True)
class FakeOptions:
    retention: int = 86_400
    rate: float = 20.0
    burst: int = 40
    max_connections: int = 1000
    tick: float = 1.0
    crl_validity: int = 3600


@dataclass
class FakeServer:
    """Stands in for ``authz_server.server``: records its call, signals itself, waits for stop."""

    signum: int = signal.SIGTERM
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    tune_gc: list[object] = field(default_factory=list)

    async def serve(self, state_dir: Path, host: str, port: int, options: Any, **kw: Any) -> None:
        self.calls.append((state_dir, host, port, options))
        self.tune_gc.append(kw.get("tune_gc"))
        logging.getLogger("authz_server.server").info("listening on %s:%d", host, port)
        os.kill(os.getpid(), self.signum)
        await asyncio.wait_for(kw["stop"].wait(), 10)


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    fake = FakeServer()
    module = types.ModuleType("authz_server.server")
    module.ServeOptions = FakeOptions  # type: ignore[attr-defined]
    module.serve = fake.serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "authz_server.server", module)
    # serve configures the root logger with force=True, which would close pytest's own handlers.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = []
    yield fake
    # aiosqlite's worker thread logs one debug line after close() has returned: let it finish
    # before the handler's stream (this test's capture) goes away.
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(10)
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_runs_the_server_until_a_signal(
    cli: Cli, fake_server: FakeServer, signum: int
) -> None:
    fake_server.signum = signum
    argv = ["serve", "--listen", "[::1]:6000", "--rate", "2.5", "--burst", "7", "--log-json"]
    result = cli.run(*argv)
    assert result.code == 0 and result.out == ""
    assert fake_server.calls == [(cli.state, "::1", 6000, FakeOptions(rate=2.5, burst=7))]
    assert fake_server.tune_gc == [True]  # the daemon tunes its garbage collector (issue 7)
    entry = json.loads(result.err)
    assert entry["message"] == "listening on ::1:6000" and entry["level"] == "info"


def test_serve_logs_plain_lines_at_the_chosen_level(cli: Cli, fake_server: FakeServer) -> None:
    result = cli.run("serve", "--listen", "localhost:5684", "--log-level", "WARNING")
    assert result.code == 0 and result.err == ""
    result = cli.run("serve", "--listen", "localhost:5684", "--log-level", "debug")
    assert result.code == 0 and re.search(r" INFO authz_server.server: listening on ", result.err)


COMMANDS = ["init", "enroll", "serve", "grant", "revoke", "rotate", "compromise", "destroy"]
COMMANDS += ["devices", "resources", "grants", "audit", "migrate", "set-as-uris"]


@pytest.mark.parametrize("command", [*COMMANDS, None])
def test_help(blank: Cli, command: str | None) -> None:
    result = blank.ok(*([command] if command else []), "--help", state=False)
    assert result.out.startswith("usage: oscar-as")


def test_usage_errors_are_one_line_and_never_echo_a_secret(cli: Cli) -> None:
    secret = "00112233445566778899aabbccddeeff"
    for argv in (
        ["enroll", "--role", "consumer", "--id", "x", "--out", "-", "--psk", secret],
        ["enroll", "--role", "king", "--id", "x", "--out", "-"],
        ["frobnicate"],
        ["devices", secret],
    ):
        result = cli.fail(2, *argv)
        assert secret not in result.err
    cli.fail(2, state=False)


def test_listings_of_an_empty_state(cli: Cli) -> None:
    assert cli.ok("devices").out.split() == ["ID", "ROLE", "STATUS", "ENROLLED_AT", "REVOKED_AT"]
    assert json.loads(cli.ok("resources", "--json").out) == []
    assert json.loads(cli.ok("grants", "--json").out) == []


def test_module_entry_point(tmp_path: Path) -> None:
    state = tmp_path / "state"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "authz_server", *argv, "--state", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert run("init").returncode == 0
    enrolled = run("enroll", "--role", "producer", "--id", PRODUCER, "--out", "-")
    assert enrolled.returncode == 0
    psk = json.loads(enrolled.stdout)["psk_hex"]
    assert psk not in enrolled.stderr
    listed = run("devices")
    assert listed.returncode == 0 and PRODUCER in listed.stdout and psk not in listed.stdout
    refused = run("enroll", "--role", "producer", "--id", PRODUCER, "--out", "-")
    assert refused.returncode == 1 and refused.stdout == ""
    assert ERROR_LINE.fullmatch(refused.stderr)
    (state / "as.db").write_bytes(b"garbage" * 1000)
    broken = run("devices")
    assert broken.returncode == 2 and ERROR_LINE.fullmatch(broken.stderr)


# --- the database chosen by URL (issue 15) -------------------------------------------------------


def test_init_records_a_postgresql_database_and_every_command_uses_it(
    blank: Cli, pg_database: str
) -> None:
    result = blank.ok("init", "--database", pg_database)
    assert pg_database in result.out and not (blank.state / "as.db").exists()
    assert (blank.state / "database.url").read_text().strip() == pg_database
    assert stat.S_IMODE((blank.state / "database.url").stat().st_mode) == 0o600
    blank.enroll("producer", "sensor-1")
    blank.enroll("consumer", "phone-1")
    blank.register("sensor-1/temperature")
    blank.ok("grant", "--consumer", "phone-1", "--resource", "sensor-1/*")
    listed = json.loads(blank.ok("devices", "--json").out)
    assert [d["id"] for d in listed] == ["phone-1", "sensor-1"]
    assert "chain intact" in blank.ok("audit", "--verify").out
    # --database overrides what the directory records: another (empty) database has no AS.
    other = pg_database.rsplit("/", 1)[0] + "/postgres"
    assert "no AS database" in blank.fail(2, "devices", "--database", other).err
    # A second init on the same database, from another directory, is refused.
    again = Cli(blank.capsys, blank.state.parent / "again")
    assert "holds an AS already" in again.fail(1, "init", "--database", pg_database).err


def test_a_bad_database_url_is_refused_by_init(blank: Cli) -> None:
    blank.fail(2, "init", "--database", "mysql://root@127.0.0.1/as")
    assert not blank.state.exists() or not any(blank.state.iterdir())
