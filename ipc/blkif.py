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

OP_NAMES: Final[dict[int, str]] = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush",
                                   OP_DISCARD: "discard"}


def c_header() -> str:
    """Render the protocol constants as a C header for the guest runtime."""
    names = [n for n, v in globals().items()
             if n.isupper() and isinstance(v, int) and not isinstance(v, bool)]
    lines = ["/* Generated from ipc/blkif.py by domains/build.py -- do not edit. */",
             "#ifndef ISOVISOR_BLKIF_H", "#define ISOVISOR_BLKIF_H"]
    for n in names:
        v = globals()[n]
        lines.append(f"#define BLKIF_{n} ({v})" if v < 0 else f"#define BLKIF_{n} {v}")
    lines.append("#endif")
    return "\n".join(lines) + "\n"
