"""Save a paused domain into snapshot sections, and check sections before a restore.

:func:`capture` reads a domain that is paused and off every pCPU: its registers (and those an
upcall interrupted), its scheduler state (pending events, a poll or block it sleeps in with the
time left, watchdog, upcall handler), the guest clock's reading, RAM (pages that are all zero
are not stored: a page the guest never wrote is zero), and the console's history and position.
:class:`Restored` is the checked form of those sections: every field is validated before the
kernel creates anything, so a restore that fails creates nothing.  ``kernel/snapfile.py`` is the
file format; ``docs/snapshots.md`` describes both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import devices as registry
from domains.config import DomainConfig
from ipc.schema import ConfigError
from ipc.shm import room_for
from kernel import abi
from kernel.dirty import nonzero_pages
from kernel.memory import GuestMemory
from kernel.snapfile import PagesRef, SnapshotError, field
from kernel.uffd import UffdError
from kernel.vcpu import FIXED_REGISTERS, SAVED_REGISTERS, read_registers, write_registers

if TYPE_CHECKING:
    from kernel.domain import Domain
    from kernel.paging import Fill, Pager

log = logging.getLogger("isovisor.kernel")


def page_runs(address: int, size: int) -> list[list[int]]:
    """[first page, count] for every run of pages of guest RAM (at host ``address``) that are
    not all zero; page 0, the NULL guard, is never stored.  Compared with ``memcmp`` against
    zeroes (kernel/dirty.py), no copies."""
    runs: list[list[int]] = []
    for p in nonzero_pages(address, size):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return runs


def page_chunks(buf: Any, runs: list[list[int]]) -> Iterator[bytes]:
    page = abi.PAGE_SIZE
    for first, count in runs:
        yield buf[first * page : (first + count) * page]


def capture(dom: Domain, origin: str) -> dict[str, Any]:
    """Every section but ``pages`` (see :func:`page_chunks`) and ``memory``'s runs, of a
    domain paused and off-CPU.  The caller holds the scheduler's lock."""
    now = time.monotonic_ns()
    vcpu = dom.vcpu
    uc = vcpu.uc
    assert uc is not None and dom.paused and not dom.on_cpu
    upcall: dict[str, Any] | None = None
    if dom._upcall_saved is not None:
        ctx, block = dom._upcall_saved
        current = uc.context_save()
        uc.context_restore(ctx)
        upcall = {"registers": read_registers(uc), "block": block}
        uc.context_restore(current)
    paused_at = dom.paused_since or now
    guest_ns = max(dom.vtime_ns(now), dom.clock.floor)
    return {
        "domain": {
            "config": dom.config.to_wire(),
            "name": dom.name,
            "domid": dom.domid,
            "origin": origin,
            "saved_at": time.time_ns(),
            "abi": abi.ABI_VERSION,
            "restarts": dom.restarts,
        },
        "vcpu": {"registers": vcpu.registers()},
        "sched": {
            "pending": dom.pending,
            "polling": dom.polling,
            "blocking": dom.blocking,
            "runnable": dom.runnable,
            "poll_mask": dom.poll_mask,
            # virtual ns left of a poll's timeout (timers stop while the domain is paused)
            "wake_in": None if dom.wake_at is None else max(0, dom.wake_at - paused_at),
            "watchdog_ns": dom.watchdog_ns,
            "watchdog_left": (
                max(0, dom.watchdog_deadline - dom.vtime_ns(now)) if dom.watchdog_deadline else 0
            ),
            "upcall_handler": dom.upcall_handler,
            "in_upcall": dom.in_upcall,
            "upcall_return": dom._upcall_return,
            "upcall": upcall,
            "cpu_ns": dom.cpu_ns,
            "upcalls": dom.upcalls,
            "bad_calls": dom.bad_calls,
        },
        "clock": {"guest_ns": guest_ns, "epoch": dom.clock.epoch, "wall_ns": time.time_ns()},
        "memory": {"bytes": dom.mem.size, "page": abi.PAGE_SIZE},
        "console": dict(zip(("start", "data"), dom.console_history(), strict=True)),
        "devices": [],
    }


