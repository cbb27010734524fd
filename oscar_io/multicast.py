"""Multicast groups for CoAP (RFC 7252 §8, RFC 7390): addresses, joined sockets, group datagrams.

- :class:`Group`: a group address and port, IPv4 ``224.0.0.0/4`` or IPv6 ``ff00::/8``, parsed
  from ``"224.0.1.187:5683"`` or ``"[ff05::fd]:5683"`` (:meth:`Group.parse`); anything else is a
  :class:`~oscar_io.errors.ConfigError`.
- :func:`receiver_socket`: a UDP socket bound to the group's address and port (so it gets the
  group's datagrams and no unicast), joined on one interface: IPv4 by the interface's address
  (``127.0.0.1`` inside a test's network namespace), IPv6 by interface name or by an address
  configured on it (:func:`interface_index`). Several sockets of one host may join one group:
  each gets every datagram (``SO_REUSEADDR``).
- :func:`sender_socket`: a UDP socket bound to the interface's unicast address (replies come
  back to it), sending to groups out of that interface with a set TTL / hop limit, looped back
  to members on this host or not.
- The CoAP messages a group carries, encoded and decoded here (:func:`encode`, :func:`decode`),
  and :func:`resource_token`: the token of a resource's group notifications (module
  ``producer.groups`` says why a token and not a Uri-Path).
- :func:`open_endpoint`: an asyncio datagram endpoint on such a socket, calling back per
  datagram.

IPv6 multicast on Linux's loopback interface does not work (joined sockets on ``lo`` receive
nothing, with or without an ``ff00::/8`` route); on a veth interface it does, looped back to the
sending host too (``bench.netns`` makes one inside the namespace of a test or benchmark).

What this module does not do: decide what goes to a group or what to answer (the producer's
``producer.groups`` and the consumer's ``consumer.groups``), check objects, or anything with
DTLS (group messages are plain CoAP; the objects they carry are protected end to end).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .coapfast import option
from .errors import ConfigError

__all__ = [
    "ANY_INTERFACE",
    "CONTENT",
    "GET",
    "MAX_DATAGRAM",
    "UNAUTHORIZED",
    "Group",
    "Message",
    "decode",
    "encode",
    "interface_index",
    "open_endpoint",
    "receiver_socket",
    "resource_token",
    "sender_socket",
]

#: Message types and codes used on groups.
CON, NON, ACK, RST = 0, 1, 2, 3
GET = 0x01
CONTENT = 0x45  # 2.05
UNAUTHORIZED = 0x81  # 4.01
#: Option numbers (RFC 7252, 7641, 9175).
ETAG, OBSERVE, URI_PATH, CONTENT_FORMAT, MAX_AGE, ECHO = 4, 6, 11, 12, 14, 252
#: The largest group datagram sent: RFC 7252 §4.6's 1,152-byte message (no IP fragmentation on
#: an IPv6 minimum MTU path). A larger object is not sent to a group (``producer.groups``).
MAX_DATAGRAM = 1152
#: The IPv4 "interface" that lets the system choose (joins and sends on its default route).
ANY_INTERFACE = "0.0.0.0"  # noqa: S104 (an interface choice, not a bind)
#: Hop limit / TTL by default: one link (RFC 7390 groups are site-local at most).
DEFAULT_HOPS = 1

_V4 = ipaddress.ip_network("224.0.0.0/4")
_V6 = ipaddress.ip_network("ff00::/8")


@dataclass(frozen=True, slots=True)
class Group:
    """A CoAP group: a multicast address and a UDP port."""

    address: str
    port: int

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            raise ConfigError(f"multicast group {self.address!r}: not an IP address") from None
        if ip not in (_V4 if ip.version == 4 else _V6):
            raise ConfigError(
                f"multicast group {self.address!r}: not a multicast address "
                "(IPv4 224.0.0.0/4, IPv6 ff00::/8)"
            )
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise ConfigError(f"multicast group {self.address!r}: the port is 1 to 65535")

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET

    @classmethod
    def parse(cls, text: object) -> Group:
        """``ADDRESS:PORT`` or ``[IPv6]:PORT`` (the port defaults to 5683 when left out)."""
        if not isinstance(text, str) or not text:
            raise ConfigError('a multicast group is "ADDRESS:PORT" or "[IPv6]:PORT" (text)')
        host, port = text, "5683"
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ConfigError(f"multicast group {text!r}: [IPv6]:PORT expected")
            port = rest[1:] or port
        elif text.count(":") == 1:
            host, port = text.split(":")
        if not port.isdigit():
            raise ConfigError(f"multicast group {text!r}: the port is a number")
        return cls(host, int(port))

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def interface_index(interface: str) -> int:
    """The index of an interface given by name, or by an IPv6 address configured on it (Linux:
    ``/proc/net/if_inet6``). Raises :class:`ConfigError` when there is none such."""
    try:
        wanted = ipaddress.IPv6Address(interface).packed.hex()
    except ValueError:
        try:
            return socket.if_nametoindex(interface)
        except OSError:
            raise ConfigError(f"multicast interface {interface!r}: no such interface") from None
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == wanted:
                    return int(fields[1], 16)
    except OSError:
        pass
    raise ConfigError(f"multicast interface {interface!r}: no interface has that address")


def _interface_v4(interface: str) -> bytes:
    try:
        return ipaddress.IPv4Address(interface).packed
    except ValueError:
        raise ConfigError(
            f"multicast interface {interface!r}: an IPv4 group is joined by an IPv4 address"
        ) from None


def receiver_socket(group: Group, interface: str) -> socket.socket:
    """A non-blocking UDP socket that receives ``group``'s datagrams, joined on ``interface``
    (see the module docstring). Raises :class:`ConfigError` for an unusable interface and
    ``OSError`` when the system refuses."""
    sock = socket.socket(group.family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if group.family == socket.AF_INET:
            local = _interface_v4(interface)
            sock.bind((group.address, group.port))
            membership = ipaddress.IPv4Address(group.address).packed + local
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        else:
            index = interface_index(interface)
            sock.bind((group.address, group.port, 0, index))
            membership = ipaddress.IPv6Address(group.address).packed + struct.pack("@I", index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, membership)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def sender_socket(
    family: socket.AddressFamily,
    interface: str,
    *,
    hops: int = DEFAULT_HOPS,
    loop: bool = True,
    port: int = 0,
) -> socket.socket:
    """A non-blocking UDP socket bound to ``interface``'s unicast address (IPv6: the address, or
    ``::`` for an interface given by name) and ``port``, sending to groups out of that interface
    with TTL / hop limit ``hops``, delivered to this host's members too when ``loop``."""
    if type(hops) is not int or not 1 <= hops <= 255:
        raise ConfigError("multicast hops is 1 to 255")
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET:
            local = _interface_v4(interface)
            sock.bind((interface, port))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, local)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, hops)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(loop))
        else:
            index = interface_index(interface)
            try:
                address = str(ipaddress.IPv6Address(interface))
            except ValueError:
                address = "::"
            sock.bind((address, port, 0, 0))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, hops)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(loop))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# --- CoAP messages on a group ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded CoAP message: type, code, message id, token, options in order, payload."""

    mtype: int
    code: int
    mid: int
    token: bytes
    options: tuple[tuple[int, bytes], ...]
    payload: bytes

    def first(self, number: int) -> bytes | None:
        for n, value in self.options:
            if n == number:
                return value
        return None

    def path(self) -> tuple[str, ...]:
        """The Uri-Path segments (undecodable ones as the empty string, which names nothing)."""
        out = []
        for n, value in self.options:
            if n == URI_PATH:
                try:
                    out.append(value.decode())
                except UnicodeDecodeError:
                    out.append("")
        return tuple(out)


