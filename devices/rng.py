"""The entropy device class (``rng``), as virtio-rng is in Firecracker and crosvm: the guest asks
for N random bytes through its ring, and the driver (``drivers.rng``) fills them from the host's
``getrandom``.  ``rng = ["backend=rng0"]`` in a domain config gives the guest ``rng0``.

This module is the protocol's single source of truth too: the guest runtime's
``isovisor_rngif.h`` is generated from it (:func:`c_header`).

Region (one shared-memory window, mapped into the guest and into the backend)::

    0x0000  ring: header (64 bytes) + RING_SLOTS slots of SLOT_SIZE bytes
    0x1000  data area: DATA_BYTES bytes, where the frontend points each request

The in-flight log follows the window in the same segment (backend and kernel only), so a
request is never lost or answered twice across a driver crash: the replacement redoes exactly
the requests its predecessor had taken and not answered.

Request (little-endian, 16 bytes)::

    +0   u64 id        chosen by the frontend, echoed in the response
    +8   u32 offset    where the bytes go: inside the data area
    +12  u32 length    how many: 1..MAX_REQUEST_BYTES

Response (16 bytes)::

    +0   u64 id
    +8   i16 status    STATUS_OKAY or STATUS_ERROR (a bad offset or length, or a failed driver)
    +10  u16 reserved
    +12  u32 length    bytes written (0 on error)
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from devices.base import DeviceClass, DeviceSpec, Region, SpecError, check_backend, pages
from devices.kvspec import parse_kv
from devices.workload import Checker, GuestSpec, Result, Tally, Unit, summary
from ipc.ring import HEADER_BYTES, inflight_bytes

if TYPE_CHECKING:
    from drivers.faults import FaultClass

# --- the protocol (every upper-case integer below goes into isovisor_rngif.h) ----------------
#: The device-table kind (kernel/abi.py numbers the others 1..3).
DEV_KIND: Final = 4
RING_SLOTS: Final = 32
SLOT_SIZE: Final = 16
MAX_REQUEST_BYTES: Final = 256
DATA_OFFSET: Final = 0x1000
DATA_BYTES: Final = RING_SLOTS * MAX_REQUEST_BYTES
WINDOW_BYTES: Final = DATA_OFFSET + DATA_BYTES
INFLIGHT_OFFSET: Final = WINDOW_BYTES
SEGMENT_BYTES: Final = INFLIGHT_OFFSET + pages(inflight_bytes(RING_SLOTS, SLOT_SIZE))
REQ_ID: Final = 0
REQ_OFFSET: Final = 8
REQ_LENGTH: Final = 12
RSP_ID: Final = 0
RSP_STATUS: Final = 8
RSP_LENGTH: Final = 12
STATUS_OKAY: Final = 0
STATUS_ERROR: Final = -1
MAX_RNGS: Final = 4

REQUEST: Final = struct.Struct("<QII")
RESPONSE: Final = struct.Struct("<QhHI")
assert REQUEST.size <= SLOT_SIZE and RESPONSE.size <= SLOT_SIZE
assert HEADER_BYTES + RING_SLOTS * SLOT_SIZE <= DATA_OFFSET

_RNG_KEYS: Final = ("backend",)
_EXAMPLE: Final = "backend=rng0"


class RequestError(ValueError):
    """A request the backend answers with STATUS_ERROR; ``id`` echoes the request's."""

    def __init__(self, id: int, message: str) -> None:
        super().__init__(message)
        self.id = id


@dataclass(frozen=True)
class Request:
    id: int
    offset: int
    length: int


def decode_request(raw: bytes) -> Request:
    """A request copied out of its slot, checked: RequestError if it points outside the data
    area or asks for no bytes or too many."""
    rid, offset, length = REQUEST.unpack_from(raw.ljust(REQUEST.size, b"\0"))
    if not 1 <= length <= MAX_REQUEST_BYTES:
        raise RequestError(
            rid,
            f"request {rid:#x} asks for {length} bytes; 1.."
            f"{MAX_REQUEST_BYTES} may be asked at once",
        )
    if not (offset >= DATA_OFFSET and offset + length <= WINDOW_BYTES):
        raise RequestError(
            rid,
            f"request {rid:#x} points at {offset:#x}+{length}, outside the "
            f"data area {DATA_OFFSET:#x}..{WINDOW_BYTES:#x}",
        )
    return Request(rid, offset, length)


def encode_response(rid: int, status: int, length: int) -> bytes:
    return RESPONSE.pack(rid, status, 0, length)


def c_header() -> str:
    """The protocol constants as a C header for the guest runtime."""
    names = [
        n
        for n, v in globals().items()
        if n.isupper() and not n.startswith("_") and isinstance(v, int) and not isinstance(v, bool)
    ]
    lines = [
        "/* Generated from devices/rng.py by domains/build.py -- do not edit. */",
        "#ifndef ISOVISOR_RNGIF_H",
        "#define ISOVISOR_RNGIF_H",
    ]
    lines += [f"#define RNGIF_{n} ({globals()[n]})" for n in names]
    lines.append("#endif")
    return "\n".join(lines) + "\n"


