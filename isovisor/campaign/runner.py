"""Run a campaign: a private stack, verifying guests, the plan's faults on schedule, a journal.

One fault at a time: before each injection the runner waits for its time in the schedule and
for the driver to be RUNNING again (with its warm spare ready, if it has one); after it, it
follows the stack's events until the fault is resolved (recovered, tolerated, answered as
poison, ...) or a deadline passes.  Everything the stack publishes is attributed to the fault
in progress; what a workload's checker (``isovisor.campaign.workloads``) finds meanwhile in the
guests' output (an I/O error, a data mismatch, a missing console line) counts as that fault's
guest-visible errors.

The driver is ``[stack] module`` of the plan (``drivers.blk``, ``drivers.net``,
``drivers.console``); the checkers set their guests up on it (a disk, a vif, the console) and
read each guest's result when it ends.  A guest that ends while faults remain is replaced (a
netpair pair once both have ended).

In ``inline`` isolation the driver runs inside the kernel, so an outside fault signals the
kernel itself and an in-driver crash takes the kernel down; the runner counts that as a kernel
crash, starts a fresh stack and goes on with the schedule.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from ipc.control import ControlError
from ipc.events import Subscriber
from isovisor.campaign.plan import FaultEntry, Plan, ScheduledFault, schedule, schedule_to_json
from isovisor.campaign.report import summarize, write_report
from isovisor.campaign.workloads import CHECKERS, Checker, Tally, Unit
from isovisor.privstack import PrivateStack

#: Seconds a fault may take to resolve before the runner gives up on it.
RESOLVE_S: Final = 15.0
#: More for a ``poison`` fault: the request it names (a ring index of an rng device, say) may
#: have gone by in every running guest, and a loaded host stretches their run before the next
#: generation starts (an rng campaign saw its poison fault "not manifested" after 15 s).
POISON_EXTRA_S: Final = 20.0
#: After a fault resolved, console errors arriving this much later are still its own.
SETTLE_S: Final = 0.3
#: How long a ``corrupt_data`` fault that fired is followed for the guests' checks to report
#: the spoiled byte (the record closes as soon as one does).
CORRUPT_SEEN_S: Final = 3.0
#: Seconds between two throughput samples.
SAMPLE_S: Final = 0.5
#: Seconds between two looks of the checkers at what they follow themselves (console logs).
POLL_S: Final = 0.1
#: Longest wait for a guest that ended to have all its results in (Checker.settled).
SETTLE_GUEST_S: Final = 10.0
#: In-driver faults that end in a replacement when they fire.
_REPLACED: Final = frozenset(
    {
        "segv",
        "abort",
        "exception",
        "exit",
        "hang",
        "drop",
        "duplicate",
        "bad_id",
        "bad_status",
        "bad_op",
        "bad_index",
        "leak_mem",
        "leak_fd",
    }
)
Progress = Callable[[int, int, float], None]  # (faults done, faults planned, seconds left)


class _KernelGone(Exception):
    """The kernel died or stopped (inline: the driver took it down)."""


@dataclass
class Record:
    """What happened to one injected fault (a ``faults`` entry of the journal)."""

    seq: int
    at_s: float
    type: str
    driver: str
    args: dict[str, Any]
    target_pid: int | None = None
    manifested: bool = False
    detected: bool = False
    detected_by: str | None = None
    reason: str | None = None
    recovered: bool = False
    recovery_ms: float | None = None
    replayed: int | None = None
    new_pid: int | None = None
    guest_errors: int = 0
    data_mismatches: int = 0
    poison: bool = False
    kernel_crash: bool = False
    outcome: str = "not_manifested"
    notes: list[str] = field(default_factory=list)

    def journal(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("poison", "kernel_crash")}
        d["notes"] = "; ".join(self.notes)
        return d


def _served(before: dict[tuple[int, str], int], now: dict[tuple[int, str], int]) -> int:
    """Requests issued between two looks at the devices' counters: a device that is new (a
    new guest) counts from 0, one that is gone (its guest ended) counts no more, and a counter
    that went back (a frontend that connected again) counts from 0 again."""
    total = 0
    for key, n in now.items():
        then = before.get(key)
        total += n - then if then is not None and n >= then else n
    return total


class Campaign:
    """``Campaign(plan, seed, out_dir).run()`` -> the journal (also written to out_dir)."""

    def __init__(
        self,
        plan: Plan,
        seed: int,
        out_dir: Path,
        *,
        isolation: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.plan = plan
        self.seed = seed
        self.out = out_dir
        self.isolation = isolation or plan.isolation
        self.progress = progress
        self.driver = plan.stack.driver
        self.records: list[Record] = []
        self.guests: list[dict[str, Any]] = []
        self.throughput: list[list[float]] = []
        self.kernel_crashes = 0
        self.interrupted = False
        self.schedule = schedule(plan, seed)
        self._stacks = 0
        self._stack: PrivateStack | None = None
        self._sub: Subscriber | None = None
        self._t0 = 0.0
        #: When the last throughput sample was taken, and each device's request count then.
        self._last_sample: tuple[float, dict[tuple[int, str], int]] = (0.0, {})
        self._guest_names: list[str] = []
        self.checkers: list[Checker] = [CHECKERS[w.image](w, self.driver) for w in plan.workloads]
        self._live: dict[str, Unit] = {}  # running guests
        self._ending: dict[str, tuple[Unit, str, dict[str, Any], float]] = {}  # ended: their
        # unit, how (shutdown, crashed), the event, and until when their results may come
        self._next_poll = 0.0
        self._injecting = True
        self._broken = False

    # -- the whole run ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.out.mkdir(parents=True, exist_ok=True)
        t_start = time.monotonic()
        failure: Exception | None = None
        try:
            self._start_stack()
            self._t0 = time.monotonic()
            for item in self.schedule:
                self._inject_when_due(item)
                if self.progress is not None:
                    self.progress(item.seq, len(self.schedule), self._left())
            self._finish_guests()
        except KeyboardInterrupt:
            self.interrupted = True
        except Exception as e:  # the journal of what ran is written all the same
            failure = e
        finally:
            self._stop_stack()
        journal = self._journal(started, time.monotonic() - t_start)
        if failure is not None:
            journal["campaign"]["error"] = f"{type(failure).__name__}: {failure}"
        (self.out / "journal.json").write_text(json.dumps(journal, indent=1) + "\n")
        write_report(self.out, journal)
        if self.interrupted:
            raise KeyboardInterrupt
        if failure is not None:
            raise RuntimeError(f"{type(failure).__name__}: {failure}") from failure
        return journal

    def _left(self) -> float:
        end = self.schedule[-1].at_s if self.schedule else 0.0
        return max(0.0, end - (time.monotonic() - self._t0))

    # -- the stack ----------------------------------------------------------------------------
    def _driver_toml(self) -> str:
        s = self.plan.stack
        lines = [
            f"[driver.{self.driver}]",
            f'module = "{s.module}"',
            f'isolation = "{self.isolation}"',
        ]
        if self.isolation == "process":
            lines += [
                f"watchdog_sec = {s.watchdog_sec}",
                f"request_timeout_sec = {s.request_timeout_sec}",
                f'max_rss = "{s.max_rss}"',
                f"max_fds = {s.max_fds}",
                "intensity = 1000000",
                "period = 1.0",
                "start_secs = 0.2",
            ]
        return "\n".join(lines) + "\n"

    def _expected_s(self, entry: FaultEntry) -> float:
        """How long a fault of this entry should take to resolve, roughly."""
        st = self.plan.stack
        return {
            "hang": st.watchdog_sec + 1.0,
            "drop": st.request_timeout_sec + 1.0,
            "slow": 1.2 + (entry.latency_ms + entry.jitter_ms) / 1e3,
            "corrupt_data": 1.2,
            "poison": 3.0,
            "recovery_crash": 1.5,
            "leak_mem": 2.0,
            "leak_fd": 2.0,
        }.get(entry.type, 0.8)

    def _run_seconds(self) -> float:
        """How long the guests run: the schedule plus what resolving its faults should take
        (the guests end by themselves; there is no way yet to tell one to stop early)."""
        end = self.schedule[-1].at_s if self.schedule else 0.0
        busy = sum(self._expected_s(self.plan.faults[i.fault]) for i in self.schedule)
        return max(self.plan.duration or 0.0, end) + busy + 5.0

    def _start_stack(self) -> None:
        self._stacks += 1
        # a short private directory (socket paths are limited to ~100 bytes); the logs are
        # copied to the output directory when the stack stops
        st = PrivateStack(
            self.plan.stack.pcpus, extra_toml=self._driver_toml(), name="campaign", keep=True
        )
        self._stack = st
        st.up([])
        consoles = any(c.console_events for c in self.checkers)
        self._sub = st.subscribe(
            ["domain.", "driver.", "device."] + (["console."] if consoles else [])
        )
        for k, checker in enumerate(self.checkers):
            checker.start(st.run_dir)
            for i in range(checker.units):
                self._create_unit(Unit(k, i, 1, self._stacks))
        n = len(self._live)
        self._wait_for(lambda: self._requests() >= 200 * n, 60, "guest I/O to start")

    def _guest_seconds(self, checker: Checker) -> int:
        """A guest runs for at most its checker's epoch; one that ends while faults remain is
        replaced (there is no way yet to tell a guest to stop early, so the last one ends by
        itself)."""
        elapsed = time.monotonic() - self._t0 if self._t0 else 0.0
        return max(checker.min_s, min(checker.epoch_s, math.ceil(self._run_seconds() - elapsed)))

    def _create_unit(self, unit: Unit) -> None:
        """Create the guests of ``unit`` (one, or a pair) as its checker sets them up."""
        st = self._stack
        assert st is not None
        checker = self.checkers[unit.workload]
        specs = checker.guests(unit, self._guest_seconds(checker), 1 + len(self._guest_names))
        for g in specs:
            cfg = st.domain_config(
                g.name, g.image, g.memory, on_poweroff="preserve", on_crash="preserve", **g.keys
            )
            st.create(cfg)
            self._guest_names.append(g.name)
            self._live[g.name] = unit

    def _guest_ended(self, name: str, kind: str, p: dict[str, Any]) -> None:
        """A guest powered off or crashed: its results are recorded once its checker has them
        all (:meth:`_settle_guests`)."""
        unit = self._live.pop(name)
        self._ending[name] = (unit, kind, p, time.monotonic() + SETTLE_GUEST_S)
        self._settle_guests()

    def _settle_guests(self) -> None:
        """Record the guests that ended and have their results in (or waited long enough),
        destroy them, and replace each unit none of whose guests runs any more."""
        for name, (unit, kind, p, deadline) in list(self._ending.items()):
            checker = self.checkers[unit.workload]
            if not checker.settled(name) and time.monotonic() < deadline:
                continue
            del self._ending[name]
            self._record_guest(name, unit, kind, p)
            gone = unit not in [*self._live.values(), *(e[0] for e in self._ending.values())]
            if gone and self._injecting:
                self._create_unit(Unit(unit.workload, unit.index, unit.gen + 1, unit.stack))

    def _record_guest(self, name: str, unit: Unit, kind: str, p: dict[str, Any]) -> None:
        """A guest's result into the journal; destroy it (its disk is free again)."""
        con = self._call("console", name=name)["data"].decode(errors="replace")
        assert self._stack is not None
        (self._stack.dir / f"{name}.console.txt").write_text(con)  # kept with the logs
        r = self.checkers[unit.workload].result(name, con)
        guest: dict[str, Any] = {
            "name": name,
            "ops": r.ops,
            "errors": r.errors,
            "mismatches": r.mismatches,
            "exit": "crash" if kind == "crashed" else "poweroff",
            "code": p.get("code"),
        }
        if kind == "crashed":  # the kernel's reason: what a reader of the journal looks for
            guest["reason"] = str(p.get("reason", ""))[:300]
        self.guests.append(guest)
        self._call("destroy", name=name)

    def _stop_stack(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        st = self._stack
        if st is not None:
            keep = self.out / f"stack{self._stacks}"
            try:
                st.close()
            finally:
                keep.mkdir(parents=True, exist_ok=True)
                for f in [
                    *st.dir.glob("*.toml"),
                    *st.dir.glob("*.console.txt"),
                    *st.run_dir.glob("*.log"),
                ]:
                    with contextlib.suppress(OSError):
                        shutil.copy2(f, keep / f.name)
                shutil.rmtree(st.dir, ignore_errors=True)
            self._stack = None

    def _call(self, command: str, **props: Any) -> dict[str, Any]:
        assert self._stack is not None
        return self._stack.call(command, **props)

    def _kernel_alive(self) -> bool:
        """The kernel runs (a stopped kernel counts as gone: it serves nobody)."""
        st = self._stack
        if st is None or st.kernel_pid is None:
            return False
        try:
            return psutil.Process(st.kernel_pid).status() not in (
                psutil.STATUS_ZOMBIE,
                psutil.STATUS_STOPPED,
                psutil.STATUS_DEAD,
            )
        except psutil.Error:
            return False

    # -- events -------------------------------------------------------------------------------
    def _pump(self, timeout: float, rec: Record | None = None) -> tuple[str, dict[str, Any]] | None:
        """One event (attributed to ``rec``), and a throughput sample and a look of the
        checkers when due."""
        self._sample()
        self._look(rec)
        assert self._sub is not None
        ev = self._sub.recv(timeout)
        if ev is None:
            return None
        topic, p = ev
        parts = topic.split(".")
        if (
            len(parts) == 3
            and parts[0] == "domain"
            and parts[1] in self._live
            and parts[2] in ("shutdown", "crashed")
        ):
            self._guest_ended(parts[1], parts[2], p)
            return ev
        if topic.startswith("console.") and rec is not None:
            name = topic[len("console.") :]
            unit = self._live.get(name) or (self._ending[name][0] if name in self._ending else None)
            if unit is not None:
                text = bytes(p.get("data", b"")).decode(errors="replace")
                self._attribute(rec, self.checkers[unit.workload].console(name, text))
        return ev

    def _look(self, rec: Record | None) -> None:
        """Every POLL_S: what the checkers follow themselves, and the guests that ended."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + POLL_S
        if self._ending:  # first: what a guest's settling reads is in this look's polls
            self._settle_guests()
        found = Tally()
        for c in self.checkers:
            found += c.poll()
        if rec is not None:
            self._attribute(rec, found)

    @staticmethod
    def _attribute(rec: Record, found: Tally) -> None:
        rec.guest_errors += found.errors
        rec.data_mismatches += found.mismatches

    def _sample(self) -> None:
        now = time.monotonic()
        if now - self._last_sample[0] < SAMPLE_S or not self._kernel_alive():
            return
        try:
            counts = {
                (d["domid"], d["vdev"]): d["requests"] for d in self._call("devices")["devices"]
            }
        except ControlError:
            return
        t_prev, prev = self._last_sample
        if t_prev:
            self.throughput.append(
                [round(now - self._t0, 3), _served(prev, counts) / (now - t_prev)]
            )
        self._last_sample = (now, counts)

    def _requests(self) -> int:
        return sum(d["requests"] for d in self._call("devices")["devices"])

    def _wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if not self._kernel_alive():
                raise _KernelGone(what)
            if time.monotonic() > deadline:
                raise RuntimeError(f"campaign: timed out waiting for {what}")
            self._pump(0.02)

    def _driver_row(self) -> dict[str, Any] | None:
        rows: list[dict[str, Any]] = self._call("status")["drivers"]
        for row in rows:
            if row["name"] == self.driver:
                return row
        return None

    def _ready(self) -> bool:
        if not self._kernel_alive():
            return False
        try:
            row = self._driver_row()
        except ControlError:
            return False
        if row is None or row.get("state") != "RUNNING" or not isinstance(row.get("pid"), int):
            return False
        return self.isolation == "inline" or bool(row.get("spare_ready"))

    # -- one fault ------------------------------------------------------------------------------
    def _inject_when_due(self, item: ScheduledFault) -> None:
        entry = self.plan.faults[item.fault]
        while time.monotonic() - self._t0 < item.at_s:
            self._pump(min(0.05, item.at_s - (time.monotonic() - self._t0)))
        while True:
            if not self._kernel_alive() or self._broken:
                self._broken = False
                self._restart_after_crash()
            try:
                self._wait_for(self._ready, 60, f"driver {self.driver} to be ready")
                break
            except _KernelGone:
                continue
        rec = Record(
            item.seq, round(time.monotonic() - self._t0, 3), item.type, self.driver, entry.args()
        )
        self.records.append(rec)
        row = self._driver_row()
        rec.target_pid = row["pid"] if row else None
        try:
            self._inject(entry, rec)
            self._follow(entry, rec)
        except ControlError as e:
            if self._kernel_alive():
                rec.notes.append(f"control: {e}")
        if not self._kernel_alive():
            rec.kernel_crash = True
            self.kernel_crashes += 1
        rec.outcome = self._outcome(rec)
        # inline, a driver that hung or lost track of a device is not replaced: its guests
        # are lost, and the next fault gets a fresh stack (as after a kernel crash)
        self._broken = self.isolation == "inline" and rec.outcome in ("guest_lost", "guest_error")

    def _inject(self, entry: FaultEntry, rec: Record) -> None:
        kind = entry.type
        if kind in ("sigkill", "sigstop") and self.isolation == "process":
            assert rec.target_pid is not None
            os.kill(rec.target_pid, signal.SIGKILL if kind == "sigkill" else signal.SIGSTOP)
            rec.manifested = True
        elif kind in ("sigkill", "sigstop", "recovery_crash") and self.isolation == "inline":
            st = self._stack
            assert st is not None and st.kernel_pid is not None
            rec.target_pid = st.kernel_pid  # the driver is part of the kernel process
            os.kill(st.kernel_pid, signal.SIGSTOP if kind == "sigstop" else signal.SIGKILL)
            rec.manifested = True
        else:
            spec: dict[str, Any] = {"type": kind, **entry.args()}
            if kind == "poison":
                spec.setdefault("times", -1)
            elif kind in ("leak_mem", "leak_fd"):
                spec.setdefault("times", -1)
                spec.setdefault("interval", 2000)
            if self.isolation == "inline" and kind not in ("recovery_crash",):
                spec["really"] = True
            self._call("fault", action="add", driver=self.driver, spec=spec)
            if kind == "recovery_crash":
                assert rec.target_pid is not None
                os.kill(rec.target_pid, signal.SIGKILL)
                rec.manifested = True

    def _follow(self, entry: FaultEntry, rec: Record) -> None:
        """Events until the fault is resolved (or RESOLVE_S passes)."""
        kind = rec.type
        name = self.driver
        deadline = time.monotonic() + RESOLVE_S + (entry.latency_ms + entry.jitter_ms) / 1e3
        if kind == "poison":  # its request may come only from the guests' next generation
            deadline += POISON_EXTRA_S
        quiet_until: float | None = None  # tolerated faults: resolved after a quiet spell
        while True:
            now = time.monotonic()
            if now > deadline or (quiet_until is not None and now > quiet_until):
                break
            if kind == "corrupt_data" and rec.manifested and rec.data_mismatches:
                break  # a guest's check saw it
            if self.isolation == "inline" and not self._kernel_alive():
                rec.detected, rec.detected_by = True, "kernel died"
                break
            ev = self._pump(0.05, rec)
            if ev is None:
                continue
            topic, p = ev
            if topic == f"driver.{name}.fault_fired":
                rec.manifested = True
                if kind == "corrupt_data":  # until a guest's check reports it, on a busy host
                    quiet_until = time.monotonic() + CORRUPT_SEEN_S
                elif kind == "slow" or (self.isolation == "inline" and kind not in _REPLACED):
                    quiet_until = time.monotonic() + 1.0 + entry.latency_ms / 1e3
            elif (
                topic in (f"driver.{name}.hang", f"driver.{name}.violation")
                and p.get("pid") == rec.target_pid
                and not rec.detected
            ):
                rec.detected, rec.detected_by = True, topic.rsplit(".", 1)[1]
                rec.reason = str(p.get("reason", ""))[:300]
            elif topic == f"driver.{name}.exit" and p.get("pid") == rec.target_pid:
                rec.manifested = True
                if not rec.detected:
                    rec.detected, rec.detected_by = True, "exit"
                rec.reason = str(p.get("reason"))
            elif topic == f"driver.{name}.poison":
                rec.poison = True
                rec.detected = True
                rec.detected_by = rec.detected_by or "poison"
                self._call("fault", action="reset", driver=name)
                quiet_until = time.monotonic() + 1.0
            elif topic == f"driver.{name}.recovered" and kind != "poison":
                if p.get("old_pid") == rec.target_pid or kind == "recovery_crash":
                    rec.recovered = True
                    rec.recovery_ms = p.get("recovery_ms")
                    rec.replayed = p.get("replayed")
                    rec.new_pid = p.get("pid")
                    if kind == "recovery_crash" and p.get("old_pid") == rec.target_pid:
                        continue  # the crashed replacement's successor is what counts
                    quiet_until = time.monotonic() + SETTLE_S
            elif topic.startswith("domain.") and topic.endswith(".crashed"):
                rec.notes.append(f"{topic}: {p.get('reason')}")
        # a last look before the record closes: what the fault did (a corrupted append, say)
        # is in the guests' logs by now even if this process was not scheduled for the last
        # polls of its window (CI under load saw a corrupt_data fault with no mismatch)
        self._next_poll = 0.0
        self._look(rec)
        if kind not in ("sigkill", "sigstop", "recovery_crash") and self._kernel_alive():
            self._call("fault", action="reset", driver=name)

    def _outcome(self, rec: Record) -> str:
        if rec.kernel_crash:
            return "kernel_crash"
        if any(n.startswith("domain.") for n in rec.notes):
            return "guest_lost"
        if not rec.manifested:
            return "not_manifested"
        if rec.type == "corrupt_data" or rec.data_mismatches:
            return "silent_corruption"
        if rec.poison:
            return "poison_error"
        if rec.guest_errors:
            return "guest_error"
        if rec.recovered:
            return "recovered"
        if rec.type == "slow" or (
            not rec.detected and (self.isolation == "inline" or rec.type not in _REPLACED)
        ):
            return "tolerated"  # it fired, nothing noticed, no guest saw anything (inline:
            # e.g. a leak that only grows the kernel)
        return "guest_lost"  # it needed a replacement and none came in time

    def _restart_after_crash(self) -> None:
        """The kernel died (inline): its guests are lost; a fresh stack takes over."""
        for name in [*self._live, *self._ending]:
            self.guests.append(
                {
                    "name": name,
                    "ops": 0,
                    "errors": 0,
                    "mismatches": 0,
                    "exit": "crash",
                    "code": None,
                }
            )
        self._live.clear()
        self._ending.clear()
        self._stop_stack()
        self._start_stack()

    # -- the end --------------------------------------------------------------------------------
    def _finish_guests(self) -> None:
        """No more faults: let the guests end by themselves and record them."""
        if not self._kernel_alive():
            self._restart_after_crash()
        self._injecting = False
        deadline = time.monotonic() + max(c.epoch_s for c in self.checkers) + 60
        while (self._live or self._ending) and time.monotonic() < deadline:
            self._pump(0.1)
        for name in [*self._live, *self._ending]:  # still running (or its results never
            self._live.pop(name, None)  # came): hung
            self._ending.pop(name, None)
            self.guests.append(
                {"name": name, "ops": 0, "errors": 0, "mismatches": 0, "exit": "hung", "code": None}
            )

    def _journal(self, started: str, duration: float) -> dict[str, Any]:
        faults = [r.journal() for r in self.records]
        summary = summarize(faults, self.guests, kernel_crashes=self.kernel_crashes)
        return {
            "campaign": {
                "name": self.plan.name,
                "plan": str(self.plan.path),
                "seed": self.seed,
                "isolation": self.isolation,
                "started": started,
                "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "interrupted": self.interrupted,
                "duration_s": round(duration, 1),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            },
            "schedule": schedule_to_json(self.schedule),
            "faults": faults,
            "guests": self.guests,
            "throughput": self.throughput,
            "summary": summary,
        }
