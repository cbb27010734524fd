"""producer.sources: values from a command or a file, bounded by the largest value (64 MiB)
without holding more (a command that writes without end is stopped), and state and value files
read without a 64 MiB allocation per read (oscar_io.statefiles.read_bounded)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from oscar_io.statefiles import read_bounded
from producer.config import MAX_VALUE_SIZE, ResourceSpec
from producer.sources import FileSource, read


def test_read_bounded_reads_what_there_is_and_one_byte_past_the_limit() -> None:
    assert read_bounded(io.BytesIO(b"abc"), 10, 3) == b"abc"
    assert read_bounded(io.BytesIO(b"abc"), 10, 0) == b"abc"  # grew after the stat: read on
    assert read_bounded(io.BytesIO(b"x" * 50), 10, 3) == b"x" * 11  # over: limit + 1, no more
    assert read_bounded(io.BytesIO(b"x" * 10), 10, 10) == b"x" * 10
    assert read_bounded(io.BytesIO(b"x" * 10), 10, 99) == b"x" * 10  # shrank

    asked: list[int] = []

    class Counting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            asked.append(-1 if n is None else n)
            return super().read(n)

    assert read_bounded(Counting(b"small"), 64 << 20, 5) == b"small"
    assert asked == [6]  # not 64 MiB + 1


def test_a_file_source_reads_the_file_once_per_change(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_bytes(b"1")
    source = FileSource(path, 0.1, "sensor-1/v")
    assert source.poll(0.0, waiting=True) == b"1"
    assert source.poll(1.0, waiting=False) is None  # unchanged
    path.write_bytes(b"22")
    assert source.poll(1.05, waiting=False) is None  # not time to look yet
    assert source.poll(2.0, waiting=False) == b"22"


@pytest.mark.asyncio
async def test_a_command_gives_its_output_and_its_failures_are_errors() -> None:
    spec = ResourceSpec("v", command=(sys.executable, "-c", "print('42', end='')"))
    assert await read(spec) == b"42"
    failing = ResourceSpec("v", command=(sys.executable, "-c", "raise SystemExit(3)"))
    with pytest.raises(RuntimeError, match="status 3"):
        await read(failing)


@pytest.mark.asyncio
async def test_a_command_writing_more_than_a_value_may_hold_is_stopped() -> None:
    endless = "import sys\nwhile True: sys.stdout.buffer.write(b'x' * 65536)"
    spec = ResourceSpec("v", command=(sys.executable, "-c", endless))
    with pytest.raises(RuntimeError, match=f"more than {MAX_VALUE_SIZE} bytes"):
        await read(spec)
