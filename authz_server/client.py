"""The device side of the AS protocol: credentials bundles, the DTLS client, sealed state files.

Producers, consumers and the proxy all talk to the AS the same way, so this lives with the AS:

- :class:`Bundle`: the credentials bundle ``oscar-as enroll`` writes (JSON, mode 0600), loaded
  strictly; its PSK never appears in a ``repr``.
- :class:`AsClient`: CoAP over DTLS-PSK to the AS (``coaps://``), CBOR in and out, one method per
  endpoint (docs/PROTOCOL.md, "AS endpoints"). Refusals raise :class:`AccessDenied` (4.01/4.03),
  an unreachable AS :class:`AsUnavailable`, anything else :class:`AsError`.
- :class:`SealedFile`, :func:`private_dir`, :func:`atomic_write`, :func:`read_state_file`: state
  files, from :mod:`authz_server.statefiles` (re-exported here, where every role imports them).

Importing this module does not load the DTLS transport: :meth:`AsClient.start` does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from cryptography import x509

from oscar import cbor, names
from oscar.errors import OscarError
from oscar.keys import AccessSecret, hkdf_sha256

from .statefiles import SealedFile, StateError, atomic_write, private_dir, read_state_file

__all__ = [
    "AccessDenied",
    "AsClient",
    "AsError",
    "AsUnavailable",
    "Bundle",
    "BundleError",
    "EpochKey",
    "KeyState",
    "Registration",
    "SealedFile",
    "SecretGrant",
    "StateError",
    "atomic_write",
    "private_dir",
    "quiet_undecodable_datagrams",
    "read_state_file",
    "stop_tasks",
]

log = logging.getLogger("oscar.asclient")

CBOR_FORMAT = 60
#: Link PSKs (device ↔ proxy DTLS keys) are 16 bytes, tinydtls's limit.
LINK_PSK_LENGTH = 16
ROLES = ("producer", "consumer", "proxy")


class BundleError(OscarError):
    """The credentials bundle is missing, unreadable, exposed or malformed."""


class AsError(OscarError):
    """The AS refused or failed a request. ``code`` is the CoAP code (``"4.04"``), or None."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class AccessDenied(AsError):
    """4.01 or 4.03: this device may not have what it asked for."""


class AsUnavailable(AsError):
    """The AS did not answer (network down, AS stopped, handshake failed) within the timeout."""


# --- the bundle ----------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Bundle:
    """A device's credentials from enrollment: identity, AS address, PSK, the CA certificate."""

    device_id: str
    role: str
    as_uri: str
    psk_identity: str
    psk: bytes = field(repr=False)
    ca_certificate: x509.Certificate = field(repr=False)

    def __repr__(self) -> str:
        return f"Bundle(device_id={self.device_id!r}, role={self.role!r}, as_uri={self.as_uri!r})"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bundle:
        """Read and check a bundle file; :class:`BundleError` says what is wrong.

        Like ssh with a private key, a bundle that others may read is refused: it holds the PSK.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(65_536)
        except OSError as exc:
            raise BundleError(f"cannot read the bundle {path}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise BundleError(f"the bundle {path} is not a regular file")
        if mode & 0o077:
            raise BundleError(
                f"the bundle {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                "it holds a PSK: chmod 600 it"
            )
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: bytes, where: str = "the bundle") -> Bundle:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise BundleError(f"{where} is not JSON") from None
        keys = {"id", "role", "as_uri", "psk_identity", "psk_hex", "ca_cert_pem"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise BundleError(f"{where} must hold exactly: {', '.join(sorted(keys))}")
        if not all(isinstance(doc[k], str) for k in keys):
            raise BundleError(f"every field of {where} is a string")
        if not names.is_device_id(doc["id"]):
            raise BundleError(f"{where} has a malformed device id")
        if doc["role"] not in ROLES:
            raise BundleError(f"{where} has an unknown role (one of {', '.join(ROLES)})")
        try:
            uri = urlsplit(doc["as_uri"])
            _ = uri.port  # raises ValueError for a port out of range
        except ValueError:
            uri = None
        if uri is None or uri.scheme != "coaps" or not uri.hostname or uri.path not in ("", "/"):
            raise BundleError(f"{where}: as_uri must be coaps://HOST[:PORT]")
        identity = doc["psk_identity"]
        if not 1 <= len(identity.encode()) <= 32:
            raise BundleError(f"{where}: the PSK identity must be 1 to 32 bytes")
        try:
            psk = bytes.fromhex(doc["psk_hex"])
        except ValueError:
            raise BundleError(f"{where}: psk_hex is not hex") from None
        if not 1 <= len(psk) <= 16:
            raise BundleError(f"{where}: the PSK must be 1 to 16 bytes (tinydtls)")
        try:
            ca = x509.load_pem_x509_certificate(doc["ca_cert_pem"].encode())
        except ValueError:
            raise BundleError(f"{where}: ca_cert_pem is not a PEM certificate") from None
        return cls(doc["id"], doc["role"], doc["as_uri"].rstrip("/"), identity, psk, ca)

    def state_key(self, purpose: str) -> bytes:
        """A 32-byte key for this device's local state files, derived from its PSK."""
        info = cbor.dumps(["OSCAR state", self.device_id, purpose])
        return hkdf_sha256(self.psk, info, 32)


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again as long as needed:
    ``asyncio.wait_for`` may hand back the inner error instead of a cancellation when the two
    meet (Python 3.11), and a retry loop would then carry on as if nothing had happened."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), type(task.exception()).__name__)


