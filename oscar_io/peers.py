"""Who a peer is, for bounds counted per peer: one key shared by the producer and the proxy.

A bound per exact address (IP and port, or IP alone) costs an attacker nothing to get around:
ports are free, and one IPv6 subnet gives a host 2**64 addresses. So a peer is

- ``device NAME``: the device a DTLS session authenticated (whatever address it comes from);
- ``host A.B.C.D``: an IPv4 address (also one written as IPv4-mapped IPv6), any port;
- ``net P::/64``: the /64 an IPv6 address belongs to, any port;
- ``host TEXT``: anything that is not an IP address (kept as it is, without its port).

What it does not do: look at anything but the remote's address and its authenticated claims
(no reverse lookups, no configuration), or decide any bound itself.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["address_key", "host_of", "peer_key"]

#: The prefix length an IPv6 peer is counted by (RFC 4291 §2.5.1: one subnet, one host or site).
IPV6_PREFIX = 64


def address_key(device: str | None, host: str) -> str:
    """The peer key of an authenticated ``device`` (if not None), else of the address ``host``
    (an IP address without port; an IPv6 one may carry a ``%zone``)."""
    if device is not None:
        return f"device {device}"
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return f"host {host}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"host {address.ipv4_mapped}"
        return f"net {ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False)}"
    return f"host {address}"


def host_of(hostinfo: str) -> str:
    """The host part of ``HOST:PORT``, ``[V6]:PORT``, ``[V6]`` or a bare host."""
    if hostinfo.startswith("["):
        return hostinfo[1:].partition("]")[0]
    if hostinfo.count(":") == 1:
        return hostinfo.partition(":")[0]
    return hostinfo  # a bare IPv4 address or name, or a bare IPv6 address


def peer_key(remote: Any) -> str:
    """The peer key of an aiocoap remote: its DTLS device if one is authenticated, else its
    socket address (``sockaddr``) or, failing that, its ``hostinfo``, without the port."""
    from .dtls import device_of_label

    claims: Any = getattr(remote, "authenticated_claims", ()) or ()
    device = device_of_label(claims[0]) if len(claims) == 1 else None
    if device is not None:
        return address_key(device, "")
    sockaddr = getattr(remote, "sockaddr", None)
    if isinstance(sockaddr, tuple) and sockaddr:
        return address_key(None, str(sockaddr[0]))
    return address_key(None, host_of(str(getattr(remote, "hostinfo", remote))))