@dataclass
class Restored:
    """A snapshot's sections, checked: what the kernel needs to rebuild the domain."""

    config: DomainConfig
    origin: str
    restarts: int
    registers: dict[str, Any]
    sched: dict[str, Any]
    upcall: dict[str, Any] | None
    guest_ns: int
    epoch: int
    runs: list[tuple[int, int]]
    pages: bytes | memoryview | PagesRef
    console_start: int
    console: bytes
    #: Each device's class, vdev, region bytes and frontend store nodes (``devices``).
    devices: list[dict[str, Any]]
    #: RAM already filled (a migration's reception); the domain takes it and sets this None.
    memory: GuestMemory | None = None
    #: Memory disks' data received with the migration (--with-disks), by vdev: files in
    #: /dev/shm that become the new devices' media.
    media: dict[str, Path] = dc_field(default_factory=dict)
    #: When the restore (or the migration's commit) began, host monotonic ns.
    started_ns: int = 0
    #: The pager to fill RAM lazily (``[kernel] restore = "lazy"``); None: fill it first.
    pager: Pager | None = None
    #: The lazy fill under way, once :meth:`take_memory` started it.
    fill: Fill | None = None

    @classmethod
    def check(cls, s: dict[str, Any], where: str) -> Restored:
        """Validate every section (a SnapshotError names the section and the problem)."""
        abi_version = field(s, "domain", "abi", int)
        if abi_version != abi.ABI_VERSION:
            raise SnapshotError(
                f"{where}: the guest was saved under guest ABI version {abi_version}; this "
                f"kernel runs version {abi.ABI_VERSION}"
            )
        try:
            config = DomainConfig.from_wire(field(s, "domain", "config", dict))
        except ConfigError as e:
            raise SnapshotError(f"{where}: section 'domain': its config is invalid: {e}") from None
        registers = _registers(field(s, "vcpu", "registers", dict), "vcpu", where)
        sched = s["sched"]
        if not isinstance(sched, dict):
            raise SnapshotError(f"{where}: section 'sched' is not a map")
        for key in ("pending", "poll_mask", "watchdog_ns", "watchdog_left", "upcall_handler"):
            v = field(s, "sched", key, int)
            if not 0 <= v < 1 << 64:
                raise SnapshotError(f"{where}: section 'sched': {key} = {v} is out of range")
        for key in ("polling", "blocking", "runnable", "in_upcall", "upcall_return"):
            field(s, "sched", key, bool)
        for key in ("cpu_ns", "upcalls", "bad_calls"):  # counters, absent in older files
            v = sched.setdefault(key, 0)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 62:
                raise SnapshotError(f"{where}: section 'sched': {key} = {v!r:.40} is invalid")
        wake_in = sched.get("wake_in")
        if wake_in is not None and (not isinstance(wake_in, int) or wake_in < 0):
            raise SnapshotError(f"{where}: section 'sched': wake_in = {wake_in!r} is invalid")
        upcall = sched.get("upcall")
        if upcall is not None:
            if not isinstance(upcall, dict) or not isinstance(upcall.get("block"), bytes):
                raise SnapshotError(f"{where}: section 'sched': the upcall state is malformed")
            if len(upcall["block"]) != abi.HCALL_BLOCK_SIZE:
                raise SnapshotError(
                    f"{where}: section 'sched': the saved hypercall block is "
                    f"{len(upcall['block'])} bytes, not {abi.HCALL_BLOCK_SIZE}"
                )
            _registers(upcall.get("registers"), "sched (upcall registers)", where)
        size = field(s, "memory", "bytes", int)
        if size != config.memory * 1024 * 1024:
            raise SnapshotError(
                f"{where}: section 'memory' says {size} bytes of RAM; the config says "
                f"{config.memory} MiB"
            )
        if field(s, "memory", "page", int) != abi.PAGE_SIZE:
            raise SnapshotError(f"{where}: section 'memory': page size is not {abi.PAGE_SIZE}")
        runs = _runs(field(s, "memory", "runs", list), size, where)
        pages = s["pages"]
        stored = sum(n for _, n in runs) * abi.PAGE_SIZE
        if len(pages) != stored:
            raise SnapshotError(
                f"{where}: section 'pages' holds {len(pages)} bytes; section 'memory' lists "
                f"{stored // abi.PAGE_SIZE} pages ({stored} bytes)"
            )
        data = field(s, "console", "data", bytes)
        start = _bounded(s, "console", "start", 1 << 62, where)
        saved_devices = _devices(s["devices"], config, where)
        return cls(
            config=config,
            origin=str(s["domain"].get("origin", "")),
            restarts=max(0, int(s["domain"].get("restarts", 0) or 0)),
            registers=registers,
            sched=sched,
            upcall=upcall,
            guest_ns=_bounded(s, "clock", "guest_ns", 1 << 62, where),
            epoch=_bounded(s, "clock", "epoch", 1 << 32, where),
            runs=runs,
            pages=pages,
            console_start=start,
            console=data,
            devices=saved_devices,
        )

    def take_memory(self, shm_name: str, size: int) -> GuestMemory:
        """The domain's RAM: the reception's; or a new segment the pager fills while the guest
        runs (``pager`` set, ``fill`` then set too); or one filled with the stored pages."""
        if self.memory is not None:
            mem, self.memory = self.memory, None
            return mem
        # Reserving a big segment's pages takes ~0.4 ms per MiB: with room to spare it is done
        # behind the guest's back, so the restore waits only for the stored pages (or, lazy,
        # for none of them: the reservation then waits for the fill, see Hypervisor.restore).
        later = room_for(size)
        mem = GuestMemory(shm_name, size, reserve_later=later)
        try:
            if later and self.pager is not None and isinstance(self.pages, PagesRef):
                try:
                    self.fill = self.pager.fill(mem, self.pages, self.runs)
                    return mem
                except (UffdError, OSError) as e:
                    log.warning("lazy restore unavailable (%s): reading the pages first", e)
            self.fill_now(mem)
        except BaseException:
            mem.close()
            raise
        if later:
            mem.segment.reserve_in_background()
        return mem

    def fill_now(self, mem: GuestMemory) -> None:
        """Write the stored pages into fresh (zeroed) guest RAM: with ``write`` into its
        shared-memory file rather than through the mapping, so the pages are allocated in
        the host kernel without a fault each; read from the snapshot file as they go (and
        checked: SnapshotError if they fail their checksum) when ``pages`` is a reference."""
        page = abi.PAGE_SIZE
        pages = self.pages
        chunks = pages.chunks() if isinstance(pages, PagesRef) else iter((memoryview(pages),))
        fd = os.open(mem.segment.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            runs = iter(self.runs)
            at, left = 0, 0  # where the current run goes on in RAM, bytes of it left
            for chunk in chunks:
                while chunk:
                    if not left:
                        first, count = next(runs)
                        at, left = first * page, count * page
                    n = os.pwrite(fd, chunk[: min(left, len(chunk))], at)
                    chunk, at, left = chunk[n:], at + n, left - n
        finally:
            os.close(fd)

    def load_vcpu(self, dom: Domain) -> None:
        """Registers, and the context an upcall interrupted (vCPU not yet run)."""
        uc = dom.vcpu.uc
        assert uc is not None
        if self.upcall is not None:
            write_registers(uc, self.upcall["registers"])
            dom._upcall_saved = (uc.context_save(), self.upcall["block"])
        dom.vcpu.load_registers(self.registers)


def _registers(regs: Any, section: str, where: str) -> dict[str, Any]:
    if not isinstance(regs, dict):
        raise SnapshotError(f"{where}: section {section!r}: the registers are not a map")
    missing = [r for r in (*SAVED_REGISTERS, *FIXED_REGISTERS) if r not in regs]
    if missing:
        raise SnapshotError(
            f"{where}: section {section!r}: registers missing: {', '.join(missing)}"
        )
    for name in SAVED_REGISTERS:
        v = regs[name]
        ok = (
            isinstance(v, bytes) and len(v) == 16
            if name.startswith("XMM")
            else isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)
            if name.startswith("FP") and name[2:].isdigit()
            else isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64
        )
        if not ok:
            raise SnapshotError(
                f"{where}: section {section!r}: register {name} = {v!r:.60} is malformed"
            )
    return regs


