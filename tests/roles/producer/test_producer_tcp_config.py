"""The producer's TCP and TLS listener settings: flags, TOML, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer import ConfigError, ProducerConfig, load_config
from producer.cli import _config, build_parser


def test_tcp_and_tls_from_toml_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('bundle = "b.json"\nstate = "s"\nlisten = "127.0.0.1:5683"\ntcp = true\n')
    config = load_config(path)
    assert (config.tcp, config.tls) == (True, False)
    args = build_parser().parse_args(["--config", str(path), "--tls"])
    assert (_config(args).tcp, _config(args).tls) == (True, True)
    plain = build_parser().parse_args(["--bundle", "b", "--state", "s", "--listen", "[::1]:7000"])
    assert (_config(plain).tcp, _config(plain).tls) == (False, False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tcp": "yes"}, "tcp is true or false"),
        ({"tls": 1}, "tls is true or false"),
        ({"tcp": True, "listen": None}, "tcp = true needs listen"),
        ({"tls": True, "listen": ("127.0.0.1", 65535)}, "below 65535"),
    ],
)
def test_bad_tcp_settings_are_one_clear_error(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "bundle": Path("b"),
        "state": Path("s"),
        "listen": ("127.0.0.1", 5683),
        "publish": (),
    }
    values.update(kwargs)
    if values["listen"] is None:
        from producer import PublishTarget

        values["publish"] = [PublishTarget("coaps://p.example:5684", proxy="cloud-1")]
    with pytest.raises(ConfigError, match=message):
        ProducerConfig(**values)  # type: ignore[arg-type]


def test_a_tcp_setting_of_the_wrong_type_in_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('bundle = "b"\nstate = "s"\nlisten = "127.0.0.1:5683"\ntls = "on"\n')
    with pytest.raises(ConfigError, match="tls is true or false"):
        load_config(path)
