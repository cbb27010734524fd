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
    "PartKeys",
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


class PartKeys(NamedTuple):
    """One part of a multi-part resource in a ``/keys`` reply (issue 19): its name and kind
    (``"plain"`` or ``"encrypted"``) and, for an encrypted part, its own active and next epoch
    (both None for a plain part; ``next`` None in a producer's record after it switched alone)."""

    name: str
    kind: str
    active: EpochKey | None = None
    next: EpochKey | None = None

    def to_cbor(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.active is not None:
            doc["active"] = {
                "epoch": self.active.epoch,
                "secret": self.active.secret.value,
                "activated_at": self.active.activated_at,
            }
            doc["next"] = (
                None
                if self.next is None
                else {"epoch": self.next.epoch, "secret": self.next.secret.value}
            )
        return doc

    @classmethod
    def from_cbor(cls, doc: Any, *, next_required: bool = True) -> PartKeys:
        """TypeError/KeyError/ValueError if ``doc`` is not of this shape (the caller's AsError)."""
        name, kind = text(doc["name"]), text(doc["kind"])
        if kind == "plain":
            return cls(name, kind)
        if kind != "encrypted":
            raise ValueError("unknown part kind")
        active, upcoming = doc["active"], doc["next"]
        following = (
            None
            if upcoming is None and not next_required
            else EpochKey(
                uint(upcoming["epoch"]), AccessSecret(byte_string(upcoming["secret"])), None
            )
        )
        return cls(
            name,
            kind,
            EpochKey(
                uint(active["epoch"]),
                AccessSecret(byte_string(active["secret"])),
                uint(active["activated_at"]),
            ),
            following,
        )


class KeyState(NamedTuple):
    """A ``GET /keys`` reply: what a producer needs to seal now and after the next boundary."""

    resource_id: str
    profile: str
    rotation_period: int
    active: EpochKey
    #: Always set in a reply from the AS; None in a producer's own record after it switched to
    #: the next epoch by itself (at the boundary, with the AS out of reach).
    next: EpochKey | None
    #: A multi-part resource's parts, in the declared order (the reply's ``parts``); empty for a
    #: single-part resource, whose reply and record have no ``parts`` key.
    parts: tuple[PartKeys, ...] = ()

    def to_cbor(self) -> dict[str, Any]:
        doc = {
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
        if self.parts:
            doc["parts"] = [part.to_cbor() for part in self.parts]
        return doc

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
            if "parts" in doc:
                raw = doc["parts"]
                if type(raw) is not list or not raw:
                    raise TypeError("parts is a non-empty list")
                parts = tuple(PartKeys.from_cbor(p, next_required=next_required) for p in raw)
                state = state._replace(parts=parts)
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
