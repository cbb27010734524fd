"""The producer as a real process against a real AS: serving, sealing once, epochs, crashes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiocoap import GET, Context, Message
from aiocoap.numbers.codes import Code
from aiocoap.resource import Resource, Site
from as_harness import ROOT, free_port
from cryptography import x509
from system_harness import Deployment, ProducerProcess, coap_get, run, wait_until, write_atomic

import oscar
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from producer import (
    ConfigError,
    Producer,
    ProducerConfig,
    PublishTarget,
    ResourceSpec,
    load_config,
)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    d = Deployment(root)
    d.enroll("consumer", "reader")
    d.start_as()
    yield d
    d.close()


_counter = iter(range(1000))


def new_producer(d: Deployment) -> tuple[str, Path]:
    device_id = f"sensor-{next(_counter)}"
    bundle = d.enroll("producer", device_id)
    d.grant("reader", f"{device_id}/*")
    return device_id, bundle


class Opener:
    """Opens objects the way a consumer does, with the reader's bundle (no consumer code)."""

    def __init__(self, d: Deployment) -> None:
        self.bundle = Bundle.load(d.root / "reader.json")
        self.freshness = oscar.FreshnessState()

    async def open(self, payload: bytes, resource_id: str | None = None) -> oscar.Reading:
        obj = oscar.ProtectedObject.from_bytes(payload)
        m = obj.metadata
        async with AsClient(self.bundle) as client:
            cert = x509.load_der_x509_certificate(await client.certificate(kid=m.kid))
            grant = await client.secret(m.resource_id, m.epoch)
        return oscar.open(
            payload,
            secrets=lambda rid, e: grant.secret,
            signer=cert,
            trust_anchor=self.bundle.ca_certificate,
            now=int(time.time()),
            resource_id=resource_id,
            freshness=self.freshness,
        )


def latest_seq(payload: bytes) -> tuple[int, int]:
    m = oscar.ProtectedObject.from_bytes(payload).metadata
    return m.epoch, m.seq


# --- serving -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_serves_one_sealed_object_with_etag_max_age_and_discovery(
    deployment: Deployment, tmp_path: Path
) -> None:
    device_id, bundle = new_producer(deployment)
    value = tmp_path / "temperature.txt"
    value.write_bytes(b"21.5")
    producer = ProducerProcess(
        bundle, tmp_path / "p", "--resource", f"temperature={value}", "--interval", "0.05"
    )
    producer.start()
    rid = f"{device_id}/temperature"
    try:
        wait_until(lambda: "sealed" in producer.log() or "now sealing" in producer.log())
        first = await coap_get(producer.uri(rid))
        second = await coap_get(producer.uri(rid))
        assert first.code == Code.CONTENT
        assert first.opt.content_format == 18
        # sealed once: every requester gets the same bytes
        assert first.payload == second.payload
        epoch, seq = latest_seq(first.payload)
        assert first.opt.etag == oscar.object_etag(rid, epoch, seq)
        assert 0 < first.opt.max_age <= 60
        reading = await Opener(deployment).open(first.payload, rid)
        assert reading.plaintext == b"21.5"
        assert reading.metadata.content_format == 0  # guessed from .txt

        valid = await coap_get(producer.uri(rid), etag=first.opt.etag)
        assert valid.code == Code.VALID and valid.payload == b""

        links = await coap_get(f"coap://127.0.0.1:{producer.port}/.well-known/core")
        assert f'</{rid}>;ct="18";obs'.encode() in links.payload

        missing = await coap_get(producer.uri(f"{device_id}/nothing"))
        assert missing.code == Code.NOT_FOUND

        write_atomic(value, b"22.0")
        for _ in range(100):
            changed = await coap_get(producer.uri(rid))
            if changed.payload != first.payload:
                break
            await asyncio.sleep(0.05)
        assert latest_seq(changed.payload) > (epoch, seq)
        assert changed.opt.etag != first.opt.etag
        assert (await Opener(deployment).open(changed.payload, rid)).plaintext == b"22.0"
    finally:
        producer.stop()


