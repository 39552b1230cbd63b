"""The network interface class (``vif``): ``vif = [...]`` entries of a domain config
(xl-network-configuration subset, key=value form), parsed and validated with errors that say
what to write instead; tx/rx rings and frame buffers (``ipc/netif.py``), served by
``drivers.net``."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from devices.base import DeviceClass, DeviceSpec, Medium, Region, SpecError, check_backend, pages
from devices.kvspec import parse_kv
from devices.workload import Checker, GuestSpec, Result, Tally, Unit, summary
from ipc import netif
from ipc.netif import format_mac, parse_mac
from kernel import abi

if TYPE_CHECKING:
    from drivers.faults import FaultClass

VIF_KEYS: Final = ("mac", "bridge", "backend", "ip")
MAX_VIFS: Final = 8
#: Guest addresses stay off every real network: the benchmarking range and link-local only.
ALLOWED_NETS: Final = (
    ipaddress.IPv4Network("198.18.0.0/15"),
    ipaddress.IPv4Network("169.254.0.0/16"),
)
_BRIDGE_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")
_ID: Final = struct.Struct("<Q")
_EXAMPLE: Final = "mac=02:00:00:00:00:01, bridge=br0, backend=net0, ip=198.18.0.2"


@dataclass(frozen=True)
class VifSpec:
    """One ``vif = [...]`` entry: a virtual network interface served by a net driver."""

    device_class: ClassVar[str] = "vif"

    index: int
    mac: str
    backend: str
    bridge: str = "br0"
    ip: str | None = None

    @property
    def vdev(self) -> str:
        return f"eth{self.index}"

    @property
    def devid(self) -> int:
        return self.index


def default_mac(domain: str, index: int) -> str:
    """A locally administered unicast MAC derived from the domain name (stable across runs)."""
    h = hashlib.sha256(f"{domain}/{index}".encode()).digest()
    return format_mac(bytes([0x02]) + h[:5])


def parse_vif(spec: str, index: int, domain: str, where: str) -> VifSpec:
    """Parse one xl-style vif string, e.g. ``"mac=02:00:00:00:00:01, bridge=br0,
    backend=net0, ip=198.18.0.2"``; ``where`` names it in errors."""
    try:
        fields = parse_kv(spec, VIF_KEYS, "vif", where, _EXAMPLE)
    except ValueError as e:
        raise SpecError(str(e)) from None
    backend = check_backend(fields.get("backend", ""), where, "net driver", "net0")
    bridge = fields.get("bridge", "br0")
    if not _BRIDGE_RE.match(bridge):
        raise SpecError(
            f"{where}: bridge={bridge!r} must be a short lower-case name (letter "
            "first, at most 15 characters), e.g. bridge=br0"
        )
    if "mac" in fields:
        try:
            mac = format_mac(parse_mac(fields["mac"]))
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None
    else:
        mac = default_mac(domain, index)
    ip = fields.get("ip") or None
    if ip is not None:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise SpecError(f"{where}: ip={ip!r} is not an IPv4 address like 198.18.0.2") from None
        if not any(addr in net for net in ALLOWED_NETS):
            raise SpecError(
                f"{where}: ip={ip} is outside the ranges guests may use "
                "(198.18.0.0/15, the benchmarking range, or 169.254.0.0/16, "
                "link-local); guest traffic must never reach a real network"
            )
        ip = str(addr)
    return VifSpec(index=index, mac=mac, backend=backend, bridge=bridge, ip=ip)


def vif_string(v: VifSpec) -> str:
    parts = [f"mac={v.mac}", f"bridge={v.bridge}", f"backend={v.backend}"]
    if v.ip:
        parts.append(f"ip={v.ip}")
    return ", ".join(parts)


def parse_vifs(items: Any, domain: str, where: str) -> tuple[VifSpec, ...]:
    """All ``vif`` entries of a domain: strings from a config file, or maps from the wire
    (re-validated).  Each MAC once per domain."""
    if not isinstance(items, list):
        raise SpecError(
            f"{where}: 'vif' must be a list of strings like "
            '["mac=02:00:00:00:00:01, bridge=br0, backend=net0"]'
        )
    if len(items) > MAX_VIFS:
        raise SpecError(f"{where}: {len(items)} vifs; at most {MAX_VIFS} are supported")
    out: list[VifSpec] = []
    for i, item in enumerate(items):
        here = f"{where}: vif[{i}]"
        if isinstance(item, dict):  # from the wire: already parsed once
            try:
                v = VifSpec(**item)
            except TypeError as e:
                raise SpecError(f"{here}: {e}") from None
            v = parse_vif(vif_string(v), i, domain, here)
        elif isinstance(item, str):
            v = parse_vif(item, i, domain, here)
        else:
            raise SpecError(
                f'{here} must be a string like "mac=02:00:00:00:00:01, backend=net0", got {item!r}'
            )
        if any(o.mac == v.mac for o in out):
            raise SpecError(f"{here}: mac {v.mac} is used twice")
        out.append(v)
    return tuple(out)


