"""Transparent driver recovery, end to end (docs/recovery.md).

Two guests run `blkstress` (verified random I/O at QD32) on their own image files through one
`drivers.blk` process.  While they do, the driver is killed for real (a signal from outside,
or a fault injected inside it: a real invalid memory access, abort, an unhandled exception, an
exit, a hang, runaway memory).  Each test checks what a user would: the supervisor replaced the
driver and counted the restart with the right reason, both guests finished with `errors=0`,
and the image files hold exactly the data the guests wrote.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from drivers import keeper
from ipc.control import Client
from ipc.events import Subscriber
from isovisor.paths import RunDir
from isovisor.procs import gone
from tests.blkdata import check_image
from tests.conftest import Stack, command_line, process_name, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

DRIVER = """[driver.blk0]
module = "drivers.blk"
watchdog_sec = 1.0
request_timeout_sec = 5.0
intensity = 20
period = 60.0
"""
OPS = 25_000  # per guest: a fault and its recovery come within the first ~13,000 here
BLOCKS = 1024


def guest_extra(seed: int, ops: int = OPS) -> str:
    return f"ops={ops} qd=32 mix=60 seed={seed} blocks={BLOCKS} timeout=30000"


def summary(console: str) -> dict[str, int]:
    line = [ln for ln in console.splitlines() if ln.startswith("blkstress: ops=")]
    assert line, f"no blkstress summary line in:\n{console}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line[-1])}


def kernel_call(stack: Stack, command: str, **props: Any) -> dict[str, Any]:
    with Client(RunDir(stack.run_dir).kernel_control, timeout=15) as c:
        return c.call(command, **props)


def driver_row(stack: Stack, name: str = "blk0") -> dict[str, Any]:
    rows = {d["name"]: d for d in stack.call("status")["drivers"]}
    return rows[name]


class Events:
    """One subscription for the whole test: remembers every event, waits for topics."""

    def __init__(self, sub: Subscriber, stack: Stack) -> None:
        self.sub = sub
        self.stack = stack
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def _take(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        ev = self.sub.recv(timeout)
        if ev is not None:
            self.seen.append(ev)
            topic, p = ev
            if topic.endswith(".spawn") and isinstance(p.get("pid"), int):
                self.stack.pids.append(p["pid"])  # reaped at the end, even on failure
        return ev

    def wait(self, topic: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        for t, p in self.seen:
            if t == topic and all(p.get(k) == v for k, v in match.items()):
                return p
        deadline = time.monotonic() + timeout
        while True:
            ev = self._take(max(0.0, deadline - time.monotonic()))
            if ev is None:
                got = sorted({t for t, _ in self.seen if not t.startswith("console.")})
                raise AssertionError(f"no {topic!r} {match or ''} within {timeout}s; saw: {got}")
            t, p = ev
            if t == topic and all(p.get(k) == v for k, v in match.items()):
                return p

    def drain(self) -> None:
        while self._take(0) is not None:
            pass

    def count(self, topic: str) -> int:
        return sum(t == topic for t, _ in self.seen)

    def wait_count(self, topic: str, n: int, timeout: float = 30) -> None:
        """Wait until ``topic`` has been seen ``n`` times in all."""
        deadline = time.monotonic() + timeout
        while self.count(topic) < n:
            if self._take(max(0.0, deadline - time.monotonic())) is None:
                raise AssertionError(
                    f"{topic!r} seen {self.count(topic)} times, not {n}, within {timeout}s"
                )


@contextmanager
def two_guests(stack: Stack, driver: str = DRIVER, ops: int = OPS) -> Iterator[Events]:
    """Start the stack with blk0 and two blkstress guests; yield once both do I/O."""
    cfgs = []
    for i, name in enumerate(("g1", "g2")):
        disk = f"target={name}.img, vdev=xvda, access=rw, backend=blk0, size=8M"
        cfgs.append(
            stack.domain_config(
                name,
                "blkstress",
                memory=8,
                on_poweroff="preserve",
                on_crash="preserve",
                extra=guest_extra(11 + i, ops),
                disk=[disk],
            )
        )
    stack.up([], extra=driver)
    with stack.subscribe(["domain.", "driver.", "device."]) as sub:
        events = Events(sub, stack)
        for cfg in cfgs:
            stack.create(cfg)
        wait_until(
            lambda: (
                all(d["requests"] > 2000 for d in stack.call("devices")["devices"])
                and len(stack.call("devices")["devices"]) == 2
            ),
            timeout=60,
            what="both guests doing I/O",
        )
        yield events


def kill_with_a_warm_spare(stack: Stack, events: Events, name: str) -> None:
    """SIGKILL driver ``name``'s active instance once its warm spare is ready, and wait for
    the recovery to be reported."""
    row = wait_until(
        lambda: (r := driver_row(stack, name))["spare_pid"] and r["state"] == "RUNNING" and r,
        timeout=30,
        what=f"{name} with a warm spare",
    )
    before = events.count(f"driver.{name}.recovered")
    os.kill(row["pid"], signal.SIGKILL)
    try:
        events.wait_count(f"driver.{name}.recovered", before + 1, timeout=30)
    except AssertionError as e:
        seen = [f"{t} {p.get('pid')}" for t, p in events.seen if t.startswith("driver.")]
        log = (stack.run_dir / f"driver-{name}.log").read_text()[-4000:]
        raise AssertionError(
            f"{e}; killed pid {row['pid']}; driver events: {seen[-12:]}\n--- driver log ---\n{log}"
        ) from None


def finish_and_verify(stack: Stack, events: Events, ops: int = OPS) -> None:
    """Both guests power off with errors=0 and every block they wrote is in their image."""
    for i, name in enumerate(("g1", "g2")):
        p = events.wait(f"domain.{name}.shutdown", timeout=120)
        con = stack.call("console", name=name)["data"].decode()
        s = summary(con)
        assert (p["code"], s["errors"], s["ops"]) == (0, 0, ops), con
        image = (stack.dir / f"{name}.img").read_bytes()
        gens = check_image(image, seed=11 + i, bs=4096, blocks=BLOCKS)  # raises on a bad block
        assert sum(g is not None for g in gens.values()) > BLOCKS // 2


def assert_replaced(stack: Stack, events: Events, old_pid: int, reason: str) -> dict[str, Any]:
    rec = events.wait("driver.blk0.recovered", timeout=30)
    assert rec["old_pid"] == old_pid and rec["reason"].startswith(reason), rec
    assert rec["pid"] != old_pid and psutil.pid_exists(rec["pid"])
    assert gone(old_pid)
    row = driver_row(stack)
    assert row["state"] == "RUNNING" and row["pid"] == rec["pid"], row
    by = row["restarts_by_reason"]
    assert sum(n for r, n in by.items() if r.startswith(reason)) == 1, by
    return rec


def current_pid(stack: Stack) -> int:
    pid = driver_row(stack)["pid"]
    assert isinstance(pid, int)
    return pid


# --- one test per failure class -------------------------------------------------------------


@pytest.mark.parametrize(
    "how,reason",
    [
        ("sigkill", "signal:SIGKILL"),
        ("segv", "signal:SIGSEGV"),
        ("abort", "signal:SIGABRT"),
        ("exception", "exit:70"),
        ("exit", "exit:3"),
        ("hang", "hang"),
        ("sigstop", "stopped"),
        ("bad_id", "violation"),
        ("bad_status", "violation"),
        ("bad_op", "violation"),
        ("bad_index", "violation"),
    ],
)
def test_a_failed_driver_is_replaced_and_the_guests_never_notice(
    stack: Stack, how: str, reason: str
) -> None:
    with two_guests(stack) as events:
        old = current_pid(stack)
        if how == "sigkill":
            os.kill(old, signal.SIGKILL)
        elif how == "sigstop":
            os.kill(old, signal.SIGSTOP)
        else:
            kernel_call(stack, "driver_inject", name="blk0", kind=how)
        rec = assert_replaced(stack, events, old, reason)
        if how == "hang":
            events.wait("driver.blk0.hang", timeout=1)  # already seen: the kernel noticed
        if how.startswith("bad_"):  # a frontend caught it, held, and got it redone
            v = events.wait("driver.blk0.violation", timeout=1, pid=old)
            assert v["reporter"] == "frontend" and v["held"] is True, v
            events.wait(f"device.{v['domain']}.xvda.rewound", timeout=30)
        finish_and_verify(stack, events)
        assert rec["recovery_ms"] < 5000, rec
        if how.startswith("bad_"):
            cons = [stack.call("console", name=n)["data"].decode() for n in ("g1", "g2")]
            assert sum("holding from response" in c for c in cons) == 1, cons


def test_a_stopped_driver_is_counted_as_stopped_whoever_notices_first(stack: Stack) -> None:
    """A SIGSTOPped driver is noticed by the supervisor's stopped-process check (every 0.5 s)
    or by the kernel's watchdog (0.2 s here), whichever comes first; on a loaded host the
    watchdog has won (a CI run under a CPU burner).  Either way the restart is counted as
    ``stopped``, never as ``hang``: the supervisor looks at a hung driver's process state."""
    with two_guests(stack, DRIVER.replace("watchdog_sec = 1.0", "watchdog_sec = 0.2")) as events:
        old = current_pid(stack)
        os.kill(old, signal.SIGSTOP)
        assert_replaced(stack, events, old, "stopped")  # rec["reason"] starts with "stopped"
        assert "hang" not in driver_row(stack)["restarts_by_reason"]
        finish_and_verify(stack, events)


