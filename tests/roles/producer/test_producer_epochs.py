"""The producer's epoch rules (producer/epochs.py), without a process, a clock or a socket.

Tables of (state before, event, state after and what the producer must do), one per event —
:func:`~producer.epochs.restored`, :func:`~producer.epochs.received`,
:func:`~producer.epochs.reached` — then whole stories (a rotation with and without the AS, an AS
that stays away across boundaries, a restart, a revocation), the ``/keys`` retry policy, and a
property test over random event sequences. The process tests (tests/test_producer*.py) check
that the producer does what these steps say.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oscar.keys import AccessSecret
from oscar_io.aswire import EpochKey, KeyState
from producer import epochs
from producer.epochs import Epochs, Failure, Step, reached, received, restored

RID = "sensor-1/temperature"
PROFILE = "ccm-es256"
P = 60  # seconds per epoch
T0 = 1_800_000_000  # epoch 1 activated here
B1 = T0 + P  # its boundary


def K(epoch: int, at: int | None = None) -> EpochKey:
    """An epoch key; the secret tells the epochs apart."""
    return EpochKey(epoch, AccessSecret(bytes([epoch % 256]) * 32), at)


def AS(active: EpochKey, following: EpochKey | None, period: int = P) -> KeyState:
    """A key state as the AS sends it (or as the producer stored it)."""
    return KeyState(RID, PROFILE, period, active, following)


def E(
    current: EpochKey | None = None,
    following: EpochKey | None = None,
    period: int = P,
    reported: bool = False,
) -> Epochs:
    return Epochs(current, following, period, reported)


NOTHING = dict(activate=None, refused=None, ended=False, save=False, reseal=False)


def expect(step: Step, epochs_after: Epochs, **actions: Any) -> None:
    assert step.epochs == epochs_after
    assert {k: getattr(step, k) for k in NOTHING} == {**NOTHING, **actions}


# --- the state: boundary, may_seal, key_at, record ---------------------------------------------


@pytest.mark.parametrize(
    ("state", "boundary"),
    [
        (E(), None),  # nothing known
        (E(K(1, None)), None),  # the AS gave no activation time
        (E(K(1, T0), period=0), None),  # rotation only on revocation
        (E(K(1, T0)), B1),
        (E(K(1, T0), K(2)), B1),  # the next secret changes nothing
    ],
)
def test_boundary(state: Epochs, boundary: int | None) -> None:
    assert state.boundary == boundary


@pytest.mark.parametrize(
    ("state", "now", "may"),
    [
        (E(), T0, False),  # before the AS first answered
        (E(following=K(2)), T0, False),
        (E(K(1, T0)), T0 - 10, True),  # a clock behind the AS's: still the current epoch
        (E(K(1, T0)), T0, True),
        (E(K(1, T0)), B1 - 1, True),  # the last second of the epoch
        (E(K(1, T0)), B1, False),  # the boundary itself belongs to the next epoch
        (E(K(1, T0)), B1 + 1, False),
        (E(K(1, T0), K(2)), B1, False),  # until reached() switches
        (E(K(1, T0), period=0), T0 + 10**9, True),  # no boundary: forever
        (E(K(1, None)), T0 + 10**9, True),
    ],
)
def test_may_seal_and_key_at(state: Epochs, now: int, may: bool) -> None:
    assert state.may_seal(now) is may
    assert state.key_at(now) == (state.current if may else None)


@pytest.mark.parametrize(
    ("state", "record"),
    [
        (E(), None),  # nothing to keep: what is on disk stays
        (E(following=K(2)), None),
        (E(K(1, T0), K(2)), AS(K(1, T0), K(2))),
        (E(K(2, B1)), AS(K(2, B1), None)),  # switched alone: no next yet
        (E(K(1, T0), period=0), AS(K(1, T0), None, period=0)),
    ],
)
def test_record_is_what_is_kept_on_disk(state: Epochs, record: KeyState | None) -> None:
    assert state.record(RID, PROFILE) == record


def test_the_epoch_number() -> None:
    assert E().epoch is None
    assert E(K(7, T0)).epoch == 7


def test_repr_shows_no_secret() -> None:
    state = E(K(1, T0), K(2))
    text = repr(state) + repr(restored(AS(K(1, T0), K(2)), 0))
    for n in (1, 2):
        assert bytes([n]).hex() * 4 not in text
        assert repr(bytes([n]) * 32) not in text
    assert "current=1" in repr(state) and f"boundary={B1}" in repr(state)


# --- restored: the key state saved before a restart --------------------------------------------


@pytest.mark.parametrize(
    ("stored", "floor", "after", "actions"),
    [
        (AS(K(1, T0), K(2)), 0, E(K(1, T0), K(2)), dict(activate=K(1, T0))),
        (AS(K(1, T0), K(2)), 1, E(K(1, T0), K(2)), dict(activate=K(1, T0))),  # at the floor
        # below the floor: sealed under already; the next secret is kept for the boundary
        (AS(K(1, T0), K(2)), 2, E(None, K(2)), dict(refused=K(1, T0))),
        # stored after a switch by the producer's own clock: no next secret
        (AS(K(2, B1), None), 2, E(K(2, B1)), dict(activate=K(2, B1))),
        (AS(K(1, T0), K(2), period=0), 0, E(K(1, T0), K(2), 0), dict(activate=K(1, T0))),
    ],
)
def test_restored(stored: KeyState, floor: int, after: Epochs, actions: dict[str, Any]) -> None:
    expect(restored(stored, floor), after, **actions)


# --- received: a key state from the AS ---------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "state", "floor", "after", "actions"),
    [
        pytest.param(
            E(period=P),
            AS(K(1, T0), K(2)),
            0,
            E(K(1, T0), K(2)),
            dict(activate=K(1, T0), save=True, reseal=True),
            id="first answer",
        ),
        pytest.param(
            E(K(1, T0), K(2)),
            AS(K(2, B1), K(3)),
            2,  # the floor is already at 2: allowed
            E(K(2, B1), K(3)),
            dict(activate=K(2, B1), save=True, reseal=True),
            id="scheduled rotation announced before the producer's clock got there",
        ),
        pytest.param(
            E(K(1, T0), K(2)),
            AS(K(3, T0 + 20), K(4)),
            1,
            E(K(3, T0 + 20), K(4)),
            dict(activate=K(3, T0 + 20), save=True, reseal=True),
            id="revocation in the middle of an epoch: at once, epochs skipped",
        ),
        pytest.param(
            E(K(1, T0), K(2)),
            AS(K(1, T0 + 1), K(2)),
            1,
            E(K(1, T0 + 1), K(2)),
            dict(save=True),
            id="same epoch: the AS's activated_at is taken, no re-seal",
        ),
        pytest.param(
            E(K(1, T0)),
            AS(K(1, T0), K(2), period=120),
            1,
            E(K(1, T0), K(2), period=120),
            dict(save=True),
            id="same epoch: the next secret and a new rotation period",
        ),
        pytest.param(
            E(K(1, T0), reported=True),
            AS(K(1, T0), K(2)),
            1,
            E(K(1, T0), K(2), reported=True),
            dict(save=True),
            id="same epoch after the end was reported: reported stays until a switch",
        ),
        pytest.param(
            E(K(2, B1)),
            AS(K(1, T0), K(2)),
            2,
            E(K(2, B1)),
            dict(save=True),
            id="older: the producer switched ahead at the boundary, the AS will catch up",
        ),
        pytest.param(
            E(K(2, B1)),
            AS(K(1, T0), K(2), period=30),
            2,
            E(K(2, B1), period=30),
            dict(save=True),
            id="older: only the rotation period is taken",
        ),
        pytest.param(
            E(K(2, B1), reported=True),
            AS(K(3, B1 + P + 4), K(4)),
            2,
            E(K(3, B1 + P + 4), K(4)),
            dict(activate=K(3, B1 + P + 4), save=True, reseal=True),
            id="back after an ended epoch: sealing again, reported cleared",
        ),
        pytest.param(
            E(period=P),
            AS(K(1, T0), K(2)),
            2,
            E(None, K(2)),
            dict(refused=K(1, T0)),
            id="below the floor, nothing known: refused, nothing to save",
        ),
        pytest.param(
            E(K(3, T0), K(4)),
            AS(K(4, B1), K(5)),
            5,
            E(K(3, T0), K(5)),
            dict(refused=K(4, B1), save=True),
            id="below the floor: refused, the next secret taken",
        ),
    ],
)
def test_received(
    before: Epochs, state: KeyState, floor: int, after: Epochs, actions: dict[str, Any]
) -> None:
    expect(received(before, state, floor), after, **actions)


# --- reached: the clock moved on ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "now", "floor", "after", "actions"),
    [
        pytest.param(E(), B1 + 10**6, 0, E(), {}, id="nothing known"),
        pytest.param(E(following=K(2)), B1, 0, E(following=K(2)), {}, id="no current epoch"),
        pytest.param(E(K(1, T0), K(2)), B1 - 1, 1, E(K(1, T0), K(2)), {}, id="a second before"),
        pytest.param(
            E(K(1, T0), K(2)),
            B1,
            1,
            E(K(2, B1)),
            dict(activate=K(2, B1), save=True, reseal=True),
            id="at the boundary, the AS unreachable: switch by the producer's clock",
        ),
        pytest.param(
            E(K(1, T0), K(2)),
            B1 + 7,
            1,
            E(K(2, B1)),
            dict(activate=K(2, B1), save=True, reseal=True),
            id="late tick: the new epoch counts from the boundary, not from now",
        ),
        pytest.param(
            E(K(1, T0), K(2)),
            B1 + P,
            1,
            E(K(2, B1), reported=True),
            dict(activate=K(2, B1), ended=True, save=True, reseal=True),
            id="two boundaries passed (off for a while): switch once, then that one ended",
        ),
        pytest.param(
            E(K(1, T0)),
            B1,
            1,
            E(K(1, T0), reported=True),
            dict(ended=True),
            id="at the boundary without the next secret: seal nothing, say so",
        ),
        pytest.param(
            E(K(1, T0), reported=True),
            B1 + 100,
            1,
            E(K(1, T0), reported=True),
            {},
            id="said so once",
        ),
        pytest.param(
            E(K(2, B1), K(2)),
            B1 + P,
            2,
            E(K(2, B1), K(2), reported=True),
            dict(ended=True),
            id="the 'next' secret is not newer: no switch",
        ),
        pytest.param(
            E(K(3, T0), K(4)),
            B1,
            5,
            E(K(3, T0), reported=True),
            dict(refused=K(4, B1), ended=True),
            id="the next epoch is below the floor: refused, forgotten, ended",
        ),
        pytest.param(
            E(K(1, T0), K(2), period=0),
            T0 + 10**9,
            1,
            E(K(1, T0), K(2), period=0),
            {},
            id="rotation period 0: never by the clock",
        ),
        pytest.param(
            E(K(1, None), K(2)),
            T0 + 10**9,
            1,
            E(K(1, None), K(2)),
            {},
            id="no activation time: never by the clock",
        ),
    ],
)
def test_reached(
    before: Epochs, now: int, floor: int, after: Epochs, actions: dict[str, Any]
) -> None:
    expect(reached(before, now, floor), after, **actions)


# --- stories: events in order, the floor as the producer keeps it ------------------------------


class Producer:
    """What producer.published does with the steps, without the I/O: the floor raised on each
    activation, the record kept when asked, the sealed epochs and the reports noted."""

    def __init__(self, floor: int = 0) -> None:
        self.epochs = Epochs(rotation_period=P)
        self.floor = floor
        self.disk: KeyState | None = None
        self.sealed_under: list[int] = []
        self.ended = 0
        self.refused: list[int] = []

    def take(self, step: Step) -> Step:
        if step.refused is not None:
            self.refused.append(step.refused.epoch)
        if step.activate is not None:
            assert step.activate.epoch >= self.floor
            self.floor = step.activate.epoch
        self.epochs = step.epochs
        self.ended += step.ended
        if step.save:
            self.disk = self.epochs.record(RID, PROFILE)
        if step.reseal:
            self.sealed_under.append(step.activate.epoch if step.activate else -1)
        return step

    def restore(self, stored: KeyState) -> Step:
        return self.take(restored(stored, self.floor))

    def receive(self, state: KeyState) -> Step:
        return self.take(received(self.epochs, state, self.floor))

    def tick(self, now: int) -> Step:
        return self.take(reached(self.epochs, now, self.floor))


def test_story_rotation_with_the_as_up() -> None:
    p = Producer()
    p.receive(AS(K(1, T0), K(2)))
    for now in range(T0, B1, 15):
        assert p.tick(now).activate is None and p.epochs.may_seal(now)
    # the producer's clock reaches the boundary a moment before the AS's notification
    assert p.tick(B1).activate == K(2, B1)
    assert p.disk == AS(K(2, B1), None)
    p.receive(AS(K(2, B1 + 1), K(3)))  # the AS's activated_at (a second later) is taken
    assert p.epochs == E(K(2, B1 + 1), K(3))
    assert p.disk == AS(K(2, B1 + 1), K(3))
    assert p.tick(B1 + P).activate is None  # the boundary moved with it
    assert p.tick(B1 + P + 1).activate == K(3, B1 + P + 1)
    assert p.sealed_under == [1, 2, 3] and p.ended == 0


def test_story_the_as_away_for_two_epochs_then_back() -> None:
    p = Producer()
    p.receive(AS(K(1, T0), K(2)))
    # the AS goes away: the producer still switches at the boundary, with the secret it holds
    assert p.tick(B1).activate == K(2, B1)
    assert p.epochs.may_seal(B1 + P - 1)
    # the next boundary without the AS: nothing may be sealed, said once
    assert p.tick(B1 + P).ended
    for now in range(B1 + P, B1 + 3 * P, 10):
        step = p.tick(now)
        assert not step.ended and step.activate is None and not p.epochs.may_seal(now)
    assert p.ended == 1
    # the AS is back (it rotated meanwhile, its epoch 4 began 5 s ago): sealing again at once
    back = B1 + 3 * P + 2
    step = p.receive(AS(K(4, back - 5), K(5)))
    assert step.activate == K(4, back - 5) and step.reseal
    assert p.epochs.may_seal(back) and not p.epochs.ended_reported
    assert p.sealed_under == [1, 2, 4] and p.floor == 4


def test_story_a_late_notification_does_not_take_the_producer_back() -> None:
    p = Producer()
    p.receive(AS(K(1, T0), K(2)))
    p.tick(B1)
    step = p.receive(AS(K(1, T0), K(2)))  # a notification of the old state arrives late
    assert step.activate is None and p.epochs.current == K(2, B1)
    assert p.floor == 2


def test_story_restart_catches_up_with_the_clock() -> None:
    stored = AS(K(1, T0), K(2))
    p = Producer(floor=1)
    assert p.restore(stored).activate == K(1, T0)
    # off for longer than an epoch: one switch (activated at the boundary), then nothing
    step = p.tick(B1 + P + 5)
    assert step.activate == K(2, B1) and step.ended
    assert not p.epochs.may_seal(B1 + P + 5)
    assert p.disk == AS(K(2, B1), None)


def test_story_restart_on_an_older_copy_of_the_state() -> None:
    """The key file says epoch 1, the sequence file's floor says 2 was used: epoch 1 is refused,
    the producer waits for the boundary (the next secret) or the AS."""
    p = Producer(floor=2)
    step = p.restore(AS(K(1, T0), K(2)))
    assert step.refused == K(1, T0) and p.epochs.current is None
    assert not p.epochs.may_seal(T0)
    assert p.tick(B1).activate is None  # no current epoch: no boundary either
    assert p.receive(AS(K(2, B1), K(3))).activate == K(2, B1)


def test_story_revocation_mid_epoch() -> None:
    p = Producer()
    p.receive(AS(K(1, T0), K(2)))
    revoked_at = T0 + 25
    step = p.receive(AS(K(2, revoked_at), K(3)))
    assert step.activate == K(2, revoked_at) and step.reseal
    assert p.epochs.boundary == revoked_at + P  # the new epoch runs a whole period
    assert p.tick(B1).activate is None


# --- following /keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "keepalive"),
    [(0, 30.0), (1, 1.0), (4, 1.0), (6, 1.5), (60, 15.0), (120, 30.0), (3600, 30.0)],
)
def test_keys_keepalive(period: int, keepalive: float) -> None:
    assert epochs.keys_keepalive(period) == keepalive


@pytest.mark.parametrize(
    ("delay", "failure", "wait"),
    [
        (1.0, Failure.DENIED, 30.0),  # an operator must act
        (16.0, Failure.DENIED, 30.0),
        (1.0, Failure.UNREACHABLE, 1.0),
        (2.0, Failure.UNREACHABLE, 2.0),
        (8.0, Failure.UNREACHABLE, 3.0),  # the AS restarting: back within 3 s
        (30.0, Failure.UNREACHABLE, 3.0),
        (1.0, Failure.OTHER, 1.0),
        (16.0, Failure.OTHER, 16.0),
    ],
)
def test_retry_delay(delay: float, failure: Failure, wait: float) -> None:
    assert epochs.retry_delay(delay, failure) == wait


@pytest.mark.parametrize(
    ("delay", "at_least", "wait"),
    [
        (1.0, 2.0, 2.0),  # every AS answered 5.03 with Max-Age 2: not sooner
        (8.0, 2.0, 3.0),  # the backoff is longer already
        (1.0, 10.0, 10.0),
        (1.0, None, 1.0),
    ],
)
def test_retry_delay_is_at_least_the_busy_as_max_age(
    delay: float, at_least: float | None, wait: float
) -> None:
    assert epochs.retry_delay(delay, Failure.UNREACHABLE, at_least) == wait


def _waits(failures: list[Failure | None]) -> list[float]:
    """The waits of the producer's /keys loop for a run of outcomes (None: a key state)."""
    delay, waits = epochs.FIRST_RETRY, []
    for failure in failures:
        if failure is None:
            delay = epochs.FIRST_RETRY
            continue
        wait = epochs.retry_delay(delay, failure)
        waits.append(wait)
        delay = epochs.backoff(wait)
    return waits


