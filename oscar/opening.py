"""Verifying and opening protected objects: checks 4 to 7 of :mod:`oscar.objects`.

:func:`verify` checks an object without any secret (the proxy's view): the signer, the signature,
expiry and ``iat``. :func:`open` verifies, checks freshness, decrypts and records the object as the
newest accepted; :func:`open_verified` is its second half, for a caller that must fetch the secret
after the signature has been checked. :func:`verify_stream` and :func:`open_verified_stream` are
the same for a large object read as it arrived (:mod:`oscar.streaming`): the same checks in the
same order, the ciphertext authenticated whole before any plaintext is written
(:mod:`oscar.aeadstream`). Every failure raises the one opaque :class:`~oscar.errors.InvalidObject`.

What this module does not do: decode (:mod:`oscar.decoding`), look up certificates or secrets
itself (the caller hands in a key, a certificate or a lookup function), or keep time (``now`` is an
argument).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Protocol, TypeAlias

from cryptography import x509

from . import certs
from .aeadstream import Pass, Write, decrypt_to
from .algorithms import PublicKey
from .cose import Encrypt0
from .decoding import ProtectedObject
from .errors import CertificateError, InvalidObject
from .freshness import FreshnessState
from .keys import ContentKeys, KeyCache, SecretLookup
from .model import (
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_OBJECT_SIZE,
    ObjectMetadata,
    Reading,
    external_aad,
)
from .streaming import StreamedObject

__all__ = [
    "Signer",
    "SignerLookup",
    "open",
    "open_verified",
    "open_verified_stream",
    "resolve_signer",
    "verify",
    "verify_stream",
]

#: The signer of an object: a trusted :class:`~oscar.certs.ProducerKey` (fastest), a certificate
#: (checked on every call), or a bare public key.
Signer: TypeAlias = "certs.ProducerKey | x509.Certificate | PublicKey"
#: Finds the signer of (producer id, kid), or None when unknown.
SignerLookup = Callable[[str, bytes], "Signer | None"]


class _Signed(Protocol):
    """What :func:`resolve_signer` reads of an object's signed header."""

    @property
    def producer_id(self) -> str: ...
    @property
    def kid(self) -> bytes: ...


def resolve_signer(
    m: _Signed,
    signer: Signer | SignerLookup,
    now: int,
    trust_anchor: x509.Certificate | None,
    revoked_serials: Container[int],
) -> PublicKey:
    """The public key of the signer of an object whose signed header says ``m`` (producer id and
    kid): check 4 of :mod:`oscar.objects`. Raises :class:`InvalidObject` if the signer is unknown
    or not acceptable. (Also used for multi-part objects, :mod:`oscar.partsopening`.)"""
    if type(signer) is certs.ProducerKey and (
        trust_anchor is None or signer.anchor is trust_anchor
    ):
        # The usual case, a key checked once and kept: none of the conversions below.
        try:
            signer.check(m.producer_id, now, revoked_serials)
        except CertificateError as exc:
            raise InvalidObject(f"signer not acceptable: {exc}") from None
        if signer.kid != m.kid:
            raise InvalidObject("kid does not identify the signer's key")
        return signer.public_key
    if not isinstance(signer, (certs.ProducerKey, x509.Certificate)) and callable(signer):
        found = signer(m.producer_id, m.kid)
        if found is None:
            raise InvalidObject("signer unknown")
        signer = found
    try:
        if isinstance(signer, certs.ProducerKey):
            key = signer
            if trust_anchor is not None and key.anchor != trust_anchor:
                raise CertificateError("the signer key was not checked against the trust anchor")
        elif isinstance(signer, x509.Certificate):
            # A certificate, whether handed in or found, is only as good as its chain. To trust
            # one without a CA, the caller says so by making a ProducerKey from it.
            if trust_anchor is None:
                raise CertificateError("a certificate signer needs a trust anchor")
            key = certs.ProducerKey.from_certificate(
                signer, trust_anchor, now=now, revoked_serials=revoked_serials
            )
        else:
            if trust_anchor is not None:
                raise CertificateError("a bare public key cannot chain to the trust anchor")
            key = certs.ProducerKey.from_public_key(signer)
        key.check(m.producer_id, now, revoked_serials)
    except CertificateError as exc:
        raise InvalidObject(f"signer not acceptable: {exc}") from None
    except ValueError:
        raise InvalidObject("signer not acceptable: unsupported key") from None
    if key.kid != m.kid:
        raise InvalidObject("kid does not identify the signer's key")
    return key.public_key


def verify(
    data: bytes | ProtectedObject,
    *,
    signer: Signer | SignerLookup,
    now: int,
    resource_id: str | None = None,
    trust_anchor: x509.Certificate | None = None,
    revoked_serials: Container[int] = (),
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
    max_size: int = DEFAULT_MAX_OBJECT_SIZE,
) -> ProtectedObject:
    """Check an object without any secret: structure, signer, signature, times.

    ``signer`` is a :class:`~oscar.certs.ProducerKey`, the producer's certificate or public key, or
    a function of (producer id, kid) returning one. A certificate needs ``trust_anchor`` and must
    chain to it; with ``trust_anchor`` set, a ``ProducerKey`` must have been checked against that
    same anchor and a bare public key is refused. ``resource_id``, when given, is the resource the
    caller asked for: an object of any other resource is refused. An object is refused after its
    ``exp`` and when its ``iat`` lies more than ``max_clock_skew`` seconds ahead of ``now``.

    ``data`` may be an object the caller has decoded already (to find its signer, say), so that
    it is not decoded twice. Returns the decoded object; raises :class:`InvalidObject` if any
    check fails.
    """
    obj = (
        data
        if isinstance(data, ProtectedObject)
        else ProtectedObject.from_bytes(data, max_size=max_size)
    )
    _check(obj, signer, now, resource_id, trust_anchor, revoked_serials, max_clock_skew)
    return obj


