"""Multi-part protected objects: one signed object, parts for different audiences (issue 19).

A resource may declare *parts*, each with its audience: a **plain** part (signed, readable by
anyone: authentic and fresh, not secret) and **encrypted** parts, each under its own access secret
(``measurements`` for clinicians, ``location`` for operators). The producer seals once; one
signature covers every part. The layout (``docs/PROTOCOL.md``, "Multi-part objects")::

    COSE_Sign1 (tag 18)
      protected:  1 alg, 4 kid, 15 CWT claims {iss, sub, exp, iat}   as in a single-part object
             -65538 seq      (uint; strictly increasing per resource, never reset: see below)
             -65539 parts    [+ descriptor]: [name, 0, content format]          a plain part
                                              [name, 1, content format, epoch]   an encrypted part
      unprotected: {}
      payload:    bstr containing [+ item], one per descriptor, in the same order:
                    a plain part:      bstr, its representation
                    an encrypted part: COSE_Encrypt0 (tag 16) exactly as in a single-part object,
                                       under the part's key, external_aad
                                       [producer, resource, epoch, seq, part name]
      signature:  over Sig_structure ["Signature1", protected, h'', payload], as today

**Versioning.** A multi-part object has no ``-65537`` epoch label (each encrypted part names its
own epoch) and has the ``-65539`` label: the exact label set tells the two formats apart, and the
strict single-part decoder (:meth:`oscar.decoding.ProtectedObject.from_bytes`, the streaming
reader) refuses any other set, so a consumer that predates parts refuses these objects with
:class:`~oscar.errors.InvalidObject` before it checks a signature. Single-part objects are
unchanged, byte for byte.

**Nonces.** A part's key comes from its own secret, its name and epoch
(:meth:`oscar.keys.ContentKeys.derive_part`), and its nonce is ``base_iv XOR seq``. Part secrets
rotate independently, so one seq serves keys of many epochs: a producer must draw the seq of a
multi-part resource from **one counter per resource that never restarts at a rotation** (a
:class:`~oscar.sequence.SequenceAllocator` under ``(resource id, 0)``). This module cannot check
that; it is the producer's rule. Freshness of multi-part objects is by seq alone (epoch 0 in a
:class:`~oscar.freshness.FreshnessState`).

This module holds the types, the sealing (:func:`seal_parts`) and the strict decoder
(:meth:`MultiPartObject.from_bytes`, checks 1 to 3 of :mod:`oscar.objects`). What it does not do:
check the signer, signature, times or freshness, or decrypt (:mod:`oscar.partsopening`), allocate
sequence numbers, or find secrets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from . import cbor, certs
from .algorithms import PrivateKey, SignatureAlgorithm
from .cose import (
    ALG,
    CONTENT_TYPE,
    ENCRYPT0_TAG,
    KID,
    MAX_ITEMS,
    PARTIAL_IV,
    Encrypt0,
    HeaderMap,
    Sign1,
    _protected_header,
    _unprotected_map,
)
from .decoding import SignedHeader, check_encrypt0_headers, check_signer_claims
from .errors import InvalidObject, PlaintextTooLarge
from .keys import MAX_SEQ, AccessSecret, ContentKeys
from .model import (
    CWT_CLAIMS,
    DEFAULT_MAX_OBJECT_SIZE,
    EXP,
    IAT,
    ISS,
    SEQ,
    SUB,
    partial_iv,
)
from .names import owns, require_device_id, require_resource_id
from .profiles import DEFAULT_PROFILE, Profile
from .sealer import signing_key_for

__all__ = [
    "ENCRYPTED",
    "MAX_PARTS",
    "PARTS",
    "PLAIN",
    "MultiPartObject",
    "Part",
    "PartDescriptor",
    "PartsMetadata",
    "is_part_name",
    "part_external_aad",
    "seal_parts",
]

#: The Sign1 protected header label of the part descriptors.
PARTS = -65539
#: Part kinds, as the descriptors encode them.
PLAIN, ENCRYPTED = 0, 1
#: Most parts one object may have (the protected header stays under the COSE layer's item bound).
MAX_PARTS = 16

_LABELS = frozenset({ALG, KID, CWT_CLAIMS, SEQ, PARTS})
_PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def is_part_name(text: object) -> bool:
    """1 to 32 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit."""
    return type(text) is str and _PART_NAME.fullmatch(text) is not None


def part_external_aad(producer_id: str, resource_id: str, epoch: int, seq: int, part: str) -> bytes:
    """The external AAD of an encrypted part: CBOR ``[producer, resource, epoch, seq, part]``.

    Five elements where a single-part object's has four, so the two never coincide; the part name
    keeps a part from being moved to another part's place (its key differs too)."""
    return cbor.dumps([producer_id, resource_id, epoch, seq, part])


