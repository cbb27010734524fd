"""A repair of aiocoap 0.4.17's UDP transport: an ICMP error is charged to the next peer sent to.

aiocoap's ``udp6`` socket has ``IP_RECVERR``/``IPV6_RECVERR`` on, so that an ICMP error (port
unreachable: an observer that went away) is read from the socket's error queue with the address
it concerns, and only that peer's exchanges and observations end. But Linux also keeps the error
pending on the socket, and the *next* ``sendmsg`` on it fails with it, whatever its destination:
aiocoap then charges the error to the peer being sent to (``error_received`` during ``send``),
drops that datagram, and ends that peer's observations. On the proxy, one observer leaving made
the next observer notified lose its observation (found by tests/test_proxy_relays.py: about one
run in four); a relay's upstream request could fail the same way.

:func:`apply` makes ``MessageInterfaceUDP6.send`` read and clear the pending error
(``SO_ERROR``) before it sends: the error is still reported, with its own address, from the error
queue. Only for the aiocoap version it was written against (:data:`FIXED_VERSIONS`); otherwise it
does nothing and says so at debug level. An ICMP error arriving between the two system calls
still takes the old path (a window of microseconds instead of the time between two sends).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from typing import Any

__all__ = ["FIXED_VERSIONS", "apply"]

log = logging.getLogger("oscar.proxy")

FIXED_VERSIONS = frozenset({"0.4.17"})
_APPLIED = "_oscar_clears_pending_errors"


def apply() -> bool:
    """Repair the transport (once per process; idempotent). True if the repair is in place."""
    import aiocoap.meta
    from aiocoap.transports import udp6

    interface: Any = getattr(udp6, "MessageInterfaceUDP6", None)
    if aiocoap.meta.version not in FIXED_VERSIONS or interface is None:
        log.debug("aiocoap %s: its UDP send is left as it is", aiocoap.meta.version)
        return False
    if getattr(interface.send, _APPLIED, False):
        return True
    original = interface.send

    @functools.wraps(original)
    def send(self: Any, message: Any) -> None:
        transport = getattr(self, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reads and clears it
        original(self, message)

    setattr(send, _APPLIED, True)
    interface.send = send
    return True
