"""What the AS needs from aiocoap's DTLS server transport beyond what it offers.

aiocoap 0.4.17's ``tinydtls_server`` (see ../shared/NOTES-aiocoap.md) finds a PSK by a linear scan
of its credentials, keeps one entry per source address that ever sent it a datagram and never
evicts one, and keeps a session alive after its credentials are removed. This module adds:

- :class:`IndexedCreds`: server credentials with an O(1) lookup by PSK identity. An *unknown*
  identity gets a decoy key (stable per identity, unknown to anyone), so the handshake goes on and
  fails at the Finished message exactly as a wrong key does (RFC 4279 §2): an unknown identity and a
  wrong key fail alike, and nobody learns which identities exist.
- :class:`ConnectionGuard`: bounds the transport's connection table (a cap that evicts the least
  recently seen peer other than the one that just arrived, preferring peers that never completed a
  request, and an idle sweep), bounds the sessions of each identity, and ends the sessions of one
  identity.
- :func:`end_sessions`: close every session authenticated with one credentials label (a revoked
  device), sending close_notify.

These reach into private attributes of aiocoap's transport (``_pool``, ``_connections``,
``_psk_store._claims``, ``_dtls_socket``, ``_inject_error``): pinned to aiocoap 0.4.x in
pyproject.toml, and checked by the AS tests. This module holds no policy (who may connect is the
store's business) and never logs a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from aiocoap import error
from aiocoap.credentials import DTLS, CredentialsMap

__all__ = [
    "MAX_SESSIONS_PER_IDENTITY",
    "ConnectionGuard",
    "IndexedCreds",
    "device_of_label",
    "end_sessions",
    "label_of",
    "mark_established",
]

log = logging.getLogger("oscar.as")

# tinydtls 0.8.6 limits (NOTES-aiocoap.md).
MAX_PSK = 16
MAX_IDENTITY = 32

# Established sessions one identity may hold at once: one more evicts its least recently used one.
# Without a bound, one device could fill the whole connection table with its own sessions.
MAX_SESSIONS_PER_IDENTITY = 4

_ESTABLISHED = "_oscar_established"
_GUARD = "_oscar_guard"  # on the transport's pool: the ConnectionGuard installed there
_ALERT = b"\x15"  # DTLS record content type 21


def label_of(device_id: str) -> str:
    """The credentials label of a device (what ``authenticated_claims`` will hold)."""
    return ":" + device_id


def device_of_label(label: object) -> str | None:
    """The device id of a credentials label, or None for anything that is not one."""
    if isinstance(label, str) and label.startswith(":"):
        return label[1:]
    return None


def mark_established(remote: object) -> None:
    """Note that this connection carried an authenticated request (so it is no junk peer), and let
    the pool's :class:`ConnectionGuard` apply the per-identity session bound to it."""
    if _established(remote):
        return
    try:
        setattr(remote, _ESTABLISHED, True)
    except AttributeError:  # not a DTLS server address
        return
    guard = getattr(getattr(remote, "_protocol", None), _GUARD, None)
    if isinstance(guard, ConnectionGuard):
        guard.established(remote)


def _established(connection: object) -> bool:
    return getattr(connection, _ESTABLISHED, False) is True


class IndexedCreds(CredentialsMap):  # type: ignore[misc]
    """Server credentials indexed by PSK identity; a decoy key for unknown identities."""

    def __init__(self) -> None:
        super().__init__()
        self._by_identity: dict[bytes, tuple[bytes, str]] = {}
        self._decoy_key = os.urandom(32)

    def __repr__(self) -> str:
        return f"IndexedCreds(<{len(self._by_identity)} identities>)"

    def __bool__(self) -> bool:
        # aiocoap's Context does ``server_credentials or CredentialsMap()``: an empty map (no
        # device enrolled yet) would be swapped for a fresh one, and devices added later lost.
        return True

    def __setitem__(self, label: str, item: Any) -> None:
        if label in self:
            self.__delitem__(label)
        super().__setitem__(label, item)
        if hasattr(item, "as_dtls_psk"):
            identity, psk = item.as_dtls_psk()
            self._by_identity[identity] = (psk, label)

    def __delitem__(self, label: str) -> None:
        item = self[label]
        super().__delitem__(label)
        if hasattr(item, "as_dtls_psk"):
            identity = item.as_dtls_psk()[0]
            if self._by_identity.get(identity, (b"", None))[1] == label:
                del self._by_identity[identity]

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, str | None]:
        """(psk, label) for a known identity; (decoy psk, None) for any other."""
        try:
            return self._by_identity[identity]
        except KeyError:
            decoy = hmac.new(self._decoy_key, bytes(identity), hashlib.sha256).digest()
            return decoy[:MAX_PSK], None

    def set_device(self, device_id: str, psk: bytes) -> None:
        """Let ``device_id`` connect with ``psk``. ValueError if tinydtls cannot use them."""
        identity = device_id.encode()
        if not 1 <= len(identity) <= MAX_IDENTITY or not 1 <= len(psk) <= MAX_PSK:
            raise ValueError(
                f"tinydtls takes identities of 1..{MAX_IDENTITY} and PSKs of 1..16 bytes"
            )
        self[label_of(device_id)] = DTLS(psk=psk, client_identity=identity)

    def remove_device(self, device_id: str) -> bool:
        """Stop accepting new handshakes of ``device_id``; whether it was there."""
        label = label_of(device_id)
        if label in self:
            del self[label]
            return True
        return False

    def device_ids(self) -> set[str]:
        return {d for d in map(device_of_label, self) if d is not None}


