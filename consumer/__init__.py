"""OSCAR consumer: fetches protected representations from producers or proxies, verifies and
decrypts them; a library API and the ``oscar-consumer`` CLI.

::

    from consumer import Consumer

    async with Consumer("reader-1.bundle", "state/") as consumer:
        reading = await consumer.get("coap://sensor.local/sensor-1/temperature")
        print(reading.metadata.seq, reading.plaintext)

Modules: :mod:`~consumer.client` (the :class:`Consumer` and its pipeline), :mod:`~consumer.trust`
(producer certificates and revocation), :mod:`~consumer.store` (the encrypted state directory),
:mod:`~consumer.errors`, :mod:`~consumer.cli`.
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