def quiet_undecodable_datagrams(loop: asyncio.AbstractEventLoop, logger: logging.Logger) -> None:
    """aiocoap 0.4.17 lets some malformed datagrams (an option that is not UTF-8 where text is
    due) raise out of its receive callback, which asyncio then logs as an ERROR with a traceback.
    The datagram is dropped either way; this logs it as one info line instead. Every other
    exception goes to the default handler. (Its DTLS client's doubled "connected" event is
    repaired where it arises, by :mod:`authz_server.dtls_client`.)"""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        handle = repr(context.get("handle", ""))
        if isinstance(exc, UnicodeDecodeError) and "Recvmsg" in handle:
            logger.info("dropped an undecodable datagram")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


# --- replies -------------------------------------------------------------------------------------


class Registration(NamedTuple):
    """A ``POST /resources`` reply; ``created`` is False when the AS knew the resource already."""

    resource_id: str
    epoch: int
    created: bool


class SecretGrant(NamedTuple):
    """A ``GET /secret`` reply."""

    resource_id: str
    epoch: int
    state: str
    secret: AccessSecret
    profile: str


class EpochKey(NamedTuple):
    epoch: int
    secret: AccessSecret
    activated_at: int | None


class KeyState(NamedTuple):
    """A ``GET /keys`` reply: what a producer needs to seal now and after the next boundary."""

    resource_id: str
    profile: str
    rotation_period: int
    active: EpochKey
    #: Always set in a reply from the AS; None in a producer's own record after it switched to
    #: the next epoch by itself (at the boundary, with the AS out of reach).
    next: EpochKey | None

    def to_cbor(self) -> dict[str, Any]:
        return {
            "resource": self.resource_id,
            "profile": self.profile,
            "rotation_period": self.rotation_period,
            "active": {
                "epoch": self.active.epoch,
                "secret": self.active.secret.value,
                "activated_at": self.active.activated_at,
            },
            "next": None
            if self.next is None
            else {"epoch": self.next.epoch, "secret": self.next.secret.value},
        }

    @classmethod
    def from_cbor(cls, doc: Any, *, next_required: bool = True) -> KeyState:
        """Parse a /keys reply (or, with ``next_required=False``, a producer's stored copy);
        AsError if it is not of that shape."""
        try:
            active, upcoming = doc["active"], doc["next"]
            following = (
                None
                if upcoming is None and not next_required
                else EpochKey(
                    _uint(upcoming["epoch"]), AccessSecret(_bytes(upcoming["secret"])), None
                )
            )
            state = cls(
                _text(doc["resource"]),
                _text(doc["profile"]),
                _uint(doc["rotation_period"]),
                EpochKey(
                    _uint(active["epoch"]),
                    AccessSecret(_bytes(active["secret"])),
                    _uint(active["activated_at"]),
                ),
                following,
            )
        except (KeyError, TypeError, ValueError):
            raise AsError("malformed key state from the AS") from None
        return state


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("text expected")
    return value


