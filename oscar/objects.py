"""OSCAR protected objects: seal, verify without a secret, and open (DESIGN §4).

A protected object is a tagged COSE_Sign1 whose payload is a tagged COSE_Encrypt0 (encrypt, then
sign). The wire layout is pinned in DESIGN §4 and described with a worked example in
``docs/PROTOCOL.md``; this package's modules are its reference implementation, and this module is
their one public face: it re-exports them, so ``from oscar.objects import …`` is all a caller needs.

==========================  =====================================================================
:mod:`oscar.model`          the header labels, :class:`ObjectMetadata`, :class:`Reading`, limits,
                            :func:`object_etag`, :func:`external_aad`
:mod:`oscar.decoding`       :class:`ProtectedObject` and the generic strict decoder
:mod:`oscar.pinned`         the fast reader of the pinned layout (the decoder's first try)
:mod:`oscar.sealer`         :class:`Sealer` and :func:`seal`
:mod:`oscar.opening`        :func:`verify`, :func:`open`, :func:`open_verified`, and for large
                            objects :func:`verify_stream`, :func:`open_verified_stream`
:mod:`oscar.streaming`      :class:`ObjectReader`: an object read as it arrives, bounded memory
:mod:`oscar.aeadstream`     decrypting a long ciphertext in pieces, after its tag verifies
==========================  =====================================================================

Incoming objects go through the checks in DESIGN order, and any failure raises the one opaque
:class:`~oscar.errors.InvalidObject` (its ``reason`` is for the local log):

1. size limit, before any decoding;
2. strict CBOR and exact structure: tags 18 and 16, exactly the pinned header labels and types,
   an empty unprotected Sign1 header, a minimal Partial IV equal to the signed ``seq``;
3. known algorithms only, read from the protected headers only;
4. the signer: a certificate must chain to the trust anchor (when one is given), be valid at ``now``
   and name the producer in ``iss``; ``sub`` must be a resource of that producer; ``kid`` must be
   the signer key's id;
5. the signature;
6. expiry and an ``iat`` not too far ahead, then freshness (replay and rollback against
   :class:`~oscar.freshness.FreshnessState`);
7. decryption, with ``[producer, resource, epoch, seq]`` as external AAD.

Checks 1 to 3 are :meth:`ProtectedObject.from_bytes`; :func:`verify` stops after step 6's expiry
check and needs no secret (the proxy's view); :func:`open` does everything and records the object
as the newest accepted.

What these modules do not do: look up certificates or secrets themselves (the caller hands in a
key, a certificate or a lookup function), keep time (``now`` is an argument), or allocate sequence
numbers (see :mod:`oscar.sequence`).
"""

from __future__ import annotations

from .decoding import ProtectedObject
from .model import (
    CONTENT_FORMAT_COSE_SIGN1,
    CWT_CLAIMS,
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_OBJECT_SIZE,
    EPOCH,
    EXP,
    IAT,
    ISS,
    SEQ,
    SUB,
    ObjectMetadata,
    Reading,
    external_aad,
    object_etag,
)
from .opening import (
    Signer,
    SignerLookup,
    open,
    open_verified,
    open_verified_stream,
    verify,
    verify_stream,
)
from .sealer import Sealer, seal
from .streaming import ObjectReader, StreamedObject

__all__ = [
    "CONTENT_FORMAT_COSE_SIGN1",
    "CWT_CLAIMS",
    "DEFAULT_MAX_CLOCK_SKEW",
    "DEFAULT_MAX_OBJECT_SIZE",
    "EPOCH",
    "EXP",
    "IAT",
    "ISS",
    "SEQ",
    "SUB",
    "ObjectMetadata",
    "ObjectReader",
    "ProtectedObject",
    "Reading",
    "Sealer",
    "Signer",
    "SignerLookup",
    "StreamedObject",
    "external_aad",
    "object_etag",
    "open",
    "open_verified",
    "open_verified_stream",
    "seal",
    "verify",
    "verify_stream",
]
