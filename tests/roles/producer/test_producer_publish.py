"""producer.publish: why a PUT to a proxy failed, said in OSCAR's terms (oscar_io.coaperrors) on
one warning line. No process, no socket."""

from __future__ import annotations

import aiocoap.error
import pytest
from aiocoap.numbers.codes import Code

from oscar_io import coaperrors
from producer.publish import _reason

URI = "coaps://proxy.example:5684"


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            TimeoutError(),
            f"timed out: no answer from {URI}",
        ),  # asyncio.wait_for: no text of its own
        (
            ConnectionRefusedError(111, "Connection refused"),
            f"refused: {URI} refused: nothing listens on that port (ICMP port unreachable)",
        ),
        (aiocoap.error.NetworkError("x"), f"network: cannot reach {URI}: NetworkError"),
        (
            coaperrors.error_answer(Code.FORBIDDEN, "the target answered"),
            "the target answered 4.03 Forbidden",
        ),
        (
            RuntimeError("no AS client to get the link key from"),
            "no AS client to get the link key from",
        ),
        (RuntimeError(), "RuntimeError"),
    ],
)
def test_a_failed_put_is_one_line_in_oscars_terms(exc: BaseException, reason: str) -> None:
    assert _reason(exc, URI) == reason
