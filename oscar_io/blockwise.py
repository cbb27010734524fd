"""The rest of a Block2 transfer (RFC 7959) with several blocks in flight, within bounds.

A block-wise transfer over UDP asked for one block per round trip is one round trip per KiB: a
1 MiB object is 1,024 round trips. :func:`fetch_rest` keeps up to ``window`` requests for distinct
blocks outstanding (each a normal exchange of its own: retransmission and loss are aiocoap's per
exchange), and takes their answers strictly in order:

- the block size is the first block's (the server's choice, 1 KiB from aiocoap over UDP); no BERT;
- every block is the one asked for, with the first block's response code and ETag (RFC 7959
  §2.4: a transfer whose object changed is refused, not stitched together), full but the last;
- never more than ``max_size`` bytes: an announced size (Size2) above it is refused before any
  further request, no block that would start past it is asked for, and a transfer that announces
  more once the limit is reached is refused;
- with Size2, no block past the announced end is asked for; without it, ``window`` blocks ahead,
  and the block whose More bit is 0 ends the transfer (requests beyond it are cancelled, their
  answers, errors included, never looked at);
- memory: the object assembled into one buffer (appending, no quadratic copying) and at most
  ``window`` answers waiting to be appended; the buffer is copied once into the ``bytes``
  returned (for that moment, twice the object). With a ``sink`` (a large object spooled and
  checked as it arrives), each block goes there instead and nothing is assembled.

Failures raise :class:`BrokenTransfer` or :class:`TooLarge` (both :class:`BlockwiseError`), with
nothing returned and every outstanding request cancelled; the caller maps them to its own errors
(the consumer's ``TransportError``/``InvalidObject``, the proxy's ``UpstreamError``).

What this module does not do: build requests, bound the wait for one answer, or translate
aiocoap's failures: ``ask(number, size_exponent)`` is the caller's (it knows the request, the
remote, the timeout); what it raises propagates unchanged. :func:`answer` is the one exchange
such an ``ask`` awaits: aiocoap stops an exchange whose answer is no longer wanted only one
loop turn after the cancellation, and an answer arriving in between raises ``InvalidStateError``
in aiocoap's receive path (a traceback in the log); cancelling a window's speculative requests
does that routinely, so :func:`answer` stops the exchange at once.

aiocoap sends one confirmable message per peer at a time (NSTART = 1, RFC 7252 §4.7) and queues
the rest, which would make a window one block again. :func:`allow_in_flight` lets a client
context have up to ``window`` confirmable exchanges per peer outstanding (a bound chosen here,
RFC 7252 §4.7 allows a higher NSTART where the application knows better); each is still a
normal exchange, retransmitted by aiocoap. Past the limit (other requests to the same peer at
the same time) aiocoap's queue takes over: the queued requests go one at a time, as before. The
limit holds for every request of that context to any peer. It is a repair of aiocoap's
internals, written for the versions in :data:`IN_FLIGHT_VERSIONS` and off (one exchange at a
time, still correct) for any other. Importing this module loads no aiocoap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from oscar_io.tasks import stop_tasks

__all__ = [
    "DEFAULT_WINDOW",
    "IN_FLIGHT_VERSIONS",
    "MAX_WINDOW",
    "BlockwiseError",
    "BrokenTransfer",
    "TooLarge",
    "allow_in_flight",
    "answer",
    "check_window",
    "fetch_rest",
]

DEFAULT_WINDOW = 8
"""Block requests in flight by default: 8 KiB outstanding at 1 KiB blocks."""

MAX_WINDOW = 64
"""The most a configuration may ask for (a server's duplicate detection and our memory)."""

Ask = Callable[[int, int], Awaitable[Any]]
"""``ask(number, size_exponent)``: the answer to a request for that block (aiocoap's Message)."""


class BlockwiseError(Exception):
    """A Block2 transfer that cannot be taken."""


class BrokenTransfer(BlockwiseError):
    """The blocks do not make one object: out of order, another ETag or code, a short block."""


class TooLarge(BlockwiseError):
    """The object is (or is announced) larger than the size limit."""


IN_FLIGHT_VERSIONS = frozenset({"0.4.17"})
"""aiocoap versions whose ``MessageManager.send_message`` :func:`allow_in_flight` repairs."""

_LIMIT = "_oscar_in_flight"


def _patched(original: Any, con: Any) -> Any:
    def send_message(self: Any, message: Any, messageerror_monitor: Any) -> Any:
        """aiocoap's ``send_message``, with the peer's queue set aside (it is empty) while the
        context's limit of confirmable exchanges to that peer is not reached."""
        limit = getattr(self, _LIMIT, 1)
        remote, active, backlogs = message.remote, self._active_exchanges, self._backlogs
        set_aside = (
            limit > 1
            and message.mtype == con  # set by the caller: aiocoap's default is decided later
            and active is not None
            and not backlogs.get(remote, True)  # queued for it: none (the queue keeps order)
            and sum(1 for peer, _ in active if peer == remote) < limit
        )
        if set_aside:
            del backlogs[remote]  # re-created as this message's exchange is added
        try:
            return original(self, message, messageerror_monitor)
        finally:
            if set_aside and remote not in self._backlogs:
                self._backlogs[remote] = []  # it failed before: aiocoap's invariant again

    send_message.__wrapped__ = original  # type: ignore[attr-defined]
    return send_message


def allow_in_flight(context: Any, limit: int) -> bool:
    """Let ``context`` (an aiocoap client context) keep up to ``limit`` confirmable exchanges
    per peer outstanding (idempotent; the last limit set wins). False, and nothing changed, for
    an aiocoap version this was not written for."""
    from aiocoap import meta
    from aiocoap.messagemanager import MessageManager
    from aiocoap.numbers.types import CON

    check_window(limit)
    if meta.version not in IN_FLIGHT_VERSIONS:
        return False
    if not hasattr(MessageManager.send_message, "__wrapped__"):
        MessageManager.send_message = _patched(MessageManager.send_message, CON)
    applied = False
    for interface in getattr(context, "request_interfaces", ()):
        manager = getattr(interface, "token_interface", None)
        if isinstance(manager, MessageManager):
            setattr(manager, _LIMIT, limit)
            applied = True
    return applied


async def answer(context: Any, message: Any) -> Any:
    """The answer to ``message`` through aiocoap's ``context`` (one exchange, no block-wise
    assembly). Cancelled (the caller's timeout, or a request no longer wanted), the exchange is
    stopped in the same step: a late answer is then dropped by aiocoap as unknown, not set on a
    cancelled future."""
    request = context.request(message, handle_blockwise=False)
    try:
        return await asyncio.shield(request.response)
    except asyncio.CancelledError:
        response = request.response
        if not response.done():
            response.cancel()
            # aiocoap's own done-callback, run now rather than one loop turn later (0.4.17:
            # ClientRequest._response_cancellation_handler; absent, the callback still runs).
            handler = getattr(request, "_response_cancellation_handler", None)
            if handler is not None:
                handler(response)
        raise


def check_window(window: int) -> int:
    """``window`` if it is a usable number of blocks in flight; ``ValueError`` otherwise."""
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"blocks in flight must be 1 to {MAX_WINDOW}, not {window!r}")
    return window


