"""Observers of the producer's resources (RFC 7641): bounded, proven, confirmable, newest wins.

An Observe registration costs the producer about 9 KiB of aiocoap state and, for as long as it
lasts, a notification per new object, to an address nobody checked: a spoofed source could make
the producer stream objects to a victim, or fill every place so that real observers are turned
away. So:

- **Bounded.** At most ``max_total`` observations at once, and at most ``max_per_address`` from
  one peer (:func:`oscar_io.peers.peer_key`: an IPv4 address or an IPv6 /64, any port):
  :class:`ObserverLimits`. A registration beyond a bound that no unproven observer can make room
  for is answered as the GET it also is — the current object, without an Observe option, which
  tells the client it is not observing (RFC 7641 §4.1) — and keeps nothing.
- **Proven.** Right after the answer to its registration, an observer gets the current object
  once more as a CON notification. Until it acknowledges one CON notification it is
  *unconfirmed*: a spoofed source (the victim never asked) acknowledges nothing, answers with a
  RST or an ICMP error. When a bound is reached, a new registration takes the place of the
  oldest unconfirmed observer (of the same peer for the per-peer bound); that one is told with a
  5.03 (NON, no payload, Max-Age :data:`RETRY_AFTER`) and its observation ends. A confirmed
  observer is never displaced by a newcomer. Spoofed registrations thus cannot keep real
  observers out: a real one is confirmed one round trip after it registered.
- **Confirmable.** Every notification is a CON message. An observer that does not acknowledge
  it (after aiocoap's retransmissions, about 93 s at most), answers it with a RST, or whose
  address answers with an ICMP error, is dropped. A source that never asked thus receives, per
  registration made in its name: the answer, one CON notification (retransmitted at most four
  times) and, if displaced, one 5.03 — then nothing; RFC 7641 §4.5's CON at least every 24 hours
  is more than met.
- **One in flight, newest wins.** While a CON to an observer's address is unacknowledged, no
  further notification is queued for that observation (the proof included); when it is
  acknowledged, the observer gets the newest object, not every one in between (RFC 7641 §4.5.2).
  aiocoap alone would queue a CON per new value per observer behind the unacknowledged one
  (NSTART = 1) for as long as the retransmissions last.

What it does not do: verify the address of a registration before the first answer (RFC 9175
Echo). That answer is the one a GET gets anyway; the Echo round trip would have to be answered by
every client, the proxy's upstream observation included. It also changes nothing for a plain GET.

``aiocoap``'s message layer is looked into for one thing only, whether a CON to an address is
still unacknowledged (:func:`con_outstanding`), and only in the aiocoap versions this was
checked against (:data:`CHECKED_VERSIONS`). Elsewhere it logs one warning; notifications then go
out as aiocoap queues them, and no observer is ever confirmed (each may be displaced by a
newcomer when the bounds are reached; the bounds still hold).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from oscar_io.peers import peer_key

__all__ = [
    "CHECKED_VERSIONS",
    "ObserverLimits",
    "Place",
    "con_outstanding",
    "peer_key",
    "serve_observation",
    "withdraw",
]

log = logging.getLogger("oscar.producer")

#: Seconds between two log lines about refused registrations (an attacker could send many).
REFUSAL_LOG_INTERVAL = 60.0
#: Max-Age of the 5.03 that tells a displaced (unconfirmed) observer to register again later.
RETRY_AFTER = 5
#: Observe numbers are 24-bit (RFC 7641 §3.4, §4.4).
_OBSERVE_MASK = 0xFFFFFF
#: aiocoap versions whose message manager keeps unacknowledged CONs in ``_backlogs`` by remote.
CHECKED_VERSIONS = frozenset({"0.4.17"})

_internals: bool | None = None  # whether con_outstanding can tell (decided once, logged once)


def _internals_known(manager: Any) -> bool:
    global _internals
    if _internals is None:
        from aiocoap import meta

        backlogs = getattr(manager, "_backlogs", None)
        _internals = meta.version in CHECKED_VERSIONS and isinstance(backlogs, dict)
        if not _internals:
            log.warning(
                "observers: aiocoap %s is not one this producer was checked with (%s): "
                "notifications are not held back while one is unacknowledged, and no observer "
                "counts as confirmed",
                meta.version,
                ", ".join(sorted(CHECKED_VERSIONS)),
            )
    return _internals


def con_outstanding(remote: Any) -> bool | None:
    """Whether a CON message to ``remote`` awaits its ACK (or waits behind one) in aiocoap's
    message layer; None when this aiocoap cannot be looked into (see the module docstring)."""
    manager = getattr(getattr(remote, "interface", None), "_ctx", None)
    if not _internals_known(manager):
        return None
    backlogs = getattr(manager, "_backlogs", None)
    if not isinstance(backlogs, dict):
        return None
    return remote in backlogs


def withdraw(message: Any) -> None:
    """Stop retransmitting a CON ``message`` that is no longer wanted (its observer was
    displaced): aiocoap would otherwise keep it, and send it again, for up to ~93 s, so a flood
    of registrations would hold one exchange per registration. Nothing when this aiocoap cannot
    be looked into."""
    remote = getattr(message, "remote", None)
    manager: Any = getattr(getattr(remote, "interface", None), "_ctx", None)
    if remote is None or not _internals_known(manager):
        return
    exchanges = getattr(manager, "_active_exchanges", None)
    backlogs = getattr(manager, "_backlogs", None)
    if not isinstance(exchanges, dict) or not isinstance(backlogs, dict):
        return
    waiting = backlogs.get(remote)
    if waiting:
        backlogs[remote] = [entry for entry in waiting if entry[0] is not message]
    entry = exchanges.pop((remote, message.mid), None)
    if entry is not None:
        entry[1].cancel()  # the retransmission timer
        if remote in backlogs:
            manager._continue_backlog(remote)  # the next CON to that address, if any


class Place:
    """One observation's place within the bounds."""

    __slots__ = ("acknowledged", "confirmed", "displace", "key")

    def __init__(self, key: str, displace: Callable[[], None]) -> None:
        self.key = key
        self.confirmed = False
        #: Ends the observation (it must call :meth:`ObserverLimits.release`).
        self.displace = displace
        #: Once a CON notification is out: whether it has been acknowledged by now (asked before
        #: this place is displaced, so an ACK counts from the moment it arrives).
        self.acknowledged: Callable[[], bool] | None = None


