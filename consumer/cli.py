"""``oscar-consumer``: fetch, verify and open protected representations from the command line.

::

    oscar-consumer --bundle FILE --state DIR get URI [-o FILE] [--json] [--proxy URI]
    oscar-consumer --bundle FILE --state DIR observe URI [--count N] [--json] [--proxy URI]
    oscar-consumer --bundle FILE --state DIR parts URI [--proxy URI]
    oscar-consumer --bundle FILE --state DIR listen GROUP RID... [--interface ADDR] [--count N]
    oscar-consumer --bundle FILE --state DIR group-get GROUP PATH [--interface ADDR] [--wait S]

``get`` writes the plaintext to stdout as it is (or to ``-o FILE``, mode 0600, in bounded memory
however large the object: the file appears, whole, only once the signature and the AEAD tag have
verified); ``observe`` writes each reading's plaintext followed by a newline. With ``--json`` each
reading is one JSON line: ``value`` (text for text content formats that are valid UTF-8, else
base64, as ``encoding`` says), ``producer``, ``resource``, ``epoch``, ``seq``, ``iat``, ``exp``,
``content_format``; with ``-o``, ``output`` and ``length`` instead of ``value`` and ``encoding``.
``--max-object-size`` (``max_object_size`` in the config) is the largest object taken, 64 MiB +
4 KiB by default; objects over 1 MiB are spooled to the state directory and checked as they arrive.

A stale copy (a valid object older than one this consumer accepted before: a proxy's cache within
its Max-Age after a direct read, or a replay) is never accepted and is not a rejection: ``get``
prints one ``oscar-consumer: warning:`` line (what was served, what this consumer has seen, when
the cache will ask its origin again) and gives the newest reading it holds, checked again now
(exit 0); if that one is no longer valid, the error line says ``stale copy:`` (exit 4).
``observe`` warns and goes on.

``listen`` joins a multicast group (``224.0.1.187:5683``, ``[ff05::fd]:5683``) on ``--interface``
(an IPv4 address, or an IPv6 interface's name or address) and writes each new reading of the
resources named as ``observe`` does; datagrams that are not valid objects are dropped (logged).
``parts`` reads an object of several parts (issue 19) and writes one JSON line: each part this
consumer may read (granted, or plain), in order, and ``not_granted``, the names of the others.
``group-get`` sends one GET for ``PATH`` (e.g. ``temperature``) to a group and writes, per producer
that answered within ``--wait`` seconds (default 2), a line ``<resource id> <plaintext>`` (or
the JSON line); none at all is exit 4. Every object is checked as any other.

Exit status: 0 success; 1 an object was rejected (for ``observe``: at least one notification was,
each reported on its own line while observing goes on); 2 bad usage, an unusable bundle or a
corrupt state directory; 3 access denied by the AS; 4 network or transport failure (including an
observation the server ended), said as ``not found:`` (4.04), ``refused:`` (nothing listens on the
port, or another error code), ``timed out:``, ``unreachable:`` (no such host, no route) or
``network:`` (anything else). Every failure is one line ``oscar-consumer: error: ...`` on stderr,
and exceptions are translated to it in one place, :func:`main`. Logs go to stderr
(``--log-level``, default warning); aiocoap's own loggers are kept at errors.

This is a thin shell over :class:`consumer.client.Consumer`: it parses, prints and maps errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from oscar.errors import InvalidObject, OscarError
from oscar.objects import Reading
from oscar.partsopening import PartsReading
from oscar_io.aiocoap_fixes import quiet_undecodable_datagrams
from oscar_io.clikit import (
    OneLineParser,
    add_logging_arguments,
    configure_logging,
    fail,
    parse_args,
    read_toml,
)
from oscar_io.coaperrors import TimedOut
from oscar_io.errors import BundleError, StateError, UsageError
from oscar_io.multicast import ANY_INTERFACE, Group

from .client import DEFAULT_MAX_OBJECT_SIZE, DEFAULT_TIMEOUT, Consumer, parse_target
from .errors import AccessDenied, StaleCopy, TransportError
from .transport import DEFAULT_TCP_THRESHOLD, check_threshold

log = logging.getLogger("oscar.consumer")

__all__ = ["UsageError", "build_parser", "main", "reading_json"]

PROG = "oscar-consumer"

#: Content formats shown as text in JSON when they are valid UTF-8: text/plain, link-format, xml,
#: json, json-patch, merge-patch, senml+json, sensml+json, senml-etch+json, td+json.
TEXT_FORMATS = frozenset({0, 40, 41, 50, 51, 52, 110, 111, 320, 432})


def _value(plaintext: bytes, content_format: int) -> tuple[str, str]:
    """(value, encoding): UTF-8 text for a text format, else base64."""
    if content_format in TEXT_FORMATS:
        try:
            return plaintext.decode("utf-8"), "text"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(plaintext).decode("ascii"), "base64"


def parts_json(reading: PartsReading) -> str:
    """A multi-part reading as one line of JSON: the parts opened, in order, and the names of
    those this consumer is not granted (ASCII only)."""
    m = reading.metadata
    parts = []
    for part in reading.parts:
        value, encoding = _value(part.plaintext, part.content_format)
        parts.append(
            {"name": part.name, "value": value, "encoding": encoding,
             "content_format": part.content_format, "epoch": part.epoch}
        )  # fmt: skip
    return json.dumps(
        {"producer": m.producer_id, "resource": m.resource_id, "seq": m.seq, "iat": m.iat,
         "exp": m.exp, "parts": parts, "not_granted": list(reading.not_granted)}
    )  # fmt: skip


def reading_json(reading: Reading) -> str:
    """One reading as one line of JSON (ASCII only: nothing in it can drive a terminal)."""
    m = reading.metadata
    value, encoding = _value(reading.plaintext, m.content_format)
    return json.dumps(
        {
            "value": value,
            "encoding": encoding,
            "producer": m.producer_id,
            "resource": m.resource_id,
            "epoch": m.epoch,
            "seq": m.seq,
            "iat": m.iat,
            "exp": m.exp,
            "content_format": m.content_format,
        }
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not 0 < value < 86_400 * 365:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


#: The most ``--max-object-size`` may say: 1 GiB (objects are spooled to the state directory).
MAX_OBJECT_SIZE_LIMIT = 1 << 30


def _object_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number of bytes") from None
    return _check_object_size(value, argparse.ArgumentTypeError)


def _check_object_size(value: int, error: type[Exception]) -> int:
    if not 1024 <= value <= MAX_OBJECT_SIZE_LIMIT:
        raise error(f"max_object_size must be 1024 to {MAX_OBJECT_SIZE_LIMIT} bytes")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _threshold(text: str) -> int | str:
    if text == "off":
        return text
    try:
        return check_threshold(int(text)) or 0
    except ValueError:
        raise argparse.ArgumentTypeError("is a number of bytes (0 to 4294967295) or off") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``oscar-consumer`` argument parser, one subcommand per operation."""
    parser = OneLineParser(
        prog=PROG,
        description="OSCAR consumer: fetch, verify and decrypt protected CoAP representations.",
        epilog="exit status: 0 success, 1 object rejected, 2 bad usage, 3 access denied by the "
        "AS, 4 network or transport failure (not found, refused, timed out, unreachable)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML with any of: bundle, state, timeout, proxy, max_object_size, tcp_threshold "
        "(flags override it)",
    )
    parser.add_argument("--bundle", metavar="FILE", help="credentials bundle")
    parser.add_argument("--state", metavar="DIR", help="state directory (made with mode 0700)")
    parser.add_argument(
        "--timeout",
        type=_positive,
        metavar="S",
        help=f"seconds to wait for an answer (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-object-size",
        type=_object_size,
        metavar="BYTES",
        help=f"largest object taken (default: {DEFAULT_MAX_OBJECT_SIZE}, 64 MiB + 4 KiB; at most "
        f"{MAX_OBJECT_SIZE_LIMIT})",
    )
    parser.add_argument(
        "--tcp-threshold",
        type=_threshold,
        metavar="BYTES",
        help="objects announced (Size2) at least this large come over CoAP over TCP from the "
        "same port, falling back to UDP; 'off': never "
        f"(default: {DEFAULT_TCP_THRESHOLD})",
    )
    add_logging_arguments(parser, default="warning")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("uri", metavar="URI", help="coap://HOST[:PORT]/<producer>/<path>")
        sub.add_argument("--json", action="store_true", help="one JSON line per reading")
        sub.add_argument(
            "--proxy",
            metavar="URI",
            help="forward proxy coap://HOST[:PORT], or PROXY_ID=coaps://HOST[:PORT] for an OSCAR "
            "proxy over DTLS (its device id; the link key comes from the AS)",
        )
        sub.add_argument(
            "--resource", metavar="RID", help="expected resource id (default: the URI's path)"
        )

    get = commands.add_parser(
        "get", help="fetch one reading", description="Fetch, verify and open one reading."
    )
    common(get)
    get.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the plaintext here (0600), in bounded memory however large the object; the "
        "file appears only once every check has passed",
    )
    parts = commands.add_parser(
        "parts",
        help="fetch a multi-part object: the parts this consumer may read",
        description="Fetch and verify an object of several parts (issue 19); print, as one JSON "
        "line, each part this consumer is granted (and the plain ones), and the names of the "
        "others.",
    )
    common(parts)
    observe = commands.add_parser(
        "observe",
        help="observe a resource",
        description="Observe a resource: one reading per new object, until the server ends the "
        "observation (exit 4) or --count readings (exit 0).",
    )
    common(observe)
    observe.add_argument("--count", type=_count, metavar="N", help="stop after N readings")

    def group_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("group", metavar="GROUP", help="ADDRESS:PORT or [IPv6]:PORT")
        sub.add_argument(
            "--interface",
            metavar="ADDR",
            default=ANY_INTERFACE,
            help="IPv4 address, or IPv6 interface name or address, to join and send on "
            "(default: the system's choice, IPv4 only)",
        )
        sub.add_argument("--json", action="store_true", help="one JSON line per reading")

    listen = commands.add_parser(
        "listen",
        help="receive the new readings sent to a multicast group",
        description="Join a multicast group and write each new reading of the resources named.",
    )
    group_args(listen)
    listen.add_argument("resources", metavar="RID", nargs="+", help="<producer>/<path>")
    listen.add_argument("--count", type=_count, metavar="N", help="stop after N readings")
    group_get = commands.add_parser(
        "group-get",
        help="read a resource from every producer of a multicast group",
        description="One GET to a multicast group; each producer's reading, checked.",
    )
    group_args(group_get)
    group_get.add_argument("path", metavar="PATH", help="the resource's path under each producer")
    group_get.add_argument(
        "--wait", type=_positive, default=2.0, metavar="S", help="seconds to collect answers"
    )
    return parser


