"""Write ``oscar-objects.json``: fixed, whole OSCAR protected objects, one per security profile.

Run from the repository root::

    .venv/bin/python tests/vectors/make_oscar_vectors.py          # (re)write the file
    .venv/bin/python tests/vectors/make_oscar_vectors.py --check  # exit 1 if the file differs

Every object is made twice: by ``oscar.seal``, and by the *reference* below, written straight from
DESIGN §4 with cbor2 and cryptography primitives only. The two must agree byte for byte, and the
reference must open oscar's object (raw signature verification, then raw AEAD decryption) before
anything is written. ES256 signs deterministically (RFC 6979) and Ed25519 is deterministic, so the
objects are fixed. ``tests/core/test_oscar_vectors.py`` loads this module for the reference only and
never writes the file.

The reference part of this module imports nothing from ``oscar``; only :func:`generate` does.

Header map order is not fixed by DESIGN §4; the reference uses RFC 8949 §4.2 deterministic
encoding (``canonical=True``), which is the order oscar documents for its headers too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

OUTPUT = Path(__file__).parent / "oscar-objects.json"

# --- fixed inputs ------------------------------------------------------------------------------

#: The P-256 private key of RFC 6979 Appendix A.2.5, a published test key.
P256_SCALAR_HEX = "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721"
#: The Ed25519 secret key of RFC 8032 §7.1, TEST 1, a published test key.
ED25519_SEED_HEX = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
#: SHA-256("OSCAR test vector access secret").
ACCESS_SECRET_HEX = "8ade5c6c8d5b536dee20869c39a751376ca7894d0611c6b2ac180f3ad3fcc6ca"

PRODUCER_ID = "sensor-1"
RESOURCE_ID = "sensor-1/temperature"
IAT = 1_767_225_600  # 2026-01-01T00:00:00Z
EXP = IAT + 300
TEXT_PLAIN, APPLICATION_JSON = 0, 50
TEXT = b"21.5 C"
JSON = b'{"t":21.5,"u":"Cel"}'

# (name, profile, signing key, epoch, seq, content format, plaintext)
SPECS: list[tuple[str, str, str, int, int, int, bytes]] = [
    ("ccm-es256", "ccm-es256", "p256", 3, 1, TEXT_PLAIN, TEXT),
    ("ccm-eddsa", "ccm-eddsa", "ed25519", 3, 2, APPLICATION_JSON, JSON),
    ("a128gcm-es256", "a128gcm-es256", "p256", 3, 3, TEXT_PLAIN, TEXT),
    ("a128gcm-eddsa", "a128gcm-eddsa", "ed25519", 3, 4, APPLICATION_JSON, JSON),
    ("a256gcm-es256", "a256gcm-es256", "p256", 3, 5, TEXT_PLAIN, TEXT),
    ("a256gcm-eddsa", "a256gcm-eddsa", "ed25519", 3, 6, APPLICATION_JSON, JSON),
    ("chacha20-es256", "chacha20-es256", "p256", 3, 7, TEXT_PLAIN, TEXT),
    ("chacha20-eddsa", "chacha20-eddsa", "ed25519", 3, 8, APPLICATION_JSON, JSON),
    # A three-byte Partial IV (70000 = 0x011170).
    ("ccm-es256-seq70000", "ccm-es256", "p256", 3, 70_000, TEXT_PLAIN, TEXT),
    # Nothing to encrypt: the ciphertext is the bare AEAD tag.
    ("a128gcm-eddsa-empty", "a128gcm-eddsa", "ed25519", 3, 9, TEXT_PLAIN, b""),
    # Epoch 0, seq 0: the Partial IV is still one byte, h'00'.
    ("ccm-es256-seq0", "ccm-es256", "p256", 0, 0, TEXT_PLAIN, TEXT),
]


def signing_keys() -> dict[str, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey]:
    return {
        "p256": ec.derive_private_key(int(P256_SCALAR_HEX, 16), ec.SECP256R1()),
        "ed25519": ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(ED25519_SEED_HEX)),
    }


def private_key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


# --- the reference: DESIGN §4 with cbor2 + cryptography only -----------------------------------

# COSE id -> (key length, nonce length, AEAD constructor)
REF_AEADS: dict[int, tuple[int, int, Any]] = {
    10: (16, 13, lambda key: AESCCM(key, tag_length=8)),  # AES-CCM-16-64-128
    1: (16, 12, AESGCM),  # A128GCM
    3: (32, 12, AESGCM),  # A256GCM
    24: (32, 12, ChaCha20Poly1305),  # ChaCha20/Poly1305
}
REF_AEAD_OF_PROFILE = {"ccm": 10, "a128gcm": 1, "a256gcm": 3, "chacha20": 24}
ES256_ID, EDDSA_ID = -7, -8
SIGN1_TAG, ENCRYPT0_TAG = 18, 16


def ref_aead_id(profile: str) -> int:
    return REF_AEAD_OF_PROFILE[profile.split("-")[0]]


def ref_hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"", info=info).derive(ikm)


def ref_content_keys(
    secret: bytes, resource_id: str, epoch: int, aead_id: int
) -> tuple[bytes, bytes]:
    """(content_key, base_iv) of DESIGN §4 "Key derivation"."""
    key_length, nonce_length, _ = REF_AEADS[aead_id]
    key_info = cbor2.dumps(["OSCAR key", resource_id, epoch, aead_id, key_length])
    iv_info = cbor2.dumps(["OSCAR iv", resource_id, epoch, aead_id, nonce_length])
    return ref_hkdf(secret, key_info, key_length), ref_hkdf(secret, iv_info, nonce_length)


def ref_partial_iv(seq: int) -> bytes:
    length = 1
    while seq >= 1 << (8 * length):
        length += 1
    return seq.to_bytes(length, "big")


def ref_nonce(base_iv: bytes, seq: int) -> bytes:
    padded = ref_partial_iv(seq).rjust(len(base_iv), b"\x00")
    return bytes(a ^ b for a, b in zip(base_iv, padded, strict=True))


def ref_external_aad(producer_id: str, resource_id: str, epoch: int, seq: int) -> bytes:
    return cbor2.dumps([producer_id, resource_id, epoch, seq])


def ref_kid(public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> bytes:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:8]


def ref_sign(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, tbs: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        der = key.sign(tbs, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return key.sign(tbs)


def ref_verify(
    key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    alg: int,
    signature: bytes,
    tbs: bytes,
) -> None:
    """Raises cryptography's InvalidSignature (or AssertionError) if the signature is not good."""
    assert len(signature) == 64
    if alg == ES256_ID:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        key.verify(encode_dss_signature(r, s), tbs, ec.ECDSA(hashes.SHA256()))
    else:
        assert alg == EDDSA_ID
        assert isinstance(key, ed25519.Ed25519PublicKey)
        key.verify(signature, tbs)


