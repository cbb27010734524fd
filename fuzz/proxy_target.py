"""Target ``proxy_target``: the proxy's request → (resource id, upstream) mapping and Echo check.

The input is a CoAP datagram; what aiocoap cannot decode never reaches the proxy and is skipped.
Contract (proxy/server.py): :meth:`ProxySite.target` refuses with ``BadTarget`` and nothing else;
what it accepts names a well-formed resource id and an upstream that is None or a ``coap://`` URI
for that resource. (oscar_io/echo.py) :meth:`AddressCheck.prove` answers True or False for any Echo
value and never raises; a value it issued itself proves the address.
"""

from __future__ import annotations

from pathlib import Path

from aiocoap import Message
from aiocoap.numbers.types import Type

from oscar import names
from oscar_io.echo import AddressCheck
from proxy.config import ProxyConfig
from proxy.core import Proxy
from proxy.server import BadTarget, ProxySite

from ._common import expect

__all__ = ["TestOneInput", "seeds"]

_CONFIG = ProxyConfig(
    bundle=Path("/nonexistent/bundle"),
    state=Path("/nonexistent/state"),
    listen=("127.0.0.1", 5683),
    reverse={"sensor-1": "coap://127.0.0.1:5700", "a/b": "coap://[::1]:5701"},
)
_site: list[ProxySite] = []
_CHECK = AddressCheck(max_addresses=16, clock=lambda: 1_000.0)


def _proxy_site() -> ProxySite:
    if not _site:
        _site.append(ProxySite(Proxy(_CONFIG, clock=lambda: 1_000.0)))
    return _site[0]


def TestOneInput(data: bytes) -> None:
    address = data[:6].hex()
    echo = data[-12:]
    expect(_CHECK.prove(address, echo) in (True, False), "prove answered something not a bool")
    expect(_CHECK.prove(address, _CHECK.challenge(address)) is True, "own Echo not accepted")
    try:
        request = Message.decode(data)
    except Exception:  # aiocoap refuses it before the proxy sees it
        return
    try:
        resource_id, upstream = _proxy_site().target(request)
    except BadTarget:
        return
    expect(names.is_resource_id(resource_id), "target accepted a malformed resource id")
    expect(
        upstream is None
        or (upstream.startswith("coap://") and upstream.endswith("/" + resource_id)),
        "target made an upstream URI that is not coap:// for the resource",
    )


def _request(**options: object) -> bytes:
    message = Message(code=1, **options)  # type: ignore[arg-type]
    # Set afterwards: aiocoap deprecates these as keywords.
    message.mtype, message.mid, message.token = Type.CON, 0x1234, b"\x01\x02\x03\x04"
    return bytes(message.encode())


def seeds() -> list[bytes]:
    return [
        _request(uri_path=("sensor-1", "temperature")),
        _request(uri_path=("a", "b", "c")),
        _request(proxy_uri="coap://127.0.0.1:5683/sensor-1/temperature"),
        _request(proxy_uri="coap://[::1]/sensor-1/t%2Fx"),
        _request(proxy_scheme="coap", uri_host="example.org", uri_path=("s-1", "x")),
        _request(proxy_uri="coaps://h/sensor-1/temperature?q=1"),
        _request(uri_path=(".well-known", "oscar-stats")),
    ]
