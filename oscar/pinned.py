"""The pinned reader: a protected object laid out exactly as DESIGN §4 pins it, read field by field.

Every object a conforming sealer makes has one encoding (preferred serialisation, header labels in
RFC 8949 §4.2.1 order), so it can be read without the generic decoder's recursion and maps: three
to four times faster, and decoding is most of what opening a small object costs in Python.

What this module does not do: refuse anything. Bytes that leave the pinned layout anywhere, or that
are laid out right but fail a check, make :func:`read_pinned` return None, and
:meth:`oscar.decoding.ProtectedObject.from_bytes` hands them to the generic strict decoder
(:func:`oscar.decoding.read_generic`), which accepts or refuses them with a reason; so refusals
always come from one place. The test suite checks that both readers agree on valid objects and on
every mutation of them.
"""

from __future__ import annotations

from typing import TypeAlias

from . import certs
from .algorithms import aead_for, signature_for
from .cbor import _MIN_FOR_LENGTH, dumps
from .cose import ALG, CONTENT_TYPE, KID, PARTIAL_IV, Encrypt0, Sign1
from .errors import InvalidObject
from .model import CWT_CLAIMS, EPOCH, EXP, IAT, ISS, SEQ, SUB, ObjectMetadata, partial_iv
from .names import owns

__all__ = ["ObjectParts", "read_pinned"]

#: What a reader finds in an object: the fields of a :class:`~oscar.decoding.ProtectedObject`.
ObjectParts: TypeAlias = "tuple[ObjectMetadata, Sign1, Encrypt0]"


class _NotPinned(Exception):
    """The bytes leave the pinned layout somewhere: the generic decoder decides."""


def _bstr(data: bytes, pos: int) -> tuple[int, int]:
    """Start and end of the byte string at ``pos``, its head in shortest form."""
    initial = data[pos]
    if 0x40 <= initial < 0x58:
        start = pos + 1
        return start, start + initial - 0x40
    if initial == 0x58:
        length = data[pos + 1]
        if length < 24:
            raise _NotPinned
        return pos + 2, pos + 2 + length
    if initial == 0x59:
        length = data[pos + 1] << 8 | data[pos + 2]
        if length < 0x100:
            raise _NotPinned
        return pos + 3, pos + 3 + length
    if initial == 0x5A:
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if length < 0x10000:
            raise _NotPinned
        return pos + 5, pos + 5 + length
    raise _NotPinned


def _text(data: bytes, pos: int) -> tuple[str, int]:
    """The text string at ``pos`` (at most 255 bytes: ids are short) and the position after it."""
    initial = data[pos]
    if 0x60 <= initial < 0x78:
        start = pos + 1
        end = start + initial - 0x60
    elif initial == 0x78 and data[pos + 1] >= 24:
        start = pos + 2
        end = start + data[pos + 1]
    else:
        raise _NotPinned
    if end > len(data):
        raise _NotPinned
    return data[start:end].decode("utf-8"), end


