"""The proxy's budget of certificate lookups (proxy/lookups.py) while every AS is busy: a lookup
the AS client would not send (a 5.03 whose Max-Age has not passed) spends no budget and says
when to ask again. In memory: the real AS client, not started (nothing is sent)."""

from __future__ import annotations

import time

import pytest
from cryptography import x509

from oscar import certs
from oscar_io.asclient import AsClient
from oscar_io.bundle import Bundle
from oscar_io.errors import AsUnavailable
from proxy.lookups import BudgetedAs, LookupBudget, origin

A, B = "coaps://as-a.example", "coaps://as-b.example"


def ca() -> x509.Certificate:
    now = int(time.time())
    key = certs.generate_signing_key("ES256")
    return certs.make_ca_certificate(key, "CA", serial=5, not_before=now, not_after=now + 60)


@pytest.mark.asyncio
async def test_no_budget_is_spent_while_every_as_is_busy() -> None:
    client = AsClient(Bundle("cloud-1", "proxy", A, "cloud-1", bytes(16), ca(), (A, B)))
    budget = LookupBudget(per_origin=1, total=10)
    lookups = BudgetedAs(client, budget)
    client.failover.busy(0, 2, "5.03")
    assert client.busy_for() is None  # B may still be asked
    client.failover.busy(1, 3, "5.03")
    assert client.busy_for() == 2.0
    token = origin.set("fetched from attacker.example")
    try:
        for _ in range(3):
            with pytest.raises(AsUnavailable) as caught:
                await lookups.certificate(kid=bytes(8))
            assert caught.value.retry_after == 2.0
        assert budget.refused == 0
        assert budget.take("fetched from attacker.example")  # its one token is still there
    finally:
        origin.reset(token)
