"""OSCAR: object security for CoAP — the shared library every role stands on.

It seals resource representations into protected objects (COSE_Sign1 over COSE_Encrypt0, DESIGN §4),
verifies them without a secret, opens them, and keeps the state that makes that safe: freshness per
resource and never-reused sequence numbers. It does no I/O: time, randomness and persistence come in
from the caller (the roles, and the ``oscar`` command-line tool in :mod:`oscar_io.tool`).

Modules: :mod:`~oscar.cbor` (strict decoding), :mod:`~oscar.cose` (COSE messages),
:mod:`~oscar.algorithms` and :mod:`~oscar.profiles`, :mod:`~oscar.keys` (access secrets, HKDF),
:mod:`~oscar.objects` (seal/verify/open), :mod:`~oscar.freshness`, :mod:`~oscar.sequence`,
:mod:`~oscar.certs`, :mod:`~oscar.errors`.
"""

from __future__ import annotations

from .certs import ProducerKey, SigningKey
from .errors import (
    CertificateError,
    InvalidObject,
    OscarError,
    PlaintextTooLarge,
    SequenceUnavailable,
)
from .freshness import FreshnessState
from .keys import AccessSecret, ContentKeys, KeyCache
from .objects import (
    CONTENT_FORMAT_COSE_SIGN1,
    ObjectMetadata,
    ProtectedObject,
    Reading,
    Sealer,
    object_etag,
    open,
    open_verified,
    seal,
    verify,
)
from .profiles import DEFAULT_PROFILE, PROFILES, Profile, profile_by_name
from .sequence import SequenceAllocator, SequenceStore

__version__ = "0.1.0"

__all__ = [
    "CONTENT_FORMAT_COSE_SIGN1",
    "DEFAULT_PROFILE",
    "PROFILES",
    "AccessSecret",
    "CertificateError",
    "ContentKeys",
    "FreshnessState",
    "InvalidObject",
    "KeyCache",
    "ObjectMetadata",
    "OscarError",
    "PlaintextTooLarge",
    "ProducerKey",
    "Profile",
    "ProtectedObject",
    "Reading",
    "Sealer",
    "SequenceAllocator",
    "SequenceStore",
    "SequenceUnavailable",
    "SigningKey",
    "object_etag",
    "open",
    "open_verified",
    "profile_by_name",
    "seal",
    "verify",
]
