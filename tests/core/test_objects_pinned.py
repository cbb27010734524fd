"""The fast paths of oscar.objects against the generic COSE layer they stand in for.

``ProtectedObject.from_bytes`` first reads the pinned layout field by field (``read_pinned``) and
falls back to the generic strict decoder (``read_generic``) for anything else; ``Sealer.seal``
writes the layout directly instead of through ``cose.Sign1``/``cose.Encrypt0``. These tests hold
both to the generic code: the same decoded object for every valid input, the same verdict for
every mutation of one, and the same bytes out of the sealer as the generic encoder makes.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

import oscar
from oscar import PROFILES, InvalidObject, cbor
from oscar.decoding import read_generic
from oscar.pinned import read_pinned
from testkit import NOW, SECRET

KEYS = {
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", fullmatch=True)
segments = st.lists(
    st.from_regex(r"[A-Za-z0-9._~-]{1,40}", fullmatch=True).filter(lambda s: s not in (".", "..")),
    min_size=1,
    max_size=5,
)
uints = st.one_of(
    st.integers(0, 30), st.integers(0, 2**16), st.integers(0, 2**32), st.integers(0, 2**64 - 1)
)


def seal(
    profile: oscar.Profile,
    producer: str = "sensor-1",
    path: str = "temperature",
    *,
    epoch: int = 3,
    seq: int = 7,
    iat: int = NOW - 10,
    exp: int = NOW + 60,
    content_format: int = 50,
    plaintext: bytes = b"21.5",
) -> bytes:
    return oscar.seal(
        secret=SECRET,
        producer_id=producer,
        resource_id=f"{producer}/{path}",
        epoch=epoch,
        seq=seq,
        iat=iat,
        exp=exp,
        content_format=content_format,
        plaintext=plaintext,
        signing_key=KEYS[profile.signature.name],
        profile=profile,
    )


def generic(data: bytes) -> Any:
    """The generic decoder's verdict: the decoded object, or the InvalidObject class."""
    try:
        return read_generic(data)
    except InvalidObject:
        return InvalidObject


def decoded(data: bytes) -> Any:
    """What the library does (pinned reader first): the object, or the InvalidObject class."""
    try:
        return oscar.ProtectedObject.from_bytes(data)
    except InvalidObject:
        return InvalidObject


def reencode(obj: oscar.ProtectedObject) -> bytes:
    """The generic COSE layer's encoding of a decoded object."""
    inner = oscar.cose.Encrypt0(
        cbor.dumps(obj.encrypt0.protected_map),
        {},
        obj.encrypt0.unprotected,
        obj.encrypt0.ciphertext,
    ).to_bytes()
    return oscar.cose.Sign1(
        cbor.dumps(obj.sign1.protected_map), {}, {}, inner, obj.sign1.signature
    ).to_bytes()


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(PROFILES)),
    producer=ids,
    path=segments.map("/".join),
    epoch=uints,
    seq=uints,
    iat=st.integers(0, 2**63),
    lifetime=st.integers(0, 2**32),
    content_format=st.integers(0, 0xFFFF),
    plaintext=st.one_of(st.binary(max_size=80), st.integers(0, 65_535).map(bytes)),
)
def test_pinned_reader_and_generic_decoder_agree_on_valid_objects(
    name: str,
    producer: str,
    path: str,
    epoch: int,
    seq: int,
    iat: int,
    lifetime: int,
    content_format: int,
    plaintext: bytes,
) -> None:
    resource = f"{producer}/{path}"
    if len(resource) > 255:
        path = path[: 255 - len(producer) - 1].rstrip("/") or "x"
        if path.endswith(("/.", "/..")) or path in (".", ".."):
            path = "x"
    data = seal(
        PROFILES[name],
        producer,
        path,
        epoch=epoch,
        seq=seq,
        iat=iat,
        exp=min(iat + lifetime, 2**64 - 1),
        content_format=content_format,
        plaintext=plaintext,
    )
    parts = read_pinned(data)
    assert parts is not None, "a sealer's output must take the fast path"
    pinned = oscar.ProtectedObject(*parts)
    assert pinned == read_generic(data)
    # The sealer writes exactly what the generic COSE encoder writes for the same content.
    assert reencode(pinned) == data


