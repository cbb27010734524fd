"""What the consumer needs from aiocoap, in its own terms: one exchange as sent, and bounded
block-wise assembly.

What this module does not do: check or open objects (:mod:`consumer.client`), send the first
request of an exchange, translate aiocoap's, the OS's and DTLSSocket's failures (that is
:func:`oscar_io.coaperrors.translate`, for every role), or check the blocks of a transfer (that is
:mod:`oscar_io.blockwise`: its failures are said here in the consumer's terms).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from oscar.errors import InvalidObject
from oscar.objects import CONTENT_FORMAT_COSE_SIGN1
from oscar_io.blockwise import (
    DEFAULT_WINDOW,
    BrokenTransfer,
    TooLarge,
    allow_in_flight,
    answer,
    fetch_rest,
)
from oscar_io.coaperrors import TransportError

__all__ = ["Exchange", "assemble", "cache_fresh_in", "cancel"]


class Exchange(NamedTuple):
    """One request as sent: the context it went through, the message, aiocoap's request
    object and the first response (its first block only)."""

    context: Any
    message: Any
    request: Any
    response: Any


def cancel(request: Any) -> None:
    observation = getattr(request, "observation", None)
    if observation is not None and not observation.cancelled:
        observation.cancel()


def cache_fresh_in(response: Any) -> int:
    """Seconds until a cache on the path asks its origin again: the answer's Max-Age (60 when
    absent, RFC 7252 §5.10.5). Said for every answer: a reverse proxy looks like a producer."""
    max_age: int = response.opt.max_age if response.opt.max_age is not None else 60
    return max_age


async def assemble(
    exchange: Exchange,
    first: Any,
    peer: str,
    max_size: int,
    respond: Callable[[Any], Awaitable[Any]],
    window: int = DEFAULT_WINDOW,
    sink: Callable[[bytes], object] | None = None,
) -> Any:
    """The whole response whose first block is ``first``: the further Block2 blocks are asked
    for with up to ``window`` requests in flight (:func:`oscar_io.blockwise.fetch_rest`; each
    answer awaited through ``respond``, which bounds and translates the wait), and never more
    than ``max_size`` bytes in all.

    aiocoap's own block-wise assembly has no bound (a hostile server could stream blocks
    forever, each accepted into memory before the size is checked) and asks for one block per
    round trip, so it is turned off for our requests and done here. Raises
    :class:`InvalidObject` when the announced (Size2) or received size exceeds the limit,
    :class:`TransportError` for a broken transfer.

    With ``sink`` (a large object spooled and read as it arrives, :mod:`consumer.spool`) the
    payload of a 2.05 protected object, every block of it, goes there in order and the response
    returned has an empty payload; ``sink``'s :class:`InvalidObject` ends the transfer at once.
    """
    from aiocoap import CON
    from aiocoap.optiontypes import BlockOption

    block2 = first.opt.block2
    wanted = first.code.dotted == "2.05" and first.opt.content_format == CONTENT_FORMAT_COSE_SIGN1
    if block2 is None or (not block2.more and block2.block_number == 0):
        first.opt.block2 = None
        if sink is not None and wanted:
            if len(first.payload) > max_size:
                raise InvalidObject("object exceeds the size limit")
            sink(first.payload)
            first.payload = b""
        return first
    if not wanted:
        return first  # refused as it is by _payload: no more of it is asked for
    size2 = first.opt.size2
    if size2 is not None and size2 > max_size:
        raise InvalidObject("object exceeds the size limit (announced)")

    async def ask(number: int, size_exponent: int) -> Any:
        following = exchange.message.copy(
            payload=b"",
            mid=None,
            token=None,
            remote=first.remote,
            block2=BlockOption.BlockwiseTuple(number, False, size_exponent),
            mtype=CON,  # confirmable, said now: allow_in_flight counts it
            block1=None,
            observe=None,
        )
        return await respond(answer(exchange.context, following))

    allow_in_flight(exchange.context, window)
    try:
        payload = await fetch_rest(first, ask, max_size=max_size, window=window, sink=sink)
    except TooLarge:
        raise InvalidObject("object exceeds the size limit (block-wise)") from None
    except BrokenTransfer as exc:
        raise TransportError(f"{peer} broke the block-wise transfer: {exc}") from None
    first.payload = payload
    first.opt.block2 = None
    return first
