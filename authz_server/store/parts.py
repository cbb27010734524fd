"""A resource's parts (issue 19, "plain and partial access"): their declaration, each encrypted
part's own secret lifecycle, grants of one part, and revocation of one audience.

A resource may declare 1 to 16 parts (``oscar.parts``' names), each ``plain`` (signed, readable
by anyone, no secret) or ``encrypted`` (at least one). Each encrypted part has epochs of its own,
like a resource's (epoch 1 active and 2 pre-active at declaration; a rotation activates the
pre-active one, deactivates the active one and makes a new pre-active one), each with a fresh
secret (:meth:`.keyring.Keyring._new_secret`) stored only through the envelope, bound to
(resource, part, epoch) by :func:`.schema.part_secret_context` (the records, ``PartEpoch`` and
``PartView``, are :mod:`.schema`'s).

Who may read part P of resource R at epoch e: the owning producer (any epoch not destroyed); a
consumer with a live grant of the whole resource (today's pattern grants) or of P alone, whom no
exclusion of P covers at e. Revoking one audience rotates only what it could read:

- a grant of P revoked: P rotates (unless the consumer still reads P through a whole-resource
  grant) and the consumer is excluded from P's new epoch on; the other parts stay;
- a whole-resource grant ended (revoked, expired, the device revoked): the resource rotates as
  before (:mod:`.access`), and so does each encrypted part the consumer does not still hold a
  grant of, excluded likewise;
- a consumer excluded from P and granted again (P alone or the whole resource) gets in only from
  a new epoch of P: the exclusion closes and P rotates.

Every change is one transaction with its audit record (actor, ``declare-parts``,
``grant-part``, ``revoke-part``); no record, log line or repr holds a secret.

Retired part epochs are destroyed past the retention as the resources' are
(:meth:`Parts.destroy_expired`, run with the store's), and a revoked producer's live part epochs
are compromised with its resources'.

Each part also rotates on a schedule of its own: its active epoch's age reaching the resource's
rotation period (:meth:`Parts.due_rotations`, :meth:`Parts.rotate_if_due`, run by the server's
duties with the resources').

What this module does not do: rotate or compromise parts on an operator's ``rotate`` or
``compromise`` of the resource (see the notes of issue 19); decide who asks
(:mod:`authz_server.api_keys`, which also rotates a part whose schedule is late when a consumer
asks for its pre-active epoch, as for a resource).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from oscar.parts import MAX_PARTS, is_part_name

from ..envelope import Envelope, VaultError
from . import parts_sql
from .audit import AuditLog
from .backend import Backend
from .keyring import Keyring
from .schema import (
    ACTIVE,
    DEACTIVATED,
    PRE_ACTIVE,
    Conflict,
    NoSuchRecord,
    PartEpoch,
    PartView,
    Resource,
    StoreError,
    part_secret_context,
)

__all__ = ["ENCRYPTED", "KINDS", "PLAIN", "Parts", "check_parts"]

PLAIN, ENCRYPTED = "plain", "encrypted"
KINDS = (PLAIN, ENCRYPTED)


def check_parts(declared: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``declared`` as (name, kind) pairs if it is a valid list of parts; ValueError naming
    the rule otherwise (never echoing more than a valid name)."""
    out = []
    for item in declared:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError("a part is a (name, kind) pair")
        name, kind = item
        if not is_part_name(name):
            raise ValueError("a part name is 1 to 32 characters of A-Z a-z 0-9 . _ -, first alnum")
        if kind not in KINDS:
            raise ValueError("a part's kind is plain or encrypted")
        out.append((name, kind))
    if not 1 <= len(out) <= MAX_PARTS:
        raise ValueError(f"a resource declares 1 to {MAX_PARTS} parts")
    if len({name for name, _ in out}) != len(out):
        raise ValueError("part names must be unique")
    if ENCRYPTED not in {kind for _, kind in out}:
        raise ValueError("at least one part must be encrypted")
    return out


