"""The sequence-number allocator: never a reused seq, so never a reused nonce, crashes included."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import oscar
from oscar import SequenceAllocator, SequenceUnavailable
from oscar.keys import MAX_SEQ, ContentKeys
from oscar.sequence import MemorySequenceStore
from testkit import NOW, PRODUCER, RESOURCE, SECRET


class FailingStore(MemorySequenceStore):
    """Persists until told to fail, like a disk that fills up or goes read-only."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def save(self, resource_id: str, epoch: int, limit: int) -> None:
        if self.broken:
            raise OSError("No space left on device")
        super().save(resource_id, epoch, limit)


def test_reserves_before_handing_out() -> None:
    store = MemorySequenceStore()
    alloc = SequenceAllocator(store, RESOURCE, 1, window=4)
    assert store.load(RESOURCE, 1) is None
    assert alloc.allocate() == 0
    assert store.load(RESOURCE, 1) == 4
    assert [alloc.allocate() for _ in range(3)] == [1, 2, 3]
    assert store.load(RESOURCE, 1) == 4
    assert alloc.allocate() == 4
    assert store.load(RESOURCE, 1) == 8


def test_restart_resumes_after_the_reserved_window() -> None:
    store = MemorySequenceStore()
    first = SequenceAllocator(store, RESOURCE, 1, window=10)
    used = [first.allocate() for _ in range(3)]
    # Crash: the allocator is gone; a new one resumes at the persisted limit.
    second = SequenceAllocator(store, RESOURCE, 1, window=10)
    assert second.allocate() == 10
    assert 10 not in used


def test_epochs_and_resources_are_independent() -> None:
    store = MemorySequenceStore()
    a = SequenceAllocator(store, RESOURCE, 1)
    b = SequenceAllocator(store, RESOURCE, 2)
    c = SequenceAllocator(store, "sensor-1/humidity", 1)
    assert (a.allocate(), b.allocate(), c.allocate()) == (0, 0, 0)


def test_refuses_when_the_reservation_cannot_be_persisted() -> None:
    store = FailingStore()
    alloc = SequenceAllocator(store, RESOURCE, 1, window=2)
    assert [alloc.allocate(), alloc.allocate()] == [0, 1]
    store.broken = True
    with pytest.raises(SequenceUnavailable):
        alloc.allocate()
    with pytest.raises(SequenceUnavailable):
        alloc.allocate()
    store.broken = False
    assert alloc.allocate() == 2  # nothing was handed out while failing


def test_refuses_on_unreadable_or_corrupt_store() -> None:
    class Unreadable(MemorySequenceStore):
        def load(self, resource_id: str, epoch: int) -> int | None:
            raise OSError("I/O error")

    with pytest.raises(SequenceUnavailable):
        SequenceAllocator(Unreadable(), RESOURCE, 1)
    store = MemorySequenceStore()
    store.limits[(RESOURCE, 1)] = -5
    with pytest.raises(SequenceUnavailable, match="corrupt"):
        SequenceAllocator(store, RESOURCE, 1)


def test_exhaustion_needs_a_new_epoch() -> None:
    store = MemorySequenceStore()
    store.save(RESOURCE, 1, MAX_SEQ)
    alloc = SequenceAllocator(store, RESOURCE, 1, window=64)
    assert alloc.allocate() == MAX_SEQ
    with pytest.raises(SequenceUnavailable, match="used up"):
        alloc.allocate()


def test_bad_window_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        SequenceAllocator(MemorySequenceStore(), RESOURCE, 1, window=0)


@given(
    window=st.integers(1, 20),
    runs=st.lists(st.integers(0, 30), min_size=1, max_size=8),
)
def test_no_nonce_reuse_across_simulated_crashes(window: int, runs: list[int]) -> None:
    """Seal ``runs[i]`` objects, crash, restart, repeat: every nonce of the epoch is distinct."""
    store = MemorySequenceStore()
    keys = ContentKeys.derive(SECRET, RESOURCE, 5, oscar.DEFAULT_PROFILE.aead)
    seqs: list[int] = []
    for count in runs:
        alloc = SequenceAllocator(store, RESOURCE, 5, window=window)  # a fresh process
        seqs.extend(alloc.allocate() for _ in range(count))
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    nonces = {keys.nonce(s) for s in seqs}
    assert len(nonces) == len(seqs)


def test_sealed_objects_of_one_epoch_never_share_a_nonce_across_restart() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    store = MemorySequenceStore()
    keys = ContentKeys.derive(SECRET, RESOURCE, 1, oscar.DEFAULT_PROFILE.aead)
    partial_ivs = []
    for _restart in range(3):
        alloc = SequenceAllocator(store, RESOURCE, 1, window=5)
        for _ in range(3):
            seq = alloc.allocate()
            data = oscar.seal(
                secret=keys,
                producer_id=PRODUCER,
                resource_id=RESOURCE,
                epoch=1,
                seq=seq,
                iat=NOW,
                exp=NOW + 60,
                content_format=0,
                plaintext=b"same",
                signing_key=key,
            )
            obj = oscar.ProtectedObject.from_bytes(data)
            partial_ivs.append(obj.encrypt0.unprotected[6])
    assert len(set(partial_ivs)) == 9


def test_two_allocators_over_one_store_never_overlap() -> None:
    store = MemorySequenceStore()
    a = SequenceAllocator(store, RESOURCE, 1, window=4)
    first = [a.allocate() for _ in range(4)]
    b = SequenceAllocator(store, RESOURCE, 1, window=4)  # created while a still holds a window
    c = SequenceAllocator(store, RESOURCE, 1, window=4)  # created before b saved anything
    seqs = first + [x.allocate() for _ in range(6) for x in (a, b, c)]
    assert len(seqs) == len(set(seqs))


@given(st.lists(st.integers(0, 2), min_size=1, max_size=60), st.integers(1, 5))
def test_interleaved_allocators_property(order: list[int], window: int) -> None:
    store = MemorySequenceStore()
    allocators = [SequenceAllocator(store, RESOURCE, 1, window=window) for _ in range(3)]
    seqs = [allocators[i].allocate() for i in order]
    assert len(seqs) == len(set(seqs))
