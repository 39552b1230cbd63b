"""Hot swap of a driver backend under running guests (docs/hotswap.md), end to end.

Two guests run `blkstress` (verified random I/O at QD32) on image files through `blk0`.  While
they do, the backend is swapped — file-backed to memory-backed and back, and to new
implementations that fail in each way a rollback handles.  Each test checks what a user sees:
the outcome and its message, which process serves afterwards, both guests finishing with
`errors=0`, and the image files holding exactly what the guests wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from isovisor.cli.swapclient import swap
from isovisor.paths import RunDir
from isovisor.procs import gone
from tests.conftest import ISOVISOR, Stack, wait_until
from tests.test_recovery import driver_row, finish_and_verify, two_guests

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

OPS = 60_000
DRIVER = """[driver.blk0]
module = "drivers.blk"
watchdog_sec = 1.0
request_timeout_sec = 8.0
intensity = 20
period = 60.0
"""


def do_swap(stack: Stack, target: str, **kw: Any) -> dict[str, Any]:
    return swap(RunDir(stack.run_dir), "blk0", target, wait=60, **kw)


def requests_now(stack: Stack) -> int:
    return sum(d["requests"] for d in stack.call("devices")["devices"])


def more_io(stack: Stack, n: int = 2000) -> None:
    """Wait until the guests have issued ``n`` more requests (they are served again), or
    have all finished (their summaries are checked at the end)."""
    start = requests_now(stack)
    wait_until(
        lambda: requests_now(stack) > start + n or guests_done(stack),
        timeout=30,
        what=f"{n} more requests after the swap",
    )


def guests_done(stack: Stack) -> bool:
    return all(
        "blkstress: ops=" in stack.call("console", name=n)["data"].decode() for n in ("g1", "g2")
    )


def backend_file(stack: Stack, name: str, body: str) -> Path:
    p = stack.dir / name
    p.write_text(textwrap.dedent(body))
    return p


def test_swap_file_to_memory_to_file_under_verified_io(stack: Stack) -> None:
    """drivers.blk (the image file) -> drivers.blk.ram (a copy in memory) -> drivers.blk:
    each swap is `swapped`, a new process serves, the guests never see an error and the
    images end up with every block the guests wrote (the memory copy was moved back)."""
    with two_guests(stack, DRIVER, ops=OPS) as events:
        pids = [driver_row(stack)["pid"]]
        for target in ("drivers.blk.ram:RamBackend", "drivers.blk:Backend"):
            r = do_swap(stack, target, probation=0.3)
            assert r["outcome"] == "swapped", r
            assert r["new"] == target and r["old_pid"] == pids[-1] and r["pid"] != pids[-1], r
            assert r["stall_ms"] is not None and r["stall_ms"] < 5000, r
            assert isinstance(r["carried"], int) and r["carried"] >= 0, r
            ev = events.wait("driver.blk0.swap", swap_id=r["swap_id"])  # the event stream
            assert (ev["outcome"], ev["old"], ev["new"]) == ("swapped", r["old"], target), ev
            row = driver_row(stack)
            assert (row["pid"], row["module"], row["state"]) == (r["pid"], target, "RUNNING")
            assert row["last_swap"]["outcome"] == "swapped"
            wait_until(
                lambda: gone(pids[-1]),
                timeout=10,
                what="the old instance to stop",
            )
            pids.append(r["pid"])
            more_io(stack)
            sup = stack.call("ping")["pid"]
            scratch = sorted(Path("/dev/shm").glob(f"isovisor.{sup}.*.scratch"))
            if target.endswith("RamBackend"):  # the disks are in memory ...
                assert len(scratch) == 2, scratch
            else:  # ... until the swap back is final: then the copies go
                pattern = f"isovisor.{sup}.*.scratch"
                wait_until(
                    lambda p=pattern: not list(Path("/dev/shm").glob(p)),
                    timeout=10,
                    what="the memory copies removed after the commit",
                )
            if target.endswith("RamBackend"):  # its statistics say how much memory it holds
                wait_until(
                    lambda: driver_row(stack)["statistics"].get("memory_bytes") == 2 * (8 << 20),
                    timeout=10,
                    what="the memory backend's statistics",
                )
                stats = stack.cli("driver", "stats", "blk0")
                assert "memory_bytes" in stats.stdout and target in stats.stdout, stats
        assert driver_row(stack)["swaps"] == 2
        finish_and_verify(stack, events, ops=OPS)
        stack.pids += pids


def assert_rolled_back(
    r: dict[str, Any], stack: Stack, old_pid: int, reason: str, words: str
) -> None:
    assert r["outcome"] == "rolled_back" and r["reason"] == reason, r
    assert words in (r["error"] or ""), r
    row = driver_row(stack)
    assert (row["pid"], row["state"], row["module"]) == (old_pid, "RUNNING", "drivers.blk"), row


def test_rollback_when_the_new_backend_refuses_the_state(stack: Stack) -> None:
    """A backend whose restore() raises: rolled back with the error and traceback; the old
    process serves again and the guests never notice."""
    bad = backend_file(
        stack,
        "badrestore.py",
        """
        from drivers.blk.backend import Backend as Base

        class Backend(Base):
            def restore(self, state):
                raise RuntimeError("this backend cannot take the state over")
    """,
    )
    with two_guests(stack, DRIVER, ops=OPS) as events:
        old = driver_row(stack)["pid"]
        cli = stack.cli("driver", "swap", "blk0", "--to-file", str(bad))  # as a user would
        assert cli.returncode == 1, cli
        assert f"swap of blk0 to {bad} rolled back (restore)" in cli.stderr, cli.stderr
        assert "cannot take the state over" in cli.stderr and "Traceback" in cli.stderr
        assert f"drivers.blk (pid {old}) goes on serving" in cli.stderr, cli.stderr
        r = driver_row(stack)["last_swap"]
        assert_rolled_back(r, stack, old, "restore", "cannot take the state over")
        status = stack.cli("status").stdout
        assert "drivers.blk (1 swap(s), last rolled_back" in status, status
        more_io(stack)
        finish_and_verify(stack, events, ops=OPS)


def test_rollback_when_the_new_backend_crashes_in_its_first_requests(stack: Stack) -> None:
    """A backend that dies on its 50th request after the swap: rolled back (reason crash),
    the requests it took are redone by the old implementation, nothing is lost."""
    bad = backend_file(
        stack,
        "crashy.py",
        """
        from drivers.blk.backend import Backend as Base

        class Backend(Base):
            served = 0

            def perform(self, d, raw):
                Backend.served += 1
                if Backend.served == 50:
                    raise RuntimeError("crashy backend: request 50")
                return super().perform(d, raw)
    """,
    )
    with two_guests(stack, DRIVER, ops=OPS) as events:
        old = driver_row(stack)["pid"]
        r = do_swap(stack, str(bad), probation=3.0)
        assert_rolled_back(r, stack, old, "crash", "request 50")
        assert "crashy.py" in (r["traceback"] or ""), r
        more_io(stack)
        finish_and_verify(stack, events, ops=OPS)


def test_rollback_when_the_new_backend_misses_its_handshake(stack: Stack) -> None:
    """restore() that never returns: after the swap's timeout the old instance takes over."""
    slow = backend_file(
        stack,
        "stuck.py",
        """
        import threading
        from drivers.blk.backend import Backend as Base

        class Backend(Base):
            def restore(self, state):
                threading.Event().wait()
    """,
    )
    with two_guests(stack, DRIVER, ops=OPS) as events:
        old = driver_row(stack)["pid"]
        r = do_swap(stack, str(slow), timeout=1.0)
        assert_rolled_back(r, stack, old, "handshake", "did not restore the state")
        more_io(stack)
        finish_and_verify(stack, events, ops=OPS)


