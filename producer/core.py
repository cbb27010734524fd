"""The producer: seal each new value once, serve and publish that object, follow the AS's keys.

Embedding it in a program::

    config = ProducerConfig(bundle=Path("sensor-1.json"), state=Path("state"),
                            listen=("127.0.0.1", 5683), resources=[ResourceSpec("temperature")])
    async with Producer(config) as producer:
        while True:
            producer.update("temperature", read_sensor())   # sealed once, served to everyone
            await asyncio.sleep(10)

Per resource (:class:`~producer.published.Published`) it holds the active epoch's secret and the
next one's (from ``GET /keys``, observed), switches to the next at the boundary by its own clock
even when the AS is out of reach, and re-seals the current value under a new epoch as soon as the AS
announces a rotation (scheduled, or at once on a revocation or compromise). When it has no secret it
may use — before the AS first answered, or after both known epochs ran out — it seals nothing and
says so in the log; the last object stays served until its ``exp``.

:class:`Producer` puts the parts together and runs their tasks: at start the bundle, the state
directory and the certificate (:mod:`producer.certificate`), then per resource its keys restored,
the server (:mod:`producer.server`) and the publisher (:mod:`producer.publish`); while it runs, a
ticker (each resource's clock and file, :data:`TICK`), one task per resource following ``/keys``
at the AS (:meth:`Producer._sync_keys`, delays from :mod:`producer.epochs`) and one per command or
callback source (:mod:`producer.sources`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from oscar import certs, names
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from oscar_io.errors import AccessDenied, AsError, AsUnavailable, StateError
from oscar_io.tasks import stop_tasks

from . import sources
from .certificate import ensure_certificate
from .config import ProducerConfig
from .epochs import FIRST_RETRY, LIVENESS, Failure, backoff, keys_keepalive
from .epochs import retry_delay as _retry_delay
from .errors import ProducerError
from .published import Published
from .sources import FileSource
from .state import ProducerState

__all__ = ["Producer", "ProducerError", "Published"]

log = logging.getLogger("oscar.producer")

TICK = 0.25
#: The documented bound: a revocation (or any new epoch) made while the AS is up reaches the
#: producer within this many seconds, also after an AS restart it did not see: the lost
#: observation is noticed (LIVENESS + AsClient.PING_TIMEOUT), observed again after the first
#: retry delay (1 s), and the new handshake and first answer take well under a second.
KEYS_LOST_BOUND = LIVENESS + AsClient.PING_TIMEOUT + FIRST_RETRY + 1.0


class Producer:
    """A producer process's worth of state and tasks; see the module docstring."""

    def __init__(self, config: ProducerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.bundle: Bundle | None = None
        self.device_id = ""
        self.state: ProducerState = None  # type: ignore[assignment]  # set by start()
        self.signing_key: certs.SigningKey = None  # type: ignore[assignment]
        self.certificate_pem = b""
        self.resources: dict[str, Published] = {}
        self.as_client: AsClient | None = None
        self.server: Any = None
        #: The observers' bounds and counts (None when serving nothing).
        self.observer_limits: Any = None
        self._publisher: Any = None
        #: The multicast groups (producer.groups.GroupService), None without any.
        self.groups: Any = None
        self._files: dict[str, FileSource] = {}
        #: A multi-part resource's part files, by resource path and part name.
        self._part_files: dict[str, dict[str, FileSource]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.started = False

    def __repr__(self) -> str:
        return f"Producer({self.device_id!r}, resources={len(self.resources)})"

    def now(self) -> int:
        return int(self._clock())

    @property
    def publisher(self) -> Any:
        """The publisher to proxies (:mod:`producer.publish`), or None."""
        return self._publisher

    @property
    def sequence_window(self) -> int:
        """Sequence numbers reserved per write of the state (for :class:`Published`)."""
        return self.config.sequence_window

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- start and stop ---

    async def start(self) -> None:
        """Load or make the key and certificate, restore key states, start serving and syncing.

        Raises :class:`ProducerError` (or a BundleError/StateError) when it cannot start."""
        config = self.config
        bundle = Bundle.load(config.bundle)
        if bundle.role != "producer":
            raise ProducerError(f"the bundle is for a {bundle.role}, not a producer")
        self.bundle, self.device_id = bundle, bundle.device_id
        for spec in config.resources:
            if not names.is_resource_id(f"{self.device_id}/{spec.path}"):
                raise ProducerError(f"resource {spec.path!r}: the resource id is too long")
        self.state = ProducerState(config.state, bundle.state_key("producer"))
        self.signing_key = certs.SigningKey.from_private_key(
            self.state.signing_key(config.key_algorithm)
        )
        self.as_client = client = AsClient(bundle, timeout=config.as_timeout)
        self.certificate_pem = await ensure_certificate(
            self.state, self.signing_key, self.device_id, bundle.ca_certificate, client, self.now()
        )
        for spec in config.resources:
            published = Published(self, spec)
            stored = self.state.keys.get(published.resource_id)
            if stored is not None:
                published.restore(stored)
                published.tick(self.now())
            self.resources[spec.path] = published
            if spec.file is not None:
                self._files[spec.path] = FileSource(spec.file, spec.interval, published.resource_id)
            part_files = {
                part.name: FileSource(
                    part.file, spec.interval, f"{published.resource_id}#{part.name}"
                )
                for part in spec.parts
                if part.file is not None
            }
            if part_files:
                self._part_files[spec.path] = part_files
        if config.publish:
            from oscar_io.coaptcp import client_tls

            from .publish import Publisher

            publish_tls = client_tls(  # large objects to an OSCAR proxy over TLS if it offers it
                bundle.ca_certificate,
                self.certificate_pem,
                certs.private_key_pem(self.signing_key.private_key),
            )
            self._publisher = Publisher(
                config.publish, self.device_id, client.link, tls=publish_tls
            )
        if config.listen is not None:
            from .observers import ObserverLimits
            from .server import serve

            limits = ObserverLimits(config.max_observers, config.max_observers_per_address)
            self.observer_limits = limits
            tls = None
            if config.tls:  # its certificate from the AS CA; clients need one from the same CA
                from oscar_io.coaptcp import server_tls

                tls = server_tls(
                    self.certificate_pem,
                    certs.private_key_pem(self.signing_key.private_key),
                    bundle.ca_certificate,
                )
            self.server = await serve(
                self.device_id,
                self.resources.values(),
                *config.listen,
                limits,
                tcp=config.tcp,
                tls=tls,
            )
        if config.multicast:
            from .groups import GroupService

            self.groups = GroupService(
                self.device_id,
                self.resources.values(),
                config.multicast,
                interface=config.multicast_interface,
                interface6=config.multicast_interface6,
                hops=config.multicast_hops,
                leisure=config.multicast_leisure,
                echo_key=bundle.state_key("producer-echo"),
            )
            await self.groups.start()
            for published in self.resources.values():  # once per value, whatever the listeners
                published.on_change.append(functools.partial(self.groups.notify, published))
        if self._publisher is not None:  # after the observers: they are told first
            for published in self.resources.values():
                published.on_change.append(functools.partial(self.publish, published))
        self.started = True
        for published in self.resources.values():
            self._poll_file(published, time.monotonic())
            self._spawn(self._sync_keys(published, client), f"keys {published.resource_id}")
            spec = published.spec
            if spec.command is not None or spec.callback is not None:
                run = sources.run(spec, published.resource_id, published.update)
                self._spawn(run, f"source {published.resource_id}")
        self._spawn(self._ticker(), "ticker")

    async def stop(self) -> None:
        """Stop every task, the server and the AS client. A task that swallowed its
        cancellation (asyncio.wait_for may hand back the inner error when a timeout and a
        cancellation meet) is cancelled again until it ends: stopping never hangs."""
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks)
        if self._publisher is not None:
            await self._publisher.close()
        if self.groups is not None:
            self.groups.close()
            self.groups = None
        if self.server is not None:
            await self.server.shutdown()
            self.server = None
        if self.as_client is not None:
            await self.as_client.close()
        if self.state is not None:
            self.state.close()
        self.started = False

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    # --- values ---

    def update(self, path: str, value: bytes) -> bool:
        """Set a resource's value from code; sealed once if it changed. True if sealed."""
        try:
            published = self.resources[path]
        except KeyError:
            raise KeyError(f"no resource {path!r}") from None
        return published.update(value)

    def update_parts(self, path: str, values: dict[str, bytes]) -> bool:
        """Set some parts' values of a multi-part resource from code; one object is sealed of
        every part's current value if any changed (and every part has one). True if sealed."""
        try:
            published = self.resources[path]
        except KeyError:
            raise KeyError(f"no resource {path!r}") from None
        return published.update_parts(values)

    def publish(self, published: Published) -> None:
        if self._publisher is not None and published.obj is not None:
            self._publisher.submit(
                published.resource_id, published.obj, published.max_age(self.now())
            )

    def _poll_file(self, published: Published, now_mono: float) -> None:
        source = self._files.get(published.spec.path)
        if source is not None:
            value = source.poll(now_mono, waiting=published.value is None)
            if value is not None:
                published.update(value)
        part_files = self._part_files.get(published.spec.path)
        if part_files:
            changed = {}
            for name, part_source in part_files.items():
                waiting = name not in published.part_values
                part_value = part_source.poll(now_mono, waiting=waiting)
                if part_value is not None:
                    changed[name] = part_value
            if changed:
                published.update_parts(changed)

    # --- background tasks ---

    async def _ticker(self) -> None:
        while True:
            now = self.now()
            mono = time.monotonic()
            for published in self.resources.values():
                try:
                    self._poll_file(published, mono)
                    published.tick(now)
                except (OSError, StateError) as exc:
                    log.error("%s: %s", published.resource_id, exc)
            await asyncio.sleep(TICK)

    async def _sync_keys(self, published: Published, client: AsClient) -> None:
        """Register the resource, then follow its key state; retry with backoff when the AS is
        away (the producer keeps going on what it holds).

        An observation can die silently (the AS restarted and lost the DTLS session): after
        :data:`~producer.epochs.LIVENESS` quiet seconds the AS is pinged, and an unanswered ping
        starts a new DTLS session and a new observation (:data:`KEYS_LOST_BOUND`). While the AS
        cannot be reached, attempts follow every :data:`~producer.epochs.RETRY_UNREACHABLE`
        seconds at most. An observation quiet for :func:`~producer.epochs.keys_keepalive`
        seconds is also made again (the AS may have dropped it alone)."""
        spec, delay, registered = published.spec, FIRST_RETRY, False
        while not self._stopping:
            generation = client.generation
            keepalive = keys_keepalive(published.rotation_period)
            try:
                if not registered:
                    registration = await client.register(
                        spec.path,
                        content_format=spec.content_format,
                        profile=spec.profile,
                        max_age=spec.max_age,
                        rotation_period=spec.rotation_period,
                        parts=[(part.name, part.kind) for part in spec.parts],
                    )
                    registered = True
                    if not registration.created and not self.state.sequences.knows(
                        published.resource_id
                    ):
                        published.state_outlived = True
                watch = client.watch_keys(published.resource_id, liveness=LIVENESS)
                # The first state (the registration of the observation) is bounded by the
                # client's own attempt timeout, which fails loudly and resets a dead session. Cut
                # off by a keepalive shorter than that (a rotation period under 40 s), it was
                # retried silently on the dead session until another resource's failure reset
                # it: a producer sealed nothing for tens of seconds after an AS came back.
                wait: float | None = None
                try:
                    while True:
                        state = await asyncio.wait_for(anext(watch), wait)
                        wait = keepalive
                        if state.profile != spec.profile:
                            log.error(
                                "%s: the AS has profile %s registered",
                                published.resource_id,
                                state.profile,
                            )
                        published.apply(state)
                        delay = FIRST_RETRY
                except TimeoutError:
                    continue  # quiet for a while: observe afresh
                finally:
                    await watch.aclose()
            except asyncio.CancelledError:
                raise
            except AccessDenied as exc:
                log.error("%s: %s", published.resource_id, exc)
                delay = _retry_delay(delay, Failure.DENIED)
            except AsUnavailable as exc:
                # A busy AS's Max-Age (retry_after) is the least wait: asking sooner is refused.
                delay = _retry_delay(delay, Failure.UNREACHABLE, exc.retry_after)
                log.warning("%s: AS: %s; retrying in %.0f s", published.resource_id, exc, delay)
                await client.reset(generation)
            except AsError as exc:
                delay = _retry_delay(delay, Failure.OTHER)
                log.warning("%s: AS: %s; retrying in %.0f s", published.resource_id, exc, delay)
            except (OSError, StateError) as exc:
                delay = _retry_delay(delay, Failure.OTHER)
                log.error("%s: %s", published.resource_id, exc)
            except Exception as exc:  # never stop following the AS (revocations come this way)
                delay = _retry_delay(delay, Failure.OTHER)
                log.error("%s: following the AS failed (%s); retrying", published.resource_id, exc)
            await asyncio.sleep(delay)
            delay = backoff(delay)
