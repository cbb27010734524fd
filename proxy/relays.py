"""Observations through the proxy: who observes, and the upstream observations (relays) they hold.

A downstream observation (a GET with Observe, :mod:`proxy.server`) is first *admitted*, within
``observers`` in all and ``observers_per_client``; at its first successful answer it is *attached*
to at most one relay: an upstream observation of one (resource, origin), shared by every
observation attached to it, started with the first and cancelled with the last of them. A relay
toward one origin so ends as soon as no observation holds it, whoever else observes the resource.

Which origin (:meth:`Relays.source`): the one the request names, if it is the resource's
configured reverse target or an origin that has given the proxy a verified object of that
resource (remembered for a bounded number of pairs, :meth:`Relays.served`); otherwise the origin
the served entry came from; none for an entry that was published and never fetched (its
observers are notified of what is published). A client naming origins that never served the
object (a victim's address, say) starts no upstream observation toward them: such an origin gets
at most the GETs of the lookups a forward proxy makes for Echo-proven clients, nothing that
outlives the request.

Limits: a client holds at most ``relays_per_client`` relays (the distinct (resource, origin)
among its observations, shared ones included), the proxy at most ``relays`` in all. Beyond any
limit the observation is declined: the GET is answered without Observe (RFC 7641 §4.1), the
client may register again later, and ``observations_declined`` counts it.

A client is a DTLS device, or a plain-CoAP IPv4 address or IPv6 /64 (:func:`client_of`): ports,
and the addresses of one IPv6 subnet, cost an attacker nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oscar.errors import InvalidObject
from oscar_io.peers import address_key, host_of
from oscar_io.tasks import stop_tasks

from .cluster import LEASE_RENEW, ClusterUnavailable
from .entry import Entry
from .large import SpoolError

if TYPE_CHECKING:
    from .core import Proxy

__all__ = ["Relays", "client_of"]

log = logging.getLogger("oscar.proxy")

#: (resource id, upstream URI)
Key = tuple[str, str]


def client_of(device: str | None, hostinfo: str) -> str:
    """The client an observation is counted against: the DTLS ``device``, else the address of
    ``hostinfo`` (``HOST:PORT``) without its port, an IPv6 one cut to its /64
    (:func:`oscar_io.peers.address_key`, the key the producer counts its observers by)."""
    return address_key(device, host_of(hostinfo))


@dataclass(slots=True)
class _Client:
    observers: int = 0
    #: Relays held: how many of this client's observations are attached to each.
    relays: Counter[Key] = field(default_factory=Counter)


@dataclass(slots=True)
class _Watch:
    client: str
    key: Key | None = None
    attached: bool = False


class Relays:
    """The proxy's downstream observations and upstream observations (see the module docstring).
    Observations are known by a holder id (the server's id of the request)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.limits = proxy.limits
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._holders: dict[Key, set[int]] = {}
        self._watches: dict[int, _Watch] = {}
        self._clients: dict[str, _Client] = {}
        #: (resource, origin) pairs that gave a verified object, newest last, bounded.
        self._served: OrderedDict[Key, None] = OrderedDict()
        self.max_served = 4 * self.limits.relays
        #: Observations declined for a limit, since the start.
        self.declined = 0

    def __repr__(self) -> str:
        return f"Relays(observers={len(self._watches)}, relays={len(self._tasks)})"

    @property
    def observers(self) -> int:
        return len(self._watches)

    @property
    def relays(self) -> int:
        return len(self._tasks)

    def served(self, resource_id: str, source: str) -> None:
        """``source`` gave a verified object of ``resource_id``: relays toward it are allowed."""
        key = (resource_id, source)
        self._served.pop(key, None)
        self._served[key] = None
        while len(self._served) > self.max_served:
            self._served.popitem(last=False)

    def source(self, resource_id: str, requested: str | None, entry: Entry | None) -> str | None:
        """The origin an observation of ``resource_id`` is relayed from (None: no relay)."""
        if requested is None:
            return None
        if (
            (resource_id, requested) in self._served
            or requested == self.proxy.reverse_target(resource_id)
            or (entry is not None and entry.upstream == requested)
        ):
            return requested
        return entry.upstream if entry is not None else None

    # --- observations ---

    def admit(self, holder: int, client: str) -> bool:
        """Count a new observation of ``client``; False (nothing counted) beyond a limit."""
        known = self._clients.get(client)
        if self.observers >= self.limits.observers or (
            known is not None and known.observers >= self.limits.observers_per_client
        ):
            self.declined += 1
            return False
        self._clients.setdefault(client, _Client()).observers += 1
        self._watches[holder] = _Watch(client)
        return True

    def attach(
        self, holder: int, resource_id: str, requested: str | None, entry: Entry | None
    ) -> bool:
        """At the first answer of an admitted observation: hold the relay it needs. False if
        a relay limit declines it (then :meth:`release` it); True once attached."""
        watch = self._watches.get(holder)
        if watch is None or watch.attached:
            return watch is not None
        source = self.source(resource_id, requested, entry)
        if source is not None:
            key = (resource_id, source)
            held = self._clients[watch.client].relays
            if key not in held and len(held) >= self.limits.relays_per_client:
                self.declined += 1
                return False
            if key not in self._tasks:
                if self.relays >= self.limits.relays:
                    self.declined += 1
                    return False
                self._tasks[key] = asyncio.create_task(
                    self._relay(resource_id, source), name=f"observe {resource_id}"
                )
                self._holders[key] = set()
            self._holders[key].add(holder)
            held[key] += 1
            watch.key = key
        watch.attached = True
        return True

    def release(self, holder: int) -> None:
        """The observation ended (or was declined): give back what it held; the relay it was
        attached to ends with the last observation attached to it."""
        watch = self._watches.pop(holder, None)
        if watch is None:
            return
        client = self._clients[watch.client]
        client.observers -= 1
        key = watch.key
        if key is not None:
            client.relays[key] -= 1
            if client.relays[key] <= 0:
                del client.relays[key]
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self._holders[key]
                    self._tasks.pop(key).cancel()
        if client.observers <= 0:
            del self._clients[watch.client]

    async def close(self) -> None:
        await stop_tasks(self._tasks.values())
        self._tasks.clear()
        self._holders.clear()

    # --- one relay ---

    def _live(self, resource_id: str, source: str, owner: asyncio.Task[Any] | None) -> bool:
        """Whether ``owner`` is still the relay of (resource, source). A cancelled one ends at
        its next step even if a cancellation was lost: in Python 3.11, ``wait_for`` can return
        the awaited result instead of raising CancelledError when both come at once."""
        return owner is not None and self._tasks.get((resource_id, source)) is owner

    async def _relay(self, resource_id: str, source: str) -> None:
        """The relay of (resource, source): the upstream observation itself for a proxy alone;
        in a cluster, only while this instance holds the relay's lease (one instance of the
        cluster observes upstream; the others' observers get its objects from the store's
        events). A standby takes the lease over within :data:`~proxy.cluster.LEASE_TTL` of its
        holder's end (a crash included) and observes in its turn."""
        owner = asyncio.current_task()
        cluster = self.proxy.cluster
        if cluster is None:
            await self._observe(resource_id, source, owner)
            return
        while self._live(resource_id, source, owner):
            try:
                held = await cluster.lease(resource_id, source)
            except ClusterUnavailable:
                held = False  # nothing it observed could be stored: wait for the store
            if not held:
                await asyncio.sleep(LEASE_RENEW)
                continue
            cluster.stats.leases_taken += 1
            cluster.stats.leases_held += 1
            log.info("observing %s upstream for the cluster", resource_id)
            observing = asyncio.create_task(
                self._observe(resource_id, source, owner), name=f"observe {resource_id}"
            )
            try:
                while not observing.done():
                    await asyncio.wait([observing], timeout=LEASE_RENEW)
                    try:
                        if not await cluster.lease(resource_id, source):
                            log.info("another instance observes %s upstream", resource_id)
                            break
                    except ClusterUnavailable:
                        continue  # keep observing: no other instance can take the lease now
            finally:
                cluster.stats.leases_held -= 1
                await stop_tasks([observing])
                await cluster.release(resource_id, source)

    async def _observe(
        self, resource_id: str, source: str, owner: asyncio.Task[Any] | None
    ) -> None:
        """Observe ``source`` until cancelled, each notification checked and taken like a fetch;
        registered again (backing off) when the observation ends, fails or falls silent."""
        from aiocoap import GET, Message

        from .upstream import UpstreamError, upstream_failure

        proxy = self.proxy
        delay = 1.0
        while self._live(resource_id, source, owner):
            ctx = await proxy.upstream()
            proxy.stats.upstream_requests += 1
            message = Message(code=GET, uri=source, observe=0)
            request = ctx.request(message, handle_blockwise=False)
            try:
                first = await asyncio.wait_for(request.response, self.limits.upstream_timeout)
                await proxy.notified(
                    resource_id, source, *await proxy.complete(ctx, message, first)
                )
                if first.opt.observe is None:
                    raise UpstreamError("the upstream does not take observers")
                delay = 1.0
                await self._follow(resource_id, source, owner, ctx, message, request, first)
            except asyncio.CancelledError:
                request.observation.cancel()
                raise
            except Exception as exc:
                proxy.stats.upstream_errors += 1
                why = upstream_failure(exc, source)
                log.info("upstream observation of %s failed: %s", resource_id, why)
            finally:
                if not request.observation.cancelled:
                    request.observation.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _follow(
        self,
        resource_id: str,
        source: str,
        owner: asyncio.Task[Any] | None,
        ctx: Any,
        message: Any,
        request: Any,
        first: Any,
    ) -> None:
        """Take the notifications of one registration until it ends or falls silent."""
        from .upstream import UpstreamError

        proxy = self.proxy
        notifications = request.observation.__aiter__()
        silence = _silence(first)
        while self._live(resource_id, source, owner):
            try:
                notification = await asyncio.wait_for(notifications.__anext__(), silence)
            except StopAsyncIteration:
                log.info("upstream observation of %s ended; again", resource_id)
                return
            except TimeoutError:
                # RFC 7641 §3.3.1: nothing within Max-Age. A producer that restarted has
                # forgotten this observation and would never notify again: register anew.
                log.info("no notification of %s within its Max-Age; again", resource_id)
                return
            silence = _silence(notification)
            try:
                notification, intake = await proxy.complete(ctx, message, notification)
            except (UpstreamError, InvalidObject, SpoolError) as exc:  # the next brings the next
                proxy.stats.upstream_errors += 1
                why = getattr(exc, "reason", exc)
                log.info("a notification of %s is dropped: %s", resource_id, why)
                continue
            await proxy.notified(resource_id, source, notification, intake)


def _silence(response: Any) -> float:
    """How long an upstream observation may stay silent after ``response`` (its Max-Age, plus
    a little for the notification that renews it to arrive)."""
    max_age = response.opt.max_age
    return (60 if max_age is None else max_age) + 2.0
