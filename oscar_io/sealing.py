"""The one at-rest encryption recipe of OSCAR (Fernet-style: one format, one opaque error).

Everything a role keeps encrypted on its own disk — the AS's stored secrets (under its data key),
a device's state files (under a key derived from its PSK), the proxy's cached objects (under its
storage key) — is sealed the same way::

    blob = 0x01 || nonce (12 random bytes) || AES-256-GCM(key, plaintext, aad = context)

``context`` binds a blob to what it protects (a row, a file's label, a resource's cache key), so
a blob copied elsewhere does not open. The nonce is random: 96 bits are safe far beyond the number
of seals one key makes here (the AS data key, the busiest, seals once per secret created).

One error, :class:`SealError`, whatever went wrong (wrong key, altered, truncated, another context):
a caller learns nothing more from it, and says in its own words what the blob was.

Before this module, device state files and the proxy cache were ``nonce || ciphertext`` without the
version byte; :meth:`Sealer.open` reads that form too when asked (``legacy=True``), so state written
by an older release still opens (and is written in this form the next time it is saved).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from oscar.errors import OscarError

__all__ = ["KEY_LENGTH", "OVERHEAD", "VERSION", "SealError", "Sealer"]

KEY_LENGTH = 32
VERSION = b"\x01"
_NONCE = 12
_TAG = 16
#: Bytes a sealed blob has beyond its plaintext.
OVERHEAD = len(VERSION) + _NONCE + _TAG


class SealError(OscarError):
    """A sealed blob does not open: wrong key, altered, truncated or sealed for another context."""


class Sealer:
    """Seals and opens blobs under one 32-byte key; the key never appears in a ``repr``."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LENGTH:
            raise ValueError(f"a sealing key is {KEY_LENGTH} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return VERSION + nonce + self._aead.encrypt(nonce, plaintext, context)

    def open(self, blob: bytes, context: bytes, *, legacy: bool = False) -> bytes:
        """The plaintext of ``blob``; :class:`SealError` if it does not open. With ``legacy``, a
        blob in the earlier ``nonce || ciphertext`` form opens too."""
        if len(blob) >= OVERHEAD and blob[:1] == VERSION:
            try:
                return self._aead.decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], context)
            except InvalidTag:
                pass
        if legacy and len(blob) >= _NONCE + _TAG:
            try:
                return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], context)
            except InvalidTag:
                pass
        raise SealError("does not open")
