"""What a producer keeps on disk, in its state directory (mode 0700).

=================  ========================================================================
``key.pem``        its signing key, PKCS#8 PEM, mode 0600, made on first start
``cert.pem``       its certificate from the AS CA (public)
``keys.state``     per resource: the active and next epoch secrets (sealed, see below)
``sequence.state`` per resource: the lowest epoch it may still seal under and, per epoch, the
                   sequence limit reserved so far (sealed)
=================  ========================================================================

The two ``.state`` files are :class:`~oscar_io.asclient.SealedFile` s: AES-256-GCM under a key
derived from the bundle's PSK, replaced atomically and fsynced. ``sequence.state`` is written
*before* any number of a new window is used, so after a crash or kill -9 every seq below the stored
limit counts as used (DESIGN §4, nonce uniqueness).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from oscar import certs
from oscar.algorithms import PrivateKey
from oscar_io.aswire import KeyState
from oscar_io.errors import StateError
from oscar_io.statefiles import SealedFile, atomic_write, private_dir, read_state_file

__all__ = ["KeyFile", "ProducerState", "SequenceFile"]


class SequenceFile:
    """The :class:`oscar.sequence.SequenceStore` of a producer: limits per (resource, epoch)."""

    def __init__(self, sealed: SealedFile) -> None:
        self._sealed = sealed
        doc = sealed.load()
        self._doc: dict[str, Any] = {} if doc is None else _check_sequence_doc(doc, sealed.path)
        self.saves = 0

    def __repr__(self) -> str:
        return f"SequenceFile({str(self._sealed.path)!r})"

    def knows(self, resource_id: str) -> bool:
        """Whether this file has ever recorded anything for the resource."""
        return resource_id in self._doc

    def floor(self, resource_id: str) -> int:
        """The lowest epoch the producer may still seal under for this resource."""
        entry = self._doc.get(resource_id)
        return 0 if entry is None else int(entry["floor"])

    def raise_floor(self, resource_id: str, epoch: int) -> None:
        """Never seal under an epoch below ``epoch`` again; forget the limits below it."""
        entry = self._doc.setdefault(resource_id, {"floor": 0, "limits": {}})
        if epoch <= entry["floor"]:
            return
        entry["floor"] = epoch
        entry["limits"] = {e: n for e, n in entry["limits"].items() if e >= epoch}
        self._sealed.save(self._doc)

    def load(self, resource_id: str, epoch: int) -> int | None:
        entry = self._doc.get(resource_id)
        if entry is None:
            return None
        limit = entry["limits"].get(epoch)
        return None if limit is None else int(limit)

    def save(self, resource_id: str, epoch: int, limit: int) -> None:
        self._save(resource_id, epoch, limit)
        self.saves += 1  # a window reserved, durably (the metrics' sequence_windows_saved)

    def _save(self, resource_id: str, epoch: int, limit: int) -> None:
        entry = self._doc.setdefault(resource_id, {"floor": 0, "limits": {}})
        if epoch < entry["floor"]:
            raise ValueError("epoch below the floor")
        previous = entry["limits"].get(epoch)
        entry["limits"][epoch] = limit
        try:
            self._sealed.save(self._doc)
        except BaseException:
            if previous is None:
                del entry["limits"][epoch]
            else:
                entry["limits"][epoch] = previous
            raise


def _check_sequence_doc(doc: Any, path: Path) -> dict[str, Any]:
    ok = isinstance(doc, dict)
    for rid, entry in doc.items() if ok else ():
        ok = ok and (
            isinstance(rid, str)
            and isinstance(entry, dict)
            and set(entry) == {"floor", "limits"}
            and type(entry["floor"]) is int
            and isinstance(entry["limits"], dict)
            and all(type(k) is int and type(v) is int for k, v in entry["limits"].items())
        )
    if not ok:
        raise StateError(f"{path} does not hold sequence limits")
    return dict(doc)


class KeyFile:
    """The epoch secrets per resource, as last learnt from the AS or switched to locally."""

    def __init__(self, sealed: SealedFile) -> None:
        self._sealed = sealed
        doc = sealed.load()
        if doc is not None and not isinstance(doc, dict):
            raise StateError(f"{sealed.path} does not hold key states")
        self._states: dict[str, KeyState] = {}
        for rid, item in (doc or {}).items():
            try:
                self._states[rid] = KeyState.from_cbor(item, next_required=False)
            except Exception:
                raise StateError(f"{sealed.path} holds a malformed key state") from None

    def __repr__(self) -> str:
        return f"KeyFile({str(self._sealed.path)!r}, resources={len(self._states)})"

    def get(self, resource_id: str) -> KeyState | None:
        return self._states.get(resource_id)

    def put(self, state: KeyState) -> None:
        self._states[state.resource_id] = state
        self._sealed.save({rid: s.to_cbor() for rid, s in self._states.items()})


class ProducerState:
    """The state directory: key, certificate, key states and sequence limits."""

    def __init__(self, directory: Path, state_key: bytes) -> None:
        directory = private_dir(Path(directory))
        self.directory = directory
        # One producer per state directory: two would hand out the same seqs (nonce reuse).
        self._lock = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StateError(
                f"{directory} is in use by another producer process (one state directory per "
                "producer: two would reuse sequence numbers)"
            ) from None
        self.key_path = directory / "key.pem"
        self.cert_path = directory / "cert.pem"
        self.keys = KeyFile(SealedFile(directory / "keys.state", state_key, "producer keys"))
        self.sequences = SequenceFile(
            SealedFile(directory / "sequence.state", state_key, "producer sequence")
        )

    def __repr__(self) -> str:
        return f"ProducerState({str(self.directory)!r})"

    def signing_key(self, algorithm: str) -> PrivateKey:
        """The producer's key, made (mode 0600) on first use."""
        pem = read_state_file(self.key_path, private=True)
        if pem is None:
            key = certs.generate_signing_key(algorithm)
            atomic_write(self.key_path, certs.private_key_pem(key), 0o600)
            return key
        try:
            key = certs.load_private_key(pem)
        except ValueError as exc:
            raise StateError(f"{self.key_path}: {exc}") from None
        wanted = "ES256" if algorithm == "ES256" else "EdDSA"
        if certs.SigningKey.from_private_key(key).algorithm.name != wanted:
            raise StateError(
                f"{self.key_path} is not an {wanted} key (key_algorithm changed? "
                "move the old state away to start over)"
            )
        return key

    def close(self) -> None:
        """Release the directory (the lock)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def certificate_pem(self) -> bytes | None:
        return read_state_file(self.cert_path)

    def save_certificate(self, pem: bytes) -> None:
        atomic_write(self.cert_path, pem, 0o644)
