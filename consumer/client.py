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

Every answer must be 2.05 with content format 18, and no larger than the size limit: a block-wise
(Block2) answer is assembled here, not by aiocoap, and no block past the limit is ever asked for.
Its object then goes through the checks of :class:`~consumer.pipeline.Pipeline` (signer,
signature, revocation, freshness, secret, decryption), failing closed at the first problem.

:meth:`Consumer.get` returns an object equal to the newest accepted again, and so does the first
answer of :meth:`Consumer.observe`; later notifications equal to it are skipped. A stale copy
(:class:`StaleCopy`: valid, but older than the newest accepted) is never accepted: :meth:`get`
(and the first answer of an observation) gives the newest reading held instead, checked again
now, and tells ``on_stale``; when that one is no longer valid, :class:`StaleCopy` is raised.

What this module does not do: check objects (:mod:`consumer.pipeline`), parse targets
(:mod:`consumer.target`), keep state on disk (:mod:`consumer.store`), decide whom to trust
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
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from oscar.errors import InvalidObject
from oscar.objects import CONTENT_FORMAT_COSE_SIGN1, ObjectMetadata, Reading
from oscar.partsopening import PartsReading
from oscar_io import dtls_client
from oscar_io.asclient import AsClient
from oscar_io.blockwise import DEFAULT_WINDOW, check_window
from oscar_io.bundle import Bundle
from oscar_io.coaperrors import TimedOut, TransportError, error_answer, translate
from oscar_io.errors import AccessDenied, AsError, BundleError
from oscar_io.multicast import ANY_INTERFACE
from oscar_io.trust import Trust

from .coap import Exchange, assemble, cache_fresh_in, cancel
from .errors import StaleCopy
from .parts import open_parts
from .pipeline import Pipeline
from .spool import Assembly, Output
from .store import DEFAULT_MAX_SECRETS, ConsumerStore
from .target import Target, parse_target
from .transport import DEFAULT_TCP_THRESHOLD, TcpRoute

if TYPE_CHECKING:
    from .groups import GroupListener

__all__ = ["DEFAULT_MAX_OBJECT_SIZE", "DEFAULT_TIMEOUT", "Consumer", "Target", "parse_target"]

log = logging.getLogger("oscar.consumer")

#: Seconds to wait for a CoAP or AS response.
DEFAULT_TIMEOUT = 10.0
#: The largest object a consumer takes by default: a 64 MiB representation (a producer's largest)
#: plus its headers and tag (a large one is read as it arrives, in bounded memory:
#: :mod:`consumer.spool`).
DEFAULT_MAX_OBJECT_SIZE = (64 << 20) + 4096

#: Called with each rejected notification of an observation (the observation goes on).
RejectHandler = Callable[[InvalidObject], None]
#: Called when a stale copy was served (see :class:`StaleCopy`), with whether the newest reading
#: held is given instead.
StaleHandler = Callable[[StaleCopy, bool], None]


