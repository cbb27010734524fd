"""OSCAR producer: publishes protected resource representations, sealing each value once for any
number of consumers and caches; small enough for a Raspberry Pi class board.

- :class:`Producer` (:mod:`producer.core`): the embeddable API — ``async with Producer(config) as
  p: p.update("temperature", b"21.5")``;
- :class:`ProducerConfig`, :class:`ResourceSpec`, :class:`PartSpec` (issue 19's parts),
  :class:`PublishTarget`, :func:`load_config` (:mod:`producer.config`): resources from code or a
  TOML file;
- ``oscar-producer`` / ``python -m producer`` (:mod:`producer.cli`).

Importing this package loads neither aiocoap nor the DTLS transport; starting a producer does.

The modules, each one idea (an arrow: imports)::

    cli ──> core ──> server ──> fastpath        the CoAP face: site, discovery, 5.03; the
     │       │         │   └──> observers         common GET from pre-encoded bytes; bounded,
     │       │         └──────> duplicates        proven observers; aiocoap's duplicate memory
     │       ├──> publish                         PUT of each new object to proxies
     │       ├──> certificate                     the certificate from the AS CA, kept or renewed
     │       ├──> sources                         values from a file, a command, a callback
     │       └──> published ──> epochs            one resource: the I/O of its epoch steps,
     │                 └──────> state             sealing; the pure epoch rules; the state dir
     └──> config ──> errors                       settings (TOML, flags, code); the exceptions

Lower modules never import higher ones: :class:`~producer.published.Published` sees its producer
through :class:`~producer.published.Host`, the fast path its resources through
:class:`~producer.fastpath.Served`, and the server gets the resources it serves as arguments.

The exceptions a caller sees::

    OscarError                    (oscar.errors)
    ├── UsageError                (oscar_io.errors)
    │   └── ConfigError           oscar_io.errors (also a ValueError): a bad setting, named (exit 2)
    ├── ProducerError             producer.errors: cannot start — a bundle for another role, a
    │                             resource id too long, no certificate to be had (exit 1)
    ├── BundleError               (oscar_io.errors) the bundle is missing, exposed or bad (exit 1)
    ├── StateError                (oscar_io.errors) the state directory is unusable or in use
    │                             by another producer (exit 1)
    └── AsError                   (oscar_io.errors) AccessDenied, AsUnavailable: met inside the
                                  producer's tasks, logged and retried, never raised to a caller
                                  after start (at start: no certificate → ProducerError)

Also ``OSError`` (a port in use, a file; exit 1), and ``KeyError``/``TypeError`` from
:meth:`Producer.update` for an unknown path or a value that is not bytes. aiocoap's own errors
stay inside the server (aiocoap answers or logs them) and the publisher (one warning line per
failed PUT, retried).
"""

from __future__ import annotations

from .config import PartSpec, ProducerConfig, PublishTarget, ResourceSpec, load_config
from .core import Producer, Published
from .errors import ConfigError, ProducerError

__all__ = [
    "ConfigError",
    "PartSpec",
    "Producer",
    "ProducerConfig",
    "ProducerError",
    "PublishTarget",
    "Published",
    "ResourceSpec",
    "load_config",
]
