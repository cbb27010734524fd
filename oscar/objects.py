"""OSCAR protected objects: seal, verify without a secret, and open (DESIGN §4).

A protected object is a tagged COSE_Sign1 whose payload is a tagged COSE_Encrypt0 (encrypt, then
sign). The wire layout is pinned in DESIGN §4 and described with a worked example in
``docs/PROTOCOL.md``; this module is its reference implementation.

Incoming objects go through the checks in DESIGN order, and any failure raises the one opaque
:class:`~oscar.errors.InvalidObject` (its ``reason`` is for the local log):

1. size limit, before any decoding;
2. strict CBOR and exact structure: tags 18 and 16, exactly the pinned header labels and types,
   an empty unprotected Sign1 header, a minimal Partial IV equal to the signed ``seq``;
3. known algorithms only, read from the protected headers only;
4. the signer: a certificate must chain to the trust anchor (when one is given), be valid at ``now``
   and name the producer in ``iss``; ``sub`` must be a resource of that producer; ``kid`` must be
   the signer key's id;
5. the signature;
6. expiry and an ``iat`` not too far ahead, then freshness (replay and rollback against
   :class:`~oscar.freshness.FreshnessState`);
7. decryption, with ``[producer, resource, epoch, seq]`` as external AAD.

:func:`verify` stops after step 6's expiry check and needs no secret (the proxy's view);
:func:`open` does everything and records the object as the newest accepted.

What this module does not do: look up certificates or secrets itself (the caller hands in a key, a
certificate or a lookup function), keep time (``now`` is an argument), or allocate sequence numbers
(see :mod:`oscar.sequence`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Container
from typing import NamedTuple, TypeAlias

from cryptography import x509

from . import certs
from .algorithms import (
    AeadAlgorithm,
    PrivateKey,
    PublicKey,
    SignatureAlgorithm,
    aead_for,
    signature_for,
)
from .cbor import _MIN_FOR_LENGTH, dumps, head
from .cose import (
    ALG,
    CONTENT_TYPE,
    ENCRYPT0_TAG,
    KID,
    PARTIAL_IV,
    SIGN1_TAG,
    Encrypt0,
    Sign1,
)
from .errors import CertificateError, InvalidObject, PlaintextTooLarge
from .freshness import FreshnessState
from .keys import MAX_SEQ, AccessSecret, ContentKeys, KeyCache, SecretLookup
from .names import is_device_id, is_resource_id, owns, require_device_id, require_resource_id
from .profiles import DEFAULT_PROFILE, Profile

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
    "ProtectedObject",
    "Reading",
    "Sealer",
    "Signer",
    "SignerLookup",
    "external_aad",
    "object_etag",
    "open",
    "open_verified",
    "seal",
    "verify",
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

_SIGN1_LABELS = frozenset({ALG, KID, CWT_CLAIMS, EPOCH, SEQ})
_CWT_LABELS = frozenset({ISS, SUB, EXP, IAT})
_ENC_LABELS = frozenset({ALG, CONTENT_TYPE})
_MAX_PIV_LENGTH = 8

#: The signer of an object: a trusted :class:`~oscar.certs.ProducerKey` (fastest), a certificate
#: (checked on every call), or a bare public key.
Signer: TypeAlias = "certs.ProducerKey | x509.Certificate | PublicKey"
#: Finds the signer of (producer id, kid), or None when unknown.
SignerLookup = Callable[[str, bytes], "Signer | None"]


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


def _partial_iv(seq: int) -> bytes:
    return seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")


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
        """Checks 1 to 3 of the module docstring; raises :class:`InvalidObject` on any failure."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidObject("input is not bytes")
        if _size(data) > max_size:
            raise InvalidObject("object exceeds the size limit")
        data = bytes(data)
        pinned = _read_pinned(data)
        return pinned if pinned is not None else _read_generic(data)

    def to_bytes(self) -> bytes:
        return self.sign1.to_bytes()


