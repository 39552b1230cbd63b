"""The driver supervision state machine (isovisor/supervisor/supervision.py), driven by a fake
clock."""

from __future__ import annotations

import pytest

from isovisor.config import DriverConfig
from isovisor.supervisor.supervision import (
    Action,
    BackendError,
    CpuMeter,
    DriverSupervision,
    Policy,
    State,
    backoff_delay,
    describe_exit,
    group_restarts,
    should_restart,
)

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


def make(**policy: object) -> tuple[DriverSupervision, FakeClock]:
    clock = FakeClock()
    return DriverSupervision("blk0", Policy(**policy), clock), clock  # type: ignore[arg-type]


def up(sv: DriverSupervision, clock: FakeClock, pid: int, stable: bool = True) -> None:
    """Start an instance, see its hello, and (if stable) let it run past start_secs."""
    sv.starting(pid)
    assert sv.state == State.STARTING
    sv.ready()
    assert sv.state == State.RUNNING
    if stable:
        clock.advance(sv.policy.start_secs + 0.5)


def test_normal_life_cycle() -> None:
    sv, clock = make()
    assert sv.state == State.STOPPED and sv.row()["pid"] is None
    sv.starting(10)
    clock.advance(0.3)
    sv.ready()
    clock.advance(2.0)
    row = sv.row()
    assert (row["state"], row["pid"], row["uptime_s"], row["restarts"]) == ("RUNNING", 10, 2.3, 0)
    sv.stopping()
    assert sv.state == State.STOPPING
    sv.stopped()
    assert sv.state == State.STOPPED and sv.uptime() == 0.0


def test_exit_reasons() -> None:
    assert describe_exit(-9).reason == "signal:SIGKILL"
    assert describe_exit(-11).signal == "SIGSEGV"
    assert describe_exit(-6).text == "killed by SIGABRT"
    e = describe_exit(70)
    assert (e.reason, e.status, e.signal, e.text) == ("exit:70", 70, None, "exited with status 70")


@pytest.mark.parametrize(
    ("policy", "reason", "restart"),
    [
        ("permanent", "exit:0", True),
        ("permanent", "signal:SIGKILL", True),
        ("transient", "exit:0", False),
        ("transient", "exit:3", True),
        ("transient", "signal:SIGSEGV", True),
        ("transient", "hang", True),
        ("transient", "violation", True),
        ("transient", "rss", True),
        ("transient", "cpu", True),
        ("transient", "stopped", True),
        ("temporary", "signal:SIGKILL", False),
        ("temporary", "hang", False),
        ("temporary", "manual", True),
        ("transient", "group", True),
    ],
)
def test_restart_policies(policy: str, reason: str, restart: bool) -> None:
    assert should_restart(policy, reason) is restart
    sv, clock = make(restart=policy)
    up(sv, clock, 10)
    d = sv.failed(reason, "pid 10 went away")
    assert (d.action == Action.RESTART) is restart
    if restart:
        assert sv.state == State.EXITED and d.delay == 0  # the caller starts it at once
    else:
        assert sv.state == State.EXITED and d.action == Action.GIVE_UP
        assert sv.restarts == 0 and sv.last_failure == f"{reason}: pid 10 went away"


def test_restarts_counted_by_reason_and_last_failure() -> None:
    sv, clock = make()
    for pid, reason in enumerate(["signal:SIGKILL", "hang", "signal:SIGKILL", "exit:70"]):
        up(sv, clock, pid)
        sv.failed(reason, f"pid {pid}")
    row = sv.row()
    assert row["restarts"] == 4
    assert row["restarts_by_reason"] == {"signal:SIGKILL": 2, "hang": 1, "exit:70": 1}
    assert row["last_failure"] == "exit:70: pid 3" and row["last_reason"] == "exit:70"
    assert row["pid"] == 3  # the last instance's, while none runs


