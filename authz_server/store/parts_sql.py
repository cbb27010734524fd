"""The statements of a resource's parts (schema version 7) that :mod:`.parts` runs, as one
:class:`PartsSql` per dialect.

The statements are written once, in SQLite's dialect (``?`` and ``:name`` parameters); the
PostgreSQL texts are made from them (``?`` numbered ``$1``…, ``:name`` through
:class:`.postgres.Named`). The tables are :mod:`.parts_schema`'s.

What this module does not do: run anything (:mod:`.parts` does, through the backend).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from .postgres import Named

__all__ = ["POSTGRES", "SQLITE", "PartsSql", "of"]


@dataclass(frozen=True)
class PartsSql:
    """The statements of :mod:`.parts`, in one dialect."""

    PARTS_OF: str = "SELECT name, kind FROM parts WHERE resource_id = ? ORDER BY position"
    PART_INSERT: str = "INSERT INTO parts (resource_id, name, position, kind) VALUES (?, ?, ?, ?)"
    PART_EPOCH_INSERT: str = (
        "INSERT INTO part_epochs (resource_id, part, epoch, state, secret, created_at, "
        "activated_at, rotate_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    LIVE_STATES: str = (
        "SELECT epoch, state FROM part_epochs WHERE resource_id = ? AND part = ? "
        "AND state IN ('active', 'pre-active')"
    )
    EPOCH_DEACTIVATE: str = (
        "UPDATE part_epochs SET state = 'deactivated', deactivated_at = ? "
        "WHERE resource_id = ? AND part = ? AND epoch = ?"
    )
    #: The part's next scheduled rotation: the resource's rotation period after activation.
    EPOCH_ACTIVATE: str = (
        "UPDATE part_epochs SET state = 'active', activated_at = :now, rotate_at = :now + "
        "(SELECT NULLIF(rotation_period, 0) FROM resources WHERE id = :resource) "
        "WHERE resource_id = :resource AND part = :part AND epoch = :epoch"
    )
    EPOCH_STATE: str = (
        "SELECT epoch, state FROM part_epochs WHERE resource_id = ? AND part = ? AND "
        "(epoch = ? OR (? IS NULL AND state = 'active'))"
    )
    EPOCH_COMPROMISE: str = (
        "UPDATE part_epochs SET state = 'compromised', deactivated_at = COALESCE("
        "deactivated_at, ?) WHERE resource_id = ? AND part = ? AND epoch = ?"
    )
    DUE_ROTATIONS: str = (
        "SELECT resource_id, part FROM part_epochs WHERE state = 'active' "
        "AND rotate_at IS NOT NULL AND rotate_at <= ? ORDER BY resource_id, part"
    )
    ROTATION_DUE: str = (
        "SELECT 1 FROM part_epochs WHERE resource_id = ? AND part = ? AND state = 'active' "
        "AND rotate_at IS NOT NULL AND rotate_at <= ?"
    )
    #: The live epochs of every part of a resource, secrets included (the ``/keys`` reply).
    LIVE_OF: str = (
        "SELECT part, epoch, state, created_at, activated_at, deactivated_at, secret "
        "FROM part_epochs WHERE resource_id = ? "
        "AND state IN ('active', 'pre-active') ORDER BY part, epoch"
    )
    EPOCHS_OF: str = (
        "SELECT part, epoch, state, created_at, activated_at, deactivated_at, secret "
        "FROM part_epochs WHERE resource_id = ? "
        "ORDER BY part, epoch"
    )
    #: The live epochs of every part of the resources listed (a JSON list): the ``/keys``
    #: observers' fingerprints, in one query however many are observed.
    LIVE_IN: str = (
        "SELECT resource_id, part, epoch FROM part_epochs WHERE state IN ('active', 'pre-active') "
        "AND resource_id IN (SELECT value FROM json_each(?))"
    )
    #: A revoked producer's parts: every live epoch compromised (as its resources' are).
    PRODUCER_COMPROMISE: str = (
        "UPDATE part_epochs SET state = 'compromised', deactivated_at = ? "
        "WHERE state IN ('active', 'pre-active') AND resource_id IN "
        "(SELECT id FROM resources WHERE producer_id = ?)"
    )
    RETIRED_BEFORE: str = (
        "SELECT resource_id, part, epoch FROM part_epochs WHERE state IN ('deactivated', "
        "'compromised') AND deactivated_at <= ? ORDER BY resource_id, part, epoch"
    )
    #: Overwrite before clearing (SQLite's secure_delete zeroes the freed pages).
    EPOCH_OVERWRITE: str = (
        "UPDATE part_epochs SET secret = zeroblob(length(secret)) "
        "WHERE resource_id = ? AND part = ? AND epoch = ?"
    )
    EPOCH_DESTROY: str = (
        "UPDATE part_epochs SET secret = NULL, state = 'destroyed' "
        "WHERE resource_id = ? AND part = ? AND epoch = ?"
    )
    GRANT_INSERT: str = (
        "INSERT INTO part_grants (consumer_id, resource_id, part, granted_at) VALUES (?, ?, ?, ?)"
    )
    GRANT_LIVE: str = (
        "SELECT 1 FROM part_grants WHERE consumer_id = ? AND resource_id = ? AND part = ? "
        "AND revoked_at IS NULL"
    )
    GRANTS_LIVE_OF: str = (
        "SELECT resource_id, part FROM part_grants WHERE consumer_id = ? AND revoked_at IS NULL "
        "ORDER BY resource_id, part"
    )
    GRANT_REVOKE: str = (
        "UPDATE part_grants SET revoked_at = ? WHERE consumer_id = ? AND resource_id = ? "
        "AND part = ? AND revoked_at IS NULL"
    )
    GRANTS: str = (
        "SELECT consumer_id, resource_id, part, granted_at, revoked_at FROM part_grants "
        "ORDER BY granted_at, consumer_id, resource_id, part"
    )
    GRANTS_OF: str = (
        "SELECT consumer_id, resource_id, part, granted_at, revoked_at FROM part_grants "
        "WHERE consumer_id = ? ORDER BY granted_at, resource_id, part"
    )
    EXCLUSION_INSERT: str = (
        "INSERT INTO part_exclusions (consumer_id, resource_id, part, from_epoch, to_epoch, "
        "created_at) VALUES (?, ?, ?, ?, NULL, ?)"
    )
    OPEN_EXCLUSIONS: str = (
        "SELECT part FROM part_exclusions WHERE consumer_id = ? AND resource_id = ? "
        "AND to_epoch IS NULL ORDER BY part"
    )
    EXCLUDED_FROM: str = (
        "SELECT DISTINCT resource_id FROM part_exclusions WHERE consumer_id = ? "
        "AND to_epoch IS NULL ORDER BY resource_id"
    )
    EXCLUSION_CLOSE: str = (
        "UPDATE part_exclusions SET to_epoch = ? WHERE consumer_id = ? AND resource_id = ? "
        "AND part = ? AND to_epoch IS NULL"
    )
    #: What a part secret request is decided on, in one point read: the part's kind, the epoch
    #: asked for (the active one when :epoch is NULL), whether a live grant (the whole
    #: resource's, by pattern, or this part's) covers it, whether an exclusion covers that
    #: epoch, and whether the device is active.
    VIEW: str = (
        "SELECT p.kind, e.epoch, e.state, e.created_at, e.activated_at, e.deactivated_at, "
        "e.secret, "
        "EXISTS (SELECT 1 FROM grants g WHERE g.consumer_id = :device "
        "  AND g.revoked_at IS NULL AND (g.until IS NULL OR :now < g.until) "
        "  AND oscar_match(:resource, g.pattern)) "
        "OR EXISTS (SELECT 1 FROM part_grants q WHERE q.consumer_id = :device "
        "  AND q.resource_id = :resource AND q.part = :part AND q.revoked_at IS NULL), "
        "EXISTS (SELECT 1 FROM part_exclusions x WHERE x.consumer_id = :device "
        "  AND x.resource_id = :resource AND x.part = :part "
        "  AND x.from_epoch <= COALESCE(e.epoch, :epoch, 0) "
        "  AND (x.to_epoch IS NULL OR COALESCE(e.epoch, :epoch, 0) <= x.to_epoch)), "
        "EXISTS (SELECT 1 FROM devices d WHERE d.id = :device AND d.status = 'active') "
        "FROM (SELECT 1) AS one "
        "LEFT JOIN parts p ON p.resource_id = :resource AND p.name = :part "
        "LEFT JOIN part_epochs e ON e.resource_id = :resource AND e.part = :part AND "
        "(e.epoch = :epoch OR (:epoch IS NULL AND e.state = 'active'))"
    )


def _postgres(text: str) -> str:
    if re.search(r"(?<![:\w]):[a-z_]+", text):
        return Named(text.replace(":epoch IS NULL", "CAST(:epoch AS BIGINT) IS NULL"))
    text = text.replace(
        "IN (SELECT value FROM json_each(?))",
        "= ANY(ARRAY(SELECT jsonb_array_elements_text(?::jsonb)))",
    )
    text = text.replace("(? IS NULL AND", "(CAST(? AS BIGINT) IS NULL AND")
    text = text.replace("zeroblob(length(secret))", "decode(repeat('00', length(secret)), 'hex')")
    pieces = text.split("?")
    return pieces[0] + "".join(f"${n}{piece}" for n, piece in enumerate(pieces[1:], 1))


SQLITE = PartsSql()
POSTGRES = PartsSql(**{f.name: _postgres(getattr(SQLITE, f.name)) for f in fields(PartsSql)})


def of(dialect: object) -> PartsSql:
    """The statements for a backend's ``sql`` module (:mod:`.sqlite` or :mod:`.postgres`)."""
    return POSTGRES if getattr(dialect, "__name__", "").endswith(".postgres") else SQLITE
