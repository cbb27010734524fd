"""What the AS needs from aiocoap's DTLS server transport beyond what it offers.

aiocoap 0.4.17's ``tinydtls_server`` (see ../shared/NOTES-aiocoap.md) finds a PSK by a linear scan
of its credentials, keeps one entry per source address that ever sent it a datagram and never
evicts one, and keeps a session alive after its credentials are removed. This module adds:

- :class:`IndexedCreds`: server credentials with an O(1) lookup by PSK identity. An *unknown*
  identity gets a decoy key (stable per identity, unknown to anyone), so the handshake goes on and
  fails at the Finished message exactly as a wrong key does (RFC 4279 §2): an unknown identity and a
  wrong key fail alike, and nobody learns which identities exist.
- :class:`ConnectionGuard`: lets a new source address into the transport's table only with a
  good cookie (:mod:`oscar_io.dtls_cookie`), bounds the table (a cap that evicts the least
  recently seen peer other than the one that just arrived, preferring peers that never completed
  a request, in O(1); an idle sweep), reads the socket in batches, bounds the sessions of each
  identity, and ends the sessions of one identity.
- :func:`end_sessions`: close every session authenticated with one credentials label (a revoked
  device), sending close_notify.

These reach into private attributes of aiocoap's transport (``_pool``, ``_connections``,
``_psk_store._claims``, ``_dtls_socket``, ``_inject_error``) and of asyncio's selector datagram
transport (``_sock``, ``_loop._add_reader``, ``_conn_lost``): pinned to aiocoap 0.4.x in
pyproject.toml, and checked by the AS tests (tests/roles/as/test_as_flood.py for the flood
defences).
This module holds no policy (who may connect is the store's business) and never logs a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiocoap import error
from aiocoap.credentials import DTLS, CredentialsMap

from .dtls_cookie import CookieGate

__all__ = [
    "MAX_SESSIONS_PER_IDENTITY",
    "ConnectionGuard",
    "IndexedCreds",
    "device_of_label",
    "end_sessions",
    "label_of",
    "mark_established",
    "session_count",
]

log = logging.getLogger("oscar.dtls")

# tinydtls 0.8.6 limits (NOTES-aiocoap.md).
MAX_PSK = 16
MAX_IDENTITY = 32

# Established sessions one identity may hold at once: one more evicts its least recently used one.
# Without a bound, one device could fill the whole connection table with its own sessions.
MAX_SESSIONS_PER_IDENTITY = 4

_ESTABLISHED = "_oscar_established"
_GUARD = "_oscar_guard"  # on the transport's pool: the ConnectionGuard installed there


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


def session_count(ctx: Any) -> int:
    """The DTLS server's connections now (sessions and handshakes in progress)."""
    return len(_pool(ctx)._connections)


def end_sessions(ctx: Any, label: str) -> int:
    """Close every connection whose handshake used the credentials ``label``. Returns how many."""
    pool = _pool(ctx)
    victims = [(k, a) for k, a in pool._connections.items() if a._psk_store._claims == label]
    for sockaddr, connection in victims:
        _close(pool, sockaddr, connection, "credentials revoked")
    return len(victims)


# Receive buffer the guard asks for (the kernel doubles it, within net.core.rmem_max), and the
# datagrams read at most per turn of the event loop.
RECEIVE_BUFFER = 4 << 20
READ_BATCH = 64


