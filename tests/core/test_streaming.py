"""Objects read as they arrive (oscar.streaming, oscar.aeadstream): the same answers as the one-shot
opener on every profile and every chunking, every tampering refused with no plaintext released."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

import oscar
from oscar import PROFILES, FreshnessState, InvalidObject, ProducerKey
from oscar.aeadstream import decrypt_to
from oscar.algorithms import CHACHA20_POLY1305, ES256
from oscar.cose import Sign1
from oscar.objects import ObjectReader, open_verified_stream, verify_stream
from oscar.streaming import HEADER_LIMIT
from testkit import NOW, PRODUCER, RESOURCE, SECRET, make_pki

KEYS: dict[str, Any] = {
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}
BIG = 64 << 20
LARGE_PROFILES = [p for p in PROFILES.values() if p.aead.max_plaintext is None]


def seal(profile: oscar.Profile, plaintext: bytes, *, seq: int = 7, **over: Any) -> bytes:
    args: dict[str, Any] = {
        "secret": SECRET,
        "producer_id": PRODUCER,
        "resource_id": RESOURCE,
        "epoch": 3,
        "seq": seq,
        "iat": NOW - 10,
        "exp": NOW + 60,
        "content_format": 42,
        "plaintext": plaintext,
        "signing_key": KEYS[profile.signature.name],
        "profile": profile,
    }
    args.update(over)
    return oscar.seal(**args)


def secrets(resource_id: str, epoch: int) -> oscar.AccessSecret | None:
    return SECRET if (resource_id, epoch) == (RESOURCE, 3) else None


def signer_of(data: bytes) -> Any:
    """The public key of the algorithm the object names (ES256's when it names none)."""
    try:
        eddsa = Sign1.from_bytes(data).protected_map.get(1) == -8
    except InvalidObject:
        eddsa = False
    return KEYS["EdDSA" if eddsa else "ES256"].public_key()


def chunks(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut into pieces of the sizes given, cycling; a size 0 is an empty feed."""
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos += n
        i += 1


class Opened:
    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    @property
    def plaintext(self) -> bytes:
        return b"".join(self.pieces)


def stream_open(
    data: bytes,
    sizes: Sequence[int] = (1024,),
    *,
    key: Any = None,
    max_size: int = BIG,
    freshness: FreshnessState | None = None,
    out: Opened | None = None,
    pass_size: int = 65536,
) -> tuple[oscar.ObjectMetadata, bytes]:
    """Feed, finish, verify, decrypt: the streaming path end to end."""
    reader = ObjectReader(max_size=max_size)
    for piece in chunks(data, sizes):
        reader.feed(piece)
    obj = reader.finish()
    verify_stream(obj, signer=key or signer_of(data), now=NOW, resource_id=RESOURCE)
    start, length = obj.ciphertext_offset, obj.ciphertext_length

    def ciphertext() -> Iterator[bytes]:
        for pos in range(start, start + length, pass_size):
            yield data[pos : min(pos + pass_size, start + length)]

    out = out if out is not None else Opened()
    m = open_verified_stream(
        obj, ciphertext, out.pieces.append, secrets=secrets, freshness=freshness
    )
    return m, out.plaintext


def one_shot(data: bytes, max_size: int = BIG) -> oscar.Reading:
    return oscar.open(
        data,
        secrets=secrets,
        signer=signer_of(data),
        now=NOW,
        resource_id=RESOURCE,
        max_size=max_size,
    )


# --- agreement --------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))
@settings(max_examples=15, deadline=None)
@given(
    length=st.integers(0, 3000),
    sizes=st.lists(st.integers(0, 700), min_size=1, max_size=6).filter(any),
)
def test_agrees_with_the_one_shot_opener(
    profile: oscar.Profile, length: int, sizes: list[int]
) -> None:
    data = seal(profile, os.urandom(length))
    reading = one_shot(data)
    metadata, plaintext = stream_open(data, sizes)
    assert metadata == reading.metadata
    assert plaintext == reading.plaintext


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))
def test_agrees_at_the_largest_sizes(profile: oscar.Profile) -> None:
    """CCM at its 65,535-byte ceiling; the others at 3 MiB (1 KiB and odd pieces); EdDSA up to
    the in-memory bound (see test_large_eddsa_is_refused_with_a_reason)."""
    if profile.aead.max_plaintext is not None:
        length = profile.aead.max_plaintext
    elif profile.signature.hashes_incrementally:
        length = 3 << 20
    else:
        length = 1 << 20
    data = seal(profile, os.urandom(length))
    reading = one_shot(data)
    for sizes in ((1024,), (7, 4093, 1), (len(data),)):
        metadata, plaintext = stream_open(data, sizes, pass_size=65_537)
        assert metadata == reading.metadata
        assert plaintext == reading.plaintext


def test_large_eddsa_is_refused_with_a_reason() -> None:
    data = seal(PROFILES["a128gcm-eddsa"], bytes(oscar.objects.DEFAULT_MAX_OBJECT_SIZE))
    reader = ObjectReader(max_size=BIG)
    with pytest.raises(InvalidObject) as caught:
        reader.feed(data[:2048])
    assert "use ES256" in caught.value.reason


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    aad=st.binary(max_size=80),
    plaintext=st.binary(max_size=5000),
    piece=st.integers(1, 300),
)
def test_chacha20_poly1305_composed_equals_the_one_shot(
    key: bytes, nonce: bytes, aad: bytes, plaintext: bytes, piece: int
) -> None:
    sealed = ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
    out: list[bytes] = []

    def passes() -> Iterator[bytes]:
        return chunks(sealed, [piece])

    decrypt_to(CHACHA20_POLY1305, key, nonce, aad, passes, len(sealed), out.append)
    assert b"".join(out) == plaintext
    for flip in (0, len(sealed) - 1, len(sealed) // 2):
        bad = bytearray(sealed)
        bad[flip] ^= 1
        out.clear()
        with pytest.raises(InvalidObject):
            decrypt_to(
                CHACHA20_POLY1305, key, nonce, aad, lambda b=bytes(bad): [b], len(bad), out.append
            )
        assert out == []


# --- tampering --------------------------------------------------------------------------------


def refused_by_both(data: bytes, sizes: Sequence[int] = (1024,), **kw: Any) -> None:
    out = Opened()
    with pytest.raises(InvalidObject):
        one_shot(data)
    with pytest.raises(InvalidObject):
        stream_open(data, sizes, out=out, **kw)
    assert out.pieces == [], "plaintext released by a refused object"


@pytest.mark.parametrize(
    "profile", [*LARGE_PROFILES[:1], PROFILES["ccm-es256"]], ids=lambda p: p.name
)
def test_every_single_bit_flip_is_refused_by_both(profile: oscar.Profile) -> None:
    data = seal(profile, b"x" * 40)
    for pos in range(len(data)):
        for bit in (0, 7):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            refused_by_both(bytes(bad), (3,))


@pytest.mark.parametrize("profile", [PROFILES["a128gcm-es256"], PROFILES["chacha20-es256"]])
def test_large_object_tampering_is_refused(profile: oscar.Profile) -> None:
    data = seal(profile, os.urandom(2 << 20))
    obj = ObjectReader(max_size=BIG)
    obj.feed(data)
    parsed = obj.finish()
    start, end = parsed.ciphertext_offset, parsed.ciphertext_offset + parsed.ciphertext_length
    cases = {
        "header": 20,
        "first ciphertext byte": start,
        "middle": (start + end) // 2,
        "tag": end - 1,
        "signature": len(data) - 5,
    }
    for pos in cases.values():
        bad = bytearray(data)
        bad[pos] ^= 0x40
        refused_by_both(bytes(bad))
    refused_by_both(data + b"\x00")  # trailing byte
    for cut in (10, start - 1, start + 5000, end, len(data) - 1):
        refused_by_both(data[:cut])  # truncated


def resigned(data: bytes, flip: int) -> bytes:
    """``data`` with one ciphertext byte (``flip`` from the ciphertext's end) changed and signed
    again by the producer's key: the signature verifies, only the AEAD tag can refuse it."""
    sign1 = Sign1.from_bytes(data)
    reader = ObjectReader(max_size=BIG)
    reader.feed(data)
    obj = reader.finish()
    payload_start = len(data) - 2 - 64 - len(sign1.payload)
    pos = obj.ciphertext_offset + obj.ciphertext_length - flip - payload_start
    payload = bytearray(sign1.payload)
    payload[pos] ^= 1
    tbs = Sign1.to_be_signed(sign1.protected, bytes(payload))
    signature = ES256.sign(KEYS["ES256"], tbs)
    return Sign1(sign1.protected, sign1.protected_map, {}, bytes(payload), signature).to_bytes()


@pytest.mark.parametrize(
    "profile", [p for p in LARGE_PROFILES if p.signature is ES256], ids=lambda p: p.name
)
@pytest.mark.parametrize("flip", [1, 16, 1000, 100_000])
def test_a_signed_but_forged_ciphertext_releases_nothing(profile: oscar.Profile, flip: int) -> None:
    data = resigned(seal(profile, os.urandom(300_000)), flip)
    with pytest.raises(InvalidObject) as caught:
        one_shot(data)
    assert caught.value.reason == "decryption failed"
    out = Opened()
    with pytest.raises(InvalidObject) as caught:
        stream_open(data, out=out)
    assert caught.value.reason == "decryption failed"
    assert out.pieces == []


def test_the_size_limit_comes_first() -> None:
    data = seal(PROFILES["a128gcm-es256"], os.urandom(100_000))
    reader = ObjectReader(max_size=len(data) - 1)
    with pytest.raises(InvalidObject) as caught:
        reader.feed(data[:200])  # the payload's announced length cannot fit
    assert caught.value.reason == "object exceeds the size limit (announced)"
    reader = ObjectReader(max_size=50)
    with pytest.raises(InvalidObject) as caught:
        reader.feed(data[:51])
    assert caught.value.reason == "object exceeds the size limit"
    with pytest.raises(InvalidObject):  # spent
        reader.feed(b"")
    with pytest.raises(InvalidObject):
        reader.finish()


def test_headers_past_the_limit_are_refused() -> None:
    reader = ObjectReader(max_size=BIG)
    # A tagged Sign1 whose protected header claims more bytes than any valid header has.
    junk = b"\xd2\x84\x59\xff\xff" + bytes(HEADER_LIMIT)
    with pytest.raises(InvalidObject) as caught:
        reader.feed(junk)
    assert caught.value.reason == "headers longer than any valid object's"


# --- the checks around decryption are the one-shot's ----------------------------------------


def test_freshness_is_checked_and_recorded() -> None:
    freshness = FreshnessState()
    profile = PROFILES["a256gcm-es256"]
    stream_open(seal(profile, b"new", seq=9), freshness=freshness)
    assert freshness.newest(RESOURCE) == (3, 9)
    out = Opened()
    with pytest.raises(InvalidObject):
        stream_open(seal(profile, b"old", seq=8), freshness=freshness, out=out)
    assert out.pieces == []


def test_certificate_checks_are_unchanged() -> None:
    pki = make_pki()
    other = make_pki("sensor-2")
    profile = PROFILES["a128gcm-es256"]
    data = seal(profile, b"v" * 5000, signing_key=pki.producer_key)
    reader = ObjectReader()
    reader.feed(data)
    obj = reader.finish()
    anchor = pki.ca_cert
    verify_stream(obj, signer=pki.producer_cert, now=NOW, trust_anchor=anchor)
    key = ProducerKey.from_certificate(pki.producer_cert, anchor, now=NOW)
    verify_stream(obj, signer=key, now=NOW, trust_anchor=anchor, resource_id=RESOURCE)
    refusals = [
        {"signer": other.producer_cert, "trust_anchor": other.ca_cert},  # names sensor-2
        {"signer": pki.producer_cert, "trust_anchor": other.ca_cert},  # another CA
        {"signer": pki.producer_cert, "trust_anchor": anchor, "revoked_serials": {1000}},
        {"signer": key, "trust_anchor": anchor, "resource_id": "sensor-1/other"},
        {"signer": pki.producer_cert.public_key()},  # a bare key that is not the kid's
    ]
    refusals[-1]["signer"] = KEYS["ES256"].public_key()
    for kw in refusals:
        with pytest.raises(InvalidObject):
            verify_stream(obj, now=NOW, **kw)
    with pytest.raises(InvalidObject):  # expired
        verify_stream(obj, signer=key, now=NOW + 61, trust_anchor=anchor)
