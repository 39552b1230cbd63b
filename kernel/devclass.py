"""Device classes: what the kernel must know about a device's region to create it and to stand in
for a failed driver — its size, the ring at its start, the in-flight log, how to fail a request.

The kernel holds no device logic: a class is geometry plus one function that turns a request
copied out of the ring into an error response.  Both classes put their request ring (the block
ring, the net tx ring) at offset 0 and its in-flight log right after the guest's window, so the
recovery code (``kernel/failover.py``) serves both alike.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ipc import blkif, consif, netif
from ipc.ring import inflight_bytes
from kernel import abi

_PAGE: Final = abi.PAGE_SIZE
_ID_OP: Final = struct.Struct("<QB")
_ID: Final = struct.Struct("<Q")


def _pages(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


@dataclass(frozen=True)
class DeviceClass:
    #: The store directory word and the attach message's ``class``: "vbd", "vif" or "console".
    name: str
    #: The device-table kind (abi.DEV_KIND_*).
    kind: int
    #: Bytes of the region the guest sees.
    window: int
    #: Where the request ring's in-flight log starts in the segment.
    inflight_offset: int
    #: Bytes of the whole segment (window + what only backend and kernel see).
    segment_bytes: int
    ring_slots: int
    slot_size: int
    #: (request bytes copied from the ring, window, disk sectors) -> an error response.
    error_response: Callable[[bytes, int, int], bytes]
    #: The ring at offset 0 is a request ring with an ``ipc.ring.InflightLog``: the kernel may
    #: answer its requests, take responses back and clear the log.  False for the console,
    #: whose byte ring and log journal only its backend may touch.
    requests: bool = True


def _blk_error(raw: bytes, window: int, sectors: int) -> bytes:
    try:
        req = blkif.decode_request(raw, window=window, sectors=sectors)
        rid, op = req.id, req.op
    except blkif.RequestError as e:
        rid, op = e.id, e.op
    except ValueError:  # shorter than an id and op: cannot happen with whole slots
        rid, op = _ID_OP.unpack_from(raw.ljust(_ID_OP.size, b"\0"))
    return blkif.encode_response(rid, op, blkif.STATUS_ERROR)


def _net_error(raw: bytes, window: int, sectors: int) -> bytes:
    return netif.encode_tx_response(_ID.unpack_from(raw.ljust(_ID.size, b"\0"))[0],
                                    netif.STATUS_ERROR)


VBD: Final = DeviceClass(
    "vbd", abi.DEV_KIND_VBD, blkif.WINDOW_BYTES, blkif.INFLIGHT_OFFSET,
    blkif.INFLIGHT_OFFSET + _pages(inflight_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)),
    blkif.RING_SLOTS, blkif.SLOT_SIZE, _blk_error)
VIF: Final = DeviceClass(
    "vif", abi.DEV_KIND_VIF, netif.WINDOW_BYTES, netif.INFLIGHT_OFFSET,
    _pages(netif.SEGMENT_END), netif.RING_SLOTS, netif.SLOT_SIZE, _net_error)


def _no_error(raw: bytes, window: int, sectors: int) -> bytes:
    raise TypeError("a console ring has no requests to answer")


#: ``ring_slots`` is the out ring's byte count: "outstanding" is output waiting for the backend
#: (out_prod and out_cons sit where a request ring has req_prod and rsp_prod).
CONSOLE: Final = DeviceClass(
    "console", abi.DEV_KIND_CONSOLE, consif.WINDOW_BYTES, consif.INFLIGHT_OFFSET,
    consif.SEGMENT_BYTES, consif.OUT_SIZE, 8, _no_error, requests=False)
