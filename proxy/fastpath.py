"""The proxy's fast path: a cache hit answered from pre-encoded bytes, before aiocoap.

A cache hit costs aiocoap's message layer several times what the datagram costs (decoding into
a Message, deduplication state per remote, a task per request, the site's rendering, encoding);
the proxy's answer to a hit is the entry's object with its ETag and Max-Age, the same bytes for
every client. :class:`FastPath` sits on the server context's plain-CoAP ``udp6`` interface
(:class:`oscar_io.coapfast.UdpHook`, as the producer's does) and answers a datagram itself only
when it is exactly:

- CoAP version 1, CON or NON, code 0.01 GET, a token of at most 8 bytes, no payload;
- options: Uri-Path segments (a resource id: a ``--reverse`` prefix or a published resource;
  not the counters' path) or one Proxy-Uri that :func:`proxy.server.proxied` takes, not both,
  and optionally ETag options (1 to 8 bytes each), and an empty Observe (a registration:
  :mod:`proxy.fastobserve` takes it and sends its notifications); nothing else (no other
  Observe, Echo, Block2, Accept, Uri-Host, Proxy-Scheme...);
- from a remote whose address the Echo check has proven (:class:`oscar_io.echo.AddressCheck`,
  the site's): an unproven one goes to aiocoap, which challenges it (4.01 and Echo);
- for a resource whose entry is in memory (not only on disk), fresh (before ``fresh_until``)
  and valid (not past ``exp``), and whose object goes out in one message (at most aiocoap's
  unsolicited limit of 1124 bytes).

The answer is what :meth:`proxy.server.ProxySite._get` makes and aiocoap sends (the differential
tests compare the bytes): 2.05 with ETag, Content-Format 18, Max-Age (what is left of the
freshness, never past ``exp``) and the object; or 2.03 with ETag and Max-Age when one of the
request's ETags is the entry's. A CON request gets it piggybacked on the ACK with the request's
message ID; a NON request gets a NON answer whose message ID comes from aiocoap's own sequence
(RFC 7252 §5.2.2; aiocoap does the same). The hit is counted (``hits``) as
:meth:`proxy.core.Proxy.lookup` counts it, and in ``fast_hits``.

Before any of that, a datagram is checked against the fast observations: an empty ACK of one's
CON notification is taken, a RST that names one's message ends it (taken, nothing sent), and a
request on one's token ends it before being answered as any other (a repeat of its
registration is a duplicate: dropped, or the same ACK again for a CON, as aiocoap does).

Everything else goes to aiocoap unchanged: other Observe values,
DTLS (another interface), misses, stale or expired entries, entries only on disk, PUT, the
counters, block-wise, 4.04s, malformed or truncated bytes, a request on a token aiocoap is using
for that remote (an observation), and any datagram the fast path fails on.
``OSCAR_PROXY_FASTPATH=off`` leaves it out.

What it does not do: fetch, verify or store anything (:mod:`proxy.core`), or keep anything per
remote beyond a bounded table of address strings (and one of request targets read) and the
fast observations' records (bounded by the observer limits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from oscar import names
from oscar_io.coapfast import CON, NON, UdpHook, option, parse, uint

from .entry import Entry
from .fastobserve import FastObserve, Observer
from .server import STATS_PATH, BadTarget, ProxySite, proxied

__all__ = ["FASTPATH_ENV", "UNSOLICITED_LIMIT", "FastPath"]

log = logging.getLogger("oscar.proxy")

FASTPATH_ENV = "OSCAR_PROXY_FASTPATH"
#: The payload size over which aiocoap answers block-wise unasked (aiocoap 0.4.17).
UNSOLICITED_LIMIT = 1124
#: Remote address strings, and request targets read, remembered (each table cleared when full).
MAX_HOSTS = 4096
MAX_NAMES = 4096
_UNKNOWN: Any = object()

_ACK = 2
_RST = 3
_ETAG = 4
_OBSERVE = 6
_URI_PATH = 11
_PROXY_URI = 35
_MAX_AGE = 14
_CONTENT = 0x45
_VALID = 0x43
#: Content-Format 18 after ETag (option 4).
_CONTENT_FORMAT_18 = bytes([(12 - 4) << 4 | 1, 18])
_STATS = tuple(segment.encode() for segment in STATS_PATH)


class _Encoded:
    """An entry's answers for one Max-Age: the 2.05's options and body, the 2.03's options."""

    __slots__ = ("content", "entry", "max_age", "valid")

    def __init__(self, entry: Entry, max_age: int) -> None:
        self.entry, self.max_age = entry, max_age
        etag = option(_ETAG, entry.etag)
        age = uint(max_age)
        self.content = etag + _CONTENT_FORMAT_18 + option(_MAX_AGE - 12, age) + b"\xff" + entry.obj
        self.valid = etag + option(_MAX_AGE - _ETAG, age)


