"""Fault injection at run time (`isovisor fault`) and campaigns (`isovisor campaign`), end to end.

The first tests arm faults in a running stack through the CLI while two guests verify their
I/O and check what a user would: the fault fired in the driver, the driver was replaced for the
right reason (or not at all, for a fault that only slows it down), and the guests finished with
no error.  The last runs the smoke campaign of examples/ and checks its journal for consistency.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from isovisor.campaign.plan import load_plan, schedule, schedule_to_json
from isovisor.paths import shm_prefix_for
from tests.conftest import Stack, command_line, wait_until
from tests.test_recovery import (
    DRIVER,
    Events,
    current_pid,
    driver_row,
    finish_and_verify,
    two_guests,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def detector(f: dict[str, Any]) -> str:
    """Who noticed fault ``f`` first.  A SIGSTOP is the supervisor's to see (its stopped-process
    check), but on a loaded host the kernel's watchdog (0.5 s in a campaign) may report the
    silent driver first: either came in time, and the reason is "stopped" either way (the
    supervisor looks at a hung driver's process state before it names the cause)."""
    if f["type"] == "sigstop" and f["detected_by"] == "hang":
        return "exit"
    return str(f["detected_by"])


def wait_count(events: Events, topic: str, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    """The first ``n`` events of ``topic``, waiting for them as needed."""
    deadline = time.monotonic() + timeout
    while True:
        got = [p for t, p in events.seen if t == topic]
        if len(got) >= n:
            return got[:n]
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(got)} of {n} {topic} events within {timeout}s")
        events._take(0.1)


RUNTIME_OPS = 150_000


@pytest.mark.timeout(180)
def test_faults_added_at_run_time_fire_in_the_driver_and_are_recovered(stack: Stack) -> None:
    # enough I/O that the guests are still running when the last fault needs requests
    with two_guests(stack, DRIVER + "max_fds = 200\n", ops=RUNTIME_OPS) as events:
        # a fault that only slows three requests: it fires, nothing is replaced
        r = stack.cli(
            "fault",
            "add",
            "blk0",
            "-t",
            "slow",
            "-a",
            "latency_ms=30",
            "-a",
            "times=3",
            "-a",
            "op=write",
        )
        assert r.returncode == 0 and r.stdout.startswith("fault 1: slow on blk0"), r
        old = current_pid(stack)
        fired = wait_count(events, "driver.blk0.fault_fired", 3)
        assert len(fired) == 3 and {p["pid"] for p in fired} == {old}, fired

        # a bad response: held by the frontend, the driver replaced, the requests redone
        r = stack.cli("fault", "add", "blk0", "-t", "duplicate")
        assert r.returncode == 0, r
        rec = events.wait("driver.blk0.recovered", timeout=30, old_pid=old)
        assert rec["reason"] == "violation", rec

        # leaking descriptors until max_fds: replaced for "fds"
        old = current_pid(stack)
        r = stack.cli(
            "fault", "add", "blk0", "-t", "leak_fd", "-a", "times=-1", "-a", "interval=500"
        )
        assert r.returncode == 0, r
        rec = events.wait("driver.blk0.recovered", timeout=30, old_pid=old)
        assert rec["reason"] == "fds", rec
        # the fault stays armed, so the new instance gets it too, until it is removed
        listed = json.loads(stack.cli("fault", "list", "--json").stdout)
        assert [(f["id"], f["type"], f["armed"]) for f in listed] == [
            (1, "slow", False),
            (2, "duplicate", False),
            (3, "leak_fd", True),
        ], listed
        assert stack.cli("fault", "remove", "3").returncode == 0
        finish_and_verify(stack, events, ops=RUNTIME_OPS)
    by = driver_row(stack)["restarts_by_reason"]
    assert by.get("violation") == 1 and by.get("fds", 0) >= 1, by


@pytest.mark.timeout(120)
def test_outside_faults_and_bad_fault_requests(stack: Stack) -> None:
    stack.up([], extra=DRIVER)
    with stack.subscribe(["driver."]) as sub:
        events = Events(sub, stack)
        old = current_pid(stack)
        r = stack.cli("fault", "add", "blk0", "-t", "recovery_crash")
        assert r.returncode == 0 and "recovery_crash" in r.stdout, r
        r = stack.cli("fault", "add", "blk0", "-t", "sigkill")
        assert r.returncode == 0 and "(done)" in r.stdout, r
        first = events.wait("driver.blk0.exit", timeout=30, pid=old)
        assert first["signal"] == "SIGKILL", first
        # the replacement is killed right after its hello; the next one stays
        ready = events.wait("driver.blk0.ready", timeout=30)
        crashed = events.wait("driver.blk0.exit", timeout=30, pid=ready["pid"])
        assert (crashed["signal"], crashed["reason"]) == ("SIGKILL", "recovery_crash"), crashed
        rec = events.wait("driver.blk0.recovered", timeout=30)
        assert rec["old_pid"] == ready["pid"] and rec["pid"] == current_pid(stack), rec
        assert rec["pid"] not in (old, ready["pid"]) and psutil.pid_exists(rec["pid"])
    for args, message in (
        (["-t", "segfault"], "unknown fault type 'segfault'"),
        (["-t", "slow", "-a", "latency_ms=-3"], "latency_ms must be a number from 0"),
        (["-t", "exception", "-a", "nonsense"], "give key=value"),
        (["-t", "sigkill", "-a", "op=read"], "takes no arguments, got op"),
    ):
        r = stack.cli("fault", "add", "blk0", *args)
        assert r.returncode != 0 and message in r.stderr.replace("\n", " "), (args, r.stderr)
    r = stack.cli("fault", "add", "nosuch", "-t", "exit")
    assert r.returncode != 0 and "no driver named 'nosuch'" in r.stderr, r.stderr
    r = stack.cli("fault", "remove", "77")
    assert r.returncode != 0 and "no fault with id 77" in r.stderr, r.stderr


@pytest.mark.timeout(240)
def test_the_smoke_campaign_injects_every_type_and_its_journal_adds_up(
    stack: Stack, tmp_path: Path
) -> None:
    plan_path = ROOT / "examples" / "campaign-smoke.toml"
    out = tmp_path / "smoke"
    r = stack.cli("campaign", "run", str(plan_path), "--out", str(out), "--seed", "3", timeout=220)
    assert r.returncode == 0, r.stdout + r.stderr
    journal = json.loads((out / "journal.json").read_text())
    plan = load_plan(plan_path)
    assert journal["schedule"] == schedule_to_json(schedule(plan, 3))  # the seed decides
    faults, sm = journal["faults"], journal["summary"]
    assert {f["type"] for f in faults} == {e.type for e in plan.faults}
    assert sm["injected"] == len(faults) == len(journal["schedule"])
    outcomes = [f["outcome"] for f in faults]
    assert sm["recovered"] == outcomes.count("recovered")
    assert sm["manifested"] == len(faults) - outcomes.count("not_manifested")
    assert (sm["kernel_crashes"], sm["guests_lost"]) == (0, 0), sm
    assert sm["poison_clean"] == sm["poison_total"] == 1, sm
    assert sm["silent_corruptions"] >= 1  # corrupt_data: the one class restarts cannot catch
    # every type: how the stack noticed it, and what became of it
    expected = {
        "sigkill": ("exit", "signal:SIGKILL"),
        "sigstop": ("exit", "stopped"),
        "segv": ("exit", "signal:SIGSEGV"),
        "abort": ("exit", "signal:SIGABRT"),
        "exception": ("exit", "exit:70"),
        "exit": ("exit", "exit:3"),
        "hang": ("hang", "hang"),
        "drop": ("hang", "hang"),
        "duplicate": ("violation", "violation"),
        "bad_id": ("violation", "violation"),
        "bad_status": ("violation", "violation"),
        "bad_op": ("violation", "violation"),
        "bad_index": ("violation", "violation"),
        "leak_mem": ("exit", "rss"),
        "leak_fd": ("exit", "fds"),
        "recovery_crash": ("exit", "signal:SIGKILL"),
    }
    for f in faults:
        if f["type"] in expected:
            assert (detector(f), f["reason"], f["outcome"]) == (
                *expected[f["type"]],
                "recovered",
            ), f
            assert f["guest_errors"] == 0 and f["recovery_ms"] > 0, f
    by_type = {f["type"]: f for f in faults}
    assert by_type["slow"]["outcome"] == "tolerated", by_type["slow"]
    assert by_type["poison"]["outcome"] == "poison_error", by_type["poison"]
    assert by_type["corrupt_data"]["outcome"] == "silent_corruption", by_type["corrupt_data"]
    for g in journal["guests"]:
        assert g["exit"] == "poweroff" and g["ops"] > 0, g
    assert "Faults by type" in (out / "report.md").read_text()
    assert (out / "report.html").read_text().count("<svg") >= 2
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or ())
    ]  # nothing left behind


