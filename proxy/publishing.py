"""A publisher's Block1 blocks, taken in as they arrive (RFC 7959 §2.5; BERT, RFC 8323 §6).

aiocoap's own Block1 assembly keeps every upload whole in memory and copies it for each block it
appends. Here each upload (one per device and resource: a new block 0 starts it again) feeds an
:class:`~proxy.large.Intake`: in memory up to 1 MiB, then spooled to disk and read as it arrives
(:mod:`proxy.large`). Every block must follow the one before (its offset, the same size, full
but the last: a BERT block a multiple of 1 KiB) or the upload is dropped and the block answered
4.08; a block that would take the object past the size limit, 4.13. Each block but the last is
answered 2.31 Continue, the last by what publishing the whole answers (:meth:`Uploads.block`
hands it back once complete).

Bounded: at most :data:`PER_DEVICE` uploads per device and :data:`MAX_UPLOADS` in all (beyond
them, 5.03 with a Max-Age), each dropped once silent for :data:`IDLE` seconds (looked at with
every block), so an upload left half-way holds no spool for long.

What this module does not do: decide who may publish or check the object (:mod:`proxy.server`,
:mod:`proxy.core`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .bodies import BodyStore
from .large import Intake

__all__ = ["IDLE", "MAX_UPLOADS", "PER_DEVICE", "BlockRefused", "Uploads"]

#: Uploads in progress at once, in all and per device.
MAX_UPLOADS = 32
PER_DEVICE = 4
#: Seconds an upload may stay silent before it is dropped.
IDLE = 60.0


class BlockRefused(Exception):
    """A Block1 block that cannot be taken: ``code`` is the answer's (4.08, 4.13, 5.03)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Upload:
    intake: Intake
    size_exponent: int
    #: The next block's offset in bytes.
    offset: int = 0
    touched: float = field(default_factory=time.monotonic)


class Uploads:
    """The Block1 uploads in progress (see the module docstring)."""

    def __init__(
        self,
        bodies: Callable[[], BodyStore | None],
        *,
        max_size: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bodies = bodies
        self._max_size = max_size
        self._clock = clock
        self._uploads: dict[tuple[str, str], _Upload] = {}

    def __repr__(self) -> str:
        return f"Uploads({len(self._uploads)})"

    def __len__(self) -> int:
        return len(self._uploads)

    def block(self, device: str, resource_id: str, block1: Any, payload: bytes) -> Intake | None:
        """Take one block of ``device``'s upload of ``resource_id``: the whole object's intake
        once this was the last block (the caller publishes it and closes it), else None
        (answer 2.31). Raises :class:`BlockRefused`, InvalidObject when the bytes so far are
        known not to be an acceptable object (larger than the limit, headers that do not
        decode), and :class:`~proxy.large.SpoolError` when the spool cannot be made or written (the
        upload is dropped)."""
        self._sweep()
        key = (device, resource_id)
        number, more, szx = block1.block_number, block1.more, block1.size_exponent
        unit = 1024 if szx == 7 else 1 << (szx + 4)
        if more and (not payload or len(payload) % unit or (szx != 7 and len(payload) != unit)):
            self.drop(key)
            raise BlockRefused("4.00", "a Block1 block shorter than its size, not the last")
        if number == 0:
            self.drop(key)
            self._room(device)
            bodies = self._bodies()
            upload = _Upload(Intake(bodies, max_size=self._max_size()), szx)
            self._uploads[key] = upload
        else:
            found = self._uploads.get(key)
            if found is None or found.size_exponent != szx or number * unit != found.offset:
                self.drop(key)
                raise BlockRefused("4.08", "a Block1 block out of order, or no upload under way")
            upload = found
        try:
            upload.intake.feed(payload)
        except BaseException:
            self.drop(key)
            raise
        upload.offset += len(payload)
        upload.touched = self._clock()
        if more:
            return None
        del self._uploads[key]
        return upload.intake

    def drop(self, key: tuple[str, str]) -> None:
        upload = self._uploads.pop(key, None)
        if upload is not None:
            upload.intake.close()

    def close(self) -> None:
        for key in list(self._uploads):
            self.drop(key)

    def _room(self, device: str) -> None:
        mine = sum(1 for d, _ in self._uploads if d == device)
        if mine >= PER_DEVICE or len(self._uploads) >= MAX_UPLOADS:
            raise BlockRefused("5.03", "too many uploads under way")

    def _sweep(self) -> None:
        limit = self._clock() - IDLE
        for key in [k for k, u in self._uploads.items() if u.touched < limit]:
            self.drop(key)
