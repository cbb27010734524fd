"""Which AS instance a device asks, and in which order: the bookkeeping behind
:class:`~oscar_io.asclient.AsClient`'s failover over the AS URIs of its bundle (``as_uris``).

Rules (docs/PROTOCOL.md, "The credentials bundle and failover"):

- Requests go to the **current** AS, at first the preferred one (the bundle's first URI).
- One that does not answer is **failed**: the next in the list is asked at once (each AS at most
  once per call), and a failed AS goes last in the order until it answers again; among failed
  ones, the one that failed longest ago comes first (so that a caller that asks one AS per
  attempt, as the ``/keys`` observation does, goes round them all instead of asking the same
  dead one again while another is back). The AS that answers becomes current.
- One that answers 5.03 or 4.29 with a Max-Age is **busy** until that many seconds have passed
  (at most :data:`MAX_BUSY`): nobody asks it before. Without a Max-Age it is not remembered as
  busy (the call still moves on to the next).
- **Coming back**: :attr:`Failover.come_back` seconds after the client left the preferred AS,
  the next call asks the preferred one first again; if it still does not answer, the client stays
  where it is for another ``come_back`` seconds.

Each move of the current AS is one info line on ``oscar.asclient`` (URIs only). The clock comes
in as an argument (tests pin it). What this module does not do: send anything, hold a DTLS
context (the client keeps one per AS in :class:`AsInstance`), or decide timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["COME_BACK", "MAX_BUSY", "AsInstance", "Failover"]

log = logging.getLogger("oscar.asclient")

#: Seconds after leaving the preferred AS before the client tries it first again.
COME_BACK = 300.0
#: The longest a Max-Age keeps an AS marked busy: an AS (or someone in the path) cannot shut a
#: device out of it for longer with one answer.
MAX_BUSY = 60.0


class AsInstance:
    """One listed AS: its URI and what the client holds for it."""

    __slots__ = (
        "busy_code",
        "busy_until",
        "connection",
        "ctx",
        "failed",
        "failed_turn",
        "lock",
        "suspect",
        "uri",
    )

    def __init__(self, uri: str) -> None:
        self.uri = uri
        #: The aiocoap client context (DTLS) for this AS, made on first use.
        self.ctx: Any = None
        #: The DTLS connection of its last answer: aiocoap keeps a client connection only while
        #: something refers to it; without this, every request would handshake anew.
        self.connection: Any = None
        #: Monotonic time until which it is busy (its Max-Age), and the code it said so with.
        self.busy_until = 0.0
        self.busy_code: str | None = None
        #: Its last attempt got no answer (it goes last in the order until one comes).
        self.failed = False
        #: When its last attempt failed, as a count of the failures seen (orders failed ones).
        self.failed_turn = 0
        #: Its context saw an attempt fail: a new one is made before it is asked again (cleared
        #: when the new one is made, so that concurrent callers do not throw it away in turn).
        self.suspect = False
        self.lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"AsInstance({self.uri})"


class Failover:
    """The listed AS instances, the current one, who is busy until when, when to come back."""

    def __init__(
        self,
        uris: Sequence[str],
        *,
        come_back: float = COME_BACK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not uris:
            raise ValueError("at least one AS URI")
        self.instances = [AsInstance(uri) for uri in uris]
        self.come_back = come_back
        self._clock = clock
        self.current = 0
        self._failures = 0
        #: When the client last left (or failed to come back to) the preferred AS.
        self._left_at: float | None = None

    def __repr__(self) -> str:
        return f"Failover(current={self.instances[self.current].uri}, of={len(self.instances)})"

    @property
    def several(self) -> bool:
        return len(self.instances) > 1

    def order(self) -> list[int]:
        """The instances to try for one call, in order: the preferred one when it is time to come
        back to it, then the current one and the next ones in the list, those whose last attempt
        failed last (the one that failed longest ago first); busy ones left out."""
        now = self._clock()
        count = len(self.instances)
        back = self.current != 0 and self._left_at is not None
        back = back and now - self._left_at >= self.come_back  # type: ignore[operator]
        cyclic = [(self.current + k) % count for k in range(count)]
        if back:
            cyclic.remove(0)
        fresh = [i for i in cyclic if not self.instances[i].failed]
        failed = sorted(
            (i for i in cyclic if i not in fresh), key=lambda i: self.instances[i].failed_turn
        )
        ordered = ([0] if back else []) + fresh + failed
        return [i for i in ordered if self.instances[i].busy_until <= now]

    def answered(self, index: int) -> None:
        """``index`` answered (anything but busy): it becomes the current AS."""
        self.instances[index].failed = False
        if index != self.current:
            self._move(index)

    def failed(self, index: int) -> None:
        """``index`` did not answer: it goes last in :meth:`order` until it answers again."""
        self._failures += 1
        self.instances[index].failed = True
        self.instances[index].failed_turn = self._failures
        self.instances[index].suspect = True
        if index == 0 and self.current != 0:
            self._left_at = self._clock()  # the preferred one is still away: stay longer

    def busy(self, index: int, max_age: int | None, code: str | None) -> None:
        """``index`` answered 5.03 or 4.29 with Max-Age ``max_age`` (None: no Max-Age): left
        out of :meth:`order` until then."""
        instance = self.instances[index]
        instance.failed = False
        if max_age is not None:
            instance.busy_until = self._clock() + min(float(max_age), MAX_BUSY)
            instance.busy_code = code

    def retry_after(self) -> float | None:
        """Seconds until the first busy instance may be asked again; None when none is busy."""
        now = self._clock()
        waits = [i.busy_until - now for i in self.instances if i.busy_until > now]
        return None if not waits else max(1.0, float(math.ceil(min(waits))))

    def busy_code(self) -> str | None:
        """The code of the busy instance that is free first (for an error that sends nothing)."""
        now = self._clock()
        busy = [i for i in self.instances if i.busy_until > now]
        return min(busy, key=lambda i: i.busy_until).busy_code if busy else None

    def _move(self, index: int) -> None:
        old = self.instances[self.current]
        if self.current == 0:
            self._left_at = self._clock()
        elif index == 0:
            self._left_at = None
        if old.busy_until > self._clock():
            why = f"busy, {old.busy_code}"
        elif old.failed:
            why = "no answer"
        else:
            why = "the preferred AS again" if index == 0 else "moved"
        self.current = index
        log.info("AS %s now, was %s (%s)", self.instances[index].uri, old.uri, why)