class PartDescriptor(NamedTuple):
    """What the signed header says of one part: its name, kind, content format, and the epoch of
    its secret (None for a plain part)."""

    name: str
    kind: int
    content_format: int
    epoch: int | None

    @property
    def encrypted(self) -> bool:
        return self.kind == ENCRYPTED

    def to_cbor(self) -> list[cbor.Value]:
        if self.epoch is None:
            return [self.name, self.kind, self.content_format]
        return [self.name, self.kind, self.content_format, self.epoch]


class PartsMetadata(NamedTuple):
    """What a multi-part object says about itself, all of it under the producer's signature."""

    producer_id: str
    resource_id: str
    seq: int
    iat: int
    exp: int
    signature_algorithm: SignatureAlgorithm
    kid: bytes
    parts: tuple[PartDescriptor, ...]

    @property
    def epoch(self) -> int:
        """0: a multi-part object's freshness is by seq alone (see the module docstring)."""
        return 0


@dataclass(frozen=True, slots=True)
class Part:
    """One part to seal: ``secret`` and ``epoch`` both None for a plain part, both set for an
    encrypted one. Raises ``ValueError``/``TypeError`` on construction for anything else."""

    name: str
    plaintext: bytes = field(repr=False)
    content_format: int
    secret: AccessSecret | None = None
    epoch: int | None = None

    def __post_init__(self) -> None:
        if not is_part_name(self.name):
            raise ValueError(
                "a part name is 1 to 32 characters of A-Z a-z 0-9 . _ -, starting with a "
                "letter or digit"
            )
        if not isinstance(self.plaintext, bytes):
            raise TypeError("a part's plaintext must be bytes")
        if type(self.content_format) is not int or not 0 <= self.content_format <= 0xFFFF:
            raise ValueError("content_format must be a CoAP content format (0 to 65535)")
        if (self.secret is None) != (self.epoch is None):
            raise ValueError("a plain part has neither secret nor epoch; an encrypted one both")
        if self.secret is not None and not isinstance(self.secret, AccessSecret):
            raise TypeError("a part's secret must be an AccessSecret")
        if self.epoch is not None and (
            type(self.epoch) is not int or not 0 <= self.epoch <= MAX_SEQ
        ):
            raise ValueError("epoch must be an integer from 0 to 2**64 - 1")

    @property
    def descriptor(self) -> PartDescriptor:
        kind = PLAIN if self.secret is None else ENCRYPTED
        return PartDescriptor(self.name, kind, self.content_format, self.epoch)


