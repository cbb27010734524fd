"""When a large object comes over CoAP over TCP instead of UDP, and the fall-back: :class:`Route`.

After the first block of an answer over UDP, an object announced (Size2) at least ``threshold``
bytes large is fetched again over ``coap+tcp`` from the same host and port number
(:func:`oscar_io.coaptcp.tcp_uri`) in BERT blocks (:func:`oscar_io.coaptcp.fetch`). Any failure
there (nothing listens, no answer within :data:`FIRST_TIMEOUT`, a broken transfer, an answer that
is no protected object) gives None: the caller goes on over UDP from the block it holds, and that
peer rests from TCP for :data:`RETRY_AFTER` seconds. An answer without Size2 stays on UDP.
Connections are kept to at most :data:`MAX_PEERS` peers.

What this module does not do: name the threshold (the roles do), go on over UDP (the caller
does), or check objects.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from oscar.objects import CONTENT_FORMAT_COSE_SIGN1
from oscar_io.coaperrors import TransportError
from oscar_io.coaptcp import client_context, fetch, tcp_uri

__all__ = ["FIRST_TIMEOUT", "MAX_PEERS", "RETRY_AFTER", "Route", "check_threshold"]

log = logging.getLogger("oscar.coaptcp")

#: Seconds the first answer over TCP may take (connection included) before UDP goes on.
FIRST_TIMEOUT = 3.0
#: Seconds a peer whose TCP failed is not tried over TCP again.
RETRY_AFTER = 60.0
#: Peers remembered as resting at most (beyond, a failed peer is simply tried again next time).
MAX_RESTING = 1024
#: Peers a :class:`Route` keeps connections to at most: aiocoap keeps every connection until the
#: peer closes it, so past this many distinct peers every connection is closed (a proxy's forward
#: clients could otherwise name origins until it runs out of file descriptors).
MAX_PEERS = 32


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


class Route:
    """When a large answer comes over TCP instead of UDP, and the fall-back (see the module doc).
    ``timeout`` bounds each answer over TCP, ``max_size`` the object."""

    def __init__(
        self,
        threshold: int | None,
        *,
        timeout: float,
        max_size: int,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = check_threshold(threshold)
        self.timeout = timeout
        self.max_size = max_size
        self._tls = tls
        self._clock = clock
        self._context: Any = None
        self._peers: set[str] = set()
        #: Peers (their TCP URI's authority) whose TCP failed, and until when they rest.
        self._resting: dict[str, float] = {}
        #: Objects fetched over TCP, and TCP attempts that fell back to UDP (tests, benchmarks).
        self.fetched = 0
        self.fallbacks = 0

    def wanted(self, first: Any) -> bool:
        """Whether the object whose first UDP answer is ``first`` should come over TCP."""
        block2, size2 = first.opt.block2, first.opt.size2
        return (
            self.threshold is not None
            and block2 is not None
            and block2.block_number == 0
            and block2.more
            and size2 is not None
            and size2 >= self.threshold
            and first.code.dotted == "2.05"
        )

    async def fetch(
        self,
        message: Any,
        peer: str,
        what: str,
        sink: Callable[[bytes], object] | None = None,
    ) -> Any | None:
        """The whole answer to ``message`` (a GET to ``peer``, a ``coap+tcp``/``coaps+tcp``
        authority) if it comes over TCP as a protected object; None: go on over UDP (``what``
        names the object in the log line that says so).

        With ``sink`` the object's bytes go there as they arrive (:func:`oscar_io.coaptcp.fetch`)
        and the answer's payload is empty. Once ``sink`` has had some, a failure is no longer a
        fall-back (the UDP transfer would feed it again from the start): it is raised."""
        fed = False

        def feeding(piece: bytes) -> object:
            nonlocal fed
            fed = True
            assert sink is not None  # noqa: S101 (only passed on when sink is given)
            return sink(piece)

        now = self._clock()
        if self._resting.get(peer, now) > now:
            return None
        if peer not in self._peers and len(self._peers) >= MAX_PEERS:
            await self.close()  # every connection closed; the next ones on a new context
        self._peers.add(peer)
        try:
            if self._context is None:
                self._context = await client_context(self._tls)
            response = await fetch(
                self._context,
                message,
                max_size=self.max_size,
                timeout=self.timeout,
                first_timeout=min(self.timeout, FIRST_TIMEOUT),
                peer=peer,
                sink=None if sink is None else feeding,
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
            if fed:
                raise
            log.info("%s: TCP failed (%s); going on over UDP", what, exc)
            return None
        self._resting.pop(peer, None)
        self.fetched += 1
        return response

    async def instead(
        self, request: Any, first: Any, sink: Callable[[bytes], object] | None = None
    ) -> Any | None:
        """For ``request`` (a GET to a ``coap://`` URI, sent over UDP) whose first answer is
        ``first``: the whole object over TCP from the same host and port number when
        :meth:`wanted` says so (a plain GET of the URI: no ETag, Observe or Block2); None: go on
        over UDP. ``sink``: as for :meth:`fetch`."""
        if not self.wanted(first):
            return None
        from aiocoap import GET, Message

        try:
            uri = tcp_uri(request.get_request_uri())
        except ValueError:
            return None
        return await self.fetch(Message(code=GET, uri=uri), uri.split("/", 3)[2], uri, sink)

    async def close(self) -> None:
        context, self._context = self._context, None
        self._peers.clear()
        if context is not None:
            await context.shutdown()