def _bounded(s: dict[str, Any], section: str, key: str, limit: int, where: str) -> int:
    v: int = field(s, section, key, int)
    if not 0 <= v < limit:
        raise SnapshotError(f"{where}: section {section!r}: {key} = {v} is out of range")
    return v


def _devices(raw: Any, config: DomainConfig, where: str) -> list[dict[str, Any]]:
    """The ``devices`` section, checked against the config: one entry per device, its region
    the size its class's region has, its frontend nodes strings."""
    if not isinstance(raw, list):
        raise SnapshotError(f"{where}: section 'devices' is not a list")
    want = {d.vdev: registry.of_spec(d) for d in config.devices}
    got: dict[str, dict[str, Any]] = {}
    for i, d in enumerate(raw):
        here = f"{where}: section 'devices' entry {i}"
        if not isinstance(d, dict) or not isinstance(d.get("vdev"), str):
            raise SnapshotError(f"{here} is malformed")
        cls = want.get(d["vdev"])
        if cls is None or d.get("class") != cls.name:
            raise SnapshotError(
                f"{here}: {d.get('class')} {d['vdev']} is not a device of the domain's config"
            )
        region, fe = d.get("region"), d.get("frontend")
        if not isinstance(region, bytes) or len(region) != cls.region.segment_bytes:
            raise SnapshotError(
                f"{here}: the region of {d['vdev']} is not {cls.region.segment_bytes} bytes"
            )
        if not isinstance(fe, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in fe.items()
        ):
            raise SnapshotError(f"{here}: the frontend nodes of {d['vdev']} are malformed")
        if "medium" in d:
            _medium(d["medium"], f"{here}: the memory disk data of {d['vdev']}")
        got[d["vdev"]] = d
    missing = sorted(set(want) - set(got))
    if missing:
        raise SnapshotError(f"{where}: section 'devices' lacks {', '.join(missing)}")
    return list(got.values())


