"""The schema step of a resource's parts (version 7), in both dialects, and its tables' columns:
``parts`` (a resource's declared parts, in order, plain or encrypted), ``part_epochs`` (each
encrypted part's epochs and their secrets, encrypted by the envelope as the resources' are),
``part_grants`` (a consumer granted one part of one resource) and ``part_exclusions`` (from which
epoch of a part a revoked consumer is shut out).

What this module does not do: run anything, or hold the statements (:mod:`.parts_sql`); it
imports nothing, so that both dialects' migration lists can take their step from it.
"""

from __future__ import annotations

__all__ = ["POSTGRES_MIGRATION", "SQLITE_MIGRATION", "TABLES"]

#: Version 7 on SQLite.
SQLITE_MIGRATION = """
    CREATE TABLE parts (
        resource_id TEXT NOT NULL REFERENCES resources(id),
        name TEXT NOT NULL,
        position INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('plain', 'encrypted')),
        PRIMARY KEY (resource_id, name)
    );
    CREATE TABLE part_epochs (
        resource_id TEXT NOT NULL,
        part TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('pre-active', 'active', 'deactivated', 'compromised', 'destroyed')),
        secret BLOB,
        created_at INTEGER NOT NULL,
        activated_at INTEGER,
        deactivated_at INTEGER,
        rotate_at INTEGER,
        PRIMARY KEY (resource_id, part, epoch),
        FOREIGN KEY (resource_id, part) REFERENCES parts(resource_id, name)
    );
    CREATE INDEX part_epochs_live ON part_epochs(resource_id, part, state)
        WHERE state IN ('active', 'pre-active');
    CREATE INDEX part_epochs_due ON part_epochs(rotate_at)
        WHERE state = 'active' AND rotate_at IS NOT NULL;
    CREATE TABLE part_grants (
        consumer_id TEXT NOT NULL REFERENCES devices(id),
        resource_id TEXT NOT NULL,
        part TEXT NOT NULL,
        granted_at INTEGER NOT NULL,
        revoked_at INTEGER,
        FOREIGN KEY (resource_id, part) REFERENCES parts(resource_id, name)
    );
    CREATE INDEX part_grants_consumer ON part_grants(consumer_id, resource_id, part);
    CREATE TABLE part_exclusions (
        consumer_id TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        part TEXT NOT NULL,
        from_epoch INTEGER NOT NULL,
        to_epoch INTEGER,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX part_exclusions_lookup ON part_exclusions(consumer_id, resource_id, part);
    """

#: Version 7 on PostgreSQL (the same tables; "C" collation, BIGINT, BYTEA).
POSTGRES_MIGRATION = """
    CREATE TABLE parts (
        resource_id TEXT COLLATE "C" NOT NULL REFERENCES resources(id),
        name TEXT COLLATE "C" NOT NULL,
        position BIGINT NOT NULL,
        kind TEXT COLLATE "C" NOT NULL CHECK (kind IN ('plain', 'encrypted')),
        PRIMARY KEY (resource_id, name)
    );
    CREATE TABLE part_epochs (
        resource_id TEXT COLLATE "C" NOT NULL,
        part TEXT COLLATE "C" NOT NULL,
        epoch BIGINT NOT NULL,
        state TEXT COLLATE "C" NOT NULL CHECK (state IN
            ('pre-active', 'active', 'deactivated', 'compromised', 'destroyed')),
        secret BYTEA,
        created_at BIGINT NOT NULL,
        activated_at BIGINT,
        deactivated_at BIGINT,
        rotate_at BIGINT,
        PRIMARY KEY (resource_id, part, epoch),
        FOREIGN KEY (resource_id, part) REFERENCES parts(resource_id, name)
    );
    CREATE INDEX part_epochs_live ON part_epochs(resource_id, part, state)
        WHERE state IN ('active', 'pre-active');
    CREATE INDEX part_epochs_due ON part_epochs(rotate_at)
        WHERE state = 'active' AND rotate_at IS NOT NULL;
    CREATE TABLE part_grants (
        consumer_id TEXT COLLATE "C" NOT NULL REFERENCES devices(id),
        resource_id TEXT COLLATE "C" NOT NULL,
        part TEXT COLLATE "C" NOT NULL,
        granted_at BIGINT NOT NULL,
        revoked_at BIGINT,
        FOREIGN KEY (resource_id, part) REFERENCES parts(resource_id, name)
    );
    CREATE INDEX part_grants_consumer ON part_grants(consumer_id, resource_id, part);
    CREATE TABLE part_exclusions (
        consumer_id TEXT COLLATE "C" NOT NULL,
        resource_id TEXT COLLATE "C" NOT NULL,
        part TEXT COLLATE "C" NOT NULL,
        from_epoch BIGINT NOT NULL,
        to_epoch BIGINT,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX part_exclusions_lookup ON part_exclusions(consumer_id, resource_id, part);
    """

#: The tables of version 7 and their columns, for ``oscar-as migrate`` (parents first).
TABLES: dict[str, tuple[str, ...]] = {
    "parts": ("resource_id", "name", "position", "kind"),
    "part_epochs": (
        *("resource_id", "part", "epoch", "state", "secret"),
        *("created_at", "activated_at", "deactivated_at", "rotate_at"),
    ),
    "part_grants": ("consumer_id", "resource_id", "part", "granted_at", "revoked_at"),
    "part_exclusions": (
        *("consumer_id", "resource_id", "part", "from_epoch", "to_epoch", "created_at"),
    ),
}
