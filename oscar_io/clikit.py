"""The command-line kit every OSCAR program shares: a parser that reports a usage error in one
line and never echoes a value that could be a secret, one-line failures, logging set-up (plain or
JSON lines), TOML configuration files."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

__all__ = [
    "LOG_LEVELS",
    "OneLineParser",
    "add_logging_arguments",
    "configure_logging",
    "fail",
    "parse_args",
    "read_toml",
    "unrecognized",
]


# argparse quotes the offending argument in its messages; a mistyped option could be followed by a
# secret, so such runs never reach the terminal.
_SECRETISH = re.compile(r"[0-9A-Fa-f]{16,}")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a usage error in one line, like every other failure, and
    never repeats an argument that could be a secret. Options cannot be abbreviated.

    Shared by every OSCAR command-line tool (``oscar``, ``oscar-as``, …)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    _arguments: list[str] | None = None

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's, but arguments nobody takes are named by :func:`unrecognized`."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = _chosen(self, parsed)  # the subcommand's parser: its prog, its options
            chosen.error(unrecognized(extras, _option_strings(chosen, recurse=False)))
        return parsed

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Kept for error(): argparse reports missing required arguments before the unknown ones,
        # and a misspelt option is usually why a required one is "missing".
        self._arguments = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message = "unrecognized arguments"
        elif self._arguments is not None and not message.startswith("unrecognized option"):
            known = _option_strings(self)
            unknown = [a for a in self._arguments if a.split("=", 1)[0] not in known]
            options = [a for a in unknown if _OPTION_NAME.fullmatch(a.split("=", 1)[0])]
            if options:
                message = f"{unrecognized(options, known)}; {message}"
        message = _SECRETISH.sub("<redacted>", message)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _option_strings(parser: argparse.ArgumentParser, *, recurse: bool = True) -> set[str]:
    """Every option string of ``parser`` (and of its subcommands' parsers, recursively)."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if recurse and isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                found |= _option_strings(sub)
    return found


def _chosen(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> Any:
    """The innermost subcommand parser ``parsed`` went through (``parser`` if none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(parsed, action.dest, None) or "")
            if sub is not None:
                return _chosen(sub, parsed)
    return parser


#: An option name as it may be shown: dashes, then letters, digits, '-' and '_' (at most 40).
_OPTION_NAME = re.compile(r"-{1,2}[A-Za-z][A-Za-z0-9_-]{0,39}")


def unrecognized(extras: Sequence[str], known: Iterable[str] = ()) -> str:
    """The usage error for arguments no parser took: the misspelt options by name only (the text
    before any ``=``; ``--secrt=abcd`` shows ``--secrt``), with the nearest known option, and
    any other argument only counted, never shown (it could be a secret given to a misspelt
    option, or a path)."""
    import difflib

    names: list[str] = []
    values = 0
    for arg in extras:
        name = arg.split("=", 1)[0]
        if _OPTION_NAME.fullmatch(name) and not _SECRETISH.search(name):
            if name not in names:
                names.append(name)
        else:
            values += 1
    known = sorted(known)
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    message = ""
    if parts:
        message = f"unrecognized option{'s' if len(parts) > 1 else ''}: {', '.join(parts)}"
    if values:
        stray = f"{values} unexpected argument{'s' if values > 1 else ''} (not shown)"
        message = f"{message}; and {stray}" if message else stray
    return message


def fail(prog: str, message: str, status: int) -> int:
    """Print ``message`` as one ``PROG: error:`` line on stderr; return ``status``."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


LOG_LEVELS = ("debug", "info", "warning", "error")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def add_logging_arguments(parser: argparse.ArgumentParser, default: str | None = "info") -> None:
    """``--log-level`` and ``--log-json``, the same in every OSCAR daemon and client."""
    parser.add_argument(
        "--log-level",
        default=default,
        type=str.lower,
        choices=LOG_LEVELS,
        help=f"(default: {default or 'from the configuration, else info'})",
    )
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")


def configure_logging(level: str, *, json_lines: bool = False) -> None:
    """Logs to stderr, one line per event (plain text, or JSON with ``json_lines``).

    Libraries that would log message bytes or SQL parameters at debug level are held back:
    aiocoap (payloads; and it logs every DTLS close_notify as a warning) and aiosqlite
    (statements with their parameters, ciphertexts included)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings become log lines too (JSON ones with JSON)
    for name in ("coap", "coap-server"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


def read_toml(path: os.PathLike[str] | str, error: type[Exception]) -> dict[str, Any]:
    """A configuration file's TOML; ``error`` (the caller's usage-error class) with one line
    saying what is wrong when it cannot be read or parsed."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:  # tomllib decodes the whole file before parsing (issue 8, fuzzing)
        raise error(f"{path} is not valid TOML: not UTF-8 text") from None


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status when argparse ended the run (--help, --version,
    or a usage error it already reported in one line)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
