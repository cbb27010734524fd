"""deploy/prometheus/prometheus.yml and deploy/grafana/oscar-dashboard.json (issue 18): every
series the dashboard asks for is one the daemons export, and Prometheus scrapes the ports the
example configurations serve metrics on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from authz_server.metrics import AsMetrics
from oscar_io.metrics import Metrics
from producer.metrics import producer_metrics
from proxy.metrics import proxy_metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _exported() -> set[str]:
    """Every series name the three daemons' families export (per-resource ones included)."""
    families: list[Metrics] = [
        AsMetrics(per_resource=True).metrics,
        proxy_metrics(SimpleNamespace(counters=dict, answers={}, answer_seconds=None)),
        producer_metrics(None, per_resource=True),
    ]
    names = set()
    for metrics in families:
        for family in metrics.families.values():
            if family.kind == "counter":
                names.add(f"{family.name}_total")
            elif family.kind == "histogram":
                names |= {f"{family.name}_{end}" for end in ("bucket", "count", "sum")}
            else:
                names.add(family.name)
    return names


def test_the_dashboard_asks_only_for_series_the_daemons_export() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "oscar-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    asked = {name for expr in exprs for name in re.findall(r"\boscar_[a-z_]+", expr)}
    exported = _exported()
    assert asked, "the dashboard has no query"
    assert asked <= exported, sorted(asked - exported)
    # Each daemon has its panels.
    for prefix in ("oscar_as_", "oscar_proxy_", "oscar_producer_"):
        assert any(name.startswith(prefix) for name in asked), prefix
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_scrapes_the_ports_of_the_example_configurations() -> None:
    scrape = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    jobs = dict(
        re.findall(r'job_name: (oscar-[a-z]+)\s+static_configs:\s+- targets: \["([^"]+)"\]', scrape)
    )
    assert set(jobs) == {"oscar-as", "oscar-proxy", "oscar-producer"}
    for job, target in jobs.items():
        example = (DEPLOY / "etc" / "oscar" / f"{job.removeprefix('oscar-')}.toml").read_text()
        assert re.search(rf'^# metrics = "{re.escape(target)}"', example, re.MULTILINE), job
