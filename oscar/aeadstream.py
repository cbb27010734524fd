"""Opening a long AEAD ciphertext in pieces without releasing plaintext before its tag verifies.

:func:`decrypt_to` takes the ciphertext (tag included) as a pass that can be made twice: a
function returning a fresh iterable of its pieces (a spool file read from the start, say). The
first pass only authenticates, nothing comes out; the second decrypts into ``write`` and
authenticates again, so a spool changed between the passes is caught too. The caller must treat
what ``write`` received as unreleased until :func:`decrypt_to` returns (write it to a temporary
file, rename it after). Memory is one piece at a time, whatever the length.

- A128GCM, A256GCM: ``cryptography``'s streaming AES-GCM decryptor (``finalize_with_tag``).
- ChaCha20/Poly1305: ``cryptography`` has no streaming AEAD for it, so RFC 8439 §2.8 is composed
  here from its ChaCha20 stream cipher and Poly1305 MAC: the one-time key is the first 32 bytes
  of the keystream at block counter 0, the plaintext is the keystream from counter 1 XOR the
  ciphertext, the MAC covers ``aad | pad16 | ciphertext | pad16 | le64(len aad) | le64(len ct)``.
  The tests pin it against the one-shot ``ChaCha20Poly1305`` (OpenSSL's 16-byte ChaCha20 nonce is
  the 32-bit counter then the 96-bit nonce, RFC 8439's layout; its counter would wrap only past
  256 GiB, far above any object size limit).
- AES-CCM-16-64-128 seals at most 65,535 bytes: its ciphertext is joined and opened at once (64 KiB
  of memory), CCM having no streaming interface and no need of one here.

The exceptions of ``cryptography`` (a failed tag) are translated here into
:class:`~oscar.errors.InvalidObject`, as :mod:`oscar.algorithms` does for the one-shot AEADs.
This module does not parse COSE, derive keys or build the AAD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import poly1305
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .algorithms import AES_CCM_16_64_128_ID, CHACHA20_POLY1305_ID, AeadAlgorithm
from .errors import InvalidObject

__all__ = ["Pass", "decrypt_to"]

#: A fresh pass over the ciphertext, tag included, in pieces of any size.
Pass = Callable[[], Iterable[bytes]]
#: Where plaintext goes, piece by piece (unreleased until :func:`decrypt_to` returns).
Write = Callable[[bytes], object]


class _Tag:
    """The last ``tag_length`` bytes of a pass, split off the body as the pieces go by."""

    def __init__(self, body: int, tag_length: int) -> None:
        self.body = body
        self.tag_length = tag_length
        self.value = bytearray()

    def pieces(self, ciphertext: Iterable[bytes]) -> Iterator[bytes]:
        seen, body = 0, self.body
        for piece in ciphertext:
            n = len(piece)
            if seen + n <= body:
                if n:
                    yield bytes(piece)
            elif seen >= body:
                self.value += piece
            else:
                cut = body - seen
                yield bytes(piece[:cut])
                self.value += piece[cut:]
            seen += n
            if len(self.value) > self.tag_length:
                raise InvalidObject("ciphertext longer than announced")
        if seen != body + self.tag_length:
            raise InvalidObject("ciphertext shorter than announced")


def decrypt_to(
    aead: AeadAlgorithm,
    key: bytes,
    nonce: bytes,
    aad: bytes,
    ciphertext: Pass,
    length: int,
    write: Write,
) -> None:
    """Authenticate the ``length`` bytes of ``ciphertext`` (tag included), then decrypt them into
    ``write`` (see the module docstring). Raises :class:`InvalidObject` when the tag does not
    verify or a pass is not ``length`` bytes; ``ValueError`` for a key or nonce of the wrong
    length (the caller's mistake)."""
    if len(key) != aead.key_length or len(nonce) != aead.nonce_length:
        raise ValueError(
            f"{aead.name} needs a {aead.key_length}-byte key and a {aead.nonce_length}-byte nonce"
        )
    if length < aead.tag_length:
        raise InvalidObject("ciphertext shorter than the tag")
    if aead.cose_id == AES_CCM_16_64_128_ID:
        _ccm(aead, key, nonce, aad, ciphertext, length, write)
        return
    run = _chacha20_poly1305 if aead.cose_id == CHACHA20_POLY1305_ID else _gcm
    run(key, nonce, aad, ciphertext(), _Tag(length - aead.tag_length, aead.tag_length), None)
    run(key, nonce, aad, ciphertext(), _Tag(length - aead.tag_length, aead.tag_length), write)


def _ccm(
    aead: AeadAlgorithm,
    key: bytes,
    nonce: bytes,
    aad: bytes,
    ciphertext: Pass,
    length: int,
    write: Write,
) -> None:
    if length > (aead.max_plaintext or 0) + aead.tag_length:
        raise InvalidObject("ciphertext longer than the AEAD can seal")
    data = b"".join(ciphertext())
    if len(data) != length:
        raise InvalidObject("ciphertext length changed")
    write(aead.decrypt(aead.cipher(key), nonce, data, aad))


def _gcm(
    key: bytes, nonce: bytes, aad: bytes, pieces: Iterable[bytes], tag: _Tag, write: Write | None
) -> None:
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).decryptor()
    decryptor.authenticate_additional_data(aad)
    for piece in tag.pieces(pieces):
        out = decryptor.update(piece)
        if write is not None:
            write(out)
    try:
        last = decryptor.finalize_with_tag(bytes(tag.value))
    except (InvalidTag, ValueError):
        raise InvalidObject("decryption failed") from None
    if write is not None and last:  # pragma: no cover - GCM is a stream mode: nothing left
        write(last)


def _chacha20_poly1305(
    key: bytes, nonce: bytes, aad: bytes, pieces: Iterable[bytes], tag: _Tag, write: Write | None
) -> None:
    one_time_key = (
        Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), None).encryptor().update(bytes(32))
    )
    mac = poly1305.Poly1305(one_time_key)
    mac.update(aad)
    mac.update(bytes(-len(aad) % 16))
    decryptor = (
        None
        if write is None
        else Cipher(algorithms.ChaCha20(key, (1).to_bytes(4, "little") + nonce), None).decryptor()
    )
    n = 0
    for piece in tag.pieces(pieces):
        mac.update(piece)
        n += len(piece)
        if decryptor is not None and write is not None:
            write(decryptor.update(piece))
    mac.update(bytes(-n % 16))
    mac.update(len(aad).to_bytes(8, "little") + n.to_bytes(8, "little"))
    try:
        mac.verify(bytes(tag.value))
    except InvalidSignature:
        raise InvalidObject("decryption failed") from None
