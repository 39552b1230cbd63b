"""Null hypercall round trip: the hcbench guest via the full kernel vs bare unicorn.

hcbench times ``calls`` HC_NULL hypercalls minus an identical empty loop and prints
``ns_per_call``.  Full stack: a private detached stack (pcpus=2), one hcbench domain per
repetition created through the supervisor; the hypercall goes through the kernel's real
handler (``Domain.hypercall``).  Bare: bench/bare_unicorn.py's minimal syscall hook.
Runs alternate bare/stack; the figure is the median ``ns_per_call`` over pairs during which
other processes stayed below 20% of a CPU (see guest_cpu.py for why).

    python3 bench/hypercall.py [--quick] [--reps N] [--calls N]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import (
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

NAME = "hypercall"
TITLE = "Null hypercall round trip: hcbench under the full kernel vs bare unicorn"
MEMORY_MIB = 4
TARGET_NS = 2000.0


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--reps", type=int, default=None, help="quiet bare/stack pairs wanted (default 5, quick 2)"
    )
    ap.add_argument(
        "--calls", type=int, default=None, help="hypercalls per run (default 2000000, quick 500000)"
    )


def measure(args: argparse.Namespace, res: Result) -> None:
    reps = args.reps or (2 if args.quick else 5)
    calls = args.calls or (500_000 if args.quick else 2_000_000)
    extra = f"calls={calls}"
    image = guest_image("hcbench")
    stack = PrivateStack(pcpus=2)
    try:
        stack.up()
        with stack.subscribe(["console.", "domain."]) as sub:
            run_bare_guest(image, MEMORY_MIB, "calls=10000")  # warm-up, untimed
            run_in_stack(stack, sub, "hc-warm", "hcbench", MEMORY_MIB, "calls=10000")

            def one(kind: str, i: int) -> dict[str, Any]:
                if kind == "bare":
                    r = run_bare_guest(image, MEMORY_MIB, extra)
                else:
                    r = run_in_stack(stack, sub, f"hc-{i}", "hcbench", MEMORY_MIB, extra)
                ns = float(line_with(r.output, "hcbench:")["ns_per_call"])
                return {"value": ns, "show": f"{ns:7.1f} ns/call"}

            pairs = run_pairs(reps, one, lambda: stack.pids, max_pairs=4 * reps)
    finally:
        stack.close()

    chosen, which = pairs.chosen(reps)
    bare, stack_ns = pairs.values(chosen, "bare"), pairs.values(chosen, "stack")
    mb, ms = median(bare), median(stack_ns)
    all_s = pairs.values(pairs.runs, "stack")
    res.rows += [
        Row("HC_NULL round trip, bare (median)", f"{mb:.0f} ns"),
        Row(
            "HC_NULL round trip, full kernel (median)",
            f"{ms:.0f} ns",
            f"stack/bare {ms / mb:.2f}x ({ms - mb:+.0f} ns)",
            f"<= {TARGET_NS:.0f} ns",
            ms <= TARGET_NS,
        ),
        Row(
            "  full kernel over all pairs incl. disturbed",
            f"{median(all_s):.0f} ns",
            f"{len(all_s)} runs, {min(all_s):.0f}..{max(all_s):.0f} ns",
        ),
        Row(
            "calls per second, full kernel",
            f"{1e9 / ms / 1e3:.0f} k/s",
            f"bare {1e9 / mb / 1e3:.0f} k/s",
        ),
    ]
    res.samples = {
        "pairs": [
            {k: {f: v for f, v in r.items() if f != "show"} for k, r in p.items()}
            for p in pairs.runs
        ],
        "calls": calls,
    }
    res.notes.append(
        f"hcbench calls={calls}, bare and stack runs alternating; private stack "
        "pcpus=2; ns_per_call is the guest's own figure (hypercall loop minus "
        "empty loop, guest clock)"
    )
    res.notes.append(f"headline uses {which}")


if __name__ == "__main__":
    sys.exit(bench_main(NAME, TITLE, measure, add_args))
