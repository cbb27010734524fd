"""The secret-leak sweep (issue 8): the whole system at debug logging, then every log, state file,
database and exception text searched for the plaintext, access secrets and PSKs used.

Real processes on loopback: the AS, a producer (serving a distinctive plaintext and publishing it
to the proxy over DTLS), the proxy (reverse-mapping the producer), and consumer CLI runs, every
one at ``--log-level debug``. Readings go end to end directly and through the proxy; failures are
provoked (a missing resource, a consumer without a grant, a revoked consumer, a tampered object)
so that error paths log too. The secrets are then gathered as the devices hold them (PSKs from the
bundles, access secrets and link PSKs from the AS through the device library, the state keys
derived from the PSKs) and searched for raw, hex (both cases), base64, base64url and as Python
byte-string escapes. Places meant to hold them are left out: the bundles (PSK in clear, mode
0600) and the sensor's value file (the plaintext, where the producer reads it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from as_harness import ROOT
from proxy_harness import ProxyProcess
from system_harness import Deployment, ProducerProcess, wait_until, write_atomic

from consumer import Consumer
from oscar import OscarError
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle

PLAINTEXT = b"canary-Pl41nt3xt-reading-q7Zx"
DEBUG = ("--log-level", "debug")


def encodings(secret: bytes) -> dict[str, bytes]:
    """The forms a secret could take in a log line or a file."""
    b64 = base64.b64encode(secret)
    b64url = base64.urlsafe_b64encode(secret)
    forms = {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": b64.rstrip(b"="),
        "base64url": b64url.rstrip(b"="),
        "repr": repr(secret)[2:-1].encode(),
    }
    return {name: form for name, form in forms.items() if len(form) >= 8}


def find(secrets: dict[str, bytes], places: dict[str, bytes]) -> list[str]:
    """Every (secret, encoding, place) where a secret shows."""
    found = []
    for name, secret in secrets.items():
        for form_name, form in encodings(secret).items():
            for place, data in places.items():
                if form in data:
                    found.append(f"{name} ({form_name}) in {place}")
    return found


def files_under(*roots: Path, exclude: Iterable[Path] = ()) -> dict[str, bytes]:
    skip = {p.resolve() for p in exclude}
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.resolve() not in skip:
                out[str(path)] = path.read_bytes()
    return out


async def consumer_run(d: Deployment, consumer_id: str, *args: str) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", *DEBUG,
        "--bundle", str(d.root / f"{consumer_id}.json"),
        "--state", str(d.root / f"{consumer_id}-state"),
        "--timeout", "5", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out, err


def test_the_search_finds_every_encoding() -> None:
    """The sweep's own check: a secret in any of its encodings is found."""
    secret = bytes(range(200, 216))
    for form in encodings(secret).values():
        assert find({"s": secret}, {"place": b"xx " + form + b" yy"}), form
    assert find({"s": secret}, {"place": b"nothing here"}) == []


