"""Opening a multi-part object (issue 19): the parts this consumer is granted, and which it is not.

:func:`open_parts` is :meth:`consumer.pipeline.Pipeline.open` for an object of several parts
(:mod:`oscar.parts`): the same checks before any secret is used (``Trust.check_any``: the
signer, its certificate and revocation, the signature over every part, the times), then
freshness by seq alone (a multi-part object's version is ``(0, seq)``), then each encrypted
part's secret, asked of the AS per part (``GET /secret?r=&p=&e=``) and kept encrypted at rest
like a resource's (under the key ``RESOURCE#PART``, which no resource id can be: ``#`` is not
allowed in one). A part the AS refuses this consumer is *not granted* (reported, never
guessed; the refusal is remembered for :data:`DENIAL_TTL` seconds, so that each reading does
not ask again), and so is a part whose secret the consumer lacks while the AS cannot be reached
(logged): the parts it holds secrets for, and the plain ones, still open — a consumer keeps
reading while the AS is away. A granted part that does not open fails the whole object, and
nothing is accepted.

What this module does not do: fetch the object (:meth:`consumer.client.Consumer.get_parts`), or
hold a copy for later (a multi-part reading is not kept as a held reading).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from oscar.errors import InvalidObject
from oscar.keys import AccessSecret
from oscar.parts import MultiPartObject
from oscar.partsopening import PartsReading, open_parts_verified
from oscar_io.errors import AccessDenied, AsError, AsUnavailable

from .errors import StaleCopy

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["DENIAL_TTL", "open_parts", "part_key"]

log = logging.getLogger("oscar.consumer")

#: Seconds a refusal of a part's secret is remembered (a grant made later is seen after this).
DENIAL_TTL = 60.0
_MAX_DENIALS = 1024


def part_key(resource_id: str, part: str) -> str:
    """Where a part's secret is kept in the consumer's store (beside the resources')."""
    return f"{resource_id}#{part}"


async def open_parts(pipeline: Pipeline, data: bytes, resource_id: str) -> PartsReading:
    """The parts of ``data`` (an object of ``resource_id``) this consumer may read.

    Raises :class:`InvalidObject` (a single-part object included: :meth:`Pipeline.open` opens
    those), :class:`StaleCopy` if it is older than the newest accepted, and what
    :meth:`oscar_io.trust.Trust.check_any` raises (``TransportError`` when a certificate or the
    CRL is needed and the AS cannot be reached)."""
    now = int(pipeline.clock())
    obj, _ = await pipeline.trust.check_any(
        data, resource_id, now, max_size=pipeline.max_object_size
    )
    if not isinstance(obj, MultiPartObject):
        raise InvalidObject("not a multi-part object")
    m = obj.metadata
    commits = pipeline.commits
    version = (0, m.seq)
    newest = commits.newest(resource_id)
    if newest is not None and version < newest:
        raise StaleCopy(resource_id, version, newest)
    is_same = newest == version
    if not is_same:
        commits.check(resource_id, 0, m.seq)
    secrets: dict[tuple[str, int], AccessSecret | None] = {}
    for descriptor in m.parts:
        if descriptor.epoch is not None:
            key = (descriptor.name, descriptor.epoch)
            secrets[key] = await _secret(pipeline, resource_id, *key)
    reading = open_parts_verified(obj, secrets=lambda _r, part, epoch: secrets[(part, epoch)])
    if not is_same:
        done = commits.accept(resource_id, 0, m.seq, b"")  # b"": not held
        if done is not None:
            await done  # released once its freshness is on disk
    return reading


async def _secret(
    pipeline: Pipeline, resource_id: str, part: str, epoch: int
) -> AccessSecret | None:
    """The part's secret from the store, else from the AS; None: not granted to this consumer."""
    key = part_key(resource_id, part)
    held = pipeline.store.secret(key, epoch)
    if held is not None:
        return held
    denials = pipeline.part_denials
    now = pipeline.clock()
    if denials.get((key, epoch), 0.0) > now:
        return None
    client = await pipeline.as_client()
    try:
        grant = await client.secret(resource_id, epoch, part=part)
    except (AccessDenied, AsError) as exc:
        if isinstance(exc, AsUnavailable) or (
            not isinstance(exc, AccessDenied) and exc.code not in ("4.04", "4.10")
        ):
            log.info("%s: part %s not opened: the AS cannot say now (%s)", resource_id, part, exc)
            return None
        if len(denials) >= _MAX_DENIALS:
            denials.clear()
        denials[(key, epoch)] = now + DENIAL_TTL  # refused, or no such part or epoch
        return None
    pipeline.store.put_secret(key, epoch, grant.secret)
    log.info("access secret of %s part %s epoch %d from the AS", resource_id, part, epoch)
    return grant.secret
