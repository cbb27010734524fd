"""The producer's CoAP server: each resource at ``/<producer id>/<path>``, plus RFC 6690 discovery.

A GET answers with the one object sealed from the current value — the same bytes for every
requester, never sealed per request — with content format 18, its ETag
(:func:`oscar.object_etag`) and Max-Age (the resource's, shortened so that no cache keeps the object
past its ``exp``). A request that names the current ETag gets 2.03 Valid. Observers get a
notification whenever a new object is sealed, within bounds and confirmable
(:mod:`producer.observers`). Objects larger than a CoAP block go out block-wise
(Block2). Before the first object, or after the last one expired, the answer is 5.03 with a short
Max-Age.

The common request — a confirmable GET of an object that goes out in one message — is answered
by :class:`~producer.fastpath.FastPath` straight from the receive callback with pre-encoded
bytes, the same bytes aiocoap would send, without aiocoap's per-request and per-remote work;
everything else (block-wise transfers, Observe, ETag validation, 5.03, discovery, anything
unusual) goes through aiocoap and :class:`ObjectResource`, whose Block2 cache finishes a transfer
with the object of its first block even if the producer re-seals meanwhile.
``OSCAR_PRODUCER_FASTPATH=off`` in the environment leaves the fast path out;
``context.fast_path.enabled = False`` switches it off while serving.

Plain CoAP over UDP, and optionally (``tcp``/``tls`` in the configuration) the same site over
CoAP over TCP on the same port number and over TLS on the port + 1 (:mod:`oscar_io.coaptcp`),
where large objects go in BERT blocks; a block-wise answer carries Size2 so that a client can
choose TCP from the first block. The TLS listener presents the producer's certificate from the AS
CA and requires a client certificate from the same CA. The objects are protected end to end, and
no DTLS code is loaded; the fast path and Observe over UDP are as they were.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Iterable
from typing import Any

from aiocoap import Context, Message, interfaces
from aiocoap.numbers.codes import Code
from aiocoap.resource import ObservableResource, Site, WKCResource

from oscar.objects import CONTENT_FORMAT_COSE_SIGN1
from oscar_io import aiocoap_fixes, coaptcp
from oscar_io.ports import PortInUse, ensure_alone_on_port, ensure_port_free

from . import duplicates
from .config import ProducerConfig
from .fastpath import FastPath
from .observers import ObserverLimits, serve_observation
from .published import Published

__all__ = ["FASTPATH_ENV", "ObjectResource", "ProducerContext", "serve"]

log = logging.getLogger("oscar.producer")

#: Max-Age of a 5.03 (no current object): ask again soon.
RETRY_AFTER = 5
#: Objects larger than this go out block-wise over UDP (aiocoap 0.4.17 answers block-wise unasked
#: above 1,124 bytes) and carry Size2; smaller ones go in one message, as before, without it.
SIZE2_FROM = 1124
#: Set to ``off`` (or ``0``) to serve without the fast path (comparisons, debugging).
FASTPATH_ENV = "OSCAR_PRODUCER_FASTPATH"


def default_limits() -> ObserverLimits:
    """Observer bounds of their own, the configuration's defaults."""
    return ObserverLimits(ProducerConfig.max_observers, ProducerConfig.max_observers_per_address)


