"""The running AS instances' heartbeats: who serves on this database, and how each is doing.

Each ``oscar-as serve`` process writes one row (:meth:`Instances.beat`) every heartbeat period
(``ServeOptions.heartbeat``): a random id made at its start, its listen address, host and pid,
when it started, when it last wrote, its period, and a few facts it knows (whether the database
answered its last tick, its DTLS connections, the devices it lets connect, its ``/keys``
observations). The admin console's overview lists them: an instance not seen for
:data:`STALE_AFTER` of its own periods is "not responding" (killed, hung, or cut off from the
database). A clean stop deletes the row; rows unseen for :data:`PRUNE_AFTER` seconds are deleted
by any instance's next beat.

The table is ephemeral: a beat is not a change (the change counter the servers poll does not
move), is not audited, and ``oscar-as migrate`` does not copy it (the instances write it again).
Times are Unix seconds as floats (a beat every half second must be told apart from the next).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend

__all__ = ["PRUNE_AFTER", "STALE_AFTER", "Instance", "Instances"]

#: An instance is healthy while its last beat is at most this many of its periods old.
STALE_AFTER = 3
#: Rows unseen for this many seconds are deleted (a killed instance's row does not stay forever).
PRUNE_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class Instance:
    """One AS instance's last heartbeat."""

    id: str
    address: str
    host: str
    pid: int
    started_at: float
    seen_at: float
    every: float
    facts: dict[str, Any] = field(default_factory=dict)

    def healthy(self, now: float) -> bool:
        """Whether its last beat is recent (at most :data:`STALE_AFTER` periods old)."""
        return now - self.seen_at <= STALE_AFTER * self.every

    @classmethod
    def of_row(cls, row: tuple[Any, ...]) -> Instance:
        try:
            facts = json.loads(row[7])
        except (TypeError, ValueError):
            facts = {}
        return cls(
            str(row[0]), str(row[1]), str(row[2]), int(row[3]),
            float(row[4]), float(row[5]), float(row[6]),
            facts if isinstance(facts, dict) else {},
        )  # fmt: skip


class Instances:
    """The ``instances`` table over a store's backend."""

    def __init__(self, db: Backend) -> None:
        self.db = db

    async def beat(self, instance: Instance) -> None:
        """Write ``instance``'s row (one upsert), and delete the rows unseen for
        :data:`PRUNE_AFTER` seconds; not a change, not audited."""
        sql = self.db.sql
        facts = json.dumps(instance.facts, sort_keys=True, separators=(",", ":"))
        async with self.db.transaction(count=False):
            await self.db.execute(
                sql.INSTANCE_SET,
                (
                    *(instance.id, instance.address, instance.host, instance.pid),
                    *(instance.started_at, instance.seen_at, instance.every, facts),
                ),
            )
            await self.db.execute(sql.INSTANCES_PRUNE, (instance.seen_at - PRUNE_AFTER,))

    async def remove(self, instance_id: str) -> None:
        """Delete an instance's row (its clean stop)."""
        async with self.db.transaction(count=False):
            await self.db.execute(self.db.sql.INSTANCE_DELETE, (instance_id,))

    async def instances(self) -> list[Instance]:
        """Every recorded instance, by address."""
        return [Instance.of_row(tuple(row)) for row in await self.db.all(self.db.sql.INSTANCES)]
