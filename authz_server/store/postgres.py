"""Every SQL text of the AS store, in PostgreSQL's dialect: the schema (its migrations are in
:mod:`.postgres_migrations`), the session's
settings, and each statement the components run, under the names :mod:`.sqlite` gives them; with
the few Python helpers the dialect needs (a list bound as one JSON parameter, ASCII case folding
as ``lower()`` does it on the schema's ``"C"`` collation, the key range of a grant pattern, the
``meta`` table's typed columns).

How the dialects differ, and how this one keeps the store's behaviour the same:

- parameters are ``$1``, ``$2``…; a statement that SQLite writes with named parameters
  (``:name``) is a :class:`Named` text here: the backend binds a mapping in its ``names``' order;
- every text column is ``COLLATE "C"`` (byte order, ASCII-only ``lower()``), as SQLite's BINARY
  collation is: listings come out in the same order and enrolment's case check folds the same
  letters, whatever collation the database was created with;
- ``meta`` holds a value of any type in SQLite; here a row has three typed columns (``bytes``,
  ``text``, ``number``), one of them set (:func:`meta_params`, :func:`meta_value`);
- grant patterns match with ``oscar_match(name, pattern)``, a PL/pgSQL function made by the
  first migration that translates the ``fnmatch`` pattern to an anchored regular expression as
  Python's :func:`fnmatch.translate` does (``*``, ``?``, ``[...]``, ``[!...]``);
- the append-only audit table is held by trigger functions, as SQLite's triggers hold it;
- the schema version is the ``schema_version`` table's one row (SQLite: ``PRAGMA user_version``).

This module runs nothing; :mod:`.postgres_backend` runs these.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .postgres_migrations import MIGRATIONS

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Named",
    "fold",
    "id_list",
    "meta_params",
    "meta_value",
    "prefix_range",
]


class Named(str):
    """A statement written with named parameters (``:name``, as :mod:`.sqlite` writes it),
    turned into PostgreSQL's ``$n``; ``names`` is the order a mapping is bound in."""

    names: tuple[str, ...]

    def __new__(cls, text: str) -> Named:
        names: list[str] = []

        def number(found: re.Match[str]) -> str:
            name = found.group(1)
            if name not in names:
                names.append(name)
            return "$" + str(names.index(name) + 1)

        # "::" (a cast) is not a parameter; a name follows a single colon.
        self = super().__new__(cls, re.sub(r"(?<![:\w]):([a-z_]+)\b", number, text))
        self.names = tuple(names)
        return self


# --- the schema ----------------------------------------------------------------------------------

SCHEMA_VERSION = len(MIGRATIONS)


def split_script(script: str) -> list[str]:
    """A migration script as one text: PostgreSQL runs several statements (and ``$$`` bodies)
    in one simple query, inside the migration's transaction."""
    return [script.strip()]


SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)"
USER_VERSION = "SELECT version FROM schema_version"
SCHEMA_VERSION_FIRST = "INSERT INTO schema_version VALUES (0)"
SCHEMA_VERSION_SET = "UPDATE schema_version SET version = $1"
#: Every migration, and the first look at the version, waits for any other process migrating.
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(7262707, 1)"


# --- the session ---------------------------------------------------------------------------------

#: Each session's settings: every commit durable (the default, stated), UTC, a statement that
#: waits longer than SQLite's busy timeout fails.
#: The sessions' settings. A transaction of the AS takes milliseconds and never waits for
#: anything but the server between its statements, so a session idle inside one for 5 s is a
#: process that stopped (SIGSTOP, a VM paused, a partition) while it held the write lock: the
#: server ends it, and the other instances' writers, waiting up to ``lock_timeout``, go on.
CONNECTION_SETTINGS = {
    "synchronous_commit": "on",
    "TimeZone": "UTC",
    "lock_timeout": "10s",
    "idle_in_transaction_session_timeout": "5s",
}
BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"
#: Every write transaction of every process on this database takes this lock first, as SQLite's
#: BEGIN IMMEDIATE takes the file's write lock: writers are serialized, so the audit chain's
#: next seq and a rotation's epochs are read and written by one transaction at a time.
WRITE_LOCK = "SELECT pg_advisory_xact_lock(7262707, 2)"
#: The audit verification's snapshot: one read-only REPEATABLE READ transaction.
BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
#: What PostgreSQL offers after a destruction or revocation (it has no secure_delete): the
#: dead row versions of the tables that held the secrets are pruned by a VACUUM, their space
#: made reusable (not zeroed); see docs/DECISIONS.md.
ERASE_FREED = ("VACUUM epochs", "VACUUM devices")


