"""OSCAR consumer: fetches protected representations from producers or proxies, verifies and
decrypts them; a library API and the ``oscar-consumer`` CLI.

::

    from consumer import Consumer

    async with Consumer("reader-1.bundle", "state/") as consumer:
        reading = await consumer.get("coap://sensor.local/sensor-1/temperature")
        print(reading.metadata.seq, reading.plaintext)

Modules:

- :mod:`~consumer.client`: the :class:`Consumer` (CoAP contexts, ``get``, ``observe``);
- :mod:`~consumer.pipeline`: the checks and opening of every object received;
- :mod:`~consumer.target`: request URIs, proxies, the resource an answer must be of;
- :mod:`~consumer.coap`: one exchange as sent, bounded block-wise assembly;
- :mod:`~consumer.transport`: large objects over CoAP over TCP above a threshold, else UDP;
- :mod:`~consumer.store` (the encrypted state directory: secrets, freshness) and
  :mod:`~consumer.held` (the newest object accepted per resource);
- :mod:`~consumer.errors`: :class:`StaleCopy` and the names below; :mod:`~consumer.cli`.

From the runtime (:mod:`oscar_io`), shared with the proxy: :mod:`oscar_io.trust` (producer
certificates and revocation), :mod:`oscar_io.localstore` (their cache on disk),
:mod:`oscar_io.coaperrors` (aiocoap's failures in our terms).

Exceptions, and the CLI's exit status of each (every name importable from ``consumer``)::

    OscarError
    ├── InvalidObject                (oscar) the object was rejected: any check of DESIGN §4  → 1
    │   └── StaleCopy                a valid object, older than the newest accepted: a cache's
    │                                stale copy (or a replay); never accepted. The CLI shows
    │                                the newest reading held instead (0), or says so          → 4
    ├── BundleError, StateError      (oscar_io.errors) credentials or state unusable        → 2
    ├── UsageError                   (oscar_io.errors) bad usage or configuration           → 2
    ├── AsError                      (oscar_io.errors)
    │   └── AccessDenied             the AS refused this consumer (4.01/4.03) the access
    │                                secret or a proxy's link key                             → 3
    └── TransportError               (oscar_io.coaperrors) the producer, proxy or AS did not
        │                            answer or answered with an error code; a stale CRL that
        │                            cannot be refreshed                                       → 4
        ├── NotFound                 the server answered 4.04: no such resource there          → 4
        ├── Refused                  nothing listens there (ICMP port unreachable), or the
        │                            server answered another error code                        → 4
        ├── TimedOut                 no answer within the timeout (or a proxy's 5.04)          → 4
        └── Unreachable              the name does not resolve, no route (or a proxy's 5.02)   → 4
    ValueError / TypeError           misuse by the caller (a malformed URI or resource id)     → 2

Foreign errors are translated in one place each: aiocoap's, the OS's and DTLSSocket's by
:func:`oscar_io.coaperrors.translate` (called from :meth:`Consumer._response`); the AS client's
other errors (:class:`~oscar_io.errors.AsUnavailable`, 4.04, 5.xx) become
:class:`TransportError` or :class:`InvalidObject` where the consumer asks the AS
(:mod:`consumer.pipeline` for secrets, :mod:`oscar_io.trust` for certificates and CRLs,
:meth:`Consumer._context` for link keys); the CLI maps the tree to exit statuses in
:func:`consumer.cli.main`. No message ever holds a secret, a PSK or plaintext.
"""

from __future__ import annotations

from oscar.errors import InvalidObject
from oscar.objects import ObjectMetadata, Reading

from .client import DEFAULT_TIMEOUT, Consumer, Target, parse_target
from .errors import (
    AccessDenied,
    NotFound,
    Refused,
    StaleCopy,
    TimedOut,
    TransportError,
    Unreachable,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AccessDenied",
    "Consumer",
    "InvalidObject",
    "NotFound",
    "ObjectMetadata",
    "Reading",
    "Refused",
    "StaleCopy",
    "Target",
    "TimedOut",
    "TransportError",
    "Unreachable",
    "parse_target",
]