class FastPath:
    """Answers cache hits of the proxy ``site``; see the module docstring. ``enabled`` False
    sends every datagram to aiocoap; ``answered`` counts the datagrams answered here."""

    def __init__(self, site: ProxySite) -> None:
        self.site = site
        self.proxy = site.proxy
        self.hook = UdpHook(self._respond, log)
        self._encoded: dict[str, _Encoded] = {}
        self._hosts: dict[Any, str] = {}
        #: How the site reads a request's Uri-Path or Proxy-Uri: (resource id, upstream) or None.
        self._names: dict[tuple[tuple[bytes, ...], bytes | None], tuple[str, str | None] | None]
        self._names = {}
        #: Observe registrations answered here, and their notifications (proxy.fastobserve).
        self.observe = FastObserve(self.proxy, self._send, self.hook.next_message_id)
        self.hook.on_error = self._error
        self.hook.on_close = self.observe.close

    def __repr__(self) -> str:
        state = "on" if self.enabled else "off"
        return f"FastPath({state}, answered={self.answered})"

    @property
    def enabled(self) -> bool:
        return self.hook.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.hook.enabled = value

    @property
    def answered(self) -> int:
        return self.hook.answered

    def install(self, context: Any) -> bool:
        """Put the fast path in front of ``context``'s udp6 interface (False if it could not:
        then aiocoap answers every request)."""
        return self.hook.install(context)

    def _host(self, address: Any, pktinfo: bytes | None) -> str:
        host = self._hosts.get(address)
        if host is None:
            from aiocoap.transports.udp6 import UDP6EndpointAddress

            remote = UDP6EndpointAddress(address, self.hook.interface, pktinfo=pktinfo)
            host = str(remote.hostinfo)
            if len(self._hosts) >= MAX_HOSTS:
                self._hosts.clear()
            self._hosts[address] = host
        return host

    def _respond(self, data: bytes, address: Any, pktinfo: bytes) -> bytes | None:
        return self.answer(data, self._host(address, pktinfo), address, pktinfo)

    def _send(self, data: bytes, observer: Observer) -> bool:
        return self.hook.send(data, observer.address, observer.pktinfo)

    def _error(self, address: Any) -> None:
        """aiocoap read an error for ``address`` (ICMP) or a send to it failed."""
        if self.observe.by_key:
            self.observe.gone(self._host(address, None))

    def answer(
        self, data: bytes, host: str, address: Any = None, pktinfo: bytes = b""
    ) -> bytes | None:
        """The answer to the request datagram ``data`` from the remote ``host`` (aiocoap's
        ``hostinfo`` of it; ``address`` and ``pktinfo`` as received, for an observation's
        notifications), None for aiocoap's to handle, or ``b""`` for a datagram taken with
        nothing to send."""
        parsed = parse(data)
        if parsed is None:
            return None
        mtype, code, tkl, options = parsed
        if self.observe.by_key or self.observe.pending:  # a fast observation's ACK, RST, end
            mid = data[2] << 8 | data[3]
            if code == 0 and tkl == 0 and not options and mtype in (_ACK, _RST):
                taken = (
                    self.observe.ack(host, mid) if mtype == _ACK else self.observe.reset(host, mid)
                )
                return b"" if taken else None
            if 1 <= code < 32 and mtype in (CON, NON):
                repeat = self.observe.request_on(host, data[4 : 4 + tkl], mid)
                if repeat is not None:
                    return repeat  # a duplicate of a registration: dropped, or its ACK again
        if code != 1 or mtype not in (CON, NON):
            return None
        path: list[bytes] = []
        etags: list[bytes] = []
        proxy_uri: bytes | None = None
        observe = False
        for number, value in options:
            if number == _URI_PATH:
                path.append(value)
            elif number == _ETAG and 0 < len(value) <= 8:
                etags.append(value)
            elif number == _PROXY_URI and proxy_uri is None and not path:
                proxy_uri = value
            elif number == _OBSERVE and not value and not observe:
                observe = True
            else:
                return None
        if observe and address is None:
            return None  # nowhere to send notifications to (an in-memory caller): aiocoap's
        if not self.site.addresses.is_verified(host):
            return None  # unproven: aiocoap's challenge (4.01 and Echo)
        key = (tuple(path), proxy_uri)
        target = self._names.get(key, _UNKNOWN)
        if target is _UNKNOWN:
            target = _target(path, proxy_uri, self.proxy.reverse_target)
            if len(self._names) >= MAX_NAMES:
                self._names.clear()
            self._names[key] = target
        if target is None:
            return None
        resource_id = target[0]
        entry = self.proxy.cache.in_memory(resource_id)
        if entry is None:
            return None
        now = self.proxy.now()
        if not now < entry.fresh_until or now > entry.exp:
            return None  # stale or expired: a revalidation or a refusal, aiocoap's
        max_age = int(max(0.0, min(entry.fresh_until - now, entry.exp - now)))
        encoded = self._encoded.get(resource_id)
        if encoded is None or encoded.entry is not entry or encoded.max_age != max_age:
            if entry.size > UNSOLICITED_LIMIT:
                return None  # block-wise: aiocoap's
            if encoded is None and len(self._encoded) >= self.proxy.limits.memory_entries:
                self._encoded.clear()
            encoded = self._encoded[resource_id] = _Encoded(entry, max_age)
        valid = entry.etag in etags
        if observe:
            observer = Observer(
                holder=self.observe.new_holder(),
                host=host,
                token=data[4 : 4 + tkl],
                resource_id=resource_id,
                upstream=target[1],
                etags=tuple(etags),
                mid=data[2] << 8 | data[3],
                address=address,
                pktinfo=pktinfo,
                con=mtype == CON,
            )
            if self.observe.register(observer, entry):
                stats = self.proxy.stats
                stats.hits += 1
                stats.fast_hits += 1
                return self.observe.first(observer, entry, now)
            # declined by a limit: the GET answered without Observe, as the slow path does
        if mtype == CON:  # piggybacked on the ACK, the request's message ID
            header = bytes((0x60 | tkl, _VALID if valid else _CONTENT)) + data[2 : 4 + tkl]
        else:  # NON, a message ID of aiocoap's sequence
            mid = self.hook.next_message_id()
            header = bytes((0x50 | tkl, _VALID if valid else _CONTENT, mid >> 8, mid & 0xFF))
            header += data[4 : 4 + tkl]
        stats = self.proxy.stats
        stats.hits += 1
        stats.fast_hits += 1
        return header + (encoded.valid if valid else encoded.content)


def _target(
    path: list[bytes], proxy_uri: bytes | None, reverse: Callable[[str], str | None]
) -> tuple[str, str | None] | None:
    """(resource id, upstream URI or None) of a request as the site reads it (its ``target``),
    or None (aiocoap's)."""
    try:
        if proxy_uri is not None:
            resource_id, upstream = proxied(proxy_uri.decode("utf-8"))
            return resource_id, upstream
        if not path or tuple(path) == _STATS:
            return None
        resource_id = "/".join(segment.decode("utf-8") for segment in path)
    except (UnicodeDecodeError, BadTarget):
        return None
    return (resource_id, reverse(resource_id)) if names.is_resource_id(resource_id) else None
