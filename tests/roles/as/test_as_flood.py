"""A junk-hello flood against a real AS process (issue 13, security finding 3).

Before the fix, each ClientHello from a source port the AS had no connection for made a connection
(a tinydtls context, a task) and, with the table full, evicted one by a search of the whole table:
about 0.4 ms per datagram at the default cap, so ~3,000 junk datagrams/s made new handshakes fail
and stalled established sessions. Now a source gets a connection only by returning the cookie of
a stateless HelloVerifyRequest (``oscar_io.dtls_cookie.CookieGate``), eviction is O(1), and
the guard reads the socket in batches:

- a hello from a new port is answered with a HelloVerifyRequest and nothing else; anything that is
  not a whole ClientHello gets nothing;
- junk hellos from 8,000 ports leave no connection behind (the AS's memory grows by 4 KiB with
  them, where the old guard's 8,000 connections took 13.6 MiB), and cannot evict an established
  session even at a connection cap of 2;
- under 10,000 junk hellos/s from 4,096 ports, established sessions are served and new handshakes
  complete.

The junk hellos are ``bench.as_flood``'s (the benchmark that measures the rates).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiocoap import GET
from aiocoap.error import NetworkError
from as_harness import ROOT, AsEnv, Client, as_env
from hypothesis import given
from hypothesis import strategies as st

from demo.system import free_port
from oscar_io.dtls_cookie import CookieGate

# The flood generator is the benchmark's (bench/ is not an installed package).
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
from bench.as_flood import client_hello


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path) as e:
        yield e


def _exchange(port: int, datagram: bytes, timeout: float = 1.0) -> bytes | None:
    """Send one datagram from a fresh source port; the answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(datagram, ("127.0.0.1", port))
        try:
            return s.recv(2048)
        except TimeoutError:
            return None


def _spray(port: int, sources: int) -> None:
    """One junk hello from each of ``sources`` fresh source ports, paced at about 5,000/s."""
    start = time.monotonic()
    for i in range(sources):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(client_hello(os.urandom(32)), ("127.0.0.1", port))
        if i % 100 == 99:
            time.sleep(max(0.0, start + i / 5000 - time.monotonic()))


async def _crl(client: Client, timeout: float = 5.0) -> str:
    """GET /crl: the response code, or "failed" if none came within ``timeout`` seconds."""
    try:
        return str((await client.send(client.message(GET, "crl"), timeout)).code.dotted)
    except (NetworkError, TimeoutError):
        return "failed"


@pytest.mark.asyncio
async def test_a_hello_from_a_new_port_gets_a_stateless_cookie_and_junk_gets_nothing(
    env: AsEnv,
) -> None:
    await env.device("known", "consumer")
    server = env.server()
    hello = client_hello(os.urandom(32), record_seq=7)
    answer = _exchange(server.port, hello)
    assert answer is not None and len(answer) < len(hello)  # no amplification
    # A HelloVerifyRequest (RFC 6347 §4.2.1) echoing the hello's record sequence number.
    assert answer[0] == 22 and answer[13] == 3 and answer[5:11] == (7).to_bytes(6, "big")
    cookie = answer[-answer[27] :]
    assert answer[27] == 16
    # The cookie is bound to the source address: another port's cookie differs.
    other = _exchange(server.port, hello)
    assert other is not None and other[-16:] != cookie
    # A wrong cookie is answered with a fresh HelloVerifyRequest, never a ServerHello.
    wrong = _exchange(server.port, client_hello(os.urandom(32), cookie=os.urandom(16)))
    assert wrong is not None and wrong[13] == 3
    for junk in (
        hello[:40],  # truncated
        hello[:19] + b"\x00\x00\x05" + hello[22:],  # a fragment (offset 5)
        b"\x17" + hello[1:],  # application data
        b"\x16\xfe\xfd\x00\x01" + hello[5:],  # epoch 1
        os.urandom(60),
    ):
        assert _exchange(server.port, junk, timeout=0.3) is None
    client = await env.client(server, "known")
    assert await _crl(client) == "2.05"  # a real client goes through both cookie exchanges


