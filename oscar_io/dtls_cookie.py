"""The HelloVerifyRequest cookie exchange of DTLS (RFC 6347 §4.2.1), done without state.

aiocoap's ``tinydtls_server`` makes a connection (a tinydtls context, a task, a table entry) for
every source address that sends it anything, before tinydtls gets to check a cookie. The AS's
connection guard (:mod:`oscar_io.dtls`) puts :class:`CookieGate` in front of it: a source
without a connection is answered with a HelloVerifyRequest and forgotten until it returns the
cookie, so a sender of spoofed datagrams, who never sees the cookie, makes no state at all.

The connection made for a returning source then does tinydtls's own cookie exchange as well (a
second HelloVerifyRequest, which clients answer like the first): tinydtls's cookie secret is
random per connection and cannot be set, and the hello with the cookie is part of the handshake
hash, so this gate's cookie cannot stand in for tinydtls's.

This module does no I/O and keeps no state but its key: it parses a datagram and builds the
answer; the guard sends it.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["COOKIE_PERIOD", "CookieGate"]

_HANDSHAKE = b"\x16"  # DTLS record content type 22
_COOKIE_LENGTH = 16  # what tinydtls's own cookies are
# A cookie is good for the period it was made in and the next one (so between one and two).
COOKIE_PERIOD = 30.0


def _client_hello(data: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """A datagram that is one whole, unfragmented DTLS ClientHello in epoch 0:
    (record sequence number, message sequence number, cookie, the fields the cookie covers);
    None for anything else. RFC 6347 §4.1, §4.2.2 and §4.2.1; RFC 5246 §7.4.1.2."""
    if (
        len(data) < 13 + 12 + 35
        or data[:1] != _HANDSHAKE
        or data[1] != 0xFE
        or data[3:5] != b"\0\0"
    ):
        return None
    length = int.from_bytes(data[11:13], "big")
    handshake = data[13 : 13 + length]
    if len(handshake) != length or length < 12 or handshake[0] != 1:  # client_hello
        return None
    body_length = int.from_bytes(handshake[1:4], "big")
    if handshake[6:9] != b"\0\0\0" or int.from_bytes(handshake[9:12], "big") != body_length:
        return None  # a fragment: tinydtls does not reassemble a ClientHello either
    body = handshake[12 : 12 + body_length]
    # client_version (2), random (32), session_id <0..32>, cookie <0..255>, the rest
    session_id_length = body[34] if len(body) > 34 else 255
    at = 35 + session_id_length
    if session_id_length > 32 or len(body) != body_length or len(body) <= at:
        return None
    cookie = body[at + 1 : at + 1 + body[at]]
    if len(cookie) != body[at]:
        return None
    return data[5:11], handshake[4:6], cookie, body[:at] + body[at + 1 + len(cookie) :]


def _hello_verify_request(record_seq: bytes, message_seq: bytes, cookie: bytes) -> bytes:
    """A HelloVerifyRequest as tinydtls itself sends one (record version 1.0, RFC 6347 §4.2.1;
    the record and message sequence numbers of the hello it answers)."""
    body = b"\xfe\xfd" + bytes([len(cookie)]) + cookie
    size = len(body).to_bytes(3, "big")
    handshake = b"\x03" + size + message_seq + b"\0\0\0" + size + body
    return _HANDSHAKE + b"\xfe\xff\0\0" + record_seq + len(handshake).to_bytes(2, "big") + handshake


class CookieGate:
    """RFC 6347 §4.2.1 done statelessly, for sources the transport has no connection for: a
    ClientHello without this gate's cookie for its source address is answered with a
    HelloVerifyRequest and forgotten; only a hello that brings the cookie back (so its sender
    receives at that address) may make a connection. Anything else from such a source is dropped.

    The cookie is an HMAC of the source address, the period it was made in and the hello's
    fields (version, random, session id, suites, compression, extensions: RFC 6347 requires the
    second hello to repeat them); the key is random per process. Costs no state and no table
    search, whatever the number of sources."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, period: float = COOKIE_PERIOD
    ) -> None:
        self._key = os.urandom(32)
        self._clock = clock
        self._period = period

    def _cookie(self, sockaddr: Any, period: int, fields: bytes) -> bytes:
        message = f"{sockaddr[0]}|{sockaddr[1]}|{period}|".encode() + fields
        return hmac.digest(self._key, message, "sha256")[:_COOKIE_LENGTH]

    def answer(self, data: bytes, sockaddr: Any) -> bytes | None:
        """None: admit (a ClientHello carrying a good cookie). Otherwise the datagram to send
        back, empty for nothing (not a ClientHello)."""
        hello = _client_hello(data)
        if hello is None:
            return b""
        record_seq, message_seq, cookie, fields = hello
        if self._good(cookie, sockaddr, fields):
            return None
        return self._verify_request(record_seq, message_seq, sockaddr, fields)

    def answer_known(self, data: bytes, sockaddr: Any) -> bytes | bool:
        """For a source that has a connection already, which a new handshake from the same
        address must replace (the old peer is gone: its port was reused by another program, or it
        restarted). True: a ClientHello carrying this gate's cookie, so its sender receives at the
        address: the caller ends the old connection and lets this hello make a fresh one. A
        cookie-less ClientHello: the HelloVerifyRequest to send back (the old connection stays
        until the cookie returns, so a spoofed hello cannot end it). False for anything else,
        a hello with another cookie included: that is the connection's own handshake going on
        (tinydtls's cookie exchange), tinydtls's business."""
        hello = _client_hello(data)
        if hello is None:
            return False
        record_seq, message_seq, cookie, fields = hello
        if not cookie:
            return self._verify_request(record_seq, message_seq, sockaddr, fields)
        return self._good(cookie, sockaddr, fields)

    def _good(self, cookie: bytes, sockaddr: Any, fields: bytes) -> bool:
        period = int(self._clock() // self._period)
        return len(cookie) == _COOKIE_LENGTH and any(
            hmac.compare_digest(cookie, self._cookie(sockaddr, p, fields))
            for p in (period, period - 1)
        )

    def _verify_request(
        self, record_seq: bytes, message_seq: bytes, sockaddr: Any, fields: bytes
    ) -> bytes:
        period = int(self._clock() // self._period)
        return _hello_verify_request(
            record_seq, message_seq, self._cookie(sockaddr, period, fields)
        )
