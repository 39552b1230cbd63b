"""Campaign plans: load and check a plan file, and draw its schedule of injections from a seed.

A plan is checked completely before anything starts.  Every :class:`PlanError` names the file,
the line, the table, the key, what was found and what is allowed, e.g.
``plan.toml:14: [[fault]] #2: type = "sigkil" is not a fault type; choose one of: ...``
(``#2`` counts array tables from 1, as a reader of the file does).  The keys are declared and
checked with ``ipc/schema.py``, as supervisor.toml's and domain configs' are; ``[stack]`` takes
its keys from supervisor.toml's (``isovisor/config.py``), so a bad value reads the same in both
files.  The schedule depends on the plan and the seed only: it uses ``random.Random(seed)``,
never the global generator or the clock.
See docs/campaigns.md for the file format and the fault types.

``[stack] module`` names the driver (``drivers.blk`` by default, ``drivers.net``,
``drivers.console``); its device class decides which workloads can run (each needs its own
class: ``isovisor.campaign.workloads``), which fault types apply, and what the ``op`` and
``vdev`` filters may name (each class's :class:`~drivers.faults.FaultClass`, declared in
``devices/``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import devices
from devices.kvspec import parse_size
from domains.config import EXTRA_MAX
from drivers.faults import FaultClass, fault_classes
from ipc.schema import (
    NUMBER,
    Field,
    at_least,
    at_most_bytes,
    check_name,
    did_you_mean,
    in_range,
    show,
    table_problem,
    typed,
)
from isovisor.campaign.workloads import CHECKERS
from isovisor.config import DRIVER_FIELDS, KERNEL_FIELDS
from isovisor.supervisor.faulttable import ALL_TYPES
from isovisor.supervisor.faulttable import OUTSIDE_TYPES as SUPERVISOR_TYPES

#: Every fault type, with what it does (the supervisor's and the drivers' own lists).
FAULT_TYPES: Final[dict[str, str]] = ALL_TYPES
#: Carried out by the supervisor / the runner (a signal), not by the driver's injection layer.
OUTSIDE_TYPES: Final = frozenset(SUPERVISOR_TYPES)
#: Knobs and filters that only mean something for a fault injected inside the driver.
FILTER_KEYS: Final = (
    "domain",
    "vdev",
    "op",
    "sector",
    "probability",
    "interval",
    "times",
    "fail_nth",
)
#: Arguments only the ``slow`` type takes.
SLOW_KEYS: Final = ("latency_ms", "jitter_ms")
OPS: Final = ("read", "write", "flush", "discard")
#: Upper bound on the injections of one campaign (keeps a typo like gap = 1e-9 harmless).
MAX_INJECTIONS: Final = 100_000
#: Smallest spacing between two planned injections when gap (and expected_gap) is 0.
MIN_SPACING_S: Final = 0.001
#: The seeded jitter of an injection's time is at most this share of the spacing (± half).
JITTER_SHARE: Final = 0.2
DEFAULT_MODULE: Final = "drivers.blk"


class PlanError(Exception):
    """A plan file is wrong; ``str()`` is ``file:line: table: what is wrong and what is allowed``.

    ``line`` is 0 when the error has no line (the file cannot be read).
    """

    def __init__(self, path: Path | str, line: int, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


# --- the keys ----------------------------------------------------------------------------------
# One declaration per key (ipc/schema.py's Field; the dataclasses below take their defaults from
# it).  [stack]'s keys and [campaign] isolation are supervisor.toml's ([kernel] pcpus,
# [driver.<name>] module, watchdog_sec, ...: isovisor/config.py), with the same type, help and
# check; only some defaults differ, on purpose (_STACK_KEYS).


def _times(v: int) -> str | None:
    return None if v == -1 or v >= 1 else "must be -1 (unlimited) or at least 1"


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _disk_size(v: str) -> str | None:
    size = parse_size(v)
    if size is None or size <= 0 or size % 512:
        return (
            "is not a size: give a positive multiple of 512 bytes with an optional K, M, G "
            'or T suffix, e.g. "8M"'
        )
    return None


_CAMPAIGN_KEYS: Final = {
    "name": Field(str, "free text, shown in the report"),
    "seed": Field(int, "the default seed; --seed overrides", at_least(0), default=1),
    "duration": Field(NUMBER, "seconds of injection", at_least(0, exclusive=True)),
    "faults": Field(
        int,
        f"stop after this many injections, at most {MAX_INJECTIONS}",
        in_range(1, MAX_INJECTIONS),
    ),
    "gap": Field(NUMBER, "seconds between two injections, at least", at_least(0), default=0.3),
    # (a campaign compares a driver in its own process with one inside the kernel; whether the
    # process is jailed is the stack's business: docs/jail.md)
    "isolation": dataclasses.replace(
        DRIVER_FIELDS["isolation"],
        help="how the driver runs: process (its own OS process) or inline (a thread of the "
        "kernel process, for comparison)",
        choices=("process", "inline"),
    ),
}


def _campaign_default(key: str, value: Any) -> Field:
    """A supervisor.toml key with the default a campaign's stack uses instead of the stack's."""
    base = KERNEL_FIELDS.get(key) or DRIVER_FIELDS[key]
    return dataclasses.replace(base, default=value)


#: A campaign's stack departs from a stack's defaults (DRIVER_FIELDS) on purpose, and only here:
#: watchdog_sec 0.5 s (a stack: 2 s) and request_timeout_sec 1 s (a stack: 10 s), so a hang is
#: found quickly and many more injections fit into a campaign; max_rss "256M" and max_fds 512 (a
#: stack: no limit), so the leak_mem and leak_fd faults are caught; pcpus 2 (a stack: 2, or 1 on
#: a one-CPU host).  docs/campaigns.md says so too, and a test holds the two to it.
_STACK_KEYS: Final = {
    "pcpus": _campaign_default("pcpus", 2),
    "driver": Field(str, "the driver the faults go to", check_name, default="blk0"),
    "module": dataclasses.replace(
        DRIVER_FIELDS["module"],
        choices=devices.modules(),
        what="a driver module campaigns know",
        default=DEFAULT_MODULE,
    ),
    "watchdog_sec": _campaign_default("watchdog_sec", 0.5),
    "request_timeout_sec": _campaign_default("request_timeout_sec", 1.0),
    "max_rss": _campaign_default("max_rss", "256M"),
    "max_fds": _campaign_default("max_fds", 512),
}
_WORKLOAD_KEYS: Final = {
    "image": Field(
        str, 'a guest program with end-to-end verification, e.g. "blkstress"', _nonempty
    ),
    "domains": Field(int, "how many guests run it", in_range(1, 16), default=1),
    "extra": Field(str, "parameters passed to each guest", at_most_bytes(EXTRA_MAX), default=""),
    "disk_size": Field(str, 'each guest\'s disk, e.g. "8M"', _disk_size, default="8M"),
}
_FAULT_KEYS: Final = {
    "type": Field(str, "what to inject", choices=tuple(FAULT_TYPES), what="a fault type"),
    "weight": Field(
        NUMBER, "relative share of the injections", at_least(0, exclusive=True), default=1.0
    ),
    "count": Field(int, "exactly this many injections of this fault", in_range(1, MAX_INJECTIONS)),
    "probability": Field(
        NUMBER,
        "percent: the chance that an eligible request fails",
        in_range(0, 100),
        default=100.0,
    ),
    "interval": Field(
        int, "only every interval-th eligible request is considered", at_least(1), default=1
    ),
    "times": Field(int, "how many times the fault fires before it disarms", _times, default=1),
    "fail_nth": Field(
        int, "fire on exactly the n-th eligible request, 0 = off", at_least(0), default=0
    ),
    "domain": Field(str, "only requests of this domain", check_name),
    "vdev": Field(str, "only requests to this device", _nonempty),
    "op": Field(str, "only requests of this operation", _nonempty),
    "sector": Field(int, "only requests covering this sector", at_least(0)),
    "latency_ms": Field(NUMBER, "delay of a slow response in ms", at_least(0), default=0.0),
    "jitter_ms": Field(NUMBER, "± random part of the delay in ms", at_least(0), default=0.0),
}
_TOP_KEYS: Final = ("campaign", "stack", "workload", "fault")
_ARRAYS: Final = ("workload", "fault")


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultEntry:
    """One ``[[fault]]`` table; ``index`` is its place in :attr:`Plan.faults` (from 0)."""

    index: int
    type: str
    weight: float = _FAULT_KEYS["weight"].default
    count: int | None = _FAULT_KEYS["count"].default
    probability: float = _FAULT_KEYS["probability"].default
    interval: int = _FAULT_KEYS["interval"].default
    times: int = _FAULT_KEYS["times"].default
    fail_nth: int = _FAULT_KEYS["fail_nth"].default
    domain: str | None = _FAULT_KEYS["domain"].default
    vdev: str | None = _FAULT_KEYS["vdev"].default
    op: str | None = _FAULT_KEYS["op"].default
    sector: int | None = _FAULT_KEYS["sector"].default
    latency_ms: float = _FAULT_KEYS["latency_ms"].default
    jitter_ms: float = _FAULT_KEYS["jitter_ms"].default
    line: int = 0  # the [[fault]] header line

    @property
    def outside(self) -> bool:
        """True if the supervisor / runner carries it out (a signal), not the driver."""
        return self.type in OUTSIDE_TYPES

    def args(self) -> dict[str, Any]:
        """The knobs, filters and arguments that differ from their defaults (for the driver)."""
        out: dict[str, Any] = {}
        for key in (*FILTER_KEYS, *SLOW_KEYS):
            val = getattr(self, key)
            if val != getattr(_DEFAULT_ENTRY, key):
                out[key] = val
        return out


_DEFAULT_ENTRY: Final = FaultEntry(index=0, type="sigkill")


@dataclass(frozen=True)
class Workload:
    """One ``[[workload]]`` table: ``domains`` guests running ``image``."""

    image: str
    domains: int = _WORKLOAD_KEYS["domains"].default
    extra: str = _WORKLOAD_KEYS["extra"].default
    disk_size: str = _WORKLOAD_KEYS["disk_size"].default
    line: int = 0  # the [[workload]] header line

    @property
    def disk_bytes(self) -> int:
        return parse_size(self.disk_size) or 0


@dataclass(frozen=True)
class StackSpec:
    """The optional ``[stack]`` table: the private stack a campaign starts."""

    pcpus: int = _STACK_KEYS["pcpus"].default
    driver: str = _STACK_KEYS["driver"].default
    module: str = _STACK_KEYS["module"].default
    watchdog_sec: float = _STACK_KEYS["watchdog_sec"].default
    request_timeout_sec: float = _STACK_KEYS["request_timeout_sec"].default
    max_rss: str = _STACK_KEYS["max_rss"].default
    max_fds: int = _STACK_KEYS["max_fds"].default

    @property
    def max_rss_bytes(self) -> int:
        return parse_size(self.max_rss) or 0

    @property
    def fault_class(self) -> FaultClass:
        return _class_of(self.module)


@dataclass(frozen=True)
class Plan:
    """A checked plan file.  Exactly one of ``duration`` and ``faults_total`` is set."""

    path: Path
    name: str
    seed: int = _CAMPAIGN_KEYS["seed"].default
    duration: float | None = None  # seconds of injection
    faults_total: int | None = None  # or: this many injections ([campaign] faults)
    gap: float = _CAMPAIGN_KEYS["gap"].default  # seconds between two injections, at least
    isolation: str = _CAMPAIGN_KEYS["isolation"].default
    stack: StackSpec = field(default_factory=StackSpec)
    workloads: tuple[Workload, ...] = ()
    faults: tuple[FaultEntry, ...] = ()


# --- line numbers --------------------------------------------------------------------------------

_HEADER_RE: Final = re.compile(r"^\s*(\[\[?)\s*([^\[\]#]*?)\s*\]\]?\s*(?:#.*)?$")
_KEY_RE: Final = re.compile(r"^\s*(?:\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+))\s*=")


def _scan(text: str, depth: int, quote: str | None) -> tuple[int, str | None]:
    """Bracket depth and open multi-line string after ``text`` (strings and comments skipped)."""
    i, n = 0, len(text)
    while i < n:
        if quote is not None:
            j = text.find(quote, i)
            if j < 0:
                return depth, quote
            i, quote = j + 3, None
            continue
        c = text[i]
        if c == "#":
            break
        if text.startswith(('"""', "'''"), i):
            quote, i = text[i : i + 3], i + 3
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif c == "'":
            j = text.find("'", i + 1)
            i = n if j < 0 else j + 1
        else:
            depth += (c in "[{") - (c in "]}")
            i += 1
    return depth, quote