def _pool(ctx: Any) -> Any:
    """The DTLS server's per-address table owner (``_DatagramServerSocketSimpleDTLS``)."""
    for interface in ctx.request_interfaces:
        message_interface = getattr(interface.token_interface, "message_interface", None)
        pool = getattr(message_interface, "_pool", None)
        if pool is not None and hasattr(pool, "_connections"):
            return pool
    raise RuntimeError("the context has no tinydtls_server transport")


def _close(pool: Any, sockaddr: Any, connection: Any, reason: str) -> None:
    """Close one connection: close_notify (frees tinydtls's peer), fail its exchanges and
    observations, and take it out of the table."""
    try:
        connection._dtls_socket.resetPeer(connection._dtls_session)
    except Exception:  # a peer tinydtls never made: nothing to reset
        log.debug("resetPeer failed for a connection being closed", exc_info=True)
    with contextlib.suppress(KeyError):  # the transport had removed it already
        connection._inject_error(error.LibraryShutdown(reason))
    if pool._connections.get(sockaddr) is connection:
        del pool._connections[sockaddr]
    if not _established(connection):
        # The DTLS object's callbacks point back at the connection: a reference cycle that only
        # the cyclic GC would free, late. Nothing will use a peer that never made a request.
        connection._dtls_socket = None


def end_sessions(ctx: Any, label: str) -> int:
    """Close every connection whose handshake used the credentials ``label``. Returns how many."""
    pool = _pool(ctx)
    victims = [(k, a) for k, a in pool._connections.items() if a._psk_store._claims == label]
    for sockaddr, connection in victims:
        _close(pool, sockaddr, connection, "credentials revoked")
    return len(victims)


