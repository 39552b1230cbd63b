"""Fault campaigns against a net driver (netpair guests) and a console driver (conecho guests).

The two example plans run end to end through `isovisor campaign run`: every fault type a net
(console) driver takes is injected once, and the journal must show each detected the way it
should be, recovered with no guest-visible error, the poison request answered, the corruption
seen by the guests' own checks, no guest lost and nothing left running.  The fault types that
mean nothing for a console driver are refused, saying which types it takes, by the plan check,
by the supervisor's fault table and by the driver itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from drivers.faults import Injector, fault_classes
from isovisor.campaign.plan import PlanError, injection_count, load_plan, schedule, schedule_to_json
from isovisor.supervisor.faulttable import FaultTable
from tests.conftest import Stack, cli, wait_until, write
from tests.test_campaign import detector

ROOT = Path(__file__).resolve().parents[1]
NET_PLAN = ROOT / "examples" / "campaign-net.toml"
CONSOLE_PLAN = ROOT / "examples" / "campaign-console.toml"
CONSOLE_TAKES = (
    "sigkill, sigstop, recovery_crash, segv, abort, exception, exit, hang, slow, "
    "drop, corrupt_data, leak_mem, leak_fd"
)
REFUSED_BY_CONSOLE = ("duplicate", "bad_id", "bad_status", "bad_op", "bad_index", "poison")

#: How each type is noticed, and the reason recorded, for a fault that needs a replacement.
DETECTION = {
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
    "bad_index": ("violation", "violation"),
    "leak_mem": ("exit", "rss"),
    "leak_fd": ("exit", "fds"),
    "recovery_crash": ("exit", "signal:SIGKILL"),
}


def run_campaign(plan: Path, out: Path, seed: int, timeout: float) -> None:
    """``isovisor campaign run`` as a user runs it; on a failure or a time-out the campaign is
    interrupted (it stops its stack), and no process it started may outlive it."""
    env = {k: v for k, v in os.environ.items() if k != "ISOVISOR_RUN_DIR"}
    log = out.parent / f"{out.name}.cli.txt"
    seen: dict[int, float] = {}  # pid -> its start time (a pid may be reused)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "isovisor.cli",
                "campaign",
                "run",
                str(plan),
                "--out",
                str(out),
                "--seed",
                str(seed),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=out.parent,
        )
        try:
            deadline = timeout
            while proc.poll() is None and deadline > 0:
                seen.update(_descendants(proc.pid))
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    deadline -= 1.0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # a clean stop: journal, stack down
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(AssertionError):  # (one may still be on its way out)
                wait_until(lambda: not _alive(seen), timeout=10, what="the stack's end")
            left = _kill_left(seen)
    text = log.read_text()
    assert not left, f"processes of the campaign left running: {left}\n{text[-3000:]}"
    assert proc.returncode == 0, f"campaign exited with {proc.returncode}:\n{text[-3000:]}"


def _descendants(pid: int) -> dict[int, float]:
    found = {}
    try:
        for c in psutil.Process(pid).children(recursive=True):
            found[c.pid] = c.create_time()
    except psutil.Error:
        pass
    return found


def _alive(seen: dict[int, float]) -> list[psutil.Process]:
    """The processes of ``seen`` still alive (the same processes, not reused pids)."""
    alive = []
    for pid, started in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def _kill_left(seen: dict[int, float]) -> list[str]:
    """SIGKILL the processes of ``seen`` still alive; what they were."""
    left = []
    for p in _alive(seen):
        try:
            left.append(f"{p.pid} ({p.status()}): {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.Error:
            continue
    return left


def check_journal(plan_path: Path, out: Path, seed: int) -> dict[str, Any]:
    """What every campaign journal must show; returns it for the driver-specific checks."""
    journal = json.loads((out / "journal.json").read_text())
    plan = load_plan(plan_path)
    assert journal["schedule"] == schedule_to_json(schedule(plan, seed))  # the seed decides
    faults, sm = journal["faults"], journal["summary"]
    assert sm["injected"] == len(faults) == injection_count(plan)
    assert sorted(f["type"] for f in faults) == sorted(e.type for e in plan.faults)
    assert (sm["kernel_crashes"], sm["guests_lost"]) == (0, 0), sm
    outcomes = [f["outcome"] for f in faults]
    assert "not_manifested" not in outcomes and "guest_error" not in outcomes, faults
    # every non-deterministic fault that needed a replacement got one, transparently
    assert sm["transparent_recovered"] == sm["transparent_eligible"] > 0, sm
    for f in faults:
        if f["type"] in DETECTION:
            assert (detector(f), f["reason"], f["outcome"]) == (
                *DETECTION[f["type"]],
                "recovered",
            ), f
            assert f["guest_errors"] == 0 and f["data_mismatches"] == 0, f
            assert f["recovery_ms"] > 0 and f["new_pid"] != f["target_pid"], f
    by_type = {f["type"]: f for f in faults}
    assert by_type["slow"]["outcome"] == "tolerated", by_type["slow"]
    corrupt = by_type["corrupt_data"]  # what no restart can catch: the guests' checks did
    assert corrupt["outcome"] == "silent_corruption" and corrupt["data_mismatches"] >= 1, corrupt
    assert sm["silent_corruptions"] == 1, sm
    assert sum(g["mismatches"] for g in journal["guests"]) >= 1, journal["guests"]
    for g in journal["guests"]:
        assert g["exit"] == "poweroff" and g["ops"] > 0, g
    assert "Faults by type" in (out / "report.md").read_text()
    return journal


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_the_net_campaign_injects_every_net_fault_type(tmp_path: Path) -> None:
    out = tmp_path / "net"
    run_campaign(NET_PLAN, out, seed=3, timeout=150)
    journal = check_journal(NET_PLAN, out, 3)
    sm = journal["summary"]
    poison = next(f for f in journal["faults"] if f["type"] == "poison")
    assert poison["outcome"] == "poison_error" and poison["detected_by"] == "exit", poison
    assert sm["poison_clean"] == sm["poison_total"] == 1, sm
    # the only errors the guests saw: the frame refused as poison (its sender's tx error, and
    # the frame its peer never got), and each frame corrupt_data spoiled, which netpair counts
    # as an error of the guest that received it when that guest's life also ends with others.
    # The guests' mismatches count those frames: one or more, as many as crossed the switch
    # while the fault was armed (faster guests send more of them in that time)
    spoiled = sum(g["mismatches"] for g in journal["guests"])
    assert spoiled >= sm["silent_corruptions"] == 1
    assert sm["guest_errors"] <= 2 + spoiled, journal["guests"]
    assert all(g["code"] in (0, 1) for g in journal["guests"])


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_the_console_campaign_keeps_every_line_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "console"
    run_campaign(CONSOLE_PLAN, out, seed=3, timeout=150)
    journal = check_journal(CONSOLE_PLAN, out, 3)
    # every numbered line in every domain's log once, in order: no missing or repeated line
    assert journal["summary"]["guest_errors"] == 0, journal["guests"]
    assert all(g["errors"] == 0 and g["code"] == 0 for g in journal["guests"]), journal["guests"]
    assert journal["summary"]["poison_total"] == 0


# --- fault types a console driver refuses ------------------------------------------------------

CONSOLE_HEAD = """\
[campaign]
faults = 1

