"""The AS's wire messages: the request and reply records, the error tree, strict parsing.

::

    ApiError                      5.00  (anything unexpected; the detail stays in the log)
    ├── BadRequest                4.00  malformed CBOR, wrong keys or types, bad id grammar
    ├── Unauthorized              4.01  the identity is not (or no longer) an active device
    ├── Forbidden                 4.03  authenticated, but not allowed (audited)
    ├── NotFound                  4.04  no such path, resource, epoch or certificate
    ├── MethodNotAllowed          4.05
    ├── RequestTooLarge           4.13  payload over MAX_PAYLOAD bytes
    ├── UnsupportedContentFormat  4.15  a payload that says it is not CBOR
    ├── TooManyRequests           4.29  rate limit; Max-Age = seconds to wait
    └── ServiceUnavailable        5.03  the database cannot be reached now; Max-Age = seconds
                                        after which to try again

Decoding is strict: :func:`oscar.cbor.loads`, exact key sets, exact types, ids checked with
:mod:`oscar.names`. This module knows no endpoint and no store (see :mod:`authz_server.api`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiocoap import Message
from aiocoap.error import ConstructionRenderableError
from aiocoap.numbers.codes import Code

from oscar import cbor, names
from oscar_io.aswire import CBOR_FORMAT  # the AS wire schema, shared with its clients

__all__ = [
    "CBOR_FORMAT",
    "MAX_PAYLOAD",
    "ApiError",
    "BadRequest",
    "Forbidden",
    "MethodNotAllowed",
    "NotFound",
    "Reply",
    "Request",
    "RequestTooLarge",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedContentFormat",
    "parse_body",
    "parse_query",
]

MAX_PAYLOAD = 4096
LINK_FORMAT = 40
MAX_UINT32 = 0xFFFF_FFFF

MAX_EPOCH = 2**63 - 1
EPOCH_PATTERN = re.compile(r"0|[1-9][0-9]{0,18}")
KID_PATTERN = re.compile(r"[0-9a-f]{16}")


# --- errors --------------------------------------------------------------------------------------


class ApiError(ConstructionRenderableError):  # type: ignore[misc]
    """A request the AS answers with an error code and CBOR ``{"error": message}``."""

    code = Code.INTERNAL_SERVER_ERROR
    message = "internal error"

    def to_message(self) -> Message:
        return Message(
            code=self.code,
            payload=cbor.dumps({"error": self.message}),
            content_format=CBOR_FORMAT,
        )

    def __str__(self) -> str:
        return f"{self.code.dotted} {self.message}"


class BadRequest(ApiError):
    code = Code.BAD_REQUEST
    message = "bad request"


class Unauthorized(ApiError):
    code = Code.UNAUTHORIZED
    message = "not an active device"


class Forbidden(ApiError):
    code = Code.FORBIDDEN
    message = "forbidden"


class NotFound(ApiError):
    code = Code.NOT_FOUND
    message = "not found"


class MethodNotAllowed(ApiError):
    code = Code.METHOD_NOT_ALLOWED
    message = "method not allowed"


class RequestTooLarge(ApiError):
    code = Code.REQUEST_ENTITY_TOO_LARGE
    message = f"the payload is larger than {MAX_PAYLOAD} bytes"


class UnsupportedContentFormat(ApiError):
    code = Code.UNSUPPORTED_CONTENT_FORMAT
    message = "requests carry CBOR (content format 60)"


class TooManyRequests(ApiError):
    code = Code.TOO_MANY_REQUESTS
    message = "too many requests"

    def __init__(self, wait: int) -> None:
        super().__init__(f"too many requests; retry in {wait} s")
        self.wait = wait

    def to_message(self) -> Message:
        response = super().to_message()
        response.opt.max_age = self.wait
        return response


class ServiceUnavailable(ApiError):
    """The AS cannot answer now (its database is unreachable: PostgreSQL stopped or
    restarting); the client may try again after Max-Age seconds. Nothing of the request was
    done."""

    code = Code.SERVICE_UNAVAILABLE
    message = "service unavailable"

    #: Seconds a client waits before asking again (the backoff of the database's reconnection
    #: is at most 5 s; a short wait lets devices come back soon after the database does).
    RETRY = 2

    def __init__(self, wait: int = RETRY) -> None:
        super().__init__("the database is unavailable; retry later")
        self.wait = wait

    def to_message(self) -> Message:
        response = super().to_message()
        response.opt.max_age = self.wait
        return response


# --- request and reply ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the endpoints see it; ``device`` is the DTLS-authenticated identity."""

    device: str | None
    method: str
    path: tuple[str, ...]
    query: tuple[str, ...] = ()
    payload: bytes = b""
    content_format: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    code: Code
    payload: bytes
    content_format: int = CBOR_FORMAT

    @classmethod
    def cbor(cls, code: Code, value: dict[str, Any]) -> Reply:
        return cls(code, cbor.dumps(value))

    def __repr__(self) -> str:  # replies may hold secrets
        return f"Reply({self.code.dotted}, <{len(self.payload)} bytes>)"

    def to_message(self) -> Message:
        return Message(code=self.code, payload=self.payload, content_format=self.content_format)


