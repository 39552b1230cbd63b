"""The supervisor's table of injected faults (``isovisor fault add|list|remove|reset``).

Faults injected inside a driver (drivers/faults.py) are kept here and sent to the driver's
current instance, and again to every new instance while they are still armed; each firing the
driver reports (``driver.<name>.fault_fired``) counts down ``times``.  The faults carried out
from outside (``sigkill``, ``sigstop``, ``recovery_crash``) are done by the supervisor itself:
the first two at once, the last at the next replacement's hello.

An in-driver fault must make sense for the driver's device class (drivers/faults.py,
``FAULT_CLASSES``): given the drivers' modules, :meth:`FaultTable.add` refuses, e.g., a bad
response for a console driver, saying which types a console driver takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from drivers.faults import IN_DRIVER_TYPES, Fault, FaultClass, class_of_module

#: Fault types the supervisor carries out itself.
OUTSIDE_TYPES: Final[dict[str, str]] = {
    "sigkill": "SIGKILL the driver's process now",
    "sigstop": "SIGSTOP the driver's process now",
    "recovery_crash": "SIGKILL the next replacement right after its hello, before it has redone "
    "its requests",
}
ALL_TYPES: Final[dict[str, str]] = {**OUTSIDE_TYPES, **IN_DRIVER_TYPES}


@dataclass
class Row:
    id: int
    driver: str
    spec: dict[str, Any]  # the wire form (drivers.faults.Fault.to_dict) or {"type": outside}
    fired: int = 0
    pids: list[int] = field(default_factory=list)  # instances it fired in
    #: The instance a fault with a limited ``times`` was given to; it is never given to
    #: another (that instance may die of it before its report arrives).  None: not yet given.
    bound_pid: int | None = None

    @property
    def type(self) -> str:
        return str(self.spec["type"])

    @property
    def armed(self) -> bool:
        return self.spec.get("times", 1) != 0 if self.type in IN_DRIVER_TYPES else not self.fired

    def view(self) -> dict[str, Any]:
        """For `fault list`: the knobs and filters that differ from the defaults."""
        default = Fault(0, self.type).to_dict() if self.type in IN_DRIVER_TYPES else {}
        knobs = {
            k: v
            for k, v in self.spec.items()
            if k not in ("id", "type", "calls", "fired") and default.get(k) != v
        }
        return {
            "id": self.id,
            "driver": self.driver,
            "type": self.type,
            "armed": self.armed,
            "fired": self.fired,
            "pids": list(self.pids),
            "args": knobs,
        }


class FaultTable:
    """``modules``: each driver's module (``[driver.<name>] module``), which decides the fault
    types and filters it takes; a driver not named there is checked by its own injector only
    (the table then accepts what any driver class could take)."""

    def __init__(self, modules: Mapping[str, str] | None = None) -> None:
        self.rows: dict[int, Row] = {}
        self._next = 1
        self.modules: dict[str, str] = dict(modules or {})

    def fault_class(self, driver: str) -> FaultClass:
        return class_of_module(self.modules.get(driver))

    def add(self, driver: str, spec: dict[str, Any]) -> Row:
        """Check ``spec`` (``{"type": ..., knobs...}``) for this driver and add it; ValueError
        saying what is wrong."""
        kind = spec.get("type")
        fclass = self.fault_class(driver)
        if isinstance(kind, str) and (why := fclass.refusal(kind, OUTSIDE_TYPES)) is not None:
            raise ValueError(why)
        if kind in OUTSIDE_TYPES:
            extra = sorted(set(spec) - {"type"})
            if extra:
                raise ValueError(
                    f"fault type {kind} is carried out from outside the driver "
                    f"(a signal); it takes no arguments, got {', '.join(extra)}"
                )
            wire: dict[str, Any] = {"type": kind}
        elif kind in IN_DRIVER_TYPES:
            wire = Fault.from_dict({**spec, "id": self._next}, fclass).to_dict()
            wire.pop("calls", None)
            wire.pop("fired", None)
        else:
            raise ValueError(f"unknown fault type {kind!r}; choose one of {', '.join(ALL_TYPES)}")
        row = Row(self._next, driver, wire)
        self.rows[row.id] = row
        self._next += 1
        return row

    def remove(self, fault_id: int) -> Row:
        row = self.rows.pop(fault_id, None)
        if row is None:
            known = ", ".join(str(i) for i in self.rows) or "none"
            raise KeyError(
                f"no fault with id {fault_id} (faults: {known}); see `isovisor fault list`"
            )
        return row

    def reset(self, driver: str | None = None) -> list[Row]:
        gone = [r for r in self.rows.values() if driver is None or r.driver == driver]
        for r in gone:
            del self.rows[r.id]
        return gone

    def for_driver(self, driver: str) -> list[Row]:
        return [r for r in self.rows.values() if r.driver == driver]

    def driver_specs(self, driver: str, pid: int | None = None) -> list[dict[str, Any]]:
        """What instance ``pid`` of the driver must have armed: the in-driver faults still
        armed that are unlimited (``times = -1``, e.g. a poison request, which must kill every
        instance) or not yet given to another instance; those are now bound to ``pid``."""
        out = []
        for r in self.for_driver(driver):
            if r.type not in IN_DRIVER_TYPES or not r.armed:
                continue
            if r.spec.get("times") != -1:
                if r.bound_pid is not None and r.bound_pid != pid:
                    continue
                if pid is not None:
                    r.bound_pid = pid
            out.append(dict(r.spec))
        return out

    def fired(self, driver: str, fault_id: int, pid: int | None) -> Row | None:
        """The driver reports that fault ``fault_id`` fired once."""
        row = self.rows.get(fault_id)
        if row is None or row.driver != driver:
            return None
        row.fired += 1
        if pid is not None and pid not in row.pids:
            row.pids.append(pid)
        if row.type not in IN_DRIVER_TYPES:
            return row
        times = row.spec.get("times", 1)
        if isinstance(times, int) and times > 0:
            row.spec["times"] = times - 1
        if row.spec.get("fail_nth"):
            row.spec["times"] = 0
        return row

    def pending_recovery_crash(self, driver: str) -> Row | None:
        return next(
            (r for r in self.for_driver(driver) if r.type == "recovery_crash" and r.armed), None
        )

    def list(self) -> list[dict[str, Any]]:
        return [r.view() for r in sorted(self.rows.values(), key=lambda r: r.id)]
