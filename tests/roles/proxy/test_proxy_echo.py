"""The proxy's Echo values (oscar_io/echo.py) across the instances of one proxy identity (issue 16):
what one instance issues, another with the same key accepts, for the same address, within the
lifetime by the wall clock (the instances' monotonic clocks have nothing in common); another
key, another address or an old value proves nothing."""

from __future__ import annotations

import pytest

from oscar_io.echo import ECHO_LIFETIME, ECHO_SIZE, AddressCheck

KEY = bytes(range(32))
ADDRESS, OTHER = "192.0.2.7:5683", "192.0.2.8:5683"


class Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_instance_accepts_what_another_of_the_same_identity_issued() -> None:
    wall = Wall(1_800_000_000.0)
    a = AddressCheck(key=KEY, clock=lambda: 5.0, wall=wall)
    b = AddressCheck(key=KEY, clock=lambda: 98_765.0, wall=wall)  # another process's monotonic
    echo = a.challenge(ADDRESS)
    assert len(echo) == ECHO_SIZE
    assert not b.is_verified(ADDRESS)
    assert not b.prove(OTHER, echo)  # made for another address
    assert b.prove(ADDRESS, echo) and b.is_verified(ADDRESS)
    assert not a.is_verified(ADDRESS)  # what B verified, B remembers (per instance)
    stranger = AddressCheck(key=bytes(32), wall=wall)  # another proxy identity
    assert not stranger.prove(ADDRESS, a.challenge(ADDRESS))
    own = AddressCheck(wall=wall)  # no key given: one of its own
    assert not own.prove(ADDRESS, a.challenge(ADDRESS))
    assert own.prove(ADDRESS, own.challenge(ADDRESS))


def test_a_value_lives_its_lifetime_by_the_wall_clock_on_every_instance() -> None:
    issued, checked = Wall(1_800_000_000.0), Wall(1_800_000_000.0)
    a = AddressCheck(key=KEY, wall=issued)
    b = AddressCheck(key=KEY, wall=checked)
    echo = a.challenge(ADDRESS)
    checked.now += ECHO_LIFETIME  # the last second it is good
    assert b.prove(ADDRESS, echo)
    late = AddressCheck(key=KEY, wall=Wall(checked.now + 1))
    assert not late.prove(ADDRESS, echo)


def test_an_echo_key_is_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        AddressCheck(key=bytes(16))
