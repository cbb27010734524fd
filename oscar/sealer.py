"""Sealing: encrypt a representation, then sign it, into a protected object (DESIGN §4).

:class:`Sealer` seals the objects of one resource and epoch with the checks and the fixed bytes
done once; :func:`seal` makes one per call. Both write the pinned layout out directly (the test
suite checks the bytes against the generic COSE layer and the pinned vectors).

What this module does not do: allocate sequence numbers (:mod:`oscar.sequence`), keep time
(``iat`` and ``exp`` are arguments) or find keys (the caller hands in the secret and the signing
key).
"""

from __future__ import annotations

from . import certs
from .algorithms import PrivateKey
from .cbor import dumps, head
from .cose import ALG, CONTENT_TYPE, ENCRYPT0_TAG, KID, PARTIAL_IV, SIGN1_TAG
from .errors import PlaintextTooLarge
from .keys import MAX_SEQ, AccessSecret, ContentKeys
from .model import CWT_CLAIMS, EPOCH, EXP, IAT, ISS, SEQ, SUB, partial_iv
from .names import owns, require_device_id, require_resource_id
from .profiles import DEFAULT_PROFILE, Profile

__all__ = ["Sealer", "seal", "signing_key_for"]


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
        signing_key = signing_key_for(profile, signing_key)
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
        piv = partial_iv(seq)
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


def signing_key_for(profile: Profile, key: PrivateKey | certs.SigningKey) -> certs.SigningKey:
    """``key`` as a :class:`~oscar.certs.SigningKey`; ValueError unless ``profile`` signs with its
    algorithm."""
    signing_key = (
        key if isinstance(key, certs.SigningKey) else certs.SigningKey.from_private_key(key)
    )
    if signing_key.algorithm is not profile.signature:
        raise ValueError(
            f"profile {profile.name} signs with {profile.signature.name}, "
            f"but the key is a {signing_key.algorithm.name} key"
        )
    return signing_key


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
