"""The consumer's one error of its own (:class:`StaleCopy`), and the names of the errors it raises
from the layers below, so that ``from consumer import TransportError`` is all a caller needs.

The tree, with the CLI's exit status of each, is drawn in :mod:`consumer` (the package
docstring). ``AccessDenied`` is the AS client's (:class:`oscar_io.errors.AccessDenied`: the AS
refused this device what it asked for); the transport errors are the runtime's
(:mod:`oscar_io.coaperrors`, which also translates aiocoap's failures); ``InvalidObject`` is the
core's. No message ever holds a secret, a PSK or plaintext: they name the peer and what failed.
"""

from __future__ import annotations

from oscar.errors import InvalidObject
from oscar_io.coaperrors import NotFound, Refused, TimedOut, TransportError, Unreachable
from oscar_io.errors import AccessDenied

__all__ = [
    "AccessDenied",
    "NotFound",
    "Refused",
    "StaleCopy",
    "TimedOut",
    "TransportError",
    "Unreachable",
]


class StaleCopy(InvalidObject):
    """A valid object (certificate, signature, expiry all checked) that is older than the newest
    this consumer accepted of the resource: a cache still holds an older copy (a proxy, within its
    Max-Age), or someone replays one. It is never accepted (DESIGN §4); unlike another rejection,
    it is not an attack on its own, and :meth:`consumer.Consumer.get` answers it with the newest
    reading the consumer holds when that is still valid.

    ``served`` and ``seen`` are the (epoch, seq) of the object and of the newest accepted;
    ``fresh_in`` is the answer's Max-Age (seconds until a cache on the path asks its origin
    again) when it came over CoAP; ``peer`` who served it.
    """

    kind = "stale copy"

    def __init__(
        self,
        resource_id: str,
        served: tuple[int, int],
        seen: tuple[int, int],
        *,
        peer: str | None = None,
        fresh_in: int | None = None,
    ) -> None:
        super().__init__("older than the newest object accepted (a stale copy or a replay)")
        self.resource_id = resource_id
        self.served = served
        self.seen = seen
        self.peer = peer
        self.fresh_in = fresh_in

    def describe(self) -> str:
        """One line: what was served, what this consumer has seen, when the cache is fresh."""
        who = self.peer or "the source"
        text = (
            f"{who} served {self.resource_id} epoch {self.served[0]} seq {self.served[1]}, older "
            f"than epoch {self.seen[0]} seq {self.seen[1]} this consumer accepted before: a "
            "cached copy not yet refreshed (or a replay), not accepted"
        )
        if self.fresh_in is not None:
            text += f"; a cache on the path refreshes it within {self.fresh_in} s (its Max-Age)"
        return text
