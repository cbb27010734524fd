"""Producer signing keys and their X.509 certificates under the AS CA (DESIGN §2).

- :func:`key_id`: the ``kid`` of DESIGN §4, the first 8 bytes of SHA-256 over the DER
  SubjectPublicKeyInfo.
- :func:`make_csr`: a CSR naming the device (subject CN = device id) signed by its own key.
- :func:`make_ca_certificate` and :func:`issue_certificate`: what the AS calls; serial numbers and
  times come from the caller, as the library makes no randomness and reads no clock.
- :func:`check_certificate`: chains to the CA, valid at ``now``, an end-entity signing certificate,
  names the expected device, not revoked; raises :class:`~oscar.errors.CertificateError`.

Key and certificate files are read and written by the callers (the CLI, the roles); this module only
converts PEM bytes. It does not fetch revocation lists.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Container
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from .algorithms import PrivateKey, PublicKey, SignatureAlgorithm, signature_algorithm_of_key
from .errors import CertificateError
from .names import is_device_id, require_device_id

__all__ = [
    "SIGNING_KEY_USAGE",
    "ProducerKey",
    "SigningKey",
    "check_certificate",
    "device_id_of",
    "generate_signing_key",
    "issue_certificate",
    "key_id",
    "load_private_key",
    "load_signer",
    "make_ca_certificate",
    "make_csr",
    "private_key_pem",
]

KID_LENGTH = 8


def key_id(public_key: PublicKey) -> bytes:
    """First 8 bytes of SHA-256 over the key's DER SubjectPublicKeyInfo."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:KID_LENGTH]


def generate_signing_key(algorithm: str = "ES256") -> PrivateKey:
    """A fresh signing key: ``ES256`` (ECDSA P-256) or ``EdDSA`` (Ed25519).

    Randomness comes from the operating system through ``cryptography``: this is the one place the
    library makes a key, and it exists for the CLI and the roles to call.
    """
    if algorithm.upper() == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm.lower() == "eddsa":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown signature algorithm {algorithm!r}; choose ES256 or EdDSA")


def private_key_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (the caller writes it with mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes) -> PrivateKey:
    """Parse a PEM private key of a supported algorithm; ValueError saying what is wrong."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not an unencrypted PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError("the key is neither ECDSA P-256 nor Ed25519")
    signature_algorithm_of_key(key)  # rejects other curves
    return key


def load_signer(pem: bytes) -> PublicKey | x509.Certificate:
    """Parse a PEM public key or certificate; ValueError saying what is wrong."""
    if b"-----BEGIN CERTIFICATE-----" in pem:
        try:
            cert = x509.load_pem_x509_certificate(pem)
            _supported_public_key(cert.public_key())
        except UnsupportedAlgorithm:
            raise ValueError("not a readable PEM certificate") from None
        except ValueError as exc:
            raise ValueError(f"not a usable PEM certificate: {exc}") from None
        return cert
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("neither a PEM public key nor a PEM certificate") from None
    return _supported_public_key(public)


def _supported_public_key(public: object) -> PublicKey:
    if not isinstance(public, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise ValueError("the key is neither ECDSA P-256 nor Ed25519")
    signature_algorithm_of_key(public)
    return public


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _utc(timestamp: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)


def make_csr(key: PrivateKey, device_id: str) -> x509.CertificateSigningRequest:
    """A CSR for ``key`` whose subject CN is ``device_id``."""
    require_device_id(device_id)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(device_id))
        .sign(key, _hash_for(key))
    )


#: The key usage of every end-entity certificate the AS issues (devices, its TLS servers): digital
#: signatures only.
SIGNING_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def make_ca_certificate(
    ca_key: PrivateKey, name: str, *, serial: int, not_before: int, not_after: int
) -> x509.Certificate:
    """A self-signed CA certificate (path length 0: it signs device certificates only)."""
    public = ca_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )


def issue_certificate(
    csr: x509.CertificateSigningRequest,
    device_id: str,
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    *,
    serial: int,
    not_before: int,
    not_after: int,
) -> x509.Certificate:
    """Certify the CSR's key for ``device_id`` (the *authenticated* identity, not the CSR's claim).

    Raises :class:`CertificateError` if the CSR's signature is bad, its key is not a supported
    signing key, or its subject names another device.
    """
    require_device_id(device_id)
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not verify")
    try:
        public = _supported_public_key(csr.public_key())
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError("the CSR's key is not ECDSA P-256 or Ed25519") from None
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != device_id:
        raise CertificateError("the CSR's subject does not name the requesting device")
    if not_after <= not_before:
        raise ValueError("not_after must be later than not_before")
    return (
        x509.CertificateBuilder()
        .subject_name(_name(device_id))
        .issuer_name(ca_certificate.subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SIGNING_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, _hash_for(ca_key))
    )


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A producer's private key with its ``kid`` and algorithm worked out once (for sealing)."""

    private_key: PrivateKey = field(repr=False)
    kid: bytes
    algorithm: SignatureAlgorithm

    @classmethod
    def from_private_key(cls, private_key: PrivateKey) -> SigningKey:
        """Wrap a P-256 or Ed25519 private key; ValueError for any other."""
        algorithm = signature_algorithm_of_key(private_key)
        return cls(private_key, key_id(private_key.public_key()), algorithm)


