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
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from oscar import certs, names
from oscar.errors import CertificateError, OscarError
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from oscar_io.errors import AccessDenied, AsError, AsUnavailable, StateError
from oscar_io.tasks import stop_tasks

from .config import ProducerConfig, ResourceSpec
from .epochs import FIRST_RETRY, LIVENESS, Failure, backoff, keys_keepalive
from .epochs import retry_delay as _retry_delay
from .published import Published
from .state import ProducerState

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["Producer", "ProducerError", "Published"]

log = logging.getLogger("oscar.producer")

#: Renew the certificate when less than this share of its validity is left.
CERT_RENEW_FRACTION = 0.2
TICK = 0.25
#: The documented bound: a revocation (or any new epoch) made while the AS is up reaches the
#: producer within this many seconds, also after an AS restart it did not see: the lost
#: observation is noticed (LIVENESS + AsClient.PING_TIMEOUT), observed again after the first
#: retry delay (1 s), and the new handshake and first answer take well under a second.
KEYS_LOST_BOUND = LIVENESS + AsClient.PING_TIMEOUT + FIRST_RETRY + 1.0


class ProducerError(OscarError):
    """The producer cannot start: bad bundle or state, or no certificate to be had."""


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
        self._publisher: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.started = False

    def __repr__(self) -> str:
        return f"Producer({self.device_id!r}, resources={len(self.resources)})"

    def now(self) -> int:
        return int(self._clock())

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
        await self._ensure_certificate(bundle, client)
        for spec in config.resources:
            published = Published(self, spec)
            stored = self.state.keys.get(published.resource_id)
            if stored is not None:
                published.restore(stored)
                published.tick(self.now())
            self.resources[spec.path] = published
        if config.publish:
            from .publish import Publisher

            self._publisher = Publisher(config.publish, self.device_id, client.link)
        if config.listen is not None:
            from .observers import ObserverLimits
            from .server import serve

            limits = ObserverLimits(config.max_observers, config.max_observers_per_address)
            self.server = await serve(
                self.device_id, self.resources.values(), *config.listen, limits
            )
        if self._publisher is not None:  # after the observers: they are told first
            for published in self.resources.values():
                published.on_change.append(functools.partial(self.publish, published))
        self.started = True
        for published in self.resources.values():
            published.poll_file(time.monotonic())
            self._spawn(self._sync_keys(published, client), f"keys {published.resource_id}")
            if published.spec.command is not None or published.spec.callback is not None:
                self._spawn(self._run_source(published), f"source {published.resource_id}")
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

    async def _ensure_certificate(self, bundle: Bundle, client: AsClient) -> None:
        now = self.now()
        ca = bundle.ca_certificate
        pem = self.state.certificate_pem()
        if pem is not None and self._usable_certificate(pem, ca, now, renew=True):
            self.certificate_pem = pem
            return
        from cryptography.hazmat.primitives.serialization import Encoding

        csr = certs.make_csr(self.signing_key.private_key, self.device_id)
        try:
            der = await client.request_certificate(csr.public_bytes(Encoding.DER))
        except AsError as exc:
            if pem is not None and self._usable_certificate(pem, ca, now, renew=False):
                log.warning("certificate renewal failed (%s); using the current one", exc)
                self.certificate_pem = pem
                return
            raise ProducerError(f"cannot get a certificate from the AS: {exc}") from None
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        new_pem = cert.public_bytes(Encoding.PEM)
        if not self._usable_certificate(new_pem, ca, now, renew=False):
            raise ProducerError("the AS issued a certificate that does not fit this producer")
        self.state.save_certificate(new_pem)
        self.certificate_pem = new_pem
        log.info("certificate %x issued by the AS", cert.serial_number)

    def _usable_certificate(
        self, pem: bytes, ca: x509.Certificate, now: int, *, renew: bool
    ) -> bool:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(pem)
            key = certs.ProducerKey.from_certificate(cert, ca, now=now)
        except (ValueError, CertificateError) as exc:
            log.warning("stored certificate not usable: %s", exc)
            return False
        if key.kid != self.signing_key.kid or key.producer_id != self.device_id:
            return False
        if renew and key.not_after is not None and key.not_before is not None:
            left = key.not_after - now
            return left > CERT_RENEW_FRACTION * (key.not_after - key.not_before)
        return True

    # --- values ---

    def update(self, path: str, value: bytes) -> bool:
        """Set a resource's value from code; sealed once if it changed. True if sealed."""
        try:
            published = self.resources[path]
        except KeyError:
            raise KeyError(f"no resource {path!r}") from None
        return published.update(value)

    def publish(self, published: Published) -> None:
        if self._publisher is not None and published.obj is not None:
            self._publisher.submit(
                published.resource_id, published.obj, published.max_age(self.now())
            )

    # --- background tasks ---

    async def _ticker(self) -> None:
        while True:
            now = self.now()
            mono = time.monotonic()
            for published in self.resources.values():
                try:
                    published.poll_file(mono)
                    published.tick(now)
                except (OSError, StateError) as exc:
                    log.error("%s: %s", published.resource_id, exc)
            await asyncio.sleep(TICK)

    async def _run_source(self, published: Published) -> None:
        spec = published.spec
        while True:
            try:
                value = await self._read_source(spec)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: value source failed: %s", published.resource_id, exc)
                value = None
            if value is not None:
                published.update(value)
            await asyncio.sleep(spec.interval)

    async def _read_source(self, spec: ResourceSpec) -> bytes | None:
        if spec.callback is not None:
            result = spec.callback()
            if inspect.isawaitable(result):
                result = await result
            return None if result is None else bytes(result)
        if not spec.command:
            return None
        process = await asyncio.create_subprocess_exec(
            *spec.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), max(10.0, spec.interval))
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError("the command timed out") from None
        if process.returncode != 0:
            raise RuntimeError(f"the command exited with status {process.returncode}")
        return out

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
                    )
                    registered = True
                    if not registration.created and not self.state.sequences.knows(
                        published.resource_id
                    ):
                        published.state_outlived = True
                watch = client.watch_keys(published.resource_id, liveness=LIVENESS)
                try:
                    while True:
                        state = await asyncio.wait_for(anext(watch), keepalive)
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
                delay = _retry_delay(delay, Failure.UNREACHABLE)
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
