"""The guest clock: parameters the kernel publishes, a stateless read in the guest (pvclock).

A guest reads time without a hypercall.  The kernel publishes, in the shared-info page, a
*base* (the guest's virtual ns at a host TSC value) and a *scale* (ns per TSC tick, as a 32.32
fixed-point multiplier); the guest's runtime reads the TSC with ``rdtsc`` (unicorn returns the
host's TSC) and computes::

    ns = system + ((tsc - tsc_timestamp) * mul >> 32)

as KVM's pvclock and Xen's vcpu_time_info do, and as RADclock argues for: the guest keeps no
clock state, so a save, a restore or a migration changes the parameters, never the guest's clock.
A ``version`` word is odd while the parameters change; the guest retries until it reads the same
even version before and after.  (The kernel writes them only while the vCPU is stopped, so a
guest never actually meets an odd version today; the protocol keeps it safe if that changes.)

Virtual time is the domain's host-monotonic age minus the time it spent paused (``HC_TIME``'s
definition since the start).  The guest never sees it go backwards: every publication starts at
no less than the largest value the guest could have read under the previous one (its *floor*:
the old parameters evaluated at the TSC when the vCPU last stopped).  Parameters are republished
when the guest was paused (the pause must not show), after a restore, and once a second (the
scale is recalibrated against CLOCK_MONOTONIC over an ever longer baseline, and the wall-clock
offset follows NTP).

Where the host TSC cannot be read from Python (no executable mapping allowed), the kernel
publishes nothing (``flags`` lacks ``CLOCK_F_TSC``) and the runtime falls back to ``HC_TIME``.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import time
from collections.abc import Callable
from typing import Final

from kernel import abi

log = logging.getLogger("isovisor.kernel")

#: rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE: Final = bytes.fromhex("0f3148c1e2204809d0c3")
#: Republish at least this often (s of host time), so scale and wall offset stay fresh.
REPUBLISH_NS: Final = 1_000_000_000
#: The first scale is measured over at least this long.
CALIBRATE_NS: Final = 20_000_000
_W_SH: Final = abi.SHARED_INFO_ADDR // 8
_U64: Final = (1 << 64) - 1


def _make_rdtsc() -> Callable[[], int] | None:
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError) as e:
        log.warning("guest clock: cannot map the TSC reader (%s); guests use HC_TIME", e)
        return None
    page.write(_RDTSC_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
    fn._page = page  # type: ignore[attr-defined]  # keeps the code mapped as long as fn lives
    return fn


class TscSource:
    """The host TSC and its scale against CLOCK_MONOTONIC (one per kernel process)."""

    def __init__(self) -> None:
        self.read = _make_rdtsc()
        self._lock = threading.Lock()
        self._base: tuple[int, int] = (0, 0)
        self._mul = 0
        if self.read is not None:
            self._base = self.pair()
            deadline = self._base[1] + CALIBRATE_NS
            while time.monotonic_ns() < deadline:
                time.sleep(CALIBRATE_NS / 4e9)
            self._mul = self._scale(self.pair())

    @property
    def available(self) -> bool:
        return self.read is not None

    def pair(self) -> tuple[int, int]:
        """(tsc, monotonic ns) read as close together as possible (best of three)."""
        read = self.read
        assert read is not None
        best: tuple[int, int, int] | None = None
        for _ in range(3):
            a = time.monotonic_ns()
            tsc = read()
            b = time.monotonic_ns()
            if best is None or b - a < best[0]:
                best = (b - a, tsc, (a + b) // 2)
        assert best is not None
        return best[1], best[2]

    def _scale(self, now: tuple[int, int]) -> int:
        dt = now[0] - self._base[0]
        dns = now[1] - self._base[1]
        return (dns << 32) // dt if dt > 0 and dns > 0 else self._mul

    def mul(self, now: tuple[int, int]) -> int:
        """ns per tick as 32.32 fixed point, measured from the kernel's start to ``now``."""
        with self._lock:
            self._mul = self._scale(now)
            return self._mul