@pytest.mark.asyncio
async def test_junk_hellos_from_many_ports_leave_nothing_behind(env: AsEnv) -> None:
    # A table that could hold every junk source: each would stay in it (1.7 KiB each).
    roomy = env.server("--max-connections", "100000")
    await asyncio.sleep(0.5)
    _spray(roomy.port, 500)  # warm up: every code path of a junk hello once
    await asyncio.sleep(0.5)
    baseline = roomy.rss_kib()
    _spray(roomy.port, 8000)
    await asyncio.sleep(1.0)
    grown = roomy.rss_kib() - baseline
    assert grown < 4096, f"RSS grew by {grown} KiB for 8,000 junk sources"


@pytest.mark.asyncio
async def test_junk_hellos_cannot_evict_established_sessions_from_a_full_table(
    env: AsEnv,
) -> None:
    await env.device("a", "consumer")
    await env.device("b", "consumer")
    # A table of two, both established: junk cannot take their places.
    tight = env.server("--max-connections", "2")
    clients = [await env.client(tight, "a"), await env.client(tight, "b")]
    before = [await client.send(client.message(GET, "crl")) for client in clients]
    _spray(tight.port, 2000)
    await asyncio.sleep(0.5)
    # Answered at once (CoAP's first retransmission would come after 2 to 3 s), in the same
    # DTLS sessions. With the old guard, each junk source evicted the least recently seen
    # entry, an established session included, and the next request took 2.7 s.
    after = [await client.send(client.message(GET, "crl"), timeout=1.5) for client in clients]
    assert [r.code.dotted for r in before + after] == ["2.05"] * 4
    assert [r.remote for r in after] == [r.remote for r in before]


# A flooder process: COUNT junk hellos from SOURCES ports, paced at no more than RATE a second (a
# late flooder is late, it does not burst), then the HelloVerifyRequests that came back, read from
# its sockets. Prints "ready" once its sockets are open and "sent answered seconds" at the end.
_FLOODER = """
import os, socket, sys, time
from bench.as_flood import client_hello
port, count, rate, sources = map(int, sys.argv[1:5])
sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sources)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
hellos = [client_hello(os.urandom(32), record_seq=i) for i in range(509)]
print("ready", flush=True)
sent, start = 0, time.monotonic()
while sent < count:
    due = min(count, sent + 100, int((time.monotonic() - start) * rate))
    while sent < due:
        try:
            sockets[sent % sources].sendto(hellos[sent % len(hellos)], ("127.0.0.1", port))
        except (BlockingIOError, ConnectionRefusedError):
            continue  # try again: every one of COUNT leaves
        sent += 1
    time.sleep(0.001)
seconds = time.monotonic() - start
time.sleep(1.0)  # the last answers
answered = 0
for s in sockets:
    while True:
        try:
            answer = s.recv(2048)
        except BlockingIOError:
            break
        answered += len(answer) > 13 and answer[13] == 3
print(sent, answered, seconds, flush=True)
"""


@pytest.mark.asyncio
async def test_sessions_and_new_handshakes_are_served_during_a_10000_per_second_flood(
    env: AsEnv,
) -> None:
    """50,000 junk hellos from 4,096 ports, paced at 10,000/s at most, while three established
    sessions make GETs and new handshakes are made, from a second after the flood began until it
    ends: every GET and handshake completes within 5 s (CoAP's first retransmission comes after
    2 to 3 s, so a lost datagram shows as a slow answer, two as a failure), and the AS answered
    the junk (so the flood reached it). The rate the AS sustains is measured by bench as_flood;
    with the old guard, most GETs failed here."""
    devices = [await env.device(f"d{i}", "consumer") for i in range(4)]
    server = env.server()
    established = [await env.client(server, f"d{i}") for i in range(3)]
    for client in established:
        assert await _crl(client) == "2.05"
    count = 50_000
    flooder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FLOODER, str(server.port), str(count), "10000", "4096",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert flooder.stdout is not None
    flooding: asyncio.Future[bytes] | None = None
    try:
        assert await asyncio.wait_for(flooder.stdout.readline(), 30) == b"ready\n"
        await asyncio.sleep(1.0)  # with the old guard, the table was full of junk by now
        codes: list[str] = []
        handshakes: list[tuple[str, float]] = []
        flooding = asyncio.ensure_future(flooder.stdout.readline())

        async def requests(client: Client) -> None:
            while len(codes) < 60 or not flooding.done():
                codes.append(await _crl(client))
                await asyncio.sleep(0.05)

        async def new_handshakes() -> None:
            while len(handshakes) < 8 or not flooding.done():
                start = time.monotonic()
                client = await Client.connect(server, "d3", devices[3])
                try:
                    handshakes.append((await _crl(client), time.monotonic() - start))
                finally:
                    await client.close()
                await asyncio.sleep(0.1)

        await asyncio.gather(new_handshakes(), *(requests(c) for c in established))
        sent, answered, seconds = (await asyncio.wait_for(flooding, 120)).decode().split()
    finally:
        if flooding is not None:
            flooding.cancel()
        if flooder.returncode is None:
            flooder.kill()
        await flooder.wait()
    slowest = max(t for _, t in handshakes)
    print(f"{sent} sent in {float(seconds):.1f} s, {answered} answered; {len(codes)} GETs")
    print(f"{len(handshakes)} handshakes, the slowest {slowest:.2f} s")
    assert codes == ["2.05"] * len(codes), codes
    assert [code for code, _ in handshakes] == ["2.05"] * len(handshakes), handshakes
    assert int(sent) == count
    assert int(answered) >= count // 2, f"the AS answered {answered} of {sent} junk hellos"


