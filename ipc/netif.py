"""The network-interface protocol between a guest's net frontend and a net backend (Xen netif's
shape: one ring per direction, frames in buffers of the device's own region).

Single source of truth: the guest runtime's ``isovisor_netif.h`` is generated from this module by
:func:`c_header` (see ``domains/build.py``).  ``docs/net.md`` is the prose reference.

A vif *region* is one shared-memory window, mapped into the guest at the address the device
table names and into the backend process::

    0x00000  tx ring: header (64 bytes) + RING_SLOTS slots of SLOT_SIZE bytes (guest -> backend)
    0x01000  rx ring: likewise (the guest posts empty buffers, the backend fills them)
    0x02000  tx buffers: RING_SLOTS buffers of BUF_SIZE bytes
    0x22000  rx buffers: RING_SLOTS buffers of BUF_SIZE bytes
    0x42000  end of the window (WINDOW_BYTES)

Beyond the window, the same segment carries what only the backend and the kernel see: the tx
in-flight log (``ipc.ring.InflightLog`` over the tx ring, at INFLIGHT_OFFSET) and the *delivery
log* (at DELIVERY_OFFSET): per tx slot, where the frame is being delivered, so that a replacement
backend delivers every frame accepted from a tx ring exactly once (see "Recovery" in docs/net.md).

The tx ring sits at offset 0 with its in-flight log at INFLIGHT_OFFSET, like a block ring, so the
kernel's failover code (hang checks, holds, answering with errors) treats both device classes alike.

tx request (guest -> backend; 16 bytes, little-endian)::

    +0   u64 id        chosen by the frontend, echoed in the response
    +8   u32 offset    bytes from the start of the region: inside the tx buffer area
    +12  u16 size      frame bytes: MIN_FRAME .. MAX_FRAME, and offset + size inside that area
    +14  u16 flags     0

tx response::

    +0   u64 id
    +8   i16 status    STATUS_OKAY (sent or dropped by the switch's rules: the guest cannot tell,
                       as on a real wire), STATUS_ERROR (malformed request)
    +10  u16 reserved  0
    +12  u32 reserved  0

rx request (guest posts an empty buffer)::

    +0   u64 id
    +8   u32 offset    bytes from the start of the region: a buffer inside the rx buffer area
    +12  u16 size      the buffer's capacity: at least MAX_FRAME
    +14  u16 flags     0

rx response (the backend filled the buffer)::

    +0   u64 id        the rx request's
    +8   u32 offset    the rx request's
    +12  u16 size      frame bytes written at offset
    +14  i16 status    STATUS_OKAY, or STATUS_ERROR for a malformed rx request (size 0)

Frames are Ethernet II frames without the FCS: 14-byte header, payload up to MTU bytes.
"""

from __future__ import annotations

import struct
from typing import Final

from ipc.ring import inflight_bytes, ring_bytes

RING_SLOTS: Final = 64
SLOT_SIZE: Final = 16
BUF_SIZE: Final = 2048
MTU: Final = 1500
ETH_HLEN: Final = 14
MIN_FRAME: Final = ETH_HLEN
MAX_FRAME: Final = ETH_HLEN + MTU

STATUS_OKAY: Final = 0
STATUS_ERROR: Final = -1

# region layout
TX_RING_OFFSET: Final = 0
RX_RING_OFFSET: Final = 0x1000
TX_BUF_OFFSET: Final = 0x2000
RX_BUF_OFFSET: Final = TX_BUF_OFFSET + RING_SLOTS * BUF_SIZE
WINDOW_BYTES: Final = RX_BUF_OFFSET + RING_SLOTS * BUF_SIZE
#: The tx ring's in-flight log follows the window (backend and kernel only).
INFLIGHT_OFFSET: Final = WINDOW_BYTES
#: Delivery log: RING_SLOTS records of DELIVERY_RECORD bytes after the in-flight log.
DELIVERY_OFFSET: Final = INFLIGHT_OFFSET + inflight_bytes(RING_SLOTS, SLOT_SIZE)
#: Destinations one delivery record holds (a broadcast reaches at most this many ports).
MAX_DESTINATIONS: Final = 30
#: A delivery record: u64 tag (the tx request's ring index + 1; 0 = empty), u64 count, then
#: MAX_DESTINATIONS pairs of u64 (destination device key; 0 = the uplink) and u64 (the index in
#: the destination's rx ring that the frame's response takes there).  Written before any rx
#: ring is pushed: a frame reached destination D iff D's published rx_rsp_prod is past it.
DELIVERY_RECORD: Final = 16 + MAX_DESTINATIONS * 16
SEGMENT_END: Final = DELIVERY_OFFSET + RING_SLOTS * DELIVERY_RECORD

