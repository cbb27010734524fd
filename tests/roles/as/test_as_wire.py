"""The AS writes its wire shapes with the schema its clients read (:mod:`oscar_io.aswire`), and
the bytes are those of the shape written out by hand before (issue 14): ``/keys`` replies, the
content format, the roles and the PSK length all come from one place."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from authz_server import messages
from authz_server.api import Endpoints
from authz_server.ca import CertificateAuthority, init_state
from authz_server.messages import Request
from authz_server.store import Resource, Store, schema
from oscar import cbor
from oscar_io import aswire, bundle

NOW = 1_800_000_000
PRODUCER = "sensor-1"
RID = "sensor-1/temperature"


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await init_state(tmp_path / "state", as_uri="coaps://127.0.0.1:5684", now=NOW)
    await s.add_device(PRODUCER, "producer", os.urandom(16), NOW)
    await s.register_resource(Resource(RID, PRODUCER, 0, "ccm-es256", 60, 3600, NOW))
    yield s
    await s.close()


def hand_written_keys_reply(resource: Resource, active: object, upcoming: object) -> bytes:
    """The ``/keys`` reply as the AS wrote it before it used :class:`aswire.KeyState`."""
    return cbor.dumps(
        {
            "resource": resource.id,
            "profile": resource.profile,
            "rotation_period": resource.rotation_period,
            "active": {
                "epoch": active.epoch,  # type: ignore[attr-defined]
                "secret": active.secret,  # type: ignore[attr-defined]
                "activated_at": active.activated_at,  # type: ignore[attr-defined]
            },
            "next": {"epoch": upcoming.epoch, "secret": upcoming.secret},  # type: ignore[attr-defined]
        }
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("rotations", [0, 1, 3])
async def test_keys_reply_is_byte_identical_to_the_hand_written_shape(
    store: Store, rotations: int
) -> None:
    for i in range(rotations):
        await store.rotate(RID, NOW + 1 + i, actor="admin", reason="manual")
    api = Endpoints(store, await CertificateAuthority.load(store), clock=lambda: NOW + 10)
    reply = await api.handle(Request(PRODUCER, "GET", ("keys",), (f"r={RID}",)))
    resource = await store.resource(RID)
    active = await store.epoch(RID, with_secret=True)
    upcoming = await store.epoch(RID, active.epoch + 1, with_secret=True)  # type: ignore[union-attr]
    assert resource is not None and active is not None and upcoming is not None
    assert reply.payload == hand_written_keys_reply(resource, active, upcoming)
    assert reply.content_format == aswire.CBOR_FORMAT == 60
    # The client's parser reads it back to the same bytes.
    state = aswire.KeyState.from_cbor(cbor.loads(reply.payload))
    assert cbor.dumps(state.to_cbor()) == reply.payload
    assert state.active.epoch == 1 + rotations and state.next is not None


def test_shared_constants_are_the_runtime_s() -> None:
    assert messages.CBOR_FORMAT is aswire.CBOR_FORMAT
    assert schema.ROLES is bundle.ROLES
    from authz_server import envelope

    assert envelope.LINK_PSK_LENGTH is bundle.LINK_PSK_LENGTH
