"""Multicast delivery beside unicast Observe: producer datagrams and CPU per new value, N consumers.

Inside a private network namespace (:mod:`bench.netns`: multicast on its loopback; needs root),
per N in 1, 10, 50, 200 and per mode, a fresh producer process (``python -m bench.multicast
serve``: the producer's own server and :class:`producer.groups.GroupService` over a stand-in
resource whose objects are 200 random bytes set by hand, so that sealing, the same in both modes,
is left out) and N consumers as raw UDP sockets in this process:

- **unicast Observe**: each socket registers (CON GET, Observe 0) and acknowledges every CON
  notification, as aiocoap would; the producer sends a notification per observer per value;
- **multicast**: each socket joins the group (``224.0.1.187`` on ``127.0.0.1``); the producer
  sends each value once to the group.

Per value: the producer's datagrams (unicast: notifications the sockets received, retransmissions
included; multicast: the producer's own count of group sends) and its CPU time
(``getrusage`` in the producer, read before and after the values: user time, and user plus
system time). On loopback the kernel copies a group datagram to each joined socket within the
sender's ``sendto``, so the producer's *system* time grows with N there; on a real link the
sender hands one frame to the interface and the copies happen at the receivers. Targets: one
datagram per value in multicast, and producer CPU flat in N.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import Figure, Settings, netns
from .testbed import free_port

__all__ = ["run"]

COUNTS = (1, 10, 50, 200)
DEVICE = "bench-mc"
GROUP = "224.0.1.187"
OBJECT_SIZE = 200
_OBSERVE, _URI_PATH = 6, 11


@dataclass(frozen=True)
class Case:
    datagrams_per_value: float
    user_us_per_value: float
    system_us_per_value: float

    @property
    def cpu_us_per_value(self) -> float:
        return self.user_us_per_value + self.system_us_per_value


# --- the producer process ---


async def _serve(mode: str, port: int, group_port: int) -> None:
    from oscar.objects import object_etag
    from oscar_io.multicast import Group
    from producer.config import ResourceSpec
    from producer.groups import GroupService
    from producer.observers import ObserverLimits
    from producer.published import Published
    from producer.server import serve

    class StandIn:
        device_id = DEVICE

        def now(self) -> int:
            return int(time.time())

    published = Published(StandIn(), ResourceSpec("reading"))  # type: ignore[arg-type]
    seq = 0

    def new_value() -> None:
        nonlocal seq
        seq += 1
        now = published.now()
        published.obj = os.urandom(OBJECT_SIZE)
        published.iat, published.exp, published.epoch, published.seq = now, now + 3600, 1, seq
        published.etag = object_etag(published.resource_id, 1, seq)
        for notify in published.on_change:
            notify()

    limits = ObserverLimits(4096, 4096)
    context = await serve(DEVICE, [published], "127.0.0.1", port, limits)
    groups = None
    if mode == "multicast":
        groups = GroupService(
            DEVICE, [published], [Group(GROUP, group_port)], interface="127.0.0.1", leisure=0
        )
        await groups.start()
        published.on_change.append(lambda: groups.notify(published))
    new_value()
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "v":
                new_value()
                print("ok", flush=True)
            elif line == "cpu":
                sent = groups.sent if groups is not None else limits.notifications
                usage = resource.getrusage(resource.RUSAGE_SELF)
                print(f"{usage.ru_utime} {usage.ru_stime} {sent}", flush=True)
            else:
                break
    finally:
        if groups is not None:
            groups.close()
        await context.shutdown()


# --- the consumers ---


def _path_options(after: int) -> bytes:
    out, number = b"", after
    for segment in (DEVICE.encode(), b"reading"):
        out += bytes([(_URI_PATH - number) << 4 | len(segment)]) + segment
        number = _URI_PATH
    return out


def _registration(n: int) -> bytes:
    token = n.to_bytes(4, "big")
    head = bytes([0x44, 0x01]) + (n & 0xFFFF).to_bytes(2, "big") + token
    return head + bytes([_OBSERVE << 4]) + _path_options(_OBSERVE)


def _receive(sockets: list[socket.socket], wanted: int, timeout: float = 20.0) -> int:
    """Read until every socket has had ``wanted`` 2.05 datagrams, acknowledging CONs; the number
    of 2.05 datagrams read in all."""
    got = dict.fromkeys(sockets, 0)
    total = 0
    deadline = time.monotonic() + timeout
    while any(count < wanted for count in got.values()):
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"notifications missing: {sorted(got.values())[:5]}")
        readable, _, _ = select.select(list(got), [], [], left)
        for sock in readable:
            data, addr = sock.recvfrom(4096)
            if len(data) >= 4 and data[0] >> 4 & 3 == 0:  # CON: acknowledge (empty ACK)
                sock.sendto(bytes([0x60, 0x00]) + data[2:4], addr)
            if len(data) >= 2 and data[1] == 0x45:
                got[sock] += 1
                total += 1
    return total


class _Producer:
    def __init__(self, mode: str, port: int, group_port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.multicast", "serve", mode, str(port), str(group_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._line() != "ready":
            raise RuntimeError("the producer did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def cpu(self) -> tuple[float, float, int]:
        """The producer's user and system CPU seconds so far, and its datagrams sent."""
        user, system, sent = self.ask("cpu").split()
        return float(user), float(system), int(sent)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _case(mode: str, n: int, values: int) -> Case:
    from oscar_io.multicast import Group, receiver_socket

    port, group_port = free_port(), free_port()
    producer = _Producer(mode, port, group_port)
    sockets: list[socket.socket] = []
    try:
        if mode == "unicast":
            for i in range(n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                sock.sendto(_registration(i), ("127.0.0.1", port))
                sockets.append(sock)
            _receive(sockets, 2)  # the answer and the proof (a CON notification)
        else:
            sockets = [receiver_socket(Group(GROUP, group_port), "127.0.0.1") for _ in range(n)]
            for sock in sockets:
                sock.setblocking(True)
        user0, system0, sent0 = producer.cpu()
        received = 0
        for _ in range(values):
            producer.ask("v")
            received += _receive(sockets, 1)
        user1, system1, sent1 = producer.cpu()
        datagrams = received if mode == "unicast" else sent1 - sent0
        return Case(
            datagrams / values,
            (user1 - user0) / values * 1e6,
            (system1 - system0) / values * 1e6,
        )
    finally:
        for sock in sockets:
            sock.close()
        producer.close()


def run(settings: Settings) -> Iterator[Figure]:
    """Per N, unicast Observe then multicast; yield the figures (nothing without root)."""
    reason = netns.available()
    if reason is not None:
        print(f"  skipped: {reason}", flush=True)
        return
    values = 10 if settings.quick else 100
    rows = []
    with netns.multicast_namespace():
        for n in COUNTS:
            unicast = _case("unicast", n, values)
            group = _case("multicast", n, values)
            rows.append((n, unicast, group))
            yield Figure(
                f"N={n}: producer datagrams per value, multicast",
                group.datagrams_per_value,
                "datagrams",
                baseline="unicast Observe",
                baseline_value=unicast.datagrams_per_value,
                lower_is_better=True,
            )
            yield Figure(
                f"N={n}: producer user CPU per value, multicast",
                group.user_us_per_value,
                "us",
                baseline="unicast Observe",
                baseline_value=unicast.user_us_per_value,
                lower_is_better=True,
            )
            yield Figure(
                f"N={n}: producer CPU per value, multicast",
                group.cpu_us_per_value,
                "us",
                baseline="unicast Observe",
                baseline_value=unicast.cpu_us_per_value,
                lower_is_better=True,
            )
    if rows:  # issue 19's targets: one datagram per value, and producer CPU flat in N
        one = all(g.datagrams_per_value == 1.0 for _, _, g in rows)
        yield Figure(
            "multicast/target/one-datagram-per-value",
            float(one),
            f"1 = one datagram per value at every N ({', '.join(str(n) for n in COUNTS)})",
            min_value=1,
        )
        (n_low, _, low), (n_high, _, high) = rows[0], rows[-1]
        yield Figure(
            f"multicast/target/cpu-flat-N{n_high}-vs-N{n_low}",
            high.cpu_us_per_value,
            "us",
            baseline=f"N={n_low}",
            baseline_value=low.cpu_us_per_value,
            min_ratio=1 / 3,  # within 3x from 1 to 200 members (unicast: over 100x)
            lower_is_better=True,
        )
    print("\n  per value   datagrams         user CPU (us)      user+system CPU (us)")
    print("  N           unicast | group   unicast | group     unicast | group")
    for n, u, g in rows:
        print(
            f"  {n:<10} {u.datagrams_per_value:>8.1f} | {g.datagrams_per_value:<5.1f}"
            f" {u.user_us_per_value:>9.0f} | {g.user_us_per_value:<6.0f}"
            f" {u.cpu_us_per_value:>9.0f} | {g.cpu_us_per_value:.0f}"
        )


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    asyncio.run(_serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
