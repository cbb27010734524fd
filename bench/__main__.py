"""Run the OSCAR benchmarks and print one table: ``python -m bench [OPTIONS] [NAME ...]``.

With NAMEs, only the modules of :data:`bench.MODULES` whose name is or starts with one of them run,
in their usual order (``python -m bench producer`` runs ``producer_get``, ``producer_cpu`` and
``producer_footprint``).

Prints the machine first, then one row per case as it finishes: our figure and the baseline's, in
the case's unit (ops/s unless the module says otherwise), our overhead (in time per operation, or
in cost), the target and whether it is met. With
``--json FILE`` the figures are also written to FILE as a JSON list (see ``bench/README.md``);
nothing is written otherwise. The exit status is 0 whether or not targets are met (the benchmark
reports, it does not gate); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import MODULES, Figure, Settings, machine_info

_COLUMNS = (("case", 32), ("ours", 12), ("baseline", 15), ("overhead", 9))


def _header() -> str:
    cells = [
        f"{name:<{width}}" if i == 0 else f"{name:>{width}}"
        for i, (name, width) in enumerate(_COLUMNS)
    ]
    return " | ".join([*cells, "target", "met"])


def _number(value: float, width: int) -> str:
    """Whole numbers from 100 up, one decimal below (a start-up time in ms, a size in MiB)."""
    return f"{value:>{width},.0f}" if abs(value) >= 100 else f"{value:>{width}.1f}"


def _row(figure: Figure) -> str:
    widths = [width for _, width in _COLUMNS]
    cells = [
        f"{figure.name:<{widths[0]}}",
        _number(figure.value, widths[1]),
        _number(figure.baseline_value, widths[2]),
        f"{figure.overhead:>{widths[3] - 2}.1%}  ",
    ]
    target = f"< {figure.max_overhead:.0%}"
    return " | ".join([*cells, f"{target:<6}", "yes" if figure.met else "NO"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer, shorter measurements (well under a minute)"
    )
    parser.add_argument(
        "--json", metavar="FILE", type=Path, help="also write the figures to FILE as JSON"
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

    for key, value in machine_info():
        print(f"{key + ':':<14}{value}")
    print(
        f"{'mode:':<14}{'quick' if args.quick else 'normal'} "
        f"({settings.rounds} rounds x {settings.min_time} s per measurement, best round kept)"
    )

    figures: list[Figure] = []
    for module_name in selected:
        module = importlib.import_module(f"{__package__}.{module_name}")
        title = (module.__doc__ or "").splitlines()[0].replace("``", "")
        print(f"\n## {module_name}: {title}\n")
        header = _header()
        print(header)
        print("-" * len(header))
        for figure in module.run(settings):
            figures.append(figure)
            print(_row(figure), flush=True)

    met = sum(f.met for f in figures)
    print(f"\n{met}/{len(figures)} cases within their overhead targets.")
    if args.json is not None:
        args.json.write_text(json.dumps([f.to_json() for f in figures], indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
