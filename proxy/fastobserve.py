"""The proxy's fast observations: an Observe registration of a cache hit, and its notifications,
sent from pre-encoded bytes before aiocoap (the observation half of :mod:`proxy.fastpath`).

:class:`proxy.fastpath.FastPath` hands over a registration it would answer as a hit — a CON or
NON GET with ``Observe: 0`` (empty) and no other new option, from a verified plain-CoAP address,
for a fresh in-memory entry of at most 1,124 bytes. What the slow path
(:meth:`proxy.server.ProxySite.render_to_pipe`, aiocoap's ``ObservableResource`` and message
layer) would do, this does with the same limits and the same bytes:

- **Registration.** :meth:`Relays.admit <proxy.relays.Relays.admit>` then
  :meth:`~proxy.relays.Relays.attach` under a holder id of its own (negative: never an
  ``id()``); declined by either, the GET is answered without Observe (RFC 7641 §4.1) and nothing
  is held. Otherwise the answer carries ``Observe: 0`` (2.05, or 2.03 for a matching ETag): a
  NON with a message ID of aiocoap's sequence, or piggybacked on the ACK of a CON.
- **Notifications.** On every new object of the resource (``Proxy.on_new_object``: a fetch, a
  relayed notification, a PUT, another cluster instance's object through
  :func:`proxy.shared.take`), one encoding of the entry for all observers; per observer only
  the header (type, a message ID of aiocoap's sequence), token and Observe number (1, 2, ...)
  differ, and a 2.03 where an observer's registration named the new ETag. aiocoap sends an
  observation's notifications whole whatever their size (no Block2), and so does this, but for
  a large object (its body on disk, :mod:`proxy.large`): its notification carries block 0 of
  1 KiB (RFC 7959 §2.6), and the observer asks for the rest. Each is a
  hit (``hits``, ``fast_hits``) as the slow path's rendering is. An entry not fresh in memory at
  that moment (a Max-Age of 0, say) is looked up per observer as the slow path renders it
  (:meth:`Proxy.lookup <proxy.core.Proxy.lookup>`: a refresh, a stale answer, or a 5.0x with
  ``Max-Age: 1`` that ends the observation).
- **Reliability, as aiocoap's message layer.** A NON registration gets NON notifications. A CON
  registration gets CON notifications, each an exchange: sent again after a random
  ``ACK_TIMEOUT`` times 1 to ``ACK_RANDOM_FACTOR``, doubling, ``MAX_RETRANSMIT`` times (aiocoap's
  ``TransportTuning``, read when sent), until the client's empty ACK or RST; one exchange in
  flight per peer (NSTART 1), the others waiting in order. The last timeout ends every fast
  observation of that peer, as aiocoap's ends every request of it.
- **Ends** (each gives back what it held, :meth:`Relays.release <proxy.relays.Relays.release>`):
  a new request from the same address on the observation's token (a deregistration with
  ``Observe: 1``, a new GET, a re-registration: the request is then answered as any other; a
  repeat of the registration's own message is a duplicate: a NON is dropped, a CON gets the
  same ACK again, as aiocoap's deduplication does); an ICMP error for the address (aiocoap's
  error queue, :attr:`UdpHook.on_error <oscar_io.coapfast.UdpHook.on_error>`) or a failed send;
  a RST to a CON notification in flight, or to its answer or one of its last NON notifications
  (RFC 7641 §3.6; aiocoap 0.4.17 ignores a RST to a NON and keeps notifying); an unacknowledged
  CON notification's last timeout; an error notification; the server's shutdown.

Differences from the slow path, by design: new objects that arrive together are each sent (the
slow path's lossy trigger may send only the newest of a burst); a RST to a NON ends the
observation; the one-exchange-per-peer rule covers the fast path's own CON notifications (a
peer that also holds aiocoap observations can have one of each in flight).

What it does not do: DTLS, registrations with other options (Block2, Accept, Echo...) or other
Observe encodings, or keep anything per observer beyond one small record (and a CON
registration's answer, for its duplicates).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiocoap.numbers.constants import TransportTuning

from oscar_io.coapfast import option, uint

from .bodies import BodyError
from .core import Unavailable
from .entry import Entry
from .large import cut
from .relays import client_of

if TYPE_CHECKING:
    from .core import Proxy

__all__ = ["FastObserve"]

log = logging.getLogger("oscar.proxy")

_ETAG = 4
_OBSERVE = 6
_CONTENT_FORMAT = 12
_MAX_AGE = 14
_BLOCK2 = 23
_CONTENT = 0x45
_VALID = 0x43
#: How many recent message IDs per observer a RST may name (its answer, its last notifications).
RECENT_MIDS = 4
#: Observe numbers are 3-byte uints (RFC 7641 §2).
_OBSERVE_MASK = 0xFFFFFF

Key = tuple[str, bytes]


@dataclass(slots=True, eq=False)
class Observer:
    """One fast observation: who, where to, and where it stands."""

    holder: int
    host: str
    token: bytes
    resource_id: str
    upstream: str | None
    etags: tuple[bytes, ...]
    #: The registration's message ID (a repeat of it is a duplicate).
    mid: int
    #: Where to send (aiocoap's sockaddr and the request's PKTINFO), for the hook.
    address: Any
    pktinfo: bytes
    #: A CON registration: its answer is piggybacked, its notifications are CON.
    con: bool = False
    #: A CON registration's answer, sent again to a repeat of the registration.
    answer: bytes = b""
    number: int = 0
    #: Message IDs sent to it, newest last (at most RECENT_MIDS).
    sent: tuple[int, ...] = ()
    ended: bool = False


@dataclass(slots=True, eq=False)
class _Exchange:
    """A CON notification in flight (aiocoap's exchange: retransmitted until ACK, RST or the
    last timeout)."""

    observer: Observer
    mid: int
    data: bytes
    timeout: float
    handle: asyncio.TimerHandle | None = None
    tries: int = 0


class _Encoded:
    """A new entry's notification parts for one Max-Age (ETag, then Observe in between)."""

    __slots__ = ("content", "etag", "valid")

    def __init__(self, entry: Entry, max_age: int, proxy: Proxy) -> None:
        age = option(_MAX_AGE - _CONTENT_FORMAT, uint(max_age))
        self.etag = option(_ETAG, entry.etag)
        # After Observe (6): Content-Format 18, Max-Age, the object; a 2.03: Max-Age only.
        payload = entry.obj
        if entry.body:  # a large object: block 0 of 1 KiB (szx 6), more to follow
            payload = cut(entry, proxy.bodies, 0, 6, 1024)[0]
            age += option(_BLOCK2 - _MAX_AGE, b"\x0e")
        self.content = option(_CONTENT_FORMAT - _OBSERVE, b"\x12") + age + b"\xff" + payload
        self.valid = option(_MAX_AGE - _OBSERVE, uint(max_age))


