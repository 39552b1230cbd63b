"""Campaign workloads: what a campaign needs to know of a verifying guest program (a
*checker*), declared by each device class beside the class (``DeviceClass.checkers``) and
collected by ``isovisor/campaign/workloads.py`` (docs/campaigns.md, "Workloads").

A checker says which device class it exercises, how its guests are set up on the campaign's
driver (a disk, a vif wired to a peer, a console, an entropy device), which output counts as a
guest-visible error or a data mismatch while a fault is in progress, and how a guest's final
result is read once it has ended.  Pure: no process or socket; the runner does the rest.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol


class WorkloadSpec(Protocol):
    """A plan's ``[[workload]]`` table, as a checker reads it."""

    @property
    def domains(self) -> int: ...

    @property
    def extra(self) -> str: ...

    @property
    def disk_size(self) -> str: ...


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
        return (
            f"{self.base}{member}"
            + (f"-s{self.stack}" if self.stack > 1 else "")
            + (f"-g{self.gen}" if self.gen > 1 else "")
        )


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
    #: The device class of the driver it needs (its name in devices/).
    device_class: ClassVar[str]
    #: The member suffixes of a unit (its guests' names).
    members: ClassVar[tuple[str, ...]] = ("",)
    #: A guest runs for at least ``min_s`` and at most ``epoch_s`` seconds; one that ends while
    #: faults remain is replaced.
    epoch_s: ClassVar[int] = 60
    min_s: ClassVar[int] = 15
    #: The runner passes the guests' console output (``console.<name>`` events).
    console_events: ClassVar[bool] = True

    def __init__(self, workload: WorkloadSpec, driver: str) -> None:
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


def summary(pattern: re.Pattern[str], console: str) -> dict[str, int]:
    """The ``key=value`` numbers of the last line ``pattern`` finds."""
    lines = pattern.findall(console)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", lines[-1])} if lines else {}
