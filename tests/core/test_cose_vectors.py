"""The COSE working group's Sign1 and Encrypt0 examples against :mod:`oscar.cose`.

Every file is sorted into exactly one category, from the file's own data:

- *unsupported*: an algorithm (or curve) OSCAR does not implement, including the fail vectors that
  change ``alg`` to -999 or "unknown". The library must reject it with ``InvalidObject``.
- *fail* (``"fail": true``): must be rejected with ``InvalidObject`` at the stage the ``failures``
  entry implies (a wrong CBOR tag at decoding, anything else at verification or decryption).
- *pass*: must decode, verify or decrypt, and give the plaintext.

Nothing is skipped. See ``tests/vectors/README.md`` for the traps these files hold.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from oscar import algorithms
from oscar.cose import ENCRYPT0_TAG, IV, SIGN1_TAG, Encrypt0, Sign1
from oscar.errors import InvalidObject

COSE_WG = Path(__file__).parents[1] / "vectors" / "cose-wg"
SIGN1_DIRS = ("sign1-tests", "ecdsa-examples", "eddsa-examples")
ENCRYPT0_DIRS = ("encrypted-tests", "aes-ccm-examples", "aes-gcm-examples", "chacha-poly-examples")

# Algorithm names as the vector files spell them -> the oscar algorithm they must select.
SUPPORTED_SIGNATURES = {"ES256": algorithms.ES256, "EdDSA": algorithms.EDDSA}
SUPPORTED_CURVES = {"ES256": {"P-256"}, "EdDSA": {"Ed25519"}}
SUPPORTED_AEADS = {
    "AES-CCM-16-128/64": algorithms.AES_CCM_16_64_128,
    "A128GCM": algorithms.A128GCM,
    "A256GCM": algorithms.A256GCM,
    "ChaCha-Poly1305": algorithms.CHACHA20_POLY1305,
}

# What each kind of deliberate breakage must trip: "decode" (Sign1/Encrypt0.from_bytes) or
# "check" (verify / decrypt). A new kind of failure must be added here knowingly.
FAILURE_STAGE = {
    "ChangeCBORTag": "decode",
    "ChangeTag": "check",
    "AddProtected": "check",
    "RemoveProtected": "check",
}


# --- loading ---------------------------------------------------------------------------------


def _files(dirs: tuple[str, ...]) -> list[Path]:
    return sorted(path for d in dirs for path in (COSE_WG / d).glob("*.json"))


def _load(path: Path) -> dict[str, Any]:
    vector: dict[str, Any] = json.loads(path.read_text())
    vector["_name"] = path.stem
    return vector


def _layer(vector: dict[str, Any]) -> dict[str, Any]:
    layer: dict[str, Any] = vector["input"].get("sign0") or vector["input"]["encrypted"]
    return layer


def _declared_alg(vector: dict[str, Any]) -> str:
    layer = _layer(vector)
    for bucket in ("protected", "unprotected"):
        if "alg" in layer.get(bucket, {}):
            alg: str = layer[bucket]["alg"]
            return alg
    alg = layer["alg"]
    return alg


def _category(vector: dict[str, Any]) -> str:
    failures = vector["input"].get("failures", {})
    if "alg" in failures.get("ChangeAttr", {}):
        return "unsupported"
    alg = _declared_alg(vector)
    if "sign0" in vector["input"]:
        curve = _layer(vector)["key"]["crv"]
        if alg not in SUPPORTED_SIGNATURES or curve not in SUPPORTED_CURVES[alg]:
            return "unsupported"
    elif alg not in SUPPORTED_AEADS:
        return "unsupported"
    return "fail" if vector.get("fail") else "pass"


def _params(dirs: tuple[str, ...], category: str) -> list[Any]:
    vectors = [_load(path) for path in _files(dirs)]
    return [pytest.param(v, id=v["_name"]) for v in vectors if _category(v) == category]


SIGN1_PASS = _params(SIGN1_DIRS, "pass")
SIGN1_FAIL = _params(SIGN1_DIRS, "fail")
SIGN1_UNSUPPORTED = _params(SIGN1_DIRS, "unsupported")
ENCRYPT0_PASS = _params(ENCRYPT0_DIRS, "pass")
ENCRYPT0_FAIL = _params(ENCRYPT0_DIRS, "fail")
ENCRYPT0_UNSUPPORTED = _params(ENCRYPT0_DIRS, "unsupported")


# --- keys ------------------------------------------------------------------------------------


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key_bytes(jwk: dict[str, Any], name: str) -> bytes:
    """A key field given either base64url (``x``) or hex (``x_hex``)."""
    if f"{name}_hex" in jwk:
        return bytes.fromhex(jwk[f"{name}_hex"])
    return _b64url(jwk[name])


_EC_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}


def _private_key(jwk: dict[str, Any]) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    if jwk["kty"] == "EC":
        key = ec.derive_private_key(
            int.from_bytes(_key_bytes(jwk, "d"), "big"), _EC_CURVES[jwk["crv"]]
        )
        numbers = key.public_key().public_numbers()
        # The file's public half must belong to its private half.
        assert numbers.x == int.from_bytes(_key_bytes(jwk, "x"), "big")
        assert numbers.y == int.from_bytes(_key_bytes(jwk, "y"), "big")
        return key
    assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
    okp = ed25519.Ed25519PrivateKey.from_private_bytes(_key_bytes(jwk, "d"))
    assert okp.public_key().public_bytes_raw() == _key_bytes(jwk, "x")
    return okp


def _public_key(jwk: dict[str, Any]) -> Any:
    if jwk["kty"] == "EC":
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(_key_bytes(jwk, "x"), "big"),
            int.from_bytes(_key_bytes(jwk, "y"), "big"),
            _EC_CURVES[jwk["crv"]],
        ).public_key()
    if jwk["crv"] == "Ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(_key_bytes(jwk, "x"))
    assert jwk["crv"] == "Ed448"
    return ed448.Ed448PublicKey.from_public_bytes(_key_bytes(jwk, "x"))


def _content_key(vector: dict[str, Any]) -> bytes:
    return _key_bytes(_layer(vector)["recipients"][0]["key"], "k")


# --- small helpers ---------------------------------------------------------------------------


def _wire(vector: dict[str, Any]) -> bytes:
    return bytes.fromhex(vector["output"]["cbor"])


def _external(vector: dict[str, Any]) -> bytes:
    return bytes.fromhex(_layer(vector).get("external", ""))


def _plaintext(vector: dict[str, Any]) -> bytes:
    text: str = vector["input"]["plaintext"]
    return text.encode()


def _tag_on_wire(data: bytes) -> int | None:
    # Read with cbor2, not oscar, so the tag check does not trust the code under test.
    value = cbor2.loads(data)
    return value.tag if isinstance(value, cbor2.CBORTag) else None


def _structure_protected(message: Sign1 | Encrypt0) -> bytes:
    # RFC 9052 §3: an empty protected map (h'a0' on the wire) enters the structure as h''.
    return message.protected if message.protected_map else b""


def _failure_stage(vector: dict[str, Any]) -> str:
    (kind,) = vector["input"]["failures"]
    return FAILURE_STAGE[kind]


# --- the whole set is accounted for ---------------------------------------------------------


def test_every_vector_file_is_in_exactly_one_category() -> None:
    all_files = sorted(COSE_WG.glob("*/*.json"))
    assert sorted(_files(SIGN1_DIRS) + _files(ENCRYPT0_DIRS)) == all_files
    counts = {
        "sign1": (len(SIGN1_PASS), len(SIGN1_FAIL), len(SIGN1_UNSUPPORTED)),
        "encrypt0": (len(ENCRYPT0_PASS), len(ENCRYPT0_FAIL), len(ENCRYPT0_UNSUPPORTED)),
    }
    # (pass, fail, unsupported); a change in the vector set must be looked at, not absorbed.
    assert counts == {"sign1": (5, 4, 4), "encrypt0": (8, 5, 10)}
    assert sum(map(sum, counts.values())) == len(all_files) == 36


# --- COSE_Sign1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", SIGN1_PASS)
def test_sign1_pass_verifies(vector: dict[str, Any]) -> None:
    data = _wire(vector)
    layer = _layer(vector)
    external = _external(vector)
    message = Sign1.from_bytes(data, tag_required=False)

    if _tag_on_wire(data) == SIGN1_TAG:
        assert Sign1.from_bytes(data) == message
    else:
        assert _tag_on_wire(data) is None
        with pytest.raises(InvalidObject):
            Sign1.from_bytes(data, tag_required=True)

    algorithm = algorithms.signature_for(message.algorithm_id())
    assert algorithm is SUPPORTED_SIGNATURES[_declared_alg(vector)]
    message.verify(_public_key(layer["key"]), algorithm, external)
    assert message.payload == _plaintext(vector)

    # The external AAD is really covered by the signature.
    with pytest.raises(InvalidObject):
        message.verify(_public_key(layer["key"]), algorithm, external + b"\x00")

    tbs = Sign1.to_be_signed(_structure_protected(message), message.payload, external)
    assert tbs == bytes.fromhex(vector["intermediates"]["ToBeSign_hex"])


@pytest.mark.parametrize("vector", SIGN1_PASS)
def test_sign1_signature_reproduces(vector: dict[str, Any]) -> None:
    # ES256 is RFC 6979 deterministic in oscar and Ed25519 is deterministic by design, so the
    # files' signatures come out byte for byte (true of every supported pass vector here).
    data = _wire(vector)
    key = _private_key(_layer(vector)["key"])
    message = Sign1.from_bytes(data, tag_required=False)
    algorithm = algorithms.signature_for(message.algorithm_id())
    tbs = bytes.fromhex(vector["intermediates"]["ToBeSign_hex"])
    assert algorithm.sign(key, tbs) == message.signature

    resigned = Sign1.sign(
        message.protected_map,
        message.unprotected,
        message.payload,
        key,
        algorithm,
        _external(vector),
    )
    assert resigned.signature == message.signature
    # oscar writes an empty protected map as h'' where sign-pass-01 carries h'a0'; the signature
    # is the same (see above), only the wire bytes of that one header differ.
    if message.protected != b"\xa0":
        assert resigned.to_bytes(tagged=_tag_on_wire(data) is not None) == data


@pytest.mark.parametrize("vector", SIGN1_FAIL)
def test_sign1_fail_is_rejected(vector: dict[str, Any]) -> None:
    data = _wire(vector)
    if _failure_stage(vector) == "decode":
        # tag_required=False still refuses a tag that is present and wrong (998, not 18).
        assert _tag_on_wire(data) not in (None, SIGN1_TAG)
        with pytest.raises(InvalidObject):
            Sign1.from_bytes(data, tag_required=False)
        with pytest.raises(InvalidObject):
            Sign1.from_bytes(data)
        return

    public_key = _public_key(_layer(vector)["key"])
    message = Sign1.from_bytes(data, tag_required=False)
    algorithm = algorithms.signature_for(message.algorithm_id())
    with pytest.raises(InvalidObject):
        message.verify(public_key, algorithm, _external(vector))
    # The signature itself is genuine (over the untampered ToBeSign): the rejection is due to the
    # tampering, not to a wrong key in the test.
    algorithm.verify(
        public_key, message.signature, bytes.fromhex(vector["intermediates"]["ToBeSign_hex"])
    )


@pytest.mark.parametrize("vector", SIGN1_UNSUPPORTED)
def test_sign1_unsupported_is_rejected(vector: dict[str, Any]) -> None:
    message = Sign1.from_bytes(_wire(vector), tag_required=False)
    jwk = _layer(vector)["key"]
    if message.algorithm_id() != algorithms.EDDSA.cose_id:
        with pytest.raises(InvalidObject):
            algorithms.signature_for(message.algorithm_id())
        return
    # EdDSA over Ed448 (eddsa-sig-02): the algorithm id is one oscar knows, the curve is not. The
    # rejection comes at verification, and the signature is shown to be good with Ed448 itself.
    assert jwk["crv"] == "Ed448"
    algorithm = algorithms.signature_for(message.algorithm_id())
    public_key = _public_key(jwk)
    with pytest.raises(InvalidObject):
        message.verify(public_key, algorithm)
    public_key.verify(message.signature, Sign1.to_be_signed(message.protected, message.payload))


def test_es384_vector_is_valid_though_unsupported() -> None:
    # Shows ecdsa-sig-02 is rejected for its algorithm alone: raw P-384 verification accepts it.
    vector = _load(COSE_WG / "ecdsa-examples" / "ecdsa-sig-02.json")
    message = Sign1.from_bytes(_wire(vector))
    assert message.algorithm_id() == -35
    with pytest.raises(InvalidObject):
        algorithms.signature_for(-35)
    r, s = message.signature[:48], message.signature[48:]
    der = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    tbs = Sign1.to_be_signed(message.protected, message.payload)
    _public_key(_layer(vector)["key"]).verify(der, tbs, ec.ECDSA(hashes.SHA384()))
    with pytest.raises(InvalidSignature):
        _public_key(_layer(vector)["key"]).verify(der, tbs + b"x", ec.ECDSA(hashes.SHA384()))


# --- COSE_Encrypt0 ---------------------------------------------------------------------------


@pytest.mark.parametrize("vector", ENCRYPT0_PASS)
def test_encrypt0_pass_decrypts(vector: dict[str, Any]) -> None:
    data = _wire(vector)
    key = _content_key(vector)
    external = _external(vector)
    message = Encrypt0.from_bytes(data, tag_required=False)

    if _tag_on_wire(data) == ENCRYPT0_TAG:
        assert Encrypt0.from_bytes(data) == message
    else:
        assert _tag_on_wire(data) is None
        with pytest.raises(InvalidObject):
            Encrypt0.from_bytes(data, tag_required=True)

    aead = algorithms.aead_for(message.algorithm_id())
    assert aead is SUPPORTED_AEADS[_declared_alg(vector)]
    iv = message.unprotected[IV]
    assert iv == bytes.fromhex(vector["input"]["rng_stream"][0])
    assert message.decrypt(key, iv, aead, external) == _plaintext(vector)

    # The external AAD is really authenticated.
    with pytest.raises(InvalidObject):
        message.decrypt(key, iv, aead, external + b"\x00")

    assert key == bytes.fromhex(vector["intermediates"]["CEK_hex"])
    aad = Encrypt0.to_be_encrypted(_structure_protected(message), external)
    expected_aad = bytes.fromhex(vector["intermediates"]["AAD_hex"])
    if vector["_name"] == "chacha-poly-enc-01":
        # Known trap: this file's AAD_hex intermediate still spells the old context "Encrypt1",
        # while its output was made (and decrypts above) with "Encrypt0". Only this intermediate
        # comparison is adjusted; the decryption check above is the real one.
        assert expected_aad == aad.replace(b"Encrypt0", b"Encrypt1")
    else:
        assert aad == expected_aad


@pytest.mark.parametrize("vector", ENCRYPT0_PASS)
def test_encrypt0_ciphertext_reproduces(vector: dict[str, Any]) -> None:
    data = _wire(vector)
    message = Encrypt0.from_bytes(data, tag_required=False)
    aead = algorithms.aead_for(message.algorithm_id())
    made = Encrypt0.encrypt(
        message.protected_map,
        message.unprotected,
        _plaintext(vector),
        _content_key(vector),
        message.unprotected[IV],
        aead,
        _external(vector),
    )
    assert made.ciphertext == message.ciphertext
    # As for Sign1: enc-pass-01/03 carry h'a0' for the empty protected map, oscar writes h''.
    if message.protected != b"\xa0":
        assert made.to_bytes(tagged=_tag_on_wire(data) is not None) == data


@pytest.mark.parametrize("vector", ENCRYPT0_FAIL)
def test_encrypt0_fail_is_rejected(vector: dict[str, Any]) -> None:
    data = _wire(vector)
    if _failure_stage(vector) == "decode":
        # tag_required=False still refuses a tag that is present and wrong (995, not 16).
        assert _tag_on_wire(data) not in (None, ENCRYPT0_TAG)
        with pytest.raises(InvalidObject):
            Encrypt0.from_bytes(data, tag_required=False)
        with pytest.raises(InvalidObject):
            Encrypt0.from_bytes(data)
        return

    key = _content_key(vector)
    message = Encrypt0.from_bytes(data, tag_required=False)
    aead = algorithms.aead_for(message.algorithm_id())
    iv = message.unprotected[IV]
    with pytest.raises(InvalidObject):
        message.decrypt(key, iv, aead, _external(vector))
    if "ChangeTag" not in vector["input"]["failures"]:
        # A changed header: the ciphertext is genuine under the untampered AAD, so the rejection
        # is due to the header, not to a wrong key in the test.
        aad = bytes.fromhex(vector["intermediates"]["AAD_hex"])
        assert aead.decrypt(aead.cipher(key), iv, message.ciphertext, aad) == _plaintext(vector)


@pytest.mark.parametrize("vector", ENCRYPT0_UNSUPPORTED)
def test_encrypt0_unsupported_is_rejected(vector: dict[str, Any]) -> None:
    message = Encrypt0.from_bytes(_wire(vector), tag_required=False)
    assert message.algorithm_id() not in algorithms.AEADS
    with pytest.raises(InvalidObject):
        algorithms.aead_for(message.algorithm_id())
