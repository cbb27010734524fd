"""The producer's fast path: the common GET answered from pre-encoded bytes, before aiocoap.

Every consumer gets the same sealed object, so answering a plain GET needs no per-request work
beyond copying its message ID and token into a ready response. aiocoap's message layer spends
about half a millisecond of CPU on one such GET from a new source port (decoding into a Message,
deduplication state per remote, a task per request, resource lookup with a deep copy of the
request, block-wise caches, encoding), several times the cost of the datagram itself.
:class:`FastPath` sits in front of it, on the server context's ``udp6`` interface, and answers a
datagram itself only when it is exactly:

- CoAP version 1, confirmable, code 0.01 GET, a token of at most 8 bytes;
- options: Uri-Path segments naming a published resource, optionally followed by one Block2
  option asking for block 0 (M bit clear, SZX at most 6); nothing else, and no payload;
- for a resource whose current object exists, has not expired, and goes out in one message (at
  most aiocoap's unsolicited limit of 1124 bytes, or at most the block size asked for);
- sent to a unicast address (with its packet info), on a token that aiocoap is not using for a
  request from that remote (an observation, say: a new request on its token is aiocoap's to
  handle, it cancels the old one).

The answer is what aiocoap would send (the differential tests compare the bytes): a piggybacked ACK
2.05 with the request's message ID and token, ETag, Content-Format 18, the Max-Age that
:meth:`ObjectResource.render_get` computes, and the object. The object, its ETag and expiry are read
from the resource's :class:`Served` object (a :class:`~producer.published.Published`) on every
request, so the answer after a re-seal is the new object. Larger objects stay with aiocoap: a
stateless server would cut each block from the object current when it is asked for, and a re-seal
in the middle of a block-wise transfer would change the ETag between blocks (the client gives up:
RFC 7959 §2.4), where aiocoap's Block2 cache keeps one copy of the object per remote and finishes
the transfer with it. A block-wise transfer costs a round trip per block anyway; the saving is in
the small objects most readings are.

Everything else goes to aiocoap unchanged: NON, Observe, ETag validation, Accept, Uri-Host,
Uri-Port (libcoap's coap-client sends it when the port is not 5683), Uri-Query, any other option,
a payload, malformed or truncated bytes, a token of 9 to 15 bytes, 5.03 (no object, or expired),
4.04, discovery (``/.well-known/core``), and any datagram the fast path fails on for a reason it
did not foresee. A retransmitted request is answered again with the same bytes: GET is
idempotent (RFC 7252 §4.5). The fast path keeps nothing per remote: its only state is one
pre-encoded answer per resource.

The CoAP bytes and the hook on aiocoap's udp6 interface are :mod:`oscar_io.coapfast`'s (shared
with the proxy's fast path); what to answer is this module's.

What it does not do: anything with DTLS (the producer serves plain CoAP only), send anything but
the piggybacked answer, or change aiocoap's handling of what it passes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from oscar_io.coapfast import CON, UdpHook, option, parse, uint

__all__ = ["BLOCK_SIZE_EXP", "UNSOLICITED_LIMIT", "FastPath", "Route", "Served"]

log = logging.getLogger("oscar.producer")

#: aiocoap's largest block over UDP (SZX 6: 1024 bytes) and the payload size over which it
#: answers block-wise unasked (``EndpointAddress.maximum_payload_size`` in aiocoap 0.4.17).
BLOCK_SIZE_EXP = 6
UNSOLICITED_LIMIT = 1124

_URI_PATH = 11
_MAX_AGE = 14
_BLOCK2 = 23
#: First byte of the header (version 1, type ACK) without the token length; code 2.05.
_ACK = 0x60
_CONTENT = 0x45
#: Content-Format 18 (application/cose; cose-type="cose-sign1"), after ETag (option 4).
_CONTENT_FORMAT_18 = bytes([(12 - 4) << 4 | 1, 18])


class Served(Protocol):
    """What the fast path reads of a resource's current object, on every request
    (:class:`~producer.published.Published` is one): None before the first object."""

    @property
    def obj(self) -> bytes | None: ...
    @property
    def etag(self) -> bytes: ...
    @property
    def exp(self) -> int: ...
    def now(self) -> int: ...
    def max_age(self, now: int) -> int: ...


class Route(Protocol):
    """A resource the fast path answers for (:class:`~producer.server.ObjectResource` is one):
    its object, and its count of requests answered (the fast path adds its own)."""

    requests: int

    @property
    def published(self) -> Served: ...


class _Encoded:
    """The options of one object's answer for one Max-Age, and the whole answer's body."""

    __slots__ = ("etag", "max_age", "obj", "options", "whole")

    def __init__(self, obj: bytes, etag: bytes, max_age: int) -> None:
        self.obj, self.etag, self.max_age = obj, etag, max_age
        self.options = option(4, etag) + _CONTENT_FORMAT_18 + option(_MAX_AGE - 12, uint(max_age))
        self.whole = self.options + b"\xff" + obj


class FastPath:
    """Answers the common GET of a published object; see the module docstring.

    ``routes`` maps a request's Uri-Path segments (bytes) to the resource serving them. Set
    ``enabled`` to False to send every datagram to aiocoap. ``answered`` counts the datagrams
    answered here.
    """

    def __init__(self, routes: Mapping[tuple[bytes, ...], Route]) -> None:
        self._routes = dict(routes)
        self._encoded: dict[Route, _Encoded] = {}
        self.hook = UdpHook(lambda data, address, pktinfo: self.answer(data), log)

    def __repr__(self) -> str:
        state = "on" if self.enabled else "off"
        return f"FastPath({len(self._routes)} resources, {state}, answered={self.answered})"

    @property
    def enabled(self) -> bool:
        return self.hook.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.hook.enabled = value

    @property
    def answered(self) -> int:
        return self.hook.answered

    def answer(self, data: bytes) -> bytes | None:
        """The response datagram to the request datagram ``data``, or None for aiocoap's to
        handle. Counts the request on the resource (as its ``render_get`` does)."""
        parsed = parse(data)
        if parsed is None:
            return None
        mtype, code, tkl, options = parsed
        if mtype != CON or code != 1:  # confirmable GET
            return None
        path: list[bytes] = []
        block2 = -1
        for number, value in options:
            if number == _URI_PATH:
                path.append(value)
            elif number == _BLOCK2 and block2 < 0 and len(value) <= 3:
                block2 = int.from_bytes(value, "big")
            else:
                return None

        resource = self._routes.get(tuple(path))
        if resource is None:
            return None
        published = resource.published
        obj = published.obj
        if obj is None:
            return None
        now = published.now()
        if now > published.exp:
            return None
        max_age = published.max_age(now)
        encoded = self._encoded.get(resource)
        if (
            encoded is None
            or encoded.obj is not obj
            or encoded.max_age != max_age
            or encoded.etag != published.etag
        ):
            encoded = self._encoded[resource] = _Encoded(obj, published.etag, max_age)

        # Only an object that goes out in one message: a block-wise transfer is aiocoap's, whose
        # Block2 cache keeps the object of block 0 for that remote until the transfer ends, so a
        # re-seal in the middle of a large transfer does not break it.
        size = len(obj)
        if block2 < 0:
            if size > UNSOLICITED_LIMIT:
                return None
        else:
            szx = block2 & 0x07
            if block2 & 0x08 or szx > BLOCK_SIZE_EXP or block2 >> 4 or size > 16 << szx:
                return None  # M set in a request, BERT, a later block, or more than one block
        resource.requests += 1
        return bytes((_ACK | tkl, _CONTENT)) + data[2 : 4 + tkl] + encoded.whole

    def install(self, context: Any) -> bool:
        """Put the fast path in front of ``context``'s udp6 interface (:class:`UdpHook`). False
        (and a log line) if aiocoap's internals are not where this version expects them."""
        return self.hook.install(context)
