"""How the ``oscar`` tool shows an object: ``inspect``'s rendering, and the JSON of ``open``.

:func:`describe` renders the headers of any decodable COSE_Sign1, verifying nothing, line by line;
:func:`printable` makes a line safe for a terminal (an object is untrusted: it must not drive the
terminal or hide what the operator sees); :func:`metadata_json` is an object's signed metadata as
JSON-ready values.

What this module does not do: read or write files, verify anything, or decide an exit status
(:mod:`oscar_io.tool` does). :func:`describe` raises :class:`~oscar.errors.InvalidObject` when the
bytes are not a COSE_Sign1 at all.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Mapping

from oscar import algorithms, cbor, objects, parts
from oscar.cose import ALG, CONTENT_TYPE, CRIT, IV, KID, PARTIAL_IV, Encrypt0, Sign1
from oscar.errors import InvalidObject

__all__ = ["describe", "metadata_json", "printable"]

_HEADER_LABELS: dict[int | str, str] = {
    ALG: "alg",
    CRIT: "crit",
    CONTENT_TYPE: "content type",
    KID: "kid",
    IV: "IV",
    PARTIAL_IV: "Partial IV",
    objects.CWT_CLAIMS: "CWT claims",
    objects.EPOCH: "epoch",
    objects.SEQ: "seq",
    parts.PARTS: "parts",
}
_CLAIM_LABELS: dict[int | str, str] = {
    1: "iss",
    2: "sub",
    3: "aud",
    4: "exp",
    5: "nbf",
    6: "iat",
    7: "cti",
}
_TIME_CLAIMS = frozenset({4, 5, 6})
_ALG_NAMES = {
    **{cose_id: aead.name for cose_id, aead in algorithms.AEADS.items()},
    **{cose_id: sig.name for cose_id, sig in algorithms.SIGNATURES.items()},
}
# C0 and C1 controls, DEL: an object is untrusted, and must not drive the terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def printable(text: str, *, keep_newlines: bool = False) -> str:
    pattern = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    text = pattern.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    # Format characters (bidi overrides, zero-width joiners) and line/paragraph separators would let
    # a crafted header rearrange or hide what the operator sees.
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cf", "Zl", "Zp") else c for c in text
    )


def metadata_json(m: objects.ObjectMetadata) -> dict[str, object]:
    return {
        "producer": m.producer_id,
        "resource": m.resource_id,
        "epoch": m.epoch,
        "seq": m.seq,
        "iat": m.iat,
        "exp": m.exp,
        "content_format": m.content_format,
        "aead": m.aead.name,
        "signature": m.signature_algorithm.name,
        "kid": m.kid.hex(),
    }


def _label(label: int | str, names: Mapping[int | str, str]) -> str:
    name = names.get(label)
    return cbor.diagnostic(label) + (f" {name}" if name else "")


def _time(value: cbor.Value) -> str:
    if type(value) is not int:
        return cbor.diagnostic(value)
    try:
        moment = datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return str(value)
    return f"{value} ({moment.strftime('%Y-%m-%dT%H:%M:%SZ')})"


def _header_value(label: int | str, value: cbor.Value) -> str:
    text = cbor.diagnostic(value)
    if label == ALG and type(value) is int:
        return f"{text} ({_ALG_NAMES.get(value, 'unsupported')})"
    if label == PARTIAL_IV and type(value) is bytes:
        return f"{text} (seq {int.from_bytes(value, 'big')})"
    return text


def _header(title: str, header: Mapping[int | str, cbor.Value], pad: str) -> list[str]:
    if not header:
        return [f"{pad}{title}: {{}}"]
    lines = [f"{pad}{title}:"]
    for label, value in header.items():
        name = _label(label, _HEADER_LABELS)
        if label == objects.CWT_CLAIMS and isinstance(value, dict):
            lines.append(f"{pad}  {name}:")
            for claim, claimed in value.items():
                shown = _time(claimed) if claim in _TIME_CLAIMS else cbor.diagnostic(claimed)
                lines.append(f"{pad}    {_label(claim, _CLAIM_LABELS)}: {shown}")
        else:
            lines.append(f"{pad}  {name}: {_header_value(label, value)}")
    return lines


def _tagged(data: bytes, tag: int) -> bool:
    # The strict decoder only accepts shortest forms, so a tag below 24 is this one initial byte.
    return data[:1] == bytes([0xC0 | tag])


def describe(data: bytes) -> list[str]:
    sign1 = Sign1.from_bytes(data, tag_required=False)
    tag = "tag 18" if _tagged(data, 18) else "untagged"
    lines = [f"COSE_Sign1 ({tag}), {len(data)} bytes: decoded only, not verified"]
    lines += _header(f"protected ({len(sign1.protected)} bytes)", sign1.protected_map, "  ")
    lines += _header("unprotected", sign1.unprotected, "  ")
    lines += _payload(sign1.payload)
    lines.append(f"  signature: {cbor.diagnostic(sign1.signature)} ({len(sign1.signature)} bytes)")
    try:
        objects.ProtectedObject.from_bytes(data)
    except InvalidObject as exc:
        try:
            multi = parts.MultiPartObject.from_bytes(data)
        except InvalidObject:
            lines.append(f"structure: not an OSCAR protected object ({exc.reason})")
            return lines
        lines += _parts(multi)
        return lines
    lines.append("structure: an OSCAR protected object (signature, signer, expiry not checked)")
    return lines


def _parts(obj: parts.MultiPartObject) -> list[str]:
    """A multi-part object's parts (issue 19): name, audience, sizes; never a part's bytes."""
    lines = [f"parts ({len(obj.items)}), in order:"]
    for descriptor, item in zip(obj.metadata.parts, obj.items, strict=True):
        name = printable(descriptor.name)
        cf = descriptor.content_format
        if isinstance(item, bytes):
            lines.append(f"  {name}: plain, content format {cf}, {len(item)} bytes")
        else:
            lines.append(
                f"  {name}: encrypted under its own secret, epoch {descriptor.epoch}, "
                f"content format {cf}, {len(item.ciphertext)} bytes of ciphertext (with the tag)"
            )
    lines.append("structure: an OSCAR multi-part object (signature, signer, expiry not checked)")
    return lines


def _payload(payload: bytes) -> list[str]:
    try:
        encrypt0 = Encrypt0.from_bytes(payload, tag_required=False)
    except InvalidObject as exc:
        try:
            shown = cbor.diagnostic(cbor.loads(payload))
        except cbor.MalformedCBOR:
            shown = f"h'{payload[:32].hex()}{'...' if len(payload) > 32 else ''}'"
        return [f"  payload: {len(payload)} bytes, not a COSE_Encrypt0 ({exc.reason}): {shown}"]
    tag = "tag 16" if _tagged(payload, 16) else "untagged"
    return [
        f"  payload: COSE_Encrypt0 ({tag}), {len(payload)} bytes",
        *_header(f"protected ({len(encrypt0.protected)} bytes)", encrypt0.protected_map, "    "),
        *_header("unprotected", encrypt0.unprotected, "    "),
        f"    ciphertext: {len(encrypt0.ciphertext)} bytes (with the tag)",
    ]
