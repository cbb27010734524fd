"""Target ``as_parsers``: the AS's strict request parsing in :mod:`authz_server.messages`.

Contract: ``parse_body``, ``parse_query``, ``resource_id_param`` and ``epoch_number`` refuse bad
input with an :class:`~authz_server.messages.ApiError` (BadRequest, RequestTooLarge,
UnsupportedContentFormat) and raise nothing else; what they accept satisfies the rule they check.
"""

from __future__ import annotations

from authz_server.messages import (
    MAX_EPOCH,
    MAX_UINT32,
    ApiError,
    Request,
    epoch_number,
    is_bytes,
    is_text,
    parse_body,
    parse_query,
    resource_id_param,
    uint_at_most,
)
from oscar import cbor, names

from ._common import Reader, expect

__all__ = ["TestOneInput", "seeds"]

#: The body specs and query keys the endpoints use (authz_server/api.py).
_BODIES = (
    {"csr": is_bytes},
    {
        "path": is_text,
        "content_format": uint_at_most(0xFFFF),
        "profile": is_text,
        "max_age": uint_at_most(MAX_UINT32),
        "rotation_period": uint_at_most(MAX_UINT32),
    },
)
_QUERIES: tuple[tuple[str, ...], ...] = ((), ("id", "kid"), ("r", "e"), ("r",), ("proxy",))
_FORMATS = (None, 60, 0, 40, 65535)


def TestOneInput(data: bytes) -> None:
    reader = Reader(data)
    what = reader.byte() % 4
    if what == 0:
        fmt = _FORMATS[reader.byte() % len(_FORMATS)]
        spec = _BODIES[reader.byte() % len(_BODIES)]
        request = Request("sensor-1", "POST", ("x",), (), reader.rest(), fmt)
        try:
            body = parse_body(request, spec)
        except ApiError:
            return
        expect(set(body) == set(spec), "parse_body accepted a map with other keys")
        expect(all(spec[k](v) for k, v in body.items()), "parse_body accepted a bad value")
    elif what == 1:
        allowed = _QUERIES[reader.byte() % len(_QUERIES)]
        payload = reader.chunk() if reader.byte() & 1 else b""
        query = tuple(reader.text() for _ in range(reader.byte() % 5))
        try:
            items = parse_query(Request("sensor-1", "GET", ("x",), query, payload), allowed)
        except ApiError:
            return
        expect(not payload, "parse_query accepted a payload")
        expect(set(items) <= set(allowed) and all(items.values()), "parse_query broke its rule")
    elif what == 2:
        text = reader.rest().decode("utf-8", "replace")
        try:
            expect(resource_id_param(text) == text, "resource_id_param changed its argument")
        except ApiError:
            return
        expect(names.is_resource_id(text), "resource_id_param accepted a bad resource id")
    else:
        text = reader.rest().decode("utf-8", "replace")
        try:
            epoch = epoch_number(text)
        except ApiError:
            return
        expect(0 <= epoch <= MAX_EPOCH and str(epoch) == text, "epoch_number accepted junk")


def seeds() -> list[bytes]:
    body = cbor.dumps(
        {"path": "t", "content_format": 0, "profile": "ccm-es256", "max_age": 60,
         "rotation_period": 3600}
    )  # fmt: skip
    return [
        b"\x00\x00\x01" + body,
        b"\x00\x01\x00" + cbor.dumps({"csr": b"\x30\x00"}),
        b"\x01\x02\x00\x02\x0csensor-1/t\x03e=1",
        b"\x02sensor-1/temperature",
        b"\x039223372036854775807",
    ]
