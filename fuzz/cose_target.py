"""Target ``cose``: :meth:`oscar.cose.Sign1.from_bytes` and :meth:`~oscar.cose.Encrypt0.from_bytes`.

Contract (oscar/cose.py): anything malformed raises :class:`~oscar.errors.InvalidObject` and
nothing else, tagged or untagged; a message that decodes re-encodes (``to_bytes``) to the same
bytes, and ``algorithm_id()`` raises nothing but InvalidObject.
"""

from __future__ import annotations

import contextlib

from oscar import cbor
from oscar.cose import Encrypt0, Sign1
from oscar.errors import InvalidObject

from ._common import expect

__all__ = ["TestOneInput", "seeds"]


def TestOneInput(data: bytes) -> None:
    for kind in (Sign1, Encrypt0):
        for tag_required in (True, False):
            try:
                message = kind.from_bytes(data, tag_required=tag_required)
            except InvalidObject:
                continue
            tagged = data[:1] in (b"\xd2", b"\xd0")
            expect(
                message.to_bytes(tagged=tagged) == data,
                f"{kind.__name__} does not re-encode to the bytes it was decoded from",
            )
            with contextlib.suppress(InvalidObject):
                message.algorithm_id()


def seeds() -> list[bytes]:
    protected = cbor.dumps({1: -7, 4: b"12345678"})
    inner = cbor.dumps(cbor.Tag(16, [cbor.dumps({1: 10, 3: 0}), {6: b"\x01"}, b"c" * 16]))
    return [
        cbor.dumps(cbor.Tag(18, [protected, {}, inner, b"s" * 64])),
        cbor.dumps([b"", {1: -8}, b"payload", b""]),
        inner,
        cbor.dumps([cbor.dumps({1: 1}), {5: b"\x00" * 12}, b"x"]),
    ]
