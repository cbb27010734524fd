"""The producer's certificate from the AS CA: the stored one while it is usable, else a new one.

At start (:func:`ensure_certificate`) the certificate in the state directory is kept when it is
valid under the bundle's CA, names this producer and its signing key, and has more than
:data:`RENEW_FRACTION` of its validity left. Otherwise the producer sends the AS a CSR for its key;
when the AS cannot be reached or refuses, a stored certificate that is still valid is used (one
warning), and without one the producer cannot start (:class:`~producer.errors.ProducerError`).
A certificate the AS issued is checked the same way before it is stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from oscar import certs
from oscar.errors import CertificateError
from oscar_io.asclient import AsClient
from oscar_io.errors import AsError

from .errors import ProducerError
from .state import ProducerState

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["RENEW_FRACTION", "ensure_certificate", "usable_certificate"]

log = logging.getLogger("oscar.producer")

#: Renew the certificate when less than this share of its validity is left.
RENEW_FRACTION = 0.2


async def ensure_certificate(
    state: ProducerState,
    signing_key: certs.SigningKey,
    device_id: str,
    ca: x509.Certificate,
    client: AsClient,
    now: int,
) -> bytes:
    """The PEM certificate to use: the stored one, or one the AS issues now (then stored)."""
    pem = state.certificate_pem()
    if pem is not None and usable_certificate(pem, ca, signing_key, device_id, now, renew=True):
        return pem
    from cryptography.hazmat.primitives.serialization import Encoding

    csr = certs.make_csr(signing_key.private_key, device_id)
    try:
        der = await client.request_certificate(csr.public_bytes(Encoding.DER))
    except AsError as exc:
        if pem is not None and usable_certificate(
            pem, ca, signing_key, device_id, now, renew=False
        ):
            log.warning("certificate renewal failed (%s); using the current one", exc)
            return pem
        raise ProducerError(f"cannot get a certificate from the AS: {exc}") from None
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    new_pem = cert.public_bytes(Encoding.PEM)
    if not usable_certificate(new_pem, ca, signing_key, device_id, now, renew=False):
        raise ProducerError("the AS issued a certificate that does not fit this producer")
    state.save_certificate(new_pem)
    log.info("certificate %x issued by the AS", cert.serial_number)
    return new_pem


def usable_certificate(
    pem: bytes,
    ca: x509.Certificate,
    signing_key: certs.SigningKey,
    device_id: str,
    now: int,
    *,
    renew: bool,
) -> bool:
    """Whether ``pem`` is valid at ``now`` under ``ca`` for this producer and key; with
    ``renew``, also whether more than :data:`RENEW_FRACTION` of its validity is left."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        key = certs.ProducerKey.from_certificate(cert, ca, now=now)
    except (ValueError, CertificateError) as exc:
        log.warning("stored certificate not usable: %s", exc)
        return False
    if key.kid != signing_key.kid or key.producer_id != device_id:
        return False
    if renew and key.not_after is not None and key.not_before is not None:
        left = key.not_after - now
        return left > RENEW_FRACTION * (key.not_after - key.not_before)
    return True
