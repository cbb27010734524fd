"""A TLS certificate from the AS CA for a key made at start (devices that hold none: the proxy).

:func:`issue_for_tls` makes a new ECDSA P-256 key in memory, asks the AS to certify it (``POST
/cert``, over the device's DTLS session: the AS certifies the *authenticated* device id), checks
the answer (issued by the bundle's CA, naming this device, valid now, certifying this key) and
returns both as PEM for :func:`oscar_io.coaptcp.server_tls`/``client_tls``. The key never touches
a disk; a restart asks for a new certificate. What this module does not do: renew a certificate
while the process runs (its validity is the AS's, a year by default), or store anything.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from oscar import certs
from oscar.errors import CertificateError

from .asclient import AsClient
from .bundle import Bundle

__all__ = ["issue_for_tls"]


async def issue_for_tls(client: AsClient, bundle: Bundle, now: int) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``bundle``'s device. Raises ``AsError`` (AS away or
    refusing) and :class:`CertificateError` (an answer that does not check out)."""
    key = certs.generate_signing_key("ES256")
    csr = certs.make_csr(key, bundle.device_id)
    der = await client.request_certificate(csr.public_bytes(Encoding.DER))
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        raise CertificateError("the AS's certificate is not DER") from None
    public = certs.check_certificate(
        certificate, bundle.ca_certificate, device_id=bundle.device_id, now=now
    )
    if certs.key_id(public) != certs.key_id(key.public_key()):
        raise CertificateError("the AS certified another key")
    return certificate.public_bytes(Encoding.PEM), certs.private_key_pem(key)