def test_runaway_memory_gets_the_driver_replaced(stack: Stack) -> None:
    with two_guests(stack, DRIVER + 'max_rss = "160M"\n') as events:
        old = current_pid(stack)
        for _ in range(3):  # 3 x 64 MiB on top of the driver's own ~40 MiB
            kernel_call(stack, "driver_inject", name="blk0", kind="leak")
        assert_replaced(stack, events, old, "rss")
        finish_and_verify(stack, events)


def test_a_replacement_that_never_says_hello_is_killed_and_started_again(stack: Stack) -> None:
    """The first replacement is stuck before its hello: after start_timeout it is killed
    (reason handshake) and the next one takes over; the guests never notice."""
    gate = stack.dir / "start-gate"
    driver = (
        DRIVER + "spare = false\nstart_timeout = 1.0\n[driver.blk0.options]\n"
        f'start_gate = "{gate}"\n'
    )
    with two_guests(stack, driver) as events:
        old = current_pid(stack)
        gate.touch()
        os.kill(old, signal.SIGKILL)
        stuck = events.wait("driver.blk0.exit", timeout=30, reason="handshake")
        assert stuck["pid"] != old and stuck["signal"] == "SIGKILL", stuck
        gate.unlink()
        rec = events.wait("driver.blk0.recovered", timeout=30)
        assert rec["pid"] not in (old, stuck["pid"]), rec
        finish_and_verify(stack, events)
    by = driver_row(stack)["restarts_by_reason"]
    assert by.get("signal:SIGKILL") == 1 and by.get("handshake", 0) >= 1, by


