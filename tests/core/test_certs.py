"""Producer certificates: CSR, issuing, chain/validity/name/revocation checks, key ids, PEM I/O."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oscar import CertificateError, certs
from testkit import NOW, PRODUCER, Pki, make_pki


def test_key_id_is_sha256_of_spki_truncated(es256_key: ec.EllipticCurvePrivateKey) -> None:
    spki = es256_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert certs.key_id(es256_key.public_key()) == hashlib.sha256(spki).digest()[:8]


def test_issued_certificate_names_the_device_and_checks(pki: Pki) -> None:
    key = certs.check_certificate(pki.producer_cert, pki.ca_cert, device_id=PRODUCER, now=NOW)
    assert certs.key_id(key) == certs.key_id(pki.producer_key.public_key())
    assert certs.device_id_of(pki.producer_cert) == PRODUCER
    bc = pki.producer_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_id": "sensor-2"}, "names another device"),
        ({"now": NOW + 2 * 86_400}, "not valid at this time"),
        ({"now": NOW - 7200}, "not valid at this time"),
        ({"revoked_serials": {1000}}, "revoked"),
    ],
)
def test_check_rejects(pki: Pki, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"device_id": PRODUCER, "now": NOW}
    args.update(kwargs)
    with pytest.raises(CertificateError, match=message):
        certs.check_certificate(pki.producer_cert, pki.ca_cert, **args)  # type: ignore[arg-type]


def test_another_ca_and_a_ca_certificate_are_rejected(pki: Pki) -> None:
    other = make_pki()
    with pytest.raises(CertificateError, match="trusted CA"):
        certs.check_certificate(pki.producer_cert, other.ca_cert, device_id=PRODUCER, now=NOW)
    with pytest.raises(CertificateError):
        certs.check_certificate(pki.ca_cert, pki.ca_cert, device_id="OSCAR test CA", now=NOW)


def test_csr_must_name_the_authenticated_device(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = certs.make_csr(key, "sensor-9")
    with pytest.raises(CertificateError, match="does not name"):
        certs.issue_certificate(
            csr, "sensor-1", pki.ca_cert, pki.ca_key, serial=5, not_before=NOW, not_after=NOW + 9
        )


def test_unsupported_csr_key_is_refused(pki: Pki) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = certs.make_csr(rsa_key, "sensor-9")  # type: ignore[arg-type]
    with pytest.raises(CertificateError, match="P-256 or Ed25519"):
        certs.issue_certificate(
            csr, "sensor-9", pki.ca_cert, pki.ca_key, serial=5, not_before=NOW, not_after=NOW + 9
        )


def test_eddsa_producer_and_ca(eddsa_key: ed25519.Ed25519PrivateKey) -> None:
    ca_key = ed25519.Ed25519PrivateKey.generate()
    ca = certs.make_ca_certificate(
        ca_key, "ed CA", serial=1, not_before=NOW - 1, not_after=NOW + 99
    )
    cert = certs.issue_certificate(
        certs.make_csr(eddsa_key, "cam-1"),
        "cam-1",
        ca,
        ca_key,
        serial=2,
        not_before=NOW - 1,
        not_after=NOW + 99,
    )
    key = certs.check_certificate(cert, ca, device_id="cam-1", now=NOW)
    assert isinstance(key, ed25519.Ed25519PublicKey)


def test_pem_round_trips_and_errors(es256_key: ec.EllipticCurvePrivateKey, pki: Pki) -> None:
    pem = certs.private_key_pem(es256_key)
    assert pem.startswith(b"-----BEGIN " + b"PRIVATE KEY-----")  # PKCS#8
    loaded = certs.load_private_key(pem)
    assert certs.key_id(loaded.public_key()) == certs.key_id(es256_key.public_key())
    cert_pem = pki.producer_cert.public_bytes(serialization.Encoding.PEM)
    assert isinstance(certs.load_signer(cert_pem), x509.Certificate)
    pub_pem = es256_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert isinstance(certs.load_signer(pub_pem), ec.EllipticCurvePublicKey)
    with pytest.raises(ValueError, match="PEM private key"):
        certs.load_private_key(b"garbage")
    with pytest.raises(ValueError):
        certs.load_signer(b"garbage")
    p384 = certs.private_key_pem(ec.generate_private_key(ec.SECP384R1()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="curve"):
        certs.load_private_key(p384)
    with pytest.raises(ValueError, match="ES256 or EdDSA"):
        certs.generate_signing_key("RS256")
