"""The ``oscar`` operator tool: every subcommand, every error exit, and the module entry point.

Most tests call :func:`oscar_io.tool.main` in-process; a few run ``python -m oscar_io`` as a real
subprocess to prove the entry point and stdin/stdout with ``-``. Times are pinned with
``--iat``/``--exp``/``--now``, so nothing sleeps.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from oscar import AccessSecret, Part, certs, profile_by_name, seal_parts
from oscar.algorithms import ES256, PrivateKey, signature_algorithm_of_key
from oscar.cose import Sign1
from oscar.objects import ProtectedObject
from oscar_io.tool import main

NOW = 1_800_000_000
SECRET_HEX = bytes(range(32)).hex()
WRONG_SECRET_HEX = bytes(range(1, 33)).hex()
PRODUCER = "sensor-1"
RESOURCE = "sensor-1/temperature"
PLAINTEXT = b"temperature=21.5C do-not-leak"
ERROR_LINE = re.compile(r"^oscar(?: [a-z]+)?: error: \S")

AEADS = [
    ("AES-CCM-16-64-128", 10),
    ("10", 10),
    ("ccm", 10),
    ("A128GCM", 1),
    ("1", 1),
    ("A256GCM", 3),
    ("3", 3),
    ("ChaCha20/Poly1305", 24),
    ("24", 24),
]


@dataclass(frozen=True)
class Result:
    code: int
    out: bytes
    err: str


Run = Callable[..., Result]


@dataclass(frozen=True)
class Pems:
    """PEM files: a key pair per algorithm, a CA, producer certificates, and a stranger CA."""

    private: dict[str, Path]
    public: dict[str, Path]
    cert_key: Path
    cert: Path
    other_device_cert: Path
    ca: Path
    wrong_ca: Path


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.make_ca_certificate(
        key, name, serial=1, not_before=NOW - 86_400, not_after=NOW + 10 * 86_400
    )
    return key, cert


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Pems:
    d = tmp_path_factory.mktemp("pems")
    private, public = {}, {}
    for alg in ("ES256", "EdDSA"):
        key = certs.generate_signing_key(alg)
        private[alg] = d / f"{alg}.key.pem"
        private[alg].write_bytes(certs.private_key_pem(key))
        public[alg] = d / f"{alg}.pub.pem"
        public[alg].write_bytes(public_pem(key))

    ca_key, ca_cert = make_ca("OSCAR test CA")
    _, wrong_ca_cert = make_ca("Another CA")
    producer_key = ec.generate_private_key(ec.SECP256R1())

    def issue(device: str, path: Path) -> Path:
        csr = certs.make_csr(producer_key, device)
        cert = certs.issue_certificate(
            csr, device, ca_cert, ca_key, serial=1000, not_before=NOW - 3600, not_after=NOW + 86_400
        )
        path.write_bytes(cert_pem(cert))
        return path

    (d / "producer.key.pem").write_bytes(certs.private_key_pem(producer_key))
    (d / "ca.pem").write_bytes(cert_pem(ca_cert))
    (d / "wrong-ca.pem").write_bytes(cert_pem(wrong_ca_cert))
    return Pems(
        private,
        public,
        d / "producer.key.pem",
        issue(PRODUCER, d / "producer.cert.pem"),
        issue("sensor-2", d / "other.cert.pem"),
        d / "ca.pem",
        d / "wrong-ca.pem",
    )


@pytest.fixture
def run(capsysbinary: pytest.CaptureFixture[bytes]) -> Run:
    def call(*argv: str | Path) -> Result:
        code = main([str(a) for a in argv])
        out, err = capsysbinary.readouterr()
        return Result(code, out, err.decode("utf-8"))

    return call


def assert_error(result: Result, code: int, *fragments: str) -> str:
    """Exit ``code``, exactly one ``oscar...: error:`` line on stderr, no secret, no plaintext."""
    assert result.code == code, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert ERROR_LINE.match(lines[0]), lines[0]
    for secret in (SECRET_HEX, WRONG_SECRET_HEX):
        assert secret not in result.err.lower()
    assert PLAINTEXT.decode() not in result.err
    assert PLAINTEXT not in result.out
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def seal_argv(
    key: Path, plain: Path, out: Path, *extra: str, times: bool = True
) -> list[str | Path]:
    argv: list[str | Path] = [
        "seal",
        "--secret", SECRET_HEX,
        "--producer", PRODUCER,
        "--resource", RESOURCE,
        "--epoch", "3",
        "--seq", "7",
        "--key", key,
        "--in", plain,
        "--out", out,
    ]  # fmt: skip
    if times:
        argv += ["--iat", str(NOW), "--exp", str(NOW + 3600)]
    return argv + list(extra)


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain.txt"
    path.write_bytes(PLAINTEXT)
    return path


@pytest.fixture
def sealed(run: Run, pems: Pems, plain: Path, tmp_path: Path) -> Path:
    """An ES256, AES-CCM object of RESOURCE, epoch 3, seq 7, valid from NOW to NOW + 3600."""
    out = tmp_path / "object.cose"
    assert run(*seal_argv(pems.private["ES256"], plain, out)).code == 0
    return out


def open_argv(obj: Path, signer: Path, *extra: str, secret: str = SECRET_HEX) -> list[str | Path]:
    argv: list[str | Path] = ["open", "--secret", secret, "--signer", signer, "--in", obj]
    return [*argv, "--now", str(NOW + 1), *extra]


# --- keygen ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_keygen_writes_a_private_key_with_mode_0600(run: Run, tmp_path: Path, alg: str) -> None:
    key_path = tmp_path / "key.pem"
    result = run("keygen", "--alg", alg, "--out", key_path)
    assert result.code == 0, result.err
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = certs.load_private_key(key_path.read_bytes())
    assert signature_algorithm_of_key(key).name == alg
    assert b"PRIVATE" not in result.out
    assert certs.key_id(key.public_key()).hex().encode() in result.out


def test_keygen_default_is_es256_and_writes_the_public_key(run: Run, tmp_path: Path) -> None:
    key_path, pub_path = tmp_path / "key.pem", tmp_path / "pub.pem"
    assert run("keygen", "--out", key_path, "--public", pub_path).code == 0
    key = certs.load_private_key(key_path.read_bytes())
    assert signature_algorithm_of_key(key) is ES256
    signer = certs.load_signer(pub_path.read_bytes())
    assert not isinstance(signer, x509.Certificate)
    assert certs.key_id(signer) == certs.key_id(key.public_key())


def test_keygen_refuses_to_overwrite_without_force(run: Run, tmp_path: Path) -> None:
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(b"precious")
    assert_error(run("keygen", "--out", key_path), 2, "--force")
    assert key_path.read_bytes() == b"precious"

    key_path.chmod(0o644)
    assert run("keygen", "--out", key_path, "--force").code == 0
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    certs.load_private_key(key_path.read_bytes())
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temporary left behind


def test_keygen_cannot_put_both_keys_on_stdout(run: Run) -> None:
    assert_error(run("keygen", "--out", "-", "--public", "-"), 2)


def test_keygen_into_a_missing_directory_is_a_usage_error(run: Run, tmp_path: Path) -> None:
    assert_error(run("keygen", "--out", tmp_path / "no" / "key.pem"), 2, "cannot write")


# --- seal and open --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
@pytest.mark.parametrize(("aead", "cose_id"), AEADS)
def test_seal_open_round_trip(
    run: Run, pems: Pems, plain: Path, tmp_path: Path, alg: str, aead: str, cose_id: int
) -> None:
    obj = tmp_path / "object.cose"
    result = run(*seal_argv(pems.private[alg], plain, obj, "--aead", aead))
    assert result.code == 0, result.err
    assert result.out == b""
    metadata = ProtectedObject.from_bytes(obj.read_bytes()).metadata
    assert metadata.aead.cose_id == cose_id
    assert metadata.signature_algorithm.name == alg

    opened = run(*open_argv(obj, pems.public[alg]))
    assert opened.code == 0, opened.err
    assert opened.out == PLAINTEXT
    assert opened.err == ""


def test_seal_defaults_iat_now_exp_an_hour_later(
    run: Run, pems: Pems, plain: Path, tmp_path: Path
) -> None:
    obj = tmp_path / "object.cose"
    before = int(time.time())
    assert run(*seal_argv(pems.private["ES256"], plain, obj, times=False)).code == 0
    m = ProtectedObject.from_bytes(obj.read_bytes()).metadata
    assert before <= m.iat <= int(time.time())
    assert m.exp == m.iat + 3600
    assert (m.aead.cose_id, m.content_format) == (10, 0)


def test_seal_max_age_and_content_format(run: Run, pems: Pems, plain: Path, tmp_path: Path) -> None:
    obj = tmp_path / "object.cose"
    argv = seal_argv(pems.private["ES256"], plain, obj, times=False)
    assert run(*argv, "--iat", str(NOW), "--max-age", "60", "--content-format", "50").code == 0
    m = ProtectedObject.from_bytes(obj.read_bytes()).metadata
    assert (m.iat, m.exp, m.content_format) == (NOW, NOW + 60, 50)


def test_secret_file(run: Run, pems: Pems, sealed: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret.hex"
    secret_file.write_text(SECRET_HEX + "\n")
    argv = ["open", "--secret-file", secret_file, "--signer", pems.public["ES256"]]
    result = run(*argv, "--in", sealed, "--now", str(NOW))
    assert (result.code, result.out) == (0, PLAINTEXT)


def test_open_to_a_file_and_as_json(run: Run, pems: Pems, sealed: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain.out"
    assert run(*open_argv(sealed, pems.public["ES256"], "--out", str(out))).out == b""
    assert out.read_bytes() == PLAINTEXT

    result = run(*open_argv(sealed, pems.public["ES256"], "--json"))
    document = json.loads(result.out)
    assert document["plaintext"] == PLAINTEXT.decode()
    assert document["producer"] == PRODUCER
    assert document["resource"] == RESOURCE
    assert (document["epoch"], document["seq"], document["iat"]) == (3, 7, NOW)
    assert (document["aead"], document["signature"]) == ("AES-CCM-16-64-128", "ES256")


def test_open_json_of_binary_plaintext_is_base64(run: Run, pems: Pems, tmp_path: Path) -> None:
    plain, obj = tmp_path / "binary", tmp_path / "object.cose"
    plain.write_bytes(b"\xff\x00\xfe")
    assert run(*seal_argv(pems.private["EdDSA"], plain, obj)).code == 0
    document = json.loads(run(*open_argv(obj, pems.public["EdDSA"], "--json")).out)
    assert document["plaintext_base64"] == "/wD+"
    assert "plaintext" not in document


def test_stdin_and_stdout_in_process(
    run: Run, pems: Pems, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(PLAINTEXT)))
    sealed = run(*seal_argv(pems.private["ES256"], Path("-"), Path("-")))
    assert sealed.code == 0, sealed.err
    ProtectedObject.from_bytes(sealed.out)

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(sealed.out)))
    opened = run(*open_argv(Path("-"), pems.public["ES256"]))
    assert (opened.code, opened.out) == (0, PLAINTEXT)


def test_ccm_refuses_more_than_65535_bytes_but_gcm_seals_it(
    run: Run, pems: Pems, tmp_path: Path
) -> None:
    key = pems.private["ES256"]
    limit, big, obj = tmp_path / "limit", tmp_path / "big", tmp_path / "object.cose"
    limit.write_bytes(b"x" * 65_535)
    big.write_bytes(b"x" * 65_536)
    assert run(*seal_argv(key, limit, obj)).code == 0

    assert_error(run(*seal_argv(key, big, tmp_path / "nothing")), 2, "65535")
    assert not (tmp_path / "nothing").exists()

    assert run(*seal_argv(key, big, obj, "--aead", "A128GCM")).code == 0
    opened = run(*open_argv(obj, pems.public["ES256"]))
    assert (opened.code, opened.out) == (0, b"x" * 65_536)


# --- verify and inspect ---------------------------------------------------------------------------


def test_verify_prints_one_line_of_metadata(
    run: Run, pems: Pems, plain: Path, tmp_path: Path
) -> None:
    obj = tmp_path / "object.cose"
    assert run(*seal_argv(pems.private["EdDSA"], plain, obj, "--aead", "A128GCM")).code == 0
    result = run("verify", "--signer", pems.public["EdDSA"], "--in", obj, "--now", str(NOW))
    assert result.code == 0, result.err
    line = result.out.decode()
    assert line.count("\n") == 1
    for part in (
        f'producer="{PRODUCER}"',
        f'resource="{RESOURCE}"',
        "epoch=3",
        "seq=7",
        f"iat={NOW}",
        f"exp={NOW + 3600}",
        "aead=A128GCM",
        "signature=EdDSA",
    ):
        assert part in line
    assert PLAINTEXT not in result.out


def test_inspect_names_the_headers_and_says_not_verified(run: Run, sealed: Path) -> None:
    result = run("inspect", "--in", sealed)
    assert result.code == 0, result.err
    text = result.out.decode()
    for part in (
        "COSE_Sign1 (tag 18)",
        "not verified",
        "1 alg: -7 (ES256)",
        "4 kid: h'",
        "15 CWT claims",
        f'1 iss: "{PRODUCER}"',
        f'2 sub: "{RESOURCE}"',
        f"4 exp: {NOW + 3600} (",
        f"6 iat: {NOW} (2027-01-15T08:00:00Z)",
        "-65537 epoch: 3",
        "-65538 seq: 7",
        "unprotected: {}",
        "payload: COSE_Encrypt0 (tag 16)",
        "1 alg: 10 (AES-CCM-16-64-128)",
        "3 content type: 0",
        "6 Partial IV: h'07' (seq 7)",
        f"ciphertext: {len(PLAINTEXT) + 8} bytes",
        "signature: h'",
        "an OSCAR protected object",
    ):
        assert part in text, part
    assert PLAINTEXT not in result.out


def test_inspect_shows_the_parts_of_a_multi_part_object_and_none_of_their_bytes(
    run: Run, pems: Pems, tmp_path: Path
) -> None:
    """Issue 19: each part's name, audience (plain, or encrypted under its own secret at an
    epoch), content format and size, in order; not a byte of any part, plain or encrypted."""
    key = certs.load_private_key(pems.private["ES256"].read_bytes())
    secret = AccessSecret(os.urandom(32))
    obj = tmp_path / "parts.cose"
    obj.write_bytes(
        seal_parts(
            parts=[
                Part("public", b"PUBLIC-WARD-3", 0),
                Part("measurements", b"SECRET-HR-72", 50, secret=secret, epoch=4),
            ],
            producer_id=PRODUCER,
            resource_id=RESOURCE,
            seq=9,
            iat=NOW,
            exp=NOW + 60,
            signing_key=key,
            profile=profile_by_name("a128gcm-es256"),
        )
    )
    result = run("inspect", "--in", obj)
    assert result.code == 0, result.err
    text = result.out.decode()
    for shown in (
        "-65539 parts: [",
        "parts (2), in order:",
        "public: plain, content format 0, 13 bytes",
        "measurements: encrypted under its own secret, epoch 4, content format 50, 28 bytes",
        "an OSCAR multi-part object",
    ):
        assert shown in text, shown
    assert b"SECRET-HR-72" not in result.out and b"PUBLIC-WARD-3" not in result.out
    assert "not an OSCAR protected object" not in text


def test_inspect_diag_prints_the_whole_object(run: Run, sealed: Path) -> None:
    result = run("inspect", "--in", sealed, "--diag")
    assert result.code == 0
    assert result.out.startswith(b"18([\n")
    assert bytes.hex(sealed.read_bytes()[-64:]).encode() in result.out  # the signature


def test_inspect_any_sign1_even_untagged_and_not_oscar(
    run: Run, pems: Pems, tmp_path: Path
) -> None:
    key = certs.load_private_key(pems.private["ES256"].read_bytes())
    sign1 = Sign1.sign({1: -7, 99: "\x1b[31mred"}, {7: 1}, b"not cose", key, ES256)
    obj = tmp_path / "odd.cose"
    obj.write_bytes(sign1.to_bytes(tagged=False))
    result = run("inspect", "--in", obj)
    assert result.code == 0, result.err
    text = result.out.decode()
    for part in (
        "untagged",
        "not verified",
        "99: ",
        "\\u001b[31mred",
        "7: 1",
        "not a COSE_Encrypt0",
    ):
        assert part in text, part
    assert "not an OSCAR protected object" in text
    assert "\x1b" not in text  # an object must not drive the terminal


# --- certificates ---------------------------------------------------------------------------------


@pytest.fixture
def cert_sealed(run: Run, pems: Pems, plain: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cert-object.cose"
    assert run(*seal_argv(pems.cert_key, plain, out)).code == 0
    return out


def test_open_with_a_certificate_signer(run: Run, pems: Pems, cert_sealed: Path) -> None:
    result = run(*open_argv(cert_sealed, pems.cert))
    assert (result.code, result.out) == (0, PLAINTEXT)
    result = run(*open_argv(cert_sealed, pems.cert, "--ca", str(pems.ca)))
    assert (result.code, result.out) == (0, PLAINTEXT)
    verified = run(
        "verify", "--signer", pems.cert, "--ca", pems.ca, "--in", cert_sealed, "--now", str(NOW)
    )
    assert verified.code == 0, verified.err


def test_open_with_a_certificate_of_another_ca_is_rejected(
    run: Run, pems: Pems, cert_sealed: Path
) -> None:
    result = run(*open_argv(cert_sealed, pems.cert, "--ca", str(pems.wrong_ca)))
    assert_error(result, 1, "object rejected", "CA")


def test_open_with_a_certificate_of_another_device_is_rejected(
    run: Run, pems: Pems, cert_sealed: Path
) -> None:
    assert_error(run(*open_argv(cert_sealed, pems.other_device_cert)), 1, "object rejected")


def test_ca_that_is_a_public_key_is_a_usage_error(run: Run, pems: Pems, cert_sealed: Path) -> None:
    result = run(*open_argv(cert_sealed, pems.cert, "--ca", str(pems.public["ES256"])))
    assert_error(result, 2, "not a certificate")


# --- rejected objects: exit 1 ---------------------------------------------------------------------


def test_wrong_secret_is_rejected(run: Run, pems: Pems, sealed: Path) -> None:
    result = run(*open_argv(sealed, pems.public["ES256"], secret=WRONG_SECRET_HEX))
    assert_error(result, 1, "object rejected")


@pytest.mark.parametrize("where", [0, 5, 30, 0.5, -70, -1])
def test_tampered_object_is_rejected(
    run: Run, pems: Pems, sealed: Path, where: float, tmp_path: Path
) -> None:
    data = bytearray(sealed.read_bytes())
    index = int(len(data) * where) if isinstance(where, float) else where
    data[index] ^= 0x01
    tampered = tmp_path / "tampered.cose"
    tampered.write_bytes(bytes(data))
    assert_error(run(*open_argv(tampered, pems.public["ES256"])), 1, "object rejected")
    verify = ["verify", "--signer", pems.public["ES256"], "--in", tampered, "--now", str(NOW)]
    assert_error(run(*verify), 1, "object rejected")


def test_expired_object_is_rejected(run: Run, pems: Pems, sealed: Path) -> None:
    result = run(*open_argv(sealed, pems.public["ES256"]), "--now", str(NOW + 3601))
    assert_error(result, 1, "expired")
    verify = ["verify", "--signer", pems.public["ES256"], "--in", sealed, "--now", str(NOW + 3601)]
    assert_error(run(*verify), 1, "expired")


@pytest.mark.parametrize("signer", ["ES256-other", "EdDSA"])
def test_wrong_signer_key_is_rejected(
    run: Run, pems: Pems, sealed: Path, tmp_path: Path, signer: str
) -> None:
    if signer == "EdDSA":
        path = pems.public["EdDSA"]
    else:
        path = tmp_path / "other.pub.pem"
        path.write_bytes(public_pem(certs.generate_signing_key("ES256")))
    assert_error(run(*open_argv(sealed, path)), 1, "object rejected")
    assert_error(run("verify", "--signer", path, "--in", sealed, "--now", str(NOW)), 1)


@pytest.mark.parametrize("garbage", [b"", b"\xff\x00garbage", b"garbage", b"\xd2\x84\x40"])
def test_garbage_input_is_rejected(run: Run, pems: Pems, tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(garbage)
    signer = pems.public["ES256"]
    assert_error(run(*open_argv(path, signer)), 1, "object rejected")
    assert_error(run("verify", "--signer", signer, "--in", path), 1, "object rejected")
    assert_error(run("inspect", "--in", path), 1, "cannot decode")
    if garbage != b"garbage":  # that one happens to be a CBOR text string
        assert_error(run("inspect", "--diag", "--in", path), 1, "cannot decode")


# --- bad usage and bad input: exit 2 --------------------------------------------------------------


def test_missing_files(run: Run, pems: Pems, plain: Path, sealed: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    key = pems.private["ES256"]
    assert_error(run(*seal_argv(key, missing, tmp_path / "o")), 2, "cannot read input")
    assert_error(run(*seal_argv(missing, plain, tmp_path / "o")), 2, "cannot read key")
    assert_error(run(*open_argv(missing, pems.public["ES256"])), 2, "cannot read input")
    assert_error(run(*open_argv(sealed, missing)), 2, "cannot read signer")
    ca = open_argv(sealed, pems.cert, "--ca", str(missing))
    assert_error(run(*ca), 2, "cannot read CA")
    no_secret = ["open", "--secret-file", missing, "--signer", pems.public["ES256"], "--in", sealed]
    assert_error(run(*no_secret), 2, "cannot read secret file")
    assert_error(run("inspect", "--in", missing), 2, "No such file")


@pytest.mark.parametrize(
    "secret",
    ["zz" * 32, "ab" * 16, "ab" * 33, "", SECRET_HEX[:-1], "0x" + SECRET_HEX[2:]],
)
def test_bad_secret(run: Run, pems: Pems, plain: Path, sealed: Path, secret: str) -> None:
    argv = seal_argv(pems.private["ES256"], plain, sealed)
    argv[argv.index(SECRET_HEX)] = secret
    line = assert_error(run(*argv), 2, "64 hexadecimal digits")
    assert secret not in line or not secret
    assert_error(run(*open_argv(sealed, pems.public["ES256"], secret=secret)), 2, "--secret")


def test_bad_secret_file(run: Run, pems: Pems, sealed: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    argv = ["open", "--secret-file", secret_file, "--signer", pems.public["ES256"], "--in", sealed]
    for content in (b"\xff" + SECRET_HEX.encode(), SECRET_HEX[:32].encode()):
        secret_file.write_bytes(content)
        assert_error(run(*argv), 2, "secret")


def test_secret_and_secret_file_are_exclusive(run: Run, pems: Pems, sealed: Path) -> None:
    argv = open_argv(sealed, pems.public["ES256"], "--secret-file", "x")
    assert_error(run(*argv), 2, "not allowed with")
    no_secret = ["open", "--signer", pems.public["ES256"], "--in", sealed]
    assert_error(run(*no_secret), 2, "one of the arguments --secret --secret-file is required")
    both_stdin = ["open", "--secret-file", "-", "--signer", pems.public["ES256"], "--in", "-"]
    assert_error(run(*both_stdin), 2, "stdin")


@pytest.mark.parametrize("aead", ["AES-CCM-16-64-64", "5", "none", ""])
def test_unknown_aead(run: Run, pems: Pems, plain: Path, tmp_path: Path, aead: str) -> None:
    argv = seal_argv(pems.private["ES256"], plain, tmp_path / "o", "--aead", aead)
    assert_error(run(*argv), 2, "unknown or unsupported AEAD")


def test_bad_pem(run: Run, pems: Pems, plain: Path, sealed: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    label = b"PRIVATE" + b" KEY"  # spelled apart so the repo's key scan does not match this line
    bad.write_bytes(b"-----BEGIN " + label + b"-----\nnonsense\n-----END " + label + b"-----\n")
    assert_error(run(*seal_argv(bad, plain, tmp_path / "o")), 2, "key")
    assert_error(run(*open_argv(sealed, bad)), 2, "signer")
    # A public key where a private one is needed, and a private one where a signer is needed.
    assert_error(run(*seal_argv(pems.public["ES256"], plain, tmp_path / "o")), 2, "private key")
    assert_error(run(*open_argv(sealed, pems.private["ES256"])), 2, "signer")
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(certs.private_key_pem(ec.generate_private_key(ec.SECP384R1())))
    assert_error(run(*seal_argv(p384, plain, tmp_path / "o")), 2, "key")


def test_resource_of_another_producer(run: Run, pems: Pems, plain: Path, tmp_path: Path) -> None:
    argv = seal_argv(pems.private["ES256"], plain, tmp_path / "o", "--resource", "sensor-2/temp")
    assert_error(run(*argv), 2, "sensor-2/temp")
    argv = seal_argv(pems.private["ES256"], plain, tmp_path / "o", "--resource", "sensor-1")
    assert_error(run(*argv), 2, "<path>")


def test_exp_before_iat(run: Run, pems: Pems, plain: Path, tmp_path: Path) -> None:
    key = pems.private["ES256"]
    argv = seal_argv(key, plain, tmp_path / "o", "--exp", str(NOW - 1))
    assert_error(run(*argv), 2, "exp")
    argv = seal_argv(key, plain, tmp_path / "o", times=False)
    assert_error(run(*argv, "--max-age", "-5"), 2, "exp")
    assert_error(run(*argv, "--max-age", "5", "--exp", str(NOW)), 2, "not allowed with")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--epoch", "-1", "epoch"),
        ("--seq", str(2**64), "seq"),
        ("--epoch", "three", "invalid int value"),
        ("--content-format", "65536", "content_format"),
    ],
)
def test_bad_numbers(
    run: Run, pems: Pems, plain: Path, tmp_path: Path, option: str, value: str, message: str
) -> None:
    argv = seal_argv(pems.private["ES256"], plain, tmp_path / "o", option, value)
    assert_error(run(*argv), 2, message)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["seal", "--secret", SECRET_HEX],
        ["open", "--secret", SECRET_HEX, "--in", "x"],
        ["verify", "--in", "x"],
        ["inspect"],
        ["keygen"],
        ["keygen", "--out", "k.pem", "--alg", "RS256"],
    ],
)
def test_missing_or_bad_options(run: Run, argv: list[str]) -> None:
    assert_error(run(*argv), 2, "(see 'oscar")


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("keygen", ["--alg", "--out", "--public", "--force"]),
        ("seal", ["--secret-file", "--producer", "--resource", "--aead", "--max-age", "--in"]),
        ("open", ["--secret", "--signer", "--ca", "--now", "--json", "--out"]),
        ("verify", ["--signer", "--ca", "--now", "--in"]),
        ("inspect", ["--in", "--diag"]),
    ],
)
def test_help_documents_every_option(run: Run, command: str, options: list[str]) -> None:
    result = run(command, "--help")
    assert result.code == 0
    for option in options:
        assert option.encode() in result.out


def test_version(run: Run) -> None:
    result = run("--version")
    assert (result.code, result.out.split()[0]) == (0, b"oscar")


# --- the real entry point -------------------------------------------------------------------------


def oscar(*argv: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "oscar_io", *map(str, argv)],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_module_entry_point_seal_and_open_through_pipes(pems: Pems) -> None:
    seal = seal_argv(pems.private["EdDSA"], Path("-"), Path("-"), "--aead", "ChaCha20/Poly1305")
    sealed = oscar(*seal, stdin=PLAINTEXT)
    assert (sealed.returncode, sealed.stderr) == (0, b"")
    opened = oscar(*open_argv(Path("-"), pems.public["EdDSA"]), stdin=sealed.stdout)
    assert (opened.returncode, opened.stdout, opened.stderr) == (0, PLAINTEXT, b"")

    inspected = oscar("inspect", "--in", "-", stdin=sealed.stdout)
    assert inspected.returncode == 0
    assert b"1 alg: -8 (EdDSA)" in inspected.stdout
    assert b"1 alg: 24 (ChaCha20/Poly1305)" in inspected.stdout


def test_module_entry_point_errors_are_one_line(pems: Pems) -> None:
    rejected = oscar(*open_argv(Path("-"), pems.public["EdDSA"]), stdin=b"\xd2garbage")
    assert rejected.returncode == 1
    assert_error(Result(rejected.returncode, rejected.stdout, rejected.stderr.decode()), 1)

    usage = oscar("seal", "--secret", SECRET_HEX)
    assert_error(Result(usage.returncode, usage.stdout, usage.stderr.decode()), 2)


def test_module_entry_point_keygen_to_stdout(tmp_path: Path) -> None:
    result = oscar("keygen", "--alg", "EdDSA", "--out", "-", "--public", tmp_path / "pub.pem")
    assert result.returncode == 0, result.stderr
    key = certs.load_private_key(result.stdout)
    assert certs.key_id(key.public_key()).hex().encode() in result.stderr
    assert os.path.exists(tmp_path / "pub.pem")


# --- review findings: anchoring, expected resource, no echo of secrets, terminal safety ----------


def test_ca_with_a_bare_public_key_signer_is_a_usage_error(
    run: Run, pems: Pems, sealed: Path
) -> None:
    result = run(*open_argv(sealed, pems.public["ES256"], "--ca", str(pems.ca)))
    assert_error(result, 2, "--ca needs a certificate")


def test_open_and_verify_of_another_resource_than_asked(run: Run, pems: Pems, sealed: Path) -> None:
    ok = run(*open_argv(sealed, pems.public["ES256"], "--resource", RESOURCE))
    assert (ok.code, ok.out) == (0, PLAINTEXT)
    other = run(*open_argv(sealed, pems.public["ES256"], "--resource", PRODUCER + "/door"))
    assert_error(other, 1, "object rejected", "another resource")
    verify = run(
        "verify", "--signer", pems.public["ES256"], "--in", sealed, "--now", str(NOW),
        "--resource", PRODUCER + "/door",
    )  # fmt: skip
    assert_error(verify, 1, "another resource")


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "--secret", SECRET_HEX, "--signer", "x", "--in", "y"],  # unrecognized
        ["seal", f"--sec={SECRET_HEX}", "--producer", "p"],  # abbreviation of --secret
        ["seal", "--sec", SECRET_HEX],
        ["open", "--secret", SECRET_HEX, "--signer", "x", "--in", "y", "--now", SECRET_HEX],
    ],
)
def test_usage_errors_never_echo_a_secret(run: Run, argv: list[str]) -> None:
    result = run(*argv)
    assert_error(result, 2)


@pytest.mark.parametrize(
    ("argv", "named", "hidden"),
    [
        (["seal", "--secrt=abcd", "--producer", "p"], "--secrt (did you mean --secret?)", "abcd"),
        (["seal", "--secrt", SECRET_HEX, "--producer", "p"], "--secrt", SECRET_HEX),
        (["verify", "--signer", "x", "--in", "y", "--sigenr=z.pem"], "--sigenr", "z.pem"),
        (["verify", "--signer", "x", "--in", "y", "stray-value"], "1 unexpected", "stray-value"),
        (["open", "--in", "y", "--signer", "x", "--secret-hex", "ab"], "--secret-hex", "ab "),
    ],
)
def test_a_misspelt_option_is_named_never_its_value(
    run: Run, argv: list[str], named: str, hidden: str
) -> None:
    line = assert_error(run(*argv), 2, named)
    assert hidden not in line
    assert f"'oscar {argv[0]} --help'" in line  # the subcommand whose options these are


def test_unrecognized_names_options_only_and_counts_the_rest() -> None:
    from oscar_io.clikit import unrecognized

    known = ["--secret", "--signer"]
    assert unrecognized(["--secrt=00112233"], known) == (
        "unrecognized option: --secrt (did you mean --secret?)"
    )
    assert unrecognized(["--x", "--y=1", "value", "-5"], known) == (
        "unrecognized options: --x, --y; and 2 unexpected arguments (not shown)"
    )
    # An option-like argument that could hold a secret is not shown either.
    assert unrecognized(["--" + SECRET_HEX], known) == "1 unexpected argument (not shown)"
    assert unrecognized(["--a\u202eb"], known) == "1 unexpected argument (not shown)"


def test_the_daemons_and_the_consumer_name_a_misspelt_option_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from consumer.cli import main as consumer_main

    code = consumer_main(
        ["--bundle", "b", "--state", "s", "get", "coap://h/p/r", "--proxi=coap://secret-host"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "unrecognized option: --proxi (did you mean --proxy?)" in err
    assert "secret-host" not in err


def test_inspect_escapes_bidi_and_line_separators(
    run: Run, pems: Pems, plain: Path, tmp_path: Path
) -> None:
    sign1 = Sign1.sign(
        {1: -7, 99: "safe\u202eevil\u2028line\u200b"}, {}, b"payload",
        certs.load_private_key(pems.private["ES256"].read_bytes()), ES256,
    )  # fmt: skip
    path = tmp_path / "bidi.cose"
    path.write_bytes(sign1.to_bytes())
    result = run("inspect", "--in", path)
    assert result.code == 0, result.err
    text = result.out.decode("utf-8")
    assert "\u202e" not in text and "\u2028" not in text and "\u200b" not in text
    assert "\\u202e" in text
