"""Probe for the hypercall cost: HC_NULL through the unicorn binding's ``hook_add`` (what
kernel/vcpu.py and bench/bare_unicorn.py use) vs a raw ctypes ``uc_hook_add`` whose callback is
the handler itself (one Python frame instead of three).  Same process, alternating.

    python3 bench/probes/hook_path.py [repetitions]
"""

from __future__ import annotations

import ctypes
import mmap
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import guest_image, line_with  # noqa: E402
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc  # noqa: E402
from unicorn.unicorn_py3.unicorn import uclib  # noqa: E402
from unicorn.x86_const import UC_X86_INS_SYSCALL, UC_X86_REG_RDI, UC_X86_REG_RSP  # noqa: E402

from bench.bare_unicorn import fill_start_info  # noqa: E402
from kernel import abi  # noqa: E402

RAW_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
STOP = 0xFFFF_8000_DEAD_0000


def run(raw: bool, calls: int) -> float:
    data = guest_image("hcbench").read_bytes()
    size = 4 << 20
    mm = mmap.mmap(-1, size)
    mm[abi.IMAGE_BASE : abi.IMAGE_BASE + len(data)] = data
    fill_start_info(
        mm, domid=0, mem_bytes=size, image_size=len(data), name="probe", cmdline=f"calls={calls}"
    )
    anchor = ctypes.c_char.from_buffer(mm)
    w = memoryview(mm).cast("Q")
    nr_i = (abi.HCALL_BLOCK_ADDR + abi.HB_NR) // 8
    a0 = (abi.HCALL_BLOCK_ADDR + abi.HB_ARGS) // 8
    ret_i = (abi.HCALL_BLOCK_ADDR + abi.HB_RET) // 8
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tcg_buffer_size(32 << 20)
    uc.mem_map_ptr(
        abi.NULL_GUARD_END,
        size - abi.NULL_GUARD_END,
        UC_PROT_ALL,
        ctypes.addressof(anchor) + abi.NULL_GUARD_END,
    )
    out: list[bytes] = []
    t0 = time.monotonic_ns()
    handle = uc._uch

    def hook(*_args: object) -> None:
        nr = w[nr_i]
        if nr == abi.HC_NULL:
            w[ret_i] = 0
        elif nr == abi.HC_CONSOLE_WRITE:
            p, n = w[a0], w[a0 + 1]
            out.append(bytes(mm[p : p + n]))
            w[ret_i] = n
        elif nr == abi.HC_TIME:
            w[ret_i] = time.monotonic_ns() - t0
        elif nr == abi.HC_SHUTDOWN:
            uclib.uc_emu_stop(handle)
        else:
            w[ret_i] = 0

    keep = None
    if raw:
        keep = RAW_CB(hook)
        h = ctypes.c_size_t()
        status = uclib.uc_hook_add(
            handle,
            ctypes.byref(h),
            UC_HOOK_INSN,
            ctypes.cast(keep, ctypes.c_void_p),
            None,
            ctypes.c_uint64(1),
            ctypes.c_uint64(0),
            ctypes.c_int(UC_X86_INS_SYSCALL),
        )
        assert status == 0, status
    else:
        uc.hook_add(UC_HOOK_INSN, hook, None, 1, 0, UC_X86_INS_SYSCALL)
    uc.reg_write(UC_X86_REG_RSP, size)
    uc.reg_write(UC_X86_REG_RDI, abi.START_INFO_ADDR)
    uc.emu_start(abi.IMAGE_BASE, STOP)
    del keep
    return float(line_with(b"".join(out).decode(), "hcbench:")["ns_per_call"])


if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    res: dict[str, list[float]] = {"binding hook_add": [], "raw uc_hook_add": []}
    for _ in range(reps):
        res["binding hook_add"].append(run(False, 500_000))
        res["raw uc_hook_add"].append(run(True, 500_000))
    for k, v in res.items():
        print(
            f"{k:17}: median {statistics.median(v):6.0f} ns/call  "
            f"({', '.join(f'{x:.0f}' for x in v)})"
        )