@dataclass
class _Section:
    header: int  # line of the header (1 for the top level)
    keys: dict[str, int] = field(default_factory=dict)


class _Lines:
    """Where each table header and each key is in the raw text (tomllib gives no lines).

    Sections are keyed by (table name, n): n counts the ``[[name]]`` headers from 0 (and is 0
    for ``[name]``); the top level is ("", 0).  Only keys outside values are recorded, so a
    ``[1, 2]`` line inside a multi-line array is not taken for a header.
    """

    def __init__(self, text: str) -> None:
        self.sections: dict[tuple[str, int], _Section] = {("", 0): _Section(1)}
        seen: dict[str, int] = {}
        current = self.sections[("", 0)]
        depth, quote = 0, None
        for number, line in enumerate(text.split("\n"), 1):
            if depth > 0 or quote is not None:
                depth, quote = _scan(line, depth, quote)
                continue
            if m := _HEADER_RE.match(line):
                name = m.group(2).strip().strip("\"'")
                n = seen.get(name, -1) + 1 if m.group(1) == "[[" else 0
                seen[name] = n
                current = self.sections.setdefault((name, n), _Section(number))
                continue
            if k := _KEY_RE.match(line):
                key = next(g for g in k.groups() if g is not None)
                current.keys.setdefault(key, number)
                depth, quote = _scan(line[k.end() :], 0, None)

    def line_of(self, table: str, index: int = 0, key: str | None = None) -> int:
        """The key's line; the table's header if the key is absent; else the best guess."""
        section = self.sections.get((table, index))
        if section is None:  # e.g. an inline table: campaign = { ... }
            return self.sections[("", 0)].keys.get(table, 1)
        if key is not None and key in section.keys:
            return section.keys[key]
        return section.header


