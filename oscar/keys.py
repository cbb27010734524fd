"""Access secrets and the content keys derived from them (DESIGN §4, "Key derivation").

For a resource ``rid``, epoch ``e`` and AEAD ``alg``::

    content_key = HKDF-SHA256(ikm=access_secret, salt=b"",
                              info=CBOR["OSCAR key", rid, e, alg, key_len], L=key_len)
    base_iv     = HKDF-SHA256(ikm=access_secret, salt=b"",
                              info=CBOR["OSCAR iv", rid, e, alg, nonce_len], L=nonce_len)
    nonce(seq)  = base_iv XOR seq, big-endian, left-padded to nonce_len (RFC 9052 §3.1)

A part of a multi-part object (:mod:`oscar.parts`) derives its keys from its own secret with the
labels ``"OSCAR part key"`` / ``"OSCAR part iv"`` and ``[…, rid, part name, e, alg, len]``
(:meth:`ContentKeys.derive_part`).

Secret material never appears in a ``repr``: :class:`AccessSecret` and :class:`ContentKeys` hide it.
Derivation costs two HKDF calls, so :class:`KeyCache` keeps a bounded number of derived key sets
for callers that open many objects of one epoch. This module stores nothing on disk and makes no
random numbers: secrets come in from the caller.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import cbor
from .algorithms import AeadAlgorithm, Cipher

__all__ = [
    "ACCESS_SECRET_LENGTH",
    "AccessSecret",
    "ContentKeys",
    "KeyCache",
    "SecretLookup",
    "hkdf_sha256",
]

ACCESS_SECRET_LENGTH = 32
MAX_SEQ = 2**64 - 1


def hkdf_sha256(ikm: bytes, info: bytes, length: int, salt: bytes = b"") -> bytes:
    """RFC 5869 HKDF with SHA-256 (an empty salt means HashLen zero bytes, as the RFC says)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


@dataclass(frozen=True, slots=True)
class AccessSecret:
    """The 32 random bytes of one (resource, epoch); made by the AS, never shown in a ``repr``."""

    value: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if type(self.value) is not bytes:
            raise TypeError("an access secret is bytes")
        if len(self.value) != ACCESS_SECRET_LENGTH:
            raise ValueError(f"an access secret is {ACCESS_SECRET_LENGTH} bytes")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccessSecret):
            return NotImplemented
        return hmac.compare_digest(self.value, other.value)

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return "AccessSecret(<redacted>)"

    @classmethod
    def from_hex(cls, text: str) -> AccessSecret:
        """Parse 64 hex digits; ValueError (without echoing the input) otherwise."""
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError:
            raise ValueError("an access secret is written as 64 hexadecimal digits") from None
        if len(raw) != ACCESS_SECRET_LENGTH:
            raise ValueError("an access secret is written as 64 hexadecimal digits")
        return cls(raw)


@dataclass(frozen=True, slots=True)
class ContentKeys:
    """The content key and base IV of one (resource, epoch, AEAD), with its ready cipher."""

    resource_id: str
    epoch: int
    aead: AeadAlgorithm
    key: bytes = field(repr=False)
    base_iv: bytes = field(repr=False)
    _cipher: Cipher = field(repr=False, compare=False)

    @classmethod
    def derive(
        cls, secret: AccessSecret, resource_id: str, epoch: int, aead: AeadAlgorithm
    ) -> ContentKeys:
        """Derive the key set for (resource, epoch, aead) from the epoch's access secret."""
        if not isinstance(secret, AccessSecret):
            raise TypeError("secret must be an AccessSecret")
        if not isinstance(resource_id, str) or type(epoch) is not int or epoch < 0:
            raise ValueError("resource id must be text and epoch a non-negative integer")
        key_info = cbor.dumps(["OSCAR key", resource_id, epoch, aead.cose_id, aead.key_length])
        iv_info = cbor.dumps(["OSCAR iv", resource_id, epoch, aead.cose_id, aead.nonce_length])
        return cls._from_infos(secret, resource_id, epoch, aead, key_info, iv_info)

    @classmethod
    def derive_part(
        cls, secret: AccessSecret, resource_id: str, part: str, epoch: int, aead: AeadAlgorithm
    ) -> ContentKeys:
        """The key set of one encrypted part of a multi-part object (:mod:`oscar.parts`): as
        :meth:`derive`, with the labels ``"OSCAR part key"`` / ``"OSCAR part iv"`` and the part's
        name in the info, so it never equals a single-part key set nor another part's."""
        if not isinstance(secret, AccessSecret):
            raise TypeError("secret must be an AccessSecret")
        if not isinstance(resource_id, str) or not isinstance(part, str):
            raise ValueError("resource id and part name must be text")
        if type(epoch) is not int or epoch < 0:
            raise ValueError("epoch must be a non-negative integer")
        key_info = cbor.dumps(
            ["OSCAR part key", resource_id, part, epoch, aead.cose_id, aead.key_length]
        )
        iv_info = cbor.dumps(
            ["OSCAR part iv", resource_id, part, epoch, aead.cose_id, aead.nonce_length]
        )
        return cls._from_infos(secret, resource_id, epoch, aead, key_info, iv_info)

    @classmethod
    def _from_infos(
        cls,
        secret: AccessSecret,
        resource_id: str,
        epoch: int,
        aead: AeadAlgorithm,
        key_info: bytes,
        iv_info: bytes,
    ) -> ContentKeys:
        key = hkdf_sha256(secret.value, key_info, aead.key_length)
        base_iv = hkdf_sha256(secret.value, iv_info, aead.nonce_length)
        return cls(resource_id, epoch, aead, key, base_iv, aead.cipher(key))

    @property
    def cipher(self) -> Cipher:
        """The ready AEAD object for the content key."""
        return self._cipher

    def nonce(self, seq: int) -> bytes:
        """``base_iv`` XOR the Partial IV of ``seq`` left-padded to the nonce length."""
        if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
            raise ValueError("seq must be an integer from 0 to 2**64 - 1")
        n = self.aead.nonce_length
        return (int.from_bytes(self.base_iv, "big") ^ seq).to_bytes(n, "big")


#: Finds the access secret of (resource id, epoch), or None when the caller has none.
SecretLookup = Callable[[str, int], "AccessSecret | None"]


class KeyCache:
    """Derived key sets for recently used (resource, epoch, AEAD), looked up through ``secrets``.

    Bounded to ``max_entries`` (least recently used dropped first). :meth:`forget` drops an epoch,
    for example when its secret is destroyed.
    """

    def __init__(self, secrets: SecretLookup, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._secrets = secrets
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, int, int], ContentKeys] = OrderedDict()

    def __repr__(self) -> str:
        return f"KeyCache(entries={len(self._entries)}, max_entries={self._max})"

    def keys_for(self, resource_id: str, epoch: int, aead: AeadAlgorithm) -> ContentKeys | None:
        """The key set, derived on first use; None if there is no secret for (resource, epoch)."""
        index = (resource_id, epoch, aead.cose_id)
        keys = self._entries.get(index)
        if keys is not None:
            self._entries.move_to_end(index)
            return keys
        secret = self._secrets(resource_id, epoch)
        if secret is None:
            return None
        keys = ContentKeys.derive(secret, resource_id, epoch, aead)
        self._entries[index] = keys
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return keys

    def forget(self, resource_id: str, epoch: int) -> None:
        """Drop every key set derived for (resource, epoch)."""
        for index in [i for i in self._entries if i[0] == resource_id and i[1] == epoch]:
            del self._entries[index]
