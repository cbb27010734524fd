"""A proxy cluster on loopback for the tests: real processes on one private Redis, no mocks.

:func:`cluster_world` builds, for a module, one :class:`ClusterWorld`:

- a private ``redis-server`` (:class:`redis_harness.RedisServer`, memory only);
- an AS with its devices (:class:`system_harness.Deployment`): the producers ``meter`` (real,
  ``python -m producer``, a short ``--max-age``) and ``sensor`` (objects sealed by the test and
  published or served by a stand-in), the consumer ``c1``, the proxies ``cache-1`` (the cluster's
  identity) and ``cache-2`` (another identity, for a foreign cluster);
- the meter behind a :class:`GatedRelay` (a :class:`proxy_harness.CountingRelay` whose upstream
  can be cut: requests still counted, none forwarded), so every upstream request of the cluster
  is counted and the producer can be made unreachable without a restart;
- a :class:`proxy_harness.StandIn` producer for forward proxying (Proxy-Uri);
- THREE :class:`proxy_harness.ProxyProcess` instances of the one bundle ``cache-1``, each its own
  state directory and port, all with ``--cluster <redis url>`` and ``--reverse meter=<relay>``.

Helpers read each instance's counters (:meth:`ClusterWorld.stats`), make consumers with a copy
of a warm state (:meth:`ClusterWorld.consumers`) and a DTLS client context that reaches every
instance (:meth:`ClusterWorld.dtls`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiocoap import Context
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives import serialization
from proxy_harness import CountingRelay, ProxyProcess, StandIn
from redis_harness import RedisServer
from system_harness import Deployment, ProducerProcess, coap_get, wait_until

from consumer import Consumer
from oscar import Sealer, certs
from oscar.algorithms import PrivateKey
from oscar_io.asclient import AsClient
from oscar_io.aswire import KeyState
from oscar_io.bundle import Bundle
from proxy.cluster import ClusterStore

__all__ = ["INSTANCES", "PROXY_ID", "ClusterWorld", "GatedRelay", "cluster_world"]

PROXY_ID = "cache-1"
OTHER_PROXY = "cache-2"
INSTANCES = 3
#: The sensor's resources (registered at the AS; objects sealed by the test).
SENSOR_RESOURCES = ("published-reading", "fetched-reading")


class GatedRelay(CountingRelay):
    """A :class:`CountingRelay` whose upstream can be cut (``gate_open = False``): the requests
    that reach it are still counted, but none goes on to the producer (it looks stopped)."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.gate_open = True

    def from_client(self, data: bytes, addr: Any) -> None:
        if self.gate_open:
            super().from_client(data, addr)
            return
        self._upstream, kept = _Discard(), self._upstream  # counted, not forwarded
        try:
            super().from_client(data, addr)
        finally:
            self._upstream = kept


class _Discard:
    def sendto(self, data: bytes) -> None:
        pass


@dataclass
class ClusterWorld:
    root: Path
    d: Deployment
    redis: RedisServer
    producer: ProducerProcess
    relay: GatedRelay
    standin: StandIn
    proxies: list[ProxyProcess]
    sensor_key: PrivateKey
    keys: dict[str, KeyState]
    links: dict[str, bytes]
    warm: Path
    files: dict[str, Path]
    #: Every object the test saw served or sealed, and every plaintext (for the leak scans).
    objects: list[bytes] = field(default_factory=list)
    plaintexts: list[bytes] = field(default_factory=list)
    _seq: int = 100

    @property
    def bundle(self) -> Path:
        return self.root / f"{PROXY_ID}.json"

    def proxy_args(self, cluster: str) -> list[str]:
        """The arguments of an instance of the cluster (``--cluster``, the reverse map)."""
        return ["--cluster", cluster, "--reverse", f"meter={self.relay.address}"]

    async def stats(self, proxy: ProxyProcess | int) -> dict[str, int]:
        """One instance's counters (``/.well-known/oscar-stats``, from loopback)."""
        if isinstance(proxy, int):
            proxy = self.proxies[proxy]
        response = await coap_get(proxy.uri(".well-known/oscar-stats"))
        assert response.code == Code.CONTENT, response
        doc: dict[str, int] = json.loads(response.payload)
        return doc

    async def all_stats(self) -> list[dict[str, int]]:
        return list(await asyncio.gather(*(self.stats(p) for p in self.proxies)))

    def consumers(self, n: int, tag: str) -> list[Consumer]:
        """``n`` library consumers (c1), each with its own copy of the warm state."""
        out = []
        for i in range(n):
            state = self.root / f"{tag}-{i}"
            shutil.copytree(self.warm, state)
            out.append(Consumer(self.root / "c1.json", state))
        return out

    async def dtls(self, identity: str, *more: ProxyProcess) -> Context:
        """A DTLS client context for ``identity`` (its link key) to every instance (and to
        ``more`` proxies)."""
        ctx = await Context.create_client_context(transports=["tinydtls"])
        credentials = {"dtls": {"psk": self.links[identity], "client-identity": identity.encode()}}
        ctx.client_credentials.load_from_dict(
            {f"{p.secure_address}/*": credentials for p in (*self.proxies, *more)}
            | {"coap://*": credentials}
        )
        return ctx

    def instance(self, state: Path, *args: str, cluster: str | None = None) -> ProxyProcess:
        """Another instance of the cluster's bundle (not started), on ``cluster`` (by default
        the world's Redis)."""
        return ProxyProcess(
            self.bundle, state, "--config", str(self.root / "proxy.toml"),
            *self.proxy_args(cluster or self.redis.url), *args,
        )  # fmt: skip

    def entry_key(self, resource_id: str) -> str:
        """The Redis key of ``resource_id``'s shared entry (a keyed hash of its name), as the
        instances compute it from the bundle's storage key."""
        key = Bundle.load(self.bundle).state_key("proxy storage")
        return "oscar:o:" + ClusterStore(self.redis.url, key)._id(resource_id)

    def seal(self, resource_id: str, plaintext: bytes, *, seq: int | None = None) -> bytes:
        """An object of a ``sensor`` resource (the next seq unless ``seq`` is given)."""
        if seq is None:
            self._seq += 1
            seq = self._seq
        state = self.keys[resource_id]
        t = int(time.time())
        obj = Sealer(
            secret=state.active.secret,
            producer_id="sensor",
            resource_id=resource_id,
            epoch=state.active.epoch,
            signing_key=self.sensor_key,
        ).seal(seq=seq, iat=t, exp=t + 600, content_format=0, plaintext=plaintext)
        self.objects.append(obj)
        self.plaintexts.append(plaintext)
        return obj


