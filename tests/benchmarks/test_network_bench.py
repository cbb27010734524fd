"""The network benchmark's own logic (bench.netcases, bench.netreport): caps and estimates keep a
run bounded, a transfer past its cap is cut there, libcoap's coap-client takes the command line
built for it, the ratios mark bounds, and the report turns the results into the RTT plot."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from as_harness import ROOT

# bench/ is not an installed package (as in test_as_flood).
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
from bench.netcases import (
    COAP_CLIENT,
    Result,
    libcoap_argv,
    libcoap_get,
    plan,
    show,
    tcp_copy,
    tcp_server,
    timed,
)
from bench.netreport import PLOT_SERIES, Link, figures, ratio_cell, rtt_plot
from bench.network import CASES, ENDPOINTS, OURS
from demo.system import free_port

KIB, MIB = 1 << 10, 1 << 20
COAP_SERVER = "/usr/bin/coap-server-openssl"
needs_libcoap = pytest.mark.skipif(
    not (os.path.exists(COAP_CLIENT) and os.path.exists(COAP_SERVER)), reason="no libcoap"
)


def test_plan_runs_what_fits_and_reports_what_cannot() -> None:
    cap = 60.0
    assert plan(100 * KIB, None, cap) is None  # the first size always runs
    assert plan(100 * KIB, (64, Result(5.0, "measured")), cap) is None  # 64 B: no extrapolation
    # 100 KiB in 5 s: 1 MiB is about 51 s, under the cap: it runs; at 7 s it would be 72 s.
    assert plan(MIB, (100 * KIB, Result(5.0, "measured")), cap) is None
    estimate = plan(MIB, (100 * KIB, Result(7.0, "measured")), cap)
    assert estimate is not None and estimate.kind == "estimate"
    assert estimate.seconds == pytest.approx(7.0 * 10.24)
    assert plan(MIB, (100 * KIB, Result(7.0, "measured")), cap, estimate=False) is None  # ours
    assert plan(10 * MIB, (MIB, Result(cap, "over")), cap) == Result(cap, "over")
    assert plan(10 * MIB, (MIB, Result(0.0, "limit")), cap) == Result(0.0, "limit")
    assert plan(10 * MIB, (MIB, Result(0.0, "fail")), cap) == Result(0.0, "fail")
    assert [
        show(r) for r in (Result(60, "over"), Result(72.4, "estimate"), Result(0, "limit"))
    ] == [
        "> 60",
        "~72 est",
        "limit",
    ]


@pytest.mark.asyncio
async def test_a_transfer_past_its_cap_is_cut_there_and_bytes_are_checked() -> None:
    start = time.monotonic()
    result = await timed(asyncio.Event().wait(), b"x", 0.3, "never")  # type: ignore[arg-type]
    assert result == Result(0.3, "over")
    assert time.monotonic() - start < 2.0

    async def wrong() -> bytes:
        return b"y"

    with pytest.raises(RuntimeError, match="1 bytes, not the 2 expected"):
        await timed(wrong(), b"xx", 1.0, "wrong")


@pytest.mark.asyncio
async def test_the_tcp_copy_moves_the_bytes_asked_for() -> None:
    data = {n: os.urandom(n) for n in (64, 300_000)}
    server = await tcp_server(data)
    try:
        port = server.sockets[0].getsockname()[1]
        for n, want in data.items():
            assert (await timed(tcp_copy(port, n), want, 10, "tcp")).kind == "measured"
    finally:
        server.close()


@needs_libcoap
@pytest.mark.asyncio
async def test_coap_client_takes_our_command_line_and_a_silent_server_hits_the_cap(
    tmp_path: Path,
) -> None:
    assert "-L" in libcoap_argv("coap://h/o", tmp_path / "o", 1.0)
    port = free_port()
    server = subprocess.Popen(
        [COAP_SERVER, "-A", "127.0.0.1", "-p", str(port), "-d", "20", "-L", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        obj = os.urandom(5000)  # five blocks
        source = tmp_path / "obj"
        source.write_bytes(obj)
        uri = f"coap://127.0.0.1:{port}/obj"
        put = [COAP_CLIENT, "-m", "put", "-b", "1024", "-L", "5", "-B", "5", "-f", str(source)]
        for attempt in range(20):  # coap-server prints nothing when ready
            if subprocess.run([*put, uri], timeout=30, capture_output=True).returncode == 0:
                break
            await asyncio.sleep(0.05 * attempt)
        got = await timed(libcoap_get(uri, tmp_path / "out", 10, len(obj)), obj, 10, "libcoap")
        assert got.kind == "measured"
    finally:
        server.terminate()
        server.wait(5)
    silent = f"coap://127.0.0.1:{free_port()}/obj"
    start = time.monotonic()
    got = await timed(libcoap_get(silent, tmp_path / "out", 1.0, 10), b"", 1.0, "libcoap")
    assert got == Result(1.0, "over")
    assert time.monotonic() - start < 3.0


def test_ratios_mark_bounds_and_estimates() -> None:
    ours = Result(1.0, "measured")
    assert ratio_cell(ours, Result(54.0, "measured"), faster=True) == "54x"
    assert ratio_cell(ours, Result(60.0, "over"), faster=True) == ">60x"
    assert ratio_cell(ours, Result(0.4, "measured"), faster=False) == "2.5x"
    assert ratio_cell(Result(30.0, "over"), Result(0.4, "measured"), faster=False) == ">75x"
    assert ratio_cell(ours, Result(53.0, "estimate"), faster=True) == "~53x"
    assert ratio_cell(Result(0.002, "measured"), Result(6.0, "measured"), faster=True) == "3,000x"
    assert ratio_cell(Result(0.0, "limit"), Result(9.0, "measured"), faster=True) == "-"


def _results() -> dict[Link, dict[tuple[int, str], Result]]:
    def row(ours: float, aiocoap: Result, tcp: float) -> dict[tuple[int, str], Result]:
        return {
            (MIB, OURS): Result(ours, "measured"),
            (MIB, "aiocoap"): aiocoap,
            (MIB, "tcp"): Result(tcp, "measured"),
            (10 * MIB, OURS): Result(0.0, "limit"),
            (10 * MIB, "aiocoap"): Result(9.0, "measured"),
        }

    return {
        Link(50, 0.0): row(1.1, Result(54.0, "measured"), 0.41),
        Link(0, 0.0): row(0.5, Result(0.7, "measured"), 0.004),
        Link(10, 0.0): row(0.3, Result(60.0, "over"), 0.09),
        Link(0, 0.01): row(30.0, Result(30.0, "over"), 0.01),
    }


def test_the_figures_judge_the_targets_and_the_plot_has_the_rtt_series() -> None:
    out = list(figures(_results(), [MIB, 10 * MIB], [OURS, "aiocoap", "tcp"], OURS, 0.25))
    by_name = {f.name: f for f in out if not hasattr(f, "series")}
    assert by_name["network/target/1MiB-50ms/vs-aiocoap"].met is True  # 54 / 1.1 = 49 >= 20
    assert by_name["network/target/1MiB-50ms/vs-tcp"].met is True  # 1.1 / 0.41 = 2.7 <= 3
    assert by_name["network/target/1MiB-rtt0-relay"].met is False  # 2.1 MB/s
    assert by_name["network/target/1MiB-loopback-direct"].value == pytest.approx(4.19, rel=0.01)
    assert by_name["network/target/10MiB-1%-loss/completes"].met is False  # limit only
    assert by_name["network/1MiB/rtt10ms-loss0%/tcp"].unit == "s"
    assert "lower bound" in str(by_name["network/1MiB/rtt10ms-loss0%/tcp"].baseline)

    plot = rtt_plot(_results())
    ours = plot.series[PLOT_SERIES[OURS]]
    assert ours == [(0.0, 0.5), (10.0, 0.3), (50.0, 1.1)]  # sorted by RTT, no lossy link
    assert plot.series[PLOT_SERIES["aiocoap"]] == [(0.0, 0.7), (50.0, 54.0)]  # over: not drawn
    # Drawing it (bench/report.py, matplotlib) is the bench's: the [bench] extra, not the tests'.
    assert plot.to_json()["series"][PLOT_SERIES[OURS]] == [[0.0, 0.5], [10.0, 0.3], [50.0, 1.1]]


def test_every_case_names_a_relay_endpoint_and_ours_is_a_case() -> None:
    assert OURS in {c.name for c in CASES}
    assert all(c.endpoint in ENDPOINTS for c in CASES)
    assert all(ENDPOINTS[c.endpoint] in ("udp", "tcp") for c in CASES)
