"""Large objects over CoAP over TCP (RFC 8323) instead of UDP block-wise, with a fall-back.

The consumer asks over UDP as always. When the first answer is the first block of a larger
object whose announced size (Size2) is at least the threshold (:data:`DEFAULT_TCP_THRESHOLD`
unless configured), the whole object is fetched again over ``coap+tcp`` from the same host and
port number (:func:`oscar_io.coaptcp.tcp_uri`; through a plain-CoAP forward proxy: the proxy's TCP
port, with the same Proxy-Uri) in BERT blocks. If that fails in any way, the UDP transfer goes on
from its first block as if TCP had not been tried, and the peer rests from TCP for a while
(:class:`oscar_io.tcproute.Route`). A first answer without Size2 (the size unknown) stays on UDP.

What TCP changes: only the hop. The object is the same bytes, checked by the same pipeline. Over
a DTLS proxy (``PROXY_ID=coaps://``) nothing changes: the consumer has no certificate for TLS (the
AS issues none to consumers), and that hop is protected with the link PSK, which Python's TLS
cannot use.

What this module does not do: assemble UDP block-wise answers (:mod:`consumer.coap`), check
objects, or speak TCP itself (:mod:`oscar_io.coaptcp`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from oscar_io import coaptcp
from oscar_io.tcproute import Route, check_threshold

from .target import Target

__all__ = ["DEFAULT_TCP_THRESHOLD", "TcpRoute", "check_threshold"]

#: Objects announced at least this large go over TCP: 32 KiB are 32 round trips at 1 KiB blocks
#: (4 with 8 in flight); TCP costs one for its handshake and one per BERT block.
DEFAULT_TCP_THRESHOLD = 32 * 1024


class TcpRoute(Route):
    """:class:`oscar_io.tcproute.Route` for the consumer's targets."""

    def wanted(self, first: Any, target: Target | None = None) -> bool:
        return (target is None or target.proxy_id is None) and super().wanted(first)

    def _request(self, target: Target) -> tuple[Any, str]:
        from aiocoap import GET, Message
        from aiocoap.message import UndecidedRemote

        if target.proxy is None:
            uri = coaptcp.tcp_uri(target.uri)
            return Message(code=GET, uri=uri), uri
        proxy = coaptcp.tcp_uri(target.proxy)
        message = Message(code=GET)
        message.opt.proxy_uri = target.uri
        message.remote = UndecidedRemote.from_pathless_uri(proxy)
        return message, proxy

    async def over_tcp(
        self, first: Any, target: Target, sink: Callable[[bytes], object] | None = None
    ) -> Any | None:
        """The whole object over TCP when :meth:`wanted` says so (with ``sink``: its bytes
        there as they arrive, the payload empty); None: go on over UDP."""
        if not self.wanted(first, target):
            return None
        message, uri = self._request(target)
        return await self.fetch(message, uri.split("/", 3)[2], target.resource_id, sink)
