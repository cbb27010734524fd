"""Observers of the producer's resources (RFC 7641): bounded, confirmable, newest value wins.

An Observe registration costs the producer about 9 KiB of aiocoap state and, for as long as it
lasts, a notification per new object, to an address nobody checked: a spoofed source could make
the producer stream objects to a victim. So:

- **Bounded.** At most ``max_total`` observations at once, and at most ``max_per_address`` from
  one IP address (any port): :class:`ObserverLimits`. A registration beyond either bound is
  answered as the GET it also is — the current object, without an Observe option, which tells
  the client it is not observing (RFC 7641 §4.1) — and keeps nothing.
- **Confirmable.** Every notification is a CON message. An observer that does not acknowledge
  it (after aiocoap's retransmissions, about 93 s at most), answers it with a RST, or whose
  address answers with an ICMP error, is dropped. A source that never asked (a spoofed one) thus
  receives one notification, retransmitted at most four times, and then nothing; RFC 7641 §4.5
  also asks for a CON at least every 24 hours, which this more than meets.
- **One in flight, newest wins.** While a CON to an observer's address is unacknowledged, no
  further notification is queued for that observation; when it is acknowledged, the observer
  gets the newest object, not every one in between (RFC 7641 §4.5.2: "eventual consistency").
  aiocoap alone would queue a CON per new value per observer behind the unacknowledged one
  (NSTART = 1) for as long as the retransmissions last.

What it does not do: verify the address of a registration before the first answer (RFC 9175
Echo). That answer is the one a GET gets anyway; the Echo round trip would have to be answered by
every client, the proxy's upstream observation included. It also changes nothing for a plain GET.

``aiocoap``'s message layer is looked into for one thing only, whether a CON to an address is
still unacknowledged (:func:`con_outstanding`); if this aiocoap version keeps that elsewhere,
notifications go out as aiocoap queues them, still bounded by the observers' bounds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ObserverLimits", "con_outstanding", "remote_host", "serve_observation"]

log = logging.getLogger("oscar.producer")

#: Seconds between two log lines about refused registrations (an attacker could send many).
REFUSAL_LOG_INTERVAL = 60.0
#: Observe numbers are 24-bit (RFC 7641 §3.4, §4.4).
_OBSERVE_MASK = 0xFFFFFF


def remote_host(remote: Any) -> str:
    """The IP address of a remote (without the port), as the per-address bound counts it."""
    sockaddr = getattr(remote, "sockaddr", None)
    if isinstance(sockaddr, tuple) and sockaddr:
        host = str(sockaddr[0])
        return host.removeprefix("::ffff:") if "." in host else host
    return str(getattr(remote, "hostinfo", remote)).rpartition(":")[0].strip("[]")


def con_outstanding(remote: Any) -> bool:
    """Whether a CON message to ``remote`` awaits its ACK (or waits behind one) in aiocoap's
    message layer. False when this cannot be told (then notifications are not held back)."""
    interface = getattr(remote, "interface", None)
    manager = getattr(interface, "_ctx", None)
    backlogs = getattr(manager, "_backlogs", None)
    return isinstance(backlogs, dict) and remote in backlogs


class ObserverLimits:
    """Counts the observations held, in all and per IP address; refuses beyond the bounds."""

    def __init__(
        self, max_total: int, max_per_address: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.refused = 0
        self.notifications = 0
        self._by_host: dict[str, int] = {}
        self._clock = clock
        self._logged_at: float | None = None

    def __repr__(self) -> str:
        return f"ObserverLimits({self.total}/{self.max_total}, refused={self.refused})"

    def admit(self, host: str) -> bool:
        """Take a place for an observation from ``host``; False (and nothing kept) if full."""
        held = self._by_host.get(host, 0)
        if self.total >= self.max_total or held >= self.max_per_address:
            self.refused += 1
            now = self._clock()
            if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_INTERVAL:
                self._logged_at = now
                log.warning(
                    "observers: %d held (at most %d, %d per address), %d from %s; "
                    "registrations beyond that are answered without Observe (%d so far)",
                    self.total,
                    self.max_total,
                    self.max_per_address,
                    held,
                    host,
                    self.refused,
                )
            return False
        self._by_host[host] = held + 1
        self.total += 1
        return True

    def release(self, host: str) -> None:
        held = self._by_host.get(host, 0)
        if held <= 1:
            self._by_host.pop(host, None)
        else:
            self._by_host[host] = held - 1
        self.total -= 1

    def held_by(self, host: str) -> int:
        return self._by_host.get(host, 0)


async def _until_acknowledged(remote: Any) -> None:
    """Wait while a CON to ``remote`` is unacknowledged (polling: aiocoap tells nobody)."""
    delay = 0.02
    while con_outstanding(remote):
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def serve_observation(
    pipe: Any,
    render: Callable[[Any], Awaitable[Any]],
    watchers: set[asyncio.Event],
    limits: ObserverLimits,
) -> None:
    """Answer an Observe registration on ``pipe`` and send its notifications until the observer
    goes (aiocoap then cancels this task), the object expires (the unsuccessful answer ends the
    observation) or the producer stops. ``render`` makes a response to the request; each event
    in ``watchers`` is set when the resource has a new object."""
    from aiocoap.numbers.types import CON

    request = pipe.request
    host = remote_host(request.remote)
    if not limits.admit(host):
        pipe.add_response(await render(request), is_last=True)  # a GET's answer, no Observe
        return
    changed = asyncio.Event()
    watchers.add(changed)
    held = True

    def release() -> None:
        nonlocal held
        if held:
            held = False
            watchers.discard(changed)
            limits.release(host)
            changed.set()  # a task whose cancellation was lost ends at its next step

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
        while held:
            await changed.wait()
            await _until_acknowledged(remote)  # newest wins: changes meanwhile fold into one
            changed.clear()
            if not held:
                return
            response = await render(request)
            if not response.code.is_successful():
                pipe.add_response(response, is_last=True)
                return
            number = (number + 1) & _OBSERVE_MASK
            response.opt.observe = number
            response.mtype = CON
            limits.notifications += 1
            pipe.add_response(response, is_last=False)
    finally:
        release()
