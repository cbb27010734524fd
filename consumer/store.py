"""The consumer's state: what it caches from the AS, and the freshness of what it has accepted.

Three :class:`~oscar_io.statefiles.SealedFile`\\ s in a private state directory (mode 0700), each
encrypted and authenticated under ``bundle.state_key("consumer")`` and written atomically with
mode 0600:

- ``trust``: producer certificates (kid → DER and the end of their validity) and the AS's CRL
  (DER and its ``next_update``): :class:`oscar_io.localstore.TrustCache`, which the proxy uses too;
- ``secrets``: access secrets per (resource, epoch), a bounded LRU (:data:`DEFAULT_MAX_SECRETS`);
- ``freshness``: the :class:`~oscar.freshness.FreshnessState` snapshot, newest (epoch, seq) per
  resource.

The newest accepted object of each resource (the protected bytes as received, never the
plaintext) is kept too, one sealed file per resource in the
subdirectory ``held`` (see :mod:`consumer.held`), so that a stale copy served by a cache can be
answered with the newest reading this consumer holds, checked again (see :mod:`consumer.client`).

Accepted readings are saved in groups (:meth:`ConsumerStore.commit_freshness`, run by
:mod:`consumer.commit` in a worker thread): one write and fsync of ``freshness`` for every reading
accepted meanwhile, then the newest object of each resource held.

Every file but the held objects is read when the store opens; one that fails authentication
raises :class:`~oscar_io.errors.StateError` and nothing is written. A held object is read only
when it is wanted, and one that cannot be read is dropped with a warning. Each save re-reads the
file under an exclusive lock on ``state_dir/lock`` and merges (newest freshness per resource,
union of certificates and secrets), so two consumer processes sharing a directory never undo each
other's freshness; a held object is written under the same lock, unless the freshness on disk
says another process accepted a newer one. With ``state_dir=None`` everything lives in memory only
(and is lost at exit).

What this module does not do: check certificates or CRLs (:mod:`oscar_io.trust` does, on every
load), talk to the network, or decide freshness (:mod:`oscar.freshness` does).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from oscar.errors import InvalidObject
from oscar.freshness import FreshnessState
from oscar.keys import ACCESS_SECRET_LENGTH, AccessSecret
from oscar.names import is_resource_id
from oscar.parts import is_part_name
from oscar_io.aswire import uint
from oscar_io.localstore import (
    CachedCertificate,
    CachedCrl,
    TrustCache,
    directory_lock,
    load_parsed,
)
from oscar_io.statefiles import SealedFile, private_dir

from .held import DEFAULT_MAX_HELD_BYTES, DEFAULT_MAX_OBJECTS, HeldObject, HeldObjects

__all__ = [
    "DEFAULT_MAX_HELD_BYTES",
    "DEFAULT_MAX_OBJECTS",
    "DEFAULT_MAX_SECRETS",
    "CachedCertificate",
    "CachedCrl",
    "ConsumerStore",
    "HeldObject",
]

#: Access secrets kept at most; the least recently used go first.
DEFAULT_MAX_SECRETS = 4096
log = logging.getLogger("oscar.consumer")
#: Binds the sealed files to their owner's role (part of each file's authenticated context).
_LABEL = "consumer"


def _parse_secrets(doc: Any) -> OrderedDict[tuple[str, int], AccessSecret]:
    secrets: OrderedDict[tuple[str, int], AccessSecret] = OrderedDict()
    if not isinstance(doc, list):
        raise TypeError
    for entry in doc:
        rid, epoch, value = entry
        # a resource's, or a part's (consumer.parts.part_key: RESOURCE#PART)
        base, mark, part = rid.partition("#") if isinstance(rid, str) else ("", "", "")
        if not is_resource_id(base) or (mark and not is_part_name(part)):
            raise TypeError
        if type(value) is not bytes:
            raise TypeError
        if len(value) != ACCESS_SECRET_LENGTH:
            raise ValueError
        secrets[(rid, uint(epoch))] = AccessSecret(value)
    return secrets


class ConsumerStore:
    """Certificates, the CRL, access secrets and freshness, in memory and (optionally) on disk."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None,
        key: bytes,
        *,
        max_secrets: int = DEFAULT_MAX_SECRETS,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
    ) -> None:
        """Open (creating it with mode 0700 if needed) and read the state directory.

        Raises :class:`StateError` when a file is unreadable, fails authentication or holds
        malformed data (nothing is written then), and ``OSError`` when the directory cannot be
        made.
        """
        if max_secrets < 1:
            raise ValueError("max_secrets must be at least 1")
        self._max_secrets = max_secrets
        self._secrets: OrderedDict[tuple[str, int], AccessSecret] = OrderedDict()
        self.freshness = FreshnessState()
        self.directory: Path | None = None
        self._files: dict[str, SealedFile] = {}
        #: The newest accepted objects (None: none are kept).
        self._held: HeldObjects | None
        if state_dir is None:
            #: The certificates and the CRL (:class:`oscar_io.trust.Trust` keeps them here).
            self.trust = TrustCache(None, key, _LABEL)
            self._held = HeldObjects(
                None, key, _LABEL, max_objects=max_objects, max_bytes=max_held_bytes
            )
            return
        self.directory = private_dir(Path(state_dir))
        self._files = {
            name: SealedFile(self.directory / name, key, f"{_LABEL} {name}")
            for name in ("secrets", "freshness")
        }
        # Read everything before anything can be written: a bad file stops the consumer unchanged.
        self.trust = TrustCache(self.directory, key, _LABEL)
        secrets = load_parsed(self._files["secrets"], _parse_secrets)
        freshness = load_parsed(self._files["freshness"], FreshnessState.from_snapshot)
        self._held = HeldObjects(
            self.directory / "held",
            key,
            _LABEL,
            max_objects=max_objects,
            max_bytes=max_held_bytes,
        )
        # An earlier version kept every held object in this one file, which could outgrow
        # what a state file may be: its content is only ever a cache, so it goes.
        legacy = self.directory / "objects"
        if legacy.is_file() and not legacy.is_symlink():
            legacy.unlink()
            log.info(
                "%s: removed (held objects are kept in %s now)", legacy, legacy.parent / "held"
            )
        if secrets is not None:
            self._secrets = secrets
        if freshness is not None:
            self.freshness = freshness

    def __repr__(self) -> str:
        where = "memory" if self.directory is None else str(self.directory)
        return (
            f"ConsumerStore({where!r}, certificates={len(self.trust.certificates)}, "
            f"secrets={len(self._secrets)}, resources={len(self.freshness)})"
        )

    @property
    def persistent(self) -> bool:
        return self.directory is not None

    def _load(self, name: str, parse: Callable[[Any], Any]) -> Any:
        return load_parsed(self._files.get(name), parse)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        if self.directory is None:  # pragma: no cover - callers check persistent first
            raise RuntimeError("an in-memory store has no lock")
        return directory_lock(self.directory)

    # --- certificates and the CRL (kept by self.trust) ------------------------------------------

    # --- access secrets ---------------------------------------------------------------------------

    def secret(self, resource_id: str, epoch: int) -> AccessSecret | None:
        """The cached access secret of (resource, epoch), or None (a :class:`SecretLookup`)."""
        secret = self._secrets.get((resource_id, epoch))
        if secret is not None:
            self._secrets.move_to_end((resource_id, epoch))
        return secret

    def put_secret(self, resource_id: str, epoch: int, secret: AccessSecret) -> None:
        """Cache an access secret from the AS; OSError if the disk refuses."""
        self._secrets[(resource_id, epoch)] = secret
        self._secrets.move_to_end((resource_id, epoch))
        if self.directory is not None:
            with self._locked():
                stored = self._load("secrets", _parse_secrets)
                for index, value in (stored or {}).items():
                    if index not in self._secrets:
                        self._secrets[index] = value
                        self._secrets.move_to_end(index, last=False)  # theirs: older than ours
                self._trim()
                self._files["secrets"].save(
                    [[rid, epoch, s.value] for (rid, epoch), s in self._secrets.items()]
                )
        else:
            self._trim()

    def _trim(self) -> None:
        while len(self._secrets) > self._max_secrets:
            self._secrets.popitem(last=False)

    # --- freshness --------------------------------------------------------------------------------

    def save_freshness(self, accepted: str | None = None) -> None:
        """Persist the freshness state, merged with what another process may have recorded.

        ``accepted`` is the resource whose newest object was just accepted: if another process
        sharing this directory has meanwhile accepted a newer one of it, ours was a rollback after
        all, and :class:`~oscar.errors.InvalidObject` is raised (the newer one is kept).
        OSError if the disk refuses, :class:`StateError` if the file went bad meanwhile.
        """
        if self.directory is None:
            return
        with self._locked():
            stored = self._load("freshness", FreshnessState.from_snapshot)
            merged = self.freshness.snapshot()
            theirs = stored.snapshot() if stored else {}
            for rid, (epoch, seq) in theirs.items():
                if rid not in merged or tuple(merged[rid]) < (epoch, seq):
                    merged[rid] = [epoch, seq]
            ours = self.freshness.newest(accepted) if accepted is not None else None
            self._files["freshness"].save(merged)
            self.freshness = FreshnessState.from_snapshot(merged)
            if ours is not None and tuple(merged[str(accepted)]) > ours:
                raise InvalidObject("rollback: a newer object was accepted by another process")

    def commit_freshness(
        self, base: dict[str, list[int]], accepted: Sequence[tuple[str, tuple[int, int], bytes]]
    ) -> tuple[dict[str, list[int]], set[int]]:
        """Persist a group of accepted objects in one write (one fsync): ``base`` (this process's
        committed state, :meth:`FreshnessState.snapshot`) with the (resource, (epoch, seq),
        object) ``accepted``, merged with what another process may have recorded, under the
        directory's lock; then the newest object of each resource is held (:meth:`put_held`).

        Returns the merged state (the caller makes it :attr:`freshness`) and the indices in
        ``accepted`` of the objects another process sharing the directory has meanwhile
        superseded (rollbacks after all, as in :meth:`save_freshness`: never to be released).
        Changes nothing in this object but the held objects, so that it can run in a worker
        thread (:mod:`consumer.commit`). OSError if the disk refuses, :class:`StateError` if the
        file went bad meanwhile: then nothing was written.
        """
        if self.directory is None:
            raise RuntimeError("an in-memory store commits nothing")
        with self._locked():
            stored = self._load("freshness", FreshnessState.from_snapshot)
            theirs = stored.snapshot() if stored else {}
            merged = {rid: list(pair) for rid, pair in base.items()}
            for rid, version, _ in accepted:
                if rid not in merged or tuple(merged[rid]) < version:
                    merged[rid] = list(version)
            for rid, (epoch, seq) in theirs.items():
                if rid not in merged or tuple(merged[rid]) < (epoch, seq):
                    merged[rid] = [epoch, seq]
            rejected = {
                i
                for i, (rid, version, _) in enumerate(accepted)
                if rid in theirs and tuple(theirs[rid]) > version
            }
            self._files["freshness"].save(merged)
            newest: dict[str, tuple[tuple[int, int], bytes]] = {}
            for i, (rid, version, data) in enumerate(accepted):
                if i not in rejected and (rid not in newest or newest[rid][0] < version):
                    newest[rid] = (version, data)
            for rid, ((epoch, seq), data) in newest.items():
                if tuple(merged[rid]) > (epoch, seq):
                    continue  # another process accepted a newer one (and holds it)
                try:
                    self._hold(rid, HeldObject(epoch, seq, bytes(data)))
                except OSError as exc:
                    # Only a cache: the freshness is committed, the reading stands; the older
                    # object still held is never given for this newer version.
                    log.warning("%s: the reading could not be held: %s", rid, exc.strerror)
        return merged, rejected

    # --- the newest accepted objects --------------------------------------------------------------

    def held(self, resource_id: str) -> HeldObject | None:
        """The newest object of ``resource_id`` this consumer (or another process sharing the
        directory) accepted, as received, or None. Reads that resource's file (the stale path
        only); one unreadable is dropped with a warning. The caller checks it again before use."""
        return None if self._held is None else self._held.get(resource_id)

    def put_held(self, resource_id: str, epoch: int, seq: int, data: bytes) -> None:
        """Keep the object just accepted as the newest of ``resource_id``, writing that resource's
        file only, unless this process holds it or a newer one already, or another process
        sharing the directory has accepted a newer one; OSError if the disk refuses."""
        if self._held is None:
            return
        held = HeldObject(epoch, seq, bytes(data))
        known = self._held.known(resource_id)
        if known is not None and known >= held.version:
            return
        if self.directory is None:
            self._held.put(resource_id, held)
            return
        with self._locked():
            stored = self._load("freshness", FreshnessState.from_snapshot)
            newest = stored.newest(resource_id) if stored is not None else None
            if newest is not None and newest > held.version:
                return  # another process accepted a newer one (and holds it)
            self._held.put(resource_id, held)

    def _hold(self, resource_id: str, held: HeldObject) -> None:
        """:meth:`put_held` under the lock already taken, the freshness on disk already known."""
        if self._held is None:
            return
        known = self._held.known(resource_id)
        if known is None or known < held.version:
            self._held.put(resource_id, held)
