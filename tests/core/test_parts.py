"""Multi-part objects (issue 19, "plain and partial access"): seal once, one signature over every
part, each consumer opens the parts it holds secrets for and learns which it could not; any
tampering is one InvalidObject; a consumer that predates parts refuses them cleanly.

Objects with a structure the sealer would never make are built here by decoding a sealed object,
changing it, and signing it again with the producer's own key (``_resign``): so the refusal shown
is the decoder's or the AEAD's, not the signature's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

import oscar
from oscar import cbor
from oscar.algorithms import signature_algorithm_of_key
from oscar.cose import Sign1
from oscar.freshness import FreshnessState
from oscar.parts import (
    MAX_PARTS,
    PARTS,
    MultiPartObject,
    Part,
    part_external_aad,
    seal_parts,
)
from oscar.partsopening import OpenedPart, open_parts, open_parts_verified, verify_parts
from oscar.streaming import ObjectReader

PRODUCER, RESOURCE = "ward-7", "ward-7/bed-12"
SEQ, IAT, EXP = 10, 1_767_225_600, 1_767_225_900
NOW = IAT + 1
CLINICIANS = oscar.AccessSecret(bytes(range(32)))
OPERATORS = oscar.AccessSecret(bytes(range(32, 64)))
STATUS, MEASUREMENTS, LOCATION = b"stable", b'{"hr":72,"spo2":97}', b"ward 7, bed 12"

Secrets = Callable[[str, str, int], "oscar.AccessSecret | None"]


def _parts(measurements_epoch: int = 4, location_epoch: int = 2) -> list[Part]:
    return [
        Part("status", STATUS, 0),
        Part("measurements", MEASUREMENTS, 50, CLINICIANS, measurements_epoch),
        Part("location", LOCATION, 0, OPERATORS, location_epoch),
    ]


def _seal(key: Any, **overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "parts": _parts(),
        "producer_id": PRODUCER,
        "resource_id": RESOURCE,
        "seq": SEQ,
        "iat": IAT,
        "exp": EXP,
        "signing_key": key,
    }
    arguments.update(overrides)
    if "profile" not in arguments and isinstance(key, ed25519.Ed25519PrivateKey):
        arguments["profile"] = oscar.PROFILES["ccm-eddsa"]
    return seal_parts(**arguments)


def _grants(**granted: tuple[int, oscar.AccessSecret]) -> Secrets:
    """A consumer's secret lookup: part name -> (epoch, secret)."""

    def lookup(resource_id: str, part: str, epoch: int) -> oscar.AccessSecret | None:
        found = granted.get(part)
        if resource_id != RESOURCE or found is None or found[0] != epoch:
            return None
        return found[1]

    return lookup


CLINICIAN = _grants(measurements=(4, CLINICIANS))
OPERATOR = _grants(location=(2, OPERATORS))
BOTH = _grants(measurements=(4, CLINICIANS), location=(2, OPERATORS))
NOBODY = _grants()


def _any_grant(resource_id: str, part: str, epoch: int) -> oscar.AccessSecret:
    """A lookup that answers for any resource, part name and epoch: it shows that what protects
    a part is the key derivation and the AAD, not the lookup's care."""
    return OPERATORS if part == "location" else CLINICIANS


def _open(data: bytes, key: Any, secrets: Secrets = BOTH, **kwargs: Any) -> Any:
    return open_parts(data, secrets=secrets, signer=key.public_key(), now=NOW, **kwargs)


def _resign(
    data: bytes,
    key: Any,
    *,
    header: Callable[[dict[Any, Any]], None] | None = None,
    items: Callable[[list[Any]], None] | None = None,
) -> bytes:
    """``data`` changed by ``header``/``items`` (in place) and signed again by ``key``."""
    sign1 = Sign1.from_bytes(data)
    protected = dict(sign1.protected_map)
    payload = cbor.loads(sign1.payload)
    assert isinstance(payload, list)
    if header is not None:
        header(protected)
    if items is not None:
        items(payload)
    algorithm = signature_algorithm_of_key(key)
    return Sign1.sign(protected, {}, cbor.dumps(payload), key, algorithm).to_bytes()


