"""Freshness: the newest (epoch, seq) accepted per resource, so no replay or rollback gets through.

A consumer accepts an object only if its (epoch, seq) is strictly greater, in that order, than the
newest it has accepted for the resource (DESIGN §4, "Freshness"). A replay of the newest object is
therefore refused too. Expiry (``exp``) is checked by :mod:`oscar.objects`, which knows the time.

:meth:`FreshnessState.check` only looks; :meth:`FreshnessState.accept` records, and the caller calls
it after every other check has passed (``oscar.objects.open`` does). The state is plain data:
:meth:`snapshot` and :meth:`from_snapshot` let the role persist it (the core never touches a disk),
and the snapshot is CBOR-friendly.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import InvalidObject

__all__ = ["FreshnessState"]


class FreshnessState:
    """Newest accepted (epoch, seq) per resource id."""

    __slots__ = ("_newest",)

    def __init__(self) -> None:
        self._newest: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"FreshnessState(resources={len(self._newest)})"

    def __len__(self) -> int:
        return len(self._newest)

    def newest(self, resource_id: str) -> tuple[int, int] | None:
        """The newest accepted (epoch, seq) of the resource, or None if none was accepted."""
        return self._newest.get(resource_id)

    def check(self, resource_id: str, epoch: int, seq: int) -> None:
        """Raise :class:`InvalidObject` unless (epoch, seq) is newer than anything accepted."""
        newest = self._newest.get(resource_id)
        if newest is None:
            return
        if epoch < newest[0]:
            raise InvalidObject("rollback to an older epoch")
        if (epoch, seq) <= newest:
            raise InvalidObject("replay or rollback of the sequence number")

    def accept(self, resource_id: str, epoch: int, seq: int) -> None:
        """Record (epoch, seq) as the newest; raises :class:`InvalidObject` if it is not newer."""
        self.check(resource_id, epoch, seq)
        self._newest[resource_id] = (epoch, seq)

    def snapshot(self) -> dict[str, list[int]]:
        """The state as ``{resource id: [epoch, seq]}`` for the caller to persist."""
        return {rid: [e, s] for rid, (e, s) in self._newest.items()}

    @classmethod
    def from_snapshot(cls, data: Mapping[str, object]) -> FreshnessState:
        """Rebuild from :meth:`snapshot` output; ValueError if it is not of that shape."""
        state = cls()
        if not isinstance(data, Mapping):
            raise ValueError("freshness snapshot must be a map")
        for rid, pair in data.items():
            if (
                not isinstance(rid, str)
                or not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or any(type(v) is not int or v < 0 for v in pair)
            ):
                raise ValueError("freshness snapshot entries must be resource id -> [epoch, seq]")
            state._newest[rid] = (pair[0], pair[1])
        return state
