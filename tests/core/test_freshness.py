"""Freshness as a state machine, checked against a simple model with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oscar import FreshnessState, InvalidObject

_events = st.lists(
    st.tuples(st.sampled_from(["a/x", "a/y"]), st.integers(0, 4), st.integers(0, 6)),
    max_size=40,
)


@given(_events)
def test_accepts_exactly_the_strictly_newer(events: list[tuple[str, int, int]]) -> None:
    state = FreshnessState()
    model: dict[str, tuple[int, int]] = {}
    for rid, epoch, seq in events:
        newer = rid not in model or (epoch, seq) > model[rid]
        if newer:
            state.accept(rid, epoch, seq)
            model[rid] = (epoch, seq)
        else:
            with pytest.raises(InvalidObject):
                state.accept(rid, epoch, seq)
        assert state.newest(rid) == model[rid] if rid in model else state.newest(rid) is None
    assert FreshnessState.from_snapshot(state.snapshot()).snapshot() == state.snapshot()


def test_check_does_not_record() -> None:
    state = FreshnessState()
    state.check("a/x", 1, 1)
    assert state.newest("a/x") is None
    state.accept("a/x", 1, 1)
    state.check("a/x", 1, 2)
    assert state.newest("a/x") == (1, 1)
    assert len(state) == 1 and "a/x" not in repr(state)
