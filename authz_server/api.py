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

Here: the routing, the authentication of the DTLS identity, the audit of refusals, and the
endpoints of devices, certificates and resources (``/.well-known/core``, ``/cert``, ``/crl``,
``/resources``). The key endpoints (``/secret``, ``/keys``) are in :mod:`authz_server.api_keys`,
the proxy links (``/link``, ``/links``) in :mod:`authz_server.api_links`.

What this module does not do: sockets, DTLS, rate limiting and Observe bookkeeping
(:mod:`authz_server.server`, :mod:`authz_server.site`), storage (:mod:`authz_server.store`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from oscar import certs, names
from oscar.errors import CertificateError
from oscar.profiles import PROFILES
from oscar_io.aswire import CBOR_FORMAT

from . import api_keys, api_links
from .ca import CertificateAuthority
from .messages import (
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
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnsupportedContentFormat,
    is_bytes,
    is_text,
    parse_body,
    parse_query,
    resource_id_param,
    uint_at_most,
)
from .store import Conflict, DatabaseUnavailable, Device, Resource, Store
from .store.parts import check_parts
from .store.schema import ACTIVE  # a device status as the store keeps it

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
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedContentFormat",
    "is_endpoint",
]

log = logging.getLogger("oscar.as")

_T = TypeVar("_T")


# --- endpoints -----------------------------------------------------------------------------------

#: Rotation periods under this (by default) would let one producer keep the AS rotating and
#: auditing without pause.
MIN_ROTATION_PERIOD = 60
#: Resources one producer may register.
MAX_RESOURCES_PER_PRODUCER = 1000

#: Deliveries remembered in memory (past it the set starts over; the table still dedupes).
_MAX_REMEMBERED_DELIVERIES = 100_000
_MAX_REMEMBERED_DEVICES = 100_000

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


def is_part_list(value: object) -> bool:
    """A ``parts`` value of ``POST /resources``: a list of [name, kind] text pairs (the rules on
    names and kinds are :func:`~authz_server.store.parts.check_parts`')."""
    return type(value) is list and all(
        type(p) is list and len(p) == 2 and all(type(x) is str for x in p) for p in value
    )


def link_format() -> bytes:
    """RFC 6690 description of the endpoints."""
    links = [
        f'</{path}>;rt="{rt}";ct={CBOR_FORMAT}' + (";obs" if observable else "")
        for path, rt, observable in ENDPOINTS
    ]
    return ",".join(links).encode()


