"""The keeper (drivers/keeper.py, docs/recovery.md "The keeper"): a driver process's memory
outlives it, so its death is seen before that memory is torn down, and no keeper is left
behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from drivers import keeper
from tests.conftest import Stack, process_name, wait_until

ROOT = Path(__file__).resolve().parents[1]

#: Run as its own process (it becomes a child subreaper, as the supervisor does): starts a
#: "driver" that starts a keeper, SIGKILLs the driver, and reports what it saw, as JSON.
SCENARIO = r"""
import json, os, select, signal, subprocess, sys
from pathlib import Path
from drivers import keeper
lib = Path(sys.argv[1])
keeper.become_subreaper()
# the keeper inherits the write end of this pipe and closes it once it has named itself: the
# end of the pipe says it is ready
r, w = os.pipe()
child = subprocess.Popen(
    [sys.executable, "-c",
     "import os, signal, sys\nfrom pathlib import Path\nfrom drivers import keeper\n"
     "pid = keeper.start(Path(sys.argv[1]))\nos.close(int(sys.argv[2]))\n"
     "print(pid, flush=True)\nsignal.pause()\n", str(lib), str(w)],
    stdout=subprocess.PIPE, text=True, pass_fds=(w,))
os.close(w)
kpid = int(child.stdout.readline())
assert select.select([r], [], [], 10)[0] and os.read(r, 1) == b"", "the keeper kept the pipe"
def stat(pid):
    return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
seen = {
    "name": open(f"/proc/{kpid}/comm").read().strip(),
    "parent_is_driver": int(stat(kpid)[1]) == child.pid,
    "same_memory": open(f"/proc/{kpid}/maps").read() == open(f"/proc/{child.pid}/maps").read(),
    "fds": len(os.listdir(f"/proc/{kpid}/fd")),
    "nice": os.getpriority(os.PRIO_PROCESS, kpid),
}
fd, kfd = os.pidfd_open(child.pid), os.pidfd_open(kpid)
os.kill(child.pid, signal.SIGKILL)
select.select([fd], [], [], 10)
seen["keeper_state_when_driver_gone"] = stat(kpid)[0]
child.wait()
select.select([kfd], [], [], 10)  # readable once the keeper has ended (a zombie of ours)
seen["reaped"] = keeper.reap() == 1 and not os.path.exists(f"/proc/{kpid}")
print(json.dumps(seen))
"""


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_keeper_shares_its_drivers_memory_outlives_it_and_is_reaped(tmp_path: Path) -> None:
    lib = keeper.build(tmp_path / "cache")
    r = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(lib)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["name"] == keeper.NAME
    assert seen["parent_is_driver"] and seen["same_memory"], seen
    assert seen["fds"] == 1, seen  # the driver's pidfd only: no lock, socket or segment
    assert seen["nice"] == 19, seen
    # the driver is gone (its pidfd readable) while its memory still has a user: the keeper
    assert seen["keeper_state_when_driver_gone"] in ("S", "R"), seen
    assert seen["reaped"], seen


def test_building_without_a_working_compiler_says_which_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(keeper.KeeperError, match="cannot run /nonexistent/cc"):
        keeper.build(tmp_path, cc="/nonexistent/cc")
    assert not list(tmp_path.iterdir())  # nothing half-built left


def test_a_cache_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(keeper.KeeperError, match=f"cannot build the keeper into {blocker}/c"):
        keeper.build(blocker / "c")


def keepers_of(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children()
    except psutil.Error:  # ended meanwhile
        return []
    return [c for c in kids if process_name(c) == keeper.NAME]


@pytest.mark.timeout(120)
def test_every_driver_process_has_a_keeper_and_none_outlives_the_stack(stack: Stack) -> None:
    stack.up(extra='[driver.blk0]\nmodule = "drivers.blk"\n')
    sup = stack.pids[0]
    drivers = {d["name"]: d for d in stack.call("drivers")["drivers"]}
    old = drivers["blk0"]["pid"]
    wait_until(lambda: len(keepers_of(old)) == 1, timeout=10, what="the driver's keeper")
    (kept,) = keepers_of(old)
    with stack.subscribe(["driver.blk0."]) as sub:
        os.kill(old, signal.SIGKILL)
        while True:
            ev = sub.recv(30)
            assert ev is not None, "no recovery within 30 s"
            if ev[0] == "driver.blk0.recovered" and ev[1]["old_pid"] == old:
                break
    new = ev[1]["pid"]
    wait_until(lambda: len(keepers_of(new)) == 1, timeout=10, what="the new driver's keeper")
    # the dead driver's keeper came to the supervisor (a subreaper), which reaped it
    wait_until(lambda: not psutil.pid_exists(kept.pid), timeout=10, what="the old keeper reaped")
    every = [
        k.pid
        for d in (new, *(p.pid for p in psutil.Process(sup).children()))
        for k in keepers_of(d)
    ]
    assert every, "no keepers while the stack runs"
    r = stack.cli("down")
    assert r.returncode == 0, r.stderr
    assert not [p for p in every if psutil.pid_exists(p)], "keepers left after `down`"
