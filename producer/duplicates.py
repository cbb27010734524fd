"""aiocoap's memory of recent requests, bounded in entries as well as in time.

aiocoap keeps, for every request it receives (CON or NON), the pair (remote, message ID) and,
for a CON, the response it sent, for EXCHANGE_LIFETIME (about 247 s), so that a retransmitted
request gets the same answer and is not handled twice (RFC 7252 §4.5); and it starts a timer per
request to forget it. An entry, with its response, the request that response refers to and the
timer, costs about 3.4 KiB: 20,000 Observe registrations in ten seconds took a producer from 40
to 107 MiB for four minutes, whatever the bounds on observers, and a faster flood would take
more. The fast path keeps no such memory (a GET is idempotent); everything else a producer
answers is a GET too, so a duplicate that is not recognised is answered twice, nothing more.

:func:`bound` gives the context's UDP message layer a :class:`RecentMessages` table that keeps
at most :data:`LIMIT` entries, forgets the oldest first, and forgets entries older than
EXCHANGE_LIFETIME as new ones arrive (no timer per request). At the default a client that
retransmits within RFC 7252's MAX_TRANSMIT_SPAN (45 s) is recognised as long as fewer than about
45 requests a second reach aiocoap (the fast path's GETs do not count). The duplicate handling
itself is aiocoap 0.4.17's, unchanged; with another aiocoap version nothing is changed and a
debug line says so.
"""

from __future__ import annotations

import logging
import types
from collections import OrderedDict
from typing import Any

__all__ = ["LIMIT", "RecentMessages", "bound"]

log = logging.getLogger("oscar.producer")

#: Requests remembered at most (about 7 MiB at 3.4 KiB each).
LIMIT = 2048
#: aiocoap versions whose message layer has this shape.
VERSIONS = frozenset({"0.4.17"})


class RecentMessages(OrderedDict[Any, Any]):
    """(remote, message ID) -> the response sent (None before it), oldest first, at most
    ``limit`` entries of at most ``lifetime`` seconds (by ``clock``)."""

    def __init__(self, limit: int, lifetime: float, clock: Any) -> None:
        super().__init__()
        self.limit = limit
        self.lifetime = lifetime
        self.clock = clock
        self._born: dict[Any, float] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self:
            now = self.clock()
            self._forget(now)
            self._born[key] = now
        super().__setitem__(key, value)

    def _forget(self, now: float) -> None:
        while self and (
            len(self) >= self.limit or now - self._born[next(iter(self))] > self.lifetime
        ):
            key, _ = self.popitem(last=False)
            del self._born[key]

    def seen(self, key: Any) -> bool:
        self._forget(self.clock())
        return key in self


def _deduplicate_message(self: Any, message: Any) -> bool:
    """aiocoap 0.4.17's ``MessageManager._deduplicate_message`` over a :class:`RecentMessages`
    (no timer per message)."""
    from aiocoap.numbers.types import CON

    key = (message.remote, message.mid)
    recent: RecentMessages = self._recent_messages
    if recent.seen(key):
        if message.mtype is CON and recent[key] is not None:
            # not through send_message, which would strip the message ID
            self._send_initially(recent[key])
        return True
    recent[key] = None
    return False


def bound(context: Any, limit: int = LIMIT) -> bool:
    """Bound the recent-request memory of ``context``'s message layers; False if left alone."""
    from aiocoap import meta
    from aiocoap.numbers.constants import TransportTuning

    if meta.version not in VERSIONS:
        log.debug("aiocoap %s: its recent-request memory is left unbounded", meta.version)
        return False
    lifetime = TransportTuning().EXCHANGE_LIFETIME
    found = False
    for token_manager in getattr(context, "request_interfaces", ()):
        manager = getattr(token_manager, "token_interface", None)
        recent = getattr(manager, "_recent_messages", None)
        if isinstance(recent, dict) and not isinstance(recent, RecentMessages):
            table = RecentMessages(limit, lifetime, manager.loop.time)  # type: ignore[union-attr]
            table.update(recent)
            manager._recent_messages = table  # type: ignore[union-attr]
            manager._deduplicate_message = types.MethodType(_deduplicate_message, manager)  # type: ignore[union-attr]
            found = True
    return found
