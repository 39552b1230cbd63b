"""Baseline for the guest-CPU benchmark: a flat guest image on bare unicorn.

No kernel, no scheduler, no time slices: one ``emu_start`` call runs the guest until it
shuts down (or ``timeout_s`` passes).  Guest RAM is an anonymous mmap mapped with
``mem_map_ptr`` at 0x1000 (page 0 stays unmapped so NULL faults), the start-info page is
filled exactly as the kernel fills it, and a minimal ``syscall`` hook serves the
hypercalls through a memoryview on the hypercall block (no register API):

- HC_NULL -> 0; HC_CONSOLE_WRITE -> collects the bytes (-EFAULT outside RAM,
  -EMSGSIZE above CONSOLE_WRITE_MAX); HC_TIME -> ``time.monotonic_ns()`` since start;
  HC_POLL -> 0 after sleeping the timeout if it is finite and below 1 s;
  HC_YIELD, HC_WATCHDOG -> 0; HC_SHUTDOWN -> records reason and code, stops;
  anything else -> -ENOSYS.

Usage: ``python bench/bare_unicorn.py crc32 --mem 64 --extra "bytes=16777216 rounds=4"``
(an image is a built-in program name, a ``.c`` file, or a flat binary).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import mmap
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc, UcError
from unicorn.x86_const import UC_X86_INS_SYSCALL, UC_X86_REG_RDI, UC_X86_REG_RIP, UC_X86_REG_RSP

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel import abi

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_TCG_BUFFER_BYTES = 32 * 1024 * 1024


@dataclass
class BareResult:
    """What a bare run produced."""

    #: Everything the guest wrote to its console (decoded as UTF-8, errors replaced).
    output: str
    #: HC_SHUTDOWN code (SHUTDOWN_CRASH included), or None if the guest never shut down.
    exit_code: int | None
    #: HC_SHUTDOWN reason (abi.SHUTDOWN_*), or None.
    reason: int | None
    #: Wall-clock seconds spent in emu_start.
    wall_s: float
    #: Number of hypercalls served.
    hypercalls: int
    #: Why emulation ended without a shutdown (unicorn error and RIP, or a timeout).
    error: str | None = None

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()


def fill_start_info(
    ram: memoryview | bytearray | mmap.mmap,
    *,
    domid: int,
    mem_bytes: int,
    image_size: int,
    name: str,
    cmdline: str,
) -> None:
    """Write the start-info page at START_INFO_ADDR (``ram`` is indexed by guest address)."""
    base = abi.START_INFO_ADDR
    ram[base : base + abi.PAGE_SIZE] = bytes(abi.PAGE_SIZE)
    for off, value in (
        (abi.SI_MAGIC, abi.START_INFO_MAGIC),
        (abi.SI_ABI_VERSION, abi.ABI_VERSION),
        (abi.SI_DOMID, domid),
        (abi.SI_MEM_BYTES, mem_bytes),
        (abi.SI_IMAGE_BASE, abi.IMAGE_BASE),
        (abi.SI_IMAGE_SIZE, image_size),
        (abi.SI_STACK_TOP, mem_bytes),
        (abi.SI_HCALL_BLOCK, abi.HCALL_BLOCK_ADDR),
    ):
        struct.pack_into("<Q", ram, base + off, value)
    name_b = name.encode()[: abi.SI_NAME_MAX - 1]
    cmd_b = cmdline.encode()[: abi.SI_CMDLINE_MAX - 1]
    ram[base + abi.SI_NAME : base + abi.SI_NAME + len(name_b)] = name_b
    ram[base + abi.SI_CMDLINE : base + abi.SI_CMDLINE + len(cmd_b)] = cmd_b


def run_bare(
    image: Path,
    mem_mib: int,
    extra: str,
    *,
    name: str = "bare",
    timeout_s: float | None = None,
    kernel_settings: bool = False,
) -> BareResult:
    """Run the flat image ``image`` with ``mem_mib`` MiB of RAM and cmdline ``extra``.
    ``kernel_settings``: set the engine up as the kernel's vCPUs are (exit checks between
    instructions only, kernel/ucstop.py; the virtual TLB of kernel/fasttlb.py), for a
    comparison under the same settings; else unicorn's defaults."""
    data = Path(image).read_bytes()
    mem_bytes = mem_mib * 1024 * 1024
    if not abi.MIN_MEMORY_MIB <= mem_mib <= abi.MAX_MEMORY_MIB:
        raise ValueError(
            f"mem_mib={mem_mib} outside {abi.MIN_MEMORY_MIB}..{abi.MAX_MEMORY_MIB} MiB"
        )
    if abi.IMAGE_BASE + len(data) + abi.MIN_STACK_BYTES > mem_bytes:
        raise ValueError(f"{image} ({len(data)} bytes) does not fit in {mem_mib} MiB")

    # Guest address a is mm[a]; page 0 of the mmap is simply never mapped into the guest.
    mm = mmap.mmap(-1, mem_bytes)
    mm[abi.IMAGE_BASE : abi.IMAGE_BASE + len(data)] = data
    fill_start_info(
        mm, domid=0, mem_bytes=mem_bytes, image_size=len(data), name=name, cmdline=extra
    )

    anchor = ctypes.c_char.from_buffer(mm)
    ram_ptr = ctypes.addressof(anchor)
    hb = memoryview(mm)[abi.HCALL_BLOCK_ADDR : abi.HCALL_BLOCK_ADDR + abi.HCALL_BLOCK_SIZE]
    words = hb.cast("Q")
    ret_idx = abi.HB_RET // 8
    arg0 = abi.HB_ARGS // 8

    out: list[bytes] = []
    # the hook below is the hot path, so it only touches closure locals
    calls = [0]
    shutdown: list[int | None] = [None, None]  # reason, code
    t_start = time.monotonic_ns()
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    try:
        with contextlib.suppress(UcError, AttributeError):  # cap the translation buffer
            uc.ctl_set_tcg_buffer_size(_TCG_BUFFER_BYTES)
        uc.mem_map_ptr(
            abi.NULL_GUARD_END,
            mem_bytes - abi.NULL_GUARD_END,
            UC_PROT_ALL,
            ram_ptr + abi.NULL_GUARD_END,
        )

        hc_null, hc_write, hc_time, hc_poll = (
            abi.HC_NULL,
            abi.HC_CONSOLE_WRITE,
            abi.HC_TIME,
            abi.HC_POLL,
        )
        hc_shutdown, hc_ok = abi.HC_SHUTDOWN, (abi.HC_YIELD, abi.HC_WATCHDOG)
        ram_lo, write_max, forever = abi.NULL_GUARD_END, abi.CONSOLE_WRITE_MAX, abi.POLL_FOREVER
        efault, emsgsize, enosys = -abi.EFAULT, -abi.EMSGSIZE, -abi.ENOSYS
        monotonic_ns, sleep = time.monotonic_ns, time.sleep

        def on_syscall(uc_: Uc, _user: object) -> None:
            nr = words[0]
            calls[0] += 1
            ret = 0
            if nr == hc_null:
                pass
            elif nr == hc_write:
                ptr, length = words[arg0], words[arg0 + 1]
                if ptr < ram_lo or ptr + length > mem_bytes:
                    ret = efault
                elif length > write_max:
                    ret = emsgsize
                else:
                    out.append(mm[ptr : ptr + length])
                    ret = length
            elif nr == hc_time:
                ret = monotonic_ns() - t_start
            elif nr == hc_poll:
                timeout = words[arg0 + 1]
                if timeout != forever and timeout < 1_000_000_000:
                    sleep(timeout / 1e9)
            elif nr in hc_ok:
                pass
            elif nr == hc_shutdown:
                shutdown[0] = words[arg0]
                code = words[arg0 + 1]
                shutdown[1] = code - (1 << 64) if code >> 63 else code
                uc_.emu_stop()
            else:
                ret = enosys
            words[ret_idx] = ret & _U64

        uc.hook_add(UC_HOOK_INSN, on_syscall, None, 1, 0, UC_X86_INS_SYSCALL)
        if kernel_settings:
            from kernel.fasttlb import use_fast_stores
            from kernel.ucstop import stop_only_between_instructions

            stop_only_between_instructions(uc)
            use_fast_stores(uc)
        uc.reg_write(UC_X86_REG_RSP, mem_bytes)
        uc.reg_write(UC_X86_REG_RDI, abi.START_INFO_ADDR)

        error: str | None = None
        t0 = time.perf_counter()
        try:
            uc.emu_start(
                abi.IMAGE_BASE,
                0,
                timeout=int(timeout_s * 1_000_000) if timeout_s else 0,
            )
        except UcError as e:
            error = f"{e} at rip={uc.reg_read(UC_X86_REG_RIP):#x}"
        wall = time.perf_counter() - t0
        if error is None and shutdown[0] is None:
            error = f"stopped without shutdown at rip={uc.reg_read(UC_X86_REG_RIP):#x}"
            if timeout_s:
                error += f" (timeout {timeout_s} s)"
    finally:
        # unicorn must let go of the RAM before the mmap is closed
        finalizer = getattr(uc, "_Uc__finalizer", None)
        if finalizer is not None:
            finalizer()
        del uc
        gc.collect()
        words.release()
        hb.release()
        del anchor
        mm.close()

    return BareResult(
        output=b"".join(out).decode("utf-8", errors="replace"),
        exit_code=shutdown[1],
        reason=shutdown[0],
        wall_s=wall,
        hypercalls=calls[0],
        error=error,
    )