# --- in memory: the gate and the guard without a process ------------------------------------------


def _cookie_of(answer: bytes | None) -> bytes:
    assert answer  # a HelloVerifyRequest
    return answer[28 : 28 + answer[27]]


def test_the_gate_admits_its_cookie_from_the_same_address_within_two_periods() -> None:
    clock = [1000.0]
    gate = CookieGate(clock=lambda: clock[0], period=30.0)
    random = os.urandom(32)
    first = gate.answer(client_hello(random), ("127.0.0.1", 4000))
    cookie = _cookie_of(first)
    again = client_hello(random, cookie=cookie, record_seq=1)
    assert gate.answer(again, ("127.0.0.1", 4000)) is None  # admitted
    assert gate.answer(again, ("127.0.0.1", 4001)) not in (None, b"")  # another port: a new one
    assert gate.answer(again, ("127.0.0.2", 4000)) not in (None, b"")  # another host
    # Another hello (a changed random or suite) from the same address: not this cookie's.
    assert gate.answer(client_hello(os.urandom(32), cookie=cookie), ("127.0.0.1", 4000))
    clock[0] += 30.0
    assert gate.answer(again, ("127.0.0.1", 4000)) is None  # the next period still
    clock[0] += 30.0
    assert gate.answer(again, ("127.0.0.1", 4000)) not in (None, b"")  # expired
    assert gate.answer(b"\x16\xfe\xfd" + bytes(60), ("127.0.0.1", 4000)) == b""  # no hello
    # Another gate (another process) does not take this one's cookies.
    assert CookieGate(clock=lambda: clock[0]).answer(again, ("127.0.0.1", 4000)) is not None


def test_for_a_known_address_the_gate_restarts_only_on_its_own_cookie() -> None:
    """A source that has a connection: a cookie-less hello gets a HelloVerifyRequest (the old
    connection stays: a spoofed hello cannot end it), a hello with the gate's cookie restarts
    (True), and a hello with any other cookie (tinydtls's own exchange) or anything else is the
    connection's business (False)."""
    gate = CookieGate(clock=lambda: 1000.0)
    address = ("127.0.0.1", 4000)
    random = os.urandom(32)
    request = gate.answer_known(client_hello(random), address)
    assert isinstance(request, bytes) and request[13] == 3  # a HelloVerifyRequest
    assert request == gate.answer(client_hello(random), address)  # the same cookie
    cookie = _cookie_of(request)
    assert gate.answer_known(client_hello(random, cookie=cookie, record_seq=1), address) is True
    other = client_hello(random, cookie=os.urandom(16), record_seq=1)
    assert gate.answer_known(other, address) is False
    assert gate.answer_known(client_hello(random, cookie=cookie), ("127.0.0.1", 4001)) is False
    assert gate.answer_known(b"\x17\xfe\xfd" + bytes(60), address) is False  # application data