class ConnectionGuard:
    """Keeps the DTLS server's connection table bounded.

    - At most ``cap`` entries: a datagram that makes the table larger evicts the least recently
      seen peer other than the one that sent it: among those that never carried an authenticated
      request (junk, half-done or failed handshakes) first, then among the established ones that
      ``pinned`` does not keep, then among all. The newcomer itself is never the victim, so
      established sessions cannot lock new clients out.
    - At most ``per_identity`` established sessions per credentials label: when one more
      authenticates (:func:`mark_established`), the identity's least recently seen other session is
      closed (unpinned ones first).
    - Every ``interval`` seconds: peers without an authenticated request are dropped after
      ``pending_idle`` seconds of silence, the others after ``idle`` seconds, except those
      ``pinned`` says to keep (connections with a live observation).
    """

    def __init__(
        self,
        ctx: Any,
        *,
        cap: int,
        idle: float = 900.0,
        pending_idle: float = 5.0,
        interval: float = 1.0,
        pinned: Callable[[object], bool] = lambda connection: False,
        clock: Callable[[], float] = time.monotonic,
        per_identity: int = MAX_SESSIONS_PER_IDENTITY,
    ) -> None:
        if type(cap) is not int or cap < 1:
            raise ValueError("the connection cap must be a whole number, at least 1")
        if type(per_identity) is not int or per_identity < 1:
            raise ValueError("the per-identity session cap must be a whole number, at least 1")
        self._pool = _pool(ctx)
        self._ctx = ctx
        self.cap = cap
        self.per_identity = per_identity
        self.idle = idle
        self.pending_idle = pending_idle
        self.interval = interval
        self._pinned = pinned
        self._clock = clock
        self._seen: dict[Any, float] = {}
        self.evicted = 0
        self._original = self._pool.datagram_received
        # asyncio calls protocol.datagram_received: an instance attribute shadows the method.
        self._pool.datagram_received = self._datagram_received
        setattr(self._pool, _GUARD, self)  # for mark_established

    def __len__(self) -> int:
        return len(self._pool._connections)

    def _datagram_received(self, data: bytes, sockaddr: Any) -> None:
        if data[:1] == _ALERT and sockaddr not in self._pool._connections:
            # An alert from an address without a connection: above all the close_notify a peer
            # sends back when this guard closed its session. A new DTLS context would ignore it
            # (only a ClientHello opens a session), but its table entry would be the newest one
            # and so make the cap evict a handshake in progress instead.
            return
        self._seen[sockaddr] = self._clock()
        try:
            self._original(data, sockaddr)
        except (RuntimeError, SystemError):
            # aiocoap's per-connection PSK store refuses a handshake naming another identity
            # than the one this address's earlier session used ("DTLS stack tried accessing
            # different keys"). tinydtls asks for a PSK only after the cookie exchange, so the
            # sender owns the address: the old session's peer is gone (its port reused, by a
            # NAT or the OS). Drop the old entry whole, claims included; the peer's next
            # ClientHello makes a fresh one. Without this, the address could not handshake
            # until the idle sweep, and each attempt logged a traceback.
            log.info("a new handshake from a known address named another identity: reset")
            self.drop(sockaddr, "new handshake under another identity")
            return
        connections = self._pool._connections
        while len(connections) > self.cap and self._evict_one(sockaddr):
            pass

    def _last_seen(self, sockaddr: Any) -> float:
        return self._seen.get(sockaddr, float("-inf"))

    def _evict_one(self, newcomer: Any) -> bool:
        """Drop the least recently seen peer other than ``newcomer``: pending handshakes first,
        then unpinned established sessions, then any. False if there is none."""
        others = [(k, a) for k, a in self._pool._connections.items() if k != newcomer]
        for keep in (_established, self._pinned, lambda connection: False):
            candidates = [k for k, a in others if not keep(a)]
            if candidates:
                # min() keeps the first of equal times; the table is in least-recently-received
                # order.
                self.drop(min(candidates, key=self._last_seen), "connection table full")
                return True
        return False

    def established(self, connection: Any) -> None:
        """``connection`` carried its first authenticated request: if its identity now holds more
        than ``per_identity`` established sessions, close its least recently seen other ones."""
        label = connection._psk_store._claims
        if label is None:
            return
        mine = [
            (k, a)
            for k, a in self._pool._connections.items()
            if _established(a) and a._psk_store._claims == label
        ]
        excess = len(mine) - self.per_identity
        if excess <= 0 or not any(a is connection for _, a in mine):
            return  # within the bound, or a connection closed meanwhile (no live session)
        mine = [(k, a) for k, a in mine if a is not connection]
        mine.sort(key=lambda item: (self._pinned(item[1]), self._last_seen(item[0])))
        for sockaddr, _ in mine[:excess]:
            self.drop(sockaddr, "too many sessions of one identity")
        log.info(
            "device %s: closed %d older session(s), at most %d per device",
            device_of_label(label),
            excess,
            self.per_identity,
        )

    def drop(self, sockaddr: Any, reason: str) -> None:
        connection = self._pool._connections.get(sockaddr)
        self._seen.pop(sockaddr, None)
        if connection is not None:
            _close(self._pool, sockaddr, connection, reason)
            self.evicted += 1

    def sweep(self) -> int:
        """Drop the idle peers now; returns how many."""
        now = self._clock()
        dropped = 0
        for sockaddr, connection in list(self._pool._connections.items()):
            age = now - self._seen.get(sockaddr, now)
            if sockaddr not in self._seen:
                self._seen[sockaddr] = now
            if _established(connection):
                if age > self.idle and not self._pinned(connection):
                    self.drop(sockaddr, "idle")
                    dropped += 1
            elif age > self.pending_idle:
                self.drop(sockaddr, "handshake not completed")
                dropped += 1
        for sockaddr in [k for k in self._seen if k not in self._pool._connections]:
            del self._seen[sockaddr]
        return dropped

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.sweep()

    def end_sessions(self, label: str) -> int:
        return end_sessions(self._ctx, label)

    def drain(self) -> int:
        """Close every connection (before shutting the context down). Returns how many."""
        connections = list(self._pool._connections.items())
        for sockaddr, connection in connections:
            _close(self._pool, sockaddr, connection, "server shutting down")
        self._seen.clear()
        return len(connections)

    def uninstall(self) -> None:
        self._pool.__dict__.pop("datagram_received", None)
        if self._pool.__dict__.get(_GUARD) is self:
            del self._pool.__dict__[_GUARD]
