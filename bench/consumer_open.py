"""Consumer verify + decrypt per second, against the bare primitives through ``cryptography``.

A real AS process with a producer and a consumer enrolled (admin CLI) and the consumer granted
the producer's resources. The producer side runs here: it makes its ES256 key, gets its
certificate from the AS (``POST /cert``), registers three resources and takes their secrets
(``GET /keys``) through :class:`oscar_io.asclient.AsClient`, then seals a pool of objects with
increasing ``seq`` with :class:`oscar.Sealer`, as the producer process does. Cases: the default
profile ``ccm-es256`` at 64 B and 1 KiB, and ``a128gcm-es256`` at 60 KiB. Per case:

- ``consumer``: :meth:`consumer.Consumer.open_object` of a consumer with a state directory (under
  the system's temporary directory): decode, signer certificate (cached), signature, revocation
  (cached CRL), freshness, secret (cached), decrypt, and the new freshness state written to disk
  (an fsync'd file) for every new object accepted;
- ``consumer-mem``: the same, with the state in memory only (``state_dir=None``);
- ``ingest`` (issue 17, durable ingest): ``consumer``'s path with :data:`INGEST_WINDOW` objects
  in flight, so that the group commit (:mod:`consumer.commit`) saves many per fsync; its baseline
  is the same window on the consumer in memory, the target :data:`INGEST_TARGET`;
- ``core``: the same checks with the core functions alone: :func:`oscar.open` with a
  :class:`~oscar.ProducerKey` made once from the AS certificate
  (:meth:`~oscar.ProducerKey.from_certificate`), the CA as trust anchor, a
  :class:`~oscar.KeyCache` and a :class:`~oscar.FreshnessState`.

Baseline, measured in the same run by :func:`bench.compare`: an ECDSA P-256 verify of a byte
string the size of the object's Sig_structure, then an AEAD decrypt of a ciphertext the size of
the object's with an AAD the size of its Enc_structure.

The objects are opened in order; when the pool is used up, the freshness state starts over (for
``consumer``, its state file is removed too), so no object is refused as a replay. Fetching the
certificate, CRL and secret from the AS happens once, before timing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM
from cryptography.hazmat.primitives.serialization import Encoding

import oscar
from oscar import certs
from oscar.objects import external_aad
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

from . import Figure, Settings, compare
from .testbed import Testbed

__all__ = ["run"]

PRODUCER = "bench-producer"
CONSUMER = "bench-consumer"
CASES = (("ccm-es256", 64), ("ccm-es256", 1024), ("a128gcm-es256", 60 * 1024))
CONTENT_FORMAT = 0
LIFETIME = 3600
#: Plaintext bytes kept in one pool of sealed objects, and the most objects in a pool.
POOL_BYTES = 16 << 20
POOL_MAX = 2048
#: Readings in flight at once in the ``ingest`` figures, and readings per timed operation.
INGEST_WINDOW = 64
INGEST_BATCH = 256
#: The fewest objects in a pool (half with --quick), so that the ingest window is seldom drained.
INGEST_POOL = 1024
#: Issue 17's target: durable ingest at least half as fast as in memory.
INGEST_TARGET = 0.5

_ECDSA = ec.ECDSA(hashes.SHA256())


def _label(size: int) -> str:
    return f"{size // 1024}KiB" if size >= 1024 and size % 1024 == 0 else f"{size}B"


class _Producer:
    """The producer's side, done here: key, certificate, registered resources and their sealers."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self.private_key = private_key
        self.sealers: dict[str, oscar.Sealer] = {}
        self.certificate = b""

    @classmethod
    async def provision(cls, bundle: Bundle) -> _Producer:
        producer = cls(ec.generate_private_key(ec.SECP256R1()))
        signing_key = oscar.SigningKey.from_private_key(producer.private_key)
        async with AsClient(bundle) as client:
            csr = certs.make_csr(producer.private_key, PRODUCER)
            producer.certificate = await client.request_certificate(csr.public_bytes(Encoding.DER))
            for profile, size in CASES:
                rid, _, _ = await client.register(
                    f"{profile}-{_label(size)}",
                    content_format=CONTENT_FORMAT,
                    profile=profile,
                    max_age=60,
                    rotation_period=3600,
                )
                active = (await client.keys(rid)).active
                producer.sealers[rid] = oscar.Sealer(
                    secret=active.secret,
                    producer_id=PRODUCER,
                    resource_id=rid,
                    epoch=active.epoch,
                    signing_key=signing_key,
                    profile=oscar.profile_by_name(profile),
                )
        return producer


