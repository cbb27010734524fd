"""The AS process: the aiocoap site over DTLS-PSK, and the background work of a running server.

:func:`serve` opens the state directory's store, loads the CA and every active device's PSK, and
serves the endpoints of :mod:`authz_server.api` with aiocoap's ``tinydtls_server`` only (no plain
CoAP on any port). Around the site it runs:

- the connection guard of :mod:`oscar_io.dtls` (a stateless cookie exchange before a new
  source gets a connection, a bounded table with O(1) eviction, an idle sweep);
- a watcher that polls ``store.changes()`` every ``tick`` seconds, so what the admin CLI changes
  in the database takes effect at once: newly enrolled devices may connect, revoked ones lose
  their credentials and their open sessions, and ``/keys`` observers of resources whose epochs
  changed get a notification;
- a scheduler (once a second) that ends expired grants, rotates the resources whose rotation
  period has passed and destroys deactivated or compromised epochs older than the retention,
  each decided again inside its write transaction: done once however many instances run on one
  database;
- the audit retention of :mod:`authz_server.retention` (hourly, a task of its own): records older
  than ``audit_retention`` days are pruned behind a checkpoint, as ``oscar-as audit prune`` does;
- a heartbeat (every ``heartbeat`` seconds, a task of its own): one row per running instance in
  the store (:mod:`authz_server.store.instances`: a random id per start, the listen address,
  host, pid, and a few health facts), which the admin console's overview lists; a beat the
  database cannot take is skipped (the next one tries again), a clean stop deletes the row.

Every request is checked, in order (:mod:`authz_server.site`): the DTLS identity (a credentials
label) names a device; its rate limit; the payload size; then the endpoint, which checks that the
device is still active.

One log line per event on logger ``oscar.as``; never a PSK, a secret or a payload.

``oscar-as serve --state DIR --listen HOST:PORT`` (:mod:`authz_server.cli`) runs it until
SIGTERM/SIGINT: the one command line of the AS, used by systemd, the tests, the demo and the
benchmarks. This module has no argument parser; it does not parse requests (api.py) nor touch SQL
(store).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiocoap import Context

from oscar_io.dtls import ConnectionGuard, IndexedCreds, label_of
from oscar_io.metrics import MetricsServer, serve_metrics
from oscar_io.ports import ensure_alone_on_port, ensure_port_free

from .api import (
    Endpoints,
)
from .ca import CertificateAuthority
from .metrics import AsMetrics
from .ratelimit import RateLimit
from .retention import keep_audit
from .site import AuthorizationSite
from .store import DatabaseError, DatabaseUnavailable, Instance, Store, StoreError

__all__ = ["ServeOptions", "serve"]

log = logging.getLogger("oscar.as")


@dataclass(frozen=True)
class ServeOptions:
    retention: int = 7 * 86_400  # seconds a deactivated/compromised epoch stays readable
    rate: float = 50.0  # requests/s per identity (token bucket)
    burst: int = 100
    max_connections: int = 1024  # DTLS connection table cap
    tick: float = 0.2  # how often to poll the store for changes made by the admin CLI
    crl_validity: int = 3600
    min_rotation_period: int = 60  # shortest rotation period a producer may ask for (0 = never)
    audit_retention: float = 365  # days an audit record is kept (0 = forever); see retention.py
    audit_prune_every: float = 3600.0  # seconds between two applications of audit_retention
    heartbeat: float = 5.0  # seconds between two heartbeats in the store (the console's health)

    def __post_init__(self) -> None:
        if type(self.min_rotation_period) is not int or self.min_rotation_period < 1:
            raise ValueError("min_rotation_period must be a whole number of seconds, at least 1")
        if type(self.retention) is not int or self.retention < 0:
            raise ValueError("retention must be a whole number of seconds, 0 or more")
        if not isinstance(self.rate, (int, float)) or not 0 < self.rate < math.inf:
            raise ValueError("rate must be a positive number of requests per second")
        if type(self.burst) is not int or self.burst < 1:
            raise ValueError("burst must be a whole number of requests, at least 1")
        if type(self.max_connections) is not int or self.max_connections < 1:
            raise ValueError("max_connections must be a whole number, at least 1")
        if not isinstance(self.tick, (int, float)) or not 0 < self.tick <= 60:
            raise ValueError("tick must be more than 0 and at most 60 seconds")
        if type(self.crl_validity) is not int or self.crl_validity < 1:
            raise ValueError("crl_validity must be a whole number of seconds, at least 1")
        days = self.audit_retention
        if type(days) not in (int, float) or not 0 <= days < math.inf:
            raise ValueError(
                "audit_retention must be a number of days, 0 (keep every record) or more"
            )
        every = self.audit_prune_every
        if type(every) not in (int, float) or not 0 < every <= 86_400:
            raise ValueError("audit_prune_every must be more than 0 and at most 86400 seconds")
        beat = self.heartbeat
        if type(beat) not in (int, float) or not 0 < beat <= 60:
            raise ValueError("heartbeat must be more than 0 and at most 60 seconds")


def _joined(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wall_clock() -> int:
    return int(time.time())


class _Server:
    """The pieces of one running AS, and its background work."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        options: ServeOptions,
        metrics: AsMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.raw_store = store
        self.store = store
        self.options = options
        self.endpoints = Endpoints(
            self.store,
            ca,
            clock=_wall_clock,
            crl_validity=options.crl_validity,
            min_rotation_period=options.min_rotation_period,
        )
        self.limit = RateLimit(options.rate, options.burst)
        self.creds = IndexedCreds()
        self.site = AuthorizationSite(self.endpoints, self.limit, self._end_later, metrics=metrics)
        self.ctx: Any = None
        self.guard: ConnectionGuard | None = None
        self.database_up = True  # whether the watcher's last tick reached the database

    def _end_later(self, device_id: str) -> None:
        # Let the 4.01 go out on the session first, then close it.
        asyncio.get_running_loop().call_later(0.05, self._end_sessions, device_id)

    def _end_sessions(self, device_id: str) -> int:
        if self.ctx is None or self.guard is None:
            return 0
        ended = self.guard.end_sessions(label_of(device_id))
        if ended:
            log.info("ended %d session(s) of %s", ended, device_id)
        return ended

    async def reload_credentials(self, *, initial: bool = False) -> None:
        """Make the credentials match the store's active devices; end revoked ones' sessions.

        Only the PSKs of devices new to the credentials are read and decrypted: a PSK never
        changes while its device is active (ids are never reused), and the change poll calls this
        after every change, rotations included, so decrypting every device's PSK each time would
        cost the event loop time in proportion to the devices."""
        active = await self.store.active_device_ids()
        current = self.creds.device_ids()
        psks = await self.store.active_psks(active - current) if active - current else {}
        for device_id in sorted(psks.keys()):
            try:
                self.creds.set_device(device_id, psks[device_id])
            except ValueError as exc:
                log.warning("device %s cannot connect: %s", device_id, exc)
                continue
            if not initial:
                log.info("device %s may connect", device_id)
        for device_id in sorted(current - active):
            self.creds.remove_device(device_id)
            self.endpoints.forget(device_id)
            log.info("device %s is no longer active: credentials removed", device_id)
            self._end_sessions(device_id)
        psks.clear()

    async def schedule(self, now: int) -> bool:
        """Expire grants, rotate what is due, destroy what is past retention; whether anything
        was done. Each duty decides inside its write transaction whether it is still due, so
        that with several instances on one database (or the admin CLI's ``rotate --due``
        meanwhile) each is done once, by whoever takes the write lock first."""
        done = False
        for consumer_id, rotated in await self.store.expire_grants(now):
            log.info("grant of %s expired; rotated %s", consumer_id, ", ".join(rotated) or "none")
            done = True
            if self.metrics is not None:
                self.metrics.grants_expired.inc()
                for resource_id in rotated:
                    if "#" not in resource_id:  # "resource#part": a part's rotation
                        self.metrics.rotated(resource_id, "grant expired")
        for resource_id in await self.store.due_rotations(now):
            try:
                epoch = await self.store.rotate_if_due(
                    resource_id, now, actor="as", reason="schedule"
                )
            except DatabaseError:
                raise  # the watcher logs it and tries again
            except StoreError as exc:
                done = True
                log.warning("scheduled rotation of %s failed: %s", resource_id, exc)
                continue
            if epoch is None:  # another instance (or the admin CLI) rotated it meanwhile
                continue
            done = True
            log.info("rotated %s to epoch %d (schedule)", resource_id, epoch)
            if self.metrics is not None:
                self.metrics.rotated(resource_id, "schedule")
        for resource_id, part in await self.store.parts.due_rotations(now):
            try:
                epoch = await self.store.parts.rotate_if_due(resource_id, part, now)
            except DatabaseError:
                raise
            except StoreError as exc:
                done = True
                log.warning("scheduled rotation of %s part %s failed: %s", resource_id, part, exc)
                continue
            if epoch is not None:
                done = True
                log.info("rotated %s part %s to epoch %d (schedule)", resource_id, part, epoch)
        for resource_id, epoch in await self.store.destroy_expired(now, self.options.retention):
            log.info("destroyed epoch %d of %s (retention over)", epoch, resource_id)
            done = True
            if self.metrics is not None:
                self.metrics.destroyed.inc()
        return done

    async def watch(self) -> None:
        """Poll for changes (admin CLI, scheduler) and run the schedule, until cancelled.

        While the database cannot be reached (PostgreSQL stopped or restarting) each tick fails
        at once (the backend connects again no sooner than its backoff allows): one warning
        when it goes away, one info line when it is back, and the credentials and observers
        brought up to date then."""
        seen = await self.store.changes()
        next_schedule = 0.0
        unavailable = False
        while True:
            await asyncio.sleep(self.options.tick)
            try:
                changes = await self.store.changes()
                self.database_up = True
                if unavailable:
                    unavailable = False
                    log.info("the database is reachable again")
                    if self.metrics is not None:
                        self.metrics.database_up.set(value=1)
                    seen = -1  # whatever changed meanwhile: reload
                if changes != seen:
                    seen = changes
                    await self.reload_credentials()
                    await self.site.refresh()
                if time.monotonic() >= next_schedule:
                    next_schedule = time.monotonic() + 1.0
                    if await self.schedule(_wall_clock()):
                        # Notified at once; the change poll would also see it, a tick later.
                        await self.site.refresh()
                    self.limit.prune(time.monotonic())
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as exc:
                self.database_up = False
                if self.metrics is not None:
                    self.metrics.database_up.set(value=0)
                if not unavailable:
                    unavailable = True
                    log.warning(
                        "the database is unavailable (%s); answering 5.03 and connecting again",
                        exc,
                    )
            except Exception:
                # A locked or briefly unavailable database must not stop the server.
                log.exception("background work failed; retrying")

    def facts(self) -> dict[str, Any]:
        """What the heartbeat says of this instance (counts and flags, never a name or secret)."""
        return {
            "database": self.database_up,
            "connections": 0 if self.guard is None else len(self.guard),
            "devices": len(self.creds.device_ids()),
            "observations": len(self.site.observed()),
        }

    async def heartbeat(self, me: Instance) -> None:
        """Write ``me``'s row every ``heartbeat`` seconds, until cancelled. A beat the database
        does not take is skipped: the next one tries again (logged once until one succeeds)."""
        failing = False
        while True:
            try:
                await self.store.beat(replace(me, seen_at=time.time(), facts=self.facts()))
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never stops the server
                if not failing:
                    failing = True
                    log.warning("heartbeat not written (%s); trying again", type(exc).__name__)
            await asyncio.sleep(self.options.heartbeat)


