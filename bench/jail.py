"""The driver jail's cost: the same driver jailed (``isolation = "process"``) and unjailed
(``"process-unjailed"``), measured in one run, alternating.

A private stack (pcpus=2) per round runs ``[driver.rng0]`` (drivers.rng, warm spare on) and two
``rngtest`` guests reading random bytes and checking them.  Per round:

* **Spare start**: after each SIGKILL the supervisor starts a new warm spare; the time from its
  ``driver.rng0.spawn`` event (``spare``) to the kernel's ``driver.rng0.spare`` event (the new
  process has imported its backend, entered its jail or not, and said it is ready), both as
  this process receives them.
* **Recovery**: SIGKILL of the active instance once its spare is ready, while both guests read;
  from just before ``os.kill`` to ``done_ns`` of the kernel's ``driver.rng0.replayed`` event
  (the replacement has re-attached both devices and published the responses it redid).
* **Hot-swap stall**: ``isovisor driver swap rng0 --to drivers.rng`` a few times; the stall the
  supervisor measured (``stall_ms``).

A guest that ends during the run, or whose console shows a failed read or bytes that fail
its checks, fails the run.  Block drivers are not jailed yet (docs/jail.md), so the
entropy driver stands in for the class-independent part of the cost (the jail's set-up at
start, and the uid, the mount namespace and the limits on the recovery path).

    python3 bench/jail.py [--quick] [--kills N] [--swaps N]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from typing import Any

from _common import Result, Row, bench_main, median, pctl, private_stack, wait_topic

from ipc.events import Subscriber

NAME = "jail"
TITLE = "Driver jail: the entropy driver jailed vs unjailed (spare start, recovery, hot swap)"
MODES = ("process", "process-unjailed")
#: What rngtest prints of a failed read, a stop, or bytes that fail its checks.
BAD = r"failed|stopped|all bytes are equal|a repeat of"


def driver_toml(isolation: str) -> str:
    return (
        f'[driver.rng0]\nmodule = "drivers.rng"\nisolation = "{isolation}"\n'
        "intensity = 100000\nperiod = 1.0\nwatchdog_sec = 1.0\n"
    )


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--kills", type=int, default=0, help="SIGKILLs per mode (default 200)")
    ap.add_argument("--swaps", type=int, default=0, help="hot swaps per mode (default 20)")
    ap.add_argument("--rounds", type=int, default=0, help="stacks per mode (default 4)")


def _status(s: Any) -> dict[str, Any]:
    return next(d for d in s.call("status")["drivers"] if d["name"] == "rng0")


def _warm(s: Any, timeout: float = 30) -> int:
    """The active instance's pid once its spare is ready."""
    deadline = time.monotonic() + timeout
    while True:
        d = _status(s)
        if d.get("state") == "RUNNING" and isinstance(d.get("pid"), int) and d.get("spare_ready"):
            return int(d["pid"])
        if time.monotonic() > deadline:
            raise RuntimeError("rng0 has no warm spare")
        time.sleep(0.02)  # a status poll: readiness has its event, but not the state's end


def _requests(s: Any) -> int:
    return sum(d["requests"] for d in s.call("devices")["devices"])


def _progress(s: Any, need: int = 200, timeout: float = 30) -> None:
    start = _requests(s)
    deadline = time.monotonic() + timeout
    while _requests(s) < start + need:
        if time.monotonic() > deadline:
            raise RuntimeError("the guests stopped reading")
        time.sleep(0.02)  # a status poll: there is no event per request


