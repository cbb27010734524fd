"""The AS's key endpoints: ``GET /secret`` (an epoch's access secret, to a consumer with a live
grant or to the owning producer; with ``p=`` an encrypted part's, see :mod:`.store.parts`) and
``GET /keys`` (a producer's active and pre-active epochs, its parts' too, the observable
resource), as functions of :class:`authz_server.api.Endpoints`.

A secret's first delivery to a device is audited, durably, before it leaves; the epochs' states are
KMIP's as the store keeps them. What this module does not do: routing, authentication of the DTLS
identity and the audit of refusals (:mod:`authz_server.api`), storage (:mod:`authz_server.store`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiocoap.numbers.codes import Code

from oscar import names
from oscar.keys import AccessSecret
from oscar.parts import is_part_name
from oscar_io.aswire import EpochKey, KeyState

from .messages import (
    ApiError,
    BadRequest,
    NotFound,
    Reply,
    Request,
    epoch_number,
    parse_query,
    resource_id_param,
)
from .store import DatabaseError, Device, Resource, StoreError
from .store.parts import ENCRYPTED
from .store.schema import ACTIVE, COMPROMISED, DEACTIVATED, PRE_ACTIVE, PartEpoch

if TYPE_CHECKING:
    from .api import Endpoints

__all__ = ["get_keys", "get_secret", "key_state", "part_secret", "part_states", "rotate_if_due"]

log = logging.getLogger("oscar.as")


# --- /secret ----------------------------------------------------------------------------------


async def get_secret(api: Endpoints, device: Device, request: Request, now: int) -> Reply:
    query = parse_query(request, ("r", "e", "p"))
    if "r" not in query:
        raise BadRequest(
            "GET /secret takes r=<resource id> and optionally e=<epoch>, p=<part name>"
        )
    resource_id = resource_id_param(query["r"])
    wanted = epoch_number(query["e"]) if "e" in query else None
    if "p" in query and not is_part_name(query["p"]):
        raise BadRequest("a part name is 1 to 32 characters of A-Z a-z 0-9 . _ -, first alnum")
    if device.role == "proxy":
        raise await api.deny(device, "secret", resource_id, "proxies get no secrets", now)
    owner = names.owns(device.id, resource_id)
    if device.role != "consumer" and not owner:
        raise await api.deny(device, "secret", resource_id, "not the owner", now)
    if "p" in query:
        return await part_secret(api, device, resource_id, query["p"], wanted, owner, now)
    view = await api.store.secret_view(device.id, resource_id, wanted, now)
    if not view.active:  # revoked since authenticate() found it active (Endpoints.known)
        raise await api.inactive(device.id, now)
    if (
        not owner
        and view.readable
        and view.epoch is not None
        and view.epoch.state == PRE_ACTIVE
        and await rotate_if_due(api, view.resource, view.epoch.epoch, now)
    ):
        view = await api.store.secret_view(device.id, resource_id, wanted, now)
        if not view.active:
            raise await api.inactive(device.id, now)
    resource, epoch = view.resource, view.epoch
    if owner:
        if resource is None or resource.producer_id != device.id or epoch is None:
            raise NotFound("no such resource or epoch")
    else:
        # A consumer learns nothing about resources it may not read, existing or not.
        if not view.readable:
            raise await api.deny(device, "secret", resource_id, "no grant for this epoch", now)
        if resource is None or epoch is None:
            raise NotFound("no such resource or epoch")
        if epoch.state == PRE_ACTIVE:
            raise await api.deny(device, "secret", resource_id, "epoch not active yet", now)
    if epoch.state not in (ACTIVE, PRE_ACTIVE, DEACTIVATED, COMPROMISED) or not epoch.secret:
        raise NotFound("the epoch is destroyed")
    delivery = (device.id, resource_id, epoch.epoch)
    if delivery not in api.delivered:
        # Audited (durably) before the secret leaves; later requests for it skip the disk.
        await api.store.record_delivery(device.id, resource_id, epoch.epoch, now)
        api.delivered.add(delivery)
    log.debug("secret of %s epoch %d to %s", resource_id, epoch.epoch, device.id)
    return Reply.cbor(
        Code.CONTENT,
        {
            "resource": resource_id,
            "epoch": epoch.epoch,
            "state": epoch.state,
            "secret": epoch.secret,
            "profile": resource.profile,
        },
    )


async def part_secret(
    api: Endpoints,
    device: Device,
    resource_id: str,
    part: str,
    wanted: int | None,
    owner: bool,
    now: int,
) -> Reply:
    """``GET /secret?r=&p=[&e=]``: an encrypted part's secret, to the owning producer (any epoch
    not destroyed) or to a consumer whose live grant (of the whole resource, or of this part)
    covers it and whom no exclusion of the part shuts out of that epoch (the active one by
    default; a pre-active one is refused, as for a resource's). A consumer that may not read
    it learns nothing more (4.03 whether the resource or part exists or not)."""
    view = await api.store.parts.view(device.id, resource_id, part, wanted, now)
    if not view.active:  # revoked since authenticate() found it active (Endpoints.known)
        raise await api.inactive(device.id, now)
    if not owner and view.readable and view.epoch is not None and view.epoch.state == PRE_ACTIVE:
        # The producer switched at the boundary by its own clock and the scheduler is late
        # (as rotate_if_due below, for a part): rotate if due, then look again.
        if await api.store.parts.rotate_if_due(resource_id, part, now) is not None:
            log.info("rotated %s part %s (due, on request)", resource_id, part)
        view = await api.store.parts.view(device.id, resource_id, part, wanted, now)
        if not view.active:
            raise await api.inactive(device.id, now)
    resource = await api.store.resource(resource_id)
    epoch = view.epoch
    if owner:
        if resource is None or resource.producer_id != device.id or epoch is None:
            raise NotFound("no such resource, encrypted part or epoch")
    else:
        if not view.readable:
            raise await api.deny(device, "secret", resource_id, "no grant for this part", now)
        if resource is None or epoch is None:
            raise NotFound("no such resource, encrypted part or epoch")
        if epoch.state == PRE_ACTIVE:
            raise await api.deny(device, "secret", resource_id, "epoch not active yet", now)
    if epoch.state not in (ACTIVE, PRE_ACTIVE, DEACTIVATED, COMPROMISED) or not epoch.secret:
        raise NotFound("the epoch is destroyed")
    # A part's delivery as (device, "resource#part", epoch): no resource id holds a '#'.
    delivery = (device.id, f"{resource_id}#{part}", epoch.epoch)
    if delivery not in api.delivered:
        await api.store.record_delivery(*delivery, now)  # audited before the secret leaves
        api.delivered.add(delivery)
    log.debug("secret of %s part %s epoch %d to %s", resource_id, part, epoch.epoch, device.id)
    return Reply.cbor(
        Code.CONTENT,
        {
            "resource": resource_id,
            "part": part,
            "epoch": epoch.epoch,
            "state": epoch.state,
            "secret": epoch.secret,
            "profile": resource.profile,
        },
    )


async def rotate_if_due(api: Endpoints, resource: Resource | None, asked: int, now: int) -> bool:
    """Rotate now if the scheduler is merely late: a producer switches to the next epoch at
    the boundary by its own clock, and its consumers ask for that epoch (``asked``, pre-active
    when they looked) at once. True when the caller must look again: rotated now, or meanwhile.
    Whether it is still due is decided again inside the write transaction
    (:meth:`Store.rotate_if_due`): consumers asking at once, or another instance's scheduler,
    rotate it once between them."""
    if resource is None or resource.rotation_period <= 0:
        return False
    active = await api.store.epoch(resource.id)
    if active is None or active.activated_at is None:
        return False
    if active.epoch >= asked:
        return True  # rotated since the caller looked (another request, the scheduler)
    if active.activated_at + resource.rotation_period > now:
        return False
    try:
        epoch = await api.store.rotate_if_due(resource.id, now, actor="as", reason="schedule")
    except DatabaseError:
        raise  # the database failed: not a rotation made meanwhile
    except StoreError:
        return True  # no longer rotatable as it was: read the view again
    if epoch is not None:  # None: rotated meanwhile (another request, the scheduler)
        log.info("rotated %s to epoch %d (due, on request)", resource.id, epoch)
    return True


# --- /keys ------------------------------------------------------------------------------------


async def get_keys(api: Endpoints, device: Device, request: Request, now: int) -> Reply:
    query = parse_query(request, ("r",))
    if "r" not in query:
        raise BadRequest("GET /keys takes r=<resource id>")
    resource_id = resource_id_param(query["r"])
    if device.role != "producer" or not names.owns(device.id, resource_id):
        raise await api.deny(device, "keys", resource_id, "not the owner", now)
    resource = await api.store.resource(resource_id)
    if resource is None or resource.producer_id != device.id:
        raise NotFound("no such resource")
    reply = (await key_state(api, resource)).to_cbor()
    parts = await part_states(api, resource)
    if parts:  # a single-part resource's reply stays as it was
        reply["parts"] = parts
    return Reply.cbor(Code.CONTENT, reply)


async def part_states(api: Endpoints, resource: Resource) -> list[dict[str, Any]]:
    """The owner's view of the resource's parts, in order: ``{"name", "kind"}`` for a plain
    part, and for an encrypted one its active and pre-active epoch with their secrets, as the
    resource's own are in the ``/keys`` reply (``active``: epoch, secret, activated_at;
    ``next``: epoch, secret). Empty for a resource without parts."""
    declared = await api.store.parts.parts(resource.id)
    if not declared:
        return []
    live: dict[str, dict[str, PartEpoch]] = {}
    for e in await api.store.parts.live_epochs(resource.id):
        live.setdefault(e.part, {})[e.state] = e
    out: list[dict[str, Any]] = []
    for name, kind in declared:
        if kind != ENCRYPTED:
            out.append({"name": name, "kind": kind})
            continue
        active, upcoming = live.get(name, {}).get(ACTIVE), live.get(name, {}).get(PRE_ACTIVE)
        if active is None or upcoming is None or not active.secret or not upcoming.secret:
            raise ApiError("a part lacks an active or a pre-active epoch")
        out.append(
            {
                "name": name,
                "kind": kind,
                "active": {
                    "epoch": active.epoch,
                    "secret": active.secret,
                    "activated_at": active.activated_at,
                },
                "next": {"epoch": upcoming.epoch, "secret": upcoming.secret},
            }
        )
    return out


async def key_state(api: Endpoints, resource: Resource) -> KeyState:
    """The owner's view: the active and the pre-active epoch with their secrets (the ``/keys``
    reply, in the wire schema both the AS and its clients use)."""
    active = await api.store.epoch(resource.id, with_secret=True)
    # The pre-active epoch is the newest live one (found by index, not through the history).
    live = (await api.store.live_epochs([resource.id]))[resource.id]
    upcoming = await api.store.epoch(resource.id, live[-1], with_secret=True) if live else None
    if upcoming is not None and upcoming.state != PRE_ACTIVE:
        upcoming = None
    if active is None or upcoming is None or not active.secret or not upcoming.secret:
        raise ApiError("the resource lacks an active or a pre-active epoch")
    return KeyState(
        resource.id,
        resource.profile,
        resource.rotation_period,
        EpochKey(active.epoch, AccessSecret(active.secret), active.activated_at),
        EpochKey(upcoming.epoch, AccessSecret(upcoming.secret), None),
    )