def main(argv: list[str] | None = None) -> int:
    from domains.build import BuildError, resolve_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="built-in program name, .c file, or flat binary")
    parser.add_argument("--mem", type=int, default=64, help="guest RAM in MiB (default 64)")
    parser.add_argument("--extra", default="", help='parameters, e.g. "bytes=1048576 seed=7"')
    parser.add_argument("--name", default="bare", help="domain name in the start info")
    parser.add_argument("--timeout", type=float, default=None, help="stop after N seconds")
    parser.add_argument(
        "--kernel-settings",
        action="store_true",
        help="set the engine up as the kernel does (kernel/ucstop.py, kernel/fasttlb.py)",
    )
    args = parser.parse_args(argv)
    try:
        path = resolve_image(args.image, Path.cwd())
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    res = run_bare(
        path,
        args.mem,
        args.extra,
        name=args.name,
        timeout_s=args.timeout,
        kernel_settings=args.kernel_settings,
    )
    sys.stdout.write(res.output)
    print(
        f"bare: image={path.name} exit_code={res.exit_code} reason={res.reason} "
        f"wall_s={res.wall_s:.4f} hypercalls={res.hypercalls}"
        + (f" error={res.error}" if res.error else ""),
        file=sys.stderr,
    )
    if res.error or res.reason != abi.SHUTDOWN_POWEROFF:
        return 2
    return res.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