def ref_intermediates(
    secret: bytes, producer_id: str, resource_id: str, epoch: int, seq: int, aead_id: int
) -> dict[str, bytes]:
    key, base_iv = ref_content_keys(secret, resource_id, epoch, aead_id)
    return {
        "content_key": key,
        "base_iv": base_iv,
        "partial_iv": ref_partial_iv(seq),
        "nonce": ref_nonce(base_iv, seq),
        "external_aad": ref_external_aad(producer_id, resource_id, epoch, seq),
    }


def ref_seal(
    *,
    secret: bytes,
    producer_id: str,
    resource_id: str,
    epoch: int,
    seq: int,
    iat: int,
    exp: int,
    content_format: int,
    plaintext: bytes,
    signing_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    aead_id: int,
) -> bytes:
    """Build the whole protected object of DESIGN §4."""
    parts = ref_intermediates(secret, producer_id, resource_id, epoch, seq, aead_id)
    enc_protected = cbor2.dumps({1: aead_id, 3: content_format}, canonical=True)
    aad = cbor2.dumps(["Encrypt0", enc_protected, parts["external_aad"]])
    aead = REF_AEADS[aead_id][2](parts["content_key"])
    ciphertext = aead.encrypt(parts["nonce"], plaintext, aad)
    encrypt0 = cbor2.dumps(
        cbor2.CBORTag(ENCRYPT0_TAG, [enc_protected, {6: parts["partial_iv"]}, ciphertext])
    )
    alg = ES256_ID if isinstance(signing_key, ec.EllipticCurvePrivateKey) else EDDSA_ID
    header = {
        1: alg,
        4: ref_kid(signing_key.public_key()),
        15: {1: producer_id, 2: resource_id, 6: iat, 4: exp},
        -65537: epoch,
        -65538: seq,
    }
    protected = cbor2.dumps(header, canonical=True)
    signature = ref_sign(signing_key, cbor2.dumps(["Signature1", protected, b"", encrypt0]))
    return cbor2.dumps(cbor2.CBORTag(SIGN1_TAG, [protected, {}, encrypt0, signature]))


