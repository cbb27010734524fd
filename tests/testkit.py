"""Shared test material: fixed ids and secrets, a throwaway PKI (CA + producer certificate), and
the fast-path tests' own CoAP option encoder and raw UDP clients."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from oscar import AccessSecret, certs

NOW = 1_800_000_000
SECRET = AccessSecret(bytes(range(32)))
OTHER_SECRET = AccessSecret(bytes(range(1, 33)))
PRODUCER = "sensor-1"
RESOURCE = "sensor-1/temperature"


@dataclass(frozen=True)
class Pki:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    producer_key: ec.EllipticCurvePrivateKey
    producer_cert: x509.Certificate


def make_pki(producer_id: str = PRODUCER, *, not_after: int = NOW + 86_400) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certs.make_ca_certificate(
        ca_key, "OSCAR test CA", serial=1, not_before=NOW - 86_400, not_after=NOW + 10 * 86_400
    )
    producer_key = ec.generate_private_key(ec.SECP256R1())
    csr = certs.make_csr(producer_key, producer_id)
    cert = certs.issue_certificate(
        csr, producer_id, ca_cert, ca_key, serial=1000, not_before=NOW - 3600, not_after=not_after
    )
    return Pki(ca_key, ca_cert, producer_key, cert)


def coap_option(delta: int, value: bytes) -> bytes:
    """One CoAP option, ``delta`` after the previous one (RFC 7252 §3.1): the tests' own
    encoder, written apart from :mod:`oscar_io.coapfast`, for requests the fast paths and
    aiocoap are compared on."""

    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, (n - 269).to_bytes(2, "big")

    d, dx = nibble(delta)
    n, nx = nibble(len(value))
    return bytes([d << 4 | n]) + dx + nx + value


class RawUdpClients:
    """Raw UDP client sockets to a server on 127.0.0.1:``port`` (the fast-path tests send bytes
    that no CoAP library would), closed by :meth:`close`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sockets: list[socket.socket] = []

    def client(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(("127.0.0.1", self.port))
        self.sockets.append(sock)
        return sock

    async def exchange(self, sock: socket.socket, data: bytes, timeout: float = 5.0) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, data)
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)

    async def nothing(self, sock: socket.socket, wait: float = 0.2) -> bool:
        """True if nothing arrives on ``sock`` within ``wait`` seconds."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_recv(sock, 4096), wait)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