# --- granted and not granted ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "opened", "not_granted"),
    [
        (CLINICIAN, ["status", "measurements"], ["location"]),
        (OPERATOR, ["status", "location"], ["measurements"]),
        (BOTH, ["status", "measurements", "location"], []),
        (NOBODY, ["status"], ["measurements", "location"]),
    ],
    ids=["clinician", "operator", "both", "the-public"],
)
def test_each_consumer_opens_its_granted_parts_and_learns_which_it_could_not(
    es256_key: ec.EllipticCurvePrivateKey,
    who: Secrets,
    opened: list[str],
    not_granted: list[str],
) -> None:
    data = _seal(es256_key)
    reading = _open(data, es256_key, who)
    assert [p.name for p in reading.parts] == opened
    assert list(reading.not_granted) == not_granted
    expected = {"status": STATUS, "measurements": MEASUREMENTS, "location": LOCATION}
    for part in reading.parts:
        assert part.plaintext == expected[part.name]
    assert reading.part("measurements") == (
        OpenedPart("measurements", 50, MEASUREMENTS, 4) if "measurements" in opened else None
    )
    assert reading.part("status") == OpenedPart("status", 0, STATUS, None)
    m = reading.metadata
    assert (m.producer_id, m.resource_id, m.seq, m.iat, m.exp) == (
        PRODUCER,
        RESOURCE,
        SEQ,
        IAT,
        EXP,
    )
    assert [(d.name, d.kind, d.content_format, d.epoch) for d in m.parts] == [
        ("status", 0, 0, None),
        ("measurements", 1, 50, 4),
        ("location", 1, 0, 2),
    ]