# --- the campaign workload --------------------------------------------------------------------
class RngTest(Checker):
    """Guests reading random bytes from the campaign's rng driver (``rngtest``)."""

    image = "rngtest"
    device_class = "rng"
    epoch_s = 6
    min_s = 3
    #: 64-byte reads a guest makes per second, about (the count is planned from it): two
    #: rngtest guests through one rng driver process made ~1,100 each here (2 cores, 2026-12).
    READS_PER_S: Final = 1200
    _MISMATCH: Final = re.compile(r"^rngtest: (read \d+: |byte 0x)", re.MULTILINE)
    _ERROR: Final = re.compile(r"^rngtest: (read \d+ of \d+ bytes failed|stopped: )", re.MULTILINE)
    _SUMMARY: Final = re.compile(r"^rngtest: reads=.*$", re.MULTILINE)

    def guests(self, unit: Unit, seconds: int, seed: int) -> list[GuestSpec]:
        extra = f"reads={self.READS_PER_S * seconds} size=64 {self.workload.extra}".strip()
        return [
            GuestSpec(
                unit.name(), self.image, 4, {"extra": extra, "rng": [f"backend={self.driver}"]}
            )
        ]

    def console(self, name: str, text: str) -> Tally:
        return Tally(len(self._ERROR.findall(text)), len(self._MISMATCH.findall(text)))

    def result(self, name: str, console: str) -> Result:
        s = summary(self._SUMMARY, console)
        return Result(
            s.get("reads", 0),
            s.get("errors", 0),
            s.get("constant", 0) + s.get("repeated", 0) + s.get("skewed", 0),
        )


# --- the class --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RngSpec:
    """One ``rng = [...]`` entry: an entropy device served by an rng driver."""

    device_class: ClassVar[str] = "rng"

    index: int
    backend: str

    @property
    def vdev(self) -> str:
        return f"rng{self.index}"

    @property
    def devid(self) -> int:
        return self.index


def parse_rng(spec: str, index: int, where: str) -> RngSpec:
    try:
        fields = parse_kv(spec, _RNG_KEYS, "rng", where, _EXAMPLE)
    except ValueError as e:
        raise SpecError(str(e)) from None
    return RngSpec(index, check_backend(fields.get("backend", ""), where, "rng driver", "rng0"))


class Rng(DeviceClass):
    name = "rng"
    kind = DEV_KIND
    noun = "entropy device"
    config_key = "rng"
    config_type = list
    config_help = f'entropy devices: ["{_EXAMPLE}"]'
    region = Region(WINDOW_BYTES, INFLIGHT_OFFSET, SEGMENT_BYTES, RING_SLOTS, SLOT_SIZE)
    modules = ("drivers.rng",)
    vdev_re = re.compile(r"^rng[0-9]$")
    vdev_hint = "use rng0, rng1, ..."
    checkers = (RngTest,)

    def parse(
        self, value: Any, domain: str, where: str, base_dir: Path | None
    ) -> tuple[DeviceSpec, ...]:
        if not isinstance(value, list):
            raise SpecError(f"{where}: 'rng' must be a list of strings like \"{_EXAMPLE}\"")
        if len(value) > MAX_RNGS:
            raise SpecError(f"{where}: {len(value)} entropy devices; at most {MAX_RNGS}")
        out: list[RngSpec] = []
        for i, item in enumerate(value):
            here = f"{where}: rng[{i}]"
            if isinstance(item, dict):  # from the wire: already parsed once
                item = f"backend={item.get('backend', '')}"
            if not isinstance(item, str):
                raise SpecError(f'{here} must be a string like "{_EXAMPLE}", got {item!r}')
            out.append(parse_rng(item, i, here))
        return tuple(out)

    def error_response(self, raw: bytes, window: int, sectors: int) -> bytes:
        return encode_response(
            REQUEST.unpack_from(raw.ljust(REQUEST.size, b"\0"))[0], STATUS_ERROR, 0
        )

    def c_headers(self) -> dict[str, str]:
        return {"isovisor_rngif.h": c_header()}

    @staticmethod
    def cells(row: dict[str, Any]) -> tuple[str, str, str]:
        return "-", "-", "getrandom"

    def faults(self) -> FaultClass:
        from drivers.faults import FaultClass

        return FaultClass(
            "rng",
            "rng",
            "an rng driver's requests (read: a request for random bytes)",
            ("read",),
            "the request's index in its ring (0 = the device's first request)",
            {
                "bad_op": "an rng response carries no operation, only the request's id, a status "
                "and a length",
                "corrupt_data": "random bytes have no right value a guest could check, so a "
                "flipped byte is not an error anyone can see",
            },
        )


CLASS: Final = Rng()
