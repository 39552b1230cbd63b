"""A domain: one guest's RAM, vCPU, console, clocks and hypercall handlers.

Threading: a domain's guest code and hypercall handlers run on whichever pCPU thread the
scheduler gave it (never two at once).  Fields the scheduler reads or writes from other threads
(``runnable``, ``on_cpu``, ``paused``, ``action``, ...) are only touched under the scheduler's
lock; the console history has its own small lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from unicorn.x86_const import UC_X86_REG_RDI, UC_X86_REG_RIP, UC_X86_REG_RSP

from domains.config import DomainConfig
from ipc import iotrace
from ipc.iotrace import Stage
from ipc.store import StoreError
from kernel import abi
from kernel.clock import GuestClock, host_tsc
from kernel.memory import GuestMemory
from kernel.vcpu import VCpu

if TYPE_CHECKING:
    from kernel.devices import Device, DeviceManager
    from kernel.saverestore import Restored
    from kernel.scheduler import Scheduler

log = logging.getLogger("isovisor.kernel")

U64: Final = 0xFFFF_FFFF_FFFF_FFFF
CONSOLE_HISTORY_BYTES: Final = 64 * 1024
_W_NR: Final = (abi.HCALL_BLOCK_ADDR + abi.HB_NR) // 8
_W_ARG0: Final = (abi.HCALL_BLOCK_ADDR + abi.HB_ARGS) // 8
_W_RET: Final = (abi.HCALL_BLOCK_ADDR + abi.HB_RET) // 8
_W_SH: Final = abi.SHARED_INFO_ADDR // 8
_W_UPCALL_MASK: Final = _W_SH + abi.SH_UPCALL_MASK // 8
_W_PENDING: Final = _W_SH + abi.SH_PENDING // 8
_W_UPCALLS: Final = _W_SH + abi.SH_UPCALLS // 8
#: How many bad hypercalls per domain are logged in full before logging is thinned out.
_BAD_CALLS_LOGGED: Final = 20
#: Bytes below the interrupted rsp that an upcall frame skips (the SysV red zone).
_RED_ZONE: Final = 128
#: Length of the ``syscall`` instruction (0F 05).
_SYSCALL_LEN: Final = 2
#: A hypercall handler returning this leaves the result word alone (HC_UPCALL_RETURN).
NO_RESULT: Final = object()


class ImageError(Exception):
    """The guest image cannot be loaded into the domain."""


@dataclass(frozen=True)
class Exit:
    """Why a domain stopped running for good: ``kind`` is destroy, poweroff, reboot or crash."""

    kind: str
    reason: str
    code: int = 0


Emit = Callable[[str, dict[str, Any]], None]


class Domain:
    def __init__(
        self,
        domid: int,
        config: DomainConfig,
        shm_name: str,
        sched: Scheduler,
        emit: Emit,
        restarts: int = 0,
        restore: Restored | None = None,
    ) -> None:
        """A new domain booting its image, or (``restore``) one resuming from a snapshot."""
        self.domid = domid
        self.config = config
        self.name = config.name
        self.sched = sched
        self.emit = emit
        self.restarts = restarts
        mem_bytes = config.memory * 1024 * 1024
        image = _read_image(config) if restore is None else b""
        room = mem_bytes - abi.IMAGE_BASE - abi.MIN_STACK_BYTES
        if len(image) > room:
            need = -(-(len(image) + abi.IMAGE_BASE + abi.MIN_STACK_BYTES) // (1024 * 1024))
            raise ImageError(
                f"image {config.image_path} ({len(image)} bytes) does not fit in domain "
                f"{config.name!r} with memory = {config.memory} MiB: it needs at least {need} "
                f"MiB (image at {abi.IMAGE_BASE:#x} plus {abi.MIN_STACK_BYTES // 1024} KiB of "
                f"stack); raise 'memory' in {config.source}"
            )
        if restore is None:
            self.mem = GuestMemory(shm_name, mem_bytes)
        else:
            self.mem = restore.take_memory(shm_name, mem_bytes)
        #: A lazy restore's fill under way (kernel/paging.py).  Until the pager has put in and
        #: checked every stored page, the guest runs but its hypercalls wait (``checking``).
        self.filling = restore.fill if restore is not None else None
        try:
            if restore is None:
                self.mem.write(abi.IMAGE_BASE, image)
                self._write_start_info(len(image))
            self.vcpu = VCpu(self.mem, abi.IMAGE_BASE, self.hypercall)
        except BaseException:
            if self.filling is not None:
                self.filling.cancel()
            self.mem.close()
            raise
        self._w = self.mem.words
        # clocks (host CLOCK_MONOTONIC ns)
        self.created_ns = time.monotonic_ns()
        self.paused_total_ns = 0
        self.paused_since: int | None = None
        self.cpu_ns = 0
        self.clock = GuestClock(self.mem.words, host_tsc())
        #: A restore or migration: when it began, and when the vCPU first ran (host ns).
        self.resume_from_ns = 0
        self.first_run_ns = 0
        # scheduler state (guarded by sched.lock)
        #: The CPU cap in force: the config's, or a migration's throttle (Scheduler.set_cap).
        self.cap = config.cap
        self.runnable = True
        self.on_cpu = False
        self.paused = False
        self.action: Exit | None = None
        self.vruntime = 0
        self.budget_ns = 0
        self.wake_at: int | None = None
        self.poll_mask = 0
        self.polling = False
        self.pending = 0
        #: The pages are still being checked (a lazy restore): a hypercall holds the domain.
        self.checking = self.filling is not None
        self.held = False  # off the run queue until the check ends (Scheduler.hold)
        self.watchdog_ns = 0  # timeout; 0 = disarmed
        self.watchdog_deadline = 0  # virtual ns
        # end of life
        self.exit: Exit | None = None  # set when the domain has stopped for good
        self.exited_ns = 0  # host time of that stop: uptime ends there
        self.gone = threading.Event()  # set once torn down, or once preserved
        self.preserved = False  # stopped for good, RAM kept until `destroy`
        self.announced = False  # its "created" event went out (Hypervisor._bring_up)
        self.torn_down = False
        self._teardown_lock = threading.Lock()
        #: Held by a save or a migration while it reads RAM from its own thread; teardown
        #: takes it before RAM is unmapped (the domain may end on its own meanwhile).
        self.mem_lock = threading.Lock()
        # console
        self._console_lock = threading.Lock()
        self._console = bytearray()
        self._console_end = 0  # total bytes ever written
        self.bad_calls = 0
        # devices and upcalls
        self.devices: dict[int, Device] = {}  # by port
        self.device_manager: DeviceManager | None = None
        self.upcall_handler = 0
        self.in_upcall = False
        self.blocking = False  # in HC_BLOCK (guarded by sched.lock)
        self.upcalls = 0
        self._upcall_saved: tuple[Any, bytes] | None = None
        #: A context object to save the next upcall's interrupted state into.
        self._spare_ctx: Any = None
        self._upcall_return = False
        self._handlers: tuple[Callable[[], Any] | None, ...] = (
            None,
            self._hc_console_write,
            self._hc_yield,
            self._hc_poll,
            self._hc_time,
            self._hc_shutdown,
            self._hc_watchdog,
            self._hc_set_upcall,
            self._hc_upcall_return,
            self._hc_block,
            self._hc_evtchn_send,
            self._hc_store_read,
            self._hc_store_write,
            self._hc_device_fault,
            self._hc_device_held,
        )
        assert len(self._handlers) == abi.HC_COUNT
        if restore is not None:
            try:
                self._resume_from(restore)
            except BaseException:
                self.vcpu.close()
                self.mem.close()
                raise

    def _resume_from(self, r: Restored) -> None:
        """Registers, scheduler state, clock and console of a snapshot (see
        kernel/saverestore.py); the caller arms a poll's timer once the scheduler has us."""
        r.load_vcpu(self)
        s = r.sched
        self.pending, self.poll_mask = s["pending"], s["poll_mask"]
        self.polling, self.blocking, self.runnable = s["polling"], s["blocking"], s["runnable"]
        self.upcall_handler, self.in_upcall = s["upcall_handler"], s["in_upcall"]
        self._upcall_return = s["upcall_return"]
        self.cpu_ns, self.upcalls, self.bad_calls = s["cpu_ns"], s["upcalls"], s["bad_calls"]
        # the guest's clock goes on from its reading at the save: paused time is not its time
        self.created_ns = time.monotonic_ns() - r.guest_ns
        self.watchdog_ns = s["watchdog_ns"]
        self.watchdog_deadline = r.guest_ns + s["watchdog_left"] if s["watchdog_ns"] else 0
        self.clock.floor = r.guest_ns
        self.clock.epoch = r.epoch + 1
        self.clock.stopped = True
        self._console = bytearray(r.console)
        self._console_end = r.console_start + len(r.console)

    # -- set-up --------------------------------------------------------------------------------
    def _write_start_info(self, image_size: int) -> None:
        w = self.mem.words
        base = abi.START_INFO_ADDR // 8
        for off, val in (
            (abi.SI_MAGIC, abi.START_INFO_MAGIC),
            (abi.SI_ABI_VERSION, abi.ABI_VERSION),
            (abi.SI_DOMID, self.domid),
            (abi.SI_MEM_BYTES, self.mem.size),
            (abi.SI_IMAGE_BASE, abi.IMAGE_BASE),
            (abi.SI_IMAGE_SIZE, image_size),
            (abi.SI_STACK_TOP, self.mem.size),
            (abi.SI_HCALL_BLOCK, abi.HCALL_BLOCK_ADDR),
        ):
            w[base + off // 8] = val
        name = self.name.encode()[: abi.SI_NAME_MAX - 1] + b"\0"
        self.mem.write(abi.START_INFO_ADDR + abi.SI_NAME, name)
        self.mem.write(abi.START_INFO_ADDR + abi.SI_CMDLINE, self.config.extra.encode() + b"\0")

    # -- clocks --------------------------------------------------------------------------------
    def vtime_ns(self, now: int | None = None) -> int:
        """Virtual time: host monotonic time since creation, minus time spent paused."""
        now = time.monotonic_ns() if now is None else now
        paused = self.paused_total_ns + (now - self.paused_since if self.paused_since else 0)
        return now - self.created_ns - paused

    # -- hypercalls (pCPU thread, inside emu_start) ---------------------------------------------
    def hypercall(self, _uc: Any, _data: Any) -> None:
        w = self._w
        nr = w[_W_NR]
        if nr == abi.HC_NULL:
            w[_W_RET] = 0
            return
        if self.checking and self.sched.hold(self):
            return  # redone when the pages are checked (a corrupt snapshot: never)
        handler = self._handlers[nr] if nr < abi.HC_COUNT else None
        if handler is None:
            self.bad_call(f"unknown hypercall number {nr}", -abi.ENOSYS)
            return
        try:
            ret = handler()
        except Exception as e:  # a kernel bug must end this guest, not the kernel
            log.exception("domain %s: internal error in hypercall %d", self.name, nr)
            self.sched.request_exit(
                self,
                Exit("crash", f"kernel error in hypercall {abi.HYPERCALL_NAMES.get(nr, nr)}: {e}"),
            )
            ret = -abi.EINVAL
        if ret is not NO_RESULT:
            w[_W_RET] = ret & U64

    def arg(self, i: int) -> int:
        return self._w[_W_ARG0 + i]

    def bad_call(self, what: str, ret: int) -> int:
        """Answer a bad hypercall with an error; log it (thinned out after a while)."""
        self.bad_calls += 1
        n = self.bad_calls
        if n <= _BAD_CALLS_LOGGED or n % 1000 == 0:
            log.warning(
                "domain %s (id %d): %s -> returned %d%s",
                self.name,
                self.domid,
                what,
                ret,
                " (further ones logged every 1000th)" if n == _BAD_CALLS_LOGGED else "",
            )
        self._w[_W_RET] = ret & U64
        return ret

    def _hc_console_write(self) -> int:
        ptr, length = self.arg(0), self.arg(1)
        if length > abi.CONSOLE_WRITE_MAX:
            return self.bad_call(
                f"console_write of {length} bytes exceeds the maximum of "
                f"{abi.CONSOLE_WRITE_MAX} per call",
                -abi.EMSGSIZE,
            )
        if not self.mem.check(ptr, length):
            return self.bad_call(
                f"console_write buffer {ptr:#x}+{length} is outside guest RAM", -abi.EFAULT
            )
        data = bytes(self.mem.bytes[ptr : ptr + length])
        self.console_append(data)
        return length

    def _hc_yield(self) -> int:
        self.vcpu.stop()
        return 0

    def _hc_poll(self) -> int:
        mask, timeout = self.arg(0), self.arg(1)
        return self.sched.poll(self, mask, timeout)

    def _hc_time(self) -> int:
        return self.clock.now(self.vtime_ns())

    def _hc_shutdown(self) -> int:
        reason, code = self.arg(0), self.arg(1)
        kinds = {
            abi.SHUTDOWN_POWEROFF: "poweroff",
            abi.SHUTDOWN_REBOOT: "reboot",
            abi.SHUTDOWN_CRASH: "crash",
        }
        kind = kinds.get(reason)
        if kind is None:
            return self.bad_call(
                f"shutdown with unknown reason {reason} (0 poweroff, 1 reboot, 2 crash)",
                -abi.EINVAL,
            )
        text = {
            "poweroff": f"guest powered off with code {code & 0xFF}",
            "reboot": "guest asked to reboot",
            "crash": "guest reported a crash",
        }[kind]
        self.sched.request_exit(self, Exit(kind, text, code & 0xFF))
        return 0

    def _hc_watchdog(self) -> int:
        ms = self.arg(0)
        if ms > 3_600_000:
            return self.bad_call(f"watchdog timeout {ms} ms exceeds 3600000", -abi.EINVAL)
        self.sched.arm_watchdog(self, ms * 1_000_000)
        return 0

    # -- event delivery: upcalls ----------------------------------------------------------------
    def upcalls_masked(self) -> bool:
        return self._w[_W_UPCALL_MASK] != 0

    def _hc_set_upcall(self) -> int:
        handler = self.arg(0)
        if handler and not self.mem.check(handler, 1):
            return self.bad_call(
                f"set_upcall handler {handler:#x} is outside guest RAM", -abi.EFAULT
            )
        self.upcall_handler = handler
        return 0

    def _hc_upcall_return(self) -> Any:
        if not self.in_upcall:
            return self.bad_call("upcall_return outside an upcall", -abi.EINVAL)
        # Return without leaving emu_start: restore the saved context here, in the hook, with
        # its RIP set back by the syscall's length, which unicorn adds after the hook; the
        # syscall ends its translation block, so the guest goes on at the interrupted RIP
        # with the state as restored.  (Not by writing RIP in the hook: that sets unicorn's
        # quit_request, and a stop arriving before it is cleared resumes at a wrong PC --
        # tests/test_vcpu_stop.py caught it.)  Stopping instead cost a pCPU round (exit, pick,
        # re-entry) on every I/O completion.
        saved = self._upcall_saved
        assert saved is not None
        ctx, regs = saved[0], self.vcpu.regs
        rip = regs.context_read(ctx, UC_X86_REG_RIP)
        regs.context_write(ctx, UC_X86_REG_RIP, (rip - _SYSCALL_LEN) & U64)
        self._end_upcall()
        self.vcpu.rip = rip
        with self.sched.lock:  # (Scheduler.notify did not stop us: we were in the upcall)
            more = bool(self.pending) and not self.upcalls_masked()
        if more:
            self.vcpu.stop()  # before_resume delivers them
        return NO_RESULT

    def _hc_block(self) -> int:
        self._w[_W_UPCALL_MASK] = 0  # unmask and block, atomically for the guest
        return self.sched.block(self, self.arg(0))

    def before_resume(self) -> None:
        """On the owning pCPU thread, guest stopped: finish a blocking hypercall, end an
        upcall the guest returned from, deliver pending events as an upcall, and publish
        the guest clock's parameters when they are due."""
        clock = self.clock
        if clock.due(time.monotonic_ns(), self.paused_total_ns):
            clock.publish(self.vtime_ns, self.paused_total_ns)
        if self.polling:
            self.sched.finish_poll(self)
        if self._upcall_return:
            self._end_upcall()
        # (not while a lazy restore's pages are checked: the frame goes on the guest's stack,
        # which this thread must not fault on, kernel/pager.py; Scheduler.admit comes back)
        if self.upcall_handler and not self.in_upcall and self.pending and not self.checking:
            bits = self.sched.take_upcall_bits(self)
            if bits:
                self._begin_upcall(bits)

    def _begin_upcall(self, bits: int) -> None:
        if iotrace.ON:
            iotrace.mark(Stage.UPCALL, self.domid)
        uc = self.vcpu.uc
        assert uc is not None
        regs = self.vcpu.regs
        regs.write(UC_X86_REG_RIP, self.vcpu.rip)
        rsp = regs.read(UC_X86_REG_RSP)
        frame = ((rsp - _RED_ZONE) & ~15) - 8
        if not self.mem.check(frame, 8):
            self.sched.request_exit(
                self,
                Exit(
                    "crash",
                    f"cannot deliver an upcall: the stack pointer {rsp:#x} is outside guest RAM",
                ),
            )
            return
        ctx = self._spare_ctx or uc.context_save()
        self._spare_ctx = None
        regs.save(ctx)
        self._upcall_saved = (
            ctx,
            bytes(
                self.mem.bytes[abi.HCALL_BLOCK_ADDR : abi.HCALL_BLOCK_ADDR + abi.HCALL_BLOCK_SIZE]
            ),
        )
        w = self._w
        w[_W_PENDING] |= bits
        w[_W_UPCALL_MASK] = 1
        w[_W_UPCALLS] = (w[_W_UPCALLS] + 1) & U64
        w[frame // 8] = 0  # return address: a handler that returns crashes at 0, clearly
        regs.write(UC_X86_REG_RSP, frame)
        regs.write(UC_X86_REG_RDI, bits)
        self.in_upcall = True
        self.upcalls += 1
        self.vcpu.rip = self.upcall_handler

    def _end_upcall(self) -> None:
        """Restore the context the upcall interrupted (in the hook of HC_UPCALL_RETURN, or
        before resuming a domain restored from a snapshot taken during that call)."""
        self._upcall_return = False
        saved, self._upcall_saved = self._upcall_saved, None
        uc = self.vcpu.uc
        assert saved is not None and uc is not None
        ctx, block = saved
        self.vcpu.regs.restore(ctx)
        self._spare_ctx = ctx  # the next upcall saves into it: no allocation per upcall
        self.mem.bytes[abi.HCALL_BLOCK_ADDR : abi.HCALL_BLOCK_ADDR + abi.HCALL_BLOCK_SIZE] = block
        self._w[_W_UPCALL_MASK] = 0
        self.in_upcall = False
        self.vcpu.rip = self.vcpu.regs.read(UC_X86_REG_RIP)

    # -- devices -------------------------------------------------------------------------------
    def _device_arg(self, what: str) -> Device | int:
        port = self.arg(0)
        dev = self.devices.get(port)
        if dev is None:
            ports = ", ".join(str(p) for p in sorted(self.devices)) or "none"
            return self.bad_call(
                f"{what} on port {port}, which is not bound (ports: {ports})", -abi.EINVAL
            )
        return dev

    def _hc_evtchn_send(self) -> int:
        dev = self._device_arg("evtchn_send")
        if isinstance(dev, int):
            return dev
        assert self.device_manager is not None
        return self.device_manager.kick(dev)

    def _guest_string(self, ptr: int, length: int, limit: int, what: str) -> str | int:
        if length > limit:
            return self.bad_call(f"{what} of {length} bytes exceeds {limit}", -abi.E2BIG)
        if not self.mem.check(ptr, length):
            return self.bad_call(f"{what} {ptr:#x}+{length} is outside guest RAM", -abi.EFAULT)
        try:
            return bytes(self.mem.bytes[ptr : ptr + length]).decode()
        except UnicodeDecodeError:
            return self.bad_call(f"{what} is not UTF-8", -abi.EINVAL)

    def _store_path(self) -> str | int:
        path = self._guest_string(self.arg(0), self.arg(1), abi.STORE_PATH_MAX, "store path")
        if isinstance(path, int):
            return path
        return path if path.startswith("/") else f"/local/domain/{self.domid}/{path}"

    def _hc_store_read(self) -> int:
        path = self._store_path()
        if isinstance(path, int):
            return path
        dm = self.device_manager
        if dm is None:
            return -abi.ENOENT  # a domain without devices has nothing in the store
        if not dm.guest_may_read(self, path):
            return -abi.EACCES
        buf, size = self.arg(2), self.arg(3)
        if not self.mem.check(buf, size):
            return self.bad_call(
                f"store_read buffer {buf:#x}+{size} is outside guest RAM", -abi.EFAULT
            )
        try:
            if not dm.store.exists(path):
                return -abi.ENOENT
            value = dm.store.read(path).encode()
        except StoreError as e:  # a malformed path
            return self.bad_call(f"store_read: {e}", -abi.EINVAL)
        n = min(size, len(value))
        self.mem.bytes[buf : buf + n] = value[:n]
        return len(value)

    def _hc_store_write(self) -> int:
        path = self._store_path()
        if isinstance(path, int):
            return path
        value = self._guest_string(self.arg(2), self.arg(3), abi.STORE_VALUE_MAX, "store value")
        if isinstance(value, int):
            return value
        dm = self.device_manager
        if dm is None or not dm.guest_may_write(self, path):
            return self.bad_call(
                f"store_write to {path}: a guest may write only below "
                f"/local/domain/{self.domid}/device/",
                -abi.EACCES,
            )
        try:
            dm.store.write(path, value)
        except StoreError as e:
            return self.bad_call(f"store_write: {e}", -abi.EINVAL)
        return 0

    def _hc_device_fault(self) -> int:
        dev = self._device_arg("device_fault")
        if isinstance(dev, int):
            return dev
        msg = self._guest_string(self.arg(2), min(self.arg(3), 512), 512, "device_fault message")
        if isinstance(msg, int):
            return msg
        assert self.device_manager is not None
        rsp_cons = self.arg(4) if self.arg(5) & abi.FAULT_F_HOLD else None
        return int(self.device_manager.frontend_fault(dev, self.arg(1), msg, rsp_cons))

    def _hc_device_held(self) -> int:
        dev = self._device_arg("device_held")
        if isinstance(dev, int):
            return dev
        assert self.device_manager is not None
        return int(self.device_manager.held(dev))

    # -- console -------------------------------------------------------------------------------
    def console_append(self, data: bytes) -> None:
        with self._console_lock:
            offset = self._console_end
            self._console += data
            self._console_end += len(data)
            if len(self._console) > CONSOLE_HISTORY_BYTES:
                del self._console[: len(self._console) - CONSOLE_HISTORY_BYTES]
        self.emit(f"console.{self.name}", {"domid": self.domid, "offset": offset, "data": data})

    def console_history(self) -> tuple[int, bytes]:
        """(offset of the first byte kept, bytes kept)."""
        with self._console_lock:
            return self._console_end - len(self._console), bytes(self._console)

    # -- reporting -----------------------------------------------------------------------------
    def state_letters(self) -> str:
        """The six-letter state of ``xl list``: r b p s c d."""
        e = self.exit
        return "".join(
            (
                "r" if self.on_cpu and e is None else "-",
                "b" if not self.runnable and not self.on_cpu and e is None else "-",
                "p" if self.paused else "-",
                "s" if e is not None and e.kind in ("poweroff", "reboot") else "-",
                "c" if e is not None and e.kind == "crash" else "-",
                "d" if self.action is not None and e is None else "-",
            )
        )

    def info(self, now: int | None = None) -> dict[str, Any]:
        now = time.monotonic_ns() if now is None else now
        e = self.exit
        return {
            "name": self.name,
            "id": self.domid,
            "state": self.state_letters(),
            "memory": self.config.memory,
            "vcpus": self.config.vcpus,
            "weight": self.config.weight,
            "cap": self.cap,
            "cpu_time": round(self.cpu_ns / 1e9, 3),
            "uptime": round(((self.exited_ns or now) - self.created_ns) / 1e9, 3),
            "restarts": self.restarts,
            "image": self.config.image,
            "exit_kind": e.kind if e else None,
            "reason": e.reason if e else None,
            "exit_code": e.code if e else None,
            "bad_hypercalls": self.bad_calls,
            "devices": [d.spec.vdev for d in self.devices.values()],
            "upcalls": self.upcalls,
            # a restored or migrated domain: from the restore's start to its first instruction
            "resume_ms": (
                round((self.first_run_ns - self.resume_from_ns) / 1e6, 3)
                if self.resume_from_ns and self.first_run_ns
                else None
            ),
        }

    # -- teardown ------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Free the vCPU and RAM.  Only when no pCPU runs this domain."""
        with self._teardown_lock:
            if self.torn_down:
                return
            self._w = memoryview(bytearray(abi.HCALL_BLOCK_ADDR + 64)).cast("Q")
            self.vcpu.close()
            if self.filling is not None:
                self.filling.cancel()
            with self.mem_lock:
                self.torn_down = True
                self.mem.close()
        self.gone.set()


def _read_image(config: DomainConfig) -> bytes:
    try:
        with open(config.image_path, "rb") as f:
            return f.read(abi.MAX_MEMORY_MIB * 1024 * 1024 + 1)
    except OSError as e:
        raise ImageError(
            f"cannot read image {config.image_path} of domain {config.name!r} "
            f"({config.source}): {e.strerror}"
        ) from None
