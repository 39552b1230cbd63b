"""Proportional-share scheduler with caps, run by pCPU threads (Xen credit2 semantics).

Design
------
* Each pCPU is a Python thread that picks a domain and calls ``emu_start`` on its vCPU.
  ``emu_start`` releases the GIL, so two pCPUs run two compute-bound guests on two cores.
* Fair share: a domain's ``vruntime`` grows by ``cpu_ns * 256 / weight`` while it runs; the
  runnable domain with the smallest vruntime runs next.  Under contention a weight-512 domain
  therefore gets twice the CPU of a weight-256 one.  A domain that wakes after sleeping is placed
  no further back than one slice behind the smallest runnable vruntime, so sleeping earns no
  unbounded credit (credit2 resets credit the same way).
* Caps: a capped domain has a budget of ``cap% * CAP_PERIOD`` CPU-ns, refilled every period;
  with the budget spent it is parked until the next refill.
* Preemption never uses unicorn's instruction ``count`` (it instruments every instruction): a
  ticker thread calls ``emu_stop()`` on a vCPU whose slice is over *and* that someone else is
  waiting for (or that is capped).  A domain alone on a pCPU keeps running, in slices of at most
  ``MAX_SLICE_NS`` so accounting stays fresh.
* Blocking: ``HC_POLL`` marks the domain not runnable with an optional wake-up time and stops
  its vCPU; the ticker (timers) or :meth:`Scheduler.notify` (events) makes it runnable again.
  Blocked domains are on no queue and cost no CPU.
* Idle pCPUs sleep in an epoll of their own, not on a condition variable: it holds the pCPU's
  wake eventfd (rung by whoever makes a domain eligible) and every device's notify doorbell.
  A driver's notification for a blocked guest therefore wakes an idle pCPU thread directly,
  which makes the guest runnable and runs it, with no hop through the kernel's drivers thread.
  Each doorbell is registered with ``EPOLLEXCLUSIVE`` in every pCPU's epoll first and in the
  drivers thread's epoll last: Linux then hands a ring to the first of those epolls with a
  thread waiting in it, so the drivers thread wakes for it only while no pCPU is idle
  (:meth:`Scheduler.watch_fd`; fs/eventpoll.c, ``ep_poll_callback``).
* Exits (destroy, poweroff, reboot, crash, watchdog) are requested with :meth:`request_exit`; the
  pCPU that next picks the domain (or is running it) hands it to ``on_exit`` outside the lock.
  So only the pCPU thread that owns a domain ever frees its vCPU and RAM.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Final

from ipc import doorbell, iotrace
from ipc.iotrace import Stage
from kernel import abi
from kernel.domain import Domain, Exit

log = logging.getLogger("isovisor.kernel")

CAP_PERIOD_NS: Final = 10_000_000
MAX_SLICE_NS: Final = 100_000_000
#: A woken domain preempts a running one only after it has run this long (credit2 ratelimit).
RATELIMIT_NS: Final = 1_000_000
#: The ticker sleeps at most this long.  Everything it does has a deadline it sleeps until
#: (timers, slice ends, cap refills, watchdogs), and whoever makes an earlier one pokes it, so
#: this only bounds how stale a missed poke could leave it; an idle host should not pay for it
#: (bench/idle.py).
_TICK_MAX_NS: Final = 1_000_000_000
#: Niceness of the pCPU threads (Linux allows a thread to lower its own priority).  Guest code
#: is the bulk work; the threads that move I/O (the kernel's driver and control threads, ZeroMQ
#: I/O threads, driver processes) wake briefly and should not queue behind it, or every hop of
#: a request or of a driver failover waits for a time slice on a busy host.
PCPU_NICE: Final = 10
#: After preempting a vCPU, the ticker checks again this soon that it did stop.
_STOP_RECHECK_NS: Final = 2_000_000
_ALL_PORTS: Final = (1 << abi.EVTCHN_PORTS) - 1


class PCpu:
    """One physical-CPU thread."""

    def __init__(self, sched: Scheduler, index: int) -> None:
        self.sched = sched
        self.index = index
        self.current: Domain | None = None
        self.slice_start = 0
        self.slice_end = 0
        #: Where this pCPU sleeps while idle: its wake eventfd and every notify doorbell.
        self.epoll = select.epoll()
        self.wake_fd = doorbell.make()
        self._close_wake = weakref.finalize(self, os.close, self.wake_fd)  # also if never run
        self.epoll.register(self.wake_fd, select.EPOLLIN)
        #: Asleep in :attr:`epoll` (lock released); ``woken``: its wake eventfd was rung since.
        self.idle = False
        self.woken = False
        #: Its thread runs the loop (a pCPU not started or ended scans for nobody).
        self.active = False
        self.thread = threading.Thread(target=self._loop, name=f"pcpu{index}", daemon=True)

    def sleep(self) -> list[int]:
        """Wait (GIL released) until rung; the descriptors that are ready, other than the
        wake eventfd (notify doorbells)."""
        ready = self.epoll.poll()  # (a signal's EINTR is retried by Python, PEP 475)
        fds = [fd for fd, _ in ready if fd != self.wake_fd]
        if len(fds) < len(ready):
            doorbell.take(self.wake_fd)
        return fds

    def close(self) -> None:
        self.epoll.close()
        self._close_wake()  # once: a finalizer runs at most once

    def _loop(self) -> None:
        self.active = True
        try:
            self._run()
        finally:
            self.active = False

    def _run(self) -> None:
        sched = self.sched
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PCPU_NICE)
        while True:
            dom = sched.pick(self)
            if dom is None:
                return
            if dom.action is not None:
                sched.exit_domain(self, dom)
                continue
            dom.before_resume()
            if not dom.first_run_ns:
                dom.first_run_ns = time.monotonic_ns()
            if iotrace.ON:
                iotrace.mark(Stage.RUN, dom.domid)
            t0 = time.thread_time_ns()
            dom.vcpu.run()
            used = time.thread_time_ns() - t0
            dom.clock.stopped_running()
            if dom.vcpu.fault is not None:
                sched.request_exit(dom, Exit("crash", dom.vcpu.fault))
            if dom.action is not None:
                # Exit on this thread: the guest's last console bytes went out through this
                # thread's event socket, so they are published before the exit event.
                sched.account(dom, used)
                sched.exit_domain(self, dom)
                continue
            sched.put(self, dom, used)


class Scheduler:
    def __init__(
        self, pcpus: int, timeslice_ns: int, on_exit: Callable[[Domain, Exit], None]
    ) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.timeslice_ns = timeslice_ns
        self.on_exit = on_exit
        self.domains: list[Domain] = []
        self._timers: list[tuple[int, int, Domain]] = []
        self._seq = itertools.count()
        self.pcpus = [PCpu(self, i) for i in range(pcpus)]
        #: Called on an idle pCPU thread (no lock held) for a notify doorbell that rang.
        self.on_ready_fd: Callable[[int], None] | None = None
        self._stopping = False
        self._tick = threading.Event()
        self._ticker_wake = 0
        self._next_refill = time.monotonic_ns() + CAP_PERIOD_NS
        self._ticker = threading.Thread(target=self._ticker_loop, name="ticker", daemon=True)

    def start(self) -> None:
        for p in self.pcpus:
            p.thread.start()
        self._ticker.start()

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            for p in self.pcpus:
                if p.current is not None:
                    p.current.vcpu.stop()
            self._wake_idle(every=True)
            self.cond.notify_all()
        self._tick.set()
        for p in self.pcpus:
            if p.thread.is_alive():
                p.thread.join(timeout=5)
            if not p.thread.is_alive():
                p.close()
        self._ticker.join(timeout=5)

    # -- doorbells idle pCPUs wait on --------------------------------------------------------------
    def watch_fd(self, fd: int) -> None:
        """Have idle pCPUs wait on notify doorbell ``fd`` too.  Call it *before* the drivers
        thread's epoll registers ``fd`` (also with ``EPOLLEXCLUSIVE``): an eventfd wakes its
        exclusive waiters in the order they were added, stopping at the first epoll that had a
        thread waiting, so a ring reaches the drivers thread only when no pCPU was idle."""
        for p in self.pcpus:
            p.epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)

    def unwatch_fd(self, fd: int) -> None:
        """Before ``fd`` is closed: the registration would outlive the descriptor while the
        driver process holds the same eventfd."""
        for p in self.pcpus:
            # (ValueError: the scheduler stopped first and closed its epolls, at shutdown)
            with contextlib.suppress(OSError, ValueError):
                p.epoll.unregister(fd)

    def _wake_idle(self, every: bool = False) -> None:
        """(Lock held) a domain may have become eligible: make sure a pCPU looks.  None is
        rung if a pCPU without a domain is awake (it scans before it sleeps, under this lock),
        unless ``every``."""
        if not every and any(p.current is None and p.active and not p.idle for p in self.pcpus):
            return
        for p in self.pcpus:
            if p.idle and not p.woken:
                p.woken = True
                doorbell.ring(p.wake_fd)
                if not every:
                    return

    # -- membership ----------------------------------------------------------------------------
    def add(self, dom: Domain) -> None:
        with self.lock:
            dom.vruntime = self._min_vruntime()
            dom.budget_ns = self._quota(dom)
            self.domains.append(dom)
            self._eligible_now(dom)
        if dom.cap:
            self._tick.set()  # its budget is refilled from now on

    def _min_vruntime(self) -> int:
        live = [d.vruntime for d in self.domains if d.runnable or d.on_cpu]
        return min(live) if live else 0

    @staticmethod
    def _quota(dom: Domain) -> int:
        return dom.cap * CAP_PERIOD_NS // 100

    # -- requests from hypercalls and the control thread ------------------------------------------
    def request_exit(self, dom: Domain, exit: Exit) -> None:
        """Ask for ``dom`` to stop for good; the first request wins, except destroy."""
        with self.lock:
            if dom.exit is not None:
                return
            if dom.action is None or exit.kind == "destroy":
                dom.action = exit
            if dom.on_cpu:
                dom.vcpu.stop()
            elif dom in self.domains:
                self._wake_idle()

    def pause(self, dom: Domain) -> None:
        with self.lock:
            if dom.paused:
                return
            dom.paused = True
            dom.paused_since = time.monotonic_ns()
            if dom.on_cpu:
                dom.vcpu.stop()

    def unpause(self, dom: Domain) -> None:
        with self.lock:
            if not dom.paused:
                return
            now = time.monotonic_ns()
            assert dom.paused_since is not None
            dur = now - dom.paused_since
            dom.paused_total_ns += dur
            dom.paused_since = None
            dom.paused = False
            if dom.wake_at is not None:  # timers run in virtual time: shift by the pause
                self._arm_timer(dom, dom.wake_at + dur)
            self._place(dom)
            self._eligible_now(dom)

    def hold(self, dom: Domain) -> bool:
        """A hypercall of a domain whose restored pages are still being checked (a lazy
        restore): take it off the run queue, its vCPU to redo the hypercall once
        :meth:`admit` lets it go on.  False if the check has just ended: go on now."""
        with self.lock:
            if not dom.checking:
                return False
            dom.held = True
        dom.vcpu.redo_hypercall()
        dom.vcpu.stop()
        return True

    def admit(self, dom: Domain) -> None:
        """The pages of a lazily restored domain are checked: its hypercalls go on."""
        with self.lock:
            dom.checking = False
            if dom.held:
                dom.held = False
                self._place(dom)
                self._eligible_now(dom)
            elif dom.on_cpu and dom.upcall_handler and dom.pending:
                dom.vcpu.stop()  # the upcall before_resume held back

    def wait_off_cpu(self, dom: Domain, timeout_s: float) -> bool:
        """Wait until no pCPU runs ``dom`` (paused, so none picks it again); False on
        timeout."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while dom.on_cpu:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def set_cap(self, dom: Domain, cap: int) -> None:
        """Change the CPU cap in force (% of a pCPU, 0 = none): a migration throttles a guest
        that dirties memory faster than it can be sent, then gives its own cap back."""
        with self.lock:
            dom.cap = cap
            dom.budget_ns = min(dom.budget_ns, self._quota(dom)) if cap else 0
            self._wake_idle(every=True)
        self._tick.set()

    def arm_wake(self, dom: Domain, in_ns: int) -> None:
        """A restored domain asleep in a poll: wake it ``in_ns`` from now (virtual)."""
        with self.lock:
            self._arm_timer(dom, time.monotonic_ns() + in_ns)

    def poll(self, dom: Domain, mask: int, timeout_ns: int) -> int:
        """HC_POLL: return pending bits of ``mask`` now, or block (result written on resume)."""
        with self.lock:
            hit = dom.pending & mask
            if hit or timeout_ns == 0:
                dom.pending &= ~mask
                return hit
            self._sleep(dom, mask, timeout_ns, blocking=False)
        dom.vcpu.stop()
        return 0

    def block(self, dom: Domain, timeout_ns: int) -> int:
        """HC_BLOCK: sleep until any event is pending.  With an upcall handler the events stay
        pending for delivery by upcall; without one they are taken and returned."""
        with self.lock:
            if dom.pending:
                if dom.upcall_handler:
                    dom.vcpu.stop()  # deliver the upcall before the guest goes on
                    return 0
                hit, dom.pending = dom.pending, 0
                return hit
            if timeout_ns == 0:
                return 0
            self._sleep(dom, _ALL_PORTS, timeout_ns, blocking=bool(dom.upcall_handler))
        dom.vcpu.stop()
        return 0

    def _sleep(self, dom: Domain, mask: int, timeout_ns: int, *, blocking: bool) -> None:
        """Take ``dom`` off the run queue until an event in ``mask`` or the timeout (lock
        held; the caller stops the vCPU)."""
        if iotrace.ON:
            iotrace.mark(Stage.SLEEP, dom.domid)
        dom.runnable = False
        dom.polling = True
        dom.blocking = blocking
        dom.poll_mask = mask
        if timeout_ns != abi.POLL_FOREVER:
            self._arm_timer(dom, time.monotonic_ns() + timeout_ns)
        else:
            dom.wake_at = None

    def finish_poll(self, dom: Domain) -> None:
        """Write the result of a completed HC_POLL or HC_BLOCK before the guest resumes (its
        pCPU only)."""
        with self.lock:
            if dom.blocking:
                hit = 0  # left pending: the upcall delivers them
            else:
                hit = dom.pending & dom.poll_mask
                dom.pending &= ~dom.poll_mask
            dom.polling = dom.blocking = False
            dom.poll_mask = 0
        dom._w[(abi.HCALL_BLOCK_ADDR + abi.HB_RET) // 8] = hit

    def take_upcall_bits(self, dom: Domain) -> int:
        """Pending bits to deliver by upcall now, or 0 if upcalls are masked."""
        with self.lock:
            if not dom.pending or dom.upcalls_masked():
                return 0
            bits, dom.pending = dom.pending, 0
            return bits

    def notify(self, dom: Domain, bits: int) -> None:
        """Raise event bits for ``dom``; wake it if it waits for any of them, or stop its vCPU
        so an upcall is delivered now rather than at the end of its slice."""
        with self.lock:
            dom.pending |= bits
            if dom.polling and not dom.runnable:
                if dom.pending & dom.poll_mask:
                    self._wake(dom, time.monotonic_ns())
            elif (
                dom.on_cpu
                and dom.upcall_handler
                and not dom.in_upcall
                and dom.exit is None
                and not dom.upcalls_masked()
            ):
                dom.vcpu.stop()

    def arm_watchdog(self, dom: Domain, timeout_ns: int) -> None:
        with self.lock:
            dom.watchdog_ns = timeout_ns
            dom.watchdog_deadline = dom.vtime_ns() + timeout_ns if timeout_ns else 0
        if timeout_ns:
            self._poke_ticker(time.monotonic_ns() + timeout_ns)

    # -- internals (lock held) ------------------------------------------------------------------
    def _arm_timer(self, dom: Domain, at: int) -> None:
        dom.wake_at = at
        heapq.heappush(self._timers, (at, next(self._seq), dom))
        if at < self._ticker_wake:
            self._tick.set()

    def _place(self, dom: Domain) -> None:
        floor = self._min_vruntime() - self.timeslice_ns
        dom.vruntime = max(dom.vruntime, floor)

    def _wake(self, dom: Domain, now: int) -> None:
        dom.runnable = True
        dom.wake_at = None
        self._place(dom)
        self._preempt_for(dom, now)

    def _eligible_now(self, dom: Domain) -> None:
        """``dom`` may have become eligible (added, unpaused, admitted): an idle pCPU takes
        it, or a running one is preempted for it now or at its slice's end."""
        if self._eligible(dom):
            self._preempt_for(dom, time.monotonic_ns())
        else:
            self._wake_idle()

    def _preempt_for(self, dom: Domain, now: int) -> None:
        """``dom`` just became eligible: use an idle pCPU, or preempt the one furthest ahead."""
        if any(p.current is None for p in self.pcpus):
            self._wake_idle()
            return
        victim = max(self.pcpus, key=lambda p: p.current.vruntime if p.current else -1)
        cur = victim.current
        if (
            cur is not None
            and cur.vruntime > dom.vruntime
            and now - victim.slice_start >= RATELIMIT_NS
        ):
            cur.vcpu.stop()
        else:  # preempted at the slice's end, if still waiting then
            self._poke_ticker(victim.slice_end)

    def _eligible(self, dom: Domain) -> bool:
        if dom.on_cpu or dom.exit is not None:
            return False
        if dom.action is not None:
            return True
        return (
            dom.runnable and not dom.paused and not dom.held and (dom.cap == 0 or dom.budget_ns > 0)
        )

    def pick(self, pcpu: PCpu) -> Domain | None:
        with self.lock:
            while True:
                if self._stopping:
                    return None
                best: Domain | None = None
                for d in self.domains:
                    if not self._eligible(d):
                        continue
                    if d.action is not None:
                        best = d
                        break
                    if best is None or d.vruntime < best.vruntime:
                        best = d
                if best is not None:
                    break
                self._idle(pcpu)
            best.on_cpu = True
            now = time.monotonic_ns()
            length = self.timeslice_ns
            if best.cap:
                length = min(length, max(best.budget_ns, 100_000))
            pcpu.current = best
            pcpu.slice_start = now
            pcpu.slice_end = now + length
            # The ticker need not wake at the slice's end unless it may preempt then: with
            # nobody else waiting it would only extend the slice (a domain that becomes
            # eligible later pokes it, _preempt_for); then it need only end the slice at
            # MAX_SLICE_NS, for the accounting.  An I/O-bound guest picks a pCPU on every
            # request, and each poke would wake the ticker.
            more = any(self._eligible(d) for d in self.domains)
            if more:  # another idle pCPU takes the next one (_wake_idle left it asleep)
                self._wake_idle()
            tick = bool(best.cap) or more
            at = pcpu.slice_end if tick else now + MAX_SLICE_NS
        self._poke_ticker(at)
        return best

    def _idle(self, pcpu: PCpu) -> None:
        """(Lock held, released meanwhile) sleep until rung; hand the notify doorbells that
        rang to :attr:`on_ready_fd`, which makes their guests runnable."""
        pcpu.idle, pcpu.woken = True, False
        self.lock.release()
        try:
            fds = pcpu.sleep()
            pcpu.idle = False  # (unlocked: _wake_idle may still ring it once, harmlessly)
            handler = self.on_ready_fd
            if handler is not None:
                for fd in fds:
                    try:
                        handler(fd)
                    except Exception:
                        log.exception("pcpu%d: error handling doorbell %d", pcpu.index, fd)
        finally:
            self.lock.acquire()
            pcpu.idle = False

    def account(self, dom: Domain, used_ns: int) -> None:
        with self.lock:
            self._account(dom, used_ns)

    @staticmethod
    def _account(dom: Domain, used_ns: int) -> None:
        dom.cpu_ns += used_ns
        dom.vruntime += used_ns * 256 // dom.config.weight
        if dom.cap:
            dom.budget_ns -= used_ns

    def put(self, pcpu: PCpu, dom: Domain, used_ns: int) -> None:
        with self.lock:
            pcpu.current = None
            dom.on_cpu = False
            self._account(dom, used_ns)
            if dom.paused:
                self.cond.notify_all()  # wait_off_cpu (a save) waits for this
            elif dom.action is not None or dom.runnable:
                self._wake_idle()

    def exit_domain(self, pcpu: PCpu, dom: Domain) -> None:
        """Run the exit of a domain this pCPU has picked (outside the lock)."""
        exit = dom.action
        assert exit is not None
        with self.lock:
            if dom in self.domains:
                self.domains.remove(dom)
            dom.exit = exit
            dom.exited_ns = time.monotonic_ns()
            dom.wake_at = None
            dom.watchdog_deadline = 0
        try:
            self.on_exit(dom, exit)
        except Exception:
            log.exception("domain %s: error while handling its exit", dom.name)
        finally:
            with self.lock:
                dom.on_cpu = False
                pcpu.current = None

    def remove(self, dom: Domain) -> None:
        with self.lock:
            if dom in self.domains:
                self.domains.remove(dom)

    # -- ticker --------------------------------------------------------------------------------
    def _poke_ticker(self, at: int) -> None:
        if at < self._ticker_wake:
            self._tick.set()

    def _ticker_loop(self) -> None:
        while True:
            # Cleared before the state is read, never after the wait: a poke that lands while
            # this thread computes its deadline then still cuts the wait short (with the clear
            # after the wait, a poke between the wait's end and the clear was lost, and the
            # ticker slept to its old deadline).
            self._tick.clear()
            now = time.monotonic_ns()
            with self.lock:
                if self._stopping:
                    return
                nxt = self._tick_locked(now)
                self._ticker_wake = nxt
            self._tick.wait(max(0, nxt - time.monotonic_ns()) / 1e9)

    def _tick_locked(self, now: int) -> int:
        nxt = now + _TICK_MAX_NS
        # timers
        while self._timers and self._timers[0][0] <= now:
            at, _, dom = heapq.heappop(self._timers)
            if dom.wake_at == at and not dom.runnable and not dom.paused:
                self._wake(dom, now)
        if self._timers:
            nxt = min(nxt, self._timers[0][0])
        # cap budgets (and the pCPUs woken to use them) only when some domain has a cap: an
        # idle host's pCPUs sleep until there is work
        capped = any(d.cap for d in self.domains)
        if capped and now >= self._next_refill:
            for d in self.domains:
                if d.cap:
                    parked = d.budget_ns <= 0
                    q = self._quota(d)
                    d.budget_ns = min(d.budget_ns + q, q)
                    if parked and self._eligible(d):
                        # Without this, a capped domain waits out a neighbour's whole slice
                        # after every refill and gets less than its cap.
                        self._preempt_for(d, now)
            self._next_refill = max(self._next_refill + CAP_PERIOD_NS, now)
            self._wake_idle(every=True)
        if capped:
            nxt = min(nxt, self._next_refill)
        else:
            self._next_refill = now  # a cap set later starts with a refill
        # watchdogs (virtual time)
        for d in self.domains:
            if d.watchdog_deadline and d.action is None and not d.paused and not d.held:
                left = d.watchdog_deadline - d.vtime_ns(now)
                if left <= 0:
                    d.action = Exit(
                        "crash",
                        f"watchdog expired: the guest did not re-arm it "
                        f"within {d.watchdog_ns // 1_000_000} ms",
                    )
                    d.watchdog_deadline = 0
                    if d.on_cpu:
                        d.vcpu.stop()
                    else:
                        self._wake_idle()
                else:
                    nxt = min(nxt, now + left)
        # preemption
        waiting = any(self._eligible(d) for d in self.domains)
        for p in self.pcpus:
            cur = p.current
            if cur is None:
                continue
            if now >= p.slice_end:
                if waiting or cur.cap or now - p.slice_start >= MAX_SLICE_NS:
                    cur.vcpu.stop()
                    # Look again soon: a stop that reached the vCPU after its pCPU picked it
                    # but before emu_start began is dropped by unicorn (uc_emu_start clears
                    # the request), and this pCPU would otherwise run on to the next tick.
                    nxt = min(nxt, now + _STOP_RECHECK_NS)
                    continue
                p.slice_end = now + self.timeslice_ns
            nxt = min(nxt, p.slice_end)
        return nxt
