"""The proxy's upstream fetches: a request, its answer taken in, folded into the cache.

:func:`refresh` asks an origin for a resource (with the held entry's upstream ETag, to
revalidate), :func:`complete` takes the rest of a Block2 or BERT answer (a large object as it
arrives: :class:`proxy.large.Intake`), :func:`take` folds an answer into the cache (verify
before cache; a 2.03 renews only the entry of the origin it came from), and
:func:`upstream_failed` backs off and serves what is held. A relay's notifications come through
:func:`complete` and :func:`take` too (:mod:`proxy.relays`).

What this module does not do: decide when to fetch (:meth:`proxy.core.Proxy.lookup`), verify or
store (:meth:`proxy.core.Proxy.check`, :meth:`~proxy.core.Proxy.store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from oscar.errors import InvalidObject
from oscar_io.coaperrors import TransportError

from . import upstream
from .cluster import ClusterUnavailable
from .entry import Entry
from .large import Intake, SpoolError
from .upstream import upstream_failure

if TYPE_CHECKING:
    from .core import Proxy

__all__ = ["complete", "refresh", "take", "upstream_failed"]

log = logging.getLogger("oscar.proxy")


async def refresh(proxy: Proxy, resource_id: str, source: str, entry: Entry | None) -> Entry | None:
    """Fetch (or revalidate) ``resource_id`` from ``source`` and fold the answer into the
    cache; the entry to serve (or None)."""
    from aiocoap import GET, Message

    ctx = await proxy.upstream()
    request = Message(code=GET, uri=source)
    if entry is not None and entry.upstream_etag is not None and entry.upstream == source:
        request.opt.etags = (entry.upstream_etag,)
        proxy.stats.revalidations += 1
    else:
        proxy.stats.misses += 1
    proxy.stats.upstream_requests += 1
    try:
        response, intake = await _fetch(proxy, ctx, request)
    except SpoolError as exc:  # the disk (full, failing, too many at once): served as held
        return upstream_failed(proxy, resource_id, source, entry, str(exc))
    except InvalidObject as exc:  # a large object refused as it arrived
        proxy.stats.rejected += 1
        log.info("rejected an object for %s: %s", resource_id, getattr(exc, "reason", exc))
        return proxy.valid(entry)
    except Exception as exc:
        why = upstream_failure(exc, source)
        return upstream_failed(proxy, resource_id, source, entry, why)
    return await take(proxy, resource_id, source, entry, response, intake)


async def _fetch(proxy: Proxy, ctx: Any, request: Any) -> tuple[Any, Intake | None]:
    """The upstream's answer to ``request``, a Block2 answer taken in by :func:`complete`.
    Raises :class:`UpstreamError`, InvalidObject, and what aiocoap raises (TimeoutError and
    the like)."""
    first = await asyncio.wait_for(
        ctx.request(request, handle_blockwise=False).response, proxy.limits.upstream_timeout
    )
    return await complete(proxy, ctx, request, first)


async def complete(proxy: Proxy, ctx: Any, request: Any, first: Any) -> tuple[Any, Intake | None]:
    """``first`` with the rest of its blocks: a large object over TCP when the origin
    offers it (:class:`oscar_io.tcproute.Route`), else :func:`proxy.upstream.complete`.

    A protected object's bytes go to an :class:`~proxy.large.Intake` as they arrive: an
    object past :data:`~proxy.large.LARGE_FROM` comes back as that intake (spooled, its
    headers read, its message hashed; the answer's payload empty), to be checked by
    :meth:`Proxy.check <proxy.core.Proxy.check>` and closed by the caller; a smaller one in
    the answer's payload (None).
    Raises :class:`UpstreamError`, InvalidObject (refused as it arrived), and what aiocoap
    raises."""
    if first.opt.block2 is None or not (
        first.code.dotted == "2.05" and first.opt.content_format == 18
    ):
        return await _complete(proxy, ctx, request, first, None), None
    intake = Intake(proxy.bodies, max_size=proxy.limits.max_object_size)
    try:
        whole = await _complete(proxy, ctx, request, first, intake.feed)
    except BaseException:
        intake.close()
        raise
    if intake.spilled:
        return whole, intake
    whole.payload = intake.data
    intake.close()
    return whole, None


async def _complete(
    proxy: Proxy, ctx: Any, request: Any, first: Any, sink: Callable[[bytes], object] | None
) -> Any:
    whole = await proxy.tcp.instead(request, first, sink=sink)
    if whole is not None:
        return whole
    return await upstream.complete(
        ctx,
        request,
        first,
        proxy.limits.upstream_timeout,
        window=proxy.limits.block_window,
        max_size=proxy.limits.max_object_size,
        sink=sink,
    )


async def take(
    proxy: Proxy,
    resource_id: str,
    source: str,
    entry: Entry | None,
    response: Any,
    intake: Intake | None = None,
) -> Entry | None:
    """Fold one upstream response into the cache; the entry to serve (or None). A large
    object's ``intake`` is closed here, whatever happens."""
    try:
        return await _take_answer(proxy, resource_id, source, entry, response, intake)
    finally:
        if intake is not None:
            intake.close()


async def _take_answer(
    proxy: Proxy,
    resource_id: str,
    source: str,
    entry: Entry | None,
    response: Any,
    intake: Intake | None,
) -> Entry | None:
    now = proxy.now()
    max_age = min(
        response.opt.max_age if response.opt.max_age is not None else 60, proxy.limits.max_fresh
    )
    code = response.code.dotted
    if code == "2.03":
        # Only the origin the entry came from, asked with its ETag, may renew it: any other
        # origin a forward-proxy client names could otherwise freeze the shared entry.
        own = entry is not None and entry.upstream == source and entry.upstream_etag
        if entry is None or not own or response.opt.etag not in (None, entry.upstream_etag):
            return proxy.valid(entry)
        fresh = entry.refreshed(now + max_age)
        proxy.cache.touch(fresh)
        proxy.backoff.pop((resource_id, source), None)
        if proxy.cluster is not None:  # the renewed freshness for every instance
            with contextlib.suppress(ClusterUnavailable):
                await proxy.cluster.put(fresh, refresh=True)
        return proxy.valid(fresh)
    if code != "2.05" or response.opt.content_format != 18:
        return upstream_failed(proxy, resource_id, source, entry, f"answer {code}")
    try:
        new = await proxy.check(
            intake if intake is not None else bytes(response.payload), resource_id, source
        )
    except InvalidObject:
        return proxy.valid(entry)  # keep serving what we hold, if anything
    except TransportError as exc:
        log.warning("cannot verify an object of %s: %s", resource_id, exc)
        return upstream_failed(proxy, resource_id, source, entry, "AS unavailable")
    fresh = replace(new, upstream_etag=response.opt.etag, fresh_until=now + max_age)
    if intake is not None:
        try:
            proxy.keep_body(fresh, intake)
        except SpoolError as exc:
            return upstream_failed(proxy, resource_id, source, entry, str(exc))
    proxy.backoff.pop((resource_id, source), None)
    proxy.relays.served(resource_id, source)
    try:
        if await proxy.store(fresh):
            return fresh
    except ClusterUnavailable:  # not taken: the cluster could not check it is the newest
        return proxy.valid(entry)
    held = proxy.cache.get(resource_id)
    return proxy.valid(held)


def upstream_failed(
    proxy: Proxy, resource_id: str, source: str, entry: Entry | None, why: str
) -> Entry | None:
    proxy.stats.upstream_errors += 1
    proxy.backoff[(resource_id, source)] = proxy.now() + proxy.limits.upstream_backoff
    if len(proxy.backoff) > 10_000:
        proxy.backoff.pop(next(iter(proxy.backoff)))
    log.info("upstream of %s failed: %s", resource_id, why)
    valid = proxy.valid(entry)
    if valid is not None:
        proxy.stats.stale_served += 1
    return valid
