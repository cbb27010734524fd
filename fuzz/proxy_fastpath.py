"""Target ``proxy_fastpath``: :meth:`proxy.fastpath.FastPath.answer` on any datagram.

Contract (proxy/fastpath.py): ``answer`` returns None (aiocoap handles the datagram), ``b""``
(taken: an ACK or RST of a fast observation's message, or a NON on its token with its
registration's message ID: a duplicate), or the bytes of an answer, and never raises. A repeat
of a held registration's message (its token and message ID) gets that registration's answer
again (nothing for a NON), as aiocoap's deduplication does. Otherwise it answers only what
aiocoap decodes as a GET (CON or NON, token of at most 8 bytes, no payload, no option but ETag,
Uri-Path and Proxy-Uri, and an empty Observe: a registration, answered with Observe 0 or,
declined by a limit, without) naming, as :meth:`proxy.server.ProxySite.target` reads it, a
resource whose entry is fresh; the answer is a 2.05 with the entry's object or a 2.03 exactly
when one of the request's ETags is the entry's, with the request's token, on the ACK with the
request's message ID (CON) or as a NON.
"""

from __future__ import annotations

from pathlib import Path

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from oscar.objects import object_etag
from proxy.cache import Cache
from proxy.config import ProxyConfig
from proxy.core import Proxy
from proxy.entry import Entry
from proxy.fastpath import FastPath
from proxy.server import ProxySite

from ._common import expect

__all__ = ["TestOneInput", "seeds"]

NOW = 1_800_000_000.0
HOST = "127.0.0.1:40000"
ADDRESS = ("::ffff:127.0.0.1", 40000, 0, 0)
_RESOURCES = ("sensor-1/temperature", "pub-2/reading", "sensor-1/large")


class _Mids:
    """aiocoap's message ID sequence (for NON answers), without aiocoap."""

    def __init__(self) -> None:
        self.mid = 0

    def _next_message_id(self) -> int:
        self.mid = (self.mid + 1) & 0xFFFF
        return self.mid


def _fast_path() -> FastPath:
    config = ProxyConfig(
        bundle=Path("/nonexistent/bundle"),
        state=Path("/nonexistent/state"),
        listen=("127.0.0.1", 5683),
        dtls=False,
    )
    proxy = Proxy(config, clock=lambda: NOW)
    proxy._cache = Cache(None, max_entries=16, max_bytes=1 << 20)
    for seq, (rid, size) in enumerate(zip(_RESOURCES, (206, 100, 2000), strict=True), 1):
        obj = bytes(range(256)) * (size // 256) + bytes(size % 256)
        etag = object_etag(rid, 1, seq)
        proxy.cache.put(
            Entry(rid, obj, 1, seq, int(NOW) + 3600, etag, b"k", 1, None, None, NOW + 60)
        )
    site = ProxySite(proxy)
    site.addresses.prove(HOST, site.addresses.challenge(HOST))
    fast = FastPath(site)
    fast.hook.message_manager = _Mids()
    return fast


_FAST = _fast_path()


def TestOneInput(data: bytes) -> None:
    token, mid = (data[4 : 4 + (data[0] & 0x0F)], int.from_bytes(data[2:4])) if data else (b"", -1)
    held = _FAST.observe.by_key.get((HOST, token))
    answer = _FAST.answer(data, HOST, ADDRESS)
    if answer is None:
        return
    if held is not None and held.mid == mid and (data[0] >> 4) & 3 in (Type.CON, Type.NON):
        expect(answer == held.answer, "a repeated registration not answered as the first")
        return
    expect(type(answer) is bytes, "answer returned something other than None or bytes")
    if answer == b"":  # taken: an ACK or RST, or a NON repeating a registration's message ID
        expect((data[0] >> 4) & 3 in (Type.ACK, Type.RST, Type.NON), "took another datagram")
        return
    request = Message.decode(data)
    expect(request.code == Code.GET and request.payload == b"", "answered a non-GET")
    expect(request.mtype in (Type.CON, Type.NON) and len(request.token) <= 8, "bad type/token")
    numbers = {int(o.number) for o in request.opt.option_list()}
    expect(numbers <= {4, 6, 11, 35}, "answered a request with another option")
    if 6 in numbers:
        expect(request.opt.observe == 0, "not a registration")
        observe = Message.decode(answer).opt.observe
        expect(observe in (0, None), "a registration answered with Observe other than 0")
    resource_id, _ = _FAST.site.target(request)  # BadTarget: the fast path read it otherwise
    entry = _FAST.proxy.cache.in_memory(resource_id)
    if entry is None:
        expect(False, "answered for a resource it does not hold")
        return
    reply = Message.decode(answer)
    expect(reply.token == request.token, "token changed")
    if request.mtype == Type.CON:
        expect(reply.mtype == Type.ACK and reply.mid == request.mid, "not the ACK of the request")
    else:
        expect(reply.mtype == Type.NON, "a NON request not answered NON")
    expect(reply.opt.etag == entry.etag, "not the entry's ETag")
    if entry.etag in (request.opt.etags or ()):
        expect(reply.code == Code.VALID and reply.payload == b"", "not a 2.03")
    else:
        expect(reply.code == Code.CONTENT and reply.payload == entry.obj, "not the object")


def _request(mtype: Type = Type.CON, **options: object) -> bytes:
    message = Message(code=1, **options)
    message.mtype, message.mid, message.token = mtype, 0x1234, b"\x01\x02\x03\x04"
    return bytes(message.encode())


def seeds() -> list[bytes]:
    etag = object_etag(_RESOURCES[0], 1, 1)
    return [
        _request(uri_path=("sensor-1", "temperature")),
        _request(Type.NON, uri_path=("pub-2", "reading")),
        _request(uri_path=("sensor-1", "temperature"), etags=(b"x", etag)),
        _request(proxy_uri="coap://127.0.0.1:5700/sensor-1/temperature"),
        _request(uri_path=("sensor-1", "large")),
        _request(uri_path=("sensor-1", "temperature"), observe=0),
        _request(Type.NON, uri_path=("pub-2", "reading"), observe=0),
        _request(Type.NON, uri_path=("pub-2", "reading"), etags=(etag,), observe=0),
    ]
