"""``oscar-proxy``: run the caching proxy, or read its counters.

::

    oscar-proxy --bundle proxy-1.json --state /var/lib/oscar/proxy --listen 127.0.0.1:5683 \\
        [--reverse PREFIX=coap://HOST:PORT ...] [--config proxy.toml] [--no-plain | --no-dtls] \\
        [--tcp] [--tls] [--cluster redis://HOST:PORT/DB]
    oscar-proxy stats --state /var/lib/oscar/proxy [--json]

``stats`` asks the running proxy for its live counters over ``STATE/stats.sock``
(:mod:`proxy.statsock`): run it as the proxy's user.

Forward proxying (Proxy-Uri) is always on; each ``--reverse`` maps a path prefix to a producer
(``/PREFIX/REST`` is fetched from ``coap://HOST:PORT/PREFIX/REST``). Plain CoAP is served on the
listen port and DTLS-PSK on the next one (identities: devices enrolled at the AS, keyed with link
PSKs the AS derives for this proxy); with ``--tcp`` also CoAP over TCP on the listen port (GETs,
large objects in BERT blocks: :mod:`oscar_io.coaptcp`), and with ``--tls`` CoAP over TLS on the
next port (TCP), with a certificate the AS issues at start (:mod:`oscar_io.tlscert`): clients
need one from the AS CA, and owners may publish there. Flags override the configuration file (see
:mod:`proxy.config` for its format and the limits).

With ``--cluster`` (or ``cluster`` in the configuration), the instances of one bundle share their
cache, anti-rollback memory, upstream fetches and observations and the lookup budget through a
Redis-protocol store (:mod:`proxy.cluster`); each needs a state directory and address of its own.
A password goes in ``--cluster-password-file`` (or ``cluster_password_file``), not in the URL.

Exit status: 0 after SIGTERM/SIGINT, 1 when it cannot start, 2 for bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from oscar.errors import CertificateError
from oscar_io import aiocoap_fixes, coaptcp
from oscar_io.aiocoap_fixes import quiet_undecodable_datagrams
from oscar_io.clikit import (
    OneLineParser,
    add_logging_arguments,
    configure_logging,
    fail,
    parse_args,
)
from oscar_io.dtls import IndexedCreds, end_sessions, label_of, session_count
from oscar_io.errors import AsError, BundleError, StateError
from oscar_io.metrics import MetricsServer, MetricsUnavailable, check_metrics_address, serve_metrics
from oscar_io.ports import ensure_alone_on_port, ensure_port_free
from oscar_io.tasks import stop_tasks
from oscar_io.tlscert import issue_for_tls

from .config import (
    ConfigError,
    ProxyConfig,
    check_cluster_url,
    config_from_mapping,
    load_config,
    parse_listen,
    parse_metrics,
)
from .config import parse_reverse as _parse_reverse
from .core import Proxy
from .metrics import proxy_metrics
from .statsock import StatsUnavailable, close_stats, ensure_state_free, read_stats, serve_stats

PROG = "oscar-proxy"
log = logging.getLogger("oscar.proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Cache and relay protected CoAP objects without being able to read them.",
        epilog="oscar-proxy stats --state DIR prints the running proxy's live counters.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration")
    parser.add_argument("--bundle", type=Path, metavar="FILE", help="the proxy's bundle (0600)")
    parser.add_argument("--state", type=Path, metavar="DIR", help="state directory (0700)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="plain CoAP; DTLS on PORT+1")
    parser.add_argument(
        "--reverse",
        action="append",
        default=[],
        metavar="PREFIX=coap://HOST:PORT",
        help="map a path prefix to a producer (repeatable)",
    )
    parser.add_argument(
        "--cluster",
        metavar="redis://HOST:PORT/DB",
        help="share cache, observations and budgets with the other instances of this bundle",
    )
    parser.add_argument(
        "--cluster-password-file",
        type=Path,
        metavar="FILE",
        help="the cluster store's password (first line), kept out of the URL",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP; ops extra; "
        "default: the configuration file's, else off)",
    )
    parser.add_argument("--no-plain", action="store_true", help="serve DTLS only")
    parser.add_argument("--no-dtls", action="store_true", help="serve plain CoAP only")
    parser.add_argument(
        "--tcp",
        action="store_true",
        default=None,
        help="also serve CoAP over TCP (RFC 8323) on the listen port (default: off)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=None,
        help="also serve CoAP over TLS on PORT+1 (TCP) with a certificate from the AS; clients "
        "need one from the AS CA (default: off)",
    )
    add_logging_arguments(parser)
    return parser


def build_stats_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=f"{PROG} stats", description="Print a running proxy's live counters."
    )
    parser.add_argument("--state", type=Path, metavar="DIR", required=True)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    return parser


def _config(args: argparse.Namespace) -> ProxyConfig:
    reverse = dict(_parse_reverse(item) for item in args.reverse) or None
    overrides: dict[str, Any] = {
        "bundle": args.bundle,
        "state": args.state,
        "listen": parse_listen(args.listen) if args.listen is not None else None,
        "reverse": reverse,
        "plain": False if args.no_plain else None,
        "dtls": False if args.no_dtls else None,
        "tcp": args.tcp,
        "tls": args.tls,
        "cluster": check_cluster_url(args.cluster) if args.cluster is not None else None,
        "cluster_password_file": args.cluster_password_file,
        "metrics": parse_metrics(args.metrics) if args.metrics is not None else None,
    }
    if args.config is not None:
        return load_config(args.config, **overrides)
    return config_from_mapping({}, base=Path.cwd(), where="the flags", **overrides)


async def serve(config: ProxyConfig, stop: asyncio.Event) -> None:
    """Run a proxy until ``stop`` is set."""
    from aiocoap import Context

    from .fastpath import FASTPATH_ENV, FastPath
    from .server import ProxySite

    quiet_undecodable_datagrams(asyncio.get_running_loop(), log)
    aiocoap_fixes.apply()  # observers that leave: no tracebacks, no other observer's end
    host, port = config.listen
    ports = ([port] if config.plain else []) + ([port + 1] if config.dtls else [])
    for each in ports:  # before any work: a port in use changes no state
        ensure_port_free(host, each)
    if config.tcp:
        coaptcp.ensure_tcp_port_free(host, port)
    if config.tls:
        coaptcp.ensure_tcp_port_free(host, coaptcp.tls_port(port))
    ensure_state_free(config.state)  # nor a state directory another proxy uses
    if config.metrics is not None:
        check_metrics_address(*config.metrics)
    proxy = Proxy(config)
    proxy.open()
    try:
        await proxy.start()  # joins the cluster, if any: ClusterError (a StateError) otherwise
    except BaseException:
        await proxy.close()
        raise
    tls = None
    if config.tls:  # a certificate from the AS for a key made now (oscar_io.tlscert)
        try:
            cert_pem, key_pem = await issue_for_tls(
                await proxy.as_client(), proxy.bundle, int(proxy.now())
            )
        except (AsError, CertificateError) as exc:
            await proxy.close()
            raise StateError(f"no TLS certificate from the AS: {exc}") from None
        tls = coaptcp.server_tls(cert_pem, key_pem, proxy.bundle.ca_certificate)
    site = ProxySite(proxy, echo_key=proxy.bundle.state_key("proxy echo"))
    creds = IndexedCreds()
    transports = (["udp6"] if config.plain else []) + (["tinydtls_server"] if config.dtls else [])
    ctx = None
    tcp = None
    stats: asyncio.Server | None = None
    exporter: MetricsServer | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if transports:
            ctx = await Context.create_server_context(
                site, bind=(host, port), transports=transports, server_credentials=creds
            )
        for each in ports:
            ensure_alone_on_port(host, each)
        if config.tcp or tls is not None:
            tcp = await coaptcp.serve(site, host, port, tcp=config.tcp, tls=tls)
        if (
            ctx is not None
            and config.plain
            and os.environ.get(FASTPATH_ENV, "on").lower() not in ("off", "0")
        ):
            FastPath(site).install(ctx)  # cache hits before aiocoap (proxy.fastpath)
        try:
            stats = await serve_stats(config.state, proxy.counters)
        except OSError as exc:  # the proxy serves without: its counters stay at the CoAP endpoint
            log.warning("no live counters for oscar-proxy stats: %s", exc.strerror or exc)
        if config.metrics is not None:
            dtls = ctx if config.dtls else None
            sessions = None if dtls is None else functools.partial(session_count, dtls)
            exporter = await serve_metrics(proxy_metrics(proxy, sessions), *config.metrics)
        if config.dtls:
            tasks.append(asyncio.create_task(_refresh_links(proxy, creds, ctx), name="links"))
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "serving%s%s%s",
            f" coap://{shown}:{port}" if config.plain else "",
            f" coaps://{shown}:{port + 1}" if config.dtls else "",
            f" coap+tcp://{shown}:{port}" if config.tcp else "",
        )
        if tls is not None:
            log.info("serving coaps+tcp://%s:%d", shown, coaptcp.tls_port(port))
        await stop.wait()
    finally:
        await stop_tasks(tasks)
        if exporter is not None:
            await exporter.close()
        close_stats(config.state, stats)
        if tcp is not None:
            await tcp.shutdown()
        if ctx is not None:
            await ctx.shutdown()
        site.uploads.close()  # the spools of uploads under way
        await proxy.close()
        log.info("stopped")


async def _refresh_links(proxy: Proxy, creds: IndexedCreds, ctx: Any) -> None:
    """Keep the DTLS credentials equal to the AS's link keys for this proxy."""
    while True:
        try:
            client = await proxy.as_client()
            links = await client.links()
            current = creds.device_ids()
            for device_id, psk in links.items():
                creds.set_device(device_id, psk)
            for device_id in current - links.keys():
                creds.remove_device(device_id)
                end_sessions(ctx, label_of(device_id))
                log.info("%s may no longer connect", device_id)
            if links.keys() != current:
                log.info("link keys of %d devices from the AS", len(links))
        except AsError as exc:
            log.warning("cannot refresh the link keys from the AS: %s", exc)
        except Exception as exc:  # keep polling: revoked devices leave only through this loop
            log.error("refreshing the link keys failed (%s); retrying", exc)
        await asyncio.sleep(proxy.limits.links_refresh)


def stats_main(argv: list[str]) -> int:
    args = parse_args(build_stats_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        doc = read_stats(args.state)
    except StatsUnavailable as exc:
        return fail(f"{PROG} stats", str(exc), 1)
    if args.json:
        print(json.dumps(doc))
    else:
        for key, value in doc.items():
            print(f"{key:24} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stats"]:
        return stats_main(argv[1:])
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        config = _config(args)
        config.cluster_password()  # readable now: a bad file is a usage error, not a crash
    except ConfigError as exc:
        return fail(PROG, str(exc), 2)
    configure_logging(args.log_level, json_lines=args.log_json)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop)

    try:
        asyncio.run(run())
    except (BundleError, StateError, MetricsUnavailable) as exc:
        return fail(PROG, f"cannot start: {exc}", 1)
    except OSError as exc:
        return fail(PROG, f"cannot start: {exc.strerror or exc}", 1)
    except ValueError as exc:  # aiocoap refusing the bind address
        return fail(PROG, f"cannot start: {exc}", 1)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
