"""Target ``object_decode``: :meth:`oscar.ProtectedObject.from_bytes` on untrusted bytes.

Contract (oscar/objects.py): every failure raises :class:`~oscar.InvalidObject` and nothing else;
an object that decodes re-encodes to the same bytes; the pinned fast decoder and the generic
strict decoder agree (the pinned one accepts nothing the generic one refuses, and both decode the
same object the same way).
"""

from __future__ import annotations

from oscar import InvalidObject, ProtectedObject
from oscar.decoding import read_generic
from oscar.pinned import read_pinned

from ._common import expect
from ._objects import sealed

__all__ = ["TestOneInput", "seeds"]


def TestOneInput(data: bytes) -> None:
    try:
        obj = ProtectedObject.from_bytes(data)
    except InvalidObject:
        obj = None
    try:
        generic = read_generic(data)
    except InvalidObject:
        generic = None
    if obj is None:
        expect(generic is None, "the generic decoder accepts an object from_bytes refuses")
        return
    expect(generic is not None, "from_bytes (pinned decoder) accepts what the generic one refuses")
    expect(obj == generic, "the pinned and the generic decoder read the object differently")
    pinned = read_pinned(data)
    expect(pinned is None or pinned == generic, "the pinned decoder reads a different object")
    expect(obj.to_bytes() == data, "a decoded object does not re-encode to the same bytes")
    m = obj.metadata
    expect(m.resource_id.startswith(m.producer_id + "/"), "sub is not a resource of iss")
    expect(m.iat <= m.exp, "exp precedes iat")


def seeds() -> list[bytes]:
    return sealed()
