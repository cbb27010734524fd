"""The two test tiers, and the guard that keeps them honest (hooks wired in by conftest.py).

- ``make check`` runs ``pytest --check-tier``: every test that starts no process, with the guard on.
- ``make test`` runs everything (CI).

A test starts a process when it (or a fixture it uses) runs a subprocess, forks, or spawns: the
AS, a producer, a proxy, the command line tools, libcoap's client. Such tests get the ``process``
marker from :data:`PROCESS` below, the one place that classification is written (module by module:
every test of it, every test but some, or only some), and from :data:`PROCESS_PARAMS` for a
parameter that starts one wherever it is taken (the AS store's tests on PostgreSQL).

With ``--check-tier`` those tests are deselected, and starting a process anywhere in the session
(collection, fixtures, tests) raises :class:`ProcessInCheckTier` and fails the test that tried, even
if it caught the exception. An entry here that names no test any more is an error in that tier too.
So a mis-classified test fails loudly in ``make check`` instead of slowing it down or hiding there.
"""

from __future__ import annotations

import _posixsubprocess
import os
import subprocess
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class Starts:
    """Which tests of one module start a process: every one but ``but``, or ``only`` these."""

    only: frozenset[str] = frozenset()
    but: frozenset[str] = frozenset()

    def __contains__(self, function: str) -> bool:
        return function in self.only if self.only else function not in self.but

    @property
    def names(self) -> frozenset[str]:
        return self.only | self.but


def every(*but: str) -> Starts:
    return Starts(but=frozenset(but))


def only(*names: str) -> Starts:
    return Starts(only=frozenset(names))


