"""``oscar-as admin-token``: issue a named admin console token (printed once), list the admins,
revoke one. The token is stored only as a keyed hash (:mod:`authz_server.store.admins`); every
issue and revocation is audited.

What it does not do: log anyone in (the console does, :mod:`authz_server.admin`).
"""

from __future__ import annotations

import argparse
import sys

from ..store import Store
from .common import iso, print_json, printable, run_on_store, table, time_arg

__all__ = ["cmd_admin_token"]


def cmd_admin_token(args: argparse.Namespace, now: int) -> int:
    """Issue a token for the admin console under --name NAME (printed once on stdout; only a
    keyed hash of it is stored), valid until --expires TIME or until revoked; --list the
    admins and their tokens' status; --revoke NAME. A name holds one live token: revoke it
    before issuing another. Audited.
    """
    if args.list:
        admins = run_on_store(args, lambda store: store.admin_list())
        rows = [
            {
                "name": a.name,
                "created_at": a.created_at,
                "expires_at": a.expires_at,
                "revoked_at": a.revoked_at,
                "status": a.status(now),
            }
            for a in admins
        ]
        if args.json:
            print_json(rows)
        else:
            header = ("name", "status", "created_at", "expires_at", "revoked_at")
            table(
                header,
                [[r[h] for h in header] for r in rows],
                times=("created_at", "expires_at", "revoked_at"),
            )
        return 0
    if args.revoke is not None:
        name = args.revoke
        run_on_store(args, lambda store: store.revoke_admin_token(name, now))
        print(f"revoked the admin token of {printable(name)}")
        return 0
    expires = None if args.expires is None else time_arg(args.expires, now, "--expires")
    name = args.name

    async def body(store: Store) -> str:
        return await store.issue_admin_token(name, expires, now)

    token = run_on_store(args, body)
    sys.stdout.write(token + "\n")
    sys.stdout.flush()
    until = iso(expires) if expires is not None else "revoked"
    print(
        f"admin token for {name}, valid until {until}; shown once, stored hashed",
        file=sys.stderr,
    )
    return 0
