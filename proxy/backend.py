"""The interface of the proxy's cache backends: where verified entries are kept beyond memory.

:class:`proxy.cache.Cache` (the memory layer: LRU, the newest version per resource) reads a
backend on a miss and writes every new entry through to it. Today's backend is
:class:`proxy.diskcache.DiskCache` (an SQLite file); a shared one (a Redis-protocol server, so that
several proxies serve one cache) plugs in behind the same :class:`CacheBackend`.

What every backend must do (the contract tests in
``tests/roles/proxy/test_proxy_cache_backends.py`` run against each one):

- keep entries by resource id, the newest write winning; never name a resource or hold an object
  byte in clear: keys are a keyed hash of the resource id, values are sealed with
  :class:`oscar_io.sealing.Sealer` under a key derived from the proxy's storage key, with the
  entry's key as the context, so that a value moved to another key does not open;
- :meth:`~CacheBackend.get`: the entry, or None for a miss, and None too (with one log line,
  never the value) for a value that does not open or decode, or is filed under another
  resource: a bad entry is a miss, never an error to the serving path;
- :meth:`~CacheBackend.put`: stay within the backend's limits (entries, bytes), evicting the least
  recently stored first; return how many entries were evicted;
- raise nothing to the serving path for a backend that has gone bad after opening: log and serve
  misses (the proxy refetches). Opening may raise :class:`~oscar_io.errors.StateError` (a store
  made under another key, or not a cache at all).

What this module does not do: implement a backend.
"""

from __future__ import annotations

from typing import Protocol

from .entry import Entry

__all__ = ["CacheBackend"]


class CacheBackend(Protocol):
    """Verified entries by resource id, encrypted at rest, bounded (see the module docstring)."""

    @property
    def max_entries(self) -> int:
        """The most entries kept."""
        ...

    @property
    def evictions(self) -> int:
        """Entries evicted to keep within the limits, since the start."""
        ...

    @property
    def size(self) -> int:
        """Bytes the entries take in the backend (as stored: sealed)."""
        ...

    def __len__(self) -> int:
        """Entries held."""
        ...

    def get(self, resource_id: str) -> Entry | None:
        """The entry of ``resource_id``; None for a miss or a bad entry (logged)."""
        ...

    def put(self, entry: Entry) -> int:
        """Store (replace) ``entry``; how many other entries were evicted."""
        ...

    def delete(self, resource_id: str) -> None:
        """Forget the entry of ``resource_id``, if any."""
        ...

    def close(self) -> None:
        """Write what is pending and let go of the store."""
        ...
