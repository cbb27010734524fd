"""Seal, open and verify per second, against the bare primitives called through ``cryptography``.

For the profiles ``ccm-es256`` (the default: AES-CCM-16-64-128 + ES256) and ``a128gcm-es256``, and
plaintexts of 64 B, 1 KiB and 60 KiB:

- ``seal``: :meth:`oscar.Sealer.seal` as a producer calls it per object: one
  :class:`~oscar.Sealer` per (resource, epoch), made from :class:`~oscar.ContentKeys` derived once
  and a :class:`~oscar.SigningKey`, and a fresh ``seq`` each call. The extra row ``seal()`` calls
  the one-shot :func:`oscar.seal` with the same pre-derived keys (it builds a Sealer per call).
  Baseline: AEAD encrypt of the same plaintext with a fixed key and nonce and an AAD the size
  of our Enc_structure, then a deterministic (RFC 6979) ECDSA P-256 signature over a byte string
  the size of our Sig_structure (ciphertext plus about 100 bytes of headers).
- ``open``: :func:`oscar.open` with a :class:`~oscar.KeyCache` and the producer's public key as
  signer, wrapped once in a :class:`~oscar.ProducerKey`; one :class:`~oscar.FreshnessState` over a
  pool of objects sealed beforehand with increasing ``seq`` (a new state each time the pool starts
  over, so the freshness check never rejects). Baseline: ECDSA verify of the Sig_structure-sized
  string, then AEAD decrypt.
- ``verify``: :func:`oscar.verify` (no secret) against the bare ECDSA verify alone.

Three extra rows, default profile and 64 B only, show what the convenient arguments cost per call:
``seal+derive`` passes a bare :class:`~oscar.AccessSecret` (two HKDF calls and an AEAD key setup
per object; its baseline includes those primitives too), ``seal+rawkey`` a bare private key and
``verify+rawkey`` a bare public key (the kid, a SHA-256 over the key's DER encoding, recomputed per
object; same baselines as ``seal`` and ``verify``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import oscar
from oscar.algorithms import AeadAlgorithm, PublicKey

from . import SEAL_OPEN_MIN_RATIO as TARGET
from . import Figure, Operation, Settings, compare

__all__ = ["PROFILES", "SIZES", "run"]

PROFILES = ("ccm-es256", "a128gcm-es256")
SIZES = (64, 1024, 60 * 1024)
#: Issue 7's large object: 1 MiB under A128GCM (AES-CCM cannot seal more than 64 KiB).
LARGE = ("a128gcm-es256", 1 << 20)
#: Issue 7's floor for sealing and opening it, in MB/s (10^6 bytes of plaintext per second).
LARGE_MIN_MB_S = 100.0

PRODUCER = "sensor-1"
RESOURCE = "sensor-1/temperature"
EPOCH = 7
IAT = 1_700_000_000
EXP = IAT + 3600
NOW = IAT + 60
CONTENT_FORMAT = 60  # application/cbor
FIRST_SEQ = 1000
SECRET = oscar.AccessSecret(bytes(range(32)))

#: Total plaintext bytes kept in the pool of pre-sealed objects for ``open``.
POOL_BYTES = 8 << 20
POOL_MAX = 512

_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_ECDSA_VERIFY = ec.ECDSA(hashes.SHA256())


def _label(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20}MiB"
    return f"{size // 1024}KiB" if size >= 1024 and size % 1024 == 0 else f"{size}B"


def _bare_cipher(aead: AeadAlgorithm, key: bytes) -> AESCCM | AESGCM:
    if aead.name == "AES-CCM-16-64-128":
        return AESCCM(key, tag_length=aead.tag_length)
    return AESGCM(key)


class _Case:
    """Everything one (profile, size) case needs: keys, a sample object, bare-primitive inputs."""

    def __init__(self, profile_name: str, size: int, signing_key: ec.EllipticCurvePrivateKey):
        self.profile = oscar.profile_by_name(profile_name)
        self.aead = self.profile.aead
        self.size = size
        self.plaintext = bytes(i % 251 for i in range(size))
        self.private_key = signing_key
        self.signing_key = oscar.SigningKey.from_private_key(signing_key)
        self.public_key = signing_key.public_key()
        self.producer_key = oscar.ProducerKey.from_public_key(self.public_key)
        self.keys = oscar.ContentKeys.derive(SECRET, RESOURCE, EPOCH, self.aead)
        self.seq = FIRST_SEQ

        # Sizes of what oscar really feeds the primitives, taken from a sample object (untimed):
        # Enc_structure ["Encrypt0", protected, external_aad] and
        # Sig_structure ["Signature1", protected, h'', payload] (RFC 9052, DESIGN §4).
        sample = self.seal(self.keys, FIRST_SEQ)
        self.sample = sample
        obj = oscar.verify(sample, signer=self.producer_key, now=NOW)
        ext_aad = cbor2.dumps([PRODUCER, RESOURCE, EPOCH, FIRST_SEQ])
        aad = cbor2.dumps(["Encrypt0", obj.encrypt0.protected, ext_aad])
        tbs = cbor2.dumps(["Signature1", obj.sign1.protected, b"", obj.sign1.payload])

        # Bare-primitive inputs: a fixed key and nonce, same-size AAD and to-be-signed string.
        self.bare_key = bytes(range(100, 100 + self.aead.key_length))
        self.bare_nonce = bytes(range(self.aead.nonce_length))
        self.bare_aad = bytes(len(aad))
        self.bare_tbs = bytes(len(tbs))
        self.bare_cipher = _bare_cipher(self.aead, self.bare_key)
        self.bare_ciphertext = self.bare_cipher.encrypt(
            self.bare_nonce, self.plaintext, self.bare_aad
        )
        self.bare_signature = signing_key.sign(self.bare_tbs, _ECDSA)
        self.key_info = cbor2.dumps(
            ["OSCAR key", RESOURCE, EPOCH, self.aead.cose_id, self.aead.key_length]
        )
        self.iv_info = cbor2.dumps(
            ["OSCAR iv", RESOURCE, EPOCH, self.aead.cose_id, self.aead.nonce_length]
        )

    def name(self, what: str) -> str:
        return f"{what}/{self.profile.name}/{_label(self.size)}"

    def aead_label(self) -> str:
        return "AESCCM" if self.aead.name == "AES-CCM-16-64-128" else "AESGCM"

    def seal(
        self,
        secret: oscar.AccessSecret | oscar.ContentKeys,
        seq: int,
        signing_key: oscar.SigningKey | ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        return oscar.seal(
            secret=secret,
            producer_id=PRODUCER,
            resource_id=RESOURCE,
            epoch=EPOCH,
            seq=seq,
            iat=IAT,
            exp=EXP,
            content_format=CONTENT_FORMAT,
            plaintext=self.plaintext,
            signing_key=self.signing_key if signing_key is None else signing_key,
            profile=self.profile,
        )


class _SealerSeal:
    """``Sealer.seal`` n times, each with the next ``seq``: how a producer seals."""

    def __init__(self, case: _Case) -> None:
        self.case = case
        self.sealer = oscar.Sealer(
            secret=case.keys,
            producer_id=PRODUCER,
            resource_id=RESOURCE,
            epoch=EPOCH,
            signing_key=case.signing_key,
            profile=case.profile,
        )

    def __call__(self, n: int) -> None:
        case, seal, seq, plaintext = self.case, self.sealer.seal, self.case.seq, self.case.plaintext
        for _ in range(n):
            seq += 1
            seal(seq=seq, iat=IAT, exp=EXP, content_format=CONTENT_FORMAT, plaintext=plaintext)
        case.seq = seq


class _Seal:
    """``oscar.seal`` n times, each with the next ``seq``."""

    def __init__(
        self,
        case: _Case,
        secret: oscar.AccessSecret | oscar.ContentKeys,
        signing_key: oscar.SigningKey | ec.EllipticCurvePrivateKey,
    ) -> None:
        self.case = case
        self.secret = secret
        self.signing_key = signing_key

    def __call__(self, n: int) -> None:
        case, secret, key, seq = self.case, self.secret, self.signing_key, self.case.seq
        plaintext, profile, seal = case.plaintext, case.profile, oscar.seal
        for _ in range(n):
            seq += 1
            seal(
                secret=secret,
                producer_id=PRODUCER,
                resource_id=RESOURCE,
                epoch=EPOCH,
                seq=seq,
                iat=IAT,
                exp=EXP,
                content_format=CONTENT_FORMAT,
                plaintext=plaintext,
                signing_key=key,
                profile=profile,
            )
        case.seq = seq


class _BareSeal:
    """AEAD encrypt then ECDSA sign, n times (optionally deriving the keys first, as HKDF does)."""

    def __init__(self, case: _Case, derive: bool) -> None:
        self.case = case
        self.derive = derive

    def __call__(self, n: int) -> None:
        c = self.case
        cipher, nonce, plaintext, aad = c.bare_cipher, c.bare_nonce, c.plaintext, c.bare_aad
        key, tbs = c.private_key, c.bare_tbs
        klen, nlen = c.aead.key_length, c.aead.nonce_length
        for _ in range(n):
            if self.derive:
                k = HKDF(hashes.SHA256(), klen, None, c.key_info).derive(SECRET.value)
                HKDF(hashes.SHA256(), nlen, None, c.iv_info).derive(SECRET.value)
                cipher = _bare_cipher(c.aead, k)
            cipher.encrypt(nonce, plaintext, aad)
            key.sign(tbs, _ECDSA)


class _Open:
    """``oscar.open`` over a pool of objects with increasing seq, one FreshnessState per pass."""

    def __init__(self, case: _Case, pool_size: int) -> None:
        self.case = case
        self.pool = [case.seal(case.keys, FIRST_SEQ + 1 + i) for i in range(pool_size)]
        self.cache = oscar.KeyCache(lambda rid, epoch: SECRET)
        self.index = 0
        self.freshness = oscar.FreshnessState()
        reading = oscar.open(self.pool[0], secrets=self.cache, signer=case.producer_key, now=NOW)
        assert reading.plaintext == case.plaintext

    def __call__(self, n: int) -> None:
        pool, cache, signer = self.pool, self.cache, self.case.producer_key
        index, freshness, count = self.index, self.freshness, len(self.pool)
        for _ in range(n):
            if index == count:
                index, freshness = 0, oscar.FreshnessState()
            oscar.open(pool[index], secrets=cache, signer=signer, now=NOW, freshness=freshness)
            index += 1
        self.index, self.freshness = index, freshness


class _BareOpen:
    """ECDSA verify then AEAD decrypt, n times."""

    def __init__(self, case: _Case) -> None:
        self.case = case
        plaintext = case.bare_cipher.decrypt(case.bare_nonce, case.bare_ciphertext, case.bare_aad)
        assert plaintext == case.plaintext

    def __call__(self, n: int) -> None:
        c = self.case
        public_key, signature, tbs = c.public_key, c.bare_signature, c.bare_tbs
        cipher, nonce, ciphertext, aad = c.bare_cipher, c.bare_nonce, c.bare_ciphertext, c.bare_aad
        for _ in range(n):
            public_key.verify(signature, tbs, _ECDSA_VERIFY)
            cipher.decrypt(nonce, ciphertext, aad)


class _Verify:
    """``oscar.verify`` of one object, n times."""

    def __init__(self, case: _Case, signer: oscar.ProducerKey | PublicKey) -> None:
        self.case = case
        self.signer = signer

    def __call__(self, n: int) -> None:
        data, signer = self.case.sample, self.signer
        for _ in range(n):
            oscar.verify(data, signer=signer, now=NOW)


class _BareVerify:
    """ECDSA verify alone, n times."""

    def __init__(self, case: _Case) -> None:
        self.case = case

    def __call__(self, n: int) -> None:
        c = self.case
        public_key, signature, tbs = c.public_key, c.bare_signature, c.bare_tbs
        for _ in range(n):
            public_key.verify(signature, tbs, _ECDSA_VERIFY)


def _cases() -> Iterator[tuple[str, int]]:
    for profile_name in PROFILES:
        for size in SIZES:
            yield profile_name, size
    yield LARGE


def run(settings: Settings) -> Iterator[Figure]:
    """Yield one figure per case, in table order."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    for profile_name, size in _cases():
        case = _Case(profile_name, size, private_key)
        aead = case.aead_label()
        extra_rows = profile_name == PROFILES[0] and size == SIZES[0]
        pool_size = max(16, min(POOL_MAX, POOL_BYTES // size))
        if settings.quick:
            pool_size = max(16, pool_size // 4)
        seal_baseline = f"{aead}.encrypt + ECDSA-P256 sign"
        verify_baseline = "ECDSA-P256 verify"

        bare_seal = _BareSeal(case, derive=False)
        ours, base = compare(_SealerSeal(case), bare_seal, settings)
        yield Figure(case.name("seal"), ours, "ops/s", seal_baseline, base, TARGET)
        if size >= 1 << 20:
            yield _throughput("seal", case, ours, base)
        if extra_rows:
            ours, base = compare(_Seal(case, case.keys, case.signing_key), bare_seal, settings)
            yield Figure(case.name("seal()"), ours, "ops/s", seal_baseline, base)
            ours, base = compare(
                _Seal(case, SECRET, case.signing_key), _BareSeal(case, derive=True), settings
            )
            yield Figure(
                case.name("seal+derive"),
                ours,
                "ops/s",
                f"2x HKDF-SHA256 + {aead} key setup + {seal_baseline}",
                base,
            )
            ours, base = compare(_Seal(case, case.keys, case.private_key), bare_seal, settings)
            yield Figure(case.name("seal+rawkey"), ours, "ops/s", seal_baseline, base)
        ours, base = compare(_Open(case, pool_size), _BareOpen(case), settings)
        yield Figure(
            case.name("open"),
            ours,
            "ops/s",
            f"{verify_baseline} + {aead}.decrypt",
            base,
            TARGET,
        )
        if size >= 1 << 20:
            yield _throughput("open", case, ours, base)
            continue
        ours, base = compare(_Verify(case, case.producer_key), _BareVerify(case), settings)
        yield Figure(case.name("verify"), ours, "ops/s", verify_baseline, base)
        if extra_rows:
            ours, base = compare(_Verify(case, case.public_key), _BareVerify(case), settings)
            yield Figure(case.name("verify+rawkey"), ours, "ops/s", verify_baseline, base)
            if not settings.quick:
                yield from _instruction_figures(profile_name, size)


#: Operations per callgrind run (a second run makes three times as many; the difference is
#: what those extra operations cost, without the interpreter's start-up).
CALLGRIND_OPS = 100
_COUNTED = {
    "seal": "_SealerSeal",
    "bare-seal": "_BareSeal",
    "open": "_Open",
    "bare-open": "_BareOpen",
}


def _count(kind: str, profile_name: str, size: int, n: int) -> None:
    """Run ``n`` operations of ``kind`` after a warm-up (the body of a callgrind run)."""
    key = ec.derive_private_key(0x05CA12, ec.SECP256R1())
    case = _Case(profile_name, size, key)
    op: Operation
    if kind == "seal":
        op = _SealerSeal(case)
    elif kind == "bare-seal":
        op = _BareSeal(case, derive=False)
    elif kind == "open":
        op = _Open(case, 3 * CALLGRIND_OPS + 10)  # the same set-up work in both runs
    else:
        op = _BareOpen(case)
    op(10)
    op(n)


def _instructions(kind: str, profile_name: str, size: int) -> float | None:
    """Instructions per operation under callgrind, or None if valgrind is not installed.

    Counts, unlike times, do not depend on what else the machine is doing, nor on how warm the
    CPU's caches are: they show how much work is ours, where the timed rows also show cache
    effects (see bench/README.md)."""
    if shutil.which("valgrind") is None:
        return None
    totals = []
    for n in (CALLGRIND_OPS, 3 * CALLGRIND_OPS):
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                "-m",
                "bench.seal_open",
                kind,
                profile_name,
                str(size),
                str(n),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        found = re.search(r"Collected : (\d+)", result.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count from callgrind: {result.stderr[-500:]}")
        totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) / (2 * CALLGRIND_OPS)


def _instruction_figures(profile_name: str, size: int) -> Iterator[Figure]:
    for what in ("seal", "open"):
        ours = _instructions(what, profile_name, size)
        base = _instructions(f"bare-{what}", profile_name, size)
        if ours is None or base is None:
            print("  valgrind not installed: no instruction counts", flush=True)
            return
        yield Figure(
            f"instructions/{what}/{profile_name}/{_label(size)}",
            ours,
            "instructions/op",
            "the bare primitives, counted the same way (callgrind)",
            base,
            lower_is_better=True,
        )


def _throughput(what: str, case: _Case, ours_rate: float, base_rate: float) -> Figure:
    """The ops/s of a large case as MB/s of plaintext: issue 7's floor applies to ours."""
    return Figure(
        f"throughput/{what}/{case.profile.name}/{_label(case.size)}",
        ours_rate * case.size / 1e6,
        "MB/s",
        "the bare primitives (as the rows above)",
        base_rate * case.size / 1e6,
        min_value=LARGE_MIN_MB_S,
    )


if __name__ == "__main__":
    # python -m bench.seal_open KIND PROFILE SIZE N: the body of one callgrind run.
    _count(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
