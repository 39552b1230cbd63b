"""The entropy device (class ``rng``, drivers.rng) end to end: two `rngtest` guests read random
bytes continuously through one driver process while it is killed with SIGKILL, stopped with
SIGSTOP (a hang), hot-swapped, and given faults.  What it gets from the framework, with no code
of its own: every request answered exactly once (a lost one would stall a guest, a doubled one
is a frontend fault), the guests finishing with errors=0, and its rows in `isovisor devices`."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from isovisor.campaign.plan import load_plan
from isovisor.cli.swapclient import swap
from isovisor.paths import RunDir
from tests.conftest import ROOT, Stack, wait_until
from tests.test_campaign_drivers import run_campaign
from tests.test_recovery import Events, driver_row, kill_with_a_warm_spare

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

DRIVER = """[driver.rng0]
module = "drivers.rng"
watchdog_sec = 1.0
request_timeout_sec = 3.0
intensity = 20
period = 60.0
"""
READS = 12_000  # per guest: the kills, the swap and the waits between them take ~3,500 of them
RNG_PLAN = ROOT / "examples" / "campaign-rng.toml"


def summary(console: str) -> dict[str, int]:
    line = [ln for ln in console.splitlines() if ln.startswith("rngtest: reads=")]
    assert line, f"no rngtest summary line in:\n{console}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line[-1])}


def requests(stack: Stack) -> int:
    return sum(d["requests"] for d in stack.call("devices")["devices"])


@contextmanager
def two_guests(stack: Stack, reads: int = READS, driver: str = DRIVER) -> Iterator[Events]:
    cfgs = [
        stack.domain_config(
            n,
            "rngtest",
            memory=4,
            on_poweroff="preserve",
            on_crash="preserve",
            extra=f"reads={reads} size=64",
            rng=["backend=rng0"],
        )
        for n in ("r1", "r2")
    ]
    stack.up([], extra=driver)
    with stack.subscribe(["domain.", "driver.", "device."]) as sub:
        events = Events(sub, stack)
        for cfg in cfgs:
            stack.create(cfg)
        wait_until(
            lambda: len(stack.call("devices")["devices"]) == 2 and requests(stack) > 500,
            timeout=60,
            what="both guests reading random bytes",
        )
        yield events


def more(stack: Stack, n: int = 500) -> None:
    start = requests(stack)
    wait_until(lambda: requests(stack) > start + n, timeout=30, what=f"{n} more requests served")


def finish(stack: Stack, events: Events, reads: int = READS) -> None:
    for name in ("r1", "r2"):
        p = events.wait(f"domain.{name}.shutdown", timeout=120)
        con = stack.call("console", name=name)["data"].decode()
        s = summary(con)
        assert p["code"] == 0, con
        assert (s["reads"], s["errors"], s["constant"], s["repeated"]) == (reads, 0, 0, 0), con


def test_sigkill_sigstop_and_a_hot_swap_lose_and_repeat_no_request(stack: Stack) -> None:
    with two_guests(stack) as events:
        for _ in range(3):
            before = driver_row(stack, "rng0")["pid"]
            kill_with_a_warm_spare(stack, events, "rng0")
            assert driver_row(stack, "rng0")["pid"] != before
            more(stack)
        row = wait_until(
            lambda: (r := driver_row(stack, "rng0"))["spare_pid"] and r["state"] == "RUNNING" and r,
            timeout=30,
            what="a warm spare",
        )
        os.kill(row["pid"], signal.SIGSTOP)  # the supervisor sees it stopped and replaces it
        rec = events.wait("driver.rng0.recovered", timeout=30, old_pid=row["pid"])
        assert rec["reason"].startswith("stopped"), rec  # seen stopped (SIGSTOP), not a hang
        more(stack)
        r = do_swap_rng(stack)
        assert r["outcome"] == "swapped" and r["pid"] != rec["pid"], r
        more(stack)
        table = stack.cli("devices").stdout
        assert "rng0" in table and "getrandom" in table, table
        by = driver_row(stack, "rng0")["restarts_by_reason"]
        assert sum(by.values()) == 4, by
        finish(stack, events)


def do_swap_rng(stack: Stack) -> dict[str, Any]:
    return swap(RunDir(stack.run_dir), "rng0", "drivers.rng:Backend", probation=0.3, wait=60)


def test_a_response_fault_crashes_only_the_guest_that_saw_it(stack: Stack) -> None:
    """A bad_id response is caught by the guest's frontend: the kernel holds it and the next
    instance redoes the request, so the guests still finish with errors=0."""
    reads = 4_000  # the fault fires on the next request: no need for READS
    with two_guests(stack, reads) as events:
        # paused while the CLI arms the fault: under load the guests could finish first
        for name in ("r1", "r2"):
            stack.call("pause", name=name)
        r = stack.cli("fault", "add", "rng0", "-t", "bad_id", "-a", "times=1")
        assert r.returncode == 0, r.stdout + r.stderr
        for name in ("r1", "r2"):
            stack.call("unpause", name=name)
        events.wait("driver.rng0.fault", timeout=30)
        more(stack)
        finish(stack, events, reads)


@pytest.mark.timeout(200)
def test_the_rng_campaign_recovers_every_fault_it_can_transparently(tmp_path: Path) -> None:
    """examples/campaign-rng.toml: every fault type an rng driver takes, once.  Each one that
    needs a replacement gets it without a guest seeing an error; the poison request is the
    only error any guest sees; no guest is lost and no buffer is bad."""
    out = tmp_path / "rng"
    run_campaign(RNG_PLAN, out, seed=3, timeout=150)
    journal = json.loads((out / "journal.json").read_text())
    faults, sm = journal["faults"], journal["summary"]
    assert sorted(f["type"] for f in faults) == sorted(e.type for e in load_plan(RNG_PLAN).faults)
    lost = [f for f in faults if f["outcome"] == "guest_lost"]
    lost += [g for g in journal["guests"] if g["exit"] != "poweroff"]
    assert (sm["kernel_crashes"], sm["guests_lost"]) == (0, 0), (sm, lost)
    assert sm["transparent_recovered"] == sm["transparent_eligible"] >= 14, sm
    by_type = {f["type"]: f for f in faults}
    assert by_type["poison"]["outcome"] == "poison_error", by_type["poison"]
    assert by_type["slow"]["outcome"] == "tolerated", by_type["slow"]
    assert by_type["duplicate"]["detected_by"] == "violation", by_type["duplicate"]
    # the poison request is ring index 3000 of *a* device: both guests may reach theirs before
    # the first poison answer resets the fault (they run the same program, started together)
    errors = sum(g["errors"] for g in journal["guests"])
    assert 1 <= errors <= 2 and errors == by_type["poison"]["guest_errors"], journal["guests"]
    assert all(g["mismatches"] == 0 for g in journal["guests"]), journal["guests"]
    # guests end and new ones start during the run: the request rate never goes below 0
    rates = [r for _, r in journal["throughput"]]
    assert len(rates) > 10 and min(rates) >= 0, rates
