"""A producer seals multi-part objects (issue 19) against a real AS: it registers the parts, seals
every encrypted part under its own part secret from ``/keys``, draws seqs from one counter that a
restart does not reuse, re-seals when one part rotates; a consumer granted one part opens it and the
plain part, not the other, and one granted nothing reads the plain part alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from as_harness import free_port
from system_harness import Deployment

from consumer import Consumer
from oscar.parts import MultiPartObject
from producer import PartSpec, Producer, ProducerConfig, ResourceSpec

PARTS = (
    PartSpec("summary", "plain"),
    PartSpec("measurements", "encrypted"),
    PartSpec("gps", "encrypted"),
)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("parts"))
    d.enroll("consumer", "clinician")
    d.enroll("consumer", "passer-by")
    d.enroll("producer", "ward-1")
    d.enroll("producer", "ward-2")
    d.start_as()
    yield d
    d.close()


def config(d: Deployment, state: Path, port: int) -> ProducerConfig:
    spec = ResourceSpec("vitals", profile="a128gcm-es256", parts=PARTS)
    return ProducerConfig(
        bundle=d.root / "ward-1.json", state=state, listen=("127.0.0.1", port), resources=[spec]
    )


async def sealed(producer: Producer, values: dict[str, bytes] | None = None) -> MultiPartObject:
    """Set ``values`` (if any) and wait for the next object (at most 10 s)."""
    published = producer.resources["vitals"]
    changed = asyncio.Event()
    published.on_change.append(changed.set)
    try:
        if values is None or not published.update_parts(values):
            await asyncio.wait_for(changed.wait(), 10)
    finally:
        published.on_change.remove(changed.set)
    assert published.obj is not None
    return MultiPartObject.from_bytes(published.obj)


def epochs_of(obj: MultiPartObject) -> dict[str, int | None]:
    return {p.name: p.epoch for p in obj.metadata.parts}


@pytest.mark.asyncio
async def test_a_producer_seals_parts_for_their_audiences_across_a_rotation_and_a_restart(
    deployment: Deployment, tmp_path: Path
) -> None:
    d, port, state = deployment, free_port(), tmp_path / "ward-1"
    uri = f"coap://127.0.0.1:{port}/ward-1/vitals"
    values = {"summary": b"ward 3", "measurements": b"HR 72", "gps": b"52.37,4.89"}
    async with Producer(config(d, state, port)) as producer:
        published = producer.resources["vitals"]
        assert not published.update_parts({"summary": b"ward 3"})  # a part has no value yet
        first = await sealed(producer, values)
        assert [p.name for p in first.metadata.parts] == ["summary", "measurements", "gps"]
        assert epochs_of(first) == {"summary": None, "measurements": 1, "gps": 1}
        assert published.epoch == 0 and published.seq == first.metadata.seq
        d.admin("grant", "--consumer", "clinician", "--resource", "ward-1/vitals", "--part",
                "measurements")  # fmt: skip
        async with Consumer(d.root / "clinician.json", tmp_path / "clinician") as clinician:
            reading = await clinician.get_parts(uri)
            assert reading.metadata.seq == first.metadata.seq
            assert reading.part("measurements").plaintext == b"HR 72"  # type: ignore[union-attr]
            assert reading.part("summary").plaintext == b"ward 3"  # type: ignore[union-attr]
            assert reading.not_granted == ("gps",) and reading.part("gps") is None
        async with Consumer(d.root / "passer-by.json", tmp_path / "passer-by") as passer_by:
            reading = await passer_by.get_parts(uri)
            assert reading.part("summary").plaintext == b"ward 3"  # type: ignore[union-attr]
            assert reading.not_granted == ("measurements", "gps")

        # A new value of one part: one new object of every part, with a higher seq.
        second = await sealed(producer, {"measurements": b"HR 80"})
        assert second.metadata.seq > first.metadata.seq
        assert not published.update_parts({"measurements": b"HR 80"})  # unchanged: no seal

        # One part's rotation re-seals under its new epoch; the other part's stays.
        waiting = asyncio.ensure_future(sealed(producer))
        await asyncio.sleep(0)  # the waiter is listening before the rotation is made
        d.admin("rotate", "--resource", "ward-1/vitals", "--part", "gps")
        third = await waiting
        assert epochs_of(third) == {"summary": None, "measurements": 1, "gps": 2}
        assert third.metadata.seq > second.metadata.seq
        async with Consumer(d.root / "clinician.json", tmp_path / "clinician") as clinician:
            reading = await clinician.get_parts(uri)
            assert reading.part("measurements").plaintext == b"HR 80"  # type: ignore[union-attr]
            assert reading.not_granted == ("gps",)

        # Revoking one audience: passer-by, granted gps, loses it; only gps rotates (the AS), the
        # producer re-seals under its new epoch; the clinician's part is untouched.
        d.admin("grant", "--consumer", "passer-by", "--resource", "ward-1/vitals", "--part", "gps")
        async with Consumer(d.root / "passer-by.json", tmp_path / "passer-by") as passer_by:
            reading = await passer_by.get_parts(uri)
            assert reading.part("gps").plaintext == b"52.37,4.89"  # type: ignore[union-attr]
            waiting = asyncio.ensure_future(sealed(producer))
            await asyncio.sleep(0)
            d.admin("revoke", "--consumer", "passer-by", "--resource", "ward-1/vitals",
                    "--part", "gps")  # fmt: skip
            fourth = await waiting
            assert epochs_of(fourth) == {"summary": None, "measurements": 1, "gps": 3}
            reading = await passer_by.get_parts(uri)
            assert reading.metadata.seq == fourth.metadata.seq
            assert reading.not_granted == ("measurements", "gps")
            assert reading.part("summary").plaintext == b"ward 3"  # type: ignore[union-attr]
        async with Consumer(d.root / "clinician.json", tmp_path / "clinician") as clinician:
            reading = await clinician.get_parts(uri)
            assert reading.part("measurements").plaintext == b"HR 80"  # type: ignore[union-attr]
        last_seq = fourth.metadata.seq

    # A restart: the seq counter goes on above everything reserved before (no nonce reused),
    # and the part keys come back from the state (gps still at epoch 3).
    async with Producer(config(d, state, port)) as producer:
        after = await sealed(producer, values)
        assert after.metadata.seq > last_seq
        assert epochs_of(after) == {"summary": None, "measurements": 1, "gps": 3}

    # A lost state (the AS knew the resource, this state did not): seqs start far away, at
    # random, so that no seq the lost state reserved is used again.
    async with Producer(config(d, tmp_path / "lost", port)) as producer:
        fresh = await sealed(producer, values)
        assert fresh.metadata.seq >= 1 << 48


@pytest.mark.asyncio
async def test_part_values_come_from_their_files(deployment: Deployment, tmp_path: Path) -> None:
    summary, measurements = tmp_path / "summary.txt", tmp_path / "m.json"
    summary.write_bytes(b"ward 5")
    measurements.write_bytes(b'{"hr": 60}')
    parts = (PartSpec("summary", "plain", summary), PartSpec("m", "encrypted", measurements, 50))
    spec = ResourceSpec("vitals", interval=0.05, profile="a128gcm-es256", parts=parts)
    config = ProducerConfig(
        bundle=deployment.root / "ward-2.json", state=tmp_path / "ward-2",
        listen=("127.0.0.1", free_port()), resources=[spec],
    )  # fmt: skip
    async with Producer(config) as producer:
        published = producer.resources["vitals"]
        first = (
            MultiPartObject.from_bytes(published.obj) if published.obj else await sealed(producer)
        )
        assert published.part_values == {"summary": b"ward 5", "m": b'{"hr": 60}'}
        assert [p.content_format for p in first.metadata.parts] == [0, 50]
        measurements.write_bytes(b'{"hr": 61}')
        second = await sealed(producer)
        assert second.metadata.seq > first.metadata.seq
        assert published.part_values["m"] == b'{"hr": 61}'
