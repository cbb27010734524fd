"""oscar_io.metrics: families kept as plain numbers, exported as Prometheus text over real HTTP
on loopback (in process: the daemons' own tests scrape them as processes)."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from oscar_io.metrics import (
    Histogram,
    Metrics,
    MetricsUnavailable,
    check_metrics_address,
    serve_metrics,
)


def _get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 (http only)
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, "", ""


def test_a_histogram_counts_each_observation_in_its_bucket_cumulated_at_export() -> None:
    histogram = Histogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.05, 0.05, 7.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.001", 2), ("0.01", 2), ("0.1", 4), ("+Inf", 5)]
    assert histogram.count == 5 and histogram.total == pytest.approx(7.1015)


def test_a_name_keeps_its_kind_and_labels() -> None:
    metrics = Metrics("oscar_test")
    requests = metrics.counter("requests", "Requests.", "outcome")
    assert metrics.counter("requests", "Requests.", "outcome") is requests
    with pytest.raises(ValueError, match="oscar_test_requests is already a counter"):
        metrics.gauge("requests", "Requests.", "outcome")
    with pytest.raises(ValueError):
        metrics.counter("requests", "Requests.", "outcome", "resource")


@pytest.mark.asyncio
async def test_the_endpoint_serves_counters_gauges_histograms_and_the_process_figures() -> None:
    metrics = Metrics("oscar_test")
    requests = metrics.counter("requests", "Requests answered.", "outcome")
    latency = metrics.histogram("request_seconds", "Seconds to answer.")
    table = metrics.gauge("connections", "Connections open.")
    broken = metrics.gauge("broken", "A reader that fails keeps its last value.")
    broken.set(value=5)
    size = [3]

    def read_table() -> None:
        table.set(value=size[0])

    def read_broken() -> None:
        raise OSError("gone")

    metrics.reader(read_broken)
    metrics.reader(read_table)
    requests.inc("ok", amount=2)
    requests.inc("refused")
    latency.observe(value=0.0003)
    server = await serve_metrics(metrics, "127.0.0.1", 0)
    try:
        assert server.port > 0 and repr(server).endswith(f":{server.port}/metrics)")
        status, kind, text = await asyncio.to_thread(_get, server.port)
        assert status == 200 and kind.startswith("text/plain; version=")
        lines = set(text.splitlines())
        assert 'oscar_test_requests_total{outcome="ok"} 2.0' in lines
        assert 'oscar_test_requests_total{outcome="refused"} 1.0' in lines
        assert "# TYPE oscar_test_requests_total counter" in lines
        assert 'oscar_test_request_seconds_bucket{le="0.00025"} 0.0' in lines
        assert 'oscar_test_request_seconds_bucket{le="0.0005"} 1.0' in lines
        assert "oscar_test_request_seconds_count 1.0" in lines
        assert "oscar_test_connections 3.0" in lines and "oscar_test_broken 5.0" in lines
        assert any(line.startswith("process_resident_memory_bytes ") for line in lines)
        size[0] = 9  # read again at the next scrape
        _, _, text = await asyncio.to_thread(_get, server.port)
        assert "oscar_test_connections 9.0" in text.splitlines()
        assert (await asyncio.to_thread(_get, server.port, "/metrics", "HEAD"))[0] == 200
        assert (await asyncio.to_thread(_get, server.port, "/"))[0] == 404
        assert (await asyncio.to_thread(_get, server.port, "/metrics", "POST"))[0] == 405
    finally:
        await server.close()
    with pytest.raises(OSError):  # closed: nothing listens any more
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_an_address_that_cannot_be_served_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsUnavailable, match=rf"^--metrics 127\.0\.0\.1:{port}: "):
            check_metrics_address("127.0.0.1", port)
    with pytest.raises(MetricsUnavailable, match=r"^--metrics 192\.0\.2\.1:9100: "):
        check_metrics_address("192.0.2.1", 9100)  # not an address of this machine
    check_metrics_address("127.0.0.1", 0)  # free
