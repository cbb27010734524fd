"""The AS's endpoints: who may ask what, strict parsing of requests, CBOR replies.

Every endpoint takes a :class:`Request` (already stripped of the transport: the *authenticated*
device id from the DTLS session, method, path, query, payload) and returns a :class:`Reply` or
raises an :class:`ApiError`, whose class says the CoAP code (the tree is drawn in
:mod:`authz_server.messages`, with the records and the strict parsing).

Errors render as CBOR ``{"error": text}``; the text never holds key material. Every 4.01 and 4.03
is audited: the first of its kind as a record of its own, later ones counted into one record per
device, reason and interval (:mod:`authz_server.store.denials`). Decoding is strict:
:func:`oscar.cbor.loads`, exact key sets, exact types, ids checked with :mod:`oscar.names` before
they reach the store. Nothing here changes state unless the request was valid and allowed.

What this module does not do: sockets, DTLS, rate limiting and Observe bookkeeping
(:mod:`authz_server.server`), storage (:mod:`authz_server.store`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiocoap import Message
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from oscar import cbor, certs, names
from oscar.errors import CertificateError
from oscar.profiles import PROFILES

from .ca import CertificateAuthority
from .messages import (
    CBOR_FORMAT,
    KID_PATTERN,
    LINK_FORMAT,
    MAX_PAYLOAD,
    MAX_UINT32,
    ApiError,
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    Reply,
    Request,
    RequestTooLarge,
    TooManyRequests,
    Unauthorized,
    UnsupportedContentFormat,
    epoch_number,
    is_bytes,
    is_text,
    parse_body,
    parse_query,
    resource_id_param,
    uint_at_most,
)
from .store import Conflict, Device, Resource, Store, StoreError

__all__ = [
    "CBOR_FORMAT",
    "MAX_PAYLOAD",
    "ApiError",
    "BadRequest",
    "Endpoints",
    "Forbidden",
    "MethodNotAllowed",
    "NotFound",
    "Reply",
    "Request",
    "RequestTooLarge",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedContentFormat",
]

log = logging.getLogger("oscar.as")


# KMIP states as the store keeps them and /secret reports them; "active" is a device status too.
PRE_ACTIVE, ACTIVE, DEACTIVATED, COMPROMISED = "pre-active", "active", "deactivated", "compromised"


# --- endpoints -----------------------------------------------------------------------------------

#: Rotation periods under this (by default) would let one producer keep the AS rotating and
#: auditing without pause.
MIN_ROTATION_PERIOD = 60
#: Resources one producer may register.
MAX_RESOURCES_PER_PRODUCER = 1000

#: Deliveries remembered in memory (past it the set starts over; the table still dedupes).
_MAX_REMEMBERED_DELIVERIES = 100_000

#: (path, rt, observable) of everything served, for /.well-known/core and the docs.
ENDPOINTS: tuple[tuple[str, str, bool], ...] = (
    ("cert", "oscar.as.cert", False),
    ("crl", "oscar.as.crl", False),
    ("resources", "oscar.as.resources", False),
    ("secret", "oscar.as.secret", False),
    ("keys", "oscar.as.keys", True),
    ("link", "oscar.as.link", False),
    ("links", "oscar.as.links", False),
)

#: Bytes of SHA-256 over the device id set that make the /links ETag.
_LINKS_ETAG_LENGTH = 8


def link_format() -> bytes:
    """RFC 6690 description of the endpoints."""
    links = [
        f'</{path}>;rt="{rt}";ct={CBOR_FORMAT}' + (";obs" if observable else "")
        for path, rt, observable in ENDPOINTS
    ]
    return ",".join(links).encode()


class Endpoints:
    """The AS's endpoint logic over a store and the CA. ``clock`` gives the time in seconds."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        *,
        clock: Callable[[], int],
        crl_validity: int = 3600,
        min_rotation_period: int = MIN_ROTATION_PERIOD,
    ) -> None:
        self.store = store
        self.ca = ca
        self.clock = clock
        self.crl_validity = crl_validity
        self.min_rotation_period = min_rotation_period
        self._delivered: set[tuple[str, str, int]] = set()
        self._links_delivered: set[tuple[str, bytes]] = set()

    def __repr__(self) -> str:
        return "Endpoints(<store>, <ca>)"

    async def handle(self, request: Request) -> Reply:
        """Answer one request; raises :class:`ApiError` subclasses for every refusal."""
        now = self.clock()
        device = await self.authenticate(request.device, now)
        route = _ROUTES.get(request.path)
        if route is None:
            raise NotFound("no such endpoint")
        method = route.get(request.method)
        if method is None:
            raise MethodNotAllowed(f"/{'/'.join(request.path)} takes " + ", ".join(route))
        return cast(Reply, await method(self, device, request, now))

    async def authenticate(self, device_id: str | None, now: int) -> Device:
        """The active device behind the DTLS identity; Unauthorized (audited) otherwise."""
        device = None
        if device_id is not None and names.is_device_id(device_id):
            device = await self.store.device(device_id)
        if device is None or device.status != ACTIVE:
            actor = device_id if names.is_device_id(device_id) else "unknown"
            await self.store.audit_denial(actor, "request", actor, "inactive", now)
            log.info("refused %s: not an active device", actor)
            raise Unauthorized()
        return device

    async def deny(
        self, device: Device, action: str, subject: str, reason: str, now: int
    ) -> Forbidden:
        """Audit a refusal (the first of its kind at once, later ones counted: see
        :mod:`authz_server.store.denials`) and return the error to raise."""
        await self.store.audit_denial(device.id, action, subject, reason, now)
        log.info("denied %s %s to %s: %s", action, subject, device.id, reason)
        return Forbidden(reason)

    # --- /.well-known/core -----------------------------------------------------------------------

    async def get_wkc(self, device: Device, request: Request, now: int) -> Reply:
        parse_query(request, ())
        return Reply(Code.CONTENT, link_format(), LINK_FORMAT)

    # --- /cert -----------------------------------------------------------------------------------

    async def post_cert(self, device: Device, request: Request, now: int) -> Reply:
        if request.query:
            raise BadRequest("POST /cert takes no query")
        if device.role not in ("producer", "proxy"):
            raise await self.deny(
                device, "certificate", device.id, "only producers and proxies", now
            )
        csr_der = parse_body(request, {"csr": is_bytes})["csr"]
        try:
            csr = x509.load_der_x509_csr(csr_der)
            subject = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        except ValueError:
            raise BadRequest("the CSR is not DER PKCS#10") from None
        if subject != [device.id]:
            raise await self.deny(
                device, "certificate", device.id, "the CSR names another device", now
            )
        try:
            certificate = self.ca.issue(csr_der, device.id, now)
        except CertificateError as exc:
            raise BadRequest(str(exc)) from None
        der = certificate.public_bytes(serialization.Encoding.DER)
        await self.store.add_certificate(
            certificate.serial_number,
            device.id,
            certs.key_id(cast(Any, certificate.public_key())),
            der,
            int(certificate.not_valid_before_utc.timestamp()),
            int(certificate.not_valid_after_utc.timestamp()),
            now,
        )
        serial = format(certificate.serial_number, "x")
        log.info("issued certificate %s to %s", serial, device.id)
        return Reply.cbor(Code.CREATED, {"cert": der, "serial": serial})

    async def get_cert(self, device: Device, request: Request, now: int) -> Reply:
        query = parse_query(request, ("id", "kid"))
        if len(query) != 1:
            raise BadRequest("GET /cert takes exactly one of id= or kid=")
        if "id" in query:
            if not names.is_device_id(query["id"]):
                raise BadRequest("a device id is 1 to 32 characters of A-Z a-z 0-9 . _ -")
            der = await self.store.certificate(device_id=query["id"], now=now)
        else:
            if not KID_PATTERN.fullmatch(query["kid"]):
                raise BadRequest("a key id is 16 lowercase hex digits")
            der = await self.store.certificate(kid=bytes.fromhex(query["kid"]), now=now)
        if der is None:
            raise NotFound("no valid certificate")
        return Reply.cbor(Code.CONTENT, {"cert": der})

    # --- /crl ------------------------------------------------------------------------------------

    async def get_crl(self, device: Device, request: Request, now: int) -> Reply:
        parse_query(request, ())
        revoked = await self.store.revoked_certificates(now)
        return Reply.cbor(
            Code.CONTENT, {"crl": self.ca.revocation_list(revoked, now, self.crl_validity)}
        )

    # --- /resources ------------------------------------------------------------------------------

    async def post_resources(self, device: Device, request: Request, now: int) -> Reply:
        if request.query:
            raise BadRequest("POST /resources takes no query")
        if device.role != "producer":
            raise await self.deny(device, "register", device.id, "only producers register", now)
        body = parse_body(
            request,
            {
                "path": is_text,
                "content_format": uint_at_most(0xFFFF),
                "profile": is_text,
                "max_age": uint_at_most(MAX_UINT32),
                "rotation_period": uint_at_most(MAX_UINT32),
            },
        )
        resource_id = resource_id_param(f"{device.id}/{body['path']}")
        if body["profile"] not in PROFILES:
            raise BadRequest("unknown profile; choose one of " + ", ".join(PROFILES))
        if 0 < body["rotation_period"] < self.min_rotation_period:
            raise BadRequest(
                f"rotation_period is 0 (never) or at least {self.min_rotation_period} seconds"
            )
        existing = await self.store.resource(resource_id)
        code = Code.CHANGED
        if existing is None:
            if len(await self.store.resources(device.id)) >= MAX_RESOURCES_PER_PRODUCER:
                raise await self.deny(device, "register", resource_id, "resource quota", now)
            try:
                await self.store.register_resource(
                    Resource(
                        resource_id,
                        device.id,
                        body["content_format"],
                        body["profile"],
                        body["max_age"],
                        body["rotation_period"],
                        now,
                    )
                )
                code = Code.CREATED
                log.info("registered %s", resource_id)
            except Conflict:  # registered in the meantime: answer as for an existing one
                pass
        epoch = await self.store.epoch(resource_id)
        if epoch is None:
            raise ApiError("the resource has no active epoch")
        return Reply.cbor(code, {"resource": resource_id, "epoch": epoch.epoch})

    async def get_resources(self, device: Device, request: Request, now: int) -> Reply:
        parse_query(request, ())
        if device.role == "producer":
            chosen = await self.store.live_resources(device.id)
        elif device.role == "proxy":
            chosen = await self.store.live_resources()
        else:  # what the consumer may read now: a live grant, the active epoch not excluded
            chosen = await self.store.readable_resources(device.id, now)
        listed = [
            {
                "resource": resource.id,
                "producer": resource.producer_id,
                "content_format": resource.content_format,
                "profile": resource.profile,
                "max_age": resource.max_age,
                "rotation_period": resource.rotation_period,
                "epoch": epoch,
            }
            for resource, epoch in chosen
        ]
        return Reply.cbor(Code.CONTENT, {"resources": listed})

    # --- /secret ---------------------------------------------------------------------------------

    async def get_secret(self, device: Device, request: Request, now: int) -> Reply:
        query = parse_query(request, ("r", "e"))
        if "r" not in query:
            raise BadRequest("GET /secret takes r=<resource id> and optionally e=<epoch>")
        resource_id = resource_id_param(query["r"])
        wanted = epoch_number(query["e"]) if "e" in query else None
        if device.role == "proxy":
            raise await self.deny(device, "secret", resource_id, "proxies get no secrets", now)
        owner = names.owns(device.id, resource_id)
        if device.role != "consumer" and not owner:
            raise await self.deny(device, "secret", resource_id, "not the owner", now)
        view = await self.store.secret_view(device.id, resource_id, wanted, now)
        if (
            not owner
            and view.readable
            and view.epoch is not None
            and view.epoch.state == PRE_ACTIVE
            and await self._rotate_if_due(view.resource, now)
        ):
            view = await self.store.secret_view(device.id, resource_id, wanted, now)
        resource, epoch = view.resource, view.epoch
        if owner:
            if resource is None or resource.producer_id != device.id or epoch is None:
                raise NotFound("no such resource or epoch")
        else:
            # A consumer learns nothing about resources it may not read, existing or not.
            if not view.readable:
                raise await self.deny(device, "secret", resource_id, "no grant for this epoch", now)
            if resource is None or epoch is None:
                raise NotFound("no such resource or epoch")
            if epoch.state == PRE_ACTIVE:
                raise await self.deny(device, "secret", resource_id, "epoch not active yet", now)
        if epoch.state not in (ACTIVE, PRE_ACTIVE, DEACTIVATED, COMPROMISED) or not epoch.secret:
            raise NotFound("the epoch is destroyed")
        delivery = (device.id, resource_id, epoch.epoch)
        if delivery not in self._delivered:
            # Audited (durably) before the secret leaves; later requests for it skip the disk.
            await self.store.record_delivery(device.id, resource_id, epoch.epoch, now)
            self._remember(delivery)
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

    async def _rotate_if_due(self, resource: Resource | None, now: int) -> bool:
        """Rotate now if the scheduler is merely late: a producer switches to the next epoch at
        the boundary by its own clock, and its consumers ask for that epoch at once."""
        if resource is None or resource.rotation_period <= 0:
            return False
        active = await self.store.epoch(resource.id)
        if active is None or active.activated_at is None:
            return False
        if active.activated_at + resource.rotation_period > now:
            return False
        try:
            epoch = await self.store.rotate(resource.id, now, actor="as", reason="schedule")
        except StoreError:
            return True  # rotated meanwhile by the scheduler: read the view again
        log.info("rotated %s to epoch %d (due, on request)", resource.id, epoch)
        return True

    # --- /keys -----------------------------------------------------------------------------------

    async def get_keys(self, device: Device, request: Request, now: int) -> Reply:
        query = parse_query(request, ("r",))
        if "r" not in query:
            raise BadRequest("GET /keys takes r=<resource id>")
        resource_id = resource_id_param(query["r"])
        if device.role != "producer" or not names.owns(device.id, resource_id):
            raise await self.deny(device, "keys", resource_id, "not the owner", now)
        resource = await self.store.resource(resource_id)
        if resource is None or resource.producer_id != device.id:
            raise NotFound("no such resource")
        return Reply.cbor(Code.CONTENT, await self.key_state(resource))

    async def key_state(self, resource: Resource) -> dict[str, Any]:
        """The owner's view: the active and the pre-active epoch with their secrets."""
        active = await self.store.epoch(resource.id, with_secret=True)
        # The pre-active epoch is the newest live one (found by index, not through the history).
        live = (await self.store.live_epochs([resource.id]))[resource.id]
        upcoming = await self.store.epoch(resource.id, live[-1], with_secret=True) if live else None
        if upcoming is not None and upcoming.state != PRE_ACTIVE:
            upcoming = None
        if active is None or upcoming is None or not active.secret or not upcoming.secret:
            raise ApiError("the resource lacks an active or a pre-active epoch")
        return {
            "resource": resource.id,
            "profile": resource.profile,
            "rotation_period": resource.rotation_period,
            "active": {
                "epoch": active.epoch,
                "secret": active.secret,
                "activated_at": active.activated_at,
            },
            "next": {"epoch": upcoming.epoch, "secret": upcoming.secret},
        }

    async def key_fingerprint(self, resource_id: str) -> tuple[int, ...]:
        """What a /keys observer cares about, without secrets: (active, pre-active) epochs."""
        return (await self.key_fingerprints([resource_id]))[resource_id]

    async def key_fingerprints(self, resource_ids: list[str]) -> dict[str, tuple[int, ...]]:
        """:meth:`key_fingerprint` of each resource, in one query however many are observed."""
        return await self.store.live_epochs(resource_ids)

    # --- /link and /links ------------------------------------------------------------------------

    async def get_link(self, device: Device, request: Request, now: int) -> Reply:
        """A producer's or consumer's DTLS PSK for talking to one proxy (DESIGN §5)."""
        query = parse_query(request, ("proxy",))
        if "proxy" not in query:
            raise BadRequest("GET /link takes proxy=<device id>")
        proxy_id = query["proxy"]
        if not names.is_device_id(proxy_id):
            raise BadRequest("a device id is 1 to 32 characters of A-Z a-z 0-9 . _ -")
        if device.role not in ("producer", "consumer"):
            raise await self.deny(device, "link", proxy_id, "only producers and consumers", now)
        proxy = await self.store.device(proxy_id)
        # One answer for a missing, revoked or non-proxy id: nothing leaks about which ids exist.
        if proxy is None or proxy.status != ACTIVE or proxy.role != "proxy":
            raise await self.deny(device, "link", proxy_id, "no such proxy", now)
        psk = self.store.link_psk(proxy_id, device.id)
        delivery = (device.id, proxy_id, 0)
        if delivery not in self._delivered:
            # Audited (durably) before the PSK leaves, like a secret's first delivery.
            await self.store.record_link_delivery(device.id, proxy_id, now)
            self._remember(delivery)
        log.debug("link PSK for %s to %s", proxy_id, device.id)
        return Reply.cbor(Code.CONTENT, {"proxy": proxy_id, "identity": device.id, "psk": psk})

    async def get_links(self, device: Device, request: Request, now: int) -> Reply:
        """A proxy's link PSKs, one per active producer and consumer; ETag over the id set."""
        parse_query(request, ())
        if device.role != "proxy":
            raise await self.deny(device, "links", device.id, "only proxies", now)
        links = await self.store.link_psks(device.id)
        etag = links_etag(links)
        if (device.id, etag) not in self._links_delivered:
            # One record per proxy and device set, not per poll.
            detail = {"devices": len(links), "etag": etag.hex()}
            await self.store.audit(device.id, "links", device.id, "ok", detail, now)
            if len(self._links_delivered) >= _MAX_REMEMBERED_DELIVERIES:
                self._links_delivered.clear()
            self._links_delivered.add((device.id, etag))
        log.debug("%d link PSKs to %s", len(links), device.id)
        return TaggedReply(Code.CONTENT, cbor.dumps({"links": links}), etag=etag)

    def _remember(self, delivery: tuple[str, str, int]) -> None:
        if len(self._delivered) >= _MAX_REMEMBERED_DELIVERIES:
            self._delivered.clear()
        self._delivered.add(delivery)


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


_Handler = Callable[[Endpoints, Device, Request, int], Any]

_ROUTES: dict[tuple[str, ...], dict[str, _Handler]] = {
    (".well-known", "core"): {"GET": Endpoints.get_wkc},
    ("cert",): {"GET": Endpoints.get_cert, "POST": Endpoints.post_cert},
    ("crl",): {"GET": Endpoints.get_crl},
    ("resources",): {"GET": Endpoints.get_resources, "POST": Endpoints.post_resources},
    ("secret",): {"GET": Endpoints.get_secret},
    ("keys",): {"GET": Endpoints.get_keys},
    ("link",): {"GET": Endpoints.get_link},
    ("links",): {"GET": Endpoints.get_links},
}
