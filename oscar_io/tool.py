"""``oscar``: the offline operator tool (keygen, seal, open, verify, inspect).

This is the thin I/O shell over the library: it reads and writes files, stdin and stdout, reads the
clock and lets the operating system make keys; every protocol decision is taken by
:mod:`oscar.objects`. ``-`` stands for stdin or stdout wherever a FILE is asked for.

Exit status: 0 success, 1 the object was rejected (or is not decodable), 2 bad usage or bad
input (unreadable file, bad PEM, bad secret, unknown algorithm, arguments the library refuses).
Every failure is one line on stderr, ``oscar <command>: error: ...``; exceptions are translated to
it in one place, :func:`main`. No message ever holds a secret or plaintext.

What it does not do: talk to the network, or remember anything. In particular it keeps no record of
sequence numbers: the operator must never seal two objects with the same ``--seq`` under the same
resource and epoch (the AEAD nonce would repeat).

Its files are read and written by :mod:`oscar_io.tool_files`; ``inspect``'s rendering and
``open --json``'s document are made by :mod:`oscar_io.tool_inspect`.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from oscar import __version__, algorithms, cbor, certs, objects, profiles
from oscar.algorithms import PrivateKey
from oscar.errors import CertificateError, InvalidObject, OscarError
from oscar.keys import AccessSecret

from .clikit import OneLineParser, fail, parse_args
from .errors import UsageError
from .tool_files import create_file, read_file, write_file
from .tool_inspect import describe, metadata_json, printable

__all__ = ["build_parser", "main"]

PROG = "oscar"
DEFAULT_LIFETIME = 3600

Handler = Callable[[argparse.Namespace], int]


class Undecodable(Exception):
    """The input is not even a decodable COSE_Sign1 (or CBOR, for --diag): exit 1."""


def _secret(args: argparse.Namespace) -> AccessSecret:
    if args.input == "-" and args.secret_file == "-":  # noqa: S105 (a path, not a password)
        raise UsageError("--secret-file and --in cannot both be stdin")
    if args.secret_file is not None:
        try:
            text = read_file(args.secret_file, "secret file").decode("ascii")
        except UnicodeDecodeError:
            raise UsageError("the secret file does not hold hexadecimal text") from None
        source = "--secret-file"
    else:
        text, source = args.secret, "--secret"
    try:
        return AccessSecret.from_hex(text)
    except ValueError as exc:  # its message never echoes the input
        raise UsageError(f"{source}: {exc}") from None


def _private_key(path: str) -> PrivateKey:
    try:
        return certs.load_private_key(read_file(path, "key"))
    except ValueError as exc:
        raise UsageError(f"key {path!r}: {exc}") from None


def _signer(args: argparse.Namespace) -> tuple[objects.Signer, x509.Certificate | None]:
    """The signer and trust anchor to check against, from --signer and --ca.

    A certificate without --ca is trusted because the operator handed it over, so it is turned
    into a ProducerKey explicitly (the library refuses an unanchored certificate otherwise).
    """
    try:
        signer = certs.load_signer(read_file(args.signer, "signer"))
    except ValueError as exc:
        raise UsageError(f"signer {args.signer!r}: {exc}") from None
    if args.ca is None:
        if not isinstance(signer, x509.Certificate):
            return signer, None
        try:
            return certs.ProducerKey.from_certificate(signer, None, now=_now(args)), None
        except CertificateError as exc:
            raise InvalidObject(f"signer not acceptable: {exc}") from None
    if not isinstance(signer, x509.Certificate):
        raise UsageError("--ca needs a certificate as --signer, not a bare public key")
    try:
        anchor = certs.load_signer(read_file(args.ca, "CA certificate"))
    except ValueError as exc:
        raise UsageError(f"CA {args.ca!r}: {exc}") from None
    if not isinstance(anchor, x509.Certificate):
        raise UsageError(f"CA {args.ca!r}: a public key, not a certificate")
    return signer, anchor


def _now(args: argparse.Namespace) -> int:
    return int(time.time()) if args.now is None else int(args.now)


# --- commands ------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    """Make a signing key (ES256: ECDSA P-256, or EdDSA: Ed25519) and write it as unencrypted PKCS#8
    PEM with mode 0600, and its public key too with --public. An existing file is replaced only with
    --force. Prints the key id (kid), nothing secret.
    """
    if args.out == "-" and args.public == "-":
        raise UsageError("--out and --public cannot both be stdout")
    key = certs.generate_signing_key(args.alg)
    create_file(args.out, certs.private_key_pem(key), 0o600, force=args.force, what="key")
    if args.public is not None:
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        create_file(args.public, public_pem, 0o644, force=args.force, what="public key")
    # Keep stdout for the key when it goes there.
    report = sys.stderr if "-" in (args.out, args.public) else sys.stdout
    kid = certs.key_id(key.public_key()).hex()
    print(f"{algorithms.signature_algorithm_of_key(key).name} key written, kid {kid}", file=report)
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    """Encrypt the plaintext under the epoch's content key, then sign it with the producer's key;
    write the protected object (COSE_Sign1 over COSE_Encrypt0). The signature algorithm follows
    the key. SEQ must never be reused under one resource and epoch, and this tool keeps no record
    of it. AES-CCM-16-64-128 seals at most 65535 bytes: larger plaintexts need another AEAD.
    """
    secret = _secret(args)
    key = _private_key(args.key)
    aead = profiles.aead_by_name(args.aead)
    profile = profiles.profile_for(aead, algorithms.signature_algorithm_of_key(key))
    iat = int(time.time()) if args.iat is None else int(args.iat)
    if args.exp is not None:
        exp = int(args.exp)
    else:
        exp = iat + (DEFAULT_LIFETIME if args.max_age is None else int(args.max_age))
    plaintext = read_file(args.input, "input")
    sealed = objects.seal(
        secret=secret,
        producer_id=args.producer,
        resource_id=args.resource,
        epoch=args.epoch,
        seq=args.seq,
        iat=iat,
        exp=exp,
        content_format=args.content_format,
        plaintext=plaintext,
        signing_key=key,
        profile=profile,
    )
    write_file(args.output, sealed, "output")
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    """Verify a protected object (structure, signer, signature, expiry) and decrypt it with the
    access secret; write the plaintext, or with --json its signed metadata and the plaintext (text,
    or base64). Exit status 1 if any check fails.
    """
    secret = _secret(args)
    signer, anchor = _signer(args)
    data = read_file(args.input, "input")
    reading = objects.open(
        data,
        secrets=lambda _resource, _epoch: secret,
        signer=signer,
        now=_now(args),
        resource_id=args.resource,
        trust_anchor=anchor,
    )
    if not args.json:
        write_file(args.output, reading.plaintext, "output")
        return 0
    document = metadata_json(reading.metadata)
    try:
        document["plaintext"] = reading.plaintext.decode("utf-8")
    except UnicodeDecodeError:
        document["plaintext_base64"] = base64.b64encode(reading.plaintext).decode("ascii")
    write_file(args.output, json.dumps(document, indent=2).encode("ascii") + b"\n", "output")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a protected object without any secret: structure, signer (its chain to --ca, if
    given), signature and expiry. Prints one line of its signed metadata. Exit status 1 if any
    check fails.
    """
    signer, anchor = _signer(args)
    data = read_file(args.input, "input")
    obj = objects.verify(
        data, signer=signer, now=_now(args), resource_id=args.resource, trust_anchor=anchor
    )
    m = obj.metadata
    print(
        printable(
            f"verified: producer={cbor.diagnostic(m.producer_id)} "
            f"resource={cbor.diagnostic(m.resource_id)} epoch={m.epoch} seq={m.seq} "
            f"iat={m.iat} exp={m.exp} aead={m.aead.name} signature={m.signature_algorithm.name} "
            f"content-format={m.content_format} kid={m.kid.hex()}"
        )
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the headers of any decodable COSE_Sign1 in readable form, verifying nothing: not the
    signature, not the signer, not the expiry. Exit status 1 if the bytes are not a COSE_Sign1.
    """
    data = read_file(args.input, "input")
    if args.diag:
        try:
            value = cbor.loads(data)
        except cbor.MalformedCBOR as exc:
            raise Undecodable(f"malformed CBOR: {exc}") from None
        print(printable(cbor.diagnostic(value, indent=2), keep_newlines=True))
        return 0
    try:
        lines = describe(data)
    except InvalidObject as exc:
        raise Undecodable(exc.reason) from None
    print("\n".join(printable(line) for line in lines))
    return 0


# --- parser and entry point ----------------------------------------------------------------------


def _add_secret(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    # No ``type=``: argparse would echo a bad value in its error message.
    group.add_argument("--secret", metavar="HEX", help="access secret, 64 hex digits (shows in ps)")
    group.add_argument(
        "--secret-file", metavar="FILE", help="file with the secret as 64 hex digits"
    )


def _add_in(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--in", dest="input", metavar="FILE", required=True, help=what)


def _add_checks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--signer", metavar="PEM", required=True, help="public key or certificate")
    parser.add_argument("--ca", metavar="PEM", help="the signer certificate must chain to this CA")
    parser.add_argument("--now", type=int, help="check validity and expiry at (default: now)")
    parser.add_argument(
        "--resource", metavar="RID", help="the object must be of this resource (default: any)"
    )
    _add_in(parser, "the protected object")


def build_parser() -> argparse.ArgumentParser:
    """The ``oscar`` argument parser, one subcommand per operation."""
    parser = OneLineParser(
        prog=PROG,
        description="OSCAR offline operator tool. FILE '-' is stdin or stdout; times (IAT, EXP, "
        "NOW) are seconds since 1970.",
        epilog="exit status: 0 success, 1 object rejected, 2 bad usage or input",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=handler.__doc__, allow_abbrev=False
        )
        sub.set_defaults(handler=handler)
        return sub

    keygen = command("keygen", cmd_keygen, "make a signing key")
    keygen.add_argument(
        "--alg", choices=["ES256", "EdDSA"], default="ES256", help="(default: ES256)"
    )
    keygen.add_argument("--out", metavar="KEY.pem", required=True, help="private key, mode 0600")
    keygen.add_argument("--public", metavar="OUT.pem", help="also write the public key here")
    keygen.add_argument("--force", action="store_true", help="replace existing files")

    seal = command("seal", cmd_seal, "seal a representation")
    _add_secret(seal)
    seal.add_argument("--producer", required=True, help="producer id (iss claim)")
    seal.add_argument("--resource", required=True, help="resource id <producer>/<path> (sub)")
    seal.add_argument("--epoch", type=int, required=True, help="epoch of the access secret")
    seal.add_argument("--seq", type=int, required=True, help="NEVER reuse in a resource and epoch")
    seal.add_argument("--key", metavar="KEY.pem", required=True, help="private key, sets the alg")
    seal.add_argument(
        "--aead",
        metavar="NAME|ID",
        default="AES-CCM-16-64-128",
        help="AES-CCM-16-64-128 (10, the default; at most 65535 bytes), A128GCM (1), "
        "A256GCM (3) or ChaCha20/Poly1305 (24)",
    )
    seal.add_argument("--content-format", metavar="N", type=int, default=0, help="(default: 0)")
    seal.add_argument("--iat", type=int, help="issued-at time (default: now)")
    lifetime = seal.add_mutually_exclusive_group()
    lifetime.add_argument("--exp", type=int, help="expiry time (default: IAT + 3600)")
    lifetime.add_argument("--max-age", metavar="S", type=int, help="or expire S seconds after IAT")
    _add_in(seal, "the plaintext")
    seal.add_argument("--out", dest="output", metavar="FILE", required=True, help="the object")

    open_ = command("open", cmd_open, "verify and decrypt")
    _add_secret(open_)
    _add_checks(open_)
    open_.add_argument(
        "--out", dest="output", metavar="FILE", default="-", help="(default: stdout)"
    )
    open_.add_argument("--json", action="store_true", help="metadata and plaintext as JSON")

    _add_checks(command("verify", cmd_verify, "verify without a secret"))

    inspect = command("inspect", cmd_inspect, "show the headers, not verified")
    _add_in(inspect, "the object")
    inspect.add_argument("--diag", action="store_true", help="all in CBOR diagnostic notation")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit status (see the module docstring)."""
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    prog = f"{PROG} {args.command}"
    handler: Handler = args.handler
    try:
        return handler(args)
    except InvalidObject as exc:
        return fail(prog, f"object rejected: {exc.reason}", 1)
    except Undecodable as exc:
        return fail(prog, f"cannot decode: {exc}", 1)
    except (UsageError, OscarError, ValueError, TypeError) as exc:
        return fail(prog, str(exc), 2)
    except OSError as exc:  # stdin or stdout failed
        return fail(prog, exc.strerror or type(exc).__name__, 2)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback: it could show secret or plaintext values
        return fail(prog, f"internal error ({type(exc).__name__})", 2)
