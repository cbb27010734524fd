"""The AS's state: one SQLite database (WAL) in the state directory, behind :class:`Store`.

Everything the AS knows lives here: devices and their PSKs, certificates, resources, epochs with
their access secrets and KMIP states, grants and exclusions, and the audit chain. Rules:

- every statement is parameterized; identifiers are validated before they get here as well;
- every change that belongs together (an epoch and its successor, a revocation and its rotations, an
  action and its audit record) is one transaction (``BEGIN IMMEDIATE``), so a kill -9 leaves either
  all of it or none of it;
- secrets (PSKs, access secrets, the CA key) are stored only encrypted by the :class:`Vault`;
  ``PRAGMA secure_delete`` makes SQLite overwrite what is deleted or replaced, and a destroyed
  secret is first overwritten with zeros, then cleared;
- the schema is versioned (``PRAGMA user_version``) and migrated forward on open;
- a change counter in ``meta`` lets the server notice what the admin CLI changed.

Who may do what is decided in :mod:`authz_server.policy`; this module stores and fetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from oscar import cbor
from oscar.keys import ACCESS_SECRET_LENGTH

from .vault import MasterKeyError, Vault, VaultError, read_master_key

__all__ = [
    "AuditRecord",
    "Conflict",
    "Device",
    "Epoch",
    "NotFound",
    "Resource",
    "Store",
    "StoreError",
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
ROLES = ("producer", "consumer", "proxy")

_MIGRATIONS: list[str] = [
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
]
SCHEMA_VERSION = len(_MIGRATIONS)


def _split(script: str) -> list[str]:
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


def _psk_context(device_id: str) -> bytes:
    return b"psk\x00" + device_id.encode()


def _secret_context(resource_id: str, epoch: int) -> bytes:
    return b"secret\x00" + resource_id.encode() + b"\x00" + str(epoch).encode()


_CA_KEY_CONTEXT = b"ca key"


class Store:
    """The AS database. Open with :meth:`open`; every method is a short transaction."""

    def __init__(self, db: aiosqlite.Connection, vault: Vault) -> None:
        self._db = db
        self._vault = vault
        self._lock = asyncio.Lock()
        self._in_transaction = False

    @staticmethod
    def _new_secret() -> bytes:
        """A fresh access secret: 32 bytes from the operating system's CSPRNG."""
        return os.urandom(ACCESS_SECRET_LENGTH)

    def __repr__(self) -> str:
        return "Store(<open>)"

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    async def create(cls, state_dir: Path, master_key: bytes) -> Store:
        """Make the database of a new state directory (which must not hold one)."""
        path = state_dir / DB_NAME
        if path.exists():
            raise Conflict(f"{path} exists already")
        db = await cls._connect(path)
        try:
            await cls._migrate(db)
            wrapped = Vault.new_wrapped_data_key(master_key)
            await db.execute("INSERT INTO meta VALUES ('data_key', ?)", (wrapped,))
            await db.execute("INSERT INTO meta VALUES ('changes', 0)")
            await db.commit()
            return cls(db, Vault(master_key, wrapped))
        except BaseException:
            await db.close()
            raise

    @classmethod
    async def open(cls, state_dir: Path) -> Store:
        """Open an existing state directory; :class:`StoreError` saying what is wrong otherwise."""
        path = state_dir / DB_NAME
        if not path.is_file():
            raise StoreError(f"no AS database at {path}; run 'oscar-as init --state {state_dir}'")
        try:
            master_key = read_master_key(state_dir / MASTER_KEY_NAME)
        except MasterKeyError as exc:
            raise StoreError(str(exc)) from None
        db = await cls._connect(path)
        try:
            await cls._migrate(db)
            row = await (await db.execute("SELECT value FROM meta WHERE key='data_key'")).fetchone()
            if row is None:
                raise StoreError("the database has no data key: it is not an AS database")
            try:
                vault = Vault(master_key, bytes(row[0]))
            except VaultError:
                raise StoreError("the master key does not open this database") from None
            return cls(db, vault)
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise StoreError(f"the database {path} is unusable: {exc}") from None
        except BaseException:
            await db.close()
            raise

    @staticmethod
    async def _connect(path: Path) -> aiosqlite.Connection:
        db = None
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA secure_delete=ON")
            await db.execute("PRAGMA busy_timeout=10000")
        except sqlite3.DatabaseError as exc:
            if db is not None:
                await db.close()  # its worker thread would keep the process alive
            raise StoreError(f"the database {path} is unusable: {exc}") from None
        return db

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        version = (await (await db.execute("PRAGMA user_version")).fetchone() or (0,))[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema {version}, newer than this program's {SCHEMA_VERSION}"
            )
        for number in range(version, SCHEMA_VERSION):
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split(_MIGRATIONS[number]):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version={number + 1}")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        """Close the database; closing twice is harmless."""
        if self._db is not None:
            db, self._db = self._db, None  # type: ignore[assignment]
            await db.close()

    # --- transactions ----------------------------------------------------------------------------

    # One connection serves every coroutine of the process, and SQLite transactions do not nest:
    # a lock keeps each transaction whole while other coroutines wait their turn.

    async def _begin(self) -> None:
        await self._lock.acquire()
        try:
            await self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        self._in_transaction = True

    async def _commit(self, *, count: bool = True) -> None:
        try:
            if count:
                await self._db.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'changes'"
                )
            await self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")
            raise
        finally:
            # The caller's rollback, if it follows, finds the transaction over already.
            self._in_transaction = False
            self._lock.release()

    async def _rollback(self) -> None:
        if not self._in_transaction:
            return
        try:
            await self._db.execute("ROLLBACK")
        finally:
            self._in_transaction = False
            self._lock.release()

    async def changes(self) -> int:
        """A counter that grows with every committed change (the admin CLI's included)."""
        row = await (
            await self._db.execute("SELECT value FROM meta WHERE key='changes'")
        ).fetchone()
        return int(row[0]) if row else 0

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        return await (await self._db.execute(sql, tuple(params))).fetchone()

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return list(await (await self._db.execute(sql, tuple(params))).fetchall())

    # --- meta ------------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> bytes | None:
        row = await self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else bytes(row[0]) if isinstance(row[0], bytes) else row[0]

    async def set_meta(self, key: str, value: bytes | str | int) -> None:
        await self._begin()
        try:
            await self._db.execute(
                "INSERT INTO meta VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
            await self._commit()
        except BaseException:
            await self._rollback()
            raise

    async def set_ca_key(self, pem: bytes) -> None:
        await self.set_meta("ca_key", self._vault.encrypt(pem, _CA_KEY_CONTEXT))

    async def ca_key(self) -> bytes:
        blob = await self.get_meta("ca_key")
        if not isinstance(blob, bytes):
            raise StoreError("the database holds no CA key")
        try:
            return self._vault.decrypt(blob, _CA_KEY_CONTEXT)
        except VaultError as exc:
            raise StoreError(str(exc)) from None

    # --- devices ---------------------------------------------------------------------------------

    async def add_device(self, device_id: str, role: str, psk: bytes, now: int) -> None:
        """Enroll a device with its PSK; :class:`Conflict` if the id was ever used."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        await self._begin()
        try:
            if await self._one("SELECT 1 FROM devices WHERE id = ?", (device_id,)):
                raise Conflict(f"device {device_id!r} exists already (ids are never reused)")
            await self._db.execute(
                "INSERT INTO devices VALUES (?, ?, ?, 'active', ?, NULL)",
                (device_id, role, self._vault.encrypt(psk, _psk_context(device_id)), now),
            )
            await self._audit("admin", "enroll", device_id, "ok", {"role": role}, now)
            await self._commit()
        except BaseException:
            await self._rollback()
            raise

    async def device(self, device_id: str) -> Device | None:
        row = await self._one(
            "SELECT id, role, status, enrolled_at, revoked_at FROM devices WHERE id = ?",
            (device_id,),
        )
        return None if row is None else Device(*row)

    async def devices(self) -> list[Device]:
        rows = await self._all(
            "SELECT id, role, status, enrolled_at, revoked_at FROM devices ORDER BY id"
        )
        return [Device(*row) for row in rows]

    async def active_psks(self) -> dict[str, bytes]:
        """PSK by device id, for every device that may connect."""
        rows = await self._all("SELECT id, psk FROM devices WHERE status = 'active'")
        try:
            return {dev: self._vault.decrypt(bytes(psk), _psk_context(dev)) for dev, psk in rows}
        except VaultError as exc:
            raise StoreError(str(exc)) from None

    async def revoke_device(self, device_id: str, now: int) -> list[str]:
        """Revoke a device: PSK erased, certificates revoked, grants revoked (with rotation of
        every resource a consumer could read). Returns the resources rotated."""
        await self._begin()
        try:
            device = await self._one("SELECT role, status FROM devices WHERE id = ?", (device_id,))
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            if device[1] == "revoked":
                raise Conflict(f"device {device_id!r} is revoked already")
            # Overwrite before clearing; secure_delete zeroes the freed pages.
            await self._db.execute(
                "UPDATE devices SET psk = zeroblob(length(psk)) WHERE id = ?", (device_id,)
            )
            await self._db.execute(
                "UPDATE devices SET psk = NULL, status = 'revoked', revoked_at = ? WHERE id = ?",
                (now, device_id),
            )
            await self._db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
                (now, device_id),
            )
            rotated: list[str] = []
            if device[0] == "consumer":
                rotated = await self._revoke_grants(device_id, None, now)
            await self._audit("admin", "revoke-device", device_id, "ok", {"rotated": rotated}, now)
            await self._commit()
            return rotated
        except BaseException:
            await self._rollback()
            raise

    # --- certificates ----------------------------------------------------------------------------

    async def add_certificate(
        self,
        serial: int,
        device_id: str,
        kid: bytes,
        der: bytes,
        not_before: int,
        not_after: int,
        now: int,
    ) -> None:
        await self._begin()
        try:
            await self._db.execute(
                "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (format(serial, "x"), device_id, kid, der, not_before, not_after, now),
            )
            await self._audit(
                device_id,
                "certificate",
                device_id,
                "ok",
                {"serial": format(serial, "x"), "kid": kid.hex(), "not_after": not_after},
                now,
            )
            await self._commit()
        except BaseException:
            await self._rollback()
            raise

    async def certificate(
        self, *, device_id: str | None = None, kid: bytes | None = None, now: int
    ) -> bytes | None:
        """The newest unrevoked, unexpired certificate (DER) of a device or with a key id."""
        # One fixed statement: a NULL parameter matches nothing, so either key selects.
        row = await self._one(
            "SELECT der FROM certificates WHERE (device_id = ? OR kid = ?) "
            "AND revoked_at IS NULL AND not_before <= ? AND ? <= not_after "
            "ORDER BY issued_at DESC LIMIT 1",
            (device_id, kid, now, now),
        )
        return None if row is None else bytes(row[0])

    async def revoked_certificates(self) -> list[tuple[int, int]]:
        """(serial, revoked at) of every revoked certificate that has not yet expired anyway."""
        rows = await self._all(
            "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL "
            "ORDER BY revoked_at"
        )
        return [(int(serial, 16), at) for serial, at in rows]

    # --- resources and epochs --------------------------------------------------------------------

    async def register_resource(self, resource: Resource) -> None:
        """Register a resource: epoch 1 active and epoch 2 pre-active, each with a new secret."""
        await self._begin()
        try:
            if await self._one("SELECT 1 FROM resources WHERE id = ?", (resource.id,)):
                raise Conflict(f"resource {resource.id!r} is registered already")
            await self._db.execute(
                "INSERT INTO resources VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    resource.id,
                    resource.producer_id,
                    resource.content_format,
                    resource.profile,
                    resource.max_age,
                    resource.rotation_period,
                    resource.registered_at,
                ),
            )
            now = resource.registered_at
            await self._insert_epoch(resource.id, 1, ACTIVE, now, activated=now)
            await self._insert_epoch(resource.id, 2, PRE_ACTIVE, now)
            await self._audit(
                resource.producer_id,
                "register",
                resource.id,
                "ok",
                {"profile": resource.profile, "rotation_period": resource.rotation_period},
                now,
            )
            await self._commit()
        except BaseException:
            await self._rollback()
            raise

    async def _insert_epoch(
        self,
        resource_id: str,
        epoch: int,
        state: str,
        now: int,
        activated: int | None = None,
    ) -> None:
        secret = self._new_secret()
        await self._db.execute(
            "INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (
                resource_id,
                epoch,
                state,
                self._vault.encrypt(secret, _secret_context(resource_id, epoch)),
                now,
                activated,
            ),
        )

    async def resource(self, resource_id: str) -> Resource | None:
        row = await self._one("SELECT * FROM resources WHERE id = ?", (resource_id,))
        return None if row is None else Resource(*row)

    async def resources(self, producer_id: str | None = None) -> list[Resource]:
        if producer_id is None:
            rows = await self._all("SELECT * FROM resources ORDER BY id")
        else:
            rows = await self._all(
                "SELECT * FROM resources WHERE producer_id = ? ORDER BY id", (producer_id,)
            )
        return [Resource(*row) for row in rows]

    async def epochs(self, resource_id: str) -> list[Epoch]:
        """Every epoch of the resource, oldest first, without secrets."""
        rows = await self._all(
            "SELECT resource_id, epoch, state, created_at, activated_at, deactivated_at "
            "FROM epochs WHERE resource_id = ? ORDER BY epoch",
            (resource_id,),
        )
        return [Epoch(*row) for row in rows]

    async def epoch(
        self, resource_id: str, epoch: int | None = None, *, with_secret: bool = False
    ) -> Epoch | None:
        """One epoch (the active one when ``epoch`` is None), its secret decrypted if asked."""
        row = await self._one(
            "SELECT resource_id, epoch, state, created_at, activated_at, deactivated_at, secret "
            "FROM epochs WHERE resource_id = ? AND "
            "(epoch = ? OR (? IS NULL AND state = 'active'))",
            (resource_id, epoch, epoch),
        )
        if row is None:
            return None
        secret = None
        if with_secret and row[6] is not None:
            try:
                secret = self._vault.decrypt(bytes(row[6]), _secret_context(row[0], row[1]))
            except VaultError as exc:
                raise StoreError(str(exc)) from None
        return Epoch(*row[:6], secret=secret)

    async def rotate(self, resource_id: str, now: int, *, actor: str, reason: str) -> int:
        """Activate the pre-active epoch, deactivate the active one, make a new pre-active one.
        Returns the new active epoch."""
        await self._begin()
        try:
            epoch = await self._rotate(resource_id, now)
            await self._audit(
                actor, "rotate", resource_id, "ok", {"epoch": epoch, "reason": reason}, now
            )
            await self._commit()
            return epoch
        except BaseException:
            await self._rollback()
            raise

    async def _rotate(self, resource_id: str, now: int) -> int:
        rows = await self._all(
            "SELECT epoch, state FROM epochs WHERE resource_id = ? "
            "AND state IN ('active', 'pre-active') ORDER BY epoch",
            (resource_id,),
        )
        states = {state: epoch for epoch, state in rows}
        if ACTIVE not in states or PRE_ACTIVE not in states:
            raise NotFound(f"no resource {resource_id!r} with an active and a pre-active epoch")
        await self._db.execute(
            "UPDATE epochs SET state = 'deactivated', deactivated_at = ? "
            "WHERE resource_id = ? AND epoch = ?",
            (now, resource_id, states[ACTIVE]),
        )
        new_active = states[PRE_ACTIVE]
        await self._db.execute(
            "UPDATE epochs SET state = 'active', activated_at = ? "
            "WHERE resource_id = ? AND epoch = ?",
            (now, resource_id, new_active),
        )
        await self._insert_epoch(resource_id, new_active + 1, PRE_ACTIVE, now)
        return new_active

    async def compromise(self, resource_id: str, epoch: int | None, now: int) -> int:
        """Mark an epoch compromised (the active one by default) and move on at once: the
        pre-active epoch becomes active and a new pre-active epoch is made (a compromised
        pre-active epoch is simply replaced). Returns the active epoch afterwards."""
        await self._begin()
        try:
            target = await self.epoch(resource_id, epoch)
            if target is None:
                raise NotFound(f"no epoch {epoch} of resource {resource_id!r}")
            if target.state not in (ACTIVE, PRE_ACTIVE, DEACTIVATED):
                raise Conflict(f"epoch {target.epoch} is {target.state} already")
            await self._db.execute(
                "UPDATE epochs SET state = 'compromised', deactivated_at = COALESCE("
                "deactivated_at, ?) WHERE resource_id = ? AND epoch = ?",
                (now, resource_id, target.epoch),
            )
            if target.state == PRE_ACTIVE:
                # Replace the leaked pre-active secret with a new epoch after it.
                await self._insert_epoch(resource_id, target.epoch + 1, PRE_ACTIVE, now)
            elif target.state == ACTIVE:
                # The active epoch is compromised: the pre-active one takes over at once.
                pre = await self._one(
                    "SELECT epoch FROM epochs WHERE resource_id = ? AND state = 'pre-active'",
                    (resource_id,),
                )
                await self._db.execute(
                    "UPDATE epochs SET state = 'active', activated_at = ? "
                    "WHERE resource_id = ? AND epoch = ?",
                    (now, resource_id, pre[0]),
                )
                await self._insert_epoch(resource_id, pre[0] + 1, PRE_ACTIVE, now)
            row = await self._one(
                "SELECT epoch FROM epochs WHERE resource_id = ? AND state = 'active'",
                (resource_id,),
            )
            new_active = int(row[0])
            await self._audit(
                "admin",
                "compromise",
                resource_id,
                "ok",
                {"epoch": target.epoch, "active": new_active},
                now,
            )
            await self._commit()
            return new_active
        except BaseException:
            await self._rollback()
            raise

    async def due_rotations(self, now: int) -> list[str]:
        """Resources whose active epoch has lived its rotation period."""
        rows = await self._all(
            "SELECT r.id FROM resources r JOIN epochs e ON e.resource_id = r.id "
            "WHERE e.state = 'active' AND r.rotation_period > 0 "
            "AND e.activated_at + r.rotation_period <= ? ORDER BY r.id",
            (now,),
        )
        return [row[0] for row in rows]

    async def destroy_expired(self, now: int, retention: int) -> list[tuple[str, int]]:
        """Destroy deactivated and compromised epochs older than ``retention`` seconds: the secret
        is overwritten with zeros, then cleared. Returns the (resource, epoch) destroyed."""
        await self._begin()
        try:
            rows = await self._all(
                "SELECT resource_id, epoch FROM epochs WHERE state IN ('deactivated', "
                "'compromised') AND deactivated_at + ? <= ? ORDER BY resource_id, epoch",
                (retention, now),
            )
            for resource_id, epoch in rows:
                await self._db.execute(
                    "UPDATE epochs SET secret = zeroblob(length(secret)) "
                    "WHERE resource_id = ? AND epoch = ?",
                    (resource_id, epoch),
                )
                await self._db.execute(
                    "UPDATE epochs SET secret = NULL, state = 'destroyed' "
                    "WHERE resource_id = ? AND epoch = ?",
                    (resource_id, epoch),
                )
                await self._audit("as", "destroy", resource_id, "ok", {"epoch": epoch}, now)
            if rows:
                await self._commit()
            else:
                await self._rollback()
            return [(r, e) for r, e in rows]
        except BaseException:
            await self._rollback()
            raise

    # --- grants ----------------------------------------------------------------------------------

    async def add_grant(
        self,
        consumer_id: str,
        pattern: str,
        until: int | None,
        now: int,
    ) -> list[str]:
        """Grant ``consumer_id`` the resources matching ``pattern`` until ``until``.

        A consumer excluded from a resource by an earlier revocation is let back in only from a new
        epoch: the exclusion closes at the current epoch and the resource rotates, so nothing
        sealed while it was shut out becomes readable.
        Returns the resources rotated.
        """
        await self._begin()
        try:
            device = await self._one(
                "SELECT role, status FROM devices WHERE id = ?", (consumer_id,)
            )
            if device is None or device[0] != "consumer" or device[1] != "active":
                raise Conflict(f"{consumer_id!r} is not an active consumer")
            await self._db.execute(
                "INSERT INTO grants VALUES (NULL, ?, ?, ?, ?, NULL)",
                (consumer_id, pattern, until, now),
            )
            rotated = []
            for (resource_id,) in await self._all(
                "SELECT DISTINCT resource_id FROM exclusions WHERE consumer_id = ? "
                "AND to_epoch IS NULL",
                (consumer_id,),
            ):
                if not fnmatch.fnmatchcase(resource_id, pattern):
                    continue
                active = await self._one(
                    "SELECT epoch FROM epochs WHERE resource_id = ? AND state = 'active'",
                    (resource_id,),
                )
                await self._db.execute(
                    "UPDATE exclusions SET to_epoch = ? WHERE consumer_id = ? AND resource_id = ? "
                    "AND to_epoch IS NULL",
                    (active[0], consumer_id, resource_id),
                )
                await self._rotate(resource_id, now)
                rotated.append(resource_id)
            await self._audit(
                "admin",
                "grant",
                consumer_id,
                "ok",
                {"pattern": pattern, "until": until, "rotated": rotated},
                now,
            )
            await self._commit()
            return rotated
        except BaseException:
            await self._rollback()
            raise

    async def revoke_grants(self, consumer_id: str, pattern: str | None, now: int) -> list[str]:
        """Revoke the consumer's grants (those with exactly ``pattern``, or all): every resource
        it could read rotates at once and it is excluded from the new epoch on. Returns the
        resources rotated."""
        await self._begin()
        try:
            rotated = await self._revoke_grants(consumer_id, pattern, now, required=True)
            await self._audit(
                "admin",
                "revoke-grant",
                consumer_id,
                "ok",
                {"pattern": pattern, "rotated": rotated},
                now,
            )
            await self._commit()
            return rotated
        except BaseException:
            await self._rollback()
            raise

    async def _revoke_grants(
        self,
        consumer_id: str,
        pattern: str | None,
        now: int,
        *,
        required: bool = False,
    ) -> list[str]:
        grants = await self._all(
            "SELECT id, pattern FROM grants WHERE consumer_id = ? AND revoked_at IS NULL",
            (consumer_id,),
        )
        chosen = [(gid, p) for gid, p in grants if pattern is None or p == pattern]
        if not chosen and required:
            raise NotFound(f"no grant of {consumer_id!r}" + (f" on {pattern!r}" if pattern else ""))
        patterns = [p for _, p in chosen]
        resources = [
            row[0]
            for row in await self._all("SELECT id FROM resources ORDER BY id")
            if any(fnmatch.fnmatchcase(row[0], p) for p in patterns)
        ]
        for gid, _ in chosen:
            await self._db.execute("UPDATE grants SET revoked_at = ? WHERE id = ?", (now, gid))
        for resource_id in resources:
            new_epoch = await self._rotate(resource_id, now)
            await self._db.execute(
                "INSERT INTO exclusions VALUES (?, ?, ?, NULL, ?)",
                (consumer_id, resource_id, new_epoch, now),
            )
        return resources

    async def excluded_resources(self, consumer_id: str) -> list[str]:
        rows = await self._all(
            "SELECT DISTINCT resource_id FROM exclusions "
            "WHERE consumer_id = ? AND to_epoch IS NULL",
            (consumer_id,),
        )
        return [r for (r,) in rows]

    async def grants(
        self, consumer_id: str | None = None
    ) -> list[tuple[int, str, str, int | None, int, int | None]]:
        """(id, consumer, pattern, until, granted at, revoked at) of grants, oldest first."""
        if consumer_id is None:
            return await self._all("SELECT * FROM grants ORDER BY id")
        return await self._all(
            "SELECT * FROM grants WHERE consumer_id = ? ORDER BY id", (consumer_id,)
        )

    async def may_read(self, consumer_id: str, resource_id: str, epoch: int, now: int) -> bool:
        """Whether a live grant covers the resource and no revocation excludes the epoch."""
        grants = await self._all(
            "SELECT pattern FROM grants WHERE consumer_id = ? AND revoked_at IS NULL "
            "AND (until IS NULL OR ? < until)",
            (consumer_id, now),
        )
        if not any(fnmatch.fnmatchcase(resource_id, p) for (p,) in grants):
            return False
        excluded = await self._one(
            "SELECT 1 FROM exclusions WHERE consumer_id = ? AND resource_id = ? "
            "AND from_epoch <= ? AND (to_epoch IS NULL OR ? <= to_epoch)",
            (consumer_id, resource_id, epoch, epoch),
        )
        return excluded is None

    # --- audit -----------------------------------------------------------------------------------

    async def audit(
        self, actor: str, action: str, subject: str, result: str, detail: dict[str, Any], now: int
    ) -> None:
        """Append one audit record in a transaction of its own (denials, for example)."""
        await self._begin()
        try:
            await self._audit(actor, action, subject, result, detail, now)
            await self._commit(count=False)
        except BaseException:
            await self._rollback()
            raise

    async def _audit(
        self, actor: str, action: str, subject: str, result: str, detail: dict[str, Any], now: int
    ) -> None:
        last = await self._one("SELECT seq, chain FROM audit ORDER BY seq DESC LIMIT 1")
        seq, previous = (1, b"") if last is None else (last[0] + 1, bytes(last[1]))
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"))
        chain = self._vault.chain(
            previous, _audit_bytes(seq, now, actor, action, subject, result, text)
        )
        await self._db.execute(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, now, actor, action, subject, result, text, chain),
        )
        await self._db.execute(
            "INSERT INTO meta VALUES ('audit_head', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (cbor.dumps([seq, chain]),),
        )

    async def audit_records(self, since: int = 0) -> list[AuditRecord]:
        rows = await self._all(
            "SELECT seq, at, actor, action, subject, result, detail FROM audit WHERE seq > ? "
            "ORDER BY seq",
            (since,),
        )
        return [AuditRecord(*row[:6], json.loads(row[6])) for row in rows]

    async def verify_audit(self) -> tuple[bool, str]:
        """Walk the chain: (True, summary) if intact, else (False, where it breaks)."""
        previous, expected_seq = b"", 1
        async with self._db.execute(
            "SELECT seq, at, actor, action, subject, result, detail, chain FROM audit ORDER BY seq"
        ) as cursor:
            async for seq, at, actor, action, subject, result, detail, chain in cursor:
                if seq != expected_seq:
                    return False, f"record {expected_seq} is missing"
                want = self._vault.chain(
                    previous, _audit_bytes(seq, at, actor, action, subject, result, detail)
                )
                if bytes(chain) != want:
                    return False, f"record {seq} was altered"
                previous, expected_seq = want, seq + 1
        head = await self.get_meta("audit_head")
        count = expected_seq - 1
        if head is None:
            return (count == 0), ("empty" if count == 0 else "the chain head is missing")
        try:
            head_seq, head_chain = cbor.loads(bytes(head))  # type: ignore[misc]
        except (cbor.MalformedCBOR, TypeError, ValueError):
            return False, "the chain head is unreadable"
        if head_seq != count or head_chain != previous:
            return False, f"records after {count} were removed (head says {head_seq})"
        return True, f"{count} records, chain intact"


def _audit_bytes(
    seq: int, at: int, actor: str, action: str, subject: str, result: str, detail: str
) -> bytes:
    return cbor.dumps([seq, at, actor, action, subject, result, detail])