class ObserverLimits:
    """Counts the observations held, in all and per peer; beyond a bound, displaces the oldest
    unconfirmed observation in its scope or refuses (module docstring)."""

    def __init__(
        self, max_total: int, max_per_address: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.refused = 0
        self.displaced = 0
        self.notifications = 0
        self._by_key: dict[str, int] = {}
        #: Unconfirmed places, oldest first: in all, and by peer.
        self._unconfirmed: OrderedDict[Place, None] = OrderedDict()
        self._unconfirmed_by_key: dict[str, OrderedDict[Place, None]] = {}
        self._clock = clock
        self._logged_at: float | None = None

    def __repr__(self) -> str:
        return (
            f"ObserverLimits({self.total}/{self.max_total}, unconfirmed={self.unconfirmed}, "
            f"refused={self.refused}, displaced={self.displaced})"
        )

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def admit(self, key: str, displace: Callable[[], None]) -> Place | None:
        """A place for an observation from peer ``key`` (unconfirmed), displacing the oldest
        unconfirmed one in the scope of a bound that is reached; None (and nothing kept) if a
        bound is reached and only confirmed observations hold it."""
        if self.max_total <= 0 or self.max_per_address <= 0:
            return self._refuse(key)
        if self._by_key.get(key, 0) >= self.max_per_address:
            oldest = self._oldest_unconfirmed(self._unconfirmed_by_key.get(key))
            if oldest is None:
                return self._refuse(key)
            self._displace(oldest)
        if self.total >= self.max_total:
            oldest = self._oldest_unconfirmed(self._unconfirmed)
            if oldest is None:
                return self._refuse(key)
            self._displace(oldest)
        place = Place(key, displace)
        self._by_key[key] = self._by_key.get(key, 0) + 1
        self.total += 1
        self._unconfirmed[place] = None
        self._unconfirmed_by_key.setdefault(key, OrderedDict())[place] = None
        return place

    def confirm(self, place: Place) -> None:
        """The observer acknowledged a notification: it is never displaced by a newcomer."""
        if not place.confirmed:
            place.confirmed = True
            self._forget_unconfirmed(place)

    def release(self, place: Place) -> None:
        """The observation ended: its place is free (call once per place)."""
        held = self._by_key.get(place.key, 0)
        if held <= 1:
            self._by_key.pop(place.key, None)
        else:
            self._by_key[place.key] = held - 1
        self.total -= 1
        self._forget_unconfirmed(place)

    def held_by(self, key: str) -> int:
        return self._by_key.get(key, 0)

    def _forget_unconfirmed(self, place: Place) -> None:
        self._unconfirmed.pop(place, None)
        mine = self._unconfirmed_by_key.get(place.key)
        if mine is not None:
            mine.pop(place, None)
            if not mine:
                del self._unconfirmed_by_key[place.key]

    def _oldest_unconfirmed(self, places: OrderedDict[Place, None] | None) -> Place | None:
        """The oldest of ``places`` still unconfirmed; those found acknowledged are confirmed
        on the way (each place is looked at once before it is confirmed or displaced)."""
        while places:
            place = next(iter(places))
            if place.acknowledged is None or not place.acknowledged():
                return place
            self.confirm(place)
        return None

    def _displace(self, place: Place) -> None:
        self.displaced += 1
        before = self.total
        place.displace()
        if self.total == before:  # a displace that did not release: never lose the bound
            self.release(place)

    def _refuse(self, key: str) -> Place | None:
        self.refused += 1
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_INTERVAL:
            self._logged_at = now
            log.warning(
                "observers: %d held (at most %d, %d per address), %d from %s, all confirmed; "
                "registrations beyond that are answered without Observe (%d so far)",
                self.total,
                self.max_total,
                self.max_per_address,
                self.held_by(key),
                key,
                self.refused,
            )
        return None


async def _until_acknowledged(remote: Any) -> bool:
    """Wait while a CON to ``remote`` is unacknowledged (polling: aiocoap tells nobody).
    False if this aiocoap cannot tell."""
    delay = 0.02
    while outstanding := con_outstanding(remote):
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    return outstanding is not None


async def serve_observation(
    pipe: Any,
    render: Callable[[Any], Awaitable[Any]],
    watchers: set[asyncio.Event],
    limits: ObserverLimits,
) -> None:
    """Answer an Observe registration on ``pipe`` and send its notifications until the observer
    goes (aiocoap then cancels this task), it is displaced, the object expires (the unsuccessful
    answer ends the observation) or the producer stops. ``render`` makes a response to the
    request; each event in ``watchers`` is set when the resource has a new object."""
    from aiocoap import Message
    from aiocoap.numbers.codes import Code
    from aiocoap.numbers.types import CON, NON

    request = pipe.request
    changed = asyncio.Event()
    held = False
    in_flight: Any = None  # the last CON notification sent (withdrawn if displaced)

    def release() -> None:
        nonlocal held
        if held:
            held = False
            watchers.discard(changed)
            limits.release(place)
            changed.set()  # a task whose cancellation was lost ends at its next step

    def displace() -> None:
        """A newcomer needs this (unconfirmed) place: free it and end the observation."""
        release()
        if in_flight is not None:
            withdraw(in_flight)
        farewell = Message(code=Code.SERVICE_UNAVAILABLE, max_age=RETRY_AFTER)
        farewell.mtype = NON  # nothing to retransmit towards an address that may be a victim
        pipe.add_response(farewell, is_last=True)

    admitted = limits.admit(peer_key(request.remote), displace)
    if admitted is None:
        pipe.add_response(await render(request), is_last=True)  # a GET's answer, no Observe
        return
    place = admitted
    held = True
    watchers.add(changed)
    # The observer's interest ended (RST, ICMP error, a new request on its token): its place is
    # free at once, whether or not aiocoap's cancellation of this task arrives.
    pipe.on_interest_end(release)
    try:
        response = await render(request)
        if not held:
            return
        if not response.code.is_successful():
            pipe.add_response(response, is_last=True)
            return
        number = 0
        response.opt.observe = number
        pipe.add_response(response, is_last=False)
        remote = request.remote.as_response_address()
        changed.set()  # the proof: the current object once more, as a CON notification
        while held:
            await changed.wait()
            await _until_acknowledged(remote)  # newest wins: changes meanwhile fold into one
            changed.clear()
            if not held:
                return
            response = await render(request)
            if not held:
                return
            if not response.code.is_successful():
                pipe.add_response(response, is_last=True)
                return
            number = (number + 1) & _OBSERVE_MASK
            response.opt.observe = number
            response.mtype = CON
            limits.notifications += 1
            in_flight = response
            pipe.add_response(response, is_last=False)
            if place.acknowledged is None:
                place.acknowledged = lambda: held and con_outstanding(remote) is False
            if not place.confirmed and held and await _until_acknowledged(remote) and held:
                limits.confirm(place)  # acknowledged: neither timed out nor refused (RST)
    finally:
        release()