def _read_generic(data: bytes) -> ProtectedObject:
    """Decode with the generic strict COSE layer; checks 2 and 3, :class:`InvalidObject` if not."""
    sign1 = Sign1.from_bytes(data)
    header = sign1.protected_map
    if header.keys() != _SIGN1_LABELS:
        raise InvalidObject("Sign1 protected header has missing or unknown labels")
    if sign1.unprotected:
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
    epoch = _uint(header[EPOCH], "epoch")
    seq = _uint(header[SEQ], "seq")

    encrypt0 = Encrypt0.from_bytes(sign1.payload)
    inner = encrypt0.protected_map
    if inner.keys() != _ENC_LABELS:
        raise InvalidObject("Encrypt0 protected header has missing or unknown labels")
    if encrypt0.unprotected.keys() != {PARTIAL_IV}:
        raise InvalidObject("Encrypt0 unprotected header is not exactly the Partial IV")
    aead = aead_for(inner[ALG])
    content_format = inner[CONTENT_TYPE]
    if type(content_format) is not int or not 0 <= content_format <= 0xFFFF:
        raise InvalidObject("content type is not a CoAP content format")
    piv = encrypt0.unprotected[PARTIAL_IV]
    if type(piv) is not bytes or piv != _partial_iv(seq) or len(piv) > _MAX_PIV_LENGTH:
        raise InvalidObject("Partial IV does not encode the signed seq minimally")
    if len(encrypt0.ciphertext) < aead.tag_length:
        raise InvalidObject("ciphertext shorter than the tag")
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
    return ProtectedObject(metadata, sign1, encrypt0)


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


def _read_pinned(data: bytes) -> ProtectedObject | None:
    """Decode an object laid out exactly as DESIGN §4 pins it, or return None.

    Every object a conforming sealer makes has one encoding (preferred serialisation, header
    labels in RFC 8949 §4.2.1 order), so it can be read field by field without the generic
    decoder's recursion and maps: three to four times faster, and decoding is most of what
    opening a small object costs in Python. Anything else, well-formed or not, returns None and
    goes through the generic strict decoder, which accepts or refuses it with a reason; the
    test suite checks that both paths agree on valid objects and on every mutation of them.
    None is also returned for an object that is laid out right but fails a check (a malformed
    id, a Partial IV that does not match), so that refusals always come from one place.
    """
    try:
        return _read_pinned_or_raise(data)
    except (_NotPinned, IndexError, UnicodeDecodeError, InvalidObject):
        return None


def _read_pinned_or_raise(data: bytes) -> ProtectedObject:
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
        or piv != _partial_iv(seq)
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
    return ProtectedObject(metadata, sign1, encrypt0)


