"""The shared state of a proxy cluster, in a Redis-protocol server (Redis >= 7 or Valkey).

The instances of one proxy identity (one bundle; each its own state directory and listen address)
run with ``--cluster redis://HOST:PORT/DB`` and share, through :class:`ClusterStore`:

- **the cache**: ``oscar:o:<id>``, the entry (:meth:`~proxy.entry.Entry.to_cbor`) sealed by
  :class:`oscar_io.sealing.Sealer` with ``<id>`` as its context, expiring at the object's ``exp``
  (it may not be served after). ``<id>`` is 16 bytes of HMAC-SHA256 of the resource id (hex):
  neither a name nor an object byte is in clear, and a value moved to another key does not open;
- **anti-rollback memory**: ``oscar:v:<id>``, the newest (epoch, seq) any instance stored, as 32
  hex digits; :meth:`ClusterStore.put` compares and writes it with the entry in one script, so no
  instance stores (or serves, see :mod:`proxy.core`) older than any instance has seen;
- **events**: every new object is published on ``oscar:events`` with its sealed entry, so each
  instance's memory layer takes it (and notifies its observers) without a read; a released fetch
  lock is published too, so that waiting instances look again at once;
- **upstream work**: ``oscar:l:<id>``, a single-flight lock per (resource, upstream) with an expiry
  (:meth:`~ClusterStore.lock`); ``oscar:r:<id>``, the lease of the one instance that holds the
  upstream observation of a (resource, upstream), renewed while it lives
  (:meth:`~ClusterStore.lease`): when it dies, the lease runs out within :data:`LEASE_TTL` and
  another instance's relay takes over;
- **budgets**: ``oscar:b:<id>``, token buckets of certificate lookups (:mod:`proxy.lookups`),
  per origin and in all, spent by a script (the server's clock);
- **counters**: ``oscar:n:<instance>``, each instance's counters (JSON, no name in them),
  expiring unless renewed; :attr:`ClusterStore.totals` sums them.
- ``oscar:cluster``: a check value of the storage key. A database that holds another cluster's
  check value (another bundle) or keys that are not a cluster's is refused at start.

The keys come from the proxy's storage key (:meth:`~oscar_io.bundle.Bundle.state_key`, derived
from the bundle every instance holds): the Redis server, its operator and its dumps see hashes,
versions, sealed blobs, instance ids and counters, never a key.

When the server cannot be reached, every call raises :class:`ClusterUnavailable` at once (one
log line per outage, ``refused`` counted); a monitor pings it, and when it answers the store
resynchronizes (check value, subscription, then :attr:`on_resync`) before it is used again.

What this module does not do: decide what to store or serve (:mod:`proxy.core`), or verify.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from oscar import cbor
from oscar.keys import hkdf_sha256
from oscar_io.errors import StateError
from oscar_io.sealing import Sealer, SealError
from oscar_io.tasks import stop_tasks
from oscar_io.urls import redacted

from .entry import Entry
from .redisio import COMMAND_TIMEOUT, LEASE, PUT, RELEASE, TAKE, UNLOCK, is_outage, reason
from .redisio import connect as _default_connect

__all__ = [
    "LEASE_TTL",
    "ClusterError",
    "ClusterStats",
    "ClusterStore",
    "ClusterUnavailable",
    "Verdict",
]

log = logging.getLogger("oscar.proxy")

PREFIX = "oscar:"
CHECK_KEY = PREFIX + "cluster"
CHANNEL = PREFIX + "events"
#: How long a relay's lease lasts unless renewed (renewed every :data:`LEASE_RENEW`).
LEASE_TTL = 2.0
LEASE_RENEW = 0.5
#: How often a down server is pinged, and counters are reported.
PING_EVERY = 0.5
REPORT_EVERY = 2.0
_OBJECT, _UNLOCK = b"o", b"u"


class ClusterError(StateError):
    """The cluster store cannot be used at start: unreachable, refused our credentials, or holds
    another cluster's data (the proxy does not start)."""


