"""Fixed whole-object vectors (``vectors/oscar-objects.json``) against oscar and a reference.

The file is made by ``vectors/make_oscar_vectors.py``; this test never regenerates it. Each vector
is checked twice: with oscar (``seal`` reproduces the object byte for byte, ``open`` returns the
plaintext, ``ContentKeys.derive`` gives the recorded key, IV and nonce) and with the generator's
reference implementation of DESIGN §4, which uses cbor2 and cryptography only.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

import oscar
from oscar.keys import ContentKeys
from oscar.objects import external_aad

VECTORS = Path(__file__).parents[1] / "vectors"
FILE: dict[str, Any] = json.loads((VECTORS / "oscar-objects.json").read_text(encoding="utf-8"))
CASES = [pytest.param(v, id=v["name"]) for v in FILE["vectors"]]


def _load_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_oscar_vectors", VECTORS / "make_oscar_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def _signing_key(vector: dict[str, Any]) -> Any:
    pem = FILE["signing_keys"][vector["signing_key"]]["private_key_pem"]
    return serialization.load_pem_private_key(pem.encode("ascii"), password=None)


def _hex(vector: dict[str, Any], name: str) -> bytes:
    return bytes.fromhex(vector[f"{name}_hex"])


def _secret(vector: dict[str, Any]) -> oscar.AccessSecret:
    return oscar.AccessSecret(_hex(vector, "access_secret"))


def _seal_arguments(vector: dict[str, Any]) -> dict[str, Any]:
    return {
        "producer_id": vector["producer_id"],
        "resource_id": vector["resource_id"],
        "epoch": vector["epoch"],
        "seq": vector["seq"],
        "iat": vector["iat"],
        "exp": vector["exp"],
        "content_format": vector["content_format"],
        "plaintext": _hex(vector, "plaintext"),
        "signing_key": _signing_key(vector),
    }


def test_file_covers_every_profile_and_the_edge_cases() -> None:
    vectors = FILE["vectors"]
    assert {v["profile"] for v in vectors} == set(oscar.PROFILES)
    assert any(v["seq"] >= 1 << 16 and len(v["partial_iv_hex"]) > 4 for v in vectors)
    assert any(v["plaintext_hex"] == "" for v in vectors)
    assert {v["content_format"] for v in vectors} == {0, 50}
    # No (key, nonce) pair repeats inside the file either.
    pairs = [(v["content_key_hex"], v["nonce_hex"]) for v in vectors]
    assert len(set(pairs)) == len(pairs)


def test_reference_imports_nothing_from_oscar() -> None:
    # The cross-check is only worth something if the reference is independent of the library.
    for value in vars(reference).values():
        module = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        assert not str(module).startswith("oscar"), value


@pytest.mark.parametrize("vector", CASES)
def test_seal_reproduces_the_object(vector: dict[str, Any]) -> None:
    sealed = oscar.seal(
        secret=_secret(vector),
        profile=oscar.PROFILES[vector["profile"]],
        **_seal_arguments(vector),
    )
    assert sealed.hex() == vector["object_hex"]


@pytest.mark.parametrize("vector", CASES)
def test_open_returns_the_plaintext(vector: dict[str, Any]) -> None:
    key = _signing_key(vector)
    secret = _secret(vector)

    def secrets(resource_id: str, epoch: int) -> oscar.AccessSecret | None:
        return secret if (resource_id, epoch) == (vector["resource_id"], vector["epoch"]) else None

    reading = oscar.open(
        _hex(vector, "object"), secrets=secrets, signer=key.public_key(), now=vector["iat"]
    )
    assert reading.plaintext == _hex(vector, "plaintext")
    m = reading.metadata
    profile = oscar.PROFILES[vector["profile"]]
    assert (m.producer_id, m.resource_id) == (vector["producer_id"], vector["resource_id"])
    assert (m.epoch, m.seq, m.iat, m.exp) == (
        vector["epoch"],
        vector["seq"],
        vector["iat"],
        vector["exp"],
    )
    assert m.content_format == vector["content_format"]
    assert (m.aead, m.signature_algorithm) == (profile.aead, profile.signature)
    assert m.kid == _hex(vector, "kid")


@pytest.mark.parametrize("vector", CASES)
def test_open_rejects_a_flipped_byte(vector: dict[str, Any]) -> None:
    # The last byte is in the signature; the middle one is in the signed header or payload.
    data = bytearray(_hex(vector, "object"))
    secret = _secret(vector)
    for index in (len(data) - 1, len(data) // 2):
        tampered = bytearray(data)
        tampered[index] ^= 0x01
        with pytest.raises(oscar.InvalidObject):
            oscar.open(
                bytes(tampered),
                secrets=lambda _rid, _epoch: secret,
                signer=_signing_key(vector).public_key(),
                now=vector["iat"],
            )


@pytest.mark.parametrize("vector", CASES)
def test_oscar_derivation_matches_the_file(vector: dict[str, Any]) -> None:
    aead = oscar.PROFILES[vector["profile"]].aead
    keys = ContentKeys.derive(_secret(vector), vector["resource_id"], vector["epoch"], aead)
    assert keys.key == _hex(vector, "content_key")
    assert keys.base_iv == _hex(vector, "base_iv")
    assert keys.nonce(vector["seq"]) == _hex(vector, "nonce")
    aad = external_aad(vector["producer_id"], vector["resource_id"], vector["epoch"], vector["seq"])
    assert aad == _hex(vector, "external_aad")


@pytest.mark.parametrize("vector", CASES)
def test_reference_derivation_matches_the_file(vector: dict[str, Any]) -> None:
    parts = reference.ref_intermediates(
        _hex(vector, "access_secret"),
        vector["producer_id"],
        vector["resource_id"],
        vector["epoch"],
        vector["seq"],
        reference.ref_aead_id(vector["profile"]),
    )
    for name in ("content_key", "base_iv", "partial_iv", "nonce", "external_aad"):
        assert parts[name] == _hex(vector, name), name
    assert reference.ref_kid(_signing_key(vector).public_key()) == _hex(vector, "kid")


@pytest.mark.parametrize("vector", CASES)
def test_reference_opens_and_rebuilds_the_object(vector: dict[str, Any]) -> None:
    key = _signing_key(vector)
    plaintext, metadata = reference.ref_open(
        _hex(vector, "object"), key.public_key(), _hex(vector, "access_secret")
    )
    assert plaintext == _hex(vector, "plaintext")
    profile = oscar.PROFILES[vector["profile"]]
    assert metadata == {
        "producer_id": vector["producer_id"],
        "resource_id": vector["resource_id"],
        "epoch": vector["epoch"],
        "seq": vector["seq"],
        "iat": vector["iat"],
        "exp": vector["exp"],
        "content_format": vector["content_format"],
        "aead": profile.aead.cose_id,
        "signature_algorithm": profile.signature.cose_id,
    }
    rebuilt = reference.ref_seal(
        secret=_hex(vector, "access_secret"),
        aead_id=reference.ref_aead_id(vector["profile"]),
        **_seal_arguments(vector),
    )
    assert rebuilt.hex() == vector["object_hex"]