def encode(
    mtype: int,
    code: int,
    mid: int,
    token: bytes,
    options: Sequence[tuple[int, bytes]] = (),
    payload: bytes = b"",
) -> bytes:
    """One CoAP message (RFC 7252 §3); ``options`` in any order (sorted here, stable)."""
    if len(token) > 8:
        raise ValueError("a token is at most 8 bytes")
    out = bytearray([0x40 | mtype << 4 | len(token), code, mid >> 8 & 0xFF, mid & 0xFF])
    out += token
    previous = 0
    for number, value in sorted(options, key=lambda item: item[0]):
        out += option(number - previous, value)
        previous = number
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def decode(data: bytes) -> Message | None:
    """The message in ``data``, or None for anything malformed (RFC 7252 §3)."""
    n = len(data)
    if n < 4 or data[0] >> 6 != 1 or data[0] & 0x0F > 8:
        return None
    tkl = data[0] & 0x0F
    pos = 4 + tkl
    if pos > n:
        return None
    options: list[tuple[int, bytes]] = []
    number = 0
    payload = b""
    while pos < n:
        byte = data[pos]
        if byte == 0xFF:
            payload = data[pos + 1 :]
            if not payload:
                return None  # a marker with no payload is a format error
            break
        pos += 1
        fields = []
        for nibble in (byte >> 4, byte & 0x0F):
            if nibble == 13 and pos < n:
                fields.append(13 + data[pos])
                pos += 1
            elif nibble == 14 and pos + 1 < n:
                fields.append(269 + (data[pos] << 8 | data[pos + 1]))
                pos += 2
            elif nibble < 13:
                fields.append(nibble)
            else:
                return None
        number += fields[0]
        end = pos + fields[1]
        if end > n:
            return None
        options.append((number, bytes(data[pos:end])))
        pos = end
    return Message(
        data[0] >> 4 & 0x03, data[1], data[2] << 8 | data[3], bytes(data[4 : 4 + tkl]),
        tuple(options), bytes(payload),
    )  # fmt: skip


def uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def read_uint(value: bytes | None) -> int | None:
    return None if value is None or len(value) > 4 else int.from_bytes(value, "big")


def resource_token(resource_id: str) -> bytes:
    """The token of ``resource_id``'s group notifications: 8 bytes of SHA-256 over a label and
    the id, the same at every producer and consumer (a consumer knows the token of each resource
    it listens for without asking anyone)."""
    return hashlib.sha256(b"OSCAR group\x00" + resource_id.encode()).digest()[:8]


def new_mid() -> int:
    return int.from_bytes(os.urandom(2), "big")


# --- asyncio ------------------------------------------------------------------------------------

#: Called with each datagram and its source address.
OnDatagram = Callable[[bytes, Any], None]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: OnDatagram) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors: nothing to do on a group
        pass


async def open_endpoint(sock: socket.socket, on_datagram: OnDatagram) -> asyncio.DatagramTransport:
    """An asyncio transport on ``sock`` calling ``on_datagram`` per datagram (close it to end)."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(on_datagram), sock=sock)
    return transport
