"""``oscar-as``: the AS's admin tool and the entry point of its server.

Every command works on a state directory (``--state``): ``init`` makes one; ``enroll``, ``grant``,
``revoke``, ``rotate``, ``compromise``, ``destroy``, ``parts --declare`` and ``set-as-uris``
change it; ``migrate``
moves its database from SQLite to PostgreSQL; ``devices``, ``resources``, ``grants`` and
``audit`` read it; ``admin-token`` issues, lists and revokes the admin console's tokens;
``serve`` runs the server (:mod:`authz_server.server`, imported only by that
command). The admin commands talk to the database directly, so they work whether or not a server
is running; the server notices their changes through the store's change counter.

Exit status: 0 success, 1 refused by the state (no such device, resource, grant or epoch; the
thing exists already; a broken audit chain; for ``serve``, its port held by another process), 2
bad usage or bad input (malformed ids, patterns or times; a missing, corrupt or foreign state
directory; a wrong or exposed master key). Every failure is one line on stderr,
``oscar-as <command>: error: ...``; exceptions are mapped to it in one place, :func:`main`. No
output ever holds a PSK or an access secret: the only place a PSK leaves the AS is the credentials
bundle that ``enroll`` writes (mode 0600, or stdout with ``--out -``).

The package: this module (the parser and :func:`main`, the one place exceptions become exit
statuses), :mod:`.common` (argument types, store access, terminal output), :mod:`.enrolment`
(``init``, ``enroll``, ``set-as-uris``), :mod:`.keys` (``grant``, ``revoke``, ``rotate``,
``compromise``, ``destroy`` and the listings), :mod:`.parts` (``parts``, and ``--part`` of
``grant``, ``revoke``, ``grants``), :mod:`.audit` (``audit``), :mod:`.admins`
(``admin-token``), :mod:`.migrate`
(``migrate``), :mod:`.serve` (``serve``).

What it does not do: decide policy (that is :mod:`authz_server.store` and the server), or speak
the network (only ``serve`` does, through :mod:`authz_server.server`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oscar import __version__
from oscar_io.clikit import OneLineParser, add_logging_arguments, fail, parse_args

from ..envelope import MasterKeyError, VaultError
from ..store import ROLES, Conflict, NoSuchRecord, StoreError
from .admins import cmd_admin_token
from .audit import cmd_audit, parse_head
from .common import DEFAULT_AS_URI, PROG, Handler, Refused, UsageError, days, not_negative, positive
from .enrolment import cmd_enroll, cmd_init, cmd_set_as_uris
from .keys import (
    cmd_compromise,
    cmd_destroy,
    cmd_devices,
    cmd_grant,
    cmd_grants,
    cmd_resources,
    cmd_revoke,
    cmd_rotate,
)
from .migrate import cmd_migrate
from .parts import cmd_parts
from .serve import SERVE_DEFAULTS, cmd_serve

__all__ = ["SERVE_DEFAULTS", "UsageError", "build_parser", "main"]


# --- parser and entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``oscar-as`` argument parser, one subcommand per operation."""
    parser = OneLineParser(
        prog=PROG,
        description="OSCAR Authorization Server: admin commands on a state directory, and serve.",
        epilog="exit status: 0 success, 1 refused by the state, 2 bad usage or input",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, handler: Handler, summary: str, *, state_required: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=handler.__doc__, allow_abbrev=False
        )
        sub.set_defaults(handler=handler)
        sub.add_argument(
            "--state",
            metavar="DIR",
            type=Path,
            required=state_required,
            help="the AS state directory" + ("" if state_required else " (default: from --config)"),
        )
        sub.add_argument(
            "--database",
            metavar="URL",
            help=(
                "the AS database, postgresql://USER@HOST:PORT/DB (init records it in the state "
                "directory) (default: the one recorded there, else SQLite in it)"
            ),
        )
        return sub

    def listing(name: str, handler: Handler, summary: str) -> argparse.ArgumentParser:
        sub = command(name, handler, summary)
        sub.add_argument("--json", action="store_true", help="a JSON list")
        return sub

    init = command("init", cmd_init, "make a new state directory")
    init.add_argument(
        "--as-uri",
        metavar="URI",
        action="append",
        help=f"an AS instance, repeatable, the preferred first (default: {DEFAULT_AS_URI})",
    )

    enroll = command("enroll", cmd_enroll, "enroll a device, write its credentials")
    enroll.add_argument("--role", choices=ROLES, required=True)
    enroll.add_argument("--id", metavar="ID", required=True, help="device id and PSK identity")
    enroll.add_argument(
        "--out", metavar="FILE", required=True, help="credentials bundle (mode 0600), - for stdout"
    )
    enroll.add_argument(
        "--as-uri",
        metavar="URI",
        action="append",
        help="an AS instance, repeatable (default: those given to init or set-as-uris)",
    )
    enroll.add_argument("--force", action="store_true", help="replace an existing FILE")

    uris = command("set-as-uris", cmd_set_as_uris, "change the AS instances new bundles list")
    uris.add_argument(
        "--as-uri",
        metavar="URI",
        action="append",
        required=True,
        help="an AS instance, repeatable, the preferred first",
    )

    serve = command("serve", cmd_serve, "run the AS", state_required=False)
    serve.add_argument(
        "--config", metavar="FILE", type=Path, help="TOML; flags override it (default: none)"
    )
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="the DTLS address (default: from --config)"
    )

    def tunable(flag: str, metavar: str, kind: Callable[[str], Any], text: str) -> None:
        default = SERVE_DEFAULTS[flag[2:].replace("-", "_")]
        serve.add_argument(flag, metavar=metavar, type=kind, help=f"{text} (default: {default})")

    tunable("--retention", "S", not_negative, "keep deactivated epochs S seconds")
    tunable("--rate", "R", positive(float), "requests/s per device")
    tunable("--burst", "B", positive(int), "rate limit burst")
    tunable("--max-connections", "N", positive(int), "DTLS connections at most")
    tunable("--tick", "S", positive(float), "how often to look for admin changes")
    tunable("--crl-validity", "S", positive(int), "CRL lifetime")
    tunable("--min-rotation-period", "S", positive(int), "shortest rotation period allowed")
    tunable(
        "--audit-retention",
        "DAYS",
        days,
        "prune audit records older than DAYS days (hourly, by the AS itself; decimals allowed; "
        "0 keeps every record)",
    )
    tunable(
        "--audit-prune-every",
        "S",
        positive(float),
        "how often to apply --audit-retention, in seconds (at most 86400)",
    )
    tunable(
        "--heartbeat",
        "S",
        positive(float),
        "how often this instance records its health in the database, for the console (at most 60)",
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; needs the ops "
        "extra; plain HTTP: loopback or a management network)",
    )
    serve.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="serve the admin console at https://HOST:PORT/, a bare PORT on 127.0.0.1 (needs the "
        "ops extra; log in with a token of admin-token) (default: off)",
    )
    serve.add_argument(
        "--metrics-per-resource",
        action="store_true",
        default=None,
        help="label per-resource metrics with resource names (default: off)",
    )
    add_logging_arguments(serve, default=None)
    for action in serve._actions:  # the one flag without a value: say what its absence means
        if action.dest == "log_json" and action.help and "default" not in action.help:
            action.help += " (default: off, unless --config says log_json = true)"

    grant = command("grant", cmd_grant, "grant a consumer resources")
    grant.add_argument("--consumer", metavar="ID", required=True)
    grant.add_argument("--resource", metavar="PATTERN", required=True, help="e.g. sensor-1/*")
    grant.add_argument(
        "--until", metavar="TIME", help="seconds since 1970 or ISO 8601 UTC (default: no end)"
    )
    grant.add_argument("--part", metavar="NAME", help="only this encrypted part of --resource RID")

    revoke = command("revoke", cmd_revoke, "revoke grants or a device")
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--consumer", metavar="ID", help="revoke this consumer's grants")
    who.add_argument("--device", metavar="ID", help="revoke the device itself")
    revoke.add_argument("--resource", metavar="PATTERN", help="only the grant with this pattern")
    revoke.add_argument("--part", metavar="NAME", help="only the grant of this part of --resource")

    parts = listing("parts", cmd_parts, "declare or list a resource's parts")
    parts.add_argument("--resource", metavar="RID", required=True)
    parts.add_argument(
        "--declare", metavar="NAME=KIND", nargs="+", help="plain or encrypted, in order"
    )

    rotate = command("rotate", cmd_rotate, "rotate a resource's access secret")
    what = rotate.add_mutually_exclusive_group(required=True)
    what.add_argument("--resource", metavar="RID")
    what.add_argument("--due", action="store_true", help="every resource whose rotation is due")
    rotate.add_argument("--part", metavar="NAME", help="only this encrypted part of --resource")

    compromise = command("compromise", cmd_compromise, "mark an epoch compromised")
    compromise.add_argument("--resource", metavar="RID", required=True)
    compromise.add_argument("--epoch", metavar="N", type=positive(int), help="(default: active)")
    compromise.add_argument("--part", metavar="NAME", help="an epoch of this encrypted part")

    destroy = command("destroy", cmd_destroy, "destroy secrets past their retention")
    destroy.add_argument("--retention", metavar="S", type=not_negative, required=True)

    migrate = commands.add_parser(
        "migrate",
        help="copy the SQLite database to PostgreSQL and use it",
        description=cmd_migrate.__doc__,
        allow_abbrev=False,
    )
    migrate.set_defaults(handler=cmd_migrate)
    migrate.add_argument(
        "--state", metavar="DIR", type=Path, required=True, help="the AS state directory"
    )
    migrate.add_argument(
        "--to",
        metavar="URL",
        required=True,
        help="an empty PostgreSQL database, postgresql://USER@HOST:PORT/DB",
    )

    admin = listing("admin-token", cmd_admin_token, "issue, list or revoke admin console tokens")
    which = admin.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", metavar="NAME", help="issue a token for this admin (printed once)")
    which.add_argument("--list", action="store_true", help="list the admins")
    which.add_argument("--revoke", metavar="NAME", help="revoke this admin's token")
    admin.add_argument(
        "--expires", metavar="TIME", help="seconds since 1970 or ISO 8601 UTC (default: no end)"
    )

    listing("devices", cmd_devices, "list devices")
    listing("resources", cmd_resources, "list resources and their epochs")
    grants = listing("grants", cmd_grants, "list grants")
    grants.add_argument("--consumer", metavar="ID", help="only this consumer's")
    audit = listing("audit", cmd_audit, "print, verify or prune the audit log")
    audit.add_argument(
        "what", nargs="?", choices=("prune",), help="prune: delete old records (see --before)"
    )
    audit.add_argument(
        "--since", metavar="SEQ", type=not_negative, default=0, help="after SEQ (default: 0)"
    )
    audit.add_argument("--verify", action="store_true", help="check the hash chain")
    audit.add_argument(
        "--head",
        action="store_true",
        help="print the last record's SEQ:CHAIN, to keep somewhere the AS cannot write",
    )
    audit.add_argument(
        "--expect",
        metavar="SEQ:CHAIN",
        type=parse_head,
        help="with --verify: the log must still hold this head, printed earlier by --head",
    )
    audit.add_argument(
        "--before",
        metavar="TIME",
        help="with prune: records dated before TIME (seconds since 1970 or ISO 8601 UTC)",
    )
    audit.add_argument(
        "--older-than",
        metavar="DAYS",
        type=positive(int),
        help="with prune: records older than DAYS days",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit status (see the module docstring)."""
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    prog = f"{PROG} {args.command}"
    handler: Handler = args.handler
    try:
        return handler(args, int(time.time()))
    except (NoSuchRecord, Conflict, Refused) as exc:
        return fail(prog, str(exc), 1)
    except (UsageError, StoreError, MasterKeyError, VaultError, ValueError) as exc:
        return fail(prog, str(exc), 2)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return fail(prog, f"{where}{exc.strerror or type(exc).__name__}", 2)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback: it could show secret values
        return fail(prog, f"internal error ({type(exc).__name__})", 2)
