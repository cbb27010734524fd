"""A resource's parts in the AS store, on SQLite and PostgreSQL (``backing``): declaration, each
encrypted part's own secrets (encrypted at rest), grants of one part, and revocation of one
audience rotating only what it could read (issue 19, "plain and partial access").
"""

from __future__ import annotations

import os
import re

import pytest
import pytest_asyncio
from pg_harness import Backing

from authz_server.ca import init_state
from authz_server.store import Conflict, NoSuchRecord, Resource, Store

NOW = 1_800_000_000
RID = "sensor-1/vitals"
OTHER_RID = "sensor-1/other"
PARTS = [("summary", "plain"), ("measurements", "encrypted"), ("location", "encrypted")]


@pytest_asyncio.fixture
async def store(backing: Backing) -> Store:
    s = await init_state(
        backing.state, as_uri="coaps://127.0.0.1:5684", now=NOW, database=backing.database
    )
    await s.add_device("sensor-1", "producer", os.urandom(16), NOW)
    for consumer in ("clinician", "operator", "both"):
        await s.add_device(consumer, "consumer", os.urandom(16), NOW)
    resource = Resource(RID, "sensor-1", 0, "ccm-es256", 60, 3600, NOW)  # rotated hourly
    await s.parts.register_resource(resource, PARTS)
    yield s
    await s.close()


def live(epochs: list, part: str) -> dict[str, int]:
    return {
        e.state: e.epoch for e in epochs if e.part == part and e.state in ("active", "pre-active")
    }


async def readable(store: Store, consumer: str, part: str, epoch: int | None = None) -> bool:
    view = await store.parts.view(consumer, RID, part, epoch, NOW + 100)
    return view.readable and view.epoch is not None


@pytest.mark.asyncio
async def test_declared_parts_have_their_own_secrets_encrypted_at_rest(
    store: Store, backing: Backing
) -> None:
    assert await store.parts.parts(RID) == PARTS
    epochs = await store.parts.live_epochs(RID)
    # Only the encrypted parts have epochs: 1 active and 2 pre-active, each its own secret.
    assert {(e.part, e.epoch, e.state) for e in epochs} == {
        ("location", 1, "active"), ("location", 2, "pre-active"),
        ("measurements", 1, "active"), ("measurements", 2, "pre-active"),
    }  # fmt: skip
    secrets = [e.secret for e in epochs]
    assert all(s is not None and len(s) == 32 for s in secrets) and len(set(secrets)) == 4
    resource_secret = (await store.epoch(RID, 1, with_secret=True)).secret  # type: ignore[union-attr]
    assert resource_secret not in secrets
    raw = await backing.raw_bytes()
    assert not any(s in raw for s in secrets if s)  # only through the envelope
    assert all(s.hex() not in repr(e) for e, s in zip(epochs, secrets, strict=True) if s)
    records = [(r.action, r.subject, r.detail) for r in await store.audit_records()]
    assert ("declare-parts", RID, {"parts": [list(p) for p in PARTS]}) in records
    assert not any(s.hex() in repr(records) for s in secrets if s)


@pytest.mark.asyncio
async def test_bad_declarations_change_nothing(store: Store) -> None:
    await store.register_resource(Resource(OTHER_RID, "sensor-1", 0, "ccm-es256", 60, 0, NOW))
    before = await store.changes()
    for bad in (
        [],
        [("summary", "plain")],  # no encrypted part
        [("a", "encrypted"), ("a", "plain")],  # twice
        [("-a", "encrypted")],
        [("a", "secret")],
        [(f"p{i}", "encrypted") for i in range(17)],
    ):
        with pytest.raises(ValueError):
            await store.parts.declare(OTHER_RID, bad, NOW, actor="admin")
    with pytest.raises(Conflict):  # declared already
        await store.parts.declare(RID, [("x", "encrypted")], NOW, actor="admin")
    with pytest.raises(NoSuchRecord):
        await store.parts.declare("sensor-1/none", [("x", "encrypted")], NOW, actor="admin")
    with pytest.raises(Conflict):  # the resource exists: no half registration
        await store.parts.register_resource(
            Resource(RID, "sensor-1", 0, "ccm-es256", 60, 0, NOW), [("x", "encrypted")]
        )
    assert await store.changes() == before and await store.parts.parts(OTHER_RID) == []
    await store.parts.declare(OTHER_RID, [("x", "encrypted")], NOW, actor="admin")
    assert await store.parts.parts(OTHER_RID) == [("x", "encrypted")]


