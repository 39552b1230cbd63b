"""Campaign workloads: the verifying guest programs a campaign runs, one checker per program.

A checker is all the runner knows about a program (docs/campaigns.md, "Workloads"): the driver
class it exercises, how its guests are set up on the campaign's driver (a disk, a vif wired to a
peer, a console), which output counts as a guest-visible error or a data mismatch while a fault
is in progress, and how a guest's final result is read once it has ended.

* ``blkstress`` (block): writes and verifies blocks on its disk; ``MISMATCH`` lines are data
  mismatches, ``failed: status`` and ``phase stopped`` lines errors; its ``ops=`` summary line
  is the result.
* ``netpair`` (net): guests in pairs on one bridge send each other sequenced frames; a
  ``corrupt frame`` line is a data mismatch, a frontend or send failure an error; the result is
  the ``sent= received= lost= dup= reordered= corrupt= other= errors=`` summary line.
* ``conecho`` (console): prints numbered lines through the console driver; the checker follows
  the domain's log file itself and requires every line exactly once, in order: a missing or
  repeated line is an error, a mangled one a data mismatch.
"""

from __future__ import annotations

import abc
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

if TYPE_CHECKING:
    from isovisor.campaign.plan import Workload


@dataclass(frozen=True)
class Tally:
    """Guest-visible errors and data mismatches seen in one look."""

    errors: int = 0
    mismatches: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.errors + other.errors, self.mismatches + other.mismatches)

    def __bool__(self) -> bool:
        return bool(self.errors or self.mismatches)


@dataclass(frozen=True)
class Unit:
    """Guests created together, and replaced together once all of them have ended: one guest,
    or a netpair pair.  ``workload`` and ``index`` count from 0; ``gen`` and ``stack`` from 1."""

    workload: int
    index: int
    gen: int = 1
    stack: int = 1

    @property
    def base(self) -> str:
        """The unit's name in every generation (e.g. its disk image's)."""
        return f"w{self.workload + 1}-{self.index + 1}"

    def name(self, member: str = "") -> str:
        return (f"{self.base}{member}" + (f"-s{self.stack}" if self.stack > 1 else "")
                + (f"-g{self.gen}" if self.gen > 1 else ""))


@dataclass(frozen=True)
class GuestSpec:
    """One guest to create: its domain config keys besides name, image and memory."""

    name: str
    image: str
    memory: int
    keys: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """A guest's final numbers for the journal's ``guests``."""

    ops: int
    errors: int
    mismatches: int


class Checker(abc.ABC):
    """One workload of a plan: its guests and how they are checked (see the module docstring).

    The runner calls :meth:`guests` for each unit it creates, :meth:`console` with each piece
    of console output of a guest, :meth:`poll` now and then (for what the checker follows
    itself), :meth:`settled` until a guest that ended has all its results in, and then
    :meth:`result`."""

    #: The guest program.
    image: ClassVar[str]
    #: The device class of the driver it needs (drivers/faults.py, FAULT_CLASSES).
    device_class: ClassVar[str]
    #: The member suffixes of a unit (its guests' names).
    members: ClassVar[tuple[str, ...]] = ("",)
    #: A guest runs for at least ``min_s`` and at most ``epoch_s`` seconds; one that ends while
    #: faults remain is replaced.
    epoch_s: ClassVar[int] = 60
    min_s: ClassVar[int] = 15
    #: The runner passes the guests' console output (``console.<name>`` events).
    console_events: ClassVar[bool] = True

    def __init__(self, workload: Workload, driver: str) -> None:
        self.workload = workload
        self.driver = driver
        self.run_dir: Path | None = None

    @property
    def units(self) -> int:
        return self.workload.domains // len(self.members)

    def start(self, run_dir: Path) -> None:
        """A (new) stack runs in ``run_dir``."""
        self.run_dir = run_dir

    @abc.abstractmethod
    def guests(self, unit: Unit, seconds: int, seed: int) -> list[GuestSpec]:
        """The guests of ``unit``, to run for about ``seconds``; ``seed`` is the campaign's
        count of guests so far (+1)."""

    def console(self, name: str, text: str) -> Tally:
        """Errors and mismatches in a piece of ``name``'s console output."""
        return Tally()

    def poll(self) -> Tally:
        """Errors and mismatches found in what the checker follows itself, since last time."""
        return Tally()

    def settled(self, name: str) -> bool:
        """The guest ``name`` has ended: are its results all in?"""
        return True

    @abc.abstractmethod
    def result(self, name: str, console: str) -> Result:
        """The final numbers of ``name`` (``console``: the end of its console output)."""


