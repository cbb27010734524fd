"""The AS's envelope encryption (:mod:`authz_server.envelope`) is OSCAR's one at-rest recipe
(:class:`oscar_io.sealing.Sealer`), byte for byte the format the AS always stored: what an older
AS wrote opens, what this one writes opens the old way, and a failure is the module's own
:class:`VaultError` with its old messages (never the Sealer's error)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authz_server.envelope import KEY_LENGTH, Envelope, VaultError
from oscar_io.sealing import Sealer

CONTEXT = b"psk\x00sensor-1"


def old_seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """The AS's own AES-GCM before it used the Sealer (authz_server/vault.py, ``_seal``)."""
    nonce = os.urandom(12)
    return b"\x01" + nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def old_open(key: bytes, blob: bytes, context: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[1:13], blob[13:], context)


def test_what_an_older_as_stored_opens_and_the_other_way_round() -> None:
    master = os.urandom(KEY_LENGTH)
    data_key = os.urandom(KEY_LENGTH)
    wrapped = old_seal(master, data_key, b"OSCAR data key")  # an older database's data key
    envelope = Envelope(master, wrapped)
    assert envelope._data_key == data_key
    assert envelope.decrypt(old_seal(data_key, b"psk bytes", CONTEXT), CONTEXT) == b"psk bytes"
    blob = envelope.encrypt(b"secret", CONTEXT)
    assert blob[:1] == b"\x01" and len(blob) == 1 + 12 + len(b"secret") + 16
    assert old_open(data_key, blob, CONTEXT) == b"secret"
    assert Sealer(data_key).open(blob, CONTEXT) == b"secret"  # the one recipe
    assert old_open(master, Envelope.new_wrapped_data_key(master), b"OSCAR data key")


def test_failures_are_vault_errors_with_the_old_messages() -> None:
    master = os.urandom(KEY_LENGTH)
    envelope = Envelope(master, Envelope.new_wrapped_data_key(master))
    blob = envelope.encrypt(b"secret", CONTEXT)
    for bad in (blob[:20], b"\x02" + blob[1:], b""):
        with pytest.raises(VaultError, match=r"^a stored secret is malformed$"):
            envelope.decrypt(bad, CONTEXT)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    for bad, context in ((flipped, CONTEXT), (blob, b"psk\x00sensor-2")):
        with pytest.raises(VaultError, match="does not decrypt") as caught:
            envelope.decrypt(bad, context)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(VaultError, match="does not decrypt"):  # another master key
        Envelope(os.urandom(KEY_LENGTH), Envelope.new_wrapped_data_key(master))
    assert "redacted" in repr(envelope)
