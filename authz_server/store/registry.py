"""Devices, their PSKs and certificates, and the proxy links: who exists in the AS's eyes.

Enrolment, revocation (PSK erased, certificates revoked, a consumer's grants ended through
:class:`.access.Access`, a producer's live epochs marked compromised), the credentials the server
loads, the derived link PSKs, and the certificates the CA issued. Each change with its audit
record is one transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from ..envelope import Envelope, VaultError
from .access import Access
from .audit import AuditLog
from .backend import Backend
from .schema import ROLES, Conflict, Device, NoSuchRecord, StoreError, psk_context

__all__ = ["Registry"]


class Registry:
    """The devices, links and certificates, over a store's backend."""

    def __init__(self, db: Backend, envelope: Envelope, audit: AuditLog, access: Access) -> None:
        self.db = db
        self._envelope = envelope
        self.audit = audit
        self.access = access

    # --- devices ---------------------------------------------------------------------------------

    async def add_device(
        self, device_id: str, role: str, psk: bytes, now: int, *, actor: str = "admin"
    ) -> None:
        """Enroll a device with its PSK; :class:`Conflict` if the id was ever used."""
        await self.add_devices([(device_id, role, psk)], now, actor=actor)

    async def add_devices(
        self, devices: Sequence[tuple[str, str, bytes]], now: int, *, actor: str = "admin"
    ) -> None:
        """Enroll (id, role, PSK) devices as :meth:`add_device` does, all in one transaction
        (one commit for a bulk enrolment). :class:`Conflict`, and nothing enrolled, if an id was
        ever used or is listed twice; ValueError for an unknown role."""
        if any(role not in ROLES for _, role, _ in devices):
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        sql = self.db.sql
        # Ids differing only in case would name one subject to case-insensitive X.509 matching
        # (the backend's fold is its lower()'s).
        folded = [sql.fold(device_id) for device_id, _, _ in devices]
        counts = Counter(folded)
        twice = [d for (d, _, _), f in zip(devices, folded, strict=True) if counts[f] > 1]
        if twice:
            raise Conflict(f"device {twice[0]!r} is listed twice")
        async with self.db.transaction():
            row = await self.db.one(sql.DEVICE_TAKEN, (sql.id_list(folded),))
            if row is not None:
                taken = next((d for (d, _, _), f in zip(devices, folded, strict=True)
                              if f == row[0]), row[0])  # fmt: skip
                raise Conflict(f"device {taken!r} exists already (ids are never reused)")
            await self.db.executemany(
                sql.DEVICE_INSERT,
                [
                    (device_id, role, self._envelope.encrypt(psk, psk_context(device_id)), now)
                    for device_id, role, psk in devices
                ],
            )
            await self.audit.append_many(
                [(actor, "enroll", device_id, "ok", {"role": role}, now)
                 for device_id, role, _ in devices]
            )  # fmt: skip

    async def device(self, device_id: str) -> Device | None:
        row = await self.db.lookup(self.db.sql.DEVICE, (device_id,))
        return None if row is None else Device(*row)

    async def devices(self) -> list[Device]:
        rows = await self.db.all(self.db.sql.DEVICES)
        return [Device(*row) for row in rows]

    async def active_device_ids(self) -> set[str]:
        """The ids of every device that may connect (no PSK is read or decrypted)."""
        return {dev for (dev,) in await self.db.all(self.db.sql.ACTIVE_DEVICE_IDS)}

    async def active_psks(self, only: Collection[str] | None = None) -> dict[str, bytes]:
        """PSK by device id, for every device that may connect (or those of ``only`` that may)."""
        sql = self.db.sql
        if only is None:
            rows = await self.db.all(sql.ACTIVE_PSKS)
        else:
            rows = await self.db.all(sql.ACTIVE_PSKS_OF, (sql.id_list(only),))
        try:
            return {dev: self._envelope.decrypt(bytes(psk), psk_context(dev)) for dev, psk in rows}
        except VaultError as exc:
            raise StoreError(str(exc)) from None

    async def revoke_device(self, device_id: str, now: int, *, actor: str = "admin") -> list[str]:
        """Revoke a device: PSK erased, certificates revoked, grants revoked (with rotation of
        every resource a consumer could read). Returns the resources rotated."""
        sql = self.db.sql
        async with self.db.transaction():
            device = await self.db.one(sql.DEVICE_ROLE_STATUS, (device_id,))
            if device is None:
                raise NoSuchRecord(f"no device {device_id!r}")
            if device[1] == "revoked":
                raise Conflict(f"device {device_id!r} is revoked already")
            await self.db.execute(sql.PSK_OVERWRITE, (device_id,))
            await self.db.execute(sql.DEVICE_REVOKE, (now, device_id))
            await self.db.execute(sql.CERTIFICATES_REVOKE_OF, (now, device_id))
            rotated: list[str] = []
            if device[0] == "consumer":
                rotated = await self.access.end_grants_of(device_id, None, now)
            elif device[0] == "producer":
                # Its next secret is in the revoked device's hands: retire its resources by
                # marking the live epochs compromised (objects it sealed stay readable to those
                # entitled; its certificate, revoked above, vouches for nothing new).
                await self.db.execute(sql.PRODUCER_EPOCHS_COMPROMISE, (now, device_id))
                if self.access.parts is not None:
                    await self.access.parts.producer_revoked(device_id, now)
            await self.audit.append(
                actor, "revoke-device", device_id, "ok", {"rotated": rotated}, now
            )
            revoked = rotated
        await self.db.erase_freed()  # the PSK's old ciphertext must not linger in the WAL
        return revoked

    # --- proxy links -----------------------------------------------------------------------------

    def link_psk(self, proxy_id: str, device_id: str) -> bytes:
        """The derived (never stored) DTLS PSK between a proxy and a device; see
        :meth:`authz_server.envelope.Envelope.link_psk`. ValueError for malformed ids. Checks no
        role or status."""
        return self._envelope.link_psk(proxy_id, device_id)

    async def link_psks(self, proxy_id: str) -> dict[str, bytes]:
        """Link PSK by device id, for every active producer and consumer (never a proxy, never a
        revoked device), as ``proxy_id`` needs them."""
        rows = await self.db.all(self.db.sql.LINKED_DEVICES)
        return {dev: self._envelope.link_psk(proxy_id, dev) for (dev,) in rows}

    async def record_link_delivery(self, device_id: str, proxy_id: str, now: int) -> bool:
        """Note that ``device_id`` was handed its link PSK for ``proxy_id``; the first time, audit
        it, durably, in the same transaction. Returns whether it was the first time.

        The ``deliveries`` table keeps these as (device, proxy id, epoch 0): a proxy id has no
        '/' and every resource id has one, and epochs start at 1, so they never meet a secret's
        delivery, and the schema stays as it is.
        """
        async with self.db.transaction(count=False):
            changed = await self.db.execute(
                self.db.sql.LINK_DELIVERY_INSERT, (device_id, proxy_id, now)
            )
            first = changed == 1
            if first:
                await self.audit.append(device_id, "link", proxy_id, "ok", {}, now)
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
        async with self.db.transaction():
            await self.db.execute(
                self.db.sql.CERTIFICATE_INSERT,
                (format(serial, "x"), device_id, kid, der, not_before, not_after, now),
            )
            await self.audit.append(
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
        row = await self.db.lookup(self.db.sql.VALID_CERTIFICATE, (device_id, kid, now, now))
        return None if row is None else bytes(row[0])

    async def revoked_certificates(self, now: int) -> list[tuple[int, int]]:
        """(serial, revoked at) of every revoked certificate that has not expired anyway."""
        rows = await self.db.all(self.db.sql.REVOKED_CERTIFICATES, (now,))
        return [(int(serial, 16), at) for serial, at in rows]
