"""Stateful property tests (hypothesis): freshness and the sequence allocator against models.

- :class:`FreshnessMachine`: ``FreshnessState`` never accepts an (epoch, seq) at or below the
  newest accepted for its resource, ``check`` agrees with ``accept``, and the state survives
  snapshot round trips (through CBOR too, as a role persists it).
- :class:`AllocatorMachine`: allocators over one store, with crashes (the allocator is lost and a
  new one made over the same store), failing saves, and limits near 2**64: no seq is ever handed
  out twice, every seq is below the persisted limit when handed out, never beyond MAX_SEQ.

The AS store's key lifecycle has its machine in ``tests/roles/as/test_state_machine_keys.py``.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from oscar import cbor
from oscar.errors import InvalidObject, SequenceUnavailable
from oscar.freshness import FreshnessState
from oscar.keys import MAX_SEQ
from oscar.sequence import MemorySequenceStore, SequenceAllocator

RESOURCES = st.sampled_from(["sensor-1/a", "sensor-1/b", "sensor-2/a"])
SMALL = st.integers(0, 5)


class FreshnessMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = FreshnessState()
        self.model: dict[str, tuple[int, int]] = {}

    @rule(rid=RESOURCES, epoch=SMALL, seq=st.one_of(SMALL, st.just(MAX_SEQ)))
    def accept(self, rid: str, epoch: int, seq: int) -> None:
        newest = self.model.get(rid)
        fresh = newest is None or (epoch, seq) > newest
        try:
            self.state.check(rid, epoch, seq)
            checked = True
        except InvalidObject:
            checked = False
        assert checked == fresh
        try:
            self.state.accept(rid, epoch, seq)
        except InvalidObject:
            assert not fresh
        else:
            assert fresh
            self.model[rid] = (epoch, seq)

    @rule()
    def snapshot_round_trip(self) -> None:
        self.state = FreshnessState.from_snapshot(self.state.snapshot())

    @rule()
    def snapshot_through_cbor(self) -> None:
        data = cbor.loads(cbor.dumps(self.state.snapshot()))
        assert isinstance(data, dict)
        self.state = FreshnessState.from_snapshot(data)  # type: ignore[arg-type]

    @invariant()
    def matches_model(self) -> None:
        assert len(self.state) == len(self.model)
        for rid, newest in self.model.items():
            assert self.state.newest(rid) == newest


class FlakyStore(MemorySequenceStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def save(self, resource_id: str, epoch: int, limit: int) -> None:
        if self.fail:
            raise OSError("disk full")
        super().save(resource_id, epoch, limit)


class AllocatorMachine(RuleBasedStateMachine):
    """Two allocators (of one resource and epoch) over one store, each may crash at any time."""

    def __init__(self) -> None:
        super().__init__()
        self.store = FlakyStore()
        self.window = 4
        self.allocators: list[SequenceAllocator | None] = [None, None]
        self.handed_out: set[int] = set()

    def _allocator(self, i: int) -> SequenceAllocator:
        allocator = self.allocators[i]
        if allocator is None:
            allocator = SequenceAllocator(self.store, "sensor-1/a", 1, window=self.window)
            self.allocators[i] = allocator
        return allocator

    @rule(i=st.integers(0, 1))
    def allocate(self, i: int) -> None:
        try:
            allocator = self._allocator(i)
            seq = allocator.allocate()
        except SequenceUnavailable:
            return
        assert seq not in self.handed_out, f"seq {seq} handed out twice"
        assert 0 <= seq <= MAX_SEQ
        assert seq < self.store.limits[("sensor-1/a", 1)], "seq not covered by a persisted limit"
        self.handed_out.add(seq)

    @rule(i=st.integers(0, 1))
    def crash(self, i: int) -> None:
        self.allocators[i] = None  # everything in memory is lost; the store survives

    @rule(fail=st.booleans())
    def disk(self, fail: bool) -> None:
        self.store.fail = fail

    @precondition(lambda self: not self.handed_out)
    @rule(start=st.sampled_from([MAX_SEQ - 6, MAX_SEQ - 1, MAX_SEQ, MAX_SEQ + 1]))
    def near_the_end(self, start: int) -> None:
        self.store.limits[("sensor-1/a", 1)] = start
        self.allocators = [None, None]


FreshnessMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
AllocatorMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40)

test_freshness = FreshnessMachine.TestCase
test_allocator = AllocatorMachine.TestCase
