"""Whom a consumer or a proxy believes: producer keys certified by the AS CA, minus what the CA
revoked.

:class:`Trust` answers two questions for the consumer's pipeline (:mod:`consumer.client`) and the
proxy's verify-before-cache (:mod:`proxy.core`):

- :meth:`Trust.signer`: the :class:`~oscar.certs.ProducerKey` of an object's ``kid``, from the
  certificate cache while the certificate is valid, else from the AS (``GET /cert?kid=``). Every
  certificate, cached or fresh, is checked against the bundle's CA certificate once per process.
  An AS that knows no such key (4.04) makes the object rejected (unknown signer); that answer is
  remembered for :data:`UNKNOWN_SIGNER_BACKOFF` seconds, so junk objects cannot make the consumer
  ask the AS again and again.
- :meth:`Trust.revoked_serials`: the serial numbers on the CA's current revocation list, from the
  cache until its ``next_update``, else from the AS (``GET /crl``). A CRL must be signed by the
  bundle's CA and be current. If the cached one is stale and the AS cannot be reached, the answer
  is :class:`~oscar_io.coaperrors.TransportError`: the consumer (or proxy) fails closed rather
  than trust a key that may have been revoked meanwhile.
- :meth:`Trust.check`: all of an object's checks that need no secret, on top of the two above
  (the consumer's pipeline and the proxy's verify-before-cache); :meth:`Trust.check_any` the
  same for a single-part or a multi-part object (:mod:`oscar.parts`), for the proxy, which
  caches both without reading either.

What it needs is narrow: a :class:`TrustStore` (what was learnt, kept between runs:
:class:`oscar_io.localstore.TrustCache`) and a :class:`CertificateSource` (the two AS lookups:
:class:`~oscar_io.asclient.AsClient`, or the proxy's budgeted stand-in), made on first use (the
AS client's DTLS transport loads then), so a device that has all it needs cached never touches
the AS.

Errors: :class:`~oscar.errors.InvalidObject` (the object or its signer is not acceptable),
:class:`~oscar_io.coaperrors.TransportError` (the AS is needed and cannot be reached, or its
CRL is unusable), :class:`~oscar_io.errors.AccessDenied` (the AS refused this device a
certificate lookup); the AS client's other errors are translated here. What this module does
not do: fetch secrets or decrypt.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from oscar.certs import ProducerKey, key_id
from oscar.errors import CertificateError, InvalidObject
from oscar.objects import (
    DEFAULT_MAX_OBJECT_SIZE,
    ProtectedObject,
    StreamedObject,
    verify,
    verify_stream,
)
from oscar.parts import MultiPartObject
from oscar.partsopening import verify_parts

from .bundle import Bundle
from .coaperrors import TransportError
from .errors import AccessDenied, AsError, AsUnavailable
from .localstore import CachedCrl

__all__ = ["UNKNOWN_SIGNER_BACKOFF", "CertificateSource", "Trust", "TrustStore"]

log = logging.getLogger("oscar.trust")

#: Seconds an unknown kid is not asked about again.
UNKNOWN_SIGNER_BACKOFF = 60.0
#: How far a CRL's ``last_update`` may lie ahead of our clock.
_MAX_CLOCK_SKEW = 300


class TrustStore(Protocol):
    """Where :class:`Trust` keeps what it learnt (:class:`oscar_io.localstore.TrustCache`)."""

    @property
    def crl(self) -> CachedCrl | None: ...

    def certificate(self, kid: bytes, now: int) -> bytes | None: ...

    def put_certificate(self, kid: bytes, der: bytes, not_after: int) -> None: ...

    def put_crl(self, der: bytes, next_update: int) -> None: ...


class CertificateSource(Protocol):
    """The two AS lookups :class:`Trust` makes (:class:`~oscar_io.asclient.AsClient` has them).
    Raises what the AS client raises: :class:`AsError` and its subclasses."""

    async def certificate(self, *, kid: bytes) -> bytes: ...

    async def revocation_list(self) -> x509.CertificateRevocationList: ...


def _seconds(moment: datetime.datetime) -> int:
    return int(moment.timestamp())


class Trust:
    """Producer keys and revocation for one device, remembered in its :class:`TrustStore`;
    ``as_client`` makes (once, when first needed) the :class:`CertificateSource` to ask."""

    def __init__(
        self,
        bundle: Bundle,
        store: TrustStore,
        as_client: Callable[[], Awaitable[CertificateSource]],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bundle = bundle
        self._anchor = bundle.ca_certificate
        self._store = store
        self._as_client = as_client
        self._monotonic = monotonic
        self._keys: dict[bytes, ProducerKey] = {}
        self._unknown: dict[bytes, float] = {}
        self._revoked: frozenset[int] | None = None
        self._crl_next_update = -1

    def __repr__(self) -> str:
        return f"Trust(keys={len(self._keys)}, crl_next_update={self._crl_next_update})"

    # --- signer keys ------------------------------------------------------------------------------

    async def signer(self, kid: bytes, now: int) -> ProducerKey:
        """The checked key of ``kid``, valid at ``now``.

        Raises :class:`InvalidObject` when the AS knows no such key or its certificate is not
        acceptable, :class:`TransportError` when the AS must be asked and cannot be reached.
        """
        key = self._keys.get(kid)
        if key is not None and key.not_after is not None and now <= key.not_after:
            return key
        der = self._store.certificate(kid, now)
        if der is not None:
            key = self._check(kid, der, now)
            self._keys[kid] = key
            return key
        der = await self._fetch_certificate(kid)
        key = self._check(kid, der, now)
        self._keys[kid] = key
        # from_certificate always sets not_after; without one, cache it for no time at all.
        self._store.put_certificate(kid, der, key.not_after if key.not_after is not None else now)
        log.info("certificate of %s (kid %s) from the AS", key.producer_id, kid.hex())
        return key

    async def _fetch_certificate(self, kid: bytes) -> bytes:
        asked = self._unknown.get(kid)
        if asked is not None and self._monotonic() - asked < UNKNOWN_SIGNER_BACKOFF:
            raise InvalidObject("signer unknown")
        client = await self._as_client()
        try:
            return await client.certificate(kid=kid)
        except AsUnavailable as exc:
            raise TransportError(f"cannot get the signer's certificate: {exc}") from None
        except AccessDenied:
            raise
        except AsError as exc:
            if exc.code == "4.04":
                self._unknown[kid] = self._monotonic()
                if len(self._unknown) > 1024:
                    self._unknown.pop(next(iter(self._unknown)))
                raise InvalidObject("signer unknown") from None
            raise TransportError(f"cannot get the signer's certificate: {exc}") from None

    def _check(self, kid: bytes, der: bytes, now: int) -> ProducerKey:
        try:
            certificate = x509.load_der_x509_certificate(der)
            key = ProducerKey.from_certificate(certificate, self._anchor, now=now)
        except CertificateError as exc:
            raise InvalidObject(f"signer not acceptable: {exc}") from None
        except ValueError:
            raise InvalidObject("signer not acceptable: malformed certificate") from None
        if key.kid != kid or key_id(key.public_key) != kid:
            raise InvalidObject("kid does not identify the signer's key")
        return key

    # --- revocation -------------------------------------------------------------------------------

    async def check(
        self, data: bytes, resource_id: str, now: int, *, max_size: int = DEFAULT_MAX_OBJECT_SIZE
    ) -> tuple[ProtectedObject, ProducerKey]:
        """Everything that needs no secret, in order: decoding, the resource, the signer's
        certificate (the one thing asked of the AS before the signature is checked), the
        signature and times, then revocation. The consumer's pipeline and the proxy's
        verify-before-cache both stand on it.

        Raises :class:`InvalidObject`, :class:`TransportError`, :class:`AccessDenied`.
        """
        obj = ProtectedObject.from_bytes(data, max_size=max_size)
        key = await self._checked(obj, resource_id, now)
        return obj, key

    async def check_any(
        self, data: bytes, resource_id: str, now: int, *, max_size: int = DEFAULT_MAX_OBJECT_SIZE
    ) -> tuple[ProtectedObject | MultiPartObject, ProducerKey]:
        """:meth:`check` for a single-part object, else the same checks, in the same order, for
        a multi-part one (:func:`oscar.verify_parts`); an object that is neither is refused
        with the single-part decoder's reason."""
        try:
            single = ProtectedObject.from_bytes(data, max_size=max_size)
        except InvalidObject as exc:
            try:
                multi = MultiPartObject.from_bytes(data, max_size=max_size)
            except InvalidObject:
                raise exc from None
            key = await self._checked(multi, resource_id, now)
            return multi, key
        return single, await self._checked(single, resource_id, now)

    async def check_stream(
        self, obj: StreamedObject, resource_id: str, now: int
    ) -> tuple[StreamedObject, ProducerKey]:
        """:meth:`check` for an object read as it arrived (:class:`oscar.streaming.ObjectReader`
        did the decoding and the size limit): the same checks, in the same order."""
        key = await self._checked(obj, resource_id, now)
        return obj, key

    async def _checked(
        self, obj: ProtectedObject | StreamedObject | MultiPartObject, resource_id: str, now: int
    ) -> ProducerKey:
        m = obj.metadata
        if m.resource_id != resource_id:
            raise InvalidObject("object is for another resource")
        key = await self.signer(m.kid, now)
        if isinstance(obj, MultiPartObject):
            verify_parts(
                obj, signer=key, now=now, resource_id=resource_id, trust_anchor=self._anchor
            )
        elif isinstance(obj, StreamedObject):
            verify_stream(
                obj, signer=key, now=now, resource_id=resource_id, trust_anchor=self._anchor
            )
        else:
            verify(obj, signer=key, now=now, resource_id=resource_id, trust_anchor=self._anchor)
        revoked = await self.revoked_serials(now)
        try:
            key.check(m.producer_id, now, revoked)
        except CertificateError as exc:
            raise InvalidObject(f"signer not acceptable: {exc}") from None
        return key

    async def revoked_serials(self, now: int) -> frozenset[int]:
        """The serials the CA has revoked, from a CRL current at ``now``.

        Raises :class:`TransportError` when no current CRL is cached and the AS cannot give one.
        """
        if self._revoked is not None and now <= self._crl_next_update:
            return self._revoked
        cached = self._store.crl
        if cached is not None and now <= cached.next_update:
            try:
                self._adopt(cached.der, now)
                return self._revoked_or_fail()
            except TransportError:
                log.warning("the cached CRL does not verify; asking the AS for a new one")
        client = await self._as_client()
        try:
            crl = await client.revocation_list()
        except (AsUnavailable, AccessDenied) as exc:
            raise TransportError(f"cannot check revocation: AS unavailable ({exc})") from None
        except AsError as exc:
            raise TransportError(f"cannot check revocation: {exc}") from None
        der = crl.public_bytes(serialization.Encoding.DER)
        next_update = self._adopt(der, now)
        self._store.put_crl(der, next_update)
        return self._revoked_or_fail()

    def _revoked_or_fail(self) -> frozenset[int]:
        if self._revoked is None:  # pragma: no cover - _adopt sets it or raises
            raise TransportError("cannot check revocation: no CRL")
        return self._revoked

    def _adopt(self, der: bytes, now: int) -> int:
        """Check a CRL (DER) and make it the current one; returns its ``next_update``."""
        try:
            crl = x509.load_der_x509_crl(der)
            valid = crl.is_signature_valid(self._anchor.public_key())  # type: ignore[arg-type]
        except (ValueError, TypeError):
            valid = False
        if not valid or crl.issuer != self._anchor.subject:
            raise TransportError("cannot check revocation: the CRL is not signed by the CA")
        next_update = crl.next_update_utc
        if next_update is None:
            raise TransportError("cannot check revocation: the CRL has no next update")
        if _seconds(crl.last_update_utc) > now + _MAX_CLOCK_SKEW or now > _seconds(next_update):
            raise TransportError("cannot check revocation: the CRL is not current")
        self._revoked = frozenset(entry.serial_number for entry in crl)
        self._crl_next_update = _seconds(next_update)
        return self._crl_next_update
