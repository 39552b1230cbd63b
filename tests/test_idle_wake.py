"""Idle pCPUs take notify doorbells themselves (kernel/scheduler.py, "Idle pCPUs"): a ring goes
to an idle pCPU thread, and reaches the drivers thread's epoll only while no pCPU is idle."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator

import pytest

from ipc import doorbell
from kernel.scheduler import Scheduler
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def bell() -> Iterator[int]:
    fd = doorbell.make()
    yield fd
    os.close(fd)


def _drivers_epoll(fd: int) -> select.epoll:
    """The drivers thread's registration, made after the pCPUs' as DeviceManager.create does."""
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    return ep


def test_a_ring_wakes_the_idle_pcpu_and_not_the_drivers_epoll(bell: int) -> None:
    sched = Scheduler(2, 10_000_000, lambda d, e: None)
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def on_ready(fd: int) -> None:  # leaves the ring unread: the drivers' epoll could see it
        if not done.is_set():
            seen.append((fd, threading.current_thread().name))
            done.set()

    sched.on_ready_fd = on_ready
    sched.watch_fd(bell)
    drivers = _drivers_epoll(bell)
    sched.start()
    try:
        wait_until(lambda: all(p.idle for p in sched.pcpus), timeout=10, what="both pCPUs idle")
        doorbell.ring(bell)
        assert done.wait(10), "no idle pCPU took the ring"
        assert seen == [(bell, seen[0][1])] and seen[0][1] in ("pcpu0", "pcpu1"), seen
        # The eventfd is still readable, yet the drivers thread's epoll reports nothing: the
        # exclusive wake-up stopped at the pCPU's epoll and never queued it there (registered
        # the other way round, it would be reported here).
        assert drivers.poll(0) == []
        assert doorbell.take(bell) == 1
        wait_until(lambda: all(p.idle for p in sched.pcpus), timeout=10, what="idle again")
    finally:
        sched.unwatch_fd(bell)
        sched.stop()
        drivers.close()
    assert not any(p.thread.is_alive() for p in sched.pcpus)


def test_with_no_idle_pcpu_the_drivers_epoll_gets_the_ring(bell: int) -> None:
    sched = Scheduler(1, 10_000_000, lambda d, e: None)  # not started: no pCPU waits
    sched.watch_fd(bell)
    drivers = _drivers_epoll(bell)
    try:
        doorbell.ring(bell)
        assert [fd for fd, _ in drivers.poll(5)] == [bell]
        assert doorbell.take(bell) == 1
    finally:
        sched.unwatch_fd(bell)
        drivers.close()
        for p in sched.pcpus:
            p.close()