# --- strict parsing ------------------------------------------------------------------------------


def uint_at_most(limit: int) -> Callable[[object], bool]:
    return lambda value: type(value) is int and 0 <= value <= limit


def is_bytes(value: object) -> bool:
    return type(value) is bytes


def is_text(value: object) -> bool:
    return type(value) is str


def parse_body(
    request: Request,
    fields: dict[str, Callable[[object], bool]],
    optional: dict[str, Callable[[object], bool]] | None = None,
) -> dict[str, Any]:
    """The request's CBOR map, which must have exactly the keys of ``fields`` (and may have
    those of ``optional``), each value passing its check. BadRequest otherwise (the message
    names the rule, never echoes the value)."""
    if request.content_format not in (None, CBOR_FORMAT):
        raise UnsupportedContentFormat()
    if len(request.payload) > MAX_PAYLOAD:
        raise RequestTooLarge()
    try:
        value = cbor.loads(request.payload, max_depth=4, max_items=64)
    except cbor.MalformedCBOR:
        raise BadRequest("the payload is not well-formed CBOR") from None
    if type(value) is not dict:
        raise BadRequest("the payload must be a CBOR map")
    optional = optional or {}
    if not set(fields) <= set(value) <= set(fields) | set(optional):
        raise BadRequest(
            "the map must have exactly the keys " + ", ".join(sorted(fields))
            + "".join(f" (and optionally {key})" for key in sorted(optional))
        )  # fmt: skip
    for key, check in (fields | optional).items():
        if key in value and not check(value[key]):
            raise BadRequest(f"{key!r} has the wrong type or is out of range")
    return cast(dict[str, Any], value)


def parse_query(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """``key=value`` query items, each key at most once and from ``allowed``; no payload."""
    if request.payload:
        raise BadRequest("this request takes no payload")
    items: dict[str, str] = {}
    for item in request.query:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed or key in items or not value:
            raise BadRequest("the query takes " + (", ".join(allowed) or "nothing") + ", once each")
        items[key] = value
    return items


def resource_id_param(text: str) -> str:
    if not names.is_resource_id(text):
        raise BadRequest("a resource id is '<producer id>/<path>' of A-Z a-z 0-9 . _ ~ -")
    return text


def epoch_number(text: str) -> int:
    # SQLite integers end at 2**63 - 1: a larger epoch can name nothing stored.
    if not EPOCH_PATTERN.fullmatch(text) or int(text) > MAX_EPOCH:
        raise BadRequest(f"an epoch is an unsigned decimal integer up to {MAX_EPOCH}")
    return int(text)