BAD_BACKENDS = [
    ("import no_such_module_here\n", "No module named 'no_such_module_here'"),
    ("def broken(:\n", "syntax error in"),
    ("class Backend:\n    pass\n", "does not implement the backend interface"),
    (
        "from drivers.blk.backend import Backend as B\n\nclass Backend(B):\n"
        "    def __init__(self, host, options):\n        raise ValueError('no disks today')\n",
        "no disks today",
    ),
]


def test_bad_backends_are_refused_before_anything_stops(stack: Stack) -> None:
    """An import error, a syntax error, a class without the interface, a constructor that
    raises: each is `refused`, with the reason; the running process was never touched."""
    stack.up([], extra=DRIVER)
    old = driver_row(stack)["pid"]
    for i, (body, words) in enumerate(BAD_BACKENDS):
        p = backend_file(stack, f"bad{i}.py", body)
        r = do_swap(stack, str(p))
        assert r["outcome"] == "refused" and r["reason"] == "load", r
        assert words in r["error"], r
        assert driver_row(stack)["pid"] == old


def test_bad_requests_are_refused_at_once(stack: Stack) -> None:
    stack.up([], extra=DRIVER)
    r = stack.cli("driver", "swap", "blk0", "--to", "not a module")
    assert r.returncode != 0 and "is neither a module" in r.stderr, r.stderr
    r = stack.cli("driver", "swap", "nope", "--to", "drivers.blk")
    assert r.returncode != 0 and "no driver named 'nope'" in r.stderr, r.stderr
    r = stack.cli("driver", "swap", "blk0", "--to-file", str(stack.dir / "missing.py"))
    assert r.returncode != 0 and "does not exist" in r.stderr, r.stderr


WATCHED = """
from drivers.sdk import Backend as Base

class Backend(Base):
    def statistics(self):
        return {**super().statistics(), "edition": "EDITION"}
"""


