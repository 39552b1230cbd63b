"""Where a round trip's microseconds go: the I/O path stage by stage, from timestamps.

With ``ISOVISOR_IOTRACE`` set, the kernel and every driver process write a record at each stage
of the path (``ipc/iotrace.py``): the guest's kick, the doorbell rung, the driver waking, the
backend called, the backend's notification, the kernel taking it, the guest woken, the vCPU
running again, the upcall.  The clock is ``CLOCK_MONOTONIC`` in every process, so the records
merge into one timeline.  At queue depth 1 that timeline is a strict sequence, and the time
between two consecutive records is the cost of one step: this bench prints the median and p90
of each step (the ones that make up at least 1 % of the runs), and what the steps add up to per
request against the request's round trip (kick to the next kick of the same device).

Scenarios, each in a private stack (pcpus=2) with tracing on, its driver in its own process:

* ``blk``: a blkstress guest, 4 KiB random reads at QD1 on a 64 MiB in-memory disk of
  ``drivers.blk``;
* ``net``: two netecho guests on one bridge of ``drivers.net``, the client sending one UDP echo
  request at a time (guest <-> guest RTT);
* ``host``: UDP echo requests, one at a time, from this process in a network namespace through
  the switch's TAP uplink to a netecho guest (root only; skipped with the reason otherwise).
  Its "round trip" is the guest's: one kick of the guest's vif to the next, and the host's own
  RTT is given beside it.

Tracing costs about half a microsecond a record (a dozen records a request), so the sums are a
little above the untraced figures of ``bench/blk.py`` and ``bench/net.py``.

    python3 bench/iopath.py [--quick] [--scenario blk|net|host|all] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from _common import (
    OtherLoad,
    QuietGate,
    fmt_load,
    machine_state,
    median,
    parse_kv,
    pctl,
    private_stack,
    wait_topic,
)

from ipc import iotrace
from ipc.iotrace import Stage

#: What each stage is, for the table (who does it: kernel K, driver D).
WHAT = {
    Stage.KICK: "K guest kicks",
    Stage.KICKED: "K doorbell rung",
    Stage.DRIVER_WAKE: "D driver wakes",
    Stage.DRIVER_KICK: "D backend called",
    Stage.DRIVER_NOTIFY: "D backend notifies",
    Stage.NOTIFIED: "K notification taken",
    Stage.WOKEN: "K guest woken",
    Stage.RUN: "K vCPU runs",
    Stage.SLEEP: "K guest sleeps",
    Stage.UPCALL: "K upcall entered",
}


def steps(records: list[tuple[int, int, Stage, int]]) -> dict[tuple[Stage, Stage], list[int]]:
    """Gaps between consecutive records, by (from stage, to stage)."""
    out: dict[tuple[Stage, Stage], list[int]] = defaultdict(list)
    for (t0, _, s0, _), (t1, _, s1, _) in itertools.pairwise(records):
        out[(s0, s1)].append(t1 - t0)
    return out


def round_trips(records: list[tuple[int, int, Stage, int]]) -> list[int]:
    """Kick to the next kick of the same device."""
    last: dict[int, int] = {}
    out: list[int] = []
    for t, _, stage, key in records:
        if stage is Stage.KICK:
            if key in last:
                out.append(t - last[key])
            last[key] = t
    return out


def analyse(records: list[tuple[int, int, Stage, int]]) -> dict[str, Any]:
    """The steps that make up a round trip, in the order they usually come."""
    rts = round_trips(records)
    by_step = steps(records)
    kicks = max(1, sum(1 for r in records if r[2] is Stage.KICK))
    rows = []
    for (s0, s1), gaps in by_step.items():
        if len(gaps) < kicks / 100:
            continue
        rows.append(
            {
                "from": s0.name,
                "to": s1.name,
                "what": f"{WHAT[s0]} -> {WHAT[s1]}",
                "count": len(gaps),
                "per_request": len(gaps) / kicks,
                "median_us": median(gaps) / 1e3,
                "p90_us": pctl(gaps, 90) / 1e3,
                "us_per_request": sum(gaps) / kicks / 1e3,
            }
        )
    rows.sort(key=lambda r: -r["us_per_request"])
    return {
        "requests": kicks,
        "round_trip_median_us": median(rts) / 1e3 if rts else 0.0,
        "round_trip_p90_us": pctl(rts, 90) / 1e3 if rts else 0.0,
        "steps": rows,
    }


def guests_to_the_end(drivers: str, guests: list[tuple[str, str]], last: str) -> str:
    """A private stack with ``drivers``; create each ``(name, config body)`` in turn, wait
    until ``last`` shuts down (it is preserved) and return its console output."""
    with private_stack(2, extra_toml=drivers) as s:
        sub = s.subscribe(["domain."])
        for name, body in guests:
            cfg = s.dir / f"{name}.toml"
            cfg.write_text(f'name = "{name}"\n{body}')
            s.call("create", path=str(cfg))
        wait_topic(sub, {f"domain.{last}.shutdown", f"domain.{last}.crashed"}, 300)
        return bytes(s.call("console", name=last)["data"]).decode(errors="replace")


def run_blk(quick: bool, trace_dir: Path) -> dict[str, Any]:
    ops = 1000 if quick else 5000
    disk = "type=memory, size=64M, vdev=xvda, access=rw, backend=blk0"
    out = guests_to_the_end(
        '[driver.blk0]\nmodule = "drivers.blk"\n',
        [
            (
                "bq1",
                'image = "blkstress"\nmemory = 16\non_poweroff = "preserve"\n'
                f"disk = {json.dumps([disk])}\n"
                f'extra = "ops={ops} bs=4096 qd=1 mix=0 blocks=16384 verify_all=0 seed=1"\n',
            )
        ],
        "bq1",
    )
    kv = parse_kv(next(ln for ln in out.splitlines() if "blkstress: ops=" in ln))
    result = analyse(iotrace.read(trace_dir))
    result["guest_iops"] = int(kv["ops"]) * 1e9 / int(kv["ns"])
    return result


def run_net(quick: bool, trace_dir: Path) -> dict[str, Any]:
    count = 500 if quick else 3000
    out = guests_to_the_end(
        '[driver.net0]\nmodule = "drivers.net"\n',
        [
            (
                "srv",
                'image = "netecho"\nmemory = 8\n'
                'vif = ["mac=02:00:00:00:01:02, bridge=br1, ip=198.18.1.2, backend=net0"]\n'
                'extra = "mode=server"\n',
            ),
            (
                "cli",
                'image = "netecho"\nmemory = 8\non_poweroff = "preserve"\n'
                'vif = ["mac=02:00:00:00:01:03, bridge=br1, ip=198.18.1.3, backend=net0"]\n'
                f'extra = "mode=client peer=198.18.1.2 count={count} size=64 quit=1"\n',
            ),
        ],
        "cli",
    )
    line = next((ln for ln in out.splitlines() if "rtt_us_median" in ln), "")
    result = analyse(iotrace.read(trace_dir))
    result["guest_rtt_us_median"] = float(parse_kv(line).get("rtt_us_median", "nan"))
    return result


def run_host(quick: bool, trace_dir: Path) -> dict[str, Any]:
    import net as netbench

    from isovisor import nettools

    problem = nettools.privilege_problem()
    if problem is not None:
        return {"skipped": problem}
    count = 500 if quick else 3000
    netns, tap = f"ivio-{os.getpid()}", f"ivio{os.getpid()}"[:15]
    with private_stack(2, extra_toml=netbench.driver_toml(netns, tap)) as s:
        netbench._server(s, "echo", netbench.ECHO_MAC, "br0", netbench.ECHO_IP)
        netbench._wait_up(s, ["echo"])
        nettools.udp_echo(netbench.ECHO_IP, 7, [b"warm-up"] * 10, netns=netns, timeout=2.0)
        start = time.monotonic_ns()  # the start and the warm-up are not measured
        got = nettools.udp_echo(
            netbench.ECHO_IP, 7, [os.urandom(64) for _ in range(count)], netns=netns
        )
        records = [r for r in iotrace.read(trace_dir) if r[0] >= start]
    rtts = [rtt * 1000 for _, rtt in got if rtt is not None]
    result = analyse(records)
    result["host_rtt_us_median"] = median(rtts) if rtts else float("nan")
    result["lost"] = count - len(rtts)
    return result


def show(name: str, r: dict[str, Any]) -> None:
    if "skipped" in r:
        print(f"\n{name}: skipped: {r['skipped']}")
        return
    print(
        f"\n{name}: {r['requests']} kicks; round trip (kick to next kick of the device) "
        f"median {r['round_trip_median_us']:.1f} us, p90 {r['round_trip_p90_us']:.1f} us"
    )
    for k in ("guest_iops", "guest_rtt_us_median", "host_rtt_us_median", "lost"):
        if k in r:
            print(f"  guest's own figure: {k} = {r[k]:,.1f}")
    print(f"  {'step':<58} {'per req':>7} {'median':>9} {'p90':>9} {'us/req':>8}")
    total = 0.0
    for row in r["steps"]:
        total += row["us_per_request"]
        print(
            f"  {row['what']:<58} {row['per_request']:7.2f} {row['median_us']:8.1f}u "
            f"{row['p90_us']:8.1f}u {row['us_per_request']:8.1f}"
        )
    print(f"  {'sum of the steps shown':<58} {'':7} {'':9} {'':9} {total:8.1f}")
    if "load" in r:
        ld = r["load"]
        print(
            f"  load average before/after: {ld['before']} / {ld['after']}; processes other "
            f"than this one and the stack's used {ld['other_pct']:.0f}% of one CPU"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scenario", choices=("blk", "net", "host", "all"), default="all")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S")
    args = ap.parse_args()
    if iotrace.ENV in os.environ:
        print(f"bench/iopath.py: unset {iotrace.ENV} first", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"machine": machine_state()}
    runners = {"blk": run_blk, "net": run_net, "host": run_host}
    for name, fn in runners.items():
        if args.scenario not in (name, "all"):
            continue
        QuietGate(args.wait_quiet).wait()
        load0 = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="isovisor-iotrace-") as d:
            os.environ[iotrace.ENV] = d
            other = OtherLoad([])
            try:
                results[name] = fn(args.quick, Path(d))
            finally:
                del os.environ[iotrace.ENV]
        results[name]["load"] = {
            "before": fmt_load(load0),
            "after": fmt_load(os.getloadavg()),
            "other_pct": other.percent(),
        }
        show(name, results[name])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
