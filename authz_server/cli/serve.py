"""``oscar-as serve``: the settings (flags over a TOML file over the defaults), checked before
anything starts, then :func:`authz_server.server.serve` until SIGTERM/SIGINT; with ``--admin``,
the admin console (:mod:`authz_server.admin`) beside it on the same event loop.

The console holds a store handle of its own on the same database, as the admin CLI does: what it
changes reaches the server through the store's change counter, as the CLI's changes do.

The one command line of the AS: systemd, the tests, the demo and the benchmarks all start it this
way. The network stack (:mod:`authz_server.server`) is imported only when the command runs, so
``--help`` and the admin commands do not load it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import time
from typing import Any

from oscar_io.clikit import configure_logging, fail, read_toml
from oscar_io.metrics import MetricsUnavailable, check_metrics_address
from oscar_io.ports import PortInUse, ensure_port_free, parse_listen

from ..admin import ConsoleUnavailable, check_console_address
from ..store import Store
from .common import PROG, UsageError, with_store

__all__ = ["SERVE_DEFAULTS", "SERVE_KEYS", "apply_serve_config", "cmd_serve"]


def listen_arg(text: str) -> tuple[str, int]:
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


def metrics_arg(text: str | None) -> tuple[str, int] | None:
    """``--metrics HOST:PORT`` (None: off)."""
    if text is None:
        return None
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise UsageError(f"--metrics: {exc}") from None


def admin_arg(text: str | int | None) -> tuple[str, int] | None:
    """``--admin PORT`` (loopback, 127.0.0.1), ``HOST:PORT`` or ``[IPv6]:PORT`` (None: off). A
    host other than loopback only when named; never the any-address (the certificate names the
    address browsers use)."""
    if text is None:
        return None
    text = str(text)
    try:
        if text.isdigit():
            host, port = "127.0.0.1", int(text)
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not from 1 to 65535")
        else:
            host, port = parse_listen(text)
    except ValueError as exc:
        raise UsageError(f"--admin: {exc}") from None
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:
        raise UsageError(
            "--admin needs the address browsers use (its certificate names it), not the any-address"
        )
    return host, port


def cmd_serve(args: argparse.Namespace, now: int) -> int:
    """Run the AS: CoAP over DTLS-PSK on HOST:PORT (the DTLS port; a specific address, not the
    any-address). SIGTERM or SIGINT stops it cleanly (exit status 0). Logs go to stderr.
    """
    apply_serve_config(args)
    host, port = listen_arg(args.listen)
    metrics = metrics_arg(args.metrics)
    admin = admin_arg(args.admin)
    try:  # before anything else (no database opened): exit 1, so that systemd tries again
        ensure_port_free(host, port)
        if metrics is not None:
            check_metrics_address(*metrics)
        if admin is not None:
            check_console_address(*admin)
    except (PortInUse, MetricsUnavailable, ConsoleUnavailable) as exc:
        return fail(f"{PROG} serve", str(exc), 1)
    # A missing or unreadable state directory is a one-line error before anything starts.
    asyncio.run(with_store(args.state, _nothing, args.database))
    from ..server import ServeOptions, serve  # the network stack loads only for this command

    names = (
        "retention", "rate", "burst", "max_connections", "tick", "crl_validity",
        "min_rotation_period", "audit_retention", "audit_prune_every", "heartbeat",
    )  # fmt: skip
    options = ServeOptions(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    configure_logging(args.log_level, json_lines=args.log_json)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        console = None if admin is None else await _start_console(args, *admin)
        try:
            await serve(
                args.state,
                host,
                port,
                options,
                stop=stop,
                tune_gc=True,
                database=args.database,
                metrics=metrics,
                per_resource_metrics=bool(args.metrics_per_resource),
            )
        finally:
            if console is not None:
                await _stop_console(*console)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    asyncio.run(run())
    return 0


async def _nothing(store: Store) -> None:
    return None


async def _start_console(args: argparse.Namespace, host: str, port: int) -> tuple[Any, Store]:
    """The admin console on its own store handle (the admin CLI's way to the database)."""
    from ..admin import start_console
    from ..ca import CertificateAuthority

    store = await Store.open(args.state, database=args.database)
    try:
        ca = await CertificateAuthority.load(store)
        console = await start_console(store, ca, host, port, int(time.time()))
    except BaseException:
        await store.close()
        raise
    logging.getLogger("oscar.as").info("admin console at %s", console.url)
    return console, store


async def _stop_console(console: Any, store: Store) -> None:
    try:
        await console.close()
    finally:
        await store.close()


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
    "heartbeat": 5.0,
}

#: ``serve``'s TOML keys (the flags' names with ``_``) and the type each takes.
SERVE_KEYS: dict[str, type | tuple[type, ...]] = {
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
    "heartbeat": (int, float),
    "log_level": str,
    "log_json": bool,
    "metrics": str,
    "metrics_per_resource": bool,
    "admin": (str, int),
}


def apply_serve_config(args: argparse.Namespace) -> None:
    """Fill the flags not given from ``--config`` (a TOML file of :data:`SERVE_KEYS`)."""
    if args.config is not None:
        doc = read_toml(args.config, UsageError)
        unknown = set(doc) - set(SERVE_KEYS)
        if unknown:
            raise UsageError(f"{args.config}: unknown setting(s) {', '.join(sorted(unknown))}")
        for key, value in doc.items():
            kind = SERVE_KEYS[key]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise UsageError(f"{args.config}: {key} has the wrong type")
            if key in ("log_json", "metrics_per_resource"):
                setattr(args, key, bool(getattr(args, key)) or value)
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
    positive = (
        *("rate", "burst", "max_connections", "tick", "crl_validity", "audit_prune_every"),
        "heartbeat",
    )
    for key in ("retention", *positive):
        value = getattr(args, key)
        if value is not None and (value < 0 or (value == 0 and key != "retention")):
            raise UsageError(f"{key} must be positive")
    days = args.audit_retention
    if days is not None and (isinstance(days, bool) or not 0 <= days < math.inf):
        raise UsageError("audit_retention must be a number of days, 0 (keep every record) or more")