class Sealer:
    """Seals objects of one resource and epoch, with the checks and the fixed bytes done once.

    A producer keeps one per (resource, epoch): the ids, the key and the keys are checked and the
    unchanging parts of the headers and the external AAD encoded when it is made, so each
    :meth:`seal` only encodes ``seq``, ``iat``, ``exp`` and the ciphertext. The output is the same,
    byte for byte, as :func:`seal`'s.
    """

    __slots__ = (
        "_aad_prefix",
        "_aead",
        "_cipher",
        "_enc_heads",
        "_header_prefix",
        "_header_seq_label",
        "_keys",
        "_max_plaintext",
        "_sign",
        "epoch",
        "producer_id",
        "resource_id",
    )

    def __init__(
        self,
        *,
        secret: AccessSecret | ContentKeys,
        producer_id: str,
        resource_id: str,
        epoch: int,
        signing_key: PrivateKey | certs.SigningKey,
        profile: Profile = DEFAULT_PROFILE,
    ) -> None:
        """Raises ``ValueError``/``TypeError`` for bad arguments (malformed ids, a resource of
        another producer, a key not of the profile's signature algorithm, keys of another epoch).
        """
        require_device_id(producer_id, "producer id")
        require_resource_id(resource_id)
        if not owns(producer_id, resource_id):
            raise ValueError(f"resource {resource_id!r} is not of the form '{producer_id}/<path>'")
        _check_uint("epoch", epoch)
        if not isinstance(signing_key, certs.SigningKey):
            signing_key = certs.SigningKey.from_private_key(signing_key)
        if signing_key.algorithm is not profile.signature:
            raise ValueError(
                f"profile {profile.name} signs with {profile.signature.name}, "
                f"but the key is a {signing_key.algorithm.name} key"
            )
        aead = profile.aead
        if isinstance(secret, ContentKeys):
            if (secret.resource_id, secret.epoch, secret.aead) != (resource_id, epoch, aead):
                raise ValueError(
                    "the content keys were derived for another resource, epoch or AEAD"
                )
            keys = secret
        else:
            keys = ContentKeys.derive(secret, resource_id, epoch, aead)
        self.producer_id = producer_id
        self.resource_id = resource_id
        self.epoch = epoch
        self._aead = aead
        self._keys = keys
        self._cipher = keys.cipher
        self._max_plaintext = aead.max_plaintext
        self._sign = signing_key.algorithm.signer(signing_key.private_key)
        # Per content format: (the Encrypt0 head up to its unprotected header, the Enc_structure
        # head up to the external AAD's length).
        self._enc_heads: dict[int, tuple[bytes, bytes]] = {}
        # external_aad = [producer, resource, epoch, seq]: everything but the seq, encoded once.
        self._aad_prefix = head(4, 4) + dumps(producer_id) + dumps(resource_id) + dumps(epoch)
        # The Sign1 protected header in RFC 8949 §4.2.1 key order, so that equal objects encode to
        # equal bytes: {1: alg, 4: kid, 15: {1: iss, 2: sub, 4: exp, 6: iat}, -65537: epoch,
        # -65538: seq}. Everything up to exp is fixed; so are the epoch and the seq label.
        self._header_prefix = b"".join(
            (
                head(5, 5),
                dumps(ALG),
                dumps(signing_key.algorithm.cose_id),
                dumps(KID),
                dumps(signing_key.kid),
                dumps(CWT_CLAIMS),
                head(5, 4),
                dumps(ISS),
                dumps(producer_id),
                dumps(SUB),
                dumps(resource_id),
                dumps(EXP),
            )
        )
        self._header_seq_label = dumps(EPOCH) + dumps(epoch) + dumps(SEQ)

    def __repr__(self) -> str:
        return f"Sealer(resource_id={self.resource_id!r}, epoch={self.epoch})"

    def _heads_for(self, content_format: object) -> tuple[bytes, bytes]:
        if type(content_format) is not int or not 0 <= content_format <= 0xFFFF:
            raise ValueError("content_format must be a CoAP content format (0 to 65535)")
        enc_protected = dumps({ALG: self._aead.cose_id, CONTENT_TYPE: content_format})
        protected_item = head(2, len(enc_protected)) + enc_protected
        heads = (_ENCRYPT0_HEAD + protected_item, _ENC_STRUCTURE_HEAD + protected_item)
        self._enc_heads[content_format] = heads
        return heads

    def seal(self, *, seq: int, iat: int, exp: int, content_format: int, plaintext: bytes) -> bytes:
        """Encrypt, then sign; return the object's bytes. ``seq`` must be unused in this epoch.

        Raises ``ValueError``/``TypeError`` for bad arguments and
        :class:`~oscar.errors.PlaintextTooLarge` when the AEAD cannot seal that much.

        This runs once per object a producer makes, so it writes the layout out directly rather
        than through :class:`~oscar.cose.Encrypt0` and :class:`~oscar.cose.Sign1` (the test suite
        checks the bytes against the generic COSE layer and the pinned vectors).
        """
        _check_uint("seq", seq)
        _check_uint("iat", iat)
        _check_uint("exp", exp)
        if exp < iat:
            raise ValueError("exp must not be earlier than iat")
        heads = self._enc_heads.get(content_format)
        if heads is None:
            heads = self._heads_for(content_format)
        if type(plaintext) is not bytes:
            if not isinstance(plaintext, (bytearray, memoryview)):
                raise TypeError("plaintext must be bytes")
            plaintext = bytes(plaintext)
        if self._max_plaintext is not None and len(plaintext) > self._max_plaintext:
            raise PlaintextTooLarge(
                f"{self._aead.name} cannot seal more than {self._max_plaintext} bytes "
                f"(got {len(plaintext)}); use A128GCM, A256GCM or ChaCha20/Poly1305"
            )

        seq_item = head(0, seq)
        ext_aad = self._aad_prefix + seq_item
        aad = heads[1] + head(2, len(ext_aad)) + ext_aad
        ciphertext = self._cipher.encrypt(self._keys.nonce(seq), plaintext, aad)
        piv = _partial_iv(seq)
        payload = b"".join(
            (heads[0], _PIV_HEAD, head(2, len(piv)), piv, head(2, len(ciphertext)), ciphertext)
        )
        protected = b"".join(
            (self._header_prefix, head(0, exp), _IAT_LABEL, head(0, iat), self._header_seq_label)
        )
        protected = protected + seq_item
        protected_item = head(2, len(protected)) + protected
        payload_item = head(2, len(payload)) + payload
        signature = self._sign(
            b"".join((_SIG_STRUCTURE_HEAD, protected_item, b"\x40", payload_item))
        )
        return b"".join(
            (_SIGN1_HEAD, protected_item, b"\xa0", payload_item, head(2, len(signature)), signature)
        )


