"""A repair of aiocoap 0.4.17's DTLS client (``tinydtls`` transport) that every OSCAR device needs.

The fault, seen as a flaky test and by users of ``oscar-consumer``: a 20-line asyncio traceback
(``InvalidStateError`` from ``_connecting.set_result``, then ``SystemError: DTLS.handleMessage
returned a result with an exception set``) before the tool's one-line answer. Its cause:

1. The server closes the session with a warning-level close_notify (the AS does so when one
   identity holds more sessions than it allows, e.g. several ``oscar-consumer`` processes of one
   device at once, when it evicts an idle peer, or when it shuts down). aiocoap handles only a
   *fatal* close_notify; this one it logs as "Unhandled alert level 1 code 0" and keeps the
   connection in its pool.
2. The next datagram written on that connection (a new request or a retransmission) makes tinydtls
   start a new handshake on the same DTLS object, by itself. When it completes, tinydtls reports
   "connected" again, and aiocoap sets the connection's one-shot ``_connecting`` future a second
   time: ``InvalidStateError``.
3. That exception is raised inside a callback called from DTLSSocket's Cython code, which cannot
   propagate it; ``handleMessage`` returns with it still set, Python raises ``SystemError`` out of
   the datagram callback, and asyncio logs both tracebacks. (The first request written during the
   renewed handshake is dropped by tinydtls and retransmitted by CoAP about 2 s later.)

:func:`apply` replaces, on :class:`aiocoap.transports.tinydtls.DTLSClientConnection`:

- ``_event``: a second "connected" (a renewed session) is a debug line, not a second
  ``set_result``; a close_notify of either level takes the connection out of the pool, so new
  requests make a new connection (which queues them until its handshake completes) while the
  exchanges in flight finish over the old one, which the transport still closes at its shutdown;
- the transport's shutdown: no ``resetPeer`` for a session the server closed or one still in its
  handshake (a mitigation of a native abort, "double free or corruption", seen in the producer
  when the AS went away: 3 in 37 runs of the test that stops the AS before, 0 in 30 after; the
  state tinydtls was in is not yet known);
- a connection's ``shutdown`` while it is still starting (its socket not yet made, no handshake
  task yet): aiocoap's raised ``AttributeError`` (``_retransmission_task``), which made the
  context's shutdown raise; an ``AsClient.reset`` that met it ended the producer's task that
  follows a resource's keys, silently (the resource sealed nothing after the AS came back: a
  flaky end-to-end test, 1 in 3 under load). Such a connection now stops its start, and that is all;
- ``_read``, ``_write``, ``_event``: no exception ever leaves them into the Cython code: one line
  at info level names the exception type, and the datagram is dropped, as it was;
- ``SingleConnection.datagram_received``: the same, as the last line of defence.

It changes nothing else, and only in the aiocoap version it was written against
(:data:`FIXED_VERSIONS`); with any other version it does nothing and says so at debug level, so an
upgrade is checked, not assumed. It never logs a datagram, a key or an identity.

What it does not do: import aiocoap before :func:`apply` is called (roles load aiocoap lazily),
touch the DTLS *server* transport (:mod:`oscar_io.dtls`), or change retransmission timing.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

__all__ = ["FIXED_VERSIONS", "apply"]

log = logging.getLogger("oscar.aiocoap")

#: aiocoap versions whose ``DTLSClientConnection`` has this flaw and this exact shape.
FIXED_VERSIONS = frozenset({"0.4.17"})

_MARK = "_oscar_mended"
_RETIRED = "_oscar_retired"


def _retired(transport: Any) -> weakref.WeakSet[Any]:
    """The connections a close_notify took out of ``transport``'s pool and not yet collected."""
    retired: weakref.WeakSet[Any] | None = getattr(transport, _RETIRED, None)
    if retired is None:
        retired = weakref.WeakSet()
        setattr(transport, _RETIRED, retired)
    return retired


def _mend(cls: Any, module: Any) -> None:
    original_event = cls._event
    original_read = cls._read
    original_write = cls._write
    original_received = cls.SingleConnection.datagram_received
    original_shutdown = module.MessageInterfaceTinyDTLS.shutdown
    original_connection_shutdown = cls.shutdown
    connected = (module.LEVEL_NOALERT, module.DTLS_EVENT_CONNECTED)
    close_notify = module.CODE_CLOSE_NOTIFY
    warning = module.LEVEL_WARNING

    def _event(self: Any, level: int, code: int) -> int:
        try:
            if (level, code) == connected:
                connecting = getattr(self, "_connecting", None)
                if connecting is not None and connecting.done():
                    log.debug("DTLS session to %s renewed by tinydtls", self.hostinfo)
                    return 0
            elif level == warning and code == close_notify:
                log.debug("%s closed the DTLS session; new requests handshake anew", self.hostinfo)
                self._remove_from_pool()
                # Out of the pool, the transport's shutdown would not close it any more.
                _retired(self.coaptransport).add(self)
                return 0
            original_event(self, level, code)
        except Exception as exc:  # raised into Cython it becomes a SystemError traceback
            log.info("DTLS client: %s in the event callback, ignored", type(exc).__name__)
        return 0

    def _read(self: Any, sender: Any, data: bytes) -> int:
        try:
            return int(original_read(self, sender, data))
        except Exception as exc:
            log.info("DTLS client: dropped a message (%s)", type(exc).__name__)
            return len(data)

    def _write(self: Any, recipient: Any, data: bytes) -> int:
        try:
            return int(original_write(self, recipient, data))
        except Exception as exc:
            log.info("DTLS client: a datagram could not be sent (%s)", type(exc).__name__)
            return 0

    async def shutdown(self: Any) -> None:
        retired = list(_retired(self))
        for connection in retired + list(self._pool.values()):
            connecting = getattr(connection, "_connecting", None)
            if connection in retired or connecting is None or not connecting.done():
                # No resetPeer for a session the server closed or one still in its handshake:
                # there is nothing to close, and resetting such a peer aborted the producer now
                # and then ("double free or corruption" in tinydtls) when the AS went away. The
                # DTLS object frees what is left when it is collected.
                connection._connection = None
            connection.shutdown()
        await original_shutdown(self)

    def connection_shutdown(self: Any) -> None:
        if hasattr(self, "_retransmission_task"):
            original_connection_shutdown(self)
            return
        # Still starting: no DTLS session and no handshake task yet (both are made together,
        # after the socket): stop the start, close the socket if it is there.
        self._remove_from_pool()
        self._startup.cancel()
        transport = getattr(self, "_transport", None)
        if transport is not None:
            transport.close()

    def datagram_received(self: Any, data: bytes, addr: Any) -> None:
        try:
            original_received(self, data, addr)
        except Exception as exc:
            log.info("DTLS client: dropped a datagram (%s)", type(exc).__name__)

    cls._event = _event
    cls._read = _read
    cls._write = _write
    cls.shutdown = connection_shutdown
    cls.SingleConnection.datagram_received = datagram_received
    module.MessageInterfaceTinyDTLS.shutdown = shutdown
    setattr(cls, _MARK, True)


def apply() -> bool:
    """Repair aiocoap's DTLS client (once per process; idempotent). True if the repair is in
    place, False for an aiocoap version it was not written for (then nothing is changed)."""
    from aiocoap import meta

    if meta.version not in FIXED_VERSIONS:
        log.debug("aiocoap %s: DTLS client left as it is (repair written for 0.4.17)", meta.version)
        return False
    from aiocoap.transports import tinydtls

    cls = tinydtls.DTLSClientConnection
    if not getattr(cls, _MARK, False):
        _mend(cls, tinydtls)
    return True
