"""Target ``config_producer``: :func:`producer.config.load_config` on any file content.

Contract (producer/config.py): a bad configuration raises ``ConfigError`` and nothing else.
"""

from __future__ import annotations

from producer.config import ConfigError, ProducerConfig, load_config

from ._common import expect
from ._config import config_file

__all__ = ["TestOneInput", "seeds"]


def TestOneInput(data: bytes) -> None:
    try:
        config = load_config(config_file(data))
    except ConfigError:
        return
    expect(isinstance(config, ProducerConfig), "load_config returned no ProducerConfig")


def seeds() -> list[bytes]:
    return [
        b'bundle = "b.cbor"\nstate = "st"\nlisten = "127.0.0.1:5683"\n'
        b'[[resource]]\npath = "temperature"\nfile = "t.txt"\nmax_age = 60\n',
        b'bundle = "b"\nstate = "s"\nkey_algorithm = "EdDSA"\nsequence_window = 64\n'
        b'[[publish]]\nuri = "coap://127.0.0.1:5683/p"\nproxy = "cloud-1"\n'
        b'[[resource]]\npath = "a/b"\ncommand = ["date"]\ninterval = 1.5\n'
        b'profile = "a128gcm-es256"\n',
        b"[[resource]]\npath = 1\n",
    ]
