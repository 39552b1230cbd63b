"""The kernel's part of a hot swap (docs/hotswap.md): drain, hand the state over, resume, or
roll back.

The supervisor starts the new implementation as a spare (its module loaded, its backend built)
and then asks ``driver_swap``.  From there the kernel, which sees every driver message, runs
the hand-over:

1. ``["drain"]`` to the running instance; it saves its backend's state, lets every device go
   and answers ``["saved", {name, pid, state}]``.  Guests go on queueing requests in their
   rings meanwhile; nothing answers them until step 3.
2. ``["restore", state]`` to the new instance.  It restores the state, answers
   ``["restored", {..., state}]`` (its state now: what a rollback would restore) and says
   hello.
3. The hello re-attaches every device (``Recovery.on_hello``); the backend resumes each ring
   and serves what waited.  When every device reported ``recovered``, ``driver.<n>.
   swap_resumed`` gives the stall (drain to resumed) and the requests carried over.

Rollback: if the new backend refuses the state (``restore_failed``), does not say hello within
the swap's timeout, or (``driver_swap_rollback``, from the supervisor) dies during its first
requests, the old instance — drained, still alive — gets ``["restore", state]`` with the newest
state (the new one's, if it served anything; else the state the old one saved) and takes over
again the same way.  ``driver.<n>.swap_failed`` says why.  ``driver_swap_end`` forgets a swap
(committed after the probation, or abandoned).

While a swap is under way its driver's hang checks are off (the rings are meant to wait); the
timeout is bounded by the supervisor to less than the request timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ipc.control import ControlError, NotFound
from kernel.drivers import DriverLink, Malformed
from kernel.failover import outstanding

if TYPE_CHECKING:
    from kernel.devices import DeviceManager

log = logging.getLogger("isovisor.kernel")

#: Phases in which the rings wait on purpose (no hang checks).
QUIET_PHASES: Final = ("draining", "restoring", "resuming", "rolling_back")
_TB_LIMIT: Final = 8000


@dataclass
class SwapJob:
    name: str
    old_pid: int
    old_endpoint: str
    new_pid: int
    new_endpoint: str
    timeout_s: float
    started_ns: int
    deadline: float
    #: draining -> restoring -> resuming -> probation; rolling_back after a failure
    phase: str = "draining"
    saved: dict[str, Any] | None = None
    post: dict[str, Any] | None = None
    carried: int = 0
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: The swap's own stall, once the new instance resumed (ms); a rollback from the
    #: probation adds only its own pause to it, not the time the new instance served.
    swap_stall_ms: float | None = None
    #: When the rollback began (monotonic ns).
    rollback_ns: int = 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Swaps:
    """Hot swaps under way, by driver name."""

    def __init__(self, manager: DeviceManager, clock: Callable[[], float] = time.monotonic) -> None:
        self.dm = manager
        self.hub = manager.hub
        self.emit = manager.emit
        self.clock = clock
        self.jobs: dict[str, SwapJob] = {}
        self._lock = threading.Lock()

    def quiet(self, name: str) -> bool:
        """Are ``name``'s rings waiting on purpose (a swap between two instances)?"""
        job = self.jobs.get(name)
        return job is not None and job.phase in QUIET_PHASES

    def phase(self, name: str) -> str | None:
        job = self.jobs.get(name)
        return job.phase if job else None

    # -- commands (control thread) -----------------------------------------------------------
    def begin(self, name: str, pid: int, endpoint: str, timeout_ms: int) -> dict[str, Any]:
        """``driver_swap``: drain ``name``'s instance for the spare ``pid`` at ``endpoint``."""
        link = self.hub.links.get(name)
        if link is None:
            raise NotFound(f"driver_swap: driver {name!r} is not connected; start it first")
        if link.isolation != "process":
            raise ControlError(
                f"driver_swap: driver {name!r} runs inline; only process drivers can be swapped"
            )
        if link.pid == pid:
            raise ControlError(f"driver_swap: pid {pid} is already driver {name}'s instance")
        if not 100 <= timeout_ms <= 600_000:
            raise ControlError(f"driver_swap: timeout_ms must be 100..600000, got {timeout_ms}")
        now = self.clock()
        with self._lock:
            if name in self.jobs:
                raise ControlError(
                    f"driver_swap: a swap of driver {name!r} is already under "
                    f"way ({self.jobs[name].phase})"
                )
            job = SwapJob(
                name,
                link.pid,
                link.endpoint,
                pid,
                endpoint,
                timeout_ms / 1000,
                time.monotonic_ns(),
                now + timeout_ms / 1000,
            )
            self.jobs[name] = job
        if not self.hub.send_control(name, ["drain"]):
            with self._lock:
                self.jobs.pop(name, None)
            raise ControlError(f"driver_swap: driver {name!r} disconnected meanwhile")
        log.warning("driver %s: hot swap: draining pid %d for pid %d", name, link.pid, pid)
        self.emit(f"driver.{name}.draining", {"pid": link.pid, "new_pid": pid})
        return {"old_pid": link.pid}

    def rollback(self, name: str, pid: int, reason: str) -> dict[str, Any]:
        """``driver_swap_rollback``: the new instance ``pid`` died (or the supervisor gives
        up on it); give the devices back to the old instance."""
        with self._lock:
            job = self.jobs.get(name)
            if job is None or job.new_pid != pid:
                raise NotFound(f"driver_swap_rollback: no swap of driver {name!r} to pid {pid}")
            if job.phase == "rolling_back":
                return {"phase": job.phase}
        self.hub.drop(name, pid)
        self._roll_back(job, reason, f"pid {pid} {reason}", "")
        return {"phase": job.phase}

    def end(self, name: str) -> dict[str, Any]:
        """``driver_swap_end``: forget the swap of ``name`` (committed, or abandoned)."""
        with self._lock:
            job = self.jobs.pop(name, None)
        if job is None:
            return {"ended": False}
        log.info("driver %s: hot swap ended in phase %s", name, job.phase)
        if job.phase == "probation":  # final: the new backend may tidy up what it took over
            self.hub.send_control(name, ["committed"])
        return {"ended": True, "phase": job.phase}

    # -- driver messages (drivers thread) -----------------------------------------------------
    def handle(self, msg: list[Any]) -> bool:
        """Handle a swap message; False if ``msg`` is not one."""
        handler = self._handlers.get(msg[0])
        if handler is None:
            return False
        info = msg[1] if len(msg) == 2 and isinstance(msg[1], dict) else None
        if info is None or not isinstance(info.get("name"), str) or not _is_int(info.get("pid")):
            raise Malformed(
                f"malformed {msg[0]} message {msg!r:.200} (expected "
                f'["{msg[0]}", {{name, pid, ...}}])'
            )
        handler(self, info)
        return True

    def _job_for(self, info: dict[str, Any], role: str) -> SwapJob | None:
        job = self.jobs.get(info["name"])
        if job is None or getattr(job, f"{role}_pid") != info["pid"]:
            return None
        return job

    def _saved(self, info: dict[str, Any]) -> None:
        state = info.get("state")
        if not isinstance(state, dict):
            raise Malformed(f"saved message from {info['name']} without a state map")
        job = self._job_for(info, "old")
        if job is None or job.phase != "draining":
            # a drain that finished after the swap was abandoned: serve again at once
            link = self.hub.links.get(info["name"])
            if link is not None and link.pid == info["pid"]:
                log.warning(
                    "driver %s: pid %d drained after its swap was abandoned; it "
                    "restores its own state",
                    info["name"],
                    info["pid"],
                )
                self.hub.send_control_to(link.endpoint, ["restore", state])
            return
        job.saved = state
        job.phase = "restoring"
        job.deadline = self.clock() + job.timeout_s
        drained_ms = (time.monotonic_ns() - job.started_ns) / 1e6
        log.warning(
            "driver %s: pid %d drained in %.1f ms; restoring its state in pid %d",
            job.name,
            job.old_pid,
            drained_ms,
            job.new_pid,
        )
        job.extra["drained_ms"] = round(drained_ms, 3)
        self.hub.send_control_to(job.new_endpoint, ["restore", state])

    def _restored(self, info: dict[str, Any]) -> None:
        state = info.get("state")
        job = self.jobs.get(info["name"])
        if job is None or not isinstance(state, dict):
            return
        if info["pid"] == job.new_pid:  # what a rollback after its hello restores
            job.post = state

    def _restore_failed(self, info: dict[str, Any]) -> None:
        job = self._job_for(info, "new")
        error = str(info.get("error", "?"))[:2000]
        tb = str(info.get("traceback", ""))[-_TB_LIMIT:]
        if job is None:
            job = self._job_for(info, "old")
            if job is not None:  # the rollback itself failed: nothing else to go back to
                log.critical(
                    "driver %s: the old implementation (pid %d) refused its own state "
                    "on rollback: %s",
                    job.name,
                    job.old_pid,
                    error,
                )
                with self._lock:
                    self.jobs.pop(job.name, None)
                self.emit(
                    f"driver.{job.name}.swap_failed",
                    {
                        "pid": job.new_pid,
                        "old_pid": job.old_pid,
                        "reason": "rollback",
                        "error": error,
                        "traceback": tb,
                    },
                )
            return
        if job.phase != "restoring":
            return
        self._roll_back(job, "restore", error, tb)

    def _drain_failed(self, info: dict[str, Any]) -> None:
        job = self._job_for(info, "old")
        if job is None or job.phase != "draining":
            return
        with self._lock:
            self.jobs.pop(job.name, None)
        error = str(info.get("error", "?"))[:2000]
        log.error(
            "driver %s: pid %d could not be drained (%s); it goes on serving",
            job.name,
            job.old_pid,
            error,
        )
        self.emit(
            f"driver.{job.name}.swap_failed",
            {
                "pid": job.new_pid,
                "old_pid": job.old_pid,
                "reason": "drain",
                "error": error,
                "traceback": str(info.get("traceback", ""))[-_TB_LIMIT:],
            },
        )

    _handlers: Final[dict[str, Callable[[Swaps, dict[str, Any]], None]]] = {
        "saved": _saved,
        "restored": _restored,
        "restore_failed": _restore_failed,
        "drain_failed": _drain_failed,
    }

    def _roll_back(self, job: SwapJob, reason: str, error: str, tb: str) -> None:
        """Give the devices back to the old instance, with the newest state."""
        state = job.post or job.saved
        job.phase = "rolling_back"
        job.rollback_ns = time.monotonic_ns()
        job.reason = reason
        job.deadline = self.clock() + job.timeout_s
        log.error(
            "driver %s: hot swap to pid %d rolled back (%s): %s",
            job.name,
            job.new_pid,
            reason,
            error,
        )
        self.emit(
            f"driver.{job.name}.swap_failed",
            {
                "pid": job.new_pid,
                "old_pid": job.old_pid,
                "reason": reason,
                "error": error,
                "traceback": tb,
            },
        )
        if state is None:
            log.error(
                "driver %s: no state to roll back with (the old instance never saved one)", job.name
            )
            return
        self.hub.send_control_to(job.old_endpoint, ["restore", state])

    # -- hello and resumption (drivers thread) ---------------------------------------------
    def on_hello(self, link: DriverLink) -> None:
        """Before the devices are attached again: note what the rings carry over."""
        job = self.jobs.get(link.name)
        if job is None:
            return
        if link.pid not in (job.old_pid, job.new_pid):
            # a third instance (both of the swap's died; the supervisor's recovery started
            # another): it takes the devices over from the newest state, then the swap is over
            with self._lock:
                self.jobs.pop(link.name, None)
            state = job.post or job.saved
            if state is not None and job.phase != "draining":
                log.warning(
                    "driver %s: pid %d replaces both instances of a hot swap; it "
                    "restores the newest state first",
                    link.name,
                    link.pid,
                )
                self.hub.send_control(link.name, ["restore", state])
            return
        if link.pid == job.new_pid and job.phase == "restoring":
            job.phase = "resuming"
        elif link.pid == job.old_pid and job.phase == "rolling_back":
            pass
        else:
            return
        job.deadline = self.clock() + job.timeout_s
        job.carried = sum(
            outstanding(*self.dm.ring_indices(d), d.cls)
            for d in self.dm.snapshot()
            if d.spec.backend == link.name and not d.gone
        )

    def on_replayed(self, link: DriverLink, done_ns: int, incomplete: int = 0) -> None:
        """Every device of ``link`` resumed (or, ``incomplete`` > 0, that many never said so
        within the timeout): the swap (or its rollback) is through."""
        job = self.jobs.get(link.name)
        if job is None:
            return
        rollback = link.pid == job.old_pid and job.phase == "rolling_back"
        if not rollback and not (link.pid == job.new_pid and job.phase == "resuming"):
            return
        if rollback and job.swap_stall_ms is not None:
            # rolled back from the probation: the guests paused for the swap, then from the
            # rollback's start until now; in between the new instance served them
            stall_ms = job.swap_stall_ms + max(0.0, (done_ns - job.rollback_ns) / 1e6)
        else:
            stall_ms = max(0.0, (done_ns - job.started_ns) / 1e6)
        payload = {
            "pid": link.pid,
            "old_pid": job.old_pid,
            "new_pid": job.new_pid,
            "rollback": rollback,
            "stall_ms": round(stall_ms, 3),
            "carried": job.carried,
            "replayed": link.replayed,
            "devices": link.recovered,
            "incomplete": incomplete,
            **job.extra,
        }
        if rollback:
            with self._lock:
                self.jobs.pop(link.name, None)
        else:
            job.phase = "probation"
            job.swap_stall_ms = stall_ms
        log.warning(
            "driver %s: %s pid %d resumed %d device(s) %.1f ms after the drain; %d "
            "request(s) carried over",
            link.name,
            "rolled back to" if rollback else "swapped to",
            link.pid,
            link.recovered,
            stall_ms,
            job.carried,
        )
        self.emit(f"driver.{link.name}.swap_resumed", payload)

    # -- the periodic check (drivers thread) --------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        for job in list(self.jobs.values()):
            if now < job.deadline:
                continue
            if job.phase == "draining":
                with self._lock:
                    self.jobs.pop(job.name, None)
                self.emit(
                    f"driver.{job.name}.swap_failed",
                    {
                        "pid": job.new_pid,
                        "old_pid": job.old_pid,
                        "reason": "drain",
                        "error": f"pid {job.old_pid} did not drain within {job.timeout_s:g}s",
                        "traceback": "",
                    },
                )
            elif job.phase == "restoring":
                self.hub.drop(job.name, job.new_pid)
                self._roll_back(
                    job,
                    "handshake",
                    f"pid {job.new_pid} did not restore the "
                    f"state and say hello within {job.timeout_s:g}s",
                    "",
                )
            elif job.phase in ("resuming", "rolling_back"):
                # it said hello but not every device reported back: it serves anyway (the
                # usual hang checks watch it from now on); say so rather than go quiet
                link = self.hub.links.get(job.name)
                waiting = len(link.awaiting) if link is not None else 0
                log.error(
                    "driver %s: %s: %d device(s) not resumed within %gs",
                    job.name,
                    job.phase,
                    waiting,
                    job.timeout_s,
                )
                if link is not None and link.pid in (job.old_pid, job.new_pid):
                    self.on_replayed(link, time.monotonic_ns(), incomplete=max(1, waiting))
                if self.jobs.get(job.name) is job and job.phase != "probation":
                    with self._lock:
                        self.jobs.pop(job.name, None)