[stack]
driver = "con0"
module = "drivers.console"

[[workload]]
image = "conecho"

[[fault]]
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", REFUSED_BY_CONSOLE)
def test_a_console_plan_refuses_types_without_meaning_for_it(tmp_path: Path, kind: str) -> None:
    p = write(tmp_path / "plan.toml", CONSOLE_HEAD + f'type = "{kind}"\nsector = 8\n')
    with pytest.raises(PlanError) as e:
        load_plan(p)
    assert e.value.line == 12, str(e.value)
    assert (
        f'[[fault]] #1: type = "{kind}" does not apply to a console driver ([stack] module = '
        f'"drivers.console"): ' in str(e.value)
    )
    assert str(e.value).endswith(f"a console driver takes: {CONSOLE_TAKES}")


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_plan_errors_name_the_line_and_what_the_driver_allows(tmp_path: Path) -> None:
    def error(text: str) -> str:
        """``line: message`` of the plan's error."""
        with pytest.raises(PlanError) as e:
            load_plan(write(tmp_path / "p.toml", text))
        return f"{e.value.line}: {e.value.message}"

    # a workload for another driver class than the stack's
    assert error(CONSOLE_HEAD.replace("conecho", "netpair") + 'type = "exit"\n') == (
        '9: [[workload]] #1: image = "netpair" needs a net driver ([stack] module = '
        '"drivers.net"), but the stack\'s driver is "drivers.console", a console driver; its '
        "workloads: conecho"
    )
    net = (
        CONSOLE_HEAD.replace("con0", "net0")
        .replace("drivers.console", "drivers.net")
        .replace('"conecho"', '"netpair"\ndomains = 2')
    )
    assert error(net + 'type = "bad_op"\n').startswith(
        '13: [[fault]] #1: type = "bad_op" does not apply to a net driver ([stack] module = '
        '"drivers.net"): a tx response carries no operation'
    )
    assert error(net + 'type = "exit"\nop = "read"\n') == (
        '14: [[fault]] #1: op = "read" is not an operation; choose one of: tx (the operations '
        "of a net driver's requests (tx: a frame being switched))"
    )
    assert error(net + 'type = "exit"\nvdev = "xvda"\n') == (
        '14: [[fault]] #1: vdev = "xvda" is not a device name: use eth0, eth1, ... (the '
        "devices of a net driver)"
    )
    assert error(net.replace("domains = 2", "domains = 3") + 'type = "exit"\n') == (
        "10: [[workload]] #1: domains = 3: netpair guests run in groups of 2 (each sends to the "
        "other); give a multiple of 2"
    )
    assert error(net.replace("domains = 2", 'disk_size = "8M"') + 'type = "exit"\n') == (
        '10: [[workload]] #1: disk_size = "8M" only applies to image = "blkstress" (a disk for '
        'each guest), not "netpair"; remove disk_size'
    )
    assert error(
        CONSOLE_HEAD.replace("drivers.console", "drivers.nic") + 'type = "exit"\n'
    ).startswith(
        '6: [stack]: module = "drivers.nic" is not a driver module campaigns know; '
        "choose one of: drivers.blk, drivers.blk.ram, drivers.net, drivers.console"
    )
    # the CLI says the same, with the file and line, and exits with status 2
    p = write(tmp_path / "bad.toml", CONSOLE_HEAD + 'type = "bad_index"\n')
    r = cli("campaign", "validate", str(p), cwd=tmp_path)
    assert r.returncode == 2, r
    assert (
        f'{p}:12: [[fault]] #1: type = "bad_index" does not apply to a console driver'
        in " ".join(r.stderr.split())
    ), r.stderr


