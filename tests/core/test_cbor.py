"""The strict CBOR decoder: accepted subset, every rejection, and agreement with cbor2."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from oscar import cbor
from oscar.cbor import MalformedCBOR, Tag


@pytest.mark.parametrize(
    ("hex_", "value"),
    [
        ("00", 0),
        ("17", 23),
        ("1818", 24),
        ("1903e8", 1000),
        ("1bffffffffffffffff", 2**64 - 1),
        ("20", -1),
        ("3a00010000", -65537),
        ("3bffffffffffffffff", -(2**64)),
        ("40", b""),
        ("4401020304", b"\x01\x02\x03\x04"),
        ("60", ""),
        ("6449455446", "IETF"),
        ("80", []),
        ("83010203", [1, 2, 3]),
        ("a0", {}),
        ("a201020304", {1: 2, 3: 4}),
        ("a161616162", {"a": "b"}),
        ("d28440a0f6f6", Tag(18, [b"", {}, None, None])),
        ("f4", False),
        ("f5", True),
        ("f6", None),
    ],
)
def test_accepts_preferred_serialisation(hex_: str, value: object) -> None:
    assert cbor.loads(bytes.fromhex(hex_)) == value


@pytest.mark.parametrize(
    ("hex_", "why"),
    [
        ("", "truncated"),
        ("1817", "shortest form"),  # 23 in two bytes
        ("190017", "shortest form"),
        ("1a0000ffff", "shortest form"),
        ("1b00000000ffffffff", "shortest form"),
        ("1c", "reserved"),
        ("5f4101ff", "indefinite"),
        ("9fff", "indefinite"),
        ("bfff", "indefinite"),
        ("f7", "simple"),  # undefined
        ("f93c00", "float"),  # half float 1.0
        ("fb3ff0000000000000", "float"),
        ("f810", "simple"),
        ("4401", "truncated"),
        ("62c328", "UTF-8"),
        ("8201", "truncated"),
        ("a10102a10102", "trailing"),  # two items
        ("0000", "trailing"),
        ("a201020103", "duplicate"),
        ("a1800102", "map key"),  # array as a key
        ("a1f501", "map key"),  # true as a key
        ("9affffffff", "too many items"),  # a 4-billion-item array in 5 bytes
        ("baffffffff", "too many items"),
        ("5affffffff", "truncated"),
        ("9b00000000ffffffff", "shortest form"),
    ],
)
def test_rejects(hex_: str, why: str) -> None:
    with pytest.raises(MalformedCBOR, match=why):
        cbor.loads(bytes.fromhex(hex_))


def test_nesting_bomb_is_refused_quickly() -> None:
    bomb = b"\x81" * 100_000 + b"\x00"
    with pytest.raises(MalformedCBOR, match="deeply"):
        cbor.loads(bomb)
    tags = b"\xd8\x20" * 50_000 + b"\x00"
    with pytest.raises(MalformedCBOR, match="deeply"):
        cbor.loads(tags)


def test_item_budget_is_exact_and_declared_lengths_are_checked() -> None:
    three = bytes.fromhex("83010203")
    assert cbor.loads(three, max_items=3) == [1, 2, 3]
    with pytest.raises(MalformedCBOR, match="too many items"):
        cbor.loads(three, max_items=2)
    with pytest.raises(MalformedCBOR, match="too many items"):
        cbor.loads(bytes.fromhex("a201020304"), max_items=3)  # a map costs two per entry
    with pytest.raises(MalformedCBOR, match="truncated"):
        cbor.loads(bytes.fromhex("9affffffff"), max_items=2**40)
    with pytest.raises(ValueError):
        cbor.loads(b"\x00", max_depth=10**6)  # deeper than Python's stack allows


def test_depth_limit_is_exact() -> None:
    assert cbor.loads(b"\x81" * 3 + b"\x00", max_depth=3) == [[[0]]]
    with pytest.raises(MalformedCBOR):
        cbor.loads(b"\x81" * 4 + b"\x00", max_depth=3)


def test_non_bytes_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        cbor.loads("a0")  # type: ignore[arg-type]


def test_diagnostic_notation() -> None:
    value = cbor.loads(bytes.fromhex("d28443a10126a1044231314454686973f6"))
    assert cbor.diagnostic(value) == "18([h'a10126', {4: h'3131'}, h'54686973', null])"
    nested = {1: [1, {"a": b"\x00"}], 2: 'x"y'}
    assert cbor.diagnostic(nested) == '{1: [1, {"a": h\'00\'}], 2: "x\\"y"}'
    assert cbor.diagnostic(nested, indent=2).splitlines()[0] == "{"


# Values in the accepted subset, for round trips against cbor2.
_leaves = (
    st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.booleans()
    | st.none()
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.integers(-1000, 1000) | st.text(max_size=5), inner, max_size=5)
        # Tags cbor2 gives no meaning of its own, so it hands them back untouched (not 40,000
        # to 50,000: cbor2 6.3 reads tag 43000 as a complex number; none of 60,000 to 70,000
        # means anything to it, checked one by one)
        | st.builds(Tag, st.integers(min_value=60_000, max_value=70_000), inner)
    ),
    max_leaves=30,
)


def _plain(value: object) -> object:
    """Both libraries' values as plain nested lists, dicts and ("tag", n, value) triples."""
    if isinstance(value, (Tag, cbor2.CBORTag)):
        return ("tag", value.tag, _plain(value.value))
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _as_cbor2(value: object) -> object:
    if isinstance(value, Tag):
        return cbor2.CBORTag(value.tag, _as_cbor2(value.value))
    if isinstance(value, list):
        return [_as_cbor2(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_cbor2(v) for k, v in value.items()}
    return value


@given(_values)
def test_round_trip_and_agreement_with_cbor2(value: object) -> None:
    encoded = cbor.dumps(value)
    assert cbor.loads(encoded, max_depth=64) == value
    # An independent decoder reads the same value from our encoding ...
    assert _plain(cbor2.loads(encoded)) == _plain(value)
    # ... and an independent encoder writes the same bytes.
    assert cbor2.dumps(_as_cbor2(value)) == encoded


def test_encoder_rejects_what_it_cannot_write() -> None:
    with pytest.raises(TypeError):
        cbor.dumps(1.5)
    with pytest.raises(ValueError):
        cbor.dumps(2**64)
    assert cbor.dumps(-(2**64)) == bytes.fromhex("3bffffffffffffffff")


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_malformed(data: bytes) -> None:
    # Valid CBOR decodes; anything else must be MalformedCBOR, never another exception.
    with contextlib.suppress(MalformedCBOR):
        cbor.loads(data)
