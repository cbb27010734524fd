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

__all__ = ["LINK_PSK_LENGTH", "MAX_AS_URIS", "ROLES", "Bundle", "check_as_uri"]

#: Link PSKs (device ↔ proxy DTLS keys) are 16 bytes, tinydtls's limit.
LINK_PSK_LENGTH = 16
ROLES = ("producer", "consumer", "proxy")
#: The most AS instances a bundle may list (``as_uris``).
MAX_AS_URIS = 8


def check_as_uri(text: str) -> bool:
    """Whether ``text`` is ``coaps://HOST[:PORT]`` (a trailing ``/`` allowed): an AS URI."""
    try:
        uri = urlsplit(text)
        _ = uri.port  # raises ValueError for a port out of range
    except ValueError:
        return False
    return (
        uri.scheme == "coaps"
        and bool(uri.hostname)
        and uri.path in ("", "/")
        and not uri.query
        and not uri.fragment
        and uri.username is None
    )


@dataclass(frozen=True, repr=False)
class Bundle:
    """A device's credentials from enrollment: identity, AS address, PSK, the CA certificate.

    ``as_uris`` lists every AS instance the device may use, the preferred first; it always starts
    with ``as_uri`` (``(as_uri,)`` when not given: a bundle from before failover)."""

    device_id: str
    role: str
    as_uri: str
    psk_identity: str
    psk: bytes = field(repr=False)
    ca_certificate: x509.Certificate = field(repr=False)
    as_uris: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.as_uris:
            object.__setattr__(self, "as_uris", (self.as_uri,))
        elif self.as_uris[0] != self.as_uri:
            raise ValueError("as_uris must start with as_uri")

    def __repr__(self) -> str:
        listed = "" if len(self.as_uris) == 1 else f", as_uris={self.as_uris!r}"
        return (
            f"Bundle(device_id={self.device_id!r}, role={self.role!r}, "
            f"as_uri={self.as_uri!r}{listed})"
        )

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
        if not isinstance(doc, dict) or set(doc) - {"as_uris"} != keys:
            raise BundleError(
                f"{where} must hold exactly: {', '.join(sorted(keys))} (and optionally as_uris)"
            )
        if not all(isinstance(doc[k], str) for k in keys):
            raise BundleError(f"every field of {where} but as_uris is a string")
        if not names.is_device_id(doc["id"]):
            raise BundleError(f"{where} has a malformed device id")
        if doc["role"] not in ROLES:
            raise BundleError(f"{where} has an unknown role (one of {', '.join(ROLES)})")
        if not check_as_uri(doc["as_uri"]):
            raise BundleError(f"{where}: as_uri must be coaps://HOST[:PORT]")
        as_uri = doc["as_uri"].rstrip("/")
        as_uris = cls._as_uris(doc.get("as_uris", [doc["as_uri"]]), doc["as_uri"], where)
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
        return cls(doc["id"], doc["role"], as_uri, identity, psk, ca, as_uris)

    @staticmethod
    def _as_uris(listed: object, as_uri: str, where: str) -> tuple[str, ...]:
        """The ``as_uris`` field checked: 1 to :data:`MAX_AS_URIS` distinct AS URIs, the first
        equal to ``as_uri``."""
        if (
            not isinstance(listed, list)
            or not 1 <= len(listed) <= MAX_AS_URIS
            or not all(isinstance(uri, str) for uri in listed)
        ):
            raise BundleError(f"{where}: as_uris must be a list of 1 to {MAX_AS_URIS} AS URIs")
        if not all(check_as_uri(uri) for uri in listed):
            raise BundleError(f"{where}: every entry of as_uris must be coaps://HOST[:PORT]")
        uris = tuple(uri.rstrip("/") for uri in listed)
        if len(set(uris)) != len(uris):
            raise BundleError(f"{where}: as_uris lists an AS twice")
        if uris[0] != as_uri.rstrip("/"):
            raise BundleError(f"{where}: as_uris must start with as_uri")
        return uris

    def state_key(self, purpose: str) -> bytes:
        """A 32-byte key for this device's own use (its local state files; a proxy's Echo values,
        the same for every instance of it), derived from its PSK: each purpose its own key."""
        info = cbor.dumps(["OSCAR state", self.device_id, purpose])
        return hkdf_sha256(self.psk, info, 32)