def extrapolate(tsc: int, tsc_ts: int, system: int, mul: int) -> int:
    """The guest's reading at ``tsc`` under parameters (tsc_ts, system, mul)."""
    return system + ((tsc - tsc_ts) * mul >> 32) if tsc > tsc_ts else system


class GuestClock:
    """One domain's published clock parameters (the pCPU thread that runs it owns them)."""

    def __init__(self, words: memoryview, source: TscSource) -> None:
        self.w = words
        self.source = source
        self.tsc_ts = 0
        self.system = 0
        self.mul = 0
        self.published_at = 0  # host monotonic ns of the last publication (0: never)
        self.paused_total = -1  # the domain's paused_total_ns at that publication
        #: The guest may have read up to this: the next publication starts no lower.
        self.floor = 0
        self.epoch = 0  # restores and migrations so far (SH_CLOCK_EPOCH)
        self.stopped = False  # set CLOCK_F_STOPPED at the next publication

    def due(self, now_ns: int, paused_total: int) -> bool:
        return (
            self.paused_total != paused_total
            or now_ns - self.published_at >= REPUBLISH_NS
            or self.published_at == 0
        )

    def publish(self, vtime: Callable[[int], int], paused_total: int) -> None:
        """Publish fresh parameters (vCPU stopped).  ``vtime(mono_ns)`` is the domain's
        virtual time at a host monotonic time."""
        src = self.source
        if src.read is None:
            return
        tsc, mono = src.pair()
        system = max(vtime(mono), self.floor)
        mul = src.mul((tsc, mono))
        real, mono_now = time.time_ns(), time.monotonic_ns()
        wall = real - (mono_now - mono) - system  # the wall clock at guest time 0
        w = self.w
        sh = _W_SH
        version = w[sh + abi.SH_CLOCK_VERSION // 8]
        flags = abi.CLOCK_F_TSC | (w[sh + abi.SH_CLOCK_FLAGS // 8] & abi.CLOCK_F_STOPPED)
        if self.stopped:
            flags |= abi.CLOCK_F_STOPPED
            self.stopped = False
        odd = (version | 1) & _U64  # (the guest can write the word: it is only a counter)
        w[sh + abi.SH_CLOCK_VERSION // 8] = odd
        w[sh + abi.SH_CLOCK_TSC // 8] = tsc
        w[sh + abi.SH_CLOCK_SYSTEM // 8] = system & _U64
        w[sh + abi.SH_CLOCK_MUL // 8] = mul
        w[sh + abi.SH_CLOCK_WALL // 8] = max(wall, 0) & _U64
        w[sh + abi.SH_CLOCK_EPOCH // 8] = self.epoch & _U64
        w[sh + abi.SH_CLOCK_FLAGS // 8] = flags
        w[sh + abi.SH_CLOCK_VERSION // 8] = (odd + 1) & _U64
        self.tsc_ts, self.system, self.mul = tsc, system, mul
        self.published_at = mono
        self.paused_total = paused_total

    def stopped_running(self) -> None:
        """The vCPU just stopped: remember the most the guest can have read."""
        read = self.source.read
        if read is not None and self.published_at:
            self.floor = max(self.floor, extrapolate(read(), self.tsc_ts, self.system, self.mul))

    def now(self, vtime_now: int) -> int:
        """The guest's reading now (HC_TIME), from inside a hypercall."""
        read = self.source.read
        if read is None or not self.published_at:
            return max(vtime_now, self.floor)
        return extrapolate(read(), self.tsc_ts, self.system, self.mul)


_host: TscSource | None = None
_host_lock = threading.Lock()


def host_tsc() -> TscSource:
    """This process's TSC source (calibrated on first use, ~20 ms)."""
    global _host
    with _host_lock:
        if _host is None:
            _host = TscSource()
        return _host
