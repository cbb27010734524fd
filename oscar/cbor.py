"""Strict CBOR (RFC 8949) decoding of untrusted bytes, encoding, and diagnostic notation.

The decoder accepts only the subset protected objects and COSE messages use, and only in its
preferred serialisation, so that one value has one encoding:

- unsigned and negative integers up to 64 bits, byte strings, UTF-8 text strings, arrays, maps whose
  keys are integers or text, tags, and the simple values false, true and null;
- definite lengths only, every argument in its shortest form, no duplicate map keys;
- nesting bounded by ``max_depth``; no bytes after the single top-level item.

Anything else (floats, undefined, indefinite lengths, reserved additional information, truncation)
raises :class:`MalformedCBOR`, and nothing else is ever raised for bad input. The decoder does not
interpret tags: a tag comes back as :class:`Tag` and the caller decides what it means.

Encoding is delegated to cbor2, whose output for the types above is already the preferred
serialisation; map keys keep the order the caller gives them.

This module does no I/O and knows nothing of COSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import cbor2

__all__ = ["DEFAULT_MAX_DEPTH", "MalformedCBOR", "Tag", "diagnostic", "dumps", "loads"]

DEFAULT_MAX_DEPTH = 16

#: What the decoder returns. Nested containers hold the same kinds.
Value = Union[int, bytes, str, bool, None, list["Value"], dict[int | str, "Value"], "Tag"]


class MalformedCBOR(ValueError):
    """The bytes are not CBOR of the strict subset this decoder accepts."""


@dataclass(frozen=True, slots=True)
class Tag:
    """A tagged data item (major type 6), left uninterpreted."""

    tag: int
    value: Value


# Smallest value each additional-information length may carry (shortest-form rule).
_MIN_FOR_LENGTH = {1: 24, 2: 0x100, 4: 0x10000, 8: 0x100000000}
_SIMPLE = {20: False, 21: True, 22: None}


class _Decoder:
    __slots__ = ("data", "end", "max_depth")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.end = len(data)
        self.max_depth = max_depth

    def item(self, pos: int, depth: int) -> tuple[Value, int]:
        data = self.data
        if pos >= self.end:
            raise MalformedCBOR("truncated")
        initial = data[pos]
        pos += 1
        major = initial >> 5
        info = initial & 0x1F
        if major == 7:
            if info in _SIMPLE:
                return _SIMPLE[info], pos
            raise MalformedCBOR("unsupported simple value or float")
        if info < 24:
            arg = info
        elif info < 28:
            size = 1 << (info - 24)
            stop = pos + size
            if stop > self.end:
                raise MalformedCBOR("truncated")
            arg = int.from_bytes(data[pos:stop], "big")
            if arg < _MIN_FOR_LENGTH[size]:
                raise MalformedCBOR("argument not in shortest form")
            pos = stop
        elif info == 31:
            raise MalformedCBOR("indefinite length")
        else:
            raise MalformedCBOR("reserved additional information")

        if major == 0:
            return arg, pos
        if major == 1:
            return -1 - arg, pos
        if major == 2 or major == 3:
            stop = pos + arg
            if stop > self.end:
                raise MalformedCBOR("truncated")
            chunk = data[pos:stop]
            if major == 2:
                return chunk, stop
            try:
                return chunk.decode("utf-8"), stop
            except UnicodeDecodeError:
                raise MalformedCBOR("invalid UTF-8 in text string") from None
        if depth >= self.max_depth:
            raise MalformedCBOR("nested too deeply")
        if major == 4:
            # Every item takes at least one byte: refuse impossible counts before looping.
            if arg > self.end - pos:
                raise MalformedCBOR("truncated")
            items: list[Value] = []
            for _ in range(arg):
                value, pos = self.item(pos, depth + 1)
                items.append(value)
            return items, pos
        if major == 5:
            if 2 * arg > self.end - pos:
                raise MalformedCBOR("truncated")
            mapping: dict[int | str, Value] = {}
            for _ in range(arg):
                key, pos = self.item(pos, depth + 1)
                if type(key) is not int and type(key) is not str:
                    raise MalformedCBOR("map key is neither integer nor text")
                if key in mapping:
                    raise MalformedCBOR("duplicate map key")
                mapping[key], pos = self.item(pos, depth + 1)
            return mapping, pos
        # major == 6
        value, pos = self.item(pos, depth + 1)
        return Tag(arg, value), pos


def loads(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Value:
    """Decode exactly one strict CBOR item from ``data``.

    Raises :class:`MalformedCBOR` for anything outside the accepted subset, for trailing bytes and
    for nesting deeper than ``max_depth``; :class:`TypeError` if ``data`` is not bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("CBOR input must be bytes")
    raw = bytes(data)
    value, pos = _Decoder(raw, max_depth).item(0, 0)
    if pos != len(raw):
        raise MalformedCBOR("trailing bytes after the CBOR item")
    return value


def dumps(value: object) -> bytes:
    """Encode ``value`` (ints, bytes, text, lists, dicts, :class:`Tag`), preferred serialisation."""
    return cbor2.dumps(_to_cbor2(value))


def _to_cbor2(value: object) -> object:
    if isinstance(value, Tag):
        return cbor2.CBORTag(value.tag, _to_cbor2(value.value))
    if isinstance(value, list):
        return [_to_cbor2(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_cbor2(v) for k, v in value.items()}
    return value


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
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
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
