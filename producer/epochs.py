"""The producer's epochs as a pure state machine: which secret to seal with at time ``t``, when to
switch to the next epoch, what to keep on disk, and when to ask the AS for ``/keys`` again.

No I/O, no clock, no asyncio: ``now`` and the epoch floor (the lowest epoch the producer may still
seal under, kept in its sequence state) are arguments, and every transition returns a new
:class:`Epochs` and what the caller has to do (a :class:`Step`). :class:`~producer.published.
Published` does that (raise the floor, build the sealer, write the key state, log, re-seal);
``tests/roles/producer/test_producer_epochs.py`` walks every transition without a process.

The three events::

    restored(stored, floor)        the key state saved before a restart
    received(epochs, state, floor) a key state from the AS (a /keys reply or notification)
    reached(epochs, now, floor)    the clock moved on (the producer ticks about 4 times a second)

The rules:

- The producer seals under ``current`` while ``now`` is before its **boundary**
  (``current.activated_at + rotation_period``; no boundary when the period is 0 or the AS gave no
  activation time). From the boundary on it may not seal under ``current`` any more.
- At the boundary it **switches by its own clock** to the next epoch, when the AS already sent
  that epoch's secret (``following``), also with the AS out of reach; the new epoch counts as
  activated at the boundary (not at ``now``), so a producer that was off for longer than a
  period switches once and then waits for the AS. It forgets ``following`` then: the AS sends the
  one after.
- Without the next secret at the boundary it **seals nothing new** and says so once (until it
  next switches).
- A key state from the AS with a **newer active epoch** is switched to at once (a rotation, a
  revocation, a compromise); with the **same** epoch the AS's ``activated_at`` is taken (it is
  authoritative) and ``following`` updated; with an **older** one (this producer switched ahead
  at the boundary) nothing changes but the rotation period: the AS will catch up.
- An epoch below the **floor** is refused (it was used already: its sequence numbers may be
  spent); the floor is raised to an epoch before the first object is sealed under it (the
  caller's I/O).
- What is kept on disk is ``current`` and ``following`` (:meth:`Epochs.record`), after every key
  state from the AS and every switch at a boundary.

Following ``/keys`` (the caller's loop): an observation quiet for :func:`keys_keepalive` seconds is
made again; after a failure the next attempt waits :func:`retry_delay`, and the delay doubles up to
:data:`MAX_BACKOFF` (:func:`backoff`) until a key state arrives (:data:`FIRST_RETRY` again).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from oscar_io.aswire import EpochKey, KeyState

__all__ = [
    "DENIED_RETRY",
    "FIRST_RETRY",
    "KEEPALIVE",
    "LIVENESS",
    "MAX_BACKOFF",
    "RETRY_UNREACHABLE",
    "Epochs",
    "Failure",
    "Step",
    "backoff",
    "keys_keepalive",
    "reached",
    "received",
    "restored",
    "retry_delay",
]

#: Seconds of silence after which the /keys observation is made again (at most).
KEEPALIVE = 30.0
#: The longest wait between two attempts to follow /keys.
MAX_BACKOFF = 30.0
#: Seconds without a word from the AS after which it is pinged: an AS restart ends the /keys
#: observation silently (see AsClient.watch_keys). A ping is a DTLS record each way and no
#: request for the AS to handle (pings of several resources at one moment are shared).
LIVENESS = 3.0
#: Seconds between attempts to reach an AS that does not answer (it is restarting, or away):
#: the producer observes /keys again at most this long after the AS is back.
RETRY_UNREACHABLE = 3.0
#: The first wait after a failure, and the wait again once a key state arrived.
FIRST_RETRY = 1.0
#: The wait after the AS refused this producer the resource (4.01/4.03): an operator must act.
DENIED_RETRY = 30.0


@dataclass(frozen=True, slots=True)
class Epochs:
    """What a producer knows of one resource's epochs.

    ``current`` is the epoch it seals under (None before the AS first answered, or when every
    epoch offered was below the floor), ``following`` the next epoch's secret when the AS sent it,
    ``rotation_period`` the seconds per epoch (0: a new epoch only when the AS says so).
    ``ended_reported`` is set once the end of ``current`` without a next secret was reported."""

    current: EpochKey | None = None
    following: EpochKey | None = None
    rotation_period: int = 0
    ended_reported: bool = False

    def __repr__(self) -> str:  # no secrets
        return (
            f"Epochs(current={_number(self.current)}, following={_number(self.following)}, "
            f"rotation_period={self.rotation_period}, boundary={self.boundary})"
        )

    @property
    def epoch(self) -> int | None:
        """The number of the epoch sealed under, or None."""
        return _number(self.current)

    @property
    def boundary(self) -> int | None:
        """When ``current`` ends by the producer's clock (None: no scheduled end)."""
        current = self.current
        if current is None or current.activated_at is None or self.rotation_period <= 0:
            return None
        return current.activated_at + self.rotation_period

    def may_seal(self, now: int) -> bool:
        """Whether ``current`` may be sealed under at ``now`` (before its boundary)."""
        boundary = self.boundary
        return self.current is not None and (boundary is None or now < boundary)

    def key_at(self, now: int) -> EpochKey | None:
        """The epoch key to seal with at ``now``, or None (nothing may be sealed)."""
        return self.current if self.may_seal(now) else None

    def record(self, resource_id: str, profile: str) -> KeyState | None:
        """What to keep on disk for the resource (None: nothing yet, keep what is there)."""
        if self.current is None:
            return None
        return KeyState(resource_id, profile, self.rotation_period, self.current, self.following)


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one event: the new :class:`Epochs` and what the caller must do, in this
    order: log ``refused``; for ``activate``, raise the floor to its epoch and seal under it from
    now on (before taking ``epochs``: if that fails, the old epochs stay, with the new
    ``rotation_period``); log ``ended``; write ``epochs.record`` when ``save``; re-seal the
    current value when ``reseal``."""

    epochs: Epochs
    #: The epoch to seal under from now on (a new :class:`~oscar.objects.Sealer`), or None.
    activate: EpochKey | None = None
    #: An epoch not switched to because it is below the floor, or None.
    refused: EpochKey | None = None
    #: Report once: ``current`` ended and no next secret is known (nothing new is sealed).
    ended: bool = False
    #: Write ``epochs.record(...)`` to disk.
    save: bool = False
    #: Seal the current value again, under the new epoch.
    reseal: bool = False


def _number(key: EpochKey | None) -> int | None:
    return None if key is None else key.epoch


def _switch(epochs: Epochs, key: EpochKey, floor: int) -> tuple[Epochs, bool]:
    """``epochs`` sealing under ``key``, unless ``key`` is below the floor."""
    if key.epoch < floor:
        return epochs, False
    return replace(epochs, current=key, ended_reported=False), True


def restored(stored: KeyState, floor: int) -> Step:
    """The key state saved before a restart (the caller then calls :func:`reached` with the
    time, to catch up with the boundaries that passed meanwhile)."""
    epochs = Epochs(rotation_period=stored.rotation_period)
    epochs, switched = _switch(epochs, stored.active, floor)
    return Step(
        replace(epochs, following=stored.next),
        activate=stored.active if switched else None,
        refused=None if switched else stored.active,
    )


def received(epochs: Epochs, state: KeyState, floor: int) -> Step:
    """A key state from the AS: a newer epoch is switched to at once."""
    epochs = replace(epochs, rotation_period=state.rotation_period)
    activate = refused = None
    if epochs.current is None or state.active.epoch > epochs.current.epoch:
        epochs, switched = _switch(epochs, state.active, floor)
        if switched:
            activate = state.active
        else:
            refused = state.active
        epochs = replace(epochs, following=state.next)
    elif state.active.epoch == epochs.current.epoch:
        # The AS's activated_at is authoritative (the sealer stays: the same epoch's secret).
        epochs = replace(epochs, current=state.active, following=state.next)
    # else: this producer switched ahead at the boundary; the AS will catch up.
    return Step(
        epochs,
        activate=activate,
        refused=refused,
        save=epochs.current is not None,
        reseal=activate is not None,
    )


def reached(epochs: Epochs, now: int, floor: int) -> Step:
    """The clock reached ``now``: switch to the next epoch at the boundary if its secret is known
    (activated at the boundary), else report once that nothing new can be sealed."""
    activate = refused = None
    ended = False
    boundary = epochs.boundary
    while boundary is not None and now >= boundary:
        upcoming, current = epochs.following, epochs.current
        if upcoming is None or current is None or upcoming.epoch <= current.epoch:
            if not epochs.ended_reported:
                ended = True
                epochs = replace(epochs, ended_reported=True)
            break
        key = EpochKey(upcoming.epoch, upcoming.secret, boundary)
        epochs, switched = _switch(epochs, key, floor)
        if switched:
            activate = key
        else:
            refused = key
        epochs = replace(epochs, following=None)
        boundary = epochs.boundary
    switched = activate is not None
    return Step(
        epochs, activate=activate, refused=refused, ended=ended, save=switched, reseal=switched
    )


# --- following /keys --------------------------------------------------------------------------


class Failure(enum.Enum):
    """Why following ``/keys`` stopped (the caller maps its exceptions to these)."""

    #: The AS refused this producer the resource (4.01/4.03).
    DENIED = "denied"
    #: The AS did not answer (restarting, away, the DTLS session lost).
    UNREACHABLE = "unreachable"
    #: Anything else: another AS error, a local error (disk), a bug.
    OTHER = "other"


def keys_keepalive(rotation_period: int) -> float:
    """Seconds after which a quiet ``/keys`` observation is made again: a quarter of the
    rotation period, from 1 s to :data:`KEEPALIVE` (:data:`KEEPALIVE` for a period of 0)."""
    return max(1.0, min(KEEPALIVE, rotation_period / 4 or KEEPALIVE))


def retry_delay(delay: float, failure: Failure, at_least: float | None = None) -> float:
    """Seconds to wait after ``failure`` before following ``/keys`` again, ``delay`` being the
    current backoff (:data:`FIRST_RETRY` at first and after every key state), and never less
    than ``at_least`` (an :class:`~oscar_io.errors.AsUnavailable`'s ``retry_after``: every AS
    listed is busy for that long)."""
    if failure is Failure.DENIED:
        wait = DENIED_RETRY
    elif failure is Failure.UNREACHABLE:
        wait = min(delay, RETRY_UNREACHABLE)
    else:
        wait = delay
    return wait if at_least is None else max(wait, at_least)


def backoff(waited: float) -> float:
    """The backoff after a wait of ``waited`` seconds: doubled, at most :data:`MAX_BACKOFF`."""
    return min(waited * 2, MAX_BACKOFF)