def test_more_than_intensity_restarts_within_period_is_fatal() -> None:
    sv, clock = make(intensity=3, period=10.0)
    for pid in range(3):
        up(sv, clock, pid)  # each one was stable: immediate restarts, 1.5 s apart
        d = sv.failed("signal:SIGKILL")
        assert d.action == Action.RESTART and d.restarts_in_period == pid + 1
    up(sv, clock, 3)
    d = sv.failed("signal:SIGKILL")
    assert d.action == Action.FATAL and sv.state == State.FATAL
    assert d.restarts_in_period == 3 and sv.restarts == 3


def test_restarts_outside_the_period_are_forgotten() -> None:
    sv, clock = make(intensity=2, period=5.0)
    for pid in range(10):  # one failure every 3 s: never more than 2 within 5 s
        up(sv, clock, pid)
        clock.advance(1.5)
        assert sv.failed("exit:1").action == Action.RESTART
    assert sv.restarts == 10 and sv.restarts_in_period() <= 2


def test_intensity_zero_means_no_restart() -> None:
    sv, clock = make(intensity=0)
    up(sv, clock, 1)
    assert sv.failed("signal:SIGKILL").action == Action.FATAL


def test_backoff_schedule() -> None:
    default = Policy()
    assert [backoff_delay(default, n) for n in range(1, 10)] == [
        0.0,
        0.05,
        0.1,
        0.2,
        0.4,
        0.8,
        1.6,
        3.2,
        5.0,
    ]
    p = Policy(backoff=0.5, backoff_max=3.0)
    assert [backoff_delay(p, n) for n in range(1, 7)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_failed_starts_back_off_then_start_again() -> None:
    sv, clock = make(intensity=100, start_secs=1.0)
    up(sv, clock, 1)
    d = sv.failed("signal:SIGKILL")  # after a stable run: at once
    assert sv.state == State.EXITED and d.delay == 0
    delays = []
    for pid in range(2, 8):
        sv.starting(pid)
        clock.advance(0.2)  # dies before its hello: a failed start
        d = sv.failed("exit:1")
        assert sv.state == State.BACKOFF and d.action == Action.RESTART
        delays.append(d.delay)
        assert not sv.due() or d.delay == 0
        clock.advance(d.delay)
        assert sv.due()
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]


def test_exit_soon_after_hello_is_a_failed_start() -> None:
    sv, clock = make(start_secs=2.0)
    up(sv, clock, 1)
    sv.failed("signal:SIGKILL")
    sv.starting(2)
    sv.ready()
    clock.advance(1.0)  # hello, but not up for start_secs
    d = sv.failed("signal:SIGSEGV")
    assert sv.state == State.BACKOFF and d.delay == 0.05
    sv.starting(3)
    sv.ready()
    clock.advance(2.5)  # a stable run resets the streak
    d = sv.failed("signal:SIGSEGV")
    assert sv.state == State.EXITED and d.delay == 0


def test_a_warm_spare_is_used_without_delay() -> None:
    sv, clock = make()
    up(sv, clock, 1)
    sv.failed("signal:SIGKILL", spare=True)
    sv.starting(2)  # killed at once, before start_secs: a failed start
    d = sv.failed("signal:SIGKILL", spare=True)
    assert sv.state == State.BACKOFF and d.delay == 0 and d.use_spare and sv.due()
    sv.starting(3)
    d = sv.failed("signal:SIGKILL", spare=False)  # no spare this time: the backoff applies
    assert d.delay == 0.1 and not d.use_spare


def test_manual_restart_is_not_counted_toward_intensity() -> None:
    sv, clock = make(intensity=1, period=60.0)
    up(sv, clock, 1)
    for pid in range(2, 7):
        d = sv.failed("manual", "restarted by the operator")
        assert d.action == Action.RESTART and d.delay == 0 and sv.state == State.EXITED
        sv.starting(pid)  # even before its hello
    assert sv.by_reason["manual"] == 5 and sv.restarts == 5
    up(sv, clock, 7)
    assert sv.failed("signal:SIGKILL").action == Action.RESTART  # the one allowed restart
    up(sv, clock, 8)
    assert sv.failed("signal:SIGKILL").action == Action.FATAL


