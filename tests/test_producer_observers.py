"""Observers of a real producer process: bounded in all and per address, confirmable
notifications (one in flight, the newest wins, an observer that refuses one is dropped), and no
traceback when observers leave abruptly."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from system_harness import Deployment, ProducerProcess, wait_until, write_atomic

_counter = iter(range(1000))

#: A minimal observer, as a user would run one and then press Ctrl-C.
OBSERVER = """
import asyncio, sys
from aiocoap import GET, Context, Message
async def main():
    ctx = await Context.create_client_context()
    request = ctx.request(Message(code=GET, uri=sys.argv[1], observe=0))
    print("observing", (await request.response).opt.observe is not None, flush=True)
    async for _ in request.observation:
        print("notified", flush=True)
asyncio.run(main())
"""

CON, NON, ACK, RST = 0, 1, 2, 3
OBSERVE, URI_PATH = 6, 11


def registration(path: str, token: bytes, mid: int, mtype: int = CON) -> bytes:
    """A GET with Observe: 0 (no library: the tests play a client that does not answer)."""
    out = bytes([0x40 | mtype << 4 | len(token), 0x01]) + mid.to_bytes(2, "big") + token
    out += bytes([OBSERVE << 4])  # Observe, empty value (0)
    number = OBSERVE
    for segment in path.split("/"):
        data = segment.encode()
        assert len(data) < 13
        out += bytes([(URI_PATH - number) << 4 | len(data)]) + data
        number = URI_PATH
    return out


class Answer:
    """The header fields of a received datagram that the tests look at."""

    def __init__(self, data: bytes) -> None:
        self.raw = data
        self.mtype = data[0] >> 4 & 3
        self.code = data[1]
        self.mid = int.from_bytes(data[2:4], "big")
        self.token = data[4 : 4 + (data[0] & 0x0F)]
        self.observe: int | None = None
        pos, number = 4 + len(self.token), 0
        while pos < len(data) and data[pos] != 0xFF:
            delta, length = data[pos] >> 4, data[pos] & 0x0F
            pos += 1
            if delta == 13:
                delta, pos = 13 + data[pos], pos + 1
            if length == 13:
                length, pos = 13 + data[pos], pos + 1
            number += delta
            if number == OBSERVE:
                self.observe = int.from_bytes(data[pos : pos + length], "big")
            pos += length


def receive(sock: socket.socket, seconds: float) -> list[Answer]:
    """Every datagram that arrives within ``seconds``."""
    answers = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            answers.append(Answer(sock.recv(4096)))
        except TimeoutError:
            break
    return answers


def line(process: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """The next line a child prints ("" if none comes within ``timeout`` seconds)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if ready else ""


def client(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("deploy"))
    d.start_as()
    yield d
    d.close()


def start_producer(d: Deployment, tmp_path: Path, *args: str) -> tuple[ProducerProcess, str, Path]:
    device_id = f"watched-{next(_counter)}"
    bundle = d.enroll("producer", device_id)
    value = tmp_path / "v.txt"
    value.write_bytes(b"1")
    producer = ProducerProcess(
        bundle, tmp_path / "p", "--resource", f"v={value}", "--interval", "0.05", *args
    )
    producer.start()
    wait_until(lambda: "now sealing" in producer.log())
    return producer, f"{device_id}/v", value


def test_observers_are_bounded_per_address_and_in_all(
    deployment: Deployment, tmp_path: Path
) -> None:
    producer, rid, _ = start_producer(
        deployment, tmp_path, "--max-observers", "7", "--max-observers-per-address", "3"
    )
    sockets = [client(f"127.0.0.{i}") for i in (1, 2, 3)]
    try:
        accepted = []
        for n, sock in enumerate(sockets):
            for i in range(10):
                sock.sendto(
                    registration(rid, bytes([n, i]), n * 100 + i), ("127.0.0.1", producer.port)
                )
            answers = receive(sock, 2.0)
            assert len(answers) == 10  # each registration gets the object ...
            assert all(a.code == 0x45 for a in answers)
            # ... and at most three from one address are observations
            accepted.append(sum(a.observe is not None for a in answers))
        assert accepted == [3, 3, 1]  # at most seven in all
        assert "answered without Observe" in producer.log()
        # an observer that refuses a notification (RST) is dropped, and its place is free again
        sock = sockets[0]
        write_atomic(tmp_path / "v.txt", b"2")
        notifications = receive(sock, 3.0)
        assert notifications and all(a.mtype == CON for a in notifications)
        first = notifications[0]
        sock.sendto(bytes([0x70, 0, *first.mid.to_bytes(2, "big")]), ("127.0.0.1", producer.port))
        sock.sendto(registration(rid, b"again", 999), ("127.0.0.1", producer.port))
        again = [a for a in receive(sock, 2.0) if a.token == b"again"]
        assert again and again[0].observe is not None
    finally:
        for sock in sockets:
            sock.close()
        producer.stop()


