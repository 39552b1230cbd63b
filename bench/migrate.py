"""Live migration, save and restore (issue 15): downtime, total time, rounds, pages.

Two private stacks on this machine (pcpus=2 each, `[migration] listen` on 127.0.0.1, keys and
peers files made here) move one guest back and forth with ``migrate``.  Workloads:

* ``idle``: ``ticker`` (asleep nearly always);
* ``clock``: ``clockcheck`` (busy on the CPU, a tiny writable working set, and it prints the
  wall-clock gap it saw across each move: the guest's own downtime);
* ``wws1m``: ``memwriter`` with a 1 MiB writable working set rewritten at 50 pages/ms (as Clark
  et al.'s MMuncher; it too prints its gap across each move);
* ``outrun``: ``memwriter`` flat out over half the guest's RAM: faster than the link, so it
  needs auto-converge (its CPU cap halved per round) to finish;
* ``blkstress``: verified disk I/O (QD32, 60 % writes, 4 KiB, a 4 MiB image both stacks see):
  its disk moves by reference and its ring with it; it must end with errors=0 and every block
  verified;
* ``blkdisks``: the same with ``--with-disks``: its 4 MiB image is copied to the other stack's
  ``[migration] disks`` directory at each move while it writes it.

For each guest size (16, 64, 256 MiB; ``--quick``: 16 and 64) and workload: total time, the
host's downtime (pause at the source -> the destination answered that the guest runs), the
guest's downtime (its own wall-clock gap), rounds, pages sent vs pages touched.  Target: 64 MiB
with a 1 MiB writable working set, host downtime p99 <= 50 ms over >= 50 migrations (Clark et
al.: 60 ms for Quake 3).  Comparison measured in the same run: moving the same guest by
``save`` + ``restore`` through a file (the downtime of a move that is not live).

Save and restore: a 64 MiB guest, sparse (``clockcheck``, ~60 KiB used: a guest that runs,
not one asleep, so its first instruction comes as soon as it can) and dense (``memwriter``
over 48 MiB): save time (the guest paused), snapshot size, and restore time to the guest's
first instruction (``resume_ms``: from the kernel receiving ``restore`` to the vCPU's first
run).  Target: p90 <= 10 ms for 64 MiB (Firecracker's resume target is 5 ms).  Restores are
lazy by default (``[kernel] restore = "lazy"``: the pager fills RAM while the guest runs); the
same-run comparison is a third stack with ``restore = "eager"`` (every page read and checked
before the first instruction), and each row also gives when ``restore`` answered (lazy: once
every page is in and checked).

    python3 bench/migrate.py [--quick] [--wait-quiet S] [--count N] [--sizes MIB ...]
                             [--workloads NAME ...] [--no-save]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    _STACK_CPU,
    GATE,
    PrivateStack,
    Result,
    Row,
    bench_main,
    machine_state,
    median,
    pctl,
)
from ipc.control import Client, ControlError
from ipc.peers import create_keys

NAME = "migrate"
TITLE = "Live migration, save and restore"
MIGRATION = (
    '[migration]\nlisten = "tcp://127.0.0.1:0"\ndisks = "disks"\n'
    '[driver.blk0]\nmodule = "drivers.blk"\n'
)

WORKLOADS: dict[str, tuple[str, str]] = {
    "idle": ("ticker", "interval_ms=1000"),
    "clock": ("clockcheck", "report_ms=1000"),
    "wws1m": ("memwriter", "wws_kib=1024 rate=50 seconds=100000 report_ms=100000"),
    "outrun": ("memwriter", "wws_kib={half} seconds=100000 report_ms=100000"),
    "blkstress": ("blkstress", "ops=400000 qd=32 mix=60 seed=7 blocks=1024 bs=4096 timeout=30000"),
    # the same, its image copied along at each move (--with-disks) instead of shared
    "blkdisks": ("blkstress", "ops=400000 qd=32 mix=60 seed=7 blocks=1024 bs=4096 timeout=30000"),
}


def _pair() -> tuple[PrivateStack, PrivateStack]:
    a = PrivateStack(2, extra_toml=MIGRATION, name="a", on_cpu=_STACK_CPU.append)
    b = PrivateStack(2, extra_toml=MIGRATION, name="b", on_cpu=_STACK_CPU.append)
    try:
        keys = [create_keys(s.dir / "keys")[0].public.decode() for s in (a, b)]
        a.up()
        b.up()
        ep = [Client(s.rd.kernel_control).call("ping")["migration"] for s in (a, b)]
        (a.dir / "peers").write_text(f"b {keys[1]} {ep[1]}\n")
        (b.dir / "peers").write_text(f"a {keys[0]} {ep[0]}\n")
    except BaseException:
        a.close()
        b.close()
        raise
    return a, b


def _migrate(src: PrivateStack, name: str, peer: str, **opts: Any) -> dict[str, Any]:
    sub = src.subscribe([f"domain.{name}.migration"])
    try:
        r = src.call("migrate", name=name, peer=peer, **opts)
        deadline = time.monotonic() + 300
        while True:
            ev = sub.recv(max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise TimeoutError(f"no outcome of migrating {name}")
            if ev[1].get("migration") == r["migration"]:
                return ev[1]
    finally:
        sub.close()


def _gap_ms(stack: PrivateStack, name: str, epoch: int) -> float | None:
    text = bytes(stack.call("console", name=name)["data"]).decode(errors="replace")
    m = re.findall(rf"moved epoch={epoch} gap_ns=(\d+)", text)
    return int(m[-1]) / 1e6 if m else None


def _wait_console(stack: PrivateStack, name: str, pattern: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, bytes(stack.call("console", name=name)["data"]).decode()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{name}: no {pattern!r} on the console")


def _run_migrations(
    a: PrivateStack, b: PrivateStack, size: int, wl: str, count: int, res: Result
) -> dict[str, Any]:
    image, extra = WORKLOADS[wl]
    extra = extra.format(half=size * 1024 // 2)
    name = f"{wl}{size}"
    keys: dict[str, Any] = {}
    if image == "blkstress":
        img = a.dir / f"{name}.img"
        keys = {
            "disk": [f"target={img}, vdev=xvda, access=rw, backend=blk0, size=4M"],
            "on_poweroff": "preserve",
        }
    a.create(a.domain_config(name, image, size, extra=extra, **keys))
    if image == "memwriter":
        time.sleep(0.5)  # (it fills its working set first)
    else:
        _wait_console(a, name, r"\S")
    where = [a, b]
    rows: list[dict[str, Any]] = []
    for i in range(count):
        GATE.wait()
        src, dst = where[i % 2], where[(i + 1) % 2]
        if image == "blkstress" and src.domains()[name]["exit_kind"]:
            break  # it finished its run: no more moves
        try:
            out = _migrate(
                src,
                name,
                "b" if i % 2 == 0 else "a",
                max_downtime_ms=30.0,
                with_disks=wl == "blkdisks",
            )
        except ControlError:
            if image == "blkstress" and src.domains()[name]["exit_kind"]:
                break  # it finished between the check and the move
            raise
        if out["outcome"] != "migrated":
            raise RuntimeError(f"{name}: migration {i + 1} failed: {out['reason']}")
        if image != "ticker":
            time.sleep(0.05)
            out["guest_gap_ms"] = _gap_ms(dst, name, i + 1)
        rows.append(out)
    here = where[len(rows) % 2]
    verified = ""
    if image == "blkstress":
        deadline = time.monotonic() + 120
        while not here.domains()[name]["exit_kind"] and time.monotonic() < deadline:
            time.sleep(0.2)
        text = bytes(here.call("console", name=name)["data"]).decode(errors="replace")
        m = re.search(r"blkstress: ops=\d+ errors=(\d+) .* mismatches=(\d+)", text)
        if not m or m.groups() != ("0", "0"):
            raise RuntimeError(f"{name}: not verified after the moves:\n{text[-600:]}")
        verified = "; errors=0, every block verified"
    here.call("destroy", name=name)
    count = len(rows)
    down = [r["downtime_ms"] for r in rows]
    total = [r["total_ms"] for r in rows]
    gaps = [g for r in rows if (g := r.get("guest_gap_ms")) is not None]
    summary = {
        "size": size,
        "workload": wl,
        "count": count,
        "downtime_median": median(down),
        "downtime_p99": pctl(down, 99),
        "downtime_max": max(down),
        "total_median": median(total),
        "rounds_median": median([r["rounds"] for r in rows]),
        "sent_median": median([r["pages_sent"] for r in rows]),
        "touched_median": median([r["pages_touched"] for r in rows]),
        "throttle_max": max(r["throttle"] for r in rows),
        "disk_blocks_median": median([r.get("disk_blocks", 0) for r in rows]),
        "last_disk_blocks_median": median([r.get("last_disk_blocks", 0) for r in rows]),
        "guest_gap_median": median(gaps) if gaps else None,
        "guest_gap_max": max(gaps) if gaps else None,
    }
    res.samples[name] = {"summary": summary, "migrations": rows}
    gap = (
        f"; guest's own gap median {summary['guest_gap_median']:.1f} ms, max "
        f"{summary['guest_gap_max']:.1f} ms"
        if gaps
        else ""
    )
    target, met = "", None
    if size == 64 and wl == "wws1m":
        target, met = "p99 <= 50 ms over >= 50", summary["downtime_p99"] <= 50 and count >= 50
    res.rows.append(
        Row(
            f"migrate {size} MiB {wl} (n={count})",
            f"downtime median {summary['downtime_median']:.1f} ms, p99 "
            f"{summary['downtime_p99']:.1f} ms; total {summary['total_median']:.0f} ms; "
            f"{summary['rounds_median']:g} rounds, {summary['sent_median']:g} pages sent / "
            f"{summary['touched_median']:g} touched"
            + (f"; throttled to {summary['throttle_max']}%" if summary["throttle_max"] else "")
            + (
                f"; {summary['disk_blocks_median']:g} disk blocks copied "
                f"({summary['last_disk_blocks_median']:g} in the stop-and-copy)"
                if summary["disk_blocks_median"]
                else ""
            )
            + gap
            + verified,
            "",
            target,
            met,
        )
    )
    return summary


def _save_restore(a: PrivateStack, dense: bool, count: int, res: Result, mode: str) -> None:
    """Save and restore in stack ``a``, whose ``[kernel] restore`` is ``mode``."""
    name = "dense" if dense else "sparse"
    image, extra = (
        ("memwriter", "wws_kib=49152 seconds=100000 report_ms=100000")
        if dense
        else ("clockcheck", "report_ms=1000")
    )
    cfg = a.domain_config(name, image, 64, extra=extra)
    snap = a.dir / f"{name}.snap"
    saves, resumes, answers, sizes = [], [], [], []
    a.create(cfg)
    time.sleep(1.0 if dense else 0.2)
    for _ in range(count):
        GATE.wait()
        r = a.call("save", name=name, path=str(snap))
        saves.append(r["ms"])
        sizes.append(r["bytes"])
        t0 = time.perf_counter()
        a.call("restore", path=str(snap))
        answers.append((time.perf_counter() - t0) * 1000)
        deadline = time.monotonic() + 30
        while (ms := a.domains()[name]["resume_ms"]) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ms is not None
        resumes.append(ms)
    a.call("destroy", name=name)
    snap.unlink(missing_ok=True)
    res.samples[f"save_restore_{name}_{mode}"] = {
        "save_ms": saves,
        "resume_ms": resumes,
        "answer_ms": answers,
        "bytes": sizes,
    }
    res.rows.append(
        Row(
            f"save + restore 64 MiB {name}, {mode} restore (n={count})",
            f"save median {median(saves):.1f} ms ({median(sizes) / 2**20:.1f} MiB file); "
            f"restore to first instruction median {median(resumes):.1f} ms, p90 "
            f"{pctl(resumes, 90):.1f} ms; `restore` answered (every page in and checked) "
            f"median {median(answers):.1f} ms",
            "",
            "restore p90 <= 10 ms",
            pctl(resumes, 90) <= 10,
        )
    )
    if mode == "lazy":
        res.rows.append(
            Row(
                f"move by save + restore, 64 MiB {name}",
                f"the guest stopped {median(saves) + median(answers):.1f} ms (median save + "
                "restore answered: its hypercalls wait until then)",
                "the non-live baseline for the downtimes above",
            )
        )


def measure(args: argparse.Namespace, res: Result) -> None:
    res.samples["machine"] = machine_state()
    sizes = args.sizes or ([16, 64] if args.quick else [16, 64, 256])
    workloads = list(WORKLOADS) if args.workloads is None else args.workloads
    few = args.count or (3 if args.quick else 10)
    many = args.count or (10 if args.quick else 50)
    a, b = _pair()
    GATE.extra_pids = lambda: [*a.pids, *b.pids]  # our own stacks are not "other" load
    try:
        for size in sizes:
            for wl in workloads:
                n = many if (size == 64 and wl == "wws1m") else few
                _run_migrations(a, b, size, wl, n, res)
        for dense in (False, True) if not args.no_save else ():
            _save_restore(a, dense, few, res, "lazy")
        if not args.no_save:  # the comparison: every page read and checked first
            e = PrivateStack(2, name="e", on_cpu=_STACK_CPU.append, restore="eager")
            GATE.extra_pids = lambda: [*a.pids, *b.pids, *e.pids]
            try:
                e.up()
                for dense in (False, True):
                    _save_restore(e, dense, few, res, "eager")
            finally:
                e.close()
    finally:
        a.close()
        b.close()
    res.notes.append(
        "downtime = the host's view: from pausing the guest at the source to the destination's "
        "answer that it runs; the guest's own gap is its wall clock across the move"
    )
    res.notes.append(
        "blkstress: the host's downtime includes its driver letting the disk go and the "
        "device region (4 MiB: rings, in-flight log, data window) sent in the commit"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--count", type=int, default=0, help="migrations per case (default 10/50)")
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="guest sizes in MiB (16 64 256)"
    )
    ap.add_argument(
        "--workloads",
        nargs="*",
        choices=list(WORKLOADS),
        default=None,
        help="default: all; none (the option alone): save and restore only",
    )
    ap.add_argument("--no-save", action="store_true", help="leave out save and restore")


if __name__ == "__main__":
    sys.exit(bench_main(NAME, TITLE, measure, add_args))
