"""The AS's certificate authority and its state directory: made once, then loaded by every command.

A state directory holds ``master.key`` (mode 0600, the only secret outside the database), ``as.db``
(everything else, secrets encrypted) and ``ca.pem`` (the CA certificate, public, for convenience).
:func:`init_state` makes one; :class:`CertificateAuthority` issues device certificates from CSRs and
signs revocation lists, with the key read from the database and decrypted only in memory.

Randomness (the CA key, serial numbers) comes from the operating system; the time comes in as
``now`` so that tests can pin it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from oscar import certs
from oscar.errors import CertificateError
from oscar_io.errors import StateError
from oscar_io.statefiles import atomic_write, private_dir

from .envelope import create_master_key
from .store import (
    DATABASE_NAME,
    DB_NAME,
    MASTER_KEY_NAME,
    Store,
    StoreError,
    check_database_url,
)

__all__ = [
    "CA_CERT_NAME",
    "CertificateAuthority",
    "as_uris",
    "credentials_bundle",
    "init_state",
    "set_as_uris",
]

CA_CERT_NAME = "ca.pem"
CA_LIFETIME = 10 * 365 * 86_400
DEVICE_CERT_LIFETIME = 365 * 86_400
#: The admin console's server certificate: issued at each start, so it outlives no AS run that
#: lasts less than this (browsers cap a server certificate at 398 days).
SERVER_CERT_LIFETIME = 397 * 86_400


async def init_state(
    state_dir: Path,
    *,
    as_uri: str,
    now: int,
    ca_name: str = "OSCAR AS CA",
    database: str | None = None,
    as_uris: Sequence[str] = (),
) -> Store:
    """Make a new state directory: master key, database, CA key and certificate. The database
    is SQLite in the directory, or the empty PostgreSQL database ``database`` names
    (``postgresql://USER@HOST:PORT/DB``; the directory records it). ``as_uris`` lists every AS
    instance for the bundles (default: ``as_uri`` alone); it starts with ``as_uri``.

    Refuses a directory that already holds a master key or a database. Returns the open store.
    """
    try:
        private_dir(state_dir)
    except StateError as exc:
        raise StoreError(str(exc)) from None
    listed = list(as_uris) or [as_uri]
    if listed[0] != as_uri:
        raise ValueError("as_uris must start with as_uri")
    if database is not None:
        check_database_url(database)
    if any((state_dir / name).exists() for name in (MASTER_KEY_NAME, DB_NAME, DATABASE_NAME)):
        raise StoreError(f"{state_dir} holds an AS state already; refusing to overwrite it")
    master_key = create_master_key(state_dir / MASTER_KEY_NAME)
    try:
        store = await Store.create(state_dir, master_key, database=database)
    except BaseException:
        if database is not None:  # nothing was made in it: init may run again
            (state_dir / MASTER_KEY_NAME).unlink(missing_ok=True)
        raise
    try:
        ca_key = certs.generate_signing_key("ES256")
        ca_cert = certs.make_ca_certificate(
            ca_key, ca_name, serial=_serial(), not_before=now - 300, not_after=now + CA_LIFETIME
        )
        pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        await store.set_ca_key(certs.private_key_pem(ca_key))
        await store.set_meta("ca_cert", pem)
        await store.set_meta("as_uri", as_uri)
        await store.set_meta("as_uris", json.dumps(listed))
        atomic_write(state_dir / CA_CERT_NAME, pem, 0o644)
        detail: dict[str, object] = {"as_uri": as_uri}
        if len(listed) > 1:
            detail["as_uris"] = listed
        await store.audit("admin", "init", ca_name, "ok", detail, now)
    except BaseException:
        await store.close()
        raise
    return store


async def as_uris(store: Store) -> list[str]:
    """The AS URIs bundles list, preferred first: meta ``as_uris`` (JSON), or ``[as_uri]`` for a
    state made before failover. StoreError if the database holds neither."""
    listed = await store.get_meta("as_uris")
    if isinstance(listed, str):
        try:
            uris = json.loads(listed)
        except ValueError:
            uris = None
        if isinstance(uris, list) and uris and all(isinstance(uri, str) for uri in uris):
            return uris
        raise StoreError("the database holds a malformed list of AS URIs")
    first = await store.get_meta("as_uri")
    if not isinstance(first, str):
        raise StoreError("the database holds no AS URI")
    return [first]


async def set_as_uris(store: Store, uris: Sequence[str], now: int) -> None:
    """Record ``uris`` (checked by the caller) as the AS URIs of bundles enrolled from now on;
    bundles issued before keep their list. Audited."""
    listed = list(uris)
    async with store.db.transaction():
        for key, value in (("as_uri", listed[0]), ("as_uris", json.dumps(listed))):
            await store.db.execute(store.db.sql.META_SET, store.db.sql.meta_params(key, value))
        await store.audit_log.append("admin", "set-as-uris", "as", "ok", {"as_uris": listed}, now)


async def credentials_bundle(
    store: Store, device_id: str, role: str, psk: bytes, uris: Sequence[str] | None = None
) -> bytes:
    """A device's credentials bundle (JSON: id, role, as_uri, as_uris, psk_identity, psk_hex,
    ca_cert_pem), what ``oscar-as enroll`` writes and the console hands out once: the only
    places a PSK leaves the AS. ``uris``: the AS instances (default: those recorded)."""
    ca_pem = await store.get_meta("ca_cert")
    if not isinstance(ca_pem, bytes):
        raise StoreError("the database holds no CA certificate")
    listed = list(uris) if uris else await as_uris(store)
    bundle = {
        "id": device_id,
        "role": role,
        "as_uri": listed[0],
        "as_uris": listed,
        "psk_identity": device_id,
        "psk_hex": psk.hex(),
        "ca_cert_pem": ca_pem.decode("ascii"),
    }
    return json.dumps(bundle, indent=2).encode("ascii") + b"\n"


def _serial() -> int:
    # RFC 5280: positive, at most 20 octets; 159 random bits leave the sign bit clear.
    return secrets.randbits(159) | 1


class CertificateAuthority:
    """Issues device certificates and revocation lists under the AS CA."""

    __slots__ = ("_key", "certificate", "certificate_pem")

    def __init__(self, key_pem: bytes, certificate_pem: bytes) -> None:
        self._key = certs.load_private_key(key_pem)
        self.certificate = x509.load_pem_x509_certificate(certificate_pem)
        self.certificate_pem = certificate_pem

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.certificate.subject.rfc4514_string()!r})"

    @classmethod
    async def load(cls, store: Store) -> CertificateAuthority:
        pem = await store.get_meta("ca_cert")
        if not isinstance(pem, bytes):
            raise StoreError("the database holds no CA certificate")
        return cls(await store.ca_key(), pem)

    def issue(
        self, csr_der: bytes, device_id: str, now: int, lifetime: int = DEVICE_CERT_LIFETIME
    ) -> x509.Certificate:
        """Certify the key in ``csr_der`` for ``device_id`` (the authenticated identity).

        Raises :class:`~oscar.errors.CertificateError` for a malformed CSR, a bad CSR signature,
        an unsupported key or a subject that names another device.
        """
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError:
            raise CertificateError("the CSR is not DER PKCS#10") from None
        return certs.issue_certificate(
            csr,
            device_id,
            self.certificate,
            self._key,
            serial=_serial(),
            not_before=now - 300,
            not_after=min(now + lifetime, int(self.certificate.not_valid_after_utc.timestamp())),
        )

    def issue_server_certificate(
        self, hosts: Sequence[str], now: int, lifetime: int = SERVER_CERT_LIFETIME
    ) -> tuple[bytes, bytes]:
        """A TLS server certificate for ``hosts`` (IP addresses or DNS names, the first one the
        subject's common name) and its fresh ES256 key: (certificate chain PEM, key PEM). The
        key is made here and returned, never stored: the caller keeps it in memory (the admin
        console, :mod:`authz_server.admin.tls`). ValueError for no host."""
        if not hosts:
            raise ValueError("a server certificate names at least one host")
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        utc = datetime.UTC
        ca_end = int(self.certificate.not_valid_after_utc.timestamp())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(datetime.datetime.fromtimestamp(now - 300, utc))
            .not_valid_after(datetime.datetime.fromtimestamp(min(now + lifetime, ca_end), utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(certs.SIGNING_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.certificate_pem
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return chain, key_pem

    def revocation_list(self, revoked: list[tuple[int, int]], now: int, validity: int) -> bytes:
        """A DER X.509 CRL of ``(serial, revoked at)`` pairs, valid for ``validity`` seconds."""
        utc = datetime.UTC
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(datetime.datetime.fromtimestamp(now, utc))
            .next_update(datetime.datetime.fromtimestamp(now + validity, utc))
        )
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(datetime.datetime.fromtimestamp(at, utc))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.DER)