@pytest.mark.asyncio
async def test_no_plaintext_secret_or_psk_leaks_anywhere(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    d = Deployment(tmp_path, *DEBUG)
    request.addfinalizer(d.close)
    bundles = {
        "cloud": d.enroll("proxy", "cloud"),
        "meter": d.enroll("producer", "meter"),
        "c1": d.enroll("consumer", "c1"),
        "c2": d.enroll("consumer", "c2"),
        "stranger": d.enroll("consumer", "stranger"),
    }
    d.grant("c1", "meter/*")
    d.grant("c2", "meter/*")
    d.start_as()
    value = tmp_path / "value.txt"
    value.write_bytes(PLAINTEXT)
    proxy = ProxyProcess(bundles["cloud"], tmp_path / "proxy", *DEBUG)
    producer = ProducerProcess(
        bundles["meter"],
        tmp_path / "producer",
        "--resource",
        f"power={value}",
        "--interval",
        "0.05",
        "--max-age",
        "2",
        "--publish",
        f"cloud=coaps://127.0.0.1:{proxy.port + 1}",
        *DEBUG,
    )
    proxy.args = (*proxy.args, "--reverse", f"meter=coap://127.0.0.1:{producer.port}")
    request.addfinalizer(producer.kill)
    request.addfinalizer(proxy.kill)
    await asyncio.to_thread(proxy.start)
    await asyncio.to_thread(producer.start)
    await asyncio.to_thread(wait_until, lambda: "now sealing" in producer.log(), 20)

    stderr: dict[str, bytes] = {}
    exceptions: list[BaseException] = []
    epochs: set[int] = set()

    async def reading(consumer_id: str, label: str, *args: str) -> int:
        status, out, err = await consumer_run(d, consumer_id, *args)
        stderr[f"{consumer_id} {label} (stderr)"] = err
        if status == 0:
            for line in out.splitlines():
                doc = json.loads(line)
                assert doc["value"].encode().startswith(PLAINTEXT)
                epochs.add(doc["epoch"])
        return status

    # Readings end to end: directly, through the proxy (reverse), and the publish path (the
    # producer pushes every object to the proxy over DTLS meanwhile).
    direct = producer.uri("meter/power")
    assert await reading("c1", "direct", "get", "--json", direct) == 0
    via_proxy = [await reading("c1", "proxy", "get", "--json", proxy.uri("meter/power"))]

    async def change_later() -> None:
        await asyncio.sleep(2)
        write_atomic(value, PLAINTEXT + b" 2")

    changer = asyncio.create_task(change_later())
    assert await reading("c1", "observe", "observe", "--json", "--count", "2", direct) == 0
    await changer
    # Failures: a missing resource, a consumer with no grant, a proxy asked directly over DTLS
    # by a consumer (link key from the AS).
    assert await reading("c1", "missing", "get", producer.uri("meter/nothing")) == 4
    assert await reading("stranger", "no grant", "get", "--json", direct) == 3
    via_proxy.append(
        await reading(
            "c1", "dtls proxy", "get", "--json", direct, "--proxy", f"cloud={proxy.secure_address}"
        )
    )
    assert 0 in via_proxy, via_proxy
    # A revoked consumer: readable before, refused the epoch its revocation started.
    assert await reading("c2", "before revocation", "get", "--json", direct) == 0
    d.admin("revoke", "--consumer", "c2")
    await asyncio.to_thread(
        wait_until, lambda: producer.log().count("now sealing") >= 2, 20
    )  # the producer moved to the new epoch
    await asyncio.sleep(1)
    assert await reading("c2", "revoked", "get", "--json", direct) == 3
    assert await reading("c1", "after rotation", "get", "--json", direct) == 0

    # Exceptions raised by the library in the same situations, and a tampered object.
    async with Consumer(bundles["c2"], tmp_path / "c2-lib", timeout=5) as c2:
        for attempt in (
            c2.get(direct),
            c2.get(producer.uri("meter/nothing")),
            c2.open_object(b"\xd2\x84" + PLAINTEXT, "meter/power"),
        ):
            try:
                await attempt
            except OscarError as exc:
                exceptions.append(exc)
    assert len(exceptions) == 3

    # The secrets that were actually used, as the devices get them.
    secrets: dict[str, bytes] = {}
    for device_id, path in bundles.items():
        bundle = Bundle.load(path)
        secrets[f"PSK of {device_id}"] = bundle.psk
        secrets[f"state key of {device_id}"] = bundle.state_key(bundle.role)
    c1 = AsClient(Bundle.load(bundles["c1"]))
    meter = AsClient(Bundle.load(bundles["meter"]))
    await c1.start()
    await meter.start()
    try:
        assert len(epochs) >= 2, epochs
        for epoch in sorted(epochs):
            grant = await c1.secret("meter/power", epoch)
            secrets[f"access secret of epoch {epoch}"] = grant.secret.value
        keys = await meter.keys("meter/power")
        if keys.next is not None:
            secrets[f"access secret of epoch {keys.next.epoch}"] = keys.next.secret.value
        secrets["link PSK c1-cloud"] = await c1.link("cloud")
        secrets["link PSK meter-cloud"] = await meter.link("cloud")
    finally:
        await c1.close()
        await meter.close()

    for daemon in (producer, proxy):
        assert daemon.stop() == 0, daemon.log()
    d.stop_as()

    logs = {
        "AS log": (tmp_path / "as.log").read_bytes(),
        "producer log": producer.log_path.read_bytes(),
        "proxy log": proxy.log_path.read_bytes(),
    }
    assert b"DEBUG" in logs["producer log"] or b"debug" in logs["producer log"]
    for name, text in logs.items():
        assert b"Traceback" not in text, (name, text.decode(errors="replace")[-3000:])
    texts = {
        **{f"str of {exc!r}": str(exc).encode() for exc in exceptions},
        **{f"repr {i}": repr(exc).encode() for i, exc in enumerate(exceptions)},
        **{f"reason {i}": getattr(exc, "reason", "").encode() for i, exc in enumerate(exceptions)},
    }
    stored = files_under(
        tmp_path, exclude=[value, *bundles.values(), *logs_paths(d, producer, proxy)]
    )
    assert any(name.endswith("as.db") for name in stored)
    assert any("proxy" in name for name in stored)
    places = {**logs, **stderr, **texts, **stored}

    leaks = find({"plaintext": PLAINTEXT, **secrets}, places)
    assert leaks == [], "\n".join(leaks)


def logs_paths(d: Deployment, *daemons: ProducerProcess | ProxyProcess) -> list[Path]:
    return [d.root / "as.log", *(daemon.log_path for daemon in daemons)]
