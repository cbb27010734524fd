"""The AS over the network: a real server process, real DTLS clients, loopback.

Each test gets its own state directory and server process (``oscar-as serve``), and runs
twice: on SQLite and on a fresh PostgreSQL database (tests/pg_harness.py) that the state
directory names; the test changes the database through its own :class:`Store` as the admin
CLI would, while the server runs. At teardown every server must exit 0 on SIGTERM, log no
traceback, and its log must hold no PSK and no access secret the test saw.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import pytest_asyncio
from aiocoap import DELETE, GET, POST, PUT, Message
from aiocoap.error import NetworkError
from as_harness import (
    PROFILE,
    AsEnv,
    Client,
    FastFail,
    Observation,
    as_env,
    decode,
    now,
    refused,
    resource_body,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pg_harness import PgCluster

from authz_server.ratelimit import RateLimit
from authz_server.store import Store
from oscar import certs
from oscar_io import dtls_client
from oscar_io.dtls import MAX_SESSIONS_PER_IDENTITY, IndexedCreds

EVIL = "'; DROP TABLE devices; --"


@pytest_asyncio.fixture
async def env(tmp_path: Path, as_database: tuple[PgCluster, str] | None) -> AsyncIterator[AsEnv]:
    async with as_env(tmp_path, as_database) as environment:  # on SQLite, then on PostgreSQL
        yield environment


async def register(producer: Client, path: str, **overrides: Any) -> tuple[str, Any]:
    return await producer.call(POST, "resources", body=resource_body(path, **overrides))


def csr_der(key: Any, device_id: str) -> bytes:
    return certs.make_csr(key, device_id).public_bytes(serialization.Encoding.DER)


async def denials(store: Store, actor: str) -> list[Any]:
    return [r for r in await store.audit_records() if r.actor == actor and r.result == "denied"]


# --- in memory first: the pure parts -------------------------------------------------------------


def test_token_bucket() -> None:
    limit = RateLimit(rate=2.0, burst=3)
    assert [limit.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take("a", 0.0) == pytest.approx(0.5)  # one token takes 0.5 s at 2/s
    assert limit.take("b", 0.0) == 0.0  # per identity
    assert limit.take("a", -10.0) == pytest.approx(0.5)  # a clock stepping back adds nothing
    assert limit.take("a", 0.5) == 0.0
    assert limit.prune(0.1) == 0 and limit.prune(100.0) == 2 and len(limit) == 0
    for rate, burst in [(0, 1), (-1.0, 1), (float("inf"), 1), (1.0, 0), (1.0, 1.5)]:
        with pytest.raises(ValueError):
            RateLimit(rate, burst)  # type: ignore[arg-type]


def test_unknown_identities_get_a_stable_decoy_key() -> None:
    creds = IndexedCreds()
    assert creds  # an empty map must stay truthy: aiocoap replaces a falsy one
    creds.set_device("dev-1", b"k" * 16)
    assert creds.find_dtls_psk(b"dev-1") == (b"k" * 16, ":dev-1")
    decoy, label = creds.find_dtls_psk(b"nobody")
    assert label is None and len(decoy) == 16 and decoy != b"k" * 16
    assert creds.find_dtls_psk(b"nobody") == (decoy, None)
    assert creds.remove_device("dev-1") and not creds.remove_device("dev-1")
    assert creds.find_dtls_psk(b"dev-1")[1] is None
    with pytest.raises(ValueError):
        creds.set_device("dev-2", b"k" * 17)  # tinydtls takes at most 16 bytes


# --- the happy path ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_producer_enrolls_certifies_registers_and_reads(env: AsEnv) -> None:
    await env.device("sensor-1", "producer")
    await env.device("reader-1", "consumer")
    await env.device("proxy-1", "proxy")
    server = env.server()
    producer = await env.client(server, "sensor-1")
    consumer = await env.client(server, "reader-1")
    proxy = await env.client(server, "proxy-1")

    code, links = await producer.get(".well-known/core")
    assert code == "2.05"
    for path in ("</cert>", "</crl>", "</resources>", "</secret>", "</keys>"):
        assert path.encode() in links
    assert b'</keys>;rt="oscar.as.keys";ct=60;obs' in links

    # CSR in, certificate out: it names the DTLS identity and chains to the CA.
    key = certs.generate_signing_key()
    code, body = await producer.call(POST, "cert", body={"csr": csr_der(key, "sensor-1")})
    assert code == "2.01", body
    cert = x509.load_der_x509_certificate(body["cert"])
    ca_cert = x509.load_pem_x509_certificate((env.state / "ca.pem").read_bytes())
    certs.check_certificate(cert, ca_cert, device_id="sensor-1", now=now())
    assert body["serial"] == format(cert.serial_number, "x")

    # A CSR naming another device, and a consumer asking for a certificate: refused and audited.
    before = len(await denials(env.store, "sensor-1"))
    code, body = await producer.call(POST, "cert", body={"csr": csr_der(key, "sensor-2")})
    assert (code, body) == ("4.03", {"error": "the CSR names another device"})
    assert len(await denials(env.store, "sensor-1")) == before + 1
    code, _ = await consumer.call(POST, "cert", body={"csr": csr_der(key, "reader-1")})
    assert code == "4.03"
    proxy_key = certs.generate_signing_key("EdDSA")
    code, _ = await proxy.call(POST, "cert", body={"csr": csr_der(proxy_key, "proxy-1")})
    assert code == "2.01"

    # Anyone enrolled fetches the certificate by device id or key id, and the CRL.
    kid = certs.key_id(key.public_key()).hex()
    assert await consumer.get("cert", kid=kid) == ("2.05", {"cert": body_der(cert)})
    assert await proxy.get("cert", id="sensor-1") == ("2.05", {"cert": body_der(cert)})
    assert (await consumer.get("cert", id="nobody"))[0] == "4.04"
    assert (await consumer.get("cert", kid="00" * 8))[0] == "4.04"
    code, body = await proxy.get("crl")
    assert code == "2.05"
    crl = x509.load_der_x509_crl(body["crl"])
    assert crl.is_signature_valid(ca_cert.public_key())

    # Register (2.01), register again (2.04, unchanged), a consumer cannot register.
    code, body = await register(producer, "temperature")
    assert (code, body) == ("2.01", {"resource": "sensor-1/temperature", "epoch": 1})
    code, body = await register(producer, "temperature", max_age=5)
    assert (code, body) == ("2.04", {"resource": "sensor-1/temperature", "epoch": 1})
    stored = await env.store.resource("sensor-1/temperature")
    assert stored is not None and stored.max_age == 60 and stored.producer_id == "sensor-1"
    assert (await register(consumer, "temperature"))[0] == "4.03"
    assert await env.store.resource("reader-1/temperature") is None

    # The producer's key state: the active epoch and the next (pre-active) one.
    code, keys = await producer.get("keys", r="sensor-1/temperature")
    assert code == "2.05"
    assert keys["resource"] == "sensor-1/temperature" and keys["profile"] == PROFILE
    assert keys["active"]["epoch"] == 1 and keys["next"]["epoch"] == 2
    assert len(keys["active"]["secret"]) == 32 and len(keys["next"]["secret"]) == 32
    assert keys["active"]["secret"] != keys["next"]["secret"]
    assert keys["active"]["activated_at"] <= now()
    env.keep(keys["active"]["secret"], keys["next"]["secret"])
    code, secret = await producer.get("secret", r="sensor-1/temperature")
    assert code == "2.05"
    assert secret == {
        "resource": "sensor-1/temperature",
        "epoch": 1,
        "state": "active",
        "secret": keys["active"]["secret"],
        "profile": PROFILE,
    }
    code, upcoming = await producer.get("secret", r="sensor-1/temperature", e=2)
    assert (code, upcoming["state"], upcoming["secret"]) == (
        "2.05",
        "pre-active",
        keys["next"]["secret"],
    )
    assert (await producer.get("secret", r="sensor-1/temperature", e=9))[0] == "4.04"
    code, listed = await producer.get("resources")
    assert [r["resource"] for r in listed["resources"]] == ["sensor-1/temperature"]


def body_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --- grants, denials -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_grants_by_pattern_and_expiry_and_denials(env: AsEnv) -> None:
    for device_id, role in [
        ("p1", "producer"),
        ("p2", "producer"),
        ("all-of-p1", "consumer"),
        ("expired", "consumer"),
        ("nothing", "consumer"),
        ("cache", "proxy"),
    ]:
        await env.device(device_id, role)
    server = env.server()
    p1, p2 = await env.client(server, "p1"), await env.client(server, "p2")
    for producer, path in [(p1, "a"), (p1, "b"), (p2, "c")]:
        assert (await register(producer, path))[0] == "2.01"
    t = now()
    await env.store.add_grant("all-of-p1", "p1/*", None, t)
    await env.store.add_grant("expired", "p1/b", t + 3600, t)

    reader = await env.client(server, "all-of-p1")
    for rid in ("p1/a", "p1/b", "p1/a"):
        code, body = await reader.get("secret", r=rid)
        assert (code, body["resource"], body["epoch"]) == ("2.05", rid, 1)
        env.keep(body["secret"])
    # Each first delivery of a secret is in the audit log (once), with no key material.
    deliveries = [
        (r.subject, r.detail) for r in await env.store.audit_records()
        if r.action == "secret" and r.actor == "all-of-p1"
    ]  # fmt: skip
    assert deliveries == [("p1/a", {"epoch": 1}), ("p1/b", {"epoch": 1})]
    assert (await reader.get("secret", r="p2/c")) == ("4.03", {"error": "no grant for this epoch"})
    assert (await reader.get("secret", r="p1/a", e=2))[0] == "4.03"  # pre-active: owner only
    code, listed = await reader.get("resources")
    assert [r["resource"] for r in listed["resources"]] == ["p1/a", "p1/b"]
    assert listed["resources"][0] == {
        "resource": "p1/a",
        "producer": "p1",
        "content_format": 50,
        "profile": PROFILE,
        "max_age": 60,
        "rotation_period": 0,
        "epoch": 1,
    }

    # A grant that has expired already, given only now: its expiry rotates p1/a at the AS's next
    # schedule (once a second), which the epoch-1 checks above must not race with.
    await env.store.add_grant("expired", "p1/a", t - 10, t - 100)
    expired = await env.client(server, "expired")
    assert (await expired.get("secret", r="p1/a"))[0] == "4.03"
    assert (await expired.get("secret", r="p1/b"))[0] == "2.05"
    assert [r["resource"] for r in (await expired.get("resources"))[1]["resources"]] == ["p1/b"]

    nothing = await env.client(server, "nothing")
    assert (await nothing.get("secret", r="p1/a"))[0] == "4.03"
    assert (await nothing.get("secret", r="p1/nonexistent"))[0] == "4.03"  # no existence oracle
    assert (await nothing.get("resources")) == ("2.05", {"resources": []})

    proxy = await env.client(server, "cache")
    assert (await proxy.get("secret", r="p1/a")) == ("4.03", {"error": "proxies get no secrets"})
    assert (await proxy.get("keys", r="p1/a"))[0] == "4.03"
    code, listed = await proxy.get("resources")
    assert [r["resource"] for r in listed["resources"]] == ["p1/a", "p1/b", "p2/c"]

    # Another producer can neither read nor observe p1's keys.
    assert (await p2.get("secret", r="p1/a"))[0] == "4.03"
    assert (await p2.get("keys", r="p1/a"))[0] == "4.03"
    observation = Observation(p2, "p1/a")
    assert (await observation.first())[0] == "4.03"

    assert len(await denials(env.store, "nothing")) == 2
    assert len(await denials(env.store, "cache")) == 2
    assert {r.subject for r in await denials(env.store, "p2")} == {"p1/a"}


# --- revocation and rotation ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_revocation_rotates_refuses_and_notifies(env: AsEnv) -> None:
    await env.device("meter", "producer")
    await env.device("keep", "consumer")
    await env.device("gone", "consumer")
    server = env.server()
    producer = await env.client(server, "meter")
    assert (await register(producer, "power"))[0] == "2.01"
    t = now()
    for consumer_id in ("keep", "gone"):
        await env.store.add_grant(consumer_id, "meter/*", None, t)
    keep, gone = await env.client(server, "keep"), await env.client(server, "gone")
    assert (await gone.get("secret", r="meter/power"))[1]["epoch"] == 1

    observation = Observation(producer, "meter/power")
    code, first = await observation.first()
    assert (code, first["active"]["epoch"], first["next"]["epoch"]) == ("2.05", 1, 2)

    # Revoke while the server runs: a new epoch at once, observed by the producer.
    assert await env.store.revoke_grants("gone", None, now()) == ["meter/power"]
    note = await observation.next()
    assert (note["active"]["epoch"], note["next"]["epoch"]) == (2, 3)
    assert note["active"]["secret"] == first["next"]["secret"]
    env.keep(first["active"]["secret"], note["active"]["secret"], note["next"]["secret"])

    assert (await gone.get("secret", r="meter/power"))[0] == "4.03"
    code, body = await keep.get("secret", r="meter/power")
    assert (code, body["epoch"], body["secret"]) == ("2.05", 2, note["active"]["secret"])

    # Every later epoch is refused too, even after a new grant lets it back in from a new epoch.
    await env.store.rotate("meter/power", now(), actor="admin", reason="test")
    assert (await observation.next())["active"]["epoch"] == 3
    assert (await gone.get("secret", r="meter/power", e=3))[0] == "4.03"
    assert (await keep.get("secret", r="meter/power", e=3))[0] == "2.05"
    await env.store.add_grant("gone", "meter/*", None, now())
    assert (await observation.next())["active"]["epoch"] == 4
    assert (await gone.get("secret", r="meter/power"))[1]["epoch"] == 4
    for epoch in (2, 3):
        assert (await gone.get("secret", r="meter/power", e=epoch))[0] == "4.03"
        assert (await keep.get("secret", r="meter/power", e=epoch))[0] == "2.05"
    observation.cancel()


@pytest.mark.asyncio
async def test_scheduled_rotation_notifies_the_producer(env: AsEnv) -> None:
    await env.device("clock", "producer")
    server = env.server("--min-rotation-period", "1")
    producer = await env.client(server, "clock")
    assert (await register(producer, "tick", rotation_period=1))[0] == "2.01"
    observation = Observation(producer, "clock/tick")
    code, first = await observation.first()
    assert code == "2.05"
    note = await observation.next(timeout=5)
    assert note["active"]["epoch"] > first["active"]["epoch"]
    env.keep(first["active"]["secret"], first["next"]["secret"], note["active"]["secret"])
    env.keep(note["next"]["secret"])
    observation.cancel()
    rotations = [r for r in await env.store.audit_records() if r.action == "rotate"]
    assert rotations and all(r.actor == "as" for r in rotations)
    assert rotations[0].detail["reason"] == "schedule"


# --- identities ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_device_enrolled_while_running_connects_at_once(env: AsEnv) -> None:
    server = env.server()
    started = time.monotonic()
    await env.device("late-1", "consumer")
    late = await env.client(server, "late-1")
    while True:
        try:
            response = await late.send(late.message(GET, "crl", transport_tuning=FastFail()))
            break
        except NetworkError:
            assert time.monotonic() - started < 3, "the new device was not let in"
            await late.close()
            env.clients.remove(late)
            late = await env.client(server, "late-1")
    assert response.code.dotted == "2.05"
    assert time.monotonic() - started < 1.5


@pytest.mark.asyncio
async def test_revoked_device_loses_its_open_session_and_cannot_reconnect(env: AsEnv) -> None:
    await env.device("doomed", "consumer")
    await env.device("fine", "consumer")
    server = env.server()
    doomed, fine = await env.client(server, "doomed"), await env.client(server, "fine")
    assert (await doomed.get("crl"))[0] == "2.05"
    assert (await fine.get("crl"))[0] == "2.05"

    await env.store.revoke_device("doomed", now())
    assert await refused(doomed, "crl")  # on the session opened before the revocation
    await asyncio.sleep(0.5)
    assert await refused(doomed, "crl")
    again = await env.client(server, "doomed")
    with pytest.raises(NetworkError):
        await again.send(again.message(GET, "crl", transport_tuning=FastFail()))
    assert (await fine.get("crl"))[0] == "2.05"
    assert "device doomed is no longer active" in server.log()


@pytest.mark.asyncio
async def test_unknown_identity_and_wrong_key_fail_alike(env: AsEnv) -> None:
    await env.device("real", "consumer")
    server = env.server()
    assert (await (await env.client(server, "real")).get("crl"))[0] == "2.05"
    failures = []
    for device_id, psk in [("nobody", os.urandom(16)), ("real", os.urandom(16))]:
        client = await env.client(server, device_id, psk)
        request = client.message(GET, "crl", transport_tuning=FastFail())
        with pytest.raises(NetworkError) as caught:
            await client.send(request)  # no response, so no payload reached the client
        failures.append(type(caught.value))
    assert failures[0] is failures[1]

    # Plain CoAP gets nothing, neither on the DTLS port nor on the one below it.
    get_crl = bytes.fromhex("40011234") + b"\xb3crl"
    for port in (server.port, server.port - 1):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
            plain.settimeout(0.3)
            plain.connect(("127.0.0.1", port))
            plain.send(get_crl)
            with pytest.raises((TimeoutError, ConnectionRefusedError)):
                plain.recv(2048)


# --- bad input -----------------------------------------------------------------------------------


def _map(*pairs: bytes) -> bytes:
    return bytes([0xA0 + len(pairs) // 2]) + b"".join(pairs)


@pytest.mark.asyncio
async def test_malformed_and_oversized_requests_change_nothing(env: AsEnv) -> None:
    await env.device("maker", "producer")
    server = env.server()
    producer = await env.client(server, "maker")
    assert (await register(producer, "thing"))[0] == "2.01"
    changes = await env.store.changes()
    resources = await env.store.resources()

    bad_bodies: list[bytes] = [
        b"\xff\x00",  # not CBOR
        b"",  # empty
        cbor2.dumps([1, 2]),  # not a map
        cbor2.dumps({"path": "x"}),  # keys missing
        cbor2.dumps({**resource_body("x"), "extra": 1}),  # a key too many
        cbor2.dumps(resource_body("x", content_format="0")),  # text for a uint
        cbor2.dumps(resource_body("x", content_format=70000)),  # out of range
        cbor2.dumps(resource_body("x", content_format=-1)),
        cbor2.dumps(resource_body("x", content_format=True)),
        cbor2.dumps(resource_body("x", max_age=2**40)),
        cbor2.dumps(resource_body("x", rotation_period=1.5)),  # float
        cbor2.dumps(resource_body(b"x")),  # bytes for text
        cbor2.dumps(resource_body("x", profile="none")),  # no such profile
        cbor2.dumps(resource_body("")),  # empty path
        cbor2.dumps(resource_body("a//b")),
        cbor2.dumps(resource_body("../x")),
        cbor2.dumps(resource_body("x")) + b"\x00",  # trailing bytes
        b"\xbf" + cbor2.dumps("path")[0:] + cbor2.dumps("x") + b"\xff",  # indefinite map
        _map(cbor2.dumps("path"), cbor2.dumps("x"), cbor2.dumps("path"), cbor2.dumps("y")),
        b"\x81" * 40 + b"\x00",  # deep nesting
        cbor2.dumps({1: "path"}),  # integer key
    ]
    for payload in bad_bodies:
        response = await producer.send(producer.message(POST, "resources", payload=payload))
        assert response.code.dotted == "4.00", payload
        assert set(decode(response)) == {"error"}
    for payload in [b"", b"\xa0", cbor2.dumps({"csr": "text"}), cbor2.dumps({"csr": b"junk"})]:
        response = await producer.send(producer.message(POST, "cert", payload=payload))
        assert response.code.dotted == "4.00", payload

    body = cbor2.dumps(resource_body("y"))
    response = await producer.send(
        producer.message(POST, "resources", payload=body, content_format=50)
    )
    assert response.code.dotted == "4.15"
    for path in ("resources", "cert"):
        big = cbor2.dumps({"csr": os.urandom(5000)})
        response = await producer.send(producer.message(POST, path, payload=big))
        assert response.code.dotted == "4.13"
        assert decode(response) == {"error": "the payload is larger than 4096 bytes"}

    rid = "maker/thing"
    for query in [
        {"r": rid, "x": "1"},
        {"r": ""},
        {"r": "maker"},
        {"r": rid, "e": "01"},
        {"r": rid, "e": "-1"},
        {"r": rid, "e": "1" * 20},
        {"e": "1"},
    ]:
        assert (await producer.get("secret", **query))[0] == "4.00", query
    duplicate = producer.message(GET, "secret")
    duplicate.opt.uri_query = (f"r={rid}", f"r={rid}")
    assert (await producer.send(duplicate)).code.dotted == "4.00"
    with_payload = producer.message(GET, "secret", {"r": rid}, payload=b"\xa0")
    assert (await producer.send(with_payload)).code.dotted == "4.00"
    assert (await producer.get("nope"))[0] == "4.04"
    assert (await producer.call(PUT, "secret", {"r": rid}))[0] == "4.05"
    assert (await producer.call(DELETE, "resources"))[0] == "4.05"
    assert (await producer.get("crl", x="1"))[0] == "4.00"

    assert await env.store.changes() == changes
    assert await env.store.resources() == resources
    assert await env.store.certificate(device_id="maker", now=now()) is None
    code, keys = await producer.get("keys", r=rid)
    assert (code, keys["active"]["epoch"]) == ("2.05", 1)
    env.keep(keys["active"]["secret"], keys["next"]["secret"])


@pytest.mark.asyncio
async def test_sql_metacharacters_in_every_text_field_change_nothing(env: AsEnv) -> None:
    await env.device("maker", "producer")
    await env.device("eater", "consumer")
    server = env.server()
    producer, consumer = await env.client(server, "maker"), await env.client(server, "eater")
    assert (await register(producer, "thing"))[0] == "2.01"
    await env.store.add_grant("eater", "maker/*", None, now())
    changes = await env.store.changes()
    devices = await env.store.devices()
    resources = await env.store.resources()

    for body in [resource_body(EVIL), resource_body("thing", profile=EVIL)]:
        assert (await producer.call(POST, "resources", body=body))[0] == "4.00"
    for client in (producer, consumer):
        for query in [
            {"r": EVIL},
            {"r": f"maker/{EVIL}"},
            {"r": f"{EVIL}/x"},
            {"r": "maker/thing", "e": EVIL},
        ]:
            assert (await client.get("secret", **query))[0] == "4.00", query
        assert (await client.get("keys", r=EVIL))[0] == "4.00"
        assert (await client.get("cert", id=EVIL))[0] == "4.00"
        assert (await client.get("cert", kid=EVIL))[0] == "4.00"
        assert (await client.get("resources", q=EVIL))[0] == "4.00"

    assert await env.store.changes() == changes
    assert await env.store.devices() == devices
    assert await env.store.resources() == resources
    code, body = await consumer.get("secret", r="maker/thing")  # and everything still works
    assert code == "2.05"
    env.keep(body["secret"])


@pytest.mark.asyncio
async def test_rate_limit_per_identity(env: AsEnv) -> None:
    await env.device("greedy", "consumer")
    await env.device("patient", "consumer")
    server = env.server("--rate", "5", "--burst", "10")
    greedy, patient = await env.client(server, "greedy"), await env.client(server, "patient")
    codes, limited = [], None
    for _ in range(25):
        response = await greedy.send(greedy.message(GET, ".well-known/core"))
        codes.append(response.code.dotted)
        if response.code.dotted == "4.29":
            limited = response
    assert 10 <= codes.count("2.05") <= 16, codes
    assert limited is not None and limited.opt.max_age >= 1
    assert set(decode(limited)) == {"error"}
    assert (await patient.get(".well-known/core"))[0] == "2.05"
    await asyncio.sleep(0.5)  # 5 per second refill
    assert (await greedy.get(".well-known/core"))[0] == "2.05"


# --- persistence ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_restart_keeps_everything(env: AsEnv) -> None:
    await env.device("keeper", "producer")
    await env.device("reader", "consumer")
    server = env.server()
    producer, consumer = await env.client(server, "keeper"), await env.client(server, "reader")
    key = certs.generate_signing_key()
    code, issued = await producer.call(POST, "cert", body={"csr": csr_der(key, "keeper")})
    assert code == "2.01"
    assert (await register(producer, "log"))[0] == "2.01"
    await env.store.add_grant("reader", "keeper/log", None, now())
    code, before = await consumer.get("secret", r="keeper/log")
    assert code == "2.05"
    env.keep(before["secret"])
    code, keys_before = await producer.get("keys", r="keeper/log")
    env.keep(keys_before["next"]["secret"])

    for client in list(env.clients):
        await client.close()
        env.clients.remove(client)
    assert server.stop() == 0
    server.start(server.port)

    producer, consumer = await env.client(server, "keeper"), await env.client(server, "reader")
    assert await consumer.get("secret", r="keeper/log") == ("2.05", before)
    assert await producer.get("keys", r="keeper/log") == ("2.05", keys_before)
    kid = certs.key_id(key.public_key()).hex()
    assert await consumer.get("cert", kid=kid) == ("2.05", {"cert": issued["cert"]})
    assert await register(producer, "log") == ("2.04", {"resource": "keeper/log", "epoch": 1})
    assert (await env.store.verify_audit())[0]


# --- junk ----------------------------------------------------------------------------------------


def junk(port: int, sources: int) -> None:
    """Random datagrams to the DTLS port from ``sources`` distinct source ports."""
    seen: set[int] = set()
    open_sockets: list[socket.socket] = []
    try:
        while len(seen) < sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            open_sockets.append(s)
            s.bind(("127.0.0.1", 0))
            seen.add(s.getsockname()[1])
            s.sendto(os.urandom(16 + len(seen) % 64), ("127.0.0.1", port))
            if len(open_sockets) > 200:
                open_sockets.pop(0).close()
    finally:
        for s in open_sockets:
            s.close()


@pytest.mark.asyncio
async def test_junk_from_thousands_of_ports_leaves_memory_bounded(env: AsEnv) -> None:
    await env.device("steady", "consumer")
    await env.device("newcomer", "consumer")
    server = env.server("--max-connections", "128")
    steady = await env.client(server, "steady")
    assert (await steady.get("crl"))[0] == "2.05"
    junk(server.port, 1000)  # fill the table once, so the baseline includes a full one
    await asyncio.sleep(0.3)
    assert (await steady.get("crl"))[0] == "2.05"
    baseline = server.rss_kib()

    junk(server.port, 4000)
    await asyncio.sleep(0.3)
    assert (await steady.get("crl"))[0] == "2.05"
    newcomer = await env.client(server, "newcomer")
    assert (await newcomer.get("crl"))[0] == "2.05"
    grown = server.rss_kib() - baseline
    # Unbounded, the transport's table grows by about 0.7 KiB per source: 4000 sources ~ 2.8 MiB.
    assert grown < 1024, f"RSS grew by {grown} KiB"


# --- connection table: one device cannot lock the others out -------------------------------------


async def open_session(client: Client) -> Message:
    """A request on a new session of ``client``; keep the response: aiocoap's client holds a DTLS
    connection only weakly, and closes it (close_notify) once nothing refers to it any more."""
    response = await client.send(client.message(GET, "crl"))
    assert response.code.dotted == "2.05"
    return response


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("cap", "sessions"),
    [
        (8, 8),  # the whole table: the per-identity bound alone keeps room
        (3, MAX_SESSIONS_PER_IDENTITY),  # within the per-identity bound: eviction makes room
    ],
)
async def test_one_device_with_many_sessions_does_not_lock_others_out(
    env: AsEnv, cap: int, sessions: int
) -> None:
    await env.device("hog", "consumer")
    await env.device("victim", "consumer")
    server = env.server("--max-connections", str(cap))
    hogs = [await env.client(server, "hog") for _ in range(sessions)]
    held = [await open_session(hog) for hog in hogs]  # one session per source port

    victim = await env.client(server, "victim")
    started = time.monotonic()
    response = await victim.send(victim.message(GET, "crl", transport_tuning=FastFail()), 5)
    assert response.code.dotted == "2.05"
    assert time.monotonic() - started < 3
    assert (await victim.get("crl"))[0] == "2.05"
    assert (await hogs[-1].get("crl"))[0] == "2.05"  # the hog's newest session is still there
    del held  # the hog's sessions stayed open on its side until here


@pytest.mark.asyncio
async def test_sessions_per_identity_are_bounded(env: AsEnv) -> None:
    # Clients as the roles run them: with aiocoap's DTLS client repaired, a session the AS closed
    # leaves the client's pool (without it, whether the test saw the old connection object again
    # depended on whether an earlier test in the same process had applied the repair).
    assert dtls_client.apply()
    await env.device("many", "consumer")
    server = env.server()
    closed = "device many: closed 1 older session(s)"
    contexts = [await env.client(server, "many") for _ in range(MAX_SESSIONS_PER_IDENTITY + 2)]
    held = [await open_session(context) for context in contexts]  # one session per source port
    # The two oldest sessions were closed as the fifth and the sixth authenticated.
    assert server.log().count(closed) == 2

    # The newest ones are still live: a request on them needs no new handshake, so no session of
    # the device is closed for it ...
    for context in reversed(contexts[2:]):
        assert (await context.get("crl"))[0] == "2.05"
    assert server.log().count(closed) == 2
    # ... while the oldest context has to make a new session (a new DTLS connection of the
    # client: the AS's close_notify took the old one out of its pool), which closes another old one.
    response = await contexts[0].send(contexts[0].message(GET, "crl"))
    assert response.code.dotted == "2.05"
    assert response.remote is not held[0].remote
    assert server.log().count(closed) == 3


# --- limits from the security review -------------------------------------------------------------


@pytest.mark.asyncio
async def test_rotation_period_floor_epoch_range_and_quiet_debug_log(env: AsEnv) -> None:
    await env.device("fast", "producer")
    server = env.server("--log-level", "debug")
    producer = await env.client(server, "fast")
    before = await env.store.changes()
    code, body = await register(producer, "spin", rotation_period=1)
    assert code == "4.00" and "at least 60" in body["error"]
    assert await env.store.changes() == before
    assert (await register(producer, "ok", rotation_period=60))[0] == "2.01"
    # An epoch past SQLite's integers is a clear 4.00, not a 5.00 with a traceback.
    assert (await producer.get("secret", r="fast/ok", e="9999999999999999999"))[0] == "4.00"
    assert (await producer.get("secret", r="fast/ok", e=str(2**63 - 1)))[0] == "4.04"
    log = server.log()
    assert "Traceback" not in log
    assert "aiosqlite" not in log  # no statement (with its parameters) reaches the log


@pytest.mark.asyncio
async def test_an_expired_grant_shuts_the_consumer_out_while_running(env: AsEnv) -> None:
    await env.device("src", "producer")
    await env.device("brief", "consumer")
    server = env.server("--tick", "0.1")
    producer = await env.client(server, "src")
    assert (await register(producer, "r"))[0] == "2.01"
    observation = Observation(producer, "src/r")
    code, first = await observation.first()
    assert code == "2.05"
    env.keep(first["active"]["secret"], first["next"]["secret"])
    await env.store.add_grant("brief", "src/*", now() + 2, now())
    reader = await env.client(server, "brief")
    code, body = await reader.get("secret", r="src/r")
    assert code == "2.05"
    env.keep(body["secret"])
    note = await observation.next(timeout=6)  # the expiry rotates at once
    assert note["active"]["epoch"] == first["active"]["epoch"] + 1
    env.keep(note["active"]["secret"], note["next"]["secret"])
    assert (await reader.get("secret", r="src/r"))[0] == "4.03"
    assert (await reader.get("secret", r="src/r", e=str(note["active"]["epoch"])))[0] == "4.03"
    observation.cancel()