#: The one classification: test module (file stem) -> its tests that start a process (by function
#: name, parameters aside). A module not named here starts none.
PROCESS: dict[str, Starts] = {
    "test_as_audit_flood": every(),
    "test_as_console_browser": every(),
    "test_as_console": only(
        "test_serve_refuses_an_admin_address_it_cannot_serve",
        "test_a_database_that_cannot_answer_is_a_503_then_the_console_goes_on",
    ),
    "test_as_cli": only(
        "test_init_records_a_postgresql_database_and_every_command_uses_it",
        "test_module_entry_point",
    ),
    "test_as_duties": only("test_two_as_processes_rotate_each_due_resource_once"),
    "test_as_failover": every(),
    "test_as_health": every(),
    "test_as_storm": every(),
    "test_as_failover_roles": every(),
    "test_as_metrics": only(
        "test_the_as_counts_its_requests_by_endpoint_and_outcome_and_its_sessions",
        "test_a_bad_or_taken_metrics_address_is_one_line_before_anything_starts",
    ),
    "test_as_flood": only(
        "test_a_new_handshake_from_a_dead_peers_port_is_answered_at_once",
        "test_a_hello_from_a_new_port_gets_a_stateless_cookie_and_junk_gets_nothing",
        "test_junk_hellos_cannot_evict_established_sessions_from_a_full_table",
        "test_junk_hellos_from_many_ports_leave_nothing_behind",
        "test_sessions_and_new_handshakes_are_served_during_a_10000_per_second_flood",
    ),
    "test_as_hotpath": only(
        "test_a_device_revoked_by_the_admin_cli_is_unauthorized_at_the_next_request",
        "test_a_grant_added_by_the_admin_cli_is_honoured_at_the_next_request",
        "test_a_grant_revoked_by_the_admin_cli_is_refused_at_the_next_request",
        "test_a_rotation_by_the_admin_cli_is_served_at_the_next_request",
        "test_a_running_as_refuses_a_grant_the_admin_cli_revoked_on_the_same_session",
    ),
    "test_as_cluster": every(
        "test_a_bad_command_timeout_is_one_clear_error_without_the_password",
        "test_the_command_timeout_is_5_s_unless_the_url_asks_for_another",
    ),
    "test_as_parts_process": every(),
    "test_as_pg_restart": every(),
    "test_as_migrate": every(
        "test_a_bad_target_url_is_a_usage_error_before_anything",
        "test_tables_are_every_table_and_column_of_the_sqlite_schema",
    ),
    "test_as_links": every("test_link_psk_derivation_is_the_documented_one"),
    "test_as_retention": every(
        "test_a_prune_bounded_to_a_number_of_records_goes_in_steps",
        "test_the_as_catches_up_in_steps_without_waiting_an_hour",
    ),
    "test_as_server": every("test_token_bucket", "test_unknown_identities_get_a_stable_decoy_key"),
    "test_as_store": only(
        "test_a_postgresql_database_of_a_newer_schema_or_another_as_is_refused",
        "test_kill_9_in_a_burst_of_rotations_leaves_a_consistent_database",
    ),
    "test_attacks_as": every("test_metacharacters_in_every_admin_cli_field_are_refused"),
    "test_attacks_leaks": every("test_the_search_finds_every_encoding"),
    "test_attacks_objects": every(),
    "test_attacks_proxy": every(),
    "test_cli": only(
        "test_module_entry_point_errors_are_one_line",
        "test_module_entry_point_keygen_to_stdout",
        "test_module_entry_point_seal_and_open_through_pipes",
    ),
    "test_configs": every(
        "test_the_example_configs_load_and_name_the_new_limits_with_their_defaults"
    ),
    "test_consumer": every(
        "test_aiocoap_receive_callback_noise_is_one_line_and_other_errors_stay_loud"
    ),
    "test_consumer_dtls": every(),
    "test_consumer_held": only(
        "test_a_bad_held_entry_does_not_break_a_normal_read",
        "test_a_stale_first_notification_without_a_held_reading_is_reported_once",
        "test_many_large_objects_held_do_not_break_later_reads",
    ),
    "test_consumer_large": every(),
    "test_consumer_parts": every(),
    "test_consumer_ingest": only(
        "test_nothing_released_before_a_kill_is_released_again",
        "test_readings_in_flight_of_one_resource_through_the_pipeline",
    ),
    "test_consumer_stale": every(),
    "test_demo": every(),
    "test_end_to_end": every(),
    "test_failures": every(),
    "test_interop": every(),
    "test_large_proxy": every(),
    "test_network_bench": only(
        "test_coap_client_takes_our_command_line_and_a_silent_server_hits_the_cap"
    ),
    "test_ports": only(
        "test_a_second_as_on_the_same_port_refuses_to_start",
        "test_a_second_producer_on_the_same_port_refuses_to_start",
        "test_a_second_proxy_on_the_same_ports_refuses_to_start",
        "test_after_the_bind_another_process_on_the_port_is_seen",
    ),
    "test_producer": every("test_toml_configuration"),
    "test_producer_cli": only("test_every_flag_has_a_description_and_a_default"),
    "test_producer_keys": every(),
    "test_producer_parts": every(),
    "test_producer_sources": only(
        "test_a_command_gives_its_output_and_its_failures_are_errors",
        "test_a_command_writing_more_than_a_value_may_hold_is_stopped",
    ),
    "test_producer_observers": every("test_an_unknown_aiocoap_is_not_looked_into"),
    "test_proxy": every(),
    "test_proxy_relays": every(),
    "test_proxy_stats": every(),
    "test_redis_harness": every(),
    "test_proxy_cluster_store": every(),
    "test_proxy_cluster": every(),
    "test_proxy_cluster_observe": every(),
    "test_state_dirs": only(
        "test_a_state_directory_of_another_user_is_refused",
        "test_a_state_directory_reached_through_a_symlink_is_refused",
        "test_a_world_writable_state_directory_of_our_own_is_repaired",
        "test_a_world_writable_state_directory_with_planted_names_is_refused",
        "test_planted_temporary_names_cannot_receive_the_producer_key",
        "test_the_as_database_is_0600_whatever_the_umask",
    ),
    "test_multicast": every(),
    "test_tcp_transport": every(),
}

#: Parameters that start a process in whichever test takes them, by (parameter, value): the AS's
#: tests on PostgreSQL (the ``backing`` fixtures of the store's suites, ``as_database`` in
#: conftest.py; tests/pg_harness.py) start the server of the session's private cluster; the same
#: tests on SQLite start none.
PROCESS_PARAMS: frozenset[tuple[str, object]] = frozenset(
    {("backing", "postgresql"), ("as_database", "postgresql")}
)

TESTS = Path(__file__).resolve().parent
OPTION = "--check-tier"
SURVEY = "--survey-processes"