def test_repeated_kills_in_a_row(stack: Stack) -> None:
    """Ten SIGKILLs while the guests run: every one is recovered, nothing is lost."""
    with two_guests(stack, ops=40_000) as events:  # the ten kills take ~16,000 here
        for k in range(10):
            old = current_pid(stack)
            n = len([1 for t, _ in events.seen if t == "driver.blk0.recovered"])
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while len([1 for t, _ in events.seen if t == "driver.blk0.recovered"]) == n:
                assert events._take(max(0.0, deadline - time.monotonic())) is not None, (
                    f"kill {k + 1}: no recovery"
                )
        assert driver_row(stack)["restarts"] == 10
        finish_and_verify(stack, events, ops=40_000)


def test_a_poison_request_gets_an_error_and_everything_else_is_served(stack: Stack) -> None:
    """A request that kills every instance that runs it is answered with an error after
    poison_after (3) deaths; the driver then serves other requests."""
    driver = DRIVER + '[driver.blk0.options]\nfault_sector = 800\nfault_kind = "segv"\n'
    disk = "target=p.img, vdev=xvda, access=rw, backend=blk0, size=1M"
    bad = stack.domain_config(
        "p1",
        "blkprobe",
        memory=8,
        on_poweroff="preserve",
        extra="action=write sector=800 count=1",
        disk=[disk],
    )
    good = stack.domain_config(
        "p2",
        "blkprobe",
        memory=8,
        on_poweroff="preserve",
        extra="action=write sector=8 count=1 byte=0x5a",
        disk=[disk],
    )
    stack.up([], extra=driver)
    with stack.subscribe(["domain.", "driver."]) as sub:
        events = Events(sub, stack)
        stack.create(bad)
        poison = events.wait("driver.blk0.poison", timeout=60)
        assert poison["domain"] == "p1" and "sector=800" in poison["request"], poison
        events.wait("domain.p1.shutdown", timeout=60)
        con = stack.call("console", name="p1")["data"].decode()
        assert "blkprobe: write status=-1" in con and "blkprobe: done" in con, con
        assert stack.cli("destroy", "p1").returncode == 0  # frees the image's lock
        stack.create(good)
        events.wait("domain.p2.shutdown", timeout=60)
    con = stack.call("console", name="p2")["data"].decode()
    assert "blkprobe: write status=0" in con, con
    assert (stack.dir / "p.img").read_bytes()[8 * 512 : 9 * 512] == b"\x5a" * 512
    by = driver_row(stack)["restarts_by_reason"]
    assert by.get("signal:SIGSEGV") == 3, by


