"""Driver supervision as pure logic: states, restart policy, intensity, backoff, groups.

Nothing here starts or kills a process.  :class:`DriverSupervision` is told what happened
(``starting``, ``ready``, ``failed``, ...) and answers what to do next; the clock is a
parameter, so tests drive it by hand.  The runtime that acts on the answers is
``isovisor/supervisor/drivermgr.py``; the contract is docs/recovery.md.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from isovisor.config import DriverConfig

Clock = Callable[[], float]

#: Delay of the first delayed restart when ``backoff`` is 0.
MIN_BACKOFF: Final = 0.05
#: Reasons set by an operator or by a group restart: always restarted, never counted toward
#: ``intensity``, never delayed.
NOT_COUNTED: Final = ("manual", "group")


class State(enum.StrEnum):
    """supervisord's process states."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


LIVE: Final = (State.STARTING, State.RUNNING, State.STOPPING)


@dataclass(frozen=True)
class Policy:
    restart: str = "permanent"
    intensity: int = 10
    period: float = 30.0
    backoff: float = 0.0
    backoff_max: float = 5.0
    start_secs: float = 1.0

    @classmethod
    def of(cls, cfg: DriverConfig) -> Policy:
        return cls(
            cfg.restart, cfg.intensity, cfg.period, cfg.backoff, cfg.backoff_max, cfg.start_secs
        )


@dataclass(frozen=True)
class ExitInfo:
    reason: str  # exit:<n> or signal:<NAME>
    status: int | None  # exit status, if it exited
    signal: str | None  # signal name, if a signal killed it

    @property
    def text(self) -> str:
        if self.signal is not None:
            return f"killed by {self.signal}"
        return f"exited with status {self.status}"


