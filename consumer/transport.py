"""Large objects over CoAP over TCP (RFC 8323) instead of UDP block-wise, with a fall-back.

The consumer asks over UDP as always. When the first answer is the first block of a larger
object whose announced size (Size2) is at least :attr:`TcpRoute.threshold` bytes, the whole
object is fetched again over ``coap+tcp`` from the same host and port number
(:func:`oscar_io.coaptcp.tcp_uri`; through a plain-CoAP forward proxy: to the proxy's TCP port,
with the same Proxy-Uri) in BERT blocks. If that fails in any way (nothing listens on TCP, no
answer within :data:`CONNECT_TIMEOUT`, a broken transfer), the UDP transfer goes on from its
first block as if TCP had not been tried, and the peer is not tried over TCP again for
:data:`RETRY_AFTER` seconds. A first answer without Size2 (the size unknown) stays on UDP.

What TCP changes: only the hop. The object is the same bytes, checked by the same pipeline; an
answer over TCP that is no protected object is treated like a failure of TCP. Over a DTLS proxy
(``PROXY_ID=coaps://``) nothing changes: the consumer has no certificate for TLS (the AS issues
none to consumers), and that hop is protected with the link PSK, which Python's TLS cannot use.

What this module does not do: assemble UDP block-wise answers (:mod:`consumer.coap`), check
objects, or translate aiocoap's failures (:mod:`oscar_io.coaptcp`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from oscar.objects import CONTENT_FORMAT_COSE_SIGN1
from oscar_io import coaptcp
from oscar_io.coaperrors import TransportError

from .target import Target

__all__ = ["CONNECT_TIMEOUT", "DEFAULT_TCP_THRESHOLD", "RETRY_AFTER", "TcpRoute", "check_threshold"]

log = logging.getLogger("oscar.consumer")

#: Objects announced at least this large go over TCP: 32 KiB are 32 round trips at 1 KiB blocks
#: (4 with 8 in flight); TCP costs one for its handshake and one per BERT block.
DEFAULT_TCP_THRESHOLD = 32 * 1024
#: Seconds the first answer over TCP may take (connection included) before UDP goes on.
CONNECT_TIMEOUT = 3.0
#: Seconds a peer whose TCP failed is not tried over TCP again.
RETRY_AFTER = 60.0
#: Peers remembered as resting at most (beyond, a failed peer is simply tried again next time).
MAX_RESTING = 1024


def check_threshold(threshold: int | None) -> int | None:
    """``threshold`` if it is None (never TCP) or a whole number of bytes 0 to 2**32 - 1 (0:
    every block-wise object); ``ValueError`` otherwise."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ValueError(f"the TCP threshold is a whole number of bytes, not {threshold!r}")
    if not 0 <= threshold < 1 << 32:
        raise ValueError("the TCP threshold is 0 to 4294967295 bytes")
    return threshold


class TcpRoute:
    """When and how a large object goes over TCP instead (see the module doc)."""

    def __init__(
        self,
        threshold: int | None,
        *,
        timeout: float,
        max_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = check_threshold(threshold)
        self.timeout = timeout
        self.max_size = max_size
        self._clock = clock
        self._context: Any = None
        #: Peers (their TCP URI's authority) whose TCP failed, and until when they rest.
        self._resting: dict[str, float] = {}
        #: Objects fetched over TCP, and TCP attempts that fell back to UDP (for tests, benches).
        self.fetched = 0
        self.fallbacks = 0

    def wanted(self, first: Any, target: Target) -> bool:
        """Whether the object whose first UDP answer is ``first`` should come over TCP."""
        block2 = first.opt.block2
        size2 = first.opt.size2
        return (
            self.threshold is not None
            and target.proxy_id is None
            and block2 is not None
            and block2.block_number == 0
            and block2.more
            and size2 is not None
            and size2 >= self.threshold
            and first.code.dotted == "2.05"
        )

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

    async def fetch(self, first: Any, target: Target) -> Any | None:
        """The whole object over TCP when :meth:`wanted` says so; None: go on over UDP."""
        if not self.wanted(first, target):
            return None
        message, uri = self._request(target)
        peer = uri.split("/", 3)[2]
        now = self._clock()
        if self._resting.get(peer, now) > now:
            return None
        if self._context is None:
            self._context = await coaptcp.client_context()
        try:
            response = await coaptcp.fetch(
                self._context,
                message,
                max_size=self.max_size,
                timeout=self.timeout,
                first_timeout=min(self.timeout, CONNECT_TIMEOUT),
                peer=peer,
            )
            if (
                response.code.dotted != "2.05"
                or response.opt.content_format != CONTENT_FORMAT_COSE_SIGN1
            ):
                raise TransportError(f"{peer} answered {response.code.dotted} over TCP")
        except TransportError as exc:
            self.fallbacks += 1
            if len(self._resting) >= MAX_RESTING:  # bounded: the expired ones go first
                self._resting = {p: t for p, t in self._resting.items() if t > now}
            if len(self._resting) < MAX_RESTING:
                self._resting[peer] = now + RETRY_AFTER
            log.info("%s: TCP failed (%s); going on over UDP", target.resource_id, exc)
            return None
        self._resting.pop(peer, None)
        self.fetched += 1
        return response

    async def close(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            await context.shutdown()
