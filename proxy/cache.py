"""The proxy's cache: verified objects per resource, in memory (LRU) in front of a backend.

:class:`Cache` keeps entries (:class:`~proxy.entry.Entry`) in memory up to ``max_entries`` /
``max_bytes`` (least recently used out first) and writes each new one through to its backend (a
:class:`~proxy.backend.CacheBackend`: today :class:`~proxy.diskcache.DiskCache`, an SQLite file
encrypted at rest). Nothing is loaded at start: an entry comes into memory when it is first asked
for. Memory is bounded by the entries' real footprint, not only their objects' bytes
(:func:`footprint`). The newest version stored of each resource is remembered beyond its entry's
eviction (:meth:`Cache.newest`), so that an older object cannot come back then.

What this module does not do: verify objects (:mod:`proxy.core`), or store anything itself
beyond this process (the backend does, encrypted).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from .backend import CacheBackend
from .diskcache import MAX_HELD, DiskCache
from .entry import Entry

__all__ = [
    "ENTRY_OVERHEAD",
    "MAX_HELD",
    "Cache",
    "CacheBackend",
    "DiskCache",
    "Entry",
    "footprint",
]

#: Memory an entry takes beyond its object, resource id and upstream URI (the Entry, its small
#: fields, the LRU's slot): about 500 bytes on CPython 3.11, measured with tracemalloc
#: (bench/proxy_scale.py). Counted against ``max_bytes`` so that the limit bounds the memory
#: really used: a 64 B reading seals to about 235 bytes and takes about 750 in memory.
ENTRY_OVERHEAD = 512


class Cache:
    """Entries by resource id: memory in front of a backend (``disk``, named for the first one;
    None: memory only).

    The backend is read only on a miss in memory (nothing is loaded at start). ``max_bytes``
    bounds :func:`footprint`: the object, its names and :data:`ENTRY_OVERHEAD` per entry.
    """

    def __init__(
        self,
        disk: CacheBackend | None,
        *,
        max_entries: int,
        max_bytes: int,
        max_versions: int | None = None,
    ) -> None:
        self.disk = disk
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._memory: OrderedDict[str, Entry] = OrderedDict()
        #: The newest (epoch, seq) stored per resource, kept after its entry is evicted, so that
        #: an older object cannot come back then (:meth:`newest`). Keyed by 8 bytes of a hash
        #: of the resource id and packed into one int (about 110 bytes each); the oldest stored
        #: leave first, beyond ``max_versions`` (default: twice as many as memory and disk
        #: hold, so 220,000 and some 24 MB at the default limits).
        self._versions: dict[int, int] = {}
        on_disk = disk.max_entries if disk is not None else 0  # (an empty backend is falsy)
        self.max_versions = max_versions or 2 * (max_entries + on_disk)
        self._bytes = 0
        self._evictions = 0

    def __repr__(self) -> str:
        return f"Cache(memory={len(self._memory)}, bytes={self._bytes})"

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def memory_bytes(self) -> int:
        """The memory the entries take, as :func:`footprint` counts it."""
        return self._bytes

    @property
    def evictions(self) -> int:
        """Entries evicted from memory and from the disk to keep within the limits."""
        return self._evictions + (self.disk.evictions if self.disk is not None else 0)

    def get(self, resource_id: str) -> Entry | None:
        entry = self._memory.get(resource_id)
        if entry is not None:
            self._memory.move_to_end(resource_id)
            return entry
        if self.disk is None:
            return None
        entry = self.disk.get(resource_id)
        if entry is not None:
            self._remember(entry)
        return entry

    def in_memory(self, resource_id: str) -> Entry | None:
        """The entry held in memory (as :meth:`get`, never reading the backend)."""
        entry = self._memory.get(resource_id)
        if entry is not None:
            self._memory.move_to_end(resource_id)
        return entry

    def newest(self, resource_id: str) -> tuple[int, int] | None:
        """The newest (epoch, seq) stored for ``resource_id`` in this run, even if its entry
        was evicted since, or that of the entry held (on disk, from an earlier run)."""
        packed = self._versions.get(_version_key(resource_id))
        known = None if packed is None else (packed >> 64, packed & _SEQ_MASK)
        held = self.get(resource_id)
        if held is not None and (known is None or held.version > known):
            return held.version
        return known

    def put(self, entry: Entry, *, persist: bool = True) -> None:
        key = _version_key(entry.resource_id)
        packed = (entry.epoch << 64) | entry.seq
        self._versions[key] = max(packed, self._versions.pop(key, -1))  # to the end: newest
        while len(self._versions) > self.max_versions:
            self._versions.pop(next(iter(self._versions)))
        self._remember(entry)
        if persist and self.disk is not None:
            self.disk.put(entry)

    def touch(self, entry: Entry) -> None:
        """Replace an entry's serving state (fresh_until) in memory only."""
        if entry.resource_id in self._memory:
            self._memory[entry.resource_id] = entry

    def drop(self, resource_id: str) -> None:
        old = self._memory.pop(resource_id, None)
        if old is not None:
            self._bytes -= footprint(old)
        if self.disk is not None:
            self.disk.delete(resource_id)

    def entries(self) -> list[Entry]:
        return list(self._memory.values())

    def _remember(self, entry: Entry) -> None:
        old = self._memory.pop(entry.resource_id, None)
        if old is not None:
            self._bytes -= footprint(old)
        self._memory[entry.resource_id] = entry
        self._bytes += footprint(entry)
        while self._memory and (
            len(self._memory) > self.max_entries or self._bytes > self.max_bytes
        ):
            _, gone = self._memory.popitem(last=False)
            self._bytes -= footprint(gone)
            self._evictions += 1

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


_SEQ_MASK = (1 << 64) - 1


def _version_key(resource_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(resource_id.encode(), digest_size=8).digest(), "big")


def footprint(entry: Entry) -> int:
    """The memory an entry takes, as counted against ``max_bytes``."""
    return len(entry.obj) + len(entry.resource_id) + len(entry.upstream or "") + ENTRY_OVERHEAD
