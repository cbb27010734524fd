"""Target ``producer_fastpath``: :meth:`producer.fastpath.FastPath.answer` on any datagram.

Contract (producer/fastpath.py): ``answer`` returns None (aiocoap handles the datagram) or the
bytes of an answer, and never raises. An answer is a piggybacked ACK 2.05 that aiocoap decodes,
with the request's message ID and token.
"""

from __future__ import annotations

from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from oscar.objects import object_etag
from producer.config import ResourceSpec
from producer.core import Published
from producer.fastpath import FastPath
from producer.server import ObjectResource

from ._common import expect

__all__ = ["TestOneInput", "seeds"]

DEVICE = "sensor-9"
NOW = 1_800_000_000
_PATHS = ("temperature", "room/a/humidity", "a-rather-long-segment-name", "empty")


class _StandIn:
    """What the fast path needs of a producer: an id, resources and a clock (pinned)."""

    def __init__(self) -> None:
        self.device_id = DEVICE
        self.resources = {p: Published(self, ResourceSpec(p)) for p in _PATHS}  # type: ignore[arg-type]

    def now(self) -> int:
        return NOW

    def publish(self, published: Published) -> None:
        pass


def _fast_path() -> FastPath:
    producer = _StandIn()
    for i, size in enumerate((206, 1124, 3000)):
        published = producer.resources[_PATHS[i]]
        published.obj = bytes(range(256)) * (size // 256) + bytes(size % 256)
        published.iat, published.exp = NOW, NOW + 3600
        published.epoch, published.seq = 1, i + 1
        published.etag = object_etag(published.resource_id, 1, i + 1)
    routes = {
        tuple(s.encode() for s in (DEVICE, *p.split("/"))): ObjectResource(r)
        for p, r in producer.resources.items()
    }
    return FastPath(routes)


_FAST = _fast_path()


def TestOneInput(data: bytes) -> None:
    answer = _FAST.answer(data)
    if answer is None:
        return
    expect(type(answer) is bytes, "answer returned something other than None or bytes")
    reply = Message.decode(answer)
    request = Message.decode(data)
    expect(reply.mtype == Type.ACK and reply.code == Code.CONTENT, "not an ACK 2.05")
    expect(reply.mid == request.mid and reply.token == request.token, "mid or token changed")


def _request(path: str, **options: object) -> bytes:
    message = Message(code=1, **options)  # type: ignore[arg-type]
    message.opt.uri_path = (DEVICE, *path.split("/"))
    # Set afterwards: aiocoap deprecates these as keywords.
    message.mtype, message.mid, message.token = Type.CON, 0x1234, b"\x01\x02\x03\x04"
    return bytes(message.encode())


def seeds() -> list[bytes]:
    return [_request(p) for p in _PATHS] + [
        _request("temperature", block2=(0, False, 6)),
        _request("room/a/humidity", block2=(0, False, 2)),
        _request("temperature", observe=0),
    ]