class ConnectionGuard:
    """Keeps the DTLS server's connection table bounded, at a cost per datagram that does not
    depend on its size.

    - A source without a connection gets one only by returning this guard's cookie
      (:class:`CookieGate`): junk and spoofed hellos cost an HMAC and leave nothing behind.
    - At most ``cap`` entries: a connection that makes the table larger evicts the least recently
      seen peer other than itself: among those that never carried an authenticated request (half-
      done or failed handshakes) first, then among the established ones that ``pinned`` does not
      keep, then among all. Both kinds are kept in order of last datagram, so an eviction takes
      the front one. The newcomer itself is never the victim, so established sessions cannot lock
      new clients out.
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
        self.gate = CookieGate(clock=clock)
        # Last datagram time of each connection, oldest first: those without an authenticated
        # request, and the established ones. Entries the transport dropped on its own (a fatal
        # alert) are found stale and skipped when they come to the front.
        self._pending: OrderedDict[Any, float] = OrderedDict()
        self._live: OrderedDict[Any, float] = OrderedDict()
        # Credentials label -> addresses of its established connections (for per_identity).
        self._by_label: dict[str, dict[Any, None]] = {}
        self.evicted = 0
        self.verified = 0  # hellos that came back with a good cookie
        self.failed = 0  # datagrams whose handling raised (dropped, the batch went on)
        self._failure_logged = float("-inf")
        self._original = self._pool.datagram_received
        # asyncio calls protocol.datagram_received: an instance attribute shadows the method.
        self._pool.datagram_received = self._datagram_received
        setattr(self._pool, _GUARD, self)  # for mark_established
        self._read_in_batches()

    def _read_in_batches(self) -> None:
        """Give the socket a larger receive buffer and read it in batches.

        asyncio's datagram transport reads one datagram per turn of the event loop (one
        ``epoll_wait`` and a round of callbacks each): under a flood, most of the AS's time went
        there, and a burst that came while the AS was not scheduled overflowed the kernel's
        default buffer (about 270 datagrams: 27 ms at 10,000/s), dropping the datagrams of
        established sessions and handshakes with the junk. The buffer size asked for is capped by
        the kernel (``net.core.rmem_max``)."""
        transport = self._pool._transport
        sock = transport._sock
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        loop = transport._loop
        datagram_received = self._datagram_received
        error_received = self._pool.error_received

        def read_ready() -> None:
            for _ in range(READ_BATCH):
                if transport._conn_lost:
                    return
                try:
                    data, sockaddr = sock.recvfrom(transport.max_size)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    error_received(exc)
                    return
                try:
                    datagram_received(data, sockaddr)
                except Exception as exc:  # one datagram's failure: the batch goes on
                    self._failed(exc)

        loop._add_reader(sock.fileno(), read_ready)  # replaces the transport's reader

    def _failed(self, exc: Exception) -> None:
        """A datagram whose handling raised: counted, and one line (the exception's type only:
        its text could hold peer data) at info at most once a second, at debug otherwise."""
        self.failed += 1
        now = self._clock()
        level = logging.INFO if now - self._failure_logged >= 1.0 else logging.DEBUG
        if level == logging.INFO:
            self._failure_logged = now
        log.log(level, "a datagram could not be handled (%s): dropped", type(exc).__name__)

    def __len__(self) -> int:
        return len(self._pool._connections)

    def _datagram_received(self, data: bytes, sockaddr: Any) -> None:
        connections = self._pool._connections
        if sockaddr not in connections:
            reply = self.gate.answer(data, sockaddr)
            if reply is not None:
                self._send(reply, sockaddr)
                return
            self.verified += 1
        else:
            # A new handshake from an address that has a connection: its old peer is gone (a
            # device killed and another program given its port). Left to the old connection,
            # the handshake failed at the PSK lookup if it named another identity, after the
            # client had sent its last flight, which it then retransmitted into nothing. The
            # gate's cookie exchange proves the sender owns the address, then a fresh
            # connection takes the handshake from its first hello.
            restart = self.gate.answer_known(data, sockaddr)
            if restart is True:
                self.verified += 1
                self.drop(sockaddr, "a new handshake from its address")
            elif restart:
                self._send(restart, sockaddr)
                return
        try:
            self._original(data, sockaddr)
        except (RuntimeError, SystemError):
            # aiocoap's per-connection PSK store refuses a handshake naming another identity
            # than the one this address's earlier session used ("DTLS stack tried accessing
            # different keys"). A new handshake's first hello replaces the connection (above),
            # so this is a hello the gate took for the connection's own cookie exchange. The
            # sender got past tinydtls's cookie, so owns the address: drop the old entry whole,
            # claims included; the client's next hello makes a fresh one.
            log.info("a new handshake from a known address named another identity: reset")
            self.drop(sockaddr, "new handshake under another identity")
            return
        connection = connections.get(sockaddr)
        if connection is None:  # a fatal alert ended it
            self._forget(sockaddr)
            return
        table, other = (self._live, self._pending)
        if not _established(connection):
            table, other = other, table
        other.pop(sockaddr, None)  # the connection the transport had here was replaced
        table[sockaddr] = self._clock()
        table.move_to_end(sockaddr)
        while len(connections) > self.cap and self._evict_one(sockaddr):
            pass

    def _send(self, reply: bytes, sockaddr: Any) -> None:
        """Straight to the socket: a reply that cannot leave now is dropped, never queued
        (asyncio's transport would queue without a bound). Nothing for an empty one."""
        if reply:
            with contextlib.suppress(OSError):
                self._pool._transport._sock.sendto(reply, sockaddr)

    def _forget(self, sockaddr: Any) -> None:
        self._pending.pop(sockaddr, None)
        self._live.pop(sockaddr, None)

    def _last_seen(self, sockaddr: Any) -> float:
        return self._live.get(sockaddr, self._pending.get(sockaddr, float("-inf")))

    def _oldest(self, table: OrderedDict[Any, float], newcomer: Any, pinned: bool) -> Any:
        """The front entry of ``table`` that is a live connection and not ``newcomer`` (and, if
        ``pinned``, that ``pinned`` does not keep), or None. Stale entries met are removed; kept
        ones are moved to the back once each, so a call looks at each entry at most once."""
        connections = self._pool._connections
        for _ in range(len(table)):
            sockaddr = next(iter(table))
            connection = connections.get(sockaddr)
            if connection is None:
                del table[sockaddr]
            elif sockaddr == newcomer or (pinned and self._pinned(connection)):
                table.move_to_end(sockaddr)
            else:
                return sockaddr
        return None

    def _evict_one(self, newcomer: Any) -> bool:
        """Drop the least recently seen peer other than ``newcomer``: pending handshakes first,
        then unpinned established sessions, then any. False if there is none."""
        for table, pinned in ((self._pending, False), (self._live, True), (self._live, False)):
            victim = self._oldest(table, newcomer, pinned)
            if victim is not None:
                self.drop(victim, "connection table full")
                return True
        return False

    def established(self, connection: Any) -> None:
        """``connection`` carried its first authenticated request: if its identity now holds more
        than ``per_identity`` established sessions, close its least recently seen other ones."""
        sockaddr = connection._underlying_address.address
        if self._pool._connections.get(sockaddr) is connection:
            self._live[sockaddr] = self._pending.pop(sockaddr, self._clock())
            self._live.move_to_end(sockaddr)
        label = connection._psk_store._claims
        if label is None:
            return
        mine = self._sessions_of(label, add=sockaddr)
        excess = len(mine) - self.per_identity
        if excess <= 0 or not any(a is connection for _, a in mine):
            return  # within the bound, or a connection closed meanwhile (no live session)
        mine = [(k, a) for k, a in mine if a is not connection]
        mine.sort(key=lambda item: (self._pinned(item[1]), self._last_seen(item[0])))
        for victim, _ in mine[:excess]:
            self.drop(victim, "too many sessions of one identity")
        log.info(
            "device %s: closed %d older session(s), at most %d per device",
            device_of_label(label),
            excess,
            self.per_identity,
        )

    def _sessions_of(self, label: str, add: Any = None) -> list[tuple[Any, Any]]:
        """The established connections of ``label`` (with ``add``'s address noted among them
        first), from the per-label index: as many entries as the identity has sessions, whatever
        the table's size. Addresses whose connection has gone are removed on the way."""
        keys = self._by_label.setdefault(label, {})
        if add is not None:
            keys[add] = None
        mine = []
        for sockaddr in list(keys):
            connection = self._pool._connections.get(sockaddr)
            if connection is None or connection._psk_store._claims != label:
                del keys[sockaddr]
            elif _established(connection):
                mine.append((sockaddr, connection))
        if not keys:
            del self._by_label[label]
        return mine

    def drop(self, sockaddr: Any, reason: str) -> None:
        connection = self._pool._connections.get(sockaddr)
        self._forget(sockaddr)
        if connection is not None:
            keys = self._by_label.get(connection._psk_store._claims)
            if keys is not None:
                keys.pop(sockaddr, None)
            _close(self._pool, sockaddr, connection, reason)
            self.evicted += 1

    def sweep(self) -> int:
        """Drop the idle peers now; returns how many."""
        now = self._clock()
        dropped = 0
        connections = self._pool._connections
        for table in (self._pending, self._live):
            for sockaddr in [k for k in table if k not in connections]:
                del table[sockaddr]
        for label in list(self._by_label):
            self._sessions_of(label)  # drops the addresses whose connection has gone
        for sockaddr, connection in list(connections.items()):
            seen = self._last_seen(sockaddr)
            if seen == float("-inf"):  # not seen through this guard: count from now
                table = self._live if _established(connection) else self._pending
                table[sockaddr] = seen = now
            if _established(connection):
                if now - seen > self.idle and not self._pinned(connection):
                    self.drop(sockaddr, "idle")
                    dropped += 1
            elif now - seen > self.pending_idle:
                self.drop(sockaddr, "handshake not completed")
                dropped += 1
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
        self._pending.clear()
        self._live.clear()
        self._by_label.clear()
        return len(connections)

    def uninstall(self) -> None:
        transport = self._pool._transport
        if not transport._conn_lost:
            transport._loop._add_reader(transport._sock.fileno(), transport._read_ready)
        self._pool.__dict__.pop("datagram_received", None)
        if self._pool.__dict__.get(_GUARD) is self:
            del self._pool.__dict__[_GUARD]
