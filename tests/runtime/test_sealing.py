"""The one at-rest recipe (oscar_io.sealing) and the state files built on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from oscar import cbor
from oscar_io.errors import StateError
from oscar_io.sealing import OVERHEAD, VERSION, Sealer, SealError
from oscar_io.statefiles import SealedFile

KEY = bytes(range(32))


def test_round_trip_and_layout() -> None:
    sealer = Sealer(KEY)
    blob = sealer.seal(b"reading", b"ctx")
    assert blob[:1] == VERSION == b"\x01"
    assert len(blob) == len(b"reading") + OVERHEAD
    # The layout is the documented one: version, nonce, AES-256-GCM with the context as AAD.
    assert AESGCM(KEY).decrypt(blob[1:13], blob[13:], b"ctx") == b"reading"
    assert sealer.open(blob, b"ctx") == b"reading"
    assert sealer.seal(b"reading", b"ctx") != blob  # a fresh nonce each time


@pytest.mark.parametrize("damage", ["context", "key", "flipped", "truncated", "version", "empty"])
def test_one_opaque_error(damage: str) -> None:
    blob = Sealer(KEY).seal(b"secret value", b"ctx")
    sealer, context = Sealer(KEY), b"ctx"
    if damage == "context":
        context = b"other"
    elif damage == "key":
        sealer = Sealer(bytes(32))
    elif damage == "flipped":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    elif damage == "truncated":
        blob = blob[:20]
    elif damage == "version":
        blob = b"\x02" + blob[1:]
    else:
        blob = b""
    with pytest.raises(SealError) as caught:
        sealer.open(blob, context, legacy=True)
    assert str(caught.value) == "does not open"


def test_legacy_form_opens_only_when_asked() -> None:
    nonce = os.urandom(12)
    old = nonce + AESGCM(KEY).encrypt(nonce, b"old state", b"ctx")
    assert Sealer(KEY).open(old, b"ctx", legacy=True) == b"old state"
    if old[:1] != VERSION:  # (1 in 256: the random nonce starts like a versioned blob)
        with pytest.raises(SealError):
            Sealer(KEY).open(old, b"ctx")


def test_key_length_and_repr() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Sealer(b"short")
    assert KEY.hex() not in repr(Sealer(KEY))
    assert repr(Sealer(KEY)) == "Sealer(<key hidden>)"


def test_state_file_of_an_earlier_release_loads_and_is_rewritten(tmp_path: Path) -> None:
    """A producer's sequence state written before the recipe was shared must still load: losing
    it would risk a nonce reused after an upgrade."""
    path = tmp_path / "seq.state"
    aad = cbor.dumps(["OSCAR state file", "seq"])
    nonce = os.urandom(12)
    path.write_bytes(nonce + AESGCM(KEY).encrypt(nonce, cbor.dumps({"next": 41}), aad))
    path.chmod(0o600)
    state = SealedFile(path, KEY, "seq")
    assert state.load() == {"next": 41}
    state.save({"next": 42})
    assert path.read_bytes()[:1] == VERSION
    assert SealedFile(path, KEY, "seq").load() == {"next": 42}
    with pytest.raises(StateError, match="fails authentication"):
        SealedFile(path, KEY, "other label").load()
