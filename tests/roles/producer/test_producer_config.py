"""producer.config: the listen address goes through oscar_io.ports.parse_listen (ports 1 to 65535,
as the producer always took), its ValueError as the producer's ConfigError. No process."""

from __future__ import annotations

from pathlib import Path

import pytest

from oscar_io.errors import UsageError
from producer.config import ConfigError, config_from_mapping, parse_listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5683", ("127.0.0.1", 5683)),
        ("[::1]:65535", ("::1", 65535)),
        ("sensor.example:1", ("sensor.example", 1)),
        ("[fe80::1%eth0]:5683", ("fe80::1%eth0", 5683)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["h:65536", "h:0", "h", ":5683", "::1:5683", "[::1]", "h:x", "h:-1", "h:"]
)
def test_a_bad_listen_address_is_a_config_error(text: str) -> None:
    expected = r"HOST:PORT or \[IPv6\]:PORT expected, the port from 1 to 65535"
    with pytest.raises(ConfigError, match=expected) as refused:
        parse_listen(text)
    assert isinstance(refused.value, UsageError) and isinstance(refused.value, ValueError)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_the_config_file_says_the_same(tmp_path: Path) -> None:
    doc = {"bundle": "b.json", "state": "s", "listen": "127.0.0.1:65536"}
    with pytest.raises(ConfigError, match="65535"):
        config_from_mapping(doc, base=tmp_path)
    doc["listen"] = "[::1]:5683"
    assert config_from_mapping(doc, base=tmp_path).listen == ("::1", 5683)


def test_the_metrics_settings(tmp_path: Path) -> None:
    doc: dict[str, object] = {"bundle": "b.json", "state": "s", "listen": "127.0.0.1:5683"}
    config = config_from_mapping(doc, base=tmp_path)
    assert config.metrics is None and config.metrics_per_resource is False
    doc |= {"metrics": "127.0.0.1:9466", "metrics_per_resource": True}
    config = config_from_mapping(doc, base=tmp_path)
    assert config.metrics == ("127.0.0.1", 9466) and config.metrics_per_resource is True
    for key, bad in (("metrics", "9466"), ("metrics", 9466), ("metrics_per_resource", "yes")):
        with pytest.raises(ConfigError, match=key):
            config_from_mapping({**doc, key: bad}, base=tmp_path)
