"""``oscar-as``: the AS's admin tool and the entry point of its server.

Every command works on a state directory (``--state``): ``init`` makes one; ``enroll``, ``grant``,
``revoke``, ``rotate``, ``compromise`` and ``destroy`` change it; ``devices``, ``resources``,
``grants`` and ``audit`` read it; ``serve`` runs the server (:mod:`authz_server.server`, imported
only by that command). The admin commands talk to the database directly, so they work whether or
not a server is running; the server notices their changes through the store's change counter.

Exit status: 0 success, 1 refused by the state (no such device, resource, grant or epoch; the
thing exists already; a broken audit chain; for ``serve``, its port held by another process), 2
bad usage or bad input (malformed ids, patterns or times; a missing, corrupt or foreign state
directory; a wrong or exposed master key). Every failure is one line on stderr,
``oscar-as <command>: error: ...``; exceptions are mapped to it in one place, :func:`main`. No
output ever holds a PSK or an access secret: the only place a PSK leaves the AS is the credentials
bundle that ``enroll`` writes (mode 0600, or stdout with ``--out -``).

What it does not do: decide policy (that is :mod:`authz_server.store` and the server), or speak
the network (only ``serve`` does, through :mod:`authz_server.server`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import math
import os
import re
import signal
import sqlite3
import sys
import tempfile
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from cryptography import x509

from oscar import __version__, certs
from oscar.algorithms import PublicKey
from oscar.names import MAX_RESOURCE_ID, is_device_id, require_device_id, require_resource_id
from oscar_io.clikit import (
    OneLineParser,
    add_logging_arguments,
    configure_logging,
    fail,
    parse_args,
    read_toml,
)
from oscar_io.errors import UsageError
from oscar_io.ports import PortInUse, ensure_port_free, parse_listen

from .ca import CA_CERT_NAME, init_state
from .store import DB_NAME, MASTER_KEY_NAME, ROLES, Conflict, NotFound, Store, StoreError
from .vault import MasterKeyError, VaultError

__all__ = ["UsageError", "build_parser", "main"]

PROG = "oscar-as"
DEFAULT_AS_URI = "coaps://127.0.0.1:5684"
PSK_LENGTH = 16  # tinydtls takes PSKs of at most 16 bytes
BUNDLE_MODE = 0o600

Handler = Callable[[argparse.Namespace, int], int]
T = TypeVar("T")


class Refused(Exception):
    """The state says no, other than through the store's NotFound/Conflict (exit 1)."""


# --- input ---------------------------------------------------------------------------------------

_PATTERN_SEGMENT = re.compile(r"[A-Za-z0-9._~*-]+")


def _pattern(text: str) -> str:
    """A grant pattern: ``<producer id>/`` and path segments that may hold ``*``."""
    producer, sep, path = text.partition("/")
    if (
        len(text) > MAX_RESOURCE_ID
        or not sep
        or not is_device_id(producer)
        or not all(_PATTERN_SEGMENT.fullmatch(s) and s not in (".", "..") for s in path.split("/"))
    ):
        raise UsageError(
            "a resource pattern is '<producer id>/<path>' whose path segments are made of "
            "A-Z a-z 0-9 . _ ~ - and '*' (matching anything, '/' included), for example "
            "'sensor-1/*'"
        )
    return text


def _time_arg(text: str, now: int, flag: str = "--until", *, future: bool = True) -> int:
    """Unix seconds, or ISO 8601 with an explicit UTC offset (``2030-01-01T00:00:00Z``); in the
    future (or, with ``future`` false, not in it)."""
    if re.fullmatch(r"[0-9]{1,12}", text):
        moment = int(text)
    else:
        try:
            parsed = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise UsageError(
                f"{flag} is seconds since 1970 or ISO 8601 with a UTC offset, "
                "such as 2030-01-01T00:00:00Z"
            )
        moment = int(parsed.timestamp())
    if future and moment <= now:
        raise UsageError(f"{flag} is in the past")
    if not future and moment > now:
        raise UsageError(f"{flag} is in the future")
    return moment