@pytest.mark.asyncio
async def test_admission_and_eviction_cost_does_not_grow_with_the_cap() -> None:
    """Cookie-verified newcomers into a full table (a tinydtls context made, the oldest entry
    evicted): the work per admission, counted as Python and C function calls (a count, not a
    time: the same on a loaded machine), is the same at a cap of 8,192 as at 256. The old guard
    searched the whole table per eviction (calls on every entry: O(cap); 0.23 against 1.6 ms per
    datagram at 1,024 and 4,096)."""
    from aiocoap import Context, resource

    from oscar_io.dtls import ConnectionGuard, IndexedCreds

    async def calls_per_admission(cap: int) -> float:
        creds = IndexedCreds()
        creds.set_device("d", os.urandom(16))
        ctx = await Context.create_server_context(
            resource.Site(), bind=("127.0.0.1", free_port() - 1), transports=["tinydtls_server"],
            server_credentials=creds,
        )  # fmt: skip
        guard = ConnectionGuard(ctx, cap=cap)
        try:

            def admit(count: int, host: str, counted: bool = False) -> int:
                hellos = []
                for i in range(count):
                    sockaddr = (host, 1024 + i)
                    hello = client_hello(os.urandom(32))
                    cookie = _cookie_of(guard.gate.answer(hello, sockaddr))
                    hellos.append((client_hello(hello[27:59], cookie=cookie), sockaddr))
                calls = 0

                def profile(frame: object, event: str, arg: object) -> None:
                    nonlocal calls
                    calls += event in ("call", "c_call")

                if counted:
                    sys.setprofile(profile)
                try:
                    for datagram, sockaddr in hellos:
                        guard._datagram_received(datagram, sockaddr)
                finally:
                    sys.setprofile(None)
                return calls

            admit(cap, "127.0.0.2")  # fill the table
            admit(100, "127.0.0.3")  # warm up: every path of an admission with an eviction
            assert len(guard) == cap
            calls = admit(200, "127.0.0.4", counted=True)
            assert len(guard) == cap and guard.evicted == 300
            return calls / 200
        finally:
            guard.drain()
            guard.uninstall()
            await ctx.shutdown()

    small, large = await calls_per_admission(256), await calls_per_admission(8192)
    print(f"calls per admission: {small:.1f} at a cap of 256, {large:.1f} at 8,192")
    assert large < small * 1.25 + 10, f"{large:.1f} calls at 8,192 against {small:.1f} at 256"


@given(st.binary(max_size=120), st.integers(0, 80))
def test_the_gate_never_raises_on_a_mangled_hello(tail: bytes, cut: int) -> None:
    gate = CookieGate()
    hello = client_hello(b"r" * 32)
    for datagram in (hello[:cut] + tail, tail, hello[:13] + tail, hello[:25] + tail):
        assert isinstance(gate.answer(datagram, ("127.0.0.1", 5000)), bytes)


@pytest.mark.asyncio
async def test_a_datagram_whose_handling_raises_is_dropped_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception from one datagram's handling (any type: here the gate made to fail on one
    datagram, as no known input makes aiocoap or the gate raise) is one log line with its type
    name; the other datagrams of the same batch are handled and nothing reaches asyncio's
    exception handler (before: a traceback through asyncio for each such datagram)."""
    from aiocoap import Context, resource

    from oscar_io.dtls import ConnectionGuard, IndexedCreds

    loop = asyncio.get_running_loop()
    escaped: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    port = free_port()
    ctx = await Context.create_server_context(
        resource.Site(), bind=("127.0.0.1", port - 1), transports=["tinydtls_server"],
        server_credentials=IndexedCreds(),
    )  # fmt: skip
    guard = ConnectionGuard(ctx, cap=16)
    answer = guard.gate.answer

    def failing_answer(datagram: bytes, sockaddr: object) -> bytes | None:
        if datagram.startswith(b"boom"):
            raise ValueError("secret peer data")
        return answer(datagram, sockaddr)

    guard.gate.answer = failing_answer  # type: ignore[method-assign]
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    try:
        for s in senders:
            s.setblocking(False)
        # Sent while the event loop waits for this coroutine: one batch for the guard.
        senders[0].sendto(b"boom", ("127.0.0.1", port))
        for s in senders[1:]:
            s.sendto(client_hello(os.urandom(32)), ("127.0.0.1", port))
        senders[0].sendto(b"boom again", ("127.0.0.1", port))
        with caplog.at_level("DEBUG", logger="oscar.dtls"):
            replies = []
            for s in senders[1:]:
                replies.append(await asyncio.wait_for(loop.sock_recv(s, 2048), 5.0))
            await asyncio.sleep(0.2)
        assert [r[13] for r in replies] == [3, 3, 3]  # HelloVerifyRequests
        assert guard.failed == 2 and not escaped, escaped
        lines = [r for r in caplog.records if "could not be handled" in r.getMessage()]
        assert [r.levelname for r in lines] == ["INFO", "DEBUG"]
        assert all("(ValueError)" in r.getMessage() for r in lines)
        assert "secret" not in caplog.text
    finally:
        for s in senders:
            s.close()
        loop.set_exception_handler(None)
        guard.drain()
        guard.uninstall()
        await ctx.shutdown()


# A DTLS client that handshakes from a given source port, asks for /crl, prints the answer's
# code and how long it took, then waits to be killed (as a device killed with -9 leaves its
# session behind at the server, never closed).
_CLIENT_FROM_PORT = """
import asyncio, sys, time
from aiocoap import GET, Context, Message