class RecentSet(Generic[_T]):
    """A set that starts over when it reaches ``cap`` items: a memory of recent work whose loss
    costs a repeat (the database dedupes), never a wrong answer."""

    __slots__ = ("_cap", "_items")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._items: set[_T] = set()

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: _T) -> None:
        if len(self._items) >= self._cap:
            self._items.clear()
        self._items.add(item)


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
        #: (device, resource, epoch) of secrets and (device, proxy, 0) of link PSKs delivered
        #: (and audited) already: a repeat skips the disk.
        self.delivered: RecentSet[tuple[str, str, int]] = RecentSet(_MAX_REMEMBERED_DELIVERIES)
        #: (proxy, ETag) of /links answers audited already.
        self.links_delivered: RecentSet[tuple[str, bytes]] = RecentSet(_MAX_REMEMBERED_DELIVERIES)
        #: Devices found active by :meth:`authenticate`, for the endpoints that check the status
        #: again inside their own read (:data:`_STATUS_IN_VIEW`): a device's id and role never
        #: change, so only its status must be read per request, and that read is folded into
        #: the endpoint's one point read (a round trip less to PostgreSQL).
        self.known: dict[str, Device] = {}

    def __repr__(self) -> str:
        return "Endpoints(<store>, <ca>)"

    async def handle(self, request: Request) -> Reply:
        """Answer one request; raises :class:`ApiError` subclasses for every refusal, and
        :class:`ServiceUnavailable` (5.03) while the database cannot be reached."""
        try:
            return await self._handle(request)
        except DatabaseUnavailable:
            raise ServiceUnavailable() from None

    async def _handle(self, request: Request) -> Reply:
        now = self.clock()
        device = None
        if (request.path, request.method) in _STATUS_IN_VIEW and request.device is not None:
            device = self.known.get(request.device)
        known = device is not None
        if device is None:
            device = await self.authenticate(request.device, now)
        route = _ROUTES.get(request.path)
        if route is None:
            raise NotFound("no such endpoint")
        method = route.get(request.method)
        if method is None:
            raise MethodNotAllowed(f"/{'/'.join(request.path)} takes " + ", ".join(route))
        try:
            return cast(Reply, await method(self, device, request, now))
        except Unauthorized:
            raise
        except ApiError:
            if known:  # refused before its view read the status: a device revoked since gets 4.01
                await self.authenticate(device.id, now)
            raise

    async def authenticate(self, device_id: str | None, now: int) -> Device:
        """The active device behind the DTLS identity; Unauthorized (audited) otherwise."""
        device = None
        if device_id is not None and names.is_device_id(device_id):
            device = await self.store.device(device_id)
        if device is None or device.status != ACTIVE:
            raise await self.inactive(device_id, now)
        if len(self.known) >= _MAX_REMEMBERED_DEVICES:
            self.known.clear()
        self.known[device.id] = device
        return device

    async def inactive(self, device_id: str | None, now: int) -> Unauthorized:
        """Audit a request from a device that is not (or no longer) active, forget it, and
        return the 4.01 to raise."""
        actor = device_id if names.is_device_id(device_id) else "unknown"
        if device_id is not None:
            self.known.pop(device_id, None)
        await self.store.audit_denial(actor, "request", actor, "inactive", now)
        log.info("refused %s: not an active device", actor)
        return Unauthorized()

    def forget(self, device_id: str) -> None:
        """The device is no longer active (the server saw its revocation)."""
        self.known.pop(device_id, None)

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
            {"parts": is_part_list},
        )
        resource_id = resource_id_param(f"{device.id}/{body['path']}")
        declared = None
        if "parts" in body:
            try:
                declared = check_parts([tuple(p) for p in body["parts"]])
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
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
            resource = Resource(
                resource_id,
                device.id,
                body["content_format"],
                body["profile"],
                body["max_age"],
                body["rotation_period"],
                now,
            )
            try:
                if declared is None:
                    await self.store.register_resource(resource)
                else:  # the resource and its parts in one transaction
                    await self.store.parts.register_resource(resource, declared)
                code = Code.CREATED
                log.info("registered %s", resource_id)
            except Conflict:  # registered in the meantime: answer as for an existing one
                pass
        if (
            code != Code.CREATED
            and declared is not None
            and await self.store.parts.parts(resource_id) != declared
        ):
            raise BadRequest("the resource is registered with other parts")
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

    async def key_fingerprint(self, resource_id: str) -> tuple[Any, ...]:
        """What a /keys observer cares about, without secrets: (active, pre-active) epochs, then
        (part, epoch) of its parts' live epochs."""
        return (await self.key_fingerprints([resource_id]))[resource_id]

    async def key_fingerprints(self, resource_ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """:meth:`key_fingerprint` of each resource (its parts' live epochs after its own), in
        two queries however many are observed."""
        own = await self.store.live_epochs(resource_ids)
        parts = await self.store.parts.live_epoch_numbers(resource_ids)
        return {rid: own[rid] + parts[rid] for rid in own}


_Handler = Callable[[Endpoints, Device, Request, int], Any]

#: (path, method) of the endpoints that read the device's status again in their own point read
#: and refuse with :meth:`Endpoints.inactive`: for them a device :meth:`Endpoints.authenticate`
#: found active before is not read again first. ``GET /secret``, the hot path.
_STATUS_IN_VIEW = frozenset({(("secret",), "GET")})

_ROUTES: dict[tuple[str, ...], dict[str, _Handler]] = {
    (".well-known", "core"): {"GET": Endpoints.get_wkc},
    ("cert",): {"GET": Endpoints.get_cert, "POST": Endpoints.post_cert},
    ("crl",): {"GET": Endpoints.get_crl},
    ("resources",): {"GET": Endpoints.get_resources, "POST": Endpoints.post_resources},
    ("secret",): {"GET": api_keys.get_secret},
    ("keys",): {"GET": api_keys.get_keys},
    ("link",): {"GET": api_links.get_link},
    ("links",): {"GET": api_links.get_links},
}


def is_endpoint(method: str, path: tuple[str, ...]) -> bool:
    """Whether ``method`` on ``path`` is one of the endpoints (for the metrics' labels)."""
    return method in _ROUTES.get(path, {})