def test_the_plain_part_is_read_without_any_secret_but_only_if_authentic(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    data = _seal(es256_key)
    assert _open(data, es256_key, NOBODY).part("status").plaintext == STATUS
    # The plain bytes sit in the clear in the object; changing them breaks the one signature.
    at = data.index(STATUS)
    forged = data[:at] + b"STABLE" + data[at + len(STATUS) :]
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(forged, es256_key, NOBODY)
    assert caught.value.reason == "bad signature"


def test_the_proxy_verifies_without_any_secret(es256_key: ec.EllipticCurvePrivateKey) -> None:
    data = _seal(es256_key)
    obj = verify_parts(data, signer=es256_key.public_key(), now=NOW, resource_id=RESOURCE)
    assert obj.to_bytes() == data
    assert [d.name for d in obj.metadata.parts] == ["status", "measurements", "location"]
    # The secret-less check refuses what opening refuses: another resource, expiry, the future.
    for kwargs in ({"resource_id": "ward-7/bed-13"}, {"now": EXP + 1}, {"now": IAT - 301}):
        arguments: dict[str, Any] = {"signer": es256_key.public_key(), "now": NOW, **kwargs}
        with pytest.raises(oscar.InvalidObject):
            verify_parts(data, **arguments)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(oscar.InvalidObject):
        verify_parts(data, signer=other.public_key(), now=NOW)


def test_a_granted_part_that_does_not_open_fails_the_whole_object(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    """All or nothing: a wrong secret for one part returns no part at all, records nothing."""
    data = _seal(es256_key)
    freshness = FreshnessState()
    wrong = _grants(measurements=(4, CLINICIANS), location=(2, CLINICIANS))
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(data, es256_key, wrong, freshness=freshness)
    assert caught.value.reason == "decryption failed"
    assert freshness.newest(RESOURCE) is None


def test_freshness_is_by_seq_alone_and_a_replay_is_refused(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    freshness = FreshnessState()
    first = _seal(es256_key)
    _open(first, es256_key, CLINICIAN, freshness=freshness)
    assert freshness.newest(RESOURCE) == (0, SEQ)
    with pytest.raises(oscar.InvalidObject):
        _open(first, es256_key, CLINICIAN, freshness=freshness)
    # A rotation of one audience's secret (location epoch 3) with the next seq is newer.
    rotated = _seal(es256_key, seq=SEQ + 1, parts=_parts(location_epoch=3))
    reading = _open(rotated, es256_key, CLINICIAN, freshness=freshness)
    assert reading.not_granted == ("location",)
    assert freshness.newest(RESOURCE) == (0, SEQ + 1)
    # open_parts_verified is the same second half.
    obj = verify_parts(_seal(es256_key, seq=SEQ + 2), signer=es256_key.public_key(), now=NOW)
    again = open_parts_verified(obj, secrets=BOTH, freshness=freshness)
    assert [p.name for p in again.parts] == ["status", "measurements", "location"]


# --- tampering ----------------------------------------------------------------------------------


def test_every_single_byte_changed_is_refused(es256_key: ec.EllipticCurvePrivateKey) -> None:
    data = _seal(es256_key)
    for index in range(len(data)):
        tampered = bytearray(data)
        tampered[index] ^= 0x01
        with pytest.raises(oscar.InvalidObject):
            _open(bytes(tampered), es256_key, NOBODY)


def _swap_items(first: int, second: int) -> Callable[[list[Any]], None]:
    def swap(items: list[Any]) -> None:
        items[first], items[second] = items[second], items[first]

    return swap


def _descriptors(change: Callable[[list[Any]], None]) -> Callable[[dict[Any, Any]], None]:
    def edit(header: dict[Any, Any]) -> None:
        parts = [list(d) for d in header[PARTS]]
        change(parts)
        header[PARTS] = parts

    return edit


def _set(index: int, position: int, value: Any) -> Callable[[list[Any]], None]:
    def change(parts: list[Any]) -> None:
        parts[index][position] = value

    return change


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param({"items": _swap_items(1, 2)}, id="order-of-parts"),
        pytest.param({"header": _descriptors(_swap_items(1, 2))}, id="order-of-descriptors"),
        pytest.param({"header": _descriptors(lambda p: p.pop())}, id="audience-removed"),
        pytest.param({"header": _descriptors(_set(2, 0, "operators"))}, id="audience-renamed"),
        pytest.param({"header": _descriptors(_set(1, 3, 5))}, id="part-epoch"),
        pytest.param({"header": _descriptors(_set(0, 2, 50))}, id="plain-content-format"),
        pytest.param({"header": _descriptors(_set(1, 2, 0))}, id="encrypted-content-format"),
        pytest.param({"items": lambda items: items.__setitem__(0, b"STABLE")}, id="plain-bytes"),
    ],
)
def test_tampering_without_the_key_fails_the_signature(
    es256_key: ec.EllipticCurvePrivateKey, tamper: dict[str, Any]
) -> None:
    data = _seal(es256_key)
    forged = _resign(data, es256_key, **tamper)
    # Carry the original signature over to the changed object: what an attacker can do.
    original = Sign1.from_bytes(data)
    changed = Sign1.from_bytes(forged)
    attack = changed._replace(signature=original.signature).to_bytes()
    with pytest.raises(oscar.InvalidObject):
        _open(attack, es256_key, BOTH)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        # The signer itself mixing parts up still gets nothing past the part's own checks:
        (
            {"items": _swap_items(1, 2), "header": _descriptors(_swap_items(1, 2))},
            None,  # a legitimate reordering: descriptors and items move together
        ),
        ({"items": _swap_items(1, 2)}, "a part's content format differs from its descriptor's"),
        ({"header": _descriptors(_set(1, 3, 5))}, "decryption failed"),
        ({"header": _descriptors(_set(1, 0, "location2"))}, "decryption failed"),
        (
            {"header": _descriptors(_set(1, 2, 0))},
            "a part's content format differs from its descriptor's",
        ),
        (
            {"header": _descriptors(_set(1, 1, 0))},
            "a part descriptor's kind is unknown or its length wrong",
        ),
        (
            {"header": _descriptors(lambda p: p[1].pop())},
            "a part descriptor's kind is unknown or its length wrong",
        ),
        (
            {"header": _descriptors(_set(0, 1, 1))},
            "a part descriptor's kind is unknown or its length wrong",
        ),
        (
            {"header": _descriptors(_set(1, 1, 2))},
            "a part descriptor's kind is unknown or its length wrong",
        ),
        ({"header": _descriptors(_set(2, 0, "measurements"))}, "two parts have the same name"),
        ({"header": _descriptors(_set(2, 0, "bad name"))}, "a part name is malformed"),
        (
            {"header": _descriptors(lambda p: p.pop())},
            "payload is not an array of one item per part",
        ),
        ({"items": lambda items: items.pop()}, "payload is not an array of one item per part"),
        (
            {"items": lambda items: items.__setitem__(0, "stable")},
            "a plain part is not a byte string",
        ),
        (
            {"items": lambda items: items.__setitem__(1, items[1].value)},
            "an encrypted part is not a tagged COSE_Encrypt0",
        ),
        (
            {"items": lambda items: items.__setitem__(1, b"")},
            "an encrypted part is not a tagged COSE_Encrypt0",
        ),
        (
            {"header": lambda h: h.__setitem__(PARTS, [])},
            "parts is not an array of 1 to 16 descriptors",
        ),
        (
            {"header": lambda h: h.__setitem__(-65537, 4)},
            "multi-part protected header has missing or unknown labels",
        ),
        (
            {"header": lambda h: h.pop(-65538)},
            "multi-part protected header has missing or unknown labels",
        ),
    ],
)
def test_structures_the_sealer_never_makes_are_refused_even_when_signed(
    es256_key: ec.EllipticCurvePrivateKey, tamper: dict[str, Any], reason: str | None
) -> None:
    data = _resign(_seal(es256_key), es256_key, **tamper)
    if reason is None:
        reading = _open(data, es256_key, _any_grant)
        assert [p.name for p in reading.parts] == ["status", "location", "measurements"]
        assert reading.part("location").plaintext == LOCATION  # type: ignore[union-attr]
        return
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(data, es256_key, _any_grant)
    assert caught.value.reason == reason