def test_a_request_that_always_gets_a_bad_response_ends_as_poison(stack: Stack) -> None:
    """Each instance answers the same request with a bad status: the frontend holds, the
    instance is replaced and the request redone, three times; then it is answered with a clean
    error and the driver serves the rest."""
    driver = DRIVER + '[driver.blk0.options]\nfault_sector = 800\nfault_kind = "bad_status"\n'
    disk = "target=p.img, vdev=xvda, access=rw, backend=blk0, size=1M"
    bad = stack.domain_config(
        "p1",
        "blkprobe",
        memory=8,
        on_poweroff="preserve",
        extra="action=write sector=800 count=1",
        disk=[disk],
    )
    stack.up([], extra=driver)
    with stack.subscribe(["domain.", "driver.", "device."]) as sub:
        events = Events(sub, stack)
        stack.create(bad)
        events.wait("domain.p1.shutdown", timeout=60)
        con = stack.call("console", name="p1")["data"].decode()
        assert "blkprobe: write status=-1" in con and con.count("holding from response") == 3, (
            con,
            [(t, p) for t, p in events.seen if t.startswith(("driver.", "device."))],
        )
        poison = events.wait("driver.blk0.poison", timeout=5)
        assert poison["domain"] == "p1" and "sector=800" in poison["request"], poison
    assert driver_row(stack)["restarts_by_reason"].get("violation") == 3


def test_too_many_restarts_make_the_driver_fatal_and_requests_fail_cleanly(stack: Stack) -> None:
    driver = DRIVER.replace("intensity = 20", "intensity = 2") + "spare = false\n"
    with two_guests(stack, driver, ops=OPS) as events:
        for _ in range(3):
            pid = current_pid(stack)
            os.kill(pid, signal.SIGKILL)
            events.wait("driver.blk0.exit", timeout=30, pid=pid)
            if driver_row(stack)["state"] == "FATAL":
                break
            wait_until(
                lambda p=pid: current_pid(stack) not in (None, p), timeout=30, what="a replacement"
            )
        fatal = events.wait("driver.blk0.fatal", timeout=30)
        assert fatal["restarts"] >= 2, fatal
        # no guest waits forever: their requests now fail and they finish with errors
        for name in ("g1", "g2"):
            p = events.wait(f"domain.{name}.shutdown", timeout=90)
            con = stack.call("console", name=name)["data"].decode()
            assert p["code"] == 1 and summary(con)["errors"] > 0, con
        assert driver_row(stack)["state"] == "FATAL"
        r = stack.cli("driver", "start", "blk0")
        assert r.returncode == 0, r.stderr
        ready = events.wait("driver.blk0.ready", timeout=30)
        assert ready["doorbells"] is True, ready  # the new instance took its devices' eventfds
        assert driver_row(stack)["state"] in ("STARTING", "RUNNING")


def test_no_leaks_after_many_restarts(stack: Stack) -> None:
    """25 SIGKILLs: the kernel's file descriptors and the stack's processes and segments stay
    the same."""
    # the 25 kills take ~17,000 of the guests' ops here
    driver = DRIVER.replace("intensity = 20", "intensity = 100")
    with two_guests(stack, driver, ops=40_000) as events:
        kernel = psutil.Process(stack.pids[1])
        fds0 = kernel.num_fds()
        segs0 = sorted(Path("/dev/shm").glob(f"isovisor.{stack.pids[0]}.*"))
        for _ in range(25):
            old = current_pid(stack)
            os.kill(old, signal.SIGKILL)
            events.wait("driver.blk0.recovered", timeout=30, old_pid=old)
        finish_and_verify(stack, events, ops=40_000)
        events.drain()
        # (a dead instance's doorbell connection is closed once the kernel sees its end)
        wait_until(
            lambda: kernel.num_fds() <= fds0 + 2,
            timeout=10,
            what=f"the kernel back to {fds0} + 2 descriptors (has {kernel.num_fds()})",
        )
        assert sorted(Path("/dev/shm").glob(f"isovisor.{stack.pids[0]}.*")) == segs0
        sup = psutil.Process(stack.pids[0])
        # a dead instance's keeper (drivers/keeper.py) comes to the supervisor, which reaps it
        wait_until(
            lambda: not [c for c in sup.children() if process_name(c) == keeper.NAME],
            timeout=10,
            what="the dead instances' keepers reaped",
        )
        drivers = [c for c in sup.children() if "drivers.host" in command_line(c)]
        assert len(drivers) <= 2, drivers  # the active instance and its spare
        for d in drivers:  # each with its keeper
            assert [process_name(c) for c in d.children()] == [keeper.NAME], d
