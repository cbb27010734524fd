"""The demo's story: a whole OSCAR system on loopback, walked through step by step.

:class:`Story` sets up (admin CLI: init, enroll, grant; then the AS, the proxy and the two
producers as processes) and runs the steps, each one or a few lines of :class:`~demo.view.LiveLog`:

1. set up: ``meter-1`` serves a file (rotation every few seconds), ``sleeper-1`` only publishes to
   the proxy ``cloud-1``, consumers ``alice`` and ``bob`` are granted both producers' resources;
2. alice reads ``meter-1/power`` directly and through the proxy: the same value;
3. the meter's value changes, and alice's observation gets the new one;
4. the sleeping producer publishes; bob reads it from the proxy over DTLS, and again once the
   producer is gone (the proxy's cache);
5. a scheduled rotation: the epoch moves on, alice still reads;
6. bob is revoked: the producer re-seals under a new epoch; bob is denied, alice still reads;
7. the audit log's hash chain verifies;
8. the proxy's counters.

Every consumer step is a ``python -m consumer`` process. A step that does not go as it should
raises :class:`~demo.view.StepFailed`.

What it does not do: clean up (the caller closes the :class:`~demo.system.LocalSystem`), handle
signals or parse the command line (:mod:`demo.cli`).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .children import installed, lines, write_atomic
from .system import Child, LocalSystem, free_port, free_port_pair, free_tcp_port, tail
from .view import LiveLog, StepFailed

__all__ = ["Story"]

HOST = "127.0.0.1"
PRODUCERS = ("meter-1", "sleeper-1")
PROXY = "cloud-1"
CONSUMERS = ("alice", "bob")
#: Seconds per epoch of the meter's resource: short, so that a rotation happens during the demo.
ROTATION_PERIOD = 5
#: Seconds a consumer waits for an answer.
CONSUMER_TIMEOUT = 5.0

_EPOCH_LINE = re.compile(r"meter-1/power: (?:now sealing under|boundary reached, now) epoch (\d+)")


@dataclass(frozen=True)
class Reading:
    """What ``oscar-consumer get --json`` printed."""

    value: str
    epoch: int
    seq: int

    @classmethod
    def parse(cls, line: str) -> Reading:
        doc = json.loads(line)
        return cls(str(doc["value"]), int(doc["epoch"]), int(doc["seq"]))

    def __str__(self) -> str:
        return f'"{self.value}" (epoch {self.epoch}, seq {self.seq})'


class Story:
    """One run of the demo on ``system``, told to ``log``; see the module docstring."""

    def __init__(self, system: LocalSystem, log: LiveLog) -> None:
        self.system = system
        self.log = log
        self.as_port = free_port()
        self.proxy_port = free_port_pair()
        self.meter_port = free_port()
        #: Where each daemon serves its Prometheus metrics (``--metrics``).
        self.metrics_ports = {name: free_tcp_port() for name in ("as", PROXY, "meter-1")}
        #: The AS's admin console (``--admin``), and the token the demo's admin logs in with
        #: (issued by ``oscar-as admin-token``; shown only with --keep-running).
        self.console_port = free_tcp_port()
        self.console_token = ""
        self.meter_value = system.path("meter-1-power.txt")
        self.sleeper_value = system.path("sleeper-1-reading.txt")
        self.as_server: Child | None = None
        self.proxy: Child | None = None
        self.meter: Child | None = None
        self.sleeper: Child | None = None
        self.epoch = 0  # the newest epoch of meter-1/power that alice read

    # --- addresses ----------------------------------------------------------------------------

    @property
    def as_uri(self) -> str:
        return f"coaps://{HOST}:{self.as_port}"

    @property
    def proxy_uri(self) -> str:
        return f"coap://{HOST}:{self.proxy_port}"

    @property
    def proxy_dtls(self) -> str:
        return f"{PROXY}=coaps://{HOST}:{self.proxy_port + 1}"

    @property
    def meter_uri(self) -> str:
        return f"coap://{HOST}:{self.meter_port}/meter-1/power"

    @property
    def sleeper_uri(self) -> str:
        """Where sleeper-1's objects live: it serves nothing itself, the proxy has them."""
        return f"{self.proxy_uri}/sleeper-1/reading"

    def bundle(self, device: str) -> Path:
        return self.system.path(f"{device}.json")

    def state(self, device: str) -> Path:
        return self.system.path(device)

    # --- the processes ------------------------------------------------------------------------

    def admin(self, command: str, *args: str) -> str:
        """One admin command on the AS state; its stdout."""
        state = str(self.system.path("as"))
        result = self.system.check(
            f"admin {command}", "authz_server", command, "--state", state, *args
        )
        return result.stdout

    def consumer_args(self, consumer: str, *args: str) -> list[str]:
        return [
            "--bundle", str(self.bundle(consumer)), "--state", str(self.state(consumer)),
            "--timeout", f"{CONSUMER_TIMEOUT:g}", *args,
        ]  # fmt: skip

    def get(self, consumer: str, uri: str, *args: str, expect: int = 0) -> tuple[int, str, str]:
        """``oscar-consumer get --json`` as ``consumer``: (status, stdout, stderr); StepFailed
        unless it exits ``expect``."""
        result = self.system.run(
            f"{consumer} get",
            "consumer",
            *self.consumer_args(consumer, "get", "--json", *args, uri),
            timeout=CONSUMER_TIMEOUT * 4,
        )
        if result.returncode != expect:
            shown = {0: "success", 3: "access denied"}.get(expect, f"exit {expect}")
            raise StepFailed(
                f"{consumer}'s get exited {result.returncode}, not {expect} ({shown})",
                result.stderr or result.stdout,
            )
        return result.returncode, result.stdout, result.stderr

    def read(self, consumer: str, uri: str, *args: str) -> Reading:
        _, out, err = self.get(consumer, uri, *args)
        try:
            return Reading.parse(out.strip().splitlines()[-1])
        except (ValueError, KeyError, IndexError, TypeError):
            raise StepFailed(f"{consumer}'s get printed no reading", out + err) from None

    def running(self, child: Child | None, name: str) -> Child:
        if child is None or child.process.poll() is not None:
            raise StepFailed(f"{name} is not running")
        return child

    def meter_epoch(self) -> int:
        """The newest epoch the meter logged sealing under (0 if none)."""
        text = self.system.read_log(self.running(self.meter, "meter-1"))
        return max((int(m) for m in _EPOCH_LINE.findall(text)), default=0)

    def wait_meter_epoch(self, at_least: int, timeout: float) -> int:
        meter = self.running(self.meter, "meter-1")
        deadline = time.monotonic() + timeout
        while True:
            epoch = self.meter_epoch()
            if epoch >= at_least:
                return epoch
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"meter-1 did not seal under epoch {at_least} within {timeout:g} s",
                    tail(self.system.read_log(meter)),
                )
            time.sleep(0.05)

    def proxy_stats(self) -> dict[str, Any]:
        """The running proxy's live counters ({} if it does not answer)."""
        from proxy.statsock import StatsUnavailable, read_stats

        try:
            return dict(read_stats(self.state(PROXY)))
        except StatsUnavailable:
            return {}

    # --- the story ----------------------------------------------------------------------------

    def run(self) -> None:
        self.set_up()
        self.readings_flow()
        self.observe_a_change()
        self.sleeping_producer()
        self.scheduled_rotation()
        self.revocation()
        self.audit()
        self.proxy_counters()

    def set_up(self) -> None:
        log, system = self.log, self.system
        log.section(1, "Set up: an AS, two producers, a proxy, two consumers, one process each")
        with log.step("AS state made") as step:
            self.admin("init", "--as-uri", self.as_uri)
            self.console_token = self.admin("admin-token", "--name", "demo").strip()
            step.done(f"AS state made (CA, audit log) for {self.as_uri}")
        with log.step("enrolling devices") as step:
            roles = [*((p, "producer") for p in PRODUCERS), (PROXY, "proxy")]
            roles += [(c, "consumer") for c in CONSUMERS]
            for device, role in roles:
                self.admin(
                    "enroll", "--role", role, "--id", device, "--out", str(self.bundle(device))
                )
            step.done(
                f"enrolled {', '.join(PRODUCERS)} (producers), {PROXY} (proxy), "
                f"{', '.join(CONSUMERS)} (consumers): a bundle each"
            )
        with log.step("granting") as step:
            for consumer in CONSUMERS:
                for producer in PRODUCERS:
                    self.admin("grant", "--consumer", consumer, "--resource", f"{producer}/*")
            step.done(
                f"granted {' and '.join(CONSUMERS)} {' and '.join(f'{p}/*' for p in PRODUCERS)}"
            )
        with log.step("starting the AS") as step:
            self.as_server = system.spawn(
                "as", "authz_server", "serve", "--state", str(system.path("as")),
                "--listen", f"{HOST}:{self.as_port}", "--min-rotation-period", "1",
                "--tick", "0.2", *self.metrics("as"), "--admin", f"{HOST}:{self.console_port}",
                ready="serving coaps://", stop_last=True,
            )  # fmt: skip
            step.done(f"AS serving {self.as_uri} (pid {self.as_server.process.pid})")
        # the proxy and the meter start side by side; the sleeper needs the proxy
        self.proxy = system.start(
            PROXY, "proxy", "--bundle", str(self.bundle(PROXY)), "--state", str(self.state(PROXY)),
            "--listen", f"{HOST}:{self.proxy_port}",
            "--reverse", f"meter-1=coap://{HOST}:{self.meter_port}", *self.metrics(PROXY),
        )  # fmt: skip
        self.meter_value.write_text("230.4 W")
        self.meter = system.start(
            "meter-1", "producer", "--bundle", str(self.bundle("meter-1")),
            "--state", str(self.state("meter-1")), "--listen", f"{HOST}:{self.meter_port}",
            "--resource", f"power={self.meter_value}", "--rotation-period", str(ROTATION_PERIOD),
            "--max-age", "2", "--interval", "0.1", *self.metrics("meter-1"),
        )  # fmt: skip
        with log.step("starting the proxy") as step:
            text = system.wait_for(self.proxy, "link keys of")
            found = re.search(r"link keys of (\d+) devices", text)
            links = found.group(1) if found else "the"
            step.done(
                f"proxy {PROXY} serving {self.proxy_uri} + coaps :{self.proxy_port + 1}, "
                f"link keys of {links} devices (pid {self.proxy.process.pid})"
            )
        with log.step("starting meter-1") as step:
            system.wait_for(self.meter, "producer meter-1 ready")
            step.done(
                f"producer meter-1 serving {self.meter_uri}, a new epoch every "
                f"{ROTATION_PERIOD} s (pid {self.meter.process.pid})"
            )
        with log.step("starting sleeper-1") as step:
            self.sleeper_value.write_text("21.5 degC")
            # a producer that serves nothing: its publish target comes from a config file
            config = system.path("sleeper-1.toml")
            config.write_text(
                f"bundle = {json.dumps(str(self.bundle('sleeper-1')))}\n"
                f"state = {json.dumps(str(self.state('sleeper-1')))}\n\n"
                "[[resource]]\n"
                'path = "reading"\n'
                f"file = {json.dumps(str(self.sleeper_value))}\n"
                "max_age = 60\n\n"
                "[[publish]]\n"
                f'uri = "coaps://{HOST}:{self.proxy_port + 1}"\n'
                f'proxy = "{PROXY}"\n'
            )
            self.sleeper = system.spawn(
                "sleeper-1", "producer", "--config", str(config), ready="producer sleeper-1 ready"
            )
            step.done(
                f"producer sleeper-1 up, serving nothing, publishing to {PROXY} over DTLS "
                f"(pid {self.sleeper.process.pid})"
            )

    def readings_flow(self) -> None:
        log = self.log
        log.section(2, "Readings flow end to end: sealed once, opened by the consumer")
        with log.step("alice reads meter-1/power directly") as step:
            direct = self.read("alice", self.meter_uri)
            step.done(f"alice reads meter-1/power from the producer: {direct}")
        with log.step("alice reads meter-1/power through the proxy") as step:
            proxied = self.read("alice", f"{self.proxy_uri}/meter-1/power")
            if proxied.value != direct.value:
                raise StepFailed(f"values differ: {proxied.value!r} != {direct.value!r}")
            same = "the same object" if (proxied.epoch, proxied.seq) == (
                direct.epoch, direct.seq) else "the same value"  # fmt: skip
            step.done(f"alice reads it through proxy {PROXY}: {proxied}: {same}")
        self.epoch = max(direct.epoch, proxied.epoch)

    def observe_a_change(self) -> None:
        log, system = self.log, self.system
        log.section(3, "The meter's value changes; alice observes it")
        old, new = "230.4 W", "231.9 W"
        with log.step(f"alice observes meter-1/power; the value becomes {new}") as step:
            observer = system.start_piped(
                "alice observe", "consumer",
                *self.consumer_args("alice", "observe", "--json", "--count", "4", self.meter_uri),
            )  # fmt: skip
            readings: list[Reading] = []
            try:
                for line in lines(observer, timeout=15.0):
                    readings.append(Reading.parse(line))
                    if len(readings) == 1:
                        write_atomic(self.meter_value, new)
                    if readings[-1].value == new:
                        break
            finally:
                system.stop(observer, grace=2.0)
            if not readings or readings[0].value != old or readings[-1].value != new:
                raise StepFailed(
                    "alice's observation saw " + ", ".join(str(r) for r in readings) or "nothing"
                )
            self.epoch = max(r.epoch for r in readings)
            step.done(
                f"alice observes meter-1/power: {readings[0]} -> {readings[-1]}"
                f" ({len(readings)} notifications)"
            )

    def sleeping_producer(self) -> None:
        log, system = self.log, self.system
        log.section(4, "A sleeping producer publishes; the proxy serves while it sleeps")
        with log.step("sleeper-1 publishes to the proxy") as step:
            sleeper = self.running(self.sleeper, "sleeper-1")
            deadline = time.monotonic() + 15
            while self.proxy_stats().get("published", 0) < 1:
                if time.monotonic() > deadline:
                    raise StepFailed("nothing published", tail(system.read_log(sleeper)))
                time.sleep(0.1)
            step.done(f"sleeper-1 published sleeper-1/reading to {PROXY} (PUT over DTLS)")
        with log.step("bob reads it from the proxy over DTLS") as step:
            first = self.read("bob", self.sleeper_uri, "--proxy", self.proxy_dtls)
            step.done(f"bob reads sleeper-1/reading from {PROXY} over DTLS: {first}")
        with log.step("sleeper-1 goes to sleep") as step:
            pid = sleeper.process.pid
            status = system.stop(sleeper)
            self.sleeper = None
            step.done(f"sleeper-1 stopped (pid {pid}, exit {status}): nothing left to ask")
        with log.step("bob reads it again") as step:
            again = self.read("bob", self.sleeper_uri, "--proxy", self.proxy_dtls)
            if again.value != first.value:
                raise StepFailed(f"value changed: {again.value!r} != {first.value!r}")
            step.done(f"bob still reads it, from {PROXY}'s cache: {again}")

    def scheduled_rotation(self) -> None:
        log = self.log
        log.section(
            5, f"A scheduled rotation (meter-1/power: a new epoch every {ROTATION_PERIOD} s)"
        )
        with log.step(f"waiting for meter-1 to move past epoch {self.epoch}") as step:
            before = self.epoch
            now = self.wait_meter_epoch(before + 1, ROTATION_PERIOD * 3)
            step.done(f"meter-1/power moved from epoch {before} to {now} on schedule")
        with log.step("alice reads under the new epoch") as step:
            reading = self.read("alice", self.meter_uri)
            if reading.epoch <= before:
                raise StepFailed(f"alice read epoch {reading.epoch}, not a newer one")
            self.epoch = reading.epoch
            step.done(f"alice still reads meter-1/power: {reading}: the new secret from the AS")

    def revocation(self) -> None:
        log = self.log
        log.section(6, "bob is revoked: shut out of every new epoch, alice reads on")
        with log.step("revoking bob") as step:
            out = self.admin("revoke", "--consumer", "bob").strip()
            resources = json.loads(self.admin("resources", "--json"))
            active = [
                e["epoch"]
                for r in resources
                if r["id"] == "meter-1/power"
                for e in r["epochs"]
                if e["state"] == "active"
            ]
            if not active:
                raise StepFailed("meter-1/power has no active epoch", json.dumps(resources))
            step.done(f"{out} (meter-1/power now epoch {active[0]})")
        with log.step(f"meter-1 re-seals under epoch {active[0]}") as step:
            now = self.wait_meter_epoch(active[0], 15)
            step.done(f"meter-1 re-sealed under epoch {now}: bob holds no secret for it")
        with log.step("bob tries to read meter-1/power") as step:
            _, _, err = self.get("bob", self.meter_uri, expect=3)
            reason = err.strip().splitlines()[-1].rsplit(": ", 1)[-1] if err.strip() else ""
            step.done(f"bob is refused: exit 3, access denied by the AS ({reason})")
        with log.step("alice reads meter-1/power") as step:
            reading = self.read("alice", self.meter_uri)
            step.done(f"alice still reads meter-1/power: {reading}")

    def audit(self) -> None:
        log = self.log
        log.section(7, "The audit log: every grant, rotation and revocation, hash-chained")
        with log.step("verifying the audit log") as step:
            verdict = self.admin("audit", "--verify").strip()
            records = json.loads(self.admin("audit", "--json"))
            actions: dict[str, int] = {}
            for record in records:
                actions[record["action"]] = actions.get(record["action"], 0) + 1
            step.done(f"{verdict} (audit --verify)")
        shown = ", ".join(f"{n} {action}" for action, n in sorted(actions.items()))
        log.note(f"{len(records)} records: {shown}")

    def proxy_counters(self) -> None:
        log = self.log
        log.section(8, f"What the proxy {PROXY} did (it never held a key)")
        with log.step("reading the proxy's counters") as step:
            result = self.system.check(
                "proxy stats", "proxy", "stats", "--state", str(self.state(PROXY)), "--json"
            )
            stats = json.loads(result.stdout)
            keys = ("hits", "misses", "published", "upstream_requests", "rejected")
            step.done("proxy stats: " + ", ".join(f"{k} {stats.get(k, '?')}" for k in keys))

    # --- exploring ----------------------------------------------------------------------------

    def metrics(self, name: str) -> tuple[str, str]:
        """The ``--metrics`` flag of one daemon."""
        return "--metrics", f"{HOST}:{self.metrics_ports[name]}"

    def endpoints(self) -> list[tuple[str, str]]:
        """Where the running system serves operators: (what, URL), the console's token too."""
        ca = self.system.path("as") / "ca.pem"
        return [
            (
                f"the admin console (its certificate is from the AS CA, {ca})",
                f"https://{HOST}:{self.console_port}/",
            ),
            ("  its login token (admin demo)", self.console_token),
        ] + [
            (f"{who} metrics (Prometheus text)", f"http://{HOST}:{port}/metrics")
            for who, port in (
                ("the AS's", self.metrics_ports["as"]),
                (f"proxy {PROXY}'s", self.metrics_ports[PROXY]),
                ("producer meter-1's", self.metrics_ports["meter-1"]),
            )
        ]

    def commands(self) -> list[tuple[str, str]]:
        """Shell commands to try on the running system: (what it shows, the command), each with
        the installed command (``oscar-consumer``, ...; see :func:`installed`)."""
        as_state = str(self.system.path("as"))

        def consumer(name: str, *args: str) -> str:
            return shlex.join([installed("consumer"), *self.consumer_args(name, *args)])

        def admin(*args: str) -> str:
            command, *rest = args
            return shlex.join([installed("authz_server"), command, "--state", as_state, *rest])

        meter_proxied = f"{self.proxy_uri}/meter-1/power"
        return [
            ("alice reads the meter through the proxy", consumer("alice", "get", meter_proxied)),
            (
                "... and directly (readings never go back: after a newer reading, a copy the proxy "
                "still caches, within its Max-Age, gives a warning and the newest reading held)",
                consumer("alice", "get", "--json", self.meter_uri),
            ),
            (
                "alice observes the meter (Ctrl-C ends)",
                consumer("alice", "observe", self.meter_uri),
            ),
            ("change the meter's value", f"echo '232.0 W' > {shlex.quote(str(self.meter_value))}"),
            ("bob was revoked: exit 3", consumer("bob", "get", self.meter_uri)),
            ("let bob in again", admin("grant", "--consumer", "bob", "--resource", "meter-1/*")),
            (
                "alice reads what sleeper-1 published, over DTLS",
                consumer("alice", "get", "--proxy", self.proxy_dtls, self.sleeper_uri),
            ),
            ("the resources and their epochs", admin("resources")),
            ("the grants", admin("grants")),
            ("the audit log", admin("audit")),
            (
                "the proxy's counters",
                shlex.join([installed("proxy"), "stats", "--state", str(self.state(PROXY))]),
            ),
        ]
