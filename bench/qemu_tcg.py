"""Run an isovisor flat guest image under qemu-system-x86_64 with TCG (QEMU's own engine), for
bench/guest_cpu.py's comparison.  bench/qemu_tcg/stub.S says how.

    python3 bench/qemu_tcg.py crc32 --mem 16 --extra "bytes=4194304 rounds=8"

Needs ``qemu-system-x86_64`` (Debian: ``apt-get install qemu-system-x86``).
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bare_unicorn import fill_start_info
from kernel import abi
from kernel.clock import host_tsc

HERE = Path(__file__).resolve().parent / "qemu_tcg"
QEMU = "qemu-system-x86_64"


class QemuUnavailable(RuntimeError):
    """No qemu-system-x86_64 (or no compiler for the stub)."""


@dataclass
class QemuRun:
    output: str
    exit_code: int | None  # the guest's, or None if it did not shut down
    reason: int | None
    wall_s: float  # QEMU's whole run, start-up included


def available() -> str | None:
    """None if the comparison can run here, else why not."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (Debian: apt-get install qemu-system-x86)"
    return None


def build_stub(out_dir: Path) -> Path:
    from domains.build import find_toolchain

    tc = find_toolchain()
    elf, flat = out_dir / "stub.elf", out_dir / "stub.bin"
    cmd = [
        *tc.cc,
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,--no-warn-rwx-segments",
        "-T",
        str(HERE / "stub.ld"),
        "-o",
        str(elf),
        str(HERE / "stub.S"),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    subprocess.run([tc.objcopy, "-O", "binary", str(elf), str(flat)], check=True)
    return flat


def low_pages(mem_bytes: int, image_size: int, name: str, extra: str) -> bytes:
    """Guest pages 1-3: start info (as the kernel fills it), hypercall block, shared info
    with clock parameters for the host TSC (QEMU's TCG reads the host's TSC for rdtsc)."""
    ram = bytearray(abi.SHARED_INFO_ADDR + abi.PAGE_SIZE)
    fill_start_info(
        ram, domid=0, mem_bytes=mem_bytes, image_size=image_size, name=name, cmdline=extra
    )
    tsc = host_tsc()
    mul = tsc.mul(tsc.pair())
    for off, value in (
        (abi.SH_CLOCK_VERSION, 2),
        (abi.SH_CLOCK_TSC, 0),
        (abi.SH_CLOCK_SYSTEM, 0),
        (abi.SH_CLOCK_MUL, mul),
        (abi.SH_CLOCK_FLAGS, abi.CLOCK_F_TSC),
        (abi.SH_CLOCK_WALL, time.time_ns()),
    ):
        struct.pack_into("<Q", ram, abi.SHARED_INFO_ADDR + off, value)
    return bytes(ram[abi.START_INFO_ADDR :])


def run_qemu(image: Path, mem_mib: int, extra: str, *, timeout_s: float = 300) -> QemuRun:
    why = available()
    if why:
        raise QemuUnavailable(why)
    if mem_mib > 16:
        raise ValueError("the stub lives at 32 MiB: give the guest at most 16 MiB")
    with tempfile.TemporaryDirectory(prefix="ivqemu-") as d:
        tmp = Path(d)
        stub = build_stub(tmp)
        guest = tmp / "guest.bin"
        guest.write_bytes(image.read_bytes())
        pages = tmp / "pages.bin"
        pages.write_bytes(low_pages(mem_mib << 20, guest.stat().st_size, "qemu", extra))
        out = tmp / "console.txt"
        cmd = [
            QEMU,
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-cpu",
            "qemu64",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(stub),
            "-initrd",
            f"{guest},{pages}",
            "-debugcon",
            f"file:{out}",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - t0
        text = out.read_text(errors="replace") if out.exists() else ""
        if proc.returncode & 1:
            value = proc.returncode >> 1
            return QemuRun(text, value & 0xFF, value >> 8, wall)
        return QemuRun(text + proc.stderr, None, None, wall)


def main(argv: list[str] | None = None) -> int:
    from domains.build import resolve_image

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--mem", type=int, default=16)
    ap.add_argument("--extra", default="")
    args = ap.parse_args(argv)
    r = run_qemu(resolve_image(args.image, Path.cwd()), args.mem, args.extra)
    sys.stdout.write(r.output)
    print(f"qemu: exit_code={r.exit_code} reason={r.reason} wall_s={r.wall_s:.4f}", file=sys.stderr)
    return 0 if r.exit_code == 0 and r.reason == abi.SHUTDOWN_POWEROFF else 2


if __name__ == "__main__":
    sys.exit(main())
