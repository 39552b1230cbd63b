"""A virtual CPU: one unicorn instance running a domain's code in long stretches.

Exits from guest code happen only on ``syscall`` (hypercalls), CPU exceptions, invalid memory
accesses and preemption (``emu_stop`` from the ticker or the control thread).  No hook runs per
instruction or per memory access: the unmapped-memory hook is only consulted on a fault, and
the TLB fill hook (kernel/fasttlb.py, native code) on a TLB miss.
Every engine gets :func:`kernel.ucstop.stop_only_between_instructions`, so a stop from another
thread lands between instructions and never makes one run twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from unicorn import (
    UC_ARCH_X86,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_PROT,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
    x86_const,
)
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL,
    UC_X86_REG_RDI,
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
)

from kernel import abi
from kernel.fasttlb import use_fast_stores
from kernel.memory import GuestMemory
from kernel.ucregs import Registers
from kernel.ucstop import stop_only_between_instructions

#: emu_start's "until" address: unmapped and non-canonical for any guest, so never reached.
STOP_ADDRESS: Final = 0xFFFF_8000_DEAD_0000
#: Translation-cache size per vCPU (unicorn otherwise reserves ~1 GiB of address space).
TCG_BUFFER_BYTES: Final = 32 * 1024 * 1024

_EXCEPTIONS: Final = {
    0: "divide error (#DE)",
    1: "debug trap (#DB)",
    3: "breakpoint (#BP)",
    4: "overflow (#OF)",
    5: "bound range (#BR)",
    6: "invalid opcode (#UD)",
    7: "device not available (#NM)",
    8: "double fault (#DF)",
    10: "invalid TSS (#TS)",
    11: "segment not present (#NP)",
    12: "stack fault (#SS)",
    13: "general protection (#GP)",
    14: "page fault (#PF)",
    16: "x87 error (#MF)",
    17: "alignment check (#AC)",
    19: "SIMD error (#XM)",
}


#: Registers a snapshot carries and a restore writes back (what guest code can change).
SAVED_REGISTERS: Final = (
    *(f"R{n}" for n in ("AX", "BX", "CX", "DX", "SI", "DI", "BP", "SP", *map(str, range(8, 16)))),
    "RIP",
    "RFLAGS",
    "FS_BASE",
    "GS_BASE",
    *(f"XMM{i}" for i in range(16)),
    "MXCSR",
    "FPCW",
    "FPSW",  # before the x87 registers (its TOP field maps them), FPTAG after (their writes
    *(f"FP{i}" for i in range(8)),  # mark them valid)
    "FPTAG",
)
#: Recorded too, but fixed for a flat 64-bit guest: a restore checks them instead.
FIXED_REGISTERS: Final = ("CS", "SS", "CR0", "CR3", "CR4")
_REG_IDS: Final = {n: getattr(x86_const, f"UC_X86_REG_{n}") for n in SAVED_REGISTERS}
_FIXED_IDS: Final = {n: getattr(x86_const, f"UC_X86_REG_{n}") for n in FIXED_REGISTERS}


def read_registers(regs: Any) -> dict[str, Any]:
    """Every saved register of a Uc, as msgpack-able values (XMM as 16 little-endian
    bytes, x87 registers as [mantissa, exponent]).  Not of a UcContext: its register access
    has no x87 register type."""
    out: dict[str, Any] = {}
    for name, rid in (*_REG_IDS.items(), *_FIXED_IDS.items()):
        v = regs.reg_read(rid)
        if name.startswith("XMM"):
            v = int(v).to_bytes(16, "little")
        elif isinstance(v, tuple):
            v = list(v)
        out[name] = v
    return out


def write_registers(regs: Any, values: dict[str, Any]) -> None:
    """Write what :func:`read_registers` read into a Uc (KeyError or ValueError for a
    malformed table)."""
    for name, rid in _REG_IDS.items():
        v = values[name]
        if name.startswith("XMM"):
            if not isinstance(v, bytes) or len(v) != 16:
                raise ValueError(f"register {name} is not 16 bytes")
            v = int.from_bytes(v, "little")
        elif name.startswith("FP") and name[2:].isdigit():
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v)):
                raise ValueError(f"register {name} is not [mantissa, exponent]")
            v = tuple(v)
        elif not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
            raise ValueError(f"register {name} is not a 64-bit value")
        regs.reg_write(rid, v)


def fixed_mismatch(regs: Any, values: dict[str, Any]) -> str | None:
    """How the fixed registers of ``regs`` differ from a snapshot's, or None."""
    bad = [
        f"{n}={values.get(n)!r} (here {regs.reg_read(rid):#x})"
        for n, rid in _FIXED_IDS.items()
        if values.get(n) != regs.reg_read(rid)
    ]
    return ", ".join(bad) or None


