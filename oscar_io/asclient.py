"""The device side of the AS protocol: :class:`AsClient`, CoAP over DTLS-PSK to the AS
(``coaps://``), CBOR in and out, one method per endpoint (docs/PROTOCOL.md, "AS endpoints").
Refusals raise :class:`~oscar_io.errors.AccessDenied` (4.01/4.03), an unreachable AS
:class:`~oscar_io.errors.AsUnavailable`, anything else :class:`~oscar_io.errors.AsError`.

A bundle that lists several AS instances (``as_uris``) makes the client fail over between them:
which one to ask is :mod:`oscar_io.asfailover`'s bookkeeping; the timeouts, one DTLS context per
instance and the retries are here (docs/PROTOCOL.md, "The credentials bundle and failover").

Importing this module does not load the DTLS transport: :meth:`AsClient.start` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from cryptography import x509

from oscar import cbor, names
from oscar.keys import AccessSecret

from .asfailover import COME_BACK, AsInstance, Failover
from .aswire import CBOR_FORMAT, KeyState, Registration, SecretGrant
from .aswire import byte_string as _bytes
from .aswire import decode_reply as _decode
from .aswire import reply_field as _field
from .aswire import text as _text
from .aswire import uint as _uint
from .bundle import LINK_PSK_LENGTH, Bundle
from .coaperrors import translate
from .coapping import ping_session
from .errors import AsError, AsUnavailable

__all__ = ["AsClient"]

log = logging.getLogger("oscar.asclient")

#: The answers that say an AS is busy (its Max-Age says for how long).
BUSY_CODES = ("5.03", "4.29")


class AsClient:
    """Requests to the AS over DTLS-PSK with the bundle's identity.

    ``async with AsClient(bundle) as client: ...`` or :meth:`start` / :meth:`close`.

    With one AS URI in the bundle, each request gives up after ``timeout`` seconds with
    :class:`AsUnavailable`. With several (``as_uris``), the client fails over
    (:mod:`oscar_io.asfailover`): each AS gets ``attempt_timeout`` seconds (default
    :data:`ATTEMPT_TIMEOUT`, at most ``timeout``) before the next is asked, each at most once per
    call, so a call takes at most ``len(as_uris) * attempt_timeout`` seconds (one more attempt
    when the last AS asked had a session that may have died); it comes back to the preferred AS
    ``come_back`` seconds after leaving it. An AS that answered 5.03 or 4.29 is not asked again
    before its Max-Age has passed; when no AS may be asked, :class:`AsUnavailable` carries
    ``retry_after``.
    """

    #: Seconds each AS gets to answer when the bundle lists several: a halted host gives no
    #: ICMP error, only silence, and the next AS must be asked well within the 10 s in which a
    #: device is to continue after losing one (two CoAP retransmissions fit).
    ATTEMPT_TIMEOUT = 4.0

    def __init__(
        self,
        bundle: Bundle,
        *,
        timeout: float = 10.0,
        attempt_timeout: float | None = None,
        come_back: float = COME_BACK,
    ) -> None:
        self.bundle = bundle
        self.timeout = timeout
        self.failover = Failover(bundle.as_uris, come_back=come_back)
        if not self.failover.several:
            self.attempt_timeout = timeout
        else:
            self.attempt_timeout = min(timeout, attempt_timeout or self.ATTEMPT_TIMEOUT)
        #: Counts the DTLS client contexts made; see :meth:`reset`.
        self.generation = 0
        self._ping: tuple[Any, asyncio.Future[bool | None]] | None = None

    def __repr__(self) -> str:
        return f"AsClient({self.bundle.device_id!r} -> {self.as_uri})"

    @property
    def as_uri(self) -> str:
        """The AS requests go to now."""
        return self.failover.instances[self.failover.current].uri

    @property
    def _connection(self) -> Any:
        """The DTLS connection of the current AS's last answer (None: no session yet)."""
        return self.failover.instances[self.failover.current].connection

    async def __aenter__(self) -> AsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Load the DTLS transport and make the context for the current AS."""
        await self._context(self.failover.instances[self.failover.current])

    async def _context(self, instance: AsInstance) -> Any:
        """The client context for ``instance``, made (with its credentials) if there is none,
        or anew if its last attempt failed and other AS are listed (its session is suspect)."""
        async with instance.lock:
            if instance.ctx is not None and instance.suspect and self.failover.several:
                await self._drop(instance)
            if instance.ctx is None:
                from aiocoap import Context  # the DTLS transport loads here, not at import

                from . import dtls_client

                dtls_client.apply()  # a session the AS closed and tinydtls renews: no traceback
                ctx = await Context.create_client_context(transports=["tinydtls"])
                ctx.client_credentials.load_from_dict(
                    {
                        f"{instance.uri}/*": {
                            "dtls": {
                                "psk": self.bundle.psk,
                                "client-identity": self.bundle.psk_identity.encode(),
                            }
                        }
                    }
                )
                instance.ctx = ctx
                instance.suspect = False
                self.generation += 1
            return instance.ctx

    @staticmethod
    async def _drop(instance: AsInstance) -> None:
        instance.connection = None
        ctx, instance.ctx = instance.ctx, None
        if ctx is not None:
            try:
                await ctx.shutdown()
            except Exception as exc:  # the context is dropped all the same; never the caller's
                log.info("closing a DTLS context to the AS failed: %s", type(exc).__name__)

    async def reset(self, generation: int) -> None:
        """Drop the contexts (and DTLS sessions) of the AS that did not answer since their
        context was made — with one AS, its context — if no context was made since
        ``generation``: after an AS restarted, the old session is dead, and only a new handshake
        gets through. Callers pass the generation they saw fail, so several of them do not throw
        away each other's fresh session."""
        if generation != self.generation:
            return
        for instance in self.failover.instances:
            if instance.suspect or not self.failover.several:
                await self._drop(instance)

    async def close(self) -> None:
        for instance in self.failover.instances:
            await self._drop(instance)

    def _message(
        self,
        uri: str,
        method: str,
        path: str,
        query: dict[str, str] | None,
        body: Any,
        observe: bool,
    ) -> Any:
        from aiocoap import Message
        from aiocoap.numbers.codes import Code

        message = Message(code=getattr(Code, method), uri=f"{uri}/{path}")
        if query:
            message.opt.uri_query = tuple(f"{k}={v}" for k, v in query.items())
        if body is not None:
            message.payload = cbor.dumps(body)
            message.opt.content_format = CBOR_FORMAT
        if observe:
            message.opt.observe = 0
        return message

    async def call(
        self, method: str, path: str, query: dict[str, str] | None = None, body: Any = None
    ) -> Any:
        """One request; returns the decoded CBOR reply of a 2.xx answer."""
        return (await self._exchange(method, path, query, body))[1]

    def busy_for(self) -> float | None:
        """Seconds until a listed AS may be asked, when every one is busy (a 5.03 or 4.29 whose
        Max-Age has not passed); None when one may be asked now."""
        return None if self.failover.order() else self.failover.retry_after()

    def _none_to_ask(self, what: str) -> AsUnavailable:
        """Every listed AS is busy: the error, without sending anything."""
        wait = self.failover.retry_after()
        code = self.failover.busy_code()
        return AsUnavailable(
            f"{what}: the AS is busy ({code}); retry in {wait:g} s", code, retry_after=wait
        )

    async def _exchange(
        self, method: str, path: str, query: dict[str, str] | None, body: Any
    ) -> tuple[str, Any]:
        """One request: (dotted 2.xx code, decoded CBOR reply), from the first AS that answers
        (see the class docstring)."""
        what = f"{method} /{path}"
        order = self.failover.order()
        if not order:
            raise self._none_to_ask(what)
        failures: list[AsUnavailable] = []
        for position, index in enumerate(order):
            last = position == len(order) - 1
            try:
                response = await self._ask(index, method, path, query, body, what, renew=last)
            except AsUnavailable as exc:  # _ask marked it failed (if its context was current)
                failures.append(exc)
                continue
            try:
                reply = _decode(response, what)
            except AsUnavailable as exc:  # 5.03 or 4.29: busy; Max-Age says how long
                self.failover.busy(index, response.opt.max_age, exc.code)
                failures.append(exc)
                continue
            except AsError:
                self.failover.answered(index)
                raise
            self.failover.answered(index)
            return response.code.dotted, reply
        failure = failures[-1]  # order is not empty: one failure per AS asked
        if len(order) > 1:  # say that each was asked, not only the last (an operator's first look)
            failure = AsUnavailable(
                f"none of the {len(order)} AS instances asked served {what} (the last: {failure})",
                failure.code,
            )
        failure.retry_after = self.busy_for()  # only when no AS may be asked now
        raise failure

    async def _ask(
        self,
        index: int,
        method: str,
        path: str,
        query: dict[str, str] | None,
        body: Any,
        what: str,
        *,
        renew: bool,
    ) -> Any:
        """One request to the AS ``index``: its response, or :class:`AsUnavailable` (the AS then
        marked failed, unless the context the request went out on was replaced meanwhile: its
        failure says nothing of the new one). Sent once more over a new handshake when its
        context was replaced meanwhile (another call found the AS silent and dropped it, which
        fails the requests in flight on it), or, with ``renew``, when it got no answer over a
        session held from before (it may have died on the AS's side: an idle sweep, a restart)."""
        instance = self.failover.instances[index]
        ctx = await self._context(instance)
        held = instance.connection is not None
        try:
            return await self._send(instance, ctx, method, path, query, body, what)
        except AsUnavailable:
            replaced = instance.ctx is not ctx
            if not replaced and not (held and renew):
                self.failover.failed(index)
                raise
            if not replaced:
                await self._drop(instance)
        ctx = await self._context(instance)
        try:
            return await self._send(instance, ctx, method, path, query, body, what)
        except AsUnavailable:
            if instance.ctx is ctx:
                self.failover.failed(index)
            raise

    async def _send(
        self,
        instance: AsInstance,
        ctx: Any,
        method: str,
        path: str,
        query: dict[str, str] | None,
        body: Any,
        what: str,
    ) -> Any:
        request = ctx.request(self._message(instance.uri, method, path, query, body, False))
        return await self._response(instance, request.response, what)

    async def _response(self, instance: AsInstance, awaitable: Any, what: str) -> Any:
        who = "the AS" if not self.failover.several else f"the AS {instance.uri}"
        try:
            response = await asyncio.wait_for(awaitable, self.attempt_timeout)
            instance.connection = response.remote
            return response
        except TimeoutError:
            raise AsUnavailable(
                f"{who} did not answer {what} within {self.attempt_timeout:g} s"
            ) from None
        except Exception as exc:  # OSError, aiocoap's NetworkError, ConRetransmitsExceeded, ...
            failure = translate(exc, "the AS")
            if failure is None:
                raise
            raise AsUnavailable(f"cannot reach {who}: {failure}") from None

    # --- one method per endpoint ---

    async def request_certificate(self, csr_der: bytes) -> bytes:
        """POST /cert: the DER certificate for our CSR."""
        reply = await self.call("POST", "cert", body={"csr": csr_der})
        der: bytes = _field(reply, "cert", bytes)
        return der

    async def certificate(self, *, kid: bytes | None = None, device_id: str | None = None) -> bytes:
        """GET /cert by key id or device id: DER. AsError with code 4.04 when there is none."""
        query = {"kid": kid.hex()} if kid is not None else {"id": str(device_id)}
        der: bytes = _field(await self.call("GET", "cert", query), "cert", bytes)
        return der

    async def revocation_list(self) -> x509.CertificateRevocationList:
        der = _field(await self.call("GET", "crl"), "crl", bytes)
        try:
            return x509.load_der_x509_crl(der)
        except ValueError:
            raise AsError("the AS sent a malformed CRL") from None

    async def register(
        self,
        path: str,
        *,
        content_format: int,
        profile: str,
        max_age: int,
        rotation_period: int,
        parts: Sequence[tuple[str, str]] = (),
    ) -> Registration:
        """POST /resources: (resource id, active epoch, whether the AS made it just now).
        Registering again with the same parameters is fine; different parameters update the
        registration. ``parts``: a multi-part resource's (name, "plain"|"encrypted") in order
        (issue 19); without it the request is as it always was."""
        body: dict[str, Any] = {
            "path": path,
            "content_format": content_format,
            "profile": profile,
            "max_age": max_age,
            "rotation_period": rotation_period,
        }
        if parts:
            body["parts"] = [[name, kind] for name, kind in parts]
        code, reply = await self._exchange("POST", "resources", None, body)
        return Registration(
            _field(reply, "resource", str), _field(reply, "epoch", int), code == "2.01"
        )

    async def secret(
        self, resource_id: str, epoch: int | None = None, *, part: str | None = None
    ) -> SecretGrant:
        """GET /secret: the access secret of (resource, epoch), the active epoch by default;
        with ``part``, that encrypted part's secret (``p=``; issue 19's multi-part objects)."""
        query = {"r": resource_id}
        if epoch is not None:
            query["e"] = str(epoch)
        if part is not None:
            query["p"] = part
        reply = await self.call("GET", "secret", query)
        if part is not None and (not isinstance(reply, dict) or reply.get("part") != part):
            raise AsError("the AS answered for another part")
        try:
            grant = SecretGrant(
                _text(reply["resource"]),
                _uint(reply["epoch"]),
                _text(reply["state"]),
                AccessSecret(_bytes(reply["secret"])),
                _text(reply["profile"]),
            )
        except (KeyError, TypeError, ValueError):
            raise AsError("malformed /secret reply from the AS") from None
        if grant.resource_id != resource_id or (epoch is not None and grant.epoch != epoch):
            raise AsError("the AS answered for another resource or epoch")
        return grant

    async def keys(self, resource_id: str) -> KeyState:
        """GET /keys: the producer's active and next epoch secrets of its resource."""
        reply = await self.call("GET", "keys", {"r": resource_id})
        return self._key_state(reply, resource_id)

    @staticmethod
    def _key_state(reply: Any, resource_id: str) -> KeyState:
        state = KeyState.from_cbor(reply)
        if state.resource_id != resource_id:
            raise AsError("the AS answered for another resource")
        return state

    async def link(self, proxy_id: str) -> bytes:
        """GET /link: this device's 16-byte DTLS PSK for the proxy ``proxy_id`` (its PSK identity
        there is our device id). ValueError for a malformed id; AccessDenied (4.03) if there is
        no such active proxy or we are a proxy; AsError for a malformed reply."""
        if not names.is_device_id(proxy_id):
            raise ValueError("a proxy id is a device id")
        reply = await self.call("GET", "link", {"proxy": proxy_id})
        psk = reply.get("psk")
        if (
            set(reply) != {"proxy", "identity", "psk"}
            or reply["proxy"] != proxy_id
            or reply["identity"] != self.bundle.device_id
            or type(psk) is not bytes
            or len(psk) != LINK_PSK_LENGTH
        ):
            raise AsError("malformed /link reply from the AS")
        return psk

    async def links(self) -> dict[str, bytes]:
        """GET /links (proxies only): the 16-byte DTLS PSK of every active producer and consumer,
        by device id (their PSK identity). AccessDenied (4.03) unless we are a proxy; AsError
        for a malformed reply."""
        reply = await self.call("GET", "links")
        links = reply.get("links")
        if set(reply) != {"links"} or type(links) is not dict:
            raise AsError("malformed /links reply from the AS")
        for device_id, psk in links.items():
            if (
                not names.is_device_id(device_id)
                or type(psk) is not bytes
                or len(psk) != LINK_PSK_LENGTH
            ):
                raise AsError("malformed /links reply from the AS")
        return links

    #: Seconds a CoAP ping may take before the session counts as lost (see :meth:`ping`).
    PING_TIMEOUT = 3.0

    async def ping(self, remote: Any = None, timeout: float | None = None) -> bool | None:
        """A CoAP ping (RFC 7252 §4.3: an empty CON, which the AS's message layer answers with a
        RST, no request handling, no database) over the DTLS session ``remote`` (default: that
        of the last answer). True if the AS answered within ``timeout`` seconds (default
        :attr:`PING_TIMEOUT`); False if not — the AS restarted (its new process knows nothing of
        the session and drops our records) or is away — or if the AS closed that session (a
        close_notify: it stopped). None when there is no session yet, or this aiocoap keeps its
        message layer elsewhere (then nobody can tell). Concurrent pings of one session are
        shared."""
        remote = self._connection if remote is None else remote
        if self._ping is None or self._ping[1].done() or self._ping[0] is not remote:
            wait = self.PING_TIMEOUT if timeout is None else timeout
            contexts = [instance.ctx for instance in self.failover.instances]
            self._ping = (remote, asyncio.ensure_future(ping_session(contexts, remote, wait)))
        return await asyncio.shield(self._ping[1])

    async def watch_keys(
        self, resource_id: str, *, liveness: float | None = None
    ) -> AsyncGenerator[KeyState, None]:
        """Observe GET /keys: the current state, then one per change, until the observation ends
        (then :class:`AsUnavailable`, so the caller retries).

        An AS that restarts ends the observation without a word: the DTLS session dies with its
        process, and nothing arrives any more. With ``liveness``, every ``liveness`` seconds
        without a notification the AS is pinged over the observation's session (:meth:`ping`);
        no answer within :attr:`PING_TIMEOUT`, or a session the AS closed, raises
        :class:`AsUnavailable`. A lost observation is thus noticed within
        ``liveness + PING_TIMEOUT`` seconds.

        The observation goes to the first AS :meth:`Failover.order` names; one that does not
        answer or loses the observation is marked failed (one that answers 5.03 or 4.29, busy),
        so that the caller's next attempt goes to the next AS listed."""
        order = self.failover.order()
        if not order:
            raise self._none_to_ask("GET /keys")
        index = order[0]
        instance = self.failover.instances[index]
        ctx = await self._context(instance)
        request = ctx.request(
            self._message(instance.uri, "GET", "keys", {"r": resource_id}, None, observe=True)
        )
        pending: asyncio.Future[Any] | None = None
        try:
            first = await self._response(instance, request.response, "GET /keys")
            try:
                state = self._key_state(_decode(first, "GET /keys"), resource_id)
            except AsUnavailable as exc:  # 5.03 or 4.29: busy
                self.failover.busy(index, first.opt.max_age, exc.code)
                exc.retry_after = None if self.failover.order() else self.failover.retry_after()
                raise
            self.failover.answered(index)
            yield state
            if first.opt.observe is None:
                raise AsUnavailable("the AS did not accept the observation of /keys")
            notifications = aiter(request.observation)
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(notifications))
                done, _ = await asyncio.wait({pending}, timeout=liveness)
                if not done:
                    if await self.ping(first.remote) is False:
                        raise AsUnavailable(
                            "the AS answered no ping: the session and the observation of /keys "
                            "are gone (an AS restart?)"
                        )
                    continue
                try:
                    notification = pending.result()
                except StopAsyncIteration:
                    raise AsUnavailable("the AS ended the observation of /keys") from None
                finally:
                    pending = None
                yield self._key_state(_decode(notification, "GET /keys"), resource_id)
        except AsUnavailable as exc:
            # Not if its context was replaced meanwhile (another call dropped it, which ends
            # the observations on it): that says nothing of the AS.
            if exc.code not in BUSY_CODES and instance.ctx is ctx:
                self.failover.failed(index)
            raise
        except AsError:
            raise
        except Exception as exc:
            failure = translate(exc, "the AS")
            if failure is None:
                raise
            if instance.ctx is ctx:
                self.failover.failed(index)
            raise AsUnavailable(f"observation of /keys failed: {failure}") from None
        finally:
            if pending is not None:
                pending.cancel()
            if not request.observation.cancelled:
                request.observation.cancel()
