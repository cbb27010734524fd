"""``oscar-as migrate``: copy a state directory's SQLite database to PostgreSQL, check the copy,
and make the state directory use it.

What it does not do: the copy and its checks (:mod:`authz_server.store.migrate`).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from ..store import (
    DATABASE_NAME,
    DB_NAME,
    MASTER_KEY_NAME,
    StoreError,
    check_database_url,
    redacted,
)
from .common import UsageError

__all__ = ["cmd_migrate"]


def cmd_migrate(args: argparse.Namespace, now: int) -> int:
    """Copy the AS of --state (its SQLite file, as.db) to the empty PostgreSQL database --to
    names, in one transaction, read from one snapshot: every table verbatim (secrets stay
    encrypted under the master key, which stays in the state directory). Row counts and the
    audit chain are checked on both sides before the commit and again after it; then the state
    directory records the URL (database.url, mode 0600) and every command and serve with --state
    use PostgreSQL. as.db is left as it is, a fallback copy. Refuses a target that holds an AS
    (of any schema version), and a directory already on PostgreSQL; a failure leaves the target
    empty and the directory on SQLite. Stop the AS first: one that writes during the copy makes
    it fail.
    """
    state: Path = args.state
    try:
        url = check_database_url(args.to)
    except StoreError as exc:
        raise UsageError(f"--to: {exc}") from None
    from ..store.migrate import migrate  # asyncpg only for this command

    copied = asyncio.run(migrate(state, url))
    rows = ", ".join(f"{table} {count}" for table, count in copied.rows.items())
    seq, chain = copied.head
    print(f"copied {state / DB_NAME} to {redacted(url)} in one transaction, and checked it")
    print(f"rows, the same on both sides: {rows} ({copied.total} in all)")
    print(f"audit log intact on both sides: {copied.audit}; head {seq}:{chain.hex()}")
    print(
        f"{state / DATABASE_NAME} names it now (mode 0600): every oscar-as command and serve "
        f"with --state {state} use PostgreSQL"
    )
    print(
        f"{state / DB_NAME} is kept unchanged as a fallback copy (unused while "
        f"{DATABASE_NAME} exists); the master key stays in {state / MASTER_KEY_NAME}"
    )
    return 0
