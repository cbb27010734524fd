"""The producer's CoAP server: each resource at ``/<producer id>/<path>``, plus RFC 6690 discovery.

A GET answers with the one object sealed from the current value — the same bytes for every
requester, never sealed per request — with content format 18, its ETag
(:func:`oscar.object_etag`) and Max-Age (the resource's, shortened so that no cache keeps the object
past its ``exp``). A request that names the current ETag gets 2.03 Valid. Observers get a
notification whenever a new object is sealed. Objects larger than a CoAP block go out block-wise
(aiocoap's Block2 handling; every block comes from the same object). Before the first object, or
after the last one expired, the answer is 5.03 with a short Max-Age.

Plain CoAP (UDP) only: the objects are protected end to end, and no DTLS code is loaded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiocoap import Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.resource import ObservableResource, Site, WKCResource

from oscar.objects import CONTENT_FORMAT_COSE_SIGN1

if TYPE_CHECKING:
    from .core import Producer, Published

__all__ = ["ObjectResource", "serve"]

log = logging.getLogger("oscar.producer")

#: Max-Age of a 5.03 (no current object): ask again soon.
RETRY_AFTER = 5


class ObjectResource(ObservableResource):  # type: ignore[misc]
    """One protected resource."""

    def __init__(self, published: Published) -> None:
        super().__init__()
        self.published = published
        self.ct = CONTENT_FORMAT_COSE_SIGN1
        self.requests = 0
        published.on_change.append(self.updated_state)

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render_get(self, request: Message) -> Message:
        published = self.published
        now = published.producer.now()
        self.requests += 1
        if published.obj is None or now > published.exp:
            return Message(code=Code.SERVICE_UNAVAILABLE, max_age=RETRY_AFTER)
        max_age = published.max_age(now)
        if published.etag in (request.opt.etags or ()):
            return Message(code=Code.VALID, etag=published.etag, max_age=max_age)
        return Message(
            code=Code.CONTENT,
            payload=published.obj,
            content_format=CONTENT_FORMAT_COSE_SIGN1,
            etag=published.etag,
            max_age=max_age,
        )


def build_site(producer: Producer) -> Any:
    site = Site()
    for published in producer.resources.values():
        path = (producer.device_id, *published.spec.path.split("/"))
        site.add_resource(path, ObjectResource(published))
    site.add_resource(
        (".well-known", "core"),
        WKCResource(site.get_resources_as_linkheader, impl_info=None),
    )
    return site


async def serve(producer: Producer, host: str, port: int) -> Any:
    """Start the server context; the caller shuts it down."""
    site = build_site(producer)
    context = await Context.create_server_context(site, bind=(host, port), transports=["udp6"])
    log.info("serving coap://%s:%d", host if ":" not in host else f"[{host}]", port)
    return context
