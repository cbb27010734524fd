"""The AS's state: one database behind :class:`Store`, a set of components over one backend.

Everything the AS knows lives here: devices and their PSKs, certificates, resources, epochs with
their access secrets and KMIP states, grants and exclusions, and the audit chain. Rules:

- every statement is parameterized; identifiers are validated before they get here as well;
- every change that belongs together (an epoch and its successor, a revocation and its rotations, an
  action and its audit record) is one transaction, so a kill -9 leaves either all of it or none of
  it;
- secrets (PSKs, access secrets, the CA key) are stored only encrypted by the
  :class:`~authz_server.envelope.Envelope`; deleted or replaced data is overwritten (SQLite:
  ``PRAGMA secure_delete``; PostgreSQL: a VACUUM of the tables, which leaves old versions in its WAL
  until recycled, see :mod:`.postgres_backend`), and a destroyed secret is first overwritten with
  zeros, then cleared;
- the schema is versioned and migrated forward on open;
- a change counter lets the server notice what the admin CLI changed.

Who may do what is decided in :mod:`authz_server.api`; the store only stores and fetches.

The package, by composition (each component holds the one backend, and the others it needs)::

    Store                          this module: opening, meta, the public methods
    ├── registry   Registry        .registry    devices, PSKs, proxy links, certificates
    ├── access     Access          .access      grants, exclusions, what a consumer may read
    ├── parts      Parts           .parts       a resource's parts: their secrets, grants
    ├── keyring    Keyring         .keyring     resources, epochs, rotation, destruction
    ├── deliveries Deliveries      .deliveries  secrets handed out (grouped commits)
    ├── audit_log  AuditLog        .audit       the audit chain, pruning; .denials tallies refusals
    ├── admins     AdminTokens     .admins      the admin console's named tokens (hashed)
    ├── instances  Instances       .instances   the running AS instances' heartbeats
    └── db         Backend         .backend     the interface; .sqlite_backend runs .sqlite's SQL,
                                                .postgres_backend runs .postgres's

The database is SQLite in the state directory (``as.db``, the default), or PostgreSQL named by a
URL (``postgresql://USER@HOST:PORT/DB``) that the state directory records (``database.url``);
the master key stays in the state directory either way and never enters the database. The
records and errors are in :mod:`.schema`; every SQL text in :mod:`.sqlite` and :mod:`.postgres`
(the same names, each in its dialect). The errors::

    StoreError          the state directory or database is unusable (missing, corrupt, from a
    │                   newer version, a wrong or exposed master key, a ciphertext that does
    │                   not open)
    ├── NoSuchRecord    no such device, resource, epoch or grant
    ├── Conflict        the thing to create exists already, or the change contradicts the state
    └── DatabaseError   a statement failed (locked too long, I/O, damaged): the driver's errors,
                        translated by the backend only (:mod:`.sqlite_backend`,
        │               :mod:`.postgres_backend`)
        └── DatabaseUnavailable  the server cannot be reached now (PostgreSQL stopped or
                                 restarting): the backend reconnects on a later call
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from oscar_io.errors import StateError
from oscar_io.statefiles import atomic_write, private_dir
from oscar_io.urls import redacted, user_part_unclear

from ..envelope import Envelope, MasterKeyError, VaultError, read_master_key
from .access import Access
from .admins import Admin, AdminTokens
from .audit import AuditLog
from .backend import Backend
from .deliveries import Deliveries
from .instances import Instance, Instances
from .keyring import Keyring
from .parts import Parts
from .registry import Registry
from .schema import (
    CA_KEY_CONTEXT,
    DATABASE_NAME,
    DB_NAME,
    MASTER_KEY_NAME,
    ROLES,
    AuditRecord,
    Conflict,
    DatabaseError,
    DatabaseUnavailable,
    Device,
    Epoch,
    NoSuchRecord,
    Resource,
    StoreError,
)
from .sqlite_backend import SqliteBackend

if TYPE_CHECKING:
    from .postgres_backend import PostgresBackend

__all__ = [
    "DATABASE_NAME",
    "DB_NAME",
    "MASTER_KEY_NAME",
    "ROLES",
    "Admin",
    "AuditRecord",
    "Conflict",
    "DatabaseError",
    "DatabaseUnavailable",
    "Device",
    "Epoch",
    "Instance",
    "NoSuchRecord",
    "Resource",
    "Store",
    "StoreError",
    "check_database_url",
    "recorded_database",
    "redacted",
]


def check_database_url(database: str) -> str:
    """``database`` if it names a database this store runs on (``postgresql://…``; SQLite is
    the state directory's own file, named by no URL); :class:`StoreError` otherwise."""
    from urllib.parse import urlsplit

    shape = (
        "a database URL is postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE, with / ? # @ : in a "
        "password percent-encoded (SQLite, the default, needs none)"
    )
    try:
        parts = urlsplit(database)
        parts.port  # noqa: B018 (a port out of range raises here)
    except ValueError:  # its text may quote a password that looked like a port
        raise StoreError(f"not a database URL: {shape}") from None
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise StoreError(shape)
    if user_part_unclear(database):  # a password with a / or an @ in it, say
        raise StoreError(f"not a database URL: {shape}")
    return database


def recorded_database(state_dir: Path) -> str | None:
    """The database URL a state directory records (``oscar-as init --database``), or None: its
    SQLite file."""
    path = state_dir / DATABASE_NAME
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    return check_database_url(text)


def _postgres_backend(database: str) -> type[PostgresBackend]:
    """The PostgreSQL backend's class (imported on first use: asyncpg only when it is needed)."""
    check_database_url(database)
    from .postgres_backend import PostgresBackend

    return PostgresBackend


class Store:
    """The AS database: the components over one backend, and their public methods as one object
    (what the server, the endpoints, the admin CLI and the tests call). Open with :meth:`open`,
    make with :meth:`create`."""

    def __init__(self, db: Backend, envelope: Envelope) -> None:
        self.db = db
        self.envelope = envelope
        self.audit_log = audit = AuditLog(db, envelope)
        self.deliveries = Deliveries(db, audit)
        self.keyring = keyring = Keyring(db, envelope, audit)
        self.access = access = Access(db, envelope, audit, keyring)
        self.registry = registry = Registry(db, envelope, audit, access)
        self.parts = access.parts = Parts(db, envelope, audit, keyring)
        self.admins = admins = AdminTokens(db, envelope, audit)
        # The admin console's tokens.
        self.issue_admin_token = admins.issue_admin_token
        self.revoke_admin_token = admins.revoke_admin_token
        self.admin_of_token = admins.admin_of_token
        self.admin_list = admins.admins
        self.admin = admins.admin
        # The running instances' heartbeats.
        self.instances = instances = Instances(db)
        self.beat = instances.beat
        self.remove_instance = instances.remove
        self.instance_list = instances.instances
        # The audit chain.
        self.denials = audit.denials
        self.audit = audit.audit
        self.audit_denial = audit.audit_denial
        self.flush_denials = audit.flush_denials
        self.audit_records = audit.audit_records
        self.audit_head = audit.audit_head
        self.recent_audit = audit.recent_audit
        self.verify_audit = audit.verify_audit
        self.prune_audit = audit.prune_audit
        self.record_delivery = self.deliveries.record_delivery
        # Resources and epochs.
        self.register_resource = keyring.register_resource
        self.register_resources = keyring.register_resources
        self.resource = keyring.resource
        self.resources = keyring.resources
        self.live_resources = keyring.live_resources
        self.live_epochs = keyring.live_epochs
        self.epochs = keyring.epochs
        self.epoch = keyring.epoch
        self.rotate = keyring.rotate
        self.rotate_if_due = keyring.rotate_if_due
        self.compromise = keyring.compromise
        self.due_rotations = keyring.due_rotations
        self.destroy_retired = keyring.destroy_retired
        # Grants and exclusions.
        self.add_grant = access.add_grant
        self.add_grants = access.add_grants
        self.revoke_grants = access.revoke_grants
        self.expire_grants = access.expire_grants
        self.excluded_resources = access.excluded_resources
        self.grants = access.grants
        self.secret_view = access.secret_view
        self.readable_resources = access.readable_resources
        self.may_read = access.may_read
        # Devices, links and certificates.
        self.add_device = registry.add_device
        self.add_devices = registry.add_devices
        self.device = registry.device
        self.devices = registry.devices
        self.active_device_ids = registry.active_device_ids
        self.active_psks = registry.active_psks
        self.revoke_device = registry.revoke_device
        self.link_psk = registry.link_psk
        self.link_psks = registry.link_psks
        self.record_link_delivery = registry.record_link_delivery
        self.add_certificate = registry.add_certificate
        self.certificate = registry.certificate
        self.revoked_certificates = registry.revoked_certificates

    def __repr__(self) -> str:
        return "Store(<open>)"

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    async def create(
        cls, state_dir: Path, master_key: bytes, *, database: str | None = None
    ) -> Store:
        """Make the database of a new state directory: SQLite in it (which must not hold one),
        or the empty PostgreSQL database at ``database`` (``postgresql://…``), whose URL the
        state directory then records (:data:`DATABASE_NAME`)."""
        wrapped = Envelope.new_wrapped_data_key(master_key)
        first: list[tuple[str, bytes | int]] = [("data_key", wrapped), ("changes", 0)]
        db: Backend
        if database is None:
            db = await SqliteBackend.create(state_dir / DB_NAME, first)
        else:
            backend = _postgres_backend(database)
            db = await backend.create(database, first)
            try:
                atomic_write(state_dir / DATABASE_NAME, database.encode() + b"\n", 0o600)
            except BaseException:
                await db.close()
                raise
        return cls(db, Envelope(master_key, wrapped))

    @classmethod
    async def open(cls, state_dir: Path, *, database: str | None = None) -> Store:
        """Open an existing state directory: its database is the one ``database`` names, else
        the one the directory records, else its SQLite file. :class:`StoreError` saying what
        is wrong otherwise."""
        if os.path.lexists(state_dir):  # refused unless private (oscar_io.statefiles)
            try:
                private_dir(state_dir, create=False)
            except StateError as exc:
                raise StoreError(str(exc)) from None
        if database is None:
            database = recorded_database(state_dir)
        db: Backend
        if database is None:
            path = state_dir / DB_NAME
            where = str(path)
            if not path.is_file():
                raise StoreError(
                    f"no AS database at {path}; run 'oscar-as init --state {state_dir}'"
                )
        else:
            backend = _postgres_backend(database)
            where = database
        try:
            master_key = read_master_key(state_dir / MASTER_KEY_NAME)
        except MasterKeyError as exc:
            raise StoreError(str(exc)) from None
        if database is None:
            db = await SqliteBackend.open(path)
        else:
            db = await backend.open(database)
            where = repr(db)
        try:
            row = await db.one(db.sql.DATA_KEY)
            if row is None:
                raise StoreError("the database has no data key: it is not an AS database")
            try:
                envelope = Envelope(master_key, bytes(row[0]))
            except VaultError:
                raise StoreError("the master key does not open this database") from None
            return cls(db, envelope)
        except DatabaseError as exc:
            await db.close()
            detail = str(exc).removeprefix("database error: ")
            raise StoreError(f"the database {where} is unusable: {detail}") from None
        except BaseException:
            await db.close()
            raise

    async def destroy_expired(self, now: int, retention: int) -> list[tuple[str, int]]:
        """Destroy the epochs (the resources', then their parts') deactivated or compromised
        more than ``retention`` seconds ago; returns (resource, epoch) and
        (``resource#part``, epoch) destroyed. See :meth:`Keyring.destroy_expired`."""
        destroyed = await self.keyring.destroy_expired(now, retention)
        return destroyed + await self.parts.destroy_expired(now, retention)

    async def close(self) -> None:
        """Write every counted denial, then close the database; closing twice is harmless."""
        await self.audit_log.close()
        await self.db.close()

    # --- meta ------------------------------------------------------------------------------------

    async def changes(self) -> int:
        """A counter that grows with every committed change (the admin CLI's included)."""
        row = await self.db.one(self.db.sql.CHANGES)
        return int(row[0]) if row else 0

    async def get_meta(self, key: str) -> bytes | None:
        row = await self.db.one(self.db.sql.META_GET, (key,))
        if row is None:
            return None
        value = self.db.sql.meta_value(row)
        return bytes(value) if isinstance(value, bytes) else value

    async def set_meta(self, key: str, value: bytes | str | int) -> None:
        async with self.db.transaction():
            await self.db.execute(self.db.sql.META_SET, self.db.sql.meta_params(key, value))

    async def set_ca_key(self, pem: bytes) -> None:
        await self.set_meta("ca_key", self.envelope.encrypt(pem, CA_KEY_CONTEXT))

    async def ca_key(self) -> bytes:
        blob = await self.get_meta("ca_key")
        if not isinstance(blob, bytes):
            raise StoreError("the database holds no CA key")
        try:
            return self.envelope.decrypt(blob, CA_KEY_CONTEXT)
        except VaultError as exc:
            raise StoreError(str(exc)) from None
