"""Target ``config_consumer``: the consumer CLI's ``--config`` loader (``cli._apply_config``).

Contract (consumer/cli.py): a bad configuration raises ``UsageError`` and nothing else; what it
accepts leaves bundle and state set and a positive timeout.
"""

from __future__ import annotations

import argparse

from consumer.cli import UsageError, _apply_config

from ._common import expect
from ._config import config_file

__all__ = ["TestOneInput", "seeds"]


def TestOneInput(data: bytes) -> None:
    args = argparse.Namespace(
        config=str(config_file(data)), bundle=None, state=None, timeout=None, proxy=None
    )
    try:
        _apply_config(args)
    except UsageError:
        return
    expect(args.bundle is not None and args.state is not None, "bundle or state left unset")
    expect(args.timeout > 0, "a timeout that is not positive was accepted")


def seeds() -> list[bytes]:
    return [
        b'bundle = "b.cbor"\nstate = "st"\ntimeout = 5\nproxy = "coap://127.0.0.1"\n',
        b'bundle = "b"\nstate = "s"\ntimeout = 0.5\n',
        b"timeout = true\n",
    ]
