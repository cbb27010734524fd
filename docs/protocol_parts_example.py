"""Write the multi-part worked example of docs/PROTOCOL.md from the code itself.

Run ``python docs/protocol_parts_example.py`` to rewrite the block between its markers in
PROTOCOL.md; ``tests/core/test_protocol_doc.py`` fails when the document and the code disagree.
Every value is fixed (the signing key of the single-part example, deterministic ECDSA, fixed
secrets, seq and times), so the output is stable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

import oscar
from oscar import cbor, certs
from oscar.cose import Encrypt0, Sign1
from oscar.keys import ContentKeys
from oscar.parts import MultiPartObject, Part, part_external_aad, seal_parts
from oscar.partsopening import open_parts

BEGIN = "<!-- BEGIN GENERATED PARTS EXAMPLE (docs/protocol_parts_example.py) -->"
END = "<!-- END GENERATED PARTS EXAMPLE -->"
DOC = Path(__file__).with_name("PROTOCOL.md")

PRODUCER = "ward-7"
RESOURCE = "ward-7/bed-12"
SEQ, IAT, EXP = 10, 1_767_225_600, 1_767_225_660
#: The P-256 scalar of the single-part example (docs/protocol_example.py).
SCALAR = 0x4B9D5E7F1A2C3D4E5F60718293A4B5C6D7E8F90123456789ABCDEF0123456789
CLINICIANS = oscar.AccessSecret(bytes.fromhex("11" * 32))
OPERATORS = oscar.AccessSecret(bytes.fromhex("22" * 32))
PARTS = [
    Part("status", b"stable", 0),
    Part("measurements", b'{"hr":72}', 50, CLINICIANS, 4),
    Part("location", b"bed 12", 0, OPERATORS, 2),
]


def _hex_block(label: str, data: bytes) -> str:
    lines = [data[i : i + 32].hex() for i in range(0, len(data), 32)]
    return f"{label} ({len(data)} bytes):\n" + "\n".join(lines)


def render() -> str:
    """The Markdown of the multi-part worked example."""
    key = ec.derive_private_key(SCALAR, ec.SECP256R1())
    aead = oscar.DEFAULT_PROFILE.aead
    data = seal_parts(
        parts=PARTS,
        producer_id=PRODUCER,
        resource_id=RESOURCE,
        seq=SEQ,
        iat=IAT,
        exp=EXP,
        signing_key=key,
    )
    obj = MultiPartObject.from_bytes(data)

    def clinician(resource_id: str, part: str, epoch: int) -> oscar.AccessSecret | None:
        return CLINICIANS if (part, epoch) == ("measurements", 4) else None

    reading = open_parts(data, secrets=clinician, signer=key.public_key(), now=IAT)
    if [p.name for p in reading.parts] != ["status", "measurements"] or reading.not_granted != (
        "location",
    ):
        raise RuntimeError("the worked example does not open as documented")

    out = [
        "Inputs (the signing key is the single-part example's):",
        "",
        "```",
        f"producer id     {PRODUCER!r}    resource id {RESOURCE!r}",
        f"seq {SEQ}   iat {IAT}   exp {EXP}   profile {oscar.DEFAULT_PROFILE.name}",
        f"kid             {certs.key_id(key.public_key()).hex()}",
    ]
    for part in PARTS:
        if part.secret is None:
            out.append(
                f"part {part.name!r:15} plain, content format {part.content_format}, "
                f"{part.plaintext!r}"
            )
        else:
            out.append(
                f"part {part.name!r:15} encrypted, epoch {part.epoch}, content format "
                f"{part.content_format}, {part.plaintext!r}"
            )
            out.append(f"     access secret {part.secret.value.hex()}")
    out += ["```", "", "Per encrypted part (HKDF-SHA256, empty salt; nonce = base_iv XOR seq):", ""]
    for part, item in zip(PARTS, obj.items, strict=True):
        if part.secret is None or part.epoch is None or not isinstance(item, Encrypt0):
            continue
        keys = ContentKeys.derive_part(part.secret, RESOURCE, part.name, part.epoch, aead)
        key_info = cbor.dumps(
            ["OSCAR part key", RESOURCE, part.name, part.epoch, aead.cose_id, aead.key_length]
        )
        iv_info = cbor.dumps(
            ["OSCAR part iv", RESOURCE, part.name, part.epoch, aead.cose_id, aead.nonce_length]
        )
        aad = part_external_aad(PRODUCER, RESOURCE, part.epoch, SEQ, part.name)
        out += [
            "```",
            f"info (key)      {cbor.diagnostic(cbor.loads(key_info))}",
            f"content_key     {keys.key.hex()}",
            f"info (iv)       {cbor.diagnostic(cbor.loads(iv_info))}",
            f"base_iv         {keys.base_iv.hex()}",
            f"nonce           {keys.nonce(SEQ).hex()}",
            f"external_aad    {cbor.diagnostic(cbor.loads(aad))}",
            f"                {aad.hex()}",
            f"Enc_structure   {Encrypt0.to_be_encrypted(item.protected, aad).hex()}",
            f"ciphertext+tag  {item.ciphertext.hex()}",
            "```",
            "",
        ]
    sig_structure = Sign1.to_be_signed(obj.sign1.protected, obj.sign1.payload)
    out += [
        "The Sign1 payload (one item per part, in the descriptors' order):",
        "",
        "```",
        cbor.diagnostic(cbor.loads(obj.sign1.payload), indent=2),
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
        "The multi-part object (protected header decoded in a comment):",
        "",
        "```",
        cbor.diagnostic(cbor.loads(data), indent=2),
        "",
        "/ Sign1 protected: / " + cbor.diagnostic(obj.sign1.protected_map, indent=2),
        "```",
        "",
        "```",
        _hex_block("multi-part object", data),
        "```",
        "",
        "A consumer granted `measurements` only reads `status` and `measurements` and is told "
        "`location` is not granted; one without any secret reads `status` alone.",
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
