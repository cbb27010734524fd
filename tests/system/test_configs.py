"""Every role takes a TOML configuration (flags override it) and logs one line per event, as text
or with ``--log-json`` as one JSON object per line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from as_harness import ROOT, free_port
from system_harness import Deployment, run


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no log lines"
    return [json.loads(line) for line in lines]


def _start_and_stop(command: list[str], ready: str, timeout: float = 30.0) -> str:
    """Run a daemon until it logs ``ready``, SIGTERM it; its stderr (it must exit 0)."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    seen = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            seen.append(line)
            if ready in line:
                break
        else:
            raise AssertionError("not ready in time:\n" + "".join(seen))
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(seen) + rest
    return "".join(seen) + rest


def test_as_serve_from_a_config_file_with_json_logs(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    port = free_port()
    config = tmp_path / "as.toml"
    config.write_text(
        f'state = "as"\nlisten = "127.0.0.1:{port}"\nmin_rotation_period = 5\n'
        'log_level = "debug"\nlog_json = true\n'
    )
    out = _start_and_stop(
        [sys.executable, "-m", "authz_server", "serve", "--config", str(config)], "serving"
    )
    entries = _json_lines(out)
    assert any("serving coaps://127.0.0.1:" in str(e["message"]) for e in entries)
    assert {"time", "level", "logger", "message"} <= entries[0].keys()
    # a flag overrides the file; a bad file is one line and exit 2
    bad = tmp_path / "bad.toml"
    bad.write_text('state = "as"\nlisten = "127.0.0.1:1"\nport = 5\n')
    result = run("-m", "authz_server", "serve", "--config", str(bad), check=False)
    assert result.returncode == 2 and "unknown setting(s) port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('state = "as"\nlisten = "127.0.0.1:1"\nrate = "fast"\n')
    result = run("-m", "authz_server", "serve", "--config", str(wrong), check=False)
    assert result.returncode == 2 and "rate has the wrong type" in result.stderr
    result = run("-m", "authz_server", "serve", "--state", str(d.as_state), check=False)
    assert result.returncode == 2 and "--listen" in result.stderr


def test_producer_and_proxy_log_json_lines(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    bundle = d.enroll("producer", "p1")
    proxy_bundle = d.enroll("proxy", "x1")
    d.start_as()
    try:
        value = tmp_path / "v.txt"
        value.write_text("1")
        out = _start_and_stop(
            [
                sys.executable, "-m", "producer", "--bundle", str(bundle),
                "--state", str(tmp_path / "p"), "--listen", f"127.0.0.1:{free_port()}",
                "--resource", f"v={value}", "--log-json",
            ],
            "ready",
        )  # fmt: skip
        assert any("producer p1 ready" in str(e["message"]) for e in _json_lines(out))
        config = tmp_path / "proxy.toml"
        config.write_text(
            f'bundle = "{proxy_bundle.name}"\nstate = "x"\nlisten = "127.0.0.1:{free_port()}"\n'
            "dtls = false\n[limits]\nmemory_entries = 5\n"
        )
        out = _start_and_stop(
            [sys.executable, "-m", "proxy", "--config", str(config), "--log-json"], "serving"
        )
        assert any("serving coap://" in str(e["message"]) for e in _json_lines(out))
    finally:
        d.close()


def test_consumer_takes_its_settings_from_a_config_file(tmp_path: Path) -> None:
    d = Deployment(tmp_path)
    d.enroll("consumer", "c1")
    config = tmp_path / "c.toml"
    config.write_text('bundle = "c1.json"\nstate = "c1-state"\ntimeout = 1\n')
    # nothing listens there: the settings were taken (bundle loaded, state made), exit 4
    result = run(
        "-m", "consumer", "--config", str(config), "get", f"coap://127.0.0.1:{free_port()}/p/x",
        check=False,
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert (tmp_path / "c1-state").is_dir()
    config.write_text('bundle = "c1.json"\nstate = "s"\nretries = 3\n')
    result = run("-m", "consumer", "--config", str(config), "get", "coap://h/p/x", check=False)
    assert result.returncode == 2 and "unknown setting(s) retries" in result.stderr
    result = run("-m", "consumer", "get", "coap://h/p/x", check=False)
    assert result.returncode == 2 and "--bundle and --state are required" in result.stderr


def test_the_example_configs_load_and_name_the_new_limits_with_their_defaults() -> None:
    """deploy/etc/oscar/*.toml are what operators copy: they load, and the issue-13 bounds they
    list are the defaults (a changed default must be changed there too)."""
    from producer.config import ProducerConfig
    from producer.config import load_config as load_producer
    from proxy.config import Limits as ProxyLimits
    from proxy.config import load_config as load_proxy

    examples = ROOT / "deploy" / "etc" / "oscar"
    producer = load_producer(examples / "producer.toml")
    defaults = ProducerConfig(bundle=Path("b"), state=Path("s"), listen=("127.0.0.1", 5683))
    assert producer.max_observers == defaults.max_observers
    assert producer.max_observers_per_address == defaults.max_observers_per_address
    limits = load_proxy(examples / "proxy.toml").limits
    for name in ("observers", "observers_per_client", "relays", "relays_per_client"):
        assert getattr(limits, name) == getattr(ProxyLimits(), name), name
    text = (examples / "proxy.toml").read_text()
    assert all(f"\n{name} = " in text for name in ("observers", "relays", "relays_per_client"))
