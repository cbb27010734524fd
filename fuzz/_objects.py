"""A fixed producer key, access secret and clock, and objects sealed with them (seed corpora)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from oscar import AccessSecret, ProducerKey, profile_by_name, seal

__all__ = ["ED_KEY", "ES_KEY", "NOW", "PRODUCER", "RESOURCE", "SECRET", "sealed", "signer_for"]

NOW = 1_800_000_000
PRODUCER = "sensor-1"
RESOURCE = "sensor-1/temperature"
SECRET = AccessSecret(bytes(range(32)))
#: Fixed keys: the fuzz input, not the key, is what varies (and Ed25519 signs deterministically).
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
ES_KEY = ec.derive_private_key(0x0123456789ABCDEF, ec.SECP256R1())
ED_SIGNER = ProducerKey.from_public_key(ED_KEY.public_key(), PRODUCER)
ES_SIGNER = ProducerKey.from_public_key(ES_KEY.public_key(), PRODUCER)


def signer_for(kid: bytes) -> ProducerKey:
    """The fixed key the kid names (the Ed25519 one for any unknown kid)."""
    return ES_SIGNER if kid == ES_SIGNER.kid else ED_SIGNER


def sealed() -> list[bytes]:
    """Objects of every profile, sizes from empty to a few hundred bytes, small and large seqs."""
    objects = []
    for i, name in enumerate(
        ("ccm-eddsa", "a128gcm-eddsa", "a256gcm-eddsa", "chacha20-eddsa", "ccm-es256")
    ):
        profile = profile_by_name(name)
        key = ES_KEY if profile.signature.cose_id == -7 else ED_KEY
        for seq, size in ((0, 0), (300 + i, 20), (2**40 + i, 300)):
            objects.append(
                seal(
                    secret=SECRET,
                    producer_id=PRODUCER,
                    resource_id=RESOURCE,
                    epoch=1 + i,
                    seq=seq,
                    iat=NOW - 10,
                    exp=NOW + 3600,
                    content_format=i * 50,
                    plaintext=bytes(range(size % 256)) * (size // 256 + 1),
                    signing_key=key,
                    profile=profile,
                )
            )
    return objects