def ref_open(
    data: bytes,
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    secret: bytes,
) -> tuple[bytes, dict[str, Any]]:
    """Check the layout of DESIGN §4, the signature and the AEAD; return (plaintext, metadata).

    Fails with AssertionError or a cryptography exception; this is test code, not a consumer.
    """
    outer = cbor2.loads(data)
    assert isinstance(outer, cbor2.CBORTag) and outer.tag == SIGN1_TAG
    protected, unprotected, payload, signature = outer.value
    assert unprotected == {}
    header = cbor2.loads(protected)
    assert set(header) == {1, 4, 15, -65537, -65538}
    assert header[4] == ref_kid(public_key)
    ref_verify(
        public_key, header[1], signature, cbor2.dumps(["Signature1", protected, b"", payload])
    )
    claims = header[15]
    assert set(claims) == {1, 2, 4, 6}
    producer_id, resource_id = claims[1], claims[2]
    epoch, seq = header[-65537], header[-65538]

    inner = cbor2.loads(payload)
    assert isinstance(inner, cbor2.CBORTag) and inner.tag == ENCRYPT0_TAG
    enc_protected, enc_unprotected, ciphertext = inner.value
    enc_header = cbor2.loads(enc_protected)
    assert set(enc_header) == {1, 3}
    assert enc_unprotected == {6: ref_partial_iv(seq)}
    aead_id = enc_header[1]
    parts = ref_intermediates(secret, producer_id, resource_id, epoch, seq, aead_id)
    aad = cbor2.dumps(["Encrypt0", enc_protected, parts["external_aad"]])
    plaintext: bytes = REF_AEADS[aead_id][2](parts["content_key"]).decrypt(
        parts["nonce"], ciphertext, aad
    )
    metadata = {
        "producer_id": producer_id,
        "resource_id": resource_id,
        "epoch": epoch,
        "seq": seq,
        "iat": claims[6],
        "exp": claims[4],
        "content_format": enc_header[3],
        "aead": aead_id,
        "signature_algorithm": header[1],
    }
    return plaintext, metadata


# --- the generator (the only part that uses oscar) ----------------------------------------------


def generate() -> dict[str, Any]:
    import oscar
    from oscar.keys import ContentKeys
    from oscar.objects import external_aad

    keys = signing_keys()
    secret = bytes.fromhex(ACCESS_SECRET_HEX)
    vectors = []
    for name, profile_name, key_name, epoch, seq, content_format, plaintext in SPECS:
        signing_key = keys[key_name]
        profile = oscar.PROFILES[profile_name]
        common = {
            "producer_id": PRODUCER_ID,
            "resource_id": RESOURCE_ID,
            "epoch": epoch,
            "seq": seq,
            "iat": IAT,
            "exp": EXP,
            "content_format": content_format,
            "plaintext": plaintext,
            "signing_key": signing_key,
        }
        sealed = oscar.seal(secret=oscar.AccessSecret(secret), profile=profile, **common)
        aead_id = ref_aead_id(profile_name)
        assert aead_id == profile.aead.cose_id
        reference = ref_seal(secret=secret, aead_id=aead_id, **common)
        if sealed != reference:
            raise SystemExit(f"{name}: oscar.seal and the reference disagree")
        opened, _ = ref_open(sealed, signing_key.public_key(), secret)
        assert opened == plaintext

        parts = ref_intermediates(secret, PRODUCER_ID, RESOURCE_ID, epoch, seq, aead_id)
        derived = ContentKeys.derive(oscar.AccessSecret(secret), RESOURCE_ID, epoch, profile.aead)
        assert (derived.key, derived.base_iv) == (parts["content_key"], parts["base_iv"])
        assert derived.nonce(seq) == parts["nonce"]
        assert external_aad(PRODUCER_ID, RESOURCE_ID, epoch, seq) == parts["external_aad"]

        vectors.append(
            {
                "name": name,
                "profile": profile_name,
                "signing_key": key_name,
                "access_secret_hex": secret.hex(),
                "producer_id": PRODUCER_ID,
                "resource_id": RESOURCE_ID,
                "epoch": epoch,
                "seq": seq,
                "iat": IAT,
                "exp": EXP,
                "content_format": content_format,
                "plaintext_hex": plaintext.hex(),
                "kid_hex": ref_kid(signing_key.public_key()).hex(),
                "content_key_hex": parts["content_key"].hex(),
                "base_iv_hex": parts["base_iv"].hex(),
                "partial_iv_hex": parts["partial_iv"].hex(),
                "nonce_hex": parts["nonce"].hex(),
                "external_aad_hex": parts["external_aad"].hex(),
                "object_hex": sealed.hex(),
            }
        )
    return {
        "description": (
            "Whole OSCAR protected objects (DESIGN §4), one per security profile plus edge cases. "
            "Made by make_oscar_vectors.py; oscar.seal and an independent reference (cbor2 + "
            "cryptography only) agree byte for byte. Test keys only."
        ),
        "signing_keys": {
            "p256": {
                "algorithm": "ES256",
                "source": "RFC 6979 A.2.5 private key",
                "private_key_pem": private_key_pem(keys["p256"]),
            },
            "ed25519": {
                "algorithm": "EdDSA",
                "source": "RFC 8032 7.1 TEST 1 secret key",
                "private_key_pem": private_key_pem(keys["ed25519"]),
            },
        },
        "vectors": vectors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the file, write nothing")
    args = parser.parse_args(argv)
    text = json.dumps(generate(), indent=2, ensure_ascii=False) + "\n"
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} differs from what the generator makes", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(SPECS)} vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