class Parts:
    """The parts of resources, their epochs, grants and exclusions, over a store's backend."""

    def __init__(self, db: Backend, envelope: Envelope, audit: AuditLog, keyring: Keyring) -> None:
        self.db = db
        self._envelope = envelope
        self.audit = audit
        self.keyring = keyring
        self.sql = parts_sql.of(db.sql)

    def __repr__(self) -> str:
        return "Parts(<store>)"

    # --- declaration -----------------------------------------------------------------------------

    async def register_resource(
        self, resource: Resource, declared: Sequence[tuple[str, str]]
    ) -> None:
        """Register a resource with its parts, in one transaction (ValueError for bad parts,
        :class:`Conflict` if the resource exists; nothing stored either way)."""
        chosen = check_parts(declared)
        async with self.db.transaction():
            await self.keyring.insert_resources([resource])
            await self._insert(
                resource.id, chosen, resource.registered_at, resource.producer_id,
                resource.rotation_period,
            )  # fmt: skip

    async def declare(
        self, resource_id: str, declared: Sequence[tuple[str, str]], now: int, *, actor: str
    ) -> None:
        """Declare the parts of a registered resource that has none (the operator's)."""
        chosen = check_parts(declared)
        async with self.db.transaction():
            row = await self.db.one(self.db.sql.RESOURCE, (resource_id,))
            if row is None:
                raise NoSuchRecord(f"no resource {resource_id!r}")
            if await self.db.all(self.sql.PARTS_OF, (resource_id,)):
                raise Conflict(f"resource {resource_id!r} declares its parts already")
            await self._insert(resource_id, chosen, now, actor, Resource(*row).rotation_period)

    async def _insert(
        self, resource_id: str, chosen: list[tuple[str, str]], now: int, actor: str, period: int
    ) -> None:
        await self.db.executemany(
            self.sql.PART_INSERT,
            [(resource_id, name, i, kind) for i, (name, kind) in enumerate(chosen)],
        )
        rows = []
        for name, kind in chosen:
            if kind == ENCRYPTED:
                due = now + period if period > 0 else None
                rows.append(self._epoch_row(resource_id, name, 1, ACTIVE, now, now, due))
                rows.append(self._epoch_row(resource_id, name, 2, PRE_ACTIVE, now, None))
        await self.db.executemany(self.sql.PART_EPOCH_INSERT, rows)
        await self.audit.append(
            actor, "declare-parts", resource_id, "ok", {"parts": [list(p) for p in chosen]}, now
        )

    def _epoch_row(
        self,
        resource_id: str,
        part: str,
        epoch: int,
        state: str,
        now: int,
        activated: int | None,
        due: int | None = None,
    ) -> tuple[str, str, int, str, bytes, int, int | None, int | None]:
        secret = self._envelope.encrypt(
            self.keyring._new_secret(), part_secret_context(resource_id, part, epoch)
        )
        return (resource_id, part, epoch, state, secret, now, activated, due)

    async def parts(self, resource_id: str) -> list[tuple[str, str]]:
        """(name, kind) of the resource's parts, in order (none: a single-part resource)."""
        return [(str(n), str(k)) for n, k in await self.db.all(self.sql.PARTS_OF, (resource_id,))]

    # --- epochs ----------------------------------------------------------------------------------

    def _epoch(self, resource_id: str, part: str, row: Sequence[Any], secret: bool) -> PartEpoch:
        epoch, state, created, activated, deactivated, blob = row
        plain = None
        if secret and blob is not None:
            try:
                plain = self._envelope.decrypt(
                    bytes(blob),
                    part_secret_context(resource_id, part, int(epoch)),
                )
            except VaultError as exc:
                raise StoreError(str(exc)) from None
        return PartEpoch(
            resource_id, part, int(epoch), str(state), int(created),
            activated, deactivated, plain,
        )  # fmt: skip

    async def epochs(self, resource_id: str) -> list[PartEpoch]:
        """Every epoch of every part of the resource, by part and epoch, without secrets."""
        rows = await self.db.all(self.sql.EPOCHS_OF, (resource_id,))
        return [self._epoch(resource_id, str(r[0]), r[1:], False) for r in rows]

    async def live_epochs(self, resource_id: str) -> list[PartEpoch]:
        """The active and pre-active epochs of every part, secrets decrypted (the owner's
        ``/keys`` view), by part and epoch."""
        rows = await self.db.all(self.sql.LIVE_OF, (resource_id,))
        return [self._epoch(resource_id, str(r[0]), r[1:], True) for r in rows]

    async def live_epoch_numbers(
        self, resource_ids: Sequence[str]
    ) -> dict[str, tuple[tuple[str, int], ...]]:
        """(part, epoch) of the live epochs of each resource's parts, sorted (an empty tuple
        for a resource without parts), in one query: what a ``/keys`` observer is told about."""
        found: dict[str, list[tuple[str, int]]] = {rid: [] for rid in resource_ids}
        rows = await self.db.all(self.sql.LIVE_IN, (self.db.sql.id_list(found),))
        for resource_id, part, epoch in rows:
            found[resource_id].append((str(part), int(epoch)))
        return {rid: tuple(sorted(live)) for rid, live in found.items()}

    async def advance(self, resource_id: str, part: str, now: int) -> int:
        """Rotate one part inside the caller's transaction; returns its new active epoch."""
        sql = self.sql
        rows = await self.db.all(sql.LIVE_STATES, (resource_id, part))
        states = {state: int(epoch) for epoch, state in rows}
        if ACTIVE not in states or PRE_ACTIVE not in states:
            raise NoSuchRecord(f"no encrypted part {part!r} of {resource_id!r} to rotate")
        await self.db.execute(sql.EPOCH_DEACTIVATE, (now, resource_id, part, states[ACTIVE]))
        new = states[PRE_ACTIVE]
        await self.db.execute(
            sql.EPOCH_ACTIVATE, {"now": now, "resource": resource_id, "part": part, "epoch": new}
        )
        await self.db.execute(
            sql.PART_EPOCH_INSERT,
            self._epoch_row(resource_id, part, new + 1, PRE_ACTIVE, now, None),
        )
        return new

    async def rotate(self, resource_id: str, part: str, now: int, *, actor: str) -> int:
        """Rotate one encrypted part now (the operator's), audited; returns its new active
        epoch. :class:`NoSuchRecord` for no such encrypted part."""
        async with self.db.transaction():
            await self._encrypted_part(resource_id, part)
            epoch = await self.advance(resource_id, part, now)
            await self.audit.append(
                actor, "rotate", resource_id, "ok",
                {"part": part, "epoch": epoch, "reason": "manual"}, now,
            )  # fmt: skip
            return epoch

    async def compromise(
        self, resource_id: str, part: str, epoch: int | None, now: int, *, actor: str
    ) -> tuple[int, int]:
        """Mark an epoch of one encrypted part compromised (the active one by default) and move
        on at once, as :meth:`.keyring.Keyring.compromise` does for a resource: an active one
        is replaced by the pre-active one, a pre-active one by a new epoch after it. Returns
        (the epoch compromised, the active epoch afterwards); the other parts stay."""
        sql = self.sql
        async with self.db.transaction():
            await self._encrypted_part(resource_id, part)
            row = await self.db.one(sql.EPOCH_STATE, (resource_id, part, epoch, epoch))
            if row is None:
                raise NoSuchRecord(f"no such epoch of {resource_id!r} part {part!r}")
            target, state = int(row[0]), str(row[1])
            if state not in (ACTIVE, PRE_ACTIVE, DEACTIVATED):
                raise Conflict(f"epoch {target} of part {part!r} is {state} already")
            if state == ACTIVE:
                await self.advance(resource_id, part, now)
            await self.db.execute(sql.EPOCH_COMPROMISE, (now, resource_id, part, target))
            if state == PRE_ACTIVE:
                await self.db.execute(
                    sql.PART_EPOCH_INSERT,
                    self._epoch_row(resource_id, part, target + 1, PRE_ACTIVE, now, None),
                )
            live = await self.db.all(sql.LIVE_STATES, (resource_id, part))
            active = next(int(e) for e, s in live if s == ACTIVE)
            await self.audit.append(
                actor, "compromise", resource_id, "ok",
                {"part": part, "epoch": target, "active": active}, now,
            )  # fmt: skip
            return target, active

    async def due_rotations(self, now: int) -> list[tuple[str, str]]:
        """(resource, part) whose active epoch has lived the resource's rotation period: what
        was due when read; rotate each with :meth:`rotate_if_due`, which decides again."""
        return [(str(r), str(p)) for r, p in await self.db.all(self.sql.DUE_ROTATIONS, (now,))]

    async def rotate_if_due(self, resource_id: str, part: str, now: int) -> int | None:
        """Rotate the part on its schedule if still due once the write transaction holds the
        write lock (else None: another instance did), audited; returns the new active epoch.
        A part rotates on its own schedule (its active epoch's age), not with the resource.
        Not due when read first: no write transaction at all (the request path calls this)."""
        if await self.db.one(self.sql.ROTATION_DUE, (resource_id, part, now)) is None:
            return None
        async with self.db.transaction() as tx:
            if await self.db.one(self.sql.ROTATION_DUE, (resource_id, part, now)) is None:
                tx.count = False
                return None
            epoch = await self.advance(resource_id, part, now)
            await self.audit.append(
                "as", "rotate", resource_id, "ok",
                {"part": part, "epoch": epoch, "reason": "schedule"}, now,
            )  # fmt: skip
            return epoch

    async def producer_revoked(self, producer_id: str, now: int) -> None:
        """Inside the caller's transaction (a producer's revocation): every live epoch of its
        resources' parts compromised, as its resources' own are."""
        await self.db.execute(self.sql.PRODUCER_COMPROMISE, (now, producer_id))

    async def destroy_expired(self, now: int, retention: int) -> list[tuple[str, int]]:
        """Destroy the parts' deactivated and compromised epochs older than ``retention``
        seconds (overwritten, then cleared, each audited), read again inside the write
        transaction as :meth:`.keyring.Keyring.destroy_expired` does. Returns
        (``resource#part``, epoch) destroyed."""
        sql = self.sql
        if not await self.db.all(sql.RETIRED_BEFORE, (now - retention,)):
            return []
        async with self.db.transaction() as tx:
            rows = await self.db.all(sql.RETIRED_BEFORE, (now - retention,))
            for resource_id, part, epoch in rows:
                await self.db.execute(sql.EPOCH_OVERWRITE, (resource_id, part, epoch))
                await self.db.execute(sql.EPOCH_DESTROY, (resource_id, part, epoch))
                await self.audit.append(
                    "as", "destroy", resource_id, "ok", {"part": part, "epoch": epoch}, now
                )
            tx.count = bool(rows)
            destroyed = [(f"{r}#{p}", int(e)) for r, p, e in rows]
        if destroyed:
            await self.db.erase_freed()
        return destroyed

    # --- grants ----------------------------------------------------------------------------------

    async def _encrypted_part(self, resource_id: str, part: str) -> None:
        if (part, ENCRYPTED) not in await self.parts(resource_id):
            raise NoSuchRecord(f"no encrypted part {part!r} of resource {resource_id!r}")

    async def grant(
        self, consumer_id: str, resource_id: str, part: str, now: int, *, actor: str = "admin"
    ) -> bool:
        """Grant the consumer one encrypted part. An open exclusion of it from that part (an
        earlier revocation) closes at the current epoch and the part rotates. Returns whether
        it rotated. :class:`Conflict` for a consumer that is not an active consumer or a grant
        that is live already, :class:`NoSuchRecord` for no such encrypted part."""
        sql = self.sql
        async with self.db.transaction():
            status = await self.db.one(self.db.sql.DEVICE_ROLE_STATUS, (consumer_id,))
            if status is None or tuple(status) != ("consumer", "active"):
                raise Conflict(f"{consumer_id!r} is not an active consumer")
            await self._encrypted_part(resource_id, part)
            if await self.db.one(sql.GRANT_LIVE, (consumer_id, resource_id, part)) is not None:
                raise Conflict(f"{consumer_id!r} holds a grant of {resource_id!r} part {part!r}")
            await self.db.execute(sql.GRANT_INSERT, (consumer_id, resource_id, part, now))
            rotated = await self.readmit(consumer_id, resource_id, [part], now)
            await self.audit.append(
                actor, "grant-part", consumer_id, "ok",
                {"resource": resource_id, "part": part, "rotated": rotated}, now,
            )  # fmt: skip
            return bool(rotated)

    async def readmit(
        self, consumer_id: str, resource_id: str, only: Sequence[str] | None, now: int
    ) -> list[str]:
        """Close the consumer's open exclusions from the resource's parts (those in ``only``,
        or all), each at its part's current epoch, rotating each part; inside the caller's
        transaction. Returns the parts rotated."""
        sql = self.sql
        rotated = []
        for (part,) in await self.db.all(sql.OPEN_EXCLUSIONS, (consumer_id, resource_id)):
            if only is not None and part not in only:
                continue
            rows = await self.db.all(sql.LIVE_STATES, (resource_id, part))
            live = {state: int(epoch) for epoch, state in rows}
            if ACTIVE not in live:
                continue
            await self.db.execute(
                sql.EXCLUSION_CLOSE, (live[ACTIVE], consumer_id, resource_id, part)
            )
            await self.advance(resource_id, part, now)
            rotated.append(str(part))
        return rotated

    async def revoke(
        self, consumer_id: str, resource_id: str, part: str, now: int, *, actor: str = "admin"
    ) -> bool:
        """Revoke the consumer's grant of one part: the part rotates and the consumer is
        excluded from its new epoch on, unless a live whole-resource grant still lets it read
        the part; the other parts stay. Returns whether the part rotated."""
        async with self.db.transaction():
            changed = await self.db.execute(
                self.sql.GRANT_REVOKE, (now, consumer_id, resource_id, part)
            )
            if not changed:
                raise NoSuchRecord(f"no grant of {consumer_id!r} on {resource_id!r} part {part!r}")
            rotated = []
            if not await self._whole_grant(consumer_id, resource_id, now):
                rotated = await self._shut_out(consumer_id, resource_id, [part], now)
            await self.audit.append(
                actor, "revoke-part", consumer_id, "ok",
                {"resource": resource_id, "part": part, "rotated": rotated}, now,
            )  # fmt: skip
            return bool(rotated)

    async def _whole_grant(self, consumer_id: str, resource_id: str, now: int) -> bool:
        patterns = await self.db.all(self.db.sql.LIVE_PATTERNS, (consumer_id, now))
        return any(fnmatch.fnmatchcase(resource_id, p) for (p,) in patterns)

    async def _shut_out(
        self, consumer_id: str, resource_id: str, chosen: Sequence[str], now: int
    ) -> list[str]:
        rotated = []
        for part in chosen:
            new = await self.advance(resource_id, part, now)
            await self.db.execute(
                self.sql.EXCLUSION_INSERT, (consumer_id, resource_id, part, new, now)
            )
            rotated.append(part)
        return rotated

    async def whole_grant_ended(self, consumer_id: str, resource_id: str, now: int) -> list[str]:
        """A whole-resource grant of the consumer ended (inside the caller's transaction, which
        rotated the resource): rotate and exclude it from each encrypted part it holds no grant
        of, and end its part grants if ``all_grants``. Returns the parts rotated."""
        held = {
            part
            for rid, part in await self.db.all(self.sql.GRANTS_LIVE_OF, (consumer_id,))
            if rid == resource_id
        }
        chosen = [n for n, k in await self.parts(resource_id) if k == ENCRYPTED and n not in held]
        return await self._shut_out(consumer_id, resource_id, chosen, now)

    async def end_all_part_grants(self, consumer_id: str, now: int) -> list[str]:
        """End every part grant of the consumer (all its grants revoked, or the device),
        inside the caller's transaction: each such part rotates, unless a whole-resource grant
        still covers it, and the consumer is excluded. Returns ``resource#part`` rotated."""
        rotated = []
        for resource_id, part in await self.db.all(self.sql.GRANTS_LIVE_OF, (consumer_id,)):
            await self.db.execute(self.sql.GRANT_REVOKE, (now, consumer_id, resource_id, part))
            if not await self._whole_grant(consumer_id, resource_id, now):
                for done in await self._shut_out(consumer_id, resource_id, [part], now):
                    rotated.append(f"{resource_id}#{done}")
        return rotated

    async def readmit_pattern(self, consumer_id: str, pattern: str, now: int) -> list[str]:
        """A whole-resource grant of ``pattern`` given (inside the caller's transaction): close
        the consumer's open exclusions from the parts of every resource it matches, each part
        rotating. Returns ``resource#part`` rotated."""
        rotated = []
        for (resource_id,) in await self.db.all(self.sql.EXCLUDED_FROM, (consumer_id,)):
            if fnmatch.fnmatchcase(resource_id, pattern):
                for part in await self.readmit(consumer_id, resource_id, None, now):
                    rotated.append(f"{resource_id}#{part}")
        return rotated

    async def grants(
        self, consumer_id: str | None = None
    ) -> list[tuple[str, str, str, int, int | None]]:
        """(consumer, resource, part, granted at, revoked at) of part grants."""
        if consumer_id is None:
            return [tuple(r) for r in await self.db.all(self.sql.GRANTS)]
        return [tuple(r) for r in await self.db.all(self.sql.GRANTS_OF, (consumer_id,))]

    # --- the request path ------------------------------------------------------------------------

    async def view(
        self, device_id: str, resource_id: str, part: str, epoch: int | None, now: int
    ) -> PartView:
        """Everything a part secret request is decided on, in one point read."""
        row = await self.db.lookup(
            self.sql.VIEW,
            {
                "device": device_id,
                "resource": resource_id,
                "part": part,
                "epoch": epoch,
                "now": now,
            },
        )
        found = None
        if row[1] is not None:
            found = self._epoch(resource_id, part, row[1:7], True)
        kind = None if row[0] is None else str(row[0])
        return PartView(kind, found, bool(row[7]), bool(row[8]), bool(row[9]))
