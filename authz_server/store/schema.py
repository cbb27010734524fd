"""The AS database's schema, its migrations, and the records the store hands out.

This module holds data only: the SQL of each schema version, the record types, the errors. The
queries live in :mod:`.database`, :mod:`.keyring` and :mod:`authz_server.store`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

from oscar_io.bundle import ROLES  # the device roles, as credentials bundles name them

__all__ = [
    "ACTIVE",
    "COMPROMISED",
    "DB_NAME",
    "DEACTIVATED",
    "DESTROYED",
    "MASTER_KEY_NAME",
    "MIGRATIONS",
    "PRE_ACTIVE",
    "ROLES",
    "SCHEMA_VERSION",
    "AuditRecord",
    "Conflict",
    "Device",
    "Epoch",
    "NotFound",
    "Resource",
    "SecretView",
    "StoreError",
    "psk_context",
    "secret_context",
    "split_script",
]

DB_NAME = "as.db"
MASTER_KEY_NAME = "master.key"

PRE_ACTIVE, ACTIVE, DEACTIVATED, COMPROMISED, DESTROYED = (
    "pre-active",
    "active",
    "deactivated",
    "compromised",
    "destroyed",
)

MIGRATIONS: list[str] = [
    # 1: the first schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('producer', 'consumer', 'proxy')),
        psk BLOB,
        status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        enrolled_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        kid BLOB NOT NULL,
        der BLOB NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        issued_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX certificates_device ON certificates(device_id);
    CREATE INDEX certificates_kid ON certificates(kid);
    CREATE TABLE resources (
        id TEXT PRIMARY KEY,
        producer_id TEXT NOT NULL REFERENCES devices(id),
        content_format INTEGER NOT NULL,
        profile TEXT NOT NULL,
        max_age INTEGER NOT NULL,
        rotation_period INTEGER NOT NULL,
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE epochs (
        resource_id TEXT NOT NULL REFERENCES resources(id),
        epoch INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('pre-active', 'active', 'deactivated', 'compromised', 'destroyed')),
        secret BLOB,
        created_at INTEGER NOT NULL,
        activated_at INTEGER,
        deactivated_at INTEGER,
        PRIMARY KEY (resource_id, epoch)
    );
    CREATE TABLE grants (
        id INTEGER PRIMARY KEY,
        consumer_id TEXT NOT NULL REFERENCES devices(id),
        pattern TEXT NOT NULL,
        until INTEGER,
        granted_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX grants_consumer ON grants(consumer_id);
    CREATE TABLE exclusions (
        consumer_id TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        from_epoch INTEGER NOT NULL,
        to_epoch INTEGER,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX exclusions_lookup ON exclusions(consumer_id, resource_id);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL,
        chain BLOB NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    # 2: who was handed which epoch's secret, so that each first delivery is audited once.
    """
    CREATE TABLE deliveries (
        device_id TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        delivered_at INTEGER NOT NULL,
        PRIMARY KEY (device_id, resource_id, epoch)
    );
    """,
    # 3: nothing done once a second or per request scans a table that grows with the resources,
    # grants, devices or a resource's history of epochs: the active epoch's due time
    # (activated_at + rotation_period; NULL for a resource that never rotates) kept with it and
    # indexed; the live epochs of a resource; indexes for destruction, grant expiry, a
    # producer's resources and enrolment's case-insensitive id check.
    """
    ALTER TABLE epochs ADD COLUMN rotate_at INTEGER;
    UPDATE epochs SET rotate_at = activated_at + (
        SELECT NULLIF(r.rotation_period, 0) FROM resources r WHERE r.id = epochs.resource_id)
        WHERE state = 'active';
    CREATE INDEX epochs_due ON epochs(rotate_at) WHERE state = 'active' AND rotate_at IS NOT NULL;
    CREATE INDEX epochs_active ON epochs(resource_id) WHERE state = 'active';
    CREATE INDEX epochs_live ON epochs(resource_id, state) WHERE state IN ('active', 'pre-active');
    CREATE INDEX epochs_retired ON epochs(deactivated_at)
        WHERE state IN ('deactivated', 'compromised');
    CREATE INDEX resources_producer ON resources(producer_id);
    CREATE INDEX grants_until ON grants(until) WHERE revoked_at IS NULL AND until IS NOT NULL;
    CREATE INDEX devices_folded ON devices(lower(id));
    """,
    # 4: the audit log may be pruned behind a checkpoint (see store/audit.py): the last pruned
    # record's seq and chain value with a MAC under the audit key; only records the checkpoint
    # covers may be deleted.
    """
    CREATE TABLE audit_checkpoint (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        chain BLOB NOT NULL,
        at INTEGER NOT NULL,
        mac BLOB NOT NULL
    );
    DROP TRIGGER audit_no_delete;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        WHEN old.seq > COALESCE((SELECT seq FROM audit_checkpoint WHERE id = 1), 0)
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only (prune behind a checkpoint)');
        END;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def split_script(script: str) -> list[str]:
    """The statements of a migration script (triggers hold ';' inside BEGIN ... END)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError("a migration ends in an incomplete statement")
    return statements


class StoreError(Exception):
    """The database is unusable (corrupt, from a newer version, wrong master key)."""


class NotFound(StoreError):
    """The device, resource or epoch asked for does not exist."""


class Conflict(StoreError):
    """The thing to create exists already, or the change contradicts the state."""


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    role: str
    status: str
    enrolled_at: int
    revoked_at: int | None


@dataclass(frozen=True, slots=True)
class Resource:
    id: str
    producer_id: str
    content_format: int
    profile: str
    max_age: int
    rotation_period: int
    registered_at: int


@dataclass(frozen=True, slots=True)
class Epoch:
    resource_id: str
    epoch: int
    state: str
    created_at: int
    activated_at: int | None
    deactivated_at: int | None
    secret: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    at: int
    actor: str
    action: str
    subject: str
    result: str
    detail: dict[str, Any]


def psk_context(device_id: str) -> bytes:
    return b"psk\x00" + device_id.encode()


def secret_context(resource_id: str, epoch: int) -> bytes:
    return b"secret\x00" + resource_id.encode() + b"\x00" + str(epoch).encode()


CA_KEY_CONTEXT = b"ca key"


@dataclass(frozen=True, slots=True)
class SecretView:
    """What a secret request is decided on: the resource, the epoch asked for (secret included),
    and whether the asking device's live grants cover the resource and leave the epoch open."""

    resource: Resource | None
    epoch: Epoch | None
    granted: bool
    excluded: bool

    @property
    def readable(self) -> bool:
        """A consumer may read: some live grant covers it and no revocation excludes the epoch."""
        return self.granted and not self.excluded
