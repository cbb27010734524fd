"""Resources, epochs and their KMIP states: the AS's key records (grants: :mod:`.grants`).

Every change that belongs together (a rotation: three epochs, with its audit record) is one
transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..envelope import VaultError
from .database import json_list
from .deliveries import Deliveries
from .schema import (
    ACTIVE,
    DEACTIVATED,
    PRE_ACTIVE,
    Conflict,
    Epoch,
    NotFound,
    Resource,
    StoreError,
    secret_context,
)

__all__ = ["KeyRecords"]

_INSERT_EPOCH = (
    "INSERT INTO epochs (resource_id, epoch, state, secret, created_at, activated_at, rotate_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class KeyRecords(Deliveries):
    """The queries on resources, epochs and grants."""

    # --- resources and epochs --------------------------------------------------------------------

    async def register_resource(self, resource: Resource) -> None:
        """Register a resource: epoch 1 active and epoch 2 pre-active, each with a new secret."""
        await self.register_resources([resource])

    async def register_resources(self, resources: Sequence[Resource]) -> None:
        """Register resources as :meth:`register_resource` does, all in one transaction (one
        commit for a bulk registration). :class:`Conflict`, and nothing registered, if one is
        registered already or listed twice."""
        ids = [r.id for r in resources]
        twice = [i for i, n in Counter(ids).items() if n > 1]
        if twice:
            raise Conflict(f"resource {twice[0]!r} is listed twice")
        async with self._transaction():
            row = await self._one(
                "SELECT id FROM resources WHERE id IN (SELECT value FROM json_each(?)) LIMIT 1",
                (json_list(ids),),
            )
            if row is not None:
                raise Conflict(f"resource {row[0]!r} is registered already")
            await self._db.executemany(
                "INSERT INTO resources VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (r.id, r.producer_id, r.content_format, r.profile, r.max_age,
                     r.rotation_period, r.registered_at)
                    for r in resources
                ],
            )  # fmt: skip
            epochs = []
            for r in resources:
                now = r.registered_at
                due = now + r.rotation_period if r.rotation_period > 0 else None
                epochs.append(self._epoch_row(r.id, 1, ACTIVE, now, activated=now, due=due))
                epochs.append(self._epoch_row(r.id, 2, PRE_ACTIVE, now))
            await self._db.executemany(_INSERT_EPOCH, epochs)
            await self._audit_many(
                [
                    (r.producer_id, "register", r.id, "ok",
                     {"profile": r.profile, "rotation_period": r.rotation_period},
                     r.registered_at)
                    for r in resources
                ]
            )  # fmt: skip

    def _epoch_row(
        self,
        resource_id: str,
        epoch: int,
        state: str,
        now: int,
        activated: int | None = None,
        due: int | None = None,
    ) -> tuple[str, int, str, bytes, int, int | None, int | None]:
        """The row of a new epoch (see ``_INSERT_EPOCH``) with a new secret, encrypted for its
        place."""
        secret = self._vault.encrypt(self._new_secret(), secret_context(resource_id, epoch))
        return (resource_id, epoch, state, secret, now, activated, due)

    async def _insert_epoch(
        self,
        resource_id: str,
        epoch: int,
        state: str,
        now: int,
        activated: int | None = None,
    ) -> None:
        await self._db.execute(
            _INSERT_EPOCH, self._epoch_row(resource_id, epoch, state, now, activated)
        )

    async def resource(self, resource_id: str) -> Resource | None:
        row = await self._lookup("SELECT * FROM resources WHERE id = ?", (resource_id,))
        return None if row is None else Resource(*row)

    async def resources(self, producer_id: str | None = None) -> list[Resource]:
        if producer_id is None:
            rows = await self._all("SELECT * FROM resources ORDER BY id")
        else:
            rows = await self._all(
                "SELECT * FROM resources WHERE producer_id = ? ORDER BY id", (producer_id,)
            )
        return [Resource(*row) for row in rows]

    async def live_resources(self, producer_id: str | None = None) -> list[tuple[Resource, int]]:
        """(resource, active epoch) of every resource (or a producer's) that has an active epoch,
        by id: one query, not one per resource."""
        select = (
            "SELECT r.id, r.producer_id, r.content_format, r.profile, r.max_age, "
            "r.rotation_period, r.registered_at, e.epoch FROM resources r "
            "JOIN epochs e ON e.resource_id = r.id AND e.state = 'active' "
        )
        if producer_id is None:
            rows = await self._all(select + "ORDER BY r.id")
        else:
            rows = await self._all(select + "WHERE r.producer_id = ? ORDER BY r.id", (producer_id,))
        return [(Resource(*row[:7]), int(row[7])) for row in rows]

    async def live_epochs(self, resource_ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """The active and pre-active epoch numbers of each resource, oldest first (an empty
        tuple for a resource without any), in one query."""
        live: dict[str, list[int]] = {resource_id: [] for resource_id in resource_ids}
        for resource_id, epoch in await self._all(
            "SELECT resource_id, epoch FROM epochs WHERE state IN ('active', 'pre-active') "
            "AND resource_id IN (SELECT value FROM json_each(?))",
            (json_list(live),),
        ):
            live[resource_id].append(int(epoch))
        return {resource_id: tuple(sorted(epochs)) for resource_id, epochs in live.items()}

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
        select = (
            "SELECT resource_id, epoch, state, created_at, activated_at, deactivated_at, secret "
            "FROM epochs WHERE resource_id = ? AND "
        )
        if epoch is None:  # by the index of active epochs, not through the resource's history
            row = await self._lookup(select + "state = 'active'", (resource_id,))
        else:
            row = await self._lookup(select + "epoch = ?", (resource_id, epoch))
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
        rows = await self._all(  # no ORDER BY: it would walk the history instead of the index
            "SELECT epoch, state FROM epochs WHERE resource_id = ? "
            "AND state IN ('active', 'pre-active')",
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
            "UPDATE epochs SET state = 'active', activated_at = :now, rotate_at = :now + "
            "(SELECT NULLIF(rotation_period, 0) FROM resources WHERE id = :resource) "
            "WHERE resource_id = :resource AND epoch = :epoch",
            {"now": now, "resource": resource_id, "epoch": new_active},
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
        """Resources whose active epoch has lived its rotation period (its ``rotate_at``)."""
        rows = await self._all(
            "SELECT resource_id FROM epochs WHERE state = 'active' AND rotate_at IS NOT NULL "
            "AND rotate_at <= ? ORDER BY resource_id",
            (now,),
        )
        return [row[0] for row in rows]

    async def destroy_expired(self, now: int, retention: int) -> list[tuple[str, int]]:
        """Destroy deactivated and compromised epochs older than ``retention`` seconds: the secret
        is overwritten with zeros, then cleared. Returns the (resource, epoch) destroyed."""
        # No ORDER BY (sorted here): it would draw SQLite to the primary key, a scan of every
        # epoch, instead of the index of retired epochs.
        expired = (
            "SELECT resource_id, epoch FROM epochs WHERE state IN ('deactivated', "
            "'compromised') AND deactivated_at <= ?"
        )
        if not await self._one(expired, (now - retention,)):
            return []  # the common case, once a second: no write transaction for nothing
        async with self._transaction() as tx:
            rows = sorted(await self._all(expired, (now - retention,)))
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
