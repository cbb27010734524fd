"""Target ``config_proxy``: :func:`proxy.config.load_config` on any file content.

Contract (proxy/config.py): a bad configuration raises ``ConfigError`` and nothing else.
"""

from __future__ import annotations

from proxy.config import ConfigError, ProxyConfig, load_config

from ._common import expect
from ._config import config_file

__all__ = ["TestOneInput", "seeds"]


def TestOneInput(data: bytes) -> None:
    try:
        config = load_config(config_file(data))
    except ConfigError:
        return
    expect(isinstance(config, ProxyConfig), "load_config returned no ProxyConfig")


def seeds() -> list[bytes]:
    return [
        b'bundle = "b.cbor"\nstate = "st"\nlisten = "127.0.0.1:5683"\nplain = true\ndtls = false\n'
        b'[reverse]\n"sensor-1" = "coap://127.0.0.1:5700"\n'
        b"[limits]\nmax_entries = 100\n",
        b'bundle = "b"\nstate = "s"\nlisten = "[::1]:5683"\n[limits]\nupstream_timeout = 2.5\n',
        b'listen = "0.0.0.0:1"\n',
    ]
