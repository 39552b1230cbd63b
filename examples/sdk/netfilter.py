"""netfilter: a network backend that drops frames by EtherType or by UDP port, and counts the
frames each vif sends.  The example of "A network backend" (docs/sdk.md).

It is the learning switch of ``drivers.net`` with one hook, ``filter_frame``.  Run it in place
of ``drivers.net``, under running guests::

    isovisor driver swap net0 --to-file examples/sdk/netfilter.py --option drop_udp_ports=7
    isovisor driver stats net0
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

from drivers.sdk import NetBackend, StateError, Vif

IPV4, UDP = 0x0800, 17


def udp_port(frame: bytes) -> int | None:
    """The destination port of an IPv4 UDP datagram (its first fragment), else None."""
    if len(frame) < 34 or frame[12:14] != IPV4.to_bytes(2, "big") or frame[23] != UDP:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if ihl < 20 or int.from_bytes(frame[20:22], "big") & 0x1FFF:  # a later fragment
        return None
    at = 14 + ihl + 2
    return int.from_bytes(frame[at : at + 2], "big") if len(frame) >= at + 2 else None


def numbers(options: dict[str, Any], name: str, top: int) -> frozenset[int]:
    """Option ``name``: a number, or several in a string ("0x86dd, 0x88cc"), each 0..top."""
    value = options.get(name, "")
    parts = [value] if isinstance(value, int) else str(value).replace(",", " ").split()
    try:
        out = frozenset(p if isinstance(p, int) else int(p, 0) for p in parts)
    except ValueError:
        raise ValueError(f"{name} must be numbers 0..{top:#x}, got {value!r}") from None
    if any(not 0 <= n <= top for n in out):
        raise ValueError(f"{name} must be numbers 0..{top:#x}, got {value!r}")
    return out


class NetFilter(NetBackend):
    """drivers.net's switch; frames of the EtherTypes and UDP ports given are dropped."""

    OPTIONS: ClassVar[dict[str, str]] = {
        **NetBackend.OPTIONS,
        "drop_ethertypes": 'EtherTypes to drop, e.g. 0x86dd or "0x86dd, 0x88cc" (default none)',
        "drop_udp_ports": 'UDP destination ports to drop (IPv4), e.g. 7 or "7, 9" (default none)',
    }

    def configure(self, options: dict[str, Any]) -> None:
        super().configure(options)
        self.drop_types = numbers(options, "drop_ethertypes", 0xFFFF)
        self.drop_ports = numbers(options, "drop_udp_ports", 0xFFFF)
        self.seen: Counter[str] = Counter()  # frames the hook saw, by source vif
        self.dropped: Counter[str] = Counter()  # and dropped

    def filter_frame(self, src: Vif | None, frame: bytes) -> bytes | None:
        # Called again for a frame redone after a crash or a swap: decide by the frame alone.
        who = "uplink" if src is None else src.label
        self.seen[who] += 1
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype in self.drop_types or (self.drop_ports and udp_port(frame) in self.drop_ports):
            self.dropped[who] += 1
            return None
        return frame

    def statistics(self) -> dict[str, int | float | str]:
        own: dict[str, int | float | str] = {}
        for who in sorted(self.seen):
            own[f"{who}.seen"] = self.seen[who]
            own[f"{who}.dropped"] = self.dropped[who]
        return {**own, **super().statistics()}  # ours first: the host keeps the first 64 values

    # Carried to the next implementation in a hot swap (after a crash, counting starts afresh).
    def backend_data(self) -> dict[str, Any]:
        return {"seen": dict(self.seen), "dropped": dict(self.dropped)}

    def restore_backend_data(self, data: dict[str, Any]) -> None:
        for name, counter in (("seen", self.seen), ("dropped", self.dropped)):
            got = data.get(name, {})  # {} from a backend that saved none (drivers.net)
            if not isinstance(got, dict) or not all(isinstance(n, int) for n in got.values()):
                raise StateError(f"state.data.backend.{name} must map vifs to counts: {got!r:.60}")
            counter.update(got)
