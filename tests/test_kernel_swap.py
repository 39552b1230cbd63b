"""The kernel's side of a hot swap (kernel/swap.py, docs/hotswap.md), against driver instances
played by the test: a real kernel runs a real blkstress guest; the old and new instances are
threads of this test, so every step (drain, saved, restore, restored, hello, a refusal, a
silence) happens exactly when the test says."""

from __future__ import annotations

import time

import pytest

from tests import test_kernel_recovery
from tests.test_kernel_recovery import FakeDriver, Kernel, kinds, summary, wait_until

kernel = test_kernel_recovery.kernel  # the fixture: a real kernel process

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]
GUEST = "ops=6000 qd=16 mix=60 seed=5 blocks=256 timeout=30000"


def spare(kernel: Kernel, name: str, pid: int, **kw: object) -> FakeDriver:
    drv = FakeDriver(kernel, name, pid, spare=True, **kw)  # type: ignore[arg-type]
    kernel.drivers.append(drv)
    drv.start()
    return drv


def start_swap(
    kernel: Kernel, old: FakeDriver, new: FakeDriver, timeout_ms: int = 3000
) -> dict[str, object]:
    return kernel.call(
        "driver_swap", name=old.name, pid=new.pid, endpoint=new.endpoint, timeout_ms=timeout_ms
    )


def guest_finishes(kernel: Kernel, ev: object, name: str = "s") -> None:
    ev.wait(f"domain.{name}.shutdown", timeout=40)  # type: ignore[attr-defined]
    s = summary(kernel.console(name))
    assert (s["errors"], s["mismatches"]) == (0, 0), kernel.console(name)


def test_a_swap_drains_the_old_instance_and_resumes_under_the_new_one(kernel: Kernel) -> None:
    """drain -> saved -> restore (the very state saved) -> restored -> hello -> every device
    attached again and resumed: swap_resumed gives the stall and what the rings carried;
    the old instance is sent no control message after the drain, and the guest verifies every
    block."""
    disks: dict[str, bytearray] = {}
    with kernel.subscribe(["driver.blkS.", "domain.s."]) as ev:
        old = kernel.driver("blkS", 9101, disks=disks)
        kernel.create("s", "blkstress", GUEST, "blkS")
        wait_until(lambda: kernel.device("s")["requests"] > 500, "guest I/O")
        new = spare(kernel, "blkS", 9102, disks=disks)
        ev.wait("driver.blkS.spare", pid=9102)
        assert start_swap(kernel, old, new)["old_pid"] == 9101
        assert ev.wait("driver.blkS.draining") == {"pid": 9101, "new_pid": 9102}
        done = ev.wait("driver.blkS.swap_resumed")
        assert (done["pid"], done["old_pid"], done["rollback"], done["devices"]) == (
            9102,
            9101,
            False,
            1,
        ), done
        assert 0 <= done["stall_ms"] < 3000 and done["carried"] >= 0, done
        restore = new.wait_for(lambda m: [x for x in m if x[0] == "restore"], "restore")[0]
        assert restore == ["restore", {"saved_by": 9101, "devices": 1}]
        got = [k for k in kinds(new.messages) if k != "kick"]  # kicks race the control queue
        assert got[:3] == ["restore", "attach", "fe_state"], got
        assert kernel.driver_row("blkS")["pid"] == 9102
        end = kernel.call("driver_swap_end", name="blkS")
        assert (end["ended"], end["phase"]) == (True, "probation"), end
        guest_finishes(kernel, ev)
    after = kinds(old.messages[old.messages.index(["drain"]) + 1 :])
    assert set(after) <= {"kick"}, after  # kicks until the new hello (a drained host drops them)


def test_a_refused_state_rolls_back_to_the_old_instance(kernel: Kernel) -> None:
    """restore_failed: swap_failed (restore, with the error and traceback) and the old
    instance gets its own state back, says hello and resumes; the guest never notices."""
    disks: dict[str, bytearray] = {}
    with kernel.subscribe(["driver.blkS.", "domain.s."]) as ev:
        old = kernel.driver("blkS", 9201, disks=disks)
        kernel.create("s", "blkstress", GUEST, "blkS")
        wait_until(lambda: kernel.device("s")["requests"] > 500, "guest I/O")
        new = spare(kernel, "blkS", 9202, disks=disks, restore="fail")
        ev.wait("driver.blkS.spare", pid=9202)
        start_swap(kernel, old, new)
        failed = ev.wait("driver.blkS.swap_failed")
        assert (failed["pid"], failed["reason"], failed["traceback"]) == (
            9202,
            "restore",
            "Traceback: fake",
        ), failed
        assert "refused on purpose" in failed["error"]
        back = ev.wait("driver.blkS.swap_resumed")
        assert (back["pid"], back["rollback"]) == (9201, True), back
        assert ["restore", {"saved_by": 9201, "devices": 1}] in old.messages
        assert kernel.driver_row("blkS")["pid"] == 9201
        guest_finishes(kernel, ev)
    assert kernel.call("driver_swap_end", name="blkS")["ended"] is False


