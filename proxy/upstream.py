"""Upstream exchanges of the proxy: a Block2 answer assembled within bounds, and its failures.

:func:`complete` takes the rest of an upstream answer's blocks (a fetch's or a notification's)
under the object size limit, one timeout per block; :class:`UpstreamError` is an answer that
cannot be taken; :func:`upstream_failure` says why an exchange failed, for the log.

What this module does not do: decide what to fetch or keep (:mod:`proxy.core`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from oscar.objects import DEFAULT_MAX_OBJECT_SIZE
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


async def complete(ctx: Any, request: Any, first: Any, timeout: float) -> Any:
    """``first`` (an answer or a notification) with the rest of its blocks, if it has more.

    aiocoap's own assembly has no size limit (an upstream named in a Proxy-Uri could stream
    blocks until the proxy runs out of memory) and copies the whole payload for each block
    it appends. Here every exchange (one block) has ``timeout`` seconds, the object may grow
    to :data:`~oscar.objects.DEFAULT_MAX_OBJECT_SIZE` and no further, every block must be the
    next one, full but the last, and carry the first one's ETag (RFC 7959 §2.4; the rest of a
    notification is asked for without Observe, §2.6). Raises :class:`UpstreamError`, and
    what aiocoap raises.
    """
    from aiocoap.optiontypes import BlockOption

    block2 = first.opt.block2
    if block2 is None:
        return first
    if block2.block_number != 0:
        raise UpstreamError("a Block2 transfer that does not start at block 0")
    parts, received = [bytes(first.payload)], len(first.payload)
    while block2.more:
        if len(parts[-1]) != block2.size:
            raise UpstreamError("a Block2 block shorter than its size, not the last")
        if received >= DEFAULT_MAX_OBJECT_SIZE:
            raise UpstreamError("a Block2 transfer larger than any object")
        follow = request.copy(
            mid=None,
            token=None,
            remote=first.remote,
            etags=[],
            observe=None,
            block2=BlockOption.BlockwiseTuple(block2.block_number + 1, False, block2.size_exponent),
        )
        reply = await asyncio.wait_for(
            ctx.request(follow, handle_blockwise=False).response, timeout
        )
        block2 = reply.opt.block2
        if reply.code != first.code or block2 is None or block2.start != received:
            raise UpstreamError("a Block2 transfer broken off or out of order")
        if reply.opt.etag != first.opt.etag:
            raise UpstreamError("the object changed during its Block2 transfer")
        parts.append(bytes(reply.payload))
        received += len(parts[-1])
    if received > DEFAULT_MAX_OBJECT_SIZE:
        raise UpstreamError("a Block2 transfer larger than any object")
    first.payload = b"".join(parts)
    first.opt.block2 = None
    return first