async def main():
    server, local, identity = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    psk = bytes.fromhex(sys.stdin.readline())
    loop = asyncio.get_running_loop()
    original = loop.create_datagram_endpoint

    async def bound(factory, **kwargs):
        kwargs.setdefault("local_addr", ("127.0.0.1", local))
        return await original(factory, **kwargs)

    loop.create_datagram_endpoint = bound
    ctx = await Context.create_client_context(transports=["tinydtls"])
    uri = f"coaps://127.0.0.1:{server}"
    ctx.client_credentials.load_from_dict(
        {uri + "/*": {"dtls": {"psk": psk, "client-identity": identity.encode()}}}
    )
    start = time.monotonic()
    try:
        request = ctx.request(Message(code=GET, uri=uri + "/crl"))
        response = await asyncio.wait_for(request.response, 6)
        print(response.code.dotted, round(time.monotonic() - start, 2), flush=True)
    except Exception as exc:
        print("failed", type(exc).__name__, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_a_new_handshake_from_a_dead_peers_port_is_answered_at_once() -> None:
    """A device killed with -9 leaves its session at the server; the OS gives its source port to
    the next program, whose handshake must be answered at once, whatever identity it names.
    Before: a handshake naming another identity failed at the PSK lookup after the client had
    sent its last flight; the server dropped the old session and that flight, and the client's
    retransmissions of it found no connection (a producer test's reader timed out, ~1 run in 5).
    Now the new handshake's first hello goes through the gate's cookie exchange and replaces the
    old connection."""
    from aiocoap import Context, resource

    from oscar_io.dtls import ConnectionGuard, IndexedCreds

    class Crl(resource.Resource):
        async def render_get(self, request: Any) -> Any:
            from aiocoap import Message

            return Message(payload=b"crl")

    site = resource.Site()
    site.add_resource(["crl"], Crl())
    creds = IndexedCreds()
    psks = {name: os.urandom(16) for name in ("dead-a", "reuser-b")}
    for name, psk in psks.items():
        creds.set_device(name, psk)
    port = free_port()
    ctx = await Context.create_server_context(
        site, bind=("127.0.0.1", port - 1), transports=["tinydtls_server"],
        server_credentials=creds,
    )  # fmt: skip
    guard = ConnectionGuard(ctx, cap=16)
    local = free_port()

    async def run_and_kill(identity: str) -> list[str]:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLIENT_FROM_PORT, str(port), str(local), identity,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(psks[identity].hex().encode() + b"\n")
        await child.stdin.drain()
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 20)
        finally:
            child.kill()  # SIGKILL: no close_notify
            await child.wait()
        return line.decode().split()

    try:
        # dead-a, then reuser-b from the same port, then dead-a again (a restarted device).
        for identity in ("dead-a", "reuser-b", "dead-a"):
            answer = await run_and_kill(identity)
            assert answer[0] == "2.05", (identity, answer)
            # One HelloVerifyRequest more than a fresh port needs; no retransmission timeout
            # (tinydtls's first is after 1 s).
            assert float(answer[1]) < 0.9, (identity, answer)
            assert ("127.0.0.1", local) in guard._pool._connections
        assert guard.verified == 3
    finally:
        guard.drain()
        guard.uninstall()
        await ctx.shutdown()