def _configure_logging(level: str, json_lines: bool) -> None:
    configure_logging(level, json_lines=json_lines)
    warnings.filterwarnings("ignore", module="aiocoap")


def _write_out(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _warn_stale(stale: StaleCopy, instead: bool) -> None:
    """One warning line on stderr: a stale copy is not an attack, and not an error either."""
    held = f"; showing the newest reading held (epoch {stale.seen[0]} seq {stale.seen[1]})"
    text = stale.describe() + (held if instead else "")
    sys.stdout.flush()
    print(f"{PROG}: warning: {' '.join(text.split())}", file=sys.stderr, flush=True)


async def _get(consumer: Consumer, args: argparse.Namespace) -> int:
    if args.output is None:
        reading = await consumer.get(
            args.uri, resource=args.resource, proxy=args.proxy, on_stale=_warn_stale
        )
        _write_out(
            reading_json(reading).encode("ascii") + b"\n" if args.json else reading.plaintext
        )
        return 0
    try:
        metadata = await consumer.get_file(
            args.uri, args.output, resource=args.resource, proxy=args.proxy, on_stale=_warn_stale
        )
        length = os.stat(args.output).st_size
    except OSError as exc:
        raise UsageError(f"cannot write {args.output!r}: {exc.strerror or exc}") from None
    if args.json:
        doc = json.loads(reading_json(Reading(b"", metadata)))
        del doc["value"], doc["encoding"]
        doc.update(output=str(args.output), length=length)
        _write_out(json.dumps(doc).encode("ascii") + b"\n")
    return 0


async def _observe(consumer: Consumer, args: argparse.Namespace) -> int:
    rejected = 0

    def on_reject(exc: InvalidObject) -> None:
        nonlocal rejected
        rejected += 1
        fail(PROG, f"object rejected: {exc.reason}", 1)

    received = 0
    observation = consumer.observe(
        args.uri,
        resource=args.resource,
        proxy=args.proxy,
        on_reject=on_reject,
        on_stale=_warn_stale,
    )
    try:
        async for reading in observation:
            if args.json:
                _write_out(reading_json(reading).encode("ascii") + b"\n")
            else:
                _write_out(reading.plaintext + b"\n")
            received += 1
            if args.count is not None and received >= args.count:
                break
    finally:
        await observation.aclose()
    return 1 if rejected else 0


async def _listen(consumer: Consumer, args: argparse.Namespace) -> int:
    received = 0
    async with consumer.join_group(args.group, args.resources, interface=args.interface) as group:
        async for _, reading in group:
            _write_out(
                reading_json(reading).encode("ascii") + b"\n"
                if args.json
                else reading.plaintext + b"\n"
            )
            received += 1
            if args.count is not None and received >= args.count:
                break
    return 0


async def _group_get(consumer: Consumer, args: argparse.Namespace) -> int:
    readings = await consumer.group_get(
        args.group, args.path, timeout=args.wait, interface=args.interface
    )
    if not readings:
        raise TimedOut(f"no producer of group {args.group} answered in {args.wait:g} s")
    for resource_id, reading in sorted(readings.items()):
        _write_out(
            reading_json(reading).encode("ascii") + b"\n"
            if args.json
            else resource_id.encode() + b" " + reading.plaintext + b"\n"
        )
    return 0


def _apply_config(args: argparse.Namespace) -> None:
    """Fill what the flags leave unset from ``--config``; bundle and state are required."""
    if args.config is not None:
        path = Path(args.config)
        doc = read_toml(path, UsageError)
        kinds: dict[str, type | tuple[type, ...]] = {
            "bundle": str,
            "state": str,
            "timeout": (int, float),
            "proxy": str,
            "max_object_size": int,
            "tcp_threshold": (int, str),
        }
        unknown = set(doc) - set(kinds)
        if unknown:
            raise UsageError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
        for key, value in doc.items():
            if not isinstance(value, kinds[key]) or isinstance(value, bool):
                raise UsageError(f"{path}: {key} has the wrong type")
            if key in ("bundle", "state"):
                value = str(path.parent / os.path.expanduser(str(value)))  # ~user: as is
            if key == "timeout" and not value > 0:
                raise UsageError(f"{path}: timeout must be positive")
            if key == "max_object_size":
                try:
                    _check_object_size(value, ValueError)
                except ValueError as exc:
                    raise UsageError(f"{path}: {exc}") from None
            if key == "tcp_threshold":
                try:
                    value = _threshold(str(value)) if value == "off" else check_threshold(value)
                except (ValueError, argparse.ArgumentTypeError):
                    raise UsageError(
                        f'{path}: tcp_threshold is a number of bytes (0 to 4294967295) or "off"'
                    ) from None
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    if args.bundle is None or args.state is None:
        raise UsageError("--bundle and --state are required (or a --config that gives them)")
    if args.timeout is None:
        args.timeout = DEFAULT_TIMEOUT
    if getattr(args, "max_object_size", None) is None:
        args.max_object_size = DEFAULT_MAX_OBJECT_SIZE
    if getattr(args, "tcp_threshold", None) is None:
        args.tcp_threshold = DEFAULT_TCP_THRESHOLD


async def _run(args: argparse.Namespace) -> int:
    if args.command in ("get", "observe", "parts"):  # bad usage: change nothing
        parse_target(args.uri, resource=args.resource, proxy=args.proxy)
    else:
        Group.parse(args.group)
    quiet_undecodable_datagrams(asyncio.get_running_loop(), log)
    threshold = None if args.tcp_threshold == "off" else args.tcp_threshold
    async with Consumer(
        args.bundle,
        args.state,
        timeout=args.timeout,
        max_object_size=args.max_object_size,
        tcp_threshold=threshold,
    ) as consumer:
        if args.command == "get":
            return await _get(consumer, args)
        if args.command == "parts":
            reading = await consumer.get_parts(args.uri, resource=args.resource, proxy=args.proxy)
            _write_out(parts_json(reading).encode("ascii") + b"\n")
            return 0
        if args.command == "listen":
            return await _listen(consumer, args)
        if args.command == "group-get":
            return await _group_get(consumer, args)
        return await _observe(consumer, args)


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit status (see the module docstring)."""
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        _apply_config(args)
    except UsageError as exc:
        return fail(PROG, str(exc), 2)
    _configure_logging(args.log_level, args.log_json)
    try:
        return asyncio.run(_run(args))
    except StaleCopy as exc:  # not an attack: what was served, what we have seen, when fresh
        return fail(PROG, f"{exc.kind}: {exc.describe()}", 4)
    except InvalidObject as exc:
        return fail(PROG, f"object rejected: {exc.reason}", 1)
    except AccessDenied as exc:
        return fail(PROG, f"access denied by the AS: {exc}", 3)
    except TransportError as exc:
        return fail(PROG, f"{exc.kind}: {exc}", 4)
    except StateError as exc:
        return fail(PROG, f"state unusable: {exc}", 2)
    except BundleError as exc:
        return fail(PROG, str(exc), 2)
    except OSError as exc:  # the state directory cannot be made, stdout is closed
        where = f" {exc.filename}" if exc.filename else ""
        return fail(PROG, f"cannot use{where}: {exc.strerror or type(exc).__name__}", 2)
    except (UsageError, OscarError, ValueError, TypeError) as exc:
        return fail(PROG, str(exc), 2)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback: it could show secret or plaintext values
        return fail(PROG, f"internal error ({type(exc).__name__})", 2)
