"""``oscar-producer``: run a producer from flags, a TOML configuration, or both.

::

    oscar-producer --bundle sensor-1.json --state state/ --listen 127.0.0.1:5683 \\
        --resource temperature=/run/temp.txt [--resource PATH=FILE ...]
    oscar-producer --config producer.toml [--listen HOST:PORT] [--tcp] [--tls] [--log-level debug]

Each ``--resource PATH=FILE`` serves the file's content as the protected resource
``<producer id>/PATH`` and seals a new object whenever the file changes; ``--content-format``,
``--max-age``, ``--lifetime``, ``--profile``, ``--rotation-period`` and ``--interval`` apply to
those (the content format is guessed from the file name unless given); their defaults are
:class:`~producer.config.ResourceSpec`'s, the same as in a configuration file. Flags override the
configuration file; ``--resource`` adds to its resources. See :mod:`producer.config` for the file.

Exit status: 0 after SIGTERM/SIGINT, 1 when it cannot start (bundle, state, certificate, port),
2 for bad usage or a bad configuration. Each failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

from oscar.profiles import PROFILES
from oscar_io import coaptcp
from oscar_io.aiocoap_fixes import quiet_undecodable_datagrams
from oscar_io.clikit import (
    OneLineParser,
    add_logging_arguments,
    configure_logging,
    fail,
    parse_args,
)
from oscar_io.errors import BundleError, StateError
from oscar_io.metrics import MetricsServer, MetricsUnavailable, check_metrics_address, serve_metrics
from oscar_io.multicast import Group
from oscar_io.ports import ensure_port_free

from .config import (
    ConfigError,
    ProducerConfig,
    PublishTarget,
    ResourceSpec,
    config_from_mapping,
    guess_content_format,
    load_config,
    parse_listen,
)
from .core import Producer, ProducerError

PROG = "oscar-producer"
log = logging.getLogger("oscar.producer")

#: The defaults --help shows are those of producer.config: one default per setting.
_SPEC = ResourceSpec("default")
_CONFIG = SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(ProducerConfig)})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Publish protected CoAP resources: each value sealed once, served to all.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration; the flags override it (default: none, flags only)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        metavar="FILE",
        help="credentials bundle, mode 0600 (required here or in --config)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        metavar="DIR",
        help="state directory, made 0700 (required here or in --config)",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address of the CoAP server (default: the configuration file's; without one the "
        "producer serves nothing and only publishes)",
    )
    parser.add_argument(
        "--tcp",
        action="store_true",
        default=None,
        help="also serve CoAP over TCP (RFC 8323) on the listen port "
        "(default: the configuration file's, else off)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=None,
        help="also serve CoAP over TLS on the listen port + 1, with the producer's certificate; "
        "clients need a certificate from the AS CA (default: the configuration file's, else off)",
    )
    parser.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="PATH=FILE",
        help="serve FILE's content as <producer id>/PATH (repeatable; default: none beyond "
        "the configuration file's)",
    )
    parser.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="[PROXY=]URI",
        help="also PUT every new object to URI/<resource id>; PROXY=coaps://HOST:PORT for an "
        "OSCAR proxy over DTLS (its device id; the link key comes from the AS) (repeatable; "
        "default: none beyond the configuration file's)",
    )
    parser.add_argument(
        "--content-format",
        type=int,
        metavar="N",
        help="CoAP content format of the --resource values (default: guessed from the file "
        "name: .txt 0, .json 50, .cbor 60, ..., else 42)",
    )
    parser.add_argument(
        "--max-age",
        type=int,
        default=_SPEC.max_age,
        metavar="SECONDS",
        help="CoAP Max-Age of a response to a --resource (default: %(default)s)",
    )
    parser.add_argument(
        "--lifetime",
        type=int,
        default=_SPEC.lifetime,
        metavar="SECONDS",
        help="exp - iat of each object of a --resource; re-sealed when half of it is gone "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        default=_SPEC.profile,
        choices=list(PROFILES),
        metavar="NAME",
        help=f"security profile of the --resource objects, one of {', '.join(PROFILES)} "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rotation-period",
        type=int,
        default=_SPEC.rotation_period,
        metavar="SECONDS",
        help="seconds per epoch of a --resource; 0 = a new epoch only on revocation "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=_SPEC.interval,
        metavar="SECONDS",
        help="seconds between looks at a --resource file (default: %(default)s)",
    )
    parser.add_argument(
        "--key-algorithm",
        choices=("ES256", "EdDSA"),
        help="the producer's signing key: ES256 or EdDSA (for the *-eddsa profiles) "
        f"(default: the configuration file's, else {_CONFIG.key_algorithm})",
    )
    parser.add_argument(
        "--max-observers",
        type=int,
        metavar="N",
        help="Observe registrations held at once, in all "
        f"(default: the configuration file's, else {_CONFIG.max_observers})",
    )
    parser.add_argument(
        "--max-observers-per-address",
        type=int,
        metavar="N",
        help="Observe registrations held at once from one IP address "
        f"(default: the configuration file's, else {_CONFIG.max_observers_per_address})",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP; ops extra; "
        "default: the configuration file's, else off)",
    )
    parser.add_argument(
        "--metrics-per-resource",
        action="store_true",
        default=None,
        help="label per-resource metrics with resource ids (default: off)",
    )
    parser.add_argument(
        "--multicast",
        action="append",
        default=[],
        metavar="ADDRESS:PORT",
        help="send each new object once to this group and answer group GETs on it "
        "(repeatable; IPv6 as [ADDRESS]:PORT; added to the configuration file's; default: none)",
    )
    parser.add_argument(
        "--multicast-interface",
        metavar="IPV4",
        help="the IPv4 address whose interface joins and sends to groups "
        f"(default: {_CONFIG.multicast_interface}, the system's choice)",
    )
    parser.add_argument(
        "--multicast-interface6",
        metavar="NAME|IPV6",
        help="the interface (name, or one of its IPv6 addresses) for IPv6 groups "
        "(default: none; required with an IPv6 group)",
    )
    parser.add_argument(
        "--multicast-leisure",
        type=float,
        metavar="SECONDS",
        help=f"answers to a group GET wait up to this long (default: {_CONFIG.multicast_leisure})",
    )
    add_logging_arguments(parser)
    return parser


def _config(args: argparse.Namespace) -> ProducerConfig:
    specs = []
    for item in args.resource:
        path, sep, file = item.partition("=")
        if not sep or not path or not file:
            raise ConfigError(f"--resource {item!r}: PATH=FILE expected")
        file_path = Path(file)
        specs.append(
            ResourceSpec(
                path,
                file=file_path,
                interval=args.interval,
                content_format=(
                    guess_content_format(file_path)
                    if args.content_format is None
                    else args.content_format
                ),
                max_age=args.max_age,
                lifetime=args.lifetime,
                profile=args.profile,
                rotation_period=args.rotation_period,
            )
        )
    publish = [PublishTarget.parse(text) for text in args.publish]
    listen = parse_listen(args.listen) if args.listen is not None else None
    overrides = {
        "bundle": args.bundle,
        "state": args.state,
        "listen": listen,
        "key_algorithm": args.key_algorithm,
        "max_observers": args.max_observers,
        "max_observers_per_address": args.max_observers_per_address,
        "metrics": parse_listen(args.metrics, what="--metrics") if args.metrics else None,
        "metrics_per_resource": args.metrics_per_resource,
        "tcp": args.tcp,
        "tls": args.tls,
        "resources": specs,
        "publish": publish,
        "multicast": [Group.parse(text) for text in args.multicast] or None,
        "multicast_interface": args.multicast_interface,
        "multicast_interface6": args.multicast_interface6,
        "multicast_leisure": args.multicast_leisure,
    }
    if args.config is not None:
        return load_config(args.config, **overrides)
    return config_from_mapping({}, base=Path.cwd(), where="the flags", **overrides)


async def run(config: ProducerConfig) -> None:
    """Start a producer and run it until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    quiet_undecodable_datagrams(loop, log)
    if config.listen is not None:  # before any work: a port in use changes no state
        ensure_port_free(*config.listen)
        host, port = config.listen
        if config.tcp:
            coaptcp.ensure_tcp_port_free(host, port)
        if config.tls:
            coaptcp.ensure_tcp_port_free(host, coaptcp.tls_port(port))
    if config.metrics is not None:
        check_metrics_address(*config.metrics)
    producer = Producer(config)
    exporter: MetricsServer | None = None
    try:
        await producer.start()
        if config.metrics is not None:
            from .metrics import producer_metrics

            metrics = producer_metrics(producer, per_resource=config.metrics_per_resource)
            exporter = await serve_metrics(metrics, *config.metrics)
        log.info(
            "producer %s ready: %s",
            producer.device_id,
            ", ".join(p.resource_id for p in producer.resources.values()) or "no resources",
        )
        await stop.wait()
    finally:
        if exporter is not None:
            await exporter.close()
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        config = _config(args)
    except ConfigError as exc:
        return fail(PROG, str(exc), 2)
    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        asyncio.run(run(config))
    except (BundleError, StateError, ProducerError, MetricsUnavailable) as exc:
        return fail(PROG, f"cannot start: {exc}", 1)
    except OSError as exc:
        return fail(PROG, f"cannot start: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
