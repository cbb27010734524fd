"""The records the AS store hands out, its errors, and the names every backend shares.

This module holds data only: the record types, the errors, the KMIP state names, the contexts the
envelope binds stored secrets to, the state directory's file names. No SQL: that is a backend's
(:mod:`.sqlite`); no queries: those are the components'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oscar_io.bundle import ROLES  # the device roles, as credentials bundles name them

__all__ = [
    "ACTIVE",
    "COMPROMISED",
    "DATABASE_NAME",
    "DB_NAME",
    "DEACTIVATED",
    "DESTROYED",
    "MASTER_KEY_NAME",
    "PRE_ACTIVE",
    "ROLES",
    "AuditRecord",
    "Conflict",
    "DatabaseError",
    "DatabaseUnavailable",
    "Device",
    "Epoch",
    "NoSuchRecord",
    "PartEpoch",
    "PartView",
    "Resource",
    "SecretView",
    "StoreError",
    "part_secret_context",
    "psk_context",
    "secret_context",
]

DB_NAME = "as.db"
#: In a state directory whose database is PostgreSQL: its URL (``oscar-as init --database``).
DATABASE_NAME = "database.url"
MASTER_KEY_NAME = "master.key"

PRE_ACTIVE, ACTIVE, DEACTIVATED, COMPROMISED, DESTROYED = (
    "pre-active",
    "active",
    "deactivated",
    "compromised",
    "destroyed",
)


class StoreError(Exception):
    """The state directory or database is unusable (corrupt, from a newer version, wrong master
    key), or one of the refusals below."""


class NoSuchRecord(StoreError):
    """The device, resource, epoch or grant asked for does not exist (not the 4.04 reply,
    :class:`authz_server.messages.NotFound`, which the endpoints decide on)."""


class Conflict(StoreError):
    """The thing to create exists already, or the change contradicts the state."""


class DatabaseError(StoreError):
    """The database failed a statement: locked for too long, an I/O error, damaged. Raised by
    the backend for its driver's errors (the only place those are translated)."""


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached now (stopped, restarting, the network): the call
    failed and changed nothing that was not rolled back; the backend reconnects on a later call
    (with backoff). The AS answers 5.03 meanwhile."""


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


@dataclass(frozen=True, slots=True)
class PartEpoch:
    """One epoch of one encrypted part (its secret, decrypted, only when asked for)."""

    resource_id: str
    part: str
    epoch: int
    state: str
    created_at: int
    activated_at: int | None
    deactivated_at: int | None
    secret: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PartView:
    """What a part secret request is decided on (one point read)."""

    kind: str | None  # None: no such part
    epoch: PartEpoch | None
    granted: bool
    excluded: bool
    active: bool

    @property
    def readable(self) -> bool:
        return self.granted and not self.excluded


def psk_context(device_id: str) -> bytes:
    return b"psk\x00" + device_id.encode()


def secret_context(resource_id: str, epoch: int) -> bytes:
    return b"secret\x00" + resource_id.encode() + b"\x00" + str(epoch).encode()


def part_secret_context(resource_id: str, part: str, epoch: int) -> bytes:
    """What the envelope binds a part's secret to (never a resource secret's context, which
    starts ``secret\\x00``)."""
    return b"\x00".join((b"part secret", resource_id.encode(), part.encode(), str(epoch).encode()))


CA_KEY_CONTEXT = b"ca key"


@dataclass(frozen=True, slots=True)
class SecretView:
    """What a secret request is decided on: the resource, the epoch asked for (secret included),
    and whether the asking device's live grants cover the resource and leave the epoch open."""

    resource: Resource | None
    epoch: Epoch | None
    granted: bool
    excluded: bool
    #: The asking device is active, read in the same statement (the same snapshot) as the
    #: grants: the request path's device check for ``GET /secret``.
    active: bool

    @property
    def readable(self) -> bool:
        """A consumer may read: some live grant covers it and no revocation excludes the epoch."""
        return self.granted and not self.excluded