async def fetch_rest(
    first: Any,
    ask: Ask,
    *,
    max_size: int,
    window: int = DEFAULT_WINDOW,
    sink: Callable[[bytes], object] | None = None,
) -> bytes:
    """The whole payload of the transfer whose first answer (block 0) is ``first``.

    With ``sink``, each block's payload (the first one's included) is handed to it in order as
    it is taken, nothing is assembled and ``b""`` is returned: memory is then ``window``
    answers, whatever the object's size. What ``sink`` raises propagates (the requests
    outstanding cancelled).

    ``first`` must carry a Block2 option. Raises :class:`BrokenTransfer`, :class:`TooLarge`,
    ``ValueError`` for a bad ``window``, and whatever ``ask`` raises.
    """
    check_window(window)
    block2 = first.opt.block2
    if block2 is None:
        raise ValueError("not a block-wise answer")
    if block2.block_number != 0:
        raise BrokenTransfer("a Block2 transfer that does not start at block 0")
    if block2.size_exponent == 7:
        raise BrokenTransfer("a BERT block over a transport without BERT")
    szx, size = block2.size_exponent, block2.size
    size2 = first.opt.size2
    if size2 is not None and size2 > max_size:
        raise TooLarge("a Block2 transfer announced larger than any object")
    buffer = bytearray(first.payload)
    taken = len(buffer)  # bytes taken so far, into the buffer or the sink
    if taken > max_size:
        raise TooLarge("a Block2 transfer larger than any object")
    if not block2.more and taken > size:
        raise BrokenTransfer("a Block2 block longer than its size")
    if block2.more and taken != size:
        raise BrokenTransfer("a Block2 block shorter than its size, not the last")
    if sink is not None:
        sink(bytes(buffer))
        buffer = bytearray()
    if not block2.more:
        return bytes(buffer)

    reachable = -(-max_size // size)  # blocks 0 .. reachable-1 start below the limit
    planned = -(-size2 // size) if size2 else None  # blocks announced (Size2), if any
    tasks: dict[int, asyncio.Task[Any]] = {}
    asked = 1  # the next block number to ask for
    number = 1  # the next block number to append
    try:
        while True:
            if taken >= max_size:  # more is announced, and the limit is reached
                raise TooLarge("a Block2 transfer larger than any object")
            if planned is not None and number >= planned:
                planned = None  # Size2 was short of the truth: go on as without it
            end = min(number + window, reachable, planned if planned is not None else reachable)
            while asked < end:
                tasks[asked] = asyncio.ensure_future(ask(asked, szx))
                asked += 1
            reply = await tasks.pop(number)
            got = reply.opt.block2
            if (
                reply.code != first.code
                or got is None
                or got.block_number != number
                or got.size_exponent != szx
            ):
                raise BrokenTransfer("a Block2 transfer broken off or out of order")
            if reply.opt.etag != first.opt.etag:
                raise BrokenTransfer("the object changed during its Block2 transfer")
            data = reply.payload
            if got.more and len(data) != size:
                raise BrokenTransfer("a Block2 block shorter than its size, not the last")
            if len(data) > size:
                raise BrokenTransfer("a Block2 block longer than its size")
            if taken + len(data) > max_size:
                raise TooLarge("a Block2 transfer larger than any object")
            taken += len(data)
            if sink is None:
                buffer += data
            else:
                sink(data)
            del reply, data
            if not got.more:
                return bytes(buffer)
            number += 1
    finally:
        if tasks:
            await stop_tasks(tasks.values())