class MultiPartObject(NamedTuple):
    """A structurally valid multi-part object, decoded but not yet verified. ``items`` holds, per
    part in order, the plain part's bytes or the encrypted part's :class:`~oscar.cose.Encrypt0`
    (with the AEAD its header names)."""

    metadata: PartsMetadata
    sign1: Sign1
    items: tuple[bytes | Encrypt0, ...]

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = DEFAULT_MAX_OBJECT_SIZE) -> MultiPartObject:
        """Checks 1 to 3 in DESIGN order: size, strict CBOR and exact structure, known algorithms.
        Raises :class:`InvalidObject` on any failure (a single-part object included)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidObject("input is not bytes")
        if (data.nbytes if isinstance(data, memoryview) else len(data)) > max_size:
            raise InvalidObject("object exceeds the size limit")
        sign1 = Sign1.from_bytes(bytes(data))
        metadata = _check_header(sign1.protected_map, sign1.unprotected)
        try:
            payload = cbor.loads(sign1.payload, max_items=MAX_ITEMS)
        except cbor.MalformedCBOR:
            raise InvalidObject("payload is not strict CBOR") from None
        if type(payload) is not list or len(payload) != len(metadata.parts):
            raise InvalidObject("payload is not an array of one item per part")
        outer = SignedHeader(
            metadata.producer_id,
            metadata.resource_id,
            0,
            metadata.seq,
            metadata.iat,
            metadata.exp,
            metadata.signature_algorithm,
            metadata.kid,
        )
        items = tuple(
            _item(outer, descriptor, item)
            for descriptor, item in zip(metadata.parts, payload, strict=True)
        )
        return cls(metadata, sign1, items)

    def to_bytes(self) -> bytes:
        return self.sign1.to_bytes()


def _uint(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise InvalidObject(f"{what} is not an unsigned integer")
    return value


def _check_header(header: HeaderMap, unprotected: HeaderMap) -> PartsMetadata:
    """The Sign1 header checks of :func:`oscar.decoding.check_sign1_headers`, in its order, for
    the multi-part label set, then the descriptors."""
    signature_algorithm, kid, producer_id, resource_id, iat, exp = check_signer_claims(
        header, unprotected, _LABELS, "multi-part"
    )
    seq = _uint(header[SEQ], "seq")
    parts = _descriptors(header[PARTS])
    return PartsMetadata(producer_id, resource_id, seq, iat, exp, signature_algorithm, kid, parts)


def _descriptors(raw: cbor.Value) -> tuple[PartDescriptor, ...]:
    if type(raw) is not list or not 1 <= len(raw) <= MAX_PARTS:
        raise InvalidObject("parts is not an array of 1 to 16 descriptors")
    parts = []
    for entry in raw:
        if type(entry) is not list or len(entry) not in (3, 4):
            raise InvalidObject("a part descriptor is not an array of 3 or 4")
        name, kind, content_format = entry[0], entry[1], entry[2]
        if not is_part_name(name):
            raise InvalidObject("a part name is malformed")
        if type(content_format) is not int or not 0 <= content_format <= 0xFFFF:
            raise InvalidObject("a part's content format is not a CoAP content format")
        if kind == PLAIN and type(kind) is int and len(entry) == 3:
            epoch = None
        elif kind == ENCRYPTED and type(kind) is int and len(entry) == 4:
            epoch = _uint(entry[3], "a part's epoch")
        else:
            raise InvalidObject("a part descriptor's kind is unknown or its length wrong")
        parts.append(PartDescriptor(str(name), kind, content_format, epoch))
    if len({p.name for p in parts}) != len(parts):
        raise InvalidObject("two parts have the same name")
    if not any(p.encrypted for p in parts):
        raise InvalidObject("no part is encrypted")
    return tuple(parts)


def _item(outer: SignedHeader, descriptor: PartDescriptor, item: cbor.Value) -> bytes | Encrypt0:
    if not descriptor.encrypted:
        if type(item) is not bytes:
            raise InvalidObject("a plain part is not a byte string")
        return item
    if type(item) is not cbor.Tag or item.tag != ENCRYPT0_TAG:
        raise InvalidObject("an encrypted part is not a tagged COSE_Encrypt0")
    value = item.value
    if type(value) is not list or len(value) != 3:
        raise InvalidObject("COSE_Encrypt0 is not an array of 3")
    protected_raw, protected_map = _protected_header(value[0])
    unprotected = _unprotected_map(value[1])
    ciphertext = value[2]
    if type(ciphertext) is not bytes:
        raise InvalidObject("ciphertext is not a byte string")
    # The single-part checks (exact labels, known AEAD, Partial IV = seq, tag length), then the
    # content format the descriptor signed.
    epoch = descriptor.epoch or 0  # an encrypted descriptor always has one
    metadata = check_encrypt0_headers(
        outer._replace(epoch=epoch), protected_map, unprotected, len(ciphertext)
    )
    if metadata.content_format != descriptor.content_format:
        raise InvalidObject("a part's content format differs from its descriptor's")
    return Encrypt0(protected_raw, protected_map, unprotected, ciphertext)


def seal_parts(
    *,
    parts: Sequence[Part],
    producer_id: str,
    resource_id: str,
    seq: int,
    iat: int,
    exp: int,
    signing_key: PrivateKey | certs.SigningKey,
    profile: Profile = DEFAULT_PROFILE,
) -> bytes:
    """Encrypt each encrypted part under its own key, then sign the whole; return the bytes.

    ``parts`` in the order the resource declares them (the order is signed). ``seq`` must come
    from the resource's one never-restarting counter (module docstring): the caller guarantees
    it. Raises ``ValueError``/``TypeError`` for bad arguments (no encrypted part, more than
    :data:`MAX_PARTS`, a repeated name, a key not of the profile's signature algorithm) and
    :class:`~oscar.errors.PlaintextTooLarge`, naming the part, when the profile's AEAD cannot
    seal a part that large; nothing is encrypted before every part has been checked.
    """
    require_device_id(producer_id, "producer id")
    require_resource_id(resource_id)
    if not owns(producer_id, resource_id):
        raise ValueError(f"resource {resource_id!r} is not of the form '{producer_id}/<path>'")
    for name, value in (("seq", seq), ("iat", iat), ("exp", exp)):
        if type(value) is not int or not 0 <= value <= MAX_SEQ:
            raise ValueError(f"{name} must be an integer from 0 to 2**64 - 1")
    if exp < iat:
        raise ValueError("exp must not be earlier than iat")
    parts = list(parts)
    if not 1 <= len(parts) <= MAX_PARTS or not all(isinstance(p, Part) for p in parts):
        raise ValueError(f"parts must be 1 to {MAX_PARTS} Part values")
    if len({p.name for p in parts}) != len(parts):
        raise ValueError("two parts have the same name")
    if all(p.secret is None for p in parts):
        raise ValueError("at least one part must be encrypted (no object goes unprotected)")
    signing_key = signing_key_for(profile, signing_key)
    aead = profile.aead
    limit = aead.max_plaintext
    for p in parts:
        if p.secret is not None and limit is not None and len(p.plaintext) > limit:
            raise PlaintextTooLarge(
                f"part {p.name!r}: {aead.name} cannot seal more than {limit} bytes "
                f"(got {len(p.plaintext)}); use A128GCM, A256GCM or ChaCha20/Poly1305"
            )

    items: list[cbor.Value] = []
    for p in parts:
        if p.secret is None or p.epoch is None:
            items.append(p.plaintext)
            continue
        keys = ContentKeys.derive_part(p.secret, resource_id, p.name, p.epoch, aead)
        encrypt0 = Encrypt0.encrypt(
            {ALG: aead.cose_id, CONTENT_TYPE: p.content_format},
            {PARTIAL_IV: partial_iv(seq)},
            p.plaintext,
            keys.key,
            keys.nonce(seq),
            aead,
            part_external_aad(producer_id, resource_id, p.epoch, seq, p.name),
        )
        items.append(
            cbor.Tag(ENCRYPT0_TAG, [encrypt0.protected, encrypt0.unprotected, encrypt0.ciphertext])
        )
    # RFC 8949 §4.2.1 key order, as the single-part header: 1, 4, 15, -65538, -65539.
    header: HeaderMap = {
        ALG: signing_key.algorithm.cose_id,
        KID: signing_key.kid,
        CWT_CLAIMS: {ISS: producer_id, SUB: resource_id, EXP: exp, IAT: iat},
        SEQ: seq,
        PARTS: [p.descriptor.to_cbor() for p in parts],
    }
    sign1 = Sign1.sign(
        header, {}, cbor.dumps(items), signing_key.private_key, signing_key.algorithm
    )
    return sign1.to_bytes()
