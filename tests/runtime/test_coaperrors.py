"""oscar_io.coaperrors: every exception class aiocoap defines is mapped (httpx-style), and each
translates to its category. No process, no socket: the exceptions are made by hand."""

from __future__ import annotations

import errno
import importlib
import inspect
import socket
from types import ModuleType

import pytest
from aiocoap import Message
from aiocoap import error as aiocoap_error
from aiocoap.numbers.codes import Code

from oscar.errors import OscarError
from oscar_io.coaperrors import (
    AIOCOAP_ERRORS,
    NotFound,
    Refused,
    TimedOut,
    TransportError,
    Unreachable,
    describe,
    error_answer,
    translate,
)

PEER = "coap://192.0.2.7:5683"


def _modules() -> list[ModuleType]:
    """aiocoap's modules whose exceptions can reach a caller of ``Context.request``."""
    return [aiocoap_error, importlib.import_module("aiocoap.transports.tinydtls")]


def _defined(module: ModuleType) -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == module.__name__
    ]


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _made(cls: type[BaseException]) -> BaseException:
    """An instance without calling the class's own __init__ (some want a message object)."""
    exc = cls.__new__(cls)
    BaseException.__init__(exc, "something failed")
    return exc


ALL = [cls for module in _modules() for cls in _defined(module)]


def test_every_aiocoap_exception_is_mapped() -> None:
    """An aiocoap upgrade that adds an exception class fails here until the map says what it is."""
    unmapped = sorted(_name(cls) for cls in ALL if _name(cls) not in AIOCOAP_ERRORS)
    if unmapped:
        pytest.fail(f"aiocoap exceptions missing from AIOCOAP_ERRORS: {', '.join(unmapped)}")


def test_the_map_names_no_class_that_aiocoap_lacks() -> None:
    names = {_name(cls) for cls in ALL}
    assert set(AIOCOAP_ERRORS) - names == set()


def test_the_categories_are_one_tree_under_oscar_error() -> None:
    for category in set(AIOCOAP_ERRORS.values()):
        assert issubclass(category, TransportError)
    assert issubclass(TransportError, OscarError)
    kinds = {cls.kind for cls in (TransportError, NotFound, Refused, TimedOut, Unreachable)}
    assert kinds == {"network", "not found", "refused", "timed out", "unreachable"}


@pytest.mark.parametrize("cls", ALL, ids=_name)
def test_each_aiocoap_exception_translates_to_its_category(cls: type[BaseException]) -> None:
    failure = translate(_made(cls), PEER)
    assert failure is not None
    assert type(failure) is AIOCOAP_ERRORS[_name(cls)]
    assert PEER in str(failure)


@pytest.mark.parametrize(
    "cls",
    [
        cls
        for cls in ALL
        if issubclass(cls, aiocoap_error.ConstructionRenderableError)
        and cls not in (aiocoap_error.ConstructionRenderableError, aiocoap_error.NoRequestInterface)
    ],
    ids=_name,
)
def test_a_renderable_error_has_the_category_of_its_code(cls: type[BaseException]) -> None:
    code = cls.code  # type: ignore[attr-defined]
    assert AIOCOAP_ERRORS[_name(cls)] is type(error_answer(code, "x answered"))


def test_a_wrapped_socket_error_decides_by_its_errno() -> None:
    def wrapped(number: int) -> BaseException:
        exc = aiocoap_error.NetworkError("Network error: NetworkError")
        exc.__cause__ = OSError(number, "text")
        return exc

    refused = translate(wrapped(errno.ECONNREFUSED), PEER)
    assert type(refused) is Refused and "nothing listens" in str(refused)
    for number in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
        assert type(translate(wrapped(number), PEER)) is Unreachable
    other = translate(wrapped(errno.EMSGSIZE), PEER)
    assert type(other) is TransportError and "text" in str(other)
    # the socket error itself, and one wrapped by something that is not aiocoap's
    assert type(translate(OSError(errno.ECONNREFUSED, "x"), PEER)) is Refused
    outer = RuntimeError("wrapper")
    outer.__cause__ = OSError(errno.EHOSTUNREACH, "x")
    assert type(translate(outer, PEER)) is Unreachable


def test_names_and_timeouts() -> None:
    unresolved = translate(socket.gaierror(socket.EAI_NONAME, "unknown"), PEER)
    assert type(unresolved) is Unreachable and "resolve" in str(unresolved)
    assert type(translate(aiocoap_error.ResolutionError("no"), PEER)) is Unreachable
    assert type(translate(TimeoutError(), PEER)) is TimedOut
    exhausted = translate(aiocoap_error.ConRetransmitsExceeded("gone"), PEER)
    assert type(exhausted) is TimedOut and "retransmissions exhausted" in str(exhausted)


def test_a_wrapped_response_is_reported_by_its_code() -> None:
    for code, category in ((Code.NOT_FOUND, NotFound), (Code.BAD_GATEWAY, Unreachable)):
        failure = translate(aiocoap_error.ResponseWrappingError(Message(code=code)), PEER)
        assert type(failure) is category and code.dotted in str(failure)


def test_anything_else_is_left_alone() -> None:
    for exc in (ValueError("bug"), KeyError("k"), RuntimeError("r"), TransportError("ours")):
        assert translate(exc, PEER) is None


def test_error_answers() -> None:
    cases = {
        Code.NOT_FOUND: NotFound,
        Code.GATEWAY_TIMEOUT: TimedOut,
        Code.BAD_GATEWAY: Unreachable,
        Code.FORBIDDEN: Refused,
        Code.BAD_REQUEST: Refused,
        Code.SERVICE_UNAVAILABLE: Refused,
    }
    for code, category in cases.items():
        failure = error_answer(code, "coap://p answered")
        assert type(failure) is category
        assert f"coap://p answered {code.dotted} {code.name_printable}" in str(failure)


def test_describe_is_one_short_line() -> None:
    assert describe(aiocoap_error.NetworkError("Network error: NetworkError")) == "NetworkError"
    assert describe(ValueError("")) == "ValueError"
    long = describe(RuntimeError("a\nb  " + "x" * 500))
    assert long.startswith("RuntimeError (a b ") and "\n" not in long and len(long) < 230
