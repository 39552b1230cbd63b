"""The block device class (``vbd``): ``disk = [...]`` entries (an xl-disk-configuration subset,
key=value form only), a block ring with its in-flight log (``ipc/blkif.py``), served by
``drivers.blk`` or ``drivers.blk.ram``."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from devices.base import (
    DeviceClass,
    DeviceSpec,
    Medium,
    Region,
    SpecError,
    check_backend,
    pages,
)
from devices.kvspec import parse_kv, parse_size
from devices.workload import Checker, GuestSpec, Result, Tally, Unit, summary
from ipc import blkif
from ipc.ring import inflight_bytes
from kernel import abi

if TYPE_CHECKING:
    from drivers.faults import FaultClass

DISK_KEYS: Final = ("target", "vdev", "access", "backend", "size", "type", "format")
MAX_DISKS: Final = 15
_VDEV_RE: Final = re.compile(r"^xvd([a-z])$")
_ID_OP: Final = struct.Struct("<QB")
_EXAMPLE: Final = "target=data.img, vdev=xvda, access=rw, backend=blk0, size=64M"


@dataclass(frozen=True)
class DiskSpec:
    """One ``disk = [...]`` entry: a virtual block device served by a driver."""

    device_class: ClassVar[str] = "vbd"

    vdev: str
    backend: str
    type: str = "file"  # file | memory
    target: str | None = None  # absolute image path (file disks)
    access: str = "rw"  # rw | ro
    size: int | None = None  # bytes

    @property
    def devid(self) -> int:
        """Xen's device number: xvda = 202 << 8, xvdb = (202 << 8) + 16, ..."""
        return (202 << 8) + (ord(self.vdev[3]) - ord("a")) * 16

    @property
    def read_only(self) -> bool:
        return self.access == "ro"


def parse_disk(spec: str, where: str, base_dir: Path | None) -> DiskSpec:
    """Parse one xl-style disk string; ``where`` names it in errors."""
    try:
        fields = parse_kv(spec, DISK_KEYS, "disk", where, _EXAMPLE)
    except ValueError as e:
        raise SpecError(str(e)) from None
    vdev = fields.get("vdev")
    if vdev is None:
        raise SpecError(f"{where}: missing 'vdev' (the guest's device name, e.g. vdev=xvda)")
    if not _VDEV_RE.match(vdev):
        raise SpecError(f"{where}: vdev={vdev!r} is not supported: use xvda .. xvdz")
    access = {"rw": "rw", "w": "rw", "ro": "ro", "r": "ro"}.get(fields.get("access", "rw"))
    if access is None:
        raise SpecError(f"{where}: access={fields['access']!r} must be rw (w) or ro (r)")
    backend = check_backend(fields.get("backend", ""), where, "driver", "blk0")
    fmt = fields.get("format", "raw")
    if fmt != "raw":
        raise SpecError(f"{where}: format={fmt!r} is not supported; only raw images are")
    kind = fields.get("type", "file")
    if kind not in ("file", "memory"):
        raise SpecError(f"{where}: type={kind!r} must be file or memory")
    size = None
    if "size" in fields:
        size = parse_size(fields["size"])
        if size is None or size <= 0 or size % 512:
            raise SpecError(
                f"{where}: size={fields['size']!r} must be a positive number of "
                "bytes with an optional K, M, G or T suffix and a multiple of 512"
            )
    target = fields.get("target")
    if kind == "memory":
        if target:
            raise SpecError(f"{where}: a type=memory disk has no target; remove target=")
        if size is None:
            raise SpecError(f"{where}: a type=memory disk needs size=, e.g. size=16M")
    else:
        if not target:
            raise SpecError(
                f"{where}: missing 'target' (the image file, e.g. "
                "target=data.img; relative paths are relative to the config)"
            )
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        target = str(path.resolve())
        if size is None and not Path(target).exists():
            raise SpecError(
                f"{where}: image {target} does not exist; give size= to have it "
                "created (sparse), e.g. size=64M"
            )
    return DiskSpec(vdev=vdev, backend=backend, type=kind, target=target, access=access, size=size)


def disk_string(d: DiskSpec) -> str:
    """The xl-style string :func:`parse_disk` turns back into ``d``."""
    parts = [f"vdev={d.vdev}", f"backend={d.backend}", f"type={d.type}", f"access={d.access}"]
    if d.target:
        parts.append(f"target={d.target}")
    if d.size is not None:
        parts.append(f"size={d.size}")
    return ", ".join(parts)


# --- the campaign workload ------------------------------------------------------------
class BlkStress(Checker):
    image = "blkstress"
    device_class = "vbd"
    #: blkstress ends on time (``seconds=``): a campaign's last guests end at most this long
    #: after its last fault.
    epoch_s = 6
    min_s = 3
    _MISMATCH: Final = re.compile(r"^blkstress: MISMATCH ", re.MULTILINE)
    _ERROR: Final = re.compile(r"^blkstress: .*(failed: status|phase stopped)", re.MULTILINE)
    _SUMMARY: Final = re.compile(r"^blkstress: ops=.*$", re.MULTILINE)

    def guests(self, unit: Unit, seconds: int, seed: int) -> list[GuestSpec]:
        w = self.workload
        disk = (
            f"target={unit.base}.img, vdev=xvda, access=rw, backend={self.driver}, "
            f"size={w.disk_size}"
        )
        extra = (f"{w.extra} seed={seed} ops=1000000000 seconds={seconds} timeout=60000").strip()
        return [GuestSpec(unit.name(), self.image, 8, {"extra": extra, "disk": [disk]})]

    def console(self, name: str, text: str) -> Tally:
        return Tally(len(self._ERROR.findall(text)), len(self._MISMATCH.findall(text)))

    def result(self, name: str, console: str) -> Result:
        s = summary(self._SUMMARY, console)
        return Result(s.get("ops", 0), s.get("errors", 0), s.get("mismatches", 0))


