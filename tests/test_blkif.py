"""The block protocol's request/response codec and its validation of untrusted requests."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc import blkif
from ipc.blkif import (
    DATA_OFFSET,
    MAX_REQUEST_BYTES,
    MAX_SEGMENTS,
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    REQUEST_BYTES,
    SECTOR_SIZE,
    STATUS_EOPNOTSUPP,
    STATUS_ERROR,
    STATUS_OKAY,
    Request,
    RequestError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from ipc.ring import BackRing, RingError, ring_bytes

WINDOW = blkif.WINDOW_BYTES
SECTORS = 100


def decode(raw: bytes, sectors: int = SECTORS, window: int = WINDOW) -> Request:
    return decode_request(raw, window=window, sectors=sectors)


def test_read_write_round_trip() -> None:
    segs = ((DATA_OFFSET, 4096), (DATA_OFFSET + 0x3000, 512), (WINDOW - 1024, 1024))
    for op in (OP_READ, OP_WRITE):
        raw = encode_request(0xDEADBEEF_00000001, op, 7, segs)
        assert len(raw) == REQUEST_BYTES
        req = decode(raw)
        assert req == Request(0xDEADBEEF_00000001, op, 7, (4096 + 512 + 1024) // 512, segs)
        assert req.nbytes == 4096 + 512 + 1024
    # the last sectors of the disk, a slot's padding after the request is ignored
    req = decode(encode_request(1, OP_READ, SECTORS - 8, [(DATA_OFFSET, 4096)]) + bytes(8))
    assert (req.sector, req.nr_sectors) == (SECTORS - 8, 8)


def test_flush_and_discard_round_trip() -> None:
    assert decode(encode_request(3, OP_FLUSH)) == Request(3, OP_FLUSH, 0, 0, ())
    req = decode(encode_request(4, OP_DISCARD, 90, nr_sectors=10))
    assert req == Request(4, OP_DISCARD, 90, 10, ())
    assert req.nbytes == 0


def test_maximal_request() -> None:
    per = MAX_REQUEST_BYTES // MAX_SEGMENTS
    segs = [(DATA_OFFSET + i * per, per) for i in range(MAX_SEGMENTS)]
    req = decode(encode_request(9, OP_WRITE, 0, segs), sectors=10**6)
    assert req.nbytes == MAX_REQUEST_BYTES


@pytest.mark.parametrize("status", [STATUS_OKAY, STATUS_ERROR, STATUS_EOPNOTSUPP])
def test_response_round_trip(status: int) -> None:
    raw = encode_response(2**64 - 1, OP_DISCARD, status)
    assert len(raw) == blkif.RESPONSE_BYTES
    assert decode_response(raw) == (2**64 - 1, OP_DISCARD, status)


BAD = [
    # (request bytes, status, message pattern)
    (encode_request(1, 7), STATUS_EOPNOTSUPP, r"unknown operation 7"),
    (encode_request(1, 255, nr_segments=3), STATUS_EOPNOTSUPP, r"unknown operation 255"),
    (encode_request(1, OP_READ), STATUS_ERROR, r"read request with nr_segments 0"),
    (
        encode_request(1, OP_WRITE, 0, [(DATA_OFFSET, 512)], nr_segments=9),
        STATUS_ERROR,
        r"nr_segments 9 exceeds the maximum of 8",
    ),
    (
        encode_request(1, OP_READ, 0, [(DATA_OFFSET, 512)], nr_segments=255),
        STATUS_ERROR,
        r"nr_segments 255 exceeds",
    ),
    (
        encode_request(1, OP_READ, 0, [(DATA_OFFSET, 512), (0x800, 512)]),
        STATUS_ERROR,
        r"segment 1 \(offset 0x800, length 512\) lies outside the data area 0x1000\.\.0x401000",
    ),
    (
        encode_request(1, OP_READ, 0, [(WINDOW - 512, 1024)]),
        STATUS_ERROR,
        r"segment 0 \(offset 0x400e00, length 1024\) lies outside the data area",
    ),
    (
        encode_request(1, OP_READ, 0, [(0xFFFFFE00, 0x400)]),
        STATUS_ERROR,
        r"segment 0 \(offset 0xfffffe00, length 1024\) lies outside",
    ),
    (
        encode_request(1, OP_WRITE, 0, [(DATA_OFFSET, 0)]),
        STATUS_ERROR,
        r"segment 0 \(offset 0x1000, length 0\) has length 0",
    ),
    (
        encode_request(1, OP_WRITE, 0, [(DATA_OFFSET + 1, 512)]),
        STATUS_ERROR,
        r"segment 0 \(offset 0x1001, length 512\) is not aligned",
    ),
    (
        encode_request(1, OP_WRITE, 0, [(DATA_OFFSET, 4096), (DATA_OFFSET, 100)]),
        STATUS_ERROR,
        r"segment 1 .* is not aligned to the 512-byte sector size",
    ),
    (
        encode_request(1, OP_READ, 0, [(DATA_OFFSET, 65536)] * 3),
        STATUS_ERROR,
        r"segments total 196608 bytes, more than the maximum request of 131072",
    ),
    (
        encode_request(1, OP_READ, 999, [(DATA_OFFSET, 4096)]),
        STATUS_ERROR,
        r"sector 999 \+ 8 sectors is beyond the disk's 100 sectors",
    ),
    (
        encode_request(1, OP_READ, 93, [(DATA_OFFSET, 4096)]),
        STATUS_ERROR,
        r"sector 93 \+ 8 sectors is beyond",
    ),
    (
        encode_request(1, OP_WRITE, 2**64 - 1, [(DATA_OFFSET, 512)]),
        STATUS_ERROR,
        r"sector 18446744073709551615 \+ 1 sectors is beyond",
    ),
    (
        encode_request(1, OP_FLUSH, 0, [(DATA_OFFSET, 512)]),
        STATUS_ERROR,
        r"flush request with nr_segments 1: it must carry none",
    ),
    (encode_request(1, OP_DISCARD, 0), STATUS_ERROR, r"discard of 0 sectors"),
    (
        encode_request(1, OP_DISCARD, 50, nr_sectors=51),
        STATUS_ERROR,
        r"sector 50 \+ 51 sectors is beyond the disk's 100 sectors",
    ),
    (
        encode_request(1, OP_DISCARD, 2**64 - 1, nr_sectors=2**32 - 1),
        STATUS_ERROR,
        r"is beyond the disk",
    ),
    (
        encode_request(1, OP_DISCARD, 0, [(DATA_OFFSET, 512)], nr_sectors=1),
        STATUS_ERROR,
        r"discard request with nr_segments 1",
    ),
    (
        encode_request(1, OP_READ, 0, [(DATA_OFFSET, 512)] * 4)[:40],
        STATUS_ERROR,
        r"request is only 40 bytes; 4 segments need 56",
    ),
    (encode_request(1, OP_READ)[:20], STATUS_ERROR, r"request is only 20 bytes; its header"),
]


@pytest.mark.parametrize(("raw", "status", "pattern"), BAD)
def test_garbage_gets_the_right_status_and_says_why(raw: bytes, status: int, pattern: str) -> None:
    with pytest.raises(RequestError, match=pattern) as exc:
        decode(raw)
    assert exc.value.status == status
    assert exc.value.id == 1  # the backend can still answer it
    assert exc.value.op == raw[8]


def test_too_short_to_answer() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        decode(b"\x01" * 15)


def test_encode_refuses_more_than_max_segments() -> None:
    with pytest.raises(ValueError, match="at most 8"):
        encode_request(1, OP_READ, 0, [(DATA_OFFSET, 512)] * 9)


def _check_accepted(req: Request, window: int, sectors: int) -> None:
    if req.op in (OP_READ, OP_WRITE):
        assert 1 <= len(req.segments) <= MAX_SEGMENTS
        for off, length in req.segments:
            assert off >= DATA_OFFSET and off + length <= window and length > 0
            assert off % SECTOR_SIZE == 0 and length % SECTOR_SIZE == 0
        assert req.nbytes <= MAX_REQUEST_BYTES
        assert req.nr_sectors * SECTOR_SIZE == req.nbytes
    else:
        assert req.op in (OP_FLUSH, OP_DISCARD) and req.segments == ()
    assert req.sector >= 0 and req.sector + req.nr_sectors <= sectors


@settings(max_examples=500)
@given(st.binary(max_size=120), st.integers(DATA_OFFSET + 1, 2**33), st.integers(0, 2**64 + 5))
def test_random_bytes_never_crash_the_decoder(raw: bytes, window: int, sectors: int) -> None:
    try:
        req = decode_request(raw, window=window, sectors=sectors)
    except RequestError as e:
        assert e.status in (STATUS_ERROR, STATUS_EOPNOTSUPP)
        assert str(e)
        assert e.id == struct.unpack_from("<Q", raw)[0]
        return
    except ValueError:
        assert len(raw) < 16
        return
    _check_accepted(req, window, sectors)


_U32 = st.one_of(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 512, DATA_OFFSET, DATA_OFFSET - 512, WINDOW - 512, WINDOW, 2**32 - 512]),
)
_U64 = st.one_of(
    st.integers(0, 2**64 - 1), st.integers(0, 200), st.sampled_from([2**64 - 1, 2**63, 2**32])
)


@settings(max_examples=300)
@given(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 255]),
    st.integers(0, 10),
    _U32,
    _U64,
    st.lists(st.tuples(_U32, _U32), max_size=9),
    st.integers(0, 300),
)
def test_structured_garbage_never_escapes_the_region_or_the_disk(
    id: int,
    op: int,
    nseg: int,
    nr_sectors: int,
    sector: int,
    segs: list[tuple[int, int]],
    sectors: int,
) -> None:
    raw = bytearray(blkif.SLOT_SIZE)
    blkif.REQUEST_HEAD.pack_into(raw, 0, id, op, nseg, 0, nr_sectors, sector)
    for i, (off, length) in enumerate(segs):
        blkif.SEGMENT.pack_into(raw, blkif.REQ_SEGMENTS + i * 8, off, length)
    try:
        req = decode_request(bytes(raw), window=WINDOW, sectors=sectors)
    except RequestError as e:
        assert (e.id, e.op) == (id, op)
        assert e.status == (STATUS_EOPNOTSUPP if op not in blkif.OP_NAMES else STATUS_ERROR)
        return
    _check_accepted(req, WINDOW, sectors)
    assert req.id == id and req.op == op


@settings(max_examples=300)
@given(
    st.lists(st.integers(0, 2**64 - 1), min_size=4, max_size=4),
    st.lists(st.sampled_from(["take", "answer", "publish", "final"]), max_size=80),
)
def test_back_ring_over_random_indices(words: list[int], ops: list[str]) -> None:
    n = blkif.RING_SLOTS
    buf = memoryview(bytearray(ring_bytes(n, blkif.SLOT_SIZE)))
    idx = buf[:64].cast("Q")
    for i, w in enumerate(words):
        idx[i] = w
    back = BackRing(buf, n, blkif.SLOT_SIZE)
    taken = outstanding = 0
    try:
        for op in ops:
            if op == "take":
                while back.unconsumed_requests() and taken <= n:
                    back.get_request()
                    taken += 1
                    outstanding += 1
            elif op == "answer" and outstanding:
                back.put_response(encode_response(0, 0, STATUS_OKAY))
                outstanding -= 1
            elif op == "publish":
                back.push_responses()
            elif op == "final":
                back.final_check_for_requests()
            assert outstanding <= n
            assert back.unconsumed_requests() <= n - outstanding
    except RingError:
        pass
    # the frontend's req_prod never changed: it can never yield more than a ring's worth
    assert taken <= n
