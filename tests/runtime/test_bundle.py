"""The credentials bundle (oscar_io/bundle.py) with a list of AS instances (issue 15, failover):
a bundle from before the list still loads; a new one keeps ``as_uri`` first in ``as_uris``; every
malformed list is one clear :class:`BundleError`; no ``repr`` shows the PSK. And the order in
which :class:`~oscar_io.asfailover.Failover` asks the listed instances, on a pinned clock."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from oscar import certs
from oscar_io.asfailover import MAX_BUSY, Failover
from oscar_io.bundle import Bundle
from oscar_io.errors import AsUnavailable, BundleError

A, B, C = "coaps://as-a.example:5684", "coaps://as-b.example", "coaps://[::1]:6000"
PSK = bytes.fromhex("00112233445566778899aabbccddeeff")


@pytest.fixture(scope="module")
def ca_pem() -> str:
    key = certs.generate_signing_key("ES256")
    now = int(time.time())
    ca = certs.make_ca_certificate(key, "test CA", serial=3, not_before=now, not_after=now + 60)
    return ca.public_bytes(serialization.Encoding.PEM).decode()


def document(ca_pem: str, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "phone-1",
        "role": "consumer",
        "as_uri": A,
        "psk_identity": "phone-1",
        "psk_hex": PSK.hex(),
        "ca_cert_pem": ca_pem,
    }
    doc.update(fields)
    return doc


def load(doc: dict[str, Any]) -> Bundle:
    return Bundle.from_json(json.dumps(doc).encode(), "b.json")


def test_a_bundle_from_before_the_list_loads_with_its_one_as_uri(ca_pem: str) -> None:
    bundle = load(document(ca_pem))
    assert (bundle.as_uri, bundle.as_uris) == (A, (A,))
    assert repr(bundle) == "Bundle(device_id='phone-1', role='consumer', as_uri='" + A + "')"


def test_a_bundle_with_a_list_keeps_the_order_and_shows_no_psk(ca_pem: str) -> None:
    bundle = load(document(ca_pem, as_uris=[A, B + "/", C]))
    assert (bundle.as_uri, bundle.as_uris) == (A, (A, B, C))
    shown = repr(bundle)
    assert B in shown and C in shown
    assert PSK.hex() not in shown and repr(PSK) not in shown
    assert load(document(ca_pem, as_uris=[A])).as_uris == (A,)


def test_a_bundle_file_with_a_list_loads(ca_pem: str, tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(document(ca_pem, as_uris=[A, B]), f)
    assert Bundle.load(path).as_uris == (A, B)


@pytest.mark.parametrize(
    ("as_uris", "message"),
    [
        ([], "a list of 1 to 8"),
        ([f"coaps://as{i}.example" for i in range(9)], "a list of 1 to 8"),
        (A, "a list of 1 to 8"),
        ({"0": A}, "a list of 1 to 8"),
        ([A, 5684], "a list of 1 to 8"),
        ([A, None], "a list of 1 to 8"),
        ([B, A], "must start with as_uri"),
        ([A, B, A], "lists an AS twice"),
        ([A, A + "/"], "lists an AS twice"),
        ([A, "coap://as-b.example"], "coaps://HOST[:PORT]"),
        ([A, "coaps://"], "coaps://HOST[:PORT]"),
        ([A, "coaps://as-b.example:99999"], "coaps://HOST[:PORT]"),
        ([A, "coaps://as-b.example/path"], "coaps://HOST[:PORT]"),
        ([A, "coaps://as-b.example?x=1"], "coaps://HOST[:PORT]"),
        ([A, "coaps://user@as-b.example"], "coaps://HOST[:PORT]"),
        ([A, "http://[::1"], "coaps://HOST[:PORT]"),
    ],
)
def test_a_malformed_list_is_one_clear_error(ca_pem: str, as_uris: Any, message: str) -> None:
    with pytest.raises(BundleError) as caught:
        load(document(ca_pem, as_uris=as_uris))
    text = str(caught.value)
    assert text.startswith("b.json") and message in text
    assert PSK.hex() not in text


def test_an_unknown_field_is_still_refused(ca_pem: str) -> None:
    with pytest.raises(BundleError, match="must hold exactly"):
        load(document(ca_pem, as_uris=[A], extra="x"))
    doc = document(ca_pem, as_uris=[A])
    del doc["as_uri"]
    with pytest.raises(BundleError, match="must hold exactly"):
        load(doc)


def test_a_bundle_built_in_code_checks_its_list(ca_pem: str) -> None:
    bundle = load(document(ca_pem))
    made = Bundle("d", "consumer", A, "d", PSK, bundle.ca_certificate)
    assert made.as_uris == (A,)
    with pytest.raises(ValueError, match="start with as_uri"):
        Bundle("d", "consumer", A, "d", PSK, bundle.ca_certificate, (B, A))


def test_as_unavailable_carries_retry_after() -> None:
    assert AsUnavailable("x").retry_after is None
    exc = AsUnavailable("busy", "5.03", retry_after=2.0)
    assert (exc.code, exc.retry_after) == ("5.03", 2.0)


# --- the order of failover -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failover_goes_to_the_next_and_comes_back_after_the_set_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    failover = Failover([A, B, C], come_back=60, clock=clock)
    assert failover.order() == [0, 1, 2]
    with caplog.at_level(logging.INFO, logger="oscar.asclient"):
        failover.failed(0)
        assert failover.order() == [1, 2, 0]  # the one that failed goes last
        failover.answered(1)
    assert failover.current == 1
    assert [r.getMessage() for r in caplog.records] == [f"AS {B} now, was {A} (no answer)"]
    clock.now += 59
    assert failover.order() == [1, 2, 0]
    clock.now += 1
    assert failover.order() == [0, 1, 2]  # time to try the preferred one first again
    failover.failed(0)  # still away: stay another come_back
    assert failover.order() == [1, 2, 0]
    clock.now += 59
    assert failover.order() == [1, 2, 0]
    clock.now += 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="oscar.asclient"):
        failover.answered(0)
    assert failover.current == 0 and failover.order() == [0, 1, 2]
    assert [r.getMessage() for r in caplog.records] == [
        f"AS {A} now, was {B} (the preferred AS again)"
    ]


def test_among_instances_that_did_not_answer_the_one_that_failed_longest_ago_comes_first() -> None:
    """A dies (the device moves to B), comes back unnoticed, then B dies: the next attempt goes to
    A, not to B again (a /keys observation asks one instance per attempt); with every instance
    away, the attempts go round them, whichever is current."""
    failover = Failover([A, B, C], clock=Clock())
    failover.failed(0)
    failover.answered(1)
    assert failover.order() == [1, 2, 0]
    failover.failed(1)
    assert failover.order() == [2, 0, 1]  # one that has not failed first
    failover.failed(2)
    assert failover.order() == [0, 1, 2]  # A failed longest ago
    failover.failed(0)
    assert failover.order() == [1, 2, 0]
    failover.failed(1)
    failover.failed(2)
    assert failover.current == 1 and failover.order() == [0, 1, 2]
    failover.answered(0)
    assert failover.current == 0 and failover.order() == [0, 1, 2]


def test_failover_skips_a_busy_instance_until_its_max_age() -> None:
    clock = Clock()
    failover = Failover([A, B], clock=clock)
    failover.busy(0, 2, "5.03")
    assert failover.order() == [1]
    assert failover.retry_after() == 2.0 and failover.busy_code() == "5.03"
    failover.busy(1, 5, "4.29")
    assert failover.order() == []
    assert failover.retry_after() == 2.0
    clock.now += 2
    assert failover.order() == [0]
    clock.now += 3
    assert failover.order() == [0, 1] and failover.retry_after() is None
    failover.busy(0, None, "5.03")  # no Max-Age: not remembered
    assert failover.order() == [0, 1]
    failover.busy(0, 2**32 - 1, "5.03")  # a huge Max-Age is bounded
    assert failover.retry_after() == MAX_BUSY


def test_one_listed_as_is_always_asked_unless_busy() -> None:
    clock = Clock()
    failover = Failover([A], clock=clock)
    failover.failed(0)
    assert failover.order() == [0] and failover.current == 0
    failover.busy(0, 2, "5.03")
    assert failover.order() == []
    clock.now += 2
    assert failover.order() == [0]


@pytest.mark.asyncio
async def test_no_retry_after_while_an_instance_that_did_not_answer_may_be_asked(
    ca_pem: str,
) -> None:
    """A call that found A silent while B is busy (a 4.29 with a long Max-Age) says to retry
    without waiting for B: A may be asked again at once (it may be back). ``retry_after`` is for
    when every listed AS is busy. A is a loopback port nobody listens on (real DTLS client)."""
    import socket

    from oscar_io.asclient import AsClient

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        silent = f"coaps://127.0.0.1:{s.getsockname()[1]}"
    bundle = load(document(ca_pem, as_uri=silent, as_uris=[silent, B]))
    client = AsClient(bundle, attempt_timeout=1.0)
    try:
        client.failover.busy(1, 60, "4.29")
        with pytest.raises(AsUnavailable) as caught:
            await client.secret("sensor-1/x")
        assert caught.value.retry_after is None
        assert client.busy_for() is None  # A may be asked now
        client.failover.busy(0, 2, "5.03")  # now every AS is busy
        with pytest.raises(AsUnavailable) as caught:
            await client.secret("sensor-1/x")
        assert caught.value.retry_after == 2.0
    finally:
        await client.close()