# --- meta ----------------------------------------------------------------------------------------


def meta_params(
    key: str, value: bytes | str | int
) -> tuple[str, bytes | None, str | None, int | None]:
    """The row of ``meta`` for (key, value): the value in the column of its type."""
    if isinstance(value, bool) or not isinstance(value, bytes | str | int):
        raise TypeError("a meta value is bytes, text or an integer")
    return (
        key,
        value if isinstance(value, bytes) else None,
        value if isinstance(value, str) else None,
        value if isinstance(value, int) else None,
    )


def meta_value(row: Sequence[Any]) -> Any:
    """The value of a :data:`META_GET` row (whichever column is set)."""
    return next((v for v in row if v is not None), None)


META_INSERT = "INSERT INTO meta VALUES ($1, $2, $3, $4)"
META_GET = "SELECT bytes, text, number FROM meta WHERE key = $1"
META_SET = (
    "INSERT INTO meta VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO UPDATE SET "
    "bytes = excluded.bytes, text = excluded.text, number = excluded.number"
)
COUNT_CHANGE = "UPDATE meta SET number = number + 1 WHERE key = 'changes'"
CHANGES = "SELECT number FROM meta WHERE key = 'changes'"
DATA_KEY = "SELECT bytes FROM meta WHERE key = 'data_key'"

# --- devices, links and certificates (registry.py) ----------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(device_id: str) -> str:
    """A device id as ``lower()`` has it on a ``"C"`` column (ASCII letters only)."""
    return device_id.translate(_ASCII_LOWER)


def id_list(items: Iterable[Any]) -> str:
    """One SQL parameter holding a list (a JSON array, ``$n::jsonb``): bulk statements bind the
    whole list as data, never build SQL from it."""
    return json.dumps(list(items))


#: Each statement that takes a list matches it as ``= ANY(ARRAY(SELECT
#: jsonb_array_elements_text($1::jsonb)))``: an index condition with array keys, one lookup per
#: item whatever the planner estimates. ``IN (SELECT jsonb_array_elements_text(…))`` is a
#: semi-join, which the planner (guessing 100 items, few rows in a table without statistics)
#: ran as a walk of the whole table: a two-device credentials reload visited every device
#: (tests/roles/as/test_as_scale.py counts the rows).

