"""Run fuzz targets with atheris: ``python -m fuzz [--seconds N] [TARGET ...]``.

Each target runs for ``--seconds`` under libFuzzer, on a corpus kept in ``fuzz/corpus/<target>/``
(git-ignored; seeded from the target's ``seeds()``). A crash input is saved as
``tests/fuzz_crashes/<target>/crash-<sha1>`` and the target starts again for the time left (at
most ``--max-crashes`` times). One line per target at the end: time, executions, executions per
second, new crash inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
CRASHES = ROOT / "tests" / "fuzz_crashes"
_EXECS = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")


def _child(target: str, argv: list[str]) -> None:
    """In a child process: hand the target to atheris (never returns)."""
    import atheris

    with atheris.instrument_imports():
        module = importlib.import_module(TARGETS[target])
    atheris.Setup([sys.argv[0], *argv], module.TestOneInput)
    atheris.Fuzz()


def _seed(target: str, corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in importlib.import_module(TARGETS[target]).seeds():
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)  # noqa: S324 (a name)


def run(target: str, seconds: int, max_crashes: int) -> tuple[float, int, int]:
    """Fuzz one target; return (seconds spent, executions, new crash inputs)."""
    corpus, crashes = CORPUS / target, CRASHES / target
    _seed(target, corpus)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    start, executions = time.monotonic(), 0
    for _ in range(max_crashes + 1):
        left = int(seconds - (time.monotonic() - start))
        if left < 1:
            break
        argv = [
            f"-max_total_time={left}",
            "-print_final_stats=1",
            "-max_len=4096",
            "-rss_limit_mb=2048",
            "-timeout=10",
            f"-artifact_prefix={crashes}/",
            str(corpus),
        ]
        # libFuzzer ends the child with _exit: its temporary files go with this directory.
        with tempfile.TemporaryDirectory(prefix="oscar-fuzz-") as tmp:
            child = subprocess.run(  # noqa: S603 (our own interpreter and module)
                [sys.executable, "-m", "fuzz", "--child", target, "--", *argv],
                cwd=ROOT,
                env={**os.environ, "TMPDIR": tmp},
                capture_output=True,
                check=False,
            )
        executions += sum(int(n) for n in _EXECS.findall(child.stderr))
        if child.returncode == 0:
            break
        log = CORPUS / f"{target}.log"  # git-ignored with the corpus: the traceback
        log.write_bytes(child.stdout[-20_000:] + child.stderr[-20_000:])
        sys.stderr.write(f"{target}: crash (exit {child.returncode}), see {log}\n")
    # libFuzzer names artifacts crash-/timeout-/oom-<sha1>: every one is a kept input.
    new = len(set(crashes.iterdir()) - before)
    if not any(crashes.iterdir()):
        crashes.rmdir()  # nothing kept: no empty directory left behind
    return time.monotonic() - start, executions, new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 300)))
    parser.add_argument("--max-crashes", type=int, default=5)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # --child TARGET -- LIBFUZZER-ARGS...
        _child(argv[1], argv[3:])
        return 0
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    print(f"{'target':<18} {'seconds':>8} {'executions':>11} {'exec/s':>8} {'crashes':>8}")
    found = 0
    for target in args.targets or list(TARGETS):
        spent, executions, crashes = run(target, args.seconds, args.max_crashes)
        found += crashes
        rate = executions / spent if spent else 0.0
        print(f"{target:<18} {spent:8.0f} {executions:11d} {rate:8.0f} {crashes:8d}", flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
