"""OSCAR proxy: a caching CoAP proxy for protected objects, meant to run in a cloud.

It verifies every object without any secret before caching it (signature by a certificate from the
AS CA naming the owning producer, not revoked, not expired, newer than what it holds), serves the
cache while producers sleep, relays observations, takes objects that producers publish over DTLS,
and keeps its cache encrypted at rest. It can check objects; it can never read them.

- :class:`Proxy` (:mod:`proxy.core`): verification, cache, upstream, observation relay;
- :class:`ProxySite` (:mod:`proxy.server`): the CoAP face;
- :mod:`proxy.relays`: observers and the upstream observations they hold, bounded;
- :mod:`proxy.cache`, :mod:`proxy.echo`, :mod:`proxy.lookups`, :mod:`proxy.config`;
- :mod:`proxy.statsock`: live counters for ``oscar-proxy stats``;
- ``oscar-proxy`` / ``python -m proxy`` (:mod:`proxy.cli`).
"""

from __future__ import annotations

from .config import ConfigError, Limits, ProxyConfig, load_config
from .core import Proxy, Stats

__all__ = ["ConfigError", "Limits", "Proxy", "ProxyConfig", "Stats", "load_config"]
