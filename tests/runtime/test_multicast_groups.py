"""Multicast groups without a network: addresses, the producer's settings, group CoAP messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from oscar_io import multicast
from oscar_io.errors import ConfigError
from oscar_io.multicast import CONTENT, ECHO, GET, NON, URI_PATH, Group
from producer import ProducerConfig, load_config
from producer.cli import _config, build_parser


@pytest.mark.parametrize(
    ("text", "group"),
    [
        ("224.0.1.187:5683", Group("224.0.1.187", 5683)),
        ("239.1.2.3", Group("239.1.2.3", 5683)),
        ("[ff05::fd]:7000", Group("ff05::fd", 7000)),
        ("[ff02::fd]", Group("ff02::fd", 5683)),
    ],
)
def test_groups_parse(text: str, group: Group) -> None:
    assert Group.parse(text) == group
    assert Group.parse(str(group)) == group


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:5683", "not a multicast address"),
        ("[2001:db8::1]:5683", "not a multicast address"),
        ("sensor.local:5683", "not an IP address"),
        ("224.0.1.187:0", "the port is 1 to 65535"),
        ("224.0.1.187:http", "the port is a number"),
        ("[ff05::fd:5683", "[IPv6]:PORT expected"),
        ("", "ADDRESS:PORT"),
    ],
)
def test_anything_else_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        Group.parse(text)


def test_the_producer_takes_groups_from_toml_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        'bundle = "b.json"\nstate = "s"\nmulticast = ["224.0.1.187:5683"]\n'
        'multicast_interface = "127.0.0.1"\nmulticast_leisure = 0.5\n'
    )
    config = load_config(path)  # multicast alone is something to do: no listen needed
    assert config.multicast == [Group("224.0.1.187", 5683)] and config.listen is None
    assert (config.multicast_interface, config.multicast_leisure) == ("127.0.0.1", 0.5)
    args = build_parser().parse_args(
        ["--config", str(path), "--multicast", "[ff05::fd]:5683", "--multicast-interface6", "eth0"]
    )
    both = _config(args)
    assert both.multicast == [Group("224.0.1.187", 5683), Group("ff05::fd", 5683)]
    assert both.multicast_interface6 == "eth0"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"multicast": [Group("ff05::fd", 5683)]}, "needs multicast_interface6"),
        ({"multicast": ["224.0.1.187:5683"]}, "a list of groups"),
        ({"multicast": [Group("224.0.1.1", 1)] * 2}, "listed twice"),
        ({"multicast_interface": "eth0"}, "multicast_interface is an IPv4 address"),
        ({"multicast_interface": 2130706433}, "multicast_interface is an IPv4 address"),
        ({"multicast_hops": 0}, "multicast_hops is 1 to 255"),
        ({"multicast_leisure": -1}, "multicast_leisure is 0 to 60"),
        ({"multicast_leisure": True}, "multicast_leisure is 0 to 60"),
    ],
)
def test_bad_multicast_settings_are_one_clear_error(
    kwargs: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {"bundle": Path("b"), "state": Path("s"), "listen": ("::1", 1)}
    values.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        ProducerConfig(**values)  # type: ignore[arg-type]


def test_group_messages_round_trip() -> None:
    token = multicast.resource_token("sensor-1/temperature")
    assert len(token) == 8 and token != multicast.resource_token("sensor-2/temperature")
    options = [(ECHO, bytes(8)), (URI_PATH, b"sensor-1"), (URI_PATH, b"temperature")]
    data = multicast.encode(NON, GET, 0x1234, token, options)
    message = multicast.decode(data)
    assert message is not None
    assert (message.mtype, message.code, message.mid, message.token) == (NON, GET, 0x1234, token)
    assert message.path() == ("sensor-1", "temperature") and message.first(ECHO) == bytes(8)
    notification = multicast.encode(NON, CONTENT, 1, token, [(12, b"\x12")], b"\xd2object")
    decoded = multicast.decode(notification)
    assert decoded is not None and decoded.payload == b"\xd2object"
    assert multicast.read_uint(decoded.first(12)) == 18


@pytest.mark.parametrize(
    "data",
    [b"", b"\x40\x01", b"\x49\x01\x00\x00", b"\x80\x01\x00\x00", b"\x40\x01\x00\x00\xff",
     b"\x40\x01\x00\x00\xb5ab", b"\x40\x01\x00\x00\xf0"],
)  # fmt: skip
def test_malformed_messages_decode_to_none(data: bytes) -> None:
    assert multicast.decode(data) is None
