"""Multicast delivery: each new object sent once to each group, and group GETs answered.

With ``multicast = ["224.0.1.187:5683", ...]`` in its configuration, a producer sends every new
object of every resource it serves **once** to each group: one datagram per value, whatever the
number of listeners, carrying the very bytes of the object a unicast GET gets. Consumers that
joined the group verify and open it as any object (``consumer.groups``); joining grants nothing.

**The notification** follows draft-ietf-core-observe-multicast-notifications where it fits: a
NON 2.05 Content response sent to the group, with Observe (a per-resource counter), ETag,
Max-Age and Content-Format 18, on a token that stands for the resource. The draft has the
server make a *phantom request* and tell clients its token in an informative response; here the
token is derived from the resource id (:func:`oscar_io.multicast.resource_token`), so every
consumer knows it without asking (a simplification: no phantom request, no informative
response, no group OSCORE). A token can collide; the object names its resource and the consumer
checks it, so a collision costs a dropped datagram, never a wrong reading.

**Objects that do not fit one datagram** (over :data:`~oscar_io.multicast.MAX_DATAGRAM` bytes
with the CoAP header) are not sent to groups: the producer logs it once per resource and counts
it (:attr:`GroupService.too_large`); consumers of such resources observe them by unicast
(block-wise). IP fragmentation of a group datagram, or a payload-less notification that makes
every listener fetch at once, were the alternatives: the first loses whole objects to one lost
fragment, the second turns one datagram into N requests at the same instant.

**Group GET** (RFC 7252 §8.2): a NON GET to a group for ``/<path>`` (or ``/<producer>/<path>``)
is answered by each producer that serves ``<path>``, NON, from its unicast sending socket, after
a random leisure (``multicast_leisure``, uniform in [0, leisure]). An unknown resource, a CON
request or anything malformed gets nothing (§8.2: no error answers to a group). **No
amplification**: a requester whose address is not proven gets at most a 4.01 Unauthorized with
an Echo option (RFC 9175, :mod:`oscar_io.echo`), and only when that answer is no larger than its
request, and at most one per :data:`CHALLENGE_INTERVAL` per address (a spoofed flood makes a
group of K producers send the victim at most K small datagrams per interval); repeating the
request with the Echo value, by unicast to the address the 4.01 came from (answered at once, no
leisure), proves the address for a while, and the object comes back.
Pending answers are bounded (:data:`MAX_PENDING`); beyond that requests are dropped.

What it does not do: serve unicast (``producer.server``), group security (the objects are
protected end to end; a group datagram is plain CoAP), or block-wise transfers on a group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from oscar.objects import CONTENT_FORMAT_COSE_SIGN1
from oscar_io import multicast
from oscar_io.echo import AddressCheck
from oscar_io.errors import ConfigError
from oscar_io.multicast import (
    CONTENT,
    ECHO,
    ETAG,
    GET,
    MAX_AGE,
    MAX_DATAGRAM,
    NON,
    OBSERVE,
    UNAUTHORIZED,
    Group,
    encode,
    new_mid,
    resource_token,
    uint,
)

from .published import Published

__all__ = ["CHALLENGE_INTERVAL", "MAX_PENDING", "GroupService"]

log = logging.getLogger("oscar.producer")

#: Group answers waiting for their leisure at once, at most.
MAX_PENDING = 1024
#: Seconds between two 4.01 challenges to one address: a spoofed flood of group GETs makes each
#: producer of the group send the victim at most one small datagram per interval.
CHALLENGE_INTERVAL = 1.0
#: Addresses whose last challenge is remembered, at most (the oldest forgotten first).
MAX_CHALLENGED = 65_536
_CONTENT_FORMAT = (multicast.CONTENT_FORMAT, uint(CONTENT_FORMAT_COSE_SIGN1))


class GroupService:
    """The producer's groups: notifications out, group GETs in (see the module docstring).

        Counters: ``sent`` (datagrams sent to groups), ``too_large`` (objects not sent: too big for
        a datagram), ``answered`` (objects sent to proven requesters), ``challenged`` (4.01 with
        Echo), ``ignored`` (requests dropped: malformed, not ours, or no answer allowed; responses
    on the group, the producers' notifications, are not counted)."""

    def __init__(
        self,
        device_id: str,
        resources: Iterable[Published],
        groups: Sequence[Group],
        *,
        interface: str = multicast.ANY_INTERFACE,
        interface6: str | None = None,
        hops: int = multicast.DEFAULT_HOPS,
        loop: bool = True,
        leisure: float = 1.0,
        echo_key: bytes | None = None,
    ) -> None:
        self.device_id = device_id
        self.resources = {published.spec.path: published for published in resources}
        self.groups = tuple(groups)
        self.interfaces = {socket.AF_INET: interface, socket.AF_INET6: interface6}
        self.hops = hops
        self.loop = loop
        self.leisure = leisure
        self.check = AddressCheck(key=echo_key)
        self.sent = self.too_large = self.answered = self.challenged = self.ignored = 0
        self._senders: dict[int, asyncio.DatagramTransport] = {}
        self._receivers: list[asyncio.DatagramTransport] = []
        self._pending: set[asyncio.TimerHandle] = set()
        self._observe: dict[str, int] = {}
        self._challenged: OrderedDict[str, float] = OrderedDict()
        self._logged_large: set[str] = set()

    def __repr__(self) -> str:
        return f"GroupService({', '.join(map(str, self.groups))}, sent={self.sent})"

    def sender_address(self, family: int) -> Any:
        """The unicast address the answers and notifications of ``family`` come from."""
        return self._senders[family].get_extra_info("sockname")

    async def start(self) -> None:
        """Open the sending sockets (one per address family) and join every group. Raises
        :class:`~oscar_io.errors.ConfigError` or ``OSError`` (nothing left open then)."""
        try:
            for group in self.groups:
                interface = self.interfaces[group.family]
                if interface is None:
                    raise ConfigError(
                        f"multicast group {group}: an IPv6 group needs multicast_interface6"
                    )
                if group.family not in self._senders:
                    sock = multicast.sender_socket(
                        group.family, interface, hops=self.hops, loop=self.loop
                    )
                    self._senders[group.family] = await multicast.open_endpoint(sock, self._unicast)
                receiver = multicast.receiver_socket(group, interface)
                self._receivers.append(await multicast.open_endpoint(receiver, self._grouped))
        except BaseException:
            self.close()
            raise
        for group in self.groups:
            log.info("multicast: sending to and answering on group %s", group)

    def close(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        for transport in [*self._receivers, *self._senders.values()]:
            transport.close()
        self._receivers.clear()
        self._senders.clear()

    # --- notifications ---

    def notify(self, published: Published) -> None:
        """Send ``published``'s new object once to each group (its ``on_change``)."""
        obj = published.obj
        if obj is None or not self._senders:
            return
        number = (self._observe.get(published.resource_id, -1) + 1) & 0xFFFFFF
        self._observe[published.resource_id] = number
        datagram = self._content(
            published, resource_token(published.resource_id), [(OBSERVE, uint(number))]
        )
        if datagram is None:
            return
        for group in self.groups:
            sender = self._senders.get(group.family)
            if sender is not None:
                sender.sendto(datagram, (group.address, group.port))
                self.sent += 1

    def _content(
        self, published: Published, token: bytes, extra: list[tuple[int, bytes]]
    ) -> bytes | None:
        """The NON 2.05 carrying ``published``'s object, or None (none, expired, too large)."""
        obj, now = published.obj, published.now()
        if obj is None or now > published.exp:
            return None
        options = [
            *extra,
            (ETAG, published.etag),
            _CONTENT_FORMAT,
            (MAX_AGE, uint(published.max_age(now))),
        ]
        datagram = encode(NON, CONTENT, new_mid(), token, options, obj)
        if len(datagram) > MAX_DATAGRAM:
            self.too_large += 1
            if published.resource_id not in self._logged_large:
                self._logged_large.add(published.resource_id)
                log.warning(
                    "multicast: %s: an object of %d bytes does not fit a group datagram "
                    "(%d bytes); not sent to groups (observe it by unicast)",
                    published.resource_id,
                    len(obj),
                    MAX_DATAGRAM,
                )
            return None
        return datagram

    # --- requests ---

    def _grouped(self, data: bytes, addr: Any) -> None:
        self._request(data, addr, grouped=True)

    def _unicast(self, data: bytes, addr: Any) -> None:
        self._request(data, addr, grouped=False)

    def _request(self, data: bytes, addr: Any, *, grouped: bool) -> None:
        if len(data) >= 2 and data[1] >> 5 != 0:
            return  # a response (the group's notifications, ours included): not for us
        answer = self._answer(data, addr)
        if answer is None:
            self.ignored += 1
            return
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sender = self._senders.get(family)
        if sender is None:
            self.ignored += 1
            return
        if not grouped or self.leisure <= 0:
            sender.sendto(answer, addr)
            return
        if len(self._pending) >= MAX_PENDING:
            self.ignored += 1
            return

        def send() -> None:
            self._pending.discard(handle)
            if not sender.is_closing():
                sender.sendto(answer, addr)

        handle = asyncio.get_running_loop().call_later(
            self.leisure * int.from_bytes(os.urandom(2), "big") / 0xFFFF, send
        )
        self._pending.add(handle)

    def _answer(self, data: bytes, addr: Any) -> bytes | None:
        """The answer to a request datagram, or None (nothing may or need be sent)."""
        message = multicast.decode(data)
        if message is None or message.code != GET or message.mtype != NON or message.payload:
            return None
        path = message.path()
        if path and path[0] == self.device_id:
            path = path[1:]
        published = self.resources.get("/".join(path))
        if published is None:
            return None
        host = str(addr[0])
        if self.check.is_verified(host) or self.check.prove(host, message.first(ECHO)):
            answer = self._content(published, message.token, [])
            if answer is not None:
                self.answered += 1
            return answer
        now = time.monotonic()
        last = self._challenged.get(host)
        if last is not None and now - last < CHALLENGE_INTERVAL:
            return None  # challenged a moment ago: a flood in its name gets no more
        challenge = encode(
            NON, UNAUTHORIZED, new_mid(), message.token, [(ECHO, self.check.challenge(host))]
        )
        if len(challenge) > len(data):  # never more than the request to an unproven address
            return None
        self.challenged += 1
        self._challenged[host] = now
        self._challenged.move_to_end(host)
        while len(self._challenged) > MAX_CHALLENGED:
            self._challenged.popitem(last=False)
        return challenge
