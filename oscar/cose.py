"""COSE_Sign1 and COSE_Encrypt0 messages (RFC 9052): structure, Sig_structure, Enc_structure.

This is the generic COSE layer under the OSCAR object format. It decodes a message strictly (see
:mod:`oscar.cbor`), keeps the protected header both as the bytes on the wire and as a map, builds
the to-be-signed and to-be-encrypted structures, and signs, verifies, encrypts and decrypts with the
algorithms of :mod:`oscar.algorithms`. Every failure of incoming data raises
:class:`~oscar.errors.InvalidObject`.

Two rules from RFC 9052 that public implementations differ on, applied here:

- a protected header that encodes an empty map (``h'a0'`` on the wire) enters Sig_structure and
  Enc_structure as a zero-length byte string (RFC 9052 §3);
- ``alg`` is read from the protected header if it is there, otherwise from the unprotected one; a
  message that carries it in both, or a ``crit`` header this code cannot honour, is rejected.

What this layer does *not* decide (which headers must be present, which must be protected, what the
payload holds) is the job of :mod:`oscar.objects`.
"""

from __future__ import annotations

from typing import NamedTuple

from . import cbor
from .algorithms import AeadAlgorithm, PrivateKey, PublicKey, SignatureAlgorithm
from .errors import InvalidObject

__all__ = [
    "ALG",
    "CONTENT_TYPE",
    "CRIT",
    "ENCRYPT0_TAG",
    "IV",
    "KID",
    "PARTIAL_IV",
    "SIGN1_TAG",
    "Encrypt0",
    "HeaderMap",
    "Sign1",
]

SIGN1_TAG = 18
ENCRYPT0_TAG = 16

ALG = 1
CRIT = 2
CONTENT_TYPE = 3
KID = 4
IV = 5
PARTIAL_IV = 6

HeaderMap = dict[int | str, cbor.Value]

#: Container elements a message envelope or one header may hold: COSE headers have a handful, and
#: junk is refused before it costs real time (the proxy decodes objects from anyone who publishes).
MAX_ITEMS = 128

# The fixed first bytes of the structures below, encoded once.
_SIG_STRUCTURE_HEAD = b"\x84" + cbor.dumps("Signature1")
_ENC_STRUCTURE_HEAD = b"\x83" + cbor.dumps("Encrypt0")
_SIGN1_HEAD = cbor.head(6, SIGN1_TAG) + b"\x84"
_ENCRYPT0_HEAD = cbor.head(6, ENCRYPT0_TAG) + b"\x83"


def _decode(data: bytes, tag: int, length: int, tag_required: bool, what: str) -> list[cbor.Value]:
    try:
        value = cbor.loads(data, max_items=MAX_ITEMS)
    except cbor.MalformedCBOR as exc:
        raise InvalidObject(f"malformed CBOR: {exc}") from None
    except TypeError:
        raise InvalidObject("input is not bytes") from None
    if isinstance(value, cbor.Tag):
        if value.tag != tag:
            raise InvalidObject(f"wrong CBOR tag for {what}")
        value = value.value
    elif tag_required:
        raise InvalidObject(f"{what} is not tagged")
    if type(value) is not list or len(value) != length:
        raise InvalidObject(f"{what} is not an array of {length}")
    return value


def _protected_header(raw: cbor.Value) -> tuple[bytes, HeaderMap]:
    """The protected header as sent and as a map."""
    if type(raw) is not bytes:
        raise InvalidObject("protected header is not a byte string")
    if raw == b"":
        return raw, {}
    try:
        header = cbor.loads(raw, max_items=MAX_ITEMS)
    except cbor.MalformedCBOR:
        raise InvalidObject("protected header is not strict CBOR") from None
    if type(header) is not dict:
        raise InvalidObject("protected header is not a map")
    return raw, header


def _unprotected_map(raw: cbor.Value) -> HeaderMap:
    if type(raw) is not dict:
        raise InvalidObject("unprotected header is not a map")
    return raw


def _algorithm_id(protected: HeaderMap, unprotected: HeaderMap) -> cbor.Value:
    if CRIT in protected or CRIT in unprotected:
        raise InvalidObject("critical headers are not supported")
    if ALG in protected:
        if ALG in unprotected:
            raise InvalidObject("alg in both header buckets")
        return protected[ALG]
    if ALG in unprotected:
        return unprotected[ALG]
    raise InvalidObject("no algorithm")


def _structure_protected(raw: bytes, header: HeaderMap) -> bytes:
    # RFC 9052 §3: an empty protected map is a zero-length bstr in the *_structure.
    return raw if header else b""