def _summary(pattern: re.Pattern[str], console: str) -> dict[str, int]:
    """The ``key=value`` numbers of the last line ``pattern`` finds."""
    lines = pattern.findall(console)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", lines[-1])} if lines else {}


class BlkStress(Checker):
    image = "blkstress"
    device_class = "vbd"
    _MISMATCH: Final = re.compile(r"^blkstress: MISMATCH ", re.MULTILINE)
    _ERROR: Final = re.compile(r"^blkstress: .*(failed: status|phase stopped)", re.MULTILINE)
    _SUMMARY: Final = re.compile(r"^blkstress: ops=.*$", re.MULTILINE)

    def guests(self, unit: Unit, seconds: int, seed: int) -> list[GuestSpec]:
        w = self.workload
        disk = (f"target={unit.base}.img, vdev=xvda, access=rw, backend={self.driver}, "
                f"size={w.disk_size}")
        extra = (f"{w.extra} seed={seed} ops=1000000000 seconds={seconds} "
                 "timeout=60000").strip()
        return [GuestSpec(unit.name(), self.image, 8, {"extra": extra, "disk": [disk]})]

    def console(self, name: str, text: str) -> Tally:
        return Tally(len(self._ERROR.findall(text)), len(self._MISMATCH.findall(text)))

    def result(self, name: str, console: str) -> Result:
        s = _summary(self._SUMMARY, console)
        return Result(s.get("ops", 0), s.get("errors", 0), s.get("mismatches", 0))


class NetPair(Checker):
    """Pairs of guests on bridge br0 of the driver; each names the other's MAC as its peer."""

    image = "netpair"
    device_class = "vif"
    members = ("a", "b")
    epoch_s = 6
    min_s = 3
    #: Data frames one side sends per second, about (the count is planned from it).
    FRAMES_PER_S: Final = 5000
    _MISMATCH: Final = re.compile(r"^netpair: corrupt frame ", re.MULTILINE)
    #: (Not "presumably lost": netpair says so when its window has been shut for a second,
    #: which a stalled tx ring does too; whether frames were lost, its summary says.)
    _ERROR: Final = re.compile(r"^netpair: (the frontend failed|send failed)", re.MULTILINE)
    _SUMMARY: Final = re.compile(r"^netpair: sent=.*$", re.MULTILINE)

    @staticmethod
    def mac(unit: Unit, member: int) -> str:
        """A unicast, locally administered MAC no other guest of the campaign has."""
        return (f"02:{unit.workload & 0xFF:02x}:{unit.index & 0xFF:02x}:"
                f"{unit.stack & 0xFF:02x}:{unit.gen & 0xFF:02x}:{member:02x}")

    def guests(self, unit: Unit, seconds: int, seed: int) -> list[GuestSpec]:
        macs = [self.mac(unit, m) for m in range(2)]
        count = self.FRAMES_PER_S * seconds
        out = []
        for m, member in enumerate(self.members):
            # the plan's extra may set count, size, window, timeout; never the peer
            extra = " ".join(p for p in (f"count={count} timeout=10000", self.workload.extra,
                                         f"peer={macs[1 - m]}") if p)
            vif = f"mac={macs[m]}, bridge=br0, backend={self.driver}"
            out.append(GuestSpec(unit.name(member), self.image, 4,
                                 {"extra": extra, "vif": [vif]}))
        return out

    def console(self, name: str, text: str) -> Tally:
        return Tally(len(self._ERROR.findall(text)), len(self._MISMATCH.findall(text)))

    def result(self, name: str, console: str) -> Result:
        """ops: frames sent and received; mismatches: corrupt frames; errors: frontend
        errors, duplicates, frames out of order, and lost frames beyond the corrupt ones (a
        corrupt frame is also missing from what was received intact)."""
        s = _summary(self._SUMMARY, console)
        if not s:
            return Result(0, 0, 0)
        corrupt = s.get("corrupt", 0)
        errors = (s.get("errors", 0) + s.get("dup", 0) + s.get("reordered", 0)
                  + max(0, s.get("lost", 0) - corrupt))
        return Result(s.get("sent", 0) + s.get("received", 0), errors, corrupt)


_PATTERN: Final = b"abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class _LogCheck:
    """What one conecho guest's log file held so far (read incrementally)."""

    path: Path
    lines: int  # the lines the guest was asked to print
    offset: int = 0
    partial: bytes = b""
    next: int = 0  # the line number expected next
    ok: int = 0
    missing: int = 0
    repeated: int = 0
    corrupt: int = 0
    #: mangled lines since the last good one: each stands for the numbered line(s) in it
    suspect: int = 0
    done: int | None = None  # lines= of the done line, once seen
    ended_at: float | None = None  # when the guest ended (monotonic)
    size_at: tuple[float, int] = (0.0, -1)  # (when, size) the size was last seen to change