async def serve(
    state_dir: Path,
    host: str,
    port: int,
    options: ServeOptions = ServeOptions(),  # frozen, so sharing it is safe
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    tune_gc: bool = False,
    database: str | None = None,
    metrics: tuple[str, int] | None = None,
    per_resource_metrics: bool = False,
) -> None:
    """Serve the AS on ``coaps://host:port`` until ``stop`` is set or the task is cancelled.

    ``tune_gc`` (the daemon's, not for a process that does other work): once serving, freeze the
    start-up objects out of garbage collection and collect the young generation per 50,000
    allocations rather than 700. aiocoap keeps every exchange (about 17 objects) for 247 s to spot
    duplicates, so under load the heap holds requests/s x 247 s objects, and each of CPython's
    full collections stopped the AS for 230-420 ms: p99 grant latency at 50 clients went from
    571 ms to 41-60 ms with this (issue 7, ``bench as_grants``).

    Raises ValueError for a port outside 2..65535 or an address aiocoap cannot bind (the any
    address), :class:`StoreError` for an unusable state directory, OSError if the port is taken.
    ``database``: the AS database's URL, if not the one the state directory records.
    ``metrics``: (host, port) to serve Prometheus metrics on (:mod:`authz_server.metrics`), with
    resource names in labels if ``per_resource_metrics``; RuntimeError without the ops extra.
    """
    if type(port) is not int or not 2 <= port <= 65535:
        raise ValueError("the DTLS port must be between 2 and 65535")
    store = await Store.open(Path(state_dir), database=database)
    server: _Server | None = None
    tasks: list[asyncio.Task[None]] = []
    me: Instance | None = None
    exporter: MetricsServer | None = None
    try:
        ca = await CertificateAuthority.load(store)
        as_metrics = None if metrics is None else AsMetrics(per_resource=per_resource_metrics)
        server = _Server(store, ca, options, as_metrics)
        await server.reload_credentials(initial=True)
        # tinydtls_server serves DTLS on the bind port + 1 and binds nothing on the bind port.
        ensure_port_free(host, port)
        server.ctx = await Context.create_server_context(
            server.site,
            bind=(host, port - 1),
            transports=["tinydtls_server"],
            server_credentials=server.creds,
        )
        ensure_alone_on_port(host, port)
        server.guard = ConnectionGuard(
            server.ctx, cap=options.max_connections, pinned=server.site.has_observation
        )
        if metrics is not None and as_metrics is not None:
            as_metrics.watch(server.guard, server.creds, server.site)
            exporter = await serve_metrics(as_metrics.metrics, *metrics)
            log.info("metrics at http://%s/metrics", _joined(exporter.host, exporter.port))
        started = time.time()
        me = Instance(
            secrets.token_hex(8), _joined(host, port), socket.gethostname(), os.getpid(),
            started, started, float(options.heartbeat),
        )  # fmt: skip
        tasks = [
            asyncio.create_task(server.heartbeat(me), name="oscar-as heartbeat"),
            asyncio.create_task(server.guard.run(), name="oscar-as connection guard"),
            asyncio.create_task(server.watch(), name="oscar-as watcher"),
            asyncio.create_task(
                keep_audit(store, options.audit_retention, options.audit_prune_every),
                name="oscar-as audit retention",
            ),
        ]
        if tune_gc:
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)
        log.info(
            "serving coaps://%s:%d (%d devices may connect)",
            f"[{host}]" if ":" in host else host,
            port,
            len(server.creds.device_ids()),
        )
        if ready is not None:
            ready.set()
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        if exporter is not None:
            await exporter.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server is not None and server.ctx is not None:
            if server.guard is not None:
                server.guard.drain()
                server.guard.uninstall()
            await server.ctx.shutdown()
        if me is not None:  # a clean stop: the console no longer lists it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.remove_instance(me.id), 5.0)
        await store.close()
        if tasks:  # it served
            log.info("stopped")
