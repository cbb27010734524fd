"""Multicast delivery end to end, inside a network namespace the module makes (never the host's
interfaces): a real AS process, embedded producers sending to groups, consumers that joined."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from as_harness import ROOT, free_port
from netns_harness import (
    IPV4_INTERFACE,
    IPV6_INTERFACE,
    IPV6_OTHER,
    Namespace,
    available,
    multicast_namespace,
)
from system_harness import Deployment

from consumer import AccessDenied, Consumer
from oscar_io import multicast
from oscar_io.multicast import CONTENT, ECHO, GET, NON, UNAUTHORIZED, URI_PATH, Group
from producer import Producer, ProducerConfig, ResourceSpec
from producer.metrics import producer_metrics

READERS = 3


@pytest.fixture(scope="module")
def netns() -> Iterator[Namespace]:
    why = available()
    if why is not None:  # a missing tool fails, it never skips (make deps installs iproute2)
        pytest.fail(f"{why}: run the tests as root with iproute2 installed (make deps)")
    with multicast_namespace() as namespace:
        yield namespace


@pytest.fixture(scope="module")
def deployment(netns: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("mcast"))
    for i in range(READERS):
        d.enroll("consumer", f"reader-{i}")
    d.enroll("consumer", "outsider")  # granted nothing
    for name in ("meter-a", "meter-b", "meter-6"):
        d.enroll("producer", name)
        for i in range(READERS):
            d.grant(f"reader-{i}", f"{name}/*")
    d.start_as()
    yield d
    d.close()


async def start_producer(
    d: Deployment, tmp: Path, name: str, groups: list[Group], **options: Any
) -> Producer:
    config = ProducerConfig(
        bundle=d.root / f"{name}.json",
        state=tmp / name,
        listen=("127.0.0.1", free_port()),
        resources=[ResourceSpec("temp")],
        multicast=groups,
        multicast_interface=IPV4_INTERFACE,
        multicast_leisure=0.1,
        **options,
    )
    producer = Producer(config)
    await producer.start()
    return producer


async def sealed(producer: Producer, path: str, value: bytes) -> bytes:
    """Set a value and wait until it is sealed (the first needs the AS's secret)."""
    published = producer.resources[path]
    done = asyncio.Event()
    published.on_change.append(done.set)
    try:
        producer.update(path, value)
        if published.value != value or published.obj is None or not done.is_set():
            await asyncio.wait_for(done.wait(), 10)
    finally:
        published.on_change.remove(done.set)
    assert published.obj is not None
    return published.obj


def group() -> Group:
    return Group("224.0.1.187", free_port())


@pytest_asyncio.fixture
async def meters(deployment: Deployment, tmp_path: Path) -> AsyncIterator[tuple[Group, list[Any]]]:
    g = group()
    producers = [await start_producer(deployment, tmp_path, n, [g]) for n in ("meter-a", "meter-b")]
    try:
        yield g, producers
    finally:
        for p in producers:
            await p.stop()


async def next_reading(listener: Any) -> tuple[str, Any]:
    return await asyncio.wait_for(anext(listener), 5)


def readers(d: Deployment) -> list[Consumer]:
    return [Consumer(d.root / f"reader-{i}.json") for i in range(READERS)]


@pytest.mark.asyncio
async def test_the_sockets_and_the_as_live_in_the_namespace(
    netns: Namespace, deployment: Deployment
) -> None:
    assert netns.current()  # this thread: the sockets the tests make
    assert deployment.server is not None and deployment.server.proc is not None
    as_netns = os.stat(f"/proc/{deployment.server.proc.pid}/ns/net").st_ino
    assert as_netns == netns.inode  # the AS process, started meanwhile
    here = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # the namespace's own interfaces: the veth pair the harness made
        here.bind(("10.213.0.1", 0))
    finally:
        here.close()


@pytest.mark.asyncio
async def test_every_listener_gets_each_value_from_one_datagram(
    deployment: Deployment, meters: tuple[Group, list[Producer]]
) -> None:
    g, (meter, _) = meters
    consumers = readers(deployment)
    listeners = [
        c.join_group(str(g), ["meter-a/temp"], interface=IPV4_INTERFACE) for c in consumers
    ]
    try:
        for listener in listeners:
            await listener.__aenter__()
        iterators = [aiter(listener) for listener in listeners]
        sent_before = meter.groups.sent
        objects = []
        for value in (b"20.5", b"20.6", b"20.7"):
            objects.append(await sealed(meter, "temp", value))
            for it in iterators:
                resource_id, reading = await next_reading(it)
                assert resource_id == "meter-a/temp"
                assert reading.plaintext == value
        # One datagram per value for the three listeners (one group): not one per listener.
        assert meter.groups.sent - sent_before == 3
        # The same object as unicast: a GET of the producer's own server opens to the same.
        unicast = await consumers[0].get(
            f"coap://127.0.0.1:{meter.config.listen[1]}/meter-a/temp"  # type: ignore[index]
        )
        assert unicast.plaintext == b"20.7" and unicast.metadata == reading.metadata
        assert meter.resources["temp"].obj == objects[-1]
        assert [listener.accepted for listener in listeners] == [3, 3, 3]
        assert all(listener.rejected == listener.stale == 0 for listener in listeners)
    finally:
        for listener in listeners:
            listener.close()
        for c in consumers:
            await c.close()


@pytest.mark.asyncio
async def test_a_replayed_or_forged_datagram_to_the_group_is_refused(
    deployment: Deployment, meters: tuple[Group, list[Producer]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "oscar.consumer")
    g, (meter, _) = meters
    loop = asyncio.get_running_loop()
    tap = multicast.receiver_socket(g, IPV4_INTERFACE)  # what an attacker on the link records
    sender = multicast.sender_socket(socket.AF_INET, IPV4_INTERFACE)
    consumer = Consumer(deployment.root / "reader-0.json")
    try:
        async with consumer.join_group(str(g), ["meter-a/temp"], interface=IPV4_INTERFACE) as lst:
            it = aiter(lst)
            await sealed(meter, "temp", b"old")
            old = await asyncio.wait_for(loop.sock_recv(tap, 2048), 5)
            assert (await next_reading(it))[1].plaintext == b"old"
            await sealed(meter, "temp", b"new")
            new = await asyncio.wait_for(loop.sock_recv(tap, 2048), 5)
            assert (await next_reading(it))[1].plaintext == b"new"
            forged = bytearray(new)
            forged[-5] ^= 0x01  # in the signature
            for data in (old, new, bytes(forged), b"\x40\x01junk", new[:40]):
                sender.sendto(data, (g.address, g.port))
            await sealed(meter, "temp", b"newest")
            _, reading = await next_reading(it)  # after every datagram above
            assert reading.plaintext == b"newest"
            assert (lst.stale, lst.duplicates, lst.rejected) == (1, 1, 2)
            assert lst.dropped == 1 and lst.accepted == 3
            dropped = [r for r in caplog.records if "datagram dropped" in r.getMessage()]
            assert len(dropped) == 1  # three bad datagrams, one log line: no flood
    finally:
        tap.close()
        sender.close()
        await consumer.close()


@pytest.mark.asyncio
async def test_joining_a_group_grants_nothing(
    deployment: Deployment, meters: tuple[Group, list[Producer]]
) -> None:
    g, (meter, _) = meters
    async with (
        Consumer(deployment.root / "outsider.json") as outsider,
        outsider.join_group(str(g), ["meter-a/temp"], interface=IPV4_INTERFACE) as listener,
    ):
        await sealed(meter, "temp", b"secret reading")
        with pytest.raises(AccessDenied):  # the datagram came; its secret is not the outsider's
            await next_reading(aiter(listener))
        assert listener.accepted == 0
        readings = await outsider.group_get(str(g), "temp", timeout=0.5, interface=IPV4_INTERFACE)
        assert readings == {}  # the group GET's answers came too, and opened to nothing
        assert meter.groups.answered == 1


@pytest.mark.asyncio
async def test_a_group_get_reads_every_producer_of_the_group(
    deployment: Deployment, meters: tuple[Group, list[Producer]]
) -> None:
    g, producers = meters
    for p, value in zip(producers, (b"a-1", b"b-1"), strict=True):
        await sealed(p, "temp", value)
    async with Consumer(deployment.root / "reader-1.json") as consumer:
        readings = await consumer.group_get(str(g), "temp", timeout=1.0, interface=IPV4_INTERFACE)
    assert {r: v.plaintext for r, v in readings.items()} == {
        "meter-a/temp": b"a-1",
        "meter-b/temp": b"b-1",
    }
    # Each producer challenged the unproven address once, then answered the Echo's proof.
    assert [(p.groups.challenged, p.groups.answered) for p in producers] == [(1, 1), (1, 1)]


@pytest.mark.asyncio
async def test_an_unproven_group_get_gets_no_amplification(
    meters: tuple[Group, list[Producer]],
) -> None:
    g, producers = meters
    for p in producers:
        await sealed(p, "temp", b"x" * 200)
    loop = asyncio.get_running_loop()
    sock = multicast.sender_socket(socket.AF_INET, IPV4_INTERFACE)
    try:
        requests = [
            multicast.encode(
                NON, GET, 1, b"12345678", [(URI_PATH, b"meter-a"), (URI_PATH, b"temp")]
            ),
            multicast.encode(NON, GET, 2, b"abcdefgh", [(URI_PATH, b"temp"), (ECHO, bytes(8))]),
            multicast.encode(NON, GET, 3, b"ABCDEFGH", [(URI_PATH, b"temp")]),  # < a 4.01: nothing
            multicast.encode(0, GET, 4, b"zzzzzzzz", [(URI_PATH, b"temp")]),  # CON: never
        ]
        for request in requests:
            sock.sendto(request, (g.address, g.port))
        answers = []
        # meter-a challenges the first; the second only meter-b (meter-a challenged this
        # address a moment ago); nothing else.
        for _ in range(2):
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
            answers.append(data)
        sizes = {r[4:12]: len(r) for r in requests}
        for data in answers:
            message = multicast.decode(data)
            assert message is not None and message.code == UNAUTHORIZED and not message.payload
            assert len(data) <= sizes[message.token]
        assert [p.groups.challenged for p in producers] == [1, 1]
        assert [p.groups.answered for p in producers] == [0, 0]
        assert [p.groups.ignored for p in producers] == [3, 3]  # the short one, the CON, ...
        assert all(message.code != CONTENT for message in map(multicast.decode, answers) if message)
    finally:
        sock.close()


@pytest.mark.asyncio
async def test_an_ipv6_group_on_a_veth_interface(deployment: Deployment, tmp_path: Path) -> None:
    g = Group("ff05::fd", free_port())
    meter = await start_producer(
        deployment, tmp_path, "meter-6", [g], multicast_interface6=IPV6_INTERFACE
    )
    try:
        async with (
            Consumer(deployment.root / "reader-2.json") as consumer,
            consumer.join_group(str(g), ["meter-6/temp"], interface="mc0") as listener,
        ):
            await sealed(meter, "temp", b"v6")
            resource_id, reading = await next_reading(aiter(listener))
            assert (resource_id, reading.plaintext) == ("meter-6/temp", b"v6")
            assert meter.groups.sent == 1
            # A group GET over IPv6: from the veth's other end, through the Echo round trip.
            readings = await consumer.group_get(str(g), "temp", timeout=1.0, interface=IPV6_OTHER)
            assert {r: v.plaintext for r, v in readings.items()} == {"meter-6/temp": b"v6"}
            assert (meter.groups.challenged, meter.groups.answered) == (1, 1)
    finally:
        await meter.stop()


@pytest.mark.asyncio
async def test_the_command_line_reads_a_group(
    deployment: Deployment, meters: tuple[Group, list[Producer]], tmp_path: Path
) -> None:
    g, producers = meters
    for p, value in zip(producers, (b"a-2", b"b-2"), strict=True):
        await sealed(p, "temp", value)
    base = ["-m", "consumer", "--bundle", str(deployment.root / "reader-2.json")]
    base += ["--state", str(tmp_path / "cli")]
    command = [*base, "group-get", str(g), "temp", "--interface", IPV4_INTERFACE, "--wait", "1"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert out == b"meter-a/temp a-2\nmeter-b/temp b-2\n"
    nobody = [*base, "group-get", str(group()), "temp", "--interface", IPV4_INTERFACE]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *nobody, "--wait", "0.3", stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 4 and b"timed out: no producer" in err


@pytest.mark.asyncio
async def test_the_group_counters_are_metrics(meters: tuple[Group, list[Producer]]) -> None:
    _, (meter, _) = meters
    await sealed(meter, "temp", b"counted")
    families = {f.name: f.values for f in producer_metrics(meter).read()}
    assert families["oscar_producer_group_datagrams"][()] == meter.groups.sent >= 1
    assert families["oscar_producer_group_requests"][("challenged",)] == 0


def test_the_namespace_goes_away_on_failure_and_the_thread_comes_back(netns: Namespace) -> None:
    with pytest.raises(ZeroDivisionError), multicast_namespace() as inner:
        assert inner.current() and not netns.current()
        _ = 1 / 0
    assert netns.current()  # back where it was
    assert not Path(f"/run/netns/{inner.name}").exists()
