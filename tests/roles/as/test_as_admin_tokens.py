"""The admin console's parts of the AS store, on SQLite and PostgreSQL (``backing``): tokens
issued once, stored as a keyed hash only, one live token per name, expiry, revocation, audit;
shared by two stores (two AS instances) on one database; ``oscar-as admin-token`` on the command
line; and what the console's pages call beyond the CLI's methods (one resource's destruction, the
newest audit records, actions audited under the admin's name).
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import pytest_asyncio
from pg_harness import Backing

from authz_server.ca import init_state
from authz_server.cli import main
from authz_server.store import Conflict, NoSuchRecord, Resource, Store
from authz_server.store.admins import TOKEN_PREFIX

NOW = 1_800_000_000


@pytest_asyncio.fixture
async def store(backing: Backing) -> Store:
    s = await init_state(
        backing.state, as_uri="coaps://127.0.0.1:5684", now=NOW, database=backing.database
    )
    yield s
    await s.close()


@pytest.mark.asyncio
async def test_a_token_logs_its_admin_in_and_only_its_hash_is_stored(
    store: Store, backing: Backing
) -> None:
    token = await store.issue_admin_token("alice", NOW + 3600, NOW)
    assert token.startswith(TOKEN_PREFIX) and len(token) >= len(TOKEN_PREFIX) + 43
    admin = await store.admin_of_token(token, NOW + 1)
    assert admin is not None and admin.name == "alice" and admin.expires_at == NOW + 3600
    # Not the token nor any part of its random text is in the database.
    raw = await backing.raw_bytes()
    assert token.encode() not in raw and token[len(TOKEN_PREFIX) :].encode() not in raw
    assert store.admins.token_hash(token) in raw
    # Wrong, altered, malformed tokens: nobody.
    assert await store.admin_of_token(token[:-1] + ("A" if token[-1] != "A" else "B"), NOW) is None
    assert await store.admin_of_token("", NOW) is None
    assert await store.admin_of_token(TOKEN_PREFIX + "x" * 500, NOW) is None
    assert "alice" not in repr(store.admins) and token not in repr(admin)


@pytest.mark.asyncio
async def test_expiry_revocation_and_one_live_token_per_name(store: Store) -> None:
    token = await store.issue_admin_token("alice", NOW + 60, NOW)
    assert await store.admin_of_token(token, NOW + 59) is not None
    assert await store.admin_of_token(token, NOW + 60) is None  # expired
    with pytest.raises(ValueError):
        await store.issue_admin_token("bob", NOW - 1, NOW)
    for bad in ("", "a b", "<script>", "x" * 33, "-lead"):
        with pytest.raises(ValueError):
            await store.issue_admin_token(bad, None, NOW)
    bob = await store.issue_admin_token("bob", None, NOW)
    with pytest.raises(Conflict):
        await store.issue_admin_token("bob", None, NOW + 1)
    await store.revoke_admin_token("bob", NOW + 2)
    assert await store.admin_of_token(bob, NOW + 3) is None
    with pytest.raises(Conflict):
        await store.revoke_admin_token("bob", NOW + 3)
    with pytest.raises(NoSuchRecord):
        await store.revoke_admin_token("carol", NOW + 3)
    again = await store.issue_admin_token("bob", None, NOW + 4)  # a revoked name: a new token
    assert again != bob and await store.admin_of_token(bob, NOW + 5) is None
    assert (await store.admin_of_token(again, NOW + 5)).name == "bob"  # type: ignore[union-attr]
    # The expired alice may get a new token too.
    await store.issue_admin_token("alice", None, NOW + 61)
    status = {a.name: a.status(NOW + 62) for a in await store.admin_list()}
    assert status == {"alice": "active", "bob": "active"}
    records = [(r.actor, r.action, r.subject) for r in await store.audit_records()][1:]
    assert records == [
        ("admin", "admin-token", "alice"),
        ("admin", "admin-token", "bob"),
        ("admin", "revoke-admin-token", "bob"),
        ("admin", "admin-token", "bob"),
        ("admin", "admin-token", "alice"),
    ]
    assert all(again not in json.dumps(r.detail) for r in await store.audit_records())
    assert (await store.verify_audit())[0]


@pytest.mark.asyncio
async def test_two_instances_on_one_database_share_the_tokens(
    store: Store, backing: Backing
) -> None:
    other = await Store.open(backing.state, database=backing.database)
    try:
        token = await store.issue_admin_token("alice", None, NOW)
        assert (await other.admin_of_token(token, NOW)).name == "alice"  # type: ignore[union-attr]
        await other.revoke_admin_token("alice", NOW + 1, actor="admin:root")
        assert await store.admin_of_token(token, NOW + 2) is None
    finally:
        await other.close()
    last = (await store.recent_audit(limit=1))[0]
    assert (last.actor, last.action, last.subject) == ("admin:root", "revoke-admin-token", "alice")


@pytest.mark.asyncio
async def test_the_consoles_store_calls_are_audited_under_the_admins_name(
    store: Store, backing: Backing
) -> None:
    actor = "admin:alice"
    await store.add_device("sensor-1", "producer", bytes(16), NOW, actor=actor)
    await store.add_device("phone-1", "consumer", bytes(range(16)), NOW, actor=actor)
    rids = ("sensor-1/a", "sensor-1/b")
    await store.register_resources(
        [Resource(r, "sensor-1", 0, "ccm-es256", 60, 0, NOW) for r in rids]
    )
    await store.add_grant("phone-1", "sensor-1/*", None, NOW, actor=actor)
    await store.rotate(rids[0], NOW + 1, actor=actor, reason="console")
    await store.rotate(rids[1], NOW + 1, actor=actor, reason="console")
    await store.compromise(rids[0], None, NOW + 2, actor=actor)
    secret = (await store.epoch(rids[0], 1, with_secret=True)).secret  # type: ignore[union-attr]
    # One resource's retired epochs, now: the other resource's stay.
    assert await store.destroy_retired(rids[0], NOW + 3, actor=actor) == [1, 2]
    assert await store.destroy_retired(rids[0], NOW + 4, actor=actor) == []
    with pytest.raises(NoSuchRecord):
        await store.destroy_retired("sensor-1/none", NOW + 4, actor=actor)
    states = {r: [(e.epoch, e.state) for e in await store.epochs(r)] for r in rids}
    assert states[rids[0]] == [(1, "destroyed"), (2, "destroyed"), (3, "active"), (4, "pre-active")]
    assert states[rids[1]] == [(1, "deactivated"), (2, "active"), (3, "pre-active")]
    assert (await store.epoch(rids[0], 1, with_secret=True)).secret is None  # type: ignore[union-attr]
    assert secret is not None and secret not in await backing.raw_bytes()
    await store.revoke_grants("phone-1", "sensor-1/*", NOW + 5, actor=actor)
    await store.revoke_device("phone-1", NOW + 6, actor=actor)
    mine = [(r.action, r.subject) for r in await store.audit_records() if r.actor == actor]
    assert mine == [
        ("enroll", "sensor-1"), ("enroll", "phone-1"), ("grant", "phone-1"),
        ("rotate", rids[0]), ("rotate", rids[1]), ("compromise", rids[0]),
        ("destroy", rids[0]), ("destroy", rids[0]), ("revoke-grant", "phone-1"),
        ("revoke-device", "phone-1"),
    ]  # fmt: skip
    # The newest records first, a page at a time.
    everything = await store.audit_records()
    newest = await store.recent_audit(limit=3)
    assert [r.seq for r in newest] == [r.seq for r in everything[::-1][:3]]
    older = await store.recent_audit(newest[-1].seq - 1, 2)
    assert [r.seq for r in older] == [newest[-1].seq - 1, newest[-1].seq - 2]
    assert older[0] == everything[older[0].seq - 1]
    assert await store.recent_audit(0, 5) == []


def test_the_command_prints_the_token_once_lists_and_revokes(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(tmp_path / "state")
    assert main(["init", "--state", state]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "admin-token",
                "--state",
                state,
                "--name",
                "ops-1",
                "--expires",
                "2099-01-01T00:00:00Z",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith(TOKEN_PREFIX) and "\n" not in token and "ops-1" in err
    assert main(["admin-token", "--state", state, "--name", "ops-1"]) == 1  # live already
    assert "live token" in capsys.readouterr().err
    assert main(["admin-token", "--state", state, "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["status"]) for a in listed] == [("ops-1", "active")]
    assert token not in json.dumps(listed)
    assert main(["admin-token", "--state", state, "--revoke", "ops-1"]) == 0
    capsys.readouterr()
    assert main(["admin-token", "--state", state, "--list"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["admin-token", "--state", state, "--name", "x y"]) == 2
    assert main(["admin-token", "--state", state, "--name", "late", "--expires", "1000"]) == 2
    con = sqlite3.connect(tmp_path / "state" / "as.db")
    try:
        assert [r[0] for r in con.execute("SELECT name FROM admins")] == ["ops-1"]
    finally:
        con.close()
