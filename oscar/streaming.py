"""Reading a protected object as its bytes arrive: :class:`ObjectReader`, :class:`StreamedObject`.

A large object (a camera image, a file) arrives in blocks. :class:`ObjectReader` takes them in
order (:meth:`~ObjectReader.feed`) and never holds more than the headers and one block: it

1. counts bytes against the size limit before anything else (and refuses at once an object whose
   announced payload length cannot fit);
2. decodes the Sign1 headers, then the Encrypt0 headers at the start of the payload, strictly (the
   same CBOR rules as :mod:`oscar.cbor`: shortest-form heads, definite lengths, bounded items) and
   makes on them the very checks of the one-shot decoder, in its order
   (:func:`~oscar.decoding.check_sign1_headers`, :func:`~oscar.decoding.check_encrypt0_headers`);
3. hashes the Sig_structure ``["Signature1", protected, h'', payload]`` as it goes: the payload is
   its last element, so its prefix is known once the payload's length is, and the payload's bytes
   are hashed as they pass (ES256 signs SHA-256 of it:
   :meth:`~oscar.algorithms.SignatureAlgorithm.verify_digest`);
4. takes the signature (exactly the algorithm's length) and refuses any byte after it.

:meth:`~ObjectReader.finish` gives a :class:`StreamedObject`: the metadata, the digest, where the
ciphertext lies in the object (the caller keeps the bytes, in a spool file say, and hands a pass
over them to :func:`oscar.opening.open_verified_stream`). It is decoded, not yet trusted: the
signer, signature, times and freshness are :func:`oscar.opening.verify`'s, as for a
:class:`~oscar.decoding.ProtectedObject`.

EdDSA (PureEdDSA) hashes the message twice and cannot be checked from a digest: an EdDSA object
is kept whole in memory while it is read, up to ``max_in_memory`` bytes
(:data:`~oscar.model.DEFAULT_MAX_OBJECT_SIZE`, the one-shot limit), and refused above it with
that reason. Large objects need an ES256 profile.

What this module does not do: keep the ciphertext (the caller does), check the signer or decrypt
(:mod:`oscar.opening`, :mod:`oscar.aeadstream`), or any I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

from . import cbor
from .algorithms import PublicKey
from .cose import MAX_ITEMS, _protected_header, _structure_protected, _unprotected_map
from .decoding import SignedHeader, check_encrypt0_headers, check_sign1_headers
from .errors import InvalidObject, MalformedCBOR
from .model import DEFAULT_MAX_OBJECT_SIZE, ObjectMetadata

__all__ = ["HEADER_LIMIT", "ObjectReader", "StreamedObject"]

#: Most bytes the headers (everything before the ciphertext) may take. A valid object's take a few
#: hundred (ids are at most 32 and 255 characters, the unprotected headers are fixed).
HEADER_LIMIT = 4096

_SIGN1_TAG, _ENCRYPT0_TAG = 18, 16
_SIG_STRUCTURE_HEAD = b"\x84" + cbor.dumps("Signature1")
# Sign1 and Encrypt0 sit at depth 2 under their tag and array, as cbor.loads counts it.
_HEADER_DEPTH = 2


class _NeedMore(Exception):
    """The headers are not all here yet (control flow of :func:`_parse_headers` only)."""


class StreamedObject(NamedTuple):
    """An object read by :class:`ObjectReader`: decoded and its signed message hashed, not yet
    verified. ``ciphertext_offset`` and ``ciphertext_length`` say where the ciphertext (tag
    included) lies in the object's bytes."""

    metadata: ObjectMetadata
    encrypt0_protected: bytes
    signature: bytes
    #: SHA-256 of the Sig_structure (ES256), or the Sig_structure itself (EdDSA, small objects).
    signed: bytes
    ciphertext_offset: int
    ciphertext_length: int
    size: int

    def verify_signature(self, key: PublicKey) -> None:
        """Check the signature; raises :class:`InvalidObject` if it does not verify."""
        algorithm = self.metadata.signature_algorithm
        if algorithm.hashes_incrementally:
            algorithm.verify_digest(key, self.signature, self.signed)
        else:
            algorithm.verify(key, self.signature, self.signed)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"StreamedObject(resource_id={m.resource_id!r}, epoch={m.epoch}, seq={m.seq}, "
            f"size={self.size})"
        )


class _Headers(NamedTuple):
    outer: SignedHeader
    sign1_protected: bytes  # as it enters Sig_structure
    payload_length: int
    payload_start: int
    metadata: ObjectMetadata
    encrypt0_protected: bytes
    ciphertext_start: int
    ciphertext_length: int