def _mutations(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        for value in {data[i] ^ 0x01, data[i] ^ 0x80, data[i] ^ 0xFF, 0x00, 0x18, 0x40, 0xA0}:
            out.append(data[:i] + bytes([value]) + data[i + 1 :])
        out.append(data[:i])  # truncation
        out.append(data[:i] + data[i + 1 :])  # a byte dropped
        out.append(data[:i] + b"\x00" + data[i:])  # a byte inserted
    out.append(data + b"\x00")
    return out


@pytest.mark.parametrize("name", ["ccm-es256", "a128gcm-eddsa"])
def test_every_mutation_gets_the_generic_decoders_verdict(name: str) -> None:
    data = seal(PROFILES[name])
    for mutated in _mutations(data):
        assert decoded(mutated) == generic(mutated), mutated.hex()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_edits_get_the_generic_decoders_verdict(data: st.DataObject) -> None:
    obj = bytearray(seal(PROFILES[data.draw(st.sampled_from(sorted(PROFILES)))]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(obj) - 1))
        obj[i] = data.draw(st.integers(0, 255))
    mutated = bytes(obj)
    assert decoded(mutated) == generic(mutated)


def test_valid_but_unpinned_encodings_take_the_generic_path() -> None:
    """Header labels out of the canonical order are still strict CBOR and a valid object: the
    fast path declines, the generic decoder accepts, and the signature covers the bytes sent."""
    key = KEYS["ES256"]
    obj = oscar.ProtectedObject.from_bytes(seal(PROFILES["ccm-es256"]))
    header = obj.sign1.protected_map
    reordered = {k: header[k] for k in reversed(list(header))}
    sign1 = oscar.cose.Sign1.sign(reordered, {}, obj.sign1.payload, key, oscar.algorithms.ES256)
    data = sign1.to_bytes()
    assert read_pinned(data) is None
    accepted = oscar.verify(data, signer=key.public_key(), now=NOW)
    assert accepted.metadata == obj.metadata


@pytest.mark.parametrize("size", [0, 23, 24, 255, 256, 65_535, 65_536, 200_000])
def test_every_byte_string_head_length(size: int) -> None:
    data = seal(PROFILES["a128gcm-es256"], plaintext=bytes(size))
    pinned = read_pinned(data)
    assert pinned is not None and pinned == read_generic(data)
    reading = oscar.open(
        data, secrets=lambda rid, e: SECRET, signer=KEYS["ES256"].public_key(), now=NOW
    )
    assert reading.plaintext == bytes(size)


def test_external_aad_is_the_cbor_array() -> None:
    for args in [("a", "a/b", 0, 0), ("sensor-1", "sensor-1/x/y", 2**32, 2**64 - 1)]:
        assert oscar.objects.external_aad(*args) == cbor.dumps(list(args))


@pytest.mark.parametrize(
    ("enc_header", "seq_in_header"),
    [
        ({1: 10, 3: 0x10000}, 7),  # content format out of CoAP's range
        ({1: 10, 3: 50}, 8),  # the signed seq is not the Partial IV
        ({1: 99, 3: 50}, 7),  # unknown AEAD
    ],
)
def test_laid_out_right_but_invalid_is_refused_by_both_paths(
    enc_header: dict[int, int], seq_in_header: int
) -> None:
    """Objects in the pinned layout, signed by the right key, that break a rule the layout does
    not show: the fast path must not accept what the generic decoder refuses."""
    key = KEYS["ES256"]
    good = oscar.ProtectedObject.from_bytes(seal(PROFILES["ccm-es256"]))
    inner = oscar.cose.Encrypt0(
        cbor.dumps(enc_header), enc_header, {6: b"\x07"}, good.encrypt0.ciphertext
    ).to_bytes()
    header = dict(good.sign1.protected_map)
    header[-65538] = seq_in_header
    data = oscar.cose.Sign1.sign(header, {}, inner, key, oscar.algorithms.ES256).to_bytes()
    assert generic(data) is InvalidObject
    assert decoded(data) is InvalidObject
    with pytest.raises(InvalidObject):
        oscar.verify(data, signer=key.public_key(), now=NOW)
