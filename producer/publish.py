"""Publishing: PUT each new object to a proxy, for producers that sleep or serve nothing.

Each target gets the newest object of each resource at ``<uri>/<resource id>`` (content format
18, Max-Age the resource's, so a proxy knows how long the object stays fresh). Only the newest
matters — an older one would be refused by the proxy as a rollback anyway — so a target that is
away collects at most one pending object per resource, and gets it when it answers again (retried
with backoff from 1 to 30 s). ``coaps://`` targets use the DTLS-PSK credentials of their
configuration, or for an OSCAR proxy the link PSK from the AS; the DTLS transport loads only then.

An object of at least :data:`TLS_THRESHOLD` bytes for an OSCAR proxy goes instead over CoAP over
TLS (RFC 8323, BERT blocks) to the same host and port number on TCP (``coaps+tcp``: the proxy's
``tls`` listener), with the producer's certificate from the AS CA, the proxy's certificate
required to name the proxy's device id. When that fails (the proxy does not offer TLS, no
answer, another peer), the PUT goes over DTLS as before, and that proxy is not tried over TLS
again for :data:`oscar_io.tcproute.RETRY_AFTER` seconds. An error answer over TLS is the proxy's
answer, as over DTLS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from oscar_io import coaperrors, coaptcp
from oscar_io.tasks import stop_tasks
from oscar_io.tcproute import RETRY_AFTER

from .config import PublishTarget

__all__ = ["Publisher"]

log = logging.getLogger("oscar.producer")

TIMEOUT = 10.0
#: Objects this large or larger go to an OSCAR proxy over TLS where it offers it.
TLS_THRESHOLD = 32 * 1024


class Publisher:
    """Background PUTs to every target; :meth:`submit` never blocks."""

    def __init__(
        self,
        targets: Sequence[PublishTarget],
        device_id: str,
        link: Callable[[str], Awaitable[bytes]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.targets = list(targets)
        #: The producer's TLS client context (its certificate), or None: DTLS only.
        self._tls = tls
        self._tls_ctx: Any = None
        self._tls_resting: dict[str, float] = {}
        #: Objects published over TLS (the rest of ``published`` went over DTLS or CoAP).
        self.published_tls = [0 for _ in self.targets]
        self.device_id = device_id
        self._link = link
        self._pending: list[dict[str, tuple[bytes, int]]] = [{} for _ in self.targets]
        self._wake = [asyncio.Event() for _ in self.targets]
        self._ctx: Any = None
        self._ctx_lock = asyncio.Lock()
        self._connections: dict[str, Any] = {}
        self.published = [0 for _ in self.targets]
        self.failures = [0 for _ in self.targets]
        self._tasks = [
            asyncio.create_task(self._run(i), name=f"publish {t.uri}")
            for i, t in enumerate(self.targets)
        ]

    def __repr__(self) -> str:
        return f"Publisher({[t.uri for t in self.targets]!r})"

    def submit(self, resource_id: str, obj: bytes, max_age: int) -> None:
        for pending, wake in zip(self._pending, self._wake, strict=True):
            pending[resource_id] = (obj, max_age)
            wake.set()

    async def _context(self) -> Any:
        async with self._ctx_lock:
            if self._ctx is None:
                from aiocoap import Context

                secure = [t for t in self.targets if t.uri.startswith("coaps:")]
                ctx = await Context.create_client_context(
                    transports=["udp6", "tinydtls"] if secure else ["udp6"]
                )
                try:
                    credentials = {}
                    for target in secure:
                        identity, psk = await self._credentials(target)
                        credentials[f"{target.uri.rstrip('/')}/*"] = {
                            "dtls": {"psk": psk, "client-identity": identity.encode()}
                        }
                    ctx.client_credentials.load_from_dict(credentials)
                except BaseException:
                    await ctx.shutdown()
                    raise
                self._ctx = ctx
            return self._ctx

    async def _credentials(self, target: PublishTarget) -> tuple[str, bytes]:
        if target.proxy is None:
            return str(target.psk_identity), bytes(target.psk or b"")
        if self._link is None:
            raise RuntimeError("no AS client to get the link key from")
        return self.device_id, await self._link(target.proxy)

    async def _reset(self) -> None:
        """Drop the client context: a DTLS session the proxy forgot (restart) is dead."""
        async with self._ctx_lock:
            ctx, self._ctx = self._ctx, None
            self._connections.clear()
        if ctx is not None:
            await ctx.shutdown()

    async def _run(self, index: int) -> None:
        target, pending, wake = self.targets[index], self._pending[index], self._wake[index]
        delay = 1.0
        while True:
            await wake.wait()
            wake.clear()
            while pending:
                resource_id = next(iter(pending))
                obj = pending.pop(resource_id)
                try:
                    await self._put(target, resource_id, *obj)
                    self.published[index] += 1
                    delay = 1.0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failures[index] += 1
                    log.warning(
                        "publishing %s to %s failed: %s; retrying in %.0f s",
                        resource_id,
                        target.uri,
                        _reason(exc, target.uri),
                        delay,
                    )
                    pending.setdefault(resource_id, obj)  # unless a newer one came meanwhile
                    await self._reset()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

    async def _put_tls(
        self, target: PublishTarget, resource_id: str, obj: bytes, max_age: int
    ) -> bool:
        """The PUT over TLS, if this object and target call for it: True when the proxy
        answered success there; False to go over DTLS. Raises for an error answer."""
        from aiocoap import PUT, Message

        secure = target.resource_uri(resource_id)
        if self._tls is None or target.proxy is None or len(obj) < TLS_THRESHOLD:
            return False
        if not secure.startswith("coaps://"):
            return False
        uri = "coaps+tcp://" + secure.removeprefix("coaps://")
        peer = uri.split("/", 3)[2]
        now = time.monotonic()
        if self._tls_resting.get(peer, now) > now:
            return False
        try:
            if self._tls_ctx is None:
                self._tls_ctx = await coaptcp.client_context(self._tls)
            message = Message(code=PUT, uri=uri, payload=obj, content_format=18, max_age=max_age)
            response = await coaptcp.put(
                self._tls_ctx, message, timeout=TIMEOUT, peer=peer, expect_device=target.proxy
            )
        except coaperrors.TransportError as exc:
            if len(self._tls_resting) >= 64:
                self._tls_resting.clear()
            self._tls_resting[peer] = now + RETRY_AFTER
            log.info("publishing %s over TLS failed (%s); over DTLS instead", resource_id, exc)
            return False
        if not response.code.is_successful():
            raise coaperrors.error_answer(response.code, "the target answered")
        self.published_tls[self.targets.index(target)] += 1
        return True

    async def _put(self, target: PublishTarget, resource_id: str, obj: bytes, max_age: int) -> None:
        from aiocoap import PUT, Message

        if await self._put_tls(target, resource_id, obj, max_age):
            return
        ctx = await self._context()
        request = ctx.request(
            Message(
                code=PUT,
                uri=target.resource_uri(resource_id),
                payload=obj,
                content_format=18,
                max_age=max_age,
            )
        )
        response = await asyncio.wait_for(request.response, TIMEOUT)
        self._connections[target.uri] = response.remote  # keeps aiocoap's DTLS session alive
        if not response.code.is_successful():
            raise coaperrors.error_answer(response.code, "the target answered")

    async def close(self) -> None:
        await stop_tasks(self._tasks)
        tls, self._tls_ctx = self._tls_ctx, None
        if tls is not None:
            await tls.shutdown()
        if self._ctx is not None:
            await self._ctx.shutdown()
            self._ctx = None


def _reason(exc: BaseException, uri: str) -> str:
    """Why a PUT failed, on one line: aiocoap's and the network's failures in OSCAR's terms
    (:func:`oscar_io.coaperrors.translate`: "timed out: no answer from …"), anything else (the
    target's error answer, the AS refusing the link key) as it says."""
    failure = coaperrors.translate(exc, uri)
    if failure is None:
        return str(exc) or type(exc).__name__
    return f"{failure.kind}: {failure}"