def _head(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(major type, argument, position after) of the head at ``pos``; shortest form only."""
    if pos >= end:
        raise _NeedMore
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, pos + 1
    if info > 27:
        raise InvalidObject("malformed CBOR: indefinite length or reserved value")
    size = 1 << (info - 24)
    if pos + 1 + size > end:
        raise _NeedMore
    arg = int.from_bytes(data[pos + 1 : pos + 1 + size], "big")
    if arg < (24 if size == 1 else 1 << (4 * size)):
        raise InvalidObject("malformed CBOR: argument not in shortest form")
    return major, arg, pos + 1 + size


def _item(data: bytes, pos: int, end: int, limits: list[int]) -> tuple[cbor.Value, int]:
    try:
        return cbor.decode_item(data, pos, end, _HEADER_DEPTH, limits)
    except MalformedCBOR as exc:
        if str(exc) == "truncated":
            raise _NeedMore from None
        raise InvalidObject(f"malformed CBOR: {exc}") from None


def _envelope(data: bytes, pos: int, end: int, tag: int, length: int, what: str) -> int:
    major, arg, pos = _head(data, pos, end)
    if major != 6:
        raise InvalidObject(f"{what} is not tagged")
    if arg != tag:
        raise InvalidObject(f"wrong CBOR tag for {what}")
    major, arg, pos = _head(data, pos, end)
    if major != 4 or arg != length:
        raise InvalidObject(f"{what} is not an array of {length}")
    return pos


def _parse_headers(data: bytes, max_size: int) -> _Headers:
    """The headers at the start of ``data``; :class:`_NeedMore` if they are not all there."""
    end = len(data)
    pos = _envelope(data, 0, end, _SIGN1_TAG, 4, "COSE_Sign1")
    limits = [cbor.DEFAULT_MAX_DEPTH, MAX_ITEMS - 4]
    raw, pos = _item(data, pos, end, limits)
    protected, protected_map = _protected_header(raw)
    raw, pos = _item(data, pos, end, limits)
    unprotected = _unprotected_map(raw)
    major, payload_length, pos = _head(data, pos, end)
    if major != 2:
        raise InvalidObject("payload is not a byte string")
    payload_start = pos
    if payload_start + payload_length + 1 > max_size:  # a signature takes one byte at least
        raise InvalidObject("object exceeds the size limit (announced)")
    outer = check_sign1_headers(protected_map, unprotected)
    signature_length = outer.signature_algorithm.signature_length
    if payload_start + payload_length + len(cbor.head(2, signature_length)) + signature_length > (
        max_size
    ):
        raise InvalidObject("object exceeds the size limit (announced)")

    # The Encrypt0, within the payload: an item running past it is truncated, for good.
    payload_end = payload_start + payload_length
    inner_end = min(end, payload_end)
    try:
        pos = _envelope(data, pos, inner_end, _ENCRYPT0_TAG, 3, "COSE_Encrypt0")
        limits = [cbor.DEFAULT_MAX_DEPTH, MAX_ITEMS - 3]
        raw, pos = _item(data, pos, inner_end, limits)
        inner, inner_map = _protected_header(raw)
        raw, pos = _item(data, pos, inner_end, limits)
        inner_unprotected = _unprotected_map(raw)
        major, ciphertext_length, pos = _head(data, pos, inner_end)
    except _NeedMore:
        if end >= payload_end:
            raise InvalidObject("malformed CBOR: truncated") from None
        raise
    if major != 2:
        raise InvalidObject("ciphertext is not a byte string")
    if pos + ciphertext_length != payload_end:
        raise InvalidObject("malformed CBOR: the payload is not exactly one COSE_Encrypt0")
    metadata = check_encrypt0_headers(outer, inner_map, inner_unprotected, ciphertext_length)
    return _Headers(
        outer,
        _structure_protected(protected, protected_map),
        payload_length,
        payload_start,
        metadata,
        _structure_protected(inner, inner_map),
        pos,
        ciphertext_length,
    )


class ObjectReader:
    """Feed an object's bytes in order, in pieces of any size; then :meth:`finish`.

    Every method raises :class:`InvalidObject` once the object is known to be unacceptable, and
    the reader is then spent (every later call raises it again). ``max_size`` is the size limit
    (check 1); ``max_in_memory`` bounds what an EdDSA object may take (see the module docstring).
    """

    def __init__(
        self,
        *,
        max_size: int = DEFAULT_MAX_OBJECT_SIZE,
        max_in_memory: int = DEFAULT_MAX_OBJECT_SIZE,
    ) -> None:
        self._max_size = max_size
        self._max_in_memory = max_in_memory
        self._received = 0
        self._head = bytearray()
        self._headers: _Headers | None = None
        self._hash: hashlib._Hash | None = None
        self._message: bytearray | None = None  # EdDSA: the Sig_structure, whole
        self._ciphertext_left = 0
        self._tail = bytearray()  # the signature's head and bytes
        self._failed: InvalidObject | None = None

    def __repr__(self) -> str:
        return f"ObjectReader(received={self._received}, headers={self._headers is not None})"

    @property
    def received(self) -> int:
        """Bytes fed so far."""
        return self._received

    @property
    def metadata(self) -> ObjectMetadata | None:
        """What the object says about itself once its headers are read (not yet verified)."""
        return None if self._headers is None else self._headers.metadata

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the object."""
        if self._failed is not None:
            raise self._failed
        try:
            self._feed(memoryview(data).cast("B"))
        except InvalidObject as exc:
            self._failed = exc
            raise

    def finish(self) -> StreamedObject:
        """The object, once all of it has been fed; :class:`InvalidObject` if it is incomplete."""
        if self._failed is not None:
            raise self._failed
        headers = self._headers
        tail = self._tail
        if headers is None or self._ciphertext_left or not tail:
            self._failed = InvalidObject("malformed CBOR: truncated")
            raise self._failed
        try:
            _, length, start = _head(bytes(tail), 0, len(tail))
        except _NeedMore:
            length, start = -1, 0
        if start + length != len(tail):
            self._failed = InvalidObject("malformed CBOR: truncated")
            raise self._failed
        signed = self._hash.digest() if self._hash is not None else bytes(self._message or b"")
        return StreamedObject(
            headers.metadata,
            headers.encrypt0_protected,
            bytes(tail[start:]),
            signed,
            headers.ciphertext_start,
            headers.ciphertext_length,
            self._received,
        )

    # --- the work -------------------------------------------------------------------------------

    def _feed(self, data: memoryview) -> None:
        self._received += len(data)
        if self._received > self._max_size:
            raise InvalidObject("object exceeds the size limit")
        if self._headers is None:
            take = min(len(data), HEADER_LIMIT - len(self._head))
            self._head += data[:take]
            try:
                headers = _parse_headers(bytes(self._head), self._max_size)
            except _NeedMore:
                if len(self._head) >= HEADER_LIMIT:
                    raise InvalidObject("headers longer than any valid object's") from None
                return
            self._start(headers)
            head, self._head = self._head, bytearray()
            self._body(memoryview(head)[headers.ciphertext_start :])
            data = data[take:]
        self._body(data)

    def _start(self, headers: _Headers) -> None:
        self._headers = headers
        prefix = b"".join(
            (
                _SIG_STRUCTURE_HEAD,
                cbor.head(2, len(headers.sign1_protected)),
                headers.sign1_protected,
                b"\x40",  # external_aad: empty
                cbor.head(2, headers.payload_length),
            )
        )
        algorithm = headers.metadata.signature_algorithm
        update: Callable[[bytes], object]
        if algorithm.hashes_incrementally:
            self._hash = hashlib.sha256(prefix)
            update = self._hash.update
        else:
            if headers.payload_start + headers.payload_length > self._max_in_memory:
                raise InvalidObject(
                    f"{algorithm.name} objects over {self._max_in_memory} bytes cannot be "
                    "verified as they arrive (it needs the whole message): use ES256"
                )
            self._message = bytearray(prefix)
            update = self._message.extend
        # The Encrypt0's headers are the first bytes of the payload.
        update(bytes(self._head[headers.payload_start : headers.ciphertext_start]))
        self._ciphertext_left = headers.ciphertext_length

    def _body(self, data: memoryview) -> None:
        if not data:
            return
        left = self._ciphertext_left
        if left:
            piece = data[:left]
            if self._hash is not None:
                self._hash.update(piece)
            elif self._message is not None:
                self._message += piece
            self._ciphertext_left = left - len(piece)
            data = data[len(piece) :]
            if not data:
                return
        # The signature: a byte-string head, exactly the algorithm's length, then nothing.
        headers = self._headers
        if headers is None:  # pragma: no cover - _feed parses the headers first
            raise ValueError("no headers")
        wanted = headers.metadata.signature_algorithm.signature_length
        tail = self._tail
        tail += data
        try:
            major, length, start = _head(bytes(tail[:9]), 0, min(len(tail), 9))
        except _NeedMore:
            return
        if major != 2:
            raise InvalidObject("signature is not a byte string")
        if length != wanted:
            raise InvalidObject("signature has the wrong length")
        if len(tail) > start + length:
            raise InvalidObject("malformed CBOR: trailing bytes after the CBOR item")