_SIG_STRUCTURE_HEAD = b"\x84" + dumps("Signature1")
_ENC_STRUCTURE_HEAD = b"\x83" + dumps("Encrypt0")
_SIGN1_HEAD = head(6, SIGN1_TAG) + b"\x84"
_ENCRYPT0_HEAD = head(6, ENCRYPT0_TAG) + b"\x83"
_PIV_HEAD = head(5, 1) + dumps(PARTIAL_IV)  # the unprotected header {6: Partial IV}
_IAT_LABEL = dumps(IAT)


def _check_uint(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise ValueError(f"{name} must be an integer from 0 to 2**64 - 1")


def seal(
    *,
    secret: AccessSecret | ContentKeys,
    producer_id: str,
    resource_id: str,
    epoch: int,
    seq: int,
    iat: int,
    exp: int,
    content_format: int,
    plaintext: bytes,
    signing_key: PrivateKey | certs.SigningKey,
    profile: Profile = DEFAULT_PROFILE,
) -> bytes:
    """Encrypt ``plaintext`` under the epoch's content key, then sign; return the object's bytes.

    ``secret`` is the epoch's access secret, or keys already derived from it, and ``signing_key``
    a private key or a :class:`~oscar.certs.SigningKey`. The caller guarantees ``seq`` is unused
    under this epoch (see :class:`~oscar.sequence.SequenceAllocator`). To seal many objects of one
    epoch, keep a :class:`Sealer`: this function makes one per call.

    Raises ``ValueError``/``TypeError`` for bad arguments (a key that is not of the profile's
    signature algorithm, a resource of another producer, ``exp`` before ``iat``) and
    :class:`~oscar.errors.PlaintextTooLarge` when the profile's AEAD cannot seal that much.
    """
    sealer = Sealer(
        secret=secret,
        producer_id=producer_id,
        resource_id=resource_id,
        epoch=epoch,
        signing_key=signing_key,
        profile=profile,
    )
    return sealer.seal(
        seq=seq, iat=iat, exp=exp, content_format=content_format, plaintext=plaintext
    )


def _resolve_signer(
    obj: ProtectedObject,
    signer: Signer | SignerLookup,
    now: int,
    trust_anchor: x509.Certificate | None,
    revoked_serials: Container[int],
) -> PublicKey:
    m = obj.metadata
    if type(signer) is certs.ProducerKey and (
        trust_anchor is None or signer.anchor is trust_anchor
    ):
        # The usual case, a key checked once and kept: none of the conversions below.
        try:
            signer.check(m.producer_id, now, revoked_serials)
        except CertificateError as exc:
            raise InvalidObject(f"signer not acceptable: {exc}") from None
        if signer.kid != m.kid:
            raise InvalidObject("kid does not identify the signer's key")
        return signer.public_key
    if not isinstance(signer, (certs.ProducerKey, x509.Certificate)) and callable(signer):
        found = signer(m.producer_id, m.kid)
        if found is None:
            raise InvalidObject("signer unknown")
        signer = found
    try:
        if isinstance(signer, certs.ProducerKey):
            key = signer
            if trust_anchor is not None and key.anchor != trust_anchor:
                raise CertificateError("the signer key was not checked against the trust anchor")
        elif isinstance(signer, x509.Certificate):
            # A certificate, whether handed in or found, is only as good as its chain. To trust
            # one without a CA, the caller says so by making a ProducerKey from it.
            if trust_anchor is None:
                raise CertificateError("a certificate signer needs a trust anchor")
            key = certs.ProducerKey.from_certificate(
                signer, trust_anchor, now=now, revoked_serials=revoked_serials
            )
        else:
            if trust_anchor is not None:
                raise CertificateError("a bare public key cannot chain to the trust anchor")
            key = certs.ProducerKey.from_public_key(signer)
        key.check(m.producer_id, now, revoked_serials)
    except CertificateError as exc:
        raise InvalidObject(f"signer not acceptable: {exc}") from None
    except ValueError:
        raise InvalidObject("signer not acceptable: unsupported key") from None
    if key.kid != m.kid:
        raise InvalidObject("kid does not identify the signer's key")
    return key.public_key


def verify(
    data: bytes | ProtectedObject,
    *,
    signer: Signer | SignerLookup,
    now: int,
    resource_id: str | None = None,
    trust_anchor: x509.Certificate | None = None,
    revoked_serials: Container[int] = (),
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
    max_size: int = DEFAULT_MAX_OBJECT_SIZE,
) -> ProtectedObject:
    """Check an object without any secret: structure, signer, signature, times.

    ``signer`` is a :class:`~oscar.certs.ProducerKey`, the producer's certificate or public key, or
    a function of (producer id, kid) returning one. A certificate needs ``trust_anchor`` and must
    chain to it; with ``trust_anchor`` set, a ``ProducerKey`` must have been checked against that
    same anchor and a bare public key is refused. ``resource_id``, when given, is the resource the
    caller asked for: an object of any other resource is refused. An object is refused after its
    ``exp`` and when its ``iat`` lies more than ``max_clock_skew`` seconds ahead of ``now``.

    ``data`` may be an object the caller has decoded already (to find its signer, say), so that
    it is not decoded twice. Returns the decoded object; raises :class:`InvalidObject` if any
    check fails.
    """
    obj = (
        data
        if isinstance(data, ProtectedObject)
        else ProtectedObject.from_bytes(data, max_size=max_size)
    )
    m = obj.metadata
    if resource_id is not None and m.resource_id != resource_id:
        raise InvalidObject("object is for another resource")
    public_key = _resolve_signer(obj, signer, now, trust_anchor, revoked_serials)
    obj.sign1.verify(public_key, m.signature_algorithm)
    if now > m.exp:
        raise InvalidObject("object expired")
    if m.iat > now + max_clock_skew:
        raise InvalidObject("object issued in the future")
    return obj


def open(
    data: bytes,
    *,
    secrets: SecretLookup | KeyCache,
    signer: Signer | SignerLookup,
    now: int,
    resource_id: str | None = None,
    freshness: FreshnessState | None = None,
    trust_anchor: x509.Certificate | None = None,
    revoked_serials: Container[int] = (),
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
    max_size: int = DEFAULT_MAX_OBJECT_SIZE,
) -> Reading:
    """Verify (see :func:`verify`), check freshness, decrypt; return plaintext and metadata.

    ``secrets`` finds the access secret of (resource id, epoch) (a :class:`KeyCache` also keeps
    derived keys). With ``freshness`` the object must be newer than every object accepted before for
    its resource, and is recorded as the newest once it has decrypted. Raises :class:`InvalidObject`
    if any check fails; nothing is recorded then.
    """
    obj = verify(
        data,
        signer=signer,
        now=now,
        resource_id=resource_id,
        trust_anchor=trust_anchor,
        revoked_serials=revoked_serials,
        max_clock_skew=max_clock_skew,
        max_size=max_size,
    )
    return open_verified(obj, secrets=secrets, freshness=freshness)


def open_verified(
    obj: ProtectedObject,
    *,
    secrets: SecretLookup | KeyCache,
    freshness: FreshnessState | None = None,
) -> Reading:
    """The second half of :func:`open`, for an object :func:`verify` has just accepted: check
    freshness, decrypt, record. A caller that must fetch the secret between the two (a consumer
    asking the AS) verifies first, so that only a signed object can make it ask."""
    m = obj.metadata
    if freshness is not None:
        freshness.check(m.resource_id, m.epoch, m.seq)
    if isinstance(secrets, KeyCache):
        keys = secrets.keys_for(m.resource_id, m.epoch, m.aead)
    else:
        secret = secrets(m.resource_id, m.epoch)
        keys = (
            None if secret is None else ContentKeys.derive(secret, m.resource_id, m.epoch, m.aead)
        )
    if keys is None:
        raise InvalidObject("no access secret for this resource and epoch")
    aad = Encrypt0.to_be_encrypted(
        obj.encrypt0.protected, external_aad(m.producer_id, m.resource_id, m.epoch, m.seq)
    )
    plaintext = m.aead.decrypt(keys.cipher, keys.nonce(m.seq), obj.encrypt0.ciphertext, aad)
    if freshness is not None:
        freshness.accept(m.resource_id, m.epoch, m.seq)
    return Reading(plaintext, m)
