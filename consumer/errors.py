"""The errors the consumer raises on purpose, and the CLI exit status each one maps to.

::

    OscarError
    ├── InvalidObject                (oscar) the object was rejected: any check of DESIGN §4  → 1
    │   └── StaleCopy                a valid object, older than the newest accepted: a cache's
    │                                stale copy (or a replay); never accepted. The CLI shows
    │                                the newest reading held instead (0), or says so          → 4
    ├── BundleError, StateError      (oscar_io.asclient) credentials or state unusable      → 2
    └── ConsumerError                base of this package's own errors
        ├── AccessDenied             the AS refused this consumer the access secret          → 3
        └── TransportError           the producer, proxy or AS did not answer or answered with
            │                        an error code; a stale CRL that cannot be refreshed       → 4
            ├── NotFound             the server answered 4.04: no such resource there          → 4
            ├── Refused              nothing listens there (ICMP port unreachable), or the
            │                        server answered another error code                        → 4
            ├── TimedOut             no answer within the timeout (or a proxy's 5.04)          → 4
            └── Unreachable          the name does not resolve, no route (or a proxy's 5.02)   → 4
    ValueError / TypeError           misuse by the caller (a malformed URI or resource id)     → 2

Foreign exceptions (aiocoap's, asyncio's timeouts, the AS client's) are translated where they
arise, in :mod:`consumer.client` and :mod:`consumer.trust`. No message ever holds a secret, a PSK
or plaintext: they name the peer and what failed.
"""

from __future__ import annotations

from oscar.errors import InvalidObject, OscarError

__all__ = [
    "AccessDenied",
    "ConsumerError",
    "NotFound",
    "Refused",
    "StaleCopy",
    "TimedOut",
    "TransportError",
    "Unreachable",
]


class ConsumerError(OscarError):
    """Base class of the consumer's own errors."""


class AccessDenied(ConsumerError):
    """The AS refused the access secret (4.01/4.03): this consumer has no grant for the epoch."""


class TransportError(ConsumerError):
    """A peer (producer, proxy or AS) could not be reached, timed out, or answered with an error.
    :attr:`kind` names the category in the CLI's message (``oscar-consumer: error: KIND: ...``)."""

    kind = "network"


class NotFound(TransportError):
    """The server answered 4.04 Not Found: it has no such resource (a wrong path or producer)."""

    kind = "not found"


class Refused(TransportError):
    """Nothing listens at that address (ICMP port unreachable), or the server answered an error
    code other than 4.04."""

    kind = "refused"


class TimedOut(TransportError):
    """No answer within the timeout (the host may be down or the datagrams lost)."""

    kind = "timed out"


class Unreachable(TransportError):
    """The host name does not resolve, or there is no route to the host."""

    kind = "unreachable"


class StaleCopy(InvalidObject):
    """A valid object (certificate, signature, expiry all checked) that is older than the newest
    this consumer accepted of the resource: a cache still holds an older copy (a proxy, within its
    Max-Age), or someone replays one. It is never accepted (DESIGN §4); unlike another rejection,
    it is not an attack on its own, and :meth:`consumer.Consumer.get` answers it with the newest
    reading the consumer holds when that is still valid.

    ``served`` and ``seen`` are the (epoch, seq) of the object and of the newest accepted;
    ``fresh_in`` is the answer's Max-Age (seconds until a cache on the path asks its origin
    again) when it came over CoAP; ``peer`` who served it.
    """

    kind = "stale copy"

    def __init__(
        self,
        resource_id: str,
        served: tuple[int, int],
        seen: tuple[int, int],
        *,
        peer: str | None = None,
        fresh_in: int | None = None,
    ) -> None:
        super().__init__("older than the newest object accepted (a stale copy or a replay)")
        self.resource_id = resource_id
        self.served = served
        self.seen = seen
        self.peer = peer
        self.fresh_in = fresh_in

    def describe(self) -> str:
        """One line: what was served, what this consumer has seen, when the cache is fresh."""
        who = self.peer or "the source"
        text = (
            f"{who} served {self.resource_id} epoch {self.served[0]} seq {self.served[1]}, older "
            f"than epoch {self.seen[0]} seq {self.seen[1]} this consumer accepted before: a "
            "cached copy not yet refreshed (or a replay), not accepted"
        )
        if self.fresh_in is not None:
            text += f"; a cache on the path refreshes it within {self.fresh_in} s (its Max-Age)"
        return text
