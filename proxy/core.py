"""The proxy's logic: verify before cache, fetch and revalidate upstream, relay observations.

Every object the proxy takes — fetched from a producer or published to it — passes
:meth:`Proxy.check` first, with no secret: strict decoding, the resource it must be of, a signer
certificate from the AS CA naming the producer that owns the resource, not revoked, the signature,
not expired, not issued in the future; and then it must be newer (epoch, seq) than what the proxy
holds. A bad object is counted and dropped: never cached, never served.

Lookups (:meth:`Proxy.lookup`) serve a fresh entry at once; otherwise one upstream request per
resource is in flight at a time (concurrent misses wait for it), with the entry's upstream ETag for
a 2.03 revalidation (:mod:`proxy.fetching`). An object in blocks (Block2, or BERT over TCP) is
taken in as it arrives within the object size limit and ``upstream_timeout`` per block; one
above 1 MiB is spooled to disk and hashed as it passes (:mod:`proxy.large`), and no object is
served before it is checked whole. When the upstream fails, the newest valid entry is served
until its ``exp``, and the upstream is left alone for ``upstream_backoff`` seconds.

Observations (:mod:`proxy.relays`): the downstream observers of a resource that are relayed
from one origin share one upstream observation, started with the first and cancelled with the
last; a relay goes only toward an origin that served the resource's object (or its reverse
target), within bounds in all and per client. Every notification is checked like a fetch, and
each new object is pushed to all observers of the resource (also a published one).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from oscar.errors import InvalidObject
from oscar.objects import ObjectMetadata, object_etag
from oscar.parts import PartsMetadata
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from oscar_io.coaperrors import TransportError
from oscar_io.errors import AccessDenied, BundleError
from oscar_io.localstore import TrustCache
from oscar_io.metrics import Histogram
from oscar_io.statefiles import private_dir
from oscar_io.tcproute import Route
from oscar_io.trust import CertificateSource, Trust

from . import fetching, shared
from .bodies import BodyError, BodyStore
from .cache import Cache
from .cluster import ClusterStore, ClusterUnavailable, Verdict
from .config import ProxyConfig
from .diskcache import DiskCache
from .entry import Entry
from .large import Intake
from .lookups import BudgetedAs, LookupBudget, origin, origin_of
from .relays import Relays
from .upstream import UpstreamError, upstream_failure

__all__ = ["Proxy", "Stats", "Unavailable", "UpstreamError", "upstream_failure"]

log = logging.getLogger("oscar.proxy")
_T = TypeVar("_T")
#: Upstream objects announced (Size2) at least this large come over TCP where the origin offers
#: it, else block-wise over UDP as before (the consumer's default threshold too).
UPSTREAM_TCP_THRESHOLD = 32 * 1024


class Unavailable(Exception):
    """No valid object to serve and the upstream did not give one. ``code`` for the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Stats:
    hits: int = 0
    #: Of the hits, those answered by the fast path (proxy.fastpath).
    fast_hits: int = 0
    #: Of the observers, those the fast path holds (proxy.fastobserve; a gauge).
    fast_observers: int = 0
    misses: int = 0
    revalidations: int = 0
    stale_served: int = 0
    rejected: int = 0
    #: Objects whose signature and certificate checked out (fetched or published).
    verified: int = 0
    upstream_errors: int = 0
    upstream_requests: int = 0
    published: int = 0
    publish_refused: int = 0
    echo_challenges: int = 0
    evictions: int = 0
    observers: int = 0
    upstream_observations: int = 0
    observations_declined: int = 0
    signer_lookups_refused: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Proxy:
    """One proxy's cache, trust and upstream client; :mod:`proxy.server` puts CoAP in front."""

    def __init__(self, config: ProxyConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.limits = config.limits
        self._clock = clock
        self.stats = Stats()
        #: Answers through aiocoap (not the fast paths'), by (method, outcome), and their times.
        self.answers: dict[tuple[str, str], int] = {}
        self.answer_seconds = Histogram()
        # Set by open(): see the properties below.
        self._bundle: Bundle | None = None
        self._cache: Cache | None = None
        self._trust: Trust | None = None
        #: The bodies of large objects, on disk (None in a cluster: objects whole in memory).
        self.bodies: BodyStore | None = None
        self._as_client: AsClient | None = None
        #: The store the instances of a cluster share (``--cluster``); None: a proxy alone.
        self.cluster: ClusterStore | None = None
        self.lookups = LookupBudget(
            per_origin=config.limits.signer_lookups_per_origin, total=config.limits.signer_lookups
        )
        self._upstream: Any = None
        #: Large upstream objects over CoAP over TCP where the origin offers it (same port).
        self.tcp = Route(
            UPSTREAM_TCP_THRESHOLD,
            timeout=self.limits.upstream_timeout,
            max_size=self.limits.max_object_size,
        )
        # Keyed by (resource id, upstream URI): a client naming some other upstream in a
        # Proxy-Uri (one that never answers, say) must not hold up or back off the others.
        self._inflight: dict[tuple[str, str], asyncio.Future[Entry | None]] = {}
        #: Until when each (resource, origin) is left alone after a failure.
        self.backoff: dict[tuple[str, str], float] = {}
        #: Observers and upstream observations per (resource, origin), bounded.
        self.relays = Relays(self)
        self.on_new_object: list[Callable[[str], None]] = []

    def __repr__(self) -> str:
        return f"Proxy({self.config.listen!r}, cache={self._cache!r})"

    @property
    def bundle(self) -> Bundle:
        """The proxy's credentials (RuntimeError before :meth:`open`)."""
        return _opened(self._bundle)

    @property
    def cache(self) -> Cache:
        """The verified objects held (RuntimeError before :meth:`open`)."""
        return _opened(self._cache)

    @property
    def trust(self) -> Trust:
        """Producer keys and revocation (RuntimeError before :meth:`open`)."""
        return _opened(self._trust)

    def now(self) -> float:
        return self._clock()

    # --- life cycle ---

    def open(self) -> None:
        """Load the bundle and the state (synchronous: nothing is served yet)."""
        bundle = Bundle.load(self.config.bundle)
        if bundle.role != "proxy":
            raise BundleError(f"the bundle is for a {bundle.role}, not a proxy")
        self._bundle = bundle
        state = private_dir(self.config.state)
        disk = None
        if self.config.cluster is None:
            disk = DiskCache(
                state / "cache.db",
                bundle.state_key("proxy storage"),
                max_entries=self.limits.disk_entries,
                max_bytes=self.limits.disk_bytes,
            )
            self.bodies = BodyStore(
                state / "large",
                bundle.state_key("proxy storage"),
                max_bytes=self.limits.large_bytes,
            )
        else:  # the cluster store is the backend: this instance keeps its memory layer only
            self.cluster = ClusterStore(
                self.config.cluster,
                bundle.state_key("proxy storage"),
                clock=self._clock,
                password=self.config.cluster_password(),
            )
        self._cache = Cache(
            disk, max_entries=self.limits.memory_entries, max_bytes=self.limits.memory_bytes
        )
        trust = TrustCache(private_dir(state / "trust"), bundle.state_key("proxy trust"), "proxy")
        self._trust = Trust(bundle, trust, self._budgeted_as_client)

    async def start(self) -> None:
        """Join the cluster (``--cluster``): :class:`~proxy.cluster.ClusterError` if its store
        cannot be used. Nothing to do for a proxy alone."""
        cluster = self.cluster
        if cluster is None:
            return
        cluster.on_object = functools.partial(shared.take, self)
        cluster.on_resync = functools.partial(shared.resync, self, cluster)
        cluster.counters = lambda: self.counters(totals=False)
        self.lookups.shared = cluster.take
        await cluster.open()

    async def revoked_serials(self) -> frozenset[int]:
        """The certificate serials the AS CA has revoked (:meth:`oscar_io.trust.Trust.
        revoked_serials`); TransportError when no current CRL can be had."""
        if self._trust is None:
            raise TransportError("cannot check revocation: the proxy is not open")
        return await self._trust.revoked_serials(int(self.now()))

    async def as_client(self) -> AsClient:
        if self._as_client is None:
            self._as_client = AsClient(self.bundle, timeout=10.0)
        return self._as_client

    async def _budgeted_as_client(self) -> CertificateSource:
        # The budget is in front of the certificate lookups (see proxy.lookups).
        return BudgetedAs(await self.as_client(), self.lookups)

    async def upstream(self) -> Any:
        if self._upstream is None:
            from aiocoap import Context

            self._upstream = await Context.create_client_context(transports=["udp6"])
        return self._upstream

    async def close(self) -> None:
        await self.relays.close()
        await self.tcp.close()
        if self._upstream is not None:
            await self._upstream.shutdown()
            self._upstream = None
        if self._as_client is not None:
            await self._as_client.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self._cache is not None:
            self._cache.close()

    def counters(self, *, totals: bool = True) -> dict[str, int]:
        """The live counters (served at /.well-known/oscar-stats and to ``oscar-proxy stats``).
        In a cluster, also this instance's ``cluster_*`` counters and (``totals``) the sums of
        every live instance's counters, ``all_*``."""
        self.stats.evictions = self.cache.evictions
        self.stats.signer_lookups_refused = self.lookups.refused
        self.stats.observers = self.relays.observers
        self.stats.upstream_observations = self.relays.relays
        self.stats.observations_declined = self.relays.declined
        doc = {
            **self.stats.as_dict(),
            "memory_entries": len(self.cache),
            "memory_bytes": self.cache.memory_bytes,
            "disk_entries": len(self.cache.disk) if self.cache.disk else 0,
            "disk_bytes": self.cache.disk.size if self.cache.disk else 0,
            "large_entries": len(self.bodies) if self.bodies is not None else 0,
            "large_bytes": self.bodies.total_bytes if self.bodies is not None else 0,
        }
        cluster = self.cluster
        if cluster is not None:
            doc.update({f"cluster_{k}": v for k, v in vars(cluster.stats).items()})
            doc["cluster_up"] = int(cluster.up)
            if totals:
                doc.update({f"all_{k}": v for k, v in cluster.totals.items()})
        return doc

    # --- checking objects ---

    async def check(self, data: bytes | Intake, resource_id: str, upstream: str | None) -> Entry:
        """Verify ``data`` as an object of ``resource_id`` (no secret involved): its bytes, or
        a large object's spool (:class:`proxy.large.Intake`; the entry then holds its length).

        Raises :class:`InvalidObject` (counted as rejected) and :class:`TransportError` when the
        AS is needed (a certificate, a CRL) and cannot be reached: then nothing is cached.
        """
        now = int(self.now())
        token = origin.set(origin_of(upstream, resource_id))
        m: ObjectMetadata | PartsMetadata  # a multi-part object's epoch is 0: by seq alone
        try:
            if isinstance(data, Intake):
                streamed, key = await self.trust.check_stream(data.finish(), resource_id, now)
                m, raw, body = streamed.metadata, b"", data.received
            else:
                obj, key = await self.trust.check_any(  # single-part or multi-part
                    data, resource_id, now, max_size=self.limits.max_object_size
                )
                m, raw, body = obj.metadata, bytes(data), 0
            self.stats.verified += 1
        except AccessDenied as exc:  # the AS refused this proxy a certificate or the CRL
            raise TransportError(str(exc)) from None
        except InvalidObject as exc:
            self.stats.rejected += 1
            log.info("rejected an object for %s: %s", resource_id, getattr(exc, "reason", exc))
            raise
        finally:
            origin.reset(token)
        return Entry(
            resource_id=resource_id,
            obj=raw,
            epoch=m.epoch,
            seq=m.seq,
            exp=m.exp,
            etag=object_etag(resource_id, m.epoch, m.seq),
            kid=m.kid,
            serial=key.serial,
            upstream=upstream,
            upstream_etag=None,
            fresh_until=0.0,
            body=body,
        )

    def keep_body(self, entry: Entry, intake: Intake) -> None:
        """Make a large entry's body (checked, in ``intake``) the one served, unless what is
        held is as new and readable or newer (:meth:`store` then decides, as for any object).
        :class:`~proxy.large.SpoolError` if it cannot be written (then nothing is cached)."""
        newest = self.cache.newest(entry.resource_id)
        if newest is not None and entry.version < newest:
            return
        held = self.cache.get(entry.resource_id)
        if held is not None and held.version == entry.version and self.readable(held):
            return
        intake.commit(entry.resource_id, entry.version)

    def readable(self, entry: Entry) -> bool:
        """Whether the entry's object can be served: in memory, or its body on disk."""
        if not entry.body:
            return True
        try:
            return (
                self.bodies is not None and self.bodies.size(entry.resource_id, entry.version) > 0
            )
        except BodyError:
            return False

    def lost(self, entry: Entry) -> None:
        """A large entry whose body cannot be read (evicted from disk, altered): forgotten, so
        that the next lookup fetches it again (its version is still remembered)."""
        log.info("the body of %s is gone from the disk: forgotten", entry.resource_id)
        self.cache.drop(entry.resource_id)

    def valid(self, entry: Entry | None) -> Entry | None:
        """The entry if it may still be served (not past its ``exp``)."""
        return entry if entry is not None and self.now() <= entry.exp else None

    async def store(self, entry: Entry) -> bool:
        """Keep ``entry`` if it is newer than what is held; True if it replaced it.

        "Held" includes what was held before: the newest version of each resource is remembered
        beyond its entry's eviction (:meth:`Cache.newest`), so that an origin cannot bring back
        an older object once the newer one has left the cache; in a cluster, also what any
        instance has stored (:meth:`ClusterStore.put <proxy.cluster.ClusterStore.put>`, which
        raises :class:`~proxy.cluster.ClusterUnavailable`: then nothing is kept)."""
        held = self.cache.get(entry.resource_id)
        newest = self.cache.newest(entry.resource_id)
        if newest is not None and entry.version < newest:
            self.stats.rejected += 1
            log.info("rejected a rollback of %s", entry.resource_id)
            return False
        if self.cluster is not None:
            same = held is not None and held.version == entry.version
            refresh = same and held is not None and entry.upstream == held.upstream
            if await self.cluster.put(entry, refresh=refresh) is Verdict.OLDER:
                self.stats.rejected += 1
                log.info(
                    "rejected a rollback of %s (another instance holds newer)", entry.resource_id
                )
                return False
        if held is not None and entry.version == held.version:
            # The same object again: keep the bytes first seen (a re-signed copy, such as
            # ECDSA's (r, n - s) twin, is not new: same ETag, one entry); it renews the entry
            # only from the entry's own origin (see fetching.take).
            if entry.upstream == held.upstream:
                self.cache.touch(held.refreshed(entry.fresh_until))
            return False
        self.cache.put(entry)
        if newest is not None and entry.version == newest:
            return False  # the newest again, after its entry was evicted: cached, not news
        for notify in self.on_new_object:
            notify(entry.resource_id)
        return True

    # --- lookups ---

    async def lookup(self, resource_id: str, upstream: str | None) -> Entry:
        """The object to serve for ``resource_id``; :class:`Unavailable` if there is none."""
        entry = self.valid(self.cache.get(resource_id))
        now = self.now()
        if entry is not None and now < entry.fresh_until:
            self.stats.hits += 1
            return entry
        if self.cluster is not None:  # what another instance stored, if fresher
            entry = await shared.lookup(self, self.cluster, resource_id, entry)
            if entry is not None and now < entry.fresh_until:
                self.stats.hits += 1
                return entry
        source = upstream or (entry.upstream if entry is not None else None)
        if source is None:
            if entry is not None:  # published: the newest we have, until its exp
                self.stats.hits += 1
                return entry
            raise Unavailable("4.04", "nothing cached for this resource")
        key = (resource_id, source)
        if entry is not None and now < self.backoff.get(key, 0.0):
            self.stats.stale_served += 1
            return entry
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            try:
                if self.cluster is None:
                    result = await self.refresh(resource_id, source, entry)
                else:
                    result = await shared.refresh(self, self.cluster, resource_id, source, entry)
                future.set_result(result)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it
                raise
            finally:
                del self._inflight[key]
        else:
            result = await asyncio.shield(future)
        if result is None:
            raise Unavailable("5.02", "the upstream gave no valid object")
        return result

    async def refresh(self, resource_id: str, source: str, entry: Entry | None) -> Entry | None:
        """Fetch ``resource_id`` from ``source`` now (:func:`proxy.fetching.refresh`)."""
        return await fetching.refresh(self, resource_id, source, entry)

    async def complete(self, ctx: Any, request: Any, first: Any) -> tuple[Any, Intake | None]:
        """``first`` with the rest of its blocks (:func:`proxy.fetching.complete`)."""
        return await fetching.complete(self, ctx, request, first)

    # --- publishing ---

    async def publish(self, resource_id: str, data: bytes | Intake, max_age: int | None) -> bool:
        """Take an object PUT by its owner (its bytes, or a large one's spool: the caller
        closes it). True if it is new; InvalidObject if rejected (rollbacks included);
        TransportError when it cannot be verified now; SpoolError when a large object's body
        cannot be written."""
        entry = await self.check(data, resource_id, None)
        if self.cluster is not None:  # what the cluster holds: its upstream, its version
            try:
                found = await self.cluster.get(resource_id)
            except ClusterUnavailable as exc:  # not accepted: the PUT gets 5.03
                raise TransportError(str(exc)) from None
            if found is not None:
                shared.take(self, found)
        held = self.cache.get(resource_id)
        newest = self.cache.newest(resource_id)
        if newest is not None and entry.version < newest:
            self.stats.rejected += 1
            raise InvalidObject("older than the object held")
        age = min(
            self.limits.published_max_age if max_age is None else max_age, self.limits.max_fresh
        )
        entry = _with(
            entry,
            upstream=held.upstream if held is not None else None,
            fresh_until=self.now() + age,
        )
        if isinstance(data, Intake):
            self.keep_body(entry, data)
        try:
            new = await self.store(entry)
        except ClusterUnavailable as exc:  # not accepted: the PUT gets 5.03
            raise TransportError(str(exc)) from None
        if not new and self.cluster is not None:
            held = self.cache.get(resource_id)
            if held is None or held.version < entry.version:  # the cluster refused a rollback
                raise InvalidObject("older than the object another instance holds")
        if new:
            self.stats.published += 1
        return new

    # --- observation relay (proxy.relays) ---

    def reverse_target(self, resource_id: str) -> str | None:
        """The configured reverse target URI of ``resource_id`` (longest prefix), if any."""
        segments = resource_id.split("/")
        for cut in range(len(segments), 0, -1):
            base = self.config.reverse.get("/".join(segments[:cut]))
            if base is not None:
                return f"{base}/{resource_id}"
        return None

    async def notified(
        self, resource_id: str, source: str, response: Any, intake: Intake | None = None
    ) -> None:
        """Take a relay's notification of ``resource_id`` from ``source`` (and a large
        object's ``intake``, :meth:`complete`) like a fetch."""
        held = self.cache.get(resource_id)
        await fetching.take(self, resource_id, source, held, response, intake)


def _opened(value: _T | None) -> _T:
    if value is None:
        raise RuntimeError("the proxy is not open")
    return value


def _with(entry: Entry, **changes: Any) -> Entry:
    from dataclasses import replace

    return replace(entry, **changes)
