"""One published resource: its keys and epochs, its current value, and the object sealed from it.

:class:`Published` is what :class:`~producer.core.Producer` keeps per resource: the active
epoch's secret and the next one's, the switch to the next at the boundary by the producer's own
clock (also when the AS is out of reach), re-sealing under a new epoch as soon as the AS
announces one. The rules are :mod:`producer.epochs`'s (pure); this class does what their steps
ask: raise the epoch floor, build the sealer, write the key state, log, re-seal. It refuses to
seal when it has no secret it may use, and never uses a sequence number twice
(:class:`oscar.sequence.SequenceAllocator` over the producer's state).

A resource that declares parts (issue 19) seals one multi-part object per value
(:func:`oscar.seal_parts`), each encrypted part under its own part's epoch
(:mod:`producer.partkeys`), its seq from one counter per resource that never restarts
(``(resource id, 0)``); its values come per part (:meth:`Published.update_parts`).

What it needs of its producer is :class:`Host` (the id, the signing key, the state directory,
the sequence window and the clock); :class:`~producer.core.Producer` is one.

What it does not do: talk to the AS or the network, or read values (the producer's tasks hand
it key states, and values from :mod:`producer.sources`; observers and publishers are told through
``on_change``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from oscar import certs
from oscar.errors import PlaintextTooLarge, SequenceUnavailable
from oscar.objects import Sealer, object_etag
from oscar.parts import seal_parts
from oscar.profiles import PROFILES
from oscar.sequence import SequenceAllocator
from oscar_io.aswire import EpochKey, KeyState
from oscar_io.metrics import Histogram

from . import epochs
from .config import MAX_VALUE_SIZE, ResourceSpec
from .partkeys import PartEpochs
from .state import ProducerState

__all__ = ["Host", "Published"]

log = logging.getLogger("oscar.producer")


class Host(Protocol):
    """What a :class:`Published` needs of the producer it belongs to. Read when used: a stand-in
    that only serves objects set by hand (the fast path's tests and fuzz target) needs no more
    than ``device_id`` and ``now``."""

    @property
    def device_id(self) -> str: ...
    @property
    def signing_key(self) -> certs.SigningKey: ...
    @property
    def state(self) -> ProducerState:
        """Where the epoch floors, sequence limits and key states are kept."""
        ...

    @property
    def sequence_window(self) -> int: ...
    def now(self) -> int:
        """The producer's clock, in whole seconds."""
        ...


class Published:
    """One resource: its keys, its current value and the one object sealed from it.

    ``obj``, ``etag``, ``iat``, ``exp``, ``epoch`` and ``seq`` describe the object being served
    (None before the first). Observers are told through ``on_change``.
    """

    def __init__(self, host: Host, spec: ResourceSpec) -> None:
        self._host = host
        self.spec = spec
        self.resource_id = f"{host.device_id}/{spec.path}"
        self.profile = PROFILES[spec.profile]
        self.value: bytes | None = None
        self.obj: bytes | None = None
        self.etag = b""
        self.iat = 0
        self.exp = 0
        self.epoch: int | None = None
        self.seq: int | None = None
        self.sealed_count = 0
        #: Seconds each seal took (allocation of the seq, encryption, signature).
        self.seal_seconds = Histogram()
        self.on_change: list[Callable[[], None]] = []
        # keys (producer.epochs decides; this object does the I/O it asks for)
        self.epochs = epochs.Epochs(rotation_period=spec.rotation_period)
        self._sealer: Sealer | None = None
        self._allocator: SequenceAllocator | None = None
        #: Set when the AS already knew the resource and this state had no record of it.
        self.state_outlived = False
        #: A multi-part resource's parts' epochs and current values (None: single-part).
        self.part_epochs = (
            PartEpochs(self.resource_id, spec.parts, spec.rotation_period) if spec.parts else None
        )
        self.part_values: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"Published({self.resource_id!r}, epoch={self.epoch}, seq={self.seq})"

    # --- keys ---

    @property
    def current(self) -> EpochKey | None:
        """The epoch sealed under (None before the AS first answered)."""
        return self.epochs.current

    @property
    def following(self) -> EpochKey | None:
        """The next epoch's secret, when the AS sent it."""
        return self.epochs.following

    @property
    def rotation_period(self) -> int:
        return self.epochs.rotation_period

    @property
    def boundary(self) -> int | None:
        """When the current epoch ends by the producer's clock (None: no scheduled end)."""
        return self.epochs.boundary

    @property
    def epoch_number(self) -> int | None:
        return self.epochs.epoch

    def restore(self, stored: KeyState) -> None:
        """Take the key state saved before a restart, then catch up with the clock."""
        sequences = self._host.state.sequences
        if not sequences.knows(self.resource_id):
            # Keys but no sequence record: the sequence file was lost or is an older copy.
            self.state_outlived = True
        if self.part_epochs is not None:  # no floor: one seq counter that never restarts
            self.epochs = epochs.restored(stored, 0).epochs
            self.part_epochs.restore(stored)
            return
        floor = sequences.floor(self.resource_id)
        self._take(epochs.restored(stored, floor), floor)

    def apply(self, state: KeyState) -> None:
        """A key state from the AS (a reply or a notification)."""
        if self.part_epochs is not None:
            self.epochs = epochs.received(self.epochs, state, 0).epochs
            self.part_epochs.set_rotation_period(state.rotation_period)
            switched = self.part_epochs.received(state)
            self._save_keys()
            if switched:
                self.reseal()
            return
        floor = self._host.state.sequences.floor(self.resource_id)
        step = epochs.received(self.epochs, state, floor)
        self._take(step, floor)
        if step.save:
            self._save_keys()
        if step.reseal:
            log.info("%s: now sealing under epoch %s", self.resource_id, self.epoch_number)
            self.reseal()

    def tick(self, now: int) -> None:
        """Switch epochs at the boundary; re-seal an object before it goes stale."""
        if self.part_epochs is not None:
            self.epochs = epochs.reached(self.epochs, now, 0).epochs  # kept, not sealed under
            switched = self.part_epochs.reached(now)
            if switched:
                self._save_keys()
                self.reseal()
            elif self.obj is not None and self.exp - now < self.spec.lifetime // 2:
                self.reseal()
            return
        floor = self._host.state.sequences.floor(self.resource_id)
        step = epochs.reached(self.epochs, now, floor)
        self._take(step, floor)
        if step.reseal:
            log.info("%s: boundary reached, now epoch %s", self.resource_id, self.epoch_number)
            self._save_keys()
            self.reseal()
        elif self.obj is not None and self.exp - now < self.spec.lifetime // 2:
            self.reseal()  # half the object's lifetime is gone: a fresh one for the caches

    def may_seal(self, now: int) -> bool:
        if self.part_epochs is not None:
            return bool(self.part_epochs.record()) and self.part_epochs.may_seal(now)
        return self._sealer is not None and self.epochs.may_seal(now)

    def _take(self, step: epochs.Step, floor: int) -> None:
        """Do what ``step`` asks, in its order, and take its epochs."""
        # The rotation period first: kept even when the switch's writes below fail.
        self.epochs = replace(self.epochs, rotation_period=step.epochs.rotation_period)
        if step.refused is not None:
            log.error(
                "%s: refusing epoch %d: epoch %d was used already",
                self.resource_id,
                step.refused.epoch,
                floor,
            )
        if step.activate is not None:
            self._activate(step.activate)
        self.epochs = step.epochs
        if step.ended:
            log.error(
                "%s: epoch %s ended and the AS has not sent the next secret: sealing "
                "nothing new until it does",
                self.resource_id,
                self.epoch_number,
            )

    def _activate(self, key: EpochKey) -> None:
        """Seal under ``key`` from now on: the floor raised first (durable before the first
        seal), a far start for an epoch a lost state may have used, a new sealer."""
        sequences = self._host.state.sequences
        sequences.raise_floor(self.resource_id, key.epoch)
        if self.state_outlived and sequences.load(self.resource_id, key.epoch) is None:
            # The AS knew this resource before this state directory did: a lost, restored or
            # copied state may have sealed under this epoch already. Start far away from 0.
            start = (1 << 48) + secrets.randbelow(1 << 47)
            sequences.save(self.resource_id, key.epoch, start)
            log.warning(
                "%s: the AS knew this resource but this state did not: epoch %d starts at a "
                "random sequence number, so that no seq of a lost state is used again",
                self.resource_id,
                key.epoch,
            )
        sealer = Sealer(
            secret=key.secret,
            producer_id=self._host.device_id,
            resource_id=self.resource_id,
            epoch=key.epoch,
            signing_key=self._host.signing_key,
            profile=self.profile,
        )
        allocator = SequenceAllocator(
            sequences, self.resource_id, key.epoch, self._host.sequence_window
        )
        self._sealer, self._allocator = sealer, allocator

    def _save_keys(self) -> None:
        record = self.epochs.record(self.resource_id, self.spec.profile)
        if record is not None and self.part_epochs is not None:
            parts = self.part_epochs.record()
            record = record._replace(parts=parts) if parts else None
        if record is not None:
            self._host.state.keys.put(record)

    # --- values and objects ---

    def update(self, value: bytes) -> bool:
        """A new value: seal it if it differs from the current one. True if an object was made."""
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("a value is bytes")
        if self.part_epochs is not None:
            raise TypeError(f"{self.resource_id} has parts: set their values with update_parts")
        value = bytes(value)
        if len(value) > MAX_VALUE_SIZE:
            log.error(
                "%s: value of %d bytes is over the %d-byte limit; not sealed",
                self.resource_id,
                len(value),
                MAX_VALUE_SIZE,
            )
            return False
        if value == self.value and self.obj is not None:
            return False
        self.value = value
        return self.reseal()

    def update_parts(self, values: Mapping[str, bytes]) -> bool:
        """New values of some parts of a multi-part resource: one object sealed of every part's
        current value, if any changed and every part has one. True if an object was made.
        KeyError for a part not declared, TypeError for a value not bytes or a single-part
        resource; nothing is changed then."""
        if self.part_epochs is None:
            raise TypeError(f"{self.resource_id} has no parts: set its value with update")
        declared = {p.name for p in self.spec.parts}
        fresh = {}
        for name, value in values.items():
            if name not in declared:
                raise KeyError(f"{self.resource_id} has no part {name!r}")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError("a value is bytes")
            fresh[name] = bytes(value)
        merged = self.part_values | fresh
        if sum(len(v) for v in merged.values()) > MAX_VALUE_SIZE:
            log.error(
                "%s: parts over the %d-byte limit; not sealed", self.resource_id, MAX_VALUE_SIZE
            )
            return False
        if merged == self.part_values and self.obj is not None:
            return False
        self.part_values = merged
        return self.reseal()

    def reseal(self) -> bool:
        """Seal the current value under the current epoch with a fresh seq."""
        if self.part_epochs is not None:
            return self._reseal_parts(self.part_epochs)
        if self.value is None:
            return False
        now = self._host.now()
        sealer, allocator = self._sealer, self._allocator
        if sealer is None or allocator is None or not self.may_seal(now):
            if sealer is None:
                log.warning("%s: no access secret yet; the value waits", self.resource_id)
            return False
        started = time.perf_counter()
        try:
            seq = allocator.allocate()
            obj = sealer.seal(
                seq=seq,
                iat=now,
                exp=now + self.spec.lifetime,
                content_format=self.spec.content_format,
                plaintext=self.value,
            )
        except SequenceUnavailable as exc:
            log.error("%s: not sealed, fail closed: %s", self.resource_id, exc)
            return False
        except PlaintextTooLarge:
            log.error(
                "%s: %d bytes is too large for profile %s (AES-CCM seals at most 65535 bytes); "
                "choose an A128GCM, A256GCM or ChaCha20 profile",
                self.resource_id,
                len(self.value),
                self.spec.profile,
            )
            return False
        self.obj, self.iat, self.exp = obj, now, now + self.spec.lifetime
        self.epoch, self.seq = sealer.epoch, seq
        self.etag = object_etag(self.resource_id, sealer.epoch, seq)
        self.sealed_count += 1
        self.seal_seconds.observe(time.perf_counter() - started)
        log.debug("%s: sealed epoch %d seq %d", self.resource_id, self.epoch, seq)
        for notify in self.on_change:
            notify()
        return True

    def _parts_allocator(self) -> SequenceAllocator:
        """The one seq counter of a multi-part resource: ``(resource id, 0)``, never restarted
        (a lost state starts it at a random far number, as :meth:`_activate` does an epoch)."""
        if self._allocator is None:
            sequences = self._host.state.sequences
            if self.state_outlived and sequences.load(self.resource_id, 0) is None:
                sequences.save(self.resource_id, 0, (1 << 48) + secrets.randbelow(1 << 47))
                log.warning(
                    "%s: the AS knew this resource but this state did not: its seqs start at a "
                    "random number, so that no seq of a lost state is used again",
                    self.resource_id,
                )
            self._allocator = SequenceAllocator(
                sequences, self.resource_id, 0, self._host.sequence_window
            )
        return self._allocator

    def _reseal_parts(self, part_epochs: PartEpochs) -> bool:
        now = self._host.now()
        parts = part_epochs.parts(self.part_values, now)
        if parts is None:
            if not part_epochs.record():
                log.warning("%s: no part secrets yet; the values wait", self.resource_id)
            return False
        started = time.perf_counter()
        try:
            seq = self._parts_allocator().allocate()
            obj = seal_parts(
                parts=parts,
                producer_id=self._host.device_id,
                resource_id=self.resource_id,
                seq=seq,
                iat=now,
                exp=now + self.spec.lifetime,
                signing_key=self._host.signing_key,
                profile=self.profile,
            )
        except SequenceUnavailable as exc:
            log.error("%s: not sealed, fail closed: %s", self.resource_id, exc)
            return False
        except PlaintextTooLarge as exc:
            log.error("%s: not sealed: %s", self.resource_id, exc)
            return False
        self.obj, self.iat, self.exp = obj, now, now + self.spec.lifetime
        self.epoch, self.seq = 0, seq
        self.etag = object_etag(self.resource_id, 0, seq)
        self.sealed_count += 1
        self.seal_seconds.observe(time.perf_counter() - started)
        log.debug("%s: sealed parts seq %d", self.resource_id, seq)
        for notify in self.on_change:
            notify()
        return True

    def now(self) -> int:
        """The producer's clock (what the server and the fast path compare ``exp`` with)."""
        return self._host.now()

    def max_age(self, now: int) -> int:
        return max(0, min(self.spec.max_age, self.exp - now))