@pytest.mark.asyncio
async def test_observers_are_notified_of_each_new_value(
    deployment: Deployment, tmp_path: Path
) -> None:
    device_id, bundle = new_producer(deployment)
    value = tmp_path / "level"
    value.write_bytes(b"1")
    producer = ProducerProcess(
        bundle, tmp_path / "p", "--resource", f"level={value}", "--interval", "0.05"
    )
    producer.start()
    rid = f"{device_id}/level"
    opener = Opener(deployment)
    ctx = await Context.create_client_context()
    try:
        wait_until(lambda: "sealed" in producer.log() or "now sealing" in producer.log())
        request = ctx.request(Message(code=GET, uri=producer.uri(rid), observe=0))
        first = await asyncio.wait_for(request.response, 10)
        assert first.opt.observe is not None
        seen = [(await opener.open(first.payload, rid)).plaintext]
        notifications = aiter(request.observation)
        proof = await asyncio.wait_for(anext(notifications), 10)  # the current object, CON
        assert proof.payload == first.payload
        for new in (b"2", b"3"):
            write_atomic(value, new)
            notification = await asyncio.wait_for(anext(notifications), 10)
            seen.append((await opener.open(notification.payload, rid)).plaintext)
        assert seen == [b"1", b"2", b"3"]
        request.observation.cancel()
    finally:
        await ctx.shutdown()
        producer.stop()


