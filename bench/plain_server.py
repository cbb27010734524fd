"""The baseline server of the network benchmarks: a plain aiocoap server with fixed payloads.

::

    python -m bench.plain_server --listen 127.0.0.1:PORT --resource NAME=SIZE [...]
    python -m bench.plain_server --listen 127.0.0.1:PORT --resource NAME=SIZE --dtls-psks FILE
    python -m bench.plain_server --listen 127.0.0.1:PORT --file NAME=PATH [--content-format N]

Each ``--resource NAME=SIZE`` serves SIZE bytes of text at ``/NAME`` (content format 0, with an
8-byte ETag and Max-Age 60, as the producer's answers carry); each ``--file NAME=PATH`` serves the
bytes of the file PATH (read once, at start) the same way, with content format ``--content-format``
(0 unless given; 18 makes the answer as long as a producer's or proxy's). Without ``--dtls-psks``
it serves plain CoAP (transport ``udp6``, as the producer does). With it, DTLS only
(``tinydtls_server``, on port PORT + 1) with one PSK per client identity from FILE, a JSON object
``{"identity": "psk hex", ...}``. It prints ``plain server ready`` when serving and runs until
SIGTERM or SIGINT.

It does nothing else: no sealing, no AS, nothing per request beyond what aiocoap does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from aiocoap import Context, Message
from aiocoap.resource import Resource, Site

__all__ = ["main"]


class FixedPayload(Resource):  # type: ignore[misc]
    """The same bytes to every GET."""

    def __init__(self, size: int, payload: bytes | None = None, content_format: int = 0) -> None:
        super().__init__()
        self.payload = bytes(0x30 + i % 10 for i in range(size)) if payload is None else payload
        self.content_format = content_format
        self.etag = size.to_bytes(8, "big")

    async def render_get(self, request: Message) -> Message:
        return Message(
            payload=self.payload, content_format=self.content_format, etag=self.etag, max_age=60
        )


async def _serve(args: argparse.Namespace) -> None:
    site = Site()
    for item in args.resource:
        name, _, size = item.partition("=")
        site.add_resource((name,), FixedPayload(int(size)))
    for item in args.file:
        name, _, path = item.partition("=")
        payload = Path(path).read_bytes()
        site.add_resource((name,), FixedPayload(len(payload), payload, args.content_format))
    host, _, port = args.listen.rpartition(":")
    transports = ["udp6"] if args.dtls_psks is None else ["tinydtls_server"]
    context = await Context.create_server_context(
        site, bind=(host, int(port)), transports=transports
    )
    try:
        if args.dtls_psks is not None:
            psks = json.loads(Path(args.dtls_psks).read_text())
            context.server_credentials.load_from_dict(
                {
                    f":{identity}": {
                        "dtls": {"psk": bytes.fromhex(psk), "client-identity": identity.encode()}
                    }
                    for identity, psk in psks.items()
                }
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print("plain server ready", flush=True)
        await stop.wait()
    finally:
        await context.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_server", description=__doc__)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--resource", action="append", default=[], metavar="NAME=SIZE")
    parser.add_argument("--file", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--content-format", type=int, default=0, metavar="N", help="for --file")
    parser.add_argument("--dtls-psks", metavar="FILE", help="serve DTLS-PSK only, these PSKs")
    args = parser.parse_args(argv)
    # Session closes are logged as warnings ("Unhandled alert level 1 code 0"): noise here.
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