@dataclass(frozen=True)
class BackendError:
    """Why a driver instance could not start or ended, in its own words: what it wrote to
    its ``--report`` file (drivers/host.py).  ``error`` is what failed with the exception's
    type and message, ``where`` the frame of the developer's code it was raised in
    (``file:line, in function``, or ""), ``traceback`` the whole of it."""

    pid: int
    error: str
    where: str = ""
    traceback: str = ""

    @classmethod
    def of(cls, pid: int, report: dict[str, str] | None) -> BackendError | None:
        """From a report read by ``DriverProcess.take_report`` (None: it wrote none)."""
        if not report or not report.get("error"):
            return None
        return cls(pid, report["error"], report.get("where", ""), report.get("traceback", ""))

    @property
    def text(self) -> str:
        """The error, and where it was raised if that is in the developer's code."""
        return f"{self.error} (at {self.where})" if self.where else self.error

    def view(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_exit(returncode: int) -> ExitInfo:
    """Classify a ``Popen.returncode`` (negative: killed by that signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"SIG{-returncode}"
        return ExitInfo(f"signal:{name}", None, name)
    return ExitInfo(f"exit:{returncode}", returncode, None)


def should_restart(policy: str, reason: str) -> bool:
    """permanent: always; transient: after an abnormal end (anything but exit:0); temporary:
    never.  Manual and group restarts are asked for, so they always happen."""
    if reason in NOT_COUNTED:
        return True
    if policy == "permanent":
        return True
    if policy == "transient":
        return reason != "exit:0"
    return False


def backoff_delay(policy: Policy, n: int) -> float:
    """Delay before restart ``n`` in a row without a stable run (1 = the first: none)."""
    if n <= 1:
        return 0.0
    base = policy.backoff or MIN_BACKOFF
    delay: float = base * 2 ** (n - 2)
    return min(policy.backoff_max, delay)


def group_restarts(members: Sequence[str], failed: str, strategy: str) -> list[str]:
    """The other members of a group that restart with ``failed`` (members in file order)."""
    if strategy == "one_for_one" or failed not in members:
        return []
    i = members.index(failed)
    if strategy == "rest_for_one":
        return list(members[i + 1 :])
    return [m for m in members if m != failed]  # one_for_all


class Action(enum.StrEnum):
    RESTART = "restart"  # start again after ``delay`` (0: at once)
    GIVE_UP = "give_up"  # the policy says no restart: EXITED
    FATAL = "fatal"  # too many restarts: FATAL


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0
    use_spare: bool = False
    restarts_in_period: int = 0


class DriverSupervision:
    """One driver's state, counters and restart decisions."""

    def __init__(self, name: str, policy: Policy, clock: Clock = time.monotonic) -> None:
        self.name = name
        self.policy = policy
        self.clock = clock
        self.state = State.STOPPED
        self.pid: int | None = None  # the current instance, or the last one while none runs
        self.started_at: float | None = None
        self.hello_at: float | None = None
        self.retry_at: float | None = None
        self.restarts = 0
        self.by_reason: Counter[str] = Counter()
        self.last_failure: str | None = None
        self.last_reason: str | None = None
        #: What the instance of the last failure said about it, if it said anything.
        self.last_error: BackendError | None = None
        self.streak = 0  # restarts in a row without a stable run
        self._window: deque[float] = deque()  # times of counted restarts

    # -- what happened --------------------------------------------------------------------
    def starting(self, pid: int) -> None:
        """A process was started (or a spare activated) and is expected to say hello."""
        self.state = State.STARTING
        self.pid = pid
        self.started_at = self.clock()
        self.hello_at = None
        self.retry_at = None

    def ready(self) -> None:
        """Its hello reached the kernel: the driver serves its devices."""
        if self.state == State.STARTING:
            self.state = State.RUNNING
            self.hello_at = self.clock()

    def stopping(self) -> None:
        self.state = State.STOPPING

    def stopped(self) -> None:
        self.state = State.STOPPED
        self.retry_at = None

    def manual_start(self) -> None:
        """An operator starts the driver: a fresh intensity window and backoff."""
        self._window.clear()
        self.streak = 0
        self.retry_at = None

    def start_failed(self, text: str, error: BackendError | None = None) -> None:
        """The first start (at `up`) did not come up: FATAL until started by hand."""
        self.state = State.FATAL
        self.last_failure = text
        self.last_reason = "start"
        self.last_error = error
        self.retry_at = None

    def stable(self) -> bool:
        """Has the current instance been up for start_secs since its hello?"""
        return self.hello_at is not None and self.clock() - self.hello_at >= self.policy.start_secs

    def failed(
        self,
        reason: str,
        detail: str = "",
        *,
        spare: bool = False,
        error: BackendError | None = None,
    ) -> Decision:
        """The current instance ended for ``reason``; decide what comes next.

        ``spare``: a warm spare is available.  It is used at once: it is already started, so
        waiting would gain nothing (the backoff delays fresh starts only).  ``error``: what
        the instance said about its end (None: nothing).
        """
        now = self.clock()
        failed_start = not self.stable()
        if not failed_start:
            self.streak = 0
        self.last_reason = reason
        self.last_failure = f"{reason}: {detail}" if detail else reason
        self.last_error = error
        self.hello_at = None
        if not should_restart(self.policy.restart, reason):
            self.state = State.EXITED
            return Decision(Action.GIVE_UP)
        counted = reason not in NOT_COUNTED
        if counted:
            while self._window and now - self._window[0] > self.policy.period:
                self._window.popleft()
            if len(self._window) >= self.policy.intensity:
                self.state = State.FATAL
                return Decision(Action.FATAL, restarts_in_period=len(self._window))
            self._window.append(now)
            self.streak += 1
        self.restarts += 1
        self.by_reason[reason] += 1
        delay = 0.0 if spare or not counted else backoff_delay(self.policy, self.streak)
        if failed_start and counted:
            self.state = State.BACKOFF
            self.retry_at = now + delay
        else:
            self.state = State.EXITED  # and at once STARTING again: the caller restarts it
        return Decision(Action.RESTART, delay, spare, len(self._window))

    # -- questions ------------------------------------------------------------------------
    def due(self) -> bool:
        """BACKOFF and its delay is over."""
        return (
            self.state == State.BACKOFF
            and self.retry_at is not None
            and self.clock() >= self.retry_at
        )

    def restarts_in_period(self) -> int:
        now = self.clock()
        return sum(1 for t in self._window if now - t <= self.policy.period)

    def uptime(self) -> float:
        if self.state in LIVE and self.started_at is not None:
            return self.clock() - self.started_at
        return 0.0

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": str(self.state),
            "pid": self.pid,
            "uptime_s": round(self.uptime(), 3),
            "restarts": self.restarts,
            "restarts_by_reason": dict(self.by_reason),
            "last_failure": self.last_failure,
            "last_reason": self.last_reason,
            "last_error": self.last_error.view() if self.last_error else None,
        }


class CpuMeter:
    """CPU use of one process in percent of one CPU, averaged over ``window`` seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, cpu_seconds: float) -> float | None:
        """Record a sample; the average over the last ``window`` s, once that much is known."""
        self._samples.append((now, cpu_seconds))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        if now - t0 < self.window:
            return None
        return 100.0 * (cpu_seconds - c0) / (now - t0)
