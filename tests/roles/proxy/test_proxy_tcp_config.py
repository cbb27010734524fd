"""The proxy's TCP listener setting: TOML, flag, and a clear error for a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import _config, build_parser
from proxy.config import ConfigError, load_config


def test_tcp_from_toml_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('bundle = "b"\nstate = "s"\nlisten = "127.0.0.1:5683"\ntcp = true\n')
    assert load_config(path).tcp is True
    assert load_config(path).tls is False
    args = build_parser().parse_args(["--bundle", "b", "--state", "s", "--listen", "127.0.0.1:1"])
    assert _config(args).tcp is False
    args = build_parser().parse_args(
        ["--bundle", "b", "--state", "s", "--listen", "127.0.0.1:1", "--tcp", "--tls", "--no-dtls"]
    )
    assert (_config(args).tcp, _config(args).tls) == (True, True)


def test_a_bad_tcp_value_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('bundle = "b"\nstate = "s"\nlisten = "127.0.0.1:5683"\ntcp = "yes"\n')
    with pytest.raises(ConfigError, match="tcp is true or false"):
        load_config(path)
    path.write_text('bundle = "b"\nstate = "s"\nlisten = "127.0.0.1:5683"\ntls = 1\n')
    with pytest.raises(ConfigError, match="tls is true or false"):
        load_config(path)
    path.write_text(
        'bundle = "b"\nstate = "s"\nlisten = "127.0.0.1:5683"\nplain = false\ndtls = false\n'
    )
    with pytest.raises(ConfigError, match="nothing to listen on"):
        load_config(path)
