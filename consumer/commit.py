"""Group commit of the consumer's freshness state: many accepted readings per fsync.

A reading that passed every check (:mod:`consumer.pipeline`) is accepted here in two steps:

1. :meth:`FreshnessCommits.accept`, at once and in memory: its (epoch, seq) must be newer than the
   newest of its resource that is committed *or waiting to be*, so two readings in flight of one
   resource with the same or an older (epoch, seq) are never both accepted (a replay within a
   batch); it joins the queue;
2. one save commits everything queued meanwhile: :meth:`ConsumerStore.commit_freshness
   <consumer.store.ConsumerStore.commit_freshness>` (one atomic write and fsync under the state
   directory's lock, merged with what another process recorded, then the newest object of each
   resource held), run in a worker thread so that the event loop goes on checking readings (they
   make the next group) while the disk works. The reading is released to its caller only once
   the save holding its freshness has completed.

A save starts as soon as there is something to save and none is running: a reading that comes
alone is a group of one, saved at once (no waiting for company). A save that fails (the disk
refuses, the file went bad) fails the readings it carried with its error, and they are forgotten
as if never accepted: nothing else changes (the file on disk is the old one; the readings queued
after them stand). A reading another process sharing the directory superseded meanwhile fails
with :class:`~oscar.errors.InvalidObject` (a rollback after all). A caller that stops waiting
(cancelled) does not stop the save.

With a store in memory (no state directory) a reading is committed at once, synchronously.

What this module does not do: check objects (:mod:`consumer.pipeline`), write files
(:mod:`consumer.store`), or decide what is newer (:mod:`oscar.freshness`'s order, epoch then seq).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from oscar.errors import InvalidObject
from oscar.freshness import FreshnessState

from .store import ConsumerStore

__all__ = ["FreshnessCommits"]

log = logging.getLogger("oscar.consumer")


@dataclass(eq=False, slots=True)
class _Entry:
    """One reading accepted in memory, waiting for the save that holds it."""

    resource_id: str
    version: tuple[int, int]
    data: bytes
    done: asyncio.Future[None] = field(repr=False)


class FreshnessCommits:
    """The freshness of one consumer as its readings see it: committed (the store's
    :attr:`~consumer.store.ConsumerStore.freshness`) plus accepted and waiting for a save."""

    def __init__(self, store: ConsumerStore) -> None:
        self._store = store
        #: Readings accepted and not yet settled, per resource, oldest first (versions increase).
        self._pending: dict[str, deque[_Entry]] = {}
        self._queue: list[_Entry] = []
        #: The save under way (in a worker thread), if any.
        self._saving: asyncio.Future[tuple[dict[str, list[int]], set[int]]] | None = None
        #: Saves completed, and readings they committed (a group's size is their ratio).
        self.saves = 0
        self.committed = 0

    def __repr__(self) -> str:
        waiting = sum(len(q) for q in self._pending.values())
        return (
            f"FreshnessCommits(saves={self.saves}, committed={self.committed}, waiting={waiting})"
        )

    def newest(self, resource_id: str) -> tuple[int, int] | None:
        """The newest (epoch, seq) of the resource accepted, committed or waiting to be."""
        committed = self._store.freshness.newest(resource_id)
        waiting = self._pending.get(resource_id)
        if not waiting:
            return committed
        return waiting[-1].version if committed is None else max(committed, waiting[-1].version)

    def check(self, resource_id: str, epoch: int, seq: int) -> None:
        """Raise :class:`InvalidObject` unless (epoch, seq) is newer than :meth:`newest`."""
        self._store.freshness.check(resource_id, epoch, seq)
        waiting = self._pending.get(resource_id)
        if waiting and (epoch, seq) <= waiting[-1].version:
            raise InvalidObject("replay or rollback: a newer object is being committed")

    def accept(
        self, resource_id: str, epoch: int, seq: int, data: bytes
    ) -> asyncio.Future[None] | None:
        """Accept (epoch, seq) as the newest of the resource, in memory, and queue it for the
        next save; ``data`` is the object as received (held once committed).

        Returns the future the caller awaits before releasing the reading (its own: cancelling
        it drops this reading only, the save goes on), or None when the store is in memory
        (committed already). Raises :class:`InvalidObject` when it is not newer than
        :meth:`newest`.
        """
        self.check(resource_id, epoch, seq)
        if not self._store.persistent:
            self._store.freshness.accept(resource_id, epoch, seq)
            self._store.put_held(resource_id, epoch, seq, data)
            return None
        loop = asyncio.get_running_loop()
        entry = _Entry(resource_id, (epoch, seq), data, loop.create_future())
        # A caller that stopped waiting leaves its failure unread: not worth a log line.
        entry.done.add_done_callback(_read_outcome)
        self._pending.setdefault(resource_id, deque()).append(entry)
        self._queue.append(entry)
        if self._saving is None:
            self._save_next(loop)
        return entry.done

    def waiting(self, resource_id: str, version: tuple[int, int]) -> asyncio.Future[None] | None:
        """The future of (resource, version) if it is accepted and not yet settled, else None."""
        for entry in reversed(self._pending.get(resource_id, ())):
            if entry.version == version:
                return entry.done
        return None

    @staticmethod
    async def settled(done: asyncio.Future[None]) -> None:
        """Wait for the save of a reading another caller accepted (:meth:`waiting`); raises what
        failed it. Cancelling the wait leaves that reading and its save alone."""
        await asyncio.shield(done)

    async def close(self) -> None:
        """Wait for the saves under way (and those queued) to end; their failures went to
        their readings, not here."""
        while self._saving is not None:
            await asyncio.wait({self._saving})

    def _save_next(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start saving everything queued, in a worker thread, at once (no wait for a turn of
        the event loop: the readings checked meanwhile make the next group)."""
        group, self._queue = self._queue, []
        base = self._store.freshness.snapshot()
        accepted = [(e.resource_id, e.version, e.data) for e in group]
        saving = loop.run_in_executor(None, self._store.commit_freshness, base, accepted)
        self._saving = saving
        saving.add_done_callback(lambda done: self._saved(loop, group, done))

    def _saved(
        self,
        loop: asyncio.AbstractEventLoop,
        group: list[_Entry],
        done: asyncio.Future[tuple[dict[str, list[int]], set[int]]],
    ) -> None:
        self._saving = None
        try:
            self._apply(group, done)
        finally:
            if self._queue and not loop.is_closed():
                self._save_next(loop)

    def _apply(
        self, group: list[_Entry], done: asyncio.Future[tuple[dict[str, list[int]], set[int]]]
    ) -> None:
        self._settle(group)
        if done.cancelled() or done.exception() is not None:
            # Nothing was written: the group is forgotten, as if never accepted.
            exc = None if done.cancelled() else done.exception()
            for entry in group:
                if entry.done.done():  # pragma: no cover - a group is settled once
                    continue
                if exc is None:
                    entry.done.cancel()
                else:
                    entry.done.set_exception(exc)
            log.warning(
                "the freshness state could not be saved: %d readings dropped (%s)",
                len(group),
                "cancelled" if exc is None else type(exc).__name__,
            )
            return
        merged, rejected = done.result()
        self._store.freshness = FreshnessState.from_snapshot(merged)
        self.saves += 1
        self.committed += len(group) - len(rejected)
        for i, entry in enumerate(group):
            if entry.done.done():  # pragma: no cover - a group is settled once
                continue
            if i in rejected:
                entry.done.set_exception(
                    InvalidObject("rollback: a newer object was accepted by another process")
                )
            else:
                entry.done.set_result(None)

    def _settle(self, group: list[_Entry]) -> None:
        for entry in group:
            waiting = self._pending[entry.resource_id]
            waiting.remove(entry)
            if not waiting:
                del self._pending[entry.resource_id]


def _read_outcome(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()
