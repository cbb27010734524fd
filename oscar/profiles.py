"""Security profiles: the short fixed list of (AEAD, signature) pairs a resource may use.

A profile is named ``<aead>-<signature>``, for example ``ccm-es256`` (the default) or
``a128gcm-eddsa``. There is no profile without encryption or without a signature. Large
representations (over 65,535 bytes) need a GCM or ChaCha20/Poly1305 profile.

Lookups by name are for configuration and the command line: an unknown name is a ``ValueError``
that lists the valid ones. This module does no cryptography itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .algorithms import (
    A128GCM,
    A256GCM,
    AEADS,
    AES_CCM_16_64_128,
    CHACHA20_POLY1305,
    EDDSA,
    ES256,
    AeadAlgorithm,
    SignatureAlgorithm,
)

__all__ = ["DEFAULT_PROFILE", "PROFILES", "Profile", "aead_by_name", "profile_by_name"]


@dataclass(frozen=True, slots=True)
class Profile:
    """A named choice of content encryption and signature algorithm."""

    name: str
    aead: AeadAlgorithm
    signature: SignatureAlgorithm


_AEAD_SHORT = {
    AES_CCM_16_64_128.cose_id: "ccm",
    A128GCM.cose_id: "a128gcm",
    A256GCM.cose_id: "a256gcm",
    CHACHA20_POLY1305.cose_id: "chacha20",
}
_SIG_SHORT = {ES256.cose_id: "es256", EDDSA.cose_id: "eddsa"}

PROFILES: dict[str, Profile] = {}
for _aead in (AES_CCM_16_64_128, A128GCM, A256GCM, CHACHA20_POLY1305):
    for _sig in (ES256, EDDSA):
        _name = f"{_AEAD_SHORT[_aead.cose_id]}-{_SIG_SHORT[_sig.cose_id]}"
        PROFILES[_name] = Profile(_name, _aead, _sig)
del _aead, _sig, _name

DEFAULT_PROFILE = PROFILES["ccm-es256"]

_AEAD_ALIASES = {
    "aes-ccm-16-64-128": AES_CCM_16_64_128,
    "ccm": AES_CCM_16_64_128,
    "a128gcm": A128GCM,
    "a256gcm": A256GCM,
    "chacha20/poly1305": CHACHA20_POLY1305,
    "chacha20-poly1305": CHACHA20_POLY1305,
    "chacha20": CHACHA20_POLY1305,
}


def profile_by_name(name: str) -> Profile:
    """The profile called ``name`` (any case); ValueError naming the valid ones otherwise."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown security profile {name!r}; choose one of {', '.join(PROFILES)}"
        ) from None


def profile_for(aead: AeadAlgorithm, signature: SignatureAlgorithm) -> Profile:
    """The profile made of exactly these two algorithms."""
    return PROFILES[f"{_AEAD_SHORT[aead.cose_id]}-{_SIG_SHORT[signature.cose_id]}"]


def aead_by_name(text: str) -> AeadAlgorithm:
    """An AEAD by COSE name or numeric id (``A128GCM``, ``1``, ``AES-CCM-16-64-128``, ``10`` …)."""
    key = text.strip().lower()
    if key in _AEAD_ALIASES:
        return _AEAD_ALIASES[key]
    try:
        number = int(key)
    except ValueError:
        number = None
    if number is not None and number in AEADS:
        return AEADS[number]
    raise ValueError(
        f"unknown or unsupported AEAD {text!r}; choose AES-CCM-16-64-128 (10), A128GCM (1), "
        "A256GCM (3) or ChaCha20/Poly1305 (24)"
    )