def test_watch_swaps_again_every_time_the_file_changes(stack: Stack) -> None:
    """`--watch FILE`: swapped to the file at once, and again after each edit; the driver
    then runs the edited code (its statistics say which edition) and the guests finish clean.
    """
    f = backend_file(stack, "dev.py", WATCHED.replace("EDITION", "first"))
    with two_guests(stack, DRIVER, ops=OPS) as events:
        env = dict(os.environ, ISOVISOR_RUN_DIR=str(stack.run_dir), COLUMNS="200")
        proc = subprocess.Popen(
            [
                *ISOVISOR,
                "driver",
                "swap",
                "blk0",
                "--watch",
                str(f),
                "--probation",
                "0.2",
                "--max-swaps",
                "2",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=stack.dir,
        )
        try:
            assert proc.stdout is not None
            first = json.loads(proc.stdout.readline())
            assert first["outcome"] == "swapped" and first["new"] == str(f), first
            wait_until(
                lambda: driver_row(stack)["statistics"].get("edition") == "first",
                timeout=10,
                what="the first edition's statistics",
            )
            f.write_text(WATCHED.replace("EDITION", "second"))
            second = json.loads(proc.stdout.readline())
            assert second["outcome"] == "swapped" and second["old_pid"] == first["pid"], second
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wait_until(
            lambda: driver_row(stack)["statistics"].get("edition") == "second",
            timeout=10,
            what="the edited code serving",
        )
        finish_and_verify(stack, events, ops=OPS)


def test_a_backend_that_cannot_be_drained_is_not_swapped(stack: Stack) -> None:
    """The running backend has no save(): the swap is refused (drain) and it goes on serving;
    the new process is gone."""
    old_style = backend_file(
        stack,
        "nosave.py",
        """
        from drivers.blk.backend import Backend as Base

        class Backend(Base):
            save = None
    """,
    )
    stack.up([], extra=DRIVER.replace('"drivers.blk"', f'"{old_style}"'))
    old = driver_row(stack)["pid"]
    r = do_swap(stack, "drivers.blk")
    assert (r["outcome"], r["reason"]) == ("refused", "drain"), r
    assert "cannot be drained: it has no save() and suspend()" in r["error"], r
    assert driver_row(stack)["pid"] == old
    wait_until(
        lambda: gone(r["pid"]),
        timeout=10,
        what="the new process to be gone",
    )


README_IMAGES = [Path(f"/tmp/isovisor-blk-recovery-{g}.img") for g in ("g1", "g2")]


def test_the_readme_swap_commands_on_the_example_stack(stack: Stack) -> None:
    """README.md's hot swap, as written, on examples/blk-recovery.toml: `isovisor driver swap
    blk0 --to drivers.blk.ram:RamBackend` and back with `--to drivers.blk` both go through
    (that stack's request_timeout_sec is 5 s, the old fixed default swap timeout, which was
    refused), `--timeout` reaches the supervisor (an out-of-range one is refused and one in
    range is the swap's), and the guests go on without an error."""
    root = Path(__file__).resolve().parent.parent
    made = [p for p in README_IMAGES if not p.exists()]  # the example keeps its images
    try:
        up = stack.cli("up", "--detach", str(root / "examples" / "blk-recovery.toml"))
        assert up.returncode == 0, up.stdout + up.stderr
        ping = stack.call("ping")
        stack.pids += [ping["pid"], ping["kernel_pid"]]
        stack.pids += [d["pid"] for d in stack.call("drivers")["drivers"] if d["pid"]]
        more_io(stack, 2000)
        steps = [
            ("drivers.blk.ram:RamBackend", [], None),
            ("drivers.blk", [], None),
            ("drivers.blk.ram:RamBackend", ["--timeout", "3"], 3.0),
        ]
        for target, extra, timeout in steps:
            old = driver_row(stack)["pid"]
            r = stack.cli("driver", "swap", "blk0", "--to", target, *extra, timeout=90)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "swapped blk0: " in r.stdout and f"-> {target}; pid {old} -> " in r.stdout, (
                r.stdout
            )
            row = driver_row(stack)
            stack.pids.append(row["pid"])
            assert (row["module"], row["state"]) == (target, "RUNNING"), row
            assert row["last_swap"]["timeout"] == (timeout or 2.5), row["last_swap"]
            more_io(stack, 2000)
        bad = stack.cli("driver", "swap", "blk0", "--to", "drivers.blk", "--timeout", "0.01")
        assert bad.returncode == 1, bad
        assert (
            "--timeout must be at least 0.1 s and less than driver blk0's "
            "request_timeout_sec (5 s" in bad.stderr
        ), bad.stderr
        assert driver_row(stack)["module"] == "drivers.blk.ram:RamBackend"  # nothing happened
        for g in ("g1", "g2"):
            con = stack.cli("console", g).stdout
            assert "blkstress: disk=" in con, con
            for word in ("failed", "MISMATCH", "stopped", "error"):
                assert word not in con, con
        down = stack.cli("down", timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr
    finally:
        for p in made:
            p.unlink(missing_ok=True)