class Vbd(DeviceClass):
    name = "vbd"
    kind = abi.DEV_KIND_VBD
    noun = "block device"
    config_key = "disk"
    config_type = list
    config_help = f'virtual disks, xl.cfg style: ["{_EXAMPLE}"]'
    region = Region(
        blkif.WINDOW_BYTES,
        blkif.INFLIGHT_OFFSET,
        blkif.INFLIGHT_OFFSET + pages(inflight_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)),
        blkif.RING_SLOTS,
        blkif.SLOT_SIZE,
    )
    modules = ("drivers.blk", "drivers.blk.ram")
    vdev_re = re.compile(r"^xvd[a-z]$")
    vdev_hint = "use xvda .. xvdz"
    checkers = (BlkStress,)

    def parse(
        self, value: Any, domain: str, where: str, base_dir: Path | None
    ) -> tuple[DeviceSpec, ...]:
        if not isinstance(value, list):
            raise SpecError(f"{where}: 'disk' must be a list of strings like \"{_EXAMPLE}\"")
        if len(value) > MAX_DISKS:
            raise SpecError(f"{where}: {len(value)} disks; at most {MAX_DISKS} are supported")
        disks: list[DiskSpec] = []
        for i, item in enumerate(value):
            here = f"{where}: disk[{i}]"
            if isinstance(item, dict):  # from the wire: already parsed once
                try:
                    d = DiskSpec(**item)
                except TypeError as e:
                    raise SpecError(f"{here}: {e}") from None
                parse_disk(disk_string(d), here, base_dir)  # re-validate every field
            elif isinstance(item, str):
                d = parse_disk(item, here, base_dir)
            else:
                raise SpecError(
                    f'{here} must be a string like "target=data.img, vdev=xvda", got {item!r}'
                )
            if any(o.vdev == d.vdev for o in disks):
                raise SpecError(f"{here}: vdev {d.vdev} is used twice")
            disks.append(d)
        return tuple(disks)

    def medium(self, spec: DeviceSpec, segment: str) -> Medium | None:
        assert isinstance(spec, DiskSpec)
        return Medium(f"{segment}.disk") if spec.type == "memory" else None

    def image(self, spec: DeviceSpec) -> str | None:
        assert isinstance(spec, DiskSpec)
        return spec.target if spec.type == "file" else None

    def attach_body(self, spec: DeviceSpec, medium: Medium | None) -> dict[str, Any]:
        assert isinstance(spec, DiskSpec)
        return {
            "disk": {
                "target": medium.name if medium else spec.target,
                "type": spec.type,
                "access": spec.access,
                "size": spec.size,
            }
        }

    def store_nodes(
        self, spec: DeviceSpec, medium: Medium | None
    ) -> tuple[dict[str, str], dict[str, str]]:
        assert isinstance(spec, DiskSpec)
        return {}, {
            "params": medium.name if medium else spec.target or "",
            "type": spec.type,
            "mode": "r" if spec.read_only else "w",
        }

    def error_response(self, raw: bytes, window: int, sectors: int) -> bytes:
        try:
            req = blkif.decode_request(raw, window=window, sectors=sectors)
            rid, op = req.id, req.op
        except blkif.RequestError as e:
            rid, op = e.id, e.op
        except ValueError:  # shorter than an id and op: cannot happen with whole slots
            rid, op = _ID_OP.unpack_from(raw.ljust(_ID_OP.size, b"\0"))
        return blkif.encode_response(rid, op, blkif.STATUS_ERROR)

    def info(self, spec: DeviceSpec, medium: Medium | None, backend_node: Any) -> dict[str, Any]:
        assert isinstance(spec, DiskSpec)
        try:
            sectors = int(backend_node("sectors") or 0)
        except ValueError:
            sectors = -1
        return {
            "type": spec.type,
            "target": spec.target or (medium and medium.name),
            "access": spec.access,
            "sectors": sectors,
        }

    @staticmethod
    def cells(row: dict[str, Any]) -> tuple[str, str, str]:
        return str(row.get("access")), str(row.get("sectors")), str(row.get("target"))

    def c_headers(self) -> dict[str, str]:
        return {"isovisor_blkif.h": blkif.c_header()}

    def jail_blocker(self, options: dict[str, Any]) -> str | None:
        return (
            "a block driver opens its disk images by path, and handing them into the jail as "
            "descriptors is not built yet"
        )

    def faults(self) -> FaultClass:
        from drivers.faults import OPS, FaultClass

        return FaultClass(
            "vbd",
            "block",
            "a block driver's requests",
            OPS,
            "the request's sectors cover this sector",
        )


CLASS: Final = Vbd()
