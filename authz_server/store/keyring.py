"""Resources, epochs and their KMIP states: the AS's key records (grants: :mod:`.access`).

Every change that belongs together (a rotation: three epochs, with its audit record) is one
transaction. Each new epoch gets a fresh secret (32 bytes from the operating system's CSPRNG),
stored only through the envelope.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from oscar.keys import ACCESS_SECRET_LENGTH

from ..envelope import Envelope, VaultError
from .audit import AuditLog
from .backend import Backend
from .schema import (
    ACTIVE,
    DEACTIVATED,
    PRE_ACTIVE,
    Conflict,
    Epoch,
    NoSuchRecord,
    Resource,
    StoreError,
    secret_context,
)

__all__ = ["Keyring"]


class Keyring:
    """The resources and their epochs, over a store's backend."""

    def __init__(self, db: Backend, envelope: Envelope, audit: AuditLog) -> None:
        self.db = db
        self._envelope = envelope
        self.audit = audit

    @staticmethod
    def _new_secret() -> bytes:
        """A fresh access secret: 32 bytes from the operating system's CSPRNG."""
        return os.urandom(ACCESS_SECRET_LENGTH)

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
        async with self.db.transaction():
            await self.insert_resources(resources)

    async def insert_resources(self, resources: Sequence[Resource]) -> None:
        """:meth:`register_resources`' statements and audit records, inside the caller's
        transaction (a registration with parts: :meth:`.parts.Parts.register_resource`)."""
        ids = [r.id for r in resources]
        sql = self.db.sql
        row = await self.db.one(sql.RESOURCE_TAKEN, (sql.id_list(ids),))
        if row is not None:
            raise Conflict(f"resource {row[0]!r} is registered already")
        await self.db.executemany(
            sql.RESOURCE_INSERT,
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
        await self.db.executemany(sql.EPOCH_INSERT, epochs)
        await self.audit.append_many(
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
        """The row of a new epoch (see ``EPOCH_INSERT``) with a new secret, encrypted for its
        place."""
        secret = self._envelope.encrypt(self._new_secret(), secret_context(resource_id, epoch))
        return (resource_id, epoch, state, secret, now, activated, due)

    async def _insert_epoch(
        self,
        resource_id: str,
        epoch: int,
        state: str,
        now: int,
        activated: int | None = None,
    ) -> None:
        await self.db.execute(
            self.db.sql.EPOCH_INSERT, self._epoch_row(resource_id, epoch, state, now, activated)
        )

    async def resource(self, resource_id: str) -> Resource | None:
        row = await self.db.lookup(self.db.sql.RESOURCE, (resource_id,))
        return None if row is None else Resource(*row)

    async def resources(self, producer_id: str | None = None) -> list[Resource]:
        if producer_id is None:
            rows = await self.db.all(self.db.sql.RESOURCES)
        else:
            rows = await self.db.all(self.db.sql.RESOURCES_OF, (producer_id,))
        return [Resource(*row) for row in rows]

    async def live_resources(self, producer_id: str | None = None) -> list[tuple[Resource, int]]:
        """(resource, active epoch) of every resource (or a producer's) that has an active epoch,
        by id: one query, not one per resource."""
        if producer_id is None:
            rows = await self.db.all(self.db.sql.LIVE_RESOURCES)
        else:
            rows = await self.db.all(self.db.sql.LIVE_RESOURCES_OF, (producer_id,))
        return [(Resource(*row[:7]), int(row[7])) for row in rows]

    async def live_epochs(self, resource_ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """The active and pre-active epoch numbers of each resource, oldest first (an empty
        tuple for a resource without any), in one query."""
        live: dict[str, list[int]] = {resource_id: [] for resource_id in resource_ids}
        sql = self.db.sql
        for resource_id, epoch in await self.db.all(sql.LIVE_EPOCHS, (sql.id_list(live),)):
            live[resource_id].append(int(epoch))
        return {resource_id: tuple(sorted(epochs)) for resource_id, epochs in live.items()}

    async def epochs(self, resource_id: str) -> list[Epoch]:
        """Every epoch of the resource, oldest first, without secrets."""
        rows = await self.db.all(self.db.sql.EPOCHS, (resource_id,))
        return [Epoch(*row) for row in rows]

    async def epoch(
        self, resource_id: str, epoch: int | None = None, *, with_secret: bool = False
    ) -> Epoch | None:
        """One epoch (the active one when ``epoch`` is None), its secret decrypted if asked."""
        if epoch is None:  # by the index of active epochs, not through the resource's history
            row = await self.db.lookup(self.db.sql.ACTIVE_EPOCH_ROW, (resource_id,))
        else:
            row = await self.db.lookup(self.db.sql.EPOCH_ROW, (resource_id, epoch))
        if row is None:
            return None
        secret = None
        if with_secret and row[6] is not None:
            try:
                secret = self._envelope.decrypt(bytes(row[6]), secret_context(row[0], row[1]))
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
        async with self.db.transaction():
            epoch = await self.advance(resource_id, now)
            await self.audit.append(
                actor, "rotate", resource_id, "ok", {"epoch": epoch, "reason": reason}, now
            )
            return epoch

    async def advance(self, resource_id: str, now: int) -> int:
        """A rotation's statements, inside the caller's transaction (no audit record): the
        pre-active epoch becomes active, the active one deactivated, a new pre-active one made.
        Returns the new active epoch; :class:`NoSuchRecord` without both live epochs."""
        sql = self.db.sql
        rows = await self.db.all(sql.LIVE_EPOCH_STATES, (resource_id,))
        states = {state: epoch for epoch, state in rows}
        if ACTIVE not in states or PRE_ACTIVE not in states:
            raise NoSuchRecord(f"no resource {resource_id!r} with an active and a pre-active epoch")
        await self.db.execute(sql.EPOCH_DEACTIVATE, (now, resource_id, states[ACTIVE]))
        new_active = states[PRE_ACTIVE]
        await self.db.execute(
            sql.EPOCH_ACTIVATE, {"now": now, "resource": resource_id, "epoch": new_active}
        )
        await self._insert_epoch(resource_id, new_active + 1, PRE_ACTIVE, now)
        return int(new_active)

    async def compromise(
        self, resource_id: str, epoch: int | None, now: int, *, actor: str = "admin"
    ) -> int:
        """Mark an epoch compromised (the active one by default) and move on at once: the
        pre-active epoch becomes active and a new pre-active epoch is made (a compromised
        pre-active epoch is simply replaced). Returns the active epoch afterwards."""
        sql = self.db.sql
        async with self.db.transaction():
            target = await self.epoch(resource_id, epoch)
            if target is None:
                raise NoSuchRecord(f"no epoch {epoch} of resource {resource_id!r}")
            if target.state not in (ACTIVE, PRE_ACTIVE, DEACTIVATED):
                raise Conflict(f"epoch {target.epoch} is {target.state} already")
            if target.state == ACTIVE:
                await self.advance(resource_id, now)  # the pre-active epoch takes over at once
            await self.db.execute(sql.EPOCH_COMPROMISE, (now, resource_id, target.epoch))
            if target.state == PRE_ACTIVE:
                # Replace the leaked pre-active secret with a new epoch after it.
                await self._insert_epoch(resource_id, target.epoch + 1, PRE_ACTIVE, now)
            row = await self.db.one(sql.ACTIVE_EPOCH, (resource_id,))
            new_active = int(row[0])
            await self.audit.append(
                actor,
                "compromise",
                resource_id,
                "ok",
                {"epoch": target.epoch, "active": new_active},
                now,
            )
            return new_active

    async def due_rotations(self, now: int) -> list[str]:
        """Resources whose active epoch has lived its rotation period (its ``rotate_at``): what
        was due when read; rotate each with :meth:`rotate_if_due`, which decides again."""
        rows = await self.db.all(self.db.sql.DUE_ROTATIONS, (now,))
        return [row[0] for row in rows]

    async def rotate_if_due(
        self, resource_id: str, now: int, *, actor: str, reason: str
    ) -> int | None:
        """:meth:`rotate` the resource if its rotation is still due once the write transaction
        holds the database's write lock, else nothing (None): the scheduled rotation happens
        once however many AS instances (and admin CLIs) found it due, since whoever comes
        second reads the first one's committed rotation (its new ``rotate_at``)."""
        async with self.db.transaction() as tx:
            if await self.db.one(self.db.sql.ROTATION_DUE, (resource_id, now)) is None:
                tx.count = False  # done by another instance meanwhile: nothing changed
                return None
            epoch = await self.advance(resource_id, now)
            await self.audit.append(
                actor, "rotate", resource_id, "ok", {"epoch": epoch, "reason": reason}, now
            )
            return epoch

    async def destroy_retired(self, resource_id: str, now: int, *, actor: str) -> list[int]:
        """Destroy every deactivated and compromised epoch of one resource now, whatever its
        retention (the console's destroy, behind its confirmation): overwritten, then cleared,
        each audited. Returns the epochs destroyed (none: nothing changed)."""
        sql = self.db.sql
        async with self.db.transaction() as tx:
            if await self.db.one(sql.RESOURCE, (resource_id,)) is None:
                raise NoSuchRecord(f"no resource {resource_id!r}")
            epochs = [int(row[0]) for row in await self.db.all(sql.RETIRED_OF, (resource_id,))]
            for epoch in epochs:
                await self.db.execute(sql.EPOCH_OVERWRITE, (resource_id, epoch))
                await self.db.execute(sql.EPOCH_DESTROY, (resource_id, epoch))
                await self.audit.append(actor, "destroy", resource_id, "ok", {"epoch": epoch}, now)
            tx.count = bool(epochs)
        if epochs:
            await self.db.erase_freed()
        return epochs

    async def destroy_expired(self, now: int, retention: int) -> list[tuple[str, int]]:
        """Destroy deactivated and compromised epochs older than ``retention`` seconds: the secret
        is overwritten with zeros, then cleared. Returns the (resource, epoch) destroyed. What to
        destroy is read again inside the write transaction, so an epoch is destroyed (and
        audited) once however many AS instances run this."""
        sql = self.db.sql
        if not await self.db.one(sql.RETIRED_BEFORE, (now - retention,)):
            return []  # the common case, once a second: no write transaction for nothing
        async with self.db.transaction() as tx:
            rows = sorted(await self.db.all(sql.RETIRED_BEFORE, (now - retention,)))  # sorted here
            for resource_id, epoch in rows:
                await self.db.execute(sql.EPOCH_OVERWRITE, (resource_id, epoch))
                await self.db.execute(sql.EPOCH_DESTROY, (resource_id, epoch))
                await self.audit.append("as", "destroy", resource_id, "ok", {"epoch": epoch}, now)
            tx.count = bool(rows)  # nothing destroyed: nothing for the server's poll to notice
            destroyed = [(r, e) for r, e in rows]
        if destroyed:
            await self.db.erase_freed()
        return destroyed