async def _devices(root: Path) -> tuple[PrivateKey, dict[str, KeyState], dict[str, bytes]]:
    sensor = AsClient(Bundle.load(root / "sensor.json"))
    reader = AsClient(Bundle.load(root / "c1.json"))
    key = certs.generate_signing_key()
    try:
        csr = certs.make_csr(key, "sensor").public_bytes(serialization.Encoding.DER)
        await sensor.request_certificate(csr)
        keys = {}
        for path in SENSOR_RESOURCES:
            await sensor.register(
                path, content_format=0, profile="ccm-es256", max_age=60, rotation_period=0
            )
            keys[f"sensor/{path}"] = await sensor.keys(f"sensor/{path}")
        links = {"sensor": await sensor.link(PROXY_ID), "c1": await reader.link(PROXY_ID)}
    finally:
        await sensor.close()
        await reader.close()
    return key, keys, links


@asynccontextmanager
async def cluster_world(
    root: Path, *, max_age: int, instances: int = INSTANCES
) -> AsyncIterator[ClusterWorld]:
    """The world of the module docstring, torn down (every process killed) on exit."""
    redis = RedisServer()
    d = Deployment(root)
    producer: ProducerProcess | None = None
    relay: GatedRelay | None = None
    standin: StandIn | None = None
    proxies: list[ProxyProcess] = []
    try:
        await asyncio.to_thread(redis.start)
        for device_id, role in [
            ("meter", "producer"),
            ("sensor", "producer"),
            ("c1", "consumer"),
            (PROXY_ID, "proxy"),
            (OTHER_PROXY, "proxy"),
        ]:
            await asyncio.to_thread(d.enroll, role, device_id)
        for pattern in ("meter/*", "sensor/*"):
            await asyncio.to_thread(d.grant, "c1", pattern)
        await asyncio.to_thread(d.start_as)
        files = {"power": root / "power.txt", "energy": root / "energy.txt"}
        files["power"].write_bytes(b"power 100 W")
        files["energy"].write_bytes(b"energy 1 kWh")
        producer = ProducerProcess(
            root / "meter.json",
            root / "meter",
            *(arg for name, path in files.items() for arg in ("--resource", f"{name}={path}")),
            "--interval",
            "0.05",
            "--max-age",
            str(max_age),
        )
        await asyncio.to_thread(producer.start)
        relay = await GatedRelay(producer.port).start()
        standin = await StandIn().start()
        sensor_key, keys, links = await _devices(root)
        config = root / "proxy.toml"
        config.write_text("[limits]\nupstream_timeout = 1.0\nupstream_backoff = 1.0\n")
        world = ClusterWorld(
            root, d, redis, producer, relay, standin, proxies, sensor_key, keys, links,
            root / "warm", files,
        )  # fmt: skip
        proxies += [world.instance(root / f"instance-{i}") for i in range(instances)]
        await asyncio.to_thread(wait_until, lambda: producer.log().count("now sealing") >= 2, 20)
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in proxies))
        async with Consumer(root / "c1.json", world.warm) as warm:
            for path in files:  # warm state: certificates, CRL, secrets of the meter
                await warm.get(producer.uri(f"meter/{path}"))
            for rid in keys:  # and the secrets of the sensor resources
                await warm.open_object(world.seal(rid, b"warm-up", seq=1), rid)
        yield world
    finally:
        for proxy in proxies:
            proxy.kill()
        if producer is not None:
            producer.kill()
        if relay is not None:
            relay.close()
        if standin is not None:
            await standin.close()
        d.close()
        redis.stop()