@pytest.mark.timeout(120)
def test_ctrl_c_writes_the_journal_of_what_ran_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "cut"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "isovisor.cli",
            "campaign",
            "run",
            str(ROOT / "examples" / "campaign-smoke.toml"),
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def stack_pids() -> list[int]:
            return [
                c.pid
                for c in psutil.Process(proc.pid).children(recursive=True)
                if "drivers.host" in command_line(c)
            ]

        wait_until(lambda: stack_pids(), timeout=60, what="the campaign's stack")
        kids = psutil.Process(proc.pid).children(recursive=True)
        mine = {c.pid for c in kids}
        sup = [c.pid for c in kids if "isovisor.supervisor" in command_line(c)]
        assert len(sup) == 1, kids
        segments = shm_prefix_for(sup[0]) + "*"
        wait_until(
            lambda: list(Path("/dev/shm").glob(segments)),
            timeout=60,
            what="the guests' device segments",
        )
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # (a failed assertion above: still stop its stack cleanly)
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: the journal of what ran is in" in " ".join(err.split()), err
    journal = json.loads((out / "journal.json").read_text())
    assert journal["campaign"]["interrupted"] is True
    assert journal["summary"]["injected"] == len(journal["faults"]) < 20
    assert not [
        p
        for p in mine
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ], mine
    assert not list(Path("/dev/shm").glob(segments))
