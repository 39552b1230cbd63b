"""Hot swap of the block backend: how long the guests wait while ``blk0`` changes
implementation under them (issue 6).

A private stack (pcpus=2) runs ``[driver.blk0]`` (drivers.blk, its own process, warm spare on).
Every *run* starts two ``blkstress`` guests (QD32, 60 % writes, 4 KiB, 1024-block working set,
verify on) on their own 4 MiB image files, with a random phase of a fixed length
(``seconds=``, default 3 s), and does one thing in the middle of it, once both devices have
completed ``--lead`` requests:

* ``file->ram`` / ``ram->file``: swap ``drivers.blk`` (its Backend: the image file) to
  ``drivers.blk.ram:RamBackend`` (a copy of the disk in memory) or back -- the state carries
  the medium, so the data is moved;
* ``file->file``: swap to the same implementation named differently
  (``drivers.blk`` <-> ``drivers.blk.backend:Backend``): a new process, the state
  handed over, nothing to copy;
* ``none``: nothing -- the baseline, same window length, interleaved with the swaps;
* ``kill``: SIGKILL of the driver (bench/recovery.py's approach, warm spare): crash recovery,
  for comparison;
* ``spawn``: no swap, but a Python process importing the driver's modules runs meanwhile (what
  a swap starts twice: the new implementation, then the new warm spare) -- a diagnostic that
  separates the cost of starting processes from the hand-over itself.

The **guest-visible stall** of a run is the guests' own ``max_gap_us`` (blkstress: the longest
time between two polls that completed requests, over the random phase), the larger of the two
guests -- as bench/recovery.py measures it.  A run has one swap at most, so its longest gap is
that swap's stall (or the run's own noise, whichever is longer: the baseline runs show how
long that is).  A swap counts only if it was over (outcome published, after the probation) with
the random phase still going (each guest's final ``ops`` exceeds its request count read just
after the outcome).  Also recorded: the kernel's own stall (``stall_ms`` of
``driver.blk0.swap``: drain -> every device resumed), the drain time, the requests carried
over, and every guest's ``errors`` and ``mismatches`` (all must be 0; all swaps must be
``swapped``).

Rounds repeat ``none, file->ram, ram->file, none, file->file, file->file``, followed by a
``kill`` run or (every other round) a ``spawn`` run, so every kind sees the same machine.

    python3 bench/swap.py [--quick] [--rounds N] [--seconds S] [--probation P]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psutil
from _common import (
    GATE,
    QUIET_PCT,
    ROOT,
    OtherLoad,
    Result,
    Row,
    bench_main,
    median,
    pctl,
    private_stack,
    wait_topic,
)
from recovery import _driver_pid, _requests, _summary, _wait_progress

from ipc.events import Subscriber
from isovisor.cli.swapclient import swap

NAME = "swap"
TITLE = "Hot swap of the block backend under QD32 I/O: guest-visible stall per swap"

FILE = "drivers.blk"  # as [driver.blk0] names it (its Backend class)
FILE2 = "drivers.blk.backend:Backend"  # the same class under another name
RAM = "drivers.blk.ram:RamBackend"
TARGET_MS = 50.0
#: kind -> (implementation before, implementation after); ``none`` and ``kill`` keep FILE
SWAPS: dict[str, tuple[str, str]] = {
    "file->ram": (FILE, RAM),
    "ram->file": (RAM, FILE),
    "file->file": (FILE, FILE2),
    "file2->file": (FILE2, FILE),
}
ROUND = ("none", "file->ram", "ram->file", "none", "file->file", "file2->file")
#: what the ``spawn`` runs start: the imports of a driver process (drivers/host.py + backends)
SPAWN = "import drivers.host, drivers.blk, drivers.blk.ram"
DRIVER_TOML = (
    '[driver.blk0]\nmodule = "drivers.blk"\nintensity = 100000\nperiod = 1.0\n'
    "watchdog_sec = 1.0\nrequest_timeout_sec = 10.0\n"
)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds of {', '.join(ROUND)} (default 50: 100 swaps of each kind; quick 3)",
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="length of each run's random phase (default 3, quick 2)",
    )
    ap.add_argument(
        "--probation", type=float, default=0.2, help="the swaps' probation in seconds (default 0.2)"
    )
    ap.add_argument(
        "--lead",
        type=int,
        default=1500,
        help="requests each device completes in a run before the swap (default 1500)",
    )


def _guests(s: Any, tag: str, seconds: float, seed: int) -> list[str]:
    """Two blkstress guests on g0.img / g1.img (the same files every run: no prefill, so a run
    verifies only what it wrote itself)."""
    names = []
    for i in range(2):
        name = f"{tag}-{i}"
        disk = f"target=g{i}.img, vdev=xvda, access=rw, backend=blk0, size=4M"
        cfg = s.domain_config(
            name,
            "blkstress",
            memory=8,
            on_poweroff="preserve",
            extra=f"ops=1000000000 seconds={seconds:g} qd=32 mix=60 "
            f"seed={seed + i} blocks=1024 timeout=30000",
            disk=[disk],
        )
        s.call("create", path=str(cfg))
        names.append(name)
    return names


def _finish(s: Any, sub: Subscriber, names: list[str]) -> list[dict[str, int]]:
    """Wait for every guest of ``names`` to end, read its summary, destroy it.  A guest that
    crashed or printed no summary counts as one error (the bench does not stop)."""
    ends: dict[str, tuple[str, dict[str, Any]]] = {}
    topics = {f"domain.{n}.{what}" for n in names for what in ("shutdown", "crashed")}
    while len(ends) < len(names):
        topic, p = wait_topic(sub, topics, 300)
        ends.setdefault(topic.split(".")[1], (topic, p))
    out = []
    for n in names:
        topic, p = ends[n]
        console = s.call("console", name=n)["data"].decode(errors="replace")
        try:
            sm = _summary(console)
        except RuntimeError:
            sm = {"ops": 0, "errors": 1, "mismatches": 0, "max_gap_us": 0}
        if topic.endswith("crashed") or p.get("code") != 0:
            sm["errors"] = max(1, sm.get("errors", 0))
            print(f"  guest {n} failed: {topic} {p}\n{console[-1500:]}", file=sys.stderr)
        out.append(sm)
    for n in names:
        s.cli("destroy", n)
        wait_topic(sub, {f"domain.{n}.destroyed"}, 60)
    return out


def _driver_row(s: Any) -> dict[str, Any]:
    return next(d for d in s.call("status")["drivers"] if d["name"] == "blk0")


def _kill(s: Any, sub: Subscriber) -> dict[str, Any]:
    """SIGKILL the serving instance (its warm spare is ready) and wait for the recovery."""
    pid = _driver_pid(s, warm=True)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        _topic, p = wait_topic(
            sub, {"driver.blk0.recovered"}, max(0.0, deadline - time.monotonic())
        )
        if p.get("old_pid") == pid:
            return {"outcome": "recovered", "stall_ms": float(p["recovery_ms"])}


def _one_run(
    s: Any, sub: Subscriber, no: int, kind: str, args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    _driver_pid(s, warm=True)  # the previous run's spare is up: it does not start meanwhile
    if kind in SWAPS:
        module = _driver_row(s)["module"]
        if module != SWAPS[kind][0]:
            raise RuntimeError(f"run {no} ({kind}): blk0 runs {module}, not {SWAPS[kind][0]}")
    load = os.getloadavg()[0]
    other = RunLoad(s.supervisor_pid)
    names = _guests(s, f"r{no}", seconds, seed=2 * no + 1)
    _wait_progress(s, {n: 0 for n in names}, args.lead)
    ev: dict[str, Any] = {}
    if kind in SWAPS:
        ev = swap(s.rd, "blk0", SWAPS[kind][1], probation=args.probation, wait=60)
    elif kind == "kill":
        ev = _kill(s, sub)
    elif kind == "spawn":
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", SPAWN], cwd=ROOT, check=True)
        ev = {"seconds": round(time.monotonic() - t0, 3)}
    after = _requests(s)
    sms = _finish(s, sub, names)
    other_pct = other.percent()
    gaps = [sm["max_gap_us"] / 1e3 for sm in sms]
    return {
        "run": no,
        "kind": kind,
        "stall_ms": max(gaps),
        "gaps_ms": gaps,
        "gaps_10ms": sum(sm.get("gaps_10ms", 0) for sm in sms),
        "ops": [sm["ops"] for sm in sms],
        "errors": sum(sm["errors"] for sm in sms),
        "mismatches": sum(sm.get("mismatches", 0) for sm in sms),
        # the swap / recovery was over while both random phases still went on
        "landed": all(sm["ops"] > after.get(n, 0) for sm, n in zip(sms, names, strict=True)),
        "outcome": ev.get("outcome"),
        "kernel_stall_ms": ev.get("stall_ms"),
        "drained_ms": ev.get("drained_ms"),
        "carried": ev.get("carried"),
        "swap_s": ev.get("seconds"),
        "error": ev.get("error"),
        "load1": load,
        "other_pct": round(other_pct, 1),
    }


class RunLoad:
    """CPU that processes other than this bench and its stack used during one run, in % of
    one CPU.  The stack's driver processes come and go (every swap starts two), so they are
    counted through the supervisor: its live descendants, plus ``children_*`` of the
    supervisor for those it already reaped."""

    def __init__(self, supervisor_pid: int | None) -> None:
        self.sup = supervisor_pid
        self.base = OtherLoad()
        self.stack0 = self._stack()

    def _stack(self) -> float:
        if self.sup is None:
            return 0.0
        try:
            sup = psutil.Process(self.sup)
            c = sup.cpu_times()
            total = c.user + c.system + c.children_user + c.children_system
            kids = sup.children(recursive=True)
        except psutil.Error:
            return 0.0
        for p in kids:
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                total += c.user + c.system
        return total

    def percent(self) -> float:
        wall = time.monotonic() - self.base.t0
        stack = self._stack() - self.stack0
        return max(0.0, self.base.percent() - stack / wall * 100) if wall > 0 else 0.0


def _stats(xs: list[float]) -> str:
    if not xs:
        return "no samples"
    return f"median {median(xs):.1f} ms, p99 {pctl(xs, 99):.1f} ms, max {max(xs):.1f} ms"


def measure(args: argparse.Namespace, res: Result) -> None:
    rounds = args.rounds or (3 if args.quick else 50)
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    runs: list[dict[str, Any]] = []
    with private_stack(2, extra_toml=DRIVER_TOML) as s, s.subscribe(["domain.", "driver."]) as sub:
        GATE.extra_pids = lambda: s.pids
        for rnd in range(rounds):
            GATE.wait()
            kinds = (*ROUND, "kill" if rnd % 2 == 0 else "spawn")
            for kind in kinds:
                r = _one_run(s, sub, len(runs), kind, args, seconds)
                runs.append(r)
                bad = (
                    r["errors"]
                    or r["mismatches"]
                    or not r["landed"]
                    or (kind in SWAPS and r["outcome"] != "swapped")
                )
                if bad:
                    print(f"  run {r['run']} {kind}: {r}", file=sys.stderr)
            done = [r for r in runs if r["kind"] in SWAPS]
            print(
                f"  round {rnd + 1}/{rounds}: {len(done)} swaps, stall median "
                f"{median([r['stall_ms'] for r in done]):.1f} ms, max "
                f"{max(r['stall_ms'] for r in done):.1f} ms; no swap median "
                f"{median([r['stall_ms'] for r in runs if r['kind'] == 'none']):.1f} ms; "
                f"load {os.getloadavg()[0]:.2f}, other processes "
                f"{median([r['other_pct'] for r in runs[-len(kinds) :]]):.0f} % of a CPU "
                "(median of the round's runs)",
                file=sys.stderr,
            )
        final_module = _driver_row(s)["module"]

    # Runs during which other processes used >= QUIET_PCT % of a CPU are left out of the
    # figures, as long as at least half of the runs of every kind remain.
    def quiet(r: dict[str, Any]) -> bool:
        return r["other_pct"] < QUIET_PCT

    kinds_run = {r["kind"] for r in runs}
    only_quiet = all(
        2 * sum(quiet(r) for r in runs if r["kind"] == k) >= sum(r["kind"] == k for r in runs)
        for k in kinds_run
    )
    n_quiet = sum(quiet(r) for r in runs)

    def sel(*kinds: str, key: str = "stall_ms") -> list[float]:
        return [
            float(r[key])
            for r in runs
            if r["kind"] in kinds
            and r["landed"]
            and r[key] is not None
            and (quiet(r) or not only_quiet)
            and (r["kind"] not in SWAPS or r["outcome"] == "swapped")
        ]

    base = sel("none")
    bmed = median(base)
    all_swaps = sel(*SWAPS)
    fr = sel("file->ram", "ram->file")
    ff = sel("file->file", "file2->file")
    kills = sel("kill")
    spawns = sel("spawn")
    swap_runs = [r for r in runs if r["kind"] in SWAPS]
    swapped = sum(r["outcome"] == "swapped" for r in swap_runs)
    not_landed = [r["run"] for r in runs if not r["landed"]]
    errors = sum(r["errors"] for r in runs)
    mism = sum(r["mismatches"] for r in runs)

    def ratio(xs: list[float]) -> str:
        return (
            (
                f"{median(xs) / bmed:.2f}x the no-swap median, p99 "
                f"{pctl(xs, 99) / pctl(base, 99):.2f}x the no-swap p99"
            )
            if xs
            else ""
        )

    def row(label: str, xs: list[float], n_what: str) -> Row:
        return Row(
            label,
            f"median {median(xs):.1f} ms" if xs else "-",
            f"p99 {pctl(xs, 99):.1f} ms, max {max(xs):.1f} ms over {len(xs)} {n_what}; " + ratio(xs)
            if xs
            else "no samples",
            f"p99 <= {TARGET_MS:g} ms",
            bool(xs) and pctl(xs, 99) <= TARGET_MS,
        )

    res.rows += [
        row("guest-visible stall, all swaps (longest gap between completions)", all_swaps, "swaps"),
        row("  file <-> memory (drivers.blk <-> drivers.blk.ram, data moved)", fr, "swaps"),
        row("  file <-> file (same class, another name: state only)", ff, "swaps"),
        Row(
            "baseline: same runs without a swap",
            f"median {bmed:.1f} ms",
            f"p99 {pctl(base, 99):.1f} ms, max {max(base):.1f} ms over {len(base)} runs "
            "(equal windows, interleaved)",
        ),
        Row(
            "comparison: crash recovery (SIGKILL, warm spare)",
            f"median {median(kills):.1f} ms" if kills else "-",
            (
                f"p99 {pctl(kills, 99):.1f} ms, max {max(kills):.1f} ms over {len(kills)} kills; "
                + ratio(kills)
            )
            if kills
            else "no samples",
        ),
        Row(
            "diagnostic: no swap, one driver-process start during the run",
            f"median {median(spawns):.1f} ms" if spawns else "-",
            (
                f"p99 {pctl(spawns, 99):.1f} ms, max {max(spawns):.1f} ms over {len(spawns)} "
                f"runs; {ratio(spawns)}; the process took median "
                f"{median(sel('spawn', key='swap_s')):.2f} s"
            )
            if spawns
            else "no samples",
        ),
        Row(
            "gaps > 10 ms per run (median, two guests)",
            f"{median(sel(*SWAPS, key='gaps_10ms')):.0f} with a swap" if all_swaps else "-",
            "; ".join(
                f"{median(xs):.0f} {what}"
                for what, xs in (
                    ("without", sel("none", key="gaps_10ms")),
                    ("with a kill", sel("kill", key="gaps_10ms")),
                    ("with a process start", sel("spawn", key="gaps_10ms")),
                )
                if xs
            ),
        ),
        Row(
            "kernel's stall (drain -> every device resumed), file <-> memory",
            f"median {median(sel('file->ram', 'ram->file', key='kernel_stall_ms')):.1f} ms"
            if fr
            else "-",
            _stats(sel("file->ram", "ram->file", key="kernel_stall_ms"))
            + "; drain alone "
            + _stats(sel("file->ram", "ram->file", key="drained_ms")),
        ),
        Row(
            "kernel's stall (drain -> every device resumed), file <-> file",
            f"median {median(sel('file->file', 'file2->file', key='kernel_stall_ms')):.1f} ms"
            if ff
            else "-",
            _stats(sel("file->file", "file2->file", key="kernel_stall_ms"))
            + "; drain alone "
            + _stats(sel("file->file", "file2->file", key="drained_ms")),
        ),
        Row(
            "requests carried over a swap",
            f"median {median(sel(*SWAPS, key='carried')):.0f}" if all_swaps else "-",
            f"max {max(sel(*SWAPS, key='carried')):.0f}" if all_swaps else "",
        ),
        Row(
            "swap command -> outcome (incl. loading and probation)",
            f"median {median(sel(*SWAPS, key='swap_s')):.2f} s" if all_swaps else "-",
            f"max {max(sel(*SWAPS, key='swap_s')):.2f} s; probation {args.probation:g} s"
            if all_swaps
            else "",
        ),
        Row(
            "swaps swapped",
            f"{swapped} of {len(swap_runs)}",
            "others rolled back / refused / failed"
            if swapped < len(swap_runs)
            else "none rolled back",
            "all",
            swapped == len(swap_runs),
        ),
        Row(
            "guest errors / mismatches",
            f"{errors} / {mism}",
            f"over {2 * len(runs)} guest runs ({len(runs)} runs of two guests)",
            "0",
            errors == 0 and mism == 0,
        ),
    ]
    if not_landed:
        res.rows.append(
            Row(
                "runs left out (swap over after a random phase ended)",
                str(len(not_landed)),
                f"runs {not_landed[:20]}",
            )
        )
    res.samples = {
        "runs": runs,
        "stall_swap_ms": all_swaps,
        "stall_file_ram_ms": fr,
        "stall_file_file_ms": ff,
        "stall_none_ms": base,
        "stall_kill_ms": kills,
        "stall_spawn_ms": spawns,
    }
    res.notes += [
        f"{rounds} rounds of {', '.join(ROUND)}, then a SIGKILL run (even rounds) or a "
        "driver-process start (odd rounds); "
        f"each run two blkstress guests (QD32, 60 % writes, 4 KiB, 1024 blocks, verify on) "
        f"on their own 4 MiB image files, random phase {seconds:g} s, the swap or kill once "
        f"both had completed {args.lead} requests; probation {args.probation:g} s",
        "stall of a run = the larger of the two guests' max_gap_us (the longest time between "
        "two polls that completed requests); the ratio is against the no-swap runs' median",
        f"blk0 ended on {final_module}",
        (
            f"figures from the {n_quiet} quiet runs of {len(runs)} (in the other "
            f"{len(runs) - n_quiet}, processes outside the bench and its stack used "
            f"{QUIET_PCT} % of a CPU or more)"
            if only_quiet
            else f"figures from all {len(runs)} runs: only {n_quiet} ran with other processes "
            f"below "
            f"{QUIET_PCT} % of a CPU, so disturbed runs are included"
        )
        + "; outcomes and errors always count every run",
    ]


if __name__ == "__main__":
    sys.exit(bench_main(NAME, TITLE, measure, add_args))
