"""OSCAR proxy: a caching CoAP proxy for protected objects, meant to run in a cloud.

It verifies every object without any secret before caching it (signature by a certificate from the
AS CA naming the owning producer, not revoked, not expired, newer than what it holds), serves the
cache while producers sleep, relays observations, takes objects that producers publish over DTLS,
and keeps its cache encrypted at rest. It can check objects; it can never read them.

Modules:

- :mod:`proxy.core`: :class:`Proxy`, verification, lookups, upstream fetches, publishing;
- :mod:`proxy.server`: :class:`~proxy.server.ProxySite`, the CoAP face; :mod:`oscar_io.echo`: the
  Echo challenge (no amplification); :mod:`proxy.relays`: observers and the upstream observations
  they hold, bounded; :mod:`proxy.fastpath`: cache hits of verified plain-CoAP clients answered
  before aiocoap, byte for byte as the site would;
- the cache: :mod:`proxy.cache` (the memory layer), :mod:`proxy.backend` (the interface of a
  backend), :mod:`proxy.diskcache` (the SQLite backend, encrypted at rest), :mod:`proxy.entry`;
- :mod:`proxy.lookups`: the budget of AS lookups that objects from outside can cause;
- :mod:`proxy.config`, :mod:`proxy.statsock` (live counters for ``oscar-proxy stats``),
  ``oscar-proxy`` / ``python -m proxy`` (:mod:`proxy.cli`).

From the runtime (:mod:`oscar_io`), shared with the consumer: :mod:`oscar_io.trust` (producer
certificates and revocation), :mod:`oscar_io.localstore` (their cache, in ``STATE/trust``),
:mod:`oscar_io.coaperrors` (aiocoap's failures in our terms); with the producer,
:mod:`oscar_io.coapfast` (a fast path's CoAP bytes and its hook on aiocoap). The proxy imports no
other role.

Exceptions, and what each becomes::

    OscarError
    ├── InvalidObject              (oscar) an object failed verification or is a rollback:
    │                              counted, never cached; 4.00 to a PUT
    ├── TransportError             (oscar_io.coaperrors) the AS is needed to verify and cannot be
    │                              reached (or refused: AccessDenied is turned into this one in
    │                              Proxy.check): nothing cached; a fetch serves what it holds and
    │                              backs off, a PUT gets 5.03
    ├── AsError                    (oscar_io.errors) the link-key refresh failed: logged, retried
    ├── BundleError, StateError    (oscar_io.errors) cannot start                          exit 1
    └── UsageError                 (oscar_io.errors)
        └── ConfigError            (oscar_io.errors; also ValueError) the configuration  exit 2
    Exception
    ├── Unavailable                (proxy.core) nothing valid to serve: ``code`` (4.04, 5.02)
    │                              is the answer
    ├── UpstreamError              (proxy.core) an upstream's answer cannot be taken (a broken
    │                              Block2 transfer, no Observe): logged, counted, backed off
    ├── BadTarget                  (proxy.server) a malformed request target: ``code`` (4.00,
    │                              4.04, 5.05) is the answer
    └── StatsUnavailable           (proxy.statsock) ``oscar-proxy stats`` found no proxy   exit 1

Foreign errors are translated in one place each: aiocoap's and the OS's failures of an upstream
exchange by :func:`oscar_io.coaperrors.translate` (in :func:`proxy.core.upstream_failure`, for the
log: the upstream failed either way); ``sqlite3``'s in :mod:`proxy.diskcache`; the AS client's in
:mod:`oscar_io.trust` and :meth:`Proxy.check`.
"""

from __future__ import annotations

from .config import ConfigError, Limits, ProxyConfig, load_config
from .core import Proxy, Stats

__all__ = ["ConfigError", "Limits", "Proxy", "ProxyConfig", "Stats", "load_config"]
