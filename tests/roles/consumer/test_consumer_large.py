"""Objects above 1 MiB at the consumer: spooled and checked as they arrive, in bounded memory.

A real AS (one per module), an aiocoap server on loopback serving real sealed bytes
(:class:`~consumer_harness.ProducerStandIn`), the consumer in process (the API) and as a real
subprocess (the CLI, whose peak RSS is read from its own ``getrusage``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiocoap import ACK, NON, Message
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from as_harness import ROOT
from consumer_harness import PRODUCER, TEMPERATURE, ProducerStandIn, World, build_world

from consumer import Consumer, InvalidObject
from consumer.spool import SPOOL_THRESHOLD
from oscar import PROFILES, Profile, ProtectedObject, Sealer

GCM = PROFILES["a128gcm-es256"]
CHACHA = PROFILES["chacha20-es256"]
MIB = 1 << 20

#: Runs ``python -m consumer`` and prints its own peak RSS (KiB) on its last stderr line: VmHWM,
#: this process's own high-water mark (``ru_maxrss`` would keep the parent's RSS at the fork).
RSS_WRAPPER = """
import re, runpy, sys
sys.argv = ["consumer", *sys.argv[1:]]
try:
    runpy.run_module("consumer", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open("/proc/self/status") as status:
    peak = re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1)
