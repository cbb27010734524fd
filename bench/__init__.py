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
    "SEAL_OPEN_MIN_RATIO",
    "Figure",
    "Operation",
    "Plot",
    "Settings",
    "compare",
    "machine_info",
]

#: The benchmark modules ``python -m bench`` runs, in order (names under the ``bench`` package).
MODULES = (
    "seal_open",
    "as_grants",
    "as_scale",
    "as_cluster",
    "producer_get",
    "consumer_open",
    "producer_cpu",
    "proxy_hits",
    "proxy_notify",
    "proxy_scale",
    "proxy_cluster",
    "large_transfer",
    "network",
    "producer_footprint",
    "producer_observers",
    "multicast",
    "as_flood",
    "audit_verify",
    "audit_retention",
)

#: Runs ``n`` iterations of the measured work.
Operation = Callable[[int], object]

#: Issue 7's target for seal and open: at most 1.25 times the bare primitives' time per operation.
SEAL_OPEN_MIN_RATIO = 0.8


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
    """One measured figure, and, where something was measured beside it, the baseline's.

    ``ratio`` is oriented so that bigger is better: ``value / baseline_value`` for rates
    (ops/s), ``baseline_value / value`` with ``lower_is_better`` (costs: milliseconds, MiB,
    CPU seconds). ``min_ratio`` is the target (``ratio >= min_ratio``), or ``min_value`` an
    absolute floor; ``None`` where no issue sets one. A figure without a baseline (a scale
    measurement: a database size, a latency at 100,000 resources) has ``ratio`` ``None``.
    """

    name: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    min_ratio: float | None = None
    lower_is_better: bool = False
    #: An absolute floor instead of a ratio target (issue 7's "≥ 100 MB/s"): met when
    #: ``value >= min_value``, whatever the baseline.
    min_value: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline_value is None:
            return None
        if self.lower_is_better:
            return self.baseline_value / self.value if self.value else float("inf")
        return self.value / self.baseline_value if self.baseline_value else float("inf")

    @property
    def overhead(self) -> float | None:
        """Our time per operation (or our cost) over the baseline's, minus one."""
        ratio = self.ratio
        return None if ratio is None or ratio == 0 else 1.0 / ratio - 1.0

    @property
    def target(self) -> str | None:
        if self.min_value is not None:
            return f"value >= {self.min_value:g} {self.unit}"
        return None if self.min_ratio is None else f">= {self.min_ratio:g}"

    @property
    def met(self) -> bool | None:
        if self.min_value is not None:
            return self.value >= self.min_value
        ratio = self.ratio
        if self.min_ratio is None or ratio is None:
            return None
        return ratio >= self.min_ratio

    def to_json(self) -> dict[str, object]:
        ratio = self.ratio
        return {
            "name": self.name,
            "value": _round(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": None if self.baseline_value is None else _round(self.baseline_value),
            "ratio": None if ratio is None else round(ratio, 4),
            "target": self.target,
            "met": self.met,
            "lower_is_better": self.lower_is_better,
        }


def _round(value: float) -> float:
    """Four significant digits at least (a 0.0123 s latency stays readable)."""
    if value == 0 or abs(value) >= 100:
        return round(value, 1)
    digits = 3 - int(f"{abs(value):e}".split("e")[1])
    return round(value, max(digits, 1))


@dataclass(frozen=True, slots=True)
class Plot:
    """Data for one PNG in ``docs/``: named series of (x, y) points, drawn by ``bench.report``.

    A benchmark module yields a ``Plot`` beside its figures; ``python -m bench`` keeps the data in
    ``bench/plots.json`` and draws ``docs/perf-<name>.png``. With ``panels``, the series are
    split over several side-by-side panels: ``series`` keys are ``"<panel>|<label>"``.
    """

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]
    logx: bool = False
    logy: bool = False
    panels: tuple[tuple[str, str], ...] = ()  # (panel key, y label) when split into panels

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "title": self.title,
            "xlabel": self.xlabel,
            "ylabel": self.ylabel,
            "series": {k: [list(p) for p in v] for k, v in self.series.items()},
            "logx": self.logx,
            "logy": self.logy,
            "panels": [list(p) for p in self.panels],
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