def test_a_silent_new_instance_is_rolled_back_after_the_timeout_without_a_hang(
    kernel: Kernel,
) -> None:
    """The new instance never answers the restore: after timeout_ms the old one takes over
    again (swap_failed: handshake).  Meanwhile the old link's request timeout (200 ms) passes
    many times over, but the rings wait on purpose: no hang is reported."""
    disks: dict[str, bytearray] = {}
    with kernel.subscribe(["driver.blkS.", "domain.s."]) as ev:
        old = kernel.driver("blkS", 9301, disks=disks, hello={"request_timeout_ms": 200})
        kernel.create("s", "blkstress", GUEST, "blkS")
        wait_until(lambda: kernel.device("s")["requests"] > 500, "guest I/O")
        new = spare(kernel, "blkS", 9302, disks=disks, restore="ignore")
        ev.wait("driver.blkS.spare", pid=9302)
        start_swap(kernel, old, new, timeout_ms=1000)
        failed = ev.wait("driver.blkS.swap_failed")
        assert failed["reason"] == "handshake" and "within 1s" in failed["error"], failed
        back = ev.wait("driver.blkS.swap_resumed")
        assert (back["pid"], back["rollback"]) == (9301, True) and back["stall_ms"] >= 1000
        guest_finishes(kernel, ev)
    assert ev.count("driver.blkS.hang") == 0


def test_a_rollback_after_the_hello_restores_the_new_instances_state(kernel: Kernel) -> None:
    """driver_swap_rollback (the supervisor saw the new instance die in its probation): the
    old instance restores the state the *new* one reported after its restore (where it keeps
    the data now), not its own old one."""
    disks: dict[str, bytearray] = {}
    with kernel.subscribe(["driver.blkS.", "domain.s."]) as ev:
        old = kernel.driver("blkS", 9401, disks=disks)
        kernel.create("s", "blkstress", GUEST, "blkS")
        wait_until(lambda: kernel.device("s")["requests"] > 500, "guest I/O")
        new = spare(kernel, "blkS", 9402, disks=disks)
        ev.wait("driver.blkS.spare", pid=9402)
        start_swap(kernel, old, new)
        swapped = ev.wait("driver.blkS.swap_resumed", pid=9402)
        served_from = time.monotonic()
        before = kernel.device("s")["requests"]
        wait_until(
            lambda: (
                kernel.device("s")["requests"] > before + 300
                and time.monotonic() - served_from > 1.0
            ),
            "the new instance serving for a second",
        )
        new.stop()  # dies in its probation
        assert (
            kernel.call("driver_swap_rollback", name="blkS", pid=9402, reason="killed by SIGKILL")[
                "phase"
            ]
            == "rolling_back"
        )
        back = ev.wait("driver.blkS.swap_resumed", pid=9401)
        assert back["rollback"] is True
        # the pause the guest saw: the swap's stall, then the rollback's; not the second
        # (and more) the new instance served in between
        assert swapped["stall_ms"] <= back["stall_ms"] < swapped["stall_ms"] + 900, (
            swapped,
            back,
        )
        state = [m for m in old.messages if m[0] == "restore"][-1][1]
        assert state == {"saved_by": 9402, "restored": {"saved_by": 9401, "devices": 1}}
        guest_finishes(kernel, ev)


def test_swap_commands_refuse_bad_requests(kernel: Kernel) -> None:
    old = kernel.driver("blkS", 9501)
    for props, words in [
        (
            {"name": "nope", "pid": 1, "endpoint": "ipc:///x", "timeout_ms": 1000},
            "driver 'nope' is not connected",
        ),
        (
            {"name": "blkS", "pid": 9501, "endpoint": old.endpoint, "timeout_ms": 1000},
            "already driver blkS's instance",
        ),
        (
            {"name": "blkS", "pid": 2, "endpoint": "ipc:///x", "timeout_ms": 5},
            "timeout_ms must be 100..600000",
        ),
    ]:
        with pytest.raises(Exception, match=words):
            kernel.call("driver_swap", **props)
    with pytest.raises(Exception, match="no swap of driver 'blkS' to pid 3"):
        kernel.call("driver_swap_rollback", name="blkS", pid=3)
