"""Write ``oscar-parts.json``: fixed, whole multi-part OSCAR objects (docs/PROTOCOL.md,
"Multi-part objects").

Run from the repository root::

    .venv/bin/python tests/vectors/make_oscar_parts_vectors.py          # (re)write the file
    .venv/bin/python tests/vectors/make_oscar_parts_vectors.py --check  # exit 1 if it differs

As for the single-part vectors (``make_oscar_vectors.py``, whose reference helpers and test keys
this reuses), every object is made twice: by ``oscar.parts.seal_parts`` and by the *reference*
below, written from the documented layout with cbor2 and cryptography primitives only; they must
agree byte for byte, and the reference must verify oscar's object and open every encrypted part
before anything is written. ``tests/core/test_parts_vectors.py`` loads this module for the
reference only and never writes the file.

The reference part of this module imports nothing from ``oscar``; only :func:`generate` does.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec, ed25519


def _single_part_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_oscar_vectors", Path(__file__).with_name("make_oscar_vectors.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


single = _single_part_reference()

OUTPUT = Path(__file__).parent / "oscar-parts.json"

PRODUCER_ID = "ward-7"
RESOURCE_ID = "ward-7/bed-12"
IAT = single.IAT
EXP = IAT + 300
PARTS_LABEL = -65539
PLAIN, ENCRYPTED = 0, 1


def part_secret(name: str) -> bytes:
    """SHA-256("OSCAR test vector part secret: <name>"): a test secret per audience."""
    return hashlib.sha256(f"OSCAR test vector part secret: {name}".encode()).digest()


# (name, profile, signing key, seq, parts); a part is (name, content format, plaintext, epoch or
# None for a plain part)
PartSpec = tuple[str, int, bytes, int | None]
SPECS: list[tuple[str, str, str, int, list[PartSpec]]] = [
    (
        "ccm-es256-three-parts",
        "ccm-es256",
        "p256",
        10,
        [
            ("status", 0, b"stable", None),
            ("measurements", 50, b'{"hr":72,"spo2":97}', 4),
            ("location", 0, b"ward 7, bed 12", 2),
        ],
    ),
    (
        "a128gcm-eddsa-three-parts",
        "a128gcm-eddsa",
        "ed25519",
        11,
        [
            ("status", 0, b"stable", None),
            ("measurements", 50, b'{"hr":74,"spo2":96}', 4),
            ("location", 0, b"ward 7, bed 12", 3),
        ],
    ),
    # One encrypted part and nothing else: the smallest multi-part object.
    ("chacha20-es256-one-part", "chacha20-es256", "p256", 70_000, [("data", 0, b"21.5 C", 0)]),
    # An empty encrypted part (the ciphertext is the bare tag) before an empty plain one.
    (
        "a256gcm-eddsa-empty-parts",
        "a256gcm-eddsa",
        "ed25519",
        0,
        [("measurements", 50, b"", 1), ("note", 0, b"", None)],
    ),
]


# --- the reference: the documented layout with cbor2 + cryptography only ------------------------


def ref_part_keys(
    secret: bytes, resource_id: str, part: str, epoch: int, aead_id: int
) -> tuple[bytes, bytes]:
    """(content_key, base_iv) of a part: HKDF-SHA256 with the part labels and name in the info."""
    key_length, nonce_length, _ = single.REF_AEADS[aead_id]
    key_info = cbor2.dumps(["OSCAR part key", resource_id, part, epoch, aead_id, key_length])
    iv_info = cbor2.dumps(["OSCAR part iv", resource_id, part, epoch, aead_id, nonce_length])
    return single.ref_hkdf(secret, key_info, key_length), single.ref_hkdf(
        secret, iv_info, nonce_length
    )


def ref_part_external_aad(
    producer_id: str, resource_id: str, epoch: int, seq: int, part: str
) -> bytes:
    return cbor2.dumps([producer_id, resource_id, epoch, seq, part])


def ref_part_intermediates(
    secret: bytes, producer_id: str, resource_id: str, part: str, epoch: int, seq: int, aead_id: int
) -> dict[str, bytes]:
    key, base_iv = ref_part_keys(secret, resource_id, part, epoch, aead_id)
    return {
        "content_key": key,
        "base_iv": base_iv,
        "nonce": single.ref_nonce(base_iv, seq),
        "external_aad": ref_part_external_aad(producer_id, resource_id, epoch, seq, part),
    }


def ref_descriptor(name: str, content_format: int, epoch: int | None) -> list[Any]:
    if epoch is None:
        return [name, PLAIN, content_format]
    return [name, ENCRYPTED, content_format, epoch]


def ref_seal_parts(
    *,
    parts: list[PartSpec],
    secrets: dict[str, bytes],
    producer_id: str,
    resource_id: str,
    seq: int,
    iat: int,
    exp: int,
    signing_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    aead_id: int,
) -> bytes:
    items: list[Any] = []
    for name, content_format, plaintext, epoch in parts:
        if epoch is None:
            items.append(plaintext)
            continue
        inter = ref_part_intermediates(
            secrets[name], producer_id, resource_id, name, epoch, seq, aead_id
        )
        enc_protected = cbor2.dumps({1: aead_id, 3: content_format}, canonical=True)
        aad = cbor2.dumps(["Encrypt0", enc_protected, inter["external_aad"]])
        ciphertext = single.REF_AEADS[aead_id][2](inter["content_key"]).encrypt(
            inter["nonce"], plaintext, aad
        )
        items.append(
            cbor2.CBORTag(
                single.ENCRYPT0_TAG,
                [enc_protected, {6: single.ref_partial_iv(seq)}, ciphertext],
            )
        )
    alg = (
        single.ES256_ID if isinstance(signing_key, ec.EllipticCurvePrivateKey) else single.EDDSA_ID
    )
    header = {
        1: alg,
        4: single.ref_kid(signing_key.public_key()),
        15: {1: producer_id, 2: resource_id, 6: iat, 4: exp},
        -65538: seq,
        PARTS_LABEL: [ref_descriptor(n, cf, e) for n, cf, _, e in parts],
    }
    protected = cbor2.dumps(header, canonical=True)
    payload = cbor2.dumps(items)
    signature = single.ref_sign(signing_key, cbor2.dumps(["Signature1", protected, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(single.SIGN1_TAG, [protected, {}, payload, signature]))


def ref_open_parts(
    data: bytes,
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    secrets: dict[str, bytes],
) -> tuple[dict[str, bytes], list[str], dict[str, Any]]:
    """Verify the signature, then open the plain parts and the encrypted parts ``secrets`` has a
    secret for: (plaintexts by name, names not granted, header facts). AssertionError or a
    cryptography exception on any failure; this is test code, not a consumer."""
    outer = cbor2.loads(data)
    assert isinstance(outer, cbor2.CBORTag) and outer.tag == single.SIGN1_TAG
    protected, unprotected, payload, signature = outer.value
    assert unprotected == {}
    header = cbor2.loads(protected)
    assert set(header) == {1, 4, 15, -65538, PARTS_LABEL}
    assert header[4] == single.ref_kid(public_key)
    single.ref_verify(
        public_key, header[1], signature, cbor2.dumps(["Signature1", protected, b"", payload])
    )
    claims = header[15]
    producer_id, resource_id, seq = claims[1], claims[2], header[-65538]
    descriptors = header[PARTS_LABEL]
    items = cbor2.loads(payload)
    assert len(items) == len(descriptors)
    opened: dict[str, bytes] = {}
    not_granted: list[str] = []
    for descriptor, item in zip(descriptors, items, strict=True):
        name, kind, content_format = descriptor[0], descriptor[1], descriptor[2]
        if kind == PLAIN:
            assert len(descriptor) == 3 and isinstance(item, bytes)
            opened[name] = item
            continue
        assert kind == ENCRYPTED and len(descriptor) == 4
        epoch = descriptor[3]
        assert isinstance(item, cbor2.CBORTag) and item.tag == single.ENCRYPT0_TAG
        enc_protected, enc_unprotected, ciphertext = item.value
        enc_header = cbor2.loads(enc_protected)
        assert enc_header[3] == content_format
        assert enc_unprotected == {6: single.ref_partial_iv(seq)}
        if name not in secrets:
            not_granted.append(name)
            continue
        aead_id = enc_header[1]
        inter = ref_part_intermediates(
            secrets[name], producer_id, resource_id, name, epoch, seq, aead_id
        )
        aad = cbor2.dumps(["Encrypt0", enc_protected, inter["external_aad"]])
        opened[name] = single.REF_AEADS[aead_id][2](inter["content_key"]).decrypt(
            inter["nonce"], ciphertext, aad
        )
    facts = {
        "producer_id": producer_id,
        "resource_id": resource_id,
        "seq": seq,
        "iat": claims[6],
        "exp": claims[4],
        "signature_algorithm": header[1],
        "parts": [list(d) for d in descriptors],
    }
    return opened, not_granted, facts


# --- the generator (the only part that uses oscar) ----------------------------------------------


def generate() -> dict[str, Any]:
    import oscar
    from oscar.keys import ContentKeys
    from oscar.parts import Part, part_external_aad, seal_parts

    keys = single.signing_keys()
    vectors = []
    for name, profile_name, key_name, seq, specs in SPECS:
        signing_key = keys[key_name]
        profile = oscar.PROFILES[profile_name]
        aead_id = single.ref_aead_id(profile_name)
        secrets = {n: part_secret(n) for n, _, _, e in specs if e is not None}
        common = {
            "producer_id": PRODUCER_ID,
            "resource_id": RESOURCE_ID,
            "seq": seq,
            "iat": IAT,
            "exp": EXP,
            "signing_key": signing_key,
        }
        parts = [
            Part(n, pt, cf, None if e is None else oscar.AccessSecret(secrets[n]), e)
            for n, cf, pt, e in specs
        ]
        sealed = seal_parts(parts=parts, profile=profile, **common)
        reference = ref_seal_parts(parts=specs, secrets=secrets, aead_id=aead_id, **common)
        if sealed != reference:
            raise SystemExit(f"{name}: oscar.parts.seal_parts and the reference disagree")
        opened, not_granted, _ = ref_open_parts(sealed, signing_key.public_key(), secrets)
        assert not_granted == [] and opened == {n: pt for n, _, pt, _ in specs}

        records = []
        for n, cf, pt, e in specs:
            record: dict[str, Any] = {
                "name": n,
                "content_format": cf,
                "epoch": e,
                "plaintext_hex": pt.hex(),
            }
            if e is not None:
                inter = ref_part_intermediates(
                    secrets[n], PRODUCER_ID, RESOURCE_ID, n, e, seq, aead_id
                )
                derived = ContentKeys.derive_part(
                    oscar.AccessSecret(secrets[n]), RESOURCE_ID, n, e, profile.aead
                )
                assert (derived.key, derived.base_iv) == (
                    inter["content_key"],
                    inter["base_iv"],
                )
                assert derived.nonce(seq) == inter["nonce"]
                assert (
                    part_external_aad(PRODUCER_ID, RESOURCE_ID, e, seq, n)
                    == (inter["external_aad"])
                )
                record.update(
                    {
                        "access_secret_hex": secrets[n].hex(),
                        "content_key_hex": inter["content_key"].hex(),
                        "base_iv_hex": inter["base_iv"].hex(),
                        "nonce_hex": inter["nonce"].hex(),
                        "external_aad_hex": inter["external_aad"].hex(),
                    }
                )
            records.append(record)
        vectors.append(
            {
                "name": name,
                "profile": profile_name,
                "signing_key": key_name,
                "producer_id": PRODUCER_ID,
                "resource_id": RESOURCE_ID,
                "seq": seq,
                "iat": IAT,
                "exp": EXP,
                "kid_hex": single.ref_kid(signing_key.public_key()).hex(),
                "parts": records,
                "object_hex": sealed.hex(),
            }
        )
    return {
        "description": (
            "Whole multi-part OSCAR objects (docs/PROTOCOL.md, 'Multi-part objects'). Made by "
            "make_oscar_parts_vectors.py; oscar.parts.seal_parts and an independent reference "
            "(cbor2 + cryptography only) agree byte for byte. Test keys only: the signing keys "
            "are those of oscar-objects.json, each part secret is SHA-256 of "
            "'OSCAR test vector part secret: <part name>'."
        ),
        "vectors": vectors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the file, write nothing")
    args = parser.parse_args(argv)
    text = json.dumps(generate(), indent=2, ensure_ascii=False) + "\n"
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} differs from what the generator makes", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(SPECS)} vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
