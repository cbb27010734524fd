"""Stateful property test (hypothesis): the AS store's key lifecycle against a model.

:class:`KeyLifecycleMachine` drives a real store (one per run: SQLite in a temporary directory, or
a fresh database on the session's private PostgreSQL server: the test runs on both backends)
and the real ``GET /secret`` endpoint logic (:class:`authz_server.api.Endpoints`, in memory, no
sockets) with one producer, one consumer and two resources (one rotating every 60 s, one never):
scheduled and on-demand rotation, compromise of any epoch, destruction after a retention, grants
(with and without expiry), revocation and expiry of grants, secret requests by the consumer and
the owner, and a clock that only moves forward. After every step:

- every epoch's state in the store equals the model's, each resource has exactly one active and
  one pre-active epoch, and no epoch ever moved backwards along the KMIP lifecycle (pre-active →
  active → deactivated → destroyed; compromised from any of the first three, then destroyed);
- a destroyed epoch's secret is gone from the store and never served; what the consumer may read
  (``secret_view``) is what the model's grants and exclusions say, and a consumer is served only
  that;
- every secret seen for one (resource, epoch), from the consumer path, the owner path or the
  store, is the same bytes, and different epochs have different secrets;
- the audit chain verifies.

Compromised epochs stay readable to granted consumers until destroyed (docs/DECISIONS.md,
"Compromise"; docs/PROTOCOL.md, ``GET /secret``), so the model serves them. Revoking the producer
(which retires its resources, leaving no active epoch) is left out: it ends the lifecycle.

Each run owns an event loop (made in ``__init__``, closed in ``teardown``); the rules are
synchronous and run the store's coroutines on it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from pg_harness import BACKENDS, PgCluster

from authz_server.api import Endpoints, Forbidden, NotFound, Request
from authz_server.ca import CertificateAuthority, init_state
from authz_server.store import Conflict, NoSuchRecord, Resource, Store
from oscar import cbor

T = TypeVar("T")

START = 1_800_000_000
PRODUCER, CONSUMER = "sensor-1", "phone-1"
#: Resource id -> rotation period (0: never rotates on schedule).
PERIODS = {"sensor-1/humidity": 0, "sensor-1/temperature": 60}
RIDS = st.sampled_from(sorted(PERIODS))
PATTERNS = st.sampled_from(
    ["sensor-1/*", "sensor-1/temperature", "sensor-1/humidity", "sensor-1/t*", "sensor-2/*"]
)

PRE_ACTIVE, ACTIVE, DEACTIVATED, COMPROMISED, DESTROYED = (
    "pre-active",
    "active",
    "deactivated",
    "compromised",
    "destroyed",
)
#: Every move the lifecycle allows (staying put aside).
MOVES = {
    (PRE_ACTIVE, ACTIVE),
    (PRE_ACTIVE, COMPROMISED),
    (ACTIVE, DEACTIVATED),
    (ACTIVE, COMPROMISED),
    (DEACTIVATED, COMPROMISED),
    (DEACTIVATED, DESTROYED),
    (COMPROMISED, DESTROYED),
}


def _closure(moves: set[tuple[str, str]]) -> set[tuple[str, str]]:
    reach = set(moves)
    while grown := {(a, d) for a, b in reach for c, d in reach if b == c} - reach:
        reach |= grown
    return reach


#: Where an epoch may be one step later: one step can make several moves (two grants expiring
#: at once rotate a resource twice: pre-active -> active -> deactivated).
FORWARD = _closure(MOVES)


# --- the model -----------------------------------------------------------------------------------


@dataclass
class ModelEpoch:
    state: str
    deactivated_at: int | None = None


@dataclass
class ModelResource:
    period: int
    activated_at: int
    epochs: dict[int, ModelEpoch] = field(default_factory=dict)

    def numbered(self, state: str) -> int:
        (epoch,) = [n for n, e in self.epochs.items() if e.state == state]
        return epoch

    def rotate(self, now: int) -> int:
        active, upcoming = self.numbered(ACTIVE), self.numbered(PRE_ACTIVE)
        self.epochs[active] = ModelEpoch(DEACTIVATED, now)
        self.epochs[upcoming].state = ACTIVE
        self.epochs[upcoming + 1] = ModelEpoch(PRE_ACTIVE)
        self.activated_at = now
        return upcoming

    def due(self, now: int) -> bool:
        return self.period > 0 and self.activated_at + self.period <= now


@dataclass
class ModelGrant:
    pattern: str
    until: int | None
    revoked: bool = False

    def live(self, now: int) -> bool:
        return not self.revoked and (self.until is None or now < self.until)


class KeyLifecycleMachine(RuleBasedStateMachine):
    def __init__(self, cluster: PgCluster | None = None) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.cluster = cluster
        self.database = None if cluster is None else cluster.new_database()
        self.now = START
        self.store: Store = self.run(self._open(Path(self.tmp.name) / "state"))
        self.api = Endpoints(self.store, self.run(CertificateAuthority.load(self.store)),
                             clock=lambda: self.now)  # fmt: skip
        self.resources = {rid: ModelResource(period, START) for rid, period in PERIODS.items()}
        for model in self.resources.values():
            model.epochs = {1: ModelEpoch(ACTIVE), 2: ModelEpoch(PRE_ACTIVE)}
        self.grants: list[ModelGrant] = []
        #: resource -> [from epoch, to epoch or None] of the consumer's exclusions
        self.exclusions: dict[str, list[list[int | None]]] = {rid: [] for rid in PERIODS}
        #: (resource, epoch) -> the secret every path must agree on
        self.secrets: dict[tuple[str, int], bytes] = {}
        #: the store's states as the last check saw them
        self.seen_states: dict[tuple[str, int], str] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _open(self, state: Path) -> Store:
        store = await init_state(
            state, as_uri="coaps://127.0.0.1:5684", now=START, database=self.database
        )
        await store.add_device(PRODUCER, "producer", os.urandom(16), START)
        await store.add_device(CONSUMER, "consumer", os.urandom(16), START)
        for rid, period in PERIODS.items():
            await store.register_resource(
                Resource(rid, PRODUCER, 0, "ccm-es256", 60, period, START)
            )
        return store

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            self.tmp.cleanup()
            if self.cluster is not None and self.database is not None:
                self.cluster.drop_database(self.database)

    # --- model helpers ---------------------------------------------------------------------------

    def excluded(self, rid: str, epoch: int) -> bool:
        return any(
            lo is not None and lo <= epoch and (hi is None or epoch <= hi)
            for lo, hi in self.exclusions[rid]
        )

    def readable(self, rid: str, epoch: int) -> bool:
        granted = any(g.live(self.now) and fnmatch.fnmatchcase(rid, g.pattern) for g in self.grants)
        return granted and not self.excluded(rid, epoch)

    def _exclude_after_rotation(self, rid: str) -> None:
        self.exclusions[rid].append([self.resources[rid].rotate(self.now), None])

    def _remember(self, rid: str, epoch: int, secret: bytes | None) -> None:
        assert secret is not None and len(secret) == 32
        known = self.secrets.setdefault((rid, epoch), secret)
        assert known == secret, f"two different secrets for {rid} epoch {epoch}"

    # --- rules -----------------------------------------------------------------------------------

    @rule(seconds=st.sampled_from([1, 29, 59, 60, 61, 150, 400]))
    def advance_clock(self, seconds: int) -> None:
        self.now += seconds

    @rule(rid=RIDS)
    def rotate_on_demand(self, rid: str) -> None:
        epoch = self.run(self.store.rotate(rid, self.now, actor="admin", reason="test"))
        assert epoch == self.resources[rid].rotate(self.now)

    @rule()
    def rotate_scheduled(self) -> None:
        due = self.run(self.store.due_rotations(self.now))
        assert due == sorted(rid for rid, m in self.resources.items() if m.due(self.now))
        for rid in due:
            epoch = self.run(self.store.rotate(rid, self.now, actor="as", reason="schedule"))
            assert epoch == self.resources[rid].rotate(self.now)

    @rule(rid=RIDS, which=st.one_of(st.none(), st.integers(1, 12)))
    def compromise(self, rid: str, which: int | None) -> None:
        model = self.resources[rid]
        target = model.numbered(ACTIVE) if which is None else which
        state = model.epochs[target].state if target in model.epochs else None
        try:
            active = self.run(self.store.compromise(rid, which, self.now))
        except NoSuchRecord:
            assert state is None
            return
        except Conflict:
            assert state in (COMPROMISED, DESTROYED)
            return
        assert state in (PRE_ACTIVE, ACTIVE, DEACTIVATED)
        if state == ACTIVE:
            model.rotate(self.now)
        epoch = model.epochs[target]
        epoch.state = COMPROMISED
        epoch.deactivated_at = self.now if epoch.deactivated_at is None else epoch.deactivated_at
        if state == PRE_ACTIVE:
            model.epochs[target + 1] = ModelEpoch(PRE_ACTIVE)
        assert active == model.numbered(ACTIVE)

    @rule(retention=st.sampled_from([0, 60, 300]))
    def destroy_expired(self, retention: int) -> None:
        destroyed = self.run(self.store.destroy_expired(self.now, retention))
        expected = []
        for rid, model in sorted(self.resources.items()):
            for n, epoch in sorted(model.epochs.items()):
                if epoch.state in (DEACTIVATED, COMPROMISED):
                    assert epoch.deactivated_at is not None
                    if epoch.deactivated_at <= self.now - retention:
                        epoch.state = DESTROYED
                        expected.append((rid, n))
        assert destroyed == expected

    @rule(pattern=PATTERNS, lasts=st.one_of(st.none(), st.integers(1, 120)))
    def grant(self, pattern: str, lasts: int | None) -> None:
        until = None if lasts is None else self.now + lasts
        rotated = self.run(self.store.add_grant(CONSUMER, pattern, until, self.now))
        self.grants.append(ModelGrant(pattern, until))
        expected = []
        for rid in sorted(self.exclusions):
            spans = [span for span in self.exclusions[rid] if span[1] is None]
            if spans and fnmatch.fnmatchcase(rid, pattern):
                for span in spans:
                    span[1] = self.resources[rid].numbered(ACTIVE)
                self.resources[rid].rotate(self.now)
                expected.append(rid)
        assert rotated == expected

    @rule(pattern=st.one_of(st.none(), PATTERNS))
    def revoke_grants(self, pattern: str | None) -> None:
        chosen = [g for g in self.grants if not g.revoked and pattern in (None, g.pattern)]
        try:
            rotated = self.run(self.store.revoke_grants(CONSUMER, pattern, self.now))
        except NoSuchRecord:
            assert not chosen
            return
        assert chosen
        for g in chosen:
            g.revoked = True
        expected = [
            rid
            for rid in sorted(self.resources)
            if any(fnmatch.fnmatchcase(rid, g.pattern) for g in chosen)
        ]
        for rid in expected:
            self._exclude_after_rotation(rid)
        assert rotated == expected

    @rule()
    def expire_grants(self) -> None:
        ended = self.run(self.store.expire_grants(self.now))
        expected = []
        for g in self.grants:
            if g.revoked or g.until is None or g.until > self.now:
                continue
            g.revoked = True
            remaining = [h.pattern for h in self.grants if h.live(self.now)]
            rotated = [
                rid
                for rid in sorted(self.resources)
                if fnmatch.fnmatchcase(rid, g.pattern)
                and not any(fnmatch.fnmatchcase(rid, p) for p in remaining)
            ]
            for rid in rotated:
                self._exclude_after_rotation(rid)
            expected.append((CONSUMER, rotated))
        assert ended == expected

    def _ask(self, device: str, rid: str, epoch: int | None) -> dict[str, Any] | str:
        query = (f"r={rid}",) if epoch is None else (f"r={rid}", f"e={epoch}")
        try:
            reply = self.run(self.api.handle(Request(device, "GET", ("secret",), query)))
        except Forbidden:
            return "forbidden"
        except NotFound:
            return "not found"
        answer = cbor.loads(reply.payload)
        assert isinstance(answer, dict)
        return {str(key): value for key, value in answer.items()}

    @rule(rid=RIDS, epoch=st.one_of(st.none(), st.integers(1, 12)))
    def consumer_asks(self, rid: str, epoch: int | None) -> None:
        model = self.resources[rid]
        wanted = model.numbered(ACTIVE) if epoch is None else epoch
        state = model.epochs[wanted].state if wanted in model.epochs else None
        if state == PRE_ACTIVE and self.readable(rid, wanted) and model.due(self.now):
            # The endpoint rotates a resource whose scheduler is late (api._rotate_if_due).
            model.rotate(self.now)
            state = ACTIVE
        answer = self._ask(CONSUMER, rid, epoch)
        if not self.readable(rid, wanted):
            assert answer == "forbidden", f"served {rid} epoch {wanted} without a live grant"
        elif state is None or state == DESTROYED:
            assert answer == "not found"
        elif state == PRE_ACTIVE:
            assert answer == "forbidden"
        else:
            assert isinstance(answer, dict), answer
            assert (answer["epoch"], answer["state"]) == (wanted, state)
            self._remember(rid, wanted, answer["secret"])

    @rule(rid=RIDS, epoch=st.one_of(st.none(), st.integers(1, 12)))
    def producer_asks(self, rid: str, epoch: int | None) -> None:
        model = self.resources[rid]
        wanted = model.numbered(ACTIVE) if epoch is None else epoch
        state = model.epochs[wanted].state if wanted in model.epochs else None
        answer = self._ask(PRODUCER, rid, epoch)
        if state is None or state == DESTROYED:
            assert answer == "not found"
        else:
            assert isinstance(answer, dict), answer
            assert (answer["epoch"], answer["state"]) == (wanted, state)
            self._remember(rid, wanted, answer["secret"])

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        for rid, model in self.resources.items():
            stored = self.run(self.store.epochs(rid))
            states = {e.epoch: e.state for e in stored}
            assert states == {n: e.state for n, e in model.epochs.items()}, rid
            assert sorted(states.values()).count(ACTIVE) == 1, f"{rid}: {states}"
            assert sorted(states.values()).count(PRE_ACTIVE) == 1, f"{rid}: {states}"

    @invariant()
    def states_only_move_forward(self) -> None:
        now: dict[tuple[str, int], str] = {}
        for rid in self.resources:
            for e in self.run(self.store.epochs(rid)):
                now[(rid, e.epoch)] = e.state
        for key, before in self.seen_states.items():
            assert key in now, f"epoch {key} disappeared"
            after = now[key]
            assert after == before or (before, after) in FORWARD, f"{key}: {before} -> {after}"
        self.seen_states = now

    @invariant()
    def secrets_are_kept_and_destroyed_ones_are_gone(self) -> None:
        for rid, model in self.resources.items():
            for n, epoch in model.epochs.items():
                stored = self.run(self.store.epoch(rid, n, with_secret=True))
                view = self.run(self.store.secret_view(CONSUMER, rid, n, self.now))
                assert stored is not None and view.epoch is not None
                assert view.readable == self.readable(rid, n), (rid, n)
                if epoch.state == DESTROYED:
                    assert stored.secret is None and view.epoch.secret is None
                    continue
                self._remember(rid, n, stored.secret)
                self._remember(rid, n, view.epoch.secret)
        secrets = list(self.secrets.values())
        assert len(set(secrets)) == len(secrets), "two epochs share a secret"

    @invariant()
    def audit_chain_verifies(self) -> None:
        ok, summary = self.run(self.store.verify_audit())
        assert ok, summary


SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None)
#: On PostgreSQL each example makes a database, and the statements are the same rules in another
#: dialect: fewer runs of the same machine (SQLite's 25 explore the rules; ~20 s -> ~7 s).
PG_SETTINGS = settings(SETTINGS, max_examples=8)


@pytest.fixture(params=BACKENDS)
def backing(request: pytest.FixtureRequest) -> PgCluster | None:
    """The backend of the runs: None for SQLite, else the session's PostgreSQL cluster."""
    return request.getfixturevalue("pg_cluster") if request.param == "postgresql" else None


def test_key_lifecycle(backing: PgCluster | None) -> None:
    chosen = SETTINGS if backing is None else PG_SETTINGS
    run_state_machine_as_test(lambda: KeyLifecycleMachine(backing), settings=chosen)
