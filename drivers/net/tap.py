"""The net backend's uplink: a TAP interface inside a network namespace.

The switch's uplink port is a TAP device, ``tap`` (by default ``iv<driver>``), that lives in
the network namespace ``netns`` (by default ``isovisor-<driver>``, a name under /run/netns).  The
host side of the TAP has the address ``host_addr`` (default 198.18.0.1/15), so programs run in
that namespace (``ip netns exec isovisor-net0 ping 198.18.0.2``) reach the guests, and nothing
the guests send can reach any other network: the namespace has no other interface and no route
out.

How the backend gets at it (:meth:`Tap.open`):

1. ``ip netns add NETNS`` if the namespace does not exist; then a marker file
   ``/run/isovisor/netns/NETNS`` records that isovisor created it (so :func:`remove` deletes only
   namespaces isovisor made).
2. The calling *thread* enters the namespace (``setns(fd, CLONE_NEWNET)`` through ctypes; the
   other threads of the process, ZeroMQ's among them, stay where they are), opens
   ``/dev/net/tun`` there, and leaves again.  A TAP belongs to the namespace of the process
   that opened ``/dev/net/tun``.
3. ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI`` creates the TAP, or attaches to it if it exists
   already; ``TUNSETPERSIST 1`` keeps the device (and its address) when the descriptor closes,
   so a replacement instance of the driver attaches to the same TAP by name.  A TAP takes one
   descriptor at a time: a second open while one is attached fails with EBUSY.
4. ``ip -n NETNS addr replace HOST_ADDR dev TAP`` and ``ip -n NETNS link set TAP up``; IPv6 is
   switched off on the TAP (no router solicitations or MLD reports flooded to the guests).
5. The descriptor is non-blocking; the driver host polls it (the backend's ``fds()``).

A TAP's reads and writes are whole Ethernet frames (no packet-information header), at most the
TAP's MTU (1500) plus the 14-byte header.

Privileges: CAP_NET_ADMIN (create the TAP, configure it) and CAP_SYS_ADMIN (``setns``, ``ip
netns add``): in practice root.  :func:`privilege_problem` says exactly what is missing.

Clean-up: closing the backend keeps the TAP and the namespace (a restarted driver needs them).
:func:`remove` deletes both, the namespace only if isovisor created it: the backend's
``cleanup()`` calls it when the driver host gets ``["retire"]``, which the supervisor sends at
``isovisor down``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Final

TUN_DEVICE: Final = Path("/dev/net/tun")
NETNS_DIR: Final = Path("/run/netns")
#: ``<name>`` here: isovisor created network namespace ``<name>`` (remove() may delete it).
MARKER_DIR: Final = Path("/run/isovisor/netns")
TUNSETIFF: Final = 0x400454CA
TUNSETPERSIST: Final = 0x400454CB
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
CLONE_NEWNET: Final = 0x40000000
#: Interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL).
IFNAME_MAX: Final = 15
CAP_NET_ADMIN: Final = 12
CAP_SYS_ADMIN: Final = 21
#: Bytes asked of one read(): more than any frame a TAP with a 1500-byte MTU delivers.
READ_BYTES: Final = 65536
_IFNAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NETNS_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_IP_TIMEOUT_S: Final = 10.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class TapError(Exception):
    """The uplink cannot be set up or used; the message says why and what to do."""


def check_ifname(name: str, what: str = "tap") -> str:
    """``name`` if it can name a network interface, else ValueError saying why."""
    if not isinstance(name, str) or not _IFNAME_RE.match(name) or name in (".", ".."):
        raise ValueError(
            f"{what} must be an interface name of 1-{IFNAME_MAX} letters, digits, "
            f"'_', '.', '-', got {name!r}"
        )
    return name


def check_netns(name: str, what: str = "netns") -> str:
    """``name`` if it can name a network namespace under /run/netns, else ValueError."""
    if not isinstance(name, str) or not _NETNS_RE.match(name) or name in (".", ".."):
        raise ValueError(
            f"{what} must be a network namespace name of 1-64 letters, digits, "
            f"'_', '.', '-' (a file under {NETNS_DIR}), got {name!r}"
        )
    return name


def _capabilities() -> int:
    """This process's effective capability set (0 if it cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def privilege_problem() -> str | None:
    """What this process lacks to set up the uplink (one sentence naming each missing
    privilege or tool), or None if it has everything."""
    missing = []
    caps = _capabilities()
    if not caps >> CAP_NET_ADMIN & 1:
        missing.append("CAP_NET_ADMIN (to create and configure a TAP device: run as root)")
    if not caps >> CAP_SYS_ADMIN & 1:
        missing.append("CAP_SYS_ADMIN (to create and enter a network namespace: run as root)")
    if not TUN_DEVICE.exists():
        missing.append(f"{TUN_DEVICE} (the TUN/TAP driver: modprobe tun)")
    elif not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
        missing.append(f"read-write access to {TUN_DEVICE}")
    if shutil.which("ip") is None:
        missing.append("the `ip` command (iproute2)")
    if not missing:
        return None
    return "missing " + "; ".join(missing)