@pytest.mark.asyncio
async def test_a_part_grant_reads_that_part_only_and_a_whole_grant_reads_every_part(
    store: Store,
) -> None:
    await store.parts.grant("clinician", RID, "measurements", NOW)
    await store.add_grant("both", "sensor-1/*", None, NOW)
    assert await readable(store, "clinician", "measurements")
    assert not await readable(store, "clinician", "location")
    assert not await readable(store, "operator", "measurements")
    assert await readable(store, "both", "measurements")
    assert await readable(store, "both", "location")
    view = await store.parts.view("clinician", RID, "measurements", None, NOW)
    assert view.epoch is not None and view.epoch.epoch == 1 and view.epoch.secret
    secret = {e.part: e.secret for e in await store.parts.live_epochs(RID) if e.epoch == 1}
    assert view.epoch.secret == secret["measurements"]
    # A plain part or an unknown one has no secret; a granted twice part is a conflict.
    plain = await store.parts.view("both", RID, "summary", None, NOW)
    assert plain.kind == "plain" and plain.epoch is None
    assert (await store.parts.view("both", RID, "nope", None, NOW)).kind is None
    with pytest.raises(Conflict):
        await store.parts.grant("clinician", RID, "measurements", NOW)
    with pytest.raises(NoSuchRecord):
        await store.parts.grant("clinician", RID, "summary", NOW)
    with pytest.raises(Conflict):
        await store.parts.grant("sensor-1", RID, "location", NOW)  # a producer
    assert [g[:3] for g in await store.parts.grants()] == [("clinician", RID, "measurements")]


@pytest.mark.asyncio
async def test_revoking_one_part_rotates_only_that_part(store: Store) -> None:
    await store.parts.grant("clinician", RID, "measurements", NOW)
    await store.parts.grant("operator", RID, "location", NOW)
    resource_epoch = (await store.epoch(RID)).epoch  # type: ignore[union-attr]
    assert await store.parts.revoke("clinician", RID, "measurements", NOW + 10)
    epochs = await store.parts.live_epochs(RID)
    assert live(epochs, "measurements") == {"active": 2, "pre-active": 3}
    assert live(epochs, "location") == {"active": 1, "pre-active": 2}  # untouched
    assert (await store.epoch(RID)).epoch == resource_epoch  # type: ignore[union-attr]
    assert not await readable(store, "clinician", "measurements")
    assert await readable(store, "operator", "location")
    with pytest.raises(NoSuchRecord):
        await store.parts.revoke("clinician", RID, "measurements", NOW + 11)
    # Granted again: in only from a new epoch; what was sealed while it was out stays shut.
    assert await store.parts.grant("clinician", RID, "measurements", NOW + 20)
    assert live(await store.parts.live_epochs(RID), "measurements") == {
        "active": 3, "pre-active": 4,
    }  # fmt: skip
    assert await readable(store, "clinician", "measurements", 3)
    assert await readable(store, "clinician", "measurements", 1)  # from before it was out
    assert not await readable(store, "clinician", "measurements", 2)
    records = [(r.action, r.subject, r.detail) for r in await store.audit_records()]
    detail = {"resource": RID, "part": "measurements", "rotated": ["measurements"]}
    assert ("revoke-part", "clinician", detail) in records


@pytest.mark.asyncio
async def test_revoking_a_whole_grant_spares_the_parts_still_granted(store: Store) -> None:
    await store.add_grant("both", RID, None, NOW)
    await store.parts.grant("both", RID, "location", NOW)
    rotated = await store.revoke_grants("both", RID, NOW + 10)
    assert rotated == [RID, f"{RID}#measurements"]
    epochs = await store.parts.live_epochs(RID)
    assert live(epochs, "measurements")["active"] == 2 and live(epochs, "location")["active"] == 1
    assert not await readable(store, "both", "measurements")
    assert await readable(store, "both", "location")
    # Revoking the device ends its part grants too: location rotates now.
    await store.revoke_device("both", NOW + 20)
    assert live(await store.parts.live_epochs(RID), "location")["active"] == 2
    assert [g[4] for g in await store.parts.grants("both")] == [NOW + 20]


@pytest.mark.asyncio
async def test_a_whole_grant_again_readmits_to_the_parts(store: Store) -> None:
    await store.add_grant("both", "sensor-1/*", None, NOW)
    await store.revoke_grants("both", None, NOW + 10)
    assert not await readable(store, "both", "location")
    rotated = await store.add_grant("both", "sensor-1/*", None, NOW + 20)
    assert set(rotated) == {RID, f"{RID}#location", f"{RID}#measurements"}
    assert await readable(store, "both", "location")
    assert not await readable(store, "both", "location", 2)  # sealed while it was out


def test_the_parts_statements_exist_in_both_dialects_and_are_parameterized() -> None:
    from dataclasses import fields

    from authz_server.store import parts_sql, postgres, sqlite

    assert parts_sql.of(sqlite) is parts_sql.SQLITE and parts_sql.of(postgres) is parts_sql.POSTGRES
    for f in fields(parts_sql.PartsSql):
        lite, pg = getattr(parts_sql.SQLITE, f.name), getattr(parts_sql.POSTGRES, f.name)
        assert "?" not in pg and ("$1" in pg) == ("?" in lite or ":" in lite), f.name
        named = re.search(r"(?<![:\w]):[a-z]", lite) is not None
        assert isinstance(pg, postgres.Named) == named, f.name


