"""Real proxy processes and what the proxy tests put around them (loopback, no mocks).

- :class:`ProxyProcess`: ``python -m proxy`` with its log in a file, restartable on its ports;
- :class:`CountingRelay`: a UDP relay between the proxy and a producer that counts every request
  reaching the producer (and how it was answered);
- :class:`StandIn`: an aiocoap producer stand-in serving hand-sealed objects (good or bad) with a
  chosen Max-Age, or an error code;
- :class:`RawClient`: CoAP datagrams from one UDP socket, sizes as they were on the wire;
- :class:`ObserveClient`: Observe GETs from a loopback address of its own, Echo answered;
- :func:`dtls_context`: a device's DTLS client context for the proxy's coaps port (link PSK).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from pathlib import Path
from typing import Any

from aiocoap import GET, NON, Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.resource import ObservableResource, Site
from as_harness import Daemon, free_port
from system_harness import PYTHON

from demo.system import free_port_pair


class ProxyProcess(Daemon):
    """``python -m proxy`` on 127.0.0.1 (plain CoAP on ``port``, DTLS on ``port + 1``)."""

    ready = "link keys"

    def __init__(self, bundle: Path, state: Path, *args: str, port: int | None = None) -> None:
        super().__init__(state.parent / f"{state.name}.log")
        self.bundle = bundle
        self.state = state
        self.args = args
        self.port = port or free_port_pair()

    def command(self) -> list[str]:
        return [
            PYTHON,
            "-m",
            "proxy",
            "--bundle",
            str(self.bundle),
            "--state",
            str(self.state),
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.args,
        ]

    @property
    def address(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    @property
    def secure_address(self) -> str:
        return f"coaps://127.0.0.1:{self.port + 1}"

    def uri(self, resource_id: str) -> str:
        return f"{self.address}/{resource_id}"


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: CountingRelay) -> None:
        self.relay = relay
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.from_client(data, addr)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: CountingRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.from_upstream(data)


class CountingRelay:
    """Forwards datagrams between one client (the proxy) and a producer, counting the requests
    (``requests``: each a (code, has ETag, has Observe) tuple) and the response codes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.requests: list[tuple[str, bool, bool]] = []
        self.responses: list[str] = []
        self._client: Any = None
        self._listen: Any = None
        self._upstream: Any = None

    async def start(self) -> CountingRelay:
        loop = asyncio.get_running_loop()
        self.port = free_port()
        self._listen, _ = await loop.create_datagram_endpoint(
            lambda: _RelayProtocol(self), local_addr=("127.0.0.1", self.port)
        )
        self._upstream, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamProtocol(self), remote_addr=("127.0.0.1", self.upstream_port)
        )
        return self

    def from_client(self, data: bytes, addr: Any) -> None:
        self._client = addr
        try:
            message = Message.decode(data)
        except Exception:
            message = None
        if message is not None and message.code.is_request():
            self.requests.append(
                (message.code.dotted, bool(message.opt.etags), message.opt.observe is not None)
            )
        self._upstream.sendto(data)

    def from_upstream(self, data: bytes) -> None:
        with contextlib.suppress(Exception):  # anything undecodable is just relayed
            message = Message.decode(data)
            if message.code.is_response():
                self.responses.append(message.code.dotted)
        if self._client is not None:
            self._listen.sendto(data, self._client)

    @property
    def address(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def close(self) -> None:
        for transport in (self._listen, self._upstream):
            if transport is not None:
                transport.close()


class StandInResource(ObservableResource):  # type: ignore[misc]
    """Serves ``data`` (content format 18) with ``max_age``, or answers ``error``; counts the
    requests and the Observe registrations (``registrations``) it got."""

    def __init__(self) -> None:
        super().__init__()
        self.data: bytes | None = None
        self.max_age = 0
        self.error: Code | None = None
        self.requests = 0
        self.registrations = 0

    async def add_observation(self, request: Message, serverobservation: Any) -> None:
        self.registrations += 1
        await super().add_observation(request, serverobservation)

    def serve(self, data: bytes, max_age: int = 0) -> None:
        self.data, self.max_age, self.error = data, max_age, None
        self.updated_state()

    async def render_get(self, request: Message) -> Message:
        self.requests += 1
        if self.error is not None or self.data is None:
            return Message(code=self.error or Code.NOT_FOUND)
        return Message(
            code=Code.CONTENT, payload=self.data, content_format=18, max_age=self.max_age
        )


class StandIn:
    """A stand-in producer on 127.0.0.1 with one :class:`StandInResource` per resource id."""

    def __init__(self) -> None:
        self.site = Site()
        self.resources: dict[str, StandInResource] = {}
        self.port = 0
        self.ctx: Context | None = None

    async def start(self) -> StandIn:
        self.port = free_port()
        self.ctx = await Context.create_server_context(
            self.site, bind=("127.0.0.1", self.port), transports=["udp6"]
        )
        return self

    def resource(self, resource_id: str) -> StandInResource:
        if resource_id not in self.resources:
            self.resources[resource_id] = StandInResource()
            self.site.add_resource(tuple(resource_id.split("/")), self.resources[resource_id])
        return self.resources[resource_id]

    def uri(self, resource_id: str) -> str:
        return f"coap://127.0.0.1:{self.port}/{resource_id}"

    async def close(self) -> None:
        if self.ctx is not None:
            await self.ctx.shutdown()


_used_loopback: set[str] = set()


def _fresh_loopback() -> str:
    """A loopback address other than 127.0.0.1 that this process has not used before."""
    while True:
        address = (
            f"127.{random.randrange(1, 255)}.{random.randrange(256)}.{random.randrange(1, 255)}"
        )
        if address not in _used_loopback:
            _used_loopback.add(address)
            return address


class RawClient:
    """One UDP socket (one source address): CoAP datagrams out and in, sizes as on the wire.
    Blocking: call :meth:`exchange` through ``asyncio.to_thread``."""

    def __init__(self, port: int, timeout: float = 5.0, *, fresh: bool = False) -> None:
        """``fresh``: from a loopback address (127.x.y.z) no client of this test run used, so
        that no proxy can have proven it: an ephemeral port the kernel hands out again may be
        one an earlier client proved (answered an Echo) from 127.0.0.1."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        if fresh:
            self.sock.bind((_fresh_loopback(), 0))
        self.sock.connect(("127.0.0.1", port))
        self._mid = 0x1000

    def exchange(self, message: Message) -> tuple[bytes, bytes, Message]:
        """Send ``message`` as a NON request; (request bytes, reply bytes, reply decoded)."""
        self._mid += 1
        message.mtype = NON
        message.mid = self._mid
        message.token = self._mid.to_bytes(4, "big")
        request = message.encode()
        self.sock.send(request)
        while True:
            data = self.sock.recv(65536)
            reply = Message.decode(data)
            if reply.token == message.token:
                return request, data, reply

    def close(self) -> None:
        self.sock.close()


class ObserveClient:
    """GETs (with Observe) from one UDP socket bound to ``host``: a loopback address of its own
    is a client of its own for the proxy's per-client limits. It answers the proxy's Echo
    challenge once (then its address is proven). Blocking: call through ``asyncio.to_thread``."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.sock.bind((host, 0))
        self.sock.connect(("127.0.0.1", port))
        self._mid = 0x2000

    def request(self, message: Message) -> Message:
        """Send ``message`` (NON); its answer, after one Echo round trip if challenged."""
        for _ in range(2):
            self._mid = (self._mid + 1) & 0xFFFF
            message.mtype = NON
            message.mid = self._mid
            message.token = self._mid.to_bytes(2, "big") + b"obs"
            self.sock.send(message.encode())
            while True:
                reply = Message.decode(self.sock.recv(65536))
                if reply.token == message.token:
                    break
            if reply.code != Code.UNAUTHORIZED or reply.opt.echo is None:
                return reply
            message.opt.echo = reply.opt.echo
        return reply

    def observe(self, proxy_uri: str, observe: int | None = 0) -> Message:
        """A GET with Observe: 0 (``observe``) of ``proxy_uri`` (forward proxying); the first
        answer."""
        message = Message(code=GET, observe=observe)
        message.opt.proxy_uri = proxy_uri
        return self.request(message)

    def notification(self) -> Message:
        """The next datagram the proxy sends this socket (a notification), decoded."""
        return Message.decode(self.sock.recv(65536))

    def close(self) -> None:
        """Leave: the proxy's next notification to this socket gets an ICMP error and ends the
        observations (what a client that goes away does)."""
        self.sock.close()


async def dtls_context(proxy: ProxyProcess, identity: str, psk: bytes) -> Context:
    ctx = await Context.create_client_context(transports=["tinydtls"])
    credentials = {"dtls": {"psk": psk, "client-identity": identity.encode()}}
    # aiocoap looks credentials up by the request's URI, which is the Proxy-Uri if there is one
    ctx.client_credentials.load_from_dict(
        {f"{proxy.secure_address}/*": credentials, "coap://*": credentials}
    )
    return ctx


async def send(ctx: Context, message: Message, timeout: float = 10.0) -> Message:
    """One request through ``ctx`` and its response, within ``timeout`` seconds."""
    return await asyncio.wait_for(ctx.request(message).response, timeout)
