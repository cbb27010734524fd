"""The COSE algorithms OSCAR supports, and the one place where their primitives are called.

AEADs: AES-CCM-16-64-128 (COSE 10), A128GCM (1), A256GCM (3), ChaCha20/Poly1305 (24).
Signatures: ES256 (-7, ECDSA P-256 with SHA-256, signature as raw r||s) and EdDSA (-8, Ed25519).
Every other algorithm identifier is unsupported: :func:`aead_for` and :func:`signature_for` raise
:class:`~oscar.errors.InvalidObject` for it, as they are used on incoming headers.

The exceptions of ``cryptography`` are translated here and nowhere else: a failed tag or signature
becomes ``InvalidObject``. ES256 signatures are made deterministically (RFC 6979), so a producer
needs no good randomness at signing time and test vectors reproduce byte for byte.

This module does not parse COSE structures and does not derive keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from .errors import InvalidObject, PlaintextTooLarge

__all__ = [
    "A128GCM",
    "A256GCM",
    "AEADS",
    "AES_CCM_16_64_128",
    "CHACHA20_POLY1305",
    "EDDSA",
    "ES256",
    "SIGNATURES",
    "AeadAlgorithm",
    "Cipher",
    "PrivateKey",
    "PublicKey",
    "SignatureAlgorithm",
    "aead_for",
    "signature_algorithm_of_key",
    "signature_for",
]

PrivateKey: TypeAlias = "ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey"
PublicKey: TypeAlias = "ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey"
Cipher: TypeAlias = "AESCCM | AESGCM | ChaCha20Poly1305"


ES256_ID, EDDSA_ID = -7, -8
AES_CCM_16_64_128_ID, A128GCM_ID, A256GCM_ID, CHACHA20_POLY1305_ID = 10, 1, 3, 24

# Made once: building these per signature shows up in the per-object cost.
_SIGN_ES256 = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_VERIFY_ES256 = ec.ECDSA(hashes.SHA256())
_VERIFY_ES256_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))


@dataclass(frozen=True, slots=True)
class AeadAlgorithm:
    """An AEAD algorithm as COSE registers it."""

    cose_id: int
    name: str
    key_length: int
    nonce_length: int
    tag_length: int
    #: Longest plaintext one nonce may seal, or None for "no practical limit".
    max_plaintext: int | None

    def cipher(self, key: bytes) -> Cipher:
        """The ``cryptography`` AEAD object for ``key`` (ValueError if the length is wrong)."""
        if len(key) != self.key_length:
            raise ValueError(f"{self.name} needs a {self.key_length}-byte key")
        if self.cose_id == AES_CCM_16_64_128_ID:
            return AESCCM(key, tag_length=self.tag_length)
        if self.cose_id == CHACHA20_POLY1305_ID:
            return ChaCha20Poly1305(key)
        return AESGCM(key)

    def encrypt(self, cipher: Cipher, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Seal ``plaintext``; raises :class:`PlaintextTooLarge` past the algorithm's limit."""
        if self.max_plaintext is not None and len(plaintext) > self.max_plaintext:
            raise PlaintextTooLarge(
                f"{self.name} cannot seal more than {self.max_plaintext} bytes "
                f"(got {len(plaintext)}); use A128GCM, A256GCM or ChaCha20/Poly1305"
            )
        return cipher.encrypt(nonce, plaintext, aad)

    def decrypt(self, cipher: Cipher, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Open ``ciphertext``; raises :class:`InvalidObject` if it does not authenticate."""
        if len(ciphertext) < self.tag_length:
            raise InvalidObject("ciphertext shorter than the tag")
        try:
            return cipher.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError, OverflowError):
            raise InvalidObject("decryption failed") from None


@dataclass(frozen=True, slots=True)
class SignatureAlgorithm:
    """A COSE signature algorithm whose signatures are ``signature_length`` raw bytes."""

    cose_id: int
    name: str
    signature_length: int

    def sign(self, key: PrivateKey, data: bytes) -> bytes:
        """Sign ``data``; raises TypeError if ``key`` is not of this algorithm."""
        return self.signer(key)(data)

    def signer(self, key: PrivateKey) -> Callable[[bytes], bytes]:
        """A function signing with ``key`` as :meth:`sign` does, the key checked once, here.

        For a signer of many objects (a :class:`~oscar.Sealer`): no type check per signature.
        Raises TypeError if ``key`` is not of this algorithm.
        """
        if self.cose_id == ES256_ID:
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                raise TypeError("ES256 needs an ECDSA P-256 private key")
            sign, algorithm = key.sign, _SIGN_ES256

            def es256(data: bytes) -> bytes:
                r, s = decode_dss_signature(sign(data, algorithm))
                return r.to_bytes(32, "big") + s.to_bytes(32, "big")

            return es256
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TypeError("EdDSA needs an Ed25519 private key")
        return key.sign

    @property
    def hashes_incrementally(self) -> bool:
        """Whether a signature can be checked from a digest of the message (:meth:`verify_digest`):
        ES256 signs SHA-256 of the message; EdDSA (PureEdDSA) needs the message itself."""
        return self.cose_id == ES256_ID

    def verify_digest(self, key: PublicKey, signature: bytes, digest: bytes) -> None:
        """:meth:`verify` for a message given by its SHA-256 ``digest`` (ES256 only: ValueError
        for another algorithm); raises :class:`InvalidObject` if the signature does not verify."""
        if not self.hashes_incrementally:
            raise ValueError(f"{self.name} cannot verify a digest")
        if len(signature) != self.signature_length:
            raise InvalidObject("signature has the wrong length")
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise InvalidObject("signer key does not match the signature algorithm")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            key.verify(der, digest, _VERIFY_ES256_PREHASHED)
        except InvalidSignature:
            raise InvalidObject("bad signature") from None

    def verify(self, key: PublicKey, signature: bytes, data: bytes) -> None:
        """Check ``signature`` over ``data``; raises :class:`InvalidObject` if it does not verify.

        A key of the wrong type for this algorithm is also an ``InvalidObject``: the algorithm came
        from the object, so a mismatch is the object's fault (EdDSA labelled ES256 and the reverse).
        """
        if len(signature) != self.signature_length:
            raise InvalidObject("signature has the wrong length")
        try:
            if self.cose_id == ES256_ID:
                if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
                    raise InvalidObject("signer key does not match the signature algorithm")
                der = encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                )
                key.verify(der, data, _VERIFY_ES256)
            else:
                if not isinstance(key, ed25519.Ed25519PublicKey):
                    raise InvalidObject("signer key does not match the signature algorithm")
                key.verify(signature, data)
        except InvalidSignature:
            raise InvalidObject("bad signature") from None


AES_CCM_16_64_128 = AeadAlgorithm(AES_CCM_16_64_128_ID, "AES-CCM-16-64-128", 16, 13, 8, 65_535)
A128GCM = AeadAlgorithm(A128GCM_ID, "A128GCM", 16, 12, 16, None)
A256GCM = AeadAlgorithm(A256GCM_ID, "A256GCM", 32, 12, 16, None)
CHACHA20_POLY1305 = AeadAlgorithm(CHACHA20_POLY1305_ID, "ChaCha20/Poly1305", 32, 12, 16, None)
AEADS = {a.cose_id: a for a in (AES_CCM_16_64_128, A128GCM, A256GCM, CHACHA20_POLY1305)}

ES256 = SignatureAlgorithm(ES256_ID, "ES256", 64)
EDDSA = SignatureAlgorithm(EDDSA_ID, "EdDSA", 64)
SIGNATURES = {s.cose_id: s for s in (ES256, EDDSA)}


def aead_for(cose_id: object) -> AeadAlgorithm:
    """The supported AEAD with this COSE id; :class:`InvalidObject` for anything else."""
    if type(cose_id) is int and cose_id in AEADS:
        return AEADS[cose_id]
    raise InvalidObject("unsupported content encryption algorithm")


def signature_for(cose_id: object) -> SignatureAlgorithm:
    """The supported signature algorithm with this COSE id; :class:`InvalidObject` otherwise."""
    if type(cose_id) is int and cose_id in SIGNATURES:
        return SIGNATURES[cose_id]
    raise InvalidObject("unsupported signature algorithm")


def signature_algorithm_of_key(key: PrivateKey | PublicKey) -> SignatureAlgorithm:
    """ES256 for a P-256 key, EdDSA for an Ed25519 key; ValueError for any other key."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name == "secp256r1":
            return ES256
        raise ValueError(f"unsupported curve {key.curve.name}; OSCAR signs with P-256 or Ed25519")
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return EDDSA
    raise ValueError("unsupported key type; OSCAR signs with ECDSA P-256 or Ed25519")