@pytest.mark.parametrize(
    ("failures", "waits"),
    [
        ([Failure.OTHER] * 7, [1, 2, 4, 8, 16, 30, 30]),
        ([Failure.UNREACHABLE] * 5, [1, 2, 3, 3, 3]),
        ([Failure.DENIED, Failure.DENIED, Failure.OTHER], [30, 30, 30]),
        ([Failure.DENIED, Failure.UNREACHABLE], [30, 3]),
        ([Failure.OTHER, Failure.OTHER, None, Failure.OTHER], [1, 2, 1]),  # a key state resets
    ],
)
def test_backoff_runs(failures: list[Failure | None], waits: list[float]) -> None:
    assert _waits(failures) == waits


# --- properties over random event sequences ----------------------------------------------------

EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(0, 3 * P)),
        st.tuples(
            st.just("as"),
            st.integers(1, 6),  # active epoch
            st.integers(-P, 2 * P),  # its activated_at, relative to now
            st.booleans(),  # a period change
        ),
    ),
    max_size=30,
)


@given(events=EVENTS, floor=st.integers(0, 2))
def test_epochs_only_go_forward_and_nothing_is_sealed_past_a_boundary(
    events: list[tuple[Any, ...]], floor: int
) -> None:
    p = Producer(floor=floor)
    now = T0
    activated: list[int] = []
    for event in events:
        if event[0] == "tick":
            now += event[1]
            step = p.tick(now)
        else:
            _, n, offset, change = event
            step = p.receive(AS(K(n, now + offset), K(n + 1), period=P // 2 if change else P))
        if step.activate is not None:
            activated.append(step.activate.epoch)
        if event[0] == "tick":
            boundary = p.epochs.boundary
            assert p.epochs.may_seal(now) == (
                p.epochs.current is not None and (boundary is None or now < boundary)
            )
            # after a tick, the current epoch's boundary is still ahead or nothing may be sealed
            if boundary is not None and now >= boundary:
                assert not p.epochs.may_seal(now) and p.epochs.ended_reported
    assert activated == sorted(set(activated))  # strictly increasing: never back, never twice
    assert all(epoch >= floor for epoch in activated)
    assert p.ended <= len(activated) + 1  # said once per epoch at most


def test_the_module_is_pure() -> None:
    """No I/O, no clock, no asyncio: only data records and the standard library's dataclasses."""
    source = Path(epochs.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {"__future__", "enum", "dataclasses", "oscar_io.aswire"}
