"""The consumer against a real AS process, a stand-in producer and a forward proxy on loopback.

One AS serves the whole module (:func:`world`): producers get their certificates and key state from
it over DTLS as a producer would, consumers their certificates, CRL and secrets. Objects are sealed
with :class:`oscar.Sealer` and served by an aiocoap server made per test
(:class:`~consumer_harness.ProducerStandIn`). Each test has its own consumer state directory.
The CLI runs as a real subprocess (``python -m consumer``). At teardown the AS must exit 0 and its
log must hold no traceback, PSK or access secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiocoap.numbers.codes import Code
from as_harness import free_port
from consumer_harness import (
    FRESH_READER,
    HUMIDITY,
    PRODUCER,
    READER,
    REVOKED_PRODUCER,
    STRANGER,
    TEMPERATURE,
    ForwardProxy,
    ProducerStandIn,
    World,
    build_world,
    cli,
    write_bundle,
)

from authz_server.store import Store
from consumer import (
    AccessDenied,
    Consumer,
    InvalidObject,
    NotFound,
    Refused,
    StaleCopy,
    TimedOut,
    TransportError,
    Unreachable,
)
from consumer.store import ConsumerStore
from oscar import ProtectedObject, Reading, Sealer, certs
from oscar_io.bundle import Bundle
from oscar_io.errors import BundleError, StateError

ERROR_PREFIX = "oscar-consumer: error: "
ERROR_LINE = re.compile(r"oscar-consumer(?: [a-z]+)?: error: ")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = build_world(tmp_path_factory.mktemp("consumer"))
    try:
        yield world
    finally:
        status = world.server.stop()
        text = world.server.log()
        assert status == 0, text
        assert "Traceback" not in text, text
        for secret in [*world.psks.values(), *(s.value for _, s in world.secrets.values())]:
            assert secret.hex() not in text


def secrets_of(world: World) -> list[bytes]:
    return [s.value for _, s in [*world.secrets.values(), *world.next_epoch.values()]]


def away_bundle(world: World, tmp: Path, device_id: str = READER) -> Path:
    """The device's bundle with the AS moved to a port where nothing answers."""
    bundle = Bundle.load(world.bundle(device_id))
    ca_pem = (world.as_state / "ca.pem").read_text()
    return write_bundle(
        tmp / f"{device_id}-away.json",
        device_id,
        "consumer",
        f"coaps://127.0.0.1:{free_port()}",
        bundle.psk,
        ca_pem,
    )


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


# --- get, in the library -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_consumers_sharing_a_state_never_accept_a_rollback(
    world: World, tmp_path: Path
) -> None:
    """Two consumer processes (here: two instances) on one state directory: once one of them
    has accepted an object, the other refuses an older one, even though its own memory had not
    seen the newer one yet."""
    state = tmp_path / "shared"
    older, newer = world.seal(b'{"n": 1}'), world.seal(b'{"n": 2}')
    async with (
        Consumer(world.bundle(READER), state) as a,
        Consumer(world.bundle(READER), state) as b,
    ):
        assert (await a.open_object(newer, TEMPERATURE)).plaintext == b'{"n": 2}'
        with pytest.raises(InvalidObject) as rejected:
            await b.open_object(older, TEMPERATURE)
        assert "another process" in rejected.value.reason
        assert b.store.freshness.newest(TEMPERATURE) == a.store.freshness.newest(TEMPERATURE)