def _as_uri(text: str) -> str:
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme != "coaps"
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise UsageError("--as-uri must be coaps://HOST[:PORT], for example " + DEFAULT_AS_URI)
    return text


def _listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (:func:`oscar_io.ports.parse_listen`); the DTLS server
    cannot bind the any-address."""
    try:
        # tinydtls_server serves DTLS on its bind port + 1, so the DTLS port is at least 2.
        host, port = parse_listen(text, lowest=2)
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}") from None
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:
        raise UsageError("--listen needs a specific address: the DTLS server cannot bind 0.0.0.0")
    return host, port


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        value = kind(text)
        if not value > 0:  # type: ignore[operator]
            raise ValueError
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


_not_negative.__name__ = "non-negative int"


def _days(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # nan and inf too
        raise ValueError
    return int(value) if value.is_integer() else value


_days.__name__ = "number of days"


# --- state ---------------------------------------------------------------------------------------


async def _with_store(state: Path, body: Callable[[Store], Awaitable[T]]) -> T:
    store = await Store.open(state)
    try:
        return await body(store)
    finally:
        await store.close()


def _run(args: argparse.Namespace, body: Callable[[Store], Awaitable[T]]) -> T:
    return asyncio.run(_with_store(args.state, body))


def _create_private(path: str, *, force: bool) -> tuple[int, str]:
    """A new file for the bundle, mode 0600: (fd, its temporary name or ``path``)."""
    try:
        if not force:
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, BUNDLE_MODE), path
            except FileExistsError:
                raise UsageError(f"{path!r} exists; use --force to replace it") from None
        # Through a new file and a rename: the result has mode 0600 whatever the old file's was.
        return tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".oscar-as.")
    except OSError as exc:
        raise UsageError(f"cannot write {path!r}: {exc.strerror or exc}") from None


# --- output --------------------------------------------------------------------------------------

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _printable(value: object) -> str:
    """Text for the terminal: control, format and separator characters escaped."""
    text = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cf", "Zl", "Zp") else c for c in text
    )


def _iso(moment: object) -> str:
    if not isinstance(moment, int):
        return "-"
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# What listings show, by name: an allowlist, so that no secret field can slip into one.
DEVICE_FIELDS = ("id", "role", "status", "enrolled_at", "revoked_at")
RESOURCE_FIELDS = (
    *("id", "producer_id", "content_format", "profile", "max_age", "rotation_period"),
    "registered_at",
)
EPOCH_FIELDS = ("epoch", "state", "created_at", "activated_at", "deactivated_at")
GRANT_FIELDS = ("id", "consumer_id", "pattern", "until", "granted_at", "revoked_at")
AUDIT_FIELDS = ("seq", "at", "actor", "action", "subject", "result", "detail")


def _pick(record: object, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(record, name) for name in names}


def _table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, times: Sequence[str] = ()
) -> None:
    """Aligned columns under an upper-case header; columns named in ``times`` as ISO 8601."""
    shown = [
        [_iso(c) if name in times else _printable(c) for name, c in zip(header, row, strict=True)]
        for row in rows
    ]
    cells = [[name.upper() for name in header], *shown]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _list(items: list[str]) -> str:
    return ", ".join(_printable(i) for i in items) if items else "none"


def _epoch_runs(epochs: list[tuple[int, str]]) -> str:
    """``1-40 destroyed, 41 deactivated, 42 active``: runs of consecutive epochs in one state."""
    runs: list[list[Any]] = []
    for number, state in epochs:
        if runs and runs[-1][2] == state and runs[-1][1] == number - 1:
            runs[-1][1] = number
        else:
            runs.append([number, number, state])
    return ", ".join(
        f"{first}{'' if first == last else f'-{last}'} {state}" for first, last, state in runs
    )


# --- commands ------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, now: int) -> int:
    """Make a new state directory (mode 0700): a master key (master.key, mode 0600, the only
    secret outside the database: back it up apart from the database), the database (as.db) and
    the CA key and certificate (ca.pem). Refuses a directory that holds an AS state or anything
    else.
    """
    state: Path = args.state
    as_uri = _as_uri(args.as_uri)
    if (state / MASTER_KEY_NAME).exists() or (state / DB_NAME).exists():
        raise Conflict(f"{state} holds an AS state already; refusing to overwrite it")
    if state.exists():
        if not state.is_dir():
            raise UsageError(f"{state} is not a directory")
        if any(state.iterdir()):
            raise UsageError(f"{state} is not empty; init wants a new or empty directory")
    else:
        state.mkdir(mode=0o700, parents=True)

    async def body() -> None:
        store = await init_state(state, as_uri=as_uri, now=now)
        await store.close()

    asyncio.run(body())
    ca_path = state / CA_CERT_NAME
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    kid = certs.key_id(cast("PublicKey", ca.public_key()))  # init_state made an ES256 key
    print(f"AS state initialized in {state} for {as_uri}")
    print(f"CA certificate: {ca_path} (kid {kid.hex()})")
    print(f"master key: {state / MASTER_KEY_NAME} (mode 0600; back it up apart from {DB_NAME})")
    return 0


def cmd_enroll(args: argparse.Namespace, now: int) -> int:
    """Enroll a device: a fresh random 16-byte DTLS PSK under the device id as PSK identity, and a
    credentials bundle for the device (JSON: id, role, as_uri, psk_identity, psk_hex, ca_cert_pem)
    written with mode 0600, or to stdout with --out -. Ids are never reused. The PSK is shown
    nowhere else: hand the bundle to the device over a safe channel.
    """
    device_id = require_device_id(args.id)
    as_uri = None if args.as_uri is None else _as_uri(args.as_uri)
    out: str = args.out
    # The file is made before the device: a path that cannot be written fails with no change.
    fd, written = (-1, out) if out == "-" else _create_private(out, force=args.force)
    try:
        psk = os.urandom(PSK_LENGTH)

        async def body(store: Store) -> bytes:
            ca_pem = await store.get_meta("ca_cert")
            uri = as_uri or await store.get_meta("as_uri")
            if not isinstance(ca_pem, bytes) or not isinstance(uri, str):
                raise StoreError("the database holds no CA certificate or AS URI")
            await store.add_device(device_id, args.role, psk, now)
            bundle = {
                "id": device_id,
                "role": args.role,
                "as_uri": uri,
                "psk_identity": device_id,
                "psk_hex": psk.hex(),
                "ca_cert_pem": ca_pem.decode("ascii"),
            }
            return json.dumps(bundle, indent=2).encode("ascii") + b"\n"

        data = _run(args, body)
        if fd < 0:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            with os.fdopen(fd, "wb") as f:
                fd = -1
                os.fchmod(f.fileno(), BUNDLE_MODE)  # the umask may have taken bits away
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if written != out:
                os.replace(written, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if out != "-":
            Path(written).unlink(missing_ok=True)
        raise
    where = "stdout" if out == "-" else f"{out} (mode 0600)"
    report = sys.stderr if out == "-" else sys.stdout
    print(f"enrolled {args.role} {device_id}; credentials bundle on {where}", file=report)
    return 0


def cmd_serve(args: argparse.Namespace, now: int) -> int:
    """Run the AS: CoAP over DTLS-PSK on HOST:PORT (the DTLS port; a specific address, not the
    any-address). SIGTERM or SIGINT stops it cleanly (exit status 0). Logs go to stderr.
    """
    _apply_serve_config(args)
    host, port = _listen(args.listen)
    try:  # before anything else (no database opened): exit 1, so that systemd tries again
        ensure_port_free(host, port)
    except PortInUse as exc:
        return fail(f"{PROG} serve", str(exc), 1)
    # A missing or unreadable state directory is a one-line error before anything starts.
    asyncio.run(_with_store(args.state, _nothing))
    from .server import ServeOptions, serve  # the network stack loads only for this command

    names = (
        "retention", "rate", "burst", "max_connections", "tick", "crl_validity",
        "min_rotation_period", "audit_retention", "audit_prune_every",
    )  # fmt: skip
    options = ServeOptions(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    configure_logging(args.log_level, json_lines=args.log_json)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await serve(args.state, host, port, options, stop=stop, tune_gc=True)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    asyncio.run(run())
    return 0


async def _nothing(store: Store) -> None:
    return None


#: What ``serve`` runs with unless a flag or ``--config`` says otherwise: the defaults of
#: :class:`authz_server.server.ServeOptions` (kept here so that ``--help`` shows them without
#: loading the network stack; a test checks they agree).
SERVE_DEFAULTS: dict[str, int | float] = {
    "retention": 7 * 86_400,
    "rate": 50.0,
    "burst": 100,
    "max_connections": 1024,
    "tick": 0.2,
    "crl_validity": 3600,
    "min_rotation_period": 60,
    "audit_retention": 365,
    "audit_prune_every": 3600.0,
}

#: ``serve``'s TOML keys (the flags' names with ``_``) and the type each takes.
_SERVE_KEYS: dict[str, type | tuple[type, ...]] = {
    "state": str,
    "listen": str,
    "retention": int,
    "rate": (int, float),
    "burst": int,
    "max_connections": int,
    "tick": (int, float),
    "crl_validity": int,
    "min_rotation_period": int,
    "audit_retention": (int, float),
    "audit_prune_every": (int, float),
    "log_level": str,
    "log_json": bool,
}


def _apply_serve_config(args: argparse.Namespace) -> None:
    """Fill the flags not given from ``--config`` (a TOML file of :data:`_SERVE_KEYS`)."""
    if args.config is not None:
        doc = read_toml(args.config, UsageError)
        unknown = set(doc) - set(_SERVE_KEYS)
        if unknown:
            raise UsageError(f"{args.config}: unknown setting(s) {', '.join(sorted(unknown))}")
        for key, value in doc.items():
            kind = _SERVE_KEYS[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UsageError(f"{args.config}: {key} has the wrong type")
            if key == "log_json":
                args.log_json = args.log_json or value
            elif getattr(args, key) is None:
                if key == "state":
                    value = args.config.parent / os.path.expanduser(str(value))  # ~user: as is
                setattr(args, key, value)
    if args.state is None or args.listen is None:
        raise UsageError("serve needs --state and --listen (or a --config that gives them)")
    if args.log_level is None:
        args.log_level = "info"
    if args.log_level not in ("debug", "info", "warning", "error"):
        raise UsageError("log_level is debug, info, warning or error")
    positive = ("rate", "burst", "max_connections", "tick", "crl_validity", "audit_prune_every")
    for key in ("retention", *positive):
        value = getattr(args, key)
        if value is not None and (value < 0 or (value == 0 and key != "retention")):
            raise UsageError(f"{key} must be positive")
    days = args.audit_retention
    if days is not None and (isinstance(days, bool) or not 0 <= days < math.inf):
        raise UsageError("audit_retention must be a number of days, 0 (keep every record) or more")


def cmd_grant(args: argparse.Namespace, now: int) -> int:
    """Let a consumer read the resources matching PATTERN ('*' matches anything, '/' included),
    until TIME or indefinitely. A consumer shut out of a resource by an earlier revocation gets
    back in only from a new epoch: that resource rotates.
    """
    consumer = require_device_id(args.consumer, "consumer id")
    pattern = _pattern(args.resource)
    until = None if args.until is None else _time_arg(args.until, now)
    rotated = _run(args, lambda store: store.add_grant(consumer, pattern, until, now))
    print(f"granted {consumer} {pattern} until {_iso(until) if until else 'revoked'}")
    if rotated:
        print(f"rotated: {_list(rotated)}")
    return 0


def cmd_revoke(args: argparse.Namespace, now: int) -> int:
    """Revoke a consumer's grants (all, or those with exactly --resource PATTERN), or a whole
    device (PSK erased, certificates revoked, grants revoked). Every resource the consumer could
    read rotates at once and it is refused the new epoch and every later one.
    """
    if args.device is not None:
        if args.resource is not None:
            raise UsageError("--resource goes with --consumer, not --device")
        device = require_device_id(args.device)
        rotated = _run(args, lambda store: store.revoke_device(device, now))
        print(f"revoked device {device}; rotated: {_list(rotated)}")
        return 0
    consumer = require_device_id(args.consumer, "consumer id")
    pattern = None if args.resource is None else _pattern(args.resource)
    rotated = _run(args, lambda store: store.revoke_grants(consumer, pattern, now))
    print(f"revoked grants of {consumer} on {pattern or 'everything'}; rotated: {_list(rotated)}")
    return 0


def cmd_rotate(args: argparse.Namespace, now: int) -> int:
    """Rotate a resource now (--resource), or every resource whose rotation is due (--due): the
    pre-active epoch becomes active, the active one is deactivated, a new pre-active one is made.
    """
    rid = None if args.resource is None else require_resource_id(args.resource)

    async def body(store: Store) -> list[tuple[str, int]]:
        if rid is not None:
            return [(rid, await store.rotate(rid, now, actor="admin", reason="manual"))]
        return [
            (due, await store.rotate(due, now, actor="admin", reason="due"))
            for due in await store.due_rotations(now)
        ]

    done = _run(args, body)
    for resource, epoch in done:
        print(f"rotated {_printable(resource)}: epoch {epoch} active")
    if not done:
        print("no rotation due")
    return 0


def cmd_compromise(args: argparse.Namespace, now: int) -> int:
    """Mark an epoch compromised (the active one unless --epoch) and move on at once: the
    pre-active epoch becomes active and a new pre-active one is made.
    """
    rid = require_resource_id(args.resource)

    async def body(store: Store) -> tuple[int, int]:
        target = await store.epoch(rid, args.epoch)
        if target is None:
            which = "an active epoch" if args.epoch is None else f"an epoch {args.epoch}"
            raise NotFound(f"resource {rid} has no {which}")
        return target.epoch, await store.compromise(rid, target.epoch, now)

    epoch, active = _run(args, body)
    print(f"{rid}: epoch {epoch} compromised; epoch {active} active")
    return 0


def cmd_destroy(args: argparse.Namespace, now: int) -> int:
    """Destroy the secrets of epochs deactivated or compromised more than S seconds ago: they
    are overwritten in storage, then cleared. Objects sealed under them become unreadable.
    """
    done = _run(args, lambda store: store.destroy_expired(now, args.retention))
    for resource, epoch in done:
        print(f"destroyed {_printable(resource)} epoch {epoch}")
    if not done:
        print("nothing to destroy")
    return 0


def cmd_devices(args: argparse.Namespace, now: int) -> int:
    """List the enrolled devices (never their PSKs)."""
    devices = [_pick(d, DEVICE_FIELDS) for d in _run(args, lambda store: store.devices())]
    if args.json:
        _json(devices)
    else:
        _table(DEVICE_FIELDS, [[*d.values()] for d in devices], times=("enrolled_at", "revoked_at"))
    return 0


def cmd_resources(args: argparse.Namespace, now: int) -> int:
    """List the registered resources with their epochs and the states of those (never secrets)."""

    async def body(store: Store) -> list[dict[str, Any]]:
        return [
            {**_pick(r, RESOURCE_FIELDS), "epochs": [_pick(e, EPOCH_FIELDS) for e in epochs]}
            for r in await store.resources()
            for epochs in [await store.epochs(r.id)]
        ]

    resources = _run(args, body)
    if args.json:
        _json(resources)
        return 0
    rows = [
        [
            r["id"],
            r["producer_id"],
            r["profile"],
            f"{r['rotation_period']}s" if r["rotation_period"] else "never",
            _epoch_runs([(e["epoch"], e["state"]) for e in r["epochs"]]),
        ]
        for r in resources
    ]
    _table(("id", "producer_id", "profile", "rotation", "epochs"), rows)
    return 0


def cmd_grants(args: argparse.Namespace, now: int) -> int:
    """List the grants, revoked and expired ones included, oldest first."""
    consumer = None if args.consumer is None else require_device_id(args.consumer, "consumer id")
    grants = []
    for row in _run(args, lambda store: store.grants(consumer)):
        grant: dict[str, Any] = dict(zip(GRANT_FIELDS, row, strict=True))
        revoked, until = grant["revoked_at"], grant["until"]
        expired = until is not None and until <= now
        grant["status"] = "revoked" if revoked else "expired" if expired else "active"
        grants.append(grant)
    if args.json:
        _json(grants)
    else:
        header = (*GRANT_FIELDS, "status")
        _table(header, [[*g.values()] for g in grants], times=("until", *GRANT_FIELDS[-2:]))
    return 0


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
        seq, chain = _run(args, lambda store: store.audit_head())
        print(f"{seq}:{chain.hex()}")
        return 0
    if args.expect is not None and not args.verify:
        raise UsageError("--expect goes with --verify")
    if args.verify:
        intact, summary = _run(args, lambda store: store.verify_audit(args.expect))
        if not intact:
            raise Refused(f"the audit log is broken: {summary}")
        print(f"audit log intact: {summary}")
        return 0
    records = _run(args, lambda store: store.audit_records(args.since))
    if args.json:
        _json([_pick(r, AUDIT_FIELDS) for r in records])
        return 0
    for r in records:
        detail = json.dumps(r.detail, sort_keys=True, separators=(",", ":"))  # ASCII-escaped
        print(
            _printable(f"{r.seq} {_iso(r.at)} {r.actor} {r.action} {r.subject} {r.result} ")
            + detail
        )
    return 0


def _prune_audit(args: argparse.Namespace, now: int) -> int:
    if args.verify or args.head or args.expect is not None or args.json or args.since:
        raise UsageError("'audit prune' takes --before or --older-than only")
    if (args.before is None) == (args.older_than is None):
        raise UsageError("'audit prune' needs one of --before TIME and --older-than DAYS")
    if args.before is not None:
        before = _time_arg(args.before, now, "--before", future=False)
    else:
        before = now - args.older_than * 86_400
    through, deleted = _run(args, lambda store: store.prune_audit(before, now))
    if not through:
        print(f"nothing to prune: no record before {_iso(before)} that is not pruned already")
        return 0
    print(
        f"pruned the records up to {through} (dated before {_iso(before)}; {deleted} deleted "
        f"now); the log is verified from the checkpoint at record {through}"
    )
    return 0


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
        return sub

    def listing(name: str, handler: Handler, summary: str) -> argparse.ArgumentParser:
        sub = command(name, handler, summary)
        sub.add_argument("--json", action="store_true", help="a JSON list")
        return sub

    init = command("init", cmd_init, "make a new state directory")
    init.add_argument(
        "--as-uri", metavar="URI", default=DEFAULT_AS_URI, help=f"(default: {DEFAULT_AS_URI})"
    )

    enroll = command("enroll", cmd_enroll, "enroll a device, write its credentials")
    enroll.add_argument("--role", choices=ROLES, required=True)
    enroll.add_argument("--id", metavar="ID", required=True, help="device id and PSK identity")
    enroll.add_argument(
        "--out", metavar="FILE", required=True, help="credentials bundle (mode 0600), - for stdout"
    )
    enroll.add_argument("--as-uri", metavar="URI", help="(default: the one given to init)")
    enroll.add_argument("--force", action="store_true", help="replace an existing FILE")

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

    tunable("--retention", "S", _not_negative, "keep deactivated epochs S seconds")
    tunable("--rate", "R", _positive(float), "requests/s per device")
    tunable("--burst", "B", _positive(int), "rate limit burst")
    tunable("--max-connections", "N", _positive(int), "DTLS connections at most")
    tunable("--tick", "S", _positive(float), "how often to look for admin changes")
    tunable("--crl-validity", "S", _positive(int), "CRL lifetime")
    tunable("--min-rotation-period", "S", _positive(int), "shortest rotation period allowed")
    tunable(
        "--audit-retention",
        "DAYS",
        _days,
        "prune audit records older than DAYS days (hourly, by the AS itself; decimals allowed; "
        "0 keeps every record)",
    )
    tunable(
        "--audit-prune-every",
        "S",
        _positive(float),
        "how often to apply --audit-retention, in seconds (at most 86400)",
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

    revoke = command("revoke", cmd_revoke, "revoke grants or a device")
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--consumer", metavar="ID", help="revoke this consumer's grants")
    who.add_argument("--device", metavar="ID", help="revoke the device itself")
    revoke.add_argument("--resource", metavar="PATTERN", help="only the grant with this pattern")

    rotate = command("rotate", cmd_rotate, "rotate a resource's access secret")
    what = rotate.add_mutually_exclusive_group(required=True)
    what.add_argument("--resource", metavar="RID")
    what.add_argument("--due", action="store_true", help="every resource whose rotation is due")

    compromise = command("compromise", cmd_compromise, "mark an epoch compromised")
    compromise.add_argument("--resource", metavar="RID", required=True)
    compromise.add_argument("--epoch", metavar="N", type=_positive(int), help="(default: active)")

    destroy = command("destroy", cmd_destroy, "destroy secrets past their retention")
    destroy.add_argument("--retention", metavar="S", type=_not_negative, required=True)

    listing("devices", cmd_devices, "list devices")
    listing("resources", cmd_resources, "list resources and their epochs")
    grants = listing("grants", cmd_grants, "list grants")
    grants.add_argument("--consumer", metavar="ID", help="only this consumer's")
    audit = listing("audit", cmd_audit, "print, verify or prune the audit log")
    audit.add_argument(
        "what", nargs="?", choices=("prune",), help="prune: delete old records (see --before)"
    )
    audit.add_argument(
        "--since", metavar="SEQ", type=_not_negative, default=0, help="after SEQ (default: 0)"
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
        type=_head,
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
        type=_positive(int),
        help="with prune: records older than DAYS days",
    )
    return parser


def _head(text: str) -> tuple[int, bytes]:
    seq, sep, chain = text.partition(":")
    try:
        if not sep or not seq.isdigit() or len(chain) != 64:
            raise ValueError
        return int(seq), bytes.fromhex(chain)
    except ValueError:
        raise argparse.ArgumentTypeError("a head is SEQ:CHAIN as printed by --head") from None


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit status (see the module docstring)."""
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    prog = f"{PROG} {args.command}"
    handler: Handler = args.handler
    try:
        return handler(args, int(time.time()))
    except (NotFound, Conflict, Refused) as exc:
        return fail(prog, str(exc), 1)
    except (UsageError, StoreError, MasterKeyError, VaultError, ValueError) as exc:
        return fail(prog, str(exc), 2)
    except sqlite3.Error as exc:  # past the store's translation: damaged, or locked too long
        return fail(prog, f"database error: {exc}", 2)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return fail(prog, f"{where}{exc.strerror or type(exc).__name__}", 2)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback: it could show secret values
        return fail(prog, f"internal error ({type(exc).__name__})", 2)