class ClusterUnavailable(Exception):
    """The cluster store cannot be reached now: what needs it is refused (counted)."""


class Verdict(IntEnum):
    """What :meth:`ClusterStore.put` did."""

    OLDER = 0
    SAME = 1
    NEW = 2


@dataclass
class ClusterStats:
    reads: int = 0
    writes: int = 0
    #: New objects other instances stored, taken from the events.
    events: int = 0
    #: Waits for another instance's upstream fetch (single flight).
    waits: int = 0
    #: Calls refused because the store could not be reached.
    refused: int = 0
    outages: int = 0
    leases_taken: int = 0
    #: Upstream observations this instance holds the lease of now (the others stand by).
    leases_held: int = 0


@dataclass(frozen=True, slots=True)
class Lock:
    key: str
    token: str


def _version(entry: Entry) -> str:
    return f"{entry.epoch:016x}{entry.seq:016x}"


class ClusterStore:
    """One instance's view of the cluster store (see the module docstring)."""

    def __init__(
        self,
        url: str,
        storage_key: bytes,
        *,
        clock: Callable[[], float] = time.time,
        connect: Callable[..., Any] | None = None,
        password: str | None = None,
    ) -> None:
        """``password``: the store's, if not in ``url`` (never shown; it wins over the URL's)."""
        self.url = url
        self.where = redacted(url)
        self._sealer = Sealer(hkdf_sha256(storage_key, b"OSCAR proxy cluster data", 32))
        self._index_key = hkdf_sha256(storage_key, b"OSCAR proxy cluster index", 32)
        self._check = hmac.new(self._index_key, b"OSCAR proxy cluster check", "sha256").hexdigest()
        self.instance = secrets.token_hex(8)
        self._clock = clock
        self._connect = connect or _default_connect
        self._password = password
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self.stats = ClusterStats()
        self.up = False
        #: Cluster-wide sums of every live instance's counters (and ``instances``).
        self.totals: dict[str, int] = {}
        #: Called with each new object another instance stored (decoded, not yet verified
        #: against this instance's memory: the caller compares versions).
        self.on_object: Callable[[Entry], None] = lambda entry: None
        #: Called once the store is reachable again, before it is used (resynchronization).
        self.on_resync: Callable[[], Awaitable[None]] | None = None
        #: This instance's counters, reported every :data:`REPORT_EVERY` seconds.
        self.counters: Callable[[], dict[str, int]] = dict
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._monitor: asyncio.Task[None] | None = None
        #: A subscription made by the monitor before the store is used again, for the listener.
        self._fresh: Any = None
        self._lock_count = 0

    def __repr__(self) -> str:
        return f"ClusterStore({self.where!r}, up={self.up})"

    # --- life cycle ---

    async def open(self) -> None:
        """Connect, check the database is this cluster's (or empty), subscribe to the events.
        :class:`ClusterError` with one clear line otherwise."""
        try:
            self._redis = self._connect(self.url, password=self._password)
        except (ValueError, TypeError) as exc:  # redis-py's URL parsing
            raise ClusterError(f"bad cluster URL {self.where}: {reason(exc)}") from None
        for name, text in (
            ("put", PUT),
            ("unlock", UNLOCK),
            ("lease", LEASE),
            ("release", RELEASE),
            ("take", TAKE),
        ):
            self._scripts[name] = self._redis.register_script(text)
        try:
            await self._claim()
        except ClusterError:
            await self._close_client()
            raise
        except Exception as exc:
            await self._close_client()
            raise ClusterError(
                f"cannot use the cluster store {self.where}: {reason(exc)}"
            ) from None
        try:
            pubsub = await self._subscribe()
        except Exception as exc:
            await self._close_client()
            raise ClusterError(
                f"cannot use the cluster store {self.where}: {reason(exc)}"
            ) from None
        self.up = True
        self._tasks.append(asyncio.create_task(self._listen(pubsub), name="cluster events"))
        self._tasks.append(asyncio.create_task(self._report(), name="cluster counters"))
        log.info("cluster store %s (instance %s)", self.where, self.instance)

    async def _claim(self) -> None:
        """Make the database this cluster's, or refuse one that holds another's data."""
        redis = self._redis
        info = await redis.info("server")
        major = int(str(info.get("redis_version", "0")).split(".")[0] or 0)
        if major < 7:
            raise ClusterError(f"{self.where} runs Redis {info.get('redis_version')}; 7 or later")
        if await redis.set(CHECK_KEY, self._check, nx=True):
            # A cluster's own keys without the check value: the store came back empty and
            # another instance, back first, already wrote; another cluster has its check value.
            others = [
                k async for k in redis.scan_iter(count=100) if not k.startswith(PREFIX.encode())
            ]
            if others:
                await redis.delete(CHECK_KEY)
                raise ClusterError(
                    f"{self.where} holds keys that are not a proxy cluster's; "
                    "give the cluster a database of its own"
                )
            return
        found = await redis.get(CHECK_KEY)
        if found is None or not hmac.compare_digest(found, self._check.encode()):
            raise ClusterError(
                f"{self.where} holds another proxy cluster's data (made under another bundle); "
                "give each cluster a database of its own"
            )

    async def close(self) -> None:
        self.up = False
        tasks = self._tasks + ([self._monitor] if self._monitor is not None else [])
        await stop_tasks(tasks)
        self._tasks.clear()
        self._monitor = None
        await self._drop_fresh()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.delete(PREFIX + "n:" + self.instance)
        await self._close_client()

    async def _close_client(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    # --- reachability ---

    async def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """Run one command; :class:`ClusterUnavailable` (at once while the store is down)."""
        if not self.up:
            self.stats.refused += 1
            raise ClusterUnavailable(f"the cluster store {self.where} is unreachable")
        try:
            return await make()
        except Exception as exc:
            from redis.exceptions import RedisError

            if is_outage(exc):
                self._down(exc)
                why = "is unreachable"
            elif isinstance(exc, RedisError):  # reachable, but refuses (out of memory, ACL)
                log.error("the cluster store %s refused a command: %s", self.where, reason(exc))
                why = "refused a command"
            else:
                raise
            self.stats.refused += 1
            raise ClusterUnavailable(f"the cluster store {self.where} {why}") from None

    def _down(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self.stats.outages += 1
        log.warning(
            "cluster store %s unreachable (%s): serving what this instance holds, refusing "
            "what needs the cluster",
            self.where,
            reason(exc),
        )
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch(), name="cluster monitor")

    async def _watch(self) -> None:
        """Ping the store until it answers, then resynchronize and serve from it again."""
        refused = ""  # why the store was last refused: said once, not at every ping
        while True:
            await asyncio.sleep(PING_EVERY)
            try:
                await self._redis.ping()
                await self._claim()
                # subscribed before anything is stored again: no event of the others is missed
                fresh = await self._subscribe()
            except ClusterError as exc:
                if str(exc) != refused:
                    refused = str(exc)
                    log.error("%s; the cluster stays unavailable", exc)
                continue
            except Exception as exc:
                if is_outage(exc):
                    continue
                log.error("the cluster store %s fails: %s", self.where, reason(exc))
                continue
            await self._drop_fresh()
            self._fresh = fresh
            self.up = True
            if self.on_resync is not None:
                try:
                    await self.on_resync()
                except ClusterUnavailable:
                    continue  # down again: the next outage starts another monitor
            log.info("cluster store %s reachable again; resynchronized", self.where)
            self._monitor = None
            return

    # --- ids ---

    def _id(self, *parts: str) -> str:
        text = "\x00".join(parts).encode()
        return hmac.new(self._index_key, text, hashlib.sha256).hexdigest()[:32]

    # --- the cache and anti-rollback memory ---

    def _seal(self, entry: Entry, key_id: str) -> bytes:
        return self._sealer.seal(cbor.dumps(entry.to_cbor()), key_id.encode())

    def _open(self, blob: bytes, key_id: str, resource_id: str | None) -> Entry | None:
        try:
            entry = Entry.from_cbor(cbor.loads(self._sealer.open(blob, key_id.encode())))
        except (SealError, ValueError):
            log.error("a cluster cache entry fails authentication; ignored")
            return None
        if resource_id is not None and entry.resource_id != resource_id:
            log.error("a cluster cache entry is filed under another resource; ignored")
            return None
        if resource_id is None and self._id(entry.resource_id) != key_id:
            log.error("a cluster event names another entry than it carries; ignored")
            return None
        return entry

    async def get(self, resource_id: str) -> Entry | None:
        """The entry any instance stored for ``resource_id``; None for a miss or a bad value."""
        key_id = self._id(resource_id)
        blob = await self._call(lambda: self._redis.get(PREFIX + "o:" + key_id))
        self.stats.reads += 1
        return None if blob is None else self._open(blob, key_id, resource_id)

    async def put(self, entry: Entry, *, refresh: bool = False) -> Verdict:
        """Store ``entry`` unless an instance stored a newer version of its resource; a new one
        is published to every instance. ``refresh``: rewrite the entry of the same version (its
        freshness renewed)."""
        key_id = self._id(entry.resource_id)
        blob = self._seal(entry, key_id)
        now_ms = int(self._clock() * 1000)
        entry_until = max(entry.exp * 1000, now_ms + 1000)
        version_until = max(entry_until, now_ms) + 7 * 86_400_000
        message = _OBJECT + self.instance.encode() + key_id.encode() + blob
        args = [
            _version(entry),
            blob,
            entry_until,
            version_until,
            CHANNEL,
            message,
            "1" if refresh else "0",
        ]
        keys = [PREFIX + "v:" + key_id, PREFIX + "o:" + key_id]
        result = await self._call(lambda: self._scripts["put"](keys=keys, args=args))
        self.stats.writes += 1
        return Verdict(int(result))

    # --- single flight ---

    async def lock(self, resource_id: str, source: str, ttl: float) -> Lock | None:
        """The fetch lock of (``resource_id``, ``source``) for ``ttl`` seconds, or None if
        another instance holds it."""
        key = PREFIX + "l:" + self._id(resource_id, source)
        self._lock_count += 1
        token = f"{self.instance}:{self._lock_count}"
        px = max(1, int(ttl * 1000))
        taken = await self._call(lambda: self._redis.set(key, token, nx=True, px=px))
        return Lock(key, token) if taken else None

    async def unlock(self, lock: Lock) -> None:
        message = _UNLOCK + self.instance.encode() + lock.key.encode()
        with contextlib.suppress(ClusterUnavailable):  # it expires on its own
            await self._call(
                lambda: self._scripts["unlock"](
                    keys=[lock.key], args=[lock.token, CHANNEL, message]
                )
            )

    async def changed(self, resource_id: str, source: str, timeout: float) -> None:
        """Wait until a new object of ``resource_id`` arrives, the fetch lock of
        (``resource_id``, ``source``) is released, or ``timeout`` seconds pass."""
        self.stats.waits += 1
        names = [
            PREFIX + "o:" + self._id(resource_id),
            PREFIX + "l:" + self._id(resource_id, source),
        ]
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for name in names:
            self._waiters.setdefault(name, []).append(future)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            for name in names:
                waiting = self._waiters.get(name)
                if waiting is not None:
                    with contextlib.suppress(ValueError):
                        waiting.remove(future)
                    if not waiting:
                        del self._waiters[name]

    def _wake(self, name: str) -> None:
        for future in self._waiters.pop(name, ()):
            if not future.done():
                future.set_result(None)

    # --- relays ---

    async def lease(self, resource_id: str, source: str) -> bool:
        """Take (or renew) the lease of the upstream observation of (``resource_id``,
        ``source``) for :data:`LEASE_TTL`; False while another instance holds it."""
        key = PREFIX + "r:" + self._id(resource_id, source)
        ttl = int(LEASE_TTL * 1000)
        held = await self._call(
            lambda: self._scripts["lease"](keys=[key], args=[self.instance, ttl])
        )
        return bool(held)

    async def release(self, resource_id: str, source: str) -> None:
        key = PREFIX + "r:" + self._id(resource_id, source)
        with contextlib.suppress(ClusterUnavailable):  # it expires on its own
            await self._call(lambda: self._scripts["release"](keys=[key], args=[self.instance]))

    # --- budgets ---

    async def take(self, budget: str, per_budget: int, total: int) -> bool:
        """Spend one lookup of ``budget`` (and of the cluster's total): token buckets of
        ``per_budget`` and ``total`` per minute. False (nothing spent) if either is empty."""
        keys = [PREFIX + "b:" + self._id("budget", budget), PREFIX + "b:total"]
        taken = await self._call(lambda: self._scripts["take"](keys=keys, args=[per_budget, total]))
        return bool(taken)

    # --- events ---

    async def _subscribe(self) -> Any:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        return pubsub

    async def _drop_fresh(self) -> None:
        if self._fresh is not None:
            with contextlib.suppress(Exception):
                await self._fresh.aclose()
            self._fresh = None

    async def _listen(self, pubsub: Any) -> None:
        """Take the events of the other instances, on the subscription the monitor made after
        an outage (made before the store is used again: an event published once it is back is
        not lost while this task waits to notice)."""
        while True:
            try:
                if pubsub is None:
                    pubsub, self._fresh = self._fresh, None
                    if pubsub is None:
                        await asyncio.sleep(PING_EVERY / 5)
                        continue
                while self._fresh is None:
                    # bounded waits: the connection's socket timeout is for commands
                    message = await pubsub.get_message(timeout=COMMAND_TIMEOUT / 2)
                    if message is not None and message.get("type") == "message":
                        self._event(bytes(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_outage(exc):
                    self._down(exc)
                else:
                    log.error("reading the cluster events failed: %s", reason(exc))
                await asyncio.sleep(PING_EVERY)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                    pubsub = None

    def _event(self, data: bytes) -> None:
        kind, sender, rest = data[:1], data[1:17], data[17:]
        if kind == _UNLOCK:
            self._wake(rest.decode(errors="replace"))
            return
        if kind != _OBJECT or len(rest) < 32:
            return
        key_id = rest[:32].decode(errors="replace")
        if sender != self.instance.encode():
            entry = self._open(rest[32:], key_id, None)
            if entry is not None:
                self.stats.events += 1
                self.on_object(entry)
        self._wake(PREFIX + "o:" + key_id)

    # --- counters ---

    async def _report(self) -> None:
        """Every :data:`REPORT_EVERY` seconds: this instance's counters in, the sums out."""
        while True:
            with contextlib.suppress(ClusterUnavailable):
                await self.report()
            await asyncio.sleep(REPORT_EVERY)

    async def report(self) -> dict[str, int]:
        """Write this instance's counters and read the cluster's sums (also :attr:`totals`)."""
        mine = PREFIX + "n:" + self.instance
        doc = json.dumps(self.counters())

        async def exchange() -> list[Any]:
            await self._redis.set(mine, doc, ex=int(REPORT_EVERY * 5))
            names = [k async for k in self._redis.scan_iter(match=PREFIX + "n:*", count=100)]
            return list(await self._redis.mget(names)) if names else []

        values = await self._call(exchange)
        totals: dict[str, int] = {"instances": 0}
        for value in values:
            if value is None:
                continue
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                for name, number in json.loads(value).items():
                    if type(number) is int:
                        totals[name] = totals.get(name, 0) + number
                totals["instances"] += 1
        self.totals = totals
        return totals
