"""The switch's uplink (``uplink = "tap"``, docs/net.md "The uplink"): one TAP device
(:mod:`drivers.net.tap`) in a network namespace of its own, one more port (key
:data:`~drivers.net.switch.UPLINK`) of one bridge.

:class:`Uplink` holds what the backend needs of it: its options checked, the TAP opened at the
first attach and tried again every :data:`TAP_RETRY_S` while it cannot be (busy, or no
privileges), frames written to it (at most once: a frame it does not take is dropped and
counted) and read from it, the permanent neighbour entries of guests with an ``ip`` on its
bridge, its counters, and :meth:`Uplink.cleanup` of the TAP and the namespace when the driver
goes for good.  Switching the frames it reads, and the bridge port itself, stay the backend's.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Final, Protocol

from drivers.net import tap as tapmod
from ipc import netif
from ipc.schema import STACK_ENV

#: Seconds between attempts to open the TAP after a failure.
TAP_RETRY_S: Final = 1.0
#: Frames read from the TAP per readable().
UPLINK_READ: Final = 256
DEFAULT_HOST_ADDR: Final = "198.18.0.1/15"
#: Where guest traffic may go (devices/vif.py keeps guests inside the same ranges).
ALLOWED_NETS: Final = (
    ipaddress.IPv4Network("198.18.0.0/15"),
    ipaddress.IPv4Network("169.254.0.0/16"),
)
_BRIDGE_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")


def default_netns(driver: str) -> str:
    """The uplink's namespace unless option ``netns`` names one: ``isovisor-<driver>`` in
    the stack named "default", else ``isovisor-<stack>-<driver>``, so that two stacks on one
    host (a migration's source and destination) do not share one."""
    stack = os.environ.get(STACK_ENV, "")
    return f"isovisor-{driver}" if stack in ("", "default") else f"isovisor-{stack}-{driver}"


#: The options that mean something only with ``uplink = "tap"``.
UPLINK_ONLY: Final = ("tap", "netns", "host_addr", "bridge")


@dataclass
class UplinkStats:
    """Counters of the uplink port itself."""

    frames_in: int = 0  # frames read from the TAP and switched
    frames_out: int = 0  # frames written to the TAP
    drops: int = 0  # frames for the TAP it did not take (queue full, down, not open)
    bad: int = 0  # frames read from the TAP of a bad size or with a multicast source
    spoofed: int = 0  # frames read from the TAP with a guest's MAC as their source


class Guest(Protocol):
    """A vif as the neighbour entries see it."""

    @property
    def ip(self) -> str | None: ...
    @property
    def mac(self) -> bytes: ...
    @property
    def bridge(self) -> str: ...


def check_bridge(name: object, what: str = "bridge") -> str:
    if not isinstance(name, str) or not _BRIDGE_RE.match(name):
        raise ValueError(
            f"{what} must be a short lower-case name (a letter first, at most 15 "
            f"letters, digits, '_', '-'), e.g. br0; got {name!r}"
        )
    return name


def check_host_addr(value: object) -> str:
    """``value`` as ``address/prefix`` if it is one inside the guests' ranges."""
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(
            f"host_addr must be an IPv4 address with a prefix length, like "
            f"{DEFAULT_HOST_ADDR}; got {value!r}"
        )
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(
            f"host_addr {value!r} is not an IPv4 address with a prefix length, "
            f"like {DEFAULT_HOST_ADDR}"
        ) from None
    if not any(iface.ip in net for net in ALLOWED_NETS):
        raise ValueError(
            f"host_addr {value} is outside 198.18.0.0/15 and 169.254.0.0/16, the "
            "ranges guests use; guest traffic must never reach a real network"
        )
    return str(iface)


class Uplink:
    """The TAP port of driver ``name`` (the module docstring), from the driver's options
    (ValueError naming a bad one).  ``clock``: seconds on a monotonic clock."""

    def __init__(
        self,
        name: str,
        options: dict[str, Any],
        log: logging.Logger,
        clock: Callable[[], float],
    ) -> None:
        mode = options.get("uplink", "none")
        if mode not in ("none", "tap"):
            raise ValueError(f'uplink must be "none" or "tap", got {mode!r}')
        #: "none" or "tap"; "none" once retired (cleanup): nothing opens the TAP again.
        self.mode: str = mode
        if mode == "none":
            given = [k for k in UPLINK_ONLY if k in options]
            if given:
                raise ValueError(
                    f"option(s) {', '.join(given)} apply only with uplink = "
                    '"tap" (uplink is "none")'
                )
        tap = options.get("tap", f"iv{name}")
        if "tap" not in options and len(tap) > tapmod.IFNAME_MAX:
            raise ValueError(
                f'the default TAP name {tap!r} ("iv" + the driver name) is '
                f"longer than {tapmod.IFNAME_MAX} characters: set option tap"
            )
        self.tap_name = tapmod.check_ifname(tap, "tap")
        netns = options.get("netns", default_netns(name))
        if "netns" not in options and len(netns) > 64:
            raise ValueError(
                f"the default namespace name {netns!r} (isovisor-<stack>-<driver>) is longer "
                "than 64 characters: set option netns"
            )
        self.netns = tapmod.check_netns(netns, "netns")
        self.host_addr = check_host_addr(options.get("host_addr", DEFAULT_HOST_ADDR))
        #: The bridge whose port it is.
        self.bridge = check_bridge(options.get("bridge", "br0"))
        self.log = log
        self.clock = clock
        self.tap: tapmod.Tap | None = None
        #: The namespace was created by this instance.
        self.netns_created = False
        self.stats = UplinkStats()
        #: When to try the TAP again (clock seconds).
        self.retry_at = 0.0
        self._failures = 0
        #: ip -> mac of the permanent neighbour entries installed on the TAP (or being installed)
        self._neighbors: dict[str, str] = {}
        self._logged = 0

    def check_privilege(self) -> None:
        """ValueError if a TAP uplink cannot work in this process (checked after the names)."""
        if self.mode == "tap":
            problem = tapmod.privilege_problem()
            if problem is not None:
                raise ValueError(f'uplink = "tap" cannot work in this driver: {problem}')

    # -- the TAP ---------------------------------------------------------------------------------
    def wanted(self, guests: bool) -> bool:
        """Is the TAP to be opened (there are ``guests``, and it is not open)?"""
        return self.mode == "tap" and self.tap is None and guests

    def fds(self) -> list[int]:
        return [self.tap.fileno()] if self.tap is not None else []

    def open(self, guests: Iterable[Guest]) -> bool:
        """Open the TAP (True), or schedule the next attempt (False); the neighbour entries of
        ``guests`` are installed on a new TAP."""
        try:
            tap, created = tapmod.Tap.open(self.tap_name, self.netns, self.host_addr)
        except tapmod.TapError as e:
            self._failures += 1
            self.retry_at = self.clock() + TAP_RETRY_S
            if self._failures <= 3 or self._failures % 60 == 0:
                self.log.error(
                    "uplink: %s; trying again every %g s (%d attempts so far)",
                    e,
                    TAP_RETRY_S,
                    self._failures,
                )
            return False
        self.tap = tap
        self.netns_created = self.netns_created or created
        self._failures = 0
        self._neighbors.clear()  # a new TAP: (re)install every guest's entry
        self.sync_neighbors(guests)
        self.log.info(
            "uplink: TAP %s in network namespace %s%s, address %s, on bridge %s",
            self.tap_name,
            self.netns,
            " (created)" if created else "",
            self.host_addr,
            self.bridge,
        )
        return True

    def lose(self, why: str) -> None:
        """The TAP failed: close it and try again in :data:`TAP_RETRY_S`."""
        self.log.error("uplink: %s; closing the TAP and trying again in %g s", why, TAP_RETRY_S)
        self.close()
        self.retry_at = self.clock() + TAP_RETRY_S

    def close(self) -> None:
        """Close the TAP; it stays (with its namespace) for the next instance."""
        if self.tap is not None:
            self.tap.close()
            self.tap = None

    def cleanup(self) -> list[str]:
        """Close the TAP, then delete it, and the namespace if isovisor created it (tap.py's
        marker), whichever instance did; what was removed.  For a driver that goes for good."""
        self.close()
        if self.mode != "tap":
            return []
        self.mode = "none"  # retired: nothing opens the TAP (or its namespace) again
        try:
            done = tapmod.remove(self.netns, self.tap_name)
        except tapmod.TapError as e:
            self.log.error("uplink: cannot remove the TAP or its namespace: %s", e)
            return []
        self.netns_created = False
        if done:
            self.log.info("removed %s", ", ".join(done))
        return done

    # -- frames ----------------------------------------------------------------------------------
    def send(self, frame: bytes, key: int) -> bool:
        """Write a frame of vif ``key`` to the TAP (at most once): True if it took it; else it
        is dropped and counted."""
        why = "the TAP is not open" if self.tap is None else self.tap.write(frame)
        if why is None:
            self.stats.frames_out += 1
            return True
        self.stats.drops += 1
        self._logged += 1
        if self._logged <= 20 or self._logged % 1000 == 0:
            self.log.warning(
                "uplink: a frame of vif %d dropped: %s [%d dropped so far]",
                key,
                why,
                self.stats.drops,
            )
        return False

    def read(self) -> list[bytes] | None:
        """Frames the TAP has (at most :data:`UPLINK_READ`), or None if it failed (it is then
        closed: :meth:`lose`)."""
        assert self.tap is not None
        try:
            return self.tap.read_frames(UPLINK_READ)
        except tapmod.TapError as e:
            self.lose(str(e))
            return None

    # -- neighbour entries -----------------------------------------------------------------------
    def sync_neighbors(self, guests: Iterable[Guest]) -> None:
        """Install a permanent neighbour entry on the TAP for each guest with an ip on the
        uplink's bridge, and remove those of guests that left (tap.set_neighbors says why).
        The ``ip`` commands run on a thread of their own: they are not on the recovery path,
        and the entries of a previous instance are still there."""
        if self.tap is None:
            return
        want = {g.ip: netif.format_mac(g.mac) for g in guests if g.ip and g.bridge == self.bridge}
        add = [(ip, mac) for ip, mac in want.items() if self._neighbors.get(ip) != mac]
        remove = [ip for ip in self._neighbors if ip not in want]
        if not add and not remove:
            return
        self._neighbors = dict(want)
        netns, tap, log = self.netns, self.tap_name, self.log

        def run() -> None:
            for problem in tapmod.set_neighbors(netns, tap, add, remove):
                log.warning(
                    "uplink: cannot set a neighbour entry (the host will use ARP): %s", problem
                )

        threading.Thread(target=run, name="neighbors", daemon=True).start()

    # -- counters --------------------------------------------------------------------------------
    def statistics(self) -> dict[str, int | float | str]:
        """``uplink`` (what it is), then its counters as ``uplink_<counter>``."""
        if self.mode == "tap":
            what = (
                f"tap {self.tap_name} in {self.netns}"
                if self.tap is not None
                else f"tap {self.tap_name}: not open"
            )
        else:
            what = "none"
        out: dict[str, int | float | str] = {"uplink": what}
        for f in fields(UplinkStats):
            out[f"uplink_{f.name}"] = getattr(self.stats, f.name)
        return out


__all__ = [
    "ALLOWED_NETS",
    "DEFAULT_HOST_ADDR",
    "TAP_RETRY_S",
    "UPLINK_ONLY",
    "Uplink",
    "UplinkStats",
    "check_bridge",
    "check_host_addr",
]
