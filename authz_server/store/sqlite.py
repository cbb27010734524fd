"""Every SQL text of the AS store, in SQLite's dialect: the schema's migrations, the connection's
settings, and each statement the components run, as a named constant (or a function where the
text takes a number); with the few Python helpers the dialect needs (the ``oscar_match`` SQL
function, ASCII case folding as ``lower()`` does it, a list bound as one JSON parameter, the key
range of a grant pattern).

The PostgreSQL backend's module (:mod:`.postgres`) has the same shape: the same names, its own
dialect; the components (:mod:`.registry`, :mod:`.keyring`, :mod:`.access`, :mod:`.audit`,
:mod:`.deliveries`) reach the statements only through their backend's ``sql`` attribute
(:class:`.backend.Backend`). Rules kept by every statement: parameterized (no value is ever
formatted into SQL), and bulk statements bind a whole list as one parameter.

This module runs nothing; :mod:`.sqlite_backend` runs these.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from .parts_schema import SQLITE_MIGRATION as _PARTS

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "fold",
    "id_list",
    "match",
    "meta_params",
    "meta_value",
    "prefix_range",
]

# --- the schema ----------------------------------------------------------------------------------

MIGRATIONS: list[str] = [
    # 1: the first schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('producer', 'consumer', 'proxy')),
        psk BLOB,
        status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        enrolled_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        kid BLOB NOT NULL,
        der BLOB NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        issued_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX certificates_device ON certificates(device_id);
    CREATE INDEX certificates_kid ON certificates(kid);
    CREATE TABLE resources (
        id TEXT PRIMARY KEY,
        producer_id TEXT NOT NULL REFERENCES devices(id),
        content_format INTEGER NOT NULL,
        profile TEXT NOT NULL,
        max_age INTEGER NOT NULL,
        rotation_period INTEGER NOT NULL,
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE epochs (
        resource_id TEXT NOT NULL REFERENCES resources(id),
        epoch INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('pre-active', 'active', 'deactivated', 'compromised', 'destroyed')),
        secret BLOB,
        created_at INTEGER NOT NULL,
        activated_at INTEGER,
        deactivated_at INTEGER,
        PRIMARY KEY (resource_id, epoch)
    );
    CREATE TABLE grants (
        id INTEGER PRIMARY KEY,
        consumer_id TEXT NOT NULL REFERENCES devices(id),
        pattern TEXT NOT NULL,
        until INTEGER,
        granted_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX grants_consumer ON grants(consumer_id);
    CREATE TABLE exclusions (
        consumer_id TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        from_epoch INTEGER NOT NULL,
        to_epoch INTEGER,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX exclusions_lookup ON exclusions(consumer_id, resource_id);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL,
        chain BLOB NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    # 2: who was handed which epoch's secret, so that each first delivery is audited once.
    """
    CREATE TABLE deliveries (
        device_id TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        delivered_at INTEGER NOT NULL,
        PRIMARY KEY (device_id, resource_id, epoch)
    );
    """,
    # 3: nothing done once a second or per request scans a table that grows with the resources,
    # grants, devices or a resource's history of epochs: the active epoch's due time
    # (activated_at + rotation_period; NULL for a resource that never rotates) kept with it and
    # indexed; the live epochs of a resource; indexes for destruction, grant expiry, a
    # producer's resources and enrolment's case-insensitive id check.
    """
    ALTER TABLE epochs ADD COLUMN rotate_at INTEGER;
    UPDATE epochs SET rotate_at = activated_at + (
        SELECT NULLIF(r.rotation_period, 0) FROM resources r WHERE r.id = epochs.resource_id)
        WHERE state = 'active';
    CREATE INDEX epochs_due ON epochs(rotate_at) WHERE state = 'active' AND rotate_at IS NOT NULL;
    CREATE INDEX epochs_active ON epochs(resource_id) WHERE state = 'active';
    CREATE INDEX epochs_live ON epochs(resource_id, state) WHERE state IN ('active', 'pre-active');
    CREATE INDEX epochs_retired ON epochs(deactivated_at)
        WHERE state IN ('deactivated', 'compromised');
    CREATE INDEX resources_producer ON resources(producer_id);
    CREATE INDEX grants_until ON grants(until) WHERE revoked_at IS NULL AND until IS NOT NULL;
    CREATE INDEX devices_folded ON devices(lower(id));
    """,
    # 4: the audit log may be pruned behind a checkpoint (see store/audit.py): the last pruned
    # record's seq and chain value with a MAC under the audit key; only records the checkpoint
    # covers may be deleted.
    """
    CREATE TABLE audit_checkpoint (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        chain BLOB NOT NULL,
        at INTEGER NOT NULL,
        mac BLOB NOT NULL
    );
    DROP TRIGGER audit_no_delete;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        WHEN old.seq > COALESCE((SELECT seq FROM audit_checkpoint WHERE id = 1), 0)
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only (prune behind a checkpoint)');
        END;
    """,
    # 5: the admin console's named tokens (see store/admins.py): a keyed hash of each, never the
    # token; one row per admin name, replaced when a new token is issued under a free name.
    """
    CREATE TABLE admins (
        name TEXT PRIMARY KEY,
        token_hash BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER
    );
    """,
    # 6: the running instances' heartbeats (see store/instances.py): ephemeral, not migrated.
    """
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        seen_at REAL NOT NULL,
        every REAL NOT NULL,
        facts TEXT NOT NULL
    );
    """,
    _PARTS,  # 7: a resource's parts, their secrets, grants and exclusions (see parts_schema.py)
]
SCHEMA_VERSION = len(MIGRATIONS)


def split_script(script: str) -> list[str]:
    """The statements of a migration script (triggers hold ';' inside BEGIN ... END)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError("a migration ends in an incomplete statement")
    return statements


