"""Metrics of a daemon, and the HTTP endpoint Prometheus scrapes them from (``--metrics``).

A daemon keeps its figures as plain numbers on its hot paths (a dict increment, a bucket count):
nothing here imports prometheus-client or aiohttp until :func:`serve_metrics` runs, so a producer
on a small board without the ``ops`` extra runs exactly as before, and a daemon with metrics on
pays no lock or registry lookup per request. At each scrape, :class:`Metrics` turns its families
(and the gauges it reads then, e.g. a connection table's size) into Prometheus text.

Labels come from fixed vocabularies chosen by the daemon (an endpoint's name, an outcome), never
from a peer's bytes; resource names appear only where the operator asked for per-resource labels
(``per_resource``). No value is a secret: the families are counts, sizes and times.

The endpoint serves ``GET /metrics`` (and ``HEAD``) in Prometheus's text format, with the process
collectors (CPU, memory, open files, GC) beside the daemon's own; anything else is 404. It is
plain HTTP: bind it to loopback or a management network (docs/DEPLOY.md).
"""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .ports import tcp_bind_error
from .webserve import start_site

__all__ = [
    "LATENCY_BUCKETS",
    "OUTCOMES",
    "Family",
    "Histogram",
    "Metrics",
    "MetricsServer",
    "MetricsUnavailable",
    "check_metrics_address",
    "outcome_of",
    "serve_metrics",
]

#: Upper bounds (seconds) of the latency histograms' buckets: from a fast path's tens of
#: microseconds to a slow database's seconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


#: The outcomes a daemon counts its answers under (from the response code, :func:`outcome_of`).
OUTCOMES = (
    "ok", "unauthorized", "forbidden", "not_found", "rate_limited", "too_large", "bad_request",
    "unavailable", "error",
)  # fmt: skip

_OUTCOME_OF_CODE = {
    "4.01": "unauthorized",
    "4.03": "forbidden",
    "4.04": "not_found",
    "4.29": "rate_limited",
    "4.13": "too_large",
    "5.03": "unavailable",
}


def outcome_of(dotted: str) -> str:
    """The outcome label of a CoAP response code (``2.05`` -> ``ok``)."""
    if dotted.startswith("2."):
        return "ok"
    known = _OUTCOME_OF_CODE.get(dotted)
    if known is not None:
        return known
    return "bad_request" if dotted.startswith("4.") else "error"


class Histogram:
    """Counts of observations per bucket (cumulated at export), their sum and number."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, observations at or below it), ``+Inf`` last."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        return out


@dataclass
class Family:
    """One metric with its labels: ``kind`` is ``counter``, ``gauge`` or ``histogram``. Values by
    label values (a tuple as long as ``labels``)."""

    name: str
    help: str
    kind: str
    labels: tuple[str, ...] = ()
    values: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = value

    def observe(self, *labels: str, value: float) -> None:
        histogram = self.values.get(labels)
        if histogram is None:
            histogram = self.values[labels] = Histogram()
        histogram.observe(value)


class Metrics:
    """A daemon's metric families (its ``prefix``, e.g. ``oscar_as``), and readers: functions
    called at each scrape that set gauges or counters from the daemon's own state."""

    def __init__(self, prefix: str, *, per_resource: bool = False) -> None:
        self.prefix = prefix
        self.per_resource = per_resource
        self.families: dict[str, Family] = {}
        self._readers: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"Metrics({self.prefix!r}, {len(self.families)} families)"

    def _family(self, name: str, help: str, kind: str, labels: tuple[str, ...]) -> Family:
        full = f"{self.prefix}_{name}"
        family = self.families.get(full)
        if family is None:
            family = self.families[full] = Family(full, help, kind, labels)
        elif (family.kind, family.labels) != (kind, labels):
            raise ValueError(
                f"metric {full} is already a {family.kind} with labels {family.labels}"
            )
        return family

    def counter(self, name: str, help: str, *labels: str) -> Family:
        """A count that only grows (exported with ``_total``; ``name`` without it)."""
        return self._family(name, help, "counter", labels)

    def gauge(self, name: str, help: str, *labels: str) -> Family:
        return self._family(name, help, "gauge", labels)

    def histogram(self, name: str, help: str, *labels: str) -> Family:
        return self._family(name, help, "histogram", labels)

    def reader(self, read: Callable[[], None]) -> None:
        """Call ``read`` before each export (it sets values from the daemon's state)."""
        self._readers.append(read)

    def read(self) -> Iterator[Family]:
        """The families with their current values (the readers run first; one that fails
        leaves its families as they were)."""
        for read in self._readers:
            with contextlib.suppress(Exception):
                read()
        yield from self.families.values()


class _Collector:
    """prometheus-client's view of a :class:`Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for family in self.metrics.read():
            labels = list(family.labels)
            if family.kind == "counter":
                out: Any = CounterMetricFamily(family.name, family.help, labels=labels)
                for key, value in sorted(family.values.items()):
                    out.add_metric(list(key), value)
            elif family.kind == "gauge":
                out = GaugeMetricFamily(family.name, family.help, labels=labels)
                for key, value in sorted(family.values.items()):
                    out.add_metric(list(key), value)
            else:
                out = HistogramMetricFamily(family.name, family.help, labels=labels)
                for key, histogram in sorted(family.values.items()):
                    out.add_metric(list(key), histogram.cumulative(), histogram.total)
            yield out


class MetricsUnavailable(RuntimeError):
    """``--metrics`` cannot be served: the ops extra is missing or the address cannot be bound.
    The message says which, in one line."""


def check_metrics_address(host: str, port: int) -> None:
    """Before a daemon starts: raise :class:`MetricsUnavailable` if ``--metrics HOST:PORT``
    could not be served (so the daemon exits with one line instead of failing later)."""
    for module, package in (("aiohttp", "aiohttp"), ("prometheus_client", "prometheus-client")):
        if importlib.util.find_spec(module) is None:
            raise MetricsUnavailable(f"--metrics needs {package}: pip install 'oscar-iot[ops]'")
    problem = tcp_bind_error(host, port)
    if problem is not None:
        raise MetricsUnavailable(f"--metrics {host}:{port}: {problem}")


class MetricsServer:
    """A running metrics endpoint; :meth:`close` stops it."""

    def __init__(self, runner: Any, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    def __repr__(self) -> str:
        return f"MetricsServer(http://{self.host}:{self.port}/metrics)"

    async def close(self) -> None:
        await self._runner.cleanup()


async def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serve ``metrics`` at ``http://HOST:PORT/metrics`` on the running event loop (port 0: a
    free one, see :attr:`MetricsServer.port`).

    Raises :class:`MetricsUnavailable` without the ``ops`` extra, OSError if the address cannot
    be bound."""
    try:
        from aiohttp import web
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            GCCollector,
            PlatformCollector,
            ProcessCollector,
            generate_latest,
        )
    except ImportError as exc:
        raise MetricsUnavailable(
            f"--metrics needs {exc.name}: pip install 'oscar-iot[ops]'"
        ) from None

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(_Collector(metrics))

    async def scrape(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)  # HEAD too
    runner, bound = await start_site(app, host, port)
    return MetricsServer(runner, host, bound)