@pytest.mark.asyncio
async def test_retired_part_epochs_are_destroyed_past_the_retention(
    store: Store, backing: Backing
) -> None:
    await store.parts.grant("clinician", RID, "measurements", NOW)
    old = next(e.secret for e in await store.parts.live_epochs(RID) if e.part == "measurements")
    assert old is not None
    await store.parts.revoke("clinician", RID, "measurements", NOW + 10)  # epoch 1 deactivated
    assert await store.destroy_expired(NOW + 15, 10) == []  # not yet
    assert await store.destroy_expired(NOW + 20, 10) == [(f"{RID}#measurements", 1)]
    states = {(e.part, e.epoch): e.state for e in await store.parts.epochs(RID)}
    assert states[("measurements", 1)] == "destroyed" and states[("location", 1)] == "active"
    view = await store.parts.view("sensor-1", RID, "measurements", 1, NOW + 20)
    assert view.epoch is not None and view.epoch.secret is None
    assert old not in await backing.raw_bytes()
    assert await store.destroy_expired(NOW + 30, 10) == []  # once


@pytest.mark.asyncio
async def test_a_revoked_producers_part_epochs_are_compromised(store: Store) -> None:
    await store.revoke_device("sensor-1", NOW + 5)
    states = {(e.part, e.epoch): e.state for e in await store.parts.epochs(RID)}
    assert set(states.values()) == {"compromised"} and len(states) == 4


@pytest.mark.asyncio
async def test_each_part_rotates_on_its_own_schedule(store: Store) -> None:
    assert await store.parts.due_rotations(NOW + 3599) == []
    assert await store.parts.due_rotations(NOW + 3600) == [(RID, "location"), (RID, "measurements")]
    # measurements rotates early (a revocation): its schedule starts again from then.
    await store.parts.grant("clinician", RID, "measurements", NOW)
    await store.parts.revoke("clinician", RID, "measurements", NOW + 1000)
    assert await store.parts.due_rotations(NOW + 3600) == [(RID, "location")]
    assert await store.parts.rotate_if_due(RID, "location", NOW + 3600) == 2
    assert await store.parts.rotate_if_due(RID, "location", NOW + 3600) is None  # once
    assert await store.parts.due_rotations(NOW + 4599) == []
    assert await store.parts.due_rotations(NOW + 4600) == [(RID, "measurements")]
    epochs = await store.parts.live_epochs(RID)
    assert live(epochs, "location") == {"active": 2, "pre-active": 3}
    assert live(epochs, "measurements") == {"active": 2, "pre-active": 3}
    records = [(r.action, r.detail) for r in await store.audit_records()]
    assert ("rotate", {"part": "location", "epoch": 2, "reason": "schedule"}) in records


@pytest.mark.asyncio
async def test_the_servers_duties_rotate_due_parts_and_destroy_retired_ones(store: Store) -> None:
    from authz_server.ca import CertificateAuthority
    from authz_server.server import ServeOptions, _Server

    server = _Server(store, await CertificateAuthority.load(store), ServeOptions(retention=60))
    assert await server.schedule(NOW + 3600)  # the resource and both parts rotate
    epochs = await store.parts.epochs(RID)
    assert {(e.part, e.epoch): e.state for e in epochs if e.epoch == 2} == {
        ("location", 2): "active", ("measurements", 2): "active",
    }  # fmt: skip
    assert await store.parts.due_rotations(NOW + 3600) == []
    assert await server.schedule(NOW + 3660)  # the parts' epochs 1: past the retention
    states = {(e.part, e.epoch): e.state for e in await store.parts.epochs(RID)}
    assert states[("location", 1)] == states[("measurements", 1)] == "destroyed"
    assert not await server.schedule(NOW + 3661)  # nothing left to do


@pytest.mark.asyncio
async def test_compromising_one_parts_epoch_moves_that_part_on_alone(store: Store) -> None:
    assert await store.parts.compromise(RID, "location", None, NOW + 1, actor="admin") == (1, 2)
    assert await store.parts.compromise(RID, "location", 3, NOW + 2, actor="admin") == (3, 2)
    states = {(e.part, e.epoch): e.state for e in await store.parts.epochs(RID)}
    assert [states[("location", n)] for n in (1, 2, 3, 4)] == [
        "compromised", "active", "compromised", "pre-active",
    ]  # fmt: skip
    assert live(await store.parts.live_epochs(RID), "measurements") == {
        "active": 1, "pre-active": 2,
    }  # fmt: skip
    with pytest.raises(Conflict):
        await store.parts.compromise(RID, "location", 1, NOW + 3, actor="admin")
    with pytest.raises(NoSuchRecord):
        await store.parts.compromise(RID, "location", 9, NOW + 3, actor="admin")
    with pytest.raises(NoSuchRecord):
        await store.parts.compromise(RID, "summary", None, NOW + 3, actor="admin")
    # A compromised epoch is still readable to those entitled, as a resource's is.
    await store.parts.grant("clinician", RID, "location", NOW + 4)
    assert await readable(store, "clinician", "location", 1)
