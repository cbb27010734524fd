"""RFC 5869 Appendix A (HKDF-SHA256) against ``oscar.keys.hkdf_sha256`` and an independent HKDF.

The independent HKDF below is written from RFC 5869 §2 with ``hmac``/``hashlib`` only, so the file,
the library and the RFC's own arithmetic must all agree.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from oscar.keys import hkdf_sha256

VECTORS = Path(__file__).parents[1] / "vectors"
CASES: list[dict[str, Any]] = json.loads((VECTORS / "rfc5869-hkdf.json").read_text())["cases"]
HASH_LEN = 32


def _extract(salt: bytes, ikm: bytes) -> bytes:
    # RFC 5869 §2.2: a missing salt is HashLen zero bytes.
    return hmac.new(salt or bytes(HASH_LEN), ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 §2.3: T(i) = HMAC(PRK, T(i-1) | info | i), i from 1.
    assert length <= 255 * HASH_LEN
    block = b""
    okm = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def _case(case: dict[str, Any]) -> tuple[bytes, bytes, bytes, int, bytes, bytes]:
    return (
        bytes.fromhex(case["ikm_hex"]),
        bytes.fromhex(case["salt_hex"]),
        bytes.fromhex(case["info_hex"]),
        case["L"],
        bytes.fromhex(case["prk_hex"]),
        bytes.fromhex(case["okm_hex"]),
    )


def test_file_holds_the_three_sha256_cases() -> None:
    assert [c["name"] for c in CASES] == ["A.1", "A.2", "A.3"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_independent_hkdf_matches_rfc(case: dict[str, Any]) -> None:
    ikm, salt, info, length, prk, okm = _case(case)
    assert _extract(salt, ikm) == prk
    assert _expand(prk, info, length) == okm


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_oscar_hkdf_matches_rfc(case: dict[str, Any]) -> None:
    ikm, salt, info, length, _prk, okm = _case(case)
    assert hkdf_sha256(ikm, info, length, salt=salt) == okm


def test_oscar_hkdf_default_salt_is_the_empty_salt_of_a3() -> None:
    # OSCAR derives with an empty salt (DESIGN §4); A.3 is exactly that case.
    ikm, _salt, info, length, _prk, okm = _case(CASES[2])
    assert hkdf_sha256(ikm, info, length) == okm