# --- the campaign workload ------------------------------------------------------------
class NetPair(Checker):
    """Pairs of guests on bridge br0 of the driver; each names the other's MAC as its peer."""

    image = "netpair"
    device_class = "vif"
    members = ("a", "b")
    epoch_s = 6
    min_s = 3
    #: Data frames one side sends per second, about (the count is planned from it): a pair
    #: through one net driver process made ~3,000 here (2 cores, 2026-12).
    FRAMES_PER_S: Final = 3000
    _MISMATCH: Final = re.compile(r"^netpair: corrupt frame ", re.MULTILINE)
    #: (Not "presumably lost": netpair says so when its window has been shut for a second,
    #: which a stalled tx ring does too; whether frames were lost, its summary says.)
    _ERROR: Final = re.compile(r"^netpair: (the frontend failed|send failed)", re.MULTILINE)
    _SUMMARY: Final = re.compile(r"^netpair: sent=.*$", re.MULTILINE)

    @staticmethod
    def mac(unit: Unit, member: int) -> str:
        """A unicast, locally administered MAC no other guest of the campaign has."""
        return (
            f"02:{unit.workload & 0xFF:02x}:{unit.index & 0xFF:02x}:"
            f"{unit.stack & 0xFF:02x}:{unit.gen & 0xFF:02x}:{member:02x}"
        )

    def guests(self, unit: Unit, seconds: int, seed: int) -> list[GuestSpec]:
        macs = [self.mac(unit, m) for m in range(2)]
        count = self.FRAMES_PER_S * seconds
        out = []
        for m, member in enumerate(self.members):
            # the plan's extra may set count, size, window, timeout; never the peer
            extra = " ".join(
                p
                for p in (
                    f"count={count} timeout=10000",
                    self.workload.extra,
                    f"peer={macs[1 - m]}",
                )
                if p
            )
            vif = f"mac={macs[m]}, bridge=br0, backend={self.driver}"
            out.append(GuestSpec(unit.name(member), self.image, 4, {"extra": extra, "vif": [vif]}))
        return out

    def console(self, name: str, text: str) -> Tally:
        return Tally(len(self._ERROR.findall(text)), len(self._MISMATCH.findall(text)))

    def result(self, name: str, console: str) -> Result:
        """ops: frames sent and received; mismatches: corrupt frames; errors: frontend
        errors, duplicates, frames out of order, and lost frames beyond the corrupt ones (a
        corrupt frame is also missing from what was received intact)."""
        s = summary(self._SUMMARY, console)
        if not s:
            return Result(0, 0, 0)
        corrupt = s.get("corrupt", 0)
        errors = (
            s.get("errors", 0)
            + s.get("dup", 0)
            + s.get("reordered", 0)
            + max(0, s.get("lost", 0) - corrupt)
        )
        return Result(s.get("sent", 0) + s.get("received", 0), errors, corrupt)


class Vif(DeviceClass):
    name = "vif"
    kind = abi.DEV_KIND_VIF
    noun = "network interface"
    config_key = "vif"
    config_type = list
    config_help = f'virtual network interfaces, xl.cfg style: ["{_EXAMPLE}"]'
    region = Region(
        netif.WINDOW_BYTES,
        netif.INFLIGHT_OFFSET,
        pages(netif.SEGMENT_END),
        netif.RING_SLOTS,
        netif.SLOT_SIZE,
    )
    modules = ("drivers.net",)
    vdev_re = re.compile(r"^eth[0-9]{1,2}$")
    vdev_hint = "use eth0, eth1, ..."
    checkers = (NetPair,)

    def parse(
        self, value: Any, domain: str, where: str, base_dir: Path | None
    ) -> tuple[DeviceSpec, ...]:
        return parse_vifs(value, domain, where)

    def conflict(self, spec: DeviceSpec, other: DeviceSpec, owner: str) -> str | None:
        assert isinstance(spec, VifSpec)
        if (
            isinstance(other, VifSpec)
            and other.mac == spec.mac
            and (other.backend, other.bridge) == (spec.backend, spec.bridge)
        ):
            return (
                f"vif {spec.vdev} has mac {spec.mac}, which domain {owner!r} already uses "
                f"on bridge {spec.bridge} of {spec.backend}; give each interface its own "
                "mac= (or leave it out to get one derived from the domain name)"
            )
        return None

    def attach_body(self, spec: DeviceSpec, medium: Medium | None) -> dict[str, Any]:
        assert isinstance(spec, VifSpec)
        return {"vif": {"mac": spec.mac, "bridge": spec.bridge, "ip": spec.ip}}

    def store_nodes(
        self, spec: DeviceSpec, medium: Medium | None
    ) -> tuple[dict[str, str], dict[str, str]]:
        assert isinstance(spec, VifSpec)
        nodes = {"mac": spec.mac, "bridge": spec.bridge} | ({"ip": spec.ip} if spec.ip else {})
        return nodes, dict(nodes)

    def error_response(self, raw: bytes, window: int, sectors: int) -> bytes:
        return netif.encode_tx_response(
            _ID.unpack_from(raw.ljust(_ID.size, b"\0"))[0], netif.STATUS_ERROR
        )

    def info(self, spec: DeviceSpec, medium: Medium | None, backend_node: Any) -> dict[str, Any]:
        assert isinstance(spec, VifSpec)
        return {"mac": spec.mac, "bridge": spec.bridge, "ip": spec.ip}

    @staticmethod
    def cells(row: dict[str, Any]) -> tuple[str, str, str]:
        return str(row.get("bridge")), row.get("ip") or "-", str(row.get("mac"))

    def c_headers(self) -> dict[str, str]:
        return {"isovisor_netif.h": netif.c_header()}

    def jail_blocker(self, options: dict[str, Any]) -> str | None:
        if options.get("uplink", "none") == "none":
            return None
        return (
            'a TAP uplink (uplink = "tap") is set up by the driver itself, which needs '
            "CAP_NET_ADMIN; moving that set-up to the supervisor is not built yet"
        )

    def faults(self) -> FaultClass:
        from drivers.faults import FaultClass

        return FaultClass(
            "vif",
            "net",
            "a net driver's requests (tx: a frame being switched)",
            ("tx",),
            "the frame covers this byte offset of the vif's region (the guest's tx buffer k "
            "starts at 8192 + 2048 * k)",
            {"bad_op": "a tx response carries no operation, only the request's id and a status"},
        )


CLASS: Final = Vif()
