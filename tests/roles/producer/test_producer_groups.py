"""The producer's answers to group requests, without sockets: Echo, sizes, what gets nothing."""

from __future__ import annotations

import os

import pytest

from oscar.objects import object_etag
from oscar_io import multicast
from oscar_io.multicast import CON, CONTENT, ECHO, GET, NON, UNAUTHORIZED, URI_PATH, Group
from producer.config import ResourceSpec
from producer.groups import GroupService
from producer.published import Published

DEVICE = "meter-1"
NOW = 1_700_000_000
PEER = ("127.0.0.1", 40000)


class StandIn:
    device_id = DEVICE

    def now(self) -> int:
        return NOW


@pytest.fixture
def service() -> GroupService:
    published = Published(StandIn(), ResourceSpec("temp"))  # type: ignore[arg-type]
    published.obj, published.iat, published.exp = os.urandom(200), NOW, NOW + 3600
    published.epoch, published.seq = 1, 7
    published.etag = object_etag(published.resource_id, 1, 7)
    return GroupService(DEVICE, [published], [Group("224.0.1.187", 5683)], echo_key=bytes(32))


def get(
    *path: bytes, mtype: int = NON, echo: bytes | None = None, token: bytes = b"t" * 8
) -> bytes:
    options = [(URI_PATH, p) for p in path]
    if echo is not None:
        options.append((ECHO, echo))
    return multicast.encode(mtype, GET, 1, token, options)


def test_an_unproven_requester_gets_a_challenge_no_larger_than_its_request(
    service: GroupService,
) -> None:
    request = get(b"temp", echo=bytes(8))
    answer = service._answer(request, PEER)
    assert answer is not None and len(answer) <= len(request)
    message = multicast.decode(answer)
    assert message is not None and message.code == UNAUTHORIZED and not message.payload
    echo = message.first(ECHO)
    assert echo is not None
    # The Echo proves the address: the object comes back, on the request's token.
    content = multicast.decode(service._answer(get(b"meter-1", b"temp", echo=echo), PEER) or b"")
    assert content is not None and content.code == CONTENT and content.mtype == NON
    assert content.payload == service.resources["temp"].obj and content.token == b"t" * 8
    assert (service.challenged, service.answered) == (1, 1)
    # Proven for a while: a plain group GET now gets the object at once.
    assert multicast.decode(service._answer(get(b"temp"), PEER) or b"").code == CONTENT  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "request_bytes",
    [
        get(b"temp"),  # shorter than the 4.01 would be
        get(b"temp", echo=bytes(8), mtype=CON),  # CON to a group: never
        get(b"nothing", echo=bytes(8)),  # not served here: no 4.04 to a group
        get(b"meter-2", b"temp", echo=bytes(8)),  # another producer's
        get(b"temp", echo=bytes(8))[:-3],  # truncated
        multicast.encode(NON, GET, 1, b"t", [(URI_PATH, b"temp")], b"payload"),
    ],
)
def test_what_gets_nothing(service: GroupService, request_bytes: bytes) -> None:
    assert service._answer(request_bytes, PEER) is None
    assert service.challenged == service.answered == 0


def test_one_challenge_per_address_per_interval(service: GroupService) -> None:
    assert service._answer(get(b"temp", echo=bytes(8)), PEER) is not None
    assert service._answer(get(b"temp", echo=bytes(8)), PEER) is None  # a flood in its name
    assert service._answer(get(b"temp", echo=bytes(8)), ("127.0.0.2", 1)) is not None
    # A forged Echo proves nothing.
    assert service._answer(get(b"temp", echo=b"\x00" * 8), ("127.0.0.3", 1)) is not None
    assert service.answered == 0


def test_an_object_too_large_for_a_datagram_is_not_sent(service: GroupService) -> None:
    published = service.resources["temp"]
    published.obj = os.urandom(multicast.MAX_DATAGRAM)
    service.check.prove("127.0.0.1", service.check.challenge("127.0.0.1"))
    assert service._answer(get(b"temp"), PEER) is None
    assert service.too_large == 1
