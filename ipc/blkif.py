"""The block-device protocol between a guest's frontend and a block backend (Xen blkif's shape).

Single source of truth: the guest runtime's ``isovisor_blkif.h`` is generated from this module by
:func:`c_header` (see ``domains/build.py``).  ``docs/devices.md`` is the prose reference.

A device *region* is one shared-memory window, mapped into the guest at the address the device
table names and into the backend process::

    0x0000  ring: header (64 bytes) + RING_SLOTS slots of SLOT_SIZE bytes
    0x1000  data area: I/O buffers, DATA_BYTES bytes (the frontend decides how to use them)

Beyond the window, the same shared-memory segment carries the backend-private in-flight log
(``INFLIGHT_OFFSET`` = the window size); the guest never sees it.

Requests (little-endian)::

    +0   u64 id            chosen by the frontend, echoed in the response
    +8   u8  op            OP_*
    +9   u8  nr_segments   0 for FLUSH and DISCARD, 1..MAX_SEGMENTS for READ and WRITE
    +10  u16 reserved      0
    +12  u32 nr_sectors    DISCARD only: sectors to discard
    +16  u64 sector        first 512-byte sector
    +24  segments[MAX_SEGMENTS], 8 bytes each:
         u32 offset        bytes from the start of the region; inside the data area, a multiple
                           of SECTOR_SIZE
         u32 length        bytes; a non-zero multiple of SECTOR_SIZE

The segments of a request are transferred in order, to or from consecutive sectors starting at
``sector``; their total is at most MAX_REQUEST_BYTES.  (Xen names whole pages by grant reference
plus first/last sector; here a segment is an extent of the device's own region, which is what the
backend is allowed to touch.)

Responses::

    +0   u64 id
    +8   u8  op            the request's op
    +9   u8  reserved
    +10  i16 status        STATUS_OKAY, STATUS_ERROR or STATUS_EOPNOTSUPP
    +12  u32 reserved
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

SECTOR_SIZE: Final = 512
RING_SLOTS: Final = 32
SLOT_SIZE: Final = 96
MAX_SEGMENTS: Final = 8
MAX_REQUEST_BYTES: Final = 128 * 1024

# operations (Xen BLKIF_OP_* numbering)
OP_READ: Final = 0
OP_WRITE: Final = 1
OP_FLUSH: Final = 3
OP_DISCARD: Final = 5

# response status (Xen BLKIF_RSP_*)
STATUS_OKAY: Final = 0
STATUS_ERROR: Final = -1
STATUS_EOPNOTSUPP: Final = -2

# request layout
REQ_ID: Final = 0
REQ_OP: Final = 8
REQ_NR_SEGMENTS: Final = 9
REQ_NR_SECTORS: Final = 12
REQ_SECTOR: Final = 16
REQ_SEGMENTS: Final = 24
SEGMENT_SIZE: Final = 8
REQUEST_BYTES: Final = REQ_SEGMENTS + MAX_SEGMENTS * SEGMENT_SIZE  # 88

# response layout
RSP_ID: Final = 0
RSP_OP: Final = 8
RSP_STATUS: Final = 10
RESPONSE_BYTES: Final = 16

# region layout
RING_OFFSET: Final = 0
DATA_OFFSET: Final = 0x1000
#: Default data area: one maximal request per ring slot.
DATA_BYTES: Final = RING_SLOTS * MAX_REQUEST_BYTES
#: Bytes of the region the guest sees (ring page + data area).
WINDOW_BYTES: Final = DATA_OFFSET + DATA_BYTES
#: The in-flight log follows the window in the same segment (backend and kernel only).
INFLIGHT_OFFSET: Final = WINDOW_BYTES

REQUEST_HEAD: Final = struct.Struct("<QBBHIQ")  # id, op, nr_segments, reserved, nr_sectors, sector
SEGMENT: Final = struct.Struct("<II")  # offset, length
RESPONSE: Final = struct.Struct("<QBBhI")  # id, op, reserved, status, reserved

assert REQUEST_HEAD.size == REQ_SEGMENTS and RESPONSE.size == RESPONSE_BYTES
assert REQUEST_BYTES <= SLOT_SIZE and 64 + RING_SLOTS * SLOT_SIZE <= DATA_OFFSET

OP_NAMES: Final[dict[int, str]] = {
    OP_READ: "read",
    OP_WRITE: "write",
    OP_FLUSH: "flush",
    OP_DISCARD: "discard",
}


# --- decoding and encoding ---------------------------------------------------------------------
# (No module-level upper-case integers below this line: c_header() exports every one of them.)

#: segments[n] parsed in one call, for each possible count
_SEGMENT_TABLES: Final = tuple(struct.Struct("<" + "II" * n) for n in range(MAX_SEGMENTS + 1))
_ID_OP: Final = struct.Struct("<QB")
_unpack_head = REQUEST_HEAD.unpack_from
_pack_response = RESPONSE.pack


class RequestError(Exception):
    """A request the backend must refuse: ``status`` is the response status to send
    (STATUS_ERROR or STATUS_EOPNOTSUPP), ``id`` and ``op`` echo the request's."""

    def __init__(self, id: int, op: int, status: int, message: str) -> None:
        super().__init__(message)
        self.id = id
        self.op = op
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request.  ``nr_sectors`` is the number of sectors the request covers (the
    segments' total for READ/WRITE, the discarded range for DISCARD, 0 for FLUSH);
    ``segments`` are (offset in the region, length) pairs."""

    id: int
    op: int
    sector: int
    nr_sectors: int
    segments: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        """Bytes moved through the region (0 for FLUSH and DISCARD)."""
        return sum(length for _, length in self.segments)


def _check_range(id: int, op: int, sector: int, count: int, sectors: int) -> None:
    # Python integers do not overflow, but compare without forming sector + count anyway.
    if sector > sectors or count > sectors - sector:
        raise RequestError(
            id,
            op,
            STATUS_ERROR,
            f"sector {sector} + {count} sectors is beyond the disk's {sectors} sectors",
        )


def decode_request(raw: bytes, *, window: int, sectors: int) -> Request:
    """Parse and validate one request copied out of a ring slot.

    ``window`` is the region size the guest sees (segments must lie in
    ``[DATA_OFFSET, window)``), ``sectors`` the disk size.  Raises :class:`RequestError`
    (carrying the request's id and op, so it can still be answered) for anything invalid, and
    ValueError if ``raw`` is shorter than 16 bytes (not even an id and op to answer).
    """
    if len(raw) < RESPONSE_BYTES:
        raise ValueError(
            f"a request needs at least {RESPONSE_BYTES} bytes to carry its id and "
            f"op; got {len(raw)}"
        )
    if len(raw) < REQ_SEGMENTS:
        id, op = _ID_OP.unpack_from(raw)
        raise RequestError(
            id,
            op,
            STATUS_ERROR,
            f"request is only {len(raw)} bytes; its header needs {REQ_SEGMENTS}",
        )
    id, op, nseg, _, nr_sectors, sector = _unpack_head(raw)
    if op in (OP_READ, OP_WRITE):
        if not 0 < nseg <= MAX_SEGMENTS:
            if nseg == 0:
                raise RequestError(
                    id,
                    op,
                    STATUS_ERROR,
                    f"{OP_NAMES[op]} request with nr_segments 0: it must carry "
                    f"1..{MAX_SEGMENTS} segments",
                )
            raise RequestError(
                id, op, STATUS_ERROR, f"nr_segments {nseg} exceeds the maximum of {MAX_SEGMENTS}"
            )
        if len(raw) < REQ_SEGMENTS + nseg * SEGMENT_SIZE:
            raise RequestError(
                id,
                op,
                STATUS_ERROR,
                f"request is only {len(raw)} bytes; {nseg} segments need "
                f"{REQ_SEGMENTS + nseg * SEGMENT_SIZE}",
            )
        flat = _SEGMENT_TABLES[nseg].unpack_from(raw, REQ_SEGMENTS)
        segments = []
        total = 0
        for i in range(nseg):
            off = flat[2 * i]
            length = flat[2 * i + 1]
            if (
                off < DATA_OFFSET
                or length > window - off
                or not length
                or (off | length) & (SECTOR_SIZE - 1)
            ):
                if not length:
                    what = "has length 0"
                elif (off | length) & (SECTOR_SIZE - 1):
                    what = f"is not aligned to the {SECTOR_SIZE}-byte sector size"
                else:
                    what = f"lies outside the data area {DATA_OFFSET:#x}..{window:#x} of the region"
                raise RequestError(
                    id, op, STATUS_ERROR, f"segment {i} (offset {off:#x}, length {length}) {what}"
                )
            total += length
            segments.append((off, length))
        if total > MAX_REQUEST_BYTES:
            raise RequestError(
                id,
                op,
                STATUS_ERROR,
                f"segments total {total} bytes, more than the maximum request of "
                f"{MAX_REQUEST_BYTES} bytes",
            )
        count = total // SECTOR_SIZE
        _check_range(id, op, sector, count, sectors)
        return Request(id, op, sector, count, tuple(segments))
    if op in (OP_FLUSH, OP_DISCARD):
        if nseg:
            raise RequestError(
                id,
                op,
                STATUS_ERROR,
                f"{OP_NAMES[op]} request with nr_segments {nseg}: it must carry none",
            )
        if op == OP_FLUSH:  # its sector field means nothing: report 0
            return Request(id, op, 0, 0, ())
        if not nr_sectors:
            raise RequestError(id, op, STATUS_ERROR, "discard of 0 sectors (nr_sectors 0)")
        _check_range(id, op, sector, nr_sectors, sectors)
        return Request(id, op, sector, nr_sectors, ())
    raise RequestError(
        id,
        op,
        STATUS_EOPNOTSUPP,
        f"unknown operation {op} (supported: "
        + ", ".join(f"{v} {n}" for v, n in OP_NAMES.items())
        + ")",
    )


def encode_request(
    id: int,
    op: int,
    sector: int = 0,
    segments: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    *,
    nr_sectors: int = 0,
    nr_segments: int | None = None,
) -> bytes:
    """Build a request (REQUEST_BYTES long).  ``nr_segments`` overrides the count written into
    the header, to build malformed requests in tests; at most MAX_SEGMENTS are encoded."""
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(f"{len(segments)} segments: a request carries at most {MAX_SEGMENTS}")
    n = len(segments) if nr_segments is None else nr_segments
    buf = bytearray(REQUEST_BYTES)
    REQUEST_HEAD.pack_into(buf, 0, id, op, n, 0, nr_sectors, sector)
    for i, (off, length) in enumerate(segments):
        SEGMENT.pack_into(buf, REQ_SEGMENTS + i * SEGMENT_SIZE, off, length)
    return bytes(buf)


def encode_response(id: int, op: int, status: int) -> bytes:
    return _pack_response(id, op, 0, status, 0)


def decode_response(raw: bytes) -> tuple[int, int, int]:
    """(id, op, status) of a response."""
    id, op, _, status, _ = RESPONSE.unpack_from(raw)
    return id, op, status


def c_header() -> str:
    """Render the protocol constants as a C header for the guest runtime."""
    names = [
        n
        for n, v in globals().items()
        if n.isupper() and isinstance(v, int) and not isinstance(v, bool)
    ]
    lines = [
        "/* Generated from ipc/blkif.py by domains/build.py -- do not edit. */",
        "#ifndef ISOVISOR_BLKIF_H",
        "#define ISOVISOR_BLKIF_H",
    ]
    for n in names:
        v = globals()[n]
        lines.append(f"#define BLKIF_{n} ({v})" if v < 0 else f"#define BLKIF_{n} {v}")
    lines.append("#endif")
    return "\n".join(lines) + "\n"
