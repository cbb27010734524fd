"""Target ``object_open``: :func:`oscar.verify` and :func:`oscar.open` with a fixed key and secret.

Contract (oscar/objects.py): any failing check raises :class:`~oscar.InvalidObject` and nothing
else. The first input byte picks a mode; in the odd modes the target re-signs a decodable object
with the fixed key, so that the checks after the signature (times, freshness, the secret lookup,
decryption) see fuzzed values too. A successful open returns bytes and records the object as the
newest, so opening it again is refused.
"""

from __future__ import annotations

import contextlib

from oscar import FreshnessState, InvalidObject, ProtectedObject, open, verify
from oscar.cose import Sign1

from ._common import expect
from ._objects import ED_KEY, ES_KEY, ES_SIGNER, NOW, SECRET, sealed, signer_for

__all__ = ["TestOneInput", "seeds"]


def _resign(data: bytes) -> bytes:
    try:
        obj = ProtectedObject.from_bytes(data)
    except InvalidObject:
        return data
    key = ES_KEY if obj.metadata.kid == ES_SIGNER.kid else ED_KEY
    algorithm = obj.metadata.signature_algorithm
    try:
        signature = algorithm.sign(key, Sign1.to_be_signed(obj.sign1.protected, obj.sign1.payload))
    except (TypeError, ValueError):  # the key is not of the labelled algorithm
        return data
    return obj.sign1._replace(signature=signature).to_bytes()


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, data = data[0], data[1:]
    if mode & 1:
        data = _resign(data)
    now = NOW + ((mode >> 3) - 16) * 300  # some inputs are not yet valid, some expired

    def signer(producer_id: str, kid: bytes) -> object:
        return signer_for(kid) if mode & 2 else None

    def secrets(resource_id: str, epoch: int) -> object:
        return None if epoch == 7 else SECRET

    with contextlib.suppress(InvalidObject):
        verify(data, signer=signer_for(data[8:16]) if mode & 4 else signer, now=now)  # type: ignore[arg-type]
    freshness = FreshnessState()
    try:
        reading = open(
            data,
            secrets=secrets,  # type: ignore[arg-type]
            signer=signer,  # type: ignore[arg-type]
            now=now,
            freshness=freshness,
        )
    except InvalidObject:
        return
    expect(type(reading.plaintext) is bytes, "open returned something other than bytes")
    m = reading.metadata
    expect(freshness.newest(m.resource_id) == (m.epoch, m.seq), "open did not record freshness")
    try:
        open(data, secrets=secrets, signer=signer, now=now, freshness=freshness)  # type: ignore[arg-type]
    except InvalidObject:
        return
    raise AssertionError("a replayed object was opened twice")


def seeds() -> list[bytes]:
    return [bytes([mode]) + obj for obj in sealed() for mode in (0x80, 0x83, 0x86)]
