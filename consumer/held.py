"""The newest accepted object of each resource, kept so a stale copy can be answered with it.

The bytes kept are the protected object as received (never the plaintext); the caller checks them
again in full before use (see :mod:`consumer.client`). Persistent: one
:class:`~oscar_io.statefiles.SealedFile` per resource in the private directory ``held`` of the
state directory, named by an HMAC of the resource id under a key derived from the state key (a
name says nothing of its resource), holding ``[resource id, epoch, seq, object]``. In memory
(no state directory): an LRU of the same.

Bounded by count (:data:`DEFAULT_MAX_OBJECTS`) and by total bytes (:data:`DEFAULT_MAX_HELD_BYTES`,
well under :data:`~oscar_io.statefiles.MAX_STATE_FILE`); the least recently written go first
and an object bigger than the byte budget is not held. Accepting an object writes that resource's
file only; a file is read only when its reading is wanted (a stale copy was served). A held file
that cannot be read (corrupt, tampered with, too big, another resource's) is removed with a
warning and counts as nothing held: it never makes a normal read fail.

What this module does not do: decide what is newest (the caller and
:meth:`consumer.store.ConsumerStore.put_held` do, under the state directory's lock), or check an
object.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from oscar.names import is_resource_id
from oscar_io.errors import StateError
from oscar_io.statefiles import SealedFile, private_dir

__all__ = ["DEFAULT_MAX_HELD_BYTES", "DEFAULT_MAX_OBJECTS", "HeldObject", "HeldObjects"]

log = logging.getLogger("oscar.consumer")

#: Newest accepted objects kept at most (one per resource); the least recently written go first.
DEFAULT_MAX_OBJECTS = 256
#: Bytes of held objects kept at most (all resources together); a bigger object is not held.
DEFAULT_MAX_HELD_BYTES = 32 << 20


class HeldObject(NamedTuple):
    """The newest object accepted of a resource, as received (protected: never the plaintext)."""

    epoch: int
    seq: int
    data: bytes

    @property
    def version(self) -> tuple[int, int]:
        return (self.epoch, self.seq)


class HeldObjects:
    """The held objects of one consumer, on disk (``directory``) or in memory (None)."""

    def __init__(
        self,
        directory: Path | None,
        key: bytes,
        label: str,
        *,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        max_bytes: int = DEFAULT_MAX_HELD_BYTES,
    ) -> None:
        """StateError when ``directory`` is unsafe, OSError when it cannot be made."""
        self._max_objects = max(1, max_objects)
        self._max_bytes = max(1, max_bytes)
        self._key = key
        self._label = f"{label} held object"
        self._names = hmac.new(key, b"OSCAR held object names", hashlib.sha256).digest()
        #: What this process wrote or read (resource → version): what the accept path consults.
        self._versions: dict[str, tuple[int, int]] = {}
        self._memory: OrderedDict[str, HeldObject] = OrderedDict()
        self.directory = None if directory is None else private_dir(directory)

    def __repr__(self) -> str:
        where = "memory" if self.directory is None else str(self.directory)
        return f"HeldObjects({where!r})"

    def _file(self, resource_id: str) -> SealedFile:
        if self.directory is None:  # pragma: no cover - callers check
            raise RuntimeError("an in-memory store has no files")
        name = hmac.new(self._names, resource_id.encode(), hashlib.sha256).hexdigest()[:32]
        return SealedFile(self.directory / name, self._key, self._label)

    def known(self, resource_id: str) -> tuple[int, int] | None:
        """The version of ``resource_id`` this process last held (memory only: no disk read)."""
        return self._versions.get(resource_id)

    def get(self, resource_id: str) -> HeldObject | None:
        """The object held of ``resource_id``, or None (none held, or its file was unreadable and
        has been removed)."""
        if self.directory is None:
            return self._memory.get(resource_id)
        file = self._file(resource_id)
        try:
            doc = file.load()
            if doc is None:
                self._versions.pop(resource_id, None)
                return None
            rid, epoch, seq, data = doc
            if rid != resource_id or not isinstance(data, bytes):
                raise ValueError
            if type(epoch) is not int or type(seq) is not int or min(epoch, seq) < 0:
                raise ValueError
        except (StateError, TypeError, ValueError) as exc:
            reason = (
                str(exc) if isinstance(exc, StateError) else f"{file.path} holds malformed data"
            )
            log.warning("%s: the reading held is dropped: %s", resource_id, reason)
            self.drop(resource_id)
            return None
        held = HeldObject(epoch, seq, data)
        self._versions[resource_id] = held.version
        return held

    def put(self, resource_id: str, held: HeldObject) -> None:
        """Keep ``held`` as the object of ``resource_id`` (the caller decided it is the newest);
        one bigger than the byte budget is not held (nor the older one). OSError if the disk
        refuses."""
        if not is_resource_id(resource_id):
            raise ValueError("not a resource id")
        if not held.data or len(held.data) > self._max_bytes:  # empty: read as it arrived
            self.drop(resource_id)
            return
        if self.directory is None:
            self._memory[resource_id] = held
            self._memory.move_to_end(resource_id)
            total = sum(len(h.data) for h in self._memory.values())
            while len(self._memory) > self._max_objects or total > self._max_bytes:
                rid, oldest = self._memory.popitem(last=False)
                total -= len(oldest.data)
                self._versions.pop(rid, None)
        else:
            file = self._file(resource_id)
            file.save([resource_id, held.epoch, held.seq, held.data])
            self._trim(self.directory, keep=file.path.name)
        self._versions[resource_id] = held.version

    def drop(self, resource_id: str) -> None:
        """Forget what is held of ``resource_id``."""
        self._versions.pop(resource_id, None)
        self._memory.pop(resource_id, None)
        if self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(resource_id).path)

    def _trim(self, directory: Path, keep: str) -> None:
        """Remove the least recently written files beyond the count or the byte budget (never
        ``keep``, just written). Names are opaque: age is the modification time."""
        files = []
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):  # a temporary file being written
                    continue
                with contextlib.suppress(FileNotFoundError):
                    info = entry.stat(follow_symlinks=False)
                    files.append((info.st_mtime_ns, entry.name, info.st_size))
        files.sort()
        count, total = len(files), sum(size for _, _, size in files)
        for _, name, size in files:
            if count <= self._max_objects and total <= self._max_bytes:
                break
            if name == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)
            count, total = count - 1, total - size
        # Which resources went is not known (opaque names): the next read finds out.
        if count < len(files):
            self._versions.clear()
