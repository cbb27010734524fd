"""``oscar-producer --help``: every flag says what it does and its default; one default each."""

from __future__ import annotations

import re
from pathlib import Path

from system_harness import run

from oscar.profiles import PROFILES
from producer import ProducerConfig, ResourceSpec, load_config
from producer.cli import _config, build_parser


def _help() -> str:
    result = run("-m", "producer", "--help")
    return " ".join(result.stdout.split())  # argparse wraps lines anywhere


def test_every_flag_has_a_description_and_a_default() -> None:
    text = _help()
    parser = build_parser()
    for action in parser._actions:
        flag = action.option_strings[-1]
        assert action.help, f"{flag} has no description"
        if flag in ("--help", "--log-json"):
            continue
        assert re.search(r"default|required", action.help), f"{flag} names no default"
        assert flag in text
    spec = ResourceSpec("x")
    for flag, value in (
        ("--max-age", spec.max_age),
        ("--lifetime", spec.lifetime),
        ("--rotation-period", spec.rotation_period),
        ("--interval", spec.interval),
        ("--profile", spec.profile),
    ):
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(str(value))}\)", text), flag
    for name in PROFILES:  # the profile names are listed
        assert name in text
    assert "default: the configuration file's, else 256" in text  # --max-observers


def test_the_interval_has_one_default_from_flags_and_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_bytes(b"{}")
    args = build_parser().parse_args(
        ["--bundle", "b.json", "--state", "s", "--listen", "127.0.0.1:5683", "--resource", "t=v"]
    )
    from_flags = _config(args)
    config = tmp_path / "p.toml"
    config.write_text(
        'bundle = "b.json"\nstate = "s"\nlisten = "127.0.0.1:5683"\n'
        '[[resource]]\npath = "t"\nfile = "v"\n'
    )
    from_file = load_config(config)
    assert from_flags.resources[0].interval == from_file.resources[0].interval
    assert from_flags.resources[0].interval == ResourceSpec("t").interval == 1.0
    # the observer bounds: the file's, overridden by the flags
    config.write_text(config.read_text().replace("[[", "max_observers = 9\n[[", 1))
    assert load_config(config).max_observers == 9
    args = build_parser().parse_args(["--config", str(config), "--max-observers-per-address", "2"])
    both = _config(args)
    assert (both.max_observers, both.max_observers_per_address) == (9, 2)
    defaults = ProducerConfig(bundle=Path("b"), state=Path("s"), listen=("::1", 1))
    assert (defaults.max_observers, defaults.max_observers_per_address) == (256, 16)
