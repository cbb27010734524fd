"""``oscar-as audit``: print the audit log, verify its chain (against a head kept elsewhere),
print its head, prune it behind a checkpoint.

What it does not do: the chain itself (:mod:`authz_server.store.audit`).
"""

from __future__ import annotations

import argparse
import json

from .common import (
    AUDIT_FIELDS,
    Refused,
    UsageError,
    iso,
    pick,
    print_json,
    printable,
    run_on_store,
    time_arg,
)

__all__ = ["cmd_audit", "parse_head"]


def cmd_audit(args: argparse.Namespace, now: int) -> int:
    """Print the audit log (one record a line, or a JSON list), or with --verify check its hash
    chain: exit status 0 if intact, 1 naming the first record that was altered or removed. The
    chain cannot show a log cut back to an earlier consistent state by someone who can write the
    whole state directory: print --head now and then, keep it elsewhere, and --verify --expect it.
    'audit prune --before TIME' (or --older-than DAYS) deletes the oldest records dated before
    TIME behind a MACed checkpoint, from which --verify goes on verifying; it works while the
    server runs. Repeated denials are one record per device, reason and minute, with a count.
    """
    if args.what == "prune":
        return _prune_audit(args, now)
    if args.before is not None or args.older_than is not None:
        raise UsageError("--before and --older-than go with 'audit prune'")
    if args.head:
        seq, chain = run_on_store(args, lambda store: store.audit_head())
        print(f"{seq}:{chain.hex()}")
        return 0
    if args.expect is not None and not args.verify:
        raise UsageError("--expect goes with --verify")
    if args.verify:
        intact, summary = run_on_store(args, lambda store: store.verify_audit(args.expect))
        if not intact:
            raise Refused(f"the audit log is broken: {summary}")
        print(f"audit log intact: {summary}")
        return 0
    records = run_on_store(args, lambda store: store.audit_records(args.since))
    if args.json:
        print_json([pick(r, AUDIT_FIELDS) for r in records])
        return 0
    for r in records:
        detail = json.dumps(r.detail, sort_keys=True, separators=(",", ":"))  # ASCII-escaped
        print(
            printable(f"{r.seq} {iso(r.at)} {r.actor} {r.action} {r.subject} {r.result} ") + detail
        )
    return 0


def _prune_audit(args: argparse.Namespace, now: int) -> int:
    if args.verify or args.head or args.expect is not None or args.json or args.since:
        raise UsageError("'audit prune' takes --before or --older-than only")
    if (args.before is None) == (args.older_than is None):
        raise UsageError("'audit prune' needs one of --before TIME and --older-than DAYS")
    if args.before is not None:
        before = time_arg(args.before, now, "--before", future=False)
    else:
        before = now - args.older_than * 86_400
    through, deleted = run_on_store(args, lambda store: store.prune_audit(before, now))
    if not through:
        print(f"nothing to prune: no record before {iso(before)} that is not pruned already")
        return 0
    print(
        f"pruned the records up to {through} (dated before {iso(before)}; {deleted} deleted "
        f"now); the log is verified from the checkpoint at record {through}"
    )
    return 0


def parse_head(text: str) -> tuple[int, bytes]:
    seq, sep, chain = text.partition(":")
    try:
        if not sep or not seq.isdigit() or len(chain) != 64:
            raise ValueError
        return int(seq), bytes.fromhex(chain)
    except ValueError:
        raise argparse.ArgumentTypeError("a head is SEQ:CHAIN as printed by --head") from None
