"""The proxy's CoAP face: one site for forward and reverse proxying, publishing and observing.

=========================================  ===================================================
``GET`` with Proxy-Uri (or Proxy-Scheme)   forward: the target ``coap://HOST:PORT/<rid>``
``GET /PREFIX/...`` (``--reverse``)        reverse: ``URI/PREFIX/...`` of the mapped producer
``GET /<rid>`` (no mapping)                what was published for ``<rid>``, if anything
``GET`` + ``Observe: 0``                   as GET, then every new object (:mod:`proxy.relays`)
``PUT /<rid>`` (DTLS, the owner only)      publish an object (content format 18)
``GET /.well-known/oscar-stats``           counters (JSON), from loopback or over DTLS
=========================================  ===================================================

The resource id an object must be of is the target's path (producers serve ``<rid>`` at
``/<rid>``). Answers carry the object, content format 18, its ETag (:func:`oscar.object_etag`;
a matching ETag gets 2.03) and Max-Age (what is left of the freshness, never past ``exp``).
Refusals: 4.00 a malformed request or a rejected object (one opaque answer; the reason is logged),
4.03 a PUT by anyone but the owner over DTLS, 4.04 nothing to serve, 4.13 an object over the size
limit, 5.02 the upstream gave nothing valid, 5.03 the AS is needed to verify and cannot be reached,
5.05 a scheme other than ``coap``. Plain-CoAP clients whose address is not verified get 4.01 with
an Echo option instead of a reply (:mod:`oscar_io.echo`), before any lookup, fetch or AS request.
The 4.01 (4 bytes, the token, a 10-byte option) is no larger than a request whose options and
payload take 10 bytes or more (a resource id ``x/y`` of 9 characters or more, any Proxy-Uri); for
shorter ones it is up to 6 bytes larger (``a/b``: 8 bytes and the token), within RFC 9175's bound
of three times: sending nothing there instead would lock every plain-CoAP client of a short
resource id out. Refusals to unproven peers carry no text.
Over CoAP over TCP (``tcp`` in the configuration: :mod:`oscar_io.coaptcp`) the same site answers
GETs, a large object in BERT blocks; the TCP handshake has proven the client's address, so no
Echo is asked for; a PUT there is refused like any other without an identity. Over CoAP over TLS
(``tls``) the identity is the device the client's certificate from the AS CA names, not revoked
(the CRL is checked for each PUT: 5.03 when it cannot be), so owners may publish there too.
A block-wise answer carries Size2 (the object's size), so that a client can choose TCP from its
first block. Block2 is the site's own (aiocoap would keep each answer whole for every client
that asks block-wise): every block is cut from the entry when it is asked for, from memory or,
for a large object, read from disk (:func:`proxy.large.cut`), so blocks may be asked for in any
order and several at once, and the proxy holds no object whole for a block-wise transfer.
The counters answer plain CoAP from loopback only (no spoofed source reaches loopback from
outside: Linux drops such packets as martians); anyone else gets 4.03.

Forward proxying goes to any ``coap://`` host a client names: there is no allowlist of origins,
by design. Whatever an origin serves is verified before it is cached (an origin can add nothing
that its producer did not sign, nor roll an entry back), the challenge above keeps a spoofed
source from making the proxy fetch anything, each (resource, origin) has its own in-flight fetch
and back-off, and the AS lookups that an origin's objects can cause are budgeted
(:mod:`proxy.lookups`). An observation is relayed only from an origin that served the object
(or the reverse target), within bounds in all and per client, and the relay ends with the last
observation attached to it (:mod:`proxy.relays`): naming origins in Observe requests makes the
proxy observe none of them that never served the object. What remains is that a verified client
can make the proxy send GETs to a host of its choosing (as any forward proxy does); a deployment
that needs less puts a firewall rule in front, or maps producers with ``--reverse`` and filters
Proxy-Uri at the edge.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from aiocoap import Message, interfaces
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from aiocoap.resource import ObservableResource

from oscar import names
from oscar.errors import InvalidObject
from oscar_io import coaptcp
from oscar_io.coaperrors import TransportError
from oscar_io.dtls import device_of_label
from oscar_io.echo import AddressCheck, challenge_size
from oscar_io.metrics import outcome_of

from .bodies import BodyError
from .core import Proxy, Unavailable
from .entry import Entry
from .large import BadBlock, Intake, SpoolError, cut
from .publishing import BlockRefused, Uploads
from .relays import client_of

__all__ = ["BadTarget", "ProxySite", "proxied"]

log = logging.getLogger("oscar.proxy")

STATS_PATH = (".well-known", "oscar-stats")
#: Objects larger than this go out block-wise over UDP (aiocoap 0.4.17 answers block-wise unasked
#: above 1,124 bytes) and carry Size2; smaller ones go in one message, as before, without it.
SIZE2_FROM = 1124
_CODES = {
    "4.00": Code.BAD_REQUEST,
    "4.04": Code.NOT_FOUND,
    "4.08": Code.REQUEST_ENTITY_INCOMPLETE,
    "4.13": Code.REQUEST_ENTITY_TOO_LARGE,
    "5.02": Code.BAD_GATEWAY,
    "5.03": Code.SERVICE_UNAVAILABLE,
    "5.05": Code.PROXYING_NOT_SUPPORTED,
}


class BadTarget(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def identity(remote: Any) -> str | None:
    """The device id a DTLS session authenticated, or the one a TLS peer's certificate from the
    AS CA names (its revocation is checked where it matters: a PUT); None for plain CoAP."""
    claims: Any = getattr(remote, "authenticated_claims", ())
    if len(claims) != 1:
        return coaptcp.peer_device(remote)
    return device_of_label(claims[0])


def _address(remote: Any) -> str:
    return str(getattr(remote, "hostinfo", remote))


def _wire_size(request: Message) -> int:
    """The request's size on the wire: header, token, options (as re-encoded: what aiocoap
    parsed, so a request padded with options it drops counts without them), payload."""
    try:
        options = len(request.opt.encode())
    except Exception:  # an option aiocoap cannot encode again: count none (then no Echo)
        options = 0
    payload = len(request.payload)
    return 4 + len(request.token) + options + (1 + payload if payload else 0)


def proxied(proxy_uri: str) -> tuple[str, str]:
    """(resource id, upstream URI) of a Proxy-Uri; BadTarget if it names none."""
    try:  # urlsplit and .port raise ValueError (bad IPv6 literal, port out of range)
        parts = urlsplit(proxy_uri)
        scheme, host, port, path = parts.scheme, parts.hostname, parts.port, parts.path
    except ValueError:
        raise BadTarget("4.00", "malformed Proxy-Uri") from None
    if parts.query or parts.fragment:
        raise BadTarget("4.00", "no query in a proxied URI")
    return _forward(scheme, host, port, path)


def _forward(scheme: str | None, host: str | None, port: int | None, path: str) -> tuple[str, str]:
    if scheme != "coap":
        raise BadTarget("5.05", "only coap:// targets are proxied")
    if not host:
        raise BadTarget("4.00", "the proxied URI has no host")
    resource_id = unquote(path.lstrip("/"))
    if not names.is_resource_id(resource_id):
        raise BadTarget("4.00", "the target path is not a resource id")
    netloc = f"[{host}]" if ":" in host else host
    return resource_id, f"coap://{netloc}:{port or 5683}/{resource_id}"


def _loopback(remote: Any) -> bool:
    host = str(getattr(remote, "hostinfo", "")).rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class ProxySite(ObservableResource):  # type: ignore[misc]
    """Every path of the proxy (it is the site's root resource)."""

    def __init__(self, proxy: Proxy, *, echo_key: bytes | None = None) -> None:
        """``echo_key``: the proxy identity's key for Echo values (:mod:`oscar_io.echo`), so that
        its instances accept each other's; None: one of this site's own."""
        super().__init__()
        self.proxy = proxy
        self.addresses = AddressCheck(key=echo_key)
        self._observers: dict[str, set[Any]] = {}
        #: Admitted observations by request id (see proxy.relays).
        self._watches: dict[int, Any] = {}
        self._resources: dict[int, str] = {}
        #: Observation requests (by id) whose first answer passed the amplification guard: their
        #: notifications are rendered from the same request and need no new proof of address.
        self._admitted: dict[int, Message | None] = {}
        #: Publishers' Block1 uploads under way (proxy.publishing).
        self.uploads = Uploads(lambda: proxy.bodies, max_size=lambda: proxy.limits.max_object_size)
        proxy.on_new_object.append(self._notify)

    # --- targets ---

    def target(self, request: Message) -> tuple[str, str | None]:
        """(resource id, upstream URI or None) of a request; BadTarget if malformed."""
        opt = request.opt
        if opt.proxy_uri is not None or opt.proxy_scheme is not None:
            if opt.proxy_uri is not None:
                return proxied(opt.proxy_uri)
            path = "/" + "/".join(opt.uri_path)
            return _forward(opt.proxy_scheme, opt.uri_host, opt.uri_port, path)
        resource_id = "/".join(opt.uri_path)
        if not names.is_resource_id(resource_id):
            raise BadTarget("4.04", "not a resource id")
        return resource_id, self.proxy.reverse_target(resource_id)

    # --- request path ---

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        # a GET's blocks are cut here (_get), a PUT's taken in by proxy.publishing
        return False

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if (request.code == Code.PUT or request.opt.block1 is not None) and identity(
            request.remote
        ) is None:
            # Refused before aiocoap assembles any blocks: only owners over DTLS may PUT.
            self.proxy.stats.publish_refused += 1
            pipe.add_response(Message(code=Code.FORBIDDEN), is_last=True)
            return
        block1 = request.opt.block1
        limit = self.proxy.limits.max_object_size
        announced = request.opt.size1 or 0
        if announced > limit or len(request.payload) + (block1.start if block1 else 0) > limit:
            pipe.add_response(Message(code=Code.REQUEST_ENTITY_TOO_LARGE), is_last=True)
            return
        if request.opt.observe == 0 and request.code == Code.GET:
            pipe.on_interest_end(functools.partial(self._interest_ended, id(request)))
            # aiocoap's crash when an observer goes away mid-notification is repaired by
            # oscar_io.aiocoap_fixes (applied at start).
            await interfaces.ObservableResource._render_to_pipe(self, pipe)
        else:
            await interfaces.Resource._render_to_pipe(self, pipe)

    async def render(self, request: Message) -> Message:
        started = time.perf_counter()
        answer = await self._render(request)
        proxy = self.proxy
        key = (
            request.code.name if request.code.is_request() else "other",
            outcome_of(answer.code.dotted),
        )
        proxy.answers[key] = proxy.answers.get(key, 0) + 1
        proxy.answer_seconds.observe(time.perf_counter() - started)
        return answer

    async def _render(self, request: Message) -> Message:
        if tuple(request.opt.uri_path) == STATS_PATH and request.opt.proxy_uri is None:
            return self._stats(request)
        try:
            resource_id, upstream = self.target(request)
        except BadTarget as exc:
            # The reason only to a proven peer: to a maybe-spoofed one, nothing beyond the code.
            reason = str(exc).encode() if self._proven(request) else b""
            return Message(code=_CODES[exc.code], payload=reason)
        if request.code == Code.GET:
            response, entry = await self._get(request, resource_id, upstream)
            watch = self._watches.get(id(request))
            # Only an observer that got a first answer holds a relay (an unverified one, 4.01
            # and Echo, would start and stop it for nothing), and only one that the limits
            # allow: any other gets this answer without Observe (RFC 7641 §4.1).
            if (
                watch is not None
                and response.code.is_successful()
                and not self.proxy.relays.attach(id(request), resource_id, upstream, entry)
            ):
                watch.deregister()
            return response
        if request.code == Code.PUT:
            return await self._put(request, resource_id)
        return Message(code=Code.METHOD_NOT_ALLOWED)

    async def _get(
        self, request: Message, resource_id: str, upstream: str | None, *, again: bool = True
    ) -> tuple[Message, Entry | None]:
        """The answer to a GET, and the entry it serves (if any). A large entry whose body is
        gone from the disk is forgotten and looked up ``again`` (once): fetched anew."""
        challenge = self._challenge(request)
        if challenge is not None:
            return challenge, None
        if id(request) in self._admitted:  # an observation: its notifications need no Echo
            self._admitted[id(request)] = request
        try:
            entry = await self.proxy.lookup(resource_id, upstream)
        except Unavailable as exc:
            return Message(code=_CODES[exc.code], max_age=1), None
        now = self.proxy.now()
        max_age = int(max(0.0, min(entry.fresh_until - now, entry.exp - now)))
        if entry.etag in (request.opt.etags or ()):
            response = Message(code=Code.VALID, etag=entry.etag, max_age=max_age)
        else:
            response = Message(
                code=Code.CONTENT, content_format=18, etag=entry.etag, max_age=max_age
            )
            try:
                self._fill(response, request, entry)
            except BadBlock as exc:
                return Message(code=Code.BAD_REQUEST, payload=str(exc).encode()), None
            except BodyError:
                self.proxy.lost(entry)
                if not again:
                    return Message(code=Code.SERVICE_UNAVAILABLE, max_age=1), None
                return await self._get(request, resource_id, upstream, again=False)
            if entry.size > SIZE2_FROM and request.opt.observe is None:
                # block-wise: the size, in every block (not in an observation's answers: the
                # fast path renders those, without Size2, and a client may choose TCP by a GET)
                response.opt.size2 = entry.size
        return response, entry

    def _fill(self, response: Message, request: Message, entry: Entry) -> None:
        """The object, or the block of it asked for (block 0 when it does not fit in one
        message): RFC 7959 §2.4, with BERT over TCP (RFC 8323 §6). A block larger than the
        transport takes is answered with the largest it does (block numbers scaled)."""
        remote = request.remote
        block2 = request.opt.block2
        largest = remote.maximum_block_size_exp
        if block2 is None:
            # whole if it fits, and an observation's answers whole as aiocoap sends them (as
            # the fast paths do) unless the object is a large one on disk: then block 0
            whole = request.opt.observe is not None and not entry.body
            if whole or entry.size <= remote.maximum_payload_size:
                response.payload = entry.obj
                return
            number, szx = 0, largest
        else:
            number, szx = block2.block_number, block2.size_exponent
            if szx > largest:  # BERT (7) numbers blocks of 1 KiB, as 6 does
                number <<= min(szx, 6) - min(largest, 6)
                szx = largest
        payload, more = cut(entry, self.proxy.bodies, number, szx, remote.maximum_payload_size)
        response.payload = payload
        response.opt.block2 = BlockOption.BlockwiseTuple(number, more, szx)

    def _challenge(self, request: Message) -> Message | None:
        """No amplification: an unproven plain-CoAP address gets 4.01 + Echo and nothing else
        (a 4.01 is smaller than any request), before any upstream work, so the proxy also
        fetches nothing and asks the AS nothing for a source that may be spoofed; the 4.01 goes
        out on the ACK (libcoap's client answers an Echo only there)."""
        if self._proven(request):
            return None
        address = _address(request.remote)
        # Whatever the request's size: no upstream work (fetches, AS lookups) for a source
        # that may be spoofed.
        if request.opt.echo is not None and self.addresses.prove(address, request.opt.echo):
            return None
        self.proxy.stats.echo_challenges += 1
        if challenge_size(request.token) > 3 * _wire_size(request):  # pragma: no cover
            return Message(code=Code.UNAUTHORIZED)  # cannot happen (a request has a path)
        return Message(code=Code.UNAUTHORIZED, echo=self.addresses.challenge(address))

    def _proven(self, request: Message) -> bool:
        """Whether the request's source is proven: DTLS, TCP (its handshake), a verified
        address, or an admitted observation's notification."""
        if identity(request.remote) is not None or self._admitted.get(id(request)) is request:
            return True
        if coaptcp.is_tcp(request.remote):
            return True
        return self.addresses.is_verified(_address(request.remote))

    async def _put(self, request: Message, resource_id: str) -> Message:
        device = identity(request.remote)
        if device is None or not names.owns(device, resource_id):
            self.proxy.stats.publish_refused += 1
            log.info(
                "refused a PUT of %s from %s", resource_id, device or "an unauthenticated peer"
            )
            return Message(code=Code.FORBIDDEN)
        certificate = coaptcp.peer_certificate(request.remote)
        if certificate is not None:  # TLS: the certificate must not be revoked (fail closed)
            try:
                revoked = await self.proxy.revoked_serials()
            except TransportError:
                return Message(code=Code.SERVICE_UNAVAILABLE, max_age=5)
            if certificate.serial_number in revoked:
                self.proxy.stats.publish_refused += 1
                log.info("refused a PUT of %s from %s: certificate revoked", resource_id, device)
                return Message(code=Code.FORBIDDEN)
        if request.opt.content_format != 18:
            return Message(code=Code.UNSUPPORTED_CONTENT_FORMAT)
        block1 = request.opt.block1
        data: bytes | Intake = bytes(request.payload)
        intake = None
        if block1 is not None:
            payload, request.payload = bytes(request.payload), b""
            # (taken: aiocoap's requests sit in reference cycles until the collector runs,
            # which counts objects, not bytes; BERT blocks are up to 1 MiB each)
            try:
                intake = self.uploads.block(device, resource_id, block1, payload)
            except BlockRefused as exc:
                return Message(code=_CODES[exc.code], payload=str(exc).encode(), max_age=5)
            except InvalidObject:
                return Message(code=Code.BAD_REQUEST, payload=b"object rejected")
            except SpoolError as exc:
                log.warning("cannot spool a PUT of %s: %s", resource_id, exc)
                return Message(code=Code.SERVICE_UNAVAILABLE, max_age=5)
            if intake is None:  # more to come
                return Message(code=Code.CONTINUE, block1=block1)
            data = intake if intake.spilled else intake.data
        try:
            await self.proxy.publish(resource_id, data, request.opt.max_age)
        except InvalidObject:
            return Message(code=Code.BAD_REQUEST, payload=b"object rejected")
        except (TransportError, SpoolError):
            return Message(code=Code.SERVICE_UNAVAILABLE, max_age=5)
        finally:
            if intake is not None:
                intake.close()
        return Message(code=Code.CHANGED, block1=block1)

    def _stats(self, request: Message) -> Message:
        if identity(request.remote) is None and not _loopback(request.remote):
            return Message(code=Code.FORBIDDEN)
        doc = self.proxy.counters()
        return Message(code=Code.CONTENT, payload=json.dumps(doc).encode(), content_format=50)

    # --- observation ---

    async def add_observation(self, request: Message, observation: Any) -> None:
        # Accepted in every case (aiocoap calls the callback when the request ends); one that is
        # malformed or beyond the observer limits is deregistered at once: its GET is answered
        # without Observe.
        holder = id(request)
        try:
            resource_id, _ = self.target(request)
        except BadTarget:
            observation.accept(lambda: None)
            observation.deregister()
            return
        client = client_of(identity(request.remote), _address(request.remote))
        if not self.proxy.relays.admit(holder, client):
            observation.accept(lambda: None)
            observation.deregister()
            return
        watchers = self._observers.setdefault(resource_id, set())
        watchers.add(observation)
        self._watches[holder] = observation
        self._resources[holder] = resource_id
        self._admitted[holder] = None  # until _get admits its first answer
        observation.accept(functools.partial(self._end, holder))

    def _end(self, holder: int) -> None:
        """An observation ended: forget it and give back what it held (idempotent)."""
        observation = self._watches.pop(holder, None)
        resource_id = self._resources.pop(holder, None)
        self._admitted.pop(holder, None)
        self.proxy.relays.release(holder)
        left = self._observers.get(resource_id) if resource_id is not None else None
        if left is not None:
            left.discard(observation)
            if not left:
                del self._observers[str(resource_id)]

    def _interest_ended(self, holder: int) -> None:
        """The observer's interest ended (it left: RST, ICMP error, a new request on its token).
        aiocoap cancels the rendering task then, but a cancellation can be lost (``wait_for``
        in Python 3.11 returns a result that arrives at the same moment): the task would wait for
        the next notification forever, holding its relay. So the observation ends here, and a
        last (unsuccessful, sent nowhere) notification lets such a task finish."""
        observation = self._watches.get(holder)
        self._end(holder)
        if observation is not None:
            observation.trigger(Message(code=Code.SERVICE_UNAVAILABLE), is_last=True)

    def _notify(self, resource_id: str) -> None:
        for observation in list(self._observers.get(resource_id, ())):
            observation.trigger()