DEVICE_TAKEN = (
    "SELECT lower(id) FROM devices WHERE lower(id) "
    "= ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb))) LIMIT 1"
)
DEVICE_INSERT = "INSERT INTO devices VALUES ($1, $2, $3, 'active', $4, NULL)"
DEVICE = "SELECT id, role, status, enrolled_at, revoked_at FROM devices WHERE id = $1"
DEVICES = "SELECT id, role, status, enrolled_at, revoked_at FROM devices ORDER BY id"
ACTIVE_DEVICE_IDS = "SELECT id FROM devices WHERE status = 'active'"
ACTIVE_PSKS = "SELECT id, psk FROM devices WHERE status = 'active'"
ACTIVE_PSKS_OF = (
    "SELECT id, psk FROM devices WHERE status = 'active' AND id "
    "= ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))"
)
DEVICE_ROLE_STATUS = "SELECT role, status FROM devices WHERE id = $1"
DEVICES_ROLE_STATUS = (
    "SELECT id, role, status FROM devices WHERE id "
    "= ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))"
)
#: Overwrite before clearing (the zeros are the row's last version; see ERASE_FREED).
PSK_OVERWRITE = "UPDATE devices SET psk = decode(repeat('00', length(psk)), 'hex') WHERE id = $1"
DEVICE_REVOKE = "UPDATE devices SET psk = NULL, status = 'revoked', revoked_at = $1 WHERE id = $2"
CERTIFICATES_REVOKE_OF = (
    "UPDATE certificates SET revoked_at = $1 WHERE device_id = $2 AND revoked_at IS NULL"
)
PRODUCER_EPOCHS_COMPROMISE = (
    "UPDATE epochs SET state = 'compromised', deactivated_at = $1 "
    "WHERE state IN ('active', 'pre-active') AND resource_id IN "
    "(SELECT id FROM resources WHERE producer_id = $2)"
)
LINKED_DEVICES = (
    "SELECT id FROM devices WHERE status = 'active' AND role IN ('producer', 'consumer') "
    "ORDER BY id"
)
LINK_DELIVERY_INSERT = "INSERT INTO deliveries VALUES ($1, $2, 0, $3) ON CONFLICT DO NOTHING"
CERTIFICATE_INSERT = "INSERT INTO certificates VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)"
VALID_CERTIFICATE = (
    "SELECT der FROM certificates WHERE (device_id = $1 OR kid = $2) "
    "AND revoked_at IS NULL AND not_before <= $3 AND $4 <= not_after "
    "ORDER BY issued_at DESC LIMIT 1"
)
REVOKED_CERTIFICATES = (
    "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL "
    "AND not_after >= $1 ORDER BY revoked_at"
)

# --- resources and epochs (keyring.py) ----------------------------------------------------------