class ProcessInCheckTier(RuntimeError):
    """A process was started in the check tier (the test is not classified as starting one)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION,
        action="store_true",
        help="the check tier: only tests that start no process (see tests/tiers.py); starting a "
        "process fails the test",
    )
    parser.addoption(
        SURVEY,
        action="store_true",
        help="the guard of the check tier, but nothing deselected: the tests that start a process "
        "fail (to refresh PROCESS in tests/tiers.py after tests moved)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not (config.getoption(OPTION) or config.getoption(SURVEY)):
        return
    modules = {path.stem for path in TESTS.rglob("test_*.py")}
    stale = sorted(name for name in PROCESS if name not in modules)
    if stale:
        raise pytest.UsageError(f"tests/tiers.py: PROCESS names no test module: {', '.join(stale)}")
    guard = _Guard()
    guard.install()
    config.stash[_GUARD] = guard
    config.add_cleanup(guard.uninstall)


def _process_param(item: pytest.Item) -> bool:
    """Whether the item takes a parameter of :data:`PROCESS_PARAMS`."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(
        (name, value) in PROCESS_PARAMS
        for name, value in callspec.params.items()
        if isinstance(value, str)
    )


def _where(item: pytest.Item) -> tuple[str, str]:
    """The item's module (file stem) and test function (parameters aside)."""
    return item.path.stem, getattr(item, "originalname", item.name)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module, function = _where(item)
        if (module in PROCESS and function in PROCESS[module]) or _process_param(item):
            item.add_marker(pytest.mark.process)
    if not (config.getoption(OPTION) or config.getoption(SURVEY)):
        return
    modules = {item.path.stem: getattr(item, "module", None) for item in items}
    stale = sorted(
        f"{name}::{function}"
        for name, module in modules.items()
        for function in (PROCESS[name].names if name in PROCESS else ())
        if not callable(getattr(module, function, None))
    )
    if stale:
        raise pytest.UsageError(f"tests/tiers.py: PROCESS names no such test: {', '.join(stale)}")
    kept = [item for item in items if not item.get_closest_marker("process")]
    if len(kept) < len(items) and not config.getoption(SURVEY):
        config.hook.pytest_deselected(
            items=[item for item in items if item.get_closest_marker("process")]
        )
        items[:] = kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    guard = item.config.stash.get(_GUARD, None)
    if guard is not None:
        guard.current = item.nodeid
    try:
        return (yield)
    finally:
        if guard is not None:
            guard.current = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A test that tried to start a process fails, even if it swallowed the exception."""
    report = yield
    guard = item.config.stash.get(_GUARD, None)
    if guard is None:
        return report
    if report.failed:
        item.stash[_FAILED] = True
    if report.when == "teardown":
        tried = guard.attempts.pop(item.nodeid, [])
        if tried and not item.stash.get(_FAILED, False):
            report.outcome = "failed"
            report.longrepr = _explain(item.nodeid, tried)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    guard = session.config.stash.get(_GUARD, None)
    if guard is None or not guard.attempts:
        return
    for where, tried in guard.attempts.items():
        session.config.get_terminal_writer().line(_explain(where, tried), red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _explain(where: str, tried: list[str]) -> str:
    return (
        f"{where} started a process in the check tier ({', '.join(sorted(set(tried)))}); "
        "if it must, add it to PROCESS in tests/tiers.py"
    )


class _Guard:
    """Replaces every way a test could start a process with one that raises and records."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.attempts: dict[str, list[str]] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def _refuse(self, what: str) -> Callable[..., Any]:
        def refuse(*args: object, **kwargs: object) -> Any:
            where = self.current or "outside any test (collection or a session fixture)"
            self.attempts.setdefault(where, []).append(what)
            raise ProcessInCheckTier(_explain(where, [what]))

        return refuse

    def install(self) -> None:
        targets: list[tuple[Any, str]] = [
            (subprocess.Popen, "_execute_child"),  # subprocess.*, asyncio subprocesses
            (_posixsubprocess, "fork_exec"),  # multiprocessing's spawn and forkserver
            (os, "fork"),  # os.spawn*, multiprocessing's fork
            (os, "forkpty"),
            (os, "system"),
            (os, "popen"),
            (os, "posix_spawn"),
            (os, "posix_spawnp"),
        ]
        for owner, name in targets:
            if hasattr(owner, name):
                self._saved.append((owner, name, getattr(owner, name)))
                label = f"{getattr(owner, '__name__', owner)}.{name}"
                if owner is subprocess.Popen:
                    label = "subprocess.Popen"
                setattr(owner, name, self._refuse(label))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


_GUARD = pytest.StashKey[_Guard]()
_FAILED = pytest.StashKey[bool]()
