"""The commands that change who may read what: ``grant``, ``revoke``, ``rotate``, ``compromise``,
``destroy``; and the listings of devices, resources and grants.

What it does not do: decide policy (the store does, in one transaction per command).
"""

from __future__ import annotations

import argparse
from typing import Any

from oscar.names import require_device_id, require_resource_id

from ..store import NoSuchRecord, Store
from .common import (
    DEVICE_FIELDS,
    EPOCH_FIELDS,
    GRANT_FIELDS,
    RESOURCE_FIELDS,
    UsageError,
    epoch_runs,
    iso,
    listed,
    pick,
    print_json,
    printable,
    resource_pattern,
    run_on_store,
    table,
    time_arg,
)
from .parts import compromise_part, grant_part, part_grants, revoke_part, rotate_part

__all__ = [
    "cmd_compromise",
    "cmd_destroy",
    "cmd_devices",
    "cmd_grant",
    "cmd_grants",
    "cmd_resources",
    "cmd_revoke",
    "cmd_rotate",
]


def cmd_grant(args: argparse.Namespace, now: int) -> int:
    """Let a consumer read the resources matching PATTERN ('*' matches anything, '/' included),
    until TIME or indefinitely. A consumer shut out of a resource by an earlier revocation gets
    back in only from a new epoch: that resource rotates.
    """
    if args.part is not None:
        return grant_part(args, now)
    consumer = require_device_id(args.consumer, "consumer id")
    pattern = resource_pattern(args.resource)
    until = None if args.until is None else time_arg(args.until, now)
    rotated = run_on_store(args, lambda store: store.add_grant(consumer, pattern, until, now))
    print(f"granted {consumer} {pattern} until {iso(until) if until else 'revoked'}")
    if rotated:
        print(f"rotated: {listed(rotated)}")
    return 0


def cmd_revoke(args: argparse.Namespace, now: int) -> int:
    """Revoke a consumer's grants (all, or those with exactly --resource PATTERN), or a whole
    device (PSK erased, certificates revoked, grants revoked). Every resource the consumer could
    read rotates at once and it is refused the new epoch and every later one.
    """
    if args.part is not None:
        return revoke_part(args, now)
    if args.device is not None:
        if args.resource is not None:
            raise UsageError("--resource goes with --consumer, not --device")
        device = require_device_id(args.device)
        rotated = run_on_store(args, lambda store: store.revoke_device(device, now))
        print(f"revoked device {device}; rotated: {listed(rotated)}")
        return 0
    consumer = require_device_id(args.consumer, "consumer id")
    pattern = None if args.resource is None else resource_pattern(args.resource)
    rotated = run_on_store(args, lambda store: store.revoke_grants(consumer, pattern, now))
    print(f"revoked grants of {consumer} on {pattern or 'everything'}; rotated: {listed(rotated)}")
    return 0


def cmd_rotate(args: argparse.Namespace, now: int) -> int:
    """Rotate a resource now (--resource; one of its parts with --part), or every resource whose
    rotation is due (--due): the pre-active epoch becomes active, the active one is deactivated,
    a new pre-active one is made.
    """
    rid = None if args.resource is None else require_resource_id(args.resource)
    if args.part is not None:
        return rotate_part(args, now)

    async def body(store: Store) -> list[tuple[str, int]]:
        if rid is not None:
            return [(rid, await store.rotate(rid, now, actor="admin", reason="manual"))]
        done = []
        for due in await store.due_rotations(now):  # each skipped if a running AS did it first
            epoch = await store.rotate_if_due(due, now, actor="admin", reason="due")
            if epoch is not None:
                done.append((due, epoch))
        return done

    done = run_on_store(args, body)
    for resource, epoch in done:
        print(f"rotated {printable(resource)}: epoch {epoch} active")
    if not done:
        print("no rotation due")
    return 0


def cmd_compromise(args: argparse.Namespace, now: int) -> int:
    """Mark an epoch compromised (the active one unless --epoch) and move on at once: the
    pre-active epoch becomes active and a new pre-active one is made.
    """
    rid = require_resource_id(args.resource)
    if args.part is not None:
        return compromise_part(args, now)

    async def body(store: Store) -> tuple[int, int]:
        target = await store.epoch(rid, args.epoch)
        if target is None:
            which = "an active epoch" if args.epoch is None else f"an epoch {args.epoch}"
            raise NoSuchRecord(f"resource {rid} has no {which}")
        return target.epoch, await store.compromise(rid, target.epoch, now)

    epoch, active = run_on_store(args, body)
    print(f"{rid}: epoch {epoch} compromised; epoch {active} active")
    return 0


def cmd_destroy(args: argparse.Namespace, now: int) -> int:
    """Destroy the secrets of epochs deactivated or compromised more than S seconds ago: they
    are overwritten in storage, then cleared. Objects sealed under them become unreadable.
    """
    done = run_on_store(args, lambda store: store.destroy_expired(now, args.retention))
    for resource, epoch in done:
        print(f"destroyed {printable(resource)} epoch {epoch}")
    if not done:
        print("nothing to destroy")
    return 0


def cmd_devices(args: argparse.Namespace, now: int) -> int:
    """List the enrolled devices (never their PSKs)."""
    devices = [pick(d, DEVICE_FIELDS) for d in run_on_store(args, lambda store: store.devices())]
    if args.json:
        print_json(devices)
    else:
        table(DEVICE_FIELDS, [[*d.values()] for d in devices], times=("enrolled_at", "revoked_at"))
    return 0


def cmd_resources(args: argparse.Namespace, now: int) -> int:
    """List the registered resources with their epochs and the states of those (never secrets)."""

    async def body(store: Store) -> list[dict[str, Any]]:
        return [
            {**pick(r, RESOURCE_FIELDS), "epochs": [pick(e, EPOCH_FIELDS) for e in epochs]}
            for r in await store.resources()
            for epochs in [await store.epochs(r.id)]
        ]

    resources = run_on_store(args, body)
    if args.json:
        print_json(resources)
        return 0
    rows = [
        [
            r["id"],
            r["producer_id"],
            r["profile"],
            f"{r['rotation_period']}s" if r["rotation_period"] else "never",
            epoch_runs([(e["epoch"], e["state"]) for e in r["epochs"]]),
        ]
        for r in resources
    ]
    table(("id", "producer_id", "profile", "rotation", "epochs"), rows)
    return 0


def cmd_grants(args: argparse.Namespace, now: int) -> int:
    """List the grants, revoked and expired ones included, oldest first; then the grants of one
    part (``grant --part``)."""
    consumer = None if args.consumer is None else require_device_id(args.consumer, "consumer id")
    grants = []
    for row in run_on_store(args, lambda store: store.grants(consumer)):
        grant: dict[str, Any] = dict(zip(GRANT_FIELDS, row, strict=True))
        revoked, until = grant["revoked_at"], grant["until"]
        expired = until is not None and until <= now
        grant["status"] = "revoked" if revoked else "expired" if expired else "active"
        grants.append(grant)
    parts = part_grants(args, consumer)
    if args.json:
        print_json(grants + parts)
    else:
        header = (*GRANT_FIELDS, "status")
        table(header, [[*g.values()] for g in grants], times=("until", *GRANT_FIELDS[-2:]))
        if parts:
            print()
            columns = ("consumer_id", "resource_id", "part", "granted_at", "revoked_at", "status")
            table(columns, [[*g.values()] for g in parts], times=columns[3:5])
    return 0
