"""The AS's state: one SQLite database (WAL) in the state directory, behind :class:`Store`.

Everything the AS knows lives here: devices and their PSKs, certificates, resources, epochs with
their access secrets and KMIP states, grants and exclusions, and the audit chain. Rules:

- every statement is parameterized; identifiers are validated before they get here as well;
- every change that belongs together (an epoch and its successor, a revocation and its rotations, an
  action and its audit record) is one transaction (``BEGIN IMMEDIATE``), so a kill -9 leaves either
  all of it or none of it;
- secrets (PSKs, access secrets, the CA key) are stored only encrypted by the :class:`Envelope`;
  ``PRAGMA secure_delete`` makes SQLite overwrite what is deleted or replaced, and a destroyed
  secret is first overwritten with zeros, then cleared;
- the schema is versioned (``PRAGMA user_version``) and migrated forward on open;
- a change counter in ``meta`` lets the server notice what the admin CLI changed.

Who may do what is decided in :mod:`authz_server.api`; the store only stores and fetches.
The package: :mod:`.schema` (SQL, records, errors), :mod:`.database` (file, transactions),
:mod:`.audit` (the audit chain, pruning, denials tallied by :mod:`.denials`),
:mod:`.deliveries` (secrets handed out), :mod:`.keyring` (resources, epochs), :mod:`.grants`
(grants, exclusions, what a consumer may read), and :class:`Store` here (devices, proxy link
PSKs, certificates).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from ..envelope import VaultError
from .database import json_list
from .grants import Grants
from .schema import (
    DB_NAME,
    MASTER_KEY_NAME,
    ROLES,
    AuditRecord,
    Conflict,
    Device,
    Epoch,
    NotFound,
    Resource,
    StoreError,
    psk_context,
)

__all__ = [
    "DB_NAME",
    "MASTER_KEY_NAME",
    "ROLES",
    "AuditRecord",
    "Conflict",
    "Device",
    "Epoch",
    "NotFound",
    "Resource",
    "Store",
    "StoreError",
]


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _fold(device_id: str) -> str:
    """A device id as SQLite's ``lower()`` has it (ASCII letters only)."""
    return device_id.translate(_ASCII_LOWER)