class ConEcho(Checker):
    """Guests whose console is the driver; each prints numbered lines, and the checker reads
    the domain's log file ``<run_dir>/consoles/<name>.log`` as it grows."""

    image = "conecho"
    device_class = "console"
    epoch_s = 6
    min_s = 3
    console_events = False
    #: Lines a guest prints per second, about (the count is planned from it).
    LINES_PER_S: Final = 12000
    #: A guest that ended has its results in once the done line is in its log, or the log has
    #: not grown for this long (the driver drained the ring).
    QUIET_S: Final = 1.0
    _LINE: Final = re.compile(rb"conecho: line (\d{9}) " + _PATTERN)
    _DONE: Final = re.compile(rb"conecho: done lines=(\d+) echoed=\d+")
    #: conecho's other lines (input, with echo=1)
    _OTHER: Final = re.compile(rb"conecho: (ready for input|got .*|no input within \d+ ms|"
                               rb"no console input .*)")
    _LINES: Final = re.compile(r"(?:^|\s)lines=(\d+)(?=\s|$)")

    def __init__(self, workload: Workload, driver: str) -> None:
        super().__init__(workload, driver)
        self.logs: dict[str, _LogCheck] = {}

    def start(self, run_dir: Path) -> None:
        super().start(run_dir)
        self.logs.clear()  # (the guests of a stack that died are recorded as lost)

    def guests(self, unit: Unit, seconds: int, seed: int) -> list[GuestSpec]:
        extra = f"lines={self.LINES_PER_S * seconds} {self.workload.extra}".strip()
        name = unit.name()
        asked = self._LINES.findall(extra)  # the guest takes the last one
        assert self.run_dir is not None
        self.logs[name] = _LogCheck(self.run_dir / "consoles" / f"{name}.log", int(asked[-1]))
        return [GuestSpec(name, self.image, 4, {"extra": extra, "console": self.driver})]

    def poll(self) -> Tally:
        total = Tally()
        for c in self.logs.values():
            total += self._read(c)
        return total

    def settled(self, name: str) -> bool:
        c = self.logs.get(name)
        if c is None:
            return True
        self._read(c)
        now = time.monotonic()
        if c.ended_at is None:
            c.ended_at = now
        return c.done is not None or now - max(c.ended_at, c.size_at[0]) >= self.QUIET_S

    def result(self, name: str, console: str) -> Result:
        c = self.logs.pop(name, None)
        if c is None:
            return Result(0, 0, 0)
        self._read(c)
        if c.partial:  # a last line without its newline: mangled
            self._line(c, c.partial)
        expected = c.done if c.done is not None else c.lines
        tail = max(0, expected - c.next - c.suspect)
        return Result(c.ok, c.missing + c.repeated + tail + int(c.done is None), c.corrupt)

    def _read(self, c: _LogCheck) -> Tally:
        """Check the lines added to the log since the last look."""
        try:
            with open(c.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == c.offset:
                    return Tally()
                f.seek(c.offset)
                data = f.read(size - c.offset)
        except FileNotFoundError:
            return Tally()
        c.offset += len(data)
        c.size_at = (time.monotonic(), c.offset)
        *lines, c.partial = (c.partial + data).split(b"\n")
        total = Tally()
        for line in lines:
            total += self._line(c, line)
        return total

    def _line(self, c: _LogCheck, line: bytes) -> Tally:
        m = self._LINE.fullmatch(line)
        if m is not None:
            n = int(m.group(1))
            if n < c.next:
                c.repeated += 1
                return Tally(errors=1)
            gap = n - c.next
            lost = max(0, gap - c.suspect)  # a mangled line stands for the one it was
            c.missing += lost
            c.next, c.suspect = n + 1, 0
            c.ok += 1
            return Tally(errors=lost)
        d = self._DONE.fullmatch(line)
        if d is not None:
            c.done = int(d.group(1))
            return Tally()
        if self._OTHER.fullmatch(line) is None and (
                b"line" in line or b"conecho" in line or not line.isascii()
                or not line.decode("ascii").isprintable()):
            c.corrupt += 1
            c.suspect += max(1, line.count(b"line "))
            return Tally(mismatches=1)
        return Tally()  # some other output of the guest's


#: The workloads campaigns can run, by guest program.
CHECKERS: Final[dict[str, type[Checker]]] = {c.image: c for c in (BlkStress, NetPair, ConEcho)}