def _medium(m: Any, what: str) -> None:
    """A memory disk's data in the ``devices`` section: its size, block runs in order inside
    it, and their bytes (the last block may be short)."""
    block = 4096
    if not isinstance(m, dict) or not isinstance(m.get("data"), bytes):
        raise SnapshotError(f"{what} is malformed")
    size, runs = m.get("bytes"), m.get("runs")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= 1 << 44:
        raise SnapshotError(f"{what}: its size {size!r} is out of range")
    if not isinstance(runs, list):
        raise SnapshotError(f"{what}: its runs are not a list")
    end, total = 0, 0
    for r in runs:
        if not (
            isinstance(r, list)
            and len(r) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            and r[0] >= end
            and r[1] >= 1
            and (r[0] + r[1] - 1) * block < size
        ):
            raise SnapshotError(
                f"{what}: block run {r!r:.40} is malformed, out of order or "
                f"outside its {size} bytes"
            )
        end = r[0] + r[1]
        total += min(r[1] * block, size - r[0] * block)
    if len(m["data"]) != total:
        raise SnapshotError(f"{what}: {len(m['data'])} bytes where its runs hold {total}")


def _runs(raw: list[Any], size: int, where: str) -> list[tuple[int, int]]:
    pages = size // abi.PAGE_SIZE
    runs: list[tuple[int, int]] = []
    end = 1  # page 0 (the NULL guard) is never stored
    for r in raw:
        if not (
            isinstance(r, list)
            and len(r) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        ):
            raise SnapshotError(f"{where}: section 'memory': page run {r!r:.60} is malformed")
        first, count = r
        if first < end or count < 1 or first + count > pages:
            raise SnapshotError(
                f"{where}: section 'memory': page run {first}+{count} overlaps another, is "
                f"out of order, or lies outside the domain's {pages} pages"
            )
        runs.append((first, count))
        end = first + count
    return runs
