"""Strict CBOR (RFC 8949) decoding of untrusted bytes, encoding, and diagnostic notation.

The decoder accepts only the subset protected objects and COSE messages use, and only in its
preferred serialisation, so that one value has one encoding:

- unsigned and negative integers up to 64 bits, byte strings, UTF-8 text strings, arrays, maps whose
  keys are integers or text, tags, and the simple values false, true and null;
- definite lengths only, every argument in its shortest form, no duplicate map keys;
- nesting bounded by ``max_depth``, container elements in all by ``max_items``; no bytes after the
  single top-level item.

Anything else (floats, undefined, indefinite lengths, reserved additional information, truncation)
raises :class:`MalformedCBOR` (defined in :mod:`oscar.errors`, re-exported here), and nothing else
is ever raised for bad input. The decoder does not interpret tags: a tag comes back as
:class:`Tag` and the caller decides what it means.

Encoding (:func:`dumps`) writes the same subset in preferred serialisation; map keys keep the
order the caller gives them. Both directions are plain Python with no dependency: the test suite
cross-checks them against cbor2.

This module does no I/O and knows nothing of COSE.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Union

from .errors import MalformedCBOR

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "MalformedCBOR",
    "Tag",
    "decode_item",
    "diagnostic",
    "dumps",
    "head",
    "loads",
]

DEFAULT_MAX_DEPTH = 16
MAX_DEPTH = 256
DEFAULT_MAX_ITEMS = 65_536

#: What the decoder returns. Nested containers hold the same kinds.
Value = Union[int, bytes, str, bool, None, list["Value"], dict[int | str, "Value"], "Tag"]


class Tag(NamedTuple):
    """A tagged data item (major type 6), left uninterpreted.

    A NamedTuple rather than a frozen dataclass: it is made for every object received, and on
    CPython 3.11 it is built about five times faster while staying immutable.
    """

    tag: int
    value: Value


# Smallest value each additional-information length may carry (shortest-form rule).
_MIN_FOR_LENGTH = {1: 24, 2: 0x100, 4: 0x10000, 8: 0x100000000}
_SIMPLE = {20: False, 21: True, 22: None}


def _item(data: bytes, pos: int, end: int, depth: int, limits: list[int]) -> tuple[Value, int]:
    """Decode the item at ``pos``; return it and the position after it.

    ``limits`` is ``[max_depth, items left]``, shared by the whole decode.
    """
    if pos >= end:
        raise MalformedCBOR("truncated")
    initial = data[pos]
    pos += 1
    major = initial >> 5
    info = initial & 0x1F
    if major == 7:
        if 20 <= info <= 22:
            return _SIMPLE[info], pos
        raise MalformedCBOR("unsupported simple value or float")
    if info < 24:
        arg = info
    elif info < 28:
        size = 1 << (info - 24)
        stop = pos + size
        if stop > end:
            raise MalformedCBOR("truncated")
        arg = int.from_bytes(data[pos:stop], "big")
        if arg < _MIN_FOR_LENGTH[size]:
            raise MalformedCBOR("argument not in shortest form")
        pos = stop
    elif info == 31:
        raise MalformedCBOR("indefinite length")
    else:
        raise MalformedCBOR("reserved additional information")

    if major == 2:
        stop = pos + arg
        if stop > end:
            raise MalformedCBOR("truncated")
        return data[pos:stop], stop
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major == 3:
        stop = pos + arg
        if stop > end:
            raise MalformedCBOR("truncated")
        try:
            return data[pos:stop].decode("utf-8"), stop
        except UnicodeDecodeError:
            raise MalformedCBOR("invalid UTF-8 in text string") from None
    if depth >= limits[0]:
        raise MalformedCBOR("nested too deeply")
    depth += 1
    # Containers spend the item budget up front, so junk costs little before it is refused.
    limits[1] -= arg << 1 if major == 5 else arg if major == 4 else 1
    if limits[1] < 0:
        raise MalformedCBOR("too many items")
    if major == 4:
        # Every item takes at least one byte: refuse impossible counts before looping.
        if arg > end - pos:
            raise MalformedCBOR("truncated")
        items: list[Value] = []
        for _ in range(arg):
            # Small integers are most items of a COSE header: decode them without a call.
            if pos < end and data[pos] < 0x18:
                items.append(data[pos])
                pos += 1
            else:
                value, pos = _item(data, pos, end, depth, limits)
                items.append(value)
        return items, pos
    if major == 5:
        if 2 * arg > end - pos:
            raise MalformedCBOR("truncated")
        mapping: dict[int | str, Value] = {}
        for _ in range(arg):
            if pos >= end:
                raise MalformedCBOR("truncated")
            initial = data[pos]
            key: int | str
            if initial < 0x18:  # small unsigned key, the usual COSE label
                key = initial
                pos += 1
            elif 0x20 <= initial < 0x38:  # small negative key
                key = 0x1F - initial
                pos += 1
            else:
                decoded, pos = _item(data, pos, end, depth, limits)
                if type(decoded) is not int and type(decoded) is not str:
                    raise MalformedCBOR("map key is neither integer nor text")
                key = decoded
            if key in mapping:
                raise MalformedCBOR("duplicate map key")
            if pos < end and data[pos] < 0x18:
                mapping[key] = data[pos]
                pos += 1
            else:
                mapping[key], pos = _item(data, pos, end, depth, limits)
        return mapping, pos
    # major == 6
    value, pos = _item(data, pos, end, depth, limits)
    return Tag(arg, value), pos


def loads(
    data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, max_items: int = DEFAULT_MAX_ITEMS
) -> Value:
    """Decode exactly one strict CBOR item from ``data``.

    Raises :class:`MalformedCBOR` for anything outside the accepted subset, for trailing bytes, for
    nesting deeper than ``max_depth`` and for more than ``max_items`` container elements in all;
    :class:`TypeError` if ``data`` is not bytes; ValueError if ``max_depth`` exceeds
    :data:`MAX_DEPTH` (deeper would exhaust Python's stack).
    """
    if not 0 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"max_depth must be between 0 and {MAX_DEPTH}")
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("CBOR input must be bytes")
        data = bytes(data)
    end = len(data)
    value, pos = _item(data, 0, end, 0, [max_depth, max_items])
    if pos != end:
        raise MalformedCBOR("trailing bytes after the CBOR item")
    return value


def decode_item(
    data: bytes, pos: int, end: int, depth: int, limits: list[int]
) -> tuple[Value, int]:
    """One strict item at ``pos`` of ``data[:end]`` and the position after it, for a reader that
    takes a message apart piece by piece (:mod:`oscar.streaming`): ``depth`` is the item's own
    depth in the message, ``limits`` is ``[max_depth, items left]``, spent as :func:`loads`
    spends it. Raises :class:`MalformedCBOR` (``"truncated"`` when ``end`` comes too soon)."""
    return _item(data, pos, end, depth, limits)


def head(major: int, argument: int) -> bytes:
    """The initial byte(s) of an item of ``major`` type with ``argument``, in shortest form."""
    if argument < 24:
        return _HEADS[major][argument]
    if argument < 0x100:
        return bytes((major << 5 | 24, argument))
    if argument < 0x10000:
        return bytes((major << 5 | 25,)) + argument.to_bytes(2, "big")
    if argument < 0x100000000:
        return bytes((major << 5 | 26,)) + argument.to_bytes(4, "big")
    if argument < 0x10000000000000000:
        return bytes((major << 5 | 27,)) + argument.to_bytes(8, "big")
    raise ValueError("CBOR integers and lengths are limited to 64 bits")


_HEADS = [[bytes((major << 5 | n,)) for n in range(24)] for major in range(8)]


def dumps(value: object) -> bytes:
    """Encode ``value`` in preferred serialisation; map keys keep the order given.

    Accepts int (-2**64 to 2**64 - 1), bytes, str, bool, None, list, tuple, dict and :class:`Tag`;
    raises ``TypeError`` for any other type and ``ValueError`` for an integer out of range.
    """
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: object, out: list[bytes]) -> None:
    if type(value) is bytes:
        out.append(head(2, len(value)))
        out.append(value)
    elif type(value) is int:
        out.append(head(0, value) if value >= 0 else head(1, -1 - value))
    elif type(value) is str:
        raw = value.encode("utf-8")
        out.append(head(3, len(raw)))
        out.append(raw)
    elif type(value) is list or type(value) is tuple:
        out.append(head(4, len(value)))
        for item in value:
            _encode(item, out)
    elif type(value) is dict:
        out.append(head(5, len(value)))
        for key, item in value.items():
            _encode(key, out)
            _encode(item, out)
    elif type(value) is Tag:
        out.append(head(6, value.tag))
        _encode(value.value, out)
    elif value is True:
        out.append(b"\xf5")
    elif value is False:
        out.append(b"\xf4")
    elif value is None:
        out.append(b"\xf6")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _encode(bytes(value), out)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as CBOR")


def diagnostic(value: Value, indent: int | None = None, _level: int = 0) -> str:
    """Render a decoded value in CBOR diagnostic notation (RFC 8949 §8), e.g. ``{1: h'0a'}``.

    With ``indent`` set, maps and arrays with nested containers are spread over several lines.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return f"h'{value.hex()}'"
    if isinstance(value, str):
        # RFC 8949 §8: text strings are escaped as in JSON (control characters included).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Tag):
        return f"{value.tag}({diagnostic(value.value, indent, _level)})"
    if isinstance(value, list):
        parts = [diagnostic(v, indent, _level + 1) for v in value]
        return _join(
            "[", "]", parts, indent, _level, any(isinstance(v, (list, dict)) for v in value)
        )
    parts = [f"{diagnostic(k)}: {diagnostic(v, indent, _level + 1)}" for k, v in value.items()]
    nested = any(isinstance(v, (list, dict)) for v in value.values())
    return _join("{", "}", parts, indent, _level, nested)


def _join(
    opening: str, closing: str, parts: list[str], indent: int | None, level: int, nested: bool
) -> str:
    if indent is None or not nested or not parts:
        return opening + ", ".join(parts) + closing
    pad = " " * (indent * (level + 1))
    return (
        opening
        + "\n"
        + ",\n".join(pad + p for p in parts)
        + "\n"
        + " " * (indent * level)
        + closing
    )