class Sign1(NamedTuple):
    """A COSE_Sign1 message. ``protected`` is the header as sent, ``protected_map`` decoded.

    Messages are NamedTuples rather than frozen dataclasses: immutable all the same, and several
    times cheaper to build on CPython 3.11, which matters as one is built for every object received.
    """

    protected: bytes
    protected_map: HeaderMap
    unprotected: HeaderMap
    payload: bytes
    signature: bytes

    @classmethod
    def from_bytes(cls, data: bytes, *, tag_required: bool = True) -> Sign1:
        """Decode strictly; raises :class:`InvalidObject` for anything malformed.

        A detached payload (``nil``) is not supported and is rejected.
        """
        protected, unprotected, payload, signature = _decode(
            data, SIGN1_TAG, 4, tag_required, "COSE_Sign1"
        )
        protected_raw, protected_map = _protected_header(protected)
        if type(payload) is not bytes:
            raise InvalidObject("payload is not a byte string")
        if type(signature) is not bytes:
            raise InvalidObject("signature is not a byte string")
        return cls(
            protected_raw,
            protected_map,
            _unprotected_map(unprotected),
            payload,
            signature,
        )

    @staticmethod
    def to_be_signed(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
        """The Sig_structure ``["Signature1", protected, external_aad, payload]`` as bytes."""
        # Written out rather than through cbor.dumps: this runs for every object signed or checked.
        return b"".join(
            (
                _SIG_STRUCTURE_HEAD,
                cbor.head(2, len(protected)),
                protected,
                cbor.head(2, len(external_aad)),
                external_aad,
                cbor.head(2, len(payload)),
                payload,
            )
        )

    @classmethod
    def sign(
        cls,
        protected_map: HeaderMap,
        unprotected: HeaderMap,
        payload: bytes,
        key: PrivateKey,
        algorithm: SignatureAlgorithm,
        external_aad: bytes = b"",
    ) -> Sign1:
        """Make a signed message; the protected map is encoded in the order given."""
        protected = cbor.dumps(protected_map) if protected_map else b""
        tbs = cls.to_be_signed(protected, payload, external_aad)
        signature = algorithm.sign(key, tbs)
        return cls(protected, dict(protected_map), dict(unprotected), payload, signature)

    def algorithm_id(self) -> cbor.Value:
        """The ``alg`` header value, protected bucket first (see module docstring)."""
        return _algorithm_id(self.protected_map, self.unprotected)

    def verify(
        self, key: PublicKey, algorithm: SignatureAlgorithm, external_aad: bytes = b""
    ) -> None:
        """Check the signature with ``algorithm``; raises :class:`InvalidObject` if it fails."""
        tbs = self.to_be_signed(
            _structure_protected(self.protected, self.protected_map), self.payload, external_aad
        )
        algorithm.verify(key, self.signature, tbs)

    def to_bytes(self, *, tagged: bool = True) -> bytes:
        return b"".join(
            (
                _SIGN1_HEAD if tagged else b"\x84",
                cbor.head(2, len(self.protected)),
                self.protected,
                cbor.dumps(self.unprotected) if self.unprotected else b"\xa0",
                cbor.head(2, len(self.payload)),
                self.payload,
                cbor.head(2, len(self.signature)),
                self.signature,
            )
        )


class Encrypt0(NamedTuple):
    """A COSE_Encrypt0 message (ciphertext includes the AEAD tag)."""

    protected: bytes
    protected_map: HeaderMap
    unprotected: HeaderMap
    ciphertext: bytes

    @classmethod
    def from_bytes(cls, data: bytes, *, tag_required: bool = True) -> Encrypt0:
        """Decode strictly; raises :class:`InvalidObject` for anything malformed."""
        protected, unprotected, ciphertext = _decode(
            data, ENCRYPT0_TAG, 3, tag_required, "COSE_Encrypt0"
        )
        protected_raw, protected_map = _protected_header(protected)
        if type(ciphertext) is not bytes:
            raise InvalidObject("ciphertext is not a byte string")
        return cls(
            protected_raw,
            protected_map,
            _unprotected_map(unprotected),
            ciphertext,
        )

    @staticmethod
    def to_be_encrypted(protected: bytes, external_aad: bytes = b"") -> bytes:
        """The Enc_structure ``["Encrypt0", protected, external_aad]`` as bytes (the AEAD's AAD)."""
        return b"".join(
            (
                _ENC_STRUCTURE_HEAD,
                cbor.head(2, len(protected)),
                protected,
                cbor.head(2, len(external_aad)),
                external_aad,
            )
        )

    @classmethod
    def encrypt(
        cls,
        protected_map: HeaderMap,
        unprotected: HeaderMap,
        plaintext: bytes,
        key: bytes,
        nonce: bytes,
        algorithm: AeadAlgorithm,
        external_aad: bytes = b"",
    ) -> Encrypt0:
        """Seal ``plaintext`` under ``key`` and ``nonce`` (the caller owns nonce uniqueness)."""
        protected = cbor.dumps(protected_map) if protected_map else b""
        aad = cls.to_be_encrypted(protected, external_aad)
        ciphertext = algorithm.encrypt(algorithm.cipher(key), nonce, plaintext, aad)
        return cls(protected, dict(protected_map), dict(unprotected), ciphertext)

    def algorithm_id(self) -> cbor.Value:
        """The ``alg`` header value, protected bucket first (see module docstring)."""
        return _algorithm_id(self.protected_map, self.unprotected)

    def decrypt(
        self, key: bytes, nonce: bytes, algorithm: AeadAlgorithm, external_aad: bytes = b""
    ) -> bytes:
        """Open the ciphertext; raises :class:`InvalidObject` if it does not authenticate."""
        if len(nonce) != algorithm.nonce_length:
            raise InvalidObject("nonce has the wrong length for the algorithm")
        aad = self.to_be_encrypted(
            _structure_protected(self.protected, self.protected_map), external_aad
        )
        return algorithm.decrypt(algorithm.cipher(key), nonce, self.ciphertext, aad)

    def to_bytes(self, *, tagged: bool = True) -> bytes:
        return b"".join(
            (
                _ENCRYPT0_HEAD if tagged else b"\x83",
                cbor.head(2, len(self.protected)),
                self.protected,
                cbor.dumps(self.unprotected),
                cbor.head(2, len(self.ciphertext)),
                self.ciphertext,
            )
        )