# --- loading -----------------------------------------------------------------------------------


def load_plan(path: Path | str) -> Plan:
    """Read and check a plan file; raises :class:`PlanError` at the first mistake."""
    return _Loader(Path(path)).load()


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = _Lines("")

    def error(self, table: str, index: int, key: str | None, message: str) -> PlanError:
        line = self.lines.line_of(table, index, key)
        return PlanError(self.path, line, f"{_label(table, index)}: {message}")

    def load(self) -> Plan:
        data = self.read()
        for top in data:
            if top not in _TOP_KEYS:
                kind = "table" if (top, 0) in self.lines.sections else "key"
                line = self.lines.line_of(top)
                allowed = "[campaign], [stack], [[workload]], [[fault]]"
                raise PlanError(
                    self.path,
                    line,
                    f'unknown {kind} "{top}"{did_you_mean(top, _TOP_KEYS)}; allowed: {allowed}',
                )
        camp = self.table(data, "campaign", required=True)
        stack = self.table(data, "stack", required=False)
        workloads = self.array(data, "workload", 'image = "blkstress"')
        faults = self.array(data, "fault", 'type = "sigkill"')

        self.check("campaign", 0, camp, _CAMPAIGN_KEYS)
        self.check("stack", 0, stack, _STACK_KEYS)
        module = stack.get("module", _STACK_KEYS["module"].default)
        for i, w in enumerate(workloads):
            self.check("workload", i, w, _WORKLOAD_KEYS, required=("image",))
            self.check_workload(i, w, module)
        for i, f in enumerate(faults):
            self.check("fault", i, f, _FAULT_KEYS, required=("type",))
            self.check_fault(i, f, module)

        entries = tuple(self.entry(i, f) for i, f in enumerate(faults))
        head = typed(camp, _CAMPAIGN_KEYS)
        head.setdefault("name", self.path.stem)
        if "faults" in head:
            head["faults_total"] = head.pop("faults")
        plan = Plan(
            path=self.path,
            **head,
            stack=StackSpec(**typed(stack, _STACK_KEYS)),
            workloads=tuple(
                Workload(**w, line=self.lines.line_of("workload", i))
                for i, w in enumerate(workloads)
            ),
            faults=entries,
        )
        self.check_campaign(camp, plan)
        return plan

    def read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise PlanError(self.path, 0, "file not found") from None
        except IsADirectoryError:
            raise PlanError(self.path, 0, "is a directory, expected a plan file (TOML)") from None
        except OSError as e:
            raise PlanError(self.path, 0, f"cannot read: {e.strerror}") from None
        try:
            text = raw.decode()
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise PlanError(self.path, line, "invalid TOML: the file is not UTF-8") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PlanError(self.path, *_toml_error(str(e), text)) from None
        self.lines = _Lines(text)
        return data

    def table(self, data: dict[str, Any], name: str, *, required: bool) -> dict[str, Any]:
        if name not in data:
            if required:
                raise PlanError(
                    self.path,
                    1,
                    f"missing the [{name}] table: a plan needs "
                    "[campaign] with duration = SECONDS or faults = N",
                )
            return {}
        val = data[name]
        if isinstance(val, list):
            raise PlanError(
                self.path,
                self.lines.line_of(name),
                f"[[{name}]] must be a single table: write [{name}], not [[{name}]]",
            )
        if not isinstance(val, dict):
            raise PlanError(
                self.path,
                self.lines.line_of("", 0, name),
                f"{name} = {show(val)} must be a table: write [{name}] and its keys below it",
            )
        return val

    def array(self, data: dict[str, Any], name: str, example: str) -> list[dict[str, Any]]:
        val = data.get(name)
        what = {"workload": "workload guests", "fault": "faults to inject"}[name]
        if val is None or val == []:
            raise PlanError(
                self.path,
                1,
                f"no [[{name}]] table: a campaign needs at least one, "
                f"e.g. [[{name}]] {example} ({what})",
            )
        if isinstance(val, dict):
            raise PlanError(
                self.path,
                self.lines.line_of(name),
                f"[{name}] must be an array of tables: write [[{name}]], one per entry",
            )
        if not isinstance(val, list) or not all(isinstance(x, dict) for x in val):
            raise PlanError(
                self.path,
                self.lines.line_of("", 0, name),
                f"{name} = {show(val)} must be [[{name}]] tables",
            )
        return val

    def check(
        self,
        table: str,
        index: int,
        data: dict[str, Any],
        keys: dict[str, Field],
        required: tuple[str, ...] = (),
    ) -> None:
        """The table's first mistake, as ipc/schema.py words it, at its line."""
        if (problem := table_problem(data, keys, required)) is not None:
            key, message = problem
            raise self.error(table, index, key, message)

    def check_workload(self, i: int, w: dict[str, Any], module: str) -> None:
        """The workload's program exists and suits the stack's driver."""
        image = w["image"]
        checker = CHECKERS.get(image)
        if checker is None:
            raise self.error(
                "workload",
                i,
                "image",
                f"image = {show(image)} is not a "
                f"campaign workload; choose one of: {', '.join(_images())}"
                f"{did_you_mean(image, tuple(CHECKERS))}",
            )
        fclass = _class_of(module)
        if checker.device_class != fclass.name:
            need = fault_classes()[checker.device_class]
            modules = " or ".join(f'"{m}"' for m in devices.by_name(need.name).modules)
            fits = ", ".join(c.image for c in CHECKERS.values() if c.device_class == fclass.name)
            raise self.error(
                "workload",
                i,
                "image",
                f"image = {show(image)} needs a "
                f"{need.driver} driver ([stack] module = {modules}), but the "
                f"stack's driver is {show(module)}, a {fclass.driver} driver; its "
                f"workloads: {fits}",
            )
        if "disk_size" in w and image != "blkstress":
            raise self.error(
                "workload",
                i,
                "disk_size",
                f"disk_size = {show(w['disk_size'])} "
                f'only applies to image = "blkstress" (a disk for each guest), '
                f"not {show(image)}; remove disk_size",
            )
        members = len(checker.members)
        domains = w.get("domains", 1)
        if domains % members:
            raise self.error(
                "workload",
                i,
                "domains",
                f"domains = {domains}: {image} guests "
                f"run in groups of {members} (each sends to the other); give a "
                f"multiple of {members}",
            )

    def check_fault(self, i: int, f: dict[str, Any], module: str) -> None:
        kind = f["type"]
        fclass = _class_of(module)
        if kind in fclass.refused:
            raise self.error(
                "fault",
                i,
                "type",
                f'type = "{kind}" does not apply to a '
                f"{fclass.driver} driver ([stack] module = {show(module)}): "
                f"{fclass.refused[kind]}; a {fclass.driver} driver takes: "
                f"{', '.join([*SUPERVISOR_TYPES, *fclass.types])}",
            )
        if "op" in f and f["op"] not in fclass.ops:
            raise self.error(
                "fault",
                i,
                "op",
                f"op = {show(f['op'])} is not an operation; "
                f"choose one of: {', '.join(fclass.ops)}"
                f"{did_you_mean(f['op'], fclass.ops)} (the operations of "
                f"{fclass.request})",
            )
        dclass = devices.by_name(fclass.name)
        if "vdev" in f and not dclass.vdev_re.match(f["vdev"]):
            raise self.error(
                "fault",
                i,
                "vdev",
                f"vdev = {show(f['vdev'])} is not a device "
                f"name: {dclass.vdev_hint} (the devices of a {fclass.driver} "
                "driver)",
            )
        if kind in OUTSIDE_TYPES:
            for key in FILTER_KEYS:
                if key in f:
                    raise self.error(
                        "fault",
                        i,
                        key,
                        f"{key} = {show(f[key])} cannot be used "
                        f'with type = "{kind}": it is carried out from outside '
                        "the driver (a signal), not in a request, so the knobs "
                        f"and filters {', '.join(FILTER_KEYS)} do not apply; "
                        f"remove {key}",
                    )
        if kind != "slow":
            for key in SLOW_KEYS:
                if key in f:
                    raise self.error(
                        "fault",
                        i,
                        key,
                        f"{key} = {show(f[key])} only applies "
                        f'to type = "slow", not "{kind}"; remove {key}',
                    )
        if kind == "poison" and "sector" not in f:
            raise self.error(
                "fault",
                i,
                None,
                'type = "poison" needs sector = N (the '
                f"sector whose requests kill the driver; for a {fclass.driver} "
                f"driver, {fclass.position})",
            )

    def entry(self, i: int, f: dict[str, Any]) -> FaultEntry:
        vals = typed(f, _FAULT_KEYS)
        return FaultEntry(index=i, **vals, line=self.lines.line_of("fault", i))

    def check_campaign(self, camp: dict[str, Any], plan: Plan) -> None:
        if "duration" in camp and "faults" in camp:
            raise self.error(
                "campaign", 0, "faults", "give either duration = SECONDS or faults = N, not both"
            )
        if "duration" not in camp and "faults" not in camp:
            raise self.error(
                "campaign",
                0,
                None,
                "missing duration = SECONDS (seconds of "
                "injection) or faults = N (stop after N injections)",
            )
        counted = sum(e.count for e in plan.faults if e.count is not None)
        all_counted = all(e.count is not None for e in plan.faults)
        if counted > MAX_INJECTIONS:
            raise self.error(
                "campaign",
                0,
                None,
                f"the [[fault]] counts add up to {counted} "
                f"injections; at most {MAX_INJECTIONS} are allowed",
            )
        if plan.faults_total is not None:
            total = plan.faults_total
            if total < counted:
                raise self.error(
                    "campaign",
                    0,
                    "faults",
                    f"faults = {total} is less than the "
                    f"[[fault]] counts, which add up to {counted}; raise faults "
                    "or lower the counts",
                )
            if all_counted and total != counted:
                raise self.error(
                    "campaign",
                    0,
                    "faults",
                    f"faults = {total} but every "
                    f"[[fault]] has a count and they add up to {counted}; remove "
                    "faults (or make it equal), or leave count out of an entry so "
                    "it takes the remaining injections by weight",
                )
            return
        assert plan.duration is not None
        if plan.gap == 0:
            raise self.error(
                "campaign",
                0,
                "gap",
                "gap = 0 cannot be used with duration: the "
                "gap decides how many injections fit into it; give gap > 0 or "
                "use faults = N instead of duration",
            )
        fit = _fit(plan.duration, plan.gap)
        if fit > MAX_INJECTIONS:
            raise self.error(
                "campaign",
                0,
                "gap",
                f"gap = {plan.gap:g} fits {fit} injections "
                f"into duration = {plan.duration:g}; at most {MAX_INJECTIONS} "
                "are allowed: raise gap",
            )
        if counted > fit:
            raise self.error(
                "campaign",
                0,
                "duration",
                f"duration = {plan.duration:g} fits "
                f"only {fit} injections at gap = {plan.gap:g} s, but the [[fault]] "
                f"counts add up to {counted}; raise duration, lower gap or lower "
                "the counts",
            )


