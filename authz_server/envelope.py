"""Encryption at rest for the AS: the master key file and the envelope around every stored secret
(:class:`Envelope`).

Envelope encryption, two levels:

- the **master key** (32 random bytes) lives in its own file, ``master.key``, mode 0600, outside the
  database; a stolen database file alone reveals no secret;
- a **data key** (32 random bytes) encrypts every access secret, PSK and the CA key with
  AES-256-GCM. It is stored in the database only wrapped (encrypted) under the master key, so
  changing the master key means re-wrapping one value, not every row.

Both levels use OSCAR's one at-rest recipe, :class:`oscar_io.sealing.Sealer` (``0x01 || nonce ||
AES-256-GCM(key, plaintext, aad = context)``), which is the format this module always wrote:
databases made before it used the Sealer open unchanged. :class:`~oscar_io.sealing.SealError` is
translated here, in :func:`_open` only, into this module's :class:`VaultError`.

Each ciphertext is bound to what it protects through the AEAD's associated data (for example
``b"psk\\x00sensor-1"``), so a value copied to another row does not decrypt. The audit chain is
keyed by its own key derived from the master key (HMAC), so a database edit cannot be re-chained.

**Link PSKs** (the DTLS keys between the proxy and each producer or consumer, DESIGN §5) are
derived, never stored: ``HMAC-SHA256(link key, CBOR ["OSCAR link", proxy id, device id])[:16]``
with ``link key = HKDF-SHA256(data key, info "OSCAR link key", 32)``. Only the holder of the data
key can compute one; they survive restarts and change with nothing but the data key.

This module does no database I/O; it reads and writes only the master key file.

Errors: :class:`MasterKeyError` (the master key file), :class:`VaultError` (a stored ciphertext);
their names are older than the module's, kept for the callers (the store, the CLI).
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path

from oscar import cbor, names
from oscar.keys import hkdf_sha256
from oscar_io.bundle import LINK_PSK_LENGTH
from oscar_io.sealing import KEY_LENGTH, OVERHEAD, VERSION, Sealer, SealError

__all__ = [
    "KEY_LENGTH",
    "Envelope",
    "MasterKeyError",
    "VaultError",
    "create_master_key",
    "read_master_key",
]

#: What the wrapped data key is bound to.
_DATA_KEY_CONTEXT = b"OSCAR data key"


class VaultError(Exception):
    """A stored ciphertext does not decrypt: wrong master key, or the database was tampered with."""


class MasterKeyError(Exception):
    """The master key file is missing, unreadable, of the wrong size or readable by others."""


def create_master_key(path: Path) -> bytes:
    """Write a fresh master key to ``path`` (mode 0600; refuses to overwrite) and return it."""
    key = os.urandom(KEY_LENGTH)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise MasterKeyError(f"{path} exists already; refusing to overwrite a master key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def read_master_key(path: Path) -> bytes:
    """Read the master key; refuse a file others can read or write."""
    try:  # never through a symbolic link; a FIFO does not block
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            data = f.read(KEY_LENGTH + 1)
    except OSError as exc:
        raise MasterKeyError(f"cannot read the master key {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(f"{path} is accessible to other users; it must be mode 0600")
    if len(data) != KEY_LENGTH:
        raise MasterKeyError(f"{path} is not a {KEY_LENGTH}-byte master key")
    return data


def _open(sealer: Sealer, blob: bytes, context: bytes) -> bytes:
    """``sealer.open``, its one error translated into :class:`VaultError` (the only place)."""
    if len(blob) < OVERHEAD or blob[:1] != VERSION:
        raise VaultError("a stored secret is malformed")
    try:
        return sealer.open(blob, context)
    except SealError:
        raise VaultError(
            "a stored secret does not decrypt (wrong master key or tampering)"
        ) from None


class Envelope:
    """Encrypts and decrypts stored secrets under the data key; keys the audit chain and derives
    the link PSKs. No key appears in its ``repr``."""

    __slots__ = ("_audit_key", "_data", "_data_key", "_link_key")

    def __init__(self, master_key: bytes, wrapped_data_key: bytes) -> None:
        if len(master_key) != KEY_LENGTH:
            raise ValueError("the master key is 32 bytes")
        self._data_key = _open(Sealer(master_key), wrapped_data_key, _DATA_KEY_CONTEXT)
        # Set up once: a grant decrypts a secret per request.
        self._data = Sealer(self._data_key)
        self._audit_key = hkdf_sha256(master_key, b"OSCAR audit chain", KEY_LENGTH)
        self._link_key = hkdf_sha256(self._data_key, b"OSCAR link key", KEY_LENGTH)

    def __repr__(self) -> str:
        return "Envelope(<keys redacted>)"

    @staticmethod
    def new_wrapped_data_key(master_key: bytes) -> bytes:
        """A fresh data key, wrapped under ``master_key``, to store in the database."""
        return Sealer(master_key).seal(os.urandom(KEY_LENGTH), _DATA_KEY_CONTEXT)

    def encrypt(self, plaintext: bytes, context: bytes) -> bytes:
        """Encrypt a secret for storage, bound to ``context`` (what and whose it is)."""
        return self._data.seal(plaintext, context)

    def decrypt(self, blob: bytes, context: bytes) -> bytes:
        """Decrypt a stored secret; :class:`VaultError` if it fails to authenticate."""
        return _open(self._data, blob, context)

    def chain(self, previous: bytes, record: bytes) -> bytes:
        """The audit chain value after ``record``: HMAC-SHA256(audit key, previous || record)."""
        return hmac.new(self._audit_key, previous + record, "sha256").digest()

    def chain_function(self) -> Callable[[bytes, bytes], bytes]:
        """:meth:`chain` as a function with the HMAC's key set up once (the keyed state is copied
        for each record), for walking a long chain: about 0.9 rather than 1.2 microseconds a
        record."""
        base = hmac.new(self._audit_key, digestmod="sha256")

        def chain(previous: bytes, record: bytes) -> bytes:
            h = base.copy()
            h.update(previous)
            h.update(record)
            return h.digest()

        return chain

    def link_psk(self, proxy_id: str, device_id: str) -> bytes:
        """The 16-byte DTLS PSK between proxy ``proxy_id`` and device ``device_id``.

        Raises ValueError if either is not a well-formed device id or they are the same.
        """
        if not names.is_device_id(proxy_id) or not names.is_device_id(device_id):
            raise ValueError("link PSKs are between two well-formed device ids")
        if proxy_id == device_id:
            raise ValueError("a link joins two different devices")
        info = cbor.dumps(["OSCAR link", proxy_id, device_id])
        return hmac.new(self._link_key, info, "sha256").digest()[:LINK_PSK_LENGTH]
