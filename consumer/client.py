"""The consumer library: fetch protected objects over CoAP, check them, open them.

::

    async with Consumer("reader-1.bundle", "state/") as consumer:
        reading = await consumer.get("coap://sensor.local/sensor-1/temperature")
        async for reading in consumer.observe("coap://proxy.local/sensor-1/temperature"):
            ...

A producer serves resource ``<producer>/<path>`` at CoAP path ``/<producer>/<path>``, so the
resource an object must be of is the URI's path (``resource=`` overrides it, for a reverse proxy
with another prefix). With ``proxy=`` the request goes to that forward proxy with Proxy-Uri set to
the URI.

Every object received goes through the same pipeline, failing closed at the first problem:

1. the CoAP answer must be 2.05 with content format 18, and no larger than the size limit: a
   block-wise (Block2) answer is assembled here, not by aiocoap, and no block past the limit is
   ever asked for; the object is decoded strictly (size limit, CBOR, COSE structure) and must
   be of the expected resource;
2. the signer's certificate, by kid (cache, else the AS), checked against the bundle's CA, naming
   the object's producer, who owns the resource; then the signature and the expiry
   (:func:`oscar.verify`);
3. revocation: the signer's certificate must not be on the CA's current CRL (cache, else the AS).
   It is checked after the signature, so that nothing but the certificate is ever asked of the AS
   because of an object whose signature did not verify;
4. freshness: older than the newest accepted for the resource is a rollback or replay;
5. the access secret of (resource, epoch) (cache, else the AS), decryption
   (:func:`oscar.open_verified`), and only then the new freshness state is recorded on disk.

An object equal in (epoch, seq) to the newest accepted is the same object again (a producer seals
a value once and serves it to everyone): :meth:`Consumer.get` returns it again, and so does the
first answer of :meth:`Consumer.observe`; later notifications equal to it are skipped.

An object that passes steps 1-3 but is *older* than the newest accepted is a stale copy
(:class:`StaleCopy`: a proxy's cache within its Max-Age, after this consumer read a newer object
elsewhere; or a replay). It is never accepted. :meth:`Consumer.get` (and the first answer of an
observation) then gives the newest reading this consumer holds — the object kept when it was
accepted (:meth:`ConsumerStore.held`), put through steps 2, 3 and 5 again now, so never bytes
that are expired, revoked or unverified — and tells ``on_stale``; when that object is no longer
valid, :class:`StaleCopy` is raised. Only an object that claims to be newer and fails a check is
a rejection.

What this module does not do: keep state on disk (:mod:`consumer.store`), decide whom to trust
(:mod:`oscar_io.trust`), translate aiocoap's failures (:mod:`oscar_io.coaperrors`), assemble
block-wise answers (:mod:`consumer.coap`), or speak DTLS to producers (``coap://`` only;
objects are protected end to end; only an OSCAR proxy may be reached over DTLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncGenerator, Callable
from typing import Any, NamedTuple

from oscar import names
from oscar.errors import InvalidObject
from oscar.keys import KeyCache
from oscar.objects import (
    CONTENT_FORMAT_COSE_SIGN1,
    DEFAULT_MAX_OBJECT_SIZE,
    Reading,
    open_verified,
)
from oscar_io import dtls_client
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from oscar_io.coaperrors import TimedOut, TransportError, error_answer, translate
from oscar_io.errors import AccessDenied, AsError, AsUnavailable, BundleError
from oscar_io.trust import Trust

from .coap import Exchange, assemble, cache_fresh_in, cancel
from .errors import StaleCopy
from .store import DEFAULT_MAX_SECRETS, ConsumerStore

__all__ = ["DEFAULT_TIMEOUT", "Consumer", "Target", "parse_target"]

log = logging.getLogger("oscar.consumer")

#: Seconds to wait for a CoAP or AS response.
DEFAULT_TIMEOUT = 10.0

#: Called with each rejected notification of an observation (the observation goes on).
RejectHandler = Callable[[InvalidObject], None]
#: Called when a stale copy was served (see :class:`StaleCopy`), with whether the newest reading
#: held is given instead.
StaleHandler = Callable[[StaleCopy, bool], None]


class Target(NamedTuple):
    """Where to send a request and which resource the answer must be of."""

    uri: str
    resource_id: str
    proxy: str | None
    #: The device id of an OSCAR proxy reached over DTLS (``coaps://``) with our link PSK.
    proxy_id: str | None = None

    @property
    def peer(self) -> str:
        """The host the request goes to, for messages."""
        return self.proxy or urllib.parse.urlsplit(self.uri)._replace(path="", query="").geturl()


def _check_coap_uri(uri: str, what: str, scheme: str = "coap") -> urllib.parse.SplitResult:
    if not isinstance(uri, str):
        raise TypeError(f"the {what} must be a string")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != scheme:
        raise ValueError(f"the {what} must be a {scheme}:// URI")
    try:
        parts.port  # noqa: B018 (raises ValueError for a malformed port)
    except ValueError:
        raise ValueError(f"the {what} has a malformed port") from None
    if not parts.hostname or parts.username is not None or parts.fragment:
        raise ValueError(f"the {what} must name a host, with no user name or fragment")
    return parts


def parse_target(uri: str, *, resource: str | None = None, proxy: str | None = None) -> Target:
    """Check a request URI (and proxy URI); the resource is ``resource`` or the URI's path.

    ``proxy`` is ``coap://HOST[:PORT]``, or ``PROXY_ID=coaps://HOST[:PORT]`` for an OSCAR proxy
    reached over DTLS (``PROXY_ID`` its device id; the link PSK comes from the AS).
    Raises ``ValueError`` saying what is wrong.
    """
    parts = _check_coap_uri(uri, "URI")
    if resource is None:
        try:
            resource = urllib.parse.unquote(parts.path.removeprefix("/"), errors="strict")
        except UnicodeDecodeError:
            resource = ""
        if not names.is_resource_id(resource):
            raise ValueError(
                "the URI's path is not a resource id '/<producer id>/<path>' (use --resource)"
            )
    else:
        names.require_resource_id(resource)
    proxy_id = None
    if proxy is not None:
        name, sep, rest = proxy.partition("=")
        if sep and "://" not in name:
            if not names.is_device_id(name):
                raise ValueError("PROXY_ID=coaps://HOST[:PORT]: PROXY_ID is the proxy's device id")
            proxy_id, proxy = name, rest
            proxy_parts = _check_coap_uri(proxy, "proxy URI", "coaps")
        else:
            proxy_parts = _check_coap_uri(proxy, "proxy URI")
        if proxy_parts.path not in ("", "/") or proxy_parts.query:
            raise ValueError("the proxy URI is coap://HOST[:PORT], with no path")
        proxy = proxy.rstrip("/")
    return Target(uri, resource, proxy, proxy_id)


class Consumer:
    """A consumer device: fetches, verifies and opens protected objects (see the module doc).

    ``bundle`` is the consumer's credentials bundle or its path. ``state_dir`` holds the encrypted
    caches and the freshness state (:mod:`consumer.store`); with None they live in memory only, so
    a new ``Consumer`` would accept again an object older than one an earlier one accepted.
    ``timeout`` bounds each request to a producer, proxy or the AS, in seconds.

    Raises :class:`~oscar_io.asclient.BundleError` for an unusable bundle and
    :class:`~oscar_io.asclient.StateError` for a corrupt state file (nothing is changed then).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        state_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_object_size: int = DEFAULT_MAX_OBJECT_SIZE,
        max_secrets: int = DEFAULT_MAX_SECRETS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle)
        if bundle.role != "consumer":
            raise BundleError(f"the bundle is a {bundle.role}'s, not a consumer's")
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        self.bundle = bundle
        self.timeout = timeout
        self.max_object_size = max_object_size
        self._clock = clock
        self.store = ConsumerStore(state_dir, bundle.state_key("consumer"), max_secrets=max_secrets)
        self.trust = Trust(bundle, self.store.trust, self._as)
        self._keys = KeyCache(self.store.secret)
        self._coap: Any = None
        self._dtls: dict[str, Any] = {}
        self._dtls_connections: dict[str, Any] = {}
        self._as_client: AsClient | None = None
        self._as_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Consumer({self.bundle.device_id!r}, {self.store!r})"

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Make the CoAP client context (the AS client is made when first needed)."""
        if self._coap is None:
            from aiocoap import Context

            self._coap = await Context.create_client_context(transports=["udp6"])

    async def _context(self, target: Target) -> Any:
        """The plain CoAP context, or for a DTLS proxy its own context keyed with our link PSK.

        One context per DTLS proxy: aiocoap picks client credentials by the request's URI, which
        for a proxied request is the target's, so the context itself stands for the proxy."""
        if target.proxy_id is None:
            return self._coap
        peer = str(target.proxy)  # parse_target sets both or neither
        context = self._dtls.get(peer)
        if context is None:
            from aiocoap import Context

            client = await self._as()
            try:
                psk = await client.link(target.proxy_id)
            except AccessDenied:
                raise
            except AsError as exc:
                raise TransportError(f"cannot get the link key for the proxy: {exc}") from None
            dtls_client.apply()  # a session the proxy closed and tinydtls renews: no traceback
            context = await Context.create_client_context(transports=["tinydtls"])
            context.client_credentials.load_from_dict(
                {"*": {"dtls": {"psk": psk, "client-identity": self.bundle.device_id.encode()}}}
            )
            self._dtls[peer] = context
        return context

    async def close(self) -> None:
        self._dtls_connections.clear()
        dtls, self._dtls = self._dtls, {}
        for context in dtls.values():
            await context.shutdown()
        coap, self._coap = self._coap, None
        as_client, self._as_client = self._as_client, None
        if as_client is not None:
            await as_client.close()
        if coap is not None:
            await coap.shutdown()

    async def _as(self) -> AsClient:
        async with self._as_lock:
            if self._as_client is None:
                client = AsClient(self.bundle, timeout=self.timeout)
                await client.start()
                self._as_client = client
            return self._as_client

    # --- the pipeline -----------------------------------------------------------------------------

    async def open_object(self, data: bytes, resource_id: str) -> Reading:
        """Check and open one object that must be of ``resource_id`` (see the module docstring),
        however it came (a file, a multicast group). An object equal in (epoch, seq) to the
        newest accepted is returned again.

        Raises :class:`InvalidObject` if the object is rejected, :class:`AccessDenied` if the AS
        refuses the secret, :class:`TransportError` if the AS is needed and cannot be reached.
        """
        reading = await self._open(data, resource_id, skip_same=False)
        if reading is None:  # pragma: no cover - only skip_same=True skips
            raise InvalidObject("object skipped")
        return reading

    async def _open(self, data: bytes, resource_id: str, *, skip_same: bool) -> Reading | None:
        """:meth:`open_object`; with ``skip_same`` an object equal to the newest accepted gives
        None."""
        now = int(self._clock())
        obj, _ = await self.trust.check(data, resource_id, now, max_size=self.max_object_size)
        m = obj.metadata

        freshness = self.store.freshness
        version = (m.epoch, m.seq)
        newest = freshness.newest(resource_id)
        is_same = newest == version
        if is_same and skip_same:
            return None
        if newest is not None and version < newest:
            raise StaleCopy(resource_id, version, newest)  # valid, but not news: never accepted
        if not is_same:
            freshness.check(resource_id, m.epoch, m.seq)
        if self.store.secret(resource_id, m.epoch) is None:
            await self._fetch_secret(resource_id, m.epoch)
        reading = open_verified(obj, secrets=self._keys)
        if not is_same:
            # Another task may have accepted a newer object while we waited for the AS.
            self.store.freshness.accept(resource_id, m.epoch, m.seq)
            self.store.save_freshness(resource_id)
        self.store.put_held(resource_id, m.epoch, m.seq, data)  # writes only if news to it
        return reading

    async def _held_reading(self, stale: StaleCopy) -> Reading:
        """The newest reading held of ``stale``'s resource, checked again now (certificate,
        revocation, signature, expiry, decryption); ``stale`` itself when there is none that is
        still valid."""
        held = self.store.held(stale.resource_id)
        if held is None or held.version != self.store.freshness.newest(stale.resource_id):
            raise stale
        try:
            return await self.open_object(held.data, stale.resource_id)
        except InvalidObject as exc:
            log.info("%s: the object held is not valid now: %s", stale.resource_id, exc.reason)
            raise stale from None

    async def _stale_answer(
        self, stale: StaleCopy, response: Any, target: Target, on_stale: StaleHandler | None
    ) -> Reading:
        """The newest reading held instead of a stale copy (see the module doc), or
        :class:`StaleCopy` saying who served what and when it will be fresh (not logged: the
        caller reports it, once)."""
        stale.peer = target.peer
        stale.fresh_in = cache_fresh_in(response)
        reading = await self._held_reading(stale)
        if on_stale is not None:
            on_stale(stale, True)
        else:
            log.warning("%s; the newest reading held is given instead", stale.describe())
        return reading

    async def _fetch_secret(self, resource_id: str, epoch: int) -> None:
        client = await self._as()
        try:
            grant = await client.secret(resource_id, epoch)
        except AccessDenied:
            raise
        except AsUnavailable as exc:
            raise TransportError(f"cannot get the access secret: {exc}") from None
        except AsError as exc:
            if exc.code in ("4.04", "4.10"):
                raise InvalidObject("the AS has no access secret for this epoch") from None
            raise TransportError(f"cannot get the access secret: {exc}") from None
        self.store.put_secret(resource_id, epoch, grant.secret)
        log.info("access secret of %s epoch %d from the AS", resource_id, epoch)

    # --- CoAP -------------------------------------------------------------------------------------

    def _message(self, target: Target, observe: bool) -> Any:
        from aiocoap import GET, Message
        from aiocoap.message import UndecidedRemote

        if target.proxy is None:
            message = Message(code=GET, uri=target.uri)
        else:
            message = Message(code=GET)
            message.opt.proxy_uri = target.uri
            message.remote = UndecidedRemote.from_pathless_uri(target.proxy)
        if observe:
            message.opt.observe = 0
        return message

    async def _response(self, awaitable: Any, target: Target, *, wait: bool = True) -> Any:
        """Await an aiocoap response (for at most ``timeout`` seconds, unless ``wait`` is false),
        translating every failure to :class:`TransportError`."""
        try:
            return await asyncio.wait_for(awaitable, self.timeout if wait else None)
        except TimeoutError:
            raise TimedOut(f"no answer from {target.peer} within {self.timeout:g} s") from None
        except Exception as exc:
            failure = translate(exc, target.peer)
            if failure is None:
                raise
            raise failure from None

    def _payload(self, response: Any, target: Target) -> bytes:
        code = response.code
        if not code.is_successful():
            raise error_answer(code, f"{target.peer} answered")
        if code.dotted != "2.05":
            raise TransportError(f"{target.peer} answered {code.dotted}, not 2.05 Content")
        if response.opt.content_format != CONTENT_FORMAT_COSE_SIGN1:
            raise InvalidObject("the answer is not a protected object (content format)")
        payload: bytes = response.payload
        return payload

    async def get(
        self,
        uri: str,
        *,
        resource: str | None = None,
        proxy: str | None = None,
        on_stale: StaleHandler | None = None,
    ) -> Reading:
        """Fetch, check and open the current representation of a resource.

        A valid object older than the newest accepted (a stale copy) gives the newest reading
        held, checked again, and calls ``on_stale`` (without one, a warning is logged).

        Raises ``ValueError`` for a malformed URI, :class:`InvalidObject` when the object is
        rejected, :class:`StaleCopy` (an :class:`InvalidObject`) for a stale copy when no newer
        reading held is still valid, :class:`AccessDenied` and :class:`TransportError`.
        """
        target = parse_target(uri, resource=resource, proxy=proxy)
        await self.start()
        exchange = await self._request(target, observe=False)
        response = await self._assembled(exchange, exchange.response, target)
        try:
            return await self.open_object(self._payload(response, target), target.resource_id)
        except StaleCopy as stale:
            try:
                return await self._stale_answer(stale, response, target, on_stale)
            except StaleCopy:
                log.info("%s", stale.describe())  # raised to the caller: a trace, not a warning
                raise

    async def _request(self, target: Target, *, observe: bool) -> Exchange:
        """Send a request, answering one Echo challenge (RFC 9175: a proxy that must not
        amplify asks us to prove our address first). The first response is the first block
        only: :meth:`_assembled` fetches the rest, within the size limit."""
        context = await self._context(target)
        message = self._message(target, observe)
        request = context.request(message, handle_blockwise=False)
        try:
            response = await self._response(request.response, target)
            if response.code.dotted == "4.01" and response.opt.echo is not None:
                cancel(request)
                message = self._message(target, observe)
                message.opt.echo = response.opt.echo
                request = context.request(message, handle_blockwise=False)
                response = await self._response(request.response, target)
        except BaseException:
            cancel(request)
            raise
        if target.proxy_id is not None:  # aiocoap keeps a DTLS session only while referred to
            self._dtls_connections[str(target.proxy)] = response.remote
        return Exchange(context, message, request, response)

    async def _assembled(self, exchange: Exchange, first: Any, target: Target) -> Any:
        """The whole response whose first block is ``first`` (:func:`consumer.coap.assemble`,
        within :attr:`max_object_size`)."""

        async def respond(awaitable: Any) -> Any:
            return await self._response(awaitable, target)

        return await assemble(exchange, first, target.peer, self.max_object_size, respond)

    async def observe(
        self,
        uri: str,
        *,
        resource: str | None = None,
        proxy: str | None = None,
        on_reject: RejectHandler | None = None,
        on_stale: StaleHandler | None = None,
    ) -> AsyncGenerator[Reading, None]:
        """Observe a resource: the current reading, then one per new object.

        A rejected notification is logged, passed to ``on_reject`` and skipped: the observation
        goes on (someone on the path must not be able to end it with one packet). A notification
        equal to the newest accepted object is skipped silently. A stale copy (older than the
        newest accepted, otherwise valid) is passed to ``on_stale`` (else logged) and skipped;
        as the first answer it gives the newest reading held, as :meth:`get` does. ``timeout``
        bounds the wait for the first answer only. Ends with :class:`TransportError` when the
        server ends the observation or cannot be reached; raises :class:`AccessDenied` as
        :meth:`get` does.
        """
        target = parse_target(uri, resource=resource, proxy=proxy)
        await self.start()
        exchange = await self._request(target, observe=True)
        first = exchange.response
        observation = exchange.request.observation
        try:
            reading = await self._notification(exchange, first, target, False, on_reject, on_stale)
            if reading is not None:
                yield reading
            if first.opt.observe is None:
                raise TransportError(f"{target.peer} did not accept the observation")
            # Iterate only now: an iterator made earlier would hold aiocoap's end-of-observation
            # error for a request that failed, and nobody would ever retrieve it.
            notifications = observation.__aiter__()
            ended: Any = None  # the error code the server ended the observation with
            while True:
                try:
                    # No time limit between notifications; once the server has said its last
                    # word (an error code), the end of the observation follows at once.
                    notification = await self._response(
                        notifications.__anext__(), target, wait=ended is not None
                    )
                except StopAsyncIteration:
                    what = f"{target.peer} ended the observation"
                    if ended is None:
                        raise TransportError(what) from None
                    raise error_answer(ended, what + " with") from None
                if not notification.code.is_successful():
                    ended = notification.code
                    continue
                reading = await self._notification(
                    exchange, notification, target, True, on_reject, on_stale
                )
                if reading is not None:
                    yield reading
        finally:
            if not observation.cancelled:
                observation.cancel()

    async def _notification(
        self,
        exchange: Exchange,
        response: Any,
        target: Target,
        skip_same: bool,
        on_reject: RejectHandler | None,
        on_stale: StaleHandler | None = None,
    ) -> Reading | None:
        try:
            response = await self._assembled(exchange, response, target)
        except TransportError as exc:  # one broken transfer does not end the observation
            log.warning("%s: notification dropped: %s", target.resource_id, exc)
            return None
        try:
            payload = self._payload(response, target)
            try:
                return await self._open(payload, target.resource_id, skip_same=skip_same)
            except StaleCopy as stale:
                if not skip_same:  # the first answer: the newest reading held, if still valid
                    with contextlib.suppress(StaleCopy):
                        return await self._stale_answer(stale, response, target, on_stale)
                    # else reported once, below
                stale.peer, stale.fresh_in = target.peer, cache_fresh_in(response)
                if on_stale is not None:
                    on_stale(stale, False)
                else:
                    log.warning("%s", stale.describe())
                return None
        except InvalidObject as exc:
            # The handler reports it; without one, the log is the only trace.
            level = logging.INFO if on_reject is not None else logging.WARNING
            log.log(level, "%s: notification rejected: %s", target.resource_id, exc.reason)
            if on_reject is not None:
                on_reject(exc)
            return None
