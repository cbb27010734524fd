"""A multi-part resource's keys (issue 19): each encrypted part's epochs, and the parts to seal.

A resource that declares parts seals one multi-part object (:func:`oscar.seal_parts`) per value:
every encrypted part under its own part's active secret and epoch. Each encrypted part's epochs
follow the rules of :mod:`producer.epochs` (a newer active epoch from the AS is switched to at
once, the next one at the boundary by the producer's own clock, nothing sealed past a boundary
without the next secret), one :class:`~producer.epochs.Epochs` per part. The resource's own epoch
(which the AS also keeps) is not sealed under.

Sequence numbers are not per epoch here: a multi-part resource draws every seq from ONE counter
that never restarts (``(resource id, 0)`` in the producer's sequence file, see
:mod:`oscar.parts`), because one seq is used with keys of several epochs. So no epoch floor is
raised for a part: the floor exists to keep (epoch, seq) pairs from being reused, and a seq is
never reused at all.

What this module does not do: allocate seqs, seal, write the state or talk to the AS
(:class:`producer.published.Published` does, with what this module returns).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

from oscar.parts import Part
from oscar_io.aswire import KeyState, PartKeys

from . import epochs
from .config import PartSpec

__all__ = ["PartEpochs"]

log = logging.getLogger("oscar.producer")


class PartEpochs:
    """The epochs of each encrypted part of one resource (see the module docstring)."""

    def __init__(self, resource_id: str, parts: Sequence[PartSpec], rotation_period: int) -> None:
        self.resource_id = resource_id
        self.specs = tuple(parts)
        self.epochs = {
            p.name: epochs.Epochs(rotation_period=rotation_period)
            for p in parts
            if p.kind == "encrypted"
        }
        self._mismatch_reported = False

    def __repr__(self) -> str:  # no secrets
        known = {name: e.epoch for name, e in self.epochs.items()}
        return f"PartEpochs({self.resource_id!r}, {known})"

    def _matches(self, parts: Sequence[PartKeys]) -> bool:
        """Whether the AS's parts are the configured ones (names, kinds, order)."""
        ok = [(p.name, p.kind) for p in parts] == [(p.name, p.kind) for p in self.specs]
        if not ok and not self._mismatch_reported:
            log.error(
                "%s: the key state's parts differ from the configured ones (names, kinds or "
                "order): sealing nothing",
                self.resource_id,
            )
        self._mismatch_reported = not ok
        return ok

    def restore(self, stored: KeyState) -> None:
        """The part keys saved before a restart (then :meth:`reached` catches up)."""
        if not self._matches(stored.parts):
            return
        for part in stored.parts:
            if part.active is None:
                continue
            state = KeyState(
                stored.resource_id, stored.profile, stored.rotation_period, part.active, part.next
            )
            self.epochs[part.name] = epochs.restored(state, 0).epochs

    def received(self, state: KeyState) -> bool:
        """A key state from the AS; True if a part switched to a newer epoch (re-seal)."""
        if not self._matches(state.parts):
            self.epochs = {name: epochs.Epochs() for name in self.epochs}  # fail closed
            return False
        switched = False
        for part in state.parts:
            if part.active is None or part.next is None:
                continue
            one = KeyState(
                state.resource_id, state.profile, state.rotation_period, part.active, part.next
            )
            step = epochs.received(self.epochs[part.name], one, 0)
            self.epochs[part.name] = step.epochs
            if step.activate is not None:
                log.info(
                    "%s: part %s now sealed under epoch %d",
                    self.resource_id,
                    part.name,
                    step.activate.epoch,
                )
                switched = True
        return switched

    def reached(self, now: int) -> bool:
        """The clock reached ``now``: each part switches at its boundary; True if one did."""
        switched = False
        for name, known in self.epochs.items():
            step = epochs.reached(known, now, 0)
            self.epochs[name] = step.epochs
            if step.ended:
                log.error(
                    "%s: part %s's epoch %s ended and the AS has not sent the next secret: "
                    "sealing nothing new until it does",
                    self.resource_id,
                    name,
                    known.epoch,
                )
            if step.activate is not None:
                log.info(
                    "%s: part %s reached its boundary, now epoch %d",
                    self.resource_id,
                    name,
                    step.activate.epoch,
                )
                switched = True
        return switched

    def set_rotation_period(self, period: int) -> None:
        self.epochs = {n: replace(e, rotation_period=period) for n, e in self.epochs.items()}

    def may_seal(self, now: int) -> bool:
        """Whether every encrypted part has an epoch it may seal under at ``now``."""
        return all(e.may_seal(now) for e in self.epochs.values())

    def record(self) -> tuple[PartKeys, ...]:
        """The parts' keys to keep on disk (empty while any encrypted part has none)."""
        out = []
        for spec in self.specs:
            if spec.kind != "encrypted":
                out.append(PartKeys(spec.name, spec.kind))
                continue
            known = self.epochs[spec.name]
            if known.current is None:
                return ()
            out.append(PartKeys(spec.name, spec.kind, known.current, known.following))
        return tuple(out)

    def parts(self, values: Mapping[str, bytes], now: int) -> list[Part] | None:
        """The parts to seal at ``now`` with ``values`` (None: a value or a usable key is
        missing)."""
        out = []
        for spec in self.specs:
            value = values.get(spec.name)
            if value is None:
                return None
            if spec.kind != "encrypted":
                out.append(Part(spec.name, value, spec.content_format))
                continue
            key = self.epochs[spec.name].key_at(now)
            if key is None:
                return None
            out.append(Part(spec.name, value, spec.content_format, key.secret, key.epoch))
        return out
