"""The checks every object received goes through once it is out of CoAP, and its opening.

:class:`Pipeline` takes an object's bytes and the resource it must be of, whatever brought them (a
CoAP answer, a notification, a file, a multicast group), and fails closed at the first problem:

1. decoding, strict (size limit, CBOR, COSE structure), and the object must be of the resource;
2. the signer's certificate, by kid (cache, else the AS), checked against the bundle's CA, naming
   the object's producer, who owns the resource; then the signature and the expiry
   (:func:`oscar.verify`);
3. revocation: the signer's certificate must not be on the CA's current CRL (cache, else the AS).
   It is checked after the signature, so that nothing but the certificate is ever asked of the AS
   because of an object whose signature did not verify (steps 1-3:
   :meth:`oscar_io.trust.Trust.check`);
4. freshness: older than the newest accepted for the resource is a rollback or replay;
5. the access secret of (resource, epoch) (cache, else the AS), decryption
   (:func:`oscar.open_verified`), and only then the new freshness is accepted (in memory, so no
   other reading in flight of that resource with the same or an older (epoch, seq) is) and
   recorded on disk, many readings per save (:mod:`consumer.commit`); a reading is returned only
   once the save holding its freshness has completed.

An object equal in (epoch, seq) to the newest accepted is the same object again (a producer seals
a value once and serves it to everyone): it is opened again, or skipped when the caller says so;
if it is still waiting for its save, it is returned only once that save has completed.

An object that passes steps 1-3 but is *older* than the newest accepted is a stale copy
(:class:`~consumer.errors.StaleCopy`: a proxy's cache within its Max-Age, after this consumer read
a newer object elsewhere; or a replay). It is never accepted. :meth:`Pipeline.held_reading` gives
instead the newest reading this consumer holds — the object kept when it was accepted
(:meth:`~consumer.store.ConsumerStore.held`), put through steps 1, 2, 3 and 5 again now, so never
bytes that are expired, revoked or unverified; when that object is no longer valid, the
:class:`StaleCopy` is raised. Only an object that claims to be newer and fails a check is a
rejection.

A large object (over :data:`~consumer.spool.SPOOL_THRESHOLD`, read as it arrived into a spool:
:mod:`consumer.spool`) takes the same steps in the same order (:meth:`Pipeline.open_stream`): its
headers and the digest of its signed message stand for its bytes in steps 1-3, and in step 5 its
ciphertext is authenticated whole before any plaintext is written; it is not held.

What this module does not do: CoAP (:mod:`consumer.client`), keep state on disk
(:mod:`consumer.store`), or decide whom to trust (:mod:`oscar_io.trust`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from oscar.aeadstream import Pass, Write
from oscar.errors import InvalidObject
from oscar.keys import KeyCache
from oscar.objects import (
    ObjectMetadata,
    Reading,
    StreamedObject,
    open_verified,
    open_verified_stream,
)
from oscar_io.asclient import AsClient
from oscar_io.coaperrors import TransportError
from oscar_io.errors import AccessDenied, AsError, AsUnavailable
from oscar_io.trust import Trust

from .commit import FreshnessCommits
from .errors import StaleCopy
from .spool import Assembly
from .store import ConsumerStore

__all__ = ["Pipeline"]

log = logging.getLogger("oscar.consumer")


class Pipeline:
    """Steps 1-5 (see the module docstring) for one consumer: its store, its trust, and the AS
    client (made by ``as_client`` when first needed) for the secrets it lacks."""

    def __init__(
        self,
        store: ConsumerStore,
        trust: Trust,
        as_client: Callable[[], Awaitable[AsClient]],
        *,
        clock: Callable[[], float],
        max_object_size: int,
    ) -> None:
        self.store = store
        self.trust = trust
        self._as_client = as_client
        self._clock = clock
        self._max_object_size = max_object_size
        self._keys = KeyCache(store.secret)
        #: The freshness as accepted, committed or waiting for its save (:mod:`consumer.commit`).
        self.commits = FreshnessCommits(store)
        #: Refusals of part secrets, until when they hold (:mod:`consumer.parts`).
        self.part_denials: dict[tuple[str, int], float] = {}

    def __repr__(self) -> str:
        return f"Pipeline({self.store!r})"

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    @property
    def max_object_size(self) -> int:
        return self._max_object_size

    @property
    def as_client(self) -> Callable[[], Awaitable[AsClient]]:
        """Makes (once) and gives the AS client."""
        return self._as_client

    async def open(self, data: bytes, resource_id: str, *, skip_same: bool) -> Reading | None:
        """The reading of ``data``, an object that must be of ``resource_id``; with ``skip_same``
        an object equal to the newest accepted gives None.

        Raises :class:`InvalidObject` if the object is rejected, :class:`StaleCopy` (one) if it is
        valid but older than the newest accepted, :class:`AccessDenied` if the AS refuses the
        secret, :class:`TransportError` if the AS is needed and cannot be reached.
        """
        now = int(self._clock())
        obj, _ = await self.trust.check(data, resource_id, now, max_size=self._max_object_size)
        m = obj.metadata

        commits = self.commits
        version = (m.epoch, m.seq)
        newest = commits.newest(resource_id)
        is_same = newest == version
        if is_same and skip_same:
            return None
        if newest is not None and version < newest:
            raise StaleCopy(resource_id, version, newest)  # valid, but not news: never accepted
        if not is_same:
            commits.check(resource_id, m.epoch, m.seq)
        if self.store.secret(resource_id, m.epoch) is None:
            await self._fetch_secret(resource_id, m.epoch)
        reading = open_verified(obj, secrets=self._keys)
        if not is_same:
            # Checked again: another task may have accepted a newer object meanwhile.
            done = commits.accept(resource_id, m.epoch, m.seq, data)
            if done is not None:
                await done  # released only once its freshness is on disk (cancelling: ours only)
            return reading
        done = commits.waiting(resource_id, version)
        if done is not None:  # the same object, accepted by another task: once it is on disk
            await commits.settled(done)
        self.store.put_held(resource_id, m.epoch, m.seq, data)  # writes only if news to it
        return reading

    async def open_assembled(
        self,
        assembly: Assembly,
        resource_id: str,
        *,
        skip_same: bool,
        write: Write | None = None,
    ) -> Reading | None:
        """The reading of an object assembled by :class:`~consumer.spool.Assembly`: one that
        stayed in memory by :meth:`open` (its plaintext also to ``write``, if given); one over
        the spool threshold, read as it arrived, by :meth:`open_stream` into ``write`` (the
        reading's plaintext is then empty) or, without one, into memory. Raises what
        :meth:`open` raises."""
        if not assembly.spilled:
            reading = await self.open(assembly.data, resource_id, skip_same=skip_same)
            if reading is not None and write is not None:
                write(reading.plaintext)
            return reading
        obj = assembly.finish()
        plaintext = bytearray()
        metadata = await self.open_stream(
            obj,
            resource_id,
            assembly.ciphertext(obj),
            plaintext.extend if write is None else write,
            skip_same=skip_same,
        )
        return None if metadata is None else Reading(bytes(plaintext), metadata)

    async def open_stream(
        self,
        obj: StreamedObject,
        resource_id: str,
        ciphertext: Pass,
        write: Write,
        *,
        skip_same: bool = False,
    ) -> ObjectMetadata | None:
        """:meth:`open` for a large object read as it arrived (:mod:`consumer.spool`): steps 1-3
        on its headers and the digest of its signed message, 4, then 5 with the ciphertext
        authenticated whole before any plaintext goes to ``write``
        (:func:`oscar.opening.open_verified_stream`, in a worker thread: a large object takes
        a while). What ``write`` received is released only when this returns. Such an object is
        not held (too large: :mod:`consumer.held` drops the older one), so a stale copy of it is
        a :class:`StaleCopy` with no reading instead. With ``skip_same`` an object equal to the
        newest accepted gives None. Raises what :meth:`open` raises."""
        now = int(self._clock())
        obj, _ = await self.trust.check_stream(obj, resource_id, now)
        m = obj.metadata
        commits = self.commits
        version = (m.epoch, m.seq)
        newest = commits.newest(resource_id)
        is_same = newest == version
        if is_same and skip_same:
            return None
        if newest is not None and version < newest:
            raise StaleCopy(resource_id, version, newest)
        if not is_same:
            commits.check(resource_id, m.epoch, m.seq)
        if self.store.secret(resource_id, m.epoch) is None:
            await self._fetch_secret(resource_id, m.epoch)
        self._keys.keys_for(resource_id, m.epoch, m.aead)  # derived here, not in the thread
        await asyncio.to_thread(open_verified_stream, obj, ciphertext, write, secrets=self._keys)
        if not is_same:
            done = commits.accept(resource_id, m.epoch, m.seq, b"")  # b"": not held
            if done is not None:
                await done
            return m
        done = commits.waiting(resource_id, version)
        if done is not None:
            await commits.settled(done)
        return m

    async def close(self) -> None:
        """Wait for the freshness saves under way to end."""
        await self.commits.close()

    async def held_reading(self, stale: StaleCopy) -> Reading:
        """The newest reading held of ``stale``'s resource, checked again now (certificate,
        revocation, signature, expiry, decryption); ``stale`` itself when there is none that is
        still valid."""
        held = self.store.held(stale.resource_id)
        if held is None or held.version != self.commits.newest(stale.resource_id):
            raise stale
        try:
            reading = await self.open(held.data, stale.resource_id, skip_same=False)
        except InvalidObject as exc:
            log.info("%s: the object held is not valid now: %s", stale.resource_id, exc.reason)
            raise stale from None
        if reading is None:  # pragma: no cover - only skip_same=True skips
            raise stale
        return reading

    async def _fetch_secret(self, resource_id: str, epoch: int) -> None:
        client = await self._as_client()
        try:
            grant = await client.secret(resource_id, epoch)
        except AccessDenied:
            raise
        except AsUnavailable as exc:
            # Every AS listed is busy: say when asking again makes sense (the client refuses
            # to ask sooner).
            later = "" if exc.retry_after is None else f" (retry in {exc.retry_after:g} s)"
            raise TransportError(f"cannot get the access secret: {exc}{later}") from None
        except AsError as exc:
            if exc.code in ("4.04", "4.10"):
                raise InvalidObject("the AS has no access secret for this epoch") from None
            raise TransportError(f"cannot get the access secret: {exc}") from None
        self.store.put_secret(resource_id, epoch, grant.secret)
        log.info("access secret of %s epoch %d from the AS", resource_id, epoch)
