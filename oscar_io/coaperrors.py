"""aiocoap's failures in OSCAR's terms: one map (:data:`AIOCOAP_ERRORS`) and one function
(:func:`translate`), so that every role says "refused", "timed out", "unreachable" … the same way.

::

    OscarError                  (oscar.errors)
    └── TransportError          a peer (producer, proxy, AS) could not be reached, the exchange
        │                       broke, or the peer answered with an error code      kind "network"
        ├── NotFound            the peer answered 4.04: no such resource there    kind "not found"
        ├── Refused             nothing listens there (ICMP port unreachable), or the peer
        │                       answered another error code                         kind "refused"
        ├── TimedOut            no answer within the time (or a proxy's 5.04)     kind "timed out"
        └── Unreachable         the name does not resolve, no route (or a proxy's 5.02)
                                                                                kind "unreachable"

``kind`` names the category in a command line's one error line (``…: error: KIND: …``).

:data:`AIOCOAP_ERRORS` lists every exception class of aiocoap's ``aiocoap.error`` module and of its
DTLS client transport by qualified name, with the category each one is reported as; a test walks
those modules and fails when a class is missing, so an aiocoap upgrade that adds one is noticed.
(``aiocoap.credentials``' errors are deliberately not there: a missing or unloadable credential is
a local fault, not the network, and propagates.) Two refinements come first, because they say more
than the class: the socket error aiocoap wraps (``__cause__``, e.g. an ICMP error from the error
queue) decides by its ``errno``, and a wrapped response is reported by its code
(:func:`error_answer`). A server-side renderable error (``BadRequest`` …) is listed with the
category of its response code, as a client would see it answered.

Names are kept as strings so that importing this module loads no aiocoap (the producer must start
fast): :func:`translate` looks an exception's classes up by name along its MRO.

What this module does not do: decide what a failure means for a role (the AS client reports any of
these as :class:`~oscar_io.errors.AsUnavailable`; the proxy serves what it holds and backs off),
or wait: timeouts of ``asyncio.wait_for`` are the caller's (it knows how long it waited). No
message holds a secret: they name the peer and what failed.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from oscar.errors import OscarError

__all__ = [
    "AIOCOAP_ERRORS",
    "NotFound",
    "Refused",
    "TimedOut",
    "TransportError",
    "Unreachable",
    "describe",
    "error_answer",
    "translate",
]


class TransportError(OscarError):
    """A peer (producer, proxy or AS) could not be reached, timed out, or answered with an error.
    :attr:`kind` names the category in a command line's message (``error: KIND: ...``)."""

    kind = "network"


class NotFound(TransportError):
    """The peer answered 4.04 Not Found: it has no such resource (a wrong path or producer)."""

    kind = "not found"


class Refused(TransportError):
    """Nothing listens at that address (ICMP port unreachable), or the peer answered an error
    code other than 4.04, 5.02 and 5.04."""

    kind = "refused"


class TimedOut(TransportError):
    """No answer within the timeout (the host may be down or the datagrams lost)."""

    kind = "timed out"


class Unreachable(TransportError):
    """The host name does not resolve, or there is no route to the host."""

    kind = "unreachable"


_E = "aiocoap.error."
_DTLS = "aiocoap.transports.tinydtls."

