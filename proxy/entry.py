"""One cache entry: an object the proxy has verified, with what it needs to serve it.

An :class:`Entry` holds the object's bytes as received (protected: the proxy never holds a
plaintext), or for a large object only its length (``body``: the bytes are on disk,
:mod:`proxy.bodies`), its (epoch, seq), ``exp``, ETag, signer, where it came from and until
when it is fresh. :meth:`Entry.to_cbor` / :meth:`Entry.from_cbor` are its stored form, the same
for every cache backend (:mod:`proxy.backend`); ``from_cbor`` raises ``ValueError`` and nothing
else for a value that is not an entry.

What this module does not do: verify (:mod:`proxy.core`), keep or encrypt entries
(:mod:`proxy.cache`, :mod:`proxy.diskcache`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Entry"]


@dataclass(frozen=True, slots=True, repr=False)
class Entry:
    """A verified object and how to serve it."""

    resource_id: str
    obj: bytes
    epoch: int
    seq: int
    exp: int
    etag: bytes
    kid: bytes
    serial: int | None
    #: The URI it was fetched from (None: published to the proxy).
    upstream: str | None
    #: The ETag the upstream gave it (for revalidation), if any.
    upstream_etag: bytes | None
    #: Wall-clock second until which it is fresh (stored time + Max-Age).
    fresh_until: float
    #: A large object's length, its bytes kept on disk (:class:`proxy.bodies.BodyStore`) and
    #: ``obj`` empty; 0: the object is ``obj``.
    body: int = 0

    @property
    def size(self) -> int:
        """The object's length, wherever its bytes are."""
        return self.body or len(self.obj)

    def __repr__(self) -> str:
        return f"Entry({self.resource_id!r}, epoch={self.epoch}, seq={self.seq})"

    @property
    def version(self) -> tuple[int, int]:
        return (self.epoch, self.seq)

    def refreshed(self, fresh_until: float) -> Entry:
        return replace(self, fresh_until=fresh_until)

    def to_cbor(self) -> list[Any]:
        return [
            self.resource_id,
            self.obj,
            self.epoch,
            self.seq,
            self.exp,
            self.etag,
            self.kid,
            None if self.serial is None else _serial_bytes(self.serial),
            self.upstream,
            self.upstream_etag,
            int(self.fresh_until),
            # its milliseconds: a whole second would make another instance of a cluster
            # (proxy.cluster) find the entry stale up to a second early, and fetch again
            int(self.fresh_until * 1000) % 1000,
        ] + ([self.body] if self.body else [])

    @classmethod
    def from_cbor(cls, doc: Any) -> Entry:
        # 11 items: written before the milliseconds of fresh_until were kept; 13: a large
        # object's length (its bytes on disk)
        if not isinstance(doc, list) or len(doc) not in (11, 12, 13):
            raise ValueError("not a cache entry")
        rid, obj, epoch, seq, exp, etag, kid, serial, upstream, upstream_etag, fresh = doc[:11]
        ms = doc[11] if len(doc) >= 12 else 0
        body = doc[12] if len(doc) == 13 else 0
        if not (
            isinstance(rid, str)
            and isinstance(obj, bytes)
            and all(type(v) is int for v in (epoch, seq, exp, fresh))
            and type(ms) is int
            and 0 <= ms < 1000
            and type(body) is int
            and (body == 0 or (body > 0 and obj == b""))
            and isinstance(etag, bytes)
            and isinstance(kid, bytes)
            and (serial is None or isinstance(serial, bytes))
            and (upstream is None or isinstance(upstream, str))
            and (upstream_etag is None or isinstance(upstream_etag, bytes))
        ):
            raise ValueError("not a cache entry")
        number = None if serial is None else int.from_bytes(serial, "big")
        fresh_until = fresh + ms / 1000
        return cls(
            rid, obj, epoch, seq, exp, etag, kid, number, upstream, upstream_etag, fresh_until, body
        )


def _serial_bytes(serial: int) -> bytes:
    """X.509 serials run to 160 bits: stored as bytes (CBOR integers stop at 64)."""
    return serial.to_bytes((serial.bit_length() + 7) // 8 or 1, "big")
