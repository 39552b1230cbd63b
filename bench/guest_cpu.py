"""Guest CPU speed: guests under the full stack vs the same images on bare unicorn.

Full stack: a private detached ``isovisor up`` stack (pcpus=2); each stack run creates a
domain through the supervisor's ``create`` command, so the guest runs in the kernel process
with the real scheduler, hypercall handler and preemption ticker.  Bare: the same flat image
with one ``emu_start`` in a fresh process (bench/bare_unicorn.py), twice: with the engine set
up as the kernel's vCPUs are (``bare``: exit checks between instructions only, the virtual TLB
of kernel/fasttlb.py; the target compares the stack with this) and with unicorn's defaults
(``stock``: what isovisor ran on before kernel/fasttlb.py, so the speed-up over it).  And,
where ``qemu-system-x86_64`` is installed, the same image under QEMU's own TCG engine
(bench/qemu_tcg.py: a multiboot stub enters long mode and answers the hypercall mailbox).  The
figure is the guest-reported ``ns=`` (guest time around the timed loop only).

Guests: ``crc32`` (table-driven CRC-32 over 4 MiB, loads only) and ``primes`` (a bit sieve
up to 30 million: stores all over a 1.9 MB bitmap).

Noise: a run takes up to twice as long while another process in the VM is busy, so each run
records how much CPU other processes used meanwhile, and with --wait-quiet disturbed rounds are
re-run (up to 4x the wanted number); the headline uses the quiet rounds and the table also
shows the figure over every round.

    python3 bench/guest_cpu.py [--quick] [--reps N] [--rounds N] [--guests NAME ...]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import qemu_tcg
from _common import (
    GuestRun,
    PrivateStack,
    Result,
    Row,
    bench_main,
    guest_image,
    line_with,
    median,
    run_bare_guest,
    run_in_stack,
    run_pairs,
)
from qemu_tcg import run_qemu

NAME = "guest_cpu"
TITLE = "Guest CPU: guests under the full stack vs bare unicorn (same settings, and stock)"
BYTES = 4 * 1024 * 1024
MEMORY_MIB = 16
TARGET = 0.95
#: The speed-up over stock unicorn the issue asks for (issue 16).
SPEEDUP = 3.0
KINDS = ("bare", "stack", "stock", "qemu")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--reps", type=int, default=None, help="quiet rounds wanted per guest (default 10, quick 2)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="crc32: CRC rounds over 4 MiB (default 32, about 1-1.5 s; quick 8)",
    )
    ap.add_argument("--guests", nargs="+", choices=("crc32", "primes"), default=["crc32", "primes"])


def _workload(guest: str, args: argparse.Namespace) -> tuple[str, str, float, str]:
    """(params, warm-up params, MB of work per run, the line's prefix)."""
    if guest == "crc32":
        rounds = args.rounds or (8 if args.quick else 32)
        return (
            f"bytes={BYTES} seed=1 rounds={rounds}",
            f"bytes={BYTES} rounds=1",
            (BYTES * rounds / 1e6),
            "crc32:",
        )
    n = 3_000_000 if args.quick else 30_000_000
    return f"n={n} timed=1", "n=100000 timed=1", n / 1e6, "primes: n="


def measure(args: argparse.Namespace, res: Result) -> None:
    reps = args.reps or (2 if args.quick else 10)
    stack = PrivateStack(pcpus=2)
    samples: dict[str, Any] = {}
    try:
        stack.up()
        with stack.subscribe(["console.", "domain."]) as sub:
            for guest in args.guests:
                samples[guest] = _one_guest(guest, args, reps, stack, sub, res)
    finally:
        stack.close()
    res.samples = samples
    res.notes.append(
        f"in {MEMORY_MIB} MiB; bare, stack and stock runs in turn (order reversed every "
        "round); private stack pcpus=2, timeslice 10 ms; bare and stock = "
        "bench/bare_unicorn.py in a fresh process, one emu_start"
    )


def _one_guest(
    guest: str, args: argparse.Namespace, reps: int, stack: PrivateStack, sub: Any, res: Result
) -> dict[str, Any]:
    extra, warm, work, prefix = _workload(guest, args)
    image = guest_image(guest)
    unit = "MB/s" if guest == "crc32" else "M numbers/s"
    answers: set[str] = set()
    # one untimed run of each, so page cache, image build and imports are warm
    run_bare_guest(image, MEMORY_MIB, warm, kernel_settings=True)
    run_in_stack(stack, sub, f"{guest}-warm", guest, MEMORY_MIB, warm)

    def one(kind: str, i: int) -> dict[str, Any]:
        if kind == "stack":
            r = run_in_stack(stack, sub, f"{guest}-{i}", guest, MEMORY_MIB, extra)
        elif kind == "qemu":
            q = run_qemu(image, MEMORY_MIB, extra)
            if q.exit_code != 0:
                raise RuntimeError(f"{guest} under QEMU failed: {q.output[-500:]}")
            r = GuestRun(q.output, q.wall_s, q.wall_s)
        else:
            r = run_bare_guest(image, MEMORY_MIB, extra, kernel_settings=kind == "bare")
        kv = line_with(r.output, prefix)
        answers.add(r.output.strip().splitlines()[-1] if guest == "primes" else kv["crc"])
        ns = int(kv["ns"])
        return {"value": ns, "wall": r.wall_s, "show": f"ns={ns / 1e6:8.1f} ms"}

    kinds = KINDS[:3] if qemu_tcg.available() else KINDS
    pairs = run_pairs(reps, one, lambda: stack.pids, max_pairs=4 * reps, kinds=kinds)
    if len(answers) != 1:
        raise RuntimeError(f"{guest}: the runs disagree on the answer: {answers}")
    chosen, which = pairs.chosen(reps)
    b, s, k = (median(pairs.values(chosen, kind)) for kind in KINDS[:3])
    ratio, speedup = b / s, k / s
    bare_ns, stack_ns = pairs.values(chosen, "bare"), pairs.values(chosen, "stack")
    per_pair = [x / y for x, y in zip(bare_ns, stack_ns, strict=True)]

    def speed(ns: float) -> str:
        return f"{work / ns * 1e9:.1f} {unit}"

    res.rows += [
        Row(f"{guest} {extra}: full stack (median)", f"{s / 1e6:.1f} ms", speed(s)),
        Row(f"{guest}: bare, kernel settings (median)", f"{b / 1e6:.1f} ms", speed(b)),
        Row(f"{guest}: bare, stock unicorn (median)", f"{k / 1e6:.1f} ms", speed(k)),
        Row(
            f"{guest}: speed stack / bare with the same settings",
            f"{ratio:.3f}",
            f"per round: median {median(per_pair):.3f}, {min(per_pair):.3f}..{max(per_pair):.3f}",
            f">= {TARGET}",
            ratio >= TARGET,
        ),
        Row(
            f"{guest}: speed stack / stock unicorn",
            f"{speedup:.2f}x",
            "isovisor ran at 1.0-1.14x stock before kernel/fasttlb.py",
            f">= {SPEEDUP:g}x",
            speedup >= SPEEDUP,
        ),
    ]
    if "qemu" in kinds:
        q = median(pairs.values(chosen, "qemu"))
        res.rows += [
            Row(f"{guest}: qemu-system-x86_64 TCG (median)", f"{q / 1e6:.1f} ms", speed(q)),
            Row(
                f"{guest}: speed stack / QEMU TCG",
                f"{q / s:.2f}",
                "the same image on QEMU's own engine (bench/qemu_tcg.py)",
                "1.0 (stretch goal: parity)",
                q / s >= 1.0,
            ),
        ]
    else:
        res.notes.append(f"no QEMU comparison: {qemu_tcg.available()}")
    res.notes.append(f"{guest}: headline uses {which}")
    return {
        "extra": extra,
        "rounds": [
            {k: {f: v for f, v in r.items() if f != "show"} for k, r in p.items()}
            for p in pairs.runs
        ],
    }


if __name__ == "__main__":
    sys.exit(bench_main(NAME, TITLE, measure, add_args))
