"""Producer memory and notifications under a flood of Observe registrations (issue 13, finding 4).

A real AS on 127.0.0.1 and, per case, a fresh producer process (``--resource reading=FILE``, a
64 B text reading, default observer bounds: 256 in all, 16 per IP address). Cases:

- **idle**: the producer's VmRSS once it serves its first object, before any registration
  (the baseline of every other row);
- **one socket**: 20,000 confirmable GETs with Observe (distinct tokens and message IDs) from one
  UDP socket, 500 at a time, each batch's answers read before the next is sent;
- **many sockets**: the same 20,000 from 1,000 sockets on 100 loopback addresses (127.0.1.1 to
  127.0.1.100, 10 sockets each, 20 registrations per socket) — enough addresses to reach the
  bound in all, not only the one per address.

After the registrations: the producer's VmRSS (and peak VmHWM), the registrations answered with an
Observe option (observations held), then one new value is written and every datagram the
attacker's sockets receive in the next 6 s is counted (notifications, retransmissions included;
the sockets acknowledge nothing, as a spoofed victim would not). The same new value is written
twice more, 2 s apart, to show that further values add nothing while the first notification is
unacknowledged. Notifications per new value: datagrams received after the first write, divided by
the number of writes.

Before this issue's bounds (issue 13's report), 20,000 registrations from one socket took the
producer from 38 to 218 MiB and one new value sent 17,221 notifications. Target here: RSS under
20,000 attempts at most 1.5 times the idle RSS, and at most one notification (plus its
retransmissions) per observation held.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from . import Figure, Settings
from .testbed import Testbed, free_port

__all__ = ["run"]

READING = b"temperature=21.5C humidity=40.2% pressure=1013.2hPa wind=3.1m/s\n"[:64]
ATTEMPTS = 20_000
BATCH = 100
ADDRESSES = 100
SOCKETS_PER_ADDRESS = 10
#: Seconds to listen for notifications after the new values.
LISTEN = 6.0
_OBSERVE, _URI_PATH = 6, 11


def _uri_path(path: tuple[str, ...], after: int) -> bytes:
    """Uri-Path options following option number ``after`` (segments of 0 to 268 bytes)."""
    out, number = b"", after
    for segment in path:
        data = segment.encode()
        delta = _URI_PATH - number
        if len(data) < 13:
            out += bytes([delta << 4 | len(data)])
        else:
            out += bytes([delta << 4 | 13, len(data) - 13])
        out += data
        number = _URI_PATH
    return out


def _registration(path: tuple[str, ...], n: int) -> bytes:
    """A CON GET with Observe: 0, message ID and 3-byte token from ``n``."""
    token = n.to_bytes(3, "big")
    out = bytes([0x40 | len(token), 0x01]) + (n & 0xFFFF).to_bytes(2, "big") + token
    return out + bytes([_OBSERVE << 4]) + _uri_path(path, _OBSERVE)


def _observing(data: bytes) -> bool:
    """Whether an answer carries an Observe option."""
    pos, number = 4 + (data[0] & 0x0F), 0
    while pos < len(data) and data[pos] != 0xFF:
        delta, length = data[pos] >> 4, data[pos] & 0x0F
        pos += 1
        if delta == 13:
            delta, pos = 13 + data[pos], pos + 1
        if length == 13:
            length, pos = 13 + data[pos], pos + 1
        number += delta
        if number == _OBSERVE:
            return True
        if number > _OBSERVE:
            return False
        pos += length
    return False


def _drain(
    socks: list[socket.socket], seconds: float, enough: int | None = None
) -> list[tuple[int, bytes]]:
    """(socket index, datagram) of everything the sockets receive within ``seconds`` (or until
    ``enough`` have come)."""
    got: list[tuple[int, bytes]] = []
    index = {sock.fileno(): i for i, sock in enumerate(socks)}
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and (enough is None or len(got) < enough):
        readable, _, _ = select.select(socks, [], [], left)
        for sock in readable:
            while True:
                try:
                    got.append((index[sock.fileno()], sock.recv(4096)))
                except BlockingIOError:
                    break
    return got


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def _sockets(hosts: list[str], per_host: int) -> list[socket.socket]:
    socks = []
    for host in hosts:
        for _ in range(per_host):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((host, 0))
            sock.setblocking(False)
            socks.append(sock)
    return socks


def _flood(
    socks: list[socket.socket], port: int, path: tuple[str, ...], attempts: int
) -> tuple[int, int]:
    """Send ``attempts`` registrations round-robin over ``socks``, ``BATCH`` at a time, each
    batch's answers awaited (1 s at most) before the next: a burst larger than the producer's
    socket buffer would only be dropped by the kernel. Returns (answers, answers with Observe)."""
    answers = observing = 0
    for start in range(0, attempts, BATCH):
        end = min(start + BATCH, attempts)
        for n in range(start, end):
            socks[n % len(socks)].sendto(_registration(path, n + 1), ("127.0.0.1", port))
        batch = _drain(socks, 1.0, enough=end - start)
        answers += sum(_answer(d) for _, d in batch)
        observing += sum(_held(d) for _, d in batch)
    late = _drain(socks, 0.5)
    return answers + sum(_answer(d) for _, d in late), observing + sum(_held(d) for _, d in late)


def _answer(data: bytes) -> bool:
    """An answer to a registration (piggybacked on the ACK), not a notification or a 5.03."""
    return data[0] >> 4 & 3 == 2


def _held(data: bytes) -> int:
    """+1 for a registration answered with Observe, -1 for an observation displaced by a
    newcomer (a 5.03: an unproven observer gives its place up), else 0."""
    if data[1] == 0xA3:
        return -1
    return int(_answer(data) and _observing(data))


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS; per case a producer; flood it with registrations; yield the figures."""
    attempts = ATTEMPTS // 4 if settings.quick else ATTEMPTS
    cases = ("idle", "one-socket", "many-sockets")
    with Testbed("oscar-bench-observers-") as bed:
        bundles = bed.start_as({f"obs-{case}": "producer" for case in cases})
        idle_rss = 0
        for case in cases:
            device = f"obs-{case}"
            value = bed.write(f"{case}.txt", READING)
            port = free_port()
            process = bed.spawn(
                device,
                ["-m", "producer", "--bundle", str(bundles[device]),
                 "--state", str(bed.dir / f"{device}-state"), "--listen", f"127.0.0.1:{port}",
                 "--resource", f"reading={value}", "--log-level", "warning"],
                ready=b"",
            )  # fmt: skip
            path = (device, "reading")
            probe = _sockets(["127.0.0.1"], 1)
            deadline = time.monotonic() + 30
            while not any(d[1] == 0x45 for _, d in _drain_after_get(probe, port, path)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{device} never served:\n{bed.log(device)[-2000:]}")
            probe[0].close()
            time.sleep(0.5)
            rss, _ = _rss(process.pid)
            if case == "idle":
                idle_rss = rss
                print(f"  idle: VmRSS {rss / 1024:.1f} MiB", flush=True)
                yield Figure(
                    "observers/idle/rss-MiB", rss / 1024, "MiB VmRSS, serving, no observer"
                )
                bed.stop(process)
                continue
            if case == "one-socket":
                socks = _sockets(["127.0.0.1"], 1)
            else:
                hosts = [f"127.0.1.{i}" for i in range(1, ADDRESSES + 1)]
                socks = _sockets(hosts, SOCKETS_PER_ADDRESS)
            try:
                answers, held = _flood(socks, port, path, attempts)
                rss, hwm = _rss(process.pid)
                writes = 3
                for n in range(writes):
                    value.write_bytes(READING[:-2] + str(n).encode() + b"\n")
                    if n < writes - 1:
                        time.sleep(2.0)
                received = _drain(socks, LISTEN)
            finally:
                for sock in socks:
                    sock.close()
                bed.stop(process)
            # A notification is one message ID to one socket; its retransmissions repeat it.
            notifications = len({(i, d[2:4]) for i, d in received})
            print(
                f"  {case}: {attempts} registrations from {len(socks)} socket(s): {answers} "
                f"answers, {held} observations held; VmRSS {rss / 1024:.1f} MiB (peak "
                f"{hwm / 1024:.1f}) vs {idle_rss / 1024:.1f} MiB idle; {writes} new values: "
                f"{notifications} notifications ({len(received)} datagrams with "
                f"retransmissions) to the registering sockets in {LISTEN + 4:.0f} s",
                flush=True,
            )
            yield Figure(
                f"observers/{case}/rss-MiB",
                rss / 1024,
                f"MiB VmRSS after {attempts} registration attempts",
                "the same producer idle (no observer)",
                idle_rss / 1024,
                min_ratio=1 / 1.5,
                lower_is_better=True,
            )
            yield Figure(
                f"observers/{case}/peak-rss-MiB",
                hwm / 1024,
                "MiB VmHWM (peak) after the registrations",
                "the same producer idle (no observer)",
                idle_rss / 1024,
                lower_is_better=True,
            )
            yield Figure(f"observers/{case}/held", held, "observations held (bound: 256 in all)")
            yield Figure(
                f"observers/{case}/notifications",
                notifications,
                f"notifications for {writes} new values (none acknowledged)",
            )
            yield Figure(
                f"observers/{case}/datagrams",
                len(received),
                f"datagrams (retransmissions included) for {writes} new values",
            )


def _drain_after_get(
    socks: list[socket.socket], port: int, path: tuple[str, ...]
) -> list[tuple[int, bytes]]:
    """One plain CON GET (no Observe) from ``socks[0]``; the answers within 0.2 s."""
    n = 0x7FFF
    token = n.to_bytes(2, "big")
    request = bytes([0x40 | len(token), 0x01]) + n.to_bytes(2, "big") + token
    request += _uri_path(path, 0)
    socks[0].sendto(request, ("127.0.0.1", port))
    return _drain(socks, 0.2)
