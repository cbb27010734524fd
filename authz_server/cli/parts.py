"""The commands of a resource's parts: ``oscar-as parts`` (declare a registered resource's parts,
or list them with their epochs), and the ``--part`` forms of ``grant``, ``revoke``, ``rotate``,
``compromise`` and ``grants`` (one encrypted part of one resource).

What it does not do: decide policy (the store does, in one transaction per command,
:mod:`authz_server.store.parts`); print a secret (the listings name epochs and states only).
"""

from __future__ import annotations

import argparse
from typing import Any

from oscar.names import require_device_id, require_resource_id
from oscar.parts import is_part_name

from ..store import Store
from ..store.parts import KINDS
from .common import UsageError, epoch_runs, listed, print_json, printable, run_on_store, table

__all__ = [
    "cmd_parts",
    "compromise_part",
    "grant_part",
    "part_grants",
    "revoke_part",
    "rotate_part",
]

PART_GRANT_FIELDS = ("consumer_id", "resource_id", "part", "granted_at", "revoked_at")


def _part(text: str) -> str:
    if not is_part_name(text):
        raise UsageError("a part name is 1 to 32 characters of A-Z a-z 0-9 . _ -, first alnum")
    return text


def _declared(items: list[str]) -> list[tuple[str, str]]:
    """``NAME=plain`` / ``NAME=encrypted`` items as (name, kind)."""
    out = []
    for item in items:
        name, sep, kind = item.partition("=")
        if not sep or kind not in KINDS:
            raise UsageError("a part is NAME=plain or NAME=encrypted")
        out.append((_part(name), kind))
    return out


def cmd_parts(args: argparse.Namespace, now: int) -> int:
    """Declare the parts of a registered resource that has none (``--declare NAME=KIND ...``,
    in order; at least one encrypted), or list them with their epochs' states."""
    resource_id = require_resource_id(args.resource)
    if args.declare:
        declared = _declared(args.declare)
        run_on_store(
            args, lambda store: store.parts.declare(resource_id, declared, now, actor="admin")
        )
        print(f"declared parts of {resource_id}: {listed([f'{n}={k}' for n, k in declared])}")
        return 0

    async def body(store: Store) -> list[dict[str, Any]]:
        epochs = await store.parts.epochs(resource_id)
        return [
            {
                "name": name,
                "kind": kind,
                "epochs": [[e.epoch, e.state] for e in epochs if e.part == name],
            }
            for name, kind in await store.parts.parts(resource_id)
        ]

    found = run_on_store(args, body)
    if args.json:
        print_json(found)
    else:
        rows = [[p["name"], p["kind"], epoch_runs([tuple(e) for e in p["epochs"]])] for p in found]
        table(("part", "kind", "epochs"), rows)
    return 0


def grant_part(args: argparse.Namespace, now: int) -> int:
    """``grant --consumer C --resource R --part P``: C may read part P of R (only P)."""
    if args.until is not None:
        raise UsageError("--until goes with a whole-resource grant, not --part")
    consumer = require_device_id(args.consumer, "consumer id")
    resource_id = require_resource_id(args.resource)
    part = _part(args.part)
    rotated = run_on_store(args, lambda store: store.parts.grant(consumer, resource_id, part, now))
    print(f"granted {consumer} {resource_id} part {part}")
    if rotated:
        print(f"rotated: {printable(resource_id)}#{printable(part)}")
    return 0


def revoke_part(args: argparse.Namespace, now: int) -> int:
    """``revoke --consumer C --resource R --part P``: P rotates (unless a whole-resource grant
    still lets C read it); the other parts stay."""
    if args.device is not None:
        raise UsageError("--part goes with --consumer, not --device")
    if args.resource is None:
        raise UsageError("--part needs --resource RID")
    consumer = require_device_id(args.consumer, "consumer id")
    resource_id = require_resource_id(args.resource)
    part = _part(args.part)
    rotated = run_on_store(args, lambda store: store.parts.revoke(consumer, resource_id, part, now))
    done = [f"{resource_id}#{part}"] if rotated else []
    print(f"revoked {consumer}'s grant of {resource_id} part {part}; rotated: {listed(done)}")
    return 0


def rotate_part(args: argparse.Namespace, now: int) -> int:
    """``rotate --resource R --part P``: rotate that encrypted part now (the others stay)."""
    if args.resource is None:
        raise UsageError("--part needs --resource RID")
    resource_id = require_resource_id(args.resource)
    part = _part(args.part)
    epoch = run_on_store(
        args, lambda store: store.parts.rotate(resource_id, part, now, actor="admin")
    )
    print(f"rotated {resource_id} part {part}: epoch {epoch} active")
    return 0


def compromise_part(args: argparse.Namespace, now: int) -> int:
    """``compromise --resource R --part P [--epoch N]``: that part's epoch (the active one by
    default) compromised, the part moved on at once; the other parts stay."""
    resource_id = require_resource_id(args.resource)
    part = _part(args.part)
    epoch, active = run_on_store(
        args,
        lambda store: store.parts.compromise(resource_id, part, args.epoch, now, actor="admin"),
    )
    print(f"{resource_id} part {part}: epoch {epoch} compromised; epoch {active} active")
    return 0


def part_grants(args: argparse.Namespace, consumer: str | None) -> list[dict[str, Any]]:
    """The part grants (revoked ones included), for ``oscar-as grants``."""
    rows = run_on_store(args, lambda store: store.parts.grants(consumer))
    grants = []
    for row in rows:
        grant = dict(zip(PART_GRANT_FIELDS, row, strict=True))
        grant["status"] = "revoked" if grant["revoked_at"] is not None else "active"
        grants.append(grant)
    return grants
