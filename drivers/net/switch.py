"""The forwarding logic of the net backend: learning bridges, with no I/O.

A :class:`Bridge` has *ports* (a guest vif's device key; :data:`UPLINK`, 0, for the TAP
uplink) and a :class:`MacTable` that maps a source MAC address to the port it was last seen on.
For a frame that came in on one port, :meth:`Bridge.forward` picks the ports it goes out on:

* a broadcast or multicast destination (the group bit, bit 0 of the first byte, set): every
  other port of the bridge (*flooded*);
* a unicast destination the table knows: that port; none if it is the port the frame came in
  on (a switch never sends a frame back where it came from);
* an unknown unicast destination (never seen, aged out, or last seen on a port that has left
  the bridge): every other port (*flooded*).

Frames never cross bridges.  Entries age out ``age_s`` seconds after their MAC was last seen as
a source; a table holds at most ``max_entries`` MACs (the least recently seen goes first), so a
flood of invented source addresses from the uplink cannot grow it without bound.

Every time is an argument (``now``, seconds on any monotonic clock), so the logic is tested
without waiting.  What a port may send (its source MAC) is checked by the backend with
:func:`source_problem` before the frame gets here.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from ipc import netif

#: The port number of the uplink (the TAP); guest ports are device keys, which are never 0.
UPLINK: Final = netif.UPLINK_KEY
#: A destination list holds every other port, and a delivery record at most
#: ``netif.MAX_DESTINATIONS`` of them.
MAX_PORTS: Final = netif.MAX_DESTINATIONS + 1
DEFAULT_AGE_S: Final = 300.0
DEFAULT_MAX_ENTRIES: Final = 4096
BROADCAST: Final = b"\xff" * 6


class BridgeFull(Exception):
    """A bridge has no room for another port."""


def is_multicast(mac: bytes) -> bool:
    """The group bit: broadcast and multicast addresses."""
    return bool(mac[0] & 1)


def source_problem(frame: bytes, expected: bytes) -> str | None:
    """Why a frame sent by a port whose MAC is ``expected`` must be dropped, or None.  A frame
    is at least ``netif.MIN_FRAME`` bytes (the caller checked)."""
    src = frame[6:12]
    if src == expected:
        return None
    if is_multicast(src):
        return f"source MAC {netif.format_mac(src)} is a multicast address"
    return f"source MAC {netif.format_mac(src)} is not the interface's {netif.format_mac(expected)}"


@dataclass(frozen=True)
class Forward:
    """Where a frame goes: ``ports`` in a fixed order (the order ports joined the bridge);
    ``flooded`` if it went to every other port because of its destination (broadcast,
    multicast, or unknown unicast)."""

    ports: tuple[int, ...]
    flooded: bool


class MacTable:
    """MAC address -> (port, time last seen as a source), least recently seen first."""

    def __init__(
        self, age_s: float = DEFAULT_AGE_S, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        if age_s <= 0:
            raise ValueError(f"MAC ageing time must be positive, got {age_s!r}")
        if max_entries < 1:
            raise ValueError(f"a MAC table must hold at least one entry, got {max_entries!r}")
        self.age_s = age_s
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        #: Entries that moved to another port (a MAC seen on one port, then another).
        self.moves = 0

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, mac: bytes, port: int, now: float) -> None:
        """``mac`` was seen as the source of a frame on ``port`` at ``now``."""
        old = self._entries.pop(mac, None)
        if old is not None and old[0] != port:
            self.moves += 1
        self._entries[mac] = (port, now)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def lookup(self, mac: bytes, now: float) -> int | None:
        """The port ``mac`` was last seen on, or None if unknown or aged out (and then
        forgotten)."""
        hit = self._entries.get(mac)
        if hit is None:
            return None
        if now - hit[1] > self.age_s:
            del self._entries[mac]
            return None
        return hit[0]

    def expire(self, now: float) -> int:
        """Forget every entry older than the ageing time; how many went."""
        gone = 0
        while self._entries:
            mac, (_, seen) = next(iter(self._entries.items()))
            if now - seen <= self.age_s:
                break
            del self._entries[mac]
            gone += 1
        return gone

    def forget_port(self, port: int) -> int:
        """Forget every MAC learned on ``port`` (it left the bridge); how many."""
        macs = [m for m, (p, _) in self._entries.items() if p == port]
        for m in macs:
            del self._entries[m]
        return len(macs)

    def entries(self, now: float) -> list[tuple[bytes, int, float]]:
        """(mac, port, seconds since seen) of every live entry, least recently seen first."""
        return [(m, p, now - t) for m, (p, t) in self._entries.items() if now - t <= self.age_s]

    def to_wire(self, now: float) -> list[list[Any]]:
        """``[[mac text, port, ms since seen], ...]`` (msgpack-able, for a saved state)."""
        return [[netif.format_mac(m), p, int(age * 1000)] for m, p, age in self.entries(now)]

    def load(self, rows: object, now: float, where: str) -> int:
        """Take entries from :meth:`to_wire` rows; ValueError naming what is malformed.
        Returns how many were loaded (aged-out rows are skipped)."""
        if not isinstance(rows, list):
            raise ValueError(f"{where} must be a list of [mac, port, age_ms], got {rows!r:.60}")
        parsed: list[tuple[bytes, int, float]] = []
        for i, row in enumerate(rows):
            if (
                not isinstance(row, list | tuple)
                or len(row) != 3
                or not isinstance(row[0], str)
                or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row[1:]
                )
            ):
                raise ValueError(
                    f"{where}[{i}] must be [mac text, port >= 0, age_ms >= 0], got {row!r:.60}"
                )
            try:
                mac = bytes(int(p, 16) for p in row[0].split(":"))
            except ValueError:
                raise ValueError(f"{where}[{i}]: {row[0]!r:.40} is not a MAC address") from None
            if len(mac) != 6:
                raise ValueError(f"{where}[{i}]: {row[0]!r:.40} is not a MAC address")
            parsed.append((mac, row[1], row[2] / 1000))
        n = 0
        for mac, port, age in sorted(parsed, key=lambda r: -r[2]):  # oldest first
            if age <= self.age_s:
                self.learn(mac, port, now - age)
                n += 1
        return n


#: EtherTypes of the announcement a moved vif's MAC makes (:func:`announcement`).
ETH_ARP: Final = 0x0806
ETH_RARP: Final = 0x8035


def announcement(mac: bytes, ip: str | None) -> bytes:
    """The broadcast frame that tells a network where ``mac`` is now, after its guest moved
    here (a restore or a live migration): a gratuitous ARP request for ``ip`` (RFC 5227's
    ARP announcement, as Clark et al.'s migrated guests send), or without an address the
    RARP request QEMU's announce-self sends.  Learning switches on the way learn the MAC on
    the port it came from; ARP caches keep or refresh ``ip``'s entry.  60 bytes, padded."""
    if len(mac) != 6 or is_multicast(mac):
        raise ValueError(f"cannot announce {mac.hex(':')}: not a unicast MAC")
    if ip is None:
        kind, addr, op = ETH_RARP, bytes(4), 3  # RARP request: who is mac?
        target_mac = mac
    else:
        kind, addr, op = ETH_ARP, ipaddress.IPv4Address(ip).packed, 1  # who has ip? tell ip
        target_mac = bytes(6)
    arp = (
        (1).to_bytes(2, "big")  # hardware: Ethernet
        + (0x0800).to_bytes(2, "big")  # protocol: IPv4
        + bytes((6, 4))
        + op.to_bytes(2, "big")
        + mac
        + addr
        + target_mac
        + addr
    )
    frame = BROADCAST + mac + kind.to_bytes(2, "big") + arp
    return frame + bytes(60 - len(frame))  # Ethernet's shortest frame, without the FCS


class Bridge:
    """One broadcast domain: its ports (in the order they joined) and its MAC table."""

    def __init__(
        self, name: str, age_s: float = DEFAULT_AGE_S, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self.name = name
        self.table = MacTable(age_s, max_entries)
        self._ports: dict[int, None] = {}

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(self._ports)

    def __contains__(self, port: object) -> bool:
        return port in self._ports

    def add_port(self, port: int) -> None:
        """BridgeFull if the bridge has MAX_PORTS ports already (a flooded frame must fit one
        delivery record)."""
        if port in self._ports:
            return
        if len(self._ports) >= MAX_PORTS:
            raise BridgeFull(
                f"bridge {self.name} has {len(self._ports)} ports already, the "
                f"most one bridge can have (a frame flooded on it must reach at "
                f"most {netif.MAX_DESTINATIONS} others); put this interface on "
                "another bridge"
            )
        self._ports[port] = None

    def remove_port(self, port: int) -> None:
        """``port`` leaves: it is no destination any more, and its MACs are forgotten."""
        self._ports.pop(port, None)
        self.table.forget_port(port)

    def forward(self, in_port: int, frame: bytes, now: float) -> Forward:
        """The ports a frame that came in on ``in_port`` goes out on (see the module
        docstring).  The caller learned the frame's source already."""
        dst = frame[:6]
        if not is_multicast(dst):
            port = self.table.lookup(dst, now)
            if port is not None and port in self._ports:
                return Forward(() if port == in_port else (port,), False)
        return Forward(tuple(p for p in self._ports if p != in_port), True)
