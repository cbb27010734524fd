"""proxy.config: the listen address goes through oscar_io.ports.parse_listen with the proxy's bound
(DTLS takes the next port), its ValueError as the proxy's ConfigError. No process."""

from __future__ import annotations

from pathlib import Path

import pytest

from oscar_io.errors import UsageError
from proxy.config import ConfigError, check_cluster_url, config_from_mapping, parse_listen


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


# --- cluster URLs (issue 16) -------------------------------------------------------------------

GOOD_CLUSTER_URLS = [
    "redis://127.0.0.1:6379/0",
    "redis://redis.example:6379",
    "redis://:p%40ss@10.0.0.5:6379/3",
    "redis://oscar:pw@[::1]:6379/0",
    "rediss://redis.example:6380/0?ssl_ca_certs=/etc/oscar/ca.pem&ssl_cert_reqs=required",
    "redis://h/0?socket_timeout=2&socket_connect_timeout=0.5",
    "unix:///run/redis/redis.sock?db=2",
]
BAD_CLUSTER_URLS = [
    ("http://127.0.0.1:6379/0", "a cluster URL is"),
    ("redis://", "no host"),
    ("redis://h:99999/0", "a cluster URL is"),
    ("redis://h/zero", "the database is a number"),
    ("redis://h/0?evil=1", "unknown option 'evil'"),
    ("redis://h/0?socket_timeout=0", "0 to 60 seconds"),
    ("redis://h/0?socket_timeout=x", "0 to 60 seconds"),
    ("redis://:pa@ss@h:6379/0", "a cluster URL is"),
    ("redis://h/0#frag", "a cluster URL is"),
    ("unix://relative.sock", "unix:///PATH"),
    ("", "a cluster URL is"),
]


@pytest.mark.parametrize("url", GOOD_CLUSTER_URLS)
def test_cluster_urls_taken(url: str, tmp_path: Path) -> None:
    doc = {"bundle": "b.json", "state": "s", "listen": "127.0.0.1:5683", "cluster": url}
    config = config_from_mapping(doc, base=tmp_path)
    assert config.cluster == url
    assert "pw" not in repr(config) and "p%40ss" not in repr(config)


@pytest.mark.parametrize(("url", "why"), BAD_CLUSTER_URLS)
def test_bad_cluster_urls_are_config_errors_without_the_password(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as refused:
        check_cluster_url(url)
    assert "pa@ss" not in str(refused.value) and "ss@h" not in str(refused.value)


def test_the_cluster_password_comes_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pass"
    secret.write_text("s3cret-pw\nignored\n")
    doc = {
        "bundle": "b.json",
        "state": "s",
        "listen": "127.0.0.1:5683",
        "cluster": "redis://127.0.0.1:6379/0",
        "cluster_password_file": "redis.pass",
    }
    config = config_from_mapping(doc, base=tmp_path)
    assert config.cluster_password() == "s3cret-pw"
    assert "s3cret" not in repr(config)
    secret.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        config.cluster_password()
    secret.unlink()
    with pytest.raises(ConfigError, match="No such file"):
        config.cluster_password()
    del doc["cluster"]
    with pytest.raises(ConfigError, match="without cluster"):
        config_from_mapping(doc, base=tmp_path)


def test_the_block_window_is_a_limit_from_1_to_64(tmp_path: Path) -> None:
    doc: dict[str, object] = {"bundle": "b.json", "state": "s", "listen": "127.0.0.1:5683"}
    assert config_from_mapping(doc, base=tmp_path).limits.block_window == 8
    for good in (1, 64):
        doc["limits"] = {"block_window": good}
        assert config_from_mapping(doc, base=tmp_path).limits.block_window == good
    for bad in (0, 65, True, 2.5):
        doc["limits"] = {"block_window": bad}
        with pytest.raises(ConfigError, match="block_window"):
            config_from_mapping(doc, base=tmp_path)


def test_the_metrics_address_is_host_and_port(tmp_path: Path) -> None:
    doc: dict[str, object] = {"bundle": "b.json", "state": "s", "listen": "127.0.0.1:5683"}
    assert config_from_mapping(doc, base=tmp_path).metrics is None
    doc["metrics"] = "[::1]:9464"
    assert config_from_mapping(doc, base=tmp_path).metrics == ("::1", 9464)
    for bad in ("9464", "localhost:", "127.0.0.1:70000", 9464):
        doc["metrics"] = bad
        with pytest.raises(ConfigError, match="metrics"):
            config_from_mapping(doc, base=tmp_path)


def test_the_object_size_limit_is_checked(tmp_path: Path) -> None:
    """limits.max_object_size: 1 KiB to 64 MiB, at most 8 MiB in a cluster; each refusal one
    clear error."""
    doc: dict[str, object] = {"bundle": "b.json", "state": "s", "listen": "127.0.0.1:5683"}
    assert config_from_mapping(doc, base=tmp_path).limits.max_object_size == (1 << 20) + 4096
    doc["limits"] = {"max_object_size": (64 << 20) + 4096}
    assert config_from_mapping(doc, base=tmp_path).limits.max_object_size == (64 << 20) + 4096
    refusals = {
        "is 1024 to 67112960 bytes": [{"max_object_size": n} for n in (1023, (64 << 20) + 4097)],
        "positive whole number": [{"max_object_size": v} for v in (0, True, 2.5, "1")],
    }
    for why, cases in refusals.items():
        for limits in cases:
            doc["limits"] = limits
            with pytest.raises(ConfigError, match=why):
                config_from_mapping(doc, base=tmp_path)
    doc.update(cluster="redis://127.0.0.1:6379/0", limits={"max_object_size": 8 << 20})
    assert config_from_mapping(doc, base=tmp_path).limits.max_object_size == 8 << 20
    doc["limits"] = {"max_object_size": (8 << 20) + 1}
    with pytest.raises(ConfigError, match="at most 8388608 bytes with cluster"):
        config_from_mapping(doc, base=tmp_path)
