"""The consumer's DTLS sessions with the AS, against a real AS process and the real CLI.

The flaky failure of issue 13 (an asyncio traceback before the CLI's one-line answer) came from a
session the AS closed: it allows each device at most four established sessions and closes the
least recently seen one with a close_notify; aiocoap's DTLS client kept the connection, tinydtls
renewed the session by itself at the next request, and its second "connected" event raised inside
DTLSSocket's callback (see :mod:`oscar_io.dtls_client`). These tests make that happen on
purpose: a relay between the CLI and the AS holds the CLI's second request while four other
sessions of the same device are opened, so the AS closes the CLI's session in the middle of its
run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from consumer_harness import (
    READER,
    TEMPERATURE,
    ProducerStandIn,
    World,
    build_world,
    cli,
    write_bundle,
)

from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

HANDSHAKE, ALERT, APPLICATION_DATA = 22, 21, 23


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = build_world(tmp_path_factory.mktemp("consumer-dtls"))
    try:
        yield world
    finally:
        assert world.server.stop() == 0
        assert "Traceback" not in world.server.log()


class SessionRelay(asyncio.DatagramProtocol):
    """A UDP relay to the AS for one client. The client's ``hold_at``-th application-data
    datagram, and every one after it, is dropped (CoAP retransmits it) until :meth:`release`;
    :attr:`held` is set when holding starts, :attr:`closed` when the AS sends an alert."""

    def __init__(self, as_port: int, hold_at: int = 2) -> None:
        self.as_addr = ("127.0.0.1", as_port)
        self.client: tuple[str, int] | None = None
        self.hold_at = hold_at
        self.requests = 0
        self.holding = False
        self.held = asyncio.Event()
        self.closed = asyncio.Event()
        self.hellos_after_close = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.as_addr:
            if data[:1] == bytes([ALERT]):
                self.closed.set()
            if self.client is not None:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        if data[:1] == bytes([APPLICATION_DATA]):
            self.requests += 1
            if self.requests == self.hold_at:
                self.holding = True
                self.held.set()
        elif data[:1] == bytes([HANDSHAKE]) and self.closed.is_set():
            self.hellos_after_close += 1
        if not self.holding:
            self.transport.sendto(data, self.as_addr)

    def release(self) -> None:
        self.holding = False


@pytest.mark.asyncio
async def test_a_session_the_as_closes_mid_run_is_renewed_without_a_traceback(
    world: World, producer: ProducerStandIn, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    relay = SessionRelay(world.server.port)
    transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    others: list[AsClient] = []
    try:
        port = transport.get_extra_info("sockname")[1]
        bundle = Bundle.load(world.bundle(READER))
        relayed = write_bundle(
            tmp_path / "relayed.json",
            READER,
            "consumer",
            f"coaps://127.0.0.1:{port}",
            world.psks[READER],
            (world.as_state / "ca.pem").read_text(),
        )
        producer.publish(TEMPERATURE, world.seal(b"21.5"))
        run = asyncio.create_task(
            cli(world, tmp_path / "state", "get", producer.uri(), bundle=relayed)
        )
        await asyncio.wait_for(relay.held.wait(), 30)
        # Four more established sessions of the same device: the AS closes the CLI's.
        for _ in range(4):
            client = AsClient(bundle, timeout=10)
            await client.start()
            others.append(client)
            await client.revocation_list()
        await asyncio.wait_for(relay.closed.wait(), 10)
        relay.release()
        result = await run
    finally:
        for client in others:
            await client.close()
        transport.close()
    # The scenario happened: the AS closed the session and the CLI made a new handshake.
    assert relay.hellos_after_close >= 1
    assert (result.code, result.out, result.err) == (0, b"21.5", ""), result


@pytest.mark.asyncio
async def test_a_renewed_session_is_one_debug_line_in_process(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The library, not only the CLI: an AsClient whose session the AS closed goes on, and
    nothing reaches asyncio's exception handler."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    bundle = Bundle.load(world.bundle(READER))
    clients = [AsClient(bundle, timeout=10) for _ in range(6)]
    try:
        with caplog.at_level(logging.DEBUG, logger="oscar.aiocoap"):
            for client in clients:
                await client.start()
                await client.revocation_list()
            # The first two sessions were closed by the AS (four per device): used again, each
            # is renewed (or replaced) and answers.
            for client in clients:
                await client.revocation_list()
            await asyncio.sleep(0.2)
    finally:
        for client in clients:
            await client.close()
        loop.set_exception_handler(previous)
    assert seen == []
    assert "closed the DTLS session" in caplog.text
