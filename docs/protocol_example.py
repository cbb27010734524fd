"""Write the worked example of docs/PROTOCOL.md from the code itself.

Run ``python docs/protocol_example.py`` to rewrite the block between the markers in PROTOCOL.md;
``tests/core/test_protocol_doc.py`` fails when the document and the code disagree. Every value
below is fixed (a fixed P-256 scalar, deterministic ECDSA, fixed seq and times), so the output
is stable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import oscar
from oscar import cbor, certs
from oscar.cose import Encrypt0, Sign1
from oscar.keys import ContentKeys
from oscar.objects import ProtectedObject, external_aad

BEGIN = "<!-- BEGIN GENERATED EXAMPLE (docs/protocol_example.py) -->"
END = "<!-- END GENERATED EXAMPLE -->"
DOC = Path(__file__).with_name("PROTOCOL.md")

PRODUCER = "sensor-1"
RESOURCE = "sensor-1/temperature"
SECRET = oscar.AccessSecret(bytes.fromhex("00112233445566778899aabbccddeeff" * 2))
EPOCH, SEQ, IAT, EXP = 1, 5, 1_767_225_600, 1_767_225_660
CONTENT_FORMAT = 0  # text/plain
PLAINTEXT = b"21.5 C"
SCALAR = 0x4B9D5E7F1A2C3D4E5F60718293A4B5C6D7E8F90123456789ABCDEF0123456789


def _hex_block(label: str, data: bytes) -> str:
    lines = [data[i : i + 32].hex() for i in range(0, len(data), 32)]
    return f"{label} ({len(data)} bytes):\n" + "\n".join(lines)


def render() -> str:
    """The Markdown of the worked example."""
    key = ec.derive_private_key(SCALAR, ec.SECP256R1())
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    aead = oscar.DEFAULT_PROFILE.aead
    keys = ContentKeys.derive(SECRET, RESOURCE, EPOCH, aead)
    key_info = cbor.dumps(["OSCAR key", RESOURCE, EPOCH, aead.cose_id, aead.key_length])
    iv_info = cbor.dumps(["OSCAR iv", RESOURCE, EPOCH, aead.cose_id, aead.nonce_length])
    aad = external_aad(PRODUCER, RESOURCE, EPOCH, SEQ)
    data = oscar.seal(
        secret=SECRET,
        producer_id=PRODUCER,
        resource_id=RESOURCE,
        epoch=EPOCH,
        seq=SEQ,
        iat=IAT,
        exp=EXP,
        content_format=CONTENT_FORMAT,
        plaintext=PLAINTEXT,
        signing_key=key,
    )
    obj = ProtectedObject.from_bytes(data)
    enc_structure = Encrypt0.to_be_encrypted(obj.encrypt0.protected, aad)
    sig_structure = Sign1.to_be_signed(obj.sign1.protected, obj.sign1.payload)
    reading = oscar.open(data, secrets=lambda r, e: SECRET, signer=key.public_key(), now=IAT)
    if reading.plaintext != PLAINTEXT:
        raise RuntimeError("the worked example does not open to its plaintext")

    out = [
        "Inputs:",
        "",
        "```",
        f"access secret   {SECRET.value.hex()}",
        f"producer id     {PRODUCER!r}    resource id {RESOURCE!r}",
        f"epoch {EPOCH}   seq {SEQ}   iat {IAT}   exp {EXP}   content format {CONTENT_FORMAT}",
        f"plaintext       {PLAINTEXT!r}",
        f"profile         {oscar.DEFAULT_PROFILE.name} (AES-CCM-16-64-128 + ES256)",
        f"signing key     P-256 private scalar {SCALAR:064x}",
        _hex_block("public key, DER SubjectPublicKeyInfo", public_der),
        f"kid             {certs.key_id(key.public_key()).hex()}"
        "  (first 8 bytes of SHA-256 over the DER above)",
        "```",
        "",
        "Key derivation (HKDF-SHA256, empty salt):",
        "",
        "```",
        f"info (key)      {cbor.diagnostic(cbor.loads(key_info))}",
        f"                {key_info.hex()}",
        f"content_key     {keys.key.hex()}",
        f"info (iv)       {cbor.diagnostic(cbor.loads(iv_info))}",
        f"                {iv_info.hex()}",
        f"base_iv         {keys.base_iv.hex()}",
        f"Partial IV      {obj.encrypt0.unprotected[6].hex()}  (seq {SEQ}, minimal big-endian)",
        f"nonce           {keys.nonce(SEQ).hex()}  (base_iv XOR Partial IV, left-padded)",
        "```",
        "",
        "Encryption:",
        "",
        "```",
        f"external_aad    {cbor.diagnostic(cbor.loads(aad))}",
        f"                {aad.hex()}",
        f"Enc_structure   {cbor.diagnostic(cbor.loads(enc_structure))}",
        f"                {enc_structure.hex()}",
        f"ciphertext+tag  {obj.encrypt0.ciphertext.hex()}",
        "```",
        "",
        "The COSE_Encrypt0 (the Sign1 payload):",
        "",
        "```",
        cbor.diagnostic(cbor.loads(obj.sign1.payload)),
        _hex_block("bytes", obj.sign1.payload),
        "```",
        "",
        "Signing (deterministic ECDSA, RFC 6979; the signature is r || s):",
        "",
        "```",
        _hex_block("Sig_structure", sig_structure),
        f"signature       {obj.sign1.signature.hex()}",
        "```",
        "",
        "The protected object, in diagnostic notation (protected headers decoded in comments):",
        "",
        "```",
        cbor.diagnostic(cbor.loads(data), indent=2),
        "",
        "/ Sign1 protected: / " + cbor.diagnostic(obj.sign1.protected_map),
        "/ Encrypt0 protected: / " + cbor.diagnostic(obj.encrypt0.protected_map),
        "```",
        "",
        "```",
        _hex_block("protected object", data),
        "```",
    ]
    return "\n".join(out)


def rewrite(doc: str) -> str:
    """``doc`` with the generated block replaced by :func:`render` output."""
    head, rest = doc.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


def main() -> int:
    text = DOC.read_text(encoding="utf-8")
    new = rewrite(text)
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
