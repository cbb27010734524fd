"""The AS wire schema as its clients read it: the reply records of the AS endpoints
(docs/PROTOCOL.md, "AS endpoints"), their CBOR shapes, and the translation of an AS answer into a
document or an :class:`~oscar_io.errors.AsError`. The AS builds its ``/keys`` replies with
:meth:`KeyState.to_cbor`, so the shape is written once."""

from __future__ import annotations

from typing import Any, NamedTuple

from oscar import cbor
from oscar.keys import AccessSecret

from .errors import AccessDenied, AsError, AsUnavailable

__all__ = [
    "CBOR_FORMAT",
    "EpochKey",
    "KeyState",
    "Registration",
    "SecretGrant",
    "decode_reply",
    "reply_field",
]

#: CoAP Content-Format of application/cbor.
CBOR_FORMAT = 60


class Registration(NamedTuple):
    """A ``POST /resources`` reply; ``created`` is False when the AS knew the resource already."""

    resource_id: str
    epoch: int
    created: bool


class SecretGrant(NamedTuple):
    """A ``GET /secret`` reply."""

    resource_id: str
    epoch: int
    state: str
    secret: AccessSecret
    profile: str


class EpochKey(NamedTuple):
    epoch: int
    secret: AccessSecret
    activated_at: int | None


class KeyState(NamedTuple):
    """A ``GET /keys`` reply: what a producer needs to seal now and after the next boundary."""

    resource_id: str
    profile: str
    rotation_period: int
    active: EpochKey
    #: Always set in a reply from the AS; None in a producer's own record after it switched to
    #: the next epoch by itself (at the boundary, with the AS out of reach).
    next: EpochKey | None

    def to_cbor(self) -> dict[str, Any]:
        return {
            "resource": self.resource_id,
            "profile": self.profile,
            "rotation_period": self.rotation_period,
            "active": {
                "epoch": self.active.epoch,
                "secret": self.active.secret.value,
                "activated_at": self.active.activated_at,
            },
            "next": None
            if self.next is None
            else {"epoch": self.next.epoch, "secret": self.next.secret.value},
        }

    @classmethod
    def from_cbor(cls, doc: Any, *, next_required: bool = True) -> KeyState:
        """Parse a /keys reply (or, with ``next_required=False``, a producer's stored copy);
        AsError if it is not of that shape."""
        try:
            active, upcoming = doc["active"], doc["next"]
            following = (
                None
                if upcoming is None and not next_required
                else EpochKey(
                    uint(upcoming["epoch"]), AccessSecret(byte_string(upcoming["secret"])), None
                )
            )
            state = cls(
                text(doc["resource"]),
                text(doc["profile"]),
                uint(doc["rotation_period"]),
                EpochKey(
                    uint(active["epoch"]),
                    AccessSecret(byte_string(active["secret"])),
                    uint(active["activated_at"]),
                ),
                following,
            )
        except (KeyError, TypeError, ValueError):
            raise AsError("malformed key state from the AS") from None
        return state


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("text expected")
    return value


def uint(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise TypeError("unsigned integer expected")
    return value


def byte_string(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("bytes expected")
    return value


def decode_reply(response: Any, what: str) -> Any:
    code = response.code
    dotted = code.dotted
    detail = ""
    if response.opt.content_format == CBOR_FORMAT and response.payload:
        try:
            doc = cbor.loads(response.payload)
        except ValueError:
            raise AsError(f"{what}: the AS sent malformed CBOR", dotted) from None
    else:
        doc = None
    if code.is_successful():
        if not isinstance(doc, dict):
            raise AsError(f"{what}: the AS sent no CBOR map", dotted)
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, str):
        detail = ": " + error[:200]
    if dotted in ("4.01", "4.03"):
        raise AccessDenied(f"{what}: refused ({dotted}){detail}", dotted)
    if dotted in ("5.03", "4.29"):
        raise AsUnavailable(f"{what}: the AS is busy ({dotted}){detail}", dotted)
    raise AsError(f"{what}: the AS answered {dotted}{detail}", dotted)


def reply_field(reply: Any, name: str, kind: type) -> Any:
    value = reply.get(name)
    if not isinstance(value, kind) or (kind is int and type(value) is not int):
        raise AsError(f"the AS reply lacks {name!r}")
    return value