print("maxrss", peak, file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = build_world(tmp_path_factory.mktemp("consumer-large"))
    try:
        yield world
    finally:
        assert world.server.stop() == 0, world.server.log()


def seal(world: World, plaintext: bytes, profile: Profile = GCM) -> bytes:
    """An object of the temperature resource under ``profile``, with the module's next seq."""
    epoch, secret = world.secrets[TEMPERATURE]
    sealer = Sealer(
        secret=secret,
        producer_id=PRODUCER,
        resource_id=TEMPERATURE,
        epoch=epoch,
        signing_key=world.producer_key,
        profile=profile,
    )
    t = int(time.time())
    return sealer.seal(
        seq=world.next_seq(), iat=t, exp=t + 600, content_format=42, plaintext=plaintext
    )


def spooled(state: Path) -> list[str]:
    return [p.name for p in state.rglob(".spool-*")]


def flipped(data: bytes, pos: int) -> bytes:
    bad = bytearray(data)
    bad[pos] ^= 0x01
    return bytes(bad)


async def run_cli(world: World, state: Path, *args: str) -> tuple[int, bytes, str, int]:
    """(exit status, stdout, stderr without the RSS line, peak RSS in KiB) of one CLI run."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RSS_WRAPPER,
        "--bundle",
        str(world.bundle("reader-1")),
        "--state",
        str(state),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = err.decode().splitlines()
    assert lines and lines[-1].startswith("maxrss "), err
    assert proc.returncode is not None
    return proc.returncode, out, "\n".join(lines[:-1]), int(lines[-1].split()[1])


@pytest.mark.asyncio
async def test_large_objects_through_the_api(world: World, tmp_path: Path) -> None:
    """get() and get_file() of objects over the spool threshold give the one-shot's plaintext;
    the spool is gone after; a forged one leaves the output file as it was."""
    producer = await ProducerStandIn().start()
    state = tmp_path / "state"
    try:
        async with Consumer(world.bundle("reader-1"), state) as consumer:
            for profile, size in ((GCM, 2 * MIB), (CHACHA, SPOOL_THRESHOLD + 1)):
                plaintext = os.urandom(size)
                data = seal(world, plaintext, profile)
                producer.publish(TEMPERATURE, data)
                reading = await consumer.get(producer.uri())
                assert reading.plaintext == plaintext
                assert (
                    reading.metadata == ProtectedObject.from_bytes(data, max_size=BIGGER).metadata
                )
                assert spooled(state) == []

            plaintext = os.urandom(SPOOL_THRESHOLD + 4096)
            data = seal(world, plaintext, GCM)
            producer.publish(TEMPERATURE, data)
            out = tmp_path / "image.bin"
            m = await consumer.get_file(producer.uri(), out)
            assert (
                out.read_bytes() == plaintext
                and m.seq == ProtectedObject.from_bytes(data, max_size=BIGGER).metadata.seq
            )
            assert oct(out.stat().st_mode & 0o777) == "0o600"

            # The same object again is opened again (equal to the newest accepted).
            out.unlink()
            await consumer.get_file(producer.uri(), out)
            assert out.read_bytes() == plaintext

            # Forged: a ciphertext byte, the signature, a truncation. Nothing is released.
            newer = seal(world, os.urandom(SPOOL_THRESHOLD + 4096), GCM)
            for bad in (flipped(newer, len(newer) // 2), flipped(newer, len(newer) - 3)):
                producer.publish(TEMPERATURE, bad)
                with pytest.raises(InvalidObject):
                    await consumer.get_file(producer.uri(), out)
                assert out.read_bytes() == plaintext
                assert sorted(os.listdir(tmp_path)) == ["image.bin", "state"]
                assert spooled(state) == []

            # Over the limit: refused as it arrives.
            small = Consumer(world.bundle("reader-1"), None, max_object_size=MIB + 4096)
            async with small:
                producer.publish(TEMPERATURE, newer)
                with pytest.raises(InvalidObject) as caught:
                    await small.get(producer.uri())
                assert "size limit" in caught.value.reason
    finally:
        await producer.close()


BIGGER = 64 * MIB


#: The object of the CLI's memory test: twice the memory bound asserted, and more.
BIG = 6 * MIB


@pytest.mark.asyncio
async def test_mebibytes_by_the_cli_in_bounded_memory(world: World, tmp_path: Path) -> None:
    """6 MiB over real CoAP on loopback into ``get -o`` (10 MiB by hand: +0.5 MiB as well): the
    plaintext is right and the process's peak RSS grows by far less than the object over a
    100 KiB run's (and by more than it when the plaintext goes to stdout: the measure can tell);
    a tampered 2 MiB object exits 1 and leaves no file, no spool."""
    producer = await ProducerStandIn().start()
    state = tmp_path / "state"
    try:
        small = os.urandom(100 << 10)
        producer.publish(TEMPERATURE, seal(world, small, GCM))
        code, out, err, base_rss = await run_cli(
            world, state, "get", producer.uri(), "-o", str(tmp_path / "small")
        )
        assert (code, out, err) == (0, b"", "")
        assert (tmp_path / "small").read_bytes() == small

        plaintext = os.urandom(BIG)
        data = seal(world, plaintext, GCM)
        producer.publish(TEMPERATURE, data)
        target = tmp_path / "big"
        code, out, err, big_rss = await run_cli(
            world, state, "get", producer.uri(), "-o", str(target), "--json"
        )
        assert code == 0, err
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(plaintext).digest()
        assert f'"length": {BIG}'.encode() in out
        grown = (big_rss - base_rss) * 1024
        print(f"peak RSS: 100 KiB run {base_rss} KiB, {BIG >> 20} MiB run {big_rss} KiB")
        assert grown < 3 * MIB, f"the {BIG >> 20} MiB run's peak RSS grew by {grown} bytes"
        assert spooled(state) == []
        # The measure can tell: the same object to stdout holds its plaintext in memory.
        code, out, err, stdout_rss = await run_cli(world, state, "get", producer.uri())
        assert (code, len(out)) == (0, BIG), err
        assert (stdout_rss - base_rss) * 1024 > BIG

        bad = flipped(seal(world, os.urandom(2 * MIB), GCM), MIB)
        producer.publish(TEMPERATURE, bad)
        code, out, err, _ = await run_cli(
            world, state, "get", producer.uri(), "-o", str(tmp_path / "forged")
        )
        assert code == 1 and err.startswith("oscar-consumer: error: object rejected"), err
        assert not (tmp_path / "forged").exists()
        assert sorted(os.listdir(tmp_path)) == ["big", "small", "state"]
        assert spooled(state) == []
    finally:
        await producer.close()


@pytest.mark.asyncio
async def test_a_cancelled_transfer_leaves_no_spool_and_no_file(
    world: World, tmp_path: Path
) -> None:
    producer = await ProducerStandIn().start()
    state = tmp_path / "state"
    out = tmp_path / "out.bin"
    try:
        producer.publish(TEMPERATURE, seal(world, os.urandom(4 * MIB)))
        async with Consumer(world.bundle("reader-1"), state) as consumer:
            task = asyncio.create_task(consumer.get_file(producer.uri(), out))
            deadline = time.monotonic() + 30
            while not spooled(state):  # the transfer is past the threshold, spooling
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert spooled(state) == []
        assert sorted(os.listdir(tmp_path)) == ["state"]
    finally:
        await producer.close()


@pytest.mark.asyncio
async def test_the_size_limit_in_flags_and_config(world: World, tmp_path: Path) -> None:
    producer = await ProducerStandIn().start()
    state = tmp_path / "state"
    try:
        producer.publish(TEMPERATURE, seal(world, os.urandom(SPOOL_THRESHOLD * 2)))
        code, _, err, _ = await run_cli(world, state, "--max-object-size", "12", "get", "x")
        assert code == 2 and "max_object_size must be 1024 to" in err
        config = tmp_path / "consumer.toml"
        config.write_text('max_object_size = "big"\n')
        code, _, err, _ = await run_cli(world, state, "--config", str(config), "get", "x")
        assert code == 2 and err.endswith("max_object_size has the wrong type"), err
        config.write_text(f"max_object_size = {SPOOL_THRESHOLD + SPOOL_THRESHOLD // 2}\n")
        code, _, err, _ = await run_cli(
            world, state, "--config", str(config), "get", producer.uri(), "-o", str(tmp_path / "o")
        )
        assert code == 1 and "exceeds the size limit" in err, err
        assert sorted(os.listdir(tmp_path)) == ["consumer.toml", "state"]
    finally:
        await producer.close()


class BlockwiseObservable(asyncio.DatagramProtocol):
    """Serves one object and notifies its observer of each new one block-wise (RFC 7959 §2.6:
    block 0 with Observe, NON; the rest when asked for), which aiocoap's server cannot do (as
    test_large_proxy's RawObservable)."""

    def __init__(self) -> None:
        self.obj = b""
        self.observer: tuple[Any, bytes] | None = None
        self.number = 1
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def _block(self, number: int, observe: int | None) -> Message:
        chunk = self.obj[number * 1024 : (number + 1) * 1024]
        message = Message(code=Code.CONTENT, payload=chunk, content_format=18, max_age=60)
        message.opt.etag = hashlib.sha256(self.obj).digest()[:8]
        message.opt.observe = observe
        if len(self.obj) > 1024:
            more = (number + 1) * 1024 < len(self.obj)
            message.opt.block2 = BlockOption.BlockwiseTuple(number, more, 6)
        return message

    def serve(self, obj: bytes) -> None:
        self.obj = obj
        if self.observer is not None:
            self.number += 1
            notification = self._block(0, self.number)
            notification.mtype, notification.mid = NON, self.number
            notification.token = self.observer[1]
            self.transport.sendto(notification.encode(), self.observer[0])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        request = Message.decode(data)
        if request.code != Code.GET:
            return
        number = 0 if request.opt.block2 is None else request.opt.block2.block_number
        if request.opt.observe == 0:
            self.observer = (addr, request.token)
        reply = self._block(number, self.number if request.opt.observe == 0 else None)
        reply.mtype, reply.mid, reply.token = ACK, request.mid, request.token
        self.transport.sendto(reply.encode(), addr)


@pytest.mark.asyncio
async def test_a_large_notification_is_spooled_and_opened(world: World, tmp_path: Path) -> None:
    """An observation whose new object is over the spool threshold: read as it arrives, opened;
    a forged large one is rejected and the observation goes on; nothing is left in the state
    directory."""
    server = BlockwiseObservable()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    state = tmp_path / "state"
    rejected: list[InvalidObject] = []
    following: list[bytes] = []

    def on_reject(exc: InvalidObject) -> None:
        rejected.append(exc)
        server.serve(following.pop())

    try:
        server.serve(seal(world, b"small"))
        async with Consumer(world.bundle("reader-1"), state) as consumer:
            observation = consumer.observe(
                f"coap://127.0.0.1:{port}/{TEMPERATURE}", on_reject=on_reject
            )
            assert (await asyncio.wait_for(anext(observation), 10)).plaintext == b"small"
            big = os.urandom(SPOOL_THRESHOLD + 8192)
            data = seal(world, big, CHACHA)
            server.serve(data)
            assert (await asyncio.wait_for(anext(observation), 30)).plaintext == big
            assert spooled(state) == []
            # A forged one is rejected (then, and not before, the next is served: a new object
            # during a transfer would break it off) and the observation goes on.
            last = os.urandom(3000)
            following.append(seal(world, last))
            server.serve(flipped(seal(world, os.urandom(SPOOL_THRESHOLD + 8192)), MIB))
            assert (await asyncio.wait_for(anext(observation), 30)).plaintext == last
            await observation.aclose()
        assert len(rejected) == 1
        assert spooled(state) == []
    finally:
        transport.close()
