"""Failures a backend developer must see where they work (issue 22 item 3): a backend that
cannot start says why (the exception's type and message, and the line of the developer's
code it was raised at) in ``isovisor up``, ``status``, ``drivers``, ``create``, ``driver
start`` and the pytest fixture's ``MiniStack.start``; a ``statistics()`` that raises shows its
error instead of an empty table; and reading statistics at any moment, right after a kill
too, never raises.  The backends are small files written for each test."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from isovisor.config import DriverConfig
from isovisor.paths import RunDir
from isovisor.supervisor.driverproc import DriverProcess
from isovisor.testing import MiniStack, wait_until
from tests.conftest import Stack, domain_toml, write

pytestmark = pytest.mark.timeout(120)

#: A backend with an option of its own, checked in its configure(); its statistics() raise
#: KeyError while the file named by the option ``broken_while`` exists.
LEVEL_DISK = """\
from pathlib import Path
from typing import Any

from drivers.sdk import BlockBackend, DeviceState, FileStorage, Storage


class Backend(BlockBackend):
    OPTIONS = {
        **BlockBackend.OPTIONS,
        "level": "compression level, 0..9",
        "broken_while": "a file: statistics() raises while it exists",
    }

    def configure(self, options: dict[str, Any]) -> None:
        super().configure(options)
        self.level = options.get("level", 0)
        if not 0 <= self.level <= 9:
            raise ValueError(f"level must be 0..9, got {self.level}")

    def open_disk(self, dev: DeviceState) -> Storage:
        m = dev.medium
        return FileStorage(m.target, m.size, readonly=m.access == "ro")

    def statistics(self) -> dict[str, int | float | str]:
        out = super().statistics()
        broken = Path(self.options.get("broken_while", "/nonexistent")).exists()
        imports = {} if broken else {f"{d.label}.imports": 0 for d in self.devices.values()}
        for d in self.devices.values():
            out[f"{d.label}.imports"] = imports[f"{d.label}.imports"]
        return out