def test_an_observer_that_does_not_acknowledge_gets_one_notification_in_flight(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A spoofed source (it never asked, it acknowledges nothing) gets one CON notification and
    its retransmissions, however many new values there are: the newest waits, and is sent only
    once the previous one is acknowledged."""
    producer, rid, value = start_producer(deployment, tmp_path)
    victim = client()
    try:
        victim.sendto(registration(rid, b"v", 1, mtype=NON), ("127.0.0.1", producer.port))
        first = receive(victim, 1.0)
        assert len(first) == 1 and first[0].observe == 0
        for n in range(2, 12):
            write_atomic(value, str(n).encode())
            time.sleep(0.4)
        got = receive(victim, 2.0)
        # one notification (the first new value), retransmitted: the same message each time
        assert got, "no notification at all"
        assert {(a.mtype, a.mid, a.observe) for a in got} == {(CON, got[0].mid, 1)}
        assert len(got) <= 3  # retransmissions at 2-3 s, then 4-6 s later, ...
        # acknowledged: the newest value comes next, not the nine in between
        victim.sendto(
            bytes([0x60, 0, *got[0].mid.to_bytes(2, "big")]), ("127.0.0.1", producer.port)
        )
        following = [a for a in receive(victim, 2.0) if a.mid != got[0].mid]
        assert [a.observe for a in following] == [2]
    finally:
        victim.close()
        producer.stop()


def test_observers_that_leave_abruptly_leave_no_traceback(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Ctrl-C on observers, then new values: the notifications meet closed ports (ICMP). aiocoap
    0.4.17 logged two tracebacks per observer ("'bool' object is not iterable", "unexpected
    keyword argument 'exception'"); the observers are dropped quietly and their places freed."""
    producer, rid, value = start_producer(deployment, tmp_path, "--max-observers-per-address", "5")
    observers = [
        subprocess.Popen(
            [sys.executable, "-c", OBSERVER, producer.uri(rid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(5)
    ]
    stays, *leaving = observers
    try:
        for observer in observers:
            assert line(observer) == "observing True"
        write_atomic(value, b"2")
        for observer in observers:
            assert line(observer) == "notified"
        for observer in leaving:
            observer.send_signal(signal.SIGINT)
            observer.wait(10)
        for n in range(3, 8):
            write_atomic(value, str(n).encode())
            assert line(stays) == "notified"  # another observer's end does not end its own
        stays.send_signal(signal.SIGINT)
        stays.wait(10)
        write_atomic(value, b"8")
        time.sleep(1.0)
        # their places are free again: five new observations from this address
        sock = client()
        try:
            for i in range(5):
                sock.sendto(registration(rid, bytes([i]), i), ("127.0.0.1", producer.port))
            assert sum(a.observe is not None for a in receive(sock, 2.0)) == 5
        finally:
            sock.close()
    finally:
        for observer in observers:
            observer.kill()
            observer.wait()
            if observer.stdout is not None:
                observer.stdout.close()
        producer.stop()
    log = producer.log()
    assert "Traceback" not in log and "never retrieved" not in log, log[-3000:]


def test_memory_stays_bounded_under_ten_thousand_registrations(
    deployment: Deployment, tmp_path: Path
) -> None:
    """aiocoap remembered every request with its response for 247 s (about 3.4 KiB each): 10,000
    registrations took the producer's RSS up by some 33 MiB. Bounded (producer.duplicates), and
    with the observers bounded, they cost a few MiB."""
    producer, rid, _ = start_producer(deployment, tmp_path)
    sock = client()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        time.sleep(0.5)
        idle = producer.rss_kib()
        answered = 0
        for batch in range(100):
            for i in range(100):
                n = batch * 100 + i
                sock.sendto(
                    registration(rid, n.to_bytes(2, "big"), n), ("127.0.0.1", producer.port)
                )
            answered += len(receive_some(sock, 100, 2.0))
        grown = (producer.rss_kib() - idle) / 1024
        assert answered >= 9_000  # they did reach it
        assert grown < 16, f"RSS grew {grown:.1f} MiB"
        # a retransmitted registration is still recognised: the same answer, no new observation
        again = registration(rid, b"\xff\xff", 9_999)
        sock.sendto(again, ("127.0.0.1", producer.port))
        sock.sendto(again, ("127.0.0.1", producer.port))
        first, second = receive_some(sock, 2, 2.0)
        assert first.mid == second.mid == 9_999 and first.raw == second.raw
    finally:
        sock.close()
        producer.stop()


def receive_some(sock: socket.socket, count: int, seconds: float) -> list[Answer]:
    """Datagrams until ``count`` have come or ``seconds`` have passed."""
    answers = []
    deadline = time.monotonic() + seconds
    while len(answers) < count and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            answers.append(Answer(sock.recv(4096)))
        except TimeoutError:
            break
    return answers
