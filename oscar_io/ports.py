"""Refuse a UDP port that another process already holds.

aiocoap binds its server sockets with SO_REUSEPORT (and SO_REUSEADDR), so a second daemon started on
a port in use binds too, says "serving", and the kernel then splits the traffic between the two
silently. Every OSCAR daemon calls :func:`ensure_port_free` for each UDP port it is about to bind:
a probe socket bound *without* those options fails with EADDRINUSE while any socket holds an
overlapping address (the same one, a wildcard, or its IPv4-mapped twin), whatever options that
socket has.

The probe is a check before the bind, so two daemons started within the same millisecond could
both pass it; :func:`others_on_port` closes that gap after the bind by looking for sockets on the
same port that this process does not own (``/proc/net/udp``, Linux only).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("oscar.ports")

__all__ = [
    "PortInUse",
    "ensure_alone_on_port",
    "ensure_port_free",
    "others_on_port",
    "parse_listen",
    "tcp_bind_error",
]


class PortInUse(OSError):
    """Another socket holds the address; the message names it and says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EADDRINUSE, message)

    def __str__(self) -> str:
        return str(self.strerror)


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _families(host: str) -> list[tuple[int, tuple[object, ...]]]:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        return [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if address.version == 4:
        return [(socket.AF_INET, (str(address), 0))]
    return [(socket.AF_INET6, (str(address), 0, 0, 0))]


def ensure_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` if a UDP socket already holds ``host``:``port`` (or overlaps it)."""
    try:
        targets = _families(host)
    except OSError:
        return  # an unresolvable name: the bind itself will say so
    for family, sockaddr in targets:
        probe = socket.socket(family, socket.SOCK_DGRAM)
        try:
            probe.bind((sockaddr[0], port, *sockaddr[2:]))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"UDP {_shown(host, port)} is already in use by another process "
                    "(stop it or choose another port)",
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                return  # not an address of this host: the bind itself will say so
            raise
        finally:
            probe.close()


def _own_socket_inodes() -> set[str]:
    inodes = set()
    fd_dir = Path("/proc/self/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _proc_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # /proc/net/udp{,6} print each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _overlaps(bound: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> bool:
    if bound.is_unspecified:
        return True
    try:
        wanted = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True  # a host name: count every socket on the port
    if isinstance(wanted, ipaddress.IPv6Address) and wanted.ipv4_mapped is not None:
        wanted = wanted.ipv4_mapped
    return wanted.is_unspecified or wanted == bound


def others_on_port(host: str, port: int) -> int:
    """How many UDP sockets on ``port`` overlapping ``host`` this process does not own (0 where
    /proc is missing)."""
    try:
        own = _own_socket_inodes()
    except OSError:
        log.warning("cannot list this process's sockets (/proc): the check after the bind is off")
        return 0
    count = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            hex_address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) != port or fields[9] in own:
                continue
            if _overlaps(_proc_address(hex_address), host):
                count += 1
    return count


def ensure_alone_on_port(host: str, port: int) -> None:
    """After binding: raise :class:`PortInUse` if another process bound ``port`` meanwhile."""
    if others_on_port(host, port):
        raise PortInUse(
            f"UDP {_shown(host, port)} is also held by another process "
            "(stop it or choose another port)",
        )


def parse_listen(text: str, *, lowest: int = 1, highest: int = 65535) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` into (host, port), the port from ``lowest`` to
    ``highest``; ValueError with a one-line message otherwise (callers raise it as their own
    usage or configuration error). A bare IPv6 address without brackets is refused: its last
    group would be read as the port."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""
    if not sep or not host or not port.isdigit() or not lowest <= int(port) <= highest:
        raise ValueError(
            f"listen {text[:80]!r}: HOST:PORT or [IPv6]:PORT expected, the port from {lowest} "
            f"to {highest}"
        )
    return host, int(port)


def tcp_bind_error(host: str, port: int) -> str | None:
    """Why a TCP server could not bind ``host``:``port`` now (a listener holds it, the address
    is not this machine's or does not resolve), in a few words; None if it could. Probed as
    servers bind, with SO_REUSEADDR: connections of an earlier run in TIME_WAIT do not count,
    a listening socket does."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return str(exc.strerror or exc)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return str(exc.strerror or exc)
    return None
