"""The AS's aiocoap site: every request checked in order (the DTLS identity names a device, its
rate limit, the payload size) before :class:`authz_server.api.Endpoints` answers it; and the
observations of ``GET /keys``, notified when a resource's active or pre-active epoch changes.

What it does not do: sockets, DTLS sessions and the background work (:mod:`authz_server.server`),
endpoint logic (:mod:`authz_server.api`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from aiocoap import Message, interfaces
from aiocoap.numbers.codes import Code
from aiocoap.resource import Resource as CoapResource

from oscar import names
from oscar_io.dtls import device_of_label, mark_established

from .api import (
    MAX_PAYLOAD,
    ApiError,
    Endpoints,
    Request,
    RequestTooLarge,
    TooManyRequests,
    Unauthorized,
)
from .metrics import AsMetrics, endpoint_label
from .ratelimit import RateLimit
from .store import DatabaseUnavailable

__all__ = ["AuthorizationSite"]

log = logging.getLogger("oscar.as")


class AuthorizationSite(CoapResource):  # type: ignore[misc]
    """The aiocoap server site: identity, rate limit and size first, then the endpoints;
    ``GET /keys`` with Observe goes through :meth:`add_observation` and :meth:`notify`."""

    def __init__(
        self,
        endpoints: Endpoints,
        limit: RateLimit,
        on_unauthorized: Callable[[str], None],
        monotonic: Callable[[], float] = time.monotonic,
        metrics: AsMetrics | None = None,
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.endpoints = endpoints
        self.limit = limit
        self._on_unauthorized = on_unauthorized
        self._monotonic = monotonic
        self._observers: dict[str, set[Any]] = {}
        self._observed_remotes: dict[Any, int] = {}
        self._fingerprints: dict[str, tuple[Any, ...]] = {}

    @staticmethod
    def identity(remote: Any) -> str | None:
        """The device id the DTLS session authenticated, or None."""
        claims: Any = getattr(remote, "authenticated_claims", ())
        if len(claims) != 1:
            return None
        return device_of_label(claims[0])

    # --- request path ----------------------------------------------------------------------------

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        device = self.identity(request.remote)
        try:
            if device is None:
                raise Unauthorized()
            # Later blocks of a block-wise answer come from aiocoap's cache of the whole answer:
            # only the request that made it is charged (a /links reply runs to many blocks).
            block2 = request.opt.block2
            later_block = (
                block2 is not None and block2.block_number > 0 and request.opt.observe is None
            )  # an observation's request is rendered afresh, never from the block cache
            wait = 0.0 if later_block else self.limit.take(device, self._monotonic())
            if wait:
                raise TooManyRequests(max(1, math.ceil(wait)))
            block1 = request.opt.block1
            if len(request.payload) + (block1.start if block1 else 0) > MAX_PAYLOAD:
                raise RequestTooLarge()
        except ApiError as exc:
            answer = exc.to_message()
            if self.metrics is not None:
                label = endpoint_label(request.code.name, tuple(request.opt.uri_path))
                self.metrics.request(label, answer.code.dotted)
            pipe.add_response(answer, is_last=True)
            return
        mark_established(request.remote)
        if (
            request.opt.observe == 0
            and request.code == Code.GET
            and tuple(request.opt.uri_path) == ("keys",)
        ):
            await interfaces.ObservableResource._render_to_pipe(self, pipe)
        else:
            await interfaces.Resource._render_to_pipe(self, pipe)

    async def render(self, request: Message) -> Message:
        if self.metrics is None:
            return await self._render(request)
        start = time.perf_counter()
        answer = await self._render(request)
        label = endpoint_label(request.code.name, tuple(request.opt.uri_path))
        self.metrics.request(label, answer.code.dotted, time.perf_counter() - start)
        return answer

    async def _render(self, request: Message) -> Message:
        device = self.identity(request.remote)
        content_format = request.opt.content_format
        api_request = Request(
            device=device,
            method=request.code.name if request.code.is_request() else "",
            path=tuple(request.opt.uri_path),
            query=tuple(request.opt.uri_query),
            payload=bytes(request.payload),
            content_format=None if content_format is None else int(content_format),
        )
        try:
            reply = await self.endpoints.handle(api_request)
        except Unauthorized as exc:
            if device is not None:
                self._on_unauthorized(device)
            return exc.to_message()
        except ApiError as exc:
            return exc.to_message()
        except Exception:
            log.exception(
                "internal error answering %s /%s", api_request.method, "/".join(api_request.path)
            )
            return ApiError().to_message()
        return reply.to_message()

    # --- observation of /keys --------------------------------------------------------------------

    async def add_observation(self, request: Message, observation: Any) -> None:
        resource_id = next((q[2:] for q in request.opt.uri_query if q.startswith("r=")), None)
        remote = request.remote
        if names.is_resource_id(resource_id) and resource_id not in self._fingerprints:
            try:
                self._fingerprints[resource_id] = await self.endpoints.key_fingerprint(resource_id)
            except DatabaseUnavailable:
                pass  # read again at the next change (the watcher logs the database's state)
            except Exception:
                log.exception("cannot read the key state of an observed resource")
        key = resource_id or ""
        self._observers.setdefault(key, set()).add(observation)
        self._observed_remotes[remote] = self._observed_remotes.get(remote, 0) + 1

        def cancel() -> None:
            watchers = self._observers.get(key)
            if watchers is not None:
                watchers.discard(observation)
                if not watchers:
                    del self._observers[key]
                    self._fingerprints.pop(key, None)
            left = self._observed_remotes.get(remote, 1) - 1
            if left:
                self._observed_remotes[remote] = left
            else:
                self._observed_remotes.pop(remote, None)

        observation.accept(cancel)

    def has_observation(self, remote: object) -> bool:
        return remote in self._observed_remotes

    def observed(self) -> list[str]:
        return [r for r in self._observers if r]

    async def refresh(self) -> list[str]:
        """Notify the observers of every resource whose (active, pre-active) epochs changed."""
        changed: list[str] = []
        observed = self.observed()
        if not observed:
            return changed
        try:
            fingerprints = await self.endpoints.key_fingerprints(observed)
        except DatabaseUnavailable:
            return changed  # the watcher logs the database's state and tries again
        except Exception:
            log.exception("cannot read the key state of the observed resources")
            return changed
        for resource_id, fingerprint in fingerprints.items():
            if resource_id not in self._observers:
                continue  # the observation ended while the state was read
            if self._fingerprints.get(resource_id) != fingerprint:
                self._fingerprints[resource_id] = fingerprint
                changed.append(resource_id)
                for observation in list(self._observers.get(resource_id, ())):
                    observation.trigger()
        if changed:
            log.info("notified key observers of %s", ", ".join(changed))
            if self.metrics is not None:
                self.metrics.notifications.inc(amount=len(changed))
        return changed
