"""What the fast paths of the producer and the proxy share: CoAP bytes in front of aiocoap.

A role's fast path answers a few common requests from pre-encoded bytes, straight from the
receive callback of aiocoap's ``udp6`` interface, and hands every other datagram to aiocoap
unchanged (:mod:`producer.fastpath`, :mod:`proxy.fastpath`). This module holds the parts that
are not the role's:

- :func:`option` and :func:`uint`: one encoded CoAP option (RFC 7252 §3.1), a uint value;
- :func:`parse`: a request datagram's type, code, token length and options, or None for
  anything malformed, truncated, with a payload (marker included) or a token over 8 bytes;
- :class:`UdpHook`: the hook on a server context's udp6 interface (:meth:`UdpHook.install`),
  which asks the role's ``respond(data, address, pktinfo)`` first and sends what it returns,
  for unicast datagrams only, never on a token aiocoap is using for a request from that remote
  (an observation: a new request on its token is aiocoap's to handle), and never losing the
  receive loop: a responder that raises is logged once and the datagram goes to aiocoap. A
  responder's ``b""`` takes the datagram and sends nothing (a RST or duplicate it consumed). For a
  role that keeps exchanges of its own (the proxy's fast observations): :meth:`UdpHook.send` for
  unsolicited datagrams, :attr:`UdpHook.on_error` told of every error aiocoap reads for a peer
  (ICMP from the socket's error queue, or a failed send), :attr:`UdpHook.on_close` of the
  interface's shutdown.

What it does not do: decide what to answer (the roles do), or anything with DTLS.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from .aiocoap_fixes import clear_pending_error

__all__ = ["CON", "NON", "Parsed", "UdpHook", "option", "parse", "uint"]

#: Message types (the two bits after the version in the first byte).
CON = 0
NON = 1
_V4MAPPED = bytes(10) + b"\xff\xff"

#: (type, code, token length, options as (number, value) in order); the token is data[4:4+tkl].
Parsed = tuple[int, int, int, list[tuple[int, bytes]]]
Responder = Callable[[bytes, Any, bytes], "bytes | None"]


def uint(value: int) -> bytes:
    """A CoAP uint option value: big-endian, no leading zero bytes (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def option(delta: int, value: bytes) -> bytes:
    """One encoded option, ``delta`` after the previous one (RFC 7252 §3.1)."""

    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, (n - 269).to_bytes(2, "big")

    d, d_ext = nibble(delta)
    n, n_ext = nibble(len(value))
    return bytes([d << 4 | n]) + d_ext + n_ext + value


def parse(data: bytes) -> Parsed | None:
    """A request datagram's (type, code, token length, options), or None: not version 1, a
    token over 8 bytes, truncated, a reserved nibble, or a payload (marker included)."""
    n = len(data)
    if n < 4:
        return None
    first = data[0]
    tkl = first & 0x0F
    if first >> 6 != 1 or tkl > 8:
        return None
    pos = 4 + tkl
    if pos > n:
        return None
    options: list[tuple[int, bytes]] = []
    number = 0
    while pos < n:
        byte = data[pos]
        pos += 1
        delta = byte >> 4
        length = byte & 0x0F
        if delta >= 13:
            if delta == 13 and pos < n:
                delta = 13 + data[pos]
                pos += 1
            elif delta == 14 and pos + 1 < n:
                delta = 269 + (data[pos] << 8 | data[pos + 1])
                pos += 2
            else:  # 15: the payload marker, or a message format error
                return None
        if length >= 13:
            if length == 13 and pos < n:
                length = 13 + data[pos]
                pos += 1
            elif length == 14 and pos + 1 < n:
                length = 269 + (data[pos] << 8 | data[pos + 1])
                pos += 2
            else:
                return None
        number += delta
        end = pos + length
        if end > n:
            return None
        options.append((number, data[pos:end]))
        pos = end
    return (first >> 4) & 0x03, data[1], tkl, options


class UdpHook:
    """A fast path's place on aiocoap's udp6 interface; see the module docstring.

    ``enabled`` False sends every datagram to aiocoap; ``answered`` counts those answered by
    ``respond`` (``taken`` those it consumed without an answer). After :meth:`install`,
    ``interface`` is aiocoap's udp6 message interface and ``message_manager`` its message layer
    (a NON answer takes its message ID from there). ``on_error(address)`` and ``on_close()``,
    if set, are called before aiocoap handles an error for a peer or shuts the interface down."""

    def __init__(self, respond: Responder, log: logging.Logger) -> None:
        self.respond = respond
        self.log = log
        self.enabled = True
        self.answered = 0
        self.taken = 0
        self.failed = False
        self.interface: Any = None
        self.message_manager: Any = None
        self.on_error: Callable[[Any], None] | None = None
        self.on_close: Callable[[], None] | None = None
        self._sock: socket.socket | None = None

    def next_message_id(self) -> int:
        """A message ID from aiocoap's own sequence (for a NON answer)."""
        return int(self.message_manager._next_message_id())

    def install(self, context: Any) -> bool:
        """Put the hook in front of ``context``'s udp6 interface. False (and a log line) if
        aiocoap's internals are not where this version expects them: then aiocoap answers all."""
        try:
            from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress

            for token_manager in context.request_interfaces:
                message_manager = getattr(token_manager, "token_interface", None)
                interface = getattr(message_manager, "message_interface", None)
                if isinstance(interface, MessageInterfaceUDP6):
                    break
            else:
                raise LookupError("no udp6 interface")
            incoming: dict[Any, Any] = token_manager.incoming_requests
            original = interface.datagram_msg_received
            transport = interface.transport
            sock = transport.get_extra_info("socket")
        except (ImportError, AttributeError, LookupError) as exc:
            self.log.warning("fast path not installed (%s): aiocoap answers every request", exc)
            return False
        self.interface, self.message_manager = interface, message_manager
        self._sock = sock
        errqueue = interface.datagram_errqueue_received
        shutdown = interface.shutdown

        def datagram_errqueue_received(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
            self._tell_error(address)
            errqueue(data, ancdata, flags, address)

        async def shutdown_interface() -> None:
            if self.on_close is not None:
                try:
                    self.on_close()
                except Exception:
                    self.log.exception("fast path failed on shutdown")
            await shutdown()

        def in_use(data: bytes, address: Any, pktinfo: bytes) -> bool:
            """Whether aiocoap has a request on this token from this remote (an observation)."""
            token = data[4 : 4 + (data[0] & 0x0F)]
            remote = UDP6EndpointAddress(address, interface, pktinfo=pktinfo)
            return (token, remote) in incoming

        def datagram_msg_received(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
            response = None
            if self.enabled:
                try:
                    response = self._answer(data, ancdata, address, in_use if incoming else None)
                except Exception:  # never lose the receive loop: aiocoap answers instead
                    if not self.failed:
                        self.failed = True
                        self.log.exception("fast path failed; this datagram goes to aiocoap")
                    response = None
            if response is None:
                original(data, ancdata, flags, address)
                return
            if not response:  # consumed: nothing to send
                self.taken += 1
                return
            self.answered += 1
            try:
                # A pending ICMP error (an observer gone) would fail this send, not its own:
                # read and clear it first, as aiocoap_fixes does for aiocoap's sends.
                clear_pending_error(sock)
                transport.sendmsg(response, ancdata, 0, address)  # OSErrors: aiocoap logs them
            except Exception:
                self.log.exception("fast path could not send an answer")

        interface.datagram_msg_received = datagram_msg_received
        interface.datagram_errqueue_received = datagram_errqueue_received
        interface.shutdown = shutdown_interface
        return True

    def send(self, data: bytes, address: Any, pktinfo: bytes) -> bool:
        """Send an unsolicited datagram to ``address`` (a sockaddr as received) from the local
        address of ``pktinfo``; a failed send is an error for that peer as aiocoap treats one
        (:attr:`on_error`, then aiocoap's exchanges with it end). False if it failed."""
        sock = self._sock
        if sock is None:
            return False
        clear_pending_error(sock)  # another peer's ICMP error must not fail this send
        try:
            sock.sendmsg((data,), [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)], 0, address)
        except OSError as exc:
            self._tell_error(address)
            try:
                from aiocoap.transports.udp6 import UDP6EndpointAddress

                remote = UDP6EndpointAddress(address, self.interface, pktinfo=pktinfo)
                self.message_manager.dispatch_error(exc, remote)
            except Exception:
                self.log.exception("fast path could not report a failed send")
            return False
        return True

    def _tell_error(self, address: Any) -> None:
        if self.on_error is not None:
            try:
                self.on_error(address)
            except Exception:
                self.log.exception("fast path failed on a peer's error")

    def _answer(
        self,
        data: bytes,
        ancdata: Any,
        address: Any,
        in_use: Callable[[bytes, Any, bytes], bool] | None,
    ) -> bytes | None:
        """The answer to a datagram as received (with its ancillary data), or None."""
        if len(ancdata) != 1 or len(data) < 4:
            return None
        level, kind, pktinfo = ancdata[0]
        if level != socket.IPPROTO_IPV6 or kind != socket.IPV6_PKTINFO or len(pktinfo) < 16:
            return None
        if pktinfo[0] == 0xFF or (pktinfo[:12] == _V4MAPPED and pktinfo[12] >> 4 == 0xE):
            return None  # sent to a multicast address: aiocoap's rules for those
        if in_use is not None and data[1] != 0 and in_use(data, address, pktinfo):
            return None  # a new request on a token in use: aiocoap replaces the old one
        # (an empty message, ACK or RST, has no token to be in use: the role may take it)
        return self.respond(data, address, pktinfo)