def _class_of(module: str) -> FaultClass:
    """The fault class of a module campaigns know (the plan's checks made sure it is one)."""
    cls = devices.of_module(module)
    assert cls is not None, module
    return fault_classes()[cls.name]


def _images() -> list[str]:
    """The workloads, each with the driver it needs."""
    return [f"{c.image} ({fault_classes()[c.device_class].driver})" for c in CHECKERS.values()]


def _label(table: str, index: int) -> str:
    if table == "":
        return "top level"
    return f"[[{table}]] #{index + 1}" if table in _ARRAYS else f"[{table}]"


def _toml_error(message: str, text: str) -> tuple[int, str]:
    """tomllib's "Invalid value (at line 5, column 8)" -> (5, "invalid TOML: ... (column 8)")."""
    if m := re.search(r"\s*\(at line (\d+), column (\d+)\)$", message):
        return int(m.group(1)), f"invalid TOML: {message[: m.start()]} (column {m.group(2)})"
    if m := re.search(r"\s*\(at end of document\)$", message):
        last = max(1, len(text.rstrip("\n").split("\n")))
        return last, f"invalid TOML: {message[: m.start()]} (at the end of the file)"
    return 1, f"invalid TOML: {message}"


def _fit(duration: float, step: float) -> int:
    """How many injections ``step`` seconds apart fit into ``duration`` (float-safe)."""
    return int(duration / step + 1e-9)