class Consumer:
    """A consumer device: fetches, verifies and opens protected objects (see the module doc).

    ``bundle`` is the consumer's credentials bundle or its path. ``state_dir`` holds the encrypted
    caches and the freshness state (:mod:`consumer.store`); with None they live in memory only, so
    a new ``Consumer`` would accept again an object older than one an earlier one accepted.
    ``timeout`` bounds each request to a producer, proxy or the AS, in seconds.

    Raises :class:`~oscar_io.errors.BundleError` for an unusable bundle and
    :class:`~oscar_io.errors.StateError` for a corrupt state file (nothing is changed then).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        state_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_object_size: int = DEFAULT_MAX_OBJECT_SIZE,
        max_secrets: int = DEFAULT_MAX_SECRETS,
        block_window: int = DEFAULT_WINDOW,
        tcp_threshold: int | None = DEFAULT_TCP_THRESHOLD,
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
        #: Blocks of a large object asked for at once (:mod:`oscar_io.blockwise`; 1 to 64).
        self.block_window = check_window(block_window)
        #: Objects announced this large or larger come over CoAP over TCP (None: never), falling
        #: back to UDP (:mod:`consumer.transport`).
        self.tcp = TcpRoute(tcp_threshold, timeout=timeout, max_size=max_object_size)
        self.store = ConsumerStore(state_dir, bundle.state_key("consumer"), max_secrets=max_secrets)
        self.trust = Trust(bundle, self.store.trust, self._as)
        self.pipeline = Pipeline(
            self.store, self.trust, self._as, clock=clock, max_object_size=max_object_size
        )
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
        await self.pipeline.close()  # the readings accepted are saved before anything stops
        await self.tcp.close()
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
        """Check and open one object that must be of ``resource_id`` (:mod:`consumer.pipeline`),
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
        None (:meth:`Pipeline.open`)."""
        return await self.pipeline.open(data, resource_id, skip_same=skip_same)

    async def _stale_answer(
        self, stale: StaleCopy, response: Any, target: Target, on_stale: StaleHandler | None
    ) -> Reading:
        """The newest reading held instead of a stale copy (see the module doc), or
        :class:`StaleCopy` saying who served what and when it will be fresh (not logged: the
        caller reports it, once)."""
        stale.peer = target.peer
        stale.fresh_in = cache_fresh_in(response)
        reading = await self.pipeline.held_reading(stale)
        if on_stale is not None:
            on_stale(stale, True)
        else:
            log.warning("%s; the newest reading held is given instead", stale.describe())
        return reading

    # --- multicast groups (consumer.groups) -------------------------------------------------------

    def join_group(
        self, group: str, resources: Sequence[str], *, interface: str = ANY_INTERFACE
    ) -> GroupListener:
        """The readings of ``resources`` sent to ``group`` (:class:`~consumer.groups.GroupListener`:
        ``async with`` it, then ``async for resource_id, reading in it``), each checked as any."""
        from .groups import GroupListener

        return GroupListener(self, group, resources, interface=interface)

    async def group_get(
        self, group: str, path: str, *, timeout: float = 2.0, interface: str = ANY_INTERFACE
    ) -> dict[str, Reading]:
        """One GET for ``path`` to ``group``: each producer's checked reading, by resource id
        (:func:`consumer.groups.group_get`)."""
        from .groups import group_get

        return await group_get(self, group, path, timeout=timeout, interface=interface)

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
            # asyncio.timeout, not wait_for: 3.11's wait_for returns the answer when it arrives
            # as the caller is cancelled, swallowing the cancellation (a large transfer has
            # answers arriving all the time: a cancelled get would run on to the end).
            async with asyncio.timeout(self.timeout if wait else None):
                return await awaitable
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
        return await self._get(target, on_stale, None)

    async def get_parts(
        self, uri: str, *, resource: str | None = None, proxy: str | None = None
    ) -> PartsReading:
        """Fetch a multi-part object (issue 19) and open the parts this consumer is granted
        (:mod:`consumer.parts`); ``not_granted`` names the others. Raises what :meth:`get`
        raises (a stale copy is a :class:`StaleCopy`: no reading of parts is held)."""
        target = parse_target(uri, resource=resource, proxy=proxy)
        await self.start()
        exchange = await self._request(target, observe=False)
        assembly = self._assembly()
        try:
            response = await self._assembled(exchange, exchange.response, target, assembly.feed)
            self._payload(response, target)  # the code and content format
            if assembly.spilled:
                raise InvalidObject("multi-part objects over 1 MiB are not read yet")
            return await open_parts(self.pipeline, assembly.data, target.resource_id)
        finally:
            assembly.close()

    async def get_file(
        self,
        uri: str,
        path: str | os.PathLike[str],
        *,
        resource: str | None = None,
        proxy: str | None = None,
        on_stale: StaleHandler | None = None,
    ) -> ObjectMetadata:
        """:meth:`get` with the plaintext written to the file ``path`` (mode 0600), in bounded
        memory however large the object (:mod:`consumer.spool`): the file appears, whole, only
        once every check has passed, the signature and the AEAD tag included; a refused object
        leaves it as it was. Returns the reading's metadata; raises what :meth:`get` raises, and
        OSError when the file cannot be written."""
        target = parse_target(uri, resource=resource, proxy=proxy)
        await self.start()
        output = Output(path)
        try:
            metadata = (await self._get(target, on_stale, output)).metadata
            output.commit()
        finally:
            output.discard()
        return metadata

    async def _get(
        self, target: Target, on_stale: StaleHandler | None, output: Output | None
    ) -> Reading:
        """The reading of the target's current object, its plaintext also written to ``output``
        if given (see :meth:`_opened`)."""
        exchange = await self._request(target, observe=False)
        response = exchange.response
        assembly = self._assembly()
        try:
            response = await self._assembled(exchange, response, target, assembly.feed)
            self._payload(response, target)  # the code and content format
            try:
                reading = await self._opened(assembly, target, skip_same=False, output=output)
            except StaleCopy as stale:
                try:
                    reading = await self._stale_answer(stale, response, target, on_stale)
                except StaleCopy:
                    log.info("%s", stale.describe())  # raised to the caller: a trace
                    raise
                if output is not None:
                    output.write(reading.plaintext)
        finally:
            assembly.close()
        if reading is None:  # pragma: no cover - only skip_same=True skips
            raise InvalidObject("object skipped")
        return reading

    def _assembly(self) -> Assembly:
        return Assembly(max_size=self.max_object_size, directory=self.store.directory)

    async def _opened(
        self, assembly: Assembly, target: Target, *, skip_same: bool, output: Output | None = None
    ) -> Reading | None:
        """:meth:`Pipeline.open_assembled` (its plaintext also into ``output`` if given)."""
        write = None if output is None else output.write
        return await self.pipeline.open_assembled(
            assembly, target.resource_id, skip_same=skip_same, write=write
        )

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

    async def _assembled(
        self,
        exchange: Exchange,
        first: Any,
        target: Target,
        sink: Callable[[bytes], object] | None = None,
    ) -> Any:
        """The whole response whose first block is ``first``: over TCP for a large object
        (:mod:`consumer.transport`), else :func:`consumer.coap.assemble`, within
        :attr:`max_object_size`; its payload handed to ``sink`` as it arrives if given."""
        whole = await self.tcp.over_tcp(first, target, sink)
        if whole is not None:
            return whole

        async def respond(awaitable: Any) -> Any:
            return await self._response(awaitable, target)

        return await assemble(
            exchange,
            first,
            target.peer,
            self.max_object_size,
            respond,
            window=self.block_window,
            sink=sink,
        )

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
        assembly = self._assembly()
        try:
            response = await self._assembled(exchange, response, target, assembly.feed)
        except TransportError as exc:  # one broken transfer does not end the observation
            assembly.close()
            log.warning("%s: notification dropped: %s", target.resource_id, exc)
            return None
        except BaseException:
            assembly.close()
            raise
        try:
            self._payload(response, target)
            try:
                return await self._opened(assembly, target, skip_same=skip_same)
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
        finally:
            assembly.close()