class FastObserve:
    """The fast observations of one proxy site; see the module docstring. ``send(data,
    observer)`` puts a datagram on the wire (False if the send failed) and ``next_mid()``
    gives a message ID of aiocoap's sequence: :class:`proxy.fastpath.FastPath` supplies both."""

    def __init__(
        self,
        proxy: Proxy,
        send: Callable[[bytes, Observer], bool],
        next_mid: Callable[[], int],
    ) -> None:
        self.proxy = proxy
        self.send = send
        self.next_mid = next_mid
        self._holders = itertools.count(-1, -1)
        #: By (host, token), and by resource id.
        self.by_key: dict[Key, Observer] = {}
        self._by_resource: dict[str, dict[Key, Observer]] = {}
        #: (host, message ID) of recent answers and notifications: the observation a RST ends.
        self._by_mid: dict[tuple[str, int], Observer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: CON notifications: the one in flight per host, and those waiting behind it (NSTART 1).
        self._inflight: dict[str, _Exchange] = {}
        self._backlog: dict[str, deque[_Exchange]] = {}
        self.closed = False
        proxy.on_new_object.append(self.notify)

    def __repr__(self) -> str:
        return f"FastObserve(observers={len(self.by_key)})"

    def __len__(self) -> int:
        return len(self.by_key)

    @property
    def pending(self) -> bool:
        """Whether CON notifications are in flight (their ACKs are this layer's)."""
        return bool(self._inflight)

    # --- registration ---

    def register(self, observer: Observer, entry: Entry) -> bool:
        """Admit and attach ``observer`` as the slow path would (the registration's hit is the
        caller's to count and answer); False if a limit declined it (then nothing is held and
        the GET is answered without Observe). A live observation on the same key ends first."""
        if self.closed:
            return False
        relays = self.proxy.relays
        key = (observer.host, observer.token)
        old = self.by_key.get(key)
        if old is not None:
            self.end(old)
        if not relays.admit(observer.holder, client_of(None, observer.host)):
            return False
        try:
            attached = relays.attach(
                observer.holder, observer.resource_id, observer.upstream, entry
            )
        except BaseException:  # nothing held if it fails (the datagram then goes to aiocoap)
            relays.release(observer.holder)
            raise
        if not attached:
            relays.release(observer.holder)
            return False
        self.by_key[key] = observer
        self._by_resource.setdefault(observer.resource_id, {})[key] = observer
        self._count()
        return True

    def new_holder(self) -> int:
        return next(self._holders)

    def first(self, observer: Observer, entry: Entry, now: float) -> bytes:
        """The registration's answer (``Observe: 0``) to an observer :meth:`register` took: a
        NON, or for a CON registration the ACK with its message ID (kept for a repeat)."""
        encoded = _Encoded(entry, _max_age(entry, now), self.proxy)
        if not observer.con:
            return self._encode(observer, entry, encoded)[0]
        answer = self._encode(observer, entry, encoded, ack=observer.mid)[0]
        observer.answer = answer
        return answer

    # --- ends ---

    def end(self, observer: Observer) -> None:
        """End ``observer``'s observation (idempotent) and give back what it held."""
        if observer.ended:
            return
        observer.ended = True
        key = (observer.host, observer.token)
        if self.by_key.get(key) is observer:
            del self.by_key[key]
        watchers = self._by_resource.get(observer.resource_id)
        if watchers is not None and watchers.get(key) is observer:
            del watchers[key]
            if not watchers:
                del self._by_resource[observer.resource_id]
        for mid in observer.sent:
            if self._by_mid.get((observer.host, mid)) is observer:
                del self._by_mid[(observer.host, mid)]
        self.proxy.relays.release(observer.holder)
        self._count()

    def request_on(self, host: str, token: bytes, mid: int) -> bytes | None:
        """A request came from ``host`` on ``token``: it ends a fast observation on that token,
        as a new request ends aiocoap's (None: the request is answered as any other). A repeat
        of the registration's message is a duplicate: the observation goes on, and the answer
        is ``b""`` (NON: dropped) or the registration's ACK again (CON), as aiocoap does."""
        observer = self.by_key.get((host, token))
        if observer is None:
            return None
        if mid == observer.mid:
            return observer.answer
        self.end(observer)
        return None

    def reset(self, host: str, mid: int) -> bool:
        """A RST from ``host`` for message ``mid``: True if it ended a fast observation (a
        CON's exchange, or a recent NON's)."""
        exchange = self._inflight.get(host)
        if exchange is not None and exchange.mid == mid:
            self._done(host, exchange)
            self.end(exchange.observer)
            return True
        observer = self._by_mid.get((host, mid))
        if observer is None:
            return False
        self.end(observer)
        return True

    def ack(self, host: str, mid: int) -> bool:
        """An empty ACK from ``host``: True if it acknowledged a fast CON notification (the next
        one waiting for that host goes out)."""
        exchange = self._inflight.get(host)
        if exchange is None or exchange.mid != mid:
            return False
        self._done(host, exchange)
        return True

    def gone(self, host: str) -> None:
        """An error for ``host`` (ICMP, a failed send, a CON's last timeout): its fast
        observations end, and its CON notifications in flight or waiting are dropped."""
        exchange = self._inflight.pop(host, None)
        if exchange is not None and exchange.handle is not None:
            exchange.handle.cancel()
        self._backlog.pop(host, None)
        for observer in [o for o in self.by_key.values() if o.host == host]:
            self.end(observer)

    def close(self) -> None:
        """The server shuts down: every fast observation ends (nothing is sent, as aiocoap)."""
        self.closed = True
        for exchange in self._inflight.values():
            if exchange.handle is not None:
                exchange.handle.cancel()
        self._inflight.clear()
        self._backlog.clear()
        for observer in list(self.by_key.values()):
            self.end(observer)
        for task in self._tasks:
            task.cancel()

    # --- notifications ---

    def notify(self, resource_id: str) -> None:
        """A new object of ``resource_id``: notify its fast observers."""
        watchers = self._by_resource.get(resource_id)
        if not watchers or self.closed:
            return
        observers = list(watchers.values())
        proxy = self.proxy
        entry = proxy.cache.in_memory(resource_id)
        now = proxy.now()
        if (
            entry is None
            or not now < entry.fresh_until
            or now > entry.exp
            or not proxy.readable(entry)
        ):
            for observer in observers:  # rendered as the slow path renders it: a lookup
                task = asyncio.get_running_loop().create_task(self._looked_up(observer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        encoded = _Encoded(entry, _max_age(entry, now), self.proxy)
        stats = proxy.stats
        for observer in observers:
            stats.hits += 1
            stats.fast_hits += 1
            self._send_notification(observer, entry, encoded)

    async def _looked_up(self, observer: Observer) -> None:
        try:
            entry = await self.proxy.lookup(observer.resource_id, observer.upstream)
        except Unavailable as exc:  # the site's answer: the code, Max-Age 1
            high, low = exc.code.split(".")
            self._last(observer, int(high) << 5 | int(low), option(_MAX_AGE, b"\x01"))
            return
        except Exception:  # aiocoap answers a rendering that raised with a bare 5.00
            log.exception("a notification of %s failed", observer.resource_id)
            self._last(observer, 0xA0, b"")
            return
        if not observer.ended:
            try:
                encoded = _Encoded(entry, _max_age(entry, self.proxy.now()), self.proxy)
            except BodyError:  # its body gone from the disk: forgotten, fetched again next time
                self.proxy.lost(entry)
                self._last(observer, 0xA3, option(_MAX_AGE, b"\x01"))  # 5.03
                return
            self._send_notification(observer, entry, encoded)

    def _last(self, observer: Observer, code: int, options: bytes) -> None:
        """An unsuccessful notification (no Observe): the observation's last."""
        if observer.ended:
            return
        mid = self.next_mid()
        first = (0x40 if observer.con else 0x50) | len(observer.token)
        data = bytes((first, code, mid >> 8, mid & 0xFF)) + observer.token + options
        self._transmit(observer, mid, data)
        self.end(observer)

    def _send_notification(self, observer: Observer, entry: Entry, encoded: _Encoded) -> None:
        observer.number = (observer.number + 1) & _OBSERVE_MASK
        data, mid = self._encode(observer, entry, encoded)
        self._transmit(observer, mid, data)

    def _encode(
        self, observer: Observer, entry: Entry, encoded: _Encoded, ack: int | None = None
    ) -> tuple[bytes, int]:
        """An answer or notification with ``observer``'s current Observe number, and its
        message ID: the ACK of message ``ack``, else a NON or (CON registration) a CON with a
        message ID of aiocoap's sequence."""
        valid = entry.etag in observer.etags
        token = observer.token
        if ack is not None:
            first, mid = 0x60, ack
        else:
            first, mid = (0x40 if observer.con else 0x50), self.next_mid()
            self._sent(observer, mid)
        data = b"".join(
            (
                bytes((first | len(token), _VALID if valid else _CONTENT, mid >> 8, mid & 0xFF)),
                token,
                encoded.etag,
                option(_OBSERVE - _ETAG, uint(observer.number)),
                encoded.valid if valid else encoded.content,
            )
        )
        return data, mid

    # --- the message layer of CON notifications (aiocoap's MessageManager, for these) ---

    def _transmit(self, observer: Observer, mid: int, data: bytes) -> None:
        """Send a NON at once; a CON as an exchange, behind the one in flight to its host."""
        if not observer.con:
            self.send(data, observer)
            return
        tuning = TransportTuning()  # as aiocoap: its defaults, or what a test set on the class
        low, high = tuning.ACK_TIMEOUT, tuning.ACK_TIMEOUT * tuning.ACK_RANDOM_FACTOR
        timeout = random.uniform(low, high)  # noqa: S311 (retransmission jitter, not a secret)
        exchange = _Exchange(observer, mid, data, timeout)
        if observer.host in self._inflight:
            self._backlog.setdefault(observer.host, deque()).append(exchange)
            return
        self._start(exchange)

    def _start(self, exchange: _Exchange) -> None:
        host = exchange.observer.host
        self._inflight[host] = exchange
        exchange.handle = asyncio.get_running_loop().call_later(
            exchange.timeout, self._retransmit, exchange
        )
        self.send(exchange.data, exchange.observer)  # a failure ends it (gone)

    def _retransmit(self, exchange: _Exchange) -> None:
        host = exchange.observer.host
        if self._inflight.get(host) is not exchange:
            return
        if exchange.tries < TransportTuning().MAX_RETRANSMIT:
            exchange.tries += 1
            exchange.timeout *= 2
            exchange.handle = asyncio.get_running_loop().call_later(
                exchange.timeout, self._retransmit, exchange
            )
            self.send(exchange.data, exchange.observer)
            return
        log.info("a notification to %s was never acknowledged: its observations end", host)
        self.gone(host)  # as aiocoap: every observation of that peer ends

    def _done(self, host: str, exchange: _Exchange) -> None:
        """``exchange`` was acknowledged or reset: the next one waiting for ``host`` goes."""
        if exchange.handle is not None:
            exchange.handle.cancel()
        del self._inflight[host]
        waiting = self._backlog.get(host)
        if waiting:
            self._start(waiting.popleft())
        if not waiting:
            self._backlog.pop(host, None)

    def _sent(self, observer: Observer, mid: int) -> None:
        if len(observer.sent) >= RECENT_MIDS:
            oldest = observer.sent[0]
            if self._by_mid.get((observer.host, oldest)) is observer:
                del self._by_mid[(observer.host, oldest)]
            observer.sent = observer.sent[1:]
        observer.sent += (mid,)
        self._by_mid[(observer.host, mid)] = observer

    def _count(self) -> None:
        # A gauge beside ``observers`` (which counts these too, through Relays.admit).
        self.proxy.stats.fast_observers = len(self.by_key)


def _max_age(entry: Entry, now: float) -> int:
    """What the site's ``_get`` puts in Max-Age: what is left of the freshness, never past exp."""
    return int(max(0.0, min(entry.fresh_until - now, entry.exp - now)))
