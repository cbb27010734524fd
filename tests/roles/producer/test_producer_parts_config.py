"""Parts in a producer's configuration and key state (issue 19): a TOML ``[[resource.part]]`` table
loads, every bad declaration is one clear :class:`ConfigError`, and the ``/keys`` parts round-trip
through :class:`KeyState` while a single-part state stays as it was; each part switches epochs at
its own boundary by the producer's clock (:class:`producer.partkeys.PartEpochs`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oscar.keys import AccessSecret
from oscar_io.aswire import EpochKey, KeyState, PartKeys
from oscar_io.errors import AsError
from producer import PartSpec, ResourceSpec, load_config
from producer.config import ConfigError
from producer.partkeys import PartEpochs

HEAD = 'bundle = "b.json"\nstate = "st"\nlisten = "127.0.0.1:5683"\n[[resource]]\npath = "vitals"\n'


def part(name: str, kind: str = "encrypted", extra: str = "") -> str:
    return f'[[resource.part]]\nname = "{name}"\nkind = "{kind}"\n{extra}'


def test_a_multi_part_resource_loads_from_toml(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        HEAD
        + part("summary", "plain", 'file = "summary.txt"\n')
        + part("measurements", extra='file = "m.json"\n')
        + part("gps", extra="content_format = 60\n")
    )
    spec = load_config(tmp_path / "p.toml").resources[0]
    assert spec.parts == (
        PartSpec("summary", "plain", tmp_path / "summary.txt", 0),
        PartSpec("measurements", "encrypted", tmp_path / "m.json", 50),  # guessed: JSON
        PartSpec("gps", "encrypted", None, 60),
    )


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (part("summary", "plain"), "at least one part must be encrypted"),
        (part("a") + part("a"), "two parts have the same name"),
        ("".join(part(f"p{i}") for i in range(17)), "at most 16 parts"),
        (part("-bad"), "part '-bad': a part name is 1 to 32 characters"),
        (part("a", "secret"), "part 'a': kind is plain or encrypted"),
        (part("a", extra="colour = 1\n"), "unknown key"),
        (part("a", extra="content_format = 70000\n"), "content_format is a whole number"),
        ('[[resource.part]]\nkind = "plain"\n', "needs a name"),
    ],
)
def test_a_bad_part_declaration_is_one_clear_error(
    tmp_path: Path, parts: str, message: str
) -> None:
    (tmp_path / "p.toml").write_text(HEAD + parts)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(tmp_path / "p.toml")
    assert "\n" not in str(caught.value)


def test_a_resource_with_parts_takes_no_value_of_its_own() -> None:
    with pytest.raises(ConfigError, match="takes its values per part"):
        ResourceSpec("vitals", file=Path("v.txt"), parts=(PartSpec("m"),))
    with pytest.raises(ConfigError, match="takes its values per part"):
        ResourceSpec("vitals", command=("read",), parts=(PartSpec("m"),))


def key(epoch: int, at: int | None = 100) -> EpochKey:
    return EpochKey(epoch, AccessSecret(bytes([epoch]) * 32), at)


def test_key_states_with_parts_round_trip_and_single_part_ones_are_unchanged() -> None:
    single = KeyState("s/v", "ccm-es256", 60, key(1), key(2, None))
    assert "parts" not in single.to_cbor()
    assert KeyState.from_cbor(single.to_cbor()) == single
    parts = (
        PartKeys("summary", "plain"),
        PartKeys("measurements", "encrypted", key(3), key(4, None)),
    )
    multi = single._replace(parts=parts)
    doc = multi.to_cbor()
    assert doc["parts"][0] == {"name": "summary", "kind": "plain"}
    assert doc["parts"][1]["active"]["epoch"] == 3 and doc["parts"][1]["next"]["epoch"] == 4
    assert KeyState.from_cbor(doc) == multi
    stored = multi._replace(parts=(parts[0], parts[1]._replace(next=None)))  # switched alone
    assert KeyState.from_cbor(stored.to_cbor(), next_required=False) == stored
    for bad in ([], [{"name": "m", "kind": "other"}], [{"name": "m", "kind": "encrypted"}]):
        with pytest.raises(AsError, match="malformed key state"):
            KeyState.from_cbor(single.to_cbor() | {"parts": bad})


def test_each_part_switches_at_its_own_boundary_and_seals_nothing_past_the_last() -> None:
    specs = (PartSpec("summary", "plain"), PartSpec("m"), PartSpec("gps"))
    keys = PartEpochs("s/v", specs, 10)
    values = {"summary": b"s", "m": b"m", "gps": b"g"}
    assert keys.parts(values, 100) is None and not keys.may_seal(100)  # no keys yet
    state = KeyState(
        "s/v", "ccm-es256", 10, key(1), key(2, None),
        (PartKeys("summary", "plain"), PartKeys("m", "encrypted", key(3, 100), key(4, None)),
         PartKeys("gps", "encrypted", key(7, 105), key(8, None))),
    )  # fmt: skip
    assert keys.received(state)
    assert not keys.received(state)  # the same epochs again: no re-seal
    sealed = keys.parts(values, 109)
    assert sealed is not None
    assert [(p.name, p.epoch) for p in sealed] == [("summary", None), ("m", 3), ("gps", 7)]
    assert keys.parts({"m": b"m", "gps": b"g"}, 109) is None  # a part without a value
    assert keys.reached(110)  # m's boundary (100 + 10); gps's is 115
    sealed = keys.parts(values, 110)
    assert sealed is not None and [p.epoch for p in sealed] == [None, 4, 7]
    assert keys.reached(115) and keys.may_seal(115)
    assert not keys.reached(120)  # m's epoch 4 ended and no next secret is known
    assert keys.parts(values, 120) is None and not keys.may_seal(120)
    assert [p.next for p in keys.record()] == [None, None, None]

    other = state._replace(parts=state.parts[1:])  # the AS has other parts: fail closed
    assert not keys.received(other)
    assert keys.parts(values, 120) is None and keys.record() == ()
