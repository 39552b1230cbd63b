"""The driver jail in a running stack (docs/jail.md): the rng driver runs jailed, a SIGKILL
brings a jailed replacement, and an adversarial backend (tests/jailbreak.py), loaded as the
configured module and then by hot swap, is denied everything it tries while two guests read
random bytes beside it and finish with errors=0."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from drivers import jail
from tests.conftest import ROOT, Stack
from tests.test_recovery import driver_row, kill_with_a_warm_spare
from tests.test_rng import DRIVER, finish, more, two_guests

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="jailed drivers need a root supervisor"),
]

EVIL = ROOT / "tests" / "jailbreak.py"
READS = 12_000


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def assert_jailed(stack: Stack, pid: int) -> None:
    st = proc_status(pid)
    uid = jail.uid_for(str(stack.run_dir), "rng0")
    assert st["Uid"].split() == [str(uid)] * 4, st["Uid"]
    assert st["Gid"].split()[0] == str(jail.gid_for(str(stack.run_dir)))
    assert (st["CapEff"], st["CapPrm"], st["CapBnd"]) == ("0" * 16,) * 3, st
    assert st["NoNewPrivs"] == "1"
    # its root is its own: the run directory's other files have no path there
    assert not Path(f"/proc/{pid}/root{stack.run_dir}/control.sock").exists()
    assert Path(f"/proc/{pid}/root{stack.run_dir}/kernel-drivers.sock").exists()


def test_the_rng_driver_runs_jailed_and_recovers_jailed(stack: Stack) -> None:
    with two_guests(stack, READS) as events:
        first = driver_row(stack, "rng0")["pid"]
        assert_jailed(stack, first)
        kill_with_a_warm_spare(stack, events, "rng0")
        row = driver_row(stack, "rng0")
        assert row["pid"] != first
        assert_jailed(stack, row["pid"])
        more(stack)
        finish(stack, events, READS)


def attempts(log: str) -> list[dict[str, str]]:
    """Each load of the adversarial backend: what it tried, and what happened."""
    loads: list[dict[str, str]] = []
    for m in re.finditer(r"\[(\d+)\] WARNING jailbreak: ([^:]+): (.*)", log):
        pid, what, outcome = m.groups()
        if not loads or loads[-1]["pid"] != pid:
            loads.append({"pid": pid})
        loads[-1][what] = outcome
    return loads


def test_an_adversarial_backend_is_denied_everything_it_tries(stack: Stack) -> None:
    other = stack.dir / "other.img"  # another disk's image, readable by anyone
    other.write_bytes(b"another guest's disk")
    other.chmod(0o644)
    configured = DRIVER.replace(
        'module = "drivers.rng"', f'module = "{EVIL}"\ndevice_class = "rng"'
    )
    assert configured != DRIVER
    with two_guests(stack, READS, configured) as events:
        more(stack)
        r = stack.cli("driver", "swap", "rng0", "--to-file", str(EVIL))
        assert r.returncode == 0, r.stderr
        more(stack)
        log = (stack.run_dir / "driver-rng0.log").read_text()
        loads = attempts(log)
        # the configured module (active and spare) and the swap candidate, at least
        assert len(loads) >= 2, log
        for tried in loads:
            assert "ALLOWED" not in " ".join(tried.values()), tried
            # every guest's RAM and every device's region (none yet when the driver starts)
            assert re.fullmatch(r"\d+ tried: (denied PermissionError)?", tried["segments"]), tried
            assert tried["other disk"] == "denied FileNotFoundError", tried
            assert tried["supervisor memory"] == "denied PermissionError", tried
            assert tried["kernel found"] == "yes", tried
            assert tried["kernel memory"] == "denied PermissionError", tried
            assert tried["ptrace kernel"] == "denied errno 1", tried  # EPERM
            assert tried["signal kernel"] == "denied PermissionError", tried
            for name in ("control.sock", "events.sock", "kernel.sock", "kernel-events.sock"):
                assert tried[f"socket {name}"] == "denied FileNotFoundError", tried
            assert tried["write the sources"] == "denied OSError", tried  # EROFS
            assert tried["memory"] == "denied MemoryError", tried
            if "fork" in tried:  # (the first load only)
                assert re.fullmatch(r"denied BlockingIOError after \d+", tried["fork"]), tried
        assert "fork" in loads[0], loads[0]
        # the swap candidate came when both guests ran: their RAM and their devices' regions
        assert loads[-1]["segments"] == "4 tried: denied PermissionError", loads[-1]
        assert not (EVIL.parent / "planted.py").exists()
        finish(stack, events, READS)