def test_no_object_without_an_encrypted_part(es256_key: ec.EllipticCurvePrivateKey) -> None:
    plain_only = _resign(
        _seal(es256_key),
        es256_key,
        header=_descriptors(lambda p: p.__setitem__(slice(1, 3), [])),
        items=lambda items: items.__setitem__(slice(1, 3), []),
    )
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(plain_only, es256_key, NOBODY)
    assert caught.value.reason == "no part is encrypted"
    with pytest.raises(ValueError, match="at least one part must be encrypted"):
        _seal(es256_key, parts=[Part("status", STATUS, 0)])


def test_a_part_copied_from_another_resource_or_part_does_not_open(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    """Same producer key, same seq, same secrets: only the part's place differs, and the key
    derivation and external AAD (resource, part name) bind it there."""
    here = _seal(es256_key)
    there = _seal(es256_key, resource_id="ward-7/bed-13")
    stolen = cbor.loads(Sign1.from_bytes(there).payload)
    assert isinstance(stolen, list)

    def copy_measurements(items: list[Any]) -> None:
        items[1] = stolen[1]

    moved = _resign(here, es256_key, items=copy_measurements)
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(moved, es256_key, CLINICIAN)
    assert caught.value.reason == "decryption failed"

    # One secret for two parts: the measurements ciphertext in the location slot still fails.
    shared = [
        Part("status", STATUS, 0),
        Part("measurements", MEASUREMENTS, 0, CLINICIANS, 4),
        Part("location", LOCATION, 0, CLINICIANS, 4),
    ]
    data = _seal(es256_key, parts=shared)
    crossed = _resign(data, es256_key, items=lambda items: items.__setitem__(2, items[1]))
    same = _grants(measurements=(4, CLINICIANS), location=(4, CLINICIANS))
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(crossed, es256_key, same)
    assert caught.value.reason == "decryption failed"


def test_a_part_from_an_older_object_of_the_same_resource_does_not_fit(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    old = cbor.loads(Sign1.from_bytes(_seal(es256_key, seq=SEQ - 1)).payload)
    assert isinstance(old, list)
    spliced = _resign(_seal(es256_key), es256_key, items=lambda items: items.__setitem__(1, old[1]))
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(spliced, es256_key, CLINICIAN)
    assert caught.value.reason == "Partial IV does not encode the signed seq minimally"


def test_external_aad_names_the_part_and_differs_from_the_single_part_one() -> None:
    aad = part_external_aad(PRODUCER, RESOURCE, 4, SEQ, "measurements")
    assert cbor.loads(aad) == [PRODUCER, RESOURCE, 4, SEQ, "measurements"]
    assert aad != oscar.objects.external_aad(PRODUCER, RESOURCE, 4, SEQ)


def test_part_keys_never_coincide_with_each_other_or_with_single_part_keys() -> None:
    aead = oscar.DEFAULT_PROFILE.aead
    derive = oscar.ContentKeys.derive_part
    keys = {
        derive(CLINICIANS, RESOURCE, "measurements", 4, aead).key,
        derive(CLINICIANS, RESOURCE, "location", 4, aead).key,
        derive(CLINICIANS, RESOURCE, "measurements", 5, aead).key,
        derive(CLINICIANS, "ward-7/bed-13", "measurements", 4, aead).key,
        oscar.ContentKeys.derive(CLINICIANS, RESOURCE, 4, aead).key,
    }
    assert len(keys) == 5


# --- versioning: single-part unchanged, old consumers refuse the new objects ---------------------


def test_a_consumer_that_predates_parts_refuses_them_cleanly(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    data = _seal(es256_key)
    reason = "Sign1 protected header has missing or unknown labels"
    with pytest.raises(oscar.InvalidObject) as caught:
        oscar.ProtectedObject.from_bytes(data)
    assert caught.value.reason == reason
    with pytest.raises(oscar.InvalidObject):
        oscar.verify(data, signer=es256_key.public_key(), now=NOW)
    with pytest.raises(oscar.InvalidObject):
        oscar.open(data, secrets=lambda r, e: CLINICIANS, signer=es256_key.public_key(), now=NOW)
    reader = ObjectReader()
    with pytest.raises(oscar.InvalidObject) as caught:
        reader.feed(data)
        reader.finish()
    assert caught.value.reason == reason
    # Even without the parts label, the payload is no tagged COSE_Encrypt0 (a second guard).
    sign1 = Sign1.from_bytes(data)
    with pytest.raises(oscar.InvalidObject) as caught:
        oscar.cose.Encrypt0.from_bytes(sign1.payload)
    assert caught.value.reason == "COSE_Encrypt0 is not tagged"


def test_every_truncation_and_every_byte_flip_is_one_invalid_object_for_both_decoders(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    """Neither the new decoder nor the old one (pinned reader first, then the generic one) lets
    anything but InvalidObject out, whatever the bytes."""
    data = _seal(es256_key)
    for cut in range(len(data)):
        with pytest.raises(oscar.InvalidObject):
            MultiPartObject.from_bytes(data[:cut])
        with pytest.raises(oscar.InvalidObject):
            oscar.ProtectedObject.from_bytes(data[:cut])
    for index in range(len(data)):
        tampered = bytearray(data)
        tampered[index] ^= 0x80
        with pytest.raises(oscar.InvalidObject):
            oscar.ProtectedObject.from_bytes(bytes(tampered))
        # A flip inside a byte string may still decode: the signature refuses it then.
        with contextlib.suppress(oscar.InvalidObject):
            MultiPartObject.from_bytes(bytes(tampered))


def test_the_multi_part_decoder_refuses_single_part_objects(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    single = oscar.seal(
        secret=CLINICIANS,
        producer_id=PRODUCER,
        resource_id=RESOURCE,
        epoch=4,
        seq=SEQ,
        iat=IAT,
        exp=EXP,
        content_format=0,
        plaintext=STATUS,
        signing_key=es256_key,
    )
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(single, es256_key, BOTH)
    assert caught.value.reason == "multi-part protected header has missing or unknown labels"


# --- limits, profiles, arguments ----------------------------------------------------------------


def test_the_size_limit_comes_before_any_decoding(es256_key: ec.EllipticCurvePrivateKey) -> None:
    data = _seal(es256_key)
    with pytest.raises(oscar.InvalidObject) as caught:
        _open(data, es256_key, BOTH, max_size=len(data) - 1)
    assert caught.value.reason == "object exceeds the size limit"
    assert _open(data, es256_key, BOTH, max_size=len(data)).not_granted == ()
    with pytest.raises(oscar.InvalidObject) as caught:
        MultiPartObject.from_bytes(b"\xff" * 100, max_size=99)
    assert caught.value.reason == "object exceeds the size limit"


@pytest.mark.parametrize("profile", list(oscar.PROFILES))
def test_every_profile_seals_and_opens(
    es256_key: ec.EllipticCurvePrivateKey, eddsa_key: ed25519.Ed25519PrivateKey, profile: str
) -> None:
    chosen = oscar.PROFILES[profile]
    key: Any = es256_key if chosen.signature is oscar.algorithms.ES256 else eddsa_key
    data = _seal(key, profile=chosen)
    obj = MultiPartObject.from_bytes(data)
    assert obj.metadata.signature_algorithm is chosen.signature
    assert all(item.algorithm_id() == chosen.aead.cose_id for item in obj.items[1:])  # type: ignore[union-attr]
    reading = _open(data, key, OPERATOR)
    assert reading.part("location").plaintext == LOCATION  # type: ignore[union-attr]
    assert reading.not_granted == ("measurements",)


def test_aes_ccm_refuses_an_encrypted_part_over_64_kib_clearly(
    es256_key: ec.EllipticCurvePrivateKey,
) -> None:
    big = bytes(65_536)
    with pytest.raises(oscar.PlaintextTooLarge, match=r"part 'measurements'.*65535"):
        _seal(es256_key, parts=[Part("measurements", big, 42, CLINICIANS, 4)])
    # A plain part is not encrypted: no AEAD limit on it; GCM seals the large encrypted part.
    data = _seal(
        es256_key,
        parts=[Part("image", big, 42), Part("measurements", MEASUREMENTS, 50, CLINICIANS, 4)],
    )
    assert _open(data, es256_key, CLINICIAN).part("image").plaintext == big  # type: ignore[union-attr]
    gcm = _seal(
        es256_key,
        parts=[Part("measurements", big, 42, CLINICIANS, 4)],
        profile=oscar.PROFILES["a128gcm-es256"],
    )
    assert _open(gcm, es256_key, CLINICIAN).part("measurements").plaintext == big  # type: ignore[union-attr]


def test_bad_arguments_are_the_callers_error(es256_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="part name"):
        Part("no spaces", b"", 0)
    with pytest.raises(ValueError, match="neither secret nor epoch"):
        Part("a", b"", 0, CLINICIANS)
    with pytest.raises(ValueError, match="neither secret nor epoch"):
        Part("a", b"", 0, None, 3)
    with pytest.raises(TypeError):
        Part("a", "text", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="content format"):
        Part("a", b"", 70_000)
    with pytest.raises(ValueError, match="same name"):
        _seal(es256_key, parts=[*_parts(), Part("status", b"", 0)])
    many = [Part(f"p{i}", b"", 0, CLINICIANS, 1) for i in range(MAX_PARTS + 1)]
    with pytest.raises(ValueError, match="1 to 16"):
        _seal(es256_key, parts=many)
    assert _open(_seal(es256_key, parts=many[:MAX_PARTS]), es256_key, NOBODY).not_granted
    with pytest.raises(ValueError, match="signs with EdDSA"):
        _seal(es256_key, profile=oscar.PROFILES["ccm-eddsa"])
    with pytest.raises(ValueError, match="not of the form"):
        _seal(es256_key, resource_id="ward-8/bed-12")
    with pytest.raises(ValueError, match="exp"):
        _seal(es256_key, exp=IAT - 1)


def test_no_plaintext_or_secret_in_a_repr(es256_key: ec.EllipticCurvePrivateKey) -> None:
    reading = _open(_seal(es256_key), es256_key, BOTH)
    shown = repr(reading) + repr(reading.parts) + repr(_parts())
    for secret_bytes in (STATUS, MEASUREMENTS, LOCATION):
        assert secret_bytes.decode() not in shown
    assert CLINICIANS.value.hex() not in shown and "redacted" in shown


_NAMES = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,7}", fullmatch=True)


@settings(max_examples=40)
@given(
    layout=st.lists(
        st.tuples(_NAMES, st.binary(max_size=40), st.integers(0, 0xFFFF), st.booleans()),
        min_size=1,
        max_size=6,
        unique_by=lambda t: t[0],
    ).filter(lambda parts: any(encrypted for *_, encrypted in parts)),
    granted=st.sets(_NAMES, max_size=6),
    seq=st.integers(0, 2**64 - 1),
)
def test_any_layout_opens_to_exactly_the_granted_parts(
    es256_key: ec.EllipticCurvePrivateKey,
    layout: list[tuple[str, bytes, int, bool]],
    granted: set[str],
    seq: int,
) -> None:
    parts = [
        Part(name, body, cf, CLINICIANS, index) if encrypted else Part(name, body, cf)
        for index, (name, body, cf, encrypted) in enumerate(layout)
    ]
    data = _seal(es256_key, parts=parts, seq=seq)

    def lookup(resource_id: str, part: str, epoch: int) -> oscar.AccessSecret | None:
        return CLINICIANS if part in granted else None

    reading = _open(data, es256_key, lookup)
    readable = [p for p in parts if p.secret is None or p.name in granted]
    assert [(p.name, p.plaintext, p.content_format) for p in reading.parts] == [
        (p.name, p.plaintext, p.content_format) for p in readable
    ]
    assert list(reading.not_granted) == [
        p.name for p in parts if p.secret is not None and p.name not in granted
    ]
    assert reading.metadata.seq == seq
