"""Consoles served by a console driver process, end to end (docs/console.md).

A guest prints numbered lines through its console ring; the `drivers.console` process writes
them to the domain's log file, and `isovisor console` shows them.  The driver is killed with
SIGKILL while the guest prints: the log still holds every line exactly once, in order.  Input
typed for the guest (`isovisor console NAME --send`) reaches it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable

import pytest

from isovisor.cli.swapclient import swap
from isovisor.paths import RunDir
from tests.conftest import ISOVISOR, Stack, wait_until
from tests.test_recovery import Events, driver_row, kill_with_a_warm_spare

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

DRIVER = """[driver.con0]
module = "drivers.console"
watchdog_sec = 1.0
intensity = 50
period = 60.0
"""
PATTERN = "abcdefghijklmnopqrstuvwxyz0123456789"


def check_lines(text: str, n: int) -> None:
    """``text`` holds ``conecho: line i`` for i in 0..n-1, each once, in order."""
    got = [
        int(m) for m in re.findall(r"^conecho: line (\d{9}) " + PATTERN + "$", text, re.MULTILINE)
    ]
    assert got == list(range(n)), (
        f"{len(got)} line(s); first differences: "
        f"{[(i, g) for i, g in enumerate(got) if g != i][:5]}"
    )


def start(stack: Stack, name: str, extra: str, console: bool = False) -> Events:
    """The stack with con0 and one conecho guest.  ``console``: also take the relayed
    ``console.`` events (only where the test reads them all: a guest printing megabytes
    fills a subscriber that is not reading, and ZeroMQ drops what does not fit)."""
    cfg = stack.domain_config(
        name, "conecho", memory=4, on_poweroff="preserve", console="con0", extra=extra
    )
    stack.up([], extra=DRIVER)
    sub = stack.subscribe(["domain.", "driver.", *(["console."] if console else [])])
    events = Events(sub, stack)
    stack.create(cfg)
    return events


def test_output_goes_through_the_driver_to_the_log_and_the_cli(stack: Stack) -> None:
    events = start(stack, "c", "lines=600", console=True)

    def relayed() -> str:
        events.drain()
        return b"".join(p["data"] for t, p in events.seen if t == "console.c").decode()

    try:
        events.wait("domain.c.shutdown", timeout=60)
        text = wait_until(
            lambda: t if "conecho: done" in (t := relayed()) else None,
            timeout=30,
            what="every byte relayed",
        )
    finally:
        events.sub.close()
    check_lines(text, 600)  # `console -f` sees the same bytes as events, once each
    log = (stack.run_dir / "consoles" / "c.log").read_text()
    check_lines(log, 600)
    assert "conecho: done lines=600 echoed=0" in log
    shown = stack.cli("console", "c")
    assert shown.returncode == 0, shown.stderr
    check_lines(shown.stdout, 600)
    row = next(d for d in stack.call("devices")["devices"] if d["domain"] == "c")
    assert (row["class"], row["vdev"], row["backend"]) == ("console", "console", "con0"), row


def print_through(
    stack: Stack, lines: int, step: int, times: int, disturb: Callable[[Events], None]
) -> None:
    """A conecho guest prints ``lines`` lines; each time the log has grown by another ``step``
    bytes (``times`` times), ``disturb(events)``.  Then every line must reach the log once, in
    order."""
    events = start(stack, "c", f"lines={lines}")
    path = stack.run_dir / "consoles" / "c.log"
    try:
        for k in range(times):
            least = (k + 1) * step
            wait_until(
                lambda least=least: path.exists() and path.stat().st_size > least,
                timeout=60,
                what=f"{least} bytes in the log",
            )
            disturb(events)
        events.wait("domain.c.shutdown", timeout=120)
        # The guest's last lines may still be in its ring when it powers off: the driver
        # appends them on its next turn.
        wait_until(
            lambda: "conecho: done" in path.read_text(), timeout=30, what="the last line in the log"
        )
    finally:
        events.sub.close()
    check_lines(path.read_text(), lines)


def test_killing_the_console_driver_loses_and_repeats_no_byte(stack: Stack) -> None:
    print_through(
        stack, 60_000, 300_000, 5, lambda events: kill_with_a_warm_spare(stack, events, "con0")
    )
    assert driver_row(stack, "con0")["restarts"] == 5


def test_a_hot_swap_of_the_console_driver_keeps_every_byte_once(stack: Stack) -> None:
    pids: list[int] = []  # each swap's new instance, the old one of the next swap

    def hot_swap(_: Events) -> None:
        old = pids[-1] if pids else driver_row(stack, "con0")["pid"]
        r = swap(RunDir(stack.run_dir), "con0", "drivers.console", wait=60, probation=0.3)
        assert r["outcome"] == "swapped" and r["old_pid"] == old and r["pid"] != old, r
        stack.pids.append(r["pid"])
        pids.append(r["pid"])

    print_through(stack, 40_000, 400_000, 2, hot_swap)
    row = driver_row(stack, "con0")
    assert (row["swaps"], row["restarts"]) == (2, 0), row


def test_a_failed_console_driver_never_blocks_the_guest(stack: Stack) -> None:
    """A console driver that may not restart (intensity 0) is killed while the guest prints:
    it becomes FATAL, the kernel takes the output over into its own console, the guest
    finishes, and `isovisor console` shows the whole stream, the kernel's part merged in."""
    cfg = stack.domain_config(
        "c", "conecho", memory=4, on_poweroff="preserve", console="con0", extra="lines=20000"
    )
    stack.up([], extra=DRIVER.replace("intensity = 50", "intensity = 0"))
    with stack.subscribe(["domain.", "driver."]) as sub:
        events = Events(sub, stack)
        stack.create(cfg)
        path = stack.run_dir / "consoles" / "c.log"
        wait_until(
            lambda: path.exists() and path.stat().st_size > 100_000,
            timeout=60,
            what="output in the log",
        )
        os.kill(driver_row(stack, "con0")["pid"], signal.SIGKILL)
        events.wait("driver.con0.fatal", timeout=30)
        done = events.wait("domain.c.shutdown", timeout=60)
    assert done["code"] == 0
    shown = stack.cli("console", "c").stdout
    assert shown.rstrip().endswith("conecho: done lines=20000 echoed=0"), shown[-300:]
    assert path.stat().st_size < 20000 * 60  # the rest went through the kernel


