"""OSCAR benchmarks: our code against the bare ``cryptography`` primitives it stands on.

Each benchmark module (listed in :data:`MODULES`) has a ``run(settings)`` generator that yields one
:class:`Figure` per case; ``python -m bench`` (see :mod:`bench.__main__`) prints them as a table and
can write them as JSON. This module holds what the benchmarks share: the figure record and the
timing loop.

Timing: an *operation* is a callable that runs ``n`` iterations of the measured work. After a
warm-up, which also picks ``n`` so that one call takes a few milliseconds, ours and the baseline
are called in alternating batches, each timed with ``time.perf_counter``, until both have run for
a minimum duration: one round, giving one ops/s figure for each. Of several rounds the best
(highest ops/s) of each is kept. Alternating batches lets both sides see the same machine
conditions, and keeping the best round filters out most of the noise of a small shared machine.
The garbage collector stays enabled: its cost is part of what a real caller pays.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import cryptography
from cryptography.hazmat.backends.openssl import backend as _openssl

__all__ = [
    "MODULES",
    "Figure",
    "Operation",
    "Settings",
    "compare",
    "machine_info",
]

#: The benchmark modules ``python -m bench`` runs, in order (names under the ``bench`` package).
MODULES = (
    "seal_open",
    "as_grants",
    "producer_get",
    "consumer_open",
    "producer_cpu",
    "proxy_hits",
    "producer_footprint",
)

#: Runs ``n`` iterations of the measured work.
Operation = Callable[[int], object]

#: Overhead target: our time per operation at most this much above the baseline's (ratio > 0.8).
MAX_OVERHEAD = 0.25


@dataclass(frozen=True, slots=True)
class Settings:
    """How long to measure: per measurement, number of rounds, warm-up per operation."""

    min_time: float
    rounds: int
    warmup: float
    quick: bool

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(min_time=0.1, rounds=3, warmup=0.03, quick=True)
        return cls(min_time=0.3, rounds=5, warmup=0.1, quick=False)


@dataclass(frozen=True, slots=True)
class Figure:
    """One benchmark case: our throughput against the baseline's, and whether we met the target.

    ``ratio`` is ``value / baseline_value`` (ops/s, so bigger is better: 1.0 means no overhead);
    ``overhead`` is our time per operation over the baseline's, minus one.

    With ``lower_is_better`` the values are costs (milliseconds, MiB), not rates: then ``ratio``
    is ``baseline_value / value`` (still bigger is better) and ``overhead`` our cost over the
    baseline's, minus one.
    """

    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    max_overhead: float = MAX_OVERHEAD
    lower_is_better: bool = False

    @property
    def ratio(self) -> float:
        if self.lower_is_better:
            return self.baseline_value / self.value
        return self.value / self.baseline_value

    @property
    def overhead(self) -> float:
        return 1.0 / self.ratio - 1.0

    @property
    def target(self) -> str:
        return f"> {1.0 / (1.0 + self.max_overhead):.2g}"

    @property
    def met(self) -> bool:
        return self.overhead < self.max_overhead

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "value": round(self.value, 1),
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": round(self.baseline_value, 1),
            "ratio": round(self.ratio, 4),
            "target": self.target,
            "met": self.met,
            "lower_is_better": self.lower_is_better,
        }


def _calibrate(op: Operation, warmup: float) -> int:
    """Warm ``op`` up for about ``warmup`` seconds; return a batch size of a few milliseconds."""
    n = 1
    while True:
        start = time.perf_counter()
        op(n)
        elapsed = time.perf_counter() - start
        if elapsed >= 0.005 or n >= 1 << 20:
            break
        n *= 2
    deadline = time.perf_counter() + warmup
    while time.perf_counter() < deadline:
        op(n)
    return n


def _paired_rates(
    ours: Operation, n_ours: int, baseline: Operation, n_base: int, min_time: float
) -> tuple[float, float]:
    """Ops/s of ``ours`` and ``baseline``, batches alternating until each has run ``min_time``.

    Alternating batches of a few milliseconds makes both see the same machine conditions, so a
    burst of outside load slows both rather than skewing their ratio.
    """
    time_ours = time_base = 0.0
    count_ours = count_base = 0
    clock = time.perf_counter
    while time_ours < min_time or time_base < min_time:
        start = clock()
        ours(n_ours)
        middle = clock()
        baseline(n_base)
        end = clock()
        time_ours += middle - start
        time_base += end - middle
        count_ours += n_ours
        count_base += n_base
    return count_ours / time_ours, count_base / time_base


def compare(ours: Operation, baseline: Operation, settings: Settings) -> tuple[float, float]:
    """Best ops/s of ``ours`` and of ``baseline`` over several rounds of paired measurement."""
    n_ours = _calibrate(ours, settings.warmup)
    n_base = _calibrate(baseline, settings.warmup)
    best_ours = best_base = 0.0
    for _ in range(settings.rounds):
        rate_ours, rate_base = _paired_rates(ours, n_ours, baseline, n_base, settings.min_time)
        best_ours = max(best_ours, rate_ours)
        best_base = max(best_base, rate_base)
    return best_ours, best_base


def machine_info() -> list[tuple[str, str]]:
    """What the figures were measured on, for the header of the report."""
    return [
        ("platform", platform.platform()),
        ("machine", f"{platform.machine()} {platform.processor()}".strip()),
        ("cpu count", str(os.cpu_count())),
        ("python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        ("cryptography", f"{cryptography.__version__} ({_openssl.openssl_version_text()})"),
    ]
