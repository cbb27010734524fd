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
from collections.abc import Callable, Iterator
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
        self.payload = data[pos + 1 :]


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


def line(process: subprocess.Popen[bytes], timeout: float = 10.0) -> str:
    """The next line a child prints ("" if none comes within ``timeout`` seconds). The child's
    stdout must be unbuffered here (``bufsize=0``): a buffered reader could hold a second line
    that ``select`` then no longer sees."""
    assert process.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith(b"\n"):
        ready, _, _ = select.select([process.stdout], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            return ""
        byte = process.stdout.read(1)
        if not byte:
            break
        out += byte
    return out.decode().strip()


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


def ack(sock: socket.socket, answer: Answer, port: int) -> None:
    sock.sendto(bytes([0x60, 0, *answer.mid.to_bytes(2, "big")]), ("127.0.0.1", port))


def receive_until(
    sock: socket.socket, done: Callable[[list[Answer]], bool], seconds: float
) -> list[Answer]:
    """Datagrams until ``done(all so far)`` or ``seconds`` have passed."""
    answers: list[Answer] = []
    deadline = time.monotonic() + seconds
    while not done(answers) and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            answers.append(Answer(sock.recv(4096)))
        except TimeoutError:
            break
    return answers


def register_confirmed(sock: socket.socket, rid: str, tokens: list[bytes], port: int) -> int:
    """Register on each token in turn, acknowledging every CON (the proof notification) as a
    real observer does: how many registrations became observations (answered with Observe,
    then proven)."""
    observing = 0
    for token in tokens:
        sock.sendto(
            registration(rid, token, int.from_bytes(token, "big") & 0xFFFF), ("127.0.0.1", port)
        )
        answer: Answer | None = None
        proven = False
        deadline = time.monotonic() + 20.0
        while not (answer and (proven or answer.observe is None)):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                got = Answer(sock.recv(4096))
            except TimeoutError:
                break
            if got.mtype == CON:
                ack(sock, got, port)
                proven = proven or got.token == token
            elif got.token == token:
                answer = answer or got
        assert answer is not None, "a registration was not answered"
        if answer.observe is not None:
            assert proven, "an observation without its proof"
            observing += 1
    return observing


def test_observers_are_bounded_per_address_and_in_all(
    deployment: Deployment, tmp_path: Path
) -> None:
    producer, rid, _ = start_producer(
        deployment, tmp_path, "--max-observers", "7", "--max-observers-per-address", "3"
    )
    port = producer.port
    sockets = [client(f"127.0.0.{i}") for i in (1, 2, 3)]
    try:
        # confirmed observers (they acknowledge): at most three from one address, seven in all
        accepted = [
            register_confirmed(sock, rid, [bytes([n, i]) for i in range(5)], port)
            for n, sock in enumerate(sockets)
        ]
        assert accepted == [3, 3, 1]
        assert "answered without Observe" in producer.log()
        # an observer that refuses a notification (RST) is dropped, and its place is free again
        sock = sockets[0]
        write_atomic(tmp_path / "v.txt", b"2")
        notifications = receive_until(sock, lambda got: len(got) >= 1, 10.0)
        assert notifications and all(a.mtype == CON for a in notifications)
        first = notifications[0]
        sock.sendto(bytes([0x70, 0, *first.mid.to_bytes(2, "big")]), ("127.0.0.1", port))
        assert register_confirmed(sock, rid, [b"again"], port) == 1
    finally:
        for sock in sockets:
            sock.close()
        producer.stop()


def test_an_observer_that_does_not_acknowledge_gets_one_notification_in_flight(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A spoofed source (it never asked, it acknowledges nothing) gets the answer and one CON
    notification (the proof, the current object) and its retransmissions, however many new
    values there are: the newest waits, and is sent only once the previous one is acknowledged."""
    producer, rid, value = start_producer(deployment, tmp_path)
    port = producer.port
    victim = client()
    try:
        victim.sendto(registration(rid, b"v", 1, mtype=NON), ("127.0.0.1", port))
        first = receive_until(victim, lambda got: len(got) >= 2, 10.0)
        assert [a.observe for a in first] == [0, 1]  # the answer, then the proof
        proof = first[1]
        assert proof.mtype == CON and proof.payload == first[0].payload  # the same object
        for n in range(2, 12):
            write_atomic(value, str(n).encode())
            time.sleep(0.1)  # not needed for the outcome: values the producer sees one by one
        got = receive_until(victim, lambda got: len(got) >= 1, 20.0)
        # a retransmission of the proof (at 2-3 s; the second would come 4-6 s later: waiting for
        # it cost the suite 5 s and showed nothing more), nothing new meanwhile
        assert got, "the proof was not retransmitted"
        assert {(a.mtype, a.mid, a.observe) for a in got} == {(CON, proof.mid, 1)}
        # acknowledged: the newest value comes next (Observe 2), not the ten in between
        ack(victim, proof, port)
        following = receive_until(victim, lambda got: any(a.mid != proof.mid for a in got), 20.0)
        assert [a.observe for a in following if a.mid != proof.mid] == [2]
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
            bufsize=0,
        )
        for _ in range(5)
    ]
    stays, *leaving = observers
    try:
        for observer in observers:
            assert line(observer) == "observing True"
            assert line(observer) == "notified"  # the proof: the current object, CON
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
            assert register_confirmed(sock, rid, [bytes([i]) for i in range(5)], producer.port) == 5
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


def test_a_flood_of_unproven_registrations_does_not_keep_a_real_observer_out(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Registrations in the names of sources that never acknowledge (spoofed: the victims did
    not ask) fill every place. Before, the places stayed taken until the first CON timed out
    (~93 s, never if the value did not change) and a real observer was turned away. Now an
    unproven observer gives its place to a newcomer, a proven one keeps it, and each victim gets
    a bounded number of datagrams per registration made in its name."""
    producer, rid, value = start_producer(
        deployment, tmp_path, "--max-observers", "24", "--max-observers-per-address", "8"
    )
    port = producer.port
    # 4 addresses x 8 places > 24: all full; 25 ports each (every port has its CONs in flight)
    victims = [client(f"127.0.0.{i}") for i in range(2, 6) for _ in range(25)]
    for sock in victims:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def flood(first: int, count: int) -> None:
        for n in range(first, first + count):
            sock = victims[n % len(victims)]
            sock.sendto(
                registration(rid, n.to_bytes(3, "big"), n & 0xFFFF, NON), ("127.0.0.1", port)
            )

    flood(0, 200)
    time.sleep(1.0)  # the flood's answers and proofs are out: every place is unproven
    observer = subprocess.Popen(
        [sys.executable, "-c", OBSERVER, producer.uri(rid)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )
    try:
        # the real observer registers after the flood, is proven, and stays through another one
        assert line(observer, 20.0) == "observing True"
        assert line(observer, 20.0) == "notified"  # the proof (acknowledged by aiocoap)
        flood(200, 200)
        time.sleep(1.0)
        write_atomic(value, b"2")
        assert line(observer, 20.0) == "notified"
        # what the victims got: per registration in their name, its answer, one proof with its
        # retransmissions (4 at most) and, if displaced, a 5.03 without payload
        per_token: dict[bytes, list[Answer]] = {}
        time.sleep(3.5)  # past the first retransmissions (2-3 s after the first sending)
        for sock in victims:
            for a in receive(sock, 0.01):
                per_token.setdefault(a.token, []).append(a)
        assert per_token, "the victims got nothing at all"
        worst = max(len(got) for got in per_token.values())
        assert worst <= 7, worst
        answer = max(len(a.raw) for got in per_token.values() for a in got)  # the object's
        spent = max(sum(len(a.raw) for a in got) for got in per_token.values())
        assert spent <= 6 * answer + 16, (spent, answer)
        # a displaced observer's proof is withdrawn: nothing follows its 5.03 (a flood of
        # registrations holds aiocoap exchanges for the places only, not one per registration)
        for got in per_token.values():
            codes = [a.code for a in got]
            assert 0xA3 not in codes or codes.index(0xA3) == len(codes) - 1, codes
        cons = sum(a.mtype == CON for got in per_token.values() for a in got)
        print(f"victims: {len(per_token)} registrations, {cons} CON datagrams")
        assert cons <= len(per_token) + 4 * 24, (cons, len(per_token))
        print(f"victim: at most {worst} datagrams, {spent} bytes per registration ({answer} each)")
        for got in per_token.values():
            assert sum(a.code == 0x45 and a.mtype == NON for a in got) <= 1  # the answer
            assert len({a.mid for a in got if a.mtype == CON}) <= 1  # one proof, retransmitted
            assert all(not a.payload for a in got if a.code == 0xA3)  # 5.03s: empty
        assert "Traceback" not in producer.log()
    finally:
        for sock in victims:
            sock.close()
        observer.kill()
        observer.wait()
        if observer.stdout is not None:
            observer.stdout.close()
        producer.stop()


def test_peers_are_counted_by_ipv4_address_ipv6_64_or_device() -> None:
    """One IPv6 /64 is one peer for the per-address bound: its 2**64 addresses (and every port)
    do not buy more places. The proxy counts its observers by the same key."""
    from oscar_io.peers import address_key, peer_key
    from producer.observers import ObserverLimits
    from proxy.relays import client_of

    class Remote:
        def __init__(self, sockaddr: tuple[str, int], claims: tuple[str, ...] = ()) -> None:
            self.sockaddr = sockaddr
            self.authenticated_claims = claims

    same_net = [peer_key(Remote((f"2001:db8:0:1::{i:x}", 5683 + i))) for i in range(1, 40)]
    assert set(same_net) == {"net 2001:db8:0:1::/64"}
    assert peer_key(Remote(("2001:db8:0:2::1", 1))) != same_net[0]
    assert peer_key(Remote(("::ffff:192.0.2.7", 9))) == "host 192.0.2.7"
    assert peer_key(Remote(("192.0.2.7", 10))) == "host 192.0.2.7"
    assert peer_key(Remote(("2001:db8::1", 1), (":sensor-1",))) == "device sensor-1"
    assert client_of(None, "[2001:db8:0:1::99]:4000") == same_net[0]
    assert client_of("sensor-1", "192.0.2.7:1") == address_key("sensor-1", "")
    limits = ObserverLimits(100, 3)
    places = [limits.admit(key, lambda: None) for key in same_net]
    assert sum(p is not None for p in places) == 39  # each displaced the oldest unproven one
    assert limits.held_by(same_net[0]) == 3 and limits.total == 3
    for place in [p for p in places if p is not None and limits.held_by(p.key)][-3:]:
        limits.confirm(place)
    assert limits.admit(same_net[0], lambda: None) is None  # proven ones are not displaced


def test_an_unknown_aiocoap_is_not_looked_into(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """con_outstanding reads aiocoap's private ``_backlogs`` only in the versions it was checked
    against; otherwise it says it cannot tell (None), once in the log."""
    from aiocoap import meta

    from producer import observers

    class Manager:
        def __init__(self) -> None:
            self._backlogs: dict[object, list[object]] = {}

    class Interface:
        _ctx = Manager()

    class Remote:
        interface = Interface()

    remote = Remote()
    Interface._ctx._backlogs[remote] = []  # a CON to it awaits its ACK
    monkeypatch.setattr(observers, "_internals", None)
    monkeypatch.setattr(meta, "version", "0.4.17")
    assert observers.con_outstanding(remote) is True
    monkeypatch.setattr(observers, "_internals", None)
    monkeypatch.setattr(meta, "version", "99.0")
    with caplog.at_level("WARNING", logger="oscar.producer"):
        assert observers.con_outstanding(remote) is None
        assert observers.con_outstanding(remote) is None
    assert sum("not one this producer was checked with" in r.message for r in caplog.records) == 1


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
            got = receive_until(sock, lambda got: sum(a.mtype == ACK for a in got) >= 100, 5.0)
            answered += sum(a.mtype == ACK for a in got)  # answers (not proofs, not 5.03s)
        grown = (producer.rss_kib() - idle) / 1024
        assert answered >= 9_000  # they did reach it
        assert grown < 16, f"RSS grew {grown:.1f} MiB"
        # a retransmitted registration is still recognised: the same answer, no new observation
        again = registration(rid, b"\xff\xff", 9_999)
        sock.sendto(again, ("127.0.0.1", producer.port))
        sock.sendto(again, ("127.0.0.1", producer.port))
        got = receive_until(sock, lambda got: sum(a.mid == 9_999 for a in got) >= 2, 10.0)
        first, second = (a for a in got if a.mid == 9_999)
        assert first.mtype == ACK and first.raw == second.raw
    finally:
        sock.close()
        producer.stop()
