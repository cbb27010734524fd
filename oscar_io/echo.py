"""No amplification: an unverified address gets no reply larger than its request (RFC 9175 Echo).

RFC 7252 §11.3 and RFC 9175 §2.4: a server must not answer an unauthenticated request with a
response much larger than the request, unless the client showed that it receives at its claimed
address. A request to a multicast group multiplies that by the number of servers in the group,
so the producer's group responder (``producer.groups``) and the proxy (``proxy.server``, for
every plain-CoAP request) answer an unproven requester with at most a 4.01 Unauthorized carrying
an Echo option, no larger than the request; a client that repeats
its request with that Echo value has proved its address, which is then trusted for
:data:`VERIFIED_FOR` seconds (a bounded table).

The Echo value is stateless: 3 bytes of wall-clock time (seconds, modulo 2**24) and 5 bytes of
HMAC over (time, address), valid for :data:`ECHO_LIFETIME` seconds, under a key given (a device's,
from its bundle) or made at start. The 4.01 carrying it is 4 bytes, the token and 10 bytes of
option (:func:`challenge_size`).

It was the proxy's (``proxy.echo``) and moved here when the producer needed it too.

What it does not do: send anything, or decide which requests need a proof.
"""

from __future__ import annotations

import hmac
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["ECHO_SIZE", "AddressCheck", "challenge_size"]

ECHO_LIFETIME = 60
VERIFIED_FOR = 300.0
ECHO_SIZE = 8
_STAMP = 3
_WRAP = (1 << (8 * _STAMP)) - 1


def challenge_size(token: bytes) -> int:
    """The size on the wire of a 4.01 with an Echo option and no payload: header, token, and
    the option (one byte of delta and length, one of extended delta for 252, the value)."""
    return 4 + len(token) + 2 + ECHO_SIZE


class AddressCheck:
    """Issues and checks Echo values; remembers verified addresses."""

    def __init__(
        self,
        *,
        key: bytes | None = None,
        max_addresses: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``key``: 32 bytes shared by the instances that must accept each other's Echo values
        (None: one of its own). ``clock`` times how long an address stays verified (monotonic);
        ``wall`` stamps the Echo values (wall clock, which instances share)."""
        if key is not None and len(key) != 32:
            raise ValueError("the Echo key is 32 bytes")
        self._key = os.urandom(32) if key is None else key
        self._verified: OrderedDict[str, float] = OrderedDict()
        self._max = max_addresses
        self._clock = clock
        self._wall = wall
        self.challenges = 0

    def __repr__(self) -> str:
        return f"AddressCheck(verified={len(self._verified)})"

    def _mac(self, stamp: bytes, address: str) -> bytes:
        digest = hmac.new(self._key, stamp + address.encode(), "sha256").digest()
        return digest[: ECHO_SIZE - _STAMP]

    def challenge(self, address: str) -> bytes:
        """A fresh Echo value for ``address``."""
        self.challenges += 1
        stamp = struct.pack(">I", int(self._wall()) & _WRAP)[-_STAMP:]
        return stamp + self._mac(stamp, address)

    def is_verified(self, address: str) -> bool:
        seen = self._verified.get(address)
        if seen is None:
            return False
        if self._clock() - seen > VERIFIED_FOR:
            del self._verified[address]
            return False
        return True

    def prove(self, address: str, echo: bytes | None) -> bool:
        """Whether ``echo`` is a valid, recent value we gave ``address``; remembers it if so."""
        if echo is None or len(echo) != ECHO_SIZE:
            return False
        stamp, mac = echo[:_STAMP], echo[_STAMP:]
        if not hmac.compare_digest(mac, self._mac(stamp, address)):
            return False
        age = (int(self._wall()) - int.from_bytes(stamp, "big")) & _WRAP
        if age > ECHO_LIFETIME:
            return False
        self._verified[address] = self._clock()
        self._verified.move_to_end(address)
        while len(self._verified) > self._max:
            self._verified.popitem(last=False)
        return True