@dataclass(frozen=True, slots=True)
class ProducerKey:
    """A producer's public key the caller trusts, with its ``kid`` worked out once.

    Build one per certificate with :meth:`from_certificate` (which checks it against the CA once)
    and pass it to ``oscar.verify``/``oscar.open`` for every object: a chain check costs a signature
    verification and a kid costs a hash, neither of which should be paid per object. The validity
    window and revocation are still checked per object, by :meth:`check`.
    """

    public_key: PublicKey = field(repr=False)
    kid: bytes
    #: The producer the key belongs to; None for a bare key vouched for by the caller.
    producer_id: str | None = None
    serial: int | None = None
    #: The validity window: the certificate's, narrowed to its CA's.
    not_before: int | None = None
    not_after: int | None = None
    #: The CA certificate the chain was checked against; None if it was not checked.
    anchor: x509.Certificate | None = field(default=None, repr=False)

    @classmethod
    def from_public_key(cls, public_key: PublicKey, producer_id: str | None = None) -> ProducerKey:
        """Trust a bare public key (for ``producer_id`` only, if given)."""
        return cls(_supported_public_key(public_key), key_id(public_key), producer_id)

    @classmethod
    def from_certificate(
        cls,
        certificate: x509.Certificate,
        ca_certificate: x509.Certificate | None,
        *,
        now: int,
        revoked_serials: Container[int] = (),
    ) -> ProducerKey:
        """Check the certificate (see :func:`check_certificate`) and keep what objects need."""
        device_id = device_id_of(certificate)
        public_key = check_certificate(
            certificate,
            ca_certificate,
            device_id=device_id,
            now=now,
            revoked_serials=revoked_serials,
        )
        windows = [certificate] if ca_certificate is None else [certificate, ca_certificate]
        return cls(
            public_key,
            key_id(public_key),
            device_id,
            certificate.serial_number,
            max(int(c.not_valid_before_utc.timestamp()) for c in windows),
            min(int(c.not_valid_after_utc.timestamp()) for c in windows),
            ca_certificate,
        )

    def check(self, producer_id: str, now: int, revoked_serials: Container[int] = ()) -> None:
        """Raise :class:`CertificateError` unless it may sign for ``producer_id`` at ``now``."""
        if self.producer_id is not None and self.producer_id != producer_id:
            raise CertificateError("the certificate names another device")
        if (self.not_before is not None and now < self.not_before) or (
            self.not_after is not None and now > self.not_after
        ):
            raise CertificateError("the certificate is not valid at this time")
        if self.serial is not None and self.serial in revoked_serials:
            raise CertificateError("the certificate has been revoked")


def device_id_of(certificate: x509.Certificate) -> str:
    """The device id a certificate names (its single subject CN); CertificateError otherwise."""
    try:
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        raise CertificateError("the certificate's subject is malformed") from None
    if len(names) != 1:
        raise CertificateError("the certificate does not name exactly one well-formed device")
    value = names[0].value
    if not is_device_id(value):
        raise CertificateError("the certificate does not name exactly one well-formed device")
    return value


def check_certificate(
    certificate: x509.Certificate,
    ca_certificate: x509.Certificate | None,
    *,
    device_id: str,
    now: int,
    revoked_serials: Container[int] = (),
) -> PublicKey:
    """Return the certified public key if the certificate is good for ``device_id`` at ``now``.

    Good: issued and signed by ``ca_certificate``, within its validity (and the CA's), not a CA
    itself, allowed to sign, naming exactly ``device_id``, its serial not in ``revoked_serials``,
    and certifying a supported key. Raises :class:`CertificateError` saying which check failed.

    ``ca_certificate=None`` skips the chain check: only for a certificate the caller already trusts
    (one an operator handed over, for example), never for one that came from the network.
    """
    checked = [(certificate, "certificate")]
    if ca_certificate is not None:
        try:
            certificate.verify_directly_issued_by(ca_certificate)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise CertificateError("the certificate was not issued by the trusted CA") from None
        checked.append((ca_certificate, "CA certificate"))
    moment = _utc(now)
    for cert, what in checked:
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise CertificateError(f"the {what} is not valid at this time")
    try:
        extensions = certificate.extensions
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateError("the certificate lacks BasicConstraints or KeyUsage") from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise CertificateError("the certificate's extensions are malformed") from None
    if constraints.ca:
        raise CertificateError("a CA certificate cannot sign objects")
    if not usage.digital_signature:
        raise CertificateError("the certificate does not allow signing")
    if device_id_of(certificate) != device_id:
        raise CertificateError("the certificate names another device")
    if certificate.serial_number in revoked_serials:
        raise CertificateError("the certificate has been revoked")
    try:
        return _supported_public_key(certificate.public_key())
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError("the certificate's key is not ECDSA P-256 or Ed25519") from None
