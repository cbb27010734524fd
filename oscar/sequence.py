"""Sequence numbers that are never reused, across crashes and power loss included.

The nonce of every object is derived from its ``seq`` (DESIGN §4), so a reused seq under one epoch
reuses a (key, nonce) pair. The allocator follows OSCORE's scheme (RFC 8613, Appendix B.1.1):
it persists a *limit* before handing out any number below it, in windows of ``window`` numbers.
After a crash the next start resumes at the persisted limit, skipping at most one window's unused
numbers and never repeating one.

Persistence is injected: a :class:`SequenceStore` saves and loads the limit of (resource, epoch),
and ``save`` must be durable (written and synced) when it returns. Each new window starts above the
limit found in the store, so several allocators over one store in one thread never overlap; across
processes the store must be owned by one process at a time (the producer locks its state).

If ``save`` raises, the allocator hands out nothing more until a later save succeeds, raising
:class:`~oscar.errors.SequenceUnavailable`: a producer that cannot guarantee fresh numbers refuses
to seal.

This module does not do I/O; the producer's store does.
"""

from __future__ import annotations

from typing import Protocol

from .errors import SequenceUnavailable
from .keys import MAX_SEQ

__all__ = ["DEFAULT_WINDOW", "MemorySequenceStore", "SequenceAllocator", "SequenceStore"]

DEFAULT_WINDOW = 64


class SequenceStore(Protocol):
    """Durable storage of the reserved limit of each (resource id, epoch)."""

    def load(self, resource_id: str, epoch: int) -> int | None:
        """The last saved limit, or None if none was ever saved."""
        ...

    def save(self, resource_id: str, epoch: int, limit: int) -> None:
        """Persist ``limit`` durably before returning; raise on any failure."""
        ...


class MemorySequenceStore:
    """A :class:`SequenceStore` in a dict: for tests and simulations, durable only in memory."""

    def __init__(self) -> None:
        self.limits: dict[tuple[str, int], int] = {}

    def load(self, resource_id: str, epoch: int) -> int | None:
        return self.limits.get((resource_id, epoch))

    def save(self, resource_id: str, epoch: int, limit: int) -> None:
        self.limits[(resource_id, epoch)] = limit


class SequenceAllocator:
    """Hands out strictly increasing seqs for one (resource, epoch), never one that may be used."""

    __slots__ = ("_epoch", "_limit", "_next", "_resource_id", "_store", "_window")

    def __init__(
        self, store: SequenceStore, resource_id: str, epoch: int, window: int = DEFAULT_WINDOW
    ) -> None:
        if type(window) is not int or window < 1:
            raise ValueError("the reservation window must be a positive integer")
        self._store = store
        self._resource_id = resource_id
        self._epoch = epoch
        self._window = window
        # Everything below the saved limit may have been used before a crash.
        self._next = self._stored_limit()
        self._limit = self._next  # nothing reserved by this instance yet

    def __repr__(self) -> str:
        return (
            f"SequenceAllocator(resource_id={self._resource_id!r}, epoch={self._epoch}, "
            f"next={self._next}, limit={self._limit})"
        )

    @property
    def next_seq(self) -> int:
        """The number :meth:`allocate` would return next."""
        return self._next

    def _stored_limit(self) -> int:
        try:
            stored = self._store.load(self._resource_id, self._epoch)
        except Exception as exc:
            raise SequenceUnavailable("cannot read the persisted sequence limit") from exc
        if stored is None:
            return 0
        if type(stored) is not int or not 0 <= stored <= MAX_SEQ + 1:
            raise SequenceUnavailable("the persisted sequence limit is corrupt")
        return stored

    def allocate(self) -> int:
        """Return the next unused seq, reserving a new window first when needed.

        Raises :class:`SequenceUnavailable` when the store cannot persist the reservation or the
        epoch has used up all 2**64 numbers (a new epoch is needed).
        """
        if self._next >= self._limit:
            # Re-read: another allocator on the same store may have reserved since, and a window
            # must start above everything reserved by anyone.
            start = max(self._next, self._stored_limit())
            if start > MAX_SEQ:
                raise SequenceUnavailable("sequence numbers of this epoch are used up")
            new_limit = min(start + self._window, MAX_SEQ + 1)
            try:
                self._store.save(self._resource_id, self._epoch, new_limit)
            except Exception as exc:
                raise SequenceUnavailable("cannot persist the sequence reservation") from exc
            self._next = start
            self._limit = new_limit
        seq = self._next
        self._next += 1
        return seq
