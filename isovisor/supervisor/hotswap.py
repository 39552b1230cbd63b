"""The supervisor's part of a hot swap (docs/hotswap.md): the new process, its probation, the
outcome.

``isovisor driver swap NAME --to SPEC`` comes here as :meth:`Swapper.begin`:

1. *loading*: the new implementation is started as a spare of NAME (``--spare --report``):
   it imports the module, checks the class and builds the backend.  If any of that fails it
   exits and its report (error and traceback) is the answer: **refused**, nothing was stopped.
2. *swapping*: once it is ready the kernel runs the hand-over (kernel/swap.py): drain, save,
   restore, hello, resume.  If the new backend refuses the state or misses the deadline, the
   kernel gives the devices back to the old instance: **rolled back**.
3. *probation*: the new instance serves; if it dies within ``probation`` seconds (its first
   requests), the kernel rolls back to the old instance, which waited drained: **rolled
   back** (with the report of why it died).
4. After the probation: **swapped**.  The old instance is stopped, the driver's module is the
   new one from now on (restarts and spares use it), and the spare is started again with it.
   So are the new instance's options, log level and debug mode (``--option``,
   ``--log-level``, ``--debug``: by default the driver's).

Every outcome is published as ``driver.<name>.swap`` with the swap id, the old and new
implementations, the stall (drain to resumed), the requests carried over and, if it failed,
the error and traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ipc.control import ControlError
from isovisor.config import LOG_LEVELS, backend_spec
from isovisor.supervisor.driverproc import DEBUG_MODE, DriverProcess
from isovisor.supervisor.supervision import State, describe_exit

if TYPE_CHECKING:
    from isovisor.supervisor.drivermgr import DriverManager, Slot

log = logging.getLogger("isovisor.supervisor")

DEFAULT_PROBATION_S: Final = 1.0
#: The swap timeout when none is given: this, or half the driver's request_timeout_sec when
#: that is shorter (a guest waits request_timeout_sec at most, so the swap must fit in it).
DEFAULT_TIMEOUT_S: Final = 5.0
MIN_TIMEOUT_S: Final = 0.1


def default_timeout(request_timeout_sec: float) -> float:
    """The swap timeout used for a driver whose requests may stay out ``request_timeout_sec``."""
    return max(MIN_TIMEOUT_S, min(DEFAULT_TIMEOUT_S, request_timeout_sec / 2))


#: How many past swaps each driver's status keeps.
HISTORY: Final = 10


@dataclass
class Swap:
    """One swap under way."""

    id: int
    name: str
    old_module: str
    new_module: str
    cand: DriverProcess
    old: DriverProcess
    probation_s: float
    timeout_s: float
    started: float
    phase: str = "loading"  # loading, swapping, probation, rolling_back
    phase_at: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    traceback: str = ""
    reason: str = ""
    old_alive: bool = True


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """``--option`` values for the new backend: names and TOML scalars (the backend itself
    refuses the names it does not know, with the allowed ones: outcome ``refused (load)``)."""
    for k, v in options.items():
        if not isinstance(k, str) or not k.strip():
            raise ControlError(f"driver swap: an option name must be a non-empty string, got {k!r}")
        if not isinstance(v, int | float | str):  # (a bool is an int)
            raise ControlError(
                f"driver swap: option {k} = {v!r} must be an integer, a number, a boolean "
                "or a string"
            )
    return dict(options)


def check_log_level(level: str) -> str:
    """A ``--log-level`` for the new instance; ControlError naming the levels."""
    if level not in LOG_LEVELS:
        raise ControlError(
            f"driver swap: log level {level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    return level


def _reported(report: dict[str, str]) -> str:
    """What an instance's ``--report`` says: its error, and where in the developer's code
    it was raised (when the traceback has a frame there)."""
    error, where = report.get("error", ""), report.get("where", "")
    return f"{error} (at {where})" if error and where and where not in error else error


def check_target(target: str) -> str:
    """The backend spec a ``--to`` or ``--to-file`` names, normalised; ControlError saying
    what is wrong before anything starts."""
    if not target.strip():
        raise ControlError(
            "driver swap: name the new backend: --to package.module[:Class] "
            "or --to-file path/to/backend.py"
        )
    try:
        return backend_spec(target, None)
    except ValueError as e:
        raise ControlError(f"driver swap: {e}") from None


class Swapper:
    """Hot swaps of the supervised drivers of one :class:`DriverManager`."""

    def __init__(self, mgr: DriverManager) -> None:
        self.mgr = mgr
        self._ids = 0

    # -- the command -----------------------------------------------------------------------
    def begin(
        self,
        name: str,
        target: str,
        probation: float | None = None,
        timeout: float | None = None,
        *,
        options: dict[str, Any] | None = None,
        log_level: str | None = None,
        debug: bool | None = None,
    ) -> dict[str, Any]:
        """Start swapping driver ``name`` to ``target``.  ``options`` (``--option``) replace
        the driver's backend options for the new instance, ``log_level`` and ``debug`` its
        own; None keeps the driver's.  They stay with the driver once the swap is final."""
        mgr = self.mgr
        slot = mgr.supervised_slot(
            name,
            f"driver {name} runs inline, inside the kernel process: it cannot be "
            'swapped; declare it with isolation = "process"',
        )
        spec = check_target(target)
        probation = DEFAULT_PROBATION_S if probation is None else probation
        if not 0 <= probation <= 600:
            raise ControlError(f"driver swap: probation must be 0..600 seconds, got {probation:g}")
        limit = slot.cfg.request_timeout_sec
        given = timeout is not None
        timeout = default_timeout(limit) if timeout is None else timeout
        if not MIN_TIMEOUT_S <= timeout < limit:
            what = (
                f"--timeout must be at least {MIN_TIMEOUT_S:g} s and less than"
                if given
                else f"the default swap timeout ({timeout:g} s) must be less than"
            )
            raise ControlError(
                f"driver swap: {what} driver {name}'s request_timeout_sec "
                f"({limit:g} s: guests wait that long at most), got "
                f"{timeout:g}; give a --timeout in range, or raise "
                f"request_timeout_sec in [driver.{name}]"
            )
        if slot.swap is not None:
            raise ControlError(
                f"driver {name}: swap {slot.swap.id} is under way "
                f"({slot.swap.phase}); wait for its outcome"
            )
        if (
            slot.sv.state != State.RUNNING
            or slot.active is None
            or slot.pending is not None
            or slot.recovery is not None
        ):
            raise ControlError(
                f"driver {name} is {slot.sv.state}"
                f"{' and recovering' if slot.recovery else ''}: only a RUNNING "
                "driver can be swapped; see `isovisor status`"
            )
        self._ids += 1
        cfg = dataclasses.replace(
            slot.cfg,
            module=spec,
            origin=slot.cfg.class_module,
            options=slot.cfg.options if options is None else check_options(options),
            log_level=slot.cfg.log_level if log_level is None else check_log_level(log_level),
            debug=slot.cfg.debug if debug is None else debug,
        )
        slot.instances += 1
        cand = DriverProcess(cfg, mgr.run_dir, slot.instances, spare=True, report=True)
        mgr.adopt(slot, cand)
        now = mgr.clock()
        job = Swap(
            self._ids,
            name,
            slot.cfg.module,
            spec,
            cand,
            slot.active,
            probation,
            timeout,
            now,
            phase_at=now,
        )
        slot.swap = job
        log.warning(
            "driver %s: swap %d: starting %s (pid %d) beside %s (pid %d)%s",
            name,
            job.id,
            spec,
            cand.pid,
            job.old_module,
            job.old.pid,
            f"; the new instance is in {DEBUG_MODE}" if cfg.debug else "",
        )
        mgr.publish(f"driver.{name}.swap_started", self._view(job))
        return self._view(job)

    def _view(self, job: Swap) -> dict[str, Any]:
        return {
            "swap_id": job.id,
            "name": job.name,
            "old": job.old_module,
            "new": job.new_module,
            "pid": job.cand.pid,
            "old_pid": job.old.pid,
            "phase": job.phase,
            "probation": job.probation_s,
            "timeout": job.timeout_s,
            # the new instance's (after a commit, the driver's)
            "options": job.cand.cfg.options,
            "log_level": job.cand.cfg.log_level,
            "debug": job.cand.cfg.debug,
        }

    # -- what happens (the supervisor's event loop) ---------------------------------------
    def on_kernel_event(self, slot: Slot, what: str, p: dict[str, Any]) -> bool:
        """Act on a kernel event about ``slot``'s driver; True if it was the swap's alone."""
        job = slot.swap
        if job is None:
            return False
        pid = p.get("pid")
        if what == "spare" and pid == job.cand.pid and job.phase == "loading":
            self._hand_over(slot, job)
            return True
        if what == "ready" and pid == job.cand.pid and job.phase == "swapping":
            slot.active = job.cand  # the new instance serves from here on
            slot.sv.pid = job.cand.pid
            return True
        if what == "swap_resumed":
            if p.get("rollback"):
                if job.phase == "rolling_back":
                    job.result.update(rollback_stall_ms=p.get("stall_ms"))
                    self._finish(slot, job, "rolled_back")
            elif pid == job.cand.pid and job.phase == "swapping":
                job.result.update(
                    {
                        k: p.get(k)
                        for k in (
                            "stall_ms",
                            "carried",
                            "replayed",
                            "devices",
                            "drained_ms",
                            "incomplete",
                        )
                    }
                )
                self._enter(job, "probation")
                if job.probation_s == 0:
                    self._commit(slot, job)
            return True
        if what == "swap_failed" and p.get("pid") == job.cand.pid:
            if job.phase != "rolling_back":  # else: our own rollback request, echoed
                self._kernel_rolled_back(slot, job, p)
            return True
        return False

    def _hand_over(self, slot: Slot, job: Swap) -> None:
        try:
            self.mgr.kernel.call(
                "driver_swap",
                timeout=5.0,
                name=job.name,
                pid=job.cand.pid,
                endpoint=job.cand.endpoint,
                timeout_ms=round(job.timeout_s * 1000),
            )
        except ControlError as e:
            job.error = e.reason
            self._discard_candidate(job)
            self._finish(slot, job, "refused", "kernel")
            return
        self._enter(job, "swapping")

    def _kernel_rolled_back(self, slot: Slot, job: Swap, p: dict[str, Any]) -> None:
        reason = str(p.get("reason", "?"))
        job.error = str(p.get("error", ""))
        job.traceback = str(p.get("traceback", ""))
        self._discard_candidate(job)
        if reason == "drain":  # the old instance never stopped serving
            self._finish(slot, job, "refused", "drain")
        elif reason == "rollback":  # the old one refused its own state: nothing serves
            slot.active = job.old
            slot.sv.pid = job.old.pid
            self._finish(slot, job, "failed", "rollback")
            self.mgr.kill_active(
                slot,
                "swap",
                f"pid {job.old.pid} could not take its devices back after a failed swap",
            )
        else:
            job.reason = reason
            slot.active = job.old
            slot.sv.pid = job.old.pid
            self._enter(job, "rolling_back")

    def process_ended(self, slot: Slot, inst: DriverProcess, code: int) -> bool:
        """A process of the swap (the new one, or the drained old one) ended; True if it was
        one.  The new one ending while it serves is :meth:`active_ended`."""
        job = slot.swap
        if job is None or inst not in (job.cand, job.old):
            return False
        info = describe_exit(code)
        if inst is job.old:
            job.old_alive = False
            log.error(
                "driver %s: swap %d: the old instance (pid %d) %s; no rollback is "
                "possible any more",
                job.name,
                job.id,
                inst.pid,
                info.text,
            )
            return True
        report = inst.take_report() or {}
        if job.phase == "loading":
            job.error = (
                _reported(report)
                or f"pid {inst.pid} {info.text} while loading; "
                f"its log ends with:\n{inst.log_tail(12)}"
            )
            job.traceback = report.get("traceback", "")
            self._finish(slot, job, "refused", "load")
        elif job.phase == "swapping":  # died restoring, before its hello
            self._rollback(slot, job, "crash", info.text, report)
        return True

    def active_ended(self, slot: Slot, inst: DriverProcess, code: int) -> bool:
        """The active instance ended: True if that was the swap's new instance in its first
        requests (it is rolled back rather than restarted)."""
        job = slot.swap
        if job is None:
            return False
        if inst is job.old:  # the old one died before handing over: the swap is off
            job.error = (
                f"the running instance (pid {inst.pid}) {describe_exit(code).text} "
                "before the hand-over"
            )
            self._discard_candidate(job)
            self.mgr.kernel_command("driver_swap_end", name=job.name)
            self._finish(slot, job, "failed", "old_died")
            return False  # the usual recovery replaces it
        if inst is not job.cand or job.phase not in ("swapping", "probation"):
            return False
        report = inst.take_report() or {}
        if not job.old_alive:  # nothing to roll back to: an ordinary failure and recovery
            job.error = (
                f"the new instance (pid {inst.pid}) {describe_exit(code).text} and the "
                "old one is gone too; the usual recovery replaces it"
            )
            self._finish(slot, job, "failed", "old_died")
            return False
        pend, slot.pending = slot.pending, None  # killed by us (hang, rss, ...): say so
        text = describe_exit(code).text if pend is None else f"was killed ({pend.detail})"
        self._rollback(slot, job, "crash" if pend is None else pend.reason, text, report)
        return True

    def _rollback(
        self, slot: Slot, job: Swap, reason: str, text: str, report: dict[str, str]
    ) -> None:
        job.reason = reason
        job.error = f"the new instance (pid {job.cand.pid}) {text} during its first requests" + (
            f": {_reported(report)}" if report.get("error") else ""
        )
        job.traceback = report.get("traceback", "")
        slot.active = job.old
        slot.sv.pid = job.old.pid
        self._enter(job, "rolling_back")
        self.mgr.kernel_command(
            "driver_swap_rollback",
            name=job.name,
            pid=job.cand.pid,
            reason=f"{text} (swap probation)",
        )

    def tick(self, now: float) -> None:
        for slot in list(self.mgr.slots.values()):
            job = slot.swap
            if job is None:
                continue
            waited = now - job.phase_at
            if job.phase == "loading" and waited > slot.cfg.start_timeout:
                job.error = (
                    f"the new implementation (pid {job.cand.pid}) did not finish "
                    f"loading within start_timeout = {slot.cfg.start_timeout:g}s"
                )
                self._discard_candidate(job)
                self._finish(slot, job, "refused", "handshake")
            elif job.phase == "probation" and waited >= job.probation_s:
                self._commit(slot, job)
            elif job.phase in ("swapping", "rolling_back") and waited > 3 * job.timeout_s + 5:
                job.error = f"no outcome from the kernel within {waited:.0f}s ({job.phase})"
                self.mgr.kernel_command("driver_swap_end", name=job.name)
                if slot.active is job.cand:  # it said hello: it serves, so it stays
                    self._adopt(slot, job)
                else:
                    self._discard_candidate(job)
                self._finish(slot, job, "failed", "timeout")

    # -- endings --------------------------------------------------------------------------
    def _enter(self, job: Swap, phase: str) -> None:
        job.phase = phase
        job.phase_at = self.mgr.clock()

    def _discard_candidate(self, job: Swap) -> None:
        job.cand.signal(signal.SIGKILL)

    def _commit(self, slot: Slot, job: Swap) -> None:
        self.mgr.kernel_command("driver_swap_end", name=job.name)
        self._adopt(slot, job)
        self._finish(slot, job, "swapped")
        self.mgr.send_faults(job.name)

    def _adopt(self, slot: Slot, job: Swap) -> None:
        """The new implementation is the driver's from now on; the old process goes."""
        new = job.cand.cfg
        slot.cfg = dataclasses.replace(
            slot.cfg,
            module=job.new_module,
            origin=slot.cfg.class_module,
            options=new.options,
            log_level=new.log_level,
            debug=new.debug,
        )
        self.mgr.retire(job.old, slot.cfg.graceful_timeout)
        self.mgr.replace_spare(slot)

    def _finish(self, slot: Slot, job: Swap, outcome: str, reason: str = "") -> None:
        slot.swap = None
        reason = reason or job.reason
        row = {
            **self._view(job),
            "outcome": outcome,
            "reason": reason or None,
            "error": job.error or None,
            "traceback": job.traceback or None,
            "stall_ms": job.result.get("stall_ms"),
            "carried": job.result.get("carried"),
            "replayed": job.result.get("replayed"),
            "drained_ms": job.result.get("drained_ms"),
            "incomplete": job.result.get("incomplete"),
            "rollback_stall_ms": job.result.get("rollback_stall_ms"),
            "seconds": round(self.mgr.clock() - job.started, 3),
        }
        row.pop("phase", None)
        slot.swaps.append(row)
        slot.swap_count += 1
        del slot.swaps[:-HISTORY]
        level = logging.WARNING if outcome == "swapped" else logging.ERROR
        log.log(
            level,
            "driver %s: swap %d %s (%s -> %s)%s%s",
            job.name,
            job.id,
            outcome,
            job.old_module,
            job.new_module,
            f": {reason}" if reason else "",
            f": {job.error}" if job.error else "",
        )
        self.mgr.publish(f"driver.{job.name}.swap", row)
