"""Upstream exchanges of the proxy: a Block2 answer assembled within bounds, and its failures.

:func:`complete` takes the rest of an upstream answer's blocks (a fetch's or a notification's)
under the object size limit, several in flight (:mod:`oscar_io.blockwise`), one timeout per
block; :class:`UpstreamError` is an answer that cannot be taken; :func:`upstream_failure` says
why an exchange failed, for the log.

What this module does not do: decide what to fetch or keep (:mod:`proxy.core`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from oscar.objects import DEFAULT_MAX_OBJECT_SIZE
from oscar_io.blockwise import (
    DEFAULT_WINDOW,
    BlockwiseError,
    allow_in_flight,
    answer,
    fetch_rest,
)
from oscar_io.coaperrors import translate

__all__ = ["UpstreamError", "complete", "upstream_failure"]


class UpstreamError(Exception):
    """The upstream's answer cannot be taken (a broken Block2 transfer, say); logged, counted."""


def upstream_failure(exc: Exception, source: str) -> str:
    """Why an upstream exchange failed, for the log: an :class:`UpstreamError`'s text, a network
    failure's category (:func:`oscar_io.coaperrors.translate`), else the exception's name (the
    failure is the upstream's either way: the proxy serves what it holds and backs off)."""
    failure = exc if isinstance(exc, UpstreamError) else translate(exc, source)
    return str(failure) if failure is not None else type(exc).__name__


async def complete(
    ctx: Any,
    request: Any,
    first: Any,
    timeout: float,
    window: int = DEFAULT_WINDOW,
    max_size: int = DEFAULT_MAX_OBJECT_SIZE,
    sink: Callable[[bytes], object] | None = None,
) -> Any:
    """``first`` (an answer or a notification) with the rest of its blocks, if it has more.

    aiocoap's own assembly has no size limit (an upstream named in a Proxy-Uri could stream
    blocks until the proxy runs out of memory), copies the whole payload for each block it
    appends and asks for one block per round trip. Here up to ``window`` blocks are asked for
    at once (:func:`oscar_io.blockwise.fetch_rest`), every exchange (one block) has ``timeout``
    seconds, the object may grow to ``max_size`` (the proxy's ``limits.max_object_size``) and no
    further, every block must be the one asked for, full but the last, and carry the first
    one's ETag (RFC 7959 §2.4; the rest of a notification is asked for without Observe, §2.6).
    With ``sink``, every block's payload (the first one's too) goes there in order and the
    answer's payload is empty (:func:`oscar_io.blockwise.fetch_rest`).
    Raises :class:`UpstreamError`, and what aiocoap raises.
    """
    from aiocoap import CON
    from aiocoap.optiontypes import BlockOption

    if first.opt.block2 is None:
        return first

    async def ask(number: int, size_exponent: int) -> Any:
        follow = request.copy(
            mid=None,
            token=None,
            remote=first.remote,
            etags=[],
            observe=None,
            block2=BlockOption.BlockwiseTuple(number, False, size_exponent),
            mtype=CON,  # confirmable, said now: allow_in_flight counts it
        )
        return await asyncio.wait_for(answer(ctx, follow), timeout)

    allow_in_flight(ctx, window)
    try:
        payload = await fetch_rest(first, ask, max_size=max_size, window=window, sink=sink)
    except BlockwiseError as exc:
        raise UpstreamError(str(exc)) from None
    first.payload = payload
    first.opt.block2 = None
    return first