def verify_stream(
    obj: StreamedObject,
    *,
    signer: Signer | SignerLookup,
    now: int,
    resource_id: str | None = None,
    trust_anchor: x509.Certificate | None = None,
    revoked_serials: Container[int] = (),
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
) -> StreamedObject:
    """:func:`verify` for an object read as it arrived (:class:`~oscar.streaming.ObjectReader`):
    the same checks in the same order, its signature checked from the digest of its message.
    Returns ``obj``; raises :class:`InvalidObject` if any check fails."""
    _check(obj, signer, now, resource_id, trust_anchor, revoked_serials, max_clock_skew)
    return obj


def _check(
    obj: ProtectedObject | StreamedObject,
    signer: Signer | SignerLookup,
    now: int,
    resource_id: str | None,
    trust_anchor: x509.Certificate | None,
    revoked_serials: Container[int],
    max_clock_skew: int,
) -> None:
    m = obj.metadata
    if resource_id is not None and m.resource_id != resource_id:
        raise InvalidObject("object is for another resource")
    public_key = resolve_signer(m, signer, now, trust_anchor, revoked_serials)
    if isinstance(obj, StreamedObject):
        obj.verify_signature(public_key)
    else:
        obj.sign1.verify(public_key, m.signature_algorithm)
    if now > m.exp:
        raise InvalidObject("object expired")
    if m.iat > now + max_clock_skew:
        raise InvalidObject("object issued in the future")


def open(
    data: bytes,
    *,
    secrets: SecretLookup | KeyCache,
    signer: Signer | SignerLookup,
    now: int,
    resource_id: str | None = None,
    freshness: FreshnessState | None = None,
    trust_anchor: x509.Certificate | None = None,
    revoked_serials: Container[int] = (),
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
    max_size: int = DEFAULT_MAX_OBJECT_SIZE,
) -> Reading:
    """Verify (see :func:`verify`), check freshness, decrypt; return plaintext and metadata.

    ``secrets`` finds the access secret of (resource id, epoch) (a :class:`KeyCache` also keeps
    derived keys). With ``freshness`` the object must be newer than every object accepted before for
    its resource, and is recorded as the newest once it has decrypted. Raises :class:`InvalidObject`
    if any check fails; nothing is recorded then.
    """
    obj = verify(
        data,
        signer=signer,
        now=now,
        resource_id=resource_id,
        trust_anchor=trust_anchor,
        revoked_serials=revoked_serials,
        max_clock_skew=max_clock_skew,
        max_size=max_size,
    )
    return open_verified(obj, secrets=secrets, freshness=freshness)


def open_verified(
    obj: ProtectedObject,
    *,
    secrets: SecretLookup | KeyCache,
    freshness: FreshnessState | None = None,
) -> Reading:
    """The second half of :func:`open`, for an object :func:`verify` has just accepted: check
    freshness, decrypt, record. A caller that must fetch the secret between the two (a consumer
    asking the AS) verifies first, so that only a signed object can make it ask."""
    m = obj.metadata
    if freshness is not None:
        freshness.check(m.resource_id, m.epoch, m.seq)
    keys = _content_keys(secrets, m)
    aad = Encrypt0.to_be_encrypted(
        obj.encrypt0.protected, external_aad(m.producer_id, m.resource_id, m.epoch, m.seq)
    )
    plaintext = m.aead.decrypt(keys.cipher, keys.nonce(m.seq), obj.encrypt0.ciphertext, aad)
    if freshness is not None:
        freshness.accept(m.resource_id, m.epoch, m.seq)
    return Reading(plaintext, m)


def open_verified_stream(
    obj: StreamedObject,
    ciphertext: Pass,
    write: Write,
    *,
    secrets: SecretLookup | KeyCache,
    freshness: FreshnessState | None = None,
) -> ObjectMetadata:
    """:func:`open_verified` for an object read as it arrived and that :func:`verify` has just
    accepted: check freshness, authenticate the whole ciphertext, then decrypt it into ``write``
    (:func:`oscar.aeadstream.decrypt_to`), record. ``ciphertext`` makes a fresh pass over the
    object's ciphertext (tag included: ``obj.ciphertext_length`` bytes from
    ``obj.ciphertext_offset`` of the object). What ``write`` received is released only when
    this returns: on :class:`InvalidObject` the caller discards it. Returns the metadata."""
    m = obj.metadata
    if freshness is not None:
        freshness.check(m.resource_id, m.epoch, m.seq)
    keys = _content_keys(secrets, m)
    aad = Encrypt0.to_be_encrypted(
        obj.encrypt0_protected, external_aad(m.producer_id, m.resource_id, m.epoch, m.seq)
    )
    decrypt_to(m.aead, keys.key, keys.nonce(m.seq), aad, ciphertext, obj.ciphertext_length, write)
    if freshness is not None:
        freshness.accept(m.resource_id, m.epoch, m.seq)
    return m


def _content_keys(secrets: SecretLookup | KeyCache, m: ObjectMetadata) -> ContentKeys:
    if isinstance(secrets, KeyCache):
        keys = secrets.keys_for(m.resource_id, m.epoch, m.aead)
    else:
        secret = secrets(m.resource_id, m.epoch)
        keys = (
            None if secret is None else ContentKeys.derive(secret, m.resource_id, m.epoch, m.aead)
        )
    if keys is None:
        raise InvalidObject("no access secret for this resource and epoch")
    return keys
