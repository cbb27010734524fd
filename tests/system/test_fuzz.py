"""The fuzz targets (fuzz/) as a regression check: kept crash inputs, seeds, random inputs.

Every input kept under ``tests/fuzz_crashes/<target>/`` is replayed; one whose bug is not fixed
yet is listed in :data:`KNOWN` and expected to fail (strictly: the fix makes the test fail until
the entry is removed). Then each target gets its seed corpus and a few thousand random inputs,
called directly (no coverage guidance, so this runs in seconds). ``make fuzz`` does the real,
coverage-guided fuzzing with atheris.
"""

from __future__ import annotations

import importlib
import random
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS: dict[str, str] = importlib.import_module("fuzz").TARGETS
CRASHES = ROOT / "tests" / "fuzz_crashes"

#: Kept inputs of bugs not fixed yet: (target, file name) -> reason. The config targets' UTF-8
#: crash (tomllib raised UnicodeDecodeError out of oscar_io.clikit.read_toml) is fixed; its
#: inputs stay.
KNOWN: dict[tuple[str, str], str] = {}

#: Random inputs per target, and the time it may take at most. The config targets write a file
#: per input and reach the budget first (about 1,000 inputs in 2 s); the others take their 3,000
#: well within it. The coverage-guided fuzzing is ``make fuzz``'s: this is a smoke run, and
#: ``make check`` must stay under a minute.
RANDOM_INPUTS = 3000
BUDGET_SECONDS = 2.0


def _kept() -> list[object]:
    cases = []
    for directory in sorted(p for p in CRASHES.iterdir() if p.is_dir()):
        for path in sorted(directory.iterdir()):
            reason = KNOWN.get((directory.name, path.name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(
                pytest.param(directory.name, path, marks=marks, id=f"{directory.name}/{path.name}")
            )
    return cases


def test_atheris_is_installed() -> None:
    """The test extra installs atheris; ``make fuzz`` needs it (the checks below do not)."""
    import atheris  # noqa: F401


def test_every_crash_directory_names_a_target() -> None:
    assert {p.name for p in CRASHES.iterdir() if p.is_dir()} <= set(TARGETS)


@pytest.mark.parametrize(("target", "path"), _kept())
def test_kept_crash_input(target: str, path: Path) -> None:
    importlib.import_module(TARGETS[target]).TestOneInput(path.read_bytes())


def _random_input(rng: random.Random, seeds: list[bytes]) -> bytes:
    """Random bytes, or a seed with a few bytes changed, cut or added."""
    if not seeds or rng.random() < 0.3:
        return rng.randbytes(rng.randrange(64))
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(1, 4)):
        action = rng.randrange(4)
        at = rng.randrange(len(data) + 1)
        if action == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif action == 1:
            del data[at:]
        elif action == 2:
            data[at:at] = rng.randbytes(rng.randrange(1, 8))
        elif data:
            del data[at : at + rng.randrange(1, 8)]
    return bytes(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_on_seeds_and_random_inputs(target: str) -> None:
    module = importlib.import_module(TARGETS[target])
    seeds = module.seeds()
    rng = random.Random(f"oscar-fuzz-{target}")
    try:
        for seed in seeds:
            module.TestOneInput(seed)
        deadline = time.monotonic() + BUDGET_SECONDS
        for _ in range(RANDOM_INPUTS):
            data = _random_input(rng, seeds)
            module.TestOneInput(data)
            if time.monotonic() > deadline:
                break
    finally:
        close = getattr(module, "close", None)
        if close is not None:
            close()
