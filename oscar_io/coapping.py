"""A CoAP ping (RFC 7252 §4.3: an empty CON, answered by the peer's message layer with a RST) over
an existing DTLS session of an aiocoap client context: how :meth:`AsClient.ping
<oscar_io.asclient.AsClient.ping>` tells a live AS session from one that died silently.

What it does not do: make a session (a ping over a session that is gone answers False, never
handshakes anew), or retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["ping_session"]


async def _recognized(transport: Any, remote: Any) -> bool:
    """Whether ``remote`` is still a live connection of ``transport`` (its pool)."""
    return bool(await transport.recognize_remote(remote))


async def ping_session(contexts: Iterable[Any], remote: Any, timeout: float) -> bool | None:
    """Ping ``remote`` (a DTLS connection of one of ``contexts``): True if it answered within
    ``timeout`` seconds; False if not, or if the peer closed that session; None if ``remote`` is
    no connection of these contexts' message layers (then nobody can tell)."""
    from aiocoap import Message
    from aiocoap.numbers.codes import Code
    from aiocoap.numbers.types import CON

    transport = getattr(remote, "coaptransport", None)
    if transport is None:
        return None
    manager: Any = None
    for ctx in contexts:
        for token_manager in getattr(ctx, "request_interfaces", ()):
            candidate = getattr(token_manager, "token_interface", None)
            if getattr(candidate, "message_interface", None) is transport:
                manager = candidate
    if manager is None:
        return None
    # A session the AS closed (oscar_io.dtls_client takes it out of the pool) is over, even
    # though tinydtls would answer a ping on it by handshaking anew: a new session, on which the
    # AS knows no observation of ours.
    if not await _recognized(transport, remote):
        return False
    pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    message = Message(code=Code.EMPTY)
    message.mtype = CON
    message.remote = remote

    def answered() -> None:  # aiocoap calls it when a RST ends the exchange
        if not pong.done():
            pong.set_result(None)

    # Unanswered, the ping is retransmitted until the context goes (the caller resets it).
    manager.send_message(message, answered)
    try:
        await asyncio.wait_for(pong, timeout)
    except TimeoutError:
        return False
    return True