def _ip(*args: str) -> None:
    """Run ``ip ARGS``; TapError with its message if it fails."""
    cmd = ["ip", *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TapError(f"`{' '.join(cmd)}` could not run: {e}") from e
    if r.returncode != 0:
        raise TapError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")


def set_neighbors(netns: str, tap: str, add: list[tuple[str, str]], remove: list[str]) -> list[str]:
    """Make the host side know each guest's MAC for good: a permanent neighbour entry
    ``ip -> mac`` on ``tap`` for each of ``add``, none for each ip of ``remove``.  A TAP whose
    last reader goes (a killed switch) loses carrier, and the kernel then flushes its learnt
    entries; the host's next ARP request could go out before the replacement reads the TAP, and
    the retry comes a second later.  Permanent entries survive that.  Errors, as phrases (the
    uplink works without the entries, with ARP)."""
    errors = []
    for ip, mac in add:
        try:
            _ip("-n", netns, "neigh", "replace", ip, "lladdr", mac, "dev", tap, "nud", "permanent")
        except TapError as e:
            errors.append(str(e))
    for ip in remove:
        with contextlib.suppress(TapError):
            _ip("-n", netns, "neigh", "del", ip, "dev", tap)
    return errors


def netns_exists(netns: str) -> bool:
    return (NETNS_DIR / netns).exists()


def ensure_netns(netns: str) -> bool:
    """Create network namespace ``netns`` unless it exists; True if this call created it
    (and left the marker that lets :func:`remove` delete it)."""
    check_netns(netns)
    if netns_exists(netns):
        return False
    try:
        _ip("netns", "add", netns)
    except TapError:
        if netns_exists(netns):  # another process made it meanwhile
            return False
        raise
    with contextlib.suppress(OSError):
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        (MARKER_DIR / netns).write_text(f"created by isovisor (pid {os.getpid()})\n")
    return True


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise TapError(
            f"setns(CLONE_NEWNET) into {what} failed: {os.strerror(err)} (needs CAP_SYS_ADMIN)"
        )


@contextlib.contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Run the body with the calling thread (only it) inside network namespace ``netns``.
    Sockets and TAP devices created meanwhile belong to ``netns`` for good."""
    path = NETNS_DIR / netns
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(f"cannot open network namespace {path}: {e.strerror}") from None
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.close(target)
        raise TapError(f"cannot open this thread's network namespace: {e.strerror}") from None
    try:
        _setns(target, f"network namespace {netns}")
        try:
            yield
        finally:
            _setns(own, "this thread's own network namespace")
    finally:
        os.close(target)
        os.close(own)


def _tunsetiff(fd: int, name: str) -> None:
    ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
    fcntl.ioctl(fd, TUNSETIFF, ifr)


class Tap:
    """An open TAP device (see the module docstring)."""

    def __init__(self, name: str, netns: str, fd: int) -> None:
        self.name = name
        self.netns = netns
        self._fd: int | None = fd

    def __repr__(self) -> str:
        return f"Tap({self.name!r} in netns {self.netns!r}, fd {self._fd})"

    @classmethod
    def open(cls, name: str, netns: str, host_addr: str) -> tuple[Tap, bool]:
        """Create or re-attach TAP ``name`` in ``netns`` (made if missing), give it
        ``host_addr`` and bring it up.  Returns the Tap and whether the namespace was created
        now.  TapError says what failed."""
        check_ifname(name)
        created = ensure_netns(netns)
        with in_netns(netns):
            try:
                fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise TapError(f"cannot open {TUN_DEVICE}: {e.strerror}") from None
            try:
                _tunsetiff(fd, name)
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.EBUSY:
                    raise TapError(
                        f"TAP {name} in network namespace {netns} is held by "
                        "another process (another instance of this driver still "
                        "running?)"
                    ) from None
                raise TapError(
                    f"cannot create or attach TAP {name} in network namespace "
                    f"{netns}: {e.strerror} (is {name} there already, but not a "
                    "TAP?)"
                ) from None
            with contextlib.suppress(OSError):  # no IPv6 chatter flooded to the guests
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        tap = cls(name, netns, fd)
        try:
            _ip("-n", netns, "addr", "replace", host_addr, "dev", name)
            _ip("-n", netns, "link", "set", name, "up")
        except TapError:
            tap.close()
            raise
        return tap, created

    def fileno(self) -> int:
        if self._fd is None:
            raise TapError(f"TAP {self.name} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def read_frames(self, limit: int) -> list[bytes]:
        """Up to ``limit`` frames that are waiting (none if nothing is); TapError if the
        device fails."""
        fd = self.fileno()
        out: list[bytes] = []
        while len(out) < limit:
            try:
                out.append(os.read(fd, READ_BYTES))
            except BlockingIOError:
                break
            except OSError as e:
                if out:
                    break
                raise TapError(f"reading TAP {self.name}: {e.strerror}") from None
        return out

    def write(self, frame: bytes) -> str | None:
        """Send one frame to the host side; None if it went, else why it was dropped (the
        TAP's queue is full, or the interface is down)."""
        try:
            os.write(self.fileno(), frame)
        except BlockingIOError:
            return "the TAP's queue is full"
        except OSError as e:
            return f"{e.strerror} writing TAP {self.name}"
        return None

    def close(self) -> None:
        """Let go of the device: it stays (persistent), with its address, for the next
        instance."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def destroy(self) -> None:
        """Make the device non-persistent and close it, which deletes it."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._fd, TUNSETPERSIST, 0)
        self.close()


def delete_tap(netns: str, name: str) -> bool:
    """Delete interface ``name`` in ``netns`` if it is there; True if it was."""
    if not netns_exists(netns) or not _link_exists(netns, name):
        return False
    _ip("-n", netns, "link", "del", name)
    return True


def delete_netns(netns: str) -> bool:
    """Delete network namespace ``netns`` (and isovisor's marker for it); True if it was
    there."""
    (MARKER_DIR / netns).unlink(missing_ok=True)
    if not netns_exists(netns):
        return False
    _ip("netns", "del", netns)
    return True


def remove(netns: str, tap: str) -> list[str]:
    """Delete TAP ``tap`` in ``netns``, and ``netns`` itself if isovisor created it (its marker
    is there); what was removed, as phrases for a log.  Missing pieces are no error; a piece
    that exists but cannot be removed is a TapError.  For ``isovisor down``, once the driver
    processes are gone (a TAP that a live process holds is deleted all the same)."""
    check_netns(netns)
    check_ifname(tap)
    done: list[str] = []
    if delete_tap(netns, tap):
        done.append(f"TAP {tap} in network namespace {netns}")
    if (MARKER_DIR / netns).exists() and delete_netns(netns):
        done.append(f"network namespace {netns}")
    (MARKER_DIR / netns).unlink(missing_ok=True)
    return done


def _link_exists(netns: str, name: str) -> bool:
    try:
        r = subprocess.run(
            ["ip", "-n", netns, "link", "show", "dev", name],
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TapError(f"`ip -n {netns} link show dev {name}` could not run: {e}") from e
    return r.returncode == 0


def link_mac(netns: str, name: str) -> str:
    """The MAC address of interface ``name`` in ``netns`` (``xx:xx:...``)."""
    r = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show", "dev", name],
        capture_output=True,
        text=True,
        timeout=_IP_TIMEOUT_S,
        check=False,
    )
    m = re.search(r"link/ether ([0-9a-f:]{17})", r.stdout)
    if r.returncode != 0 or m is None:
        raise TapError(
            f"cannot read the MAC of {name} in network namespace {netns}: "
            f"{(r.stderr or r.stdout).strip()}"
        )
    return m.group(1)
