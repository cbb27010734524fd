"""A consumer on multicast groups: receive new objects sent to a group, and group GETs.

::

    async with consumer.join_group("224.0.1.187:5683", ["sensor-1/temperature"],
                                   interface="127.0.0.1") as listening:
        async for resource_id, reading in listening:
            ...
    readings = await consumer.group_get("224.0.1.187:5683", "temperature", timeout=2.0)

**Receiving** (:class:`GroupListener`): the socket joins the group; each datagram must be a NON
2.05 with Content-Format 18 on the token of one of the resources listened for
(:func:`oscar_io.multicast.resource_token`; ``producer.groups`` says why a token), and its payload
then goes through the consumer's :class:`~consumer.pipeline.Pipeline` exactly as a unicast
object: signer, signature, revocation, freshness, secret, decryption. Joining a group grants
nothing. An object equal to the newest accepted is skipped (``duplicates``); an older one (a
replay) is refused (``stale``); anything else that is not a valid object of a resource listened
for is dropped and counted (``dropped``, ``rejected``), logged at most once per
:data:`LOG_INTERVAL` seconds: a flood to the group costs counters, not log lines. Datagrams wait
in a bounded queue (:data:`QUEUE`); when it is full the newest is dropped (counted). An object
whose secret cannot be had now (the AS out of reach) is dropped and counted too; a refusal by
the AS (:class:`AccessDenied`: this consumer is not granted the resource) ends the iteration.

**Group GET** (:func:`group_get`): one NON GET to the group for ``/<path>``; every producer of
the group that serves ``<path>`` answers after its leisure. A producer that does not know this
consumer's address answers 4.01 with an Echo option (no amplification: the request carries an
Echo option of 8 zero bytes, :data:`PLACEHOLDER`, so that it is as large as that 4.01, which is
never larger than the request); the request is then
repeated once, by unicast, to that producer with the Echo value, and the object comes back. Each
object is checked by the pipeline against the resource it names (``<producer>/<path>``: the
signer must own it); answers that fail, or whose secret this consumer is not granted, are left
out. Returns what came within the timeout.

What this module does not do: multicast sockets (:mod:`oscar_io.multicast`), checks
(:mod:`consumer.pipeline`), or block-wise transfers (an object too large for one datagram is
not sent to groups: observe it by unicast).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from oscar.decoding import ProtectedObject
from oscar.errors import InvalidObject
from oscar.objects import CONTENT_FORMAT_COSE_SIGN1, Reading
from oscar_io import multicast
from oscar_io.multicast import ANY_INTERFACE, CONTENT, ECHO, GET, NON, UNAUTHORIZED, URI_PATH, Group

from .errors import AccessDenied, StaleCopy, TransportError

if TYPE_CHECKING:
    from .client import Consumer

__all__ = ["LOG_INTERVAL", "MAX_RETRIES", "PLACEHOLDER", "QUEUE", "GroupListener", "group_get"]

log = logging.getLogger("oscar.consumer")

#: Datagrams waiting to be checked, at most.
QUEUE = 256
#: The Echo option of a first group GET: no proof (no server issued it), but it makes the request
#: as large as the 4.01 challenge a producer may send back to an address it does not know (it
#: never sends more than the request: a short GET would get nothing at all).
PLACEHOLDER = bytes(8)
#: Producers a group GET repeats its request to with their Echo value, at most.
MAX_RETRIES = 64
#: Seconds between two log lines about dropped or rejected group datagrams.
LOG_INTERVAL = 60.0


def _group(group: Group | str) -> Group:
    return group if isinstance(group, Group) else Group.parse(group)


class GroupListener:
    """Readings of ``resources`` sent to ``group`` (see the module docstring); an async context
    manager (the socket joins on enter, leaves on exit) and an async iterator of
    ``(resource id, reading)``."""

    def __init__(
        self,
        consumer: Consumer,
        group: Group | str,
        resources: Sequence[str],
        *,
        interface: str = ANY_INTERFACE,
    ) -> None:
        if not resources:
            raise ValueError("listen for at least one resource")
        self.consumer = consumer
        self.group = _group(group)
        self.interface = interface
        self.tokens = {multicast.resource_token(r): r for r in resources}
        self.accepted = self.duplicates = self.stale = self.rejected = self.dropped = 0
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        self._transport: asyncio.DatagramTransport | None = None
        self._logged_at: float | None = None

    def __repr__(self) -> str:
        return (
            f"GroupListener({self.group}, accepted={self.accepted}, stale={self.stale}, "
            f"rejected={self.rejected}, dropped={self.dropped})"
        )

    async def __aenter__(self) -> GroupListener:
        sock = multicast.receiver_socket(self.group, self.interface)
        self._transport = await multicast.open_endpoint(sock, self._received)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _received(self, data: bytes, addr: Any) -> None:
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            self._drop("the queue is full")

    def _drop(self, why: str, *, rejected: bool = False) -> None:
        if rejected:
            self.rejected += 1
        else:
            self.dropped += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            log.warning(
                "group %s: datagram dropped (%s); %d rejected, %d dropped so far",
                self.group,
                why,
                self.rejected,
                self.dropped,
            )

    def __aiter__(self) -> AsyncIterator[tuple[str, Reading]]:
        return self._readings()

    async def _readings(self) -> AsyncIterator[tuple[str, Reading]]:
        while True:
            data = await self._queue.get()
            message = multicast.decode(data)
            if (
                message is None
                or message.mtype != NON
                or message.code != CONTENT
                or multicast.read_uint(message.first(multicast.CONTENT_FORMAT))
                != CONTENT_FORMAT_COSE_SIGN1
                or not message.payload
            ):
                self._drop("not a group notification")
                continue
            resource_id = self.tokens.get(message.token)
            if resource_id is None:
                self.dropped += 1  # another resource's: not counted as an attack, not logged
                continue
            try:
                reading = await self.consumer.pipeline.open(
                    message.payload, resource_id, skip_same=True
                )
            except StaleCopy:
                self.stale += 1  # a replay, or a reordered older object: never accepted
                continue
            except TransportError as exc:  # the AS out of reach for a new epoch's secret
                self._drop(f"not opened: {exc}")
                continue
            except InvalidObject as exc:
                self._drop(f"rejected: {exc.reason}", rejected=True)
                continue
            if reading is None:
                self.duplicates += 1
                continue
            self.accepted += 1
            yield resource_id, reading


def _resource_of(payload: bytes, path: str, max_size: int) -> str | None:
    """The resource an answer's object names, if it is ``<producer>/<path>`` (checked again,
    with its signer, by the pipeline)."""
    try:
        resource_id = ProtectedObject.from_bytes(payload, max_size=max_size).metadata.resource_id
    except InvalidObject:
        return None
    producer, _, rest = resource_id.partition("/")
    return resource_id if producer and rest == path else None


async def group_get(
    consumer: Consumer,
    group: Group | str,
    path: str,
    *,
    timeout: float = 2.0,
    interface: str = ANY_INTERFACE,
    hops: int = multicast.DEFAULT_HOPS,
) -> dict[str, Reading]:
    """One GET for ``path`` to ``group``; the readings of every producer that answered within
    ``timeout`` seconds, by resource id (see the module docstring). Answers that fail a check
    are left out (logged). Raises ``OSError`` when the socket cannot be made."""
    target = _group(group)
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    wanted = path.strip("/")
    segments = [s.encode() for s in wanted.split("/")]
    token = os.urandom(8)

    def request(echo: bytes = PLACEHOLDER) -> bytes:
        options = [(URI_PATH, s) for s in segments]
        options.append((ECHO, echo))
        return multicast.encode(NON, GET, multicast.new_mid(), token, options)

    answers: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue(QUEUE)

    def received(data: bytes, addr: Any) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            answers.put_nowait((data, addr))

    if target.family == socket.AF_INET6 and interface == ANY_INTERFACE:
        raise ValueError("an IPv6 group needs an interface (a name or one of its addresses)")
    sock = multicast.sender_socket(target.family, interface, hops=hops)
    transport = await multicast.open_endpoint(sock, received)
    readings: dict[str, Reading] = {}
    retried: set[Any] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        transport.sendto(request(), (target.address, target.port))
        while (left := deadline - loop.time()) > 0:
            try:
                data, addr = await asyncio.wait_for(answers.get(), left)
            except TimeoutError:
                break
            message = multicast.decode(data)
            if message is None or message.token != token or message.mtype != NON:
                continue
            if message.code == UNAUTHORIZED:
                echo = message.first(ECHO)
                # Once per producer, and a bounded number in all: a forged 4.01 makes this
                # consumer send one small unicast GET, never a stream of them.
                if echo is not None and addr not in retried and len(retried) < MAX_RETRIES:
                    retried.add(addr)
                    transport.sendto(request(echo), addr)
                continue
            if message.code != CONTENT or not message.payload:
                continue
            resource_id = _resource_of(message.payload, wanted, consumer.max_object_size)
            if resource_id is None or resource_id in readings:
                continue
            try:
                reading = await consumer.pipeline.open(
                    message.payload, resource_id, skip_same=False
                )
            except (InvalidObject, AccessDenied, TransportError) as exc:
                # One producer's answer (rejected, not granted, its secret out of reach) does
                # not spoil the others'.
                log.warning("group GET %s: an answer from %s left out: %s", path, addr[0], exc)
                continue
            if reading is not None:
                readings[resource_id] = reading
    finally:
        transport.close()
    return readings
