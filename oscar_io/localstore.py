"""What a device keeps in its private state directory that more than one role uses: the
directory's lock, sealed files read through a parser, and the trust cache.

- :func:`directory_lock`: an exclusive ``flock`` on ``<state directory>/lock``, held while a file
  is re-read, merged and saved, so two processes sharing a directory never undo each other's work.
- :func:`load_parsed`: a :class:`~oscar_io.statefiles.SealedFile`'s value through a parser;
  malformed content is one :class:`~oscar_io.errors.StateError` naming the file.
- :class:`TrustCache`: producer certificates (kid → DER and the end of their validity) and the AS's
  CRL (DER and its ``next_update``), as the AS sent them, in the sealed file ``trust`` (label
  ``"<role> trust"``; the consumer keeps it beside its other state, the proxy in ``state/trust``).
  It is what :class:`oscar_io.trust.Trust` remembers between runs (its
  :class:`~oscar_io.trust.TrustStore`).

The file's layout (CBOR) is ``{"certs": [[kid, der, not_after], ...], "crl": [der, next_update] |
null}``. What this module does not do: check a certificate or a CRL (:mod:`oscar_io.trust` does,
on every load: the cache is never trusted by itself), or talk to the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from oscar.certs import KID_LENGTH

from .aswire import uint
from .errors import StateError
from .statefiles import SealedFile

__all__ = [
    "CachedCertificate",
    "CachedCrl",
    "TrustCache",
    "directory_lock",
    "load_parsed",
]

#: Bytes of a key id (DESIGN §4: the first 8 bytes of SHA-256 of the key).


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold the exclusive lock of a state directory (the file ``lock`` in it, mode 0600, never
    through a symbolic link). Not re-entrant: one holder per process at a time."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def load_parsed(file: SealedFile | None, parse: Callable[[Any], Any]) -> Any:
    """``parse`` of the file's value; None when there is no such file (or ``file`` is None).
    :class:`StateError` when it does not open or ``parse`` finds it malformed (TypeError,
    ValueError, KeyError)."""
    if file is None:
        return None
    doc = file.load()
    if doc is None:
        return None
    try:
        return parse(doc)
    except (TypeError, ValueError, KeyError):
        raise StateError(f"{file.path} holds malformed data") from None


class CachedCertificate(NamedTuple):
    """A producer certificate as the AS sent it, and when it stops being valid (seconds)."""

    der: bytes
    not_after: int


class CachedCrl(NamedTuple):
    """The AS's revocation list as it sent it, and when the AS promises the next one."""

    der: bytes
    next_update: int


def _parse_trust(doc: Any) -> tuple[dict[bytes, CachedCertificate], CachedCrl | None]:
    certificates: dict[bytes, CachedCertificate] = {}
    if not isinstance(doc, dict) or set(doc) != {"certs", "crl"}:
        raise TypeError
    for entry in doc["certs"]:
        kid, der, not_after = entry
        if type(kid) is not bytes or len(kid) != KID_LENGTH or type(der) is not bytes:
            raise TypeError
        certificates[kid] = CachedCertificate(der, uint(not_after))
    crl = None
    if doc["crl"] is not None:
        der, next_update = doc["crl"]
        if type(der) is not bytes:
            raise TypeError
        crl = CachedCrl(der, uint(next_update))
    return certificates, crl


class TrustCache:
    """Certificates and the CRL, in memory and (with a ``directory``) in its sealed file.

    ``directory`` is a private state directory the caller has opened
    (:func:`~oscar_io.statefiles.private_dir`), or None to keep everything in memory. The file
    is read here: :class:`StateError` when it does not open or holds malformed data (nothing is
    written then). Each put re-reads the file under the directory's lock and merges (the later
    ``not_after`` per kid, the later ``next_update``) before saving; OSError if the disk refuses.
    """

    def __init__(self, directory: Path | None, key: bytes, label: str) -> None:
        self.directory = directory
        self.certificates: dict[bytes, CachedCertificate] = {}
        self.crl: CachedCrl | None = None
        self._file = (
            None if directory is None else SealedFile(directory / "trust", key, f"{label} trust")
        )
        stored = load_parsed(self._file, _parse_trust)
        if stored is not None:
            self.certificates, self.crl = stored

    def __repr__(self) -> str:
        where = "memory" if self.directory is None else str(self.directory)
        return f"TrustCache({where!r}, certificates={len(self.certificates)})"

    def certificate(self, kid: bytes, now: int) -> bytes | None:
        """The cached certificate (DER) of ``kid`` if it is still valid at ``now``."""
        cached = self.certificates.get(kid)
        return cached.der if cached is not None and now <= cached.not_after else None

    def put_certificate(self, kid: bytes, der: bytes, not_after: int) -> None:
        """Cache a certificate the caller has checked; OSError if the disk refuses."""
        self.certificates[kid] = CachedCertificate(der, not_after)
        self._save()

    def put_crl(self, der: bytes, next_update: int) -> None:
        """Cache a CRL the caller has checked; OSError if the disk refuses."""
        self.crl = CachedCrl(der, next_update)
        self._save()

    def _save(self) -> None:
        if self._file is None or self.directory is None:
            return
        with directory_lock(self.directory):
            stored = load_parsed(self._file, _parse_trust)
            if stored is not None:
                certificates, crl = stored
                for kid, cached in certificates.items():
                    mine = self.certificates.get(kid)
                    if mine is None or mine.not_after < cached.not_after:
                        self.certificates[kid] = cached
                if crl is not None and (self.crl is None or self.crl.next_update < crl.next_update):
                    self.crl = crl
            self._file.save(
                {
                    "certs": [[kid, c.der, c.not_after] for kid, c in self.certificates.items()],
                    "crl": None if self.crl is None else [self.crl.der, self.crl.next_update],
                }
            )
