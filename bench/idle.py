"""Idle CPU: what the default stack costs once its guests are done.

The stack of ``supervisor.toml`` (its kernel settings, drivers and ``[domains] start`` list) is
started as a private stack; once every domain but the ticker (which runs until stopped, one
tick a second) has shut down and ``--settle`` seconds have passed, the CPU time of every
process of the stack (supervisor, kernel, pager, driver processes and their warm spares) is
read over ``--seconds`` seconds, from ``/proc`` through psutil, and given as a percentage of
one core; the kernel's threads are listed one by one.  For comparison the same figure is
given for this bench's own Python process sleeping in ``time.sleep`` over the same window (a
floor: what doing nothing costs an interpreter here).

Target (issue 16): the whole idle stack under 2 % of one core.

    python3 bench/idle.py [--seconds S] [--settle S] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import psutil
from _common import machine_state, wait_topic

from isovisor.privstack import PrivateStack

ROOT = Path(__file__).resolve().parent.parent
TARGET_PCT = 2.0


def stack_toml() -> tuple[int, str, str | None, list[Path]]:
    """pcpus, the driver tables, the console driver and the domain configs of the default
    stack."""
    cfg = tomllib.loads((ROOT / "supervisor.toml").read_text())
    pcpus = int(cfg.get("kernel", {}).get("pcpus", 2))
    extra = ""
    for name, table in cfg.get("driver", {}).items():
        extra += f"[driver.{name}]\n"
        for k, v in table.items():
            if not isinstance(v, dict):
                extra += f"{k} = {json.dumps(v)}\n"
    domains = cfg.get("domains", {})
    return pcpus, extra, domains.get("console"), [ROOT / p for p in domains.get("start", [])]


def cpu_of(pids: list[int]) -> dict[int, tuple[str, float, dict[str, float]]]:
    """pid -> (name, CPU seconds, per-thread CPU seconds by thread name)."""
    out: dict[int, tuple[str, float, dict[str, float]]] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            threads: dict[str, float] = {}
            for th in p.threads():
                try:
                    name = Path(f"/proc/{pid}/task/{th.id}/comm").read_text().strip()
                except OSError:
                    name = str(th.id)
                threads[f"{name}/{th.id}"] = th.user_time + th.system_time
            cmd = " ".join(p.cmdline()[1:4])
            out[pid] = (cmd, t.user + t.system, threads)
        except psutil.Error:
            continue
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    pcpus, extra, console, configs = stack_toml()
    result: dict[str, Any] = {"machine": machine_state()}
    with PrivateStack(pcpus, extra_toml=extra, console=console) as s:
        for c in configs:
            (s.dir / c.name).write_text(c.read_text())
        s.up([s.dir / c.name for c in configs])
        sub = s.subscribe(["domain."])
        listed = s.domains()  # (after subscribing: an exit from now on is an event)
        waiting = {n for n, d in listed.items() if n != "ticker" and d.get("exit_kind") is None}
        print(f"waiting for {', '.join(sorted(waiting)) or 'nothing'} to finish", flush=True)
        deadline = time.monotonic() + 600
        while waiting:
            topic, _ = wait_topic(
                sub,
                {f"domain.{n}.{e}" for n in waiting for e in ("shutdown", "destroyed", "crashed")},
                deadline - time.monotonic(),
            )
            waiting.discard(topic.split(".")[1])
        time.sleep(args.settle)  # the last exits' clean-up
        s._note_pids()
        pids = list(s.pids)
        before = cpu_of(pids)
        t0 = time.monotonic()
        me0 = psutil.Process().cpu_times()
        time.sleep(args.seconds)
        me1 = psutil.Process().cpu_times()
        wall = time.monotonic() - t0
        after = cpu_of(pids)
    rows = []
    total = 0.0
    for pid, (cmd, cpu, threads) in after.items():
        if pid not in before:
            continue
        used = cpu - before[pid][1]
        total += used
        per_thread = {n: (v - before[pid][2].get(n, 0.0)) / wall * 100 for n, v in threads.items()}
        rows.append({"pid": pid, "cmd": cmd, "pct": used / wall * 100, "threads": per_thread})
    rows.sort(key=lambda r: -r["pct"])
    result["stack_pct"] = total / wall * 100
    result["sleeper_pct"] = (me1.user + me1.system - me0.user - me0.system) / wall * 100
    result["processes"] = rows
    print(
        f"idle stack: {result['stack_pct']:.2f} % of one core over {wall:.0f} s "
        f"(target < {TARGET_PCT} %); this bench process sleeping: "
        f"{result['sleeper_pct']:.2f} %"
    )
    for r in rows:
        print(f"  {r['pct']:6.2f} %  pid {r['pid']:>7}  {r['cmd'][:90]}")
        if len(r["threads"]) > 1:
            for n, v in sorted(r["threads"].items(), key=lambda kv: -kv[1]):
                if v >= 0.01:
                    print(f"             {v:6.2f} %  thread {n}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["stack_pct"] < TARGET_PCT else 1


if __name__ == "__main__":
    sys.exit(main())
