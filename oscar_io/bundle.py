"""The credentials bundle ``oscar-as enroll`` writes (JSON, mode 0600), loaded strictly; its PSK
never appears in a ``repr``."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from oscar import cbor, names
from oscar.keys import hkdf_sha256

from .errors import BundleError

__all__ = ["LINK_PSK_LENGTH", "ROLES", "Bundle"]

#: Link PSKs (device ↔ proxy DTLS keys) are 16 bytes, tinydtls's limit.
LINK_PSK_LENGTH = 16
ROLES = ("producer", "consumer", "proxy")


@dataclass(frozen=True, repr=False)
class Bundle:
    """A device's credentials from enrollment: identity, AS address, PSK, the CA certificate."""

    device_id: str
    role: str
    as_uri: str
    psk_identity: str
    psk: bytes = field(repr=False)
    ca_certificate: x509.Certificate = field(repr=False)

    def __repr__(self) -> str:
        return f"Bundle(device_id={self.device_id!r}, role={self.role!r}, as_uri={self.as_uri!r})"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bundle:
        """Read and check a bundle file; :class:`BundleError` says what is wrong.

        Like ssh with a private key, a bundle that others may read is refused: it holds the PSK.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(65_536)
        except OSError as exc:
            raise BundleError(f"cannot read the bundle {path}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise BundleError(f"the bundle {path} is not a regular file")
        if mode & 0o077:
            raise BundleError(
                f"the bundle {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                "it holds a PSK: chmod 600 it"
            )
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: bytes, where: str = "the bundle") -> Bundle:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise BundleError(f"{where} is not JSON") from None
        keys = {"id", "role", "as_uri", "psk_identity", "psk_hex", "ca_cert_pem"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise BundleError(f"{where} must hold exactly: {', '.join(sorted(keys))}")
        if not all(isinstance(doc[k], str) for k in keys):
            raise BundleError(f"every field of {where} is a string")
        if not names.is_device_id(doc["id"]):
            raise BundleError(f"{where} has a malformed device id")
        if doc["role"] not in ROLES:
            raise BundleError(f"{where} has an unknown role (one of {', '.join(ROLES)})")
        try:
            uri = urlsplit(doc["as_uri"])
            _ = uri.port  # raises ValueError for a port out of range
        except ValueError:
            uri = None
        if uri is None or uri.scheme != "coaps" or not uri.hostname or uri.path not in ("", "/"):
            raise BundleError(f"{where}: as_uri must be coaps://HOST[:PORT]")
        identity = doc["psk_identity"]
        if not 1 <= len(identity.encode()) <= 32:
            raise BundleError(f"{where}: the PSK identity must be 1 to 32 bytes")
        try:
            psk = bytes.fromhex(doc["psk_hex"])
        except ValueError:
            raise BundleError(f"{where}: psk_hex is not hex") from None
        if not 1 <= len(psk) <= 16:
            raise BundleError(f"{where}: the PSK must be 1 to 16 bytes (tinydtls)")
        try:
            ca = x509.load_pem_x509_certificate(doc["ca_cert_pem"].encode())
        except ValueError:
            raise BundleError(f"{where}: ca_cert_pem is not a PEM certificate") from None
        return cls(doc["id"], doc["role"], doc["as_uri"].rstrip("/"), identity, psk, ca)

    def state_key(self, purpose: str) -> bytes:
        """A 32-byte key for this device's local state files, derived from its PSK."""
        info = cbor.dumps(["OSCAR state", self.device_id, purpose])
        return hkdf_sha256(self.psk, info, 32)