# --- the schedule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledFault:
    """One planned injection: plan entry ``fault`` at ``at_s`` seconds after injection starts."""

    seq: int  # from 1
    at_s: float
    fault: int  # index into Plan.faults
    type: str


def injection_count(plan: Plan, *, expected_gap: float | None = None) -> int:
    """How many injections :func:`schedule` plans (the same for every seed)."""
    counted = sum(e.count for e in plan.faults if e.count is not None)
    if all(e.count is not None for e in plan.faults):
        return counted
    if plan.faults_total is not None:
        return max(plan.faults_total, counted, 1)
    assert plan.duration is not None
    step = max(plan.gap, expected_gap or plan.gap)
    fit = _fit(plan.duration, step) if step > 0 else 1
    return max(fit, counted, 1)


def schedule(plan: Plan, seed: int, *, expected_gap: float | None = None) -> list[ScheduledFault]:
    """The injections of a run, drawn from ``seed`` only: the same (plan, seed), the same list.

    Entries with a ``count`` get exactly that many slots; the other slots are drawn by
    ``weight`` among the entries without one.  The slots are shuffled, then spaced evenly over
    the duration (or ``gap`` apart with ``faults``), each moved by a seeded jitter of at most
    ±10% of the spacing; ``at_s`` is strictly increasing (and, with a duration, inside it).
    ``expected_gap`` (seconds a recovery is expected to take) lowers the count for a duration.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if expected_gap is not None and not (expected_gap >= 0 and math.isfinite(expected_gap)):
        raise ValueError(f"expected_gap must be a number >= 0, got {expected_gap!r}")
    if not plan.faults:
        raise ValueError(f"{plan.path}: the plan has no [[fault]] entries")
    rng = random.Random(seed)
    total = injection_count(plan, expected_gap=expected_gap)
    slots = [e.index for e in plan.faults if e.count is not None for _ in range(e.count)]
    free = [e for e in plan.faults if e.count is None]
    if free and total > len(slots):
        slots += rng.choices(
            [e.index for e in free], weights=[e.weight for e in free], k=total - len(slots)
        )
    rng.shuffle(slots)
    if plan.faults_total is None and plan.duration is not None:
        spacing = plan.duration / len(slots)
        bases = [(i + 0.5) * spacing for i in range(len(slots))]
    else:
        spacing = max(plan.gap, expected_gap or 0.0, MIN_SPACING_S)
        bases = [(i + 1) * spacing for i in range(len(slots))]
    out: list[ScheduledFault] = []
    previous = 0.0
    for seq, (index, base) in enumerate(zip(slots, bases, strict=True), 1):
        at = round(base + (rng.random() - 0.5) * JITTER_SHARE * spacing, 6)
        at = max(at, round(previous + 1e-6, 6))  # only for absurdly small spacings
        previous = at
        out.append(ScheduledFault(seq=seq, at_s=at, fault=index, type=plan.faults[index].type))
    return out


def schedule_to_json(items: list[ScheduledFault]) -> list[dict[str, Any]]:
    """The schedule as ``journal.json`` records it."""
    return [asdict(s) for s in items]


def describe(plan: Plan) -> str:
    """One line for ``isovisor campaign validate``."""
    guests = sum(w.domains for w in plan.workloads)
    images = ", ".join(dict.fromkeys(w.image for w in plan.workloads))
    n = len(plan.faults)
    total = injection_count(plan)
    if plan.faults_total is not None:
        when = f"{total} injection{_s(total)} at least {plan.gap:g} s apart"
    else:
        about = "" if all(e.count is not None for e in plan.faults) else "~"
        when = f"{about}{total} injection{_s(total)} over {plan.duration:g} s"
    return (
        f"{plan.path}: OK — {guests} workload guest{_s(guests)} ({images}), {n} fault "
        f"entr{'y' if n == 1 else 'ies'}, {when}, seed {plan.seed}"
    )


def _s(n: int) -> str:
    return "" if n == 1 else "s"