def test_input_reaches_the_guest(stack: Stack) -> None:
    events = start(stack, "c", "echo=1 timeout=30000")
    try:
        wait_until(
            lambda: "conecho: ready for input" in stack.cli("console", "c").stdout,
            timeout=30,
            what="conecho waiting for input",
        )
        for word in ("hello", "isovisor console"):
            r = stack.cli("console", "c", "--send", word)
            assert r.returncode == 0, r.stderr
        wait_until(
            lambda: "conecho: got isovisor console" in stack.cli("console", "c").stdout,
            timeout=30,
            what="the echo",
        )
        assert stack.cli("console", "c", "--send", "quit").returncode == 0
        events.wait("domain.c.shutdown", timeout=30)
    finally:
        events.sub.close()
    out = stack.cli("console", "c").stdout
    assert "conecho: got hello\nconecho: got isovisor console\n" in out, out
    assert "conecho: done lines=0 echoed=2" in out, out


def test_the_interactive_console_follows_output_and_types_into_the_guest(stack: Stack) -> None:
    """`isovisor console c -i`: what is typed reaches the guest, its answer is printed."""
    events = start(stack, "c", "echo=1 timeout=30000")
    env = {**os.environ, "ISOVISOR_RUN_DIR": str(stack.run_dir), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [*ISOVISOR, "console", "c", "-i"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen: list[str] = []
    try:
        assert proc.stdin is not None and proc.stdout is not None
        for line in proc.stdout:  # the history, then followed output
            seen.append(line)
            if line.startswith("conecho: ready for input"):
                proc.stdin.write("typed by hand\n")
                proc.stdin.flush()
            if line.startswith("conecho: got typed by hand"):
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            if line.startswith("conecho: done"):
                break
        events.wait("domain.c.shutdown", timeout=30)
    finally:
        events.sub.close()
        proc.kill()
        proc.wait(10)
    assert "conecho: got typed by hand\n" in seen, seen
    assert "conecho: done lines=0 echoed=1\n" in seen, seen


def test_input_for_a_kernel_console_is_refused_with_the_reason(stack: Stack) -> None:
    cfg = stack.domain_config(
        "k", "conecho", memory=4, on_poweroff="preserve", extra="echo=1 timeout=1"
    )
    stack.up([cfg], extra=DRIVER)
    r = stack.cli("console", "k", "--send", "hello")
    assert r.returncode != 0
    assert "has no console driver" in r.stderr, r.stderr
