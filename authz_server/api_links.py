"""The AS's link endpoints (DESIGN §5): ``GET /link`` (a producer's or consumer's DTLS PSK for
one proxy) and ``GET /links`` (a proxy's PSKs, one per active producer and consumer, with an ETag
over the device set), as functions of :class:`authz_server.api.Endpoints`.

Link PSKs are derived, never stored (:meth:`authz_server.store.Store.link_psk`). A device's first
link PSK for a proxy is audited before it leaves; a proxy's /links once per device set. What this
module does not do: routing and authentication (:mod:`authz_server.api`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiocoap import Message
from aiocoap.numbers.codes import Code

from oscar import cbor, names

from .messages import BadRequest, Reply, Request, parse_query
from .store import Device
from .store.schema import ACTIVE

if TYPE_CHECKING:
    from .api import Endpoints

__all__ = ["TaggedReply", "get_link", "get_links", "links_etag"]

log = logging.getLogger("oscar.as")

#: Bytes of SHA-256 over the device id set that make the /links ETag.
_LINKS_ETAG_LENGTH = 8


# --- /link and /links -------------------------------------------------------------------------


async def get_link(api: Endpoints, device: Device, request: Request, now: int) -> Reply:
    """A producer's or consumer's DTLS PSK for talking to one proxy (DESIGN §5)."""
    query = parse_query(request, ("proxy",))
    if "proxy" not in query:
        raise BadRequest("GET /link takes proxy=<device id>")
    proxy_id = query["proxy"]
    if not names.is_device_id(proxy_id):
        raise BadRequest("a device id is 1 to 32 characters of A-Z a-z 0-9 . _ -")
    if device.role not in ("producer", "consumer"):
        raise await api.deny(device, "link", proxy_id, "only producers and consumers", now)
    proxy = await api.store.device(proxy_id)
    # One answer for a missing, revoked or non-proxy id: nothing leaks about which ids exist.
    if proxy is None or proxy.status != ACTIVE or proxy.role != "proxy":
        raise await api.deny(device, "link", proxy_id, "no such proxy", now)
    psk = api.store.link_psk(proxy_id, device.id)
    delivery = (device.id, proxy_id, 0)
    if delivery not in api.delivered:
        # Audited (durably) before the PSK leaves, like a secret's first delivery.
        await api.store.record_link_delivery(device.id, proxy_id, now)
        api.delivered.add(delivery)
    log.debug("link PSK for %s to %s", proxy_id, device.id)
    return Reply.cbor(Code.CONTENT, {"proxy": proxy_id, "identity": device.id, "psk": psk})


async def get_links(api: Endpoints, device: Device, request: Request, now: int) -> Reply:
    """A proxy's link PSKs, one per active producer and consumer; ETag over the id set."""
    parse_query(request, ())
    if device.role != "proxy":
        raise await api.deny(device, "links", device.id, "only proxies", now)
    links = await api.store.link_psks(device.id)
    etag = links_etag(links)
    if (device.id, etag) not in api.links_delivered:
        # One record per proxy and device set, not per poll.
        detail = {"devices": len(links), "etag": etag.hex()}
        await api.store.audit(device.id, "links", device.id, "ok", detail, now)
        api.links_delivered.add((device.id, etag))
    log.debug("%d link PSKs to %s", len(links), device.id)
    return TaggedReply(Code.CONTENT, cbor.dumps({"links": links}), etag=etag)


def links_etag(links: dict[str, bytes]) -> bytes:
    """The /links ETag: a hash of the sorted device ids only (the PSKs are a function of them)."""
    digest = hashlib.sha256(cbor.dumps(sorted(links))).digest()
    return digest[:_LINKS_ETAG_LENGTH]


@dataclass(frozen=True, slots=True)
class TaggedReply(Reply):
    """A reply with an ETag option."""

    etag: bytes = b""

    def __repr__(self) -> str:
        return f"TaggedReply({self.code.dotted}, <{len(self.payload)} bytes>)"

    def to_message(self) -> Message:
        # Reply.to_message, not super(): dataclass(slots=True) makes a new class, and the
        # zero-argument super() would still name the old one.
        message = Reply.to_message(self)
        message.opt.etag = self.etag
        return message
