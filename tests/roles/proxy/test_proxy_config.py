"""proxy.config: the listen address goes through oscar_io.ports.parse_listen with the proxy's bound
(DTLS takes the next port), its ValueError as the proxy's ConfigError. No process."""

from __future__ import annotations

from pathlib import Path

import pytest

from oscar_io.errors import UsageError
from proxy.config import ConfigError, config_from_mapping, parse_listen


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:5683") == ("127.0.0.1", 5683)
    assert parse_listen("[::1]:65534") == ("::1", 65534)
    assert parse_listen("proxy.example:1") == ("proxy.example", 1)


@pytest.mark.parametrize("text", ["h:65535", "h:0", "h", ":5683", "::1:5683", "h:x", "h:-1"])
def test_a_bad_listen_address_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="the port from 1 to 65534") as refused:
        parse_listen(text)
    assert isinstance(refused.value, UsageError) and isinstance(refused.value, ValueError)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_the_config_file_says_the_same(tmp_path: Path) -> None:
    doc = {"bundle": "b.json", "state": "s", "listen": "127.0.0.1:65535"}
    with pytest.raises(ConfigError, match="65534"):
        config_from_mapping(doc, base=tmp_path)
    doc["listen"] = "127.0.0.1:5683"
    assert config_from_mapping(doc, base=tmp_path).listen == ("127.0.0.1", 5683)
