"""When the consumer takes TCP (consumer.transport): the threshold, its checks, the CLI's."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from consumer.cli import main
from consumer.target import parse_target
from consumer.transport import DEFAULT_TCP_THRESHOLD, TcpRoute, check_threshold

DIRECT = parse_target("coap://127.0.0.1:5683/sensor-1/image")
VIA_DTLS = parse_target(
    "coap://127.0.0.1:5683/sensor-1/image", proxy="cloud-1=coaps://127.0.0.1:5684"
)


def first_block(size2: int | None, more: bool = True, code: Code = Code.CONTENT) -> Message:
    message = Message(code=code, payload=b"x" * 1024, content_format=18)
    message.opt.block2 = BlockOption.BlockwiseTuple(0, more, 6)
    if size2 is not None:
        message.opt.size2 = size2
    return message


def test_the_announced_size_decides() -> None:
    route = TcpRoute(DEFAULT_TCP_THRESHOLD, timeout=5.0, max_size=1 << 20)
    assert route.wanted(first_block(DEFAULT_TCP_THRESHOLD), DIRECT)
    assert not route.wanted(first_block(DEFAULT_TCP_THRESHOLD - 1), DIRECT)
    assert not route.wanted(first_block(None), DIRECT)  # size unknown: UDP
    assert not route.wanted(first_block(1 << 20, more=False), DIRECT)  # one block: nothing left
    assert not route.wanted(first_block(1 << 20, code=Code.VALID), DIRECT)
    assert not route.wanted(first_block(1 << 20), VIA_DTLS)  # that hop stays DTLS
    assert TcpRoute(0, timeout=5.0, max_size=1 << 20).wanted(first_block(2048), DIRECT)
    assert not TcpRoute(None, timeout=5.0, max_size=1 << 20).wanted(first_block(1 << 20), DIRECT)


@pytest.mark.parametrize("bad", [-1, 1 << 32, 1.5, True, "32k"])
def test_a_bad_threshold_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="TCP threshold"):
        check_threshold(bad)  # type: ignore[arg-type]


def test_the_cli_says_what_is_wrong_with_a_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "coap://127.0.0.1:5683/sensor-1/image"
    assert main(["--bundle", "b", "--state", "s", "--tcp-threshold", "lots", "get", uri]) == 2
    assert "--tcp-threshold: is a number of bytes" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text('bundle = "b"\nstate = "s"\ntcp_threshold = -5\n')
    assert main(["--config", str(config), "get", uri]) == 2
    err = capsys.readouterr().err
    assert "tcp_threshold is a number of bytes" in err and len(err.splitlines()) == 1