"""
LEVEL_ERROR = "the backend's constructor raised ValueError: level must be 0..9, got 12"


def line_of(source: str, text: str) -> int:
    """The number of the (only) line of ``source`` that contains ``text``."""
    (n,) = [i for i, line in enumerate(source.splitlines(), 1) if text in line]
    return n


def level_disk(directory: Path) -> tuple[Path, str]:
    """The backend file, and where its configure() raises (``file:line, in configure``)."""
    f = write(directory / "leveldisk.py", LEVEL_DISK)
    return f, f"{f}:{line_of(LEVEL_DISK, 'raise ValueError')}, in configure"


# -- the pytest fixture ---------------------------------------------------------------------


@pytest.mark.parametrize("option", ["level", "levle"])
def test_ministack_start_fails_with_the_backends_own_error(
    isovisor_stack: MiniStack, tmp_path: Path, option: str
) -> None:
    """A bad option, refused by the backend's configure() (with the line) or by the
    framework's check of the option names: start() raises with the driver's own error and
    the traceback, not with "which is not running"."""
    f, at = level_disk(tmp_path)
    with pytest.raises(RuntimeError) as e:
        isovisor_stack.start(f, options={option: 12})
    first, *rest = str(e.value).splitlines()
    log = isovisor_stack.run_dir / "driver-blk0.log"
    if option == "level":
        assert first == (
            f"driver blk0 ({f}) could not start: {LEVEL_ERROR} (at {at}); see {log}"
        ), first
        assert rest[-1] == "ValueError: level must be 0..9, got 12", rest
    else:
        assert first.startswith(
            f"driver blk0 ({f}) could not start: the backend's constructor raised ValueError: "
            "unknown block backend option(s) levle (did you mean level?); allowed: "
        ), first
        assert first.endswith(f"; see {log}") and " (at " not in first, first
        assert rest[-1].startswith("ValueError: unknown block backend option(s) levle"), rest
    assert rest[0] == "Traceback (most recent call last):", rest
    assert "which is not running" not in str(e.value)


# -- the CLI ----------------------------------------------------------------------------------


def test_up_status_drivers_create_and_start_say_why_a_driver_did_not_start(
    stack: Stack,
) -> None:
    f, at = level_disk(stack.dir)
    g1 = write(
        stack.dir / "g1.toml",
        domain_toml(
            "g1",
            "blkstress",
            memory=8,
            extra="ops=1000 blocks=256",
            disk=["target=g1.img, vdev=xvda, access=rw, backend=blk0, size=1M"],
        ),
    )
    toml = write(
        stack.dir / "supervisor.toml",
        f'[supervisor]\nname = "errors"\n[driver.blk0]\nmodule = "{f}"\n'
        '[driver.blk0.options]\nlevel = 12\n[domains]\nstart = ["g1.toml"]\n',
    )
    r = stack.cli("up", "--detach", str(toml))
    ping = stack.call("ping")
    stack.pids += [ping["pid"], ping["kernel_pid"]]
    log = RunDir(stack.run_dir).driver_log("blk0")
    start = f"driver blk0 ({f}) could not start: {LEVEL_ERROR} (at {at}); see {log}"
    refused = (
        f"{g1}: disk xvda uses backend 'blk0', which is not running: {start}; fix it, then "
        "`isovisor driver start blk0` (a change to the stack's file takes `isovisor down` and "
        "`up`)"
    )
    assert r.returncode == 1, r
    assert r.stdout.startswith("stack up: supervisor pid "), r.stdout
    assert r.stderr.splitlines() == [
        f"isovisor: error: {start}",
        f"isovisor: warning: domain {g1} was not created: {refused}",
        "isovisor: error: the stack is up without driver(s) blk0: fix the cause, then "
        "`isovisor driver start NAME` (a change to the stack's file takes `isovisor down` and "
        "`up`); `isovisor status` shows every driver",
    ], r.stderr

    down = f"blk0 is FATAL: {start}; start it again with `isovisor driver start blk0`"
    for command in ("status", "drivers"):
        r = stack.cli(command)
        assert r.returncode == 0 and down in r.stdout.splitlines(), r.stdout
    row = json.loads(stack.cli("status", "--json").stdout)[0]
    assert (row["state"], row["last_reason"], row["last_failure"]) == ("FATAL", "start", start)
    error = row["last_error"]
    assert (error["error"], error["where"]) == (LEVEL_ERROR, at), error
    assert error["traceback"].endswith("ValueError: level must be 0..9, got 12\n"), error

    r = stack.cli("create", str(g1))
    assert (r.returncode, r.stderr) == (1, f"isovisor: error: {refused}\n"), r.stderr

    # the options are still wrong: the first instance `driver start` starts says so at once
    r = stack.cli("driver", "start", "blk0")
    assert r.returncode == 1, r
    assert re.fullmatch(
        r"isovisor: error: driver blk0 failed after the start: exit:2: pid \d+ exited with "
        rf"status 2: {re.escape(LEVEL_ERROR)} \(at {re.escape(at)}\); it is [A-Z]+: the "
        r"supervisor goes on starting it \(a fixed file is picked up\), see `isovisor status` "
        rf"and {re.escape(str(log))}\n",
        r.stderr,
    ), r.stderr


# -- statistics -------------------------------------------------------------------------------


def test_a_failing_statistics_shows_its_error_and_reading_never_raises(
    isovisor_stack: MiniStack, tmp_path: Path
) -> None:
    """While statistics() raises, `status` (and --json) show its error instead of values;
    wait_statistics with a condition that indexes a value not reported takes it as not yet
    (and says so on timeout).  Right after a kill, reading statistics does not raise."""
    f, _ = level_disk(tmp_path)
    flag = write(tmp_path / "broken", "")
    s = isovisor_stack.start(f, options={"broken_while": str(flag)}, ops=4000)
    error = (
        "statistics() raised KeyError: 'g1/xvda.imports' "
        f"(at {f}:{line_of(LEVEL_DISK, 'imports[f')}, in statistics)"
    )
    row = wait_until(
        lambda: (r := s.driver())["statistics_error"] and r, timeout=10, what="statistics_error"
    )
    assert (row["statistics"], row["statistics_error"]) == ({}, error), row
    r = s.cli("status")
    assert f"blk0: {error}; the traceback is in {s.run_dir / 'driver-blk0.log'}" in (
        r.stdout.splitlines()
    ), r.stdout
    assert json.loads(s.cli("status", "--json").stdout)[0]["statistics_error"] == error

    with pytest.raises(AssertionError) as e:
        s.wait_statistics(lambda st: st["g1/xvda.imports"] == 0, timeout=2, what="imports")
    assert str(e.value) == (
        "imports: not reached within 2s; the last statistics: {} (the condition raised "
        f"KeyError: 'g1/xvda.imports'); the backend's {error}"
    )

    flag.unlink()
    stats = s.wait_statistics(lambda st: st["g1/xvda.imports"] == 0, what="imports")
    assert stats["devices"] == 1 and s.driver()["statistics_error"] is None
    log = (s.run_dir / "driver-blk0.log").read_text()
    assert log.count(error) == 1, "the traceback is logged once for the same error"

    old = s.driver()["pid"]
    os.kill(old, signal.SIGKILL)
    assert isinstance(s.statistics(), dict)  # whatever instance is linked now: no KeyError
    s.wait_statistics(lambda st: st["g1/xvda.imports"] == 0, what="imports right after a kill")
    s.wait_event("driver.blk0.exit", pid=old)
    wait_until(lambda: s.driver()["pid"] != old, timeout=30, what="a new instance")
    s.wait_statistics(lambda st: st["g1/xvda.imports"] == 0, what="the new instance's imports")
    s.finish()


# -- the supervisor's side (no stack) ---------------------------------------------------------


def test_every_instance_reports_and_only_a_swap_candidate_must_be_swappable(
    tmp_path: Path,
) -> None:
    rd = RunDir(tmp_path)
    cfg = DriverConfig("blk0", "drivers.blk")
    plain, candidate = DriverProcess(cfg, rd, 1), DriverProcess(cfg, rd, 2, report=True)
    for inst in (plain, candidate):
        cmd = inst.command()
        i = cmd.index("--report")
        assert cmd[i + 1] == str(rd.driver_report("blk0", inst.instance)), cmd
    assert "--swappable" not in plain.command() and "--swappable" in candidate.command()
    said: dict[str, Any] = {"error": "boom", "where": "/src/x.py:3, in f", "traceback": "T"}
    assert plain.report_path is not None
    plain.prepare_dirs()  # (start() makes the driver's directory)
    plain.report_path.write_text(json.dumps(said))
    assert plain.take_report() == said and not plain.report_path.exists()
    assert plain.take_report() == said  # each caller gets it (the swap's, the supervisor's)
    assert candidate.take_report() is None
