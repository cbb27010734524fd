"""What a protected object is: its header labels, its metadata, and the values derived from them.

The wire layout is pinned in DESIGN §4 and described with a worked example in ``docs/PROTOCOL.md``.
This module holds the types every side shares: :class:`ObjectMetadata` (what an object says about
itself, under the signature), :class:`Reading` (an opened object), the header labels, the limits,
the object's ETag and the external AAD of its encryption.

What this module does not do: encode or decode an object (:mod:`oscar.decoding`,
:mod:`oscar.pinned`, :mod:`oscar.sealer`) or check one (:mod:`oscar.opening`).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from .algorithms import AeadAlgorithm, SignatureAlgorithm
from .cbor import dumps, head

__all__ = [
    "CONTENT_FORMAT_COSE_SIGN1",
    "CWT_CLAIMS",
    "DEFAULT_MAX_CLOCK_SKEW",
    "DEFAULT_MAX_OBJECT_SIZE",
    "EPOCH",
    "EXP",
    "IAT",
    "ISS",
    "SEQ",
    "SUB",
    "ObjectMetadata",
    "Reading",
    "external_aad",
    "object_etag",
    "partial_iv",
]

#: CoAP content format of a protected object: application/cose; cose-type="cose-sign1".
CONTENT_FORMAT_COSE_SIGN1 = 18

#: Largest object accepted by default: a 1 MiB representation plus its headers and tag.
DEFAULT_MAX_OBJECT_SIZE = (1 << 20) + 4096

#: How far ``iat`` may lie ahead of the receiver's clock, in seconds (boards drift).
DEFAULT_MAX_CLOCK_SKEW = 300

CWT_CLAIMS = 15
EPOCH = -65537
SEQ = -65538
ISS, SUB, EXP, IAT = 1, 2, 4, 6


class ObjectMetadata(NamedTuple):
    """What an object says about itself, all of it covered by the producer's signature.

    Like every type built per received object, a NamedTuple (immutable, and several times cheaper
    to make than a frozen dataclass on CPython 3.11).
    """

    producer_id: str
    resource_id: str
    epoch: int
    seq: int
    iat: int
    exp: int
    content_format: int
    aead: AeadAlgorithm
    signature_algorithm: SignatureAlgorithm
    kid: bytes


class Reading(NamedTuple):
    """An opened object: the plaintext representation and its signed metadata.

    Its ``repr`` leaves the plaintext out.
    """

    plaintext: bytes
    metadata: ObjectMetadata

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"Reading(resource_id={m.resource_id!r}, epoch={m.epoch}, seq={m.seq}, "
            f"content_format={m.content_format}, length={len(self.plaintext)})"
        )


def object_etag(resource_id: str, epoch: int, seq: int) -> bytes:
    """The CoAP ETag of an object: 8 bytes of SHA-256(CBOR [resource id, epoch, seq]).

    It names the object by what its signature covers, not by its bytes, so a producer, a proxy and
    a consumer agree on it, and a re-encoded or re-signed copy (ECDSA's (r, n - s)) is the same
    object, not a new one."""
    return hashlib.sha256(dumps([resource_id, epoch, seq])).digest()[:8]


def external_aad(producer_id: str, resource_id: str, epoch: int, seq: int) -> bytes:
    """The external AAD of DESIGN §4: CBOR ``[producer id, resource id, epoch, seq]``.

    Written out rather than through :func:`~oscar.cbor.dumps` (it runs for every object opened):
    the same bytes for the text strings and unsigned integers it is given."""
    producer = producer_id.encode()
    resource = resource_id.encode()
    return b"".join(
        (
            b"\x84",
            head(3, len(producer)),
            producer,
            head(3, len(resource)),
            resource,
            head(0, epoch),
            head(0, seq),
        )
    )


def partial_iv(seq: int) -> bytes:
    """The Partial IV of ``seq``: its big-endian bytes, shortest form (at least one byte)."""
    return seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")
