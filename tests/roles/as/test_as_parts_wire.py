"""The AS endpoints of a resource's parts, in process over a real store on SQLite and PostgreSQL
(``backing``): ``POST /resources`` with parts, ``GET /secret?r=&p=[&e=]`` to the owner and to
consumers granted the part or the whole resource (4.03 otherwise), ``GET /keys`` carrying every
part's current and next secret, and a revocation of one audience seen on the wire.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiocoap.numbers.codes import Code
from pg_harness import Backing

from authz_server.api import BadRequest, Endpoints, Forbidden, NotFound
from authz_server.ca import CertificateAuthority, init_state
from authz_server.messages import Request
from authz_server.store import Store
from oscar import cbor

NOW = int(time.time())
RID = "sensor-1/vitals"
PARTS = [["summary", "plain"], ["measurements", "encrypted"], ["location", "encrypted"]]


@pytest_asyncio.fixture
async def store(backing: Backing) -> AsyncIterator[Store]:
    s = await init_state(
        backing.state, as_uri="coaps://127.0.0.1:5684", now=NOW, database=backing.database
    )
    await s.add_device("sensor-1", "producer", os.urandom(16), NOW)
    for consumer in ("clinician", "operator", "nobody"):
        await s.add_device(consumer, "consumer", os.urandom(16), NOW)
    await s.add_device("cloud-1", "proxy", os.urandom(16), NOW)
    yield s
    await s.close()


@pytest_asyncio.fixture
async def api(store: Store) -> Endpoints:
    api = Endpoints(store, await CertificateAuthority.load(store), clock=lambda: NOW)
    reply = await api.handle(register(PARTS))
    assert reply.code == Code.CREATED
    return api


def register(parts: Any, path: str = "vitals") -> Request:
    """``POST /resources`` of sensor-1/``path`` with these parts (None: no parts key)."""
    body = {"path": path, "content_format": 0, "profile": "ccm-es256", "max_age": 60}
    body |= {"rotation_period": 3600} | ({} if parts is None else {"parts": parts})
    return Request("sensor-1", "POST", ("resources",), (), cbor.dumps(body), 60)


async def secret(api: Endpoints, device: str, *query: str) -> dict[str, Any]:
    reply = await api.handle(Request(device, "GET", ("secret",), query))
    assert reply.code == Code.CONTENT
    doc: dict[str, Any] = cbor.loads(reply.payload)
    return doc


async def keys(api: Endpoints) -> dict[str, Any]:
    reply = await api.handle(Request("sensor-1", "GET", ("keys",), ("r=" + RID,)))
    assert reply.code == Code.CONTENT
    doc: dict[str, Any] = cbor.loads(reply.payload)
    return doc


@pytest.mark.asyncio
async def test_keys_carry_every_parts_current_and_next_secret(api: Endpoints, store: Store) -> None:
    doc = await keys(api)
    assert [(p["name"], p["kind"]) for p in doc["parts"]] == [tuple(p) for p in PARTS]
    assert doc["parts"][0] == {"name": "summary", "kind": "plain"}
    live = {(e.part, e.epoch): e.secret for e in await store.parts.live_epochs(RID)}
    for p in doc["parts"][1:]:
        assert (p["active"]["epoch"], p["next"]["epoch"]) == (1, 2)
        assert p["active"]["secret"] == live[(p["name"], 1)]
        assert p["next"]["secret"] == live[(p["name"], 2)]
        assert p["active"]["activated_at"] == NOW
    # The resource's own keys are there as before; a single-part resource has no "parts".
    assert doc["active"]["epoch"] == 1 and doc["next"]["epoch"] == 2
    reply = await api.handle(register(None, "single"))
    assert reply.code == Code.CREATED
    single = await api.handle(Request("sensor-1", "GET", ("keys",), ("r=sensor-1/single",)))
    assert "parts" not in cbor.loads(single.payload)
    # The /keys observers' fingerprint moves with a part's rotation.
    before = await api.key_fingerprint(RID)
    await store.parts.grant("clinician", RID, "location", NOW)
    await store.parts.revoke("clinician", RID, "location", NOW)
    assert await api.key_fingerprint(RID) != before
    assert (await keys(api))["parts"][2]["active"]["epoch"] == 2


@pytest.mark.asyncio
async def test_a_part_secret_goes_to_its_owner_and_to_the_consumers_granted_it(
    api: Endpoints, store: Store
) -> None:
    await store.parts.grant("clinician", RID, "measurements", NOW)
    await store.add_grant("operator", RID, None, NOW)
    live = {(e.part, e.epoch): e.secret for e in await store.parts.live_epochs(RID)}
    got = await secret(api, "clinician", "r=" + RID, "p=measurements")
    assert got == {
        "resource": RID, "part": "measurements", "epoch": 1, "state": "active",
        "secret": live[("measurements", 1)], "profile": "ccm-es256",
    }  # fmt: skip
    for part in ("measurements", "location"):  # a whole-resource grant: every part
        assert (await secret(api, "operator", "r=" + RID, "p=" + part))["secret"] == live[(part, 1)]
    # The owner: any live epoch, the pre-active one included.
    got = await secret(api, "sensor-1", "r=" + RID, "p=location", "e=2")
    assert got["secret"] == live[("location", 2)] and got["state"] == "pre-active"
    # Refused: another part, ungranted consumers (whether the part exists or not), a proxy,
    # the pre-active epoch to a consumer.
    for device, query in [
        ("clinician", ("r=" + RID, "p=location")),
        ("nobody", ("r=" + RID, "p=measurements")),
        ("nobody", ("r=" + RID, "p=nonexistent")),
        ("nobody", ("r=sensor-1/none", "p=measurements")),
        ("cloud-1", ("r=" + RID, "p=measurements")),
        ("clinician", ("r=" + RID, "p=measurements", "e=2")),
    ]:
        with pytest.raises(Forbidden):
            await api.handle(Request(device, "GET", ("secret",), query))
    for device, query in [  # may read the resource, but no such encrypted part or epoch
        ("operator", ("r=" + RID, "p=summary")),
        ("operator", ("r=" + RID, "p=nonexistent")),
        ("sensor-1", ("r=" + RID, "p=measurements", "e=9")),
    ]:
        with pytest.raises(NotFound):
            await api.handle(Request(device, "GET", ("secret",), query))
    for query in [("r=" + RID, "p=a b"), ("r=" + RID, "p="), ("r=" + RID, "p=x", "p=y")]:
        with pytest.raises(BadRequest):
            await api.handle(Request("clinician", "GET", ("secret",), query))
    # Each first delivery audited, never its secret.
    records = await store.audit_records()
    deliveries = [(r.actor, r.subject) for r in records if r.action == "secret"]
    assert ("clinician", f"{RID}#measurements") in deliveries
    assert not any(s.hex() in repr(records) for s in live.values() if s)


@pytest.mark.asyncio
async def test_revoking_one_audience_on_the_wire_leaves_the_other_parts_readable(
    api: Endpoints, store: Store
) -> None:
    await store.parts.grant("clinician", RID, "measurements", NOW)
    await store.parts.grant("operator", RID, "location", NOW)
    location = await secret(api, "operator", "r=" + RID, "p=location")
    await store.parts.revoke("clinician", RID, "measurements", NOW)
    with pytest.raises(Forbidden):
        await api.handle(Request("clinician", "GET", ("secret",), ("r=" + RID, "p=measurements")))
    assert await secret(api, "operator", "r=" + RID, "p=location") == location
    doc = await keys(api)
    assert doc["parts"][1]["active"]["epoch"] == 2 and doc["parts"][2]["active"]["epoch"] == 1


@pytest.mark.asyncio
async def test_bad_parts_at_registration_are_refused_and_register_nothing(
    api: Endpoints, store: Store
) -> None:
    before = await store.changes()
    for bad in (
        [],
        [["a", "plain"]],
        [["a", "encrypted"], ["a", "encrypted"]],
        [["a", "secret"]],
        [["a"]],
        "a=encrypted",
        [["a", 1]],
        [[f"p{i}", "encrypted"] for i in range(17)],
    ):
        with pytest.raises(BadRequest):
            await api.handle(register(bad, "other"))
    with pytest.raises(BadRequest):  # registered already, with other parts
        await api.handle(register([["x", "encrypted"]]))
    assert await store.changes() == before and await store.resource("sensor-1/other") is None
    again = await api.handle(register(PARTS))  # the same parts: as for any registered resource
    assert again.code == Code.CHANGED
    sixteen = [[f"p{i}", "encrypted"] for i in range(16)]
    assert (await api.handle(register(sixteen, "many"))).code == Code.CREATED


@pytest.mark.asyncio
async def test_a_late_part_rotation_happens_when_a_consumer_asks_for_the_next_epoch(
    api: Endpoints, store: Store
) -> None:
    await store.parts.grant("clinician", RID, "measurements", NOW)
    ask = Request("clinician", "GET", ("secret",), ("r=" + RID, "p=measurements", "e=2"))
    with pytest.raises(Forbidden):  # not due yet: the pre-active epoch stays shut
        await api.handle(ask)
    api.clock = lambda: NOW + 3600  # the producer's boundary passed; the scheduler is late
    got = cbor.loads((await api.handle(ask)).payload)
    assert (got["epoch"], got["state"]) == (2, "active")
    doc = await keys(api)
    assert doc["parts"][1]["active"]["epoch"] == 2 and doc["parts"][2]["active"]["epoch"] == 1
