"""Grants and exclusions: who may read which resource, from which epoch on.

Every change that belongs together (a revocation: its rotations and exclusions; each with its
audit record) is one transaction. A consumer reads a resource while one of its live grants (not
revoked, not expired) matches the resource id (``fnmatch`` pattern, case-sensitive, in Python and
in SQL alike) and no exclusion left by a revocation covers the epoch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..envelope import Envelope, VaultError
from .audit import AuditLog
from .backend import Backend
from .keyring import Keyring
from .schema import Conflict, Epoch, NoSuchRecord, Resource, SecretView, StoreError, secret_context

if TYPE_CHECKING:
    from .parts import Parts

__all__ = ["Access"]


class Access:
    """Grants and exclusions, and what is decided on them, over a store's backend; a revocation
    or a readmission rotates through the :class:`Keyring`."""

    def __init__(self, db: Backend, envelope: Envelope, audit: AuditLog, keyring: Keyring) -> None:
        self.db = db
        self._envelope = envelope
        self.audit = audit
        self.keyring = keyring
        #: The resources' parts (:mod:`.parts`): an ended whole-resource grant rotates the parts
        #: it alone gave, a new one readmits to the parts it was shut out of.
        self.parts: Parts | None = None

    # --- grants ----------------------------------------------------------------------------------

    async def add_grant(
        self,
        consumer_id: str,
        pattern: str,
        until: int | None,
        now: int,
        *,
        actor: str = "admin",
    ) -> list[str]:
        """Grant ``consumer_id`` the resources matching ``pattern`` until ``until``.

        A consumer excluded from a resource by an earlier revocation is let back in only from a new
        epoch: the exclusion closes at the current epoch and the resource rotates, so nothing
        sealed while it was shut out becomes readable.
        Returns the resources rotated.
        """
        return await self.add_grants([(consumer_id, pattern, until)], now, actor=actor)

    async def add_grants(
        self, grants: Sequence[tuple[str, str, int | None]], now: int, *, actor: str = "admin"
    ) -> list[str]:
        """Grant each (consumer, pattern, until) as :meth:`add_grant` does, in order, all in one
        transaction (one commit for a bulk grant). :class:`Conflict`, and nothing granted, if
        one consumer is not an active consumer. Returns the resources rotated, over all."""
        sql = self.db.sql
        async with self.db.transaction():
            consumers = sql.id_list(sorted({consumer for consumer, _, _ in grants}))
            status = {
                device_id: (role, state)
                for device_id, role, state in await self.db.all(
                    sql.DEVICES_ROLE_STATUS, (consumers,)
                )
            }
            excluded: dict[str, list[str]] = {}  # consumer -> resources it is shut out of now
            for consumer_id, resource_id in await self.db.all(sql.OPEN_EXCLUSIONS_OF, (consumers,)):
                excluded.setdefault(consumer_id, []).append(resource_id)
            for consumer_id, _, _ in grants:
                if status.get(consumer_id) != ("consumer", "active"):
                    raise Conflict(f"{consumer_id!r} is not an active consumer")
            await self.db.executemany(
                sql.GRANT_INSERT,
                [(consumer_id, pattern, until, now) for consumer_id, pattern, until in grants],
            )
            records: list[tuple[str, str, str, str, dict[str, Any], int]] = []
            rotated_all: list[str] = []
            for consumer_id, pattern, until in grants:
                rotated = await self._readmit(consumer_id, pattern, excluded, now)
                if self.parts is not None:
                    rotated += await self.parts.readmit_pattern(consumer_id, pattern, now)
                records.append(
                    (actor, "grant", consumer_id, "ok",
                     {"pattern": pattern, "until": until, "rotated": rotated}, now)
                )  # fmt: skip
                rotated_all.extend(rotated)
            await self.audit.append_many(records)
            return rotated_all

    async def _readmit(
        self, consumer_id: str, pattern: str, excluded: dict[str, list[str]], now: int
    ) -> list[str]:
        """Close the consumer's open exclusions from live resources ``pattern`` matches, rotating
        each; ``excluded`` (consumer -> open exclusions) is kept up to date. Returns those."""
        rotated = []
        for resource_id in list(excluded.get(consumer_id, ())):
            if not fnmatch.fnmatchcase(resource_id, pattern):
                continue
            active = await self.db.one(self.db.sql.ACTIVE_EPOCH, (resource_id,))
            if active is None:  # a retired resource: nothing new to let it into
                continue
            await self.db.execute(
                self.db.sql.EXCLUSION_CLOSE, (active[0], consumer_id, resource_id)
            )
            await self.keyring.advance(resource_id, now)
            excluded[consumer_id].remove(resource_id)
            rotated.append(resource_id)
        return rotated

    async def revoke_grants(
        self, consumer_id: str, pattern: str | None, now: int, *, actor: str = "admin"
    ) -> list[str]:
        """Revoke the consumer's grants (those with exactly ``pattern``, or all): every resource
        it could read rotates at once and it is excluded from the new epoch on (and from the
        new epoch of each encrypted part of those it holds no grant of; all: its part grants
        end too). Returns the resources rotated, then ``resource#part`` of the parts rotated."""
        async with self.db.transaction():
            rotated = await self.end_grants_of(consumer_id, pattern, now, required=True)
            await self.audit.append(
                actor,
                "revoke-grant",
                consumer_id,
                "ok",
                {"pattern": pattern, "rotated": rotated},
                now,
            )
            return rotated

    async def end_grants_of(
        self,
        consumer_id: str,
        pattern: str | None,
        now: int,
        *,
        required: bool = False,
    ) -> list[str]:
        """Revoke the consumer's grants (with exactly ``pattern``, or all) inside the caller's
        transaction, as :meth:`revoke_grants` does (no audit record); :class:`NoSuchRecord` if
        ``required`` and there is none. Returns the resources rotated."""
        grants = await self.db.all(self.db.sql.UNREVOKED_GRANTS, (consumer_id,))
        chosen = [(gid, p) for gid, p in grants if pattern is None or p == pattern]
        if not chosen and required:
            raise NoSuchRecord(
                f"no grant of {consumer_id!r}" + (f" on {pattern!r}" if pattern else "")
            )
        rotated = await self._end_grants(consumer_id, chosen, now, keep_covered=False)
        if pattern is None and self.parts is not None:  # all its grants: its part grants too
            rotated += await self.parts.end_all_part_grants(consumer_id, now)
        return rotated

    async def _end_grants(
        self,
        consumer_id: str,
        chosen: list[tuple[int, str]],
        now: int,
        *,
        keep_covered: bool,
        claimed: bool = False,
    ) -> list[str]:
        """End these grants: every live resource they covered rotates and the consumer is
        excluded from the new epoch on. With ``keep_covered``, resources another live grant of the
        consumer still covers are left alone (an expiry, unlike a revocation, takes only what
        that grant gave). ``claimed``: the caller has marked them ended already."""
        sql = self.db.sql
        patterns = [p for _, p in chosen]
        if not claimed:
            for gid, _ in chosen:
                await self.db.execute(sql.GRANT_REVOKE, (now, gid))
        remaining = []
        if keep_covered:
            remaining = [p for (p,) in await self.db.all(sql.LIVE_PATTERNS, (consumer_id, now))]
        resources = [
            rid
            for (rid,) in await self.db.all(sql.ACTIVE_RESOURCE_IDS)
            if any(fnmatch.fnmatchcase(rid, p) for p in patterns)
            and not any(fnmatch.fnmatchcase(rid, p) for p in remaining)
        ]
        parts_rotated = []
        for resource_id in resources:
            new_epoch = await self.keyring.advance(resource_id, now)
            await self.db.execute(sql.EXCLUSION_INSERT, (consumer_id, resource_id, new_epoch, now))
            if self.parts is not None:
                for part in await self.parts.whole_grant_ended(consumer_id, resource_id, now):
                    parts_rotated.append(f"{resource_id}#{part}")
        return resources + parts_rotated

    async def expire_grants(self, now: int) -> list[tuple[str, list[str]]]:
        """End every grant whose ``until`` has passed as a revocation would: what it alone gave
        rotates, and the consumer is excluded from the new epoch on. Returns (consumer, rotated)
        per grant ended.

        Each grant ends in a transaction of its own, which first claims it (``GRANT_EXPIRE``
        changes the row only if the grant is still live and expired, read under the write
        lock): a grant another AS instance (or a concurrent call) ended meanwhile is skipped, so
        each expiry, its rotations and its audit record happen once."""
        sql = self.db.sql
        expired = await self.db.all(sql.EXPIRED_GRANTS, (now,))
        ended = []
        for gid, consumer_id, pattern in expired:
            async with self.db.transaction() as tx:
                if await self.db.execute(sql.GRANT_EXPIRE, {"now": now, "id": gid}) != 1:
                    tx.count = False  # ended by another instance meanwhile
                    continue
                rotated = await self._end_grants(
                    consumer_id, [(gid, pattern)], now, keep_covered=True, claimed=True
                )
                await self.audit.append(
                    "as", "expire-grant", consumer_id, "ok",
                    {"pattern": pattern, "rotated": rotated}, now,
                )  # fmt: skip
            ended.append((consumer_id, rotated))
        return ended

    async def excluded_resources(self, consumer_id: str) -> list[str]:
        rows = await self.db.all(self.db.sql.EXCLUDED_RESOURCES, (consumer_id,))
        return [r for (r,) in rows]

    async def grants(
        self, consumer_id: str | None = None
    ) -> list[tuple[int, str, str, int | None, int, int | None]]:
        """(id, consumer, pattern, until, granted at, revoked at) of grants, oldest first."""
        if consumer_id is None:
            return await self.db.all(self.db.sql.GRANTS)
        return await self.db.all(self.db.sql.GRANTS_OF, (consumer_id,))

    async def secret_view(
        self, device_id: str, resource_id: str, epoch: int | None, now: int
    ) -> SecretView:
        """Everything a secret request is decided on, in one point read on the event loop's
        thread (:meth:`Backend.lookup`): the resource, the epoch asked for (the active one when
        ``epoch`` is None) with its secret decrypted, and whether the device's live grants cover
        the resource and leave that epoch unexcluded, and whether the device is active."""
        sql = self.db.sql
        row = await self.db.lookup(
            sql.VIEW_OF_ACTIVE if epoch is None else sql.VIEW_OF_EPOCH,
            {"device": device_id, "resource": resource_id, "epoch": epoch, "now": now},
        )
        resource = None if row[0] is None else Resource(*row[0:7])
        found = None
        if row[7] is not None:
            secret = None
            if row[12] is not None:
                try:
                    secret = self._envelope.decrypt(
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
        return SecretView(resource, found, bool(row[13]), bool(row[14]), bool(row[15]))

    async def readable_resources(self, consumer_id: str, now: int) -> list[tuple[Resource, int]]:
        """(resource, active epoch) of every resource the consumer may read now, by id: what
        :meth:`may_read` decides for the active epoch, for all resources at once.

        Each live grant's pattern is looked up by its literal prefix (the text before the first
        ``*``, ``?`` or ``[``), a range of the resources' primary key: the work grows with the
        resources the patterns cover, not with all resources (but a grant of ``*`` covers all).
        """
        sql = self.db.sql
        patterns = {
            pattern for (pattern,) in await self.db.all(sql.LIVE_PATTERNS, (consumer_id, now))
        }
        found: dict[str, tuple[Resource, int]] = {}
        for pattern in sorted(patterns):
            low, high = sql.prefix_range(pattern)
            rows = await self.db.all(
                sql.READABLE_IN_RANGE,
                {"low": low, "high": high, "pattern": pattern, "consumer": consumer_id},
            )
            for row in rows:
                found[row[0]] = (Resource(*row[:7]), int(row[7]))
        return [found[resource_id] for resource_id in sorted(found)]

    async def may_read(self, consumer_id: str, resource_id: str, epoch: int, now: int) -> bool:
        """Whether a live grant covers the resource and no revocation excludes the epoch."""
        sql = self.db.sql
        grants = await self.db.all(sql.LIVE_PATTERNS, (consumer_id, now))
        if not any(fnmatch.fnmatchcase(resource_id, p) for (p,) in grants):
            return False
        excluded = await self.db.one(sql.EXCLUSION_COVERS, (consumer_id, resource_id, epoch, epoch))
        return excluded is None
