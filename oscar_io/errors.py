"""The runtime's exceptions, one tree (every one an :class:`oscar.errors.OscarError`)::

    OscarError                      (oscar.errors: the core's tree)
    ├── BundleError                 the credentials bundle is missing, unreadable, exposed or bad
    ├── StateError                  a state directory or file is unusable (owner, mode, corrupt)
    ├── AsError                     the AS refused or failed a request (``code``: the CoAP code)
    │   ├── AccessDenied            4.01 / 4.03: this device may not have what it asked for
    │   └── AsUnavailable           no AS answered in time (network, handshake, busy);
    │                               ``retry_after``: seconds until a busy AS may be asked
    ├── TransportError              a peer could not be reached (oscar_io.coaperrors)
    │   ├── NotFound                it answered 4.04
    │   ├── Refused                 nothing listens there (ICMP port unreachable)
    │   ├── TimedOut                no answer in time
    │   └── Unreachable             no route, or the host name does not resolve
    ├── SealError                   a sealed blob does not open (oscar_io.sealing; callers
    │                               translate it: StateError, the AS's VaultError, a cache miss)
    └── UsageError                  bad command-line usage or configuration (exit 2)
        └── ConfigError             a configuration (file, flags or code) is unusable; also a
                                    ValueError (the producer's and the proxy's, one class)

Foreign errors are translated where they arise: aiocoap's by :mod:`oscar_io.coaperrors`,
``OSError`` from files by :mod:`oscar_io.statefiles`, cryptography's ``InvalidTag`` by
:mod:`oscar_io.sealing`. No message ever holds a secret, a PSK or plaintext.
"""

from __future__ import annotations

from oscar.errors import OscarError

__all__ = [
    "AccessDenied",
    "AsError",
    "AsUnavailable",
    "BundleError",
    "ConfigError",
    "StateError",
    "UsageError",
]


class BundleError(OscarError):
    """The credentials bundle is missing, unreadable, exposed or malformed."""


class AsError(OscarError):
    """The AS refused or failed a request. ``code`` is the CoAP code (``"4.04"``), or None."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class AccessDenied(AsError):
    """4.01 or 4.03: this device may not have what it asked for."""


class AsUnavailable(AsError):
    """The AS did not answer (network down, AS stopped, handshake failed) within the timeout, or
    answered that it is busy (5.03, 4.29). With several AS instances listed, none of them could.

    ``retry_after``: when every AS that could be asked said it is busy, the seconds until the
    first of them may be asked again (its Max-Age); otherwise None. Callers that retry wait at
    least this long."""

    def __init__(
        self, message: str, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class StateError(OscarError):
    """A state directory or file is unusable: another owner, writable by others, a symbolic
    link, unreadable, or its content does not decrypt or decode."""


class UsageError(OscarError):
    """Bad command-line usage or configuration; the message is shown as is (exit 2)."""


class ConfigError(UsageError, ValueError):
    """A role's configuration (file, flags or code) is unusable; the message names the field
    (exit 2). A :class:`UsageError`, so one ``except UsageError`` covers bad usage of every kind;
    a ``ValueError`` too, as the configuration dataclasses' checks raise it."""
