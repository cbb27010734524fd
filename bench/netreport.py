"""What the network benchmark (:mod:`bench.network`) prints and yields from its results.

- :func:`print_table`: per link and size, one cell per case (:func:`bench.netcases.show`), then
  ours against aiocoap (how many times faster) and against the TCP copy (how many times slower);
  ``>``/``<`` where a side is a lower bound (over its cap) or an estimate;
- :func:`figures`: one :class:`~bench.Figure` per measured case against aiocoap, issue 17's
  targets, and the plot of transfer time against RTT (:func:`rtt_plot`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from . import Figure, Plot
from .netcases import Result, label, show

__all__ = ["PLOT_SERIES", "Link", "figures", "print_table", "ratio_cell", "rtt_plot"]

MIB = 1 << 20

Results = Mapping["Link", Mapping[tuple[int, str], Result]]

UNITS = {"measured": "s", "over": "s (> cap: lower bound)", "estimate": "s (estimate, not run)"}
BASE_NOTE = {"measured": "", "over": ", > cap: lower bound", "estimate": ", estimate, not run"}
#: Plot legend per case (cases not listed are not drawn).
PLOT_SERIES = {
    "prod-tcp": "ours, producer (large objects over CoAP over TCP)",
    "prod-w64": "ours, producer (UDP, W=64)",
    "prod-w8": "ours, producer (UDP, W=8)",
    "hit-w64": "ours, proxy hit (UDP, W=64)",
    "aiocoap": "aiocoap block-wise",
    "libcoap": "libcoap coap-client",
    "tcp": "TCP copy",
}


class Link(NamedTuple):
    rtt_ms: int
    loss: float

    @property
    def label(self) -> str:
        return f"rtt{self.rtt_ms}ms-loss{self.loss * 100:g}%"


def _timed(result: Result | None) -> bool:
    return result is not None and result.kind in ("measured", "over", "estimate")


def ratio_cell(ours: Result | None, other: Result | None, faster: bool) -> str:
    """``other / ours`` (``faster``) or ``ours / other``, marked ``>``/``<`` where a side is a
    bound (over its cap) and ``~`` where one is an estimate; ``-`` where there is no time."""
    if not _timed(ours) or not _timed(other) or ours is None or other is None:
        return "-"
    if not ours.seconds or not other.seconds:
        return "-"
    value = other.seconds / ours.seconds if faster else ours.seconds / other.seconds
    kinds = {ours.kind, other.kind}
    if "estimate" in kinds:
        mark = "~"
    elif ours.kind == "over" and other.kind == "over":
        mark = "?"
    elif other.kind == "over":
        mark = ">" if faster else "<"
    elif ours.kind == "over":
        mark = "<" if faster else ">"
    else:
        mark = ""
    return f"{mark}{value:,.0f}x" if value >= 1000 else f"{mark}{value:.3g}x"


def print_table(results: Results, sizes: Sequence[int], cases: Sequence[str], ours: str) -> None:
    """The matrix: seconds per transfer, and ``ours`` against aiocoap and TCP."""
    print("  seconds per transfer (> N: over the cap; ~N est: not run; limit: refused by a size")
    print(f"  limit; -: not run on this link); ratios of {ours}: x aiocoap = aiocoap / ours,")
    print("  / tcp = ours / TCP copy")
    width = max(11, *(len(c) + 2 for c in cases))
    head = "".join(f"{c:>{width}}" for c in cases)
    print(f"  {'link':<18}{'size':>7}{head}{'x aiocoap':>12}{'/ tcp':>10}")
    for link, by_case in results.items():
        for size in sizes:
            cells = "".join(
                f"{(show(by_case[size, c]) if (size, c) in by_case else '-'):>{width}}"
                for c in cases
            )
            mine = by_case.get((size, ours))
            vs_aiocoap = ratio_cell(mine, by_case.get((size, "aiocoap")), faster=True)
            vs_tcp = ratio_cell(mine, by_case.get((size, "tcp")), faster=False)
            print(f"  {link.label:<18}{label(size):>7}{cells}{vs_aiocoap:>12}{vs_tcp:>10}")


def rtt_plot(results: Results, size: int = MIB) -> Plot:
    """Transfer time of ``size`` against RTT on the links without loss, one series per case of
    :data:`PLOT_SERIES` (measured points only)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for link, by_case in results.items():
        if link.loss:
            continue
        for case, legend in PLOT_SERIES.items():
            result = by_case.get((size, case))
            if result is not None and result.kind == "measured":
                series.setdefault(legend, []).append((float(link.rtt_ms), result.seconds))
    for points in series.values():
        points.sort()
    return Plot(
        "network",
        f"{label(size)} over an emulated link, no loss",
        "RTT (ms)",
        "transfer time (s, log)",
        series,
        logy=True,
    )


def figures(
    results: Results,
    sizes: Sequence[int],
    cases: Sequence[str],
    ours: str,
    direct_1mib: float | None,
) -> Iterator[Figure | Plot]:
    """A figure per timed case against aiocoap (same link, size); the targets; the plot."""
    for link, by_case in results.items():
        for size in sizes:
            base = by_case.get((size, "aiocoap"))
            if not _timed(base) or base is None:
                continue
            for name in cases:
                result = by_case.get((size, name))
                if name == "aiocoap" or result is None or not _timed(result):
                    continue
                yield Figure(
                    f"network/{label(size)}/{link.label}/{name}",
                    result.seconds,
                    UNITS[result.kind],
                    "plain aiocoap block-wise, same bytes, same link" + BASE_NOTE[base.kind],
                    base.seconds,
                    lower_is_better=True,
                )
    far = results.get(Link(50, 0.0), {})
    mine = far.get((MIB, ours))
    if _timed(mine) and mine is not None:
        for other, ratio, what in (("aiocoap", 20.0, "plain aiocoap block-wise"),
                                   ("tcp", 1 / 3, "plain TCP copy")):  # fmt: skip
            base = far.get((MIB, other))
            if _timed(base) and base is not None:
                yield Figure(
                    f"network/target/1MiB-50ms/vs-{other}",
                    mine.seconds,
                    UNITS[mine.kind],
                    what + BASE_NOTE[base.kind],
                    base.seconds,
                    min_ratio=ratio,
                    lower_is_better=True,
                )
    near = results.get(Link(0, 0.0), {}).get((MIB, ours))
    if near is not None and near.kind == "measured":
        yield Figure("network/target/1MiB-rtt0-relay", MIB / near.seconds / 1e6, "MB/s",
                     min_value=50)  # fmt: skip
    if direct_1mib:
        yield Figure("network/target/1MiB-loopback-direct", MIB / direct_1mib / 1e6, "MB/s",
                     min_value=50)  # fmt: skip
    lossy = [by_case.get((sizes[-1], ours)) for link, by_case in results.items() if link.loss]
    if sizes[-1] >= 10 * MIB and lossy:
        done = any(r is not None and r.kind == "measured" for r in lossy)
        yield Figure(f"network/target/{label(sizes[-1])}-1%-loss/completes", float(done),
                     "1 = completed (ours, any RTT)", min_value=1)  # fmt: skip
    yield rtt_plot(results)
