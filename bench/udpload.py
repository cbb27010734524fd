"""A light CoAP GET load generator on raw UDP sockets, so that the server is what gets measured.

aiocoap's client spends about as much CPU on a GET as aiocoap's server does, so on a small machine
a load of aiocoap client contexts measures the client as much as the server: a server that needs a
fifth of the CPU per GET shows no more GET/s. This generator spends some 20 µs of Python per
exchange instead: confirmable GETs from ``sockets`` UDP sockets with ``in_flight`` requests
outstanding on each, every answer parsed (type ACK, code 2.05, matching message ID and token) and
its payload length checked; a Block2 answer with the M bit set is followed by a request for the
next block (SZX 6), and only a complete representation of the expected size counts as one GET.
A request unanswered for ``RESEND_AFTER`` seconds is sent again with a new message ID (counted).
Message IDs count up per socket, so none is reused within aiocoap's 247 s duplicate window at
the rates reached here.

With ``prove=True`` each socket first answers the server's Echo challenge once, untimed (a 4.01
with an Echo option, as the proxy sends an unverified address: RFC 9175 §2.4), so that the load
then comes from verified addresses.

This module does no CoAP beyond that: no Observe, no retransmission backoff.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import NamedTuple

from oscar_io.coapfast import option

__all__ = ["LoadResult", "get_request", "run_load"]

_URI_PATH = 11
_BLOCK2 = 23
_ECHO = 252
#: Seconds after which an unanswered request is sent again with a new message ID.
RESEND_AFTER = 1.0


class LoadResult(NamedTuple):
    gets: int  # complete representations received
    exchanges: int  # request/response pairs (more than gets when block-wise)
    seconds: float
    resent: int
    errors: int  # answers that were not a 2.05 of the expected shape

    @property
    def rate(self) -> float:
        return self.gets / self.seconds


def get_request(path: str, mid: int, token: bytes, block: int | None = None) -> bytes:
    """A confirmable GET for ``path`` (``/``-separated segments), optionally for Block2 ``block``
    of 1024 bytes."""
    out = bytearray([0x40 | len(token), 0x01]) + mid.to_bytes(2, "big") + token
    previous = 0
    for segment in path.strip("/").split("/"):
        out += option(_URI_PATH - previous, segment.encode())
        previous = _URI_PATH
    if block is not None:
        value = block << 4 | 6
        out += option(_BLOCK2 - previous, value.to_bytes((value.bit_length() + 7) // 8, "big"))
    return bytes(out)


def _prove(sock: socket.socket, path: str, timeout: float = 5.0) -> None:
    """Answer the server's Echo challenge on ``sock`` (blocking; before the timed load)."""
    from aiocoap import Message  # only here: the load itself parses answers by hand

    sock.settimeout(timeout)
    try:
        mid = int.from_bytes(os.urandom(2), "big")
        sock.send(get_request(path, mid, b"e1"))
        answer = Message.decode(sock.recv(2048))
        if answer.code.dotted == "4.01" and answer.opt.echo is not None:
            echo = answer.opt.echo
            request = get_request(path, (mid + 1) & 0xFFFF, b"e2")
            sock.send(request + option(_ECHO - _URI_PATH, echo))
            answer = Message.decode(sock.recv(2048))
        if answer.code.dotted != "2.05":
            raise RuntimeError(f"{path}: {answer.code} after the Echo exchange")
    finally:
        sock.setblocking(False)


def _parse(data: bytes) -> tuple[int, bytes, int, int, int] | None:
    """(message id, token, code, block2 value or -1, payload length) of an ACK, or None."""
    if len(data) < 4 or data[0] >> 4 != 0x6:  # version 1, type ACK
        return None
    tkl = data[0] & 0x0F
    mid = data[2] << 8 | data[3]
    pos = 4 + tkl
    token = data[4:pos]
    number = 0
    block2 = -1
    n = len(data)
    while pos < n:
        byte = data[pos]
        if byte == 0xFF:
            return mid, token, data[1], block2, n - pos - 1
        pos += 1
        delta, length = byte >> 4, byte & 0x0F
        if delta == 13:
            delta = 13 + data[pos]
            pos += 1
        elif delta == 14:
            delta = 269 + (data[pos] << 8 | data[pos + 1])
            pos += 2
        if length == 13:
            length = 13 + data[pos]
            pos += 1
        elif length == 14:
            length = 269 + (data[pos] << 8 | data[pos + 1])
            pos += 2
        number += delta
        if number == _BLOCK2:
            block2 = int.from_bytes(data[pos : pos + length], "big")
        pos += length
    return mid, token, data[1], block2, 0


class _Slot:
    __slots__ = ("block", "mid", "received", "sent_at", "token")

    def __init__(self) -> None:
        self.block = 0
        self.mid = 0
        self.received = 0
        self.sent_at = 0.0
        self.token = b""


def run_load(
    address: tuple[str, int],
    path: str,
    expected_size: int,
    seconds: float,
    *,
    sockets: int = 16,
    in_flight: int = 4,
    prove: bool = False,
) -> LoadResult:
    """GETs of ``path`` at ``address`` for ``seconds``; see the module docstring."""
    socks = []
    poller = select.epoll()
    slots: dict[int, dict[tuple[int, bytes], _Slot]] = {}
    mids: dict[int, int] = {}
    gets = exchanges = resent = errors = 0
    try:
        for _ in range(sockets):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(address)
            if prove:
                _prove(sock, path)
            socks.append(sock)
            poller.register(sock.fileno(), select.EPOLLIN)
            slots[sock.fileno()] = {}
            mids[sock.fileno()] = int.from_bytes(os.urandom(2), "big")
        by_fd = {sock.fileno(): sock for sock in socks}

        def send(fd: int, slot: _Slot) -> None:
            mids[fd] = mid = (mids[fd] + 1) & 0xFFFF
            slot.mid = mid
            slot.token = os.urandom(2)
            slot.sent_at = time.perf_counter()
            block = None if slot.block == 0 else slot.block
            by_fd[fd].send(get_request(path, mid, slot.token, block))
            slots[fd][(mid, slot.token)] = slot

        start = time.perf_counter()
        deadline = start + seconds
        for fd in by_fd:
            for _ in range(in_flight):
                send(fd, _Slot())
        next_check = start + RESEND_AFTER
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            for fd, _ in poller.poll(min(0.05, deadline - now)):
                sock = by_fd[fd]
                while True:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    parsed = _parse(data)
                    slot = None if parsed is None else slots[fd].pop(parsed[:2], None)
                    if slot is None or parsed is None:
                        continue  # a late answer to a resent request, or junk
                    exchanges += 1
                    _, _, code, block2, length = parsed
                    if code != 0x45:
                        errors += 1
                        slot.block, slot.received = 0, 0
                    elif block2 >= 0 and block2 & 0x08:  # more blocks follow
                        slot.received += length
                        slot.block = (block2 >> 4) + 1
                    else:
                        if slot.received + length == expected_size:
                            gets += 1
                        else:
                            errors += 1
                        slot.block, slot.received = 0, 0
                    send(fd, slot)
            if now >= next_check:
                next_check = now + RESEND_AFTER / 2
                for fd, pending in slots.items():
                    for key, slot in list(pending.items()):
                        if now - slot.sent_at > RESEND_AFTER:
                            del pending[key]
                            resent += 1
                            send(fd, slot)
        elapsed = time.perf_counter() - start
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    return LoadResult(gets, exchanges, elapsed, resent, errors)
