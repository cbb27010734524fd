"""``oscar-as init`` (a new state directory), ``oscar-as enroll`` (a device and its
credentials bundle, the only place a PSK leaves the AS) and ``oscar-as set-as-uris`` (the AS
instances that bundles enrolled from then on list).

What it does not do: hold the PSK anywhere but in the bundle it writes and the store's envelope.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import cast

from cryptography import x509

from oscar import certs
from oscar.algorithms import PublicKey
from oscar.names import require_device_id
from oscar_io.bundle import LINK_PSK_LENGTH

from ..ca import CA_CERT_NAME, as_uris, credentials_bundle, init_state, set_as_uris
from ..store import (
    DATABASE_NAME,
    DB_NAME,
    MASTER_KEY_NAME,
    Conflict,
    Store,
    StoreError,
    check_database_url,
    redacted,
)
from .common import UsageError, as_uris_arg, run_on_store

__all__ = ["BUNDLE_MODE", "cmd_enroll", "cmd_init", "cmd_set_as_uris"]

BUNDLE_MODE = 0o600


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


def cmd_init(args: argparse.Namespace, now: int) -> int:
    """Make a new state directory (mode 0700): a master key (master.key, mode 0600, the only
    secret outside the database: back it up apart from the database), the database (as.db) and
    the CA key and certificate (ca.pem). Refuses a directory that holds an AS state or anything
    else. --as-uri may be repeated: every AS instance the bundles list, the preferred first
    (devices fail over to the others; see set-as-uris to change the list later).
    """
    state: Path = args.state
    uris = as_uris_arg(args.as_uri)
    as_uri = uris[0]
    database: str | None = args.database
    if database is not None:
        try:
            check_database_url(database)
        except StoreError as exc:
            raise UsageError(str(exc)) from None
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
        store = await init_state(state, as_uri=as_uri, as_uris=uris, now=now, database=database)
        await store.close()

    asyncio.run(body())
    ca_path = state / CA_CERT_NAME
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    kid = certs.key_id(cast("PublicKey", ca.public_key()))  # init_state made an ES256 key
    print(f"AS state initialized in {state} for {', '.join(uris)}")
    print(f"CA certificate: {ca_path} (kid {kid.hex()})")
    where = DB_NAME if database is None else "the database"
    if database is not None:
        print(f"database: {redacted(database)} (recorded in {state / DATABASE_NAME})")
    print(f"master key: {state / MASTER_KEY_NAME} (mode 0600; back it up apart from {where})")
    return 0


def cmd_enroll(args: argparse.Namespace, now: int) -> int:
    """Enroll a device: a fresh random 16-byte DTLS PSK under the device id as PSK identity, and a
    credentials bundle for the device (JSON: id, role, as_uri, as_uris, psk_identity, psk_hex,
    ca_cert_pem) written with mode 0600, or to stdout with --out -. as_uris lists every AS
    instance (--as-uri, repeatable, else those given to init or set-as-uris), as_uri is the first.
    Ids are never reused. The PSK is shown nowhere else: hand the bundle to the device over a
    safe channel.
    """
    device_id = require_device_id(args.id)
    override = None if args.as_uri is None else as_uris_arg(args.as_uri)
    out: str = args.out
    # The file is made before the device: a path that cannot be written fails with no change.
    fd, written = (-1, out) if out == "-" else _create_private(out, force=args.force)
    try:
        psk = os.urandom(LINK_PSK_LENGTH)  # tinydtls's limit, for a device PSK as for a link's

        async def body(store: Store) -> bytes:
            uris = override or await as_uris(store)
            if not isinstance(await store.get_meta("ca_cert"), bytes):
                raise StoreError("the database holds no CA certificate")
            await store.add_device(device_id, args.role, psk, now)
            return await credentials_bundle(store, device_id, args.role, psk, uris)

        data = run_on_store(args, body)
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


def cmd_set_as_uris(args: argparse.Namespace, now: int) -> int:
    """Record the AS instances (--as-uri, repeatable, the preferred first) that bundles enrolled
    from now on list. Bundles issued before keep the list they were written with: enroll those
    devices again (or hand them a new bundle) to move them. Audited."""
    uris = as_uris_arg(args.as_uri)

    async def body(store: Store) -> None:
        await set_as_uris(store, uris, now)

    run_on_store(args, body)
    print(f"bundles enrolled from now on list {', '.join(uris)}")
    return 0
