"""What a proxy instance does with the cluster store: its memory layer in front of the shared one.

In a cluster (``--cluster``, :mod:`proxy.cluster`) each instance keeps a memory layer
(:class:`proxy.cache.Cache` without a disk) in front of the store the instances share:

- a hit in memory costs no round trip; a miss, or a stale entry, reads the store
  (:func:`lookup`): what another instance fetched or was published is served from there;
- the store's events bring every new object into each instance's memory (:func:`take`), and
  that is news for the instance's observers (each instance notifies its own);
- an upstream fetch is done by one instance of the cluster at a time (:func:`refresh`, a lock
  with an expiry); the others wait for its object, and fetch themselves only if the lock ends
  without one;
- when the store is back after an outage (:func:`resync`), what an instance holds goes in
  (a store restarted empty gets its cache and anti-rollback memory back) and what it holds older
  than the store's is dropped.

Without the store, an instance serves what its memory holds (stale too, until ``exp``) and
refuses the rest (5.03): an upstream fetch or a PUT needs the cluster's anti-rollback memory.

What this module does not do: talk to the store (:mod:`proxy.cluster`) or verify
(:mod:`proxy.core`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .cluster import ClusterStore, ClusterUnavailable, Verdict
from .entry import Entry

if TYPE_CHECKING:
    from .core import Proxy

__all__ = ["lookup", "refresh", "resync", "take"]


async def lookup(
    proxy: Proxy, cluster: ClusterStore, resource_id: str, entry: Entry | None
) -> Entry | None:
    """The newer of ``entry`` (held in memory) and the store's, taken into memory. Without the
    store: ``entry`` if it may still be served, else :class:`~proxy.core.Unavailable` (5.03)."""
    from .core import Unavailable

    try:
        found = proxy.valid(await cluster.get(resource_id))
    except ClusterUnavailable as exc:
        if entry is None:
            raise Unavailable("5.03", str(exc)) from None
        proxy.stats.stale_served += 1
        return entry.refreshed(proxy.now() + 1)  # served as it is for now
    if found is None:
        return entry
    take(proxy, found)
    held = proxy.cache.in_memory(resource_id)
    return held if held is not None and held.version >= found.version else found


def take(proxy: Proxy, entry: Entry) -> None:
    """Take an entry another instance stored (an event, or read on a miss) into memory: news
    for this instance's observers if it is newer than anything it held."""
    cache = proxy.cache
    newest = cache.newest(entry.resource_id)
    if newest is not None and entry.version < newest:
        return
    held = cache.in_memory(entry.resource_id)
    if held is not None and held.version == entry.version:
        if entry.fresh_until > held.fresh_until:
            cache.touch(entry)
        return
    cache.put(entry, persist=False)
    if newest is None or entry.version > newest:
        for notify in proxy.on_new_object:
            notify(entry.resource_id)


async def resync(proxy: Proxy, cluster: ClusterStore) -> None:
    """The store is back: put what this instance holds; take what the store holds newer (news
    for this instance's observers: it missed those events), or drop the entry if it is gone."""
    for entry in proxy.cache.entries():
        if await cluster.put(entry) is Verdict.OLDER:
            found = await cluster.get(entry.resource_id)
            if found is None:
                proxy.cache.drop(entry.resource_id)
            else:
                take(proxy, found)


async def refresh(
    proxy: Proxy, cluster: ClusterStore, resource_id: str, source: str, entry: Entry | None
) -> Entry | None:
    """:meth:`Proxy.refresh <proxy.core.Proxy.refresh>` by one instance of the cluster at a
    time; the others wait for its object (or the lock's end) and serve it."""
    from .core import Unavailable

    ttl = proxy.limits.upstream_timeout + 2.0
    deadline = time.monotonic() + ttl + 1.0
    while True:
        try:
            lock = await cluster.lock(resource_id, source, ttl)
        except ClusterUnavailable as exc:
            if entry is None:
                raise Unavailable("5.03", str(exc)) from None
            proxy.stats.stale_served += 1
            return entry
        if lock is not None:
            try:
                # Another instance may have fetched and let go of the lock since this one read
                # the store: look again under the lock, or the upstream is asked twice.
                entry = await lookup(proxy, cluster, resource_id, entry)
                if entry is not None and proxy.now() < entry.fresh_until:
                    return entry
                return await proxy.refresh(resource_id, source, entry)
            finally:
                await cluster.unlock(lock)
        left = deadline - time.monotonic()
        if left <= 0:
            return proxy.valid(entry)
        await cluster.changed(resource_id, source, min(left, 0.5))
        entry = await lookup(proxy, cluster, resource_id, entry)
        if entry is not None and proxy.now() < entry.fresh_until:
            return entry
