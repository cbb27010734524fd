"""Who was handed which epoch's secret: the first delivery of each is audited, durably, before
the secret leaves the AS, and deliveries asked for at the same time share one commit.

A first delivery is a write transaction with an fsync (a few milliseconds here). When the
consumers of a resource all ask for a new epoch at once (they do, at a rotation), one transaction
each would queue them behind one another for the sum of their commits. So concurrent calls of
:meth:`Deliveries.record_delivery` are grouped: the first caller leads a batch and waits for the
store; everything that arrives before it gets the store joins the batch; the batch is written as
one transaction (the same rows and audit records, in arrival order, as one transaction per call
would have written) and every caller returns after its commit. Calls that arrive while a batch is
being written make up the next one.

This module writes deliveries only; who may receive a secret is decided in
:mod:`authz_server.api`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from .audit import AuditLog
from .backend import Backend
from .schema import StoreError

__all__ = ["MAX_BATCH", "Deliveries"]

#: Deliveries written in one transaction at most.
MAX_BATCH = 200

_Delivery = tuple[str, str, int]  # (device, resource, epoch)


@dataclass(eq=False)
class _Batch:
    """Deliveries waiting for one transaction, and what became of them."""

    written: asyncio.Future[set[_Delivery]]  # the deliveries new to the table, once written
    entries: list[tuple[_Delivery, int]] = field(default_factory=list)  # (delivery, at)


class Deliveries:
    """The ``deliveries`` table, with grouped commits."""

    def __init__(self, db: Backend, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        self._open_batch: _Batch | None = None

    async def record_delivery(self, device_id: str, resource_id: str, epoch: int, now: int) -> bool:
        """Note that ``device_id`` was handed the secret of (resource, epoch); the first time,
        audit it, durably, in the same transaction. Returns whether it was the first time.

        Called before the secret is sent, so no delivery escapes the log; repeated deliveries of
        the same epoch to the same device are not logged again (they reveal nothing new).
        Concurrent calls share a transaction (see the module docstring); if it fails, each of
        them raises its error.
        """
        delivery = (device_id, resource_id, epoch)
        batch = self._open_batch
        if batch is None or len(batch.entries) >= MAX_BATCH:
            batch = self._open_batch = _Batch(asyncio.get_running_loop().create_future())
            batch.entries.append((delivery, now))
            await self._write_batch(batch)
        else:
            batch.entries.append((delivery, now))
        written = await asyncio.shield(batch.written)
        # The first of equal deliveries in a batch is the first time; a repeat is not.
        if delivery in written:
            written.discard(delivery)
            return True
        return False

    async def _write_batch(self, batch: _Batch) -> None:
        """Lead ``batch``: wait for the store, close the batch, write it, tell its callers."""
        try:
            async with self.db.transaction(count=False):
                if self._open_batch is batch:
                    self._open_batch = None  # later callers make up the next batch
                written = await self._insert(batch.entries)
        except BaseException as exc:
            if self._open_batch is batch:
                self._open_batch = None
            if not batch.written.done():
                if isinstance(exc, Exception):
                    batch.written.set_exception(exc)
                else:  # cancelled: the others' deliveries were not recorded either
                    batch.written.set_exception(StoreError("recording a delivery was interrupted"))
            with contextlib.suppress(BaseException):
                batch.written.exception()  # retrieved: nobody else may be waiting
            raise
        batch.written.set_result(written)

    async def _insert(self, entries: list[tuple[_Delivery, int]]) -> set[_Delivery]:
        """Insert the deliveries not yet in the table and audit each; returns those."""
        sql = self.db.sql
        rows = await self.db.returning(
            sql.DELIVERIES_INSERT_NEW, (sql.id_list([d, r, e, now] for (d, r, e), now in entries),)
        )
        written = {(d, r, int(e)) for d, r, e in rows}
        audited, records = set(), []
        for (device_id, resource_id, epoch), now in entries:
            delivery = (device_id, resource_id, epoch)
            if delivery in written and delivery not in audited:
                audited.add(delivery)
                records.append((device_id, "secret", resource_id, "ok", {"epoch": epoch}, now))
        await self.audit.append_many(records)
        return written
