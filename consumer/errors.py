"""The errors the consumer raises on purpose, and the CLI exit status each one maps to.

::

    OscarError
    ├── InvalidObject                (oscar) the object was rejected: any check of DESIGN §4  → 1
    ├── BundleError, StateError      (authz_server.client) credentials or state unusable      → 2
    └── ConsumerError                base of this package's own errors
        ├── AccessDenied             the AS refused this consumer the access secret          → 3
        └── TransportError           the producer, proxy or AS did not answer or answered with
                                     an error code; a stale CRL that cannot be refreshed       → 4
    ValueError / TypeError           misuse by the caller (a malformed URI or resource id)     → 2

Foreign exceptions (aiocoap's, asyncio's timeouts, the AS client's) are translated where they
arise, in :mod:`consumer.client` and :mod:`consumer.trust`. No message ever holds a secret, a PSK
or plaintext: they name the peer and what failed.
"""

from __future__ import annotations

from oscar.errors import OscarError

__all__ = ["AccessDenied", "ConsumerError", "TransportError"]


class ConsumerError(OscarError):
    """Base class of the consumer's own errors."""


class AccessDenied(ConsumerError):
    """The AS refused the access secret (4.01/4.03): this consumer has no grant for the epoch."""


class TransportError(ConsumerError):
    """A peer (producer, proxy or AS) could not be reached, timed out, or answered with an error."""