USER_VERSION = "PRAGMA user_version"


def set_user_version(version: int) -> str:
    return f"PRAGMA user_version={int(version)}"


# --- the connection ------------------------------------------------------------------------------

#: The writer's settings: WAL, every commit durable, foreign keys, freed pages overwritten, a
#: locked database waited for, the WAL truncated after a checkpoint.
CONNECTION_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA secure_delete=ON",
    "PRAGMA busy_timeout=10000",
    "PRAGMA journal_size_limit=0",
)
#: How long a point read on the event loop waits for a lock (only a WAL recovery or the last
#: connection's checkpoint takes one that stops readers) before it goes the worker thread's way.
READER_BUSY_MS = 20
READER_PRAGMAS = (f"PRAGMA busy_timeout={READER_BUSY_MS}", "PRAGMA query_only=ON")
#: A snapshot reader's settings (the audit verification's connection).
SNAPSHOT_PRAGMAS = ("PRAGMA busy_timeout=10000",)
BEGIN = "BEGIN IMMEDIATE"
BEGIN_READ = "BEGIN"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
#: Fold the WAL into the database and truncate it (what a destruction overwrote must not linger).
ERASE_FREED = "PRAGMA wal_checkpoint(TRUNCATE)"


def match(name: object, pattern: object) -> int:
    """``oscar_match(name, pattern)``: grant patterns match in SQL exactly as in Python
    (``fnmatch``, case-sensitive)."""
    return int(isinstance(name, str) and isinstance(pattern, str) and fnmatchcase(name, pattern))


#: SQL functions every connection gets: (name, number of arguments, function).
FUNCTIONS = (("oscar_match", 2, match),)

# --- meta ----------------------------------------------------------------------------------------


def meta_params(key: str, value: bytes | str | int) -> tuple[str, bytes | str | int]:
    """The parameters of :data:`META_SET` for (key, value) (SQLite keeps any type in a column)."""
    return (key, value)


def meta_value(row: Sequence[Any]) -> Any:
    """The value of a :data:`META_GET` row."""
    return row[0]


META_INSERT = "INSERT INTO meta VALUES (?, ?)"
META_GET = "SELECT value FROM meta WHERE key = ?"
META_SET = "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
COUNT_CHANGE = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'changes'"
CHANGES = "SELECT value FROM meta WHERE key='changes'"
DATA_KEY = "SELECT value FROM meta WHERE key='data_key'"

# --- devices, links and certificates (registry.py) ----------------------------------------------

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(device_id: str) -> str:
    """A device id as ``lower()`` has it in :data:`DEVICE_TAKEN` (ASCII letters only)."""
    return device_id.translate(_ASCII_LOWER)


def id_list(items: Iterable[Any]) -> str:
    """One SQL parameter holding a list, for ``IN (SELECT value FROM json_each(?))``: bulk
    statements bind the whole list as data, never build SQL from it."""
    return json.dumps(list(items))


