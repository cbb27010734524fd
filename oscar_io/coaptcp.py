"""CoAP over TCP and TLS (RFC 8323) beside UDP: listeners, mutual TLS under the AS CA, and the
bounded fetch of a large object in BERT blocks.

Where a server listens: ``coap+tcp`` on the same port number as its UDP CoAP, ``coaps+tcp`` on
that port + 1 (RFC 8323's 5683/5684 layout, and aiocoap's: its TLS server binds the given port
+ 1). So a client that knows ``coap://HOST:PORT/...`` knows ``coap+tcp://HOST:PORT/...``
(:func:`tcp_uri`) without any other configuration, and a server that offers nothing there refuses
the connection at once (the client falls back to UDP).

TLS is mutual and rooted in the AS CA only: the server presents its device certificate from the
AS CA and requires a client certificate issued by the same CA; the client requires the server's
certificate to chain to the AS CA. Device certificates name the device in their subject CN (no
DNS names), so host names are not checked: :func:`peer_device` gives the verified peer's device
id, and a caller that needs a particular peer compares it (fail closed: no certificate, no id).
TLS 1.3 only. Revocation is not checked here (the AS's CRL is the caller's, as for objects).
Python's ``ssl`` has no PSK, so the DTLS link PSKs cannot be used here.

Over TCP aiocoap 0.4.17 announces (CSM) a Max-Message-Size of 1 MiB and block-wise support, and
its server then answers a large object in BERT blocks (szx 7, up to 1023 KiB each). Its client
would assemble them without any bound, so :func:`fetch` does it here: with Size2 up to
:data:`WINDOW` BERT blocks asked for at once (4 blocks of 1023 KiB in flight at most), else one
after the other; same code and ETag, every block the one asked for, never more than ``max_size``
bytes.

What this module does not do: decide when TCP is worth it (:mod:`oscar_io.tcproute`), fall back
to UDP (the caller does, on :class:`~oscar_io.coaperrors.TransportError`), or check objects.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import weakref
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from oscar.certs import device_id_of
from oscar.errors import CertificateError
from oscar.objects import CONTENT_FORMAT_COSE_SIGN1
from oscar_io.coaperrors import TimedOut, TransportError, translate
from oscar_io.ports import PortInUse, tcp_bind_error
from oscar_io.tasks import stop_tasks

__all__ = [
    "TCP_SCHEME",
    "TLS_SCHEME",
    "BrokenBert",
    "client_context",
    "client_tls",
    "ensure_tcp_port_free",
    "fetch",
    "peer_certificate",
    "peer_device",
    "put",
    "serve",
    "server_tls",
    "tcp_uri",
    "tls_port",
]

TCP_SCHEME = "coap+tcp"
TLS_SCHEME = "coaps+tcp"
BERT = 7  # the block size exponent of BERT (RFC 8323 §6)
#: BERT blocks asked for at once when the size is announced (each up to 1023 KiB: memory).
WINDOW = 4


class BrokenBert(TransportError):
    """A block-wise answer over TCP that does not make one object, or exceeds the limit."""


def tls_port(port: int) -> int:
    """The ``coaps+tcp`` port of a server whose CoAP (UDP and TCP) port is ``port``."""
    return port + 1


def tcp_uri(uri: str, *, tls: bool = False) -> str:
    """``coap://HOST[:PORT]/PATH`` as ``coap+tcp://HOST:PORT/PATH`` (the same port number; the
    default 5683 written out), or ``coaps+tcp://HOST:PORT+1/PATH`` with ``tls``. ValueError for
    anything but a ``coap://`` URI."""
    parts = urlsplit(uri)
    if parts.scheme != "coap" or not parts.hostname:
        raise ValueError("only a coap:// URI has a CoAP over TCP twin")
    port = parts.port or 5683
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if tls:
        return parts._replace(scheme=TLS_SCHEME, netloc=f"{host}:{tls_port(port)}").geturl()
    return parts._replace(scheme=TCP_SCHEME, netloc=f"{host}:{port}").geturl()


# --- TLS contexts ---------------------------------------------------------------------------------


