"""Producer start-up time and memory (RSS) beside a plain aiocoap server process.

A real AS on 127.0.0.1 with one producer enrolled per repetition (admin CLI). Each repetition
starts, as a separate process:

- the producer (``python -m producer --bundle --state --listen --resource reading=FILE``, one 64 B
  text reading) with a fresh state directory: a first start, which generates the signing key,
  gets its certificate from the AS, registers the resource, fetches its access secret and seals;
- the same producer again with the state it left (a restart: key and certificate reused);
- the baseline, :mod:`bench.plain_server` serving the same file (``--file``), started the same way.

For each: the time from just before the process is spawned to the first 2.05 answer, polling with
a confirmable GET every 10 ms from a bare UDP socket (the producer answers 5.03 until it has
sealed), and then its VmRSS (``/proc/PID/status``). Each process is stopped (SIGTERM) before the
next starts; the medians over 3 repetitions (7 in a full run) are kept. The sides alternate.

Also: the import cost (time of the import statements and VmRSS afterwards, in a fresh child) of
what ``python -m producer`` imports before it starts (``producer.cli``) against
``aiocoap`` + ``aiocoap.resource`` (what the plain server imports), and the top-level packages a
running producer has loaded that the plain server has not (``sys.modules`` at exit).

Lower is better for all rows (milliseconds, MiB). No issue sets a target; the ones printed are
provisional: RSS at most 1.5 times the plain server's (overhead < 50 %), times at most twice.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from aiocoap import CON, GET, Message

from . import Figure, Settings
from .testbed import ROOT, Testbed, free_port

__all__ = ["run"]

READING = b"temperature=21.5C humidity=40.2% pressure=1013.2hPa wind=3.1m/s\n"[:64]
POLL = 0.01
START_TIMEOUT = 30.0
#: 2.05 Content, as the second byte of a CoAP header.
CONTENT = 0x45

#: In a child: import ``sys.argv[1]`` (comma-separated modules), print seconds and VmRSS (kB).
_IMPORT_PROBE = """
import importlib, sys, time
start = time.perf_counter()
for name in sys.argv[1].split(","):
    importlib.import_module(name)
elapsed = time.perf_counter() - start
rss = next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]
print(elapsed, rss)
"""

#: In a child: run ``python -m sys.argv[1]`` with the rest of argv; at exit write the top-level
#: names in ``sys.modules`` to the file named by ``sys.argv[2]``.
_MODULES_PROBE = """
import atexit, json, runpy, sys
module, out = sys.argv[1], sys.argv[2]
def dump():
    with open(out, "w") as f:
        json.dump(sorted({name.partition(".")[0] for name in sys.modules}), f)
atexit.register(dump)
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


class Start(NamedTuple):
    seconds: float
    rss_kib: int
    hwm_kib: int


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def _start(bed: Testbed, name: str, argv: list[str], port: int, path: tuple[str, ...]) -> Start:
    """Spawn ``python ARGV``, poll it with GETs until it answers 2.05; stop it again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    process: subprocess.Popen[bytes] | None = None
    try:
        start = time.perf_counter()
        process = bed.launch(name, argv)
        deadline = start + START_TIMEOUT
        mid = 0
        while True:
            now = time.perf_counter()
            if now > deadline or process.poll() is not None:
                raise RuntimeError(f"{name}: no 2.05 answer:\n{bed.log(name)[-2000:]}")
            mid = (mid + 1) & 0xFFFF
            request = Message(mtype=CON, mid=mid, token=mid.to_bytes(2, "big"), code=GET)
            request.opt.uri_path = path
            sock.sendto(request.encode(), ("127.0.0.1", port))
            next_poll = now + POLL
            answered = False
            while (left := next_poll - time.perf_counter()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    break
                if len(data) >= 2 and data[1] == CONTENT:
                    answered = True
                    break
            if answered:
                seconds = time.perf_counter() - start
                status = _status(process.pid)
                return Start(seconds, status["VmRSS"], status["VmHWM"])
    finally:
        sock.close()
        if process is not None:
            bed.stop(process)


def _median(starts: list[Start]) -> Start:
    return Start(
        statistics.median(s.seconds for s in starts),
        int(statistics.median(s.rss_kib for s in starts)),
        int(statistics.median(s.hwm_kib for s in starts)),
    )


def _import_cost(modules: str) -> tuple[float, int]:
    """(seconds, VmRSS KiB) of importing ``modules`` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, modules],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    seconds, rss = result.stdout.split()
    return float(seconds), int(rss)


#: Our own packages and the interpreter's start-up, left out of the slowest imports.
_NOT_THIRD_PARTY = {"producer", "oscar", "authz_server", "consumer", "proxy", "site", "encodings"}