class VCpu:
    """One vCPU of a domain; not thread-safe except :meth:`stop`."""

    def __init__(
        self, mem: GuestMemory, entry: int, on_hypercall: Callable[[Any, Any], None]
    ) -> None:
        self.mem = mem
        self.fault: str | None = None
        self._redo: int | None = None  # where to resume instead (redo_hypercall)
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # unicorn's __init__ picks its py2/py3 Uc by ``_sys.version_info.major``, which mypy
        # does not evaluate: it sees the py2 class, which lacks this (py3-only) method
        uc.ctl_set_tcg_buffer_size(TCG_BUFFER_BYTES)  # type: ignore[attr-defined]
        uc.mem_map_ptr(
            abi.NULL_GUARD_END,
            mem.size - abi.NULL_GUARD_END,
            UC_PROT_ALL,
            mem.host_address + abi.NULL_GUARD_END,
        )
        self._mapped = True
        stop_only_between_instructions(uc)  # before any code is translated
        self._regions: list[tuple[int, int]] = []
        # The hypercall handler is registered directly: one Python frame per hypercall.
        uc.hook_add(UC_HOOK_INSN, on_hypercall, None, 1, 0, UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INTR, self._intr_hook)
        use_fast_stores(uc)
        # Bounded to page 0 and to everything above RAM (device regions included): a memory
        # hook that covers RAM would keep every guest store on unicorn's slow path.
        for begin, end in ((0, abi.NULL_GUARD_END - 1), (mem.size, (1 << 64) - 1)):
            uc.hook_add(
                UC_HOOK_MEM_READ_UNMAPPED
                | UC_HOOK_MEM_WRITE_UNMAPPED
                | UC_HOOK_MEM_FETCH_UNMAPPED
                | UC_HOOK_MEM_FETCH_PROT,
                self._unmapped_hook,
                None,
                begin,
                end,
            )
        uc.reg_write(UC_X86_REG_RSP, mem.size)
        uc.reg_write(UC_X86_REG_RDI, abi.START_INFO_ADDR)
        self.rip = entry
        self.uc: Uc | None = uc
        #: Fast 64-bit register access (only while ``uc`` is open).
        self.regs = Registers(uc)

    # -- hooks (run on the pCPU thread, inside emu_start) --------------------------------------
    def _intr_hook(self, uc: Uc, intno: int, _data: object) -> None:
        what = _EXCEPTIONS.get(intno, f"interrupt/exception vector {intno}")
        rip = uc.reg_read(UC_X86_REG_RIP)
        self.fault = (
            f"unhandled {what} at rip={rip:#x}: the guest has no exception handlers, "
            "so this is a triple fault"
        )
        uc.emu_stop()

    def _unmapped_hook(
        self, uc: Uc, access: int, address: int, size: int, value: int, _data: object
    ) -> bool:
        kind = {
            UC_MEM_WRITE_UNMAPPED: "write to",
            UC_MEM_FETCH_UNMAPPED: "instruction fetch from",
            UC_MEM_FETCH_PROT: "instruction fetch from",
        }.get(access, "read from")
        rip = uc.reg_read(UC_X86_REG_RIP)
        if address < abi.NULL_GUARD_END:
            where = "the NULL guard page"
        elif any(g <= address < g + n for g, n in self._regions):
            where = "a device region, which is not executable"
        else:
            where = f"outside guest RAM (0..{self.mem.size:#x}) and its device regions"
        self.fault = f"{kind} {address:#x} ({size} bytes) at rip={rip:#x}: {where}"
        return False  # not handled: unicorn stops with an error

    def map_region(self, gpa: int, size: int, host_address: int) -> None:
        """Map a device region (shared memory the caller keeps alive) at ``gpa``, not
        executable."""
        assert self.uc is not None
        self.uc.mem_map_ptr(gpa, size, UC_PROT_READ | UC_PROT_WRITE, host_address)
        self._regions.append((gpa, size))

    # -- control -------------------------------------------------------------------------------
    def run(self) -> None:
        """Run guest code until a hypercall stops it, a fault, or :meth:`stop`."""
        uc = self.uc
        assert uc is not None
        try:
            uc.emu_start(self.rip, STOP_ADDRESS)
        except UcError as e:
            if self.fault is None:
                rip = uc.reg_read(UC_X86_REG_RIP)
                what = "invalid opcode (#UD)" if e.errno == UC_ERR_INSN_INVALID else str(e)
                self.fault = f"{what} at rip={rip:#x}"
        self.rip = self.regs.read(UC_X86_REG_RIP)
        if self._redo is not None:
            self.rip, self._redo = self._redo, None
        if self.rip == STOP_ADDRESS and self.fault is None:
            self.fault = f"jump to non-canonical address {STOP_ADDRESS:#x}"

    def registers(self) -> dict[str, Any]:
        """The saved registers (vCPU stopped); RIP is where the guest resumes."""
        assert self.uc is not None
        regs = read_registers(self.uc)
        regs["RIP"] = self.rip
        return regs

    def load_registers(self, values: dict[str, Any]) -> None:
        assert self.uc is not None
        write_registers(self.uc, values)
        self.rip = values["RIP"]

    def redo_hypercall(self) -> None:
        """From the hypercall hook: resume at the ``syscall`` instruction itself, not after
        it, so the guest makes the same hypercall again (unicorn's syscall hook runs with RIP
        still at the instruction; it adds the instruction's length after the hook)."""
        assert self.uc is not None
        self._redo = self.regs.read(UC_X86_REG_RIP)

    def stop(self) -> None:
        """Ask the running emulation to stop (safe from any thread)."""
        if self.uc is not None:
            self.regs.stop()

    def close(self) -> None:
        """Unmap guest RAM and free the unicorn instance (must not be running)."""
        uc, self.uc = self.uc, None
        if uc is None:
            return
        if self._mapped:
            uc.mem_unmap(abi.NULL_GUARD_END, self.mem.size - abi.NULL_GUARD_END)
            self._mapped = False
        for gpa, size in self._regions:
            uc.mem_unmap(gpa, size)
        self._regions.clear()
        finalizer = getattr(uc, "_Uc__finalizer", None)
        if finalizer is not None:
            finalizer()  # uc_close now, not whenever the garbage collector runs