class Store(Grants):
    """The AS database: devices and certificates here, grants in :class:`Grants`, keys in
    :class:`KeyRecords`, deliveries in :class:`Deliveries`, the audit chain in :class:`AuditLog`,
    the file and transactions in :class:`Database`."""

    # --- devices ---------------------------------------------------------------------------------

    async def add_device(self, device_id: str, role: str, psk: bytes, now: int) -> None:
        """Enroll a device with its PSK; :class:`Conflict` if the id was ever used."""
        await self.add_devices([(device_id, role, psk)], now)

    async def add_devices(self, devices: Sequence[tuple[str, str, bytes]], now: int) -> None:
        """Enroll (id, role, PSK) devices as :meth:`add_device` does, all in one transaction
        (one commit for a bulk enrolment). :class:`Conflict`, and nothing enrolled, if an id was
        ever used or is listed twice; ValueError for an unknown role."""
        if any(role not in ROLES for _, role, _ in devices):
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        # Ids differing only in case would name one subject to case-insensitive X.509 matching
        # (SQLite's lower() folds ASCII only; so does _fold).
        folded = [_fold(device_id) for device_id, _, _ in devices]
        counts = Counter(folded)
        twice = [d for (d, _, _), f in zip(devices, folded, strict=True) if counts[f] > 1]
        if twice:
            raise Conflict(f"device {twice[0]!r} is listed twice")
        async with self._transaction():
            row = await self._one(
                "SELECT lower(id) FROM devices "
                "WHERE lower(id) IN (SELECT value FROM json_each(?)) LIMIT 1",
                (json_list(folded),),
            )
            if row is not None:
                taken = next((d for (d, _, _), f in zip(devices, folded, strict=True)
                              if f == row[0]), row[0])  # fmt: skip
                raise Conflict(f"device {taken!r} exists already (ids are never reused)")
            await self._db.executemany(
                "INSERT INTO devices VALUES (?, ?, ?, 'active', ?, NULL)",
                [
                    (device_id, role, self._vault.encrypt(psk, psk_context(device_id)), now)
                    for device_id, role, psk in devices
                ],
            )
            await self._audit_many(
                [("admin", "enroll", device_id, "ok", {"role": role}, now)
                 for device_id, role, _ in devices]
            )  # fmt: skip

    async def device(self, device_id: str) -> Device | None:
        row = await self._lookup(
            "SELECT id, role, status, enrolled_at, revoked_at FROM devices WHERE id = ?",
            (device_id,),
        )
        return None if row is None else Device(*row)

    async def devices(self) -> list[Device]:
        rows = await self._all(
            "SELECT id, role, status, enrolled_at, revoked_at FROM devices ORDER BY id"
        )
        return [Device(*row) for row in rows]

    async def active_device_ids(self) -> set[str]:
        """The ids of every device that may connect (no PSK is read or decrypted)."""
        return {dev for (dev,) in await self._all("SELECT id FROM devices WHERE status = 'active'")}

    async def active_psks(self, only: Collection[str] | None = None) -> dict[str, bytes]:
        """PSK by device id, for every device that may connect (or those of ``only`` that may)."""
        if only is None:
            rows = await self._all("SELECT id, psk FROM devices WHERE status = 'active'")
        else:
            rows = await self._all(
                "SELECT id, psk FROM devices WHERE status = 'active' "
                "AND id IN (SELECT value FROM json_each(?))",
                (json_list(only),),
            )
        try:
            return {dev: self._vault.decrypt(bytes(psk), psk_context(dev)) for dev, psk in rows}
        except VaultError as exc:
            raise StoreError(str(exc)) from None

    async def revoke_device(self, device_id: str, now: int) -> list[str]:
        """Revoke a device: PSK erased, certificates revoked, grants revoked (with rotation of
        every resource a consumer could read). Returns the resources rotated."""
        async with self._transaction():
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
            elif device[0] == "producer":
                # Its next secret is in the revoked device's hands: retire its resources by
                # marking the live epochs compromised (objects it sealed stay readable to those
                # entitled; its certificate, revoked above, vouches for nothing new).
                await self._db.execute(
                    "UPDATE epochs SET state = 'compromised', deactivated_at = ? "
                    "WHERE state IN ('active', 'pre-active') AND resource_id IN "
                    "(SELECT id FROM resources WHERE producer_id = ?)",
                    (now, device_id),
                )
            await self._audit("admin", "revoke-device", device_id, "ok", {"rotated": rotated}, now)
            revoked = rotated
        await self._erase_freed()  # the PSK's old ciphertext must not linger in the WAL
        return revoked

    # --- proxy links -----------------------------------------------------------------------------

    def link_psk(self, proxy_id: str, device_id: str) -> bytes:
        """The derived (never stored) DTLS PSK between a proxy and a device; see
        :meth:`Envelope.link_psk`. ValueError for malformed ids. Checks no role or status."""
        return self._vault.link_psk(proxy_id, device_id)

    async def link_psks(self, proxy_id: str) -> dict[str, bytes]:
        """Link PSK by device id, for every active producer and consumer (never a proxy, never a
        revoked device), as ``proxy_id`` needs them."""
        rows = await self._all(
            "SELECT id FROM devices WHERE status = 'active' AND role IN ('producer', 'consumer') "
            "ORDER BY id"
        )
        return {dev: self._vault.link_psk(proxy_id, dev) for (dev,) in rows}

    async def record_link_delivery(self, device_id: str, proxy_id: str, now: int) -> bool:
        """Note that ``device_id`` was handed its link PSK for ``proxy_id``; the first time, audit
        it, durably, in the same transaction. Returns whether it was the first time.

        The ``deliveries`` table keeps these as (device, proxy id, epoch 0): a proxy id has no
        '/' and every resource id has one, and epochs start at 1, so they never meet a secret's
        delivery, and the schema stays as it is.
        """
        async with self._transaction(count=False):
            cursor = await self._db.execute(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, 0, ?)", (device_id, proxy_id, now)
            )
            first = cursor.rowcount == 1
            if first:
                await self._audit(device_id, "link", proxy_id, "ok", {}, now)
            return first

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
        async with self._transaction():
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

    async def certificate(
        self, *, device_id: str | None = None, kid: bytes | None = None, now: int
    ) -> bytes | None:
        """The newest unrevoked, unexpired certificate (DER) of a device or with a key id."""
        # One fixed statement: a NULL parameter matches nothing, so either key selects.
        row = await self._lookup(
            "SELECT der FROM certificates WHERE (device_id = ? OR kid = ?) "
            "AND revoked_at IS NULL AND not_before <= ? AND ? <= not_after "
            "ORDER BY issued_at DESC LIMIT 1",
            (device_id, kid, now, now),
        )
        return None if row is None else bytes(row[0])

    async def revoked_certificates(self, now: int) -> list[tuple[int, int]]:
        """(serial, revoked at) of every revoked certificate that has not expired anyway."""
        rows = await self._all(
            "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL "
            "AND not_after >= ? ORDER BY revoked_at",
            (now,),
        )
        return [(int(serial, 16), at) for serial, at in rows]
