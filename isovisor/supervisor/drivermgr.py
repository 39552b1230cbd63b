"""The supervisor's driver runtime: processes, spares, failures and recovery (docs/recovery.md).

:class:`DriverManager` acts on what
:class:`isovisor.supervisor.supervision.DriverSupervision` decides.  The supervisor's event loop
feeds it three things: a driver process's pidfd became readable (:meth:`on_exit_fd`), a kernel
event (:meth:`on_kernel_event`) and the passing of time (:meth:`tick`, every loop round).  It
never blocks, except in :meth:`stop_all` at teardown.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import zmq

from ipc import iotrace
from ipc.control import ControlError, NotFound
from ipc.iotrace import Stage
from isovisor.config import DriverConfig, StackConfig
from isovisor.paths import RunDir
from isovisor.supervisor.driverproc import DEBUG_MODE, DriverProcess, jail_state
from isovisor.supervisor.faulttable import FaultTable
from isovisor.supervisor.hotswap import Swap, Swapper
from isovisor.supervisor.kernelproc import KernelProcess
from isovisor.supervisor.supervision import (
    LIVE,
    NOT_COUNTED,
    Action,
    BackendError,
    Decision,
    DriverSupervision,
    Policy,
    State,
    describe_exit,
    group_restarts,
)

log = logging.getLogger("isovisor.supervisor")

EventSink = Callable[[str, dict[str, Any]], None]
#: How often RSS, CPU and the stopped state of every driver process are checked.
USAGE_CHECK_S: Final = 0.5
#: A spare that dies on its own is started again after this, doubling up to SPARE_RETRY_MAX_S.
SPARE_RETRY_S: Final = 0.5
SPARE_RETRY_MAX_S: Final = 30.0
#: After a replacement's hello, its own spare is started once the recovery is done (the
#: ``replayed`` event), so that starting a Python process does not take the CPU from the
#: recovery; or after this long, if that event does not come.
SPARE_DEFER_S: Final = 2.0
KERNEL_CALL_TIMEOUT_S: Final = 5.0
#: At teardown, how long an active instance gets to clean up after ["retire"] before SIGTERM.
RETIRE_WAIT_S: Final = 3.0
_MIB: Final = 1 << 20


@dataclass
class Pending:
    """Why the supervisor is ending the active instance itself."""

    reason: str  # hang, violation, handshake, stopped, rss, fds, cpu (SIGKILL); manual, group,
    # stop (SIGTERM)
    detail: str
    detected_ns: int | None  # None: the exit is the detection
    kill_at: float | None = None  # SIGKILL then, if SIGTERM was not enough


@dataclass
class Recovery:
    old_pid: int
    reason: str
    detected_ns: int


class Slot:
    """One supervised driver: its state machine and its processes."""

    def __init__(self, cfg: DriverConfig, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.sv = DriverSupervision(cfg.name, Policy.of(cfg), clock)
        self.active: DriverProcess | None = None
        self.spare: DriverProcess | None = None
        self.spare_warm = False
        self.spare_failures = 0
        self.spare_due: float | None = None
        #: When a spare deferred until the recovery is done is started anyway.
        self.spare_after: float | None = None
        self.pending: Pending | None = None
        self.recovery: Recovery | None = None
        self.instances = 0
        #: A hot swap under way (isovisor/supervisor/hotswap.py), and the last outcomes.
        self.swap: Swap | None = None
        self.swaps: list[dict[str, Any]] = []
        self.swap_count = 0


class DriverManager:
    def __init__(
        self,
        cfg: StackConfig,
        run_dir: RunDir,
        kernel: KernelProcess,
        ctx: zmq.Context,
        poller: zmq.Poller,
        publish: EventSink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.kernel = kernel
        self.ctx = ctx
        self.poller = poller
        self.publish = publish
        self.clock = clock
        self.slots = {d.name: Slot(d, clock) for d in cfg.drivers if d.supervised}
        self.inline = {d.name: d for d in cfg.drivers if not d.supervised}
        self.inline_failure: dict[str, str] = {}
        self._by_fd: dict[int, tuple[Slot, DriverProcess]] = {}
        self._retiring: dict[DriverProcess, float] = {}  # -> SIGKILL time
        self._next_usage = 0.0
        self._warned: set[str] = set()
        self.faults = FaultTable({d.name: d.module for d in cfg.drivers})
        self._armed: set[str] = set()  # drivers whose instance has (or had) faults armed
        self.swapper = Swapper(self)

    # -- start-up (the supervisor waits for the hello itself) -------------------------------
    def start(self, name: str) -> DriverProcess:
        slot = self.slots[name]
        if slot.cfg.debug:
            log.warning("driver %s: %s", name, DEBUG_MODE)
        self._restart(slot)
        assert slot.active is not None
        return slot.active

    def state(self, name: str) -> State:
        return self.slots[name].sv.state

    def start_failed(self, name: str, text: str) -> None:
        """The first start did not come up: kill what is left, FATAL until started by hand.
        What the instance said about it (its report) is kept as the driver's ``last_error``."""
        slot = self.slots[name]
        active = slot.active
        error = BackendError.of(active.pid, active.take_report()) if active else None
        for inst in (slot.active, slot.spare):
            if inst is not None:
                inst.signal(signal.SIGKILL)
                if inst.proc is not None:
                    inst.proc.wait()
                self._forget(inst)
        slot.active = slot.spare = None
        slot.sv.start_failed(text, error)

    def start_error(self, inst: DriverProcess) -> str:
        """Why ``inst``, started at `up`, ended before its hello: what it said (its report),
        else its exit status and the end of its log."""
        name, module = inst.cfg.name, inst.cfg.module
        error = BackendError.of(inst.pid, inst.take_report())
        if error is not None:
            return f"driver {name} ({module}) could not start: {error.text}; see {inst.log_path}"
        return (
            f"driver {name} ({module}) exited with status {inst.returncode} while starting; "
            f"its log {inst.log_path} ends with:\n{inst.log_tail()}"
        )

    def not_serving(self, name: str) -> str | None:
        """Why declared driver ``name`` serves no device now (for the message refusing a
        domain that uses it), or None if it is running or about to."""
        failure = self.inline_failure.get(name)
        if failure is not None:
            return f"it could not be loaded: {failure}"
        slot = self.slots.get(name)
        if slot is None or slot.sv.state in LIVE:
            return None
        sv, again = slot.sv, f"`isovisor driver start {name}`"
        if sv.state == State.STOPPED:
            return f"it was stopped; start it with {again}"
        if sv.state == State.BACKOFF:
            return (
                f"it is restarting after a failure ({sv.last_failure}); try again once "
                "`isovisor status` shows it RUNNING"
            )
        if sv.last_reason == "start":  # FATAL since `up`: last_failure says it all
            return (
                f"{sv.last_failure}; fix it, then {again} (a change to the stack's file takes "
                "`isovisor down` and `up`)"
            )
        return f"it is {sv.state} ({sv.last_failure}); start it again with {again}"

    # -- the event loop's inputs ------------------------------------------------------------
    def on_exit_fd(self, fd: int) -> None:
        """A driver process's pidfd is readable: it has died."""
        entry = self._by_fd.get(fd)
        if entry is None:
            return
        slot, inst = entry
        if iotrace.RECOVERY:
            iotrace.mark(Stage.SV_DEATH, inst.pid)
        code = inst.reap()
        if code is None:  # the fd was closed and reused within one poll round: not dead
            return
        self._forget(inst)
        if inst is slot.active:
            if not self.swapper.active_ended(slot, inst, code):
                self._active_ended(slot, inst, code)
        elif inst is slot.spare:
            self._spare_ended(slot, inst, code)
        else:
            self.swapper.process_ended(slot, inst, code)
            self._retiring.pop(inst, None)

    def on_kernel_event(self, topic: str, p: dict[str, Any]) -> None:
        parts = topic.split(".")
        if parts[0] != "driver" or len(parts) < 3:
            return
        slot = self.slots.get(".".join(parts[1:-1]))
        if slot is None:
            return
        what, pid = parts[-1], p.get("pid")
        if self.swapper.on_kernel_event(slot, what, p):
            return
        active = slot.active
        if what == "ready" and active is not None and active.pid == pid:
            slot.sv.ready()
            log.info(
                "driver %s: pid %d said hello (instance %d)", slot.cfg.name, pid, active.instance
            )
            crash = self.faults.pending_recovery_crash(slot.cfg.name)
            if crash is not None and slot.recovery is not None:
                self.faults.fired(slot.cfg.name, crash.id, pid)
                self._kill(
                    slot,
                    "recovery_crash",
                    f"fault {crash.id} (recovery_crash): "
                    f"replacement pid {pid} killed right after "
                    "its hello",
                )
                return
            if slot.recovery is not None:  # after the recovery (see SPARE_DEFER_S)
                slot.spare_after = self.clock() + SPARE_DEFER_S
            else:
                self._ensure_spare(slot)
            self._send_faults(slot.cfg.name)
        elif what == "fault_fired":
            row = self.faults.fired(slot.cfg.name, p.get("id", -1), pid)
            if row is not None and not row.armed:
                log.info("driver %s: fault %d (%s) spent", slot.cfg.name, row.id, row.type)
        elif what == "spare" and slot.spare is not None and slot.spare.pid == pid:
            slot.spare_warm = True
            slot.spare_failures = 0
        elif (
            what == "replayed" and active is not None and active.pid == pid and slot.pending is None
        ):  # (an instance being killed has not recovered)
            if iotrace.RECOVERY:
                iotrace.mark(Stage.SV_REPLAYED, active.pid)
            self._recovered(slot, p)
        elif what == "hang" and active is not None and active.pid == pid and active.is_stopped():
            # the kernel's watchdog saw no heartbeat before the stopped-process check looked:
            # the cause is the stop, whichever noticed first
            self._kill(slot, "stopped", f"pid {pid} is stopped (SIGSTOP?): {p.get('reason', what)}")
        elif what in ("hang", "violation") and active is not None and active.pid == pid:
            self._kill(slot, what, f"pid {pid}: {p.get('reason', what)}")

    def timing(self) -> bool:
        """Whether a timer of :meth:`tick` may fall due soon: a restart in backoff, an
        instance starting or being stopped, a spare to start, a hot swap, a process to kill.
        The daemon's loop then wakes every 50 ms, else every 200 ms."""
        return bool(self._retiring) or any(
            slot.sv.state in (State.BACKOFF, State.STARTING, State.STOPPING)
            or slot.pending is not None
            or slot.spare_due is not None
            or slot.swap is not None
            for slot in self.slots.values()
        )

    def tick(self) -> None:
        """Timers: restarts after a backoff, SIGKILL after SIGTERM, spares, resource limits."""
        now = self.clock()
        for slot in self.slots.values():
            if slot.sv.due():
                self._restart(slot)
            self._check_handshake(slot, now)
            pend = slot.pending
            if pend is not None and pend.kill_at is not None and now >= pend.kill_at:
                pend.kill_at = None
                if slot.active is not None:
                    log.warning(
                        "driver %s: pid %d did not stop within graceful_timeout = %gs; "
                        "sending SIGKILL",
                        slot.cfg.name,
                        slot.active.pid,
                        slot.cfg.graceful_timeout,
                    )
                    slot.active.signal(signal.SIGKILL)
            if slot.spare_due is not None and now >= slot.spare_due:
                slot.spare_due = None
                self._ensure_spare(slot)
            if slot.spare_after is not None and now >= slot.spare_after:
                slot.spare_after = None
                self._ensure_spare(slot)
        self.swapper.tick(now)
        for inst, kill_at in list(self._retiring.items()):
            if now >= kill_at:
                inst.signal(signal.SIGKILL)
                self._retiring[inst] = float("inf")
        if now >= self._next_usage:
            self._next_usage = now + USAGE_CHECK_S
            self._check_usage(now)

    # -- failures -------------------------------------------------------------------------
    def _active_ended(self, slot: Slot, inst: DriverProcess, code: int) -> None:
        name, pid, now_ns = slot.cfg.name, inst.pid, time.monotonic_ns()
        info = describe_exit(code)
        pend, slot.pending, slot.active = slot.pending, None, None
        if pend is not None and pend.reason == "stop":
            self._kernel("driver_lost", name=name, pid=pid)
            slot.sv.stopped()
            log.info("driver %s stopped (pid %d %s)", name, pid, info.text)
            self.publish(
                f"driver.{name}.stopped", {"pid": pid, "status": info.status, "signal": info.signal}
            )
            return
        reason = pend.reason if pend else info.reason
        detail = pend.detail if pend else f"pid {pid} {info.text}"
        error = BackendError.of(pid, inst.take_report()) if pend is None else None
        if error is not None:  # what it said about its end: its exception, and where
            detail += f": {error.text}"
        detected = pend.detected_ns if pend and pend.detected_ns else now_ns
        d = slot.sv.failed(reason, detail, spare=slot.spare is not None, error=error)
        restart_now = d.action == Action.RESTART and (
            slot.sv.state == State.EXITED or slot.sv.due()
        )
        if d.action == Action.RESTART:
            slot.recovery = Recovery(pid, reason, detected)
        if restart_now:
            # the replacement first, before the log line and the event: each costs the
            # recovery time on this path.  Its hello replaces the link anyway, and driver_lost
            # (a round trip to the kernel) names the old pid, so it cannot drop the new link
            self._restart(slot)
        tail = (
            inst.log_tail(8)
            if info.status not in (None, 0) and pend is None and error is None
            else ""
        )
        level = logging.INFO if reason in NOT_COUNTED else logging.ERROR
        log.log(
            level,
            "driver %s ended: %s%s",
            name,
            detail,
            f"; its log ends with:\n{tail}" if tail else "",
        )
        exited: dict[str, Any] = {
            "pid": pid,
            "reason": reason,
            "status": info.status,
            "signal": info.signal,
        }
        if error is not None:  # (`up` in the foreground prints it)
            exited["error"] = error.text
        self.publish(f"driver.{name}.exit", exited)
        if d.action == Action.RESTART:
            self._kernel("driver_lost", name=name, pid=pid)
            if not restart_now:
                log.warning(
                    "driver %s: failed start (%s); next start in %.2fs", name, reason, d.delay
                )
            if reason not in NOT_COUNTED:  # a sibling's group restart does not cascade
                self._restart_group(slot)
        elif d.action == Action.FATAL:
            self._kernel("driver_lost", name=name, pid=pid)
            self._escalate(slot, d)
        else:
            self._kernel("driver_lost", name=name, pid=pid)
            log.error(
                "driver %s is not restarted (restart = %s, %s)", name, slot.cfg.restart, reason
            )
            self._give_up(
                slot,
                f"{name} ended ({slot.sv.last_failure}) and restart = "
                f"{slot.cfg.restart} does not restart it",
            )

    def _restart(self, slot: Slot) -> None:
        """Activate the spare, or start a fresh process; the new instance is STARTING."""
        name = slot.cfg.name
        if slot.spare is not None:
            inst, slot.spare, slot.spare_warm = slot.spare, None, False
            faults = self.faults.driver_specs(name, inst.pid)
            if faults:  # armed before it redoes anything
                inst.send(self.ctx, ["faults", faults])
            inst.activate(self.ctx)
            if iotrace.RECOVERY:
                iotrace.mark(Stage.SV_ACTIVATE, inst.pid)
            log.info("driver %s: activating spare pid %d", name, inst.pid)
        else:
            inst = self._spawn(
                slot,
                spare=False,
                faults=[s for s in self.faults.driver_specs(name) if s.get("times") == -1],
            )
        slot.active = inst
        slot.sv.starting(inst.pid)

    def _recovered(self, slot: Slot, p: dict[str, Any]) -> None:
        rec, slot.recovery = slot.recovery, None
        if rec is not None and slot.active is not None:
            done = p.get("done_ns")
            ms = (done - rec.detected_ns) / 1e6 if isinstance(done, int) else None
            self.publish(
                f"driver.{slot.cfg.name}.recovered",
                {
                    "pid": slot.active.pid,
                    "old_pid": rec.old_pid,
                    "reason": rec.reason,
                    "replayed": p.get("replayed"),
                    "devices": p.get("devices"),
                    "recovery_ms": ms,
                    "detected_ns": rec.detected_ns,
                },
            )
        if slot.spare_after is not None:  # the spare deferred at the hello
            slot.spare_after = None
            self._ensure_spare(slot)

    def _escalate(self, slot: Slot, d: Decision) -> None:
        c, sv = slot.cfg, slot.sv
        log.error(
            "driver %s is FATAL: more than intensity = %d restarts within period = %gs "
            "(last: %s); its devices now fail every request. Start it again with "
            "`isovisor driver start %s`",
            c.name,
            c.intensity,
            c.period,
            sv.last_failure,
            c.name,
        )
        self.publish(
            f"driver.{c.name}.fatal",
            {"restarts": d.restarts_in_period, "period": c.period, "last_reason": sv.last_reason},
        )
        self._give_up(
            slot,
            f"{c.name} restarted {d.restarts_in_period} times within "
            f"{c.period:g}s; last failure: {sv.last_failure}",
        )

    def _give_up(self, slot: Slot, reason: str) -> None:
        """No replacement comes: the kernel fails the devices' requests; the spare goes."""
        slot.recovery = None
        self._kernel("driver_fail", name=slot.cfg.name, reason=reason)
        self._retire_spare(slot)

    def _restart_group(self, slot: Slot) -> None:
        c = slot.cfg
        if c.group is None:
            return
        members = [s.cfg.name for s in self.slots.values() if s.cfg.group == c.group]
        for sib in group_restarts(members, c.name, c.strategy):
            other = self.slots[sib]
            if (
                other.active is not None
                and other.pending is None
                and other.cfg.restart != "temporary"
            ):
                log.warning(
                    "driver %s: restarting it with %s (group %s, %s)",
                    sib,
                    c.name,
                    c.group,
                    c.strategy,
                )
                self._terminate(
                    other, "group", f"restarted with {c.name} (group {c.group}, {c.strategy})"
                )

    def _kill(self, slot: Slot, reason: str, detail: str) -> None:
        """SIGKILL the active instance; recovery starts once its pidfd says it is gone."""
        assert slot.active is not None
        if slot.pending is None:
            slot.pending = Pending(reason, detail, time.monotonic_ns())
            log.error("driver %s: %s; killing it (reason %s)", slot.cfg.name, detail, reason)
        slot.active.signal(signal.SIGKILL)

    def _terminate(self, slot: Slot, reason: str, detail: str) -> None:
        """SIGTERM the active instance, SIGKILL after graceful_timeout."""
        assert slot.active is not None
        slot.pending = Pending(reason, detail, None, self.clock() + slot.cfg.graceful_timeout)
        slot.active.signal(signal.SIGTERM)

    def _check_handshake(self, slot: Slot, now: float) -> None:
        """Kill an instance that has not said hello within start_timeout."""
        sv, inst = slot.sv, slot.active
        if (
            sv.state != State.STARTING
            or inst is None
            or slot.pending is not None
            or sv.started_at is None
            or now - sv.started_at < slot.cfg.start_timeout
        ):
            return
        self._kill(
            slot,
            "handshake",
            f"pid {inst.pid} did not say hello within start_timeout = {slot.cfg.start_timeout:g}s",
        )

    def _check_usage(self, now: float) -> None:
        for slot in self.slots.values():
            inst, c = slot.active, slot.cfg
            if inst is None or slot.pending is not None:
                continue
            u = inst.usage(now)
            if u is None:
                continue
            if u.stopped and not c.debug:  # debug mode: a debugger may stop it
                self._kill(slot, "stopped", f"pid {inst.pid} is stopped (SIGSTOP?)")
            elif c.max_rss is not None and u.rss > c.max_rss:
                self._kill(
                    slot,
                    "rss",
                    f"pid {inst.pid} RSS {u.rss / _MIB:.0f} MiB is over "
                    f"max_rss {c.max_rss / _MIB:.0f} MiB",
                )
            elif c.max_fds is not None and u.fds is not None and u.fds > c.max_fds:
                self._kill(
                    slot,
                    "fds",
                    f"pid {inst.pid} has {u.fds} open file descriptors, "
                    f"more than max_fds {c.max_fds}",
                )
            elif c.max_cpu is not None and u.cpu_percent is not None and u.cpu_percent > c.max_cpu:
                self._kill(
                    slot,
                    "cpu",
                    f"pid {inst.pid} used {u.cpu_percent:.0f}% CPU over "
                    f"5 s, more than max_cpu {c.max_cpu:g}%",
                )

    # -- spares -----------------------------------------------------------------------------
    def _ensure_spare(self, slot: Slot) -> None:
        if (
            slot.cfg.spare
            and slot.spare is None
            and slot.spare_due is None
            and slot.sv.state == State.RUNNING
        ):
            slot.spare = self._spawn(slot, spare=True)
            slot.spare_warm = False

    def _spare_ended(self, slot: Slot, inst: DriverProcess, code: int) -> None:
        info = describe_exit(code)
        slot.spare, slot.spare_warm = None, False
        slot.spare_failures += 1
        wait = min(SPARE_RETRY_MAX_S, SPARE_RETRY_S * 2 ** (slot.spare_failures - 1))
        slot.spare_due = self.clock() + wait
        error = BackendError.of(inst.pid, inst.take_report())
        log.warning(
            "driver %s: spare pid %d %s; a new spare in %.1fs; %s",
            slot.cfg.name,
            inst.pid,
            info.text,
            wait,
            f"it said: {error.text}"
            if error is not None
            else f"its log ends with:\n{inst.log_tail(8)}",
        )
        self.publish(
            f"driver.{slot.cfg.name}.spare_exit",
            {"pid": inst.pid, "reason": info.reason, "status": info.status, "signal": info.signal},
        )

    def _retire_spare(self, slot: Slot) -> None:
        if slot.spare is not None:
            self._retire(slot.spare, slot.cfg.graceful_timeout)
            slot.spare, slot.spare_warm = None, False
        slot.spare_due = None

    def _retire(self, inst: DriverProcess, grace: float) -> None:
        inst.signal(signal.SIGTERM)
        self._retiring[inst] = self.clock() + grace

    # -- processes ----------------------------------------------------------------------------
    def _spawn(
        self, slot: Slot, *, spare: bool, faults: list[dict[str, Any]] | None = None
    ) -> DriverProcess:
        slot.instances += 1
        inst = DriverProcess(slot.cfg, self.run_dir, slot.instances, spare=spare)
        self.adopt(slot, inst, faults)
        return inst

    def adopt(
        self, slot: Slot, inst: DriverProcess, faults: list[dict[str, Any]] | None = None
    ) -> None:
        """Start ``inst`` (one of ``slot``'s processes) and watch for its death."""
        inst.start(faults)
        if inst.spare:
            inst.connect(self.ctx)
        assert inst.pidfd is not None
        self._by_fd[inst.pidfd] = (slot, inst)
        self.poller.register(inst.pidfd, zmq.POLLIN)
        self.publish(
            f"driver.{slot.cfg.name}.spawn",
            {"pid": inst.pid, "spare": inst.spare, "instance": inst.instance},
        )

    # -- what the hot swap (isovisor/supervisor/hotswap.py) uses -----------------------------
    def kernel_command(self, command: str, **props: Any) -> None:
        self._kernel(command, **props)

    def retire(self, inst: DriverProcess, grace: float) -> None:
        self._retire(inst, grace)

    def replace_spare(self, slot: Slot) -> None:
        """The driver's module changed: a spare of the new one instead of the old one's."""
        self._retire_spare(slot)
        self._ensure_spare(slot)

    def send_faults(self, driver: str) -> None:
        self._send_faults(driver)

    def kill_active(self, slot: Slot, reason: str, detail: str) -> None:
        self._kill(slot, reason, detail)

    def swap(
        self,
        name: str,
        target: str,
        probation: float | None,
        timeout: float | None,
        *,
        options: dict[str, Any] | None = None,
        log_level: str | None = None,
        debug: bool | None = None,
    ) -> dict[str, Any]:
        """``isovisor driver swap``: see isovisor/supervisor/hotswap.py (``options``,
        ``log_level``, ``debug``: the new instance's; None: the driver's)."""
        return self.swapper.begin(
            name, target, probation, timeout, options=options, log_level=log_level, debug=debug
        )

    def _forget(self, inst: DriverProcess) -> None:
        if inst.pidfd is not None:
            self._by_fd.pop(inst.pidfd, None)
            self.poller.unregister(inst.pidfd)
            inst.close_pidfd()
        inst.close_control()
        inst.remove_socket()

    def _kernel(self, command: str, **props: Any) -> None:
        if not self.kernel.alive():
            return
        try:
            self.kernel.call(command, timeout=KERNEL_CALL_TIMEOUT_S, **props)
        except ControlError as e:
            level = logging.DEBUG if command in self._warned else logging.WARNING
            self._warned.add(command)
            log.log(level, "kernel command %s %s failed: %s", command, props, e.reason)

    def stop_all(self) -> None:
        """Teardown: SIGTERM every instance (active, spare, swapping, retiring), SIGKILL the
        rest."""
        insts: list[tuple[Slot | None, DriverProcess]] = [
            (s, i) for s in self.slots.values() for i in (s.active, s.spare) if i
        ]
        insts += [
            (s, i)
            for s in self.slots.values()
            if s.swap is not None
            for i in (s.swap.cand, s.swap.old)
            if i not in (s.active, s.spare)
        ]
        insts += [(None, i) for i in self._retiring]
        grace = max((s.cfg.graceful_timeout for s in self.slots.values()), default=0.0)
        # Active instances first get ["retire"]: a backend's cleanup() removes what outlives
        # its instances (a TAP device, a network namespace), then the host stops.
        active = [i for s, i in insts if s is not None and i is s.active and i.proc is not None]
        for inst in active:
            inst.send(self.ctx, ["retire"])
        deadline = time.monotonic() + min(grace, RETIRE_WAIT_S)
        for inst in active:
            with contextlib.suppress(subprocess.TimeoutExpired):
                inst.proc.wait(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
        for _, inst in insts:
            inst.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, inst in insts:
            if inst.proc is None:
                continue
            try:
                inst.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "driver %s: pid %d did not stop on SIGTERM; killing it", inst.cfg.name, inst.pid
                )
                inst.signal(signal.SIGKILL)
                inst.proc.wait()
            self._forget(inst)
        for slot in self.slots.values():
            slot.active = slot.spare = slot.swap = None
            if slot.sv.state in LIVE:
                slot.sv.stopped()
        self._retiring.clear()

    # -- commands ---------------------------------------------------------------------------
    def supervised_slot(self, name: str, inline_refusal: str) -> Slot:
        """The slot of supervised driver ``name``; ControlError with ``inline_refusal`` for an
        inline driver, NotFound (listing the drivers) for an unknown name."""
        if name in self.inline:
            raise ControlError(inline_refusal)
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join([*self.slots, *self.inline]) or "none"
            raise NotFound(f"no driver named {name!r} (drivers: {known}); see `isovisor status`")
        return slot

    def command(self, action: str, name: str) -> dict[str, Any]:
        slot = self.supervised_slot(
            name,
            f"driver {name} is inline (it runs inside the kernel process): it is not "
            "supervised and cannot be started, stopped or restarted on its own; use "
            'isolation = "process" for that',
        )
        st = slot.sv.state
        if slot.swap is not None:
            raise ControlError(
                f"driver {name}: swap {slot.swap.id} is under way "
                f"({slot.swap.phase}); {action} it once `isovisor status` shows "
                "its outcome"
            )
        if st == State.STOPPING:
            raise ControlError(
                f"driver {name} is STOPPING (pid {slot.sv.pid}); wait until "
                f"`isovisor status` shows it STOPPED, then {action} it"
            )
        if action == "start" and st in (State.STARTING, State.RUNNING):
            raise ControlError(
                f"driver {name} is already {st} (pid {slot.sv.pid}); to replace "
                f"the process use `isovisor driver restart {name}`"
            )
        if action == "stop" and st == State.STOPPED:
            raise ControlError(
                f"driver {name} is already STOPPED; start it with `isovisor driver start {name}`"
            )
        if action in ("start", "restart") and slot.active is None:
            log.info("driver %s: started by the operator (was %s)", name, st)
            slot.sv.manual_start()
            slot.spare_failures, slot.spare_due, slot.recovery = 0, None, None
            self._restart(slot)
        elif action == "restart":
            log.info("driver %s: restart asked by the operator", name)
            self._terminate(slot, "manual", "restarted by the operator")
            slot.sv.stopping()
        elif action == "stop":
            log.info("driver %s: stop asked by the operator", name)
            self._retire_spare(slot)
            if slot.active is None:
                slot.sv.stopped()
            else:
                self._terminate(slot, "stop", "stopped by the operator")
                slot.sv.stopping()
        else:
            raise ControlError(f"unknown driver action {action!r}: use start, stop or restart")
        return {"name": name, "state": str(slot.sv.state), "pid": slot.sv.pid}

    # -- injected faults (isovisor fault ...) -------------------------------------------------
    def fault_add(self, driver: str, spec: dict[str, Any]) -> dict[str, Any]:
        if driver not in self.slots and driver not in self.inline:
            known = ", ".join([*self.slots, *self.inline]) or "none"
            raise NotFound(f"no driver named {driver!r} (drivers: {known})")
        try:
            row = self.faults.add(driver, spec)
        except ValueError as e:
            raise ControlError(f"fault add {driver}: {e}") from None
        slot = self.slots.get(driver)
        if row.type in ("sigkill", "sigstop"):
            if slot is None or slot.active is None:
                self.faults.remove(row.id)
                raise ControlError(
                    f"fault add {driver}: {row.type} needs a running driver "
                    "process (inline drivers run inside the kernel)"
                )
            pid = slot.active.pid
            self.faults.fired(driver, row.id, pid)
            log.warning("driver %s: fault %d: %s to pid %d", driver, row.id, row.type, pid)
            slot.active.signal(signal.SIGKILL if row.type == "sigkill" else signal.SIGSTOP)
        elif row.type == "recovery_crash":
            if slot is None or slot.active is None:
                self.faults.remove(row.id)
                raise ControlError(
                    f"fault add {driver}: recovery_crash needs a supervised driver process"
                )
        else:
            self._send_faults(driver)
        log.warning("driver %s: fault %d added: %s", driver, row.id, row.view()["args"] or row.type)
        return row.view()

    def fault_remove(self, fault_id: int) -> dict[str, Any]:
        try:
            row = self.faults.remove(fault_id)
        except KeyError as e:
            raise NotFound(str(e.args[0])) from None
        self._send_faults(row.driver)
        return row.view()

    def fault_reset(self, driver: str | None) -> dict[str, Any]:
        gone = self.faults.reset(driver)
        for name in {r.driver for r in gone}:
            self._send_faults(name)
        return {"removed": len(gone)}

    def _send_faults(self, driver: str) -> None:
        """Give the driver's current instance the faults still armed for it."""
        slot = self.slots.get(driver)
        if slot is not None and slot.sv.state != State.RUNNING:
            return  # sent at its hello
        pid = slot.active.pid if slot is not None and slot.active is not None else None
        specs = self.faults.driver_specs(driver, pid)
        if not specs and driver not in self._armed:
            return  # nothing armed now or before: nothing to tell it
        self._armed.discard(driver)
        if specs:
            self._armed.add(driver)
        self._kernel("driver_faults", name=driver, faults=specs)

    def rows(self, connected: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per driver, in file order, for `status` and `drivers`."""
        out = []
        for d in self.cfg.drivers:
            k = connected.get(d.name, {})
            slot = self.slots.get(d.name)
            module = d.module
            cfg = slot.cfg if slot is not None else d  # a committed swap changed it
            where = {  # an inline driver logs into the kernel's log, at its level
                "log": str(self.run_dir.driver_log(d.name) if slot else self.run_dir.kernel_log),
                "log_level": cfg.log_level if slot else None,
                "debug": cfg.debug,
                "options": cfg.options,
            }
            if slot is not None:
                row = slot.sv.row()
                row["spare_pid"] = slot.spare.pid if slot.spare else None
                row["spare_ready"] = slot.spare_warm
                module = slot.cfg.module
                row["swap"] = slot.swap.phase if slot.swap else None
                row["swaps"] = slot.swap_count
                row["last_swap"] = (
                    {k: v for k, v in slot.swaps[-1].items() if k != "traceback"}
                    if slot.swaps
                    else None
                )
            else:
                failure = self.inline_failure.get(d.name)
                row = {
                    "name": d.name,
                    "state": "FATAL" if failure else "RUNNING",
                    "pid": k.get("pid"),
                    "uptime_s": None,
                    "restarts": 0,
                    "restarts_by_reason": {},
                    "last_failure": failure,
                    "last_reason": "start" if failure else None,
                    "last_error": None,
                    "spare_pid": None,
                    "spare_ready": False,
                }
            linked = bool(k.get("connected", bool(k))) and k.get("pid") is not None
            row.update(
                module=module,
                isolation=d.isolation,
                jail=jail_state(d),
                supervised=d.supervised,
                connected=linked and k.get("pid") == row["pid"],
                devices=k.get("devices"),
                outstanding=k.get("outstanding"),
                failing=k.get("failing"),
                failing_reason=k.get("failing_reason"),
                last_seen_ms=k.get("last_seen_ms"),
                statistics=k.get("statistics") or {},
                statistics_error=k.get("statistics_error"),
                **where,
            )
            out.append(row)
        return out
