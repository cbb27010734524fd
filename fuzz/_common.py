"""What every target shares: the contract check, and a reader that splits fuzz input into parts.

Not atheris's ``FuzzedDataProvider``, so that a target runs (and a kept crash reproduces) where
atheris is not installed.
"""

from __future__ import annotations

__all__ = ["ContractBroken", "Reader", "expect"]


class ContractBroken(AssertionError):
    """The code under test did something its documentation says it never does."""


def expect(condition: object, message: str) -> None:
    """Raise :class:`ContractBroken` with ``message`` unless ``condition`` holds (even under -O)."""
    if not condition:
        raise ContractBroken(message)


class Reader:
    """Consumes fuzz input front to back; every read succeeds (with zeros or b"" once empty)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def choice(self, options: tuple[str, ...] | list[str]) -> str:
        return options[self.byte() % len(options)]

    def chunk(self) -> bytes:
        """A length-prefixed piece (one length byte)."""
        n = self.byte()
        piece = self.data[self.pos : self.pos + n]
        self.pos += len(piece)
        return piece

    def text(self) -> str:
        return self.chunk().decode("utf-8", "replace")

    def rest(self) -> bytes:
        piece = self.data[self.pos :]
        self.pos = len(self.data)
        return piece
