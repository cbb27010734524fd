"""Repairs of aiocoap 0.4.17 that every role's server needs when observers go away abruptly.

**Tracebacks.** When a server adds a response to a request's :class:`aiocoap.pipe.Pipe` and sending
it fails at once (the observer left: an ICMP port unreachable from an earlier notification, a RST),
the send callback ends the pipe while ``Pipe._add_event`` is still iterating over its callbacks; the
loop then calls ``_any_interest()`` on the ended pipe's ``False`` and raises ``TypeError: 'bool'
object is not iterable`` out of ``add_response`` into the resource's render task. aiocoap turns that
into ``add_exception`` on the same ended pipe, whose log call passes ``exception=`` to
:meth:`logging.Logger.error` and raises ``TypeError: Logger._log() got an unexpected keyword
argument 'exception'``; asyncio finally logs "Task exception was never retrieved" with both
tracebacks. The observation was over either way. The repair: ``Pipe._add_event`` is the same method,
made to stop as soon as a callback ended the pipe, and to log a late exception with ``exc_info``.

**Another observer's end.** aiocoap's ``udp6`` socket has ``IP_RECVERR``/``IPV6_RECVERR`` on, so
that an ICMP error (port unreachable: an observer that went away) is read from the socket's error
queue with the address it concerns, and only that peer's exchanges end. But Linux also keeps the
error pending on the socket, and the *next* ``sendmsg`` fails with it, whatever its destination:
aiocoap charges it to the peer being sent to, drops that datagram and ends that peer's
observations — one observer leaving cost the next one notified its observation. The repair:
``MessageInterfaceUDP6.send`` reads and clears the pending error (``SO_ERROR``) before it sends;
the error is still reported, with its own address, from the error queue. An ICMP error arriving
between the two system calls still takes the old path (microseconds instead of the time between
two sends).

:func:`apply` makes both, once per process, and only in the aiocoap version they were written
against (:data:`FIXED_VERSIONS`); with any other version it does nothing and says so at debug
level, so an upgrade is checked, not assumed.

What it does not do: import aiocoap before :func:`apply` is called (roles load aiocoap lazily),
or change how observations, retransmissions or errors are handled otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from typing import Any

__all__ = ["FIXED_VERSIONS", "apply", "clear_pending_error", "quiet_undecodable_datagrams"]

log = logging.getLogger("oscar.aiocoap")

#: aiocoap versions that have both flaws, in this exact shape.
FIXED_VERSIONS = frozenset({"0.4.17"})
_APPLIED = "_oscar_clears_pending_errors"


def _add_event(self: Any, event: Any) -> None:
    """aiocoap 0.4.17's ``Pipe._add_event``, stopping once a callback ended the pipe."""
    if self._event_callbacks is False:
        if event.exception is not None:
            self.log.error(
                "Discarded exception in %r added after %r has ended",
                event,
                self,
                exc_info=event.exception,
            )
        else:
            self.log.warning("Response %r added after %r has already ended", event, self)
        return
    for callback, is_interest in self._event_callbacks[:]:
        keep_calling = callback(event)
        if self._event_callbacks is False:
            return  # all interest was lost during the callback: the pipe has ended
        if not keep_calling:
            self._event_callbacks.remove((callback, is_interest))
    if not self._any_interest():
        self._end()


def clear_pending_error(sock: socket.socket | None) -> None:
    """Read and clear ``sock``'s pending error (``SO_ERROR``), so that the next send does not fail
    with an ICMP error meant for another peer (see the module docstring). Any aiocoap version:
    the producer's fast path sends on aiocoap's socket itself."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reads and clears it


def _clearing_pending_errors(original: Any) -> Any:
    """``MessageInterfaceUDP6.send``, reading and clearing the socket's pending error first."""

    @functools.wraps(original)
    def send(self: Any, message: Any) -> None:
        transport = getattr(self, "transport", None)
        clear_pending_error(transport.get_extra_info("socket") if transport is not None else None)
        original(self, message)

    setattr(send, _APPLIED, True)
    return send


def apply() -> bool:
    """Repair aiocoap (once per process; idempotent). True if the repairs are in place."""
    from aiocoap import meta
    from aiocoap.pipe import Pipe
    from aiocoap.transports import udp6

    interface: Any = getattr(udp6, "MessageInterfaceUDP6", None)
    if meta.version not in FIXED_VERSIONS or interface is None:
        log.debug("aiocoap %s: left as it is (repairs written for 0.4.17)", meta.version)
        return False
    Pipe._add_event = _add_event
    if not getattr(interface.send, _APPLIED, False):
        interface.send = _clearing_pending_errors(interface.send)
    return True


def quiet_undecodable_datagrams(loop: asyncio.AbstractEventLoop, logger: logging.Logger) -> None:
    """aiocoap 0.4.17 lets some malformed datagrams (an option that is not UTF-8 where text is
    due) raise out of its receive callback, which asyncio then logs as an ERROR with a traceback.
    The datagram is dropped either way; this logs it as one info line instead. Every other
    exception goes to the default handler. (Its DTLS client's doubled "connected" event is
    repaired where it arises, by :mod:`oscar_io.dtls_client`.)"""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        handle = repr(context.get("handle", ""))
        if isinstance(exc, UnicodeDecodeError) and "Recvmsg" in handle:
            logger.info("dropped an undecodable datagram")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
