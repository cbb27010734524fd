"""OSCAR: object security for CoAP — the pure core every role stands on.

It seals resource representations into protected objects (COSE_Sign1 over COSE_Encrypt0, DESIGN §4),
verifies them without a secret, opens them, and keeps the state that makes that safe: freshness per
resource and never-reused sequence numbers.

It does no I/O: no asyncio, sockets, processes, databases, files, environment or clock. Time comes
in as an argument (``now``, ``iat``, ``exp``), state that must survive a restart through an
interface (:class:`~oscar.sequence.SequenceStore`), secrets and keys from the caller. The one
exception is :func:`oscar.certs.generate_signing_key`, which takes randomness from the operating
system through ``cryptography`` for the callers that make keys (the AS's CA, the operator tool).
``tests/core/test_core_purity.py`` and the import-linter contracts hold the package to this.
Everything with I/O is in :mod:`oscar_io` (the runtime, including the ``oscar`` tool,
:mod:`oscar_io.tool`) and the roles.

Modules, from the bottom up::

    errors        the exception tree below
    cbor          strict CBOR decoding, encoding, diagnostic notation
    names         device and resource ids
    algorithms    the COSE AEADs and signatures: the one place their primitives are called
    profiles      the named (AEAD, signature) pairs
    keys          access secrets, HKDF content keys, the derived-key cache
    cose          COSE_Sign1 and COSE_Encrypt0 messages
    certs         signing keys, CSRs, certificates under the AS CA, their checks
    freshness     replay and rollback state per resource
    sequence      sequence numbers never reused, over a caller's store
    protected objects (DESIGN §4), all re-exported by ``objects``:
      model       header labels, ObjectMetadata, Reading, ETag, external AAD
      pinned      the fast reader of the pinned layout
      decoding    ProtectedObject and the generic strict decoder (checks 1 to 3)
      sealer      Sealer, seal
      opening     verify, open, open_verified (checks 4 to 7)
      objects     the public face of the five above
    multi-part objects (plain and partial access, docs/PROTOCOL.md "Multi-part objects"):
      parts        Part, seal_parts, MultiPartObject and its strict decoder
      partsopening verify_parts, open_parts, open_parts_verified (per part: opened / not granted)

The exception tree (:mod:`oscar.errors`; every exception class of the core is defined there)::

    Exception
    ├── OscarError                     base of everything the library raises on purpose
    │   ├── InvalidObject              incoming protected data failed a check (opaque; ``reason``
    │   │                              is for the local log)
    │   ├── CertificateError           a certificate is not acceptable for the use asked
    │   └── SequenceUnavailable        no sequence number can be guaranteed fresh: refuse to seal
    └── ValueError / TypeError         misuse by the caller (bad argument, unknown profile name)
        ├── PlaintextTooLarge          (also an OscarError) the profile's AEAD cannot seal that much
        └── MalformedCBOR              not strict CBOR (from :func:`oscar.cbor.loads`; the COSE and
                                       object decoders turn it into InvalidObject)

``cryptography``'s exceptions are translated in :mod:`oscar.algorithms` (tags, signatures) and
:mod:`oscar.certs` (keys, certificates), and nowhere else.
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
from .parts import MultiPartObject, Part, PartsMetadata, seal_parts
from .partsopening import OpenedPart, PartsReading, open_parts, open_parts_verified, verify_parts
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
    "MultiPartObject",
    "ObjectMetadata",
    "OpenedPart",
    "OscarError",
    "Part",
    "PartsMetadata",
    "PartsReading",
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
    "open_parts",
    "open_parts_verified",
    "open_verified",
    "profile_by_name",
    "seal",
    "seal_parts",
    "verify",
    "verify_parts",
]
