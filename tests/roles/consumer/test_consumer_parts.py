"""``Consumer.get_parts`` (issue 19) against a running AS and a CoAP stand-in producer: a consumer
granted one part opens it and the plain part, learns which it could not open, keeps its part
secret encrypted at rest across a restart, and refuses an older object and a tampered one."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from as_harness import as_env, now
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from proxy_harness import StandIn

from consumer import Consumer, StaleCopy
from consumer.cli import main
from oscar import AccessSecret, Part, certs, profile_by_name, seal_parts
from oscar.errors import InvalidObject
from oscar_io.bundle import Bundle

RID = "sensor-1/vitals"


@pytest.mark.asyncio
async def test_a_consumer_opens_the_parts_it_is_granted_and_learns_the_others(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    async with as_env(tmp_path) as env:
        await env.device("sensor-1", "producer")
        await env.device("clinician", "consumer")
        server = env.server()
        producer = await env.as_client(server, "sensor-1")
        key = certs.generate_signing_key()
        csr = certs.make_csr(key, "sensor-1").public_bytes(serialization.Encoding.DER)
        await producer.request_certificate(csr)
        body = {"path": "vitals", "content_format": 0, "profile": "a128gcm-es256", "max_age": 60}
        body |= {"rotation_period": 3600}
        body["parts"] = [["summary", "plain"], ["measurements", "encrypted"], ["gps", "encrypted"]]
        await producer.call("POST", "resources", None, body)
        keys = await producer.call("GET", "keys", {"r": RID})
        held = {p["name"]: p["active"] for p in keys["parts"] if p["kind"] == "encrypted"}
        env.keep(*(p["secret"] for p in held.values()))
        await env.store.parts.grant("clinician", RID, "measurements", now())

        def sealed(seq: int, vitals: bytes = b"HR 72") -> bytes:
            t = now()
            return seal_parts(
                parts=[
                    Part("summary", b"ward 3", 0),
                    Part("measurements", vitals, 0,
                         secret=AccessSecret(held["measurements"]["secret"]),
                         epoch=held["measurements"]["epoch"]),
                    Part("gps", b"52.37,4.89", 0, secret=AccessSecret(held["gps"]["secret"]),
                         epoch=held["gps"]["epoch"]),
                ],
                producer_id="sensor-1", resource_id=RID, seq=seq, iat=t, exp=t + 600,
                signing_key=key, profile=profile_by_name("a128gcm-es256"),
            )  # fmt: skip

        standin = await StandIn().start()
        resource = standin.resource(RID)
        ca = (env.state / "ca.pem").read_bytes()
        bundle = Bundle(
            "clinician", "consumer", server.uri, "clinician", env.psks["clinician"],
            x509.load_pem_x509_certificate(ca),
        )  # fmt: skip
        uri = f"coap://127.0.0.1:{standin.port}/{RID}"
        state = tmp_path / "clinician"
        try:
            resource.serve(sealed(10), max_age=60)
            async with Consumer(bundle, state) as consumer:
                reading = await consumer.get_parts(uri)
                assert reading.part("measurements").plaintext == b"HR 72"  # type: ignore[union-attr]
                assert reading.part("summary").plaintext == b"ward 3"  # type: ignore[union-attr]
                assert reading.not_granted == ("gps",)
                assert reading.part("gps") is None
                resource.serve(sealed(9), max_age=60)  # older than the one accepted
                with pytest.raises(StaleCopy):
                    await consumer.get_parts(uri)
                forged = bytearray(sealed(11))
                forged[-70] ^= 1  # a byte of the last part: the signature no longer holds
                resource.serve(bytes(forged), max_age=60)
                with pytest.raises(InvalidObject):
                    await consumer.get_parts(uri)
            # the command line: one JSON line, the parts in order, the others named
            bundle_file = tmp_path / "clinician.json"
            doc = {"id": "clinician", "role": "consumer", "as_uri": server.uri,
                   "psk_identity": "clinician", "psk_hex": env.psks["clinician"].hex(),
                   "ca_cert_pem": ca.decode()}  # fmt: skip
            fd = os.open(bundle_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, json.dumps(doc).encode())
            os.close(fd)
            resource.serve(sealed(11), max_age=60)
            argv = ["--bundle", str(bundle_file), "--state", str(tmp_path / "cli"), "parts", uri]
            assert await asyncio.to_thread(main, argv) == 0
            line = json.loads(capsysbinary.readouterr().out)
            assert [p["name"] for p in line["parts"]] == ["summary", "measurements"]
            assert line["parts"][1]["value"] == "HR 72" and line["not_granted"] == ["gps"]
            assert line["seq"] == 11 and line["resource"] == RID
            on_disk = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())
            assert held["measurements"]["secret"] not in on_disk  # kept, encrypted at rest
            await asyncio.to_thread(server.stop)
            resource.serve(sealed(13, b"HR 80"), max_age=60)
            async with Consumer(bundle, state) as again:  # the AS is away: the secret is kept
                reading = await again.get_parts(uri)
                assert reading.part("measurements").plaintext == b"HR 80"  # type: ignore[union-attr]
                assert reading.metadata.seq == 13
                assert reading.not_granted == ("gps",)  # unknown now: not opened, not a failure
        finally:
            await standin.close()