class _Case:
    """One (profile, size): the pool of objects and the bare-primitive inputs of the same sizes."""

    def __init__(self, producer: _Producer, profile: str, size: int, settings: Settings) -> None:
        self.resource_id = f"{PRODUCER}/{profile}-{_label(size)}"
        self.name_part = f"{profile}/{_label(size)}"
        sealer = producer.sealers[self.resource_id]
        self.plaintext = bytes(0x30 + i % 10 for i in range(size))
        pool_size = max(16, min(POOL_MAX, POOL_BYTES // size))
        if settings.quick:
            pool_size = max(16, pool_size // 4)
        now = int(time.time())
        # The ingest figures drain their window whenever the pool starts over: not too often.
        # (Their pool is the same one, longer; the others keep theirs, as their figures have.)
        ingest_size = max(pool_size, INGEST_POOL // (2 if settings.quick else 1))
        self.ingest_pool = [
            sealer.seal(
                seq=seq,
                iat=now,
                exp=now + LIFETIME,
                content_format=CONTENT_FORMAT,
                plaintext=self.plaintext,
            )
            for seq in range(1, ingest_size + 1)
        ]
        self.pool = self.ingest_pool[:pool_size]
        obj = oscar.ProtectedObject.from_bytes(self.pool[0])
        m = obj.metadata
        tbs = cbor2.dumps(["Signature1", obj.sign1.protected, b"", obj.sign1.payload])
        aad = cbor2.dumps(
            ["Encrypt0", obj.encrypt0.protected, external_aad(PRODUCER, m.resource_id, m.epoch, 1)]
        )
        aead = oscar.profile_by_name(profile).aead
        key = bytes(range(aead.key_length))
        self.aead_label = "AESCCM" if aead.name == "AES-CCM-16-64-128" else "AESGCM"
        self.cipher = (
            AESCCM(key, tag_length=aead.tag_length) if self.aead_label == "AESCCM" else AESGCM(key)
        )
        self.nonce = bytes(aead.nonce_length)
        self.aad = bytes(len(aad))
        self.ciphertext = self.cipher.encrypt(self.nonce, self.plaintext, self.aad)
        self.tbs = bytes(len(tbs))
        self.public_key = producer.private_key.public_key()
        self.signature = producer.private_key.sign(self.tbs, _ECDSA)

    def bare_open(self, n: int) -> None:
        """ECDSA verify then AEAD decrypt, n times."""
        public_key, signature, tbs = self.public_key, self.signature, self.tbs
        cipher, nonce, ciphertext, aad = self.cipher, self.nonce, self.ciphertext, self.aad
        for _ in range(n):
            public_key.verify(signature, tbs, _ECDSA)
            cipher.decrypt(nonce, ciphertext, aad)


class _ConsumerOpen:
    """``Consumer.open_object`` over the pool, in order, on the benchmark's event loop."""

    def __init__(self, consumer: Any, case: _Case, loop: asyncio.AbstractEventLoop) -> None:
        self.consumer, self.case, self.loop = consumer, case, loop
        self.index = 0

    def _start_over(self) -> None:
        store = self.consumer.store
        store.freshness = oscar.FreshnessState()
        if store.directory is not None:
            (Path(store.directory) / "freshness").unlink(missing_ok=True)
        self.index = 0

    async def _batch(self, n: int) -> None:
        open_object, pool, rid = self.consumer.open_object, self.case.pool, self.case.resource_id
        for _ in range(n):
            if self.index == len(pool):
                self._start_over()
            reading = await open_object(pool[self.index], rid)
            self.index += 1
        if reading.plaintext != self.case.plaintext:
            raise RuntimeError("the consumer opened something else")

    def __call__(self, n: int) -> None:
        self.loop.run_until_complete(self._batch(n))


class _ConsumerIngest(_ConsumerOpen):
    """``Consumer.open_object`` over the pool, :data:`INGEST_WINDOW` readings in flight at once
    (a consumer observing many resources, or opening a batch); one operation is
    :data:`INGEST_BATCH` readings. The window is drained before the pool starts over and at the
    end of each timed call."""

    def __init__(self, consumer: Any, case: _Case, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(consumer, case, loop)
        self._start_over()  # the one-at-a-time figure before went through this pool

    async def _batch(self, n: int) -> None:
        open_object, pool = self.consumer.open_object, self.case.ingest_pool
        rid = self.case.resource_id
        expected = self.case.plaintext
        left = n * INGEST_BATCH
        in_flight: set[asyncio.Task[Any]] = set()

        async def drain(until: int) -> None:
            nonlocal in_flight
            while len(in_flight) > until:
                done, in_flight = await asyncio.wait(in_flight, return_when="FIRST_COMPLETED")
                for task in done:
                    if task.result().plaintext != expected:
                        raise RuntimeError("the consumer opened something else")

        while left:
            if self.index == len(pool):
                await drain(0)
                self._start_over()
            in_flight.add(asyncio.ensure_future(open_object(pool[self.index], rid)))
            self.index += 1
            left -= 1
            await drain(INGEST_WINDOW - 1)
        await drain(0)


class _CoreOpen:
    """``oscar.open`` over the pool with a ProducerKey from the AS certificate."""

    def __init__(
        self,
        case: _Case,
        signer: oscar.ProducerKey,
        ca: x509.Certificate,
        secret: oscar.AccessSecret,
    ) -> None:
        self.case, self.signer, self.ca = case, signer, ca
        self.cache = oscar.KeyCache(lambda resource_id, epoch: secret)
        self.index = 0
        self.freshness = oscar.FreshnessState()

    def __call__(self, n: int) -> None:
        pool, rid, signer, ca, cache = (
            self.case.pool, self.case.resource_id, self.signer, self.ca, self.cache
        )  # fmt: skip
        index, freshness, count = self.index, self.freshness, len(pool)
        for _ in range(n):
            if index == count:
                index, freshness = 0, oscar.FreshnessState()
            oscar.open(
                pool[index],
                secrets=cache,
                signer=signer,
                now=int(time.time()),
                resource_id=rid,
                freshness=freshness,
                trust_anchor=ca,
            )
            index += 1
        self.index, self.freshness = index, freshness


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS, provision the producer and consumer; yield three figures per case."""
    from consumer import Consumer  # being written alongside; imported only when measured

    logging.getLogger("coap").setLevel(logging.ERROR)
    # aiocoap's DTLS client warns when a session's last callbacks come after its shutdown (the
    # consumers' AS sessions, at exit): noise here.
    warnings.filterwarnings("ignore", "DTLS module did not shut down", UserWarning)
    loop = asyncio.new_event_loop()
    consumers: list[Any] = []
    try:
        with Testbed("oscar-bench-consumer-") as bed:
            bundles = bed.start_as(
                {PRODUCER: "producer", CONSUMER: "consumer"}, grants=[(CONSUMER, f"{PRODUCER}/*")]
            )
            bundle = Bundle.load(bundles[CONSUMER])
            producer = loop.run_until_complete(_Producer.provision(Bundle.load(bundles[PRODUCER])))
            on_disk = Consumer(bundle, bed.dir / "consumer-state")
            in_memory = Consumer(bundle, None)
            consumers += [on_disk, in_memory]
            for profile, size in CASES:
                case = _Case(producer, profile, size, settings)
                baseline = f"ECDSA-P256 verify + {case.aead_label}.decrypt"
                for label, consumer in (("consumer", on_disk), ("consumer-mem", in_memory)):
                    op = _ConsumerOpen(consumer, case, loop)
                    op(1)  # certificate, CRL and secret from the AS: not timed
                    ours, base = compare(op, case.bare_open, settings)
                    yield Figure(f"{label}/{case.name_part}", ours, "ops/s", baseline, base)
                durable = _ConsumerIngest(on_disk, case, loop)
                memory = _ConsumerIngest(in_memory, case, loop)
                saves = on_disk.pipeline.commits.saves, on_disk.pipeline.commits.committed
                ours, base = compare(durable, memory, settings)
                saves = (
                    on_disk.pipeline.commits.saves - saves[0],
                    on_disk.pipeline.commits.committed - saves[1],
                )
                yield Figure(
                    f"ingest/{case.name_part}",
                    ours * INGEST_BATCH,
                    "ops/s",
                    f"the same in memory ({INGEST_WINDOW} in flight)",
                    base * INGEST_BATCH,
                    min_ratio=INGEST_TARGET,
                )
                print(
                    f"  ingest/{case.name_part}: {saves[1] / max(1, saves[0]):.1f} readings "
                    "per save (fsync)",
                    flush=True,
                )
                signer = oscar.ProducerKey.from_certificate(
                    x509.load_der_x509_certificate(producer.certificate),
                    bundle.ca_certificate,
                    now=int(time.time()),
                )
                grant = loop.run_until_complete(_secret(bundle, case.resource_id))
                core = _CoreOpen(case, signer, bundle.ca_certificate, grant.secret)
                ours, base = compare(core, case.bare_open, settings)
                yield Figure(f"core/{case.name_part}", ours, "ops/s", baseline, base)
            if on_disk.store.persistent:
                print(f"  consumer state directory on {_filesystem(bed.dir)}", flush=True)
    finally:
        for consumer in consumers:
            loop.run_until_complete(consumer.close())
        loop.close()


async def _secret(bundle: Bundle, resource_id: str) -> Any:
    """The consumer's grant of the resource's active epoch, from the AS."""
    async with AsClient(bundle) as client:
        return await client.secret(resource_id)


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), for the report."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    except OSError:
        pass
    return f"{kind} ({best or '?'})"
