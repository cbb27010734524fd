"""Resources, epochs and their KMIP states, grants and exclusions: the AS's key records.

Every change that belongs together (a rotation: three epochs; a revocation: its rotations and
exclusions; each with its audit record) is one transaction.
"""

from __future__ import annotations

import fnmatch

from ..vault import VaultError
from .database import Database
from .schema import (
    ACTIVE,
    DEACTIVATED,
    PRE_ACTIVE,
    Conflict,
    Epoch,
    NotFound,
    Resource,
    SecretView,
    StoreError,
    secret_context,
)

__all__ = ["KeyRecords"]


class KeyRecords(Database):
    """The queries on resources, epochs and grants."""

    # --- resources and epochs --------------------------------------------------------------------

    async def register_resource(self, resource: Resource) -> None:
        """Register a resource: epoch 1 active and epoch 2 pre-active, each with a new secret."""
        async with self._transaction():
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
                self._vault.encrypt(secret, secret_context(resource_id, epoch)),
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
                secret = self._vault.decrypt(bytes(row[6]), secret_context(row[0], row[1]))
            except VaultError as exc:
                raise StoreError(str(exc)) from None
        return Epoch(
            resource_id=row[0],
            epoch=row[1],
            state=row[2],
            created_at=row[3],
            activated_at=row[4],
            deactivated_at=row[5],
            secret=secret,
        )

    async def rotate(self, resource_id: str, now: int, *, actor: str, reason: str) -> int:
        """Activate the pre-active epoch, deactivate the active one, make a new pre-active one.
        Returns the new active epoch."""
        async with self._transaction():
            epoch = await self._rotate(resource_id, now)
            await self._audit(
                actor, "rotate", resource_id, "ok", {"epoch": epoch, "reason": reason}, now
            )
            return epoch

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
        return int(new_active)

    async def compromise(self, resource_id: str, epoch: int | None, now: int) -> int:
        """Mark an epoch compromised (the active one by default) and move on at once: the
        pre-active epoch becomes active and a new pre-active epoch is made (a compromised
        pre-active epoch is simply replaced). Returns the active epoch afterwards."""
        async with self._transaction():
            target = await self.epoch(resource_id, epoch)
            if target is None:
                raise NotFound(f"no epoch {epoch} of resource {resource_id!r}")
            if target.state not in (ACTIVE, PRE_ACTIVE, DEACTIVATED):
                raise Conflict(f"epoch {target.epoch} is {target.state} already")
            if target.state == ACTIVE:
                await self._rotate(resource_id, now)  # the pre-active epoch takes over at once
            await self._db.execute(
                "UPDATE epochs SET state = 'compromised', deactivated_at = COALESCE("
                "deactivated_at, ?) WHERE resource_id = ? AND epoch = ?",
                (now, resource_id, target.epoch),
            )
            if target.state == PRE_ACTIVE:
                # Replace the leaked pre-active secret with a new epoch after it.
                await self._insert_epoch(resource_id, target.epoch + 1, PRE_ACTIVE, now)
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
            return new_active

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
        async with self._transaction() as tx:
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
            tx.count = bool(rows)  # nothing destroyed: nothing for the server's poll to notice
            destroyed = [(r, e) for r, e in rows]
        if destroyed:
            await self._erase_freed()
        return destroyed

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
        async with self._transaction():
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
                if active is None:  # a retired resource: nothing new to let it into
                    continue
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
            return rotated

    async def revoke_grants(self, consumer_id: str, pattern: str | None, now: int) -> list[str]:
        """Revoke the consumer's grants (those with exactly ``pattern``, or all): every resource
        it could read rotates at once and it is excluded from the new epoch on. Returns the
        resources rotated."""
        async with self._transaction():
            rotated = await self._revoke_grants(consumer_id, pattern, now, required=True)
            await self._audit(
                "admin",
                "revoke-grant",
                consumer_id,
                "ok",
                {"pattern": pattern, "rotated": rotated},
                now,
            )
            return rotated

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
        return await self._end_grants(consumer_id, chosen, now, keep_covered=False)

    async def _end_grants(
        self, consumer_id: str, chosen: list[tuple[int, str]], now: int, *, keep_covered: bool
    ) -> list[str]:
        """End these grants: every live resource they covered rotates and the consumer is
        excluded from the new epoch on. With ``keep_covered``, resources another live grant of the
        consumer still covers are left alone (an expiry, unlike a revocation, takes only what
        that grant gave)."""
        patterns = [p for _, p in chosen]
        for gid, _ in chosen:
            await self._db.execute("UPDATE grants SET revoked_at = ? WHERE id = ?", (now, gid))
        remaining = []
        if keep_covered:
            remaining = [
                p
                for (p,) in await self._all(
                    "SELECT pattern FROM grants WHERE consumer_id = ? AND revoked_at IS NULL "
                    "AND (until IS NULL OR ? < until)",
                    (consumer_id, now),
                )
            ]
        resources = [
            rid
            for (rid,) in await self._all(
                "SELECT DISTINCT resource_id FROM epochs WHERE state = 'active' "
                "ORDER BY resource_id"
            )
            if any(fnmatch.fnmatchcase(rid, p) for p in patterns)
            and not any(fnmatch.fnmatchcase(rid, p) for p in remaining)
        ]
        for resource_id in resources:
            new_epoch = await self._rotate(resource_id, now)
            await self._db.execute(
                "INSERT INTO exclusions VALUES (?, ?, ?, NULL, ?)",
                (consumer_id, resource_id, new_epoch, now),
            )
        return resources

    async def expire_grants(self, now: int) -> list[tuple[str, list[str]]]:
        """End every grant whose ``until`` has passed as a revocation would: what it alone gave
        rotates, and the consumer is excluded from the new epoch on. Returns (consumer, rotated)
        per grant ended."""
        expired = await self._all(
            "SELECT id, consumer_id, pattern FROM grants WHERE revoked_at IS NULL "
            "AND until IS NOT NULL AND until <= ? ORDER BY id",
            (now,),
        )
        ended = []
        for gid, consumer_id, pattern in expired:
            async with self._transaction():
                rotated = await self._end_grants(
                    consumer_id, [(gid, pattern)], now, keep_covered=True
                )
                await self._audit(
                    "as", "expire-grant", consumer_id, "ok",
                    {"pattern": pattern, "rotated": rotated}, now,
                )  # fmt: skip
            ended.append((consumer_id, rotated))
        return ended

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

    async def record_delivery(self, device_id: str, resource_id: str, epoch: int, now: int) -> bool:
        """Note that ``device_id`` was handed the secret of (resource, epoch); the first time,
        audit it, durably, in the same transaction. Returns whether it was the first time.

        Called before the secret is sent, so no delivery escapes the log; repeated deliveries of
        the same epoch to the same device are not logged again (they reveal nothing new).
        """
        async with self._transaction(count=False):
            cursor = await self._db.execute(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)",
                (device_id, resource_id, epoch, now),
            )
            first = cursor.rowcount == 1
            if first:
                await self._audit(device_id, "secret", resource_id, "ok", {"epoch": epoch}, now)
            return first

    async def secret_view(
        self, device_id: str, resource_id: str, epoch: int | None, now: int
    ) -> SecretView:
        """Everything a secret request is decided on, in one query (one thread hop): the resource,
        the epoch asked for (the active one when ``epoch`` is None) with its secret decrypted, and
        whether the device's live grants cover the resource and leave that epoch unexcluded."""
        row = await self._one(
            "SELECT r.id, r.producer_id, r.content_format, r.profile, r.max_age, "
            "r.rotation_period, r.registered_at, "
            "e.epoch, e.state, e.created_at, e.activated_at, e.deactivated_at, e.secret, "
            "EXISTS (SELECT 1 FROM grants g WHERE g.consumer_id = :device "
            "  AND g.revoked_at IS NULL AND (g.until IS NULL OR :now < g.until) "
            "  AND oscar_match(:resource, g.pattern)), "
            "EXISTS (SELECT 1 FROM exclusions x WHERE x.consumer_id = :device "
            "  AND x.resource_id = :resource AND x.from_epoch <= COALESCE(e.epoch, :epoch, 0) "
            "  AND (x.to_epoch IS NULL OR COALESCE(e.epoch, :epoch, 0) <= x.to_epoch)) "
            "FROM (SELECT 1) AS one "
            "LEFT JOIN resources r ON r.id = :resource "
            "LEFT JOIN epochs e ON e.resource_id = :resource "
            "  AND (e.epoch = :epoch OR (:epoch IS NULL AND e.state = 'active'))",
            {"device": device_id, "resource": resource_id, "epoch": epoch, "now": now},
        )
        resource = None if row[0] is None else Resource(*row[0:7])
        found = None
        if row[7] is not None:
            secret = None
            if row[12] is not None:
                try:
                    secret = self._vault.decrypt(
                        bytes(row[12]), secret_context(resource_id, row[7])
                    )
                except VaultError as exc:
                    raise StoreError(str(exc)) from None
            found = Epoch(
                resource_id=resource_id,
                epoch=row[7],
                state=row[8],
                created_at=row[9],
                activated_at=row[10],
                deactivated_at=row[11],
                secret=secret,
            )
        return SecretView(resource, found, bool(row[13]), bool(row[14]))

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