class ObjectResource(ObservableResource):  # type: ignore[misc]
    """One protected resource. Its observers are bounded by ``limits`` (shared by every resource
    of the producer) and notified as :func:`~producer.observers.serve_observation` says."""

    def __init__(self, published: Published, limits: ObserverLimits | None = None) -> None:
        super().__init__()
        self.published = published
        # The producer's resources share one (build_site); a resource built alone (the fast
        # path's tests, fuzz/producer_fastpath.py) gets bounds of its own, the defaults.
        self.limits = limits if limits is not None else default_limits()
        self.ct = CONTENT_FORMAT_COSE_SIGN1
        self.requests = 0
        self.watchers: set[asyncio.Event] = set()
        published.on_change.append(self.updated_state)

    def updated_state(self, response: Message | None = None) -> None:
        for changed in self.watchers:
            changed.set()

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if request.code == Code.GET and request.opt.observe == 0:
            await serve_observation(pipe, self.render, self.watchers, self.limits)
        else:  # block-wise (Block2 cache), ETag, 5.03: aiocoap's
            await interfaces.Resource._render_to_pipe(self, pipe)

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render_get(self, request: Message) -> Message:
        published = self.published
        now = published.now()
        self.requests += 1
        if published.obj is None or now > published.exp:
            return Message(code=Code.SERVICE_UNAVAILABLE, max_age=RETRY_AFTER)
        max_age = published.max_age(now)
        if published.etag in (request.opt.etags or ()):
            return Message(code=Code.VALID, etag=published.etag, max_age=max_age)
        response = Message(
            code=Code.CONTENT,
            payload=published.obj,
            content_format=CONTENT_FORMAT_COSE_SIGN1,
            etag=published.etag,
            max_age=max_age,
        )
        if len(published.obj) > SIZE2_FROM:  # block-wise: the size, in every block (RFC 7959 §4)
            response.opt.size2 = len(published.obj)
        return response


class ProducerContext(Context):  # type: ignore[misc]
    """aiocoap's server context, with the fast path in front of it (None when left out), and
    the TCP/TLS listener's context beside it (None when not configured): shut down with it."""

    fast_path: FastPath | None = None
    #: The served resources by their Uri-Path segments (their request counts: the metrics').
    routes: dict[tuple[bytes, ...], ObjectResource] = {}  # noqa: RUF012 (set per instance)
    tcp: Any = None

    async def shutdown(self) -> None:
        tcp, self.tcp = self.tcp, None
        if tcp is not None:
            await tcp.shutdown()
        await super().shutdown()


def build_site(
    device_id: str, resources: Iterable[Published], limits: ObserverLimits
) -> tuple[Any, dict[tuple[bytes, ...], ObjectResource]]:
    """The aiocoap site, and the resources by their Uri-Path segments (for the fast path)."""
    site = Site()
    routes = {}
    for published in resources:
        path = (device_id, *published.spec.path.split("/"))
        resource = ObjectResource(published, limits)
        site.add_resource(path, resource)
        routes[tuple(segment.encode() for segment in path)] = resource
    site.add_resource(
        (".well-known", "core"),
        WKCResource(site.get_resources_as_linkheader, impl_info=None),
    )
    return site, routes


async def serve(
    device_id: str,
    resources: Iterable[Published],
    host: str,
    port: int,
    limits: ObserverLimits | None = None,
    *,
    tcp: bool = False,
    tls: ssl.SSLContext | None = None,
) -> ProducerContext:
    """Serve ``resources`` at ``/<device_id>/<path>`` on ``host``:``port``, their observers
    bounded by ``limits`` (shared by all; default: the configuration's defaults); with ``tcp``
    also over ``coap+tcp`` on the same port, with ``tls`` (:func:`oscar_io.coaptcp.server_tls`)
    over ``coaps+tcp`` on port + 1. The caller shuts the context down."""
    aiocoap_fixes.apply()  # observers that leave abruptly: no tracebacks
    site, routes = build_site(
        device_id, resources, limits if limits is not None else default_limits()
    )
    ensure_port_free(host, port)
    context: ProducerContext = await ProducerContext.create_server_context(
        site, bind=(host, port), transports=["udp6"]
    )
    try:
        ensure_alone_on_port(host, port)
    except PortInUse:
        await context.shutdown()
        raise
    context.routes = routes
    if tcp or tls is not None:
        try:
            context.tcp = await coaptcp.serve(site, host, port, tcp=tcp, tls=tls)
        except BaseException:
            await context.shutdown()
            raise
    duplicates.bound(context)  # a flood of requests costs at most LIMIT entries of memory
    if os.environ.get(FASTPATH_ENV, "on").lower() not in ("off", "0"):
        fast_path = FastPath(routes)
        if fast_path.install(context):
            context.fast_path = fast_path
    shown = host if ":" not in host else f"[{host}]"
    log.info("serving coap://%s:%d", shown, port)
    if tcp:
        log.info("serving coap+tcp://%s:%d", shown, port)
    if tls is not None:
        log.info("serving coaps+tcp://%s:%d", shown, coaptcp.tls_port(port))
    return context