def _load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` from memory: Python's ``ssl`` reads files only, so the PEMs go through
    anonymous memory files (``memfd``), never onto a disk."""
    fds = []
    try:
        for name, data in (("cert", cert_pem), ("key", key_pem)):
            fd = os.memfd_create(f"oscar-tls-{name}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    except ssl.SSLError:
        raise ValueError("the TLS certificate and key do not load (or do not match)") from None
    finally:
        for fd in fds:
            os.close(fd)


def _base(purpose: int, ca: x509.Certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # device certificates name a device id, no DNS name
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca.public_bytes(Encoding.PEM).decode("ascii"))
    context.set_alpn_protocols(["coap"])
    return context


def server_tls(cert_pem: bytes, key_pem: bytes, ca: x509.Certificate) -> ssl.SSLContext:
    """A server context: presents ``cert_pem`` (the device's certificate from the AS CA) and
    requires a client certificate issued by ``ca``."""
    context = _base(ssl.PROTOCOL_TLS_SERVER, ca)
    _load_chain(context, cert_pem, key_pem)
    return context


def client_tls(
    ca: x509.Certificate, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> ssl.SSLContext:
    """A client context: the server's certificate must be issued by ``ca``; ``cert_pem`` and
    ``key_pem`` (the device's own, from the AS CA) answer a server that asks for one."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT, ca)
    if cert_pem is not None and key_pem is not None:
        _load_chain(context, cert_pem, key_pem)
    return context


def peer_certificate(remote: Any) -> x509.Certificate | None:
    """The certificate the TLS peer of ``remote`` (an aiocoap RFC 8323 connection) presented
    and the handshake verified under the AS CA; None for plain TCP, UDP or anything else."""
    transport = getattr(remote, "_transport", None)
    if transport is None or getattr(remote, "scheme", None) != TLS_SCHEME:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def peer_device(remote: Any) -> str | None:
    """The device id in :func:`peer_certificate`; None without one, or for a certificate that
    names no well-formed device."""
    certificate = peer_certificate(remote)
    if certificate is None:
        return None
    try:
        return device_id_of(certificate)
    except CertificateError:
        return None


def is_tcp(remote: Any) -> bool:
    """Whether ``remote`` is a CoAP over TCP or TLS connection (its source address is proven by
    the TCP handshake: no amplification, no spoofing)."""
    return getattr(remote, "scheme", None) in (TCP_SCHEME, TLS_SCHEME)


# --- servers --------------------------------------------------------------------------------------


def ensure_tcp_port_free(host: str, port: int) -> None:
    """:class:`~oscar_io.ports.PortInUse` when a TCP listener holds ``host``:``port`` (aiocoap
    binds with SO_REUSEPORT, so a second server would bind too and share the connections)."""
    problem = tcp_bind_error(host, port)
    if problem is not None:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise PortInUse(
            f"TCP port {shown} is in use by another process ({problem}); "
            "stop it or choose another port"
        )


async def serve(
    site: Any, host: str, port: int, *, tcp: bool, tls: ssl.SSLContext | None = None
) -> Any:
    """An aiocoap server context serving ``site`` over ``coap+tcp`` on ``port`` (with ``tcp``)
    and over ``coaps+tcp`` on :func:`tls_port` (with a ``tls`` server context). The caller shuts
    it down. ``PortInUse`` when a port is taken; ValueError when neither is asked for."""
    from aiocoap import Context

    if not 0 < port < 65535:
        raise ValueError("a TCP listener needs a port 1 to 65534 (TLS takes the next one)")
    transports = []
    if tcp:
        ensure_tcp_port_free(host, port)
        transports.append("tcpserver")
    if tls is not None:
        ensure_tcp_port_free(host, tls_port(port))
        transports.append("tlsserver")
    if not transports:
        raise ValueError("a TCP listener serves coap+tcp, coaps+tcp or both")
    # asyncio binds an IPv6 listener v6-only: for "::" (dual-stack over UDP), every family.
    bound = None if host == "::" else host
    context = await Context.create_server_context(
        site, bind=(bound, port), transports=transports, _ssl_context=tls
    )
    for interface in context.request_interfaces:
        server: Any = getattr(interface, "token_interface", None)
        if isinstance(getattr(server, "_pool", None), set):
            server._pool = _Pool()
    return context


class _Pool:
    """An aiocoap TCP server's connections, repaired (0.4.17): aiocoap adds a connection to its
    pool when the socket is accepted, but a TLS handshake that fails never makes (nor loses) the
    connection, so it stayed in the pool for ever (each failed handshake a leak) and broke the
    server's shutdown. Here a connection whose handshake is not done is held weakly (asyncio
    holds it while the handshake runs) and joins the pool when it is made."""

    def __init__(self) -> None:
        self._pending: weakref.WeakSet[Any] = weakref.WeakSet()
        self._live: set[Any] = set()

    def _made(self) -> set[Any]:
        for connection in list(self._pending):
            if connection._transport is not None:
                self._pending.discard(connection)
                self._live.add(connection)
        return self._live

    def add(self, connection: Any) -> None:
        self._pending.add(connection)

    def remove(self, connection: Any) -> None:
        self._made().remove(connection)

    def __contains__(self, connection: object) -> bool:
        return connection in self._made()

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._made()))

    def __len__(self) -> int:
        return len(self._made())


# --- clients --------------------------------------------------------------------------------------


async def client_context(tls: ssl.SSLContext | None = None) -> Any:
    """An aiocoap client context for ``coap+tcp`` (and ``coaps+tcp`` with ``tls``, a
    :func:`client_tls` context used for every TLS connection it makes)."""
    from aiocoap import Context

    context = await Context.create_client_context(
        transports=["tcpclient", "tlsclient"] if tls is not None else ["tcpclient"]
    )
    if tls is not None:
        for interface in context.request_interfaces:
            transport: Any = getattr(interface, "token_interface", None)
            if getattr(transport, "_scheme", None) == TLS_SCHEME:
                transport._ssl_context_factory = lambda hostinfo: tls
    return context


async def _answer(context: Any, message: Any, timeout: float, peer: str) -> Any:
    return await _response(context.request(message, handle_blockwise=False), timeout, peer)


async def _response(request: Any, timeout: float, peer: str) -> Any:
    """The answer to an aiocoap ``request`` within ``timeout`` seconds, or our TransportError."""
    try:
        return await asyncio.wait_for(request.response, timeout)
    except TimeoutError:
        raise TimedOut(f"no answer from {peer} within {timeout:g} s") from None
    except TransportError:
        raise
    except Exception as exc:
        failure = translate(exc, peer)
        if failure is None:
            raise
        raise failure from None


async def fetch(
    context: Any,
    message: Any,
    *,
    max_size: int,
    timeout: float,
    peer: str,
    first_timeout: float | None = None,
    expect_device: str | None = None,
    sink: Callable[[bytes], object] | None = None,
) -> Any:
    """The whole answer to ``message`` (a GET to a ``coap+tcp``/``coaps+tcp`` URI) through
    ``context`` (:func:`client_context`): its BERT blocks asked for (:data:`WINDOW` at once
    when Size2 announces the size, else one after the other), each
    answer within ``timeout`` seconds (the first, connection included, within
    ``first_timeout`` if given), never more than ``max_size`` bytes. With
    ``expect_device`` the TLS peer must be that device. The answer comes back with no Block2
    option; an error code is returned as it is. Raises :class:`TransportError` (its subclasses
    :class:`BrokenBert`, ``TimedOut``, ``Refused``...).

    With ``sink``, the payload of a 2.05 protected object (content format 18) goes there block by
    block, in order, as it arrives (a large object spooled and read as it comes; memory: the
    blocks in flight), and the answer comes back with an empty payload; what ``sink`` raises
    ends the transfer."""
    from aiocoap.optiontypes import BlockOption

    first = await _answer(context, message, first_timeout or timeout, peer)
    if expect_device is not None and peer_device(first.remote) != expect_device:
        raise TransportError(f"{peer} is not {expect_device} (its TLS certificate)")
    block2 = first.opt.block2
    streamed = sink is not None and (
        first.code.dotted == "2.05" and first.opt.content_format == CONTENT_FORMAT_COSE_SIGN1
    )
    if block2 is None or not first.code.is_successful():
        first.opt.block2 = None
        if streamed and sink is not None:  # the whole object in one message
            if len(first.payload) > max_size:
                raise BrokenBert(f"{peer}: the object exceeds the size limit")
            sink(first.payload)
            first.payload = b""
        return first
    size2 = first.opt.size2
    if block2.block_number != 0:
        raise BrokenBert(f"{peer}: a block-wise answer that does not start at block 0")
    if size2 is not None and size2 > max_size:
        raise BrokenBert(f"{peer}: the object exceeds the size limit (announced)")
    buffer = bytearray(first.payload)
    if len(buffer) > max_size:
        raise BrokenBert(f"{peer}: the object exceeds the size limit")
    received = len(buffer)  # bytes of the object so far (all of them in buffer unless streamed)
    if streamed and sink is not None:
        sink(bytes(buffer))
        buffer = bytearray()
    unit = 1024 if block2.size_exponent == BERT else block2.size
    if block2.more and (not received or received % unit):  # BERT: a multiple of 1 KiB
        raise BrokenBert(f"{peer}: a block shorter than its size, not the last")

    def ask(number: int) -> asyncio.Task[Any]:
        following = message.copy(
            mid=None,
            token=None,
            remote=first.remote,
            block2=BlockOption.BlockwiseTuple(number, False, block2.size_exponent),
        )
        return asyncio.create_task(_answer(context, following, timeout, peer))

    # With Size2, up to WINDOW blocks of the first block's size are asked for at once (one
    # round trip for several MiB); without it, one after the other.
    step = received // unit
    window = WINDOW if size2 is not None else 1
    tasks: dict[int, asyncio.Task[Any]] = {}
    asked = expected = step
    more = block2.more
    try:
        while more:
            if received >= max_size:
                raise BrokenBert(f"{peer}: the object exceeds the size limit")
            while (
                len(tasks) < window
                and asked * unit < max_size
                and (asked * unit < size2 if size2 is not None else asked == expected)
            ):
                tasks[asked] = ask(asked)
                asked += step
            if expected not in tasks:
                raise BrokenBert(f"{peer}: more than the size it announced")
            reply = await tasks.pop(expected)
            got = reply.opt.block2
            if (
                reply.code != first.code
                or got is None
                or got.block_number != expected
                or got.size_exponent != block2.size_exponent
            ):
                raise BrokenBert(f"{peer} broke the block-wise transfer off or out of order")
            if reply.opt.etag != first.opt.etag:
                raise BrokenBert(f"{peer}: the object changed during its transfer")
            more = got.more
            if more and (
                len(reply.payload) != step * unit
                if window > 1
                else not reply.payload or len(reply.payload) % unit
            ):
                raise BrokenBert(f"{peer}: a block shorter than its size, not the last")
            if received + len(reply.payload) > max_size:
                raise BrokenBert(f"{peer}: the object exceeds the size limit")
            received += len(reply.payload)
            if streamed and sink is not None:
                sink(reply.payload)
            else:
                buffer += reply.payload
            # aiocoap's answers sit in reference cycles until the collector runs (it counts
            # objects, not bytes): without this, tens of these 1 MiB payloads pile up
            reply.payload = b""
            del reply
            expected = received // unit
            if window == 1:
                asked = expected
    finally:
        if tasks:
            await stop_tasks(tasks.values())
    first.payload = bytes(buffer)
    first.opt.block2 = None
    return first


async def put(
    context: Any, message: Any, *, timeout: float, peer: str, expect_device: str | None = None
) -> Any:
    """The answer to ``message`` (a PUT to a ``coap+tcp``/``coaps+tcp`` URI) through ``context``:
    a large payload goes in BERT Block1 blocks (aiocoap's), the whole within ``timeout`` seconds.
    With ``expect_device`` the TLS peer must be that device (checked on the answer: the payload
    is a protected object, nothing a wrong server could read more of than an eavesdropper).
    Raises :class:`TransportError`."""
    response = await _response(context.request(message), timeout, peer)
    if expect_device is not None and peer_device(response.remote) != expect_device:
        raise TransportError(f"{peer} is not {expect_device} (its TLS certificate)")
    return response
