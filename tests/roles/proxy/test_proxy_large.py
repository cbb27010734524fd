"""Large objects in the proxy, in process: the intake that spools and reads them as they arrive
(proxy.large), the blocks cut for answers, and a publisher's Block1 uploads (proxy.publishing).
End to end through the proxy's process: tests/system/test_tcp_transport.py (40 MiB in bounded
memory) and tests/roles/proxy/test_large_proxy.py."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from aiocoap.optiontypes import BlockOption
from cryptography.hazmat.primitives.asymmetric import ec

import oscar
from oscar.errors import InvalidObject
from oscar.objects import object_etag
from proxy.bodies import BodyError, BodyStore
from proxy.entry import Entry
from proxy.large import LARGE_FROM, BadBlock, Intake, SpoolError, cut
from proxy.publishing import IDLE, PER_DEVICE, BlockRefused, Uploads
from testkit import NOW, PRODUCER, RESOURCE, SECRET

KEY = ec.generate_private_key(ec.SECP256R1())
PROFILE = oscar.profile_by_name("a128gcm-es256")
LIMIT = (8 << 20) + 4096


def seal(plaintext: bytes, seq: int = 7) -> bytes:
    return oscar.seal(
        secret=SECRET, producer_id=PRODUCER, resource_id=RESOURCE, epoch=3, seq=seq,
        iat=NOW - 10, exp=NOW + 60, content_format=42, plaintext=plaintext,
        signing_key=KEY, profile=PROFILE,
    )  # fmt: skip


BIG = seal(os.urandom(3 << 20))


def store(tmp_path: Path) -> BodyStore:
    return BodyStore(tmp_path / "large", b"k" * 32, max_bytes=1 << 30)


def feed(intake: Intake, data: bytes, piece: int = 1024) -> None:
    for start in range(0, len(data), piece):
        intake.feed(data[start : start + piece])


def entry_of(data: bytes, body: int = 0) -> Entry:
    return Entry(RESOURCE, b"" if body else data, 3, 7, NOW + 60, object_etag(RESOURCE, 3, 7),
                 b"k", 1, None, None, NOW + 60.0, body)  # fmt: skip


def test_an_object_under_the_threshold_stays_in_memory(tmp_path: Path) -> None:
    bodies = store(tmp_path)
    small = seal(os.urandom(LARGE_FROM - 1000))
    intake = Intake(bodies, max_size=LIMIT)
    feed(intake, small)
    assert not intake.spilled and intake.data == small
    intake.close()
    assert list((tmp_path / "large").iterdir()) == []


def test_a_large_object_is_spooled_read_as_it_arrives_and_committed(tmp_path: Path) -> None:
    """Past the threshold the bytes go to a spool (sealed, never whole in memory) and the
    reader hashes them: finish() gives the headers and the digest that the signer's key
    verifies; once committed, the body is served from the store, byte for byte."""
    bodies = store(tmp_path)
    intake = Intake(bodies, max_size=LIMIT)
    tracemalloc.start()
    try:
        feed(intake, BIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert intake.spilled and intake.received == len(BIG)
    assert peak < LARGE_FROM + (512 << 10)  # the threshold's worth before the spill, no more
    obj = intake.finish()
    assert (obj.metadata.epoch, obj.metadata.seq) == (3, 7)
    obj.verify_signature(KEY.public_key())
    with pytest.raises(InvalidObject):  # and no other key
        obj.verify_signature(ec.generate_private_key(ec.SECP256R1()).public_key())
    assert intake.commit(RESOURCE, (3, 7)) == len(BIG)
    intake.close()  # after the commit: keeps the body
    entry = entry_of(BIG, body=len(BIG))
    assert entry.size == len(BIG) and entry.obj == b""
    got = b"".join(
        cut(entry, bodies, number, 7, 1 << 20)[0] for number in range(0, len(BIG) // 1024 + 1, 1024)
    )
    assert got == BIG


def test_junk_past_the_threshold_is_refused_as_it_arrives_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    bodies = store(tmp_path)
    intake = Intake(bodies, max_size=LIMIT)
    with pytest.raises(InvalidObject):
        feed(intake, os.urandom(LARGE_FROM + 4096))
    intake.close()
    assert list((tmp_path / "large").iterdir()) == []


def test_an_object_past_the_limit_is_refused_before_its_end(tmp_path: Path) -> None:
    intake = Intake(store(tmp_path), max_size=len(BIG) - 1)
    with pytest.raises(InvalidObject) as refused:
        feed(intake, BIG)
    assert refused.value.reason == "object exceeds the size limit (announced)"
    assert intake.received < LARGE_FROM + 2048
    intake.close()
    assert list((tmp_path / "large").iterdir()) == []


def test_a_truncated_object_does_not_finish(tmp_path: Path) -> None:
    intake = Intake(store(tmp_path), max_size=LIMIT)
    feed(intake, BIG[:-10])
    with pytest.raises(InvalidObject) as refused:
        intake.finish()
    assert "truncated" in refused.value.reason
    intake.close()


def test_without_a_body_store_everything_stays_in_memory(tmp_path: Path) -> None:
    intake = Intake(None, max_size=LIMIT)
    feed(intake, BIG)
    assert not intake.spilled and intake.data == BIG


def test_blocks_are_cut_from_memory_or_the_store_and_not_past_the_end(tmp_path: Path) -> None:
    data = seal(os.urandom(5000))
    entry = entry_of(data)
    assert cut(entry, None, 0, 6, 1124) == (data[:1024], True)
    assert len(data) > 5120
    assert cut(entry, None, 4, 6, 1124) == (data[4096:5120], True)
    last = (len(data) - 1) // 256
    assert cut(entry, None, last, 4, 1124) == (data[last * 256 :], False)
    assert cut(entry, None, 1, 7, 3000) == (data[1024:3072], True)  # BERT: 2 KiB at 1 KiB
    with pytest.raises(BadBlock):
        cut(entry, None, last + 1, 4, 1124)
    bodies = store(tmp_path)
    with pytest.raises(BodyError):  # a large entry whose body is not (or no longer) there
        cut(entry_of(BIG, body=len(BIG)), bodies, 0, 6, 1124)


def test_uploads_take_blocks_in_order_and_hand_back_the_whole(tmp_path: Path) -> None:
    uploads = Uploads(lambda: store(tmp_path), max_size=lambda: LIMIT)
    size = 1 << 16  # BERT: 64 KiB a block
    pieces = [BIG[i : i + size] for i in range(0, len(BIG), size)]
    intake = None
    for number, piece in enumerate(pieces):
        more = number < len(pieces) - 1
        block = BlockOption.BlockwiseTuple(number * (size // 1024), more, 7)
        intake = uploads.block("sensor-1", RESOURCE, block, piece)
        assert (intake is None) == more
    assert intake is not None and intake.spilled and intake.received == len(BIG)
    assert len(uploads) == 0
    intake.finish()
    intake.close()


def test_uploads_refuse_blocks_out_of_order_short_or_beyond_bounds(tmp_path: Path) -> None:
    now = [0.0]
    uploads = Uploads(lambda: store(tmp_path), max_size=lambda: LIMIT, clock=lambda: now[0])
    block = BlockOption.BlockwiseTuple
    assert uploads.block("d", "d/a", block(0, True, 6), BIG[:1024]) is None
    with pytest.raises(BlockRefused) as refused:  # block 2 after block 0
        uploads.block("d", "d/a", block(2, True, 6), BIG[2048:3072])
    assert refused.value.code == "4.08" and len(uploads) == 0  # the upload is dropped
    with pytest.raises(BlockRefused) as refused:  # not the first block, no upload under way
        uploads.block("d", "d/a", block(1, True, 6), BIG[1024:2048])
    assert refused.value.code == "4.08"
    with pytest.raises(BlockRefused) as refused:  # short but not the last
        uploads.block("d", "d/a", block(0, True, 6), BIG[:1000])
    assert refused.value.code == "4.00"
    for n in range(PER_DEVICE):
        uploads.block("d", f"d/r{n}", block(0, True, 6), BIG[:1024])
    with pytest.raises(BlockRefused) as refused:
        uploads.block("d", "d/more", block(0, True, 6), BIG[:1024])
    assert refused.value.code == "5.03"
    uploads.block("e", "e/r", block(0, True, 6), BIG[:1024])  # another device still may
    now[0] += IDLE + 1  # silent too long: every upload is dropped with the next block
    uploads.block("e", "e/s", block(0, True, 6), BIG[:1024])
    assert len(uploads) == 1
    uploads.close()
    assert len(uploads) == 0


def test_an_upload_of_junk_is_refused_as_it_arrives(tmp_path: Path) -> None:
    uploads = Uploads(lambda: store(tmp_path), max_size=lambda: LIMIT)
    junk = os.urandom(LARGE_FROM + (1 << 16))
    size = 1 << 16
    with pytest.raises(InvalidObject):
        for number in range(len(junk) // size):
            block = BlockOption.BlockwiseTuple(number * 64, True, 7)
            uploads.block("d", "d/a", block, junk[number * size : (number + 1) * size])
    assert len(uploads) == 0
    assert list((tmp_path / "large").iterdir()) == []


def test_a_notification_of_a_large_object_carries_block_0_from_the_store(tmp_path: Path) -> None:
    """The fast observations' notification of an object whose body is on disk: block 0 of
    1 KiB with Block2 (0, more, szx 6) after Max-Age, as RFC 7959 §2.6 has it; the observer asks
    for the rest. (An object in memory is sent whole, as aiocoap sends it.)"""
    from types import SimpleNamespace

    from aiocoap import Message

    from proxy.fastobserve import _Encoded

    bodies = store(tmp_path)
    intake = Intake(bodies, max_size=LIMIT)
    feed(intake, BIG)
    intake.finish()
    intake.commit(RESOURCE, (3, 7))
    entry = entry_of(BIG, body=len(BIG))
    encoded = _Encoded(entry, 30, SimpleNamespace(bodies=bodies))  # type: ignore[arg-type]
    # the notification's options after Observe, as the fast path puts them on the wire
    message = Message.decode(b"\x50\x45\x00\x01" + b"\x61\x01" + encoded.content)
    assert message.opt.block2 is not None
    assert (message.opt.block2.block_number, message.opt.block2.more) == (0, True)
    assert message.opt.block2.size_exponent == 6 and message.opt.max_age == 30
    assert message.payload == BIG[:1024] and message.opt.content_format == 18
    small = entry_of(seal(b"reading"))
    whole = Message.decode(
        b"\x50\x45\x00\x01" + b"\x61\x01" + _Encoded(small, 30, None).content  # type: ignore[arg-type]
    )
    assert whole.payload == small.obj and whole.opt.block2 is None


def test_the_spools_open_at_once_are_bounded(tmp_path: Path) -> None:
    """The disk transfers under way take is bounded (MAX_SPOOLS, each by the size limit), not
    only the bodies kept: past it a spool is refused (EBUSY), and a commit or an abort frees one."""
    import errno

    from proxy.bodies import MAX_SPOOLS

    bodies = store(tmp_path)
    writers = [bodies.spool() for _ in range(MAX_SPOOLS)]
    with pytest.raises(OSError) as refused:
        bodies.spool()
    assert refused.value.errno == errno.EBUSY
    intake = Intake(bodies, max_size=LIMIT)
    with pytest.raises(SpoolError, match="too many large objects"):  # refused, nothing left
        feed(intake, BIG)
    intake.close()
    writers.pop().abort()
    writers.pop().abort()
    again = Intake(bodies, max_size=LIMIT)
    feed(again, BIG)
    again.finish()
    again.commit(RESOURCE, (3, 7))
    assert bodies.spooling == MAX_SPOOLS - 2
    for writer in writers:
        writer.abort()
    assert bodies.spooling == 0
    assert [p.name for p in (tmp_path / "large").iterdir() if p.name.endswith(".part")] == []
