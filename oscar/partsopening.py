"""Verifying and opening multi-part objects (:mod:`oscar.parts`): checks 4 to 8, per part.

:func:`verify_parts` checks a multi-part object without any secret (the proxy's view): the
resource asked for, the signer, the one signature over every part, expiry and ``iat``.
:func:`open_parts` verifies, checks freshness, then opens every part the caller holds a secret
for, and says which it could not open: a plain part is always opened; an encrypted part whose
secret the caller's lookup does not give is *not granted*. :func:`open_parts_verified` is the
second half, for a caller that fetches secrets after the signature has been checked.

All or nothing: the signature covers every part, their order and the descriptor list, so any
tampering fails before any part is read; a granted part that does not authenticate fails the
whole object. Every failure raises the one opaque :class:`~oscar.errors.InvalidObject` and returns
no part, no plaintext and records nothing.

What this module does not do: decode (:meth:`oscar.parts.MultiPartObject.from_bytes`), look up
certificates or secrets itself, or keep time (``now`` is an argument).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import NamedTuple

from cryptography import x509

from .algorithms import aead_for
from .cose import Encrypt0
from .errors import InvalidObject
from .freshness import FreshnessState
from .keys import AccessSecret, ContentKeys
from .model import DEFAULT_MAX_CLOCK_SKEW, DEFAULT_MAX_OBJECT_SIZE
from .opening import Signer, SignerLookup, resolve_signer
from .parts import MultiPartObject, PartsMetadata, part_external_aad

__all__ = [
    "OpenedPart",
    "PartSecretLookup",
    "PartsReading",
    "open_parts",
    "open_parts_verified",
    "verify_parts",
]

#: Finds the access secret of (resource id, part name, epoch), or None when the caller has none.
PartSecretLookup = Callable[[str, str, int], "AccessSecret | None"]


class OpenedPart(NamedTuple):
    """One part read: its name, content format, bytes, and its epoch (None for a plain part).
    Its ``repr`` leaves the plaintext out."""

    name: str
    content_format: int
    plaintext: bytes
    epoch: int | None

    def __repr__(self) -> str:
        return (
            f"OpenedPart(name={self.name!r}, content_format={self.content_format}, "
            f"epoch={self.epoch}, length={len(self.plaintext)})"
        )


class PartsReading(NamedTuple):
    """An opened multi-part object: the parts read (in object order), the names of the encrypted
    parts the caller holds no secret for (``not_granted``), and the signed metadata."""

    parts: tuple[OpenedPart, ...]
    not_granted: tuple[str, ...]
    metadata: PartsMetadata

    def part(self, name: str) -> OpenedPart | None:
        """The part called ``name`` if it was read, else None."""
        return next((p for p in self.parts if p.name == name), None)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"PartsReading(resource_id={m.resource_id!r}, seq={m.seq}, "
            f"opened={[p.name for p in self.parts]}, not_granted={list(self.not_granted)})"
        )


def verify_parts(
    data: bytes | MultiPartObject,
    *,
    signer: Signer | SignerLookup,
    now: int,
    resource_id: str | None = None,
    trust_anchor: x509.Certificate | None = None,
    revoked_serials: Container[int] = (),
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
    max_size: int = DEFAULT_MAX_OBJECT_SIZE,
) -> MultiPartObject:
    """Check a multi-part object without any secret: structure, resource, signer, signature,
    times, exactly as :func:`oscar.opening.verify` checks a single-part one (same arguments).
    Returns the decoded object; raises :class:`InvalidObject` if any check fails."""
    obj = (
        data
        if isinstance(data, MultiPartObject)
        else MultiPartObject.from_bytes(data, max_size=max_size)
    )
    m = obj.metadata
    if resource_id is not None and m.resource_id != resource_id:
        raise InvalidObject("object is for another resource")
    public_key = resolve_signer(m, signer, now, trust_anchor, revoked_serials)
    obj.sign1.verify(public_key, m.signature_algorithm)
    if now > m.exp:
        raise InvalidObject("object expired")
    if m.iat > now + max_clock_skew:
        raise InvalidObject("object issued in the future")
    return obj


def open_parts(
    data: bytes,
    *,
    secrets: PartSecretLookup,
    signer: Signer | SignerLookup,
    now: int,
    resource_id: str | None = None,
    freshness: FreshnessState | None = None,
    trust_anchor: x509.Certificate | None = None,
    revoked_serials: Container[int] = (),
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
    max_size: int = DEFAULT_MAX_OBJECT_SIZE,
) -> PartsReading:
    """Verify (:func:`verify_parts`), check freshness, open every part the caller may read.

    ``secrets(resource id, part name, epoch)`` gives the part's access secret or None (that part
    is then *not granted*). With ``freshness`` the object's seq must be newer than every object
    accepted before for its resource (under epoch 0: see :mod:`oscar.parts`), and is recorded
    once every granted part has opened. Raises :class:`InvalidObject` if any check fails; then
    nothing is returned and nothing recorded.
    """
    obj = verify_parts(
        data,
        signer=signer,
        now=now,
        resource_id=resource_id,
        trust_anchor=trust_anchor,
        revoked_serials=revoked_serials,
        max_clock_skew=max_clock_skew,
        max_size=max_size,
    )
    return open_parts_verified(obj, secrets=secrets, freshness=freshness)


def open_parts_verified(
    obj: MultiPartObject,
    *,
    secrets: PartSecretLookup,
    freshness: FreshnessState | None = None,
) -> PartsReading:
    """The second half of :func:`open_parts`, for an object :func:`verify_parts` has just
    accepted: freshness, decryption of the granted parts, record. :class:`InvalidObject`."""
    m = obj.metadata
    if freshness is not None:
        freshness.check(m.resource_id, m.epoch, m.seq)
    opened: list[OpenedPart] = []
    not_granted: list[str] = []
    for descriptor, item in zip(m.parts, obj.items, strict=True):
        if not isinstance(item, Encrypt0):
            opened.append(OpenedPart(descriptor.name, descriptor.content_format, item, None))
            continue
        epoch = descriptor.epoch or 0  # an encrypted descriptor always has one
        secret = secrets(m.resource_id, descriptor.name, epoch)
        if secret is None:
            not_granted.append(descriptor.name)
            continue
        plaintext = _decrypt(obj, item, secret, descriptor.name, epoch)
        opened.append(OpenedPart(descriptor.name, descriptor.content_format, plaintext, epoch))
    if freshness is not None:
        freshness.accept(m.resource_id, m.epoch, m.seq)
    return PartsReading(tuple(opened), tuple(not_granted), m)


def _decrypt(
    obj: MultiPartObject, item: Encrypt0, secret: AccessSecret, name: str, epoch: int
) -> bytes:
    m = obj.metadata
    try:
        aead = aead_for(item.algorithm_id())  # checked by the decoder: a known AEAD
        keys = ContentKeys.derive_part(secret, m.resource_id, name, epoch, aead)
    except (TypeError, ValueError):
        raise InvalidObject("no usable access secret for a part") from None
    aad = Encrypt0.to_be_encrypted(
        item.protected, part_external_aad(m.producer_id, m.resource_id, epoch, m.seq, name)
    )
    return aead.decrypt(keys.cipher, keys.nonce(m.seq), item.ciphertext, aad)
