"""Scheduling and fault isolation, measured on real guests in a real kernel process."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.conftest import Stack, wait_event, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def cpu(stack: Stack) -> dict[str, float]:
    return {n: d["cpu_time"] for n, d in stack.domains().items()}


def cpu_delta(stack: Stack, warm: float, measure: float) -> tuple[dict[str, float], float]:
    """CPU seconds each domain got while ``measure`` seconds of CPU were handed out."""
    wait_until(lambda: sum(cpu(stack).values()) >= warm, what=f"{warm}s of guest CPU")
    a, t0 = cpu(stack), time.monotonic()
    wait_until(
        lambda: sum(cpu(stack).values()) - sum(a.values()) >= measure,
        what=f"{measure}s more guest CPU",
    )
    b = cpu(stack)
    return {n: b[n] - a[n] for n in a}, time.monotonic() - t0


def test_weights_give_proportional_share(stack: Stack) -> None:
    heavy = stack.domain_config("heavy", "busy", weight=512)
    light = stack.domain_config("light", "busy", weight=256)
    stack.up([heavy, light], pcpus=1)
    d, _ = cpu_delta(stack, warm=0.3, measure=2.0)
    ratio = d["heavy"] / d["light"]
    assert 1.8 <= ratio <= 2.2, d


def test_two_guests_run_side_by_side(stack: Stack) -> None:
    a = stack.domain_config("a", "busy")
    b = stack.domain_config("b", "busy")
    stack.up([a, b], pcpus=2)
    # Both on a pCPU at the same instant (the cores they get is measured in bench/weights.py).
    wait_until(
        lambda: [d["state"][0] for d in stack.domains().values()] == ["r", "r"],
        what="both domains running at once",
    )
    d, _ = cpu_delta(stack, warm=0.3, measure=1.0)
    assert d["a"] > 0.2 and d["b"] > 0.2, d  # both made progress


def test_cap_holds_next_to_an_uncapped_neighbour(stack: Stack) -> None:
    capped = stack.domain_config("capped", "busy", cap=25)
    hog = stack.domain_config("hog", "busy")
    stack.up([capped, hog], pcpus=1)
    d, wall = cpu_delta(stack, warm=0.3, measure=2.0)
    share = d["capped"] / (d["capped"] + d["hog"])
    # A cap is a share of wall-clock time (25 % of one CPU), and no more: while the host lends
    # the pCPU thread less than a whole core (other processes on a loaded 2-core box), the
    # hog gets less and the capped guest's share of what was handed out rises above 25 %
    # (CI once saw 32 %: capped 0.88 s and hog 1.84 s in a window of about 3.5 s).  And no
    # less than its share of what was handed out (the refill preempts the hog; it did not
    # once, and the capped guest got 20 %).
    assert d["capped"] / wall <= 0.28, (d, wall)
    assert share >= 0.22, (d, wall)


def test_blocked_guests_use_no_cpu(stack: Stack) -> None:
    t1 = stack.domain_config("idle1", "ticker", extra="interval_ms=200")
    t2 = stack.domain_config("idle2", "ticker", extra="interval_ms=200")
    stack.up([t1, t2])
    kernel = psutil.Process(stack.pids[1])
    with stack.subscribe(["console.idle1"]) as sub:
        wait_event(sub, "console.idle1")
        c0, w0 = sum(kernel.cpu_times()[:2]), time.monotonic()
        for _ in range(8):  # 8 ticks = 1.6 s of mostly-blocked guests
            wait_event(sub, "console.idle1")
    used = (sum(kernel.cpu_times()[:2]) - c0) / (time.monotonic() - w0)
    assert used < 0.10, f"kernel used {used:.0%} of a CPU with only blocked guests"
    assert all(v < 0.2 for v in cpu(stack).values())


def test_crashing_guest_leaves_neighbour_and_kernel_running(stack: Stack) -> None:
    tick = stack.domain_config("tick", "ticker", extra="interval_ms=50")
    stack.up([tick])
    kernel_pid = stack.pids[1]
    with stack.subscribe(["console.tick", "domain.boom."]) as sub:
        for mode in ("wild", "ud", "divzero", "null", "jump"):
            cfg = stack.domain_config("boom", "crash", extra=f"mode={mode}", on_crash="preserve")
            stack.create(cfg)
            ev = wait_event(sub, "domain.boom.crashed")
            assert ev["action"] == "preserve"
            d = stack.domains()["boom"]
            assert d["state"] == "----c-" and d["reason"] == ev["reason"]
            assert stack.cli("list").stdout.count("boom") == 1
            assert stack.cli("destroy", "boom").returncode == 0
            # the neighbour keeps ticking after each crash
            wait_event(sub, "console.tick")
            wait_event(sub, "console.tick")
    assert psutil.Process(kernel_pid).is_running()
    assert stack.call("ping")["kernel_pid"] == kernel_pid


def test_on_crash_restart_then_gives_up_on_a_crash_loop(stack: Stack) -> None:
    stack.up([])
    cfg = stack.domain_config("loop", "crash", extra="mode=ud", on_crash="restart")
    with stack.subscribe(["domain.loop."]) as sub:
        stack.create(cfg)
        first = wait_event(sub, "domain.loop.restarted")
        assert first["domid"] != first["old"]
        restarts = 0
        while (
            "not restarting again"
            not in (gone := wait_event(sub, "domain.loop.destroyed"))["reason"]
        ):
            restarts += 1
        # ids 1..6: the first run plus five restarts, then it is left destroyed
        assert restarts == 4 and gone["domid"] == 6 and gone["kind"] == "crash", gone
    assert "loop" not in stack.domains()


def test_watchdog_restarts_a_hung_guest(stack: Stack) -> None:
    stack.up([])
    cfg = stack.domain_config(
        "hang", "crash", extra="mode=hang watchdog_ms=500", on_crash="restart"
    )
    with stack.subscribe(["domain.hang."]) as sub:
        stack.create(cfg)
        ev = wait_event(sub, "domain.hang.crashed")
        assert "watchdog expired" in ev["reason"] and ev["action"] == "restart"
        new = wait_event(sub, "domain.hang.restarted")
        assert stack.call("destroy", name="hang")["domid"] == new["domid"]


def test_endless_loop_can_be_paused_and_destroyed(stack: Stack) -> None:
    spin = stack.domain_config("spin", "busy")
    tick = stack.domain_config("tick", "ticker", extra="interval_ms=20")
    stack.up([spin, tick], pcpus=1)
    with stack.subscribe(["console.tick"]) as sub:
        # A spinning guest on the only pCPU does not starve a neighbour that sleeps.
        for _ in range(5):
            wait_event(sub, "console.tick", timeout=5)
    assert stack.cli("pause", "spin").returncode == 0
    c = cpu(stack)["spin"]
    assert stack.domains()["spin"]["state"] == "--p---"
    assert cpu(stack)["spin"] == c  # no CPU while paused
    assert stack.cli("destroy", "spin").returncode == 0
    assert set(stack.domains()) == {"tick"}
