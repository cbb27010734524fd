"""Target ``config_as``: the AS CLI's ``serve --config`` loader (``apply_serve_config``).

Contract (authz_server/cli/serve.py): a bad configuration raises ``UsageError`` and nothing
else; what it accepts gives state and listen, a known log level, and no negative (or zero, but
retention) numbers.
"""

from __future__ import annotations

import argparse

from authz_server.cli.serve import SERVE_KEYS, apply_serve_config
from oscar_io.errors import UsageError

from ._common import expect
from ._config import config_file

__all__ = ["TestOneInput", "seeds"]


def TestOneInput(data: bytes) -> None:
    args = argparse.Namespace(config=config_file(data), **dict.fromkeys(SERVE_KEYS))
    args.log_json = False
    try:
        apply_serve_config(args)
    except UsageError:
        return
    expect(args.state is not None and args.listen is not None, "state or listen left unset")
    expect(args.log_level in ("debug", "info", "warning", "error"), "unknown log level")


def seeds() -> list[bytes]:
    return [
        b'state = "st"\nlisten = "127.0.0.1:5684"\nretention = 0\nrate = 2.5\nburst = 10\n'
        b"max_connections = 100\ntick = 1\ncrl_validity = 3600\nmin_rotation_period = 60\n"
        b'log_level = "debug"\nlog_json = true\n',
        b'state = "s"\nlisten = ":1"\n',
        b"rate = -1\n",
    ]