def _kill(s: Any, sub: Subscriber) -> tuple[float, float | None]:
    """One SIGKILL: (kill -> redone responses published, ms; the next spare's start, ms)."""
    pid = _warm(s)
    _progress(s)
    t_kill = time.monotonic_ns()
    os.kill(pid, signal.SIGKILL)
    done: float | None = None
    spawned: int | None = None
    spare_ms: float | None = None
    deadline = time.monotonic() + 30
    while done is None or spare_ms is None:
        ev = sub.recv(max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise RuntimeError(f"no recovery of pid {pid} (or no new spare) within 30 s")
        topic, p = ev
        if topic.startswith("domain.") and topic.endswith((".crashed", ".shutdown")):
            raise RuntimeError(f"a guest ended during the run: {topic} {p}")
        now = time.monotonic_ns()
        if topic == "driver.rng0.replayed" and p.get("pid") != pid and done is None:
            done = (p["done_ns"] - t_kill) / 1e6
        elif topic == "driver.rng0.spawn" and p.get("spare") and spawned is None:
            spawned = now
        elif topic == "driver.rng0.spare" and spawned is not None and spare_ms is None:
            spare_ms = (now - spawned) / 1e6
    return done, spare_ms


def _round(isolation: str, kills: int, swaps: int, out: dict[str, list[float]]) -> None:
    with private_stack(2, extra_toml=driver_toml(isolation)) as s:
        names = ["r0", "r1"]
        for n in names:
            cfg = s.domain_config(
                n,
                "rngtest",
                memory=4,
                on_poweroff="preserve",
                extra="reads=100000000 size=64",
                rng=["backend=rng0"],
            )
            s.create(cfg)
        with s.subscribe(["driver.rng0.", "domain."]) as sub:
            _progress(s, 500)
            for _ in range(kills):
                done, spare = _kill(s, sub)
                out[f"{isolation} recovery"].append(done)
                if spare is not None:
                    out[f"{isolation} spare"].append(spare)
            for _ in range(swaps):
                _warm(s)
                _progress(s)
                r = s.cli("driver", "swap", "rng0", "--to", "drivers.rng", "--json")
                if r.returncode != 0:
                    raise RuntimeError(f"swap failed: {r.stdout}{r.stderr}")
                m = re.search(r'"stall_ms":\s*([0-9.]+)', r.stdout)
                if m:
                    out[f"{isolation} swap stall"].append(float(m.group(1)))
            for n in names:  # every read so far answered, and with good bytes
                con = s.call("console", name=n)["data"].decode()
                bad = [ln for ln in con.splitlines() if re.search(BAD, ln)]
                if bad:
                    raise RuntimeError(f"guest {n} saw bad reads: {bad[:5]}")
                s.cli("destroy", n)
                wait_topic(sub, {f"domain.{n}.destroyed"}, 60)


def measure(args: argparse.Namespace, res: Result) -> None:
    kills = args.kills or (10 if args.quick else 200)
    swaps = args.swaps if args.swaps else (2 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 4)
    out: dict[str, list[float]] = {
        f"{m} {k}": [] for m in MODES for k in ("recovery", "spare", "swap stall")
    }
    per_kills = max(1, kills // rounds)
    per_swaps = max(1, swaps // rounds) if swaps else 0
    for _ in range(rounds):  # alternating, so both modes see the same machine
        for mode in MODES:
            _round(mode, per_kills, per_swaps, out)
    for what, unit in (("recovery", "SIGKILL -> redone responses"), ("spare", "spare start")):
        j, u = out[f"process {what}"], out[f"process-unjailed {what}"]
        for mode, xs in (("jailed", j), ("unjailed", u)):
            res.rows.append(
                Row(
                    f"{unit}, {mode} (median)",
                    f"{median(xs):.2f} ms",
                    f"p99 {pctl(xs, 99):.2f} ms over {len(xs)}",
                )
            )
        res.rows.append(
            Row(
                f"{unit}: jailed / unjailed",
                f"median {median(j) / median(u):.2f}x, p99 {pctl(j, 99) / pctl(u, 99):.2f}x",
                target="<= 1.10" if what == "recovery" else "",
                met=(pctl(j, 99) / pctl(u, 99) <= 1.10) if what == "recovery" else None,
            )
        )
    j, u = out["process swap stall"], out["process-unjailed swap stall"]
    if j and u:
        res.rows.append(
            Row(
                "hot-swap stall, jailed / unjailed (p99)",
                f"{pctl(j, 99):.2f} / {pctl(u, 99):.2f} ms",
                f"medians {median(j):.2f} / {median(u):.2f} ms over {len(j)} / {len(u)} swaps",
                "<= 1.10x",
                pctl(j, 99) <= 1.10 * pctl(u, 99),
            )
        )
    res.samples = out
    res.notes.append(
        "two rngtest guests (64-byte reads, checked) on [driver.rng0] with a warm spare; "
        f"{rounds} stack(s) per mode, alternating; guests destroyed at the end of each round"
    )


if __name__ == "__main__":
    sys.exit(bench_main(NAME, TITLE, measure, add_args))
