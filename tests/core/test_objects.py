"""Protected objects: round trips, every check of DESIGN §4 failing closed, and opacity."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

import oscar
from oscar import (
    PROFILES,
    AccessSecret,
    FreshnessState,
    InvalidObject,
    KeyCache,
    PlaintextTooLarge,
    ProducerKey,
    SigningKey,
    certs,
)
from oscar.algorithms import EDDSA, ES256
from oscar.keys import ContentKeys
from testkit import NOW, OTHER_SECRET, PRODUCER, RESOURCE, SECRET, make_pki

KEYS = {
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}


def key_for(profile: oscar.Profile) -> Any:
    return KEYS[profile.signature.name]


def make(profile: oscar.Profile = oscar.DEFAULT_PROFILE, **overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "secret": SECRET,
        "producer_id": PRODUCER,
        "resource_id": RESOURCE,
        "epoch": 3,
        "seq": 7,
        "iat": NOW - 10,
        "exp": NOW + 60,
        "content_format": 50,
        "plaintext": b'{"celsius": 21.5}',
        "signing_key": key_for(profile),
        "profile": profile,
    }
    args.update(overrides)
    return oscar.seal(**args)


def secrets(resource_id: str, epoch: int) -> AccessSecret | None:
    return SECRET if (resource_id, epoch) == (RESOURCE, 3) else None


def open_(data: bytes, profile: oscar.Profile = oscar.DEFAULT_PROFILE, **kw: Any) -> oscar.Reading:
    kw.setdefault("secrets", secrets)
    kw.setdefault("signer", key_for(profile).public_key())
    kw.setdefault("now", NOW)
    return oscar.open(data, **kw)


def reason_of(data: bytes, **kw: Any) -> str:
    with pytest.raises(InvalidObject) as info:
        open_(data, **kw)
    assert str(info.value) == "invalid protected object"
    return info.value.reason


def thaw(value: Any) -> Any:
    """cbor2 hands back tuples and frozendicts inside tags; make them editable."""
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, thaw(value.value))
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    if isinstance(value, dict) or type(value).__name__ == "frozendict":
        return {k: thaw(v) for k, v in value.items()}
    return value


def loads(data: bytes) -> Any:
    return thaw(cbor2.loads(data))


def resign(data: bytes, mutate: Any, key: Any = None, *, inner: Any = None) -> bytes:
    """Re-sign an object after changing its decoded structure, as a forger with a key would."""
    key = key or KEYS["ES256"]
    outer = loads(data).value
    header = loads(outer[0])
    if inner is not None:
        enc = loads(outer[2])
        inner(enc.value)
        outer[2] = cbor2.dumps(enc)
    mutate(header, outer)
    protected = cbor2.dumps(header)
    tbs = cbor2.dumps(["Signature1", protected, b"", outer[2]])
    alg = ES256 if isinstance(key, ec.EllipticCurvePrivateKey) else EDDSA
    return cbor2.dumps(cbor2.CBORTag(18, [protected, outer[1], outer[2], alg.sign(key, tbs)]))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_round_trip_every_profile(name: str) -> None:
    profile = PROFILES[name]
    data = make(profile)
    reading = open_(data, profile)
    assert reading.plaintext == b'{"celsius": 21.5}'
    m = reading.metadata
    assert (m.producer_id, m.resource_id, m.epoch, m.seq) == (PRODUCER, RESOURCE, 3, 7)
    assert (m.iat, m.exp, m.content_format) == (NOW - 10, NOW + 60, 50)
    assert (m.aead, m.signature_algorithm) == (profile.aead, profile.signature)
    assert m.kid == certs.key_id(key_for(profile).public_key())


@settings(max_examples=40)
@given(
    name=st.sampled_from(sorted(PROFILES)),
    plaintext=st.binary(max_size=300),
    epoch=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    content_format=st.integers(0, 0xFFFF),
)
def test_round_trip_property(
    name: str, plaintext: bytes, epoch: int, seq: int, content_format: int
) -> None:
    profile = PROFILES[name]
    data = make(profile, plaintext=plaintext, epoch=epoch, seq=seq, content_format=content_format)
    reading = open_(data, profile, secrets=lambda rid, e: SECRET)
    assert reading.plaintext == plaintext
    assert (reading.metadata.epoch, reading.metadata.seq) == (epoch, seq)
    assert reading.metadata.content_format == content_format


def test_sealing_is_deterministic_and_content_keys_match() -> None:
    keys = ContentKeys.derive(SECRET, RESOURCE, 3, oscar.DEFAULT_PROFILE.aead)
    assert make() == make() == make(secret=keys)
    with pytest.raises(ValueError, match="another resource"):
        make(secret=keys, epoch=4)


def test_wire_layout_matches_design() -> None:
    outer = loads(make())
    assert outer.tag == 18 and len(outer.value) == 4
    protected, unprotected, payload, signature = outer.value
    header = loads(protected)
    assert list(header) == [1, 4, 15, -65537, -65538]
    assert header[1] == -7 and header[-65537] == 3 and header[-65538] == 7
    assert header[4] == certs.key_id(KEYS["ES256"].public_key())
    assert header[15] == {1: PRODUCER, 2: RESOURCE, 4: NOW + 60, 6: NOW - 10}
    assert unprotected == {} and len(signature) == 64
    inner = loads(payload)
    assert inner.tag == 16
    assert loads(inner.value[0]) == {1: 10, 3: 50}
    assert inner.value[1] == {6: b"\x07"}
    assert len(inner.value[2]) == len(b'{"celsius": 21.5}') + 8


@pytest.mark.parametrize(("seq", "piv"), [(0, "00"), (255, "ff"), (256, "0100"), (70000, "011170")])
def test_partial_iv_is_minimal(seq: int, piv: str) -> None:
    inner = loads(loads(make(seq=seq)).value[2])
    assert inner.value[1] == {6: bytes.fromhex(piv)}


def _flip_all_bits(data: bytes) -> list[bytes]:
    return [
        data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
        for i in range(len(data))
        for bit in range(8)
    ]


@pytest.mark.parametrize("name", ["ccm-es256", "a128gcm-eddsa"])
def test_every_single_bit_flip_is_rejected(name: str) -> None:
    profile = PROFILES[name]
    data = make(profile)
    for flipped in _flip_all_bits(data):
        with pytest.raises(InvalidObject):
            open_(flipped, profile)


@given(st.data())
def test_bit_flip_property(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(PROFILES)))
    profile = PROFILES[name]
    obj = make(profile, plaintext=data.draw(st.binary(max_size=64)))
    i = data.draw(st.integers(0, len(obj) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = obj[:i] + bytes([obj[i] ^ (1 << bit)]) + obj[i + 1 :]
    with pytest.raises(InvalidObject):
        open_(flipped, profile, secrets=lambda rid, e: SECRET)


@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_invalid_object(data: bytes) -> None:
    with pytest.raises(InvalidObject):
        open_(data)


@given(st.binary(max_size=60))
def test_arbitrary_bytes_after_a_valid_prefix(suffix: bytes) -> None:
    data = make()
    with pytest.raises(InvalidObject):
        open_(data[: len(data) // 2] + suffix)


def test_truncation_and_trailing_bytes() -> None:
    data = make()
    for cut in range(len(data)):
        with pytest.raises(InvalidObject):
            open_(data[:cut])
    assert "trailing" in reason_of(data + b"\x00")


def test_size_limit_is_checked_before_decoding() -> None:
    data = make()
    assert reason_of(data, max_size=len(data) - 1) == "object exceeds the size limit"
    assert reason_of(b"\xff" * 5_000_000) == "object exceeds the size limit"
    assert open_(data, max_size=len(data)).plaintext


def test_nesting_bomb_is_rejected() -> None:
    assert "deeply" in reason_of(b"\x81" * 200_000 + b"\x00")


def test_wrong_secret_epoch_and_missing_secret() -> None:
    data = make()
    assert reason_of(data, secrets=lambda rid, e: OTHER_SECRET) == "decryption failed"
    assert "no access secret" in reason_of(data, secrets=lambda rid, e: None)
    # Sealed for epoch 4 with the epoch-3 secret: the signature is fine, the keys are not.
    assert reason_of(make(epoch=4), secrets=lambda rid, e: SECRET if e == 3 else None).startswith(
        "no access secret"
    )


def test_object_of_one_resource_cannot_pass_as_another() -> None:
    other = make(resource_id="sensor-1/humidity")

    def swap(header: dict[int, Any], outer: list[Any]) -> None:
        header[15][2] = RESOURCE

    # A forger who could sign (same key) still cannot move the ciphertext: the AAD binds it.
    moved = resign(other, swap)
    assert reason_of(moved, secrets=lambda rid, e: SECRET) == "decryption failed"


def test_epoch_n_cannot_pass_as_n_plus_one() -> None:
    def bump(header: dict[int, Any], outer: list[Any]) -> None:
        header[-65537] += 1

    assert reason_of(resign(make(), bump), secrets=lambda rid, e: SECRET) == "decryption failed"


def test_seq_header_must_equal_partial_iv() -> None:
    def bump(header: dict[int, Any], outer: list[Any]) -> None:
        header[-65538] += 1

    assert "Partial IV" in reason_of(resign(make(), bump))


def test_non_minimal_partial_iv_is_rejected() -> None:
    def pad(enc: list[Any]) -> None:
        enc[1] = {6: b"\x00\x07"}

    assert "Partial IV" in reason_of(resign(make(), lambda h, o: None, inner=pad))


def test_resource_must_belong_to_the_producer() -> None:
    def steal(header: dict[int, Any], outer: list[Any]) -> None:
        header[15][2] = "sensor-2/temperature"

    assert reason_of(resign(make(), steal)) == "resource does not belong to the issuing producer"
    with pytest.raises(ValueError, match="form"):
        make(resource_id="sensor-2/temperature")
    with pytest.raises(ValueError, match="resource id"):
        make(resource_id="sensor-1/")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h, o: h.update({1: -35}), "unsupported signature algorithm"),  # ES384
        (lambda h, o: h.update({1: "ES256"}), "unsupported signature algorithm"),
        (lambda h, o: h.pop(1), "missing or unknown labels"),
        (lambda h, o: (h.pop(1), o[1].update({1: -7})), "missing or unknown labels"),
        (lambda h, o: o[1].update({99: 1}), "unprotected header is not empty"),
        (lambda h, o: h.update({3: 0}), "missing or unknown labels"),
        (lambda h, o: h.update({4: b"\x00" * 7}), "kid"),
        (lambda h, o: h.update({4: b"\x00" * 8}), "kid does not identify"),
        (lambda h, o: h[15].update({7: b"cti"}), "CWT claims"),
        (lambda h, o: h[15].update({1: b"sensor-1"}), "iss"),
        (lambda h, o: h[15].update({6: -1}), "iat"),
        (lambda h, o: h[15].update({4: NOW - 20}), "exp precedes iat"),
        (lambda h, o: h.update({-65537: -1}), "epoch"),
    ],
)
def test_header_tampering_with_a_valid_signature_is_rejected(mutate: Any, reason: str) -> None:
    assert reason in reason_of(resign(make(), mutate))


@pytest.mark.parametrize(
    ("inner", "reason"),
    [
        (lambda e: e.__setitem__(0, cbor2.dumps({1: 11, 3: 50})), "unsupported content encryption"),
        (lambda e: e.__setitem__(0, cbor2.dumps({1: 2, 3: 50})), "unsupported content encryption"),
        (lambda e: e.__setitem__(0, cbor2.dumps({1: 10})), "missing or unknown labels"),
        (lambda e: e.__setitem__(0, cbor2.dumps({3: 50})), "missing or unknown labels"),
        (lambda e: e[1].update({1: 10}), "not exactly the Partial IV"),
        (lambda e: e.__setitem__(0, cbor2.dumps({1: 10, 3: 70000})), "content format"),
    ],
)
def test_inner_header_tampering_is_rejected(inner: Any, reason: str) -> None:
    assert reason in reason_of(resign(make(), lambda h, o: None, inner=inner))


def test_algorithm_only_in_unprotected_inner_header_is_rejected() -> None:
    def move(enc: list[Any]) -> None:
        enc[0] = cbor2.dumps({3: 50})
        enc[1] = {1: 10, 6: b"\x07"}

    assert "missing or unknown labels" in reason_of(resign(make(), lambda h, o: None, inner=move))


def test_untagged_or_wrongly_tagged_objects_are_rejected() -> None:
    outer = loads(make())
    assert "not tagged" in reason_of(cbor2.dumps(outer.value))
    assert "wrong CBOR tag" in reason_of(cbor2.dumps(cbor2.CBORTag(98, outer.value)))
    inner = loads(outer.value[2])

    def untag(h: dict[int, Any], o: list[Any]) -> None:
        o[2] = cbor2.dumps(inner.value)

    assert "not tagged" in reason_of(resign(make(), untag))


def test_eddsa_signature_labelled_es256_and_the_reverse() -> None:
    eddsa = PROFILES["ccm-eddsa"]
    ed_obj = make(eddsa)

    # Keep the EdDSA signature bytes but claim ES256: a verifier with the Ed25519 key refuses.
    outer = loads(ed_obj).value
    header = loads(outer[0])
    header[1] = -7
    relabelled = cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps(header), {}, outer[2], outer[3]]))
    assert "does not match" in reason_of(relabelled, signer=KEYS["EdDSA"].public_key())
    # And an ES256 object relabelled EdDSA against the P-256 key.
    es_outer = loads(make()).value
    es_header = loads(es_outer[0])
    es_header[1] = -8
    relabelled = cbor2.dumps(
        cbor2.CBORTag(18, [cbor2.dumps(es_header), {}, es_outer[2], es_outer[3]])
    )
    assert "does not match" in reason_of(relabelled)


def test_signature_by_another_key_is_rejected() -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = make(signing_key=stranger)
    # The stranger's kid does not match the real producer's key.
    assert reason_of(forged) == "kid does not identify the signer's key"

    # Even with the real kid written in, the signature fails.
    def real_kid(h: dict[int, Any], o: list[Any]) -> None:
        h[4] = certs.key_id(KEYS["ES256"].public_key())

    assert reason_of(resign(forged, real_kid, stranger)) == "bad signature"


def test_expiry() -> None:
    data = make()
    assert open_(data, now=NOW + 60).plaintext  # exp itself is still valid
    assert reason_of(data, now=NOW + 61) == "object expired"


def test_freshness_rejects_replay_and_rollback_and_records_only_success() -> None:
    state = FreshnessState()
    open_(make(seq=7), freshness=state)
    assert state.newest(RESOURCE) == (3, 7)
    assert "replay" in reason_of(make(seq=7), freshness=state)
    assert "replay or rollback" in reason_of(make(seq=6), freshness=state)
    # A newer object that fails decryption does not advance the state.
    reason_of(make(seq=9), freshness=state, secrets=lambda rid, e: OTHER_SECRET)
    assert state.newest(RESOURCE) == (3, 7)
    open_(make(seq=8), freshness=state)
    secrets_4 = {3: SECRET, 4: OTHER_SECRET}
    open_(
        make(epoch=4, seq=0, secret=OTHER_SECRET),
        freshness=state,
        secrets=lambda rid, e: secrets_4[e],
    )
    assert state.newest(RESOURCE) == (4, 0)
    assert "older epoch" in reason_of(make(seq=100), freshness=state)


def test_freshness_survives_a_restart_through_its_snapshot() -> None:
    state = FreshnessState()
    open_(make(seq=7), freshness=state)
    restored = FreshnessState.from_snapshot(loads(cbor2.dumps(state.snapshot())))
    assert "replay" in reason_of(make(seq=7), freshness=restored)
    with pytest.raises(ValueError):
        FreshnessState.from_snapshot({RESOURCE: [1]})
    with pytest.raises(ValueError):
        FreshnessState.from_snapshot({RESOURCE: [1, -2]})


def test_key_cache_derives_once_and_is_bounded() -> None:
    calls: list[tuple[str, int]] = []

    def lookup(rid: str, epoch: int) -> AccessSecret:
        calls.append((rid, epoch))
        return SECRET

    cache = KeyCache(lookup, max_entries=2)
    for seq in range(5):
        open_(make(seq=seq), secrets=cache)
    assert calls == [(RESOURCE, 3)]
    for epoch in (4, 5, 3):
        open_(make(epoch=epoch), secrets=cache)
    assert calls[-1] == (RESOURCE, 3)  # epoch 3 was evicted and looked up again
    cache.forget(RESOURCE, 3)
    open_(make(), secrets=cache)
    assert len(calls) == 5
    assert repr(SECRET.value) not in repr(cache) and SECRET.value.hex() not in repr(cache)


def test_verify_without_a_secret() -> None:
    obj = oscar.verify(make(), signer=KEYS["ES256"].public_key(), now=NOW)
    assert obj.metadata.resource_id == RESOURCE
    with pytest.raises(InvalidObject):
        oscar.verify(make()[:-1] + b"\x00", signer=KEYS["ES256"].public_key(), now=NOW)


def test_certificate_signer_chain_owner_validity_and_revocation() -> None:
    pki = make_pki()
    data = make(signing_key=pki.producer_key)
    kw = {"signer": pki.producer_cert, "trust_anchor": pki.ca_cert}
    assert open_(data, **kw).plaintext
    # A certificate with no anchor to check it against is refused ...
    assert "needs a trust anchor" in reason_of(data, signer=pki.producer_cert)
    # ... unless the caller trusts it explicitly, as a ProducerKey.
    assert open_(data, signer=ProducerKey.from_certificate(pki.producer_cert, None, now=NOW))
    anchored = ProducerKey.from_certificate(pki.producer_cert, pki.ca_cert, now=NOW)
    assert open_(data, signer=anchored, trust_anchor=pki.ca_cert).plaintext
    assert "not checked against the trust anchor" in reason_of(
        data,
        signer=ProducerKey.from_certificate(pki.producer_cert, None, now=NOW),
        trust_anchor=pki.ca_cert,
    )
    assert "bare public key" in reason_of(
        data, signer=pki.producer_key.public_key(), trust_anchor=pki.ca_cert
    )
    other = make_pki()  # another CA certifying the same name
    assert "not issued by the trusted CA" in reason_of(
        data, signer=pki.producer_cert, trust_anchor=other.ca_cert
    )
    assert "revoked" in reason_of(data, revoked_serials={1000}, **kw)
    assert "not valid at this time" in reason_of(data, now=NOW + 2 * 86_400, **kw)
    sensor2 = make_pki("sensor-2")
    # sensor-2's genuine certificate cannot vouch for a sensor-1 object.
    assert "names another device" in reason_of(
        make(signing_key=sensor2.producer_key),
        signer=sensor2.producer_cert,
        trust_anchor=sensor2.ca_cert,
    )


def test_signer_lookup() -> None:
    pki = make_pki()
    data = make(signing_key=pki.producer_key)
    seen: list[tuple[str, bytes]] = []

    def lookup(producer: str, kid: bytes) -> Any:
        seen.append((producer, kid))
        return pki.producer_cert if producer == PRODUCER else None

    assert open_(data, signer=lookup, trust_anchor=pki.ca_cert).plaintext
    assert seen == [(PRODUCER, certs.key_id(pki.producer_key.public_key()))]
    assert reason_of(data, signer=lambda p, k: None) == "signer unknown"


def test_ccm_limit_and_large_objects_under_gcm() -> None:
    big = bytes(65_536)
    with pytest.raises(PlaintextTooLarge, match="65535"):
        make(plaintext=big)
    assert len(make(plaintext=bytes(65_535))) > 65_535
    one_mib = bytes(range(256)) * 4096
    gcm = PROFILES["a128gcm-es256"]
    data = make(gcm, plaintext=one_mib)
    assert open_(data, gcm, secrets=lambda rid, e: SECRET).plaintext == one_mib


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"signing_key": KEYS["EdDSA"]}, "signs with ES256"),
        ({"exp": NOW - 11}, "exp"),
        ({"seq": -1}, "seq"),
        ({"seq": 2**64}, "seq"),
        ({"epoch": "1"}, "epoch"),
        ({"content_format": 65_536}, "content_format"),
        ({"producer_id": ""}, "producer id"),
        ({"producer_id": "a/b", "resource_id": "a/b/c"}, "producer id"),
        ({"resource_id": "sensor-1/../x"}, "resource id"),
        ({"resource_id": "sensor-1/a b"}, "resource id"),
    ],
)
def test_seal_misuse_is_a_value_error(overrides: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        make(**overrides)


def test_secrets_and_plaintext_stay_out_of_reprs_and_messages() -> None:
    reading = open_(make())
    assert b"celsius".decode() not in repr(reading)
    assert repr(reading.plaintext) not in repr(reading)
    for shown in (repr(SECRET), str(SECRET)):
        assert repr(SECRET.value) not in shown and SECRET.value.hex() not in shown
    assert "redacted" in repr(SECRET)
    keys = ContentKeys.derive(SECRET, RESOURCE, 3, oscar.DEFAULT_PROFILE.aead)
    for field in (keys.key, keys.base_iv):
        assert repr(field) not in repr(keys) and field.hex() not in repr(keys)
    assert "key=" not in repr(keys) and "base_iv=" not in repr(keys)
    signing = SigningKey.from_private_key(KEYS["ES256"])
    assert "private_key" not in repr(signing)
    with pytest.raises(ValueError) as info:
        AccessSecret.from_hex("zz" + SECRET.value.hex()[2:])
    assert SECRET.value.hex()[2:] not in str(info.value)
    with pytest.raises(ValueError):
        AccessSecret(b"short")


def test_object_of_another_resource_than_asked_for_is_refused() -> None:
    door = make(resource_id="sensor-1/door")
    assert open_(door, resource_id="sensor-1/door", secrets=lambda r, e: SECRET).plaintext
    state = FreshnessState()
    assert reason_of(door, resource_id=RESOURCE, freshness=state) == (
        "object is for another resource"
    )
    assert len(state) == 0


def test_iat_too_far_in_the_future_is_refused() -> None:
    ahead = make(iat=NOW + 301, exp=NOW + 900)
    assert reason_of(ahead) == "object issued in the future"
    assert open_(ahead, max_clock_skew=301).plaintext
    assert open_(make(iat=NOW + 300, exp=NOW + 900)).plaintext


def test_header_junk_is_refused_by_the_item_budget() -> None:
    def junk(h: dict[int, Any], o: list[Any]) -> None:
        h[15][2] = [[0] * 100] * 100  # 10,000 items where a text string belongs

    assert "not strict CBOR" in reason_of(resign(make(), junk))
    # A whole envelope of junk, too: a megabyte of one-byte items in the unprotected header.
    outer = loads(make()).value
    outer[1] = {1: [0] * 500_000}
    assert "too many items" in reason_of(cbor2.dumps(cbor2.CBORTag(18, outer)))


def test_size_limit_counts_bytes_not_memoryview_elements() -> None:
    import array

    data = make()
    words = array.array("I", data + bytes(-len(data) % 4))
    with pytest.raises(InvalidObject) as info:
        oscar.ProtectedObject.from_bytes(memoryview(words), max_size=len(data) // 4 + 1)
    assert info.value.reason == "object exceeds the size limit"


def test_certificate_with_duplicate_extensions_is_an_invalid_object() -> None:
    pki = make_pki()
    der = pki.producer_cert.public_bytes(serialization.Encoding.DER)
    bad = x509.load_der_x509_certificate(_duplicate_last_extension(der, pki.ca_key))
    data = make(signing_key=pki.producer_key)
    assert "malformed" in reason_of(data, signer=bad, trust_anchor=pki.ca_cert)


def _duplicate_last_extension(der: bytes, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Re-sign a certificate whose last extension appears twice (builders refuse to make one)."""

    def parse(b: bytes, i: int = 0) -> tuple[int, int]:
        length, j = b[i + 1], i + 2
        if length & 0x80:
            n = length & 0x7F
            length, j = int.from_bytes(b[j : j + n], "big"), j + n
        return j, length

    def body(b: bytes) -> bytes:
        j, length = parse(b)
        return b[j : j + length]

    def children(b: bytes) -> list[bytes]:
        out, i = [], 0
        while i < len(b):
            j, length = parse(b, i)
            out.append(b[i : j + length])
            i = j + length
        return out

    def tlv(tag: int, content: bytes) -> bytes:
        n = len(content)
        size = (
            bytes([n])
            if n < 128
            else bytes([0x80 | ((n.bit_length() + 7) // 8)])
            + n.to_bytes((n.bit_length() + 7) // 8, "big")
        )
        return bytes([tag]) + size + content

    tbs, alg, _sig = children(body(der))
    parts = children(body(tbs))
    extensions = children(body(body(parts[-1])))
    extensions.append(extensions[-1])
    new_tbs = tlv(0x30, b"".join(parts[:-1]) + tlv(0xA3, tlv(0x30, b"".join(extensions))))
    signature = ca_key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    return tlv(0x30, new_tbs + alg + tlv(0x03, b"\x00" + signature))


def test_producer_key_from_certificate_is_bounded_by_the_ca_window() -> None:
    pki = make_pki(not_after=NOW + 30 * 86_400)  # outlives its CA (NOW + 10 days)
    key = ProducerKey.from_certificate(pki.producer_cert, pki.ca_cert, now=NOW)
    assert key.not_after == NOW + 10 * 86_400
    data = make(signing_key=pki.producer_key, exp=NOW + 20 * 86_400)
    assert "not valid at this time" in reason_of(
        data, signer=key, trust_anchor=pki.ca_cert, now=NOW + 11 * 86_400
    )


def test_a_kept_sealer_gives_the_same_bytes_as_seal() -> None:
    for name in ("ccm-es256", "chacha20-eddsa"):
        profile = PROFILES[name]
        sealer = oscar.Sealer(
            secret=SECRET, producer_id=PRODUCER, resource_id=RESOURCE, epoch=3,
            signing_key=key_for(profile), profile=profile,
        )  # fmt: skip
        for seq, cf in ((0, 0), (7, 50), (70_000, 50), (2**64 - 1, 65_535)):
            args = {"seq": seq, "iat": NOW, "exp": NOW + 5, "content_format": cf, "plaintext": b"v"}
            assert sealer.seal(**args) == make(profile, **args)
        with pytest.raises(ValueError, match="content_format"):
            sealer.seal(seq=1, iat=NOW, exp=NOW, content_format=-1, plaintext=b"")
        assert "redacted" not in repr(sealer) and RESOURCE in repr(sealer)
