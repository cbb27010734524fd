"""Revocation reaches a producer within a bound even after the AS restarted (real processes).

The producer follows its resource's keys by observing ``/keys`` on the AS. An AS restart ends
that observation on the AS's side without a word to the producer (the DTLS session dies with the
process); the producer must notice within seconds and observe again, or a revocation made after
the restart reaches it only at the next re-observation (it was up to 30 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from system_harness import Deployment, ProducerProcess, coap_get, wait_until, write_atomic

import oscar
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from oscar_io.errors import AccessDenied
from producer.core import KEYS_LOST_BOUND

#: Slack for a loaded two-core machine on top of the documented bound (process start-up of the
#: admin CLI is outside of it: the clock starts when the revocation is in the AS's state).
SLACK = 3.0


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Deployment, ProducerProcess, Path]]:
    d = Deployment(tmp_path)
    bundle = d.enroll("producer", "kept")
    d.enroll("consumer", "revoked")
    d.grant("revoked", "kept/*")
    d.start_as()
    value = tmp_path / "v.txt"
    value.write_bytes(b"before")
    producer = ProducerProcess(
        bundle, tmp_path / "p", "--resource", f"v={value}", "--interval", "0.05"
    )
    producer.start()
    try:
        wait_until(lambda: "now sealing under epoch 1" in producer.log(), timeout=20)
        yield d, producer, value
    finally:
        producer.stop()
        d.close()


def epoch_of(payload: bytes) -> int:
    return oscar.ProtectedObject.from_bytes(payload).metadata.epoch


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
async def test_a_revocation_after_an_as_restart_reaches_the_producer_within_the_bound(
    site: tuple[Deployment, ProducerProcess, Path], how: str
) -> None:
    """SIGTERM: the AS closes its DTLS sessions (close_notify) as it stops; kill -9: it says
    nothing, and its new process drops the records of a session it does not know."""
    d, producer, value = site
    rid = "kept/v"
    assert epoch_of((await coap_get(producer.uri(rid))).payload) == 1
    if how == "sigterm":
        d.stop_as()
    else:
        assert d.server is not None
        d.server.kill()
    d.start_as()
    time.sleep(1.0)  # the AS is back; the producer does not know its observation is gone
    d.admin("revoke", "--consumer", "revoked")
    revoked_at = time.monotonic()
    wait_until(
        lambda: "now sealing under epoch 2" in producer.log(), timeout=KEYS_LOST_BOUND + SLACK
    )
    took = time.monotonic() - revoked_at
    # a value written after the bound is sealed under the new epoch ...
    write_atomic(value, b"after the revocation")
    deadline = time.monotonic() + 5
    while True:
        response = await coap_get(producer.uri(rid))
        if epoch_of(response.payload) == 2 or time.monotonic() > deadline:
            break
    assert epoch_of(response.payload) == 2, f"switched after {took:.1f} s"
    # ... whose secret the revoked consumer cannot have
    async with AsClient(Bundle.load(d.root / "revoked.json")) as client:
        with pytest.raises(AccessDenied):
            await client.secret(rid, 2)
