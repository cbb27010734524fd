"""``python -m demo`` end to end: the whole story passes on its own and leaves nothing behind,
and an interruption stops it promptly, just as clean (issue 6)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from as_harness import ROOT

DIR = re.compile(r"state and logs in (\S+oscar-demo-\S+)")


def demo(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.Popen(
        [sys.executable, "-m", "demo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes (zombies aside) with ``text`` in them."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != b"Z":
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


BIN = Path(sys.executable).parent  # the venv's bin (not resolved: the base interpreter's is not)
ENTRY_POINTS = {"oscar-as", "oscar-consumer", "oscar-producer", "oscar-proxy", "oscar"}


def printed_commands(out: str) -> list[list[str]]:
    """The commands ``--keep-running`` prints to try (those of OSCAR; not ``echo``)."""
    block = out.split("Try, from another shell:", 1)[1].split("\nFor operators", 1)[0]
    commands = []
    for line in block.splitlines():
        if line.startswith("  ") and not line.startswith("  #"):
            argv = shlex.split(line)
            if argv[0] != "echo":
                commands.append(argv)
    return commands


def test_the_demo_runs_every_step_and_leaves_nothing_behind() -> None:
    """The whole story, then ``--keep-running``: the commands it prints are the installed ones
    (``oscar-consumer ...``, found in the venv's bin) and work as printed; Ctrl-C ends it (0)."""
    started = time.monotonic()
    process = demo("--keep-running")
    assert process.stdout is not None
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
            assert time.monotonic() - started < 90, "".join(lines)
        took = time.monotonic() - started
        commands = printed_commands("".join(lines))
        assert len(commands) >= 8, "".join(lines)
        for argv in commands:
            name = Path(argv[0]).name
            assert name in ENTRY_POINTS and "-m" not in argv[:2], argv
            assert (BIN / name).is_file(), argv
            assert argv[0] == name or Path(argv[0]) == BIN / name, argv
        # As printed, from a shell: the grants (the AS admin CLI), a read (the consumer).
        grants = next(argv for argv in commands if argv[1:2] == ["grants"])
        reads = next(argv for argv in commands if "get" in argv and "--proxy" not in argv)
        for argv in (grants, reads):
            done = subprocess.run(
                ["bash", "-c", shlex.join(argv)], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, (argv, done.stderr)
        # The console: HTTPS under the AS CA's certificate, its login page, and a token.
        text = "".join(lines)
        console = re.search(
            r"^  the admin console \(its certificate is from the AS CA, (\S+)\): (https://\S+)$",
            text,
            re.M,
        )
        assert console, text
        token = re.search(
            r"^    its login token \(admin demo\): (oscar-admin-[A-Za-z0-9_-]{43})$", text, re.M
        )
        assert token, text
        trusted = ssl.create_default_context(cafile=console.group(1))
        login = console.group(2) + "login"
        with urllib.request.urlopen(login, timeout=10, context=trusted) as page:  # noqa: S310
            assert page.status == 200 and "token" in page.read().decode().lower()
        # Where the metrics are: each answers with its daemon's families.
        urls = re.findall(
            r"^  (.+) metrics \(Prometheus text\): (http://\S+)$", "".join(lines), re.M
        )
        assert [who for who, _ in urls] == ["the AS's", "proxy cloud-1's", "producer meter-1's"]
        for (_, url), prefix in zip(
            urls, ("oscar_as_", "oscar_proxy_", "oscar_producer_"), strict=True
        ):
            with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 (http only)
                assert f"\n{prefix}" in answer.read().decode(), url
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    out = "".join(lines) + rest
    assert process.returncode == 0, out
    assert took < 90
    assert "Ctrl-C: ending" in rest
    found = DIR.search(out)
    assert found, out
    root = found.group(1)
    # piped: no color, no in-place rewriting; one line per finished step
    assert "\033[" not in out and "\r" not in out
    assert "✗" not in out
    for section in range(1, 9):
        assert re.search(rf"^{section}\. ", out, re.M), (section, out)
    expected = [
        r"✓ AS serving coaps://127\.0\.0\.1:\d+",
        r"✓ enrolled meter-1, sleeper-1 \(producers\), cloud-1 \(proxy\), alice, bob",
        r"✓ proxy cloud-1 serving coap://127\.0\.0\.1:\d+ \+ coaps :\d+",
        r"✓ producer meter-1 serving coap://127\.0\.0\.1:\d+/meter-1/power",
        r"✓ producer sleeper-1 up, serving nothing, publishing to cloud-1 over DTLS",
        r'✓ alice reads meter-1/power from the producer: "230\.4 W" \(epoch \d+, seq \d+\)',
        r'✓ alice reads it through proxy cloud-1: "230\.4 W"',
        r'✓ alice observes meter-1/power: "230\.4 W" .* -> "231\.9 W"',
        r"✓ sleeper-1 published sleeper-1/reading to cloud-1",
        r'✓ bob reads sleeper-1/reading from cloud-1 over DTLS: "21\.5 degC"',
        r"✓ sleeper-1 stopped",
        r"✓ bob still reads it, from cloud-1's cache",
        r"✓ meter-1/power moved from epoch \d+ to \d+ on schedule",
        r"✓ alice still reads meter-1/power: .*the new secret from the AS",
        r"✓ revoked grants of bob",
        r"✓ meter-1 re-sealed under epoch \d+",
        r"✓ bob is refused: exit 3, access denied by the AS",
        r"✓ audit log intact",
        r"✓ proxy stats: hits [1-9]\d*, misses \d+",
        r"✓ every step went as it should",
        rf"stopped \d+ process(es)? in [\d.]+ s; removed {re.escape(root)}$",
    ]
    for pattern in expected:
        assert re.search(pattern, out, re.M), (pattern, out)
    # epochs only move forward: scheduled rotation, then revocation
    moved = re.search(r"moved from epoch (\d+) to (\d+)", out)
    resealed = re.search(r"re-sealed under epoch (\d+)", out)
    assert moved and resealed
    assert int(moved.group(1)) < int(moved.group(2)) < int(resealed.group(1))
    assert not Path(root).exists()
    assert processes_mentioning(root) == []


def test_sigint_stops_everything_promptly_and_cleans_up() -> None:
    process = demo()
    assert process.stdout is not None
    lines = []
    root = None
    # interrupt once the story is under way: the AS, the proxy and a producer are up
    deadline = time.monotonic() + 60
    for line in process.stdout:
        lines.append(line)
        found = DIR.search(line)
        if found:
            root = found.group(1)
        if "producer meter-1 serving" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert root is not None, "".join(lines)
    assert processes_mentioning(root), "the demo started no process"
    process.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    try:
        rest, _ = process.communicate(timeout=15)
    finally:
        process.kill()
    out = "".join(lines) + rest
    assert time.monotonic() - interrupted <= 15
    assert process.returncode == 130, out
    assert "interrupted" in rest
    assert re.search(rf"stopped \d+ process(es)? .*removed {re.escape(root)}$", rest, re.M), out
    assert not Path(root).exists()
    assert processes_mentioning(root) == []