DEVICE_TAKEN = (
    "SELECT lower(id) FROM devices WHERE lower(id) IN (SELECT value FROM json_each(?)) LIMIT 1"
)
DEVICE_INSERT = "INSERT INTO devices VALUES (?, ?, ?, 'active', ?, NULL)"
DEVICE = "SELECT id, role, status, enrolled_at, revoked_at FROM devices WHERE id = ?"
DEVICES = "SELECT id, role, status, enrolled_at, revoked_at FROM devices ORDER BY id"
ACTIVE_DEVICE_IDS = "SELECT id FROM devices WHERE status = 'active'"
ACTIVE_PSKS = "SELECT id, psk FROM devices WHERE status = 'active'"
ACTIVE_PSKS_OF = (
    "SELECT id, psk FROM devices WHERE status = 'active' AND id IN (SELECT value FROM json_each(?))"
)
DEVICE_ROLE_STATUS = "SELECT role, status FROM devices WHERE id = ?"
DEVICES_ROLE_STATUS = (
    "SELECT id, role, status FROM devices WHERE id IN (SELECT value FROM json_each(?))"
)
#: Overwrite before clearing; secure_delete zeroes the freed pages.
PSK_OVERWRITE = "UPDATE devices SET psk = zeroblob(length(psk)) WHERE id = ?"
DEVICE_REVOKE = "UPDATE devices SET psk = NULL, status = 'revoked', revoked_at = ? WHERE id = ?"
CERTIFICATES_REVOKE_OF = (
    "UPDATE certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL"
)
PRODUCER_EPOCHS_COMPROMISE = (
    "UPDATE epochs SET state = 'compromised', deactivated_at = ? "
    "WHERE state IN ('active', 'pre-active') AND resource_id IN "
    "(SELECT id FROM resources WHERE producer_id = ?)"
)
LINKED_DEVICES = (
    "SELECT id FROM devices WHERE status = 'active' AND role IN ('producer', 'consumer') "
    "ORDER BY id"
)
#: A link PSK's delivery as (device, proxy id, epoch 0): a proxy id has no '/' and every
#: resource id has one, and epochs start at 1, so they never meet a secret's delivery.
LINK_DELIVERY_INSERT = "INSERT OR IGNORE INTO deliveries VALUES (?, ?, 0, ?)"
CERTIFICATE_INSERT = "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, NULL)"
#: One fixed statement: a NULL parameter matches nothing, so either key (device, kid) selects.
VALID_CERTIFICATE = (
    "SELECT der FROM certificates WHERE (device_id = ? OR kid = ?) "
    "AND revoked_at IS NULL AND not_before <= ? AND ? <= not_after "
    "ORDER BY issued_at DESC LIMIT 1"
)
REVOKED_CERTIFICATES = (
    "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL "
    "AND not_after >= ? ORDER BY revoked_at"
)

# --- resources and epochs (keyring.py) ----------------------------------------------------------