#: Every exception class of aiocoap (qualified name) and the category it is reported as. Entries
#: under "misuse" cannot come from a request OSCAR builds (its URIs are checked before, and it sends
#: no CON to a multicast address); they are reported as the generic category rather than left to
#: escape as a traceback.
AIOCOAP_ERRORS: Mapping[str, type[TransportError]] = MappingProxyType(
    {
        # the bases
        _E + "Error": TransportError,
        _E + "HelpfulError": TransportError,
        _E + "RenderableError": TransportError,
        _E + "ConstructionRenderableError": TransportError,
        # the network (a wrapped socket error decides first: see translate)
        _E + "NetworkError": TransportError,
        _E + "MessageError": TransportError,
        _E + "RemoteServerShutdown": TransportError,
        _E + "LibraryShutdown": TransportError,
        _E + "NoRequestInterface": TransportError,  # no transport for the URI (a 5.05 if served)
        _E + "ResolutionError": Unreachable,
        _E + "TimeoutError": TimedOut,
        _E + "ConRetransmitsExceeded": TimedOut,
        _E + "RequestTimedOut": TimedOut,
        _E + "WaitingForClientTimedOut": TimedOut,
        # the peer's answer did not make sense
        _E + "UnparsableMessage": TransportError,
        _E + "MissingBlock2Option": TransportError,
        _E + "UnexpectedBlock1Option": TransportError,
        _E + "UnexpectedBlock2": TransportError,
        _E + "ResourceChanged": TransportError,
        _E + "NotObservable": TransportError,
        _E + "ObservationCancelled": TransportError,
        _E + "ResponseWrappingError": Refused,  # refined by the wrapped response's code
        # misuse (see above)
        _E + "AnonymousHost": TransportError,
        _E + "ConToMulticast": TransportError,
        _E + "IncompleteUrlError": TransportError,
        _E + "MalformedUrlError": TransportError,
        _E + "MissingRemoteError": TransportError,
        # renderable errors: the category of their response code, as error_answer gives it
        _E + "NotFound": NotFound,
        _E + "NoResource": NotFound,
        _E + "BadGateway": Unreachable,
        _E + "GatewayTimeout": TimedOut,
        _E + "BadOption": Refused,
        _E + "BadRequest": Refused,
        _E + "Conflict": Refused,
        _E + "Forbidden": Refused,
        _E + "HopLimitReached": Refused,
        _E + "InternalServerError": Refused,
        _E + "MethodNotAllowed": Refused,
        _E + "NotAcceptable": Refused,
        _E + "NotImplemented": Refused,
        _E + "PreconditionFailed": Refused,
        _E + "ProxyingNotSupported": Refused,
        _E + "RequestEntityIncomplete": Refused,
        _E + "RequestEntityTooLarge": Refused,
        _E + "ServiceUnavailable": Refused,
        _E + "TooManyRequests": Refused,
        _E + "Unauthorized": Refused,
        _E + "UnallowedMethod": Refused,
        _E + "UnprocessableEntity": Refused,
        _E + "UnsupportedContentFormat": Refused,
        _E + "UnsupportedMethod": Refused,
        # the DTLS client transport (DTLSSocket)
        _DTLS + "FatalDTLSError": TransportError,
        _DTLS + "CloseNotifyReceived": TransportError,
    }
)

#: OS errors that mean no route to the host (as opposed to nothing listening on the port).
_NO_ROUTE = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EADDRNOTAVAIL}
)


def _category(exc: BaseException) -> tuple[str, type[TransportError]] | None:
    """The most specific class of ``exc`` that the map lists, and its category."""
    for cls in type(exc).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}"
        category = AIOCOAP_ERRORS.get(name)
        if category is not None:
            return name, category
    return None


def translate(exc: BaseException, peer: str) -> TransportError | None:
    """An OS, aiocoap or DTLS failure to reach ``peer`` as its category; None for any other
    exception (a bug, not the network: the caller lets it propagate). The caller raises the
    result ``from None``: aiocoap's messages can be long and name internals."""
    if isinstance(exc, socket.gaierror):
        return Unreachable(f"cannot resolve the host name of {peer}")
    if isinstance(exc, TimeoutError):  # the builtin one (asyncio's): no answer in time
        return TimedOut(f"no answer from {peer}")
    found = _category(exc)
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__} if found else set()
    if _E + "ResolutionError" in names:
        return Unreachable(f"cannot resolve the host name of {peer}")
    if _E + "TimeoutError" in names:
        return TimedOut(f"no answer from {peer} (retransmissions exhausted)")
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError):
        if cause.errno == errno.ECONNREFUSED:
            return Refused(f"{peer} refused: nothing listens on that port (ICMP port unreachable)")
        if cause.errno in _NO_ROUTE:
            return Unreachable(f"no route to {peer} ({os.strerror(cause.errno)})")
        return TransportError(f"cannot reach {peer}: {cause.strerror or type(cause).__name__}")
    if found is None:
        return None
    name, category = found
    if name.startswith(_DTLS):  # FatalDTLSError, close_notify
        return TransportError(f"the DTLS session with {peer} failed ({type(exc).__name__})")
    wrapped = getattr(exc, "coapmessage", None) if name == _E + "ResponseWrappingError" else None
    if wrapped is not None:
        return error_answer(wrapped.code, f"{peer} answered")
    return category(f"cannot reach {peer}: {describe(exc)}")


def error_answer(code: Any, what: str) -> TransportError:
    """An error response code (aiocoap's ``Code``) as its category; ``what`` says who answered
    (``"coap://p answered"``)."""
    text = f"{what} {code.dotted} {code.name_printable}"
    if code.dotted == "4.04":
        return NotFound(f"{text}: no such resource there")
    if code.dotted == "5.04":
        return TimedOut(f"{text}: the proxy got no answer from the origin")
    if code.dotted == "5.02":
        return Unreachable(f"{text}: the proxy could not reach the origin")
    return Refused(text)


def describe(exc: BaseException) -> str:
    """An exception's name and the start of its message, on one line (at most 200 characters of
    message): for aiocoap's errors, whose messages name addresses and causes."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    # aiocoap's NetworkError says only its own name ("Network error: NetworkError"): no use
    # repeating.
    if not text or text.endswith(f": {name}"):
        return name
    return f"{name} ({text[:200]})"
