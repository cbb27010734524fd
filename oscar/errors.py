"""The exception hierarchy of the oscar library: every exception class of the core is here.

::

    Exception
    ├── OscarError                     base of everything the library raises on purpose
    │   ├── InvalidObject              incoming protected data failed a check (opaque)
    │   ├── CertificateError           a certificate is not acceptable for the use asked
    │   └── SequenceUnavailable        no sequence number can be guaranteed fresh: refuse to seal
    └── ValueError / TypeError         misuse by the caller (bad argument, unknown profile name)
        ├── PlaintextTooLarge          (also an OscarError) the profile's AEAD cannot seal that much
        └── MalformedCBOR              bytes handed to :func:`oscar.cbor.loads` are not strict CBOR
                                       (the COSE and object decoders turn it into InvalidObject)

``InvalidObject`` is deliberately opaque: ``str()`` never says which check failed, so a peer that
is shown the message learns nothing. The failed check is kept in ``reason`` for the local log. A
reason is always built from the library's own fixed phrases, never from a value taken from the
object or from a secret.

Foreign exceptions are translated at one place each: ``cryptography``'s failed tag or signature
(``InvalidTag``, ``InvalidSignature``) in :mod:`oscar.algorithms` (in
:mod:`oscar.aeadstream` for the AEADs run in pieces), its certificate failures in
:mod:`oscar.certs`, the CBOR decoder's ``MalformedCBOR`` in :mod:`oscar.cose`. The pinned reader's
``_NotPinned`` is control flow that never leaves :mod:`oscar.pinned`.

This module does not log, and it does not map errors to CoAP codes: the roles do that.
"""

from __future__ import annotations

__all__ = [
    "CertificateError",
    "InvalidObject",
    "MalformedCBOR",
    "OscarError",
    "PlaintextTooLarge",
    "SequenceUnavailable",
]


class OscarError(Exception):
    """Base class of the errors the oscar library raises on purpose."""


class InvalidObject(OscarError):
    """A protected object (or a COSE message) failed a check.

    ``reason`` says which check, for the local log only; ``str(exc)`` is the same for every failure.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("invalid protected object")
        self.reason = reason

    def __repr__(self) -> str:
        return f"InvalidObject(reason={self.reason!r})"


class CertificateError(OscarError):
    """A certificate does not chain to the trust anchor, is not valid now, or names someone else."""


class SequenceUnavailable(OscarError):
    """The sequence-number allocator cannot guarantee an unused number, so nothing may be sealed."""


class PlaintextTooLarge(OscarError, ValueError):
    """The plaintext is longer than the profile's AEAD can seal (AES-CCM-16-*: 65,535 bytes)."""


class MalformedCBOR(ValueError):
    """The bytes are not CBOR of the strict subset :mod:`oscar.cbor` accepts."""
