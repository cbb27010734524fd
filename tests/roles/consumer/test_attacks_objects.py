"""Attacks on protected objects and on the consumer, against real processes (issue 8).

A real AS (:func:`consumer_harness.build_world`) certifies the producers and hands out secrets;
objects are sealed or forged here and served by a stand-in producer (or by a raw UDP server
that speaks just enough CoAP to stream Block2 blocks forever); the consumer is the real CLI
(``python -m consumer``), one process per reading, so freshness is what its state directory
kept across restarts.

What is covered elsewhere, in memory (``tests/core/test_objects.py``): every single bit flip,
truncation, trailing bytes, the nesting bomb, the size limit before decoding, unknown, changed
and unprotected-only algorithms, EdDSA labelled ES256 and the reverse, resource A as B and epoch N
as N+1 with the object's own signature. Here they are forged with a *valid* signature by the
real producer's key (the strongest form) and fed to the real consumer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import pytest_asyncio
from aiocoap import ACK, CON, NON, Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from consumer_harness import (
    HUMIDITY,
    OTHER_PRODUCER,
    PRODUCER,
    READER,
    REVOKED_PRODUCER,
    TEMPERATURE,
    ProducerStandIn,
    Result,
    World,
    build_world,
    cli,
)
from cryptography.hazmat.primitives.asymmetric import ec

from authz_server.store import Store
from consumer import Consumer, InvalidObject
from consumer.store import ConsumerStore
from demo.system import free_port
from oscar import ProtectedObject, Sealer, certs
from oscar.algorithms import ES256, PrivateKey
from oscar_io.blockwise import DEFAULT_WINDOW
from oscar_io.bundle import Bundle

ERROR = "oscar-consumer: error: "


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = build_world(tmp_path_factory.mktemp("attacks"))
    try:
        yield world
    finally:
        status = world.server.stop()
        text = world.server.log()
        assert status == 0, text
        assert "Traceback" not in text, text


def rejected(run: Result) -> str:
    """The reason of a rejection by the CLI (exit 1, one line, nothing on stdout)."""
    assert run.code == 1 and run.out == b"", run
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR + "object rejected: "), run
    return lines[0].removeprefix(ERROR + "object rejected: ")


def accepted(run: Result) -> bytes:
    assert run.code == 0 and run.err == "", run
    return run.out


WARNING = "oscar-consumer: warning: "


def held_instead(run: Result, seen: tuple[int, int]) -> bytes:
    """The output of a CLI run that was served a stale copy (a valid object older than the
    newest accepted, ``seen``): one warning line, and the newest reading held (exit 0)."""
    assert run.code == 0, run
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(WARNING), run
    assert f"older than epoch {seen[0]} seq {seen[1]}" in lines[0], run
    assert lines[0].endswith(f"showing the newest reading held (epoch {seen[0]} seq {seen[1]})")
    return run.out


def version(data: bytes) -> tuple[int, int]:
    m = ProtectedObject.from_bytes(data).metadata
    return (m.epoch, m.seq)


def resign(data: bytes, key: PrivateKey, mutate: Callable[[dict[Any, Any]], None]) -> bytes:
    """Change an object's protected Sign1 header and sign it again with ``key`` (ES256), as a
    forger holding that key would: the signature is valid, the content is unchanged."""
    outer = list(cbor2.loads(data).value)
    header = dict(cbor2.loads(outer[0]))
    header[15] = dict(header[15])
    mutate(header)
    protected = cbor2.dumps(header)
    tbs = cbor2.dumps(["Signature1", protected, b"", outer[2]])
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, outer[2], ES256.sign(key, tbs)]))


def _revoked_object(world: World) -> bytes:
    t = int(time.time())
    return Sealer(
        secret=world.secrets[TEMPERATURE][1],
        producer_id=REVOKED_PRODUCER,
        resource_id=f"{REVOKED_PRODUCER}/door",
        epoch=1,
        signing_key=world.revoked_key,
    ).seal(seq=1, iat=t, exp=t + 600, content_format=0, plaintext=b"open")


# --- forged signers, forged headers: the real consumer process refuses ---------------------------


def _forgeries(world: World) -> dict[str, tuple[str, bytes, str]]:
    """name -> (resource the object is served as, object, the reason the consumer must give)."""
    epoch = world.secrets[TEMPERATURE][0]
    good = world.seal(b"20")
    stranger = certs.generate_signing_key()

    def real_kid(header: dict[Any, Any]) -> None:
        header[4] = certs.key_id(world.producer_key.public_key())

    def as_humidity(header: dict[Any, Any]) -> None:
        header[15][2] = HUMIDITY

    def next_epoch(header: dict[Any, Any]) -> None:
        header[-65537] = epoch + 1

    def this_epoch(header: dict[Any, Any]) -> None:
        header[-65537] = epoch

    def as_other_producer(header: dict[Any, Any]) -> None:
        header[15][1] = OTHER_PRODUCER

    return {
        # a key the AS never certified: the AS knows no such kid
        "never_certified_key": (TEMPERATURE, world.seal(b"20", key=stranger), "signer unknown"),
        # ... with the real producer's kid written in: the signature does not verify
        "never_certified_key_with_real_kid": (
            TEMPERATURE,
            resign(world.seal(b"20", key=stranger), stranger, real_kid),
            "bad signature",
        ),
        # producer X's valid certificate (sensor-2) signing an object with iss = sensor-1
        "another_producers_certified_key": (
            TEMPERATURE,
            world.seal(b"20", key=world.other_key),
            "signer not acceptable: the certificate names another device",
        ),
        # sensor-1's object claiming iss = sensor-2, signed by sensor-2's certified key: the
        # resource is not sensor-2's
        "another_producer_claiming_the_resource": (
            TEMPERATURE,
            resign(world.seal(b"20", key=world.other_key), world.other_key, as_other_producer),
            "resource does not belong to the issuing producer",
        ),
        # a producer whose certificate the AS revoked: the AS no longer hands it out
        "revoked_producer": (f"{REVOKED_PRODUCER}/door", _revoked_object(world), "signer unknown"),
        # ... and one the consumer cached before the revocation: the CRL from the AS says no
        "revoked_producer_cached_before_revocation": (
            f"{REVOKED_PRODUCER}/door",
            _revoked_object(world),
            "signer not acceptable: the certificate has been revoked",
        ),
        "expired_object": (
            TEMPERATURE,
            world.seal(b"20", age=100, lifetime=10),
            "object expired",
        ),
        # the real producer's valid signature over a header naming resource B: the content was
        # sealed for resource A, so it cannot be opened as B
        "resource_a_as_b_validly_signed": (
            HUMIDITY,
            resign(good, world.producer_key, as_humidity),
            "decryption failed",
        ),
        # ... and over epoch N + 1: the AS gives no secret of a pre-active epoch to a consumer
        # (exit 3, nothing returned)
        "epoch_n_as_n_plus_1_validly_signed": (
            TEMPERATURE,
            resign(world.seal(b"20"), world.producer_key, next_epoch),
            "access denied by the AS: ",
        ),
        # ... and sealed under epoch N + 1's secret, signed as epoch N: the secret of N does not
        # open it
        "epoch_n_plus_1_as_n_validly_signed": (
            TEMPERATURE,
            resign(world.seal(b"20", upcoming=True), world.producer_key, this_epoch),
            "decryption failed",
        ),
    }


FORGERIES = [
    "never_certified_key",
    "never_certified_key_with_real_kid",
    "another_producers_certified_key",
    "another_producer_claiming_the_resource",
    "revoked_producer",
    "revoked_producer_cached_before_revocation",
    "expired_object",
    "resource_a_as_b_validly_signed",
    "epoch_n_as_n_plus_1_validly_signed",
    "epoch_n_plus_1_as_n_validly_signed",
]


@pytest.mark.asyncio
async def test_forged_objects_are_refused_by_the_consumer_process(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    forgeries = _forgeries(world)
    assert sorted(forgeries) == sorted(FORGERIES)
    runs = []
    for name in FORGERIES:
        resource_id, data, _ = forgeries[name]
        server = await ProducerStandIn().start()
        server.publish(resource_id, data)
        if name.endswith("_cached_before_revocation"):
            bundle = Bundle.load(world.bundle(READER))
            store = ConsumerStore(tmp_path / name, bundle.state_key("consumer"))
            kid = certs.key_id(world.revoked_key.public_key())
            store.trust.put_certificate(kid, world.revoked_cert, int(time.time()) + 86_400)
        runs.append((name, server, cli(world, tmp_path / name, "get", server.uri(resource_id))))
    try:
        results = await asyncio.gather(*(run for _, _, run in runs))
    finally:
        for _, server, _ in runs:
            await server.close()
    for (name, _, _), result in zip(runs, results, strict=True):
        expected = forgeries[name][2]
        if expected.startswith("access denied"):
            assert result.code == 3 and result.out == b"", (name, result)
            assert result.err.startswith(ERROR + expected), (name, result)
            continue
        reason = rejected(result)
        assert reason.startswith(expected), (name, reason)
    # The same consumer still accepts the real thing.
    producer.publish(TEMPERATURE, world.seal(b"genuine"))
    assert accepted(await cli(world, tmp_path / "ok", "get", producer.uri())) == b"genuine"


# --- freshness across consumer restarts ----------------------------------------------------------


@pytest.mark.asyncio
async def test_replay_and_rollback_are_refused_after_the_consumer_restarts(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    """Each step is a new consumer process on the same state directory: what an earlier run
    accepted is remembered on disk (encrypted), not in memory."""
    state = tmp_path / "state"
    uri = producer.uri(HUMIDITY)
    rid = HUMIDITY
    never_seen_older = world.seal(b"older, never seen", rid)
    first = world.seal(b"first", rid)
    second = world.seal(b"second", rid)

    producer.publish(rid, first)
    assert accepted(await cli(world, state, "get", uri)) == b"first"
    producer.publish(rid, second)
    assert accepted(await cli(world, state, "get", uri)) == b"second"

    # A replay of an object accepted before (older than the newest), in a new process: never
    # accepted nor shown; the newest reading held, checked again, is given with a warning.
    producer.publish(rid, first)
    assert held_instead(await cli(world, state, "get", uri), version(second)) == b"second"
    # A rollback to an older object this consumer never saw.
    producer.publish(rid, never_seen_older)
    assert held_instead(await cli(world, state, "get", uri), version(second)) == b"second"
    # The newest again is the same reading again (DESIGN: a value is sealed once, served to all).
    producer.publish(rid, second)
    assert accepted(await cli(world, state, "get", uri)) == b"second"

    # Across epochs: the AS rotates; once epoch N + 1 was accepted, epoch N is refused,
    # whatever its seq.
    store = await Store.open(world.as_state)
    try:
        epoch = await store.rotate(rid, int(time.time()), actor="test", reason="test")
    finally:
        await store.close()
    assert epoch == world.next_epoch[rid][0]
    next_epoch = world.seal(b"next epoch", rid, upcoming=True, seq=1)
    producer.publish(rid, next_epoch)
    assert accepted(await cli(world, state, "get", uri)) == b"next epoch"
    producer.publish(rid, world.seal(b"old epoch, high seq", rid, seq=world.next_seq() + 10**6))
    assert held_instead(await cli(world, state, "get", uri), version(next_epoch)) == b"next epoch"
    producer.publish(rid, second)
    assert held_instead(await cli(world, state, "get", uri), version(next_epoch)) == b"next epoch"

    # The observe command starts from the same remembered state: the stale first answer gives
    # the newest reading held, then the new one.
    producer.publish(rid, first)
    observing = asyncio.ensure_future(cli(world, state, "observe", uri, "--count", "2"))
    await asyncio.wait_for(producer.resource(rid).observed.wait(), 20)
    producer.publish(rid, world.seal(b"newest", rid, upcoming=True, seq=2))
    run = await observing
    assert run.out == b"next epoch\nnewest\n"
    assert held_instead(run, version(next_epoch))


@pytest.mark.asyncio
async def test_a_stale_copy_is_an_error_once_the_newest_held_has_expired(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    """The newest reading held is given only while it is valid: expired, the stale copy is
    reported as what it is (exit 4, "stale copy:"), not as an attack, and not shown."""
    state = tmp_path / "state"
    rid = HUMIDITY
    older = world.seal(b"older, long-lived", rid)
    short = world.seal(b"short-lived", rid, lifetime=2)
    producer.publish(rid, short)
    assert accepted(await cli(world, state, "get", producer.uri(rid))) == b"short-lived"
    await asyncio.sleep(3.5)  # the object held expires (exp is in whole seconds)
    producer.publish(rid, older)
    run = await cli(world, state, "get", producer.uri(rid))
    assert run.code == 4 and run.out == b"", run
    line = run.err.splitlines()
    assert len(line) == 1 and line[0].startswith(ERROR + "stale copy: "), run
    assert f"epoch {version(older)[0]} seq {version(older)[1]}, older than" in line[0]
    assert "rejected" not in line[0]


# --- oversized payloads: bounded at the consumer's transport -------------------------------------


class EndlessBlocks(asyncio.DatagramProtocol):
    """A hostile CoAP server: answers every GET with a 1 KiB Block2 block, always with "more",
    for whatever block number it is asked (optionally announcing a Size2)."""

    def __init__(self, size2: int | None = None) -> None:
        self.size2 = size2
        self.requests = 0
        self.transport: Any = None
        self.delay = 0.0  # answers this late, counting the requests waiting for one
        self.waiting = 0
        self.most_waiting = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            request = Message.decode(data)
        except Exception:
            return
        if not request.code.is_request():
            return
        self.requests += 1
        number = request.opt.block2.block_number if request.opt.block2 is not None else 0
        response = Message(
            code=Code.CONTENT,
            payload=b"\xd2" * 1024,
            content_format=18,
        )
        response.token = request.token
        response.mtype = ACK if request.mtype == CON else NON
        response.mid = request.mid if request.mtype == CON else (self.requests & 0xFFFF)
        response.opt.block2 = BlockOption.BlockwiseTuple(number, True, 6)
        if self.size2 is not None:
            response.opt.size2 = self.size2
        if not self.delay:
            self.transport.sendto(response.encode(), addr)
            return
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)

        def send() -> None:
            self.waiting -= 1
            self.transport.sendto(response.encode(), addr)

        asyncio.get_running_loop().call_later(self.delay, send)


@pytest_asyncio.fixture
async def endless() -> AsyncIterator[tuple[EndlessBlocks, str]]:
    port = free_port()
    loop = asyncio.get_running_loop()
    server = EndlessBlocks()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", port)
    )
    try:
        yield server, f"coap://127.0.0.1:{port}/{TEMPERATURE}"
    finally:
        transport.close()


@pytest.mark.asyncio
async def test_endless_block2_stream_is_cut_off_at_the_size_limit(
    world: World, endless: tuple[EndlessBlocks, str], tmp_path: Path
) -> None:
    server, uri = endless
    limit = 16 * 1024
    async with Consumer(world.bundle(READER), tmp_path / "lib", max_object_size=limit) as c:
        with pytest.raises(InvalidObject) as info:
            await asyncio.wait_for(c.get(uri), 20)
    assert "size limit" in info.value.reason
    # Never more blocks asked for than the limit holds (the last one is refused unasked).
    assert server.requests == limit // 1024
    assert c.store.freshness.newest(TEMPERATURE) is None

    # The CLI, with the default limit (64 MiB), stops too rather than run forever: past 1 MiB
    # the object is spooled and read as it arrives, and these are no COSE headers.
    server.requests = 0
    reason = rejected(await cli(world, tmp_path / "cli", "--timeout", "5", "get", uri))
    assert reason == "COSE_Sign1 is not an array of 4"
    assert server.requests <= (1 << 20) // 1024 + DEFAULT_WINDOW + 5


@pytest.mark.asyncio
@pytest.mark.parametrize("window", [DEFAULT_WINDOW, 3])
async def test_blocks_are_asked_for_several_at_a_time_within_the_window(
    world: World, endless: tuple[EndlessBlocks, str], tmp_path: Path, window: int
) -> None:
    """The consumer keeps its window of blocks in flight (the default, or ``block_window``),
    not one per round trip, and not more: the slow server sees exactly that many requests
    waiting at once; the limit still ends the transfer with no block asked for past it."""
    server, uri = endless
    server.delay = 0.03
    limit = 32 * 1024
    async with Consumer(
        world.bundle(READER), tmp_path / "lib", max_object_size=limit, block_window=window
    ) as c:
        with pytest.raises(InvalidObject) as info:
            await asyncio.wait_for(c.get(uri), 20)
    assert "size limit" in info.value.reason
    assert server.most_waiting == window
    assert server.requests == limit // 1024


@pytest.mark.asyncio
async def test_announced_oversize_is_refused_before_the_second_block(
    world: World, endless: tuple[EndlessBlocks, str], tmp_path: Path
) -> None:
    server, uri = endless
    server.size2 = 1 << 30
    async with Consumer(world.bundle(READER), None) as c:
        with pytest.raises(InvalidObject) as info:
            await c.get(uri)
    assert info.value.reason == "object exceeds the size limit (announced)"
    assert server.requests == 1


@pytest.mark.asyncio
async def test_blockwise_objects_within_the_limit_still_arrive(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    big = bytes(range(256)) * 200  # 51,200 bytes: 51 blocks of 1 KiB
    producer.publish(TEMPERATURE, world.seal(big, content_format=42))
    async with Consumer(world.bundle(READER), None) as c:
        assert (await c.get(producer.uri())).plaintext == big
        # the same object with a limit just below its size is refused, at the transport
        data = producer.resources[TEMPERATURE].data
        assert data is not None
        c.max_object_size = len(data) - 1
        with pytest.raises(InvalidObject) as info:
            await c.get(producer.uri())
        assert "size limit" in info.value.reason
        c.max_object_size = len(data)
        assert (await c.get(producer.uri())).plaintext == big
    assert PRODUCER in TEMPERATURE