RESOURCE_TAKEN = "SELECT id FROM resources WHERE id IN (SELECT value FROM json_each(?)) LIMIT 1"
RESOURCE_INSERT = "INSERT INTO resources VALUES (?, ?, ?, ?, ?, ?, ?)"
EPOCH_INSERT = (
    "INSERT INTO epochs (resource_id, epoch, state, secret, created_at, activated_at, rotate_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
RESOURCE = "SELECT * FROM resources WHERE id = ?"
RESOURCES = "SELECT * FROM resources ORDER BY id"
RESOURCES_OF = "SELECT * FROM resources WHERE producer_id = ? ORDER BY id"
_LIVE_RESOURCES = (
    "SELECT r.id, r.producer_id, r.content_format, r.profile, r.max_age, r.rotation_period, "
    "r.registered_at, e.epoch FROM resources r "
    "JOIN epochs e ON e.resource_id = r.id AND e.state = 'active' "
)
LIVE_RESOURCES = _LIVE_RESOURCES + "ORDER BY r.id"
LIVE_RESOURCES_OF = _LIVE_RESOURCES + "WHERE r.producer_id = ? ORDER BY r.id"
LIVE_EPOCHS = (
    "SELECT resource_id, epoch FROM epochs WHERE state IN ('active', 'pre-active') "
    "AND resource_id IN (SELECT value FROM json_each(?))"
)
EPOCHS = (
    "SELECT resource_id, epoch, state, created_at, activated_at, deactivated_at "
    "FROM epochs WHERE resource_id = ? ORDER BY epoch"
)
_EPOCH = (
    "SELECT resource_id, epoch, state, created_at, activated_at, deactivated_at, secret "
    "FROM epochs WHERE resource_id = ? AND "
)
#: By the index of active epochs, not through the resource's history.
ACTIVE_EPOCH_ROW = _EPOCH + "state = 'active'"
EPOCH_ROW = _EPOCH + "epoch = ?"
ACTIVE_EPOCH = "SELECT epoch FROM epochs WHERE resource_id = ? AND state = 'active'"
#: No ORDER BY: it would walk the history instead of the index.
LIVE_EPOCH_STATES = (
    "SELECT epoch, state FROM epochs WHERE resource_id = ? AND state IN ('active', 'pre-active')"
)
EPOCH_DEACTIVATE = (
    "UPDATE epochs SET state = 'deactivated', deactivated_at = ? "
    "WHERE resource_id = ? AND epoch = ?"
)
EPOCH_ACTIVATE = (
    "UPDATE epochs SET state = 'active', activated_at = :now, rotate_at = :now + "
    "(SELECT NULLIF(rotation_period, 0) FROM resources WHERE id = :resource) "
    "WHERE resource_id = :resource AND epoch = :epoch"
)
EPOCH_COMPROMISE = (
    "UPDATE epochs SET state = 'compromised', deactivated_at = COALESCE("
    "deactivated_at, ?) WHERE resource_id = ? AND epoch = ?"
)
DUE_ROTATIONS = (
    "SELECT resource_id FROM epochs WHERE state = 'active' AND rotate_at IS NOT NULL "
    "AND rotate_at <= ? ORDER BY resource_id"
)
#: Whether one resource's rotation is still due, read inside the rotation's transaction.
ROTATION_DUE = (
    "SELECT 1 FROM epochs WHERE resource_id = ? AND state = 'active' AND rotate_at IS NOT NULL "
    "AND rotate_at <= ?"
)
#: No ORDER BY (the caller sorts): it would draw SQLite to the primary key, a scan of every
#: epoch, instead of the index of retired epochs.
#: One resource's retired epochs (the console's destroy, for that resource now).
RETIRED_OF = (
    "SELECT epoch FROM epochs WHERE resource_id = ? AND state IN ('deactivated', 'compromised') "
    "ORDER BY epoch"
)
RETIRED_BEFORE = (
    "SELECT resource_id, epoch FROM epochs WHERE state IN ('deactivated', "
    "'compromised') AND deactivated_at <= ?"
)
EPOCH_OVERWRITE = (
    "UPDATE epochs SET secret = zeroblob(length(secret)) WHERE resource_id = ? AND epoch = ?"
)
EPOCH_DESTROY = (
    "UPDATE epochs SET secret = NULL, state = 'destroyed' WHERE resource_id = ? AND epoch = ?"
)

# --- grants and exclusions (access.py) -----------------------------------------------------------

# What a secret request is decided on; two statements, not one with "e.epoch = :epoch OR
# (:epoch IS NULL AND e.state = 'active')", which SQLite can answer only by walking the resource's
# whole history of epochs.
_VIEW = (
    "SELECT r.id, r.producer_id, r.content_format, r.profile, r.max_age, r.rotation_period, "
    "r.registered_at, e.epoch, e.state, e.created_at, e.activated_at, e.deactivated_at, e.secret, "
    "EXISTS (SELECT 1 FROM grants g WHERE g.consumer_id = :device "
    "  AND g.revoked_at IS NULL AND (g.until IS NULL OR :now < g.until) "
    "  AND oscar_match(:resource, g.pattern)), "
    "EXISTS (SELECT 1 FROM exclusions x WHERE x.consumer_id = :device "
    "  AND x.resource_id = :resource AND x.from_epoch <= COALESCE(e.epoch, :epoch, 0) "
    "  AND (x.to_epoch IS NULL OR COALESCE(e.epoch, :epoch, 0) <= x.to_epoch)), "
    "EXISTS (SELECT 1 FROM devices d WHERE d.id = :device AND d.status = 'active') "
    "FROM (SELECT 1) AS one "
    "LEFT JOIN resources r ON r.id = :resource "
    "LEFT JOIN epochs e ON e.resource_id = :resource AND "
)
VIEW_OF_ACTIVE = _VIEW + "e.state = 'active'"
VIEW_OF_EPOCH = _VIEW + "e.epoch = :epoch"
OPEN_EXCLUSIONS_OF = (
    "SELECT DISTINCT consumer_id, resource_id FROM exclusions WHERE to_epoch IS NULL "
    "AND consumer_id IN (SELECT value FROM json_each(?)) "
    "ORDER BY consumer_id, resource_id"
)
GRANT_INSERT = "INSERT INTO grants VALUES (NULL, ?, ?, ?, ?, NULL)"
EXCLUSION_CLOSE = (
    "UPDATE exclusions SET to_epoch = ? WHERE consumer_id = ? AND resource_id = ? "
    "AND to_epoch IS NULL"
)
UNREVOKED_GRANTS = "SELECT id, pattern FROM grants WHERE consumer_id = ? AND revoked_at IS NULL"
GRANT_REVOKE = "UPDATE grants SET revoked_at = ? WHERE id = ?"
#: An expiry, if the grant is still live and past its ``until`` (one row changed, else none).
GRANT_EXPIRE = (
    "UPDATE grants SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL "
    "AND until IS NOT NULL AND until <= :now"
)
LIVE_PATTERNS = (
    "SELECT pattern FROM grants WHERE consumer_id = ? AND revoked_at IS NULL "
    "AND (until IS NULL OR ? < until)"
)
ACTIVE_RESOURCE_IDS = (
    "SELECT DISTINCT resource_id FROM epochs WHERE state = 'active' ORDER BY resource_id"
)
EXCLUSION_INSERT = "INSERT INTO exclusions VALUES (?, ?, ?, NULL, ?)"
EXPIRED_GRANTS = (
    "SELECT id, consumer_id, pattern FROM grants WHERE revoked_at IS NULL "
    "AND until IS NOT NULL AND until <= ? ORDER BY id"
)
EXCLUDED_RESOURCES = (
    "SELECT DISTINCT resource_id FROM exclusions WHERE consumer_id = ? AND to_epoch IS NULL"
)
GRANTS = "SELECT * FROM grants ORDER BY id"
GRANTS_OF = "SELECT * FROM grants WHERE consumer_id = ? ORDER BY id"
#: An upper bound written out, not "(:high IS NULL OR r.id < :high)": SQLite uses only the lower
#: one of that, and would scan every id above it.
READABLE_IN_RANGE = (
    "SELECT r.id, r.producer_id, r.content_format, r.profile, r.max_age, r.rotation_period, "
    "r.registered_at, e.epoch FROM resources r "
    "JOIN epochs e ON e.resource_id = r.id AND e.state = 'active' "
    "WHERE r.id >= :low AND r.id < :high AND oscar_match(r.id, :pattern) "
    "AND NOT EXISTS (SELECT 1 FROM exclusions x WHERE x.consumer_id = :consumer "
    "  AND x.resource_id = r.id AND x.from_epoch <= e.epoch "
    "  AND (x.to_epoch IS NULL OR e.epoch <= x.to_epoch))"
)
EXCLUSION_COVERS = (
    "SELECT 1 FROM exclusions WHERE consumer_id = ? AND resource_id = ? "
    "AND from_epoch <= ? AND (to_epoch IS NULL OR ? <= to_epoch)"
)


def prefix_range(pattern: str) -> tuple[str, str | bytes]:
    """Bounds [low, high) of the ids an ``fnmatch`` pattern can match, for
    :data:`READABLE_IN_RANGE`: its literal prefix, and that prefix with its last character
    incremented. Without an ASCII prefix, every id: the empty blob as the upper bound, which
    SQLite sorts after all text."""
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
    prefix = pattern[:cut]
    if not prefix or not prefix.isascii():
        return "", b""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


# --- deliveries (deliveries.py) ------------------------------------------------------------------

#: The deliveries not yet in the table, inserted from one JSON list of [device, resource, epoch,
#: at]; returns those inserted.
DELIVERIES_INSERT_NEW = (
    "INSERT OR IGNORE INTO deliveries SELECT value ->> 0, value ->> 1, value ->> 2, "
    "value ->> 3 FROM json_each(?) RETURNING device_id, resource_id, epoch"
)

# --- the audit chain (audit.py) ------------------------------------------------------------------

LAST_RECORD = "SELECT seq, chain FROM audit ORDER BY seq DESC LIMIT 1"
CHECKPOINT = "SELECT seq, chain FROM audit_checkpoint WHERE id = 1"
CHECKPOINT_SEQ = "SELECT seq FROM audit_checkpoint WHERE id = 1"
RECORD_INSERT = "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
HEAD_SET = (
    "INSERT INTO meta VALUES ('audit_head', ?) "
    "ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)
RECORDS_AFTER = (
    "SELECT seq, at, actor, action, subject, result, detail FROM audit WHERE seq > ? ORDER BY seq"
)
FIRST_KEPT = "SELECT seq FROM audit WHERE seq > ? AND seq <= ? AND at >= ? ORDER BY seq LIMIT 1"
PAST_LAST = "SELECT MIN(MAX(seq), ?) + 1 FROM audit"
CHAIN_AT = "SELECT chain FROM audit WHERE seq = ?"
CHECKPOINT_SET = (
    "INSERT INTO audit_checkpoint VALUES (1, ?, ?, ?, ?) ON CONFLICT(id) DO "
    "UPDATE SET seq = excluded.seq, chain = excluded.chain, at = excluded.at, "
    "mac = excluded.mac"
)
PRUNED_LEFT = (
    "SELECT MIN(a.seq), c.seq FROM audit a, audit_checkpoint c WHERE c.id = 1 AND a.seq <= c.seq"
)
RECORDS_DELETE = "DELETE FROM audit WHERE seq BETWEEN ? AND ?"
# The verification's snapshot.
CHECKPOINT_ROW = "SELECT seq, chain, at, mac FROM audit_checkpoint WHERE id = 1"
CHAINED_RECORDS_AFTER = (
    "SELECT seq, at, actor, action, subject, result, detail, chain FROM audit "
    "WHERE seq > ? ORDER BY seq"
)
HEAD = "SELECT value FROM meta WHERE key = 'audit_head'"
#: The newest records at or before a seq, newest first (the console's pages of the log).
RECORDS_BEFORE = (
    "SELECT seq, at, actor, action, subject, result, detail FROM audit WHERE seq <= ? "
    "ORDER BY seq DESC LIMIT ?"
)

# --- the admin console's tokens (admins.py) -----------------------------------------------------

ADMIN = "SELECT name, created_at, expires_at, revoked_at FROM admins WHERE name = ?"
ADMINS = "SELECT name, created_at, expires_at, revoked_at FROM admins ORDER BY name"
#: A new token under a name: a row of its own, or the row of a revoked or expired token replaced.
ADMIN_SET = (
    "INSERT INTO admins VALUES (?, ?, ?, ?, NULL) ON CONFLICT(name) DO UPDATE SET "
    "token_hash = excluded.token_hash, created_at = excluded.created_at, "
    "expires_at = excluded.expires_at, revoked_at = NULL"
)
ADMIN_OF_HASH = "SELECT name, created_at, expires_at, revoked_at FROM admins WHERE token_hash = ?"
ADMIN_REVOKE = "UPDATE admins SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL"

# --- the instances' heartbeats (instances.py) ----------------------------------------------------

INSTANCE_SET = (
    "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
    "seen_at = excluded.seen_at, every = excluded.every, facts = excluded.facts"
)
INSTANCES_PRUNE = "DELETE FROM instances WHERE seen_at < ?"
INSTANCE_DELETE = "DELETE FROM instances WHERE id = ?"
INSTANCES = (
    "SELECT id, address, host, pid, started_at, seen_at, every, facts FROM instances "
    "ORDER BY address, started_at, id"
)

# --- copying the database to PostgreSQL (migrate.py) ---------------------------------------------

#: The schema's tables (SQLite's own ``sqlite_*`` aside), to check that a copy takes every one.
SCHEMA_TABLES = (
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite!_%' ESCAPE '!' "
    "ORDER BY name"
)
#: A table's columns, in the order the schema declares them.
TABLE_COLUMNS = "SELECT name FROM pragma_table_info(?) ORDER BY cid"


def table_rows(table: str, columns: Sequence[str]) -> str:
    """Every row of ``table`` (a name of the schema, never input), its ``columns`` in order."""
    return f"SELECT {', '.join(columns)} FROM {table}"  # noqa: S608 (the schema's names)


def count_rows(table: str) -> str:
    """How many rows ``table`` (a name of the schema, never input) holds."""
    return f"SELECT count(*) FROM {table}"  # noqa: S608 (the schema's names)