def _uint(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise TypeError("unsigned integer expected")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("bytes expected")
    return value


# --- the client ----------------------------------------------------------------------------------


class AsClient:
    """Requests to the AS over DTLS-PSK with the bundle's identity.

    ``async with AsClient(bundle) as client: ...`` or :meth:`start` / :meth:`close`. Each request
    gives up after ``timeout`` seconds with :class:`AsUnavailable`.
    """

    def __init__(self, bundle: Bundle, *, timeout: float = 10.0) -> None:
        self.bundle = bundle
        self.timeout = timeout
        self._ctx: Any = None
        #: The DTLS connection of the last answer. aiocoap keeps a client connection only while
        #: something refers to it: without this, every request would close the session and
        #: handshake anew (and a new handshake right after a close is sometimes lost).
        self._connection: Any = None
        #: Counts the DTLS client contexts made; see :meth:`reset`.
        self.generation = 0
        self._ping: tuple[Any, asyncio.Future[bool | None]] | None = None

    def __repr__(self) -> str:
        return f"AsClient({self.bundle.device_id!r} -> {self.bundle.as_uri})"

    async def __aenter__(self) -> AsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._ctx is not None:
            return
        from aiocoap import Context  # the DTLS transport loads here, not at import

        from . import dtls_client

        dtls_client.apply()  # a session the AS closed and tinydtls renews: no traceback
        ctx = await Context.create_client_context(transports=["tinydtls"])
        ctx.client_credentials.load_from_dict(
            {
                f"{self.bundle.as_uri}/*": {
                    "dtls": {
                        "psk": self.bundle.psk,
                        "client-identity": self.bundle.psk_identity.encode(),
                    }
                }
            }
        )
        self._ctx = ctx
        self.generation += 1

    async def reset(self, generation: int) -> None:
        """Drop the context (and its DTLS session) if it is still ``generation``: after the AS
        restarted, the old session is dead, and only a new handshake gets through. Callers pass
        the generation they saw fail, so several of them do not throw away each other's fresh
        session."""
        if self._ctx is not None and generation == self.generation:
            await self.close()

    async def close(self) -> None:
        self._connection = None
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            await ctx.shutdown()

    def _message(
        self, method: str, path: str, query: dict[str, str] | None, body: Any, observe: bool
    ) -> Any:
        from aiocoap import Message
        from aiocoap.numbers.codes import Code

        message = Message(code=getattr(Code, method), uri=f"{self.bundle.as_uri}/{path}")
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

    async def _exchange(
        self, method: str, path: str, query: dict[str, str] | None, body: Any
    ) -> tuple[str, Any]:
        """One request: (dotted 2.xx code, decoded CBOR reply)."""
        if self._ctx is None:
            await self.start()
        what = f"{method} /{path}"
        held = self._connection is not None
        request = self._ctx.request(self._message(method, path, query, body, False))
        try:
            response = await self._response(request.response, what)
        except AsUnavailable:
            if not held:
                raise
            # The session we kept may have died on the AS's side (idle sweep, restart) without
            # our hearing of it: once more, over a new handshake.
            await self.close()
            await self.start()
            request = self._ctx.request(self._message(method, path, query, body, False))
            response = await self._response(request.response, what)
        return response.code.dotted, _decode(response, what)

    async def _response(self, awaitable: Any, what: str) -> Any:
        try:
            response = await asyncio.wait_for(awaitable, self.timeout)
            self._connection = response.remote
            return response
        except TimeoutError:
            raise AsUnavailable(f"the AS did not answer {what} within {self.timeout:g} s") from None
        except OSError as exc:
            raise AsUnavailable(f"cannot reach the AS: {exc.strerror or exc}") from None
        except Exception as exc:  # aiocoap's NetworkError, ConRetransmitsExceeded, ...
            from aiocoap import error

            if isinstance(exc, error.Error):
                raise AsUnavailable(f"cannot reach the AS: {type(exc).__name__}") from None
            raise

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
    ) -> Registration:
        """POST /resources: (resource id, active epoch, whether the AS made it just now).
        Registering again with the same parameters is fine; different parameters update the
        registration."""
        code, reply = await self._exchange(
            "POST",
            "resources",
            None,
            {
                "path": path,
                "content_format": content_format,
                "profile": profile,
                "max_age": max_age,
                "rotation_period": rotation_period,
            },
        )
        return Registration(
            _field(reply, "resource", str), _field(reply, "epoch", int), code == "2.01"
        )

    async def secret(self, resource_id: str, epoch: int | None = None) -> SecretGrant:
        """GET /secret: the access secret of (resource, epoch), the active epoch by default."""
        query = {"r": resource_id}
        if epoch is not None:
            query["e"] = str(epoch)
        reply = await self.call("GET", "secret", query)
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
            self._ping = (remote, asyncio.ensure_future(self._send_ping(remote, wait)))
        return await asyncio.shield(self._ping[1])

    @staticmethod
    async def _recognized(transport: Any, remote: Any) -> bool:
        """Whether ``remote`` is still a live connection of ``transport`` (its pool)."""
        return bool(await transport.recognize_remote(remote))

    async def _send_ping(self, remote: Any, timeout: float) -> bool | None:
        from aiocoap import Message
        from aiocoap.numbers.codes import Code
        from aiocoap.numbers.types import CON

        transport = getattr(remote, "coaptransport", None)
        if transport is None:
            return None
        manager: Any = None
        for token_manager in getattr(self._ctx, "request_interfaces", ()):
            manager = getattr(token_manager, "token_interface", None)
            if getattr(manager, "message_interface", None) is transport:
                break
        else:
            return None
        # A session the AS closed (authz_server.dtls_client takes it out of the pool) is over,
        # even though tinydtls would answer a ping on it by handshaking anew: a new session, on
        # which the AS knows no observation of ours.
        if not await self._recognized(transport, remote):
            return False
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        message = Message(code=Code.EMPTY)
        message.mtype = CON
        message.remote = remote

        def answered() -> None:  # aiocoap calls it when a RST ends the exchange
            if not pong.done():
                pong.set_result(None)

        # Unanswered, the ping is retransmitted until the context goes (our caller resets it).
        manager.send_message(message, answered)
        try:
            await asyncio.wait_for(pong, timeout)
        except TimeoutError:
            return False
        return True

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
        ``liveness + PING_TIMEOUT`` seconds."""
        if self._ctx is None:
            await self.start()
        request = self._ctx.request(
            self._message("GET", "keys", {"r": resource_id}, None, observe=True)
        )
        pending: asyncio.Future[Any] | None = None
        try:
            first = await self._response(request.response, "GET /keys")
            yield self._key_state(_decode(first, "GET /keys"), resource_id)
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
        except (TimeoutError, OSError) as exc:
            raise AsUnavailable(f"observation of /keys failed: {exc}") from None
        except AsError:
            raise
        except Exception as exc:
            from aiocoap import error

            if isinstance(exc, error.Error):
                raise AsUnavailable(f"observation of /keys failed: {type(exc).__name__}") from None
            raise
        finally:
            if pending is not None:
                pending.cancel()
            if not request.observation.cancelled:
                request.observation.cancel()


def _decode(response: Any, what: str) -> Any:
    code = response.code
    dotted = code.dotted
    detail = ""
    if response.opt.content_format == CBOR_FORMAT and response.payload:
        try:
            doc = cbor.loads(response.payload)
        except ValueError:
            raise AsError(f"{what}: the AS sent malformed CBOR", dotted) from None
    else:
        doc = None
    if code.is_successful():
        if not isinstance(doc, dict):
            raise AsError(f"{what}: the AS sent no CBOR map", dotted)
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, str):
        detail = ": " + error[:200]
    if dotted in ("4.01", "4.03"):
        raise AccessDenied(f"{what}: refused ({dotted}){detail}", dotted)
    if dotted in ("5.03", "4.29"):
        raise AsUnavailable(f"{what}: the AS is busy ({dotted}){detail}", dotted)
    raise AsError(f"{what}: the AS answered {dotted}{detail}", dotted)


def _field(reply: Any, name: str, kind: type) -> Any:
    value = reply.get(name)
    if not isinstance(value, kind) or (kind is int and type(value) is not int):
        raise AsError(f"the AS reply lacks {name!r}")
    return value
