"""The check tier's guard: a test that starts a process without being classified fails, however
it starts it and even if it swallows the error; a stale classification is an error (tests/tiers.py).
Each case runs an inner pytest session in this process (pytester), so nothing here starts one."""

from __future__ import annotations

import pytest
import tiers

CASES = """
import asyncio, multiprocessing, os, subprocess

def test_pure():
    assert True

def test_swallowed():
    try:
        subprocess.run(["true"], check=False)
    except Exception:
        pass

def test_asyncio():
    async def main():
        await (await asyncio.create_subprocess_exec("true")).wait()
    asyncio.run(main())

def test_system():
    os.system("true")

def test_multiprocessing():
    process = multiprocessing.get_context("spawn").Process(target=print)
    process.start()
    process.join()

def test_classified():
    subprocess.run(["true"], check=True)
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeconftest('pytest_plugins = ["tiers"]')
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers = process: see tiers.py\n"
    )
    pytester.makepyfile(test_cases=CASES)
    monkeypatch.setattr(tiers, "TESTS", pytester.path)
    monkeypatch.setattr(tiers, "PROCESS", {"test_cases": tiers.only("test_classified")})
    return pytester


def test_every_way_to_start_a_process_fails_in_the_check_tier(inner: pytest.Pytester) -> None:
    result = inner.runpytest_inprocess("--check-tier", "-p", "no:cacheprovider")
    outcomes = {report.head_line: report.outcome for report in _reports(result)}
    assert outcomes == {
        "test_pure": "passed",
        "test_swallowed": "failed",  # at teardown: the error was caught inside the test
        "test_asyncio": "failed",
        "test_system": "failed",
        "test_multiprocessing": "failed",
    }
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*test_swallowed started a process in the check tier*"])


def test_classified_tests_are_deselected_in_the_check_tier_and_marked(
    inner: pytest.Pytester,
) -> None:
    assert "1 deselected" in str(inner.runpytest_inprocess("--check-tier").stdout)
    marked = inner.runpytest_inprocess("-m", "process", "--collect-only", "-q")
    marked.stdout.fnmatch_lines(["test_cases.py::test_classified", "*1/6 tests collected*"])


def test_a_stale_classification_is_an_error_in_the_check_tier(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiers, "PROCESS", {"test_cases": tiers.every("test_gone")})
    inner.runpytest_inprocess("--check-tier").stderr.fnmatch_lines(
        ["*PROCESS names no such test: test_cases::test_gone*"]
    )
    monkeypatch.setattr(tiers, "PROCESS", {"test_moved": tiers.every()})
    inner.runpytest_inprocess("--check-tier").stderr.fnmatch_lines(
        ["*PROCESS names no test module: test_moved*"]
    )


def _reports(result: pytest.RunResult) -> list[pytest.TestReport]:
    """One report per test: its first failed phase, else its call."""
    by_test: dict[str, pytest.TestReport] = {}
    for report in result.reprec.getreports("pytest_runtest_logreport"):  # type: ignore[attr-defined]
        kept = by_test.get(report.head_line)
        if (
            kept is None
            or (report.failed and not kept.failed)
            or (report.when == "call" and not kept.failed)
        ):
            by_test[report.head_line] = report
    return list(by_test.values())