RESOURCE_TAKEN = (
    "SELECT id FROM resources WHERE id "
    "= ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb))) LIMIT 1"
)
RESOURCE_INSERT = "INSERT INTO resources VALUES ($1, $2, $3, $4, $5, $6, $7)"
EPOCH_INSERT = (
    "INSERT INTO epochs (resource_id, epoch, state, secret, created_at, activated_at, rotate_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
RESOURCE = (
    "SELECT id, producer_id, content_format, profile, max_age, rotation_period, registered_at "
    "FROM resources WHERE id = $1"
)
RESOURCES = (
    "SELECT id, producer_id, content_format, profile, max_age, rotation_period, registered_at "
    "FROM resources ORDER BY id"
)
RESOURCES_OF = (
    "SELECT id, producer_id, content_format, profile, max_age, rotation_period, registered_at "
    "FROM resources WHERE producer_id = $1 ORDER BY id"
)
_LIVE_RESOURCES = (
    "SELECT r.id, r.producer_id, r.content_format, r.profile, r.max_age, r.rotation_period, "
    "r.registered_at, e.epoch FROM resources r "
    "JOIN epochs e ON e.resource_id = r.id AND e.state = 'active' "
)
LIVE_RESOURCES = _LIVE_RESOURCES + "ORDER BY r.id"
LIVE_RESOURCES_OF = _LIVE_RESOURCES + "WHERE r.producer_id = $1 ORDER BY r.id"
LIVE_EPOCHS = (
    "SELECT resource_id, epoch FROM epochs WHERE state IN ('active', 'pre-active') "
    "AND resource_id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))"
)
EPOCHS = (
    "SELECT resource_id, epoch, state, created_at, activated_at, deactivated_at "
    "FROM epochs WHERE resource_id = $1 ORDER BY epoch"
)
_EPOCH = (
    "SELECT resource_id, epoch, state, created_at, activated_at, deactivated_at, secret "
    "FROM epochs WHERE resource_id = $1 AND "
)
ACTIVE_EPOCH_ROW = _EPOCH + "state = 'active'"
EPOCH_ROW = _EPOCH + "epoch = $2"
ACTIVE_EPOCH = "SELECT epoch FROM epochs WHERE resource_id = $1 AND state = 'active'"
LIVE_EPOCH_STATES = (
    "SELECT epoch, state FROM epochs WHERE resource_id = $1 AND state IN ('active', 'pre-active')"
)
EPOCH_DEACTIVATE = (
    "UPDATE epochs SET state = 'deactivated', deactivated_at = $1 "
    "WHERE resource_id = $2 AND epoch = $3"
)
EPOCH_ACTIVATE = Named(
    "UPDATE epochs SET state = 'active', activated_at = :now, rotate_at = :now + "
    "(SELECT NULLIF(rotation_period, 0) FROM resources WHERE id = :resource) "
    "WHERE resource_id = :resource AND epoch = :epoch"
)
EPOCH_COMPROMISE = (
    "UPDATE epochs SET state = 'compromised', deactivated_at = COALESCE("
    "deactivated_at, $1) WHERE resource_id = $2 AND epoch = $3"
)
DUE_ROTATIONS = (
    "SELECT resource_id FROM epochs WHERE state = 'active' AND rotate_at IS NOT NULL "
    "AND rotate_at <= $1 ORDER BY resource_id"
)
ROTATION_DUE = (
    "SELECT 1 FROM epochs WHERE resource_id = $1 AND state = 'active' AND rotate_at IS NOT NULL "
    "AND rotate_at <= $2"
)
RETIRED_OF = (
    "SELECT epoch FROM epochs WHERE resource_id = $1 AND state IN ('deactivated', 'compromised') "
    "ORDER BY epoch"
)
RETIRED_BEFORE = (
    "SELECT resource_id, epoch FROM epochs WHERE state IN ('deactivated', "
    "'compromised') AND deactivated_at <= $1"
)
EPOCH_OVERWRITE = (
    "UPDATE epochs SET secret = decode(repeat('00', length(secret)), 'hex') "
    "WHERE resource_id = $1 AND epoch = $2"
)
EPOCH_DESTROY = (
    "UPDATE epochs SET secret = NULL, state = 'destroyed' WHERE resource_id = $1 AND epoch = $2"
)

# --- grants and exclusions (access.py) -----------------------------------------------------------

_VIEW = (
    "SELECT r.id, r.producer_id, r.content_format, r.profile, r.max_age, r.rotation_period, "
    "r.registered_at, e.epoch, e.state, e.created_at, e.activated_at, e.deactivated_at, e.secret, "
    "EXISTS (SELECT 1 FROM grants g WHERE g.consumer_id = :device "
    "  AND g.revoked_at IS NULL AND (g.until IS NULL OR :now::bigint < g.until) "
    "  AND oscar_match(:resource, g.pattern)), "
    "EXISTS (SELECT 1 FROM exclusions x WHERE x.consumer_id = :device "
    "  AND x.resource_id = :resource AND x.from_epoch <= COALESCE(e.epoch, :epoch::bigint, 0) "
    "  AND (x.to_epoch IS NULL OR COALESCE(e.epoch, :epoch::bigint, 0) <= x.to_epoch)), "
    "EXISTS (SELECT 1 FROM devices d WHERE d.id = :device AND d.status = 'active') "
    "FROM (SELECT 1) AS one "
    "LEFT JOIN resources r ON r.id = :resource::text "
    "LEFT JOIN epochs e ON e.resource_id = :resource::text AND "
)
VIEW_OF_ACTIVE = Named(_VIEW + "e.state = 'active'")
VIEW_OF_EPOCH = Named(_VIEW + "e.epoch = :epoch::bigint")
#: Many secret views in one statement: one row per (device, resource, epoch or NULL for the
#: active one, now) of the arrays, numbered from 1 in the first column, then the columns of
#: VIEW_OF_ACTIVE / VIEW_OF_EPOCH, each decided as they decide it (the backend coalesces the
#: point reads of concurrent requests into one round trip: see COALESCED).
VIEW_BATCH = (
    "SELECT q.n, r.id, r.producer_id, r.content_format, r.profile, r.max_age, "
    "r.rotation_period, r.registered_at, e.epoch, e.state, e.created_at, e.activated_at, "
    "e.deactivated_at, e.secret, "
    "EXISTS (SELECT 1 FROM grants g WHERE g.consumer_id = q.device "
    "  AND g.revoked_at IS NULL AND (g.until IS NULL OR q.now < g.until) "
    "  AND oscar_match(q.resource, g.pattern)), "
    "EXISTS (SELECT 1 FROM exclusions x WHERE x.consumer_id = q.device "
    "  AND x.resource_id = q.resource AND x.from_epoch <= COALESCE(e.epoch, q.epoch, 0) "
    "  AND (x.to_epoch IS NULL OR COALESCE(e.epoch, q.epoch, 0) <= x.to_epoch)), "
    "EXISTS (SELECT 1 FROM devices d WHERE d.id = q.device AND d.status = 'active') "
    "FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) "
    "  WITH ORDINALITY AS q(device, resource, epoch, now, n) "
    "LEFT JOIN resources r ON r.id = q.resource "
    "LEFT JOIN LATERAL ("
    "  (SELECT e1.epoch, e1.state, e1.created_at, e1.activated_at, e1.deactivated_at, e1.secret "
    "   FROM epochs e1 WHERE q.epoch IS NULL AND e1.resource_id = q.resource "
    "   AND e1.state = 'active') "
    "  UNION ALL "
    "  (SELECT e2.epoch, e2.state, e2.created_at, e2.activated_at, e2.deactivated_at, e2.secret "
    "   FROM epochs e2 WHERE q.epoch IS NOT NULL AND e2.resource_id = q.resource "
    "   AND e2.epoch = q.epoch) "
    "  LIMIT 1"
    ") e ON true"
)
#: The point reads the backend coalesces: statement -> (the statement reading many at once,
#: the names of the parameters whose values become its arrays, in order).
COALESCED: dict[str, tuple[str, tuple[str, ...]]] = {
    VIEW_OF_ACTIVE: (VIEW_BATCH, ("device", "resource", "epoch", "now")),
    VIEW_OF_EPOCH: (VIEW_BATCH, ("device", "resource", "epoch", "now")),
}
OPEN_EXCLUSIONS_OF = (
    "SELECT DISTINCT consumer_id, resource_id FROM exclusions WHERE to_epoch IS NULL "
    "AND consumer_id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb))) "
    "ORDER BY consumer_id, resource_id"
)
GRANT_INSERT = (
    "INSERT INTO grants (consumer_id, pattern, until, granted_at, revoked_at) "
    "VALUES ($1, $2, $3, $4, NULL)"
)
EXCLUSION_CLOSE = (
    "UPDATE exclusions SET to_epoch = $1 WHERE consumer_id = $2 AND resource_id = $3 "
    "AND to_epoch IS NULL"
)
UNREVOKED_GRANTS = (
    "SELECT id, pattern FROM grants WHERE consumer_id = $1 AND revoked_at IS NULL ORDER BY id"
)
GRANT_REVOKE = "UPDATE grants SET revoked_at = $1 WHERE id = $2"
GRANT_EXPIRE = Named(
    "UPDATE grants SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL "
    "AND until IS NOT NULL AND until <= :now"
)
LIVE_PATTERNS = (
    "SELECT pattern FROM grants WHERE consumer_id = $1 AND revoked_at IS NULL "
    "AND (until IS NULL OR $2 < until)"
)
ACTIVE_RESOURCE_IDS = (
    "SELECT DISTINCT resource_id FROM epochs WHERE state = 'active' ORDER BY resource_id"
)
EXCLUSION_INSERT = "INSERT INTO exclusions VALUES ($1, $2, $3, NULL, $4)"
EXPIRED_GRANTS = (
    "SELECT id, consumer_id, pattern FROM grants WHERE revoked_at IS NULL "
    "AND until IS NOT NULL AND until <= $1 ORDER BY id"
)
EXCLUDED_RESOURCES = (
    "SELECT DISTINCT resource_id FROM exclusions WHERE consumer_id = $1 AND to_epoch IS NULL"
)
GRANTS = "SELECT id, consumer_id, pattern, until, granted_at, revoked_at FROM grants ORDER BY id"
GRANTS_OF = (
    "SELECT id, consumer_id, pattern, until, granted_at, revoked_at FROM grants "
    "WHERE consumer_id = $1 ORDER BY id"
)
#: Without a literal prefix the upper bound is NULL: no bound.
READABLE_IN_RANGE = Named(
    "SELECT r.id, r.producer_id, r.content_format, r.profile, r.max_age, r.rotation_period, "
    "r.registered_at, e.epoch FROM resources r "
    "JOIN epochs e ON e.resource_id = r.id AND e.state = 'active' "
    "WHERE r.id >= :low::text AND (:high::text IS NULL OR r.id < :high::text) "
    "AND oscar_match(r.id, :pattern) "
    "AND NOT EXISTS (SELECT 1 FROM exclusions x WHERE x.consumer_id = :consumer "
    "  AND x.resource_id = r.id AND x.from_epoch <= e.epoch "
    "  AND (x.to_epoch IS NULL OR e.epoch <= x.to_epoch))"
)
EXCLUSION_COVERS = (
    "SELECT 1 FROM exclusions WHERE consumer_id = $1 AND resource_id = $2 "
    "AND from_epoch <= $3 AND (to_epoch IS NULL OR $4 <= to_epoch)"
)


def prefix_range(pattern: str) -> tuple[str, str | None]:
    """Bounds [low, high) of the ids an ``fnmatch`` pattern can match, for
    :data:`READABLE_IN_RANGE`: its literal prefix, and that prefix with its last character
    incremented (byte order: the ``"C"`` collation). Without an ASCII prefix, every id: no upper
    bound (None)."""
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
    prefix = pattern[:cut]
    if not prefix or not prefix.isascii():
        return "", None
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


# --- deliveries (deliveries.py) ------------------------------------------------------------------

DELIVERIES_INSERT_NEW = (
    "INSERT INTO deliveries SELECT d ->> 0, d ->> 1, (d ->> 2)::bigint, (d ->> 3)::bigint "
    "FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(d, n) ORDER BY n "
    "ON CONFLICT DO NOTHING RETURNING device_id, resource_id, epoch"
)

# --- the audit chain (audit.py) ------------------------------------------------------------------

LAST_RECORD = "SELECT seq, chain FROM audit ORDER BY seq DESC LIMIT 1"
CHECKPOINT = "SELECT seq, chain FROM audit_checkpoint WHERE id = 1"
CHECKPOINT_SEQ = "SELECT seq FROM audit_checkpoint WHERE id = 1"
RECORD_INSERT = "INSERT INTO audit VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
HEAD_SET = (
    "INSERT INTO meta (key, bytes) VALUES ('audit_head', $1) "
    "ON CONFLICT (key) DO UPDATE SET bytes = excluded.bytes"
)
RECORDS_AFTER = (
    "SELECT seq, at, actor, action, subject, result, detail FROM audit WHERE seq > $1 ORDER BY seq"
)
FIRST_KEPT = "SELECT seq FROM audit WHERE seq > $1 AND seq <= $2 AND at >= $3 ORDER BY seq LIMIT 1"
#: SQLite's two-argument MIN is NULL when either is; LEAST ignores a NULL: said explicitly.
PAST_LAST = (
    "SELECT CASE WHEN MAX(seq) IS NULL THEN NULL ELSE LEAST(MAX(seq), $1::bigint) + 1 END "
    "FROM audit"
)
CHAIN_AT = "SELECT chain FROM audit WHERE seq = $1"
CHECKPOINT_SET = (
    "INSERT INTO audit_checkpoint VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO "
    "UPDATE SET seq = excluded.seq, chain = excluded.chain, at = excluded.at, "
    "mac = excluded.mac"
)
PRUNED_LEFT = (
    "SELECT MIN(a.seq), c.seq FROM audit a, audit_checkpoint c WHERE c.id = 1 AND a.seq <= c.seq "
    "GROUP BY c.seq"
)
RECORDS_DELETE = "DELETE FROM audit WHERE seq BETWEEN $1 AND $2"
CHECKPOINT_ROW = "SELECT seq, chain, at, mac FROM audit_checkpoint WHERE id = 1"
CHAINED_RECORDS_AFTER = (
    "SELECT seq, at, actor, action, subject, result, detail, chain FROM audit "
    "WHERE seq > $1 ORDER BY seq"
)
HEAD = "SELECT bytes FROM meta WHERE key = 'audit_head'"
RECORDS_BEFORE = (
    "SELECT seq, at, actor, action, subject, result, detail FROM audit WHERE seq <= $1 "
    "ORDER BY seq DESC LIMIT $2"
)

# --- the admin console's tokens (admins.py) -----------------------------------------------------

ADMIN = "SELECT name, created_at, expires_at, revoked_at FROM admins WHERE name = $1"
ADMINS = "SELECT name, created_at, expires_at, revoked_at FROM admins ORDER BY name"
ADMIN_SET = (
    "INSERT INTO admins VALUES ($1, $2, $3, $4, NULL) ON CONFLICT (name) DO UPDATE SET "
    "token_hash = excluded.token_hash, created_at = excluded.created_at, "
    "expires_at = excluded.expires_at, revoked_at = NULL"
)
ADMIN_OF_HASH = "SELECT name, created_at, expires_at, revoked_at FROM admins WHERE token_hash = $1"
ADMIN_REVOKE = "UPDATE admins SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL"

# --- the instances' heartbeats (instances.py) ----------------------------------------------------

INSTANCE_SET = (
    "INSERT INTO instances VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET "
    "seen_at = excluded.seen_at, every = excluded.every, facts = excluded.facts"
)
INSTANCES_PRUNE = "DELETE FROM instances WHERE seen_at < $1"
INSTANCE_DELETE = "DELETE FROM instances WHERE id = $1"
INSTANCES = (
    "SELECT id, address, host, pid, started_at, seen_at, every, facts FROM instances "
    "ORDER BY address, started_at, id"
)

# --- a copy from SQLite (migrate.py) -------------------------------------------------------------

SCHEMA_TABLES = (
    "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
    "ORDER BY table_name"
)
TABLE_COLUMNS = (
    "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
    "AND table_name = $1 ORDER BY ordinal_position"
)
#: What the migrations make under a name of their own in the schema the AS uses (the first of
#: the search path): the tables, the version's table and the functions.
SCHEMA_OBJECTS = (
    *("meta", "devices", "certificates", "resources", "epochs", "grants", "exclusions"),
    *("deliveries", "audit", "audit_checkpoint", "admins", "instances"),
    *("parts", "part_epochs", "part_grants", "part_exclusions"),
    "schema_version",
    *("audit_append_only", "audit_prune_only", "oscar_glob", "oscar_match"),
)
#: Those of :data:`SCHEMA_OBJECTS` (bound as ``$1``) that exist already.
OBJECTS_PRESENT = (
    "SELECT name FROM unnest($1::text[]) AS name, "
    "(SELECT oid FROM pg_namespace WHERE nspname = current_schema()) AS here(oid) WHERE "
    "EXISTS (SELECT 1 FROM pg_class c WHERE c.relname = name AND c.relnamespace = here.oid) OR "
    "EXISTS (SELECT 1 FROM pg_proc p WHERE p.proname = name AND p.pronamespace = here.oid) "
    "ORDER BY name"
)
#: After a copy that gave grants their ids: the next grant gets the next id.
GRANT_IDS_SET = (
    "SELECT setval(pg_get_serial_sequence('grants', 'id'), COALESCE(MAX(id), 0) + 1, false) "
    "FROM grants"
)


def table_rows(table: str, columns: Sequence[str]) -> str:
    """Every row of ``table`` (a name of the schema, never input), its ``columns`` in order."""
    return f"SELECT {', '.join(columns)} FROM {table}"  # noqa: S608 (the schema's names)


def count_rows(table: str) -> str:
    """How many rows ``table`` (a name of the schema, never input) holds."""
    return f"SELECT count(*) FROM {table}"  # noqa: S608 (the schema's names)
