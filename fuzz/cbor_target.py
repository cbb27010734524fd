"""Target ``cbor``: strict decoding of untrusted bytes by :func:`oscar.cbor.loads`.

Contract (oscar/cbor.py): bad input raises :class:`~oscar.cbor.MalformedCBOR` and nothing else;
a value that decodes is in preferred serialisation, so :func:`~oscar.cbor.dumps` gives back the
very same bytes; :func:`~oscar.cbor.diagnostic` renders any decoded value.
"""

from __future__ import annotations

from oscar import cbor

from ._common import expect

__all__ = ["TestOneInput", "seeds"]


def TestOneInput(data: bytes) -> None:
    try:
        value = cbor.loads(data)
    except cbor.MalformedCBOR:
        return
    expect(cbor.dumps(value) == data, "a decoded value does not re-encode to the same bytes")
    expect(isinstance(cbor.diagnostic(value), str), "diagnostic notation is not text")


def seeds() -> list[bytes]:
    values: list[object] = [
        0,
        23,
        24,
        2**64 - 1,
        -(2**64),
        b"",
        b"\x00" * 30,
        "",
        "temp\u00e9rature",
        [1, [2, [3, []]]],
        {1: -7, 4: b"k" * 8, "x": None, -65537: True, -65538: False},
        cbor.Tag(18, [b"\xa0", {}, b"payload", b"sig"]),
    ]
    return [cbor.dumps(v) for v in values]