RING_BYTES: Final = ring_bytes(RING_SLOTS, SLOT_SIZE)
#: Device key meaning "the uplink" in a delivery record.
UPLINK_KEY: Final = 0

TX_REQUEST: Final = struct.Struct("<QIHH")  # id, offset, size, flags
TX_RESPONSE: Final = struct.Struct("<QhHI")  # id, status, reserved, reserved
RX_REQUEST: Final = struct.Struct("<QIHH")  # id, offset, size, flags
RX_RESPONSE: Final = struct.Struct("<QIHh")  # id, offset, size, status

assert RING_BYTES <= RX_RING_OFFSET and RX_RING_OFFSET + RING_BYTES <= TX_BUF_OFFSET
assert TX_REQUEST.size == TX_RESPONSE.size == RX_REQUEST.size == RX_RESPONSE.size == SLOT_SIZE
assert MAX_FRAME <= BUF_SIZE

# --- decoding and encoding ---------------------------------------------------------------------
# (No module-level upper-case integers below this line: c_header() exports every one of them.)


class FrameError(Exception):
    """A tx or rx request the backend must refuse; ``id`` echoes the request's."""

    def __init__(self, id: int, message: str) -> None:
        super().__init__(message)
        self.id = id


def decode_tx(raw: bytes) -> tuple[int, int, int]:
    """(id, offset, size) of a tx request copied out of a slot; FrameError if it names bytes
    outside the tx buffer area or a size outside MIN_FRAME..MAX_FRAME."""
    id, offset, size, flags = TX_REQUEST.unpack_from(raw)
    if flags:
        raise FrameError(id, f"tx request flags {flags:#x}: must be 0")
    if not MIN_FRAME <= size <= MAX_FRAME:
        raise FrameError(id, f"tx frame of {size} bytes: frames are {MIN_FRAME}..{MAX_FRAME} bytes")
    if offset < TX_BUF_OFFSET or offset + size > RX_BUF_OFFSET:
        raise FrameError(
            id,
            f"tx frame at offset {offset:#x} ({size} bytes) lies outside the "
            f"tx buffer area {TX_BUF_OFFSET:#x}..{RX_BUF_OFFSET:#x}",
        )
    return id, offset, size


def decode_rx(raw: bytes) -> tuple[int, int, int]:
    """(id, offset, capacity) of an rx request; FrameError if the buffer lies outside the rx
    buffer area or cannot hold MAX_FRAME bytes."""
    id, offset, size, flags = RX_REQUEST.unpack_from(raw)
    if flags:
        raise FrameError(id, f"rx request flags {flags:#x}: must be 0")
    if size < MAX_FRAME:
        raise FrameError(id, f"rx buffer of {size} bytes: it must hold {MAX_FRAME}")
    if offset < RX_BUF_OFFSET or offset + size > WINDOW_BYTES:
        raise FrameError(
            id,
            f"rx buffer at offset {offset:#x} ({size} bytes) lies outside the "
            f"rx buffer area {RX_BUF_OFFSET:#x}..{WINDOW_BYTES:#x}",
        )
    return id, offset, size


def encode_tx(id: int, offset: int, size: int, flags: int = 0) -> bytes:
    return TX_REQUEST.pack(id, offset, size, flags)


def encode_tx_response(id: int, status: int) -> bytes:
    return TX_RESPONSE.pack(id, status, 0, 0)


def encode_rx(id: int, offset: int, size: int = BUF_SIZE, flags: int = 0) -> bytes:
    return RX_REQUEST.pack(id, offset, size, flags)


def encode_rx_response(id: int, offset: int, size: int, status: int = 0) -> bytes:
    return RX_RESPONSE.pack(id, offset, size, status)


def parse_mac(text: str) -> bytes:
    """``"02:00:00:00:00:01"`` -> 6 bytes; ValueError naming what is wrong."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(
            f"MAC address {text!r} is not six two-digit hex bytes like 02:00:00:00:00:01"
        )
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} has a byte that is not hexadecimal") from None
    if mac[0] & 1:
        raise ValueError(
            f"MAC address {text} is a multicast address: a vif needs a unicast "
            "one (even first byte, e.g. 02:...)"
        )
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def c_header() -> str:
    """Render the protocol constants as a C header for the guest runtime."""
    names = [
        n
        for n, v in globals().items()
        if n.isupper() and isinstance(v, int) and not isinstance(v, bool)
    ]
    lines = [
        "/* Generated from ipc/netif.py by domains/build.py -- do not edit. */",
        "#ifndef ISOVISOR_NETIF_H",
        "#define ISOVISOR_NETIF_H",
    ]
    for n in names:
        v = globals()[n]
        lines.append(f"#define NETIF_{n} ({v})" if v < 0 else f"#define NETIF_{n} {v}")
    lines.append("#endif")
    return "\n".join(lines) + "\n"
