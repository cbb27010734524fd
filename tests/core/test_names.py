"""Device and resource id grammar: what is accepted, and the tricks that are not."""

from __future__ import annotations

import pytest

from oscar import names


@pytest.mark.parametrize("good", ["sensor-1", "a", "A.b_c-9", "x" * 32, "0day"])
def test_device_ids(good: str) -> None:
    assert names.is_device_id(good)
    assert names.require_device_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "x" * 33, "-lead", ".hidden", "a/b", "a b", "a;DROP TABLE", "ä", "a\x00", "a\n", 7, None],
)
def test_bad_device_ids(bad: object) -> None:
    assert not names.is_device_id(bad)
    with pytest.raises(ValueError, match="device id"):
        names.require_device_id(bad)


@pytest.mark.parametrize("good", ["sensor-1/t", "sensor-1/a/b.c/~d", "s/" + "x" * 253])
def test_resource_ids(good: str) -> None:
    assert names.is_resource_id(good)


@pytest.mark.parametrize(
    "bad",
    [
        "sensor-1",
        "sensor-1/",
        "sensor-1//t",
        "sensor-1/t/",
        "sensor-1/../sensor-2/t",
        "sensor-1/./t",
        "sensor-1/a b",
        "sensor-1/a'--",
        "sensor-1/a%2f",
        "/t",
        "s/" + "x" * 254,
        b"sensor-1/t",
    ],
)
def test_bad_resource_ids(bad: object) -> None:
    assert not names.is_resource_id(bad)
    with pytest.raises(ValueError, match="resource id"):
        names.require_resource_id(bad)


def test_ownership_splits_one_way_only() -> None:
    assert names.owns("sensor-1", "sensor-1/t")
    assert not names.owns("sensor-1", "sensor-10/t")
    assert not names.owns("a/b", "a/b/c")