@pytest.mark.asyncio
async def test_get_returns_the_same_object_again_and_refuses_rollback(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    epoch = world.secrets[TEMPERATURE][0]
    first = world.seal(b'{"t": 20.5, "note": "do-not-leak"}')
    producer.publish(TEMPERATURE, first)
    async with Consumer(world.bundle(READER), state) as consumer:
        reading = await consumer.get(producer.uri())
        m = reading.metadata
        assert reading.plaintext == b'{"t": 20.5, "note": "do-not-leak"}'
        assert (m.producer_id, m.resource_id, m.epoch, m.content_format) == (
            PRODUCER,
            TEMPERATURE,
            epoch,
            50,
        )
        assert m.iat <= time.time() < m.exp
        assert "do-not-leak" not in repr(reading) and "do-not-leak" not in repr(consumer)

        # The same object again (unchanged value): returned again, freshness not advanced.
        assert await consumer.get(producer.uri()) == reading
        assert consumer.store.freshness.newest(TEMPERATURE) == (epoch, m.seq)

        newer = world.seal(b'{"t": 21}')
        producer.publish(TEMPERATURE, newer)
        assert (await consumer.get(producer.uri())).plaintext == b'{"t": 21}'
        newest = consumer.store.freshness.newest(TEMPERATURE)
        assert newest is not None and newest[1] > m.seq

        producer.publish(TEMPERATURE, first)  # a cache or an attacker serves the older object
        stale: list[tuple[StaleCopy, bool]] = []
        again = await consumer.get(producer.uri(), on_stale=lambda s, i: stale.append((s, i)))
        assert again.plaintext == b'{"t": 21}'  # never the older object: the newest held
        assert consumer.store.freshness.newest(TEMPERATURE) == newest
        [(copy, instead)] = stale
        assert instead and (copy.served, copy.seen) == ((epoch, m.seq), newest)
        assert copy.fresh_in is not None and 0 < copy.fresh_in <= 60  # the answer's Max-Age

    # A new consumer on the same state directory remembers (the object held too).
    async with Consumer(world.bundle(READER), state) as consumer:
        reading = await consumer.get(producer.uri(), on_stale=lambda s, i: stale.append((s, i)))
        assert reading.plaintext == b'{"t": 21}' and len(stale) == 2
        # Without a reading held (another consumer library use: none kept), it is the error.
        consumer.store._held = None
        with pytest.raises(StaleCopy) as refused:
            await consumer.get(producer.uri())
        assert isinstance(refused.value, InvalidObject)  # callers that know no better: refused
        producer.publish(TEMPERATURE, newer)
        assert (await consumer.get(producer.uri())).plaintext == b'{"t": 21}'

    # A state directory of its own (0700), files 0600 holding neither secrets nor plaintext.
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = sorted(p.name for p in state.iterdir())
    assert files == ["freshness", "held", "lock", "secrets", "trust"]
    assert stat.S_IMODE((state / "held").stat().st_mode) == 0o700
    [held] = (state / "held").iterdir()  # one resource: one file, its name a keyed hash
    assert re.fullmatch(r"[0-9a-f]{32}", held.name)
    for path in [*(p for p in state.iterdir() if p.is_file()), held]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        data = path.read_bytes()
        for secret in [*secrets_of(world), *world.psks.values()]:
            assert secret not in data and secret.hex().encode() not in data
        assert (
            b"do-not-leak" not in data
            and b'"t": 21' not in data
            and TEMPERATURE.encode() not in data
        )


@pytest.mark.asyncio
async def test_in_memory_state_and_large_objects(world: World, producer: ProducerStandIn) -> None:
    big = os.urandom(60_000)  # Block2 on the way, near the AES-CCM limit
    producer.publish(TEMPERATURE, world.seal(big, content_format=42))
    async with Consumer(Bundle.load(world.bundle(READER))) as consumer:
        assert not consumer.store.persistent
        reading = await consumer.get(producer.uri())
        assert reading.plaintext == big and reading.metadata.content_format == 42


# --- rejected objects ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rejected_objects_and_no_secret_asked_for_them(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    good = world.seal(b"20")
    flipped_signature = good[:-1] + bytes([good[-1] ^ 1])
    flipped_middle = bytearray(good)
    flipped_middle[len(good) // 2] ^= 0x40
    cases = {
        "object is for another resource": world.seal(b"55", HUMIDITY),
        "signature": flipped_signature,
        "flipped in the middle": bytes(flipped_middle),
        "signer unknown": world.seal(b"20", key=certs.generate_signing_key()),
        "the certificate names another device": world.seal(b"20", key=world.other_key),
        "object expired": world.seal(b"20", age=100, lifetime=10),
    }
    async with Consumer(world.bundle(FRESH_READER), tmp_path / "state") as consumer:
        for expected, data in cases.items():
            producer.publish(TEMPERATURE, data)
            with pytest.raises(InvalidObject) as rejected:
                await consumer.get(producer.uri())
            if expected not in ("signature", "flipped in the middle"):
                assert expected in rejected.value.reason, (expected, rejected.value.reason)
        assert consumer.store.freshness.newest(TEMPERATURE) is None

        store = await Store.open(world.as_state)
        try:

            async def deliveries() -> list[object]:
                return [
                    r
                    for r in await store.audit_records()
                    if r.action == "secret" and r.actor == FRESH_READER
                ]

            assert await deliveries() == []  # no rejected object made it ask for a secret
            producer.publish(TEMPERATURE, good)
            assert (await consumer.get(producer.uri())).plaintext == b"20"
            assert len(await deliveries()) == 1
        finally:
            await store.close()

    # The same through the CLI: exit 1, one line naming the reason.
    producer.publish(TEMPERATURE, world.seal(b"55", HUMIDITY))
    fresh = world.bundle(FRESH_READER)
    result = await cli(world, tmp_path / "state", "get", producer.uri(), bundle=fresh)
    assert result.code == 1 and result.out == b""
    assert result.error == "object rejected: object is for another resource"
    producer.publish(TEMPERATURE, flipped_signature)
    result = await cli(world, tmp_path / "state", "get", producer.uri(), bundle=fresh)
    assert result.code == 1 and result.error.startswith("object rejected: ")


@pytest.mark.asyncio
async def test_revoked_producer_certificate(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    # The consumer learnt the certificate before the revocation; the CRL says otherwise now.
    bundle = Bundle.load(world.bundle(READER))
    store = ConsumerStore(tmp_path / "state", bundle.state_key("consumer"))
    kid = certs.key_id(world.revoked_key.public_key())
    store.trust.put_certificate(kid, world.revoked_cert, int(time.time()) + 86_400)
    rid = f"{REVOKED_PRODUCER}/door"
    producer.publish(rid, _seal_as(world, rid))
    async with Consumer(bundle, tmp_path / "state") as consumer:
        with pytest.raises(InvalidObject) as rejected:
            await consumer.get(producer.uri(rid))
    assert rejected.value.reason == "signer not acceptable: the certificate has been revoked"


def _seal_as(world: World, resource_id: str) -> bytes:
    t = int(time.time())
    return Sealer(
        secret=world.secrets[TEMPERATURE][1],
        producer_id=REVOKED_PRODUCER,
        resource_id=resource_id,
        epoch=1,
        signing_key=world.revoked_key,
    ).seal(seq=1, iat=t, exp=t + 600, content_format=0, plaintext=b"open")


@pytest.mark.asyncio
async def test_consumer_without_grant_is_denied(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    producer.publish(TEMPERATURE, world.seal(b"20"))
    async with Consumer(world.bundle(STRANGER), tmp_path / "lib") as consumer:
        with pytest.raises(AccessDenied):
            await consumer.get(producer.uri())
        assert consumer.store.freshness.newest(TEMPERATURE) is None
    result = await cli(
        world, tmp_path / "cli", "get", producer.uri(), bundle=world.bundle(STRANGER)
    )
    assert result.code == 3 and result.out == b""
    assert result.error.startswith("access denied by the AS: ")


# --- the AS away ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_keeps_working_from_the_cache_while_the_as_is_away(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    producer.publish(TEMPERATURE, world.seal(b"warm-up"))
    async with Consumer(world.bundle(READER), state) as consumer:
        await consumer.get(producer.uri())

    away = away_bundle(world, tmp_path)
    producer.publish(TEMPERATURE, world.seal(b"later", lifetime=86_400))
    async with Consumer(away, state, timeout=1) as consumer:
        # Certificate, CRL and secret come from the encrypted cache.
        assert (await consumer.get(producer.uri())).plaintext == b"later"
        # The next epoch's secret is not cached: the AS is needed, and away.
        producer.publish(TEMPERATURE, world.seal(b"next epoch", upcoming=True))
        with pytest.raises(TransportError, match="access secret"):
            await consumer.get(producer.uri())

    # Two hours on, the cached CRL is stale: fail closed rather than trust a revoked key.
    later = time.time() + 7200
    producer.publish(TEMPERATURE, world.seal(b"much later", lifetime=86_400))
    async with Consumer(away, state, timeout=1, clock=lambda: later) as consumer:
        with pytest.raises(TransportError, match="cannot check revocation: AS unavailable"):
            await consumer.get(producer.uri())

    # The CLI too, from a new process, with the AS away.
    producer.publish(TEMPERATURE, world.seal(b"from the cli"))
    result = await cli(world, state, "get", producer.uri(), bundle=away)
    assert (result.code, result.out, result.err) == (0, b"from the cli", "")


# --- transport failures --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unreachable_or_failing_server(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    nobody = f"coap://127.0.0.1:{free_port()}/{TEMPERATURE}"
    started = time.monotonic()
    async with Consumer(world.bundle(READER), tmp_path / "state", timeout=2) as consumer:
        with pytest.raises(Refused):
            await consumer.get(nobody)
        with pytest.raises(NotFound, match=r"answered 4\.04 Not Found"):
            await consumer.get(producer.uri(HUMIDITY))  # nothing published there
    assert time.monotonic() - started < 5


@pytest.mark.asyncio
async def test_each_transport_failure_is_named_by_its_category(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    """Not found, refused, timed out, unreachable: each its own words on the one error line
    (exit 4), never aiocoap's bare "NetworkError"."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # receives, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        cases = {
            "not found": producer.uri(HUMIDITY),  # nothing published there: 4.04
            "refused": f"coap://127.0.0.1:{free_port()}/{TEMPERATURE}",
            "timed out": f"coap://127.0.0.1:{port}/{TEMPERATURE}",
            "unreachable": f"coap://no-such-host.invalid/{TEMPERATURE}",
        }
        results = await asyncio.gather(
            *(
                cli(world, tmp_path / kind, "--timeout", "2", "get", uri)
                for kind, uri in cases.items()
            )
        )
    finally:
        silent.close()
    for kind, result in zip(cases, results, strict=True):
        assert result.code == 4 and result.out == b"", (kind, result)
        assert len(result.err.splitlines()) == 1, (kind, result)
        assert result.error.startswith(f"{kind}: "), (kind, result)
        assert "NetworkError" not in result.err, (kind, result)
    assert "4.04 Not Found" in results[0].error
    assert "nothing listens" in results[1].error
    assert "within 2 s" in results[2].error
    assert "no-such-host.invalid" in results[3].error


@pytest.mark.asyncio
async def test_a_proxy_answer_for_an_origin_it_cannot_reach_is_named(
    world: World, tmp_path: Path
) -> None:
    """A proxy's 5.04 is the origin timing out, its 5.02 the origin unreachable, and any other
    error code is a refusal (with the code and its name)."""
    from oscar_io.coaperrors import error_answer

    cases = {Code.GATEWAY_TIMEOUT: TimedOut, Code.BAD_GATEWAY: Unreachable}
    cases |= {Code.NOT_FOUND: NotFound, Code.FORBIDDEN: Refused, Code.BAD_REQUEST: Refused}
    for code, kind in cases.items():
        failure = error_answer(code, "coap://p answered")
        assert type(failure) is kind and code.dotted in str(failure)
        assert code.name_printable in str(failure)


# --- the CLI -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_cli_get_plain_json_and_output_file(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    older = world.seal(b"older")
    current = world.seal('{"t": 19.5, "unit": "°C"}'.encode())
    producer.publish(TEMPERATURE, current)

    result = await cli(world, state, "get", producer.uri())
    assert (result.code, result.out, result.err) == (0, '{"t": 19.5, "unit": "°C"}'.encode(), "")

    result = await cli(world, state, "get", producer.uri(), "--json")
    assert result.code == 0 and result.err == ""
    doc = json.loads(result.out)
    m = ProtectedObject.from_bytes(current).metadata
    assert doc == {
        "value": '{"t": 19.5, "unit": "°C"}',
        "encoding": "text",
        "producer": PRODUCER,
        "resource": TEMPERATURE,
        "epoch": m.epoch,
        "seq": m.seq,
        "iat": m.iat,
        "exp": m.exp,
        "content_format": 50,
    }
    assert result.out.count(b"\n") == 1 and result.out.isascii()

    out = tmp_path / "reading.bin"
    result = await cli(world, state, "get", producer.uri(), "-o", str(out))
    assert (result.code, result.out) == (0, b"")
    assert out.read_bytes() == '{"t": 19.5, "unit": "°C"}'.encode()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    binary = b"\x00\xff\xfe binary"
    producer.publish(TEMPERATURE, world.seal(binary, content_format=42))
    result = await cli(world, state, "get", producer.uri(), "--json")
    doc = json.loads(result.out)
    assert (doc["encoding"], base64.b64decode(doc["value"])) == ("base64", binary)

    # An older object, seen by a new process with the same state directory: not accepted, not
    # shown; the newest reading held instead, and one warning line.
    producer.publish(TEMPERATURE, older)
    result = await cli(world, state, "get", producer.uri())
    assert (result.code, result.out) == (0, binary), result
    assert result.err.startswith("oscar-consumer: warning: ") and "older than" in result.err
    assert len(result.err.splitlines()) == 1


@pytest.mark.asyncio
async def test_cli_bad_usage(world: World, tmp_path: Path) -> None:
    exposed = tmp_path / "exposed.json"
    exposed.write_bytes(world.bundle(READER).read_bytes())
    exposed.chmod(0o644)
    state = tmp_path / "state"
    uri = f"coap://127.0.0.1:{free_port()}/{TEMPERATURE}"
    runs = {
        "not coap": cli(world, state, "get", f"http://127.0.0.1/{TEMPERATURE}"),
        "no resource": cli(world, state, "get", "coap://127.0.0.1/"),
        "bad resource": cli(world, state, "get", "coap://127.0.0.1/sensor-1/../x"),
        "bad port": cli(world, state, "get", "coap://127.0.0.1:99999/sensor-1/t"),
        "bad proxy": cli(world, state, "get", uri, "--proxy", "coap://127.0.0.1/path"),
        "missing bundle": cli(world, state, "get", uri, bundle=tmp_path / "nothing.json"),
        "exposed bundle": cli(world, state, "get", uri, bundle=exposed),
        "a proxy's bundle": cli(world, state, "get", uri, bundle=world.bundle("cache-1")),
        "no state": cli(world, None, "get", uri),
        "no command": cli(world, state),
        "bad timeout": cli(world, state, "--timeout", "-1", "get", uri),
        "bad count": cli(world, state, "observe", uri, "--count", "0"),
    }
    results = dict(zip(runs, await asyncio.gather(*runs.values()), strict=True))
    for what, result in results.items():
        assert result.code == 2, (what, result)
        assert result.out == b"", what
        assert result.error, what
    assert "readable by others" in results["exposed bundle"].error
    assert "cannot read the bundle" in results["missing bundle"].error
    assert "coap://" in results["not coap"].error
    assert not state.exists()  # nothing was made for a run that could not start


@pytest.mark.asyncio
async def test_corrupt_state_is_refused_and_left_alone(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    producer.publish(TEMPERATURE, world.seal(b"20"))
    assert (await cli(world, state, "get", producer.uri())).code == 0
    before = {str(p.relative_to(state)): p.read_bytes() for p in state.rglob("*") if p.is_file()}
    tampered = bytearray(before["freshness"])
    tampered[-1] ^= 1
    (state / "freshness").write_bytes(bytes(tampered))

    producer.publish(TEMPERATURE, world.seal(b"21"))
    result = await cli(world, state, "get", producer.uri())
    assert result.code == 2 and result.out == b""
    assert result.error.startswith("state unusable: ") and "fails authentication" in result.error
    with pytest.raises(StateError):
        Consumer(world.bundle(READER), state)
    after = {str(p.relative_to(state)): p.read_bytes() for p in state.rglob("*") if p.is_file()}
    assert after == {**before, "freshness": bytes(tampered)}

    # A state directory made under another bundle cannot be read either.
    with pytest.raises(StateError):
        Consumer(world.bundle(FRESH_READER), state)
    with pytest.raises(BundleError):
        Consumer(world.bundle(PRODUCER), tmp_path / "other")


# --- observe -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_observe_yields_new_values_and_survives_injected_objects(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    old = world.seal(b"0")
    producer.publish(TEMPERATURE, world.seal(b"1"))
    resource = producer.resource(TEMPERATURE)
    rejected: list[InvalidObject] = []
    stale: list[tuple[StaleCopy, bool]] = []
    readings: asyncio.Queue[Reading | Exception] = asyncio.Queue()

    async def pump(consumer: Consumer) -> None:
        # Always waiting for the next notification, as an application would be.
        try:
            async for reading in consumer.observe(
                producer.uri(),
                on_reject=rejected.append,
                on_stale=lambda copy, instead: stale.append((copy, instead)),
            ):
                await readings.put(reading)
        except Exception as exc:
            await readings.put(exc)

    async def next_value() -> bytes:
        item = await asyncio.wait_for(readings.get(), 5)
        if isinstance(item, Exception):
            raise item
        return item.plaintext

    async with Consumer(world.bundle(READER), tmp_path / "state", timeout=5) as consumer:
        task = asyncio.ensure_future(pump(consumer))
        try:
            assert await next_value() == b"1"
            await asyncio.wait_for(resource.observed.wait(), 5)

            producer.publish(TEMPERATURE, world.seal(b"2"))
            assert await next_value() == b"2"

            producer.publish(TEMPERATURE, old)  # an injected older object: reported, not the end
            await wait_until(lambda: len(stale) == 1)
            assert stale[0][1] is False and stale[0][0].served < stale[0][0].seen
            # A forgery that claims to be newer is what a rejection is.
            producer.publish(TEMPERATURE, world.seal(b"forged", key=world.other_key))
            await wait_until(lambda: len(rejected) == 1)
            assert not isinstance(rejected[0], StaleCopy)
            producer.publish(TEMPERATURE, world.seal(b"3"))
            assert await next_value() == b"3"
            resource.updated_state()  # the same object again: skipped silently
            await asyncio.sleep(0.2)
            producer.publish(TEMPERATURE, world.seal(b"4"))
            assert await next_value() == b"4"
            assert len(rejected) == 1

            resource.fail(Code.SERVICE_UNAVAILABLE)  # the server ends the observation
            with pytest.raises(Refused, match=r"ended the observation with 5\.03 Service Unavail"):
                await next_value()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.asyncio
async def test_cli_observe(world: World, producer: ProducerStandIn, tmp_path: Path) -> None:
    state = tmp_path / "state"
    resource = producer.resource(TEMPERATURE)
    old = world.seal(b"0")
    producer.publish(TEMPERATURE, world.seal(b"a"))

    # --count: the current value, then one new one; exit 0.
    run = asyncio.ensure_future(
        cli(world, state, "observe", producer.uri(), "--count", "2", "--json")
    )
    await asyncio.wait_for(resource.observed.wait(), 15)
    producer.publish(TEMPERATURE, world.seal(b"b"))
    result = await run
    assert result.code == 0, result
    assert [json.loads(line)["value"] for line in result.out.splitlines()] == ["a", "b"]
    assert result.err == ""

    # Without --count: a rejected notification is one line and observing goes on; the server
    # ending the observation ends the run with exit 4.
    # (A server of its own: aiocoap 0.4.17's server trips over the observer the first run left.)
    second = await ProducerStandIn().start()
    try:
        resource = second.resource(TEMPERATURE)
        second.publish(TEMPERATURE, world.seal(b"b"))
        run = asyncio.ensure_future(cli(world, state, "observe", second.uri()))
        await asyncio.wait_for(resource.observed.wait(), 15)
        second.publish(TEMPERATURE, old)
        await asyncio.sleep(0.3)
        second.publish(TEMPERATURE, world.seal(b"forged", key=world.other_key))
        await asyncio.sleep(0.3)
        second.publish(TEMPERATURE, world.seal(b"c"))
        await asyncio.sleep(0.3)
        resource.fail(Code.NOT_FOUND)
        result = await run
    finally:
        await second.close()
    assert result.code == 4, result
    assert result.out == b"b\nc\n"
    lines = result.err.splitlines()
    assert lines[0].startswith("oscar-consumer: warning: ") and "older than" in lines[0]
    assert lines[1].startswith(ERROR_PREFIX + "object rejected: ")
    assert lines[2] == ERROR_PREFIX + (
        f"not found: {second.address} ended the observation with 4.04 Not Found: "
        "no such resource there"
    )
    assert len(lines) == 3


# --- through a forward proxy ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_through_a_forward_proxy(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    proxy = await ForwardProxy().start()
    try:
        producer.publish(TEMPERATURE, world.seal(b"via proxy"))
        async with Consumer(world.bundle(READER), tmp_path / "state") as consumer:
            reading = await consumer.get(producer.uri(), proxy=proxy.address)
            assert reading.plaintext == b"via proxy"
            assert proxy.forwarded == [producer.uri()]
            # The proxy is not a producer: asked directly, it refuses.
            with pytest.raises(TransportError, match=r"4\.00"):
                await consumer.get(f"{proxy.address}/{TEMPERATURE}")
            # A reverse-proxy path with another prefix: the resource is named explicitly.
            with pytest.raises(ValueError):
                await consumer.get(f"{producer.address}/cache/x", resource="not a resource")
        result = await cli(
            world, tmp_path / "state", "get", producer.uri(), "--proxy", proxy.address
        )
        assert (result.code, result.out) == (0, b"via proxy")
        assert len(proxy.forwarded) == 2
    finally:
        await proxy.close()


def test_aiocoap_receive_callback_noise_is_one_line_and_other_errors_stay_loud(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The consumer CLI installs this handler: an undecodable datagram becomes one log line
    (stderr stays the CLI's one-line error), anything else still reaches asyncio's default
    handler: the DTLS client's doubled event is repaired where it arises (test_consumer_dtls),
    not hidden here."""
    import asyncio
    import logging

    from oscar_io.aiocoap_fixes import quiet_undecodable_datagrams

    loop = asyncio.new_event_loop()
    try:
        seen: list[dict[str, object]] = []
        loop.default_exception_handler = seen.append  # type: ignore[method-assign]
        quiet_undecodable_datagrams(loop, logging.getLogger("oscar.consumer"))
        recv = "<Handle _SelectorDatagramTransport._read_ready() RecvmsgProtocol>"
        undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        with caplog.at_level(logging.INFO, logger="oscar.consumer"):
            loop.call_exception_handler({"message": "x", "exception": undecodable, "handle": recv})
        assert seen == [] and "undecodable datagram" in caplog.text
        handle = "<Handle _SelectorDatagramTransport._read_ready()>"
        for exc in (RuntimeError("boom"), asyncio.InvalidStateError(), SystemError("x")):
            other = {"message": "x", "exception": exc, "handle": handle}
            loop.call_exception_handler(other)
            assert seen[-1] is other
        assert len(seen) == 3
    finally:
        loop.close()