@pytest.mark.timeout(30)
def test_the_fault_table_and_the_driver_refuse_them_too() -> None:
    table = FaultTable({"con0": "drivers.console", "net0": "drivers.net"})
    for kind in REFUSED_BY_CONSOLE:
        with pytest.raises(ValueError) as e:
            table.add("con0", {"type": kind, "sector": 1})
        assert str(e.value).startswith(
            f"fault type {kind!r} does not apply to a console driver (device class console): "
        ), e.value
        assert str(e.value).endswith(f"a console driver takes: {CONSOLE_TAKES}")
    assert table.rows == {}
    assert table.add("con0", {"type": "corrupt_data", "op": "write"}).spec["op"] == "write"
    with pytest.raises(ValueError, match="op 'tx' is not one of write"):
        table.add("con0", {"type": "exit", "op": "tx"})
    assert table.add("net0", {"type": "poison", "sector": 8192}).spec["sector"] == 8192
    # a console driver's own injector (tests/test_console_backend.py: its set_faults)
    with pytest.raises(ValueError, match="does not apply to a console driver"):
        Injector(fclass=fault_classes()["console"]).load([{"id": 1, "type": "bad_status"}])


@pytest.mark.timeout(60)
def test_fault_add_refuses_a_bad_response_for_a_console_driver(stack: Stack) -> None:
    stack.up([], extra='[driver.con0]\nmodule = "drivers.console"\n')
    r = stack.cli("fault", "add", "con0", "-t", "bad_id")
    assert r.returncode != 0, (
        "the supervisor's fault table took a bad response for a console driver: it must know "
        "each driver's module (isovisor/supervisor/drivermgr.py: FaultTable({d.name: d.module "
        "for d in cfg.drivers}))"
    )
    said = " ".join(r.stderr.split())
    assert "fault type 'bad_id' does not apply to a console driver" in said, r.stderr
    assert f"a console driver takes: {CONSOLE_TAKES}" in said, r.stderr
    r = stack.cli("fault", "add", "con0", "-t", "corrupt_data")
    assert r.returncode == 0 and "corrupt_data on con0" in r.stdout, r.stderr
    listed = json.loads(stack.cli("fault", "list", "--json").stdout)
    assert [f["type"] for f in listed] == ["corrupt_data"]
