"""``vif = [...]`` entries of a domain config: virtual network interfaces (xl-network-configuration
subset, key=value form), parsed and validated with errors that say what to write instead."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Final

from ipc.netif import format_mac, parse_mac
from isovisor.kvspec import parse_kv

VIF_KEYS: Final = ("mac", "bridge", "backend", "ip")
MAX_VIFS: Final = 8
#: Guest addresses stay off every real network: the benchmarking range and link-local only.
ALLOWED_NETS: Final = (ipaddress.IPv4Network("198.18.0.0/15"),
                       ipaddress.IPv4Network("169.254.0.0/16"))
_BRIDGE_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class VifError(ValueError):
    """A vif entry is invalid; the message names the entry and what to write."""


@dataclass(frozen=True)
class VifSpec:
    """One ``vif = [...]`` entry: a virtual network interface served by a net driver."""

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
        fields = parse_kv(spec, VIF_KEYS, "vif", where,
                          "mac=02:00:00:00:00:01, bridge=br0, backend=net0, ip=198.18.0.2")
    except ValueError as e:
        raise VifError(str(e)) from None
    backend = fields.get("backend", "")
    if not _NAME_RE.match(backend):
        raise VifError(f"{where}: backend={backend!r} must name a net driver declared in "
                       "supervisor.toml as [driver.<name>], e.g. backend=net0")
    bridge = fields.get("bridge", "br0")
    if not _BRIDGE_RE.match(bridge):
        raise VifError(f"{where}: bridge={bridge!r} must be a short lower-case name (letter "
                       "first, at most 15 characters), e.g. bridge=br0")
    if "mac" in fields:
        try:
            mac = format_mac(parse_mac(fields["mac"]))
        except ValueError as e:
            raise VifError(f"{where}: {e}") from None
    else:
        mac = default_mac(domain, index)
    ip = fields.get("ip") or None
    if ip is not None:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise VifError(f"{where}: ip={ip!r} is not an IPv4 address like 198.18.0.2") from None
        if not any(addr in net for net in ALLOWED_NETS):
            raise VifError(f"{where}: ip={ip} is outside the ranges guests may use "
                           "(198.18.0.0/15, the benchmarking range, or 169.254.0.0/16, "
                           "link-local); guest traffic must never reach a real network")
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
        raise VifError(f"{where}: 'vif' must be a list of strings like "
                       "[\"mac=02:00:00:00:00:01, bridge=br0, backend=net0\"]")
    if len(items) > MAX_VIFS:
        raise VifError(f"{where}: {len(items)} vifs; at most {MAX_VIFS} are supported")
    out: list[VifSpec] = []
    for i, item in enumerate(items):
        here = f"{where}: vif[{i}]"
        if isinstance(item, dict):  # from the wire: already parsed once
            try:
                v = VifSpec(**item)
            except TypeError as e:
                raise VifError(f"{here}: {e}") from None
            v = parse_vif(vif_string(v), i, domain, here)
        elif isinstance(item, str):
            v = parse_vif(item, i, domain, here)
        else:
            raise VifError(f"{here} must be a string like \"mac=02:00:00:00:00:01, "
                           f"backend=net0\", got {item!r}")
        if any(o.mac == v.mac for o in out):
            raise VifError(f"{here}: mac {v.mac} is used twice")
        out.append(v)
    return tuple(out)
