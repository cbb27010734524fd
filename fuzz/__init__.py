"""Atheris fuzz targets, one module per target, and a runner (``python -m fuzz``).

Each target module has ``TestOneInput(data: bytes) -> None``, which raises only when the code
under test breaks its documented contract (an undocumented exception escapes, a decode does not
round-trip), and ``seeds() -> list[bytes]``, a small fixed corpus to start from. The targets
import nothing from atheris, so the test suite (``tests/system/test_fuzz.py``) calls them directly.

Targets:

===================  ===========================================================================
``cbor``             ``oscar.cbor.loads``: MalformedCBOR only; a decoded value re-encodes exactly
``cose``             ``Sign1``/``Encrypt0.from_bytes``: InvalidObject only; exact round trip
``object_decode``    ``ProtectedObject.from_bytes``: InvalidObject only; round trip; the pinned
                     and generic decoders agree
``object_open``      ``oscar.verify``/``oscar.open`` with a fixed key and secret: InvalidObject only
``as_parsers``       the AS's strict request parsing (``authz_server.messages``): ApiError only
``as_endpoints``     ``authz_server.api.Endpoints.handle`` on a real store: ApiError only, and a
                     BadRequest changes no stored state
``proxy_target``     ``proxy.server.ProxySite.target`` on decoded CoAP requests: BadTarget only;
                     ``oscar_io.echo.AddressCheck.prove``: a bool, never an exception
``producer_fastpath`` ``producer.fastpath.FastPath.answer``: None or bytes, never an exception
``proxy_fastpath``   ``proxy.fastpath.FastPath.answer``: None or bytes, never an exception; only
                     GETs the site reads as a held resource, answered 2.05 or 2.03 as it would
``config_producer``  ``producer.config.load_config``: ConfigError only
``config_proxy``     ``proxy.config.load_config``: ConfigError only
``config_consumer``  the consumer CLI's ``--config`` loader: UsageError only
``config_as``        the AS CLI's ``serve --config`` loader: UsageError only
===================  ===========================================================================
"""

from __future__ import annotations

__all__ = ["TARGETS"]

#: Target name -> module (under this package) holding ``TestOneInput`` and ``seeds``.
TARGETS: dict[str, str] = {
    "cbor": "fuzz.cbor_target",
    "cose": "fuzz.cose_target",
    "object_decode": "fuzz.object_decode",
    "object_open": "fuzz.object_open",
    "as_parsers": "fuzz.as_parsers",
    "as_endpoints": "fuzz.as_endpoints",
    "proxy_target": "fuzz.proxy_target",
    "producer_fastpath": "fuzz.producer_fastpath",
    "proxy_fastpath": "fuzz.proxy_fastpath",
    "config_producer": "fuzz.config_producer",
    "config_proxy": "fuzz.config_proxy",
    "config_consumer": "fuzz.config_consumer",
    "config_as": "fuzz.config_as",
}