def _uint_at(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned integer at ``pos``, in shortest form, and the position after it."""
    initial = data[pos]
    if initial < 0x18:
        return initial, pos + 1
    if 0x18 <= initial <= 0x1B:
        size = 1 << (initial - 0x18)
        end = pos + 1 + size
        if end > len(data):
            raise _NotPinned
        value = int.from_bytes(data[pos + 1 : end], "big")
        if value < _MIN_FOR_LENGTH[size]:  # the strict decoder's shortest-form rule
            raise _NotPinned
        return value, end
    raise _NotPinned


_EPOCH_LABEL = dumps(EPOCH)
_SEQ_LABEL = dumps(SEQ)


def read_pinned(data: bytes) -> ObjectParts | None:
    """The parts of an object laid out exactly as DESIGN §4 pins it, or None (see the module
    docstring): None also for an object laid out right that fails a check (a malformed id, a
    Partial IV that does not match). Raises nothing."""
    try:
        return _read_pinned_or_raise(data)
    except (_NotPinned, IndexError, UnicodeDecodeError, InvalidObject):
        return None


def _read_pinned_or_raise(data: bytes) -> ObjectParts:
    if data[0] != 0xD2 or data[1] != 0x84:  # tag 18, array of 4
        raise _NotPinned
    # Sign1 protected header: {1: alg, 4: kid, 15: {1: iss, 2: sub, 4: exp, 6: iat},
    #                          -65537: epoch, -65538: seq}
    start, p_end = _bstr(data, 2)
    if data[start] != 0xA5 or data[start + 1] != ALG:
        raise _NotPinned
    alg_byte = data[start + 2]
    if not 0x20 <= alg_byte < 0x38:  # a small negative integer, as ES256 (-7) and EdDSA (-8)
        raise _NotPinned
    signature_algorithm = signature_for(0x1F - alg_byte)
    pos = start + 3
    if data[pos] != KID or data[pos + 1] != 0x40 + certs.KID_LENGTH:
        raise _NotPinned
    kid = data[pos + 2 : pos + 2 + certs.KID_LENGTH]
    pos += 2 + certs.KID_LENGTH
    if data[pos] != CWT_CLAIMS or data[pos + 1] != 0xA4 or data[pos + 2] != ISS:
        raise _NotPinned
    producer_id, pos = _text(data, pos + 3)
    if data[pos] != SUB:
        raise _NotPinned
    resource_id, pos = _text(data, pos + 1)
    if data[pos] != EXP:
        raise _NotPinned
    exp, pos = _uint_at(data, pos + 1)
    if data[pos] != IAT:
        raise _NotPinned
    iat, pos = _uint_at(data, pos + 1)
    if data[pos : pos + 5] != _EPOCH_LABEL:
        raise _NotPinned
    epoch, pos = _uint_at(data, pos + 5)
    if data[pos : pos + 5] != _SEQ_LABEL:
        raise _NotPinned
    seq, pos = _uint_at(data, pos + 5)
    if pos != p_end:
        raise _NotPinned
    protected = data[start:p_end]
    if data[p_end] != 0xA0:  # empty unprotected header
        raise _NotPinned
    payload_start, payload_end = _bstr(data, p_end + 1)
    sig_start, sig_end = _bstr(data, payload_end)
    if sig_end != len(data):
        raise _NotPinned

    # Encrypt0: tag 16, [protected {1: alg, 3: content format}, {6: piv}, ciphertext]
    if data[payload_start] != 0xD0 or data[payload_start + 1] != 0x83:
        raise _NotPinned
    e_start, e_end = _bstr(data, payload_start + 2)
    if data[e_start] != 0xA2 or data[e_start + 1] != ALG:
        raise _NotPinned
    aead_id, pos = _uint_at(data, e_start + 2)
    if data[pos] != CONTENT_TYPE:
        raise _NotPinned
    content_format, pos = _uint_at(data, pos + 1)
    if pos != e_end or content_format > 0xFFFF:
        raise _NotPinned
    if data[e_end] != 0xA1 or data[e_end + 1] != PARTIAL_IV:
        raise _NotPinned
    piv_start, piv_end = _bstr(data, e_end + 2)
    ct_start, ct_end = _bstr(data, piv_end)
    if ct_end != payload_end:
        raise _NotPinned
    aead = aead_for(aead_id)
    piv = data[piv_start:piv_end]
    if (
        not owns(producer_id, resource_id)  # both ids well-formed, the resource the producer's
        or exp < iat
        or piv != partial_iv(seq)
        or ct_end - ct_start < aead.tag_length
    ):
        raise _NotPinned
    payload = data[payload_start:payload_end]
    enc_protected = data[e_start:e_end]
    sign1 = Sign1(
        protected,
        {
            ALG: 0x1F - alg_byte,
            KID: kid,
            CWT_CLAIMS: {ISS: producer_id, SUB: resource_id, EXP: exp, IAT: iat},
            EPOCH: epoch,
            SEQ: seq,
        },
        {},
        payload,
        data[sig_start:sig_end],
    )
    encrypt0 = Encrypt0(
        enc_protected,
        {ALG: aead_id, CONTENT_TYPE: content_format},
        {PARTIAL_IV: piv},
        data[ct_start:ct_end],
    )
    metadata = ObjectMetadata(
        producer_id,
        resource_id,
        epoch,
        seq,
        iat,
        exp,
        content_format,
        aead,
        signature_algorithm,
        kid,
    )
    return metadata, sign1, encrypt0
