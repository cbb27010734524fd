"""A budget for the certificate lookups that objects from outside make the proxy send to the AS.

An object names its signer by ``kid``; a kid the proxy has no certificate for is asked of the AS
(:class:`oscar_io.trust.Trust`), before the signature can be checked. An origin that a
forward-proxy client names, serving objects with a new random kid each time, would otherwise make
the proxy ask the AS once per object. Trust remembers a kid the AS does not know for a while, but
not a kid it has never seen.

:class:`LookupBudget` holds token buckets: one per origin (the host an object was fetched from,
whatever its port; or the producer that published it) and one for the whole proxy. A lookup takes
a token from both; with either empty, the lookup is not sent and the object cannot be verified
now: :class:`AsUnavailable`, which the proxy treats as the AS being out of reach (a fetch serves
what it holds and backs off that upstream; a PUT gets 5.03). A known kid (certificate cached)
costs nothing, and so does a lookup while every AS is busy (a 5.03 or 4.29 whose Max-Age has not
passed: the AS client would not send it). Tokens come back at the budget's rate; the table of
origins is bounded. In a cluster the buckets are the cluster store's (:attr:`LookupBudget.shared`),
so that the budget is the cluster's, not each instance's.

:class:`BudgetedAs` puts the budget in front of :meth:`AsClient.certificate`: it is the
:class:`~oscar_io.trust.CertificateSource` the proxy's Trust asks (the CRL goes to the AS client
unbudgeted: it is one per ``next_update``, whatever the objects). The origin of the object being
checked comes from :data:`origin` (a context variable set by the proxy around each check).
What this module does not do: decide whether a kid is known (that is Trust's cache).
"""

from __future__ import annotations

import contextvars
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from cryptography import x509

from oscar_io.asclient import AsClient
from oscar_io.errors import AsUnavailable

__all__ = ["BudgetedAs", "LookupBudget", "origin", "origin_of"]

#: The origin of the object being checked (None: not an object from outside).
origin: contextvars.ContextVar[str | None] = contextvars.ContextVar("origin", default=None)

_MAX_ORIGINS = 4096


def origin_of(upstream: str | None, resource_id: str) -> str:
    """The budget key of an object: the host it was fetched from (ports are free to an origin,
    so not part of it), or the producer that published it."""
    if upstream is None:
        return "published by " + resource_id.partition("/")[0]
    try:
        host = urlsplit(upstream).hostname or upstream
    except ValueError:
        host = upstream
    return "fetched from " + host


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class LookupBudget:
    """Token buckets: ``per_origin`` and ``total`` lookups per minute (each also the burst)."""

    def __init__(
        self, *, per_origin: int, total: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_origin = per_origin
        self.total = total
        self._clock = clock
        self._global = _Bucket(float(total), clock())
        self._origins: OrderedDict[str, _Bucket] = OrderedDict()
        #: Lookups refused for want of budget, since the start.
        self.refused = 0
        #: In a cluster, the budget the instances share (:meth:`proxy.cluster.ClusterStore.take`:
        #: key, per-origin size, total size): it replaces this instance's buckets.
        self.shared: Callable[[str, int, int], Awaitable[bool]] | None = None

    def __repr__(self) -> str:
        return f"LookupBudget(origins={len(self._origins)}, refused={self.refused})"

    def _refill(self, bucket: _Bucket, size: int, now: float) -> None:
        bucket.tokens = min(float(size), bucket.tokens + (now - bucket.stamp) * size / 60.0)
        bucket.stamp = now

    def take(self, key: str) -> bool:
        """Spend one lookup for ``key``; False (nothing spent) if either bucket is empty."""
        now = self._clock()
        bucket = self._origins.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.per_origin), now)
            self._origins[key] = bucket
            while len(self._origins) > _MAX_ORIGINS:
                self._origins.popitem(last=False)
        self._origins.move_to_end(key)
        self._refill(bucket, self.per_origin, now)
        self._refill(self._global, self.total, now)
        if bucket.tokens < 1.0 or self._global.tokens < 1.0:
            self.refused += 1
            return False
        bucket.tokens -= 1.0
        self._global.tokens -= 1.0
        return True

    async def spend(self, key: str) -> bool:
        """:meth:`take`, or the cluster's budget when the instances share one (nothing is spent
        and False while the cluster store cannot be reached: fail closed)."""
        if self.shared is None:
            return self.take(key)
        from .cluster import ClusterUnavailable

        try:
            taken = await self.shared(key, self.per_origin, self.total)
        except ClusterUnavailable:
            taken = False
        if not taken:
            self.refused += 1
        return taken


class BudgetedAs:
    """The AS lookups of the proxy's Trust (a :class:`~oscar_io.trust.CertificateSource`): the
    certificate lookups for objects from outside spend budget."""

    def __init__(self, client: AsClient, budget: LookupBudget) -> None:
        self._client = client
        self._budget = budget

    def __repr__(self) -> str:
        return f"BudgetedAs({self._budget!r})"

    async def certificate(self, *, kid: bytes) -> bytes:
        """The DER certificate of ``kid`` from the AS; :class:`AsUnavailable` without asking when
        the budget of the object's origin (or of the proxy) is spent."""
        wait = self._client.busy_for()
        if wait is not None:  # no AS may be asked before its Max-Age: spend no budget on it
            raise AsUnavailable(f"the AS is busy; retry in {wait:g} s", retry_after=wait)
        key = origin.get()
        if key is not None and not await self._budget.spend(key):
            raise AsUnavailable("too many certificate lookups for unknown signers; later")
        return await self._client.certificate(kid=kid)

    async def revocation_list(self) -> x509.CertificateRevocationList:
        return await self._client.revocation_list()
