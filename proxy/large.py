"""Large objects through the proxy: taken in as they arrive, checked as they pass, served from disk.

An object above :data:`LARGE_FROM` bytes (1 MiB) is never whole in the proxy's memory:

- :class:`Intake` is where an object's bytes go as they arrive: the sink of an upstream Block2
  or BERT transfer (:meth:`proxy.core.Proxy.complete`) or of a publisher's Block1 blocks
  (:mod:`proxy.publishing`). Up to :data:`LARGE_FROM` bytes it keeps them in memory (a small
  object is checked and cached whole, as ever); past it, it writes them to a spool of the body
  store (:class:`proxy.bodies.BodyWriter`, sealed at rest as they are written) and feeds them to
  an :class:`oscar.streaming.ObjectReader`, which checks the size limit and the headers and
  hashes the signed message as they pass. The signer, the signature and the times are then
  checked as for any object (:meth:`oscar_io.trust.Trust.check_stream`), and only then does
  :meth:`Intake.commit` make the body one the proxy serves; a body that fails any check is
  removed (:meth:`Intake.close`) and never served.
- :func:`cut` is one Block2 block of an entry for an answer: a slice of its bytes in memory, or
  read from the body store (:meth:`proxy.bodies.BodyStore.read`).

Memory per transfer: the blocks in flight and a chunk of the spool, whatever the object's size.
Without a body store (a cluster's instance: :mod:`proxy.cluster` shares whole objects through
its store) everything stays in memory, up to the cluster's object size limit.

What this module does not do: decide what is cached (:mod:`proxy.core`), CoAP exchanges
(:mod:`proxy.upstream`, :mod:`proxy.server`).
"""

from __future__ import annotations

from oscar.errors import InvalidObject
from oscar.streaming import ObjectReader, StreamedObject

from .bodies import BodyStore, BodyWriter
from .entry import Entry

__all__ = ["LARGE_FROM", "BadBlock", "Intake", "SpoolError", "cut"]

#: Objects larger than this are spooled to disk as they arrive and served from there.
LARGE_FROM = 1 << 20


class SpoolError(Exception):
    """A large object's body cannot be spooled or kept: the disk failed or is full, or too many
    large objects are being taken in at once (:data:`proxy.bodies.MAX_SPOOLS`). The transfer
    fails as an upstream failure or a 5.03 to its publisher; nothing is cached."""


class BadBlock(Exception):
    """A Block2 block beyond the object's end was asked for (answered 4.00)."""


class Intake:
    """One object's bytes as they arrive (see the module docstring). :meth:`feed` raises
    :class:`~oscar.errors.InvalidObject` once the object is known to be unacceptable (larger
    than ``max_size``, headers that do not decode), :class:`SpoolError` when the spool cannot be
    made or written."""

    def __init__(
        self, bodies: BodyStore | None, *, max_size: int, threshold: int = LARGE_FROM
    ) -> None:
        self._bodies = bodies
        self._max_size = max_size
        self._threshold = threshold
        self._memory = bytearray()
        self._received = 0
        self._reader: ObjectReader | None = None
        self._writer: BodyWriter | None = None
        self._done = False

    def __repr__(self) -> str:
        return f"Intake(received={self._received}, spilled={self.spilled})"

    @property
    def spilled(self) -> bool:
        """Whether the object went past the threshold (and so to the body store's spool)."""
        return self._reader is not None

    @property
    def received(self) -> int:
        return self._received

    @property
    def data(self) -> bytes:
        """The object, when it stayed in memory."""
        if self.spilled:
            raise ValueError("the object was spooled")
        return bytes(self._memory)

    def feed(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("the intake is closed")
        self._received += len(data)
        if self._received > self._max_size:
            raise InvalidObject("object exceeds the size limit")
        if self._reader is None:
            self._memory += data
            if self._bodies is not None and len(self._memory) > self._threshold:
                self._spill(self._bodies)
            return
        self._reader.feed(data)  # first: nothing unacceptable is written
        assert self._writer is not None  # noqa: S101 (set with the reader)
        try:
            self._writer.write(data)
        except OSError as exc:
            raise SpoolError(f"the body store: {exc.strerror}") from None

    def _spill(self, bodies: BodyStore) -> None:
        data, self._memory = self._memory, bytearray()
        reader = ObjectReader(max_size=self._max_size)
        reader.feed(data)
        try:
            writer = bodies.spool()
        except OSError as exc:
            raise SpoolError(f"the body store: {exc.strerror}") from None
        self._reader, self._writer = reader, writer
        try:
            writer.write(data)  # a bytearray: not copied
        except OSError as exc:
            raise SpoolError(f"the body store: {exc.strerror}") from None

    def finish(self) -> StreamedObject:
        """The spooled object's headers, digest and layout; InvalidObject if it is incomplete."""
        if self._reader is None:
            raise ValueError("the object was not spooled")
        return self._reader.finish()

    def commit(self, resource_id: str, version: tuple[int, int]) -> int:
        """Make the body the one served for ``resource_id`` at ``version`` (it has passed every
        check); its length. :class:`SpoolError` if it cannot be written."""
        if self._writer is None or self._done:
            raise ValueError("no spooled object to commit")
        self._done = True
        try:
            return self._writer.commit(resource_id, version)
        except OSError as exc:
            raise SpoolError(f"the body store: {exc.strerror}") from None

    def close(self) -> None:
        """Remove the spool unless it was committed (idempotent)."""
        writer = self._writer
        self._memory = bytearray()
        if writer is not None and not self._done:
            writer.abort()
        self._done = True


def cut(
    entry: Entry, bodies: BodyStore | None, number: int, size_exponent: int, max_payload: int
) -> tuple[bytes, bool]:
    """Block ``number`` of ``entry``'s object (size exponent 0 to 6, or 7: BERT, in units of 1 KiB
    and ``max_payload`` bytes at most) and whether more follow. :class:`BadBlock` beyond the
    end; :class:`proxy.bodies.BodyError` if a large body cannot be read (missing, altered)."""
    if size_exponent == 7:
        start, size = number * 1024, 1024 * max(1, max_payload // 1024)
    else:
        size = 1 << (size_exponent + 4)
        start = number * size
    total = entry.size
    if start >= total:
        raise BadBlock("a block beyond the object's end")
    end = min(start + size, total)
    if not entry.body:
        return entry.obj[start:end], end < total
    if bodies is None:
        raise ValueError("a large entry without a body store")
    return bodies.read(entry.resource_id, entry.version, start, end - start), end < total
