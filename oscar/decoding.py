"""Decoding a protected object: :class:`ProtectedObject` and the generic strict decoder.

:meth:`ProtectedObject.from_bytes` makes checks 1 to 3 of :mod:`oscar.objects` (size, strict CBOR
and exact structure, known algorithms): it tries the fast :mod:`oscar.pinned` reader first and
hands anything else to :func:`read_generic`, which decodes with the strict COSE layer and either
accepts the object or refuses it with :class:`~oscar.errors.InvalidObject` and a reason.

What this module does not do: check the signer, the signature, the times or freshness, or decrypt
(:mod:`oscar.opening`); a :class:`ProtectedObject` is decoded, not yet trusted.
"""

from __future__ import annotations

from typing import NamedTuple

from . import certs
from .algorithms import SignatureAlgorithm, aead_for, signature_for
from .cose import ALG, CONTENT_TYPE, KID, PARTIAL_IV, Encrypt0, HeaderMap, Sign1
from .errors import InvalidObject
from .keys import MAX_SEQ
from .model import (
    CWT_CLAIMS,
    DEFAULT_MAX_OBJECT_SIZE,
    EPOCH,
    EXP,
    IAT,
    ISS,
    SEQ,
    SUB,
    ObjectMetadata,
    partial_iv,
)
from .names import is_device_id, is_resource_id, owns
from .pinned import read_pinned

__all__ = [
    "ProtectedObject",
    "SignedHeader",
    "check_encrypt0_headers",
    "check_sign1_headers",
    "read_generic",
]


_SIGN1_LABELS = frozenset({ALG, KID, CWT_CLAIMS, EPOCH, SEQ})
_CWT_LABELS = frozenset({ISS, SUB, EXP, IAT})
_ENC_LABELS = frozenset({ALG, CONTENT_TYPE})
_MAX_PIV_LENGTH = 8


def _uint(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise InvalidObject(f"{what} is not an unsigned integer")
    return value


def _size(data: bytes | bytearray | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class ProtectedObject(NamedTuple):
    """A structurally valid protected object, decoded but not yet verified."""

    metadata: ObjectMetadata
    sign1: Sign1
    encrypt0: Encrypt0

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = DEFAULT_MAX_OBJECT_SIZE) -> ProtectedObject:
        """Checks 1 to 3 of :mod:`oscar.objects`; raises :class:`InvalidObject` on any failure."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidObject("input is not bytes")
        if _size(data) > max_size:
            raise InvalidObject("object exceeds the size limit")
        data = bytes(data)
        parts = read_pinned(data)
        return ProtectedObject(*parts) if parts is not None else read_generic(data)

    def to_bytes(self) -> bytes:
        return self.sign1.to_bytes()


def read_generic(data: bytes) -> ProtectedObject:
    """Decode with the generic strict COSE layer; checks 2 and 3, :class:`InvalidObject` if not."""
    sign1 = Sign1.from_bytes(data)
    outer = check_sign1_headers(sign1.protected_map, sign1.unprotected)
    encrypt0 = Encrypt0.from_bytes(sign1.payload)
    metadata = check_encrypt0_headers(
        outer, encrypt0.protected_map, encrypt0.unprotected, len(encrypt0.ciphertext)
    )
    return ProtectedObject(metadata, sign1, encrypt0)


class SignedHeader(NamedTuple):
    """What the Sign1 protected header says, checked (:func:`check_sign1_headers`)."""

    producer_id: str
    resource_id: str
    epoch: int
    seq: int
    iat: int
    exp: int
    signature_algorithm: SignatureAlgorithm
    kid: bytes


def check_sign1_headers(header: HeaderMap, unprotected: HeaderMap) -> SignedHeader:
    """The checks of the Sign1 headers, in the order :func:`read_generic` makes them (the
    incremental reader, :mod:`oscar.streaming`, makes the very same); :class:`InvalidObject`."""
    signature_algorithm, kid, producer_id, resource_id, iat, exp = check_signer_claims(
        header, unprotected, _SIGN1_LABELS, "Sign1"
    )
    epoch = _uint(header[EPOCH], "epoch")
    seq = _uint(header[SEQ], "seq")
    return SignedHeader(producer_id, resource_id, epoch, seq, iat, exp, signature_algorithm, kid)


def check_signer_claims(
    header: HeaderMap, unprotected: HeaderMap, labels: frozenset[int], what: str
) -> tuple[SignatureAlgorithm, bytes, str, str, int, int]:
    """The Sign1 header checks both formats share, in order: exactly ``labels`` (``what`` names
    the format in the error), no unprotected header, the algorithm, the kid, the CWT claims (a
    well-formed producer owning a well-formed resource, iat no later than exp). Returns
    (signature algorithm, kid, producer id, resource id, iat, exp); :class:`InvalidObject`."""
    if header.keys() != labels:
        raise InvalidObject(f"{what} protected header has missing or unknown labels")
    if unprotected:
        raise InvalidObject("Sign1 unprotected header is not empty")
    signature_algorithm = signature_for(header[ALG])
    kid = header[KID]
    if type(kid) is not bytes or len(kid) != certs.KID_LENGTH:
        raise InvalidObject("kid is not an 8-byte string")
    claims = header[CWT_CLAIMS]
    if type(claims) is not dict or claims.keys() != _CWT_LABELS:
        raise InvalidObject("CWT claims are missing or unknown")
    producer_id = claims[ISS]
    resource_id = claims[SUB]
    if not is_device_id(producer_id):
        raise InvalidObject("iss is not a well-formed producer id")
    if not is_resource_id(resource_id):
        raise InvalidObject("sub is not a well-formed resource id")
    if not owns(producer_id, resource_id):
        raise InvalidObject("resource does not belong to the issuing producer")
    iat = _uint(claims[IAT], "iat")
    exp = _uint(claims[EXP], "exp")
    if exp < iat:
        raise InvalidObject("exp precedes iat")
    return signature_algorithm, kid, str(producer_id), str(resource_id), iat, exp


def check_encrypt0_headers(
    outer: SignedHeader, inner: HeaderMap, unprotected: HeaderMap, ciphertext_length: int
) -> ObjectMetadata:
    """The checks of the Encrypt0 headers against the Sign1's, in :func:`read_generic`'s order;
    the object's metadata, or :class:`InvalidObject`."""
    if inner.keys() != _ENC_LABELS:
        raise InvalidObject("Encrypt0 protected header has missing or unknown labels")
    if unprotected.keys() != {PARTIAL_IV}:
        raise InvalidObject("Encrypt0 unprotected header is not exactly the Partial IV")
    aead = aead_for(inner[ALG])
    content_format = inner[CONTENT_TYPE]
    if type(content_format) is not int or not 0 <= content_format <= 0xFFFF:
        raise InvalidObject("content type is not a CoAP content format")
    piv = unprotected[PARTIAL_IV]
    if type(piv) is not bytes or piv != partial_iv(outer.seq) or len(piv) > _MAX_PIV_LENGTH:
        raise InvalidObject("Partial IV does not encode the signed seq minimally")
    if ciphertext_length < aead.tag_length:
        raise InvalidObject("ciphertext shorter than the tag")
    return ObjectMetadata(
        outer.producer_id,
        outer.resource_id,
        outer.epoch,
        outer.seq,
        outer.iat,
        outer.exp,
        content_format,
        aead,
        outer.signature_algorithm,
        outer.kid,
    )