@pytest.mark.asyncio
async def test_the_metrics_endpoint_counts_requests_seals_windows_and_observers(
    deployment: Deployment, tmp_path: Path
) -> None:
    """``--metrics HOST:PORT``: the figures of the running producer, each checked for its value
    after a known number of GETs, new values and one observation."""
    device_id, bundle = new_producer(deployment)
    value = tmp_path / "level"
    value.write_bytes(b"1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    producer = ProducerProcess(
        bundle, tmp_path / "p", "--resource", f"level={value}", "--interval", "0.05",
        "--metrics", f"127.0.0.1:{port}",
    )  # fmt: skip
    producer.start()
    rid = f"{device_id}/level"

    def scrape(per_resource: bool = False) -> dict[str, float]:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        assert (device_id in text) == per_resource  # resource ids only when asked for
        return {
            line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    ctx = await Context.create_client_context()
    try:
        wait_until(lambda: "now sealing" in producer.log())
        for _ in range(5):
            assert (await coap_get(producer.uri(rid))).code == Code.CONTENT
        first = await asyncio.to_thread(scrape)
        assert first['oscar_producer_requests_total{path="fast"}'] == 5
        assert first['oscar_producer_requests_total{path="slow"}'] == 0
        assert first["oscar_producer_objects_sealed_total"] == 1
        assert first["oscar_producer_seal_seconds_count"] == 1
        assert first["oscar_producer_sequence_windows_saved_total"] == 1
        assert first["oscar_producer_resources_unsealable"] == 0
        assert first["oscar_producer_observers"] == 0
        request = ctx.request(Message(code=GET, uri=producer.uri(rid), observe=0))
        await asyncio.wait_for(request.response, 10)  # through aiocoap: a slow-path request
        notifications = aiter(request.observation)
        await asyncio.wait_for(anext(notifications), 10)  # the confirming notification
        for new in (b"2", b"3"):
            write_atomic(value, new)
            await asyncio.wait_for(anext(notifications), 10)
        then = await asyncio.to_thread(scrape)
        assert then["oscar_producer_objects_sealed_total"] == 3
        assert then["oscar_producer_seal_seconds_count"] == 3
        assert then["oscar_producer_observers"] == 1
        assert then["oscar_producer_notifications_total"] >= 3
        assert then['oscar_producer_requests_total{path="fast"}'] == 5
        assert then['oscar_producer_requests_total{path="slow"}'] >= 1
        request.observation.cancel()
        producer.stop()
        # Per-resource labels, asked for: the same producer started again.
        producer = ProducerProcess(
            bundle, tmp_path / "p", "--resource", f"level={value}", "--interval", "0.05",
            "--metrics", f"127.0.0.1:{port}", "--metrics-per-resource", port=producer.port,
        )  # fmt: skip
        producer.start()
        wait_until(lambda: "now sealing" in producer.log())
        for _ in range(2):
            assert (await coap_get(producer.uri(rid))).code == Code.CONTENT
        named = await asyncio.to_thread(scrape, True)
        assert named[f'oscar_producer_resource_requests_total{{resource="{rid}"}}'] == 2
        assert named[f'oscar_producer_objects_sealed_total{{resource="{rid}"}}'] == 1
        assert named[f'oscar_producer_seal_seconds_count{{resource="{rid}"}}'] == 1
    finally:
        await ctx.shutdown()
        producer.stop()


@pytest.mark.asyncio
async def test_a_mebibyte_goes_blockwise_and_ccm_refuses_too_much(
    deployment: Deployment, tmp_path: Path
) -> None:
    device_id, bundle = new_producer(deployment)
    big = tmp_path / "image.bin"
    big.write_bytes(os.urandom(1 << 20))
    producer = ProducerProcess(
        bundle, tmp_path / "p", "--resource", f"image={big}", "--profile", "a128gcm-es256"
    )
    producer.start()
    try:
        rid = f"{device_id}/image"
        wait_until(lambda: "sealed" in producer.log() or "now sealing" in producer.log())
        response = await coap_get(producer.uri(rid), timeout=60)
        assert response.code == Code.CONTENT
        assert len(response.payload) > 1 << 20
        reading = await Opener(deployment).open(response.payload, rid)
        assert reading.plaintext == big.read_bytes()
        assert reading.metadata.content_format == 42
        assert reading.metadata.aead.name == "A128GCM"
    finally:
        producer.stop()

    device_id, bundle = new_producer(deployment)
    too_big = tmp_path / "firmware.bin"
    too_big.write_bytes(os.urandom(70_000))
    ccm = ProducerProcess(bundle, tmp_path / "q", "--resource", f"firmware={too_big}")
    ccm.start()
    try:
        wait_until(lambda: "too large for profile ccm-es256" in ccm.log())
        response = await coap_get(ccm.uri(f"{device_id}/firmware"))
        assert response.code == Code.SERVICE_UNAVAILABLE  # never a truncated object
    finally:
        ccm.stop()


# --- keys and epochs -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_as_rotation_reseals_at_once(deployment: Deployment, tmp_path: Path) -> None:
    device_id, bundle = new_producer(deployment)
    value = tmp_path / "v.txt"
    value.write_bytes(b"same value")
    producer = ProducerProcess(bundle, tmp_path / "p", "--resource", f"v={value}")
    producer.start()
    rid = f"{device_id}/v"
    try:
        wait_until(lambda: "now sealing" in producer.log())
        before = await coap_get(producer.uri(rid))
        epoch, _ = latest_seq(before.payload)
        deployment.admin("rotate", "--resource", rid)
        for _ in range(100):
            after = await coap_get(producer.uri(rid))
            if latest_seq(after.payload)[0] > epoch:
                break
            await asyncio.sleep(0.05)
        assert latest_seq(after.payload)[0] == epoch + 1
        reading = await Opener(deployment).open(after.payload, rid)
        assert reading.plaintext == b"same value"
    finally:
        producer.stop()


@pytest.mark.asyncio
async def test_switches_epoch_at_the_boundary_while_the_as_is_away(
    tmp_path: Path,
) -> None:
    d = Deployment(tmp_path)
    bundle = d.enroll("producer", "solo")
    d.enroll("consumer", "reader")
    d.grant("reader", "solo/*")
    d.start_as()
    value = tmp_path / "v.txt"
    value.write_bytes(b"x")
    producer = ProducerProcess(
        bundle,
        tmp_path / "p",
        "--resource",
        f"v={value}",
        "--rotation-period",
        "3",
        "--lifetime",
        "30",
        "--max-age",
        "1",
        "--interval",
        "0.05",
    )
    producer.start()
    rid = "solo/v"
    try:
        wait_until(lambda: "now sealing" in producer.log())
        d.stop_as()
        start_epoch = latest_seq((await coap_get(producer.uri(rid))).payload)[0]
        # within one period it moves to the next epoch on its own (it holds that secret) ...
        wait_until(lambda: "boundary reached" in producer.log(), timeout=8)
        switched = await coap_get(producer.uri(rid))
        assert latest_seq(switched.payload)[0] == start_epoch + 1
        # ... and after the next boundary it has no secret left: it seals nothing new.
        wait_until(lambda: "sealing nothing new" in producer.log(), timeout=8)
        write_atomic(value, b"y")
        await asyncio.sleep(0.5)
        stale = await coap_get(producer.uri(rid))
        assert stale.payload == switched.payload  # the last object, until its exp
        # the AS comes back: the producer catches up and seals the new value
        d.start_as()
        for _ in range(300):
            fresh = await coap_get(producer.uri(rid))
            if fresh.payload != switched.payload:
                break
            await asyncio.sleep(0.1)
        assert latest_seq(fresh.payload)[0] > start_epoch + 1
        reading = await Opener(d).open(fresh.payload, rid)
        assert reading.plaintext == b"y"
    finally:
        producer.stop()
        d.close()


# --- crashes and state ---------------------------------------------------------------------------


class Sink(Resource):  # type: ignore[misc]
    """A publishing target that keeps every object PUT to it."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: list[bytes] = []

    async def render_put(self, request: Message) -> Message:
        self.objects.append(request.payload)
        return Message(code=Code.CHANGED)


@pytest.mark.asyncio
async def test_kill_9_and_restart_twenty_times_never_reuses_a_seq(
    deployment: Deployment, tmp_path: Path
) -> None:
    device_id, bundle = new_producer(deployment)
    rid = f"{device_id}/counter"
    sink = Sink()
    site = Site()
    site.add_resource((device_id, "counter"), sink)
    sink_port = free_port()
    server = await Context.create_server_context(
        site, bind=("127.0.0.1", sink_port), transports=["udp6"]
    )
    value = tmp_path / "counter.txt"
    value.write_bytes(b"0")
    producer = ProducerProcess(
        bundle,
        tmp_path / "p",
        "--resource",
        f"counter={value}",
        "--interval",
        "0.05",
        "--publish",
        f"coap://127.0.0.1:{sink_port}",
    )
    stop = asyncio.Event()

    async def keep_changing() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            write_atomic(value, str(n).encode())
            await asyncio.sleep(0.02)

    writer = asyncio.create_task(keep_changing())
    rng = random.Random(4)
    try:
        for _ in range(20):
            await asyncio.to_thread(producer.start)
            await asyncio.sleep(rng.uniform(0.2, 0.7))
            await asyncio.to_thread(producer.kill)
        await asyncio.to_thread(producer.start)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await writer
        await asyncio.to_thread(producer.stop)
        await server.shutdown()
    by_seq: dict[tuple[int, int], bytes] = {}
    for obj in sink.objects:
        key = latest_seq(obj)
        assert by_seq.setdefault(key, obj) == obj, f"seq {key} sealed twice"
    assert len(by_seq) >= 40, "too few objects to show anything"
    # and they all open: these are real objects of the resource
    opener = Opener(deployment)
    last = sink.objects[-1]
    assert (await opener.open(last, rid)).metadata.resource_id == rid


@pytest.mark.asyncio
async def test_restart_reuses_key_and_certificate_and_keeps_state_private(
    deployment: Deployment, tmp_path: Path
) -> None:
    device_id, bundle = new_producer(deployment)
    value = tmp_path / "v.txt"
    value.write_bytes(b"private reading")
    state = tmp_path / "p"
    producer = ProducerProcess(bundle, state, "--resource", f"v={value}")
    producer.start()
    rid = f"{device_id}/v"
    try:
        wait_until(lambda: "now sealing" in producer.log())
        first = await coap_get(producer.uri(rid))
    finally:
        producer.stop()
    cert = (state / "cert.pem").read_bytes()
    key = (state / "key.pem").read_bytes()
    producer.start()
    try:
        wait_until(lambda: producer.log().count("now sealing") >= 1)
        await asyncio.sleep(0.3)
        second = await coap_get(producer.uri(rid))
    finally:
        producer.stop()
    assert (state / "cert.pem").read_bytes() == cert
    assert (state / "key.pem").read_bytes() == key
    assert producer.log().count("issued by the AS") == 1
    m1 = oscar.ProtectedObject.from_bytes(first.payload).metadata
    m2 = oscar.ProtectedObject.from_bytes(second.payload).metadata
    assert m1.kid == m2.kid
    assert (m2.epoch, m2.seq) > (m1.epoch, m1.seq)

    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("key.pem", "keys.state", "sequence.state"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    async with AsClient(Bundle.load(deployment.root / "reader.json")) as client:
        secret = (await client.secret(rid, m2.epoch)).secret.value
    for path in state.iterdir():
        data = path.read_bytes()
        assert secret not in data and b"private reading" not in data, path.name
    assert b"private reading" not in producer.log().encode()


# --- embedding, configuration, usage -------------------------------------------------------------


@pytest.mark.asyncio
async def test_embedded_producer_with_callback_and_update(
    deployment: Deployment, tmp_path: Path
) -> None:
    device_id, bundle = new_producer(deployment)
    calls = iter(range(1000))

    def reading() -> bytes:
        return f"{next(calls) // 10}".encode()  # changes about every 10 calls

    port = free_port()
    config = ProducerConfig(
        bundle=bundle,
        state=tmp_path / "p",
        listen=("127.0.0.1", port),
        resources=[
            ResourceSpec("polled", callback=reading, interval=0.05),
            ResourceSpec("pushed", content_format=50),
        ],
    )
    opener = Opener(deployment)
    async with Producer(config) as producer:
        for _ in range(100):
            if producer.resources["polled"].obj is not None:
                break
            await asyncio.sleep(0.05)
        assert producer.update("pushed", b'{"t": 1}')
        assert not producer.update("pushed", b'{"t": 1}')  # same value: not sealed again
        response = await coap_get(f"coap://127.0.0.1:{port}/{device_id}/pushed")
        reading_ = await opener.open(response.payload, f"{device_id}/pushed")
        assert reading_.plaintext == b'{"t": 1}'
        assert reading_.metadata.content_format == 50
        polled = await coap_get(f"coap://127.0.0.1:{port}/{device_id}/polled")
        assert (await opener.open(polled.payload)).plaintext.isdigit()
        with pytest.raises(KeyError):
            producer.update("nope", b"")


def test_toml_configuration(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        'bundle = "b.json"\nstate = "st"\nlisten = "127.0.0.1:5683"\n'
        '[[resource]]\npath = "a/b"\ncommand = ["echo", "hi"]\ninterval = 2\n'
        'profile = "a128gcm-es256"\nmax_age = 5\n'
        '[[publish]]\nuri = "coap://127.0.0.1:9999"\n'
    )
    config = load_config(tmp_path / "p.toml")
    assert config.bundle == tmp_path / "b.json" and config.state == tmp_path / "st"
    assert config.resources[0].command == ("echo", "hi")
    assert config.publish[0].resource_uri("s/a/b") == "coap://127.0.0.1:9999/s/a/b"
    (tmp_path / "bad.toml").write_text('bundle = "b"\nstate = "s"\nlisten = "x"\nfoo = 1\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text(
        'bundle = "b"\nstate = "s"\nlisten = "h:1"\n[[resource]]\npath = "../x"\n'
    )
    with pytest.raises(ConfigError, match="path"):
        load_config(tmp_path / "bad2.toml")
    with pytest.raises(ConfigError, match="signs with EdDSA"):
        ProducerConfig(
            bundle=Path("b"),
            state=Path("s"),
            listen=("h", 1),
            resources=[ResourceSpec("x", profile="ccm-eddsa")],
        )
    with pytest.raises(ConfigError, match="coaps needs"):
        PublishTarget("coaps://127.0.0.1:1")


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        ([], 2, "bundle and state are required"),
        (["--bundle", "b", "--state", "s", "--listen", "nope"], 2, "HOST:PORT"),
        (
            ["--bundle", "b", "--state", "s", "--listen", "127.0.0.1:1", "--resource", "x"],
            2,
            "PATH=FILE",
        ),
        (
            ["--bundle", "b", "--state", "s", "--listen", "127.0.0.1:1", "--max-age", "x"],
            2,
            "invalid int",
        ),
        (
            ["--bundle", "/nonexistent", "--state", "s", "--listen", "127.0.0.1:1"],
            1,
            "cannot read the bundle",
        ),
    ],
)
def test_cli_usage_errors_are_one_line(
    tmp_path: Path, args: list[str], status: int, message: str
) -> None:
    result = run("-m", "producer", *args, check=False)
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (ROOT / "s").exists()


def test_refuses_an_exposed_bundle_or_one_for_another_role(
    deployment: Deployment, tmp_path: Path
) -> None:
    exposed = tmp_path / "exposed.json"
    exposed.write_bytes((deployment.root / "reader.json").read_bytes())
    exposed.chmod(0o644)
    common = ["--state", str(tmp_path / "s"), "--listen", f"127.0.0.1:{free_port()}"]
    result = run("-m", "producer", "--bundle", str(exposed), *common, check=False)
    assert result.returncode == 1 and "readable by others" in result.stderr
    result = run(
        "-m", "producer", "--bundle", str(deployment.root / "reader.json"), *common, check=False
    )
    assert result.returncode == 1 and "not a producer" in result.stderr
    assert not (tmp_path / "s").exists()


def test_sigterm_stops_the_producer_even_as_the_as_goes_away(tmp_path: Path) -> None:
    """SIGTERM to the AS and the producer at once: the producer's AS retry loop must not swallow
    its cancellation (it did, about 3 times in 8, before stop() cancelled until done)."""
    d = Deployment(tmp_path)
    bundle = d.enroll("producer", "quitter")
    value = tmp_path / "v.txt"
    value.write_bytes(b"1")
    producer = ProducerProcess(
        bundle, tmp_path / "p", "--resource", f"a={value}", "--resource", f"b={value}"
    )
    try:
        for _ in range(5):
            server = d.start_as()
            producer.start()
            time.sleep(0.5)  # its AS tasks are under way
            assert server.proc is not None and producer.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            producer.proc.send_signal(signal.SIGTERM)
            assert producer.proc.wait(15) == 0
            server.proc.wait(15)
    finally:
        producer.kill()
        d.close()


def test_a_publish_only_producer_needs_no_listen_address(
    deployment: Deployment, tmp_path: Path
) -> None:
    device_id, bundle = new_producer(deployment)
    value = tmp_path / "v.txt"
    value.write_bytes(b"1")
    log_path = tmp_path / "p.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "producer", "--bundle", str(bundle),
                "--state", str(tmp_path / "p"), "--resource", f"v={value}",
                "--publish", f"coap://127.0.0.1:{free_port()}",
            ],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: f"producer {device_id} ready" in log_path.read_text())
        assert "serving coap://" not in log_path.read_text()
    finally:
        process.terminate()
        assert process.wait(15) == 0


@pytest.mark.asyncio
async def test_one_producer_per_state_and_a_lost_state_never_reuses_a_seq(
    deployment: Deployment, tmp_path: Path
) -> None:
    device_id, bundle = new_producer(deployment)
    rid = f"{device_id}/v"
    value = tmp_path / "v.txt"
    value.write_bytes(b"first life")
    first = ProducerProcess(bundle, tmp_path / "p", "--resource", f"v={value}")
    first.start()
    try:
        wait_until(lambda: "now sealing" in first.log())
        before = oscar.ProtectedObject.from_bytes((await coap_get(first.uri(rid))).payload)
        # a second process on the same state directory (another port) is refused: it would
        # reuse seqs
        command = first.command()[1:]
        command[command.index("--listen") + 1] = f"127.0.0.1:{free_port()}"
        second = run(*command, check=False)
        assert second.returncode == 1 and "in use by another producer" in second.stderr
    finally:
        first.kill()
    # the state is lost (a new directory): the AS knew the resource, so the epoch it seals
    # under starts at a random seq far from anything the first life used
    value.write_bytes(b"second life")
    again = ProducerProcess(bundle, tmp_path / "fresh", "--resource", f"v={value}")
    again.start()
    try:
        wait_until(lambda: "now sealing" in again.log())
        after = oscar.ProtectedObject.from_bytes((await coap_get(again.uri(rid))).payload)
        assert "random sequence number" in again.log()
    finally:
        again.stop()
    m1, m2 = before.metadata, after.metadata
    assert m2.epoch == m1.epoch  # no rotation in between (an hour's period)
    assert m1.seq < 64 and m2.seq >= 1 << 48
