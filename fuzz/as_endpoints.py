"""Target ``as_endpoints``: :meth:`authz_server.api.Endpoints.handle` on a real (temporary) store.

The request is built from the input as the server builds it from a CoAP message (after DTLS):
an authenticated device id or none, method, Uri-Path, Uri-Query, payload, content format.
Contract (authz_server/api.py, server.py): every refusal is an
:class:`~authz_server.messages.ApiError` (anything else would be a 5.00 and a logged traceback);
a refusal for bad input (BadRequest, RequestTooLarge, UnsupportedContentFormat,
MethodNotAllowed) changes no stored state (DESIGN §7.6).

The store lives in a temporary directory made on first use; :func:`close` removes it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from authz_server.api import Endpoints
from authz_server.ca import CertificateAuthority, init_state
from authz_server.messages import (
    ApiError,
    BadRequest,
    MethodNotAllowed,
    Reply,
    Request,
    RequestTooLarge,
    UnsupportedContentFormat,
)
from authz_server.store import Resource, Store
from oscar import cbor

from ._common import Reader, expect

__all__ = ["TestOneInput", "close", "seeds"]

NOW = 1_800_000_000
_DEVICES = ("sensor-1", "phone-1", "cloud-1", "gone-1", None, "nobody")
_METHODS = ("GET", "POST", "PUT", "DELETE", "FETCH", "")
_PATHS = (
    (".well-known", "core"), ("cert",), ("crl",), ("resources",), ("secret",), ("keys",),
    ("link",), ("links",), (), ("secret", "x"),
)  # fmt: skip
_KEYS = ("r", "e", "id", "kid", "proxy", "")
_FORMATS = (None, 60, 0, 40)
_BAD_INPUT = (BadRequest, RequestTooLarge, UnsupportedContentFormat, MethodNotAllowed)

_state: dict[str, object] = {}


async def _open(directory: Path) -> tuple[Store, Endpoints]:
    store = await init_state(directory / "state", as_uri="coaps://127.0.0.1:5684", now=NOW)
    await store.add_device("sensor-1", "producer", bytes(16), NOW)
    await store.add_device("phone-1", "consumer", bytes(range(16)), NOW)
    await store.add_device("cloud-1", "proxy", bytes(range(1, 17)), NOW)
    await store.add_device("gone-1", "consumer", bytes(range(2, 18)), NOW)
    await store.revoke_device("gone-1", NOW)
    await store.register_resource(
        Resource("sensor-1/temperature", "sensor-1", 0, "ccm-es256", 60, 3600, NOW)
    )
    await store.add_grant("phone-1", "sensor-1/*", None, NOW)
    ca = await CertificateAuthority.load(store)
    return store, Endpoints(store, ca, clock=lambda: NOW)


def _endpoints() -> tuple[asyncio.AbstractEventLoop, Store, Endpoints]:
    if not _state:
        directory = Path(tempfile.mkdtemp(prefix="oscar-fuzz-as-"))
        loop = asyncio.new_event_loop()
        store, endpoints = loop.run_until_complete(_open(directory))
        _state.update(directory=directory, loop=loop, store=store, endpoints=endpoints)
    return _state["loop"], _state["store"], _state["endpoints"]  # type: ignore[return-value]


def close() -> None:
    """Close the store and the loop and remove the temporary directory."""
    if not _state:
        return
    loop, store = _state["loop"], _state["store"]
    loop.run_until_complete(store.close())  # type: ignore[attr-defined]
    loop.close()  # type: ignore[attr-defined]
    shutil.rmtree(_state["directory"], ignore_errors=True)  # type: ignore[arg-type]
    _state.clear()


def _request(reader: Reader) -> Request:
    device = _DEVICES[reader.byte() % len(_DEVICES)]
    method = _METHODS[reader.byte() % len(_METHODS)]
    path = _PATHS[reader.byte() % len(_PATHS)]
    query = tuple(
        f"{_KEYS[reader.byte() % len(_KEYS)]}={reader.text()}" for _ in range(reader.byte() % 4)
    )
    content_format = _FORMATS[reader.byte() % len(_FORMATS)]
    return Request(device, method, path, query, reader.rest(), content_format)


def TestOneInput(data: bytes) -> None:
    loop, store, endpoints = _endpoints()
    request = _request(Reader(data))
    before = loop.run_until_complete(store.changes())
    try:
        reply = loop.run_until_complete(endpoints.handle(request))
    except _BAD_INPUT:
        after = loop.run_until_complete(store.changes())
        expect(after == before, "a request refused as bad input changed the stored state")
        return
    except ApiError:
        return
    expect(isinstance(reply, Reply), "handle returned something other than a Reply")


def seeds() -> list[bytes]:
    register = cbor.dumps(
        {"path": "humidity", "content_format": 0, "profile": "ccm-es256", "max_age": 60,
         "rotation_period": 3600}
    )  # fmt: skip
    return [
        bytes([1, 0, 4, 1, 0, 20]) + b"sensor-1/temperature" + b"\x00",
        bytes([0, 0, 4, 1, 0, 20]) + b"sensor-1/temperature" + b"\x00",
        bytes([0, 1, 3, 0, 0]) + register,
        bytes([0, 0, 5, 1, 0, 20]) + b"sensor-1/temperature" + b"\x00",
        bytes([1, 0, 6, 1, 4, 7]) + b"cloud-1" + b"\x00",
        bytes([2, 0, 7, 0, 0]),
        bytes([0, 0, 1, 1, 3, 16]) + b"0011223344556677" + b"\x00",
        bytes([0, 0, 0, 0, 0]),
        bytes([2, 0, 2, 0, 0]),
    ]
