"""The errors the consumer raises on purpose, and the CLI exit status each one maps to.

::

    OscarError
    ├── InvalidObject                (oscar) the object was rejected: any check of DESIGN §4  → 1
    ├── BundleError, StateError      (authz_server.client) credentials or state unusable      → 2
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

from oscar.errors import OscarError

__all__ = [
    "AccessDenied",
    "ConsumerError",
    "NotFound",
    "Refused",
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
