"""What the interop tests (issue 6) put around stacks we did not write.

- :func:`require_tool`: the path of an external command, or a failure that says how to install it
  (a missing tool fails the test, it never skips it);
- :func:`run_tool`: one external command without blocking the event loop, bytes in and out;
- :func:`split_cbor_sequence`: the objects of several notifications that a tool wrote back to
  back into one file (concatenated CBOR items are an RFC 8742 CBOR sequence);
- :class:`Opener`: opens saved objects with the consumer library and with
  ``python -m oscar_io open`` (the offline tool), with the secrets a consumer gets from the AS.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import cbor2
from as_harness import ROOT
from cryptography.hazmat.primitives import serialization

import oscar
from consumer import Consumer
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

INSTALL_HINTS = {
    "coap-client": "libcoap 4.3 tools are missing: run `make deps` as root "
    "(apt-get install -y libcoap3-bin)",
    "aiocoap-client": "aiocoap-client is missing from the venv: reinstall with `make .stamp-venv`",
}


def require_tool(name: str) -> str:
    """The full path of ``name``; an AssertionError naming the fix if it is not installed."""
    venv_bin = Path(os.path.abspath(sys.executable)).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    hint = INSTALL_HINTS["coap-client" if name.startswith("coap-") else name]
    assert found is not None, f"{name} not found: {hint}"
    return found


async def run_tool(
    args: Sequence[str | bytes], timeout: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run ``args`` (bytes allowed: libcoap's ``-k`` takes the key as raw argv bytes) in a thread,
    stdout and stderr captured."""

    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(list(args), capture_output=True, timeout=timeout, cwd=ROOT)

    return await asyncio.to_thread(run)


def split_cbor_sequence(data: bytes) -> list[bytes]:
    """The encoded items of a CBOR sequence, each exactly as it was in ``data``."""
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    items = []
    while stream.tell() < len(data):
        start = stream.tell()
        decoder.decode()
        items.append(data[start : stream.tell()])
    return items


class Opener:
    """Opens objects as the consumer ``bundle`` would: the library, or the offline tool."""

    def __init__(self, bundle: Path, workdir: Path) -> None:
        self.bundle = bundle
        self.workdir = workdir
        self.ca_pem = workdir / "as-ca.pem"
        self.ca_pem.write_bytes(
            Bundle.load(bundle).ca_certificate.public_bytes(serialization.Encoding.PEM)
        )

    def consumer(self) -> Consumer:
        """A fresh consumer with in-memory state (use it as an async context manager)."""
        return Consumer(self.bundle)

    async def with_library(self, resource_id: str, objects: Sequence[bytes]) -> list[oscar.Reading]:
        """Open ``objects`` in order with a fresh :class:`consumer.Consumer` (in-memory state, so
        the freshness check runs across exactly these objects)."""
        async with self.consumer() as consumer:
            return [await consumer.open_object(obj, resource_id) for obj in objects]

    async def secret(self, resource_id: str, epoch: int) -> oscar.AccessSecret:
        async with AsClient(Bundle.load(self.bundle)) as client:
            return (await client.secret(resource_id, epoch)).secret

    async def with_cli(self, resource_id: str, obj_file: Path, signer_pem: Path) -> bytes:
        """``python -m oscar_io open`` on a saved object: the plaintext (the test fails if the tool
        refuses the object)."""
        epoch = oscar.ProtectedObject.from_bytes(obj_file.read_bytes()).metadata.epoch
        secret_file = self.workdir / f"secret-{os.getpid()}-{obj_file.name}.hex"
        secret_file.write_text((await self.secret(resource_id, epoch)).value.hex())
        secret_file.chmod(0o600)
        out = obj_file.with_name(obj_file.name + ".plain")
        result = await run_tool(
            [
                sys.executable, "-m", "oscar_io", "open",
                "--secret-file", str(secret_file),
                "--signer", str(signer_pem),
                "--ca", str(self.ca_pem),
                "--resource", resource_id,
                "--in", str(obj_file),
                "--out", str(out),
            ]
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        return out.read_bytes()