def _slowest_imports(modules: str, count: int = 5) -> list[tuple[str, float]]:
    """The other packages that take longest to import when a fresh interpreter imports
    ``modules`` (``-X importtime``): per top-level package, its single slowest module import,
    cumulative (what that imports counts too, so nested packages overlap)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {modules}"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    slowest: dict[str, tuple[str, float]] = {}
    for line in result.stderr.decode().splitlines():
        # "import time:       self |  cumulative | <indent>name"
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name, seconds = fields[2].strip(), int(fields[1]) / 1e6
        package = name.partition(".")[0]
        if package in _NOT_THIRD_PARTY or package.startswith("__editable__"):
            continue
        if seconds > slowest.get(package, ("", 0.0))[1]:
            slowest[package] = (name, seconds)
    return sorted(slowest.values(), key=lambda item: -item[1])[:count]


def _loaded(
    bed: Testbed, name: str, module: str, argv: list[str], port: int, path: tuple[str, ...]
) -> set[str]:
    """Top-level packages in ``sys.modules`` of a running ``python -m MODULE ARGV`` at exit."""
    out = bed.dir / f"{name}.modules.json"
    _start(bed, name, ["-c", _MODULES_PROBE, module, str(out), *argv], port, path)
    return set(json.loads(out.read_text()))


def run(settings: Settings) -> Iterator[Figure]:
    """Start an AS; start producers and plain servers again and again; yield six figures."""
    repeats = 3 if settings.quick else 7
    with Testbed("oscar-bench-footprint-") as bed:
        producers = [f"foot-{i}" for i in range(repeats)]
        bundles = bed.start_as({p: "producer" for p in producers})
        file = bed.write("reading.txt", READING)

        def producer_argv(device: str, port: int) -> list[str]:
            return ["--bundle", str(bundles[device]), "--state", str(bed.dir / f"{device}-state"),
                    "--listen", f"127.0.0.1:{port}", "--resource", f"reading={file}",
                    "--content-format", "0", "--log-level", "warning"]  # fmt: skip

        def plain_argv(port: int) -> list[str]:
            return ["--listen", f"127.0.0.1:{port}", "--file", f"reading={file}"]

        first: list[Start] = []
        again: list[Start] = []
        plain: list[Start] = []
        for i, device in enumerate(producers):
            path = (device, "reading")
            sides = ["producer", "plain"] if i % 2 == 0 else ["plain", "producer"]
            for side in sides:
                port = free_port()
                if side == "plain":
                    argv = ["-m", "bench.plain_server", *plain_argv(port)]
                    plain.append(_start(bed, f"plain-{i}", argv, port, ("reading",)))
                    continue
                argv = ["-m", "producer", *producer_argv(device, port)]
                first.append(_start(bed, f"{device}-first", argv, port, path))
                port = free_port()
                argv = ["-m", "producer", *producer_argv(device, port)]
                again.append(_start(bed, f"{device}-restart", argv, port, path))

        imports: dict[str, list[tuple[float, int]]] = {"producer": [], "plain": []}
        for _ in range(repeats):
            imports["producer"].append(_import_cost("producer.cli"))
            imports["plain"].append(_import_cost("aiocoap,aiocoap.resource"))

        port = free_port()
        ours_loaded = _loaded(
            bed, "producer-modules", "producer", producer_argv(producers[0], port), port,
            (producers[0], "reading"),
        )  # fmt: skip
        port = free_port()
        plain_loaded = _loaded(
            bed, "plain-modules", "bench.plain_server", plain_argv(port), port, ("reading",)
        )

    base = _median(plain)
    for label, starts in (("first-start", first), ("restart", again)):
        ours = _median(starts)
        print(
            f"  {label}: producer {ours.seconds * 1e3:.0f} ms to the first 2.05, VmRSS "
            f"{ours.rss_kib / 1024:.1f} MiB (peak {ours.hwm_kib / 1024:.1f}); plain server "
            f"{base.seconds * 1e3:.0f} ms, {base.rss_kib / 1024:.1f} MiB (peak "
            f"{base.hwm_kib / 1024:.1f}); medians of {repeats}, each "
            + ", ".join(f"{s.seconds * 1e3:.0f}" for s in starts)
            + " ms",
            flush=True,
        )
        yield Figure(
            f"footprint/{label}/ms",
            ours.seconds * 1e3,
            "ms from spawn to the first 2.05",
            "plain aiocoap server process serving the file",
            base.seconds * 1e3,
            lower_is_better=True,
        )
        yield Figure(
            f"footprint/{label}/rss-MiB",
            ours.rss_kib / 1024,
            "MiB VmRSS at the first 2.05",
            "plain aiocoap server process serving the file",
            base.rss_kib / 1024,
            lower_is_better=True,
        )

    ours_import = (
        statistics.median(s for s, _ in imports["producer"]),
        statistics.median(r for _, r in imports["producer"]),
    )
    base_import = (
        statistics.median(s for s, _ in imports["plain"]),
        statistics.median(r for _, r in imports["plain"]),
    )
    extra = sorted(ours_loaded - plain_loaded - set(sys.builtin_module_names))
    slowest = _slowest_imports("producer.cli")
    print(
        f"  import producer.cli: {ours_import[0] * 1e3:.0f} ms, VmRSS {ours_import[1] / 1024:.1f} "
        f"MiB; import aiocoap, aiocoap.resource: {base_import[0] * 1e3:.0f} ms, "
        f"{base_import[1] / 1024:.1f} MiB. Top-level packages a running producer has loaded "
        f"and the plain server has not ({len(extra)}): {', '.join(extra)}. Slowest other "
        "imports under producer.cli (cumulative): "
        + ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in slowest),
        flush=True,
    )
    yield Figure(
        "footprint/import/ms",
        ours_import[0] * 1e3,
        "ms to import producer.cli",
        "import aiocoap, aiocoap.resource",
        base_import[0] * 1e3,
        lower_is_better=True,
    )
    yield Figure(
        "footprint/import/rss-MiB",
        ours_import[1] / 1024,
        "MiB VmRSS after importing producer.cli",
        "import aiocoap, aiocoap.resource",
        base_import[1] / 1024,
        lower_is_better=True,
    )