def test_start_leaves_fatal_with_a_fresh_window() -> None:
    sv, clock = make(intensity=1)
    up(sv, clock, 1)
    sv.failed("hang")
    up(sv, clock, 2)
    assert sv.failed("hang").action == Action.FATAL
    sv.manual_start()
    up(sv, clock, 3)
    assert sv.state == State.RUNNING
    assert sv.failed("hang").action == Action.RESTART
    assert sv.restarts == 2 and sv.by_reason["hang"] == 2


def test_first_start_failure_is_fatal() -> None:
    sv, _ = make()
    sv.starting(1)
    sv.start_failed("driver blk0 exited with status 2 while starting")
    row = sv.row()
    assert row["state"] == "FATAL" and "status 2" in row["last_failure"]
    assert row["restarts"] == 0 and row["last_error"] is None


def test_a_failure_keeps_what_the_instance_said_about_it() -> None:
    """``last_error``: the report of the instance of the last failure (None if it wrote
    none), with where in the backend's code."""
    said = {
        "error": "kick(1,) failed in the backend: KeyError: 'g1/xvda'",
        "where": "/src/mydisk.py:40, in open_disk",
        "traceback": "Traceback (most recent call last):\n...\nKeyError: 'g1/xvda'\n",
    }
    err = BackendError.of(3, said)
    assert err is not None
    assert err.text == (
        "kick(1,) failed in the backend: KeyError: 'g1/xvda' (at /src/mydisk.py:40, in open_disk)"
    )
    assert BackendError.of(3, None) is None and BackendError.of(3, {"error": ""}) is None
    assert BackendError.of(3, {"error": "boom"}) == BackendError(3, "boom")
    sv, clock = make()
    up(sv, clock, 3)
    sv.failed("exit:70", "pid 3 exited with status 70", error=err)
    assert sv.row()["last_error"] == {"pid": 3, **said}
    up(sv, clock, 4)
    sv.failed("signal:SIGKILL", "pid 4 killed by SIGKILL")  # said nothing: nothing is kept
    assert sv.row()["last_error"] is None
    sv.starting(5)
    sv.start_failed("driver blk0 (mydisk.py) could not start: ...", BackendError(5, "boom"))
    assert sv.row()["last_error"] == {"pid": 5, "error": "boom", "where": "", "traceback": ""}


def test_group_strategies() -> None:
    m = ["a", "b", "c", "d"]
    assert group_restarts(m, "b", "one_for_one") == []
    assert group_restarts(m, "b", "rest_for_one") == ["c", "d"]
    assert group_restarts(m, "d", "rest_for_one") == []
    assert group_restarts(m, "b", "one_for_all") == ["a", "c", "d"]


def test_group_restart_is_not_counted() -> None:
    sv, clock = make(intensity=0, restart="transient")
    up(sv, clock, 1)
    d = sv.failed("group", "restarted with blk1")
    assert d.action == Action.RESTART and sv.by_reason == {"group": 1}


def test_policy_from_config() -> None:
    cfg = DriverConfig(
        name="b",
        module="drivers.blk",
        restart="transient",
        intensity=3,
        period=7.0,
        backoff=0.2,
        backoff_max=1.0,
        start_secs=0.5,
    )
    assert Policy.of(cfg) == Policy("transient", 3, 7.0, 0.2, 1.0, 0.5)


def test_cpu_meter_averages_over_the_window() -> None:
    m = CpuMeter(window=5.0)
    assert m.add(0.0, 0.0) is None
    assert m.add(2.5, 2.5) is None  # not 5 s of history yet
    assert m.add(5.0, 5.0) == pytest.approx(100.0)
    assert m.add(7.5, 5.0) == pytest.approx(50.0)  # busy 2.5 s of the last 5 s
    for t in (10.0, 12.5, 15.0):
        pct = m.add(t, 5.0)
    assert pct == pytest.approx(0.0)  # idle for the whole window
