"""A resource's parts through a running AS (one process, SQLite, DTLS): the producer registers
parts and reads every part's secret from ``/keys``; a consumer granted one part gets that part's
secret with :meth:`AsClient.secret` (``part=``) and 4.03 for the others; no secret in a log or the
database (:func:`as_harness.as_env` checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from as_harness import as_env, now

from oscar_io.errors import AccessDenied

RID = "sensor-1/vitals"


@pytest.mark.asyncio
async def test_a_consumer_reads_only_its_part_through_a_running_as(tmp_path: Path) -> None:
    async with as_env(tmp_path) as env:
        await env.device("sensor-1", "producer")
        await env.device("clinician", "consumer")
        server = env.server()
        producer = await env.as_client(server, "sensor-1")
        body = {"path": "vitals", "content_format": 0, "profile": "ccm-es256", "max_age": 60}
        body |= {"rotation_period": 3600}
        body["parts"] = [["summary", "plain"], ["measurements", "encrypted"], ["gps", "encrypted"]]
        reply = await producer.call("POST", "resources", None, body)
        assert reply["resource"] == RID
        keys = await producer.call("GET", "keys", {"r": RID})
        parts = {p["name"]: p for p in keys["parts"]}
        assert set(parts) == {"summary", "measurements", "gps"}
        env.keep(*(p[w]["secret"] for p in keys["parts"][1:] for w in ("active", "next")))
        await env.store.parts.grant("clinician", RID, "measurements", now())
        consumer = await env.as_client(server, "clinician")
        grant = await consumer.secret(RID, part="measurements")
        assert grant.epoch == 1 and grant.secret.value == parts["measurements"]["active"]["secret"]
        with pytest.raises(AccessDenied):
            await consumer.secret(RID, part="gps")
        with pytest.raises(AccessDenied):
            await consumer.secret(RID)  # the resource's own secret: not granted either
