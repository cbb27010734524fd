"""Run the OSCAR benchmarks and print one table: ``python -m bench [OPTIONS] [NAME ...]``.

With NAMEs, only the modules of :data:`bench.MODULES` whose name is or starts with one of them run,
in their usual order (``python -m bench producer`` runs ``producer_get``, ``producer_cpu`` and
``producer_footprint``).

Prints the machine first, then one row per figure as it is measured: our value and the baseline's,
in the figure's unit, the ratio (bigger is better), the target and whether it is met. At the end it
writes ``bench/results.json`` (one object per figure), ``bench/plots.json`` (the data of the plots)
and ``bench/run.json`` (machine, mode, date, time per module), then renders ``docs/PERFORMANCE.md``
and its PNG plots from those three files (:mod:`bench.report`). A run of some modules replaces
only those modules' figures and plots in the files. ``--no-write`` prints only.

The exit status is 0 whether or not targets are met (the benchmark reports, it does not gate); 2
for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import MODULES, Figure, Plot, Settings, machine_info, report

_COLUMNS = (("figure", 34), ("value", 12), ("baseline", 12), ("ratio", 8))


def _header() -> str:
    cells = [
        f"{name:<{width}}" if i == 0 else f"{name:>{width}}"
        for i, (name, width) in enumerate(_COLUMNS)
    ]
    return " | ".join([*cells, "target", "met"])


def _row(figure: Figure) -> str:
    widths = [width for _, width in _COLUMNS]
    ratio = figure.ratio
    base = figure.baseline_value
    cells = [
        f"{figure.name:<{widths[0]}}",
        f"{report.number(figure.value):>{widths[1]}}",
        f"{'-' if base is None else report.number(base):>{widths[2]}}",
        f"{'-' if ratio is None else f'{ratio:.3g}':>{widths[3]}}",
    ]
    met = {None: "-", True: "yes", False: "NO"}[figure.met]
    return " | ".join([*cells, f"{figure.target or '-':<6}", met]) + f"  [{figure.unit}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer, shorter measurements (under three minutes)"
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="print only: leave bench/*.json and docs/PERFORMANCE.md as they are",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=report.ROOT,
        help="project directory to write bench/results.json and docs/PERFORMANCE.md into "
        "(default: this checkout)",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"run only these modules, or those starting with NAME: {', '.join(MODULES)}",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if not any(m.startswith(n) for m in MODULES)]
    if unknown:
        parser.error(f"no benchmark module {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    selected = [m for m in MODULES if not args.names or any(m.startswith(n) for n in args.names)]
    settings = Settings.for_mode(args.quick)

    machine = machine_info()
    for key, value in machine:
        print(f"{key + ':':<14}{value}")
    print(
        f"{'mode:':<14}{'quick' if args.quick else 'full'} "
        f"({settings.rounds} rounds x {settings.min_time} s per timed comparison, best kept)"
    )

    figures: dict[str, list[Figure]] = {}
    plots: dict[str, list[Plot]] = {}
    seconds: dict[str, float] = {}
    started = time.monotonic()
    for module_name in selected:
        module = importlib.import_module(f"{__package__}.{module_name}")
        title = (module.__doc__ or "").splitlines()[0].replace("``", "")
        print(f"\n## {module_name}: {title}\n")
        header = _header()
        print(header)
        print("-" * len(header))
        module_started = time.monotonic()
        figures[module_name] = []
        plots[module_name] = []
        for item in module.run(settings):
            if isinstance(item, Plot):
                plots[module_name].append(item)
            else:
                figures[module_name].append(item)
                print(_row(item), flush=True)
        seconds[module_name] = time.monotonic() - module_started

    all_figures = [f for fs in figures.values() for f in fs]
    with_target = [f for f in all_figures if f.met is not None]
    print(
        f"\n{sum(bool(f.met) for f in with_target)}/{len(with_target)} targets met; "
        f"{len(all_figures)} figures in {time.monotonic() - started:.0f} s."
    )
    if not args.no_write:
        run = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "quick" if args.quick else "full",
            "machine": dict(machine),
            "seconds": {name: round(s, 1) for name, s in seconds.items()},
        }
        written = report.update(args.out, run, figures, plots)
        for path in written:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
