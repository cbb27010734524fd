"""The audit chain: appending, listing, verifying, pruning behind a checkpoint, and denials.

Each record is chained: its ``chain`` value is HMAC-SHA256(audit key, previous chain value ||
CBOR [seq, at, actor, action, subject, result, detail]), the first record's previous value being
empty. The key comes from the master key (:class:`authz_server.envelope.Envelope`), so whoever
can edit the database file cannot re-chain an edit. ``meta.audit_head`` holds the last (seq,
chain), so a removed tail shows; a head kept elsewhere (``oscar-as audit --head``) shows a
consistent cut.

**Pruning** (:meth:`AuditLog.prune_audit`): records older than a date go, the chain stays
verifiable. One transaction appends a ``prune`` record to the chain and writes the *checkpoint*:
the last pruned record's (seq, chain value, time) with a MAC under the audit key (a chain value
computed over a prefix no record's input can start with). Then the records up to it are deleted,
in batches of :data:`PRUNE_BATCH` (each its own transaction, so a running AS waits milliseconds,
not seconds); a crash in between leaves records the checkpoint covers, which verification skips
and the next prune deletes. The schema's delete trigger refuses to delete any record past the
checkpoint. Verification starts from the checkpoint: its MAC must hold and the first record kept
must chain from its value. An old checkpoint put back, a forged one, one removed, or a kept record
edited or removed: each fails verification.

**Verification** (:meth:`AuditLog.verify_audit`) streams the table on a connection of its own in
a worker thread, in one read transaction (the head, the checkpoint and the rows are one snapshot,
whatever a running AS appends meanwhile), a batch of rows at a time: memory stays flat however
long the log, and the event loop is never blocked by it.

**Denials** (:meth:`AuditLog.audit_denial`) are tallied by :class:`.denials.DenialTally`: the
first of a (device, action, reason, subject) is written at once, later ones are counted and
written as one aggregate record per (device, action, reason) and interval, by a timer at the
interval's end and by :meth:`AuditLog.close`. A kill -9 loses the counts not yet written: at
most one interval's denials per (device, action, reason), never the first record of a burst.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import time
from collections.abc import Sequence
from typing import Any

from oscar import cbor

from ..envelope import Envelope
from .backend import Backend, SnapshotReader
from .denials import MAX_WINDOWS, DenialTally, Entry
from .schema import AuditRecord

__all__ = ["DENIAL_INTERVAL", "PRUNE_BATCH", "AuditLog"]

log = logging.getLogger("oscar.as")

#: Seconds a denial window lasts (see :mod:`.denials`).
DENIAL_INTERVAL = 60.0
#: Records deleted per transaction when pruning.
PRUNE_BATCH = 20_000
#: The largest seq SQLite can hold (no limit on a prune).
_MAX_SEQ = 2**63 - 2
#: Rows fetched at a time when verifying.
_VERIFY_BATCH = 4096
#: Aggregate records kept for another try when their write failed (the oldest go past it).
_MAX_UNWRITTEN = 4 * MAX_WINDOWS
#: Distinct texts whose encoding verification remembers (then it starts over).
_TEXT_CACHE = 65_536
#: What a checkpoint's MAC input starts with: 33 bytes no chain input has at offsets 0 and 32
#: (those start with the CBOR array head 0x87, after an empty or a 32-byte previous value).
_CHECKPOINT_PREFIX = b"\xff" * 33


class AuditLog:
    """The audit chain over a store's backend; see the module docstring. Other components append
    to it inside their own transactions (:meth:`append`, :meth:`append_many`)."""

    def __init__(self, db: Backend, envelope: Envelope) -> None:
        self.db = db
        self._envelope = envelope
        self.denials = DenialTally(DENIAL_INTERVAL)
        self._denial_timer: asyncio.TimerHandle | None = None
        self._denial_flush: asyncio.Task[None] | None = None
        self._unwritten: list[Entry] = []  # aggregates whose write failed, to write again

    # --- appending -------------------------------------------------------------------------------

    async def audit(
        self, actor: str, action: str, subject: str, result: str, detail: dict[str, Any], now: int
    ) -> None:
        """Append one audit record in a transaction of its own."""
        async with self.db.transaction(count=False):
            await self.append(actor, action, subject, result, detail, now)

    async def append(
        self, actor: str, action: str, subject: str, result: str, detail: dict[str, Any], now: int
    ) -> None:
        """Append one record inside the caller's transaction."""
        await self.append_many([(actor, action, subject, result, detail, now)])

    async def append_many(self, records: Sequence[Entry]) -> None:
        """Append (actor, action, subject, result, detail, at) records to the chain, in order,
        inside the caller's transaction: one read of the head and one write of the rows and one of
        the new head, however many records (a bulk enrolment, a batch of deliveries)."""
        if not records:
            return
        sql = self.db.sql
        last = await self.db.one(sql.LAST_RECORD)
        if last is None:  # empty: from the checkpoint, if everything was pruned
            last = await self.db.one(sql.CHECKPOINT)
        seq, chain = (0, b"") if last is None else (int(last[0]), bytes(last[1]))
        rows = []
        for actor, action, subject, result, detail, now in records:
            seq += 1
            text = json.dumps(detail, sort_keys=True, separators=(",", ":"))
            chain = self._envelope.chain(
                chain, audit_bytes(seq, now, actor, action, subject, result, text)
            )
            rows.append((seq, now, actor, action, subject, result, text, chain))
        await self.db.executemany(sql.RECORD_INSERT, rows)
        await self.db.execute(sql.HEAD_SET, (cbor.dumps([seq, chain]),))

    # --- denials ---------------------------------------------------------------------------------

    async def audit_denial(
        self, actor: str, action: str, subject: str, reason: str, now: int
    ) -> None:
        """Audit a refused request: written at once if it is the first of its kind, else counted
        (see :mod:`.denials`); the counts are written by a timer and by :meth:`close`."""
        if self.denials.full_for(actor, action, reason):
            await self.flush_denials(drain=True)
        if self.denials.note(actor, action, subject, reason, now):
            await self.audit(actor, action, subject, "denied", {"reason": reason}, now)
        self._arm_denial_timer()

    async def flush_denials(self, now: float | None = None, *, drain: bool = False) -> int:
        """Write the aggregate records of the windows ended by ``now`` (every window with
        ``drain``) in one transaction; returns how many were written."""
        moment = time.time() if now is None else now
        entries = self._unwritten + (
            self.denials.drain(moment) if drain else self.denials.due(moment)
        )
        self._unwritten = []
        if entries:
            try:
                async with self.db.transaction(count=False):
                    await self.append_many(entries)
            except BaseException:
                # Kept for the next flush (a second later, or at close), within a bound.
                self._unwritten = (entries + self._unwritten)[-_MAX_UNWRITTEN:]
                raise
        return len(entries)

    def _arm_denial_timer(self) -> None:
        end = self.denials.next_end()
        if self._unwritten:  # a failed write: again in a second
            end = min(end or math.inf, time.time() + 1.0)
        if end is None or self._denial_timer is not None or self._denial_flush is not None:
            return
        loop = asyncio.get_running_loop()
        self._denial_timer = loop.call_later(max(0.0, end - time.time()), self._denial_due)

    def _denial_due(self) -> None:
        self._denial_timer = None
        self._denial_flush = asyncio.get_running_loop().create_task(self._flush_due())

    async def _flush_due(self) -> None:
        try:
            await self.flush_denials()
        except Exception:
            log.exception("cannot write the counted denials; retrying")
        finally:
            self._denial_flush = None
        if not self.db.closed:
            self._arm_denial_timer()

    async def close(self) -> None:
        """Write every counted denial (the database stays open); closing twice is harmless."""
        if self._denial_timer is not None:
            self._denial_timer.cancel()
            self._denial_timer = None
        if self._denial_flush is not None:
            await asyncio.gather(self._denial_flush, return_exceptions=True)
        if not self.db.closed and (len(self.denials) or self._unwritten):
            try:
                await self.flush_denials(drain=True)
            except Exception:
                log.exception("cannot write the counted denials at close")

    # --- reading ---------------------------------------------------------------------------------

    async def audit_records(self, since: int = 0) -> list[AuditRecord]:
        """The records after ``since`` (and after the checkpoint), oldest first."""
        base = await self.db.one(self.db.sql.CHECKPOINT_SEQ)
        rows = await self.db.all(
            self.db.sql.RECORDS_AFTER, (max(since, 0 if base is None else int(base[0])),)
        )
        return [
            AuditRecord(
                seq=row[0],
                at=row[1],
                actor=row[2],
                action=row[3],
                subject=row[4],
                result=row[5],
                detail=json.loads(row[6]),
            )
            for row in rows
        ]

    async def recent_audit(self, before: int | None = None, limit: int = 100) -> list[AuditRecord]:
        """At most ``limit`` records at or before seq ``before`` (default: the newest), newest
        first: one indexed range read however long the log (the console's pages)."""
        rows = await self.db.all(
            self.db.sql.RECORDS_BEFORE, (2**62 if before is None else before, limit)
        )
        return [AuditRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    async def audit_head(self) -> tuple[int, bytes]:
        """The last record's sequence number and chain value (0, b"" for an empty log).

        Recorded somewhere the AS cannot write (a ticket, another host), it lets
        :meth:`verify_audit` detect a log cut back to an earlier, self-consistent state, which
        nothing inside the state directory can.
        """
        row = await self.db.one(self.db.sql.LAST_RECORD)
        return (0, b"") if row is None else (int(row[0]), bytes(row[1]))

    async def verify_audit(self, expected: tuple[int, bytes] | None = None) -> tuple[bool, str]:
        """Walk the chain from the checkpoint: (True, summary) if intact, else (False, where it
        breaks). ``expected`` is a head recorded earlier (see :meth:`audit_head`): the log must
        still hold that record with that chain value."""
        sql, envelope = self.db.sql, self._envelope
        return await self.db.snapshot(lambda reader: walk_chain(reader, sql, envelope, expected))

    # --- pruning ---------------------------------------------------------------------------------

    async def prune_audit(
        self,
        before: int,
        now: int,
        actor: str = "admin",
        *,
        limit: int | None = None,
        min_interval: float | None = None,
    ) -> tuple[int, int]:
        """Prune the oldest records dated before ``before`` (up to the first record that is
        not), behind a checkpoint; see the module docstring. ``limit``: at most that many
        records past the checkpoint (the rest for a next call), so that the transaction that
        finds them reads that many rows at most. ``min_interval`` (the running AS's schedule):
        prune nothing if the checkpoint was written less than that many seconds before ``now``,
        decided inside the write transaction, so that of several AS instances on one database
        the first to run prunes and the others find it done. Returns (the last pruned record's
        seq, or 0 if none, records deleted)."""
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ValueError("limit must be a whole number, at least 1")
        sql = self.db.sql
        async with self.db.transaction(count=False):
            row = await self.db.one(sql.CHECKPOINT_ROW)
            base = 0 if row is None else int(row[0])
            if row is not None and min_interval is not None and now - int(row[2]) < min_interval:
                through = base  # pruned a moment ago (by another instance, say): nothing to do
            else:
                upper = base + limit if limit is not None else _MAX_SEQ
                row = await self.db.one(sql.FIRST_KEPT, (base, upper, before))
                if row is None:  # every record up to ``upper`` is older (seqs have no gaps)
                    row = await self.db.one(sql.PAST_LAST, (upper,))
                through = int(row[0] or 1) - 1
            if through > base:
                last = await self.db.one(sql.CHAIN_AT, (through,))
                chain = bytes(last[0])
                await self.append(
                    actor,
                    "prune",
                    "audit",
                    "ok",
                    {"before": before, "through": through, "records": through - base},
                    now,
                )
                await self.db.execute(
                    sql.CHECKPOINT_SET,
                    (through, chain, now, checkpoint_mac(self._envelope, through, chain, now)),
                )
        return (through if through > base else 0), await self._delete_pruned()

    async def _delete_pruned(self) -> int:
        """Delete the records the checkpoint covers, a batch per transaction."""
        deleted = 0
        while True:
            async with self.db.transaction(count=False):
                row = await self.db.one(self.db.sql.PRUNED_LEFT)
                if row is None or row[0] is None:
                    break
                changed = await self.db.execute(
                    self.db.sql.RECORDS_DELETE,
                    (row[0], min(int(row[1]), int(row[0]) + PRUNE_BATCH - 1)),
                )
                deleted += max(changed, 0)
            await asyncio.sleep(0)  # let the requests waiting for the database in
        if deleted:
            await self.db.erase_freed()
        return deleted


def checkpoint_mac(envelope: Envelope, seq: int, chain: bytes, at: int) -> bytes:
    """The MAC that vouches for a checkpoint (seq, chain value, time), under the audit key."""
    return envelope.chain(_CHECKPOINT_PREFIX, cbor.dumps(["checkpoint", seq, chain, at]))


# --- the record's bytes --------------------------------------------------------------------------

_U32 = struct.Struct(">BI").pack
_U64 = struct.Struct(">BQ").pack


def _head(major: int, n: int) -> bytes:
    """A CBOR head in shortest form (as :func:`oscar.cbor.dumps` writes it); 0 <= n < 2**64."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25, n >> 8, n & 0xFF))
    if n < 0x100000000:
        return _U32(major | 26, n)
    return _U64(major | 27, n)


def _text(value: str) -> bytes:
    data = value.encode()
    return _head(0x60, len(data)) + data


def audit_bytes(
    seq: object, at: object, actor: object, action: object, subject: object, result: object,
    detail: object,
) -> bytes:  # fmt: skip
    """CBOR [seq, at, actor, action, subject, result, detail], what a chain value covers: byte
    for byte :func:`oscar.cbor.dumps` of it, in a third of the time for the usual types (two
    unsigned integers, five texts); anything else (an edited row) goes through the encoder."""
    if (
        type(seq) is int
        and type(at) is int
        and 0 <= seq < 1 << 64
        and 0 <= at < 1 << 64
        and type(actor) is str
        and type(action) is str
        and type(subject) is str
        and type(result) is str
        and type(detail) is str
    ):
        return b"".join(
            (
                b"\x87",
                _head(0, seq),
                _head(0, at),
                _text(actor),
                _text(action),
                _text(subject),
                _text(result),
                _text(detail),
            )
        )
    return cbor.dumps([seq, at, actor, action, subject, result, detail])


# --- verification, in the backend's worker thread -----------------------------------------------


def walk_chain(
    reader: SnapshotReader, sql: Any, envelope: Envelope, expected: tuple[int, bytes] | None
) -> tuple[bool, str]:
    """:meth:`AuditLog.verify_audit` in one snapshot (the head, the checkpoint and the rows
    agree), in the backend's worker thread."""
    chain = envelope.chain_function()
    base, previous, pruned = 0, b"", ""
    row = reader.one(sql.CHECKPOINT_ROW)
    if row is not None:
        seq, value, at, mac = row
        if not (
            type(seq) is int
            and isinstance(value, bytes)
            and type(at) is int
            and isinstance(mac, bytes)
            and mac == checkpoint_mac(envelope, seq, value, at)
        ):
            return False, "the checkpoint was altered"
        base, previous = seq, value
        pruned = f" after the checkpoint at record {seq}"
    want_seq, seen = base + 1, None

    # audit_bytes, with the texts' encodings remembered: actors, actions, subjects, results and
    # many details repeat (0.7 rather than 2 microseconds a record).
    texts: dict[str, bytes] = {}
    known = texts.get

    def text(value: str) -> bytes:
        if len(texts) >= _TEXT_CACHE:
            texts.clear()
        encoded = texts[value] = _text(value)
        return encoded

    join = b"".join
    for rows in reader.batches(sql.CHAINED_RECORDS_AFTER, (base,), _VERIFY_BATCH):
        for seq, at, actor, action, subject, result, detail, value in rows:
            if seq != want_seq:
                return False, f"record {want_seq} is missing"
            try:
                record = join((
                    b"\x87", _head(0, seq), _head(0, at),
                    known(actor) or text(actor), known(action) or text(action),
                    known(subject) or text(subject), known(result) or text(result),
                    known(detail) or text(detail),
                ))  # fmt: skip
            except (AttributeError, TypeError, ValueError, OverflowError, struct.error):
                try:
                    record = audit_bytes(seq, at, actor, action, subject, result, detail)
                except (TypeError, ValueError, OverflowError, struct.error):  # not as written
                    return False, f"record {seq} was altered"
            previous = chain(previous, record)
            if value != previous:
                return False, f"record {seq} was altered"
            if expected is not None and seq == expected[0]:
                seen = previous
            want_seq = seq + 1
    count = want_seq - 1 - base
    if expected is not None and expected[0] > 0:
        if expected[0] < base:
            return False, (
                f"record {expected[0]} was pruned (the log goes on after record {base}): "
                "record a newer head"
            )
        if expected[0] == base:
            seen = row[1] if row is not None else None  # the checkpoint's, vouched for above
        if seen != expected[1]:
            return False, f"the log no longer holds the recorded head (record {expected[0]})"
    head_row = reader.one(sql.HEAD)
    if head_row is None:
        if count == 0 and base == 0:
            return True, "empty"
        return False, "the chain head is missing"
    try:
        decoded = cbor.loads(bytes(head_row[0]))
    except (cbor.MalformedCBOR, TypeError, ValueError):
        return False, "the chain head is unreadable"
    if not isinstance(decoded, list) or len(decoded) != 2:
        return False, "the chain head is unreadable"
    head_seq, head_chain = decoded
    if head_seq != want_seq - 1 or head_chain != previous:
        return False, f"records after {want_seq - 1} were removed (head says {head_seq!r})"
    return True, f"{count} records{pruned}, chain intact"
