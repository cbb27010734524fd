"""``oscar-as parts`` and the ``--part`` forms of ``grant``, ``revoke`` and ``grants``: what they
change, what they print (never a secret), and bad input as one line that changes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_as_cli import ERROR_LINE, Cli

from authz_server.store import Resource, Store

RID = "sensor-1/vitals"


@pytest.fixture
def parted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    cli = Cli(capsys, tmp_path / "state")
    cli.ok("init")
    cli.enroll("producer", "sensor-1")
    cli.enroll("consumer", "clinician")
    cli.enroll("consumer", "operator")
    resource = Resource(RID, "sensor-1", 0, "ccm-es256", 60, 0, int(time.time()))
    cli.store(lambda s: s.register_resource(resource))
    return cli


def part_secrets(cli: Cli) -> list[bytes]:
    async def body(store: Store) -> list[bytes]:
        return [e.secret for e in await store.parts.live_epochs(RID) if e.secret]

    return cli.store(body)


def test_declare_grant_revoke_and_list_parts(parted: Cli) -> None:
    out = parted.ok(
        "parts", "--resource", RID, "--declare", "summary=plain", "measurements=encrypted",
        "location=encrypted",
    ).out  # fmt: skip
    assert (
        out
        == f"declared parts of {RID}: summary=plain, measurements=encrypted, location=encrypted\n"
    )
    listed = json.loads(parted.ok("parts", "--resource", RID, "--json").out)
    assert [(p["name"], p["kind"]) for p in listed] == [
        ("summary", "plain"), ("measurements", "encrypted"), ("location", "encrypted"),
    ]  # fmt: skip
    assert listed[1]["epochs"] == [[1, "active"], [2, "pre-active"]] and listed[0]["epochs"] == []
    out = parted.ok("grant", "--consumer", "clinician", "--resource", RID, "--part", "measurements")
    assert out.out == f"granted clinician {RID} part measurements\n"
    parted.ok("grant", "--consumer", "operator", "--resource", RID, "--part", "location")
    grants = json.loads(parted.ok("grants", "--json").out)
    assert [(g["consumer_id"], g["part"], g["status"]) for g in grants] == [
        ("clinician", "measurements", "active"), ("operator", "location", "active"),
    ]  # fmt: skip
    table = parted.ok("grants").out
    assert "PART" in table and "measurements" in table
    secrets = part_secrets(parted)
    out = parted.ok(
        "revoke", "--consumer", "clinician", "--resource", RID, "--part", "measurements"
    )
    assert out.out == (
        f"revoked clinician's grant of {RID} part measurements; rotated: {RID}#measurements\n"
    )
    listed = json.loads(parted.ok("parts", "--resource", RID, "--json").out)
    assert listed[1]["epochs"] == [[1, "deactivated"], [2, "active"], [3, "pre-active"]]
    assert listed[2]["epochs"] == [[1, "active"], [2, "pre-active"]]  # location: untouched
    out = parted.ok("rotate", "--resource", RID, "--part", "location")
    assert out.out == f"rotated {RID} part location: epoch 2 active\n"
    listed = json.loads(parted.ok("parts", "--resource", RID, "--json").out)
    assert listed[2]["epochs"] == [[1, "deactivated"], [2, "active"], [3, "pre-active"]]
    assert listed[1]["epochs"][-1] == [3, "pre-active"]  # measurements: untouched
    out = parted.ok("compromise", "--resource", RID, "--part", "location", "--epoch", "3")
    assert out.out == f"{RID} part location: epoch 3 compromised; epoch 2 active\n"
    listed = json.loads(parted.ok("parts", "--resource", RID, "--json").out)
    assert listed[2]["epochs"] == [
        [1, "deactivated"], [2, "active"], [3, "compromised"], [4, "pre-active"],
    ]  # fmt: skip
    out = parted.ok("compromise", "--resource", RID, "--part", "location")  # the active one
    assert out.out == f"{RID} part location: epoch 2 compromised; epoch 4 active\n"
    # No output of any of these held a secret; the audit names the part, not a secret.
    audit = parted.ok("audit", "--json").out
    assert "revoke-part" in audit and "grant-part" in audit and "declare-parts" in audit
    for secret in secrets + part_secrets(parted):
        assert secret.hex() not in audit and secret.hex() not in table


@pytest.mark.parametrize(
    "argv",
    [
        ("parts", "--resource", RID, "--declare", "a=secret"),
        ("parts", "--resource", RID, "--declare", "a"),
        ("parts", "--resource", RID, "--declare", "a=plain"),  # no encrypted part
        ("parts", "--resource", RID, "--declare", "a=encrypted", "a=plain"),
        ("parts", "--resource", RID, "--declare", "-a=encrypted"),
        ("parts", "--resource", "not a resource", "--declare", "a=encrypted"),
        ("parts", "--resource", "sensor-1/none", "--declare", "a=encrypted"),
        ("grant", "--consumer", "clinician", "--resource", RID, "--part", "a b"),
        ("grant", "--consumer", "clinician", "--resource", RID, "--part", "nope"),
        ("grant", "--consumer", "clinician", "--resource", RID, "--part", "summary"),  # plain
        ("grant", "--consumer", "clinician", "--resource", "sensor-1/*", "--part", "location"),
        ("grant", "--consumer", "sensor-1", "--resource", RID, "--part", "location"),
        ("grant", "--consumer", "clinician", "--resource", RID, "--part", "location",
         "--until", "2100-01-01T00:00:00Z"),
        ("revoke", "--consumer", "clinician", "--resource", RID, "--part", "location"),
        ("revoke", "--consumer", "clinician", "--part", "location"),
        ("revoke", "--device", "clinician", "--part", "location"),
        ("rotate", "--resource", RID, "--part", "summary"),  # plain: no secret to rotate
        ("rotate", "--resource", RID, "--part", "nope"),
        ("rotate", "--due", "--part", "location"),
        ("compromise", "--resource", RID, "--part", "summary"),
        ("compromise", "--resource", RID, "--part", "location", "--epoch", "9"),
    ],
)  # fmt: skip
def test_bad_part_commands_are_one_line_and_change_nothing(
    parted: Cli, argv: tuple[str, ...]
) -> None:
    parted.ok("parts", "--resource", RID, "--declare", "summary=plain", "location=encrypted")
    before = parted.snapshot(), part_secrets(parted)
    result = parted.run(*argv)
    assert result.code in (1, 2) and ERROR_LINE.fullmatch(result.err), result
    assert result.out == ""
    assert (parted.snapshot(), part_secrets(parted)) == before
