"""Fixed multi-part vectors (``vectors/oscar-parts.json``) against oscar and two independent
implementations: the generator's reference (cbor2 + cryptography only, written from the
documented layout) and pycose, which verifies the one signature and decrypts a part with the key
our derivation gives.

The file is made by ``vectors/make_oscar_parts_vectors.py``; this test never regenerates it.
pycose's traps are those of ``tests/core/test_interop.py``'s docstring: its ``CoseMessage.decode``
fails with cbor2 6, so messages are built with ``from_cose_obj`` after checking the tag here; it
has no ChaCha20/Poly1305; and it drops a nonce's leading zero bytes, so a nonce starting with one
is handed to it whole as the IV.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import cbor2
import pytest
from cose import headers as cose_headers
from cose.algorithms import A128GCM, AESCCM1664128, EdDSA, Es256
from cose.keys import EC2Key, OKPKey, SymmetricKey
from cose.keys.curves import P256, Ed25519
from cose.keys.keyparam import KpBaseIV
from cose.messages import Enc0Message, Sign1Message
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import oscar
from oscar.keys import ContentKeys
from oscar.parts import MultiPartObject, Part, part_external_aad, seal_parts
from oscar.partsopening import open_parts

VECTORS = Path(__file__).parents[1] / "vectors"
FILE: dict[str, Any] = json.loads((VECTORS / "oscar-parts.json").read_text(encoding="utf-8"))
KEYS: dict[str, Any] = json.loads((VECTORS / "oscar-objects.json").read_text(encoding="utf-8"))[
    "signing_keys"
]
CASES = [pytest.param(v, id=v["name"]) for v in FILE["vectors"]]


def _load_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_oscar_parts_vectors", VECTORS / "make_oscar_parts_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def _signing_key(vector: dict[str, Any]) -> Any:
    pem = KEYS[vector["signing_key"]]["private_key_pem"]
    return serialization.load_pem_private_key(pem.encode("ascii"), password=None)


def _secrets(vector: dict[str, Any]) -> dict[str, bytes]:
    return {
        p["name"]: bytes.fromhex(p["access_secret_hex"])
        for p in vector["parts"]
        if p["epoch"] is not None
    }


def _parts(vector: dict[str, Any]) -> list[Part]:
    secrets = _secrets(vector)
    return [
        Part(
            p["name"],
            bytes.fromhex(p["plaintext_hex"]),
            p["content_format"],
            None if p["epoch"] is None else oscar.AccessSecret(secrets[p["name"]]),
            p["epoch"],
        )
        for p in vector["parts"]
    ]


def _common(vector: dict[str, Any]) -> dict[str, Any]:
    return {
        "producer_id": vector["producer_id"],
        "resource_id": vector["resource_id"],
        "seq": vector["seq"],
        "iat": vector["iat"],
        "exp": vector["exp"],
        "signing_key": _signing_key(vector),
    }


def test_file_covers_both_signatures_every_aead_and_the_edge_cases() -> None:
    vectors = FILE["vectors"]
    profiles = {oscar.PROFILES[v["profile"]] for v in vectors}
    assert {p.signature.name for p in profiles} == {"ES256", "EdDSA"}
    assert {p.aead.name for p in profiles} == {a.name for a in oscar.algorithms.AEADS.values()}
    parts = [p for v in vectors for p in v["parts"]]
    assert any(p["epoch"] is None for p in parts) and any(p["plaintext_hex"] == "" for p in parts)
    assert any(len(v["parts"]) == 1 for v in vectors)
    # No (key, nonce) pair repeats in the file.
    pairs = [(p["content_key_hex"], p["nonce_hex"]) for p in parts if p["epoch"] is not None]
    assert len(set(pairs)) == len(pairs)


def test_reference_imports_nothing_from_oscar() -> None:
    for module in (reference, reference.single):
        for value in vars(module).values():
            name = getattr(value, "__module__", None) or getattr(value, "__name__", "")
            assert not str(name).startswith("oscar"), value


@pytest.mark.parametrize("vector", CASES)
def test_seal_parts_reproduces_the_object(vector: dict[str, Any]) -> None:
    sealed = seal_parts(
        parts=_parts(vector), profile=oscar.PROFILES[vector["profile"]], **_common(vector)
    )
    assert sealed.hex() == vector["object_hex"]


@pytest.mark.parametrize("vector", CASES)
def test_open_parts_returns_each_granted_part(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["object_hex"])
    secrets = _secrets(vector)
    key = _signing_key(vector)
    everyone = [p["name"] for p in vector["parts"]]
    encrypted = [p["name"] for p in vector["parts"] if p["epoch"] is not None]
    # Every subset of one encrypted part granted, and all of them.
    for granted in [[name] for name in encrypted] + [encrypted]:

        def lookup(
            resource_id: str, part: str, epoch: int, granted: list[str] = granted
        ) -> oscar.AccessSecret | None:
            return oscar.AccessSecret(secrets[part]) if part in granted else None

        reading = open_parts(data, secrets=lookup, signer=key.public_key(), now=vector["iat"])
        assert [p.name for p in reading.parts] == [
            n for n in everyone if n not in encrypted or n in granted
        ]
        assert list(reading.not_granted) == [n for n in encrypted if n not in granted]
        for record in vector["parts"]:
            part = reading.part(record["name"])
            if part is not None:
                assert part.plaintext.hex() == record["plaintext_hex"]
                assert (part.content_format, part.epoch) == (
                    record["content_format"],
                    record["epoch"],
                )
    assert reading.metadata.kid.hex() == vector["kid_hex"]


@pytest.mark.parametrize("vector", CASES)
def test_oscar_and_reference_derivations_match_the_file(vector: dict[str, Any]) -> None:
    aead = oscar.PROFILES[vector["profile"]].aead
    for p in vector["parts"]:
        if p["epoch"] is None:
            continue
        secret = bytes.fromhex(p["access_secret_hex"])
        args = (vector["producer_id"], vector["resource_id"], p["name"], p["epoch"], vector["seq"])
        ref = reference.ref_part_intermediates(secret, *args, aead.cose_id)
        keys = ContentKeys.derive_part(
            oscar.AccessSecret(secret), vector["resource_id"], p["name"], p["epoch"], aead
        )
        ours = {
            "content_key": keys.key,
            "base_iv": keys.base_iv,
            "nonce": keys.nonce(vector["seq"]),
            "external_aad": part_external_aad(
                vector["producer_id"], vector["resource_id"], p["epoch"], vector["seq"], p["name"]
            ),
        }
        for name in ("content_key", "base_iv", "nonce", "external_aad"):
            assert ours[name].hex() == ref[name].hex() == p[f"{name}_hex"], name


@pytest.mark.parametrize("vector", CASES)
def test_reference_verifies_opens_and_rebuilds_the_object(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["object_hex"])
    key = _signing_key(vector)
    secrets = _secrets(vector)
    opened, not_granted, facts = reference.ref_open_parts(data, key.public_key(), secrets)
    assert not_granted == []
    assert opened == {p["name"]: bytes.fromhex(p["plaintext_hex"]) for p in vector["parts"]}
    assert facts["parts"] == [
        reference.ref_descriptor(p["name"], p["content_format"], p["epoch"])
        for p in vector["parts"]
    ]
    assert facts["signature_algorithm"] == oscar.PROFILES[vector["profile"]].signature.cose_id
    # Nobody granted: the reference reads the plain parts only, as oscar does.
    plain, refused, _ = reference.ref_open_parts(data, key.public_key(), {})
    assert set(plain) == {p["name"] for p in vector["parts"] if p["epoch"] is None}
    assert refused == [p["name"] for p in vector["parts"] if p["epoch"] is not None]
    specs = [
        (p["name"], p["content_format"], bytes.fromhex(p["plaintext_hex"]), p["epoch"])
        for p in vector["parts"]
    ]
    rebuilt = reference.ref_seal_parts(
        parts=specs,
        secrets=secrets,
        aead_id=oscar.PROFILES[vector["profile"]].aead.cose_id,
        **_common(vector),
    )
    assert rebuilt.hex() == vector["object_hex"]


def test_the_generator_would_write_the_file_unchanged() -> None:
    assert json.loads(json.dumps(reference.generate())) == FILE


# --- pycose ------------------------------------------------------------------------------------


def _cose_key(private: Any) -> EC2Key | OKPKey:
    public = private.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        n = public.public_numbers()
        return EC2Key(crv=P256, x=n.x.to_bytes(32, "big"), y=n.y.to_bytes(32, "big"))
    assert isinstance(public, ed25519.Ed25519PublicKey)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return OKPKey(crv=Ed25519, x=raw)


PYCOSE = [
    pytest.param("ccm-es256-three-parts", Es256, AESCCM1664128, id="es256-aes-ccm"),
    pytest.param("a128gcm-eddsa-three-parts", EdDSA, A128GCM, id="eddsa-a128gcm"),
]


@pytest.mark.parametrize(("name", "signature", "aead"), PYCOSE)
def test_pycose_verifies_the_one_signature_and_decrypts_each_part(
    name: str, signature: type, aead: type
) -> None:
    vector = next(v for v in FILE["vectors"] if v["name"] == name)
    data = bytes.fromhex(vector["object_hex"])
    key = _signing_key(vector)

    outer = cbor2.loads(data)
    assert isinstance(outer, cbor2.CBORTag) and outer.tag == 18
    items = list(outer.value)
    sign1 = Sign1Message.from_cose_obj(list(items), True)
    assert sign1.get_attr(cose_headers.Algorithm) is signature
    assert sign1.phdr_encoded == items[0]  # pycose verifies over its re-encoding: the same bytes
    assert sign1.phdr[-65539] == [
        reference.ref_descriptor(p["name"], p["content_format"], p["epoch"])
        for p in vector["parts"]
    ]
    assert -65537 not in sign1.phdr and sign1.phdr[-65538] == vector["seq"]
    sign1.key = _cose_key(key)
    assert sign1.verify_signature()

    payload = cbor2.loads(sign1.payload)
    assert len(payload) == len(vector["parts"])
    for record, item in zip(vector["parts"], payload, strict=True):
        if record["epoch"] is None:
            assert item == bytes.fromhex(record["plaintext_hex"])
            continue
        assert isinstance(item, cbor2.CBORTag) and item.tag == 16
        enc0 = Enc0Message.from_cose_obj(list(item.value), True)
        assert enc0.get_attr(cose_headers.Algorithm) is aead
        assert enc0.get_attr(cose_headers.ContentType) == record["content_format"]
        keys = ContentKeys.derive_part(
            oscar.AccessSecret(bytes.fromhex(record["access_secret_hex"])),
            vector["resource_id"],
            record["name"],
            record["epoch"],
            oscar.algorithms.aead_for(aead.identifier),
        )
        enc0.key = SymmetricKey(k=keys.key, optional_params={KpBaseIV: keys.base_iv})
        nonce = keys.nonce(vector["seq"])
        if nonce[0] == 0:
            enc0.uhdr_update({cose_headers.IV: nonce})
        enc0.external_aad = bytes.fromhex(record["external_aad_hex"])
        assert enc0.decrypt() == bytes.fromhex(record["plaintext_hex"])
        # The part name is bound: the same ciphertext under another part's AAD does not open.
        enc0.external_aad = cbor2.dumps(
            [vector["producer_id"], vector["resource_id"], record["epoch"], vector["seq"], "x"]
        )
        with pytest.raises(InvalidTag):
            enc0.decrypt()

    # A flipped bit anywhere in the payload (here: in the first part) fails pycose's check too.
    tampered = bytearray(data)
    tampered[data.index(bytes.fromhex(vector["parts"][0]["plaintext_hex"]))] ^= 0x01
    bad = Sign1Message.from_cose_obj(list(cbor2.loads(bytes(tampered)).value), True)
    bad.key = sign1.key
    assert not bad.verify_signature()


def test_oscar_decoder_reads_what_pycose_reads() -> None:
    """Both decoders agree on the descriptors of every vector (a decoding cross-check)."""
    for vector in FILE["vectors"]:
        ours = MultiPartObject.from_bytes(bytes.fromhex(vector["object_hex"])).metadata
        theirs = Sign1Message.from_cose_obj(
            list(cbor2.loads(bytes.fromhex(vector["object_hex"])).value), True
        ).phdr[-65539]
        assert [list(d.to_cbor()) for d in ours.parts] == theirs
