"""Typed configuration of a stack: ``supervisor.toml`` (domain configs: ``domains/config.py``).

Every loader rejects unknown keys and wrong types with a :class:`ConfigError` naming the file,
the key and what is allowed (``ipc/schema.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from devices.kvspec import parse_size
from domains.config import ACTIONS, DomainConfig, load_domain_config
from ipc.schema import (
    NAME_RE,
    NUMBER,
    ConfigError,
    Field,
    at_least,
    check_name,
    check_table,
    in_range,
    read_toml,
    show,
    typed,
)

# --- supervisor.toml -----------------------------------------------------------------------

_SUPERVISOR_FIELDS: Final = {
    "name": Field(str, "the stack's name, shown by the CLI and in logs", check_name),
    "run_dir": Field(str, "directory for sockets, logs and the pid file"),
}
KERNEL_FIELDS: Final = {
    # pcpus: no default here; KernelConfig takes min(2, the host's CPUs)
    "pcpus": Field(int, "physical CPU threads that run guests, 1..64", in_range(1, 64)),
    "timeslice_ms": Field(
        int, "scheduler time slice in ms, 1..1000", in_range(1, 1000), default=10
    ),
    "restore": Field(
        str,
        'how a restore fills guest RAM: "lazy" (the guest runs at once, the pager process '
        'fills its RAM behind it) or "eager" (every page read and checked first)',
        lambda v: None if v in ("lazy", "eager") else 'must be "lazy" or "eager"',
        default="lazy",
    ),
}
_DOMAINS_FIELDS: Final = {
    "start": Field(list, "domain config files to create at start-up, relative to this file"),
    "console": Field(
        str,
        "the console driver every domain's console goes to unless its config "
        "says otherwise (a [driver.<name>] running drivers.console); "
        '"kernel" or empty: the kernel\'s built-in console',
        lambda v: (
            None
            if v in ("", "kernel") or check_name(v) is None
            else 'must be a driver name or "kernel"'
        ),
    ),
}
_MIGRATION_FIELDS: Final = {
    "listen": Field(
        str,
        'where this stack accepts migrations, "tcp://HOST:PORT" (port 0: any free port); '
        "empty: it accepts none",
        lambda v: None if v == "" or v.startswith("tcp://") else "must be tcp://HOST:PORT or empty",
        default="",
    ),
    "keys": Field(str, "directory of this stack's key pair (`isovisor keys`)", default="keys"),
    "peers": Field(
        str,
        "file of the stacks this one trusts: NAME PUBLIC-KEY [tcp://HOST:PORT]",
        default="peers",
    ),
    "disks": Field(
        str,
        "directory for the disk images of guests migrated here with --with-disks "
        '(relative to this file); "": such migrations are refused',
        default="",
    ),
}
_TOP_FIELDS: Final = {
    "supervisor": Field(dict, "[supervisor] table"),
    "kernel": Field(dict, "[kernel] table"),
    "migration": Field(dict, "[migration] table: live migration between stacks"),
    "driver": Field(dict, "[driver.<name>] tables: driver backends"),
    "domains": Field(dict, "[domains] table"),
}
ISOLATIONS: Final = ("process", "process-unjailed", "inline")
#: ``[driver.<name>] device_class``: the names of devices/'s classes.
DEVICE_CLASS_NAMES: Final = ("vbd", "vif", "console", "rng")
RESTART_POLICIES: Final = ("permanent", "transient", "temporary")
STRATEGIES: Final = ("one_for_one", "rest_for_one", "one_for_all")
#: Levels of a driver process's log (``log_level``; ``isovisor driver swap --log-level``).
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
#: Smallest max_rss accepted: a driver process alone is larger (Python, ZeroMQ, the backend).
MIN_MAX_RSS: Final = 16 << 20


def _watchdog(v: float) -> str | None:
    return None if v == 0 or v >= 0.1 else "must be 0 (off) or at least 0.1"


def _max_cpu(v: float) -> str | None:
    return None if 0 < v <= 100 else "must be more than 0 and at most 100"


def _max_rss(v: str) -> str | None:
    size = parse_size(v)
    if size is None:
        return (
            "is not a size: give a number with an optional K, M, G or T suffix (binary "
            'units), e.g. "512M"'
        )
    if size < MIN_MAX_RSS:
        return (
            "is below 16M: a driver process alone uses more, so it would be replaced over "
            'and over; raise it (e.g. "256M") or remove the key'
        )
    return None


#: The keys of ``[driver.<name>]``, with their defaults (:class:`DriverConfig` takes them from
#: here).  A campaign plan's ``[stack]`` takes its driver keys from here too, with defaults of
#: its own (``isovisor/campaign/plan.py``).
DRIVER_FIELDS: Final = {
    "module": Field(str, "Python module of the backend, e.g. drivers.blk"),
    "isolation": Field(
        str,
        "how the driver runs: process (its own OS process, jailed: "
        "docs/jail.md), process-unjailed (its own OS process with the supervisor's "
        "identity and privileges) or inline (a thread of the kernel process, for comparison)",
        choices=ISOLATIONS,
        what="an isolation",
        default="process",
    ),
    "options": Field(dict, "backend options, passed to the driver"),
    "restart": Field(
        str,
        "when a failed driver is restarted: permanent (always), transient "
        "(only after an abnormal exit) or temporary (never)",
        choices=RESTART_POLICIES,
        what="a restart policy",
        default="permanent",
    ),
    "intensity": Field(
        int,
        "restarts allowed within 'period' seconds before the driver becomes FATAL, 0..1000000",
        in_range(0, 1_000_000),
        default=10,
    ),
    "period": Field(
        NUMBER, "the window in seconds for 'intensity'", at_least(0, exclusive=True), default=30.0
    ),
    "backoff": Field(
        NUMBER,
        "seconds before the 2nd restart in a row without a stable run, "
        "doubling for each further one; 0 = start at 0.05 s",
        at_least(0),
        default=0.0,
    ),
    "backoff_max": Field(
        NUMBER, "the longest delay before a restart, in seconds", at_least(0), default=5.0
    ),
    "start_secs": Field(
        NUMBER,
        "seconds a driver must stay up after its hello to count as started",
        at_least(0),
        default=1.0,
    ),
    "start_timeout": Field(
        NUMBER,
        "seconds a started driver may take to say hello (its "
        "handshake) before it is killed, at least 1",
        at_least(1),
        default=20.0,
    ),
    "watchdog_sec": Field(NUMBER, "heartbeat deadline in seconds, 0 = off", _watchdog, default=2.0),
    "request_timeout_sec": Field(
        NUMBER,
        "seconds a request may stay outstanding before the driver counts as hung, at least 0.1",
        at_least(0.1),
        default=10.0,
    ),
    "max_rss": Field(
        str, 'RSS limit: a size with a K, M, G or T suffix, at least 16M, e.g. "512M"', _max_rss
    ),
    "max_fds": Field(
        int,
        "open file descriptors allowed (checked with psutil), 16..1048576",
        in_range(16, 1_048_576),
    ),
    "max_cpu": Field(
        NUMBER,
        "CPU limit in percent of one CPU, averaged over 5 s, more than 0 and at most 100",
        _max_cpu,
    ),
    "graceful_timeout": Field(
        NUMBER, "seconds from SIGTERM to SIGKILL when stopping", at_least(0), default=5.0
    ),
    "spare": Field(bool, "keep a warm spare process ready", default=True),
    "group": Field(
        str, "restart group: drivers that share it restart together per 'strategy'", check_name
    ),
    "strategy": Field(
        str,
        "which drivers of the group restart when one fails",
        choices=STRATEGIES,
        what="a restart strategy",
        default="one_for_one",
    ),
    "log_level": Field(
        str,
        "the level of the driver's log, driver-<name>.log in the run directory",
        choices=LOG_LEVELS,
        what="a log level",
        default="info",
    ),
    "debug": Field(
        bool,
        "debug mode: no hang checks (heartbeat watchdog, request timeout, stopped "
        "process), and breakpoint() opens pdb on a socket in the run directory",
        default=False,
    ),
    "device_class": Field(
        str,
        "the device class a backend file or a module of another package serves, so that its "
        "jail is fitted to it (docs/jail.md); without it such a driver runs unjailed",
        choices=DEVICE_CLASS_NAMES,
        what="a device class",
    ),
}
#: Keys that only mean something for a supervised (isolation = "process") driver.
SUPERVISION_KEYS: Final = tuple(
    k for k in DRIVER_FIELDS if k not in ("module", "isolation", "options", "device_class")
)
_DRIVER_DEFAULTS: Final = {k: f.default for k, f in DRIVER_FIELDS.items()}
_MODULE_RE: Final = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    r"(:[A-Za-z_][A-Za-z0-9_]*)?$"
)
_CLASS_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class DriverConfig:
    """One ``[driver.<name>]`` table: a backend the supervisor starts before any domain.

    The supervision keys are documented in docs/recovery.md and docs/configuration.md; the
    defaults are :data:`DRIVER_FIELDS`'.
    """

    name: str
    module: str
    isolation: str = _DRIVER_DEFAULTS["isolation"]
    options: dict[str, Any] = field(default_factory=dict)
    restart: str = _DRIVER_DEFAULTS["restart"]
    intensity: int = _DRIVER_DEFAULTS["intensity"]
    period: float = _DRIVER_DEFAULTS["period"]
    backoff: float = _DRIVER_DEFAULTS["backoff"]
    backoff_max: float = _DRIVER_DEFAULTS["backoff_max"]
    start_secs: float = _DRIVER_DEFAULTS["start_secs"]
    start_timeout: float = _DRIVER_DEFAULTS["start_timeout"]
    watchdog_sec: float = _DRIVER_DEFAULTS["watchdog_sec"]
    request_timeout_sec: float = _DRIVER_DEFAULTS["request_timeout_sec"]
    max_rss: int | None = None  # bytes (the key is a size: "512M")
    max_fds: int | None = _DRIVER_DEFAULTS["max_fds"]
    max_cpu: float | None = _DRIVER_DEFAULTS["max_cpu"]  # percent of one CPU
    graceful_timeout: float = _DRIVER_DEFAULTS["graceful_timeout"]
    spare: bool = _DRIVER_DEFAULTS["spare"]
    group: str | None = _DRIVER_DEFAULTS["group"]
    strategy: str = _DRIVER_DEFAULTS["strategy"]
    log_level: str = _DRIVER_DEFAULTS["log_level"]
    #: Debug mode (docs/configuration.md#debugging-a-driver): no hang checks, pdb on a socket.
    debug: bool = _DRIVER_DEFAULTS["debug"]
    device_class: str | None = None
    #: The module the driver was configured with, once a hot swap has changed ``module`` ("":
    #: ``module`` is it).  Its device class decides what the driver's jail holds.
    origin: str = ""

    @property
    def class_module(self) -> str:
        """The module whose device class the driver serves (a hot swap does not change it)."""
        return self.origin or self.module

    @property
    def supervised(self) -> bool:
        """Inline drivers run inside the kernel: they cannot be restarted on their own."""
        return self.isolation != "inline"

    @property
    def jailed(self) -> bool:
        """Its process enters a jail before it imports the backend (drivers/jail.py)."""
        return self.isolation == "process"


@dataclass(frozen=True)
class KernelConfig:
    pcpus: int = field(default_factory=lambda: max(1, min(2, os.cpu_count() or 1)))
    timeslice_ms: int = KERNEL_FIELDS["timeslice_ms"].default
    restore: str = KERNEL_FIELDS["restore"].default


@dataclass(frozen=True)
class MigrationConfig:
    """``[migration]``: paths absolute (relative ones are from supervisor.toml's directory)."""

    listen: str = ""
    keys: str = ""
    peers: str = ""
    disks: str = ""


@dataclass(frozen=True)
class StackConfig:
    """The whole stack, as ``supervisor.toml`` describes it."""

    name: str = "default"
    run_dir: str = ""
    kernel: KernelConfig = field(default_factory=KernelConfig)
    drivers: tuple[DriverConfig, ...] = ()
    domains: tuple[str, ...] = ()  # absolute paths of domain config files
    #: The console driver for domains whose config leaves ``console`` empty ("" = the kernel's).
    console: str = ""
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    source: str = ""


def load_stack_config(path: str | Path) -> StackConfig:
    path = Path(path)
    data = read_toml(path)
    where = str(path)
    check_table(where, data, _TOP_FIELDS)
    sup = data.get("supervisor", {})
    check_table(f"{where} [supervisor]", sup, _SUPERVISOR_FIELDS)
    kern = data.get("kernel", {})
    check_table(f"{where} [kernel]", kern, KERNEL_FIELDS)
    doms = data.get("domains", {})
    check_table(f"{where} [domains]", doms, _DOMAINS_FIELDS)
    mig = data.get("migration", {})
    check_table(f"{where} [migration]", mig, _MIGRATION_FIELDS)
    start: list[str] = []
    for i, item in enumerate(doms.get("start", [])):
        if not isinstance(item, str):
            raise ConfigError(
                f"{where} [domains]: start[{i}] = {show(item)} must be a string "
                "(the path of a domain config)"
            )
        p = (path.parent / item).resolve()
        if not p.is_file():
            raise ConfigError(f"{where} [domains]: start[{i}] = {show(item)}: no such file {p}")
        start.append(str(p))
    run_dir = sup.get("run_dir", "")
    if run_dir:
        run_dir = str((path.parent / run_dir).resolve())
    drivers = _drivers(data, where, path.parent)
    console = doms.get("console", "")
    if console not in ("", "kernel") and console not in {d.name for d in drivers}:
        raise ConfigError(
            f"{where} [domains]: console = {show(console)} names no driver; "
            f'declare [driver.{console}] with module = "drivers.console", or use '
            '"kernel" for the kernel\'s built-in console'
        )
    return StackConfig(
        name=sup.get("name", "default"),
        run_dir=run_dir,
        kernel=KernelConfig(**kern),
        drivers=drivers,
        domains=tuple(start),
        console="" if console == "kernel" else console,
        migration=MigrationConfig(
            listen=mig.get("listen", ""),
            keys=str((path.parent / mig.get("keys", "keys")).resolve()),
            peers=str((path.parent / mig.get("peers", "peers")).resolve()),
            disks=str((path.parent / mig["disks"]).resolve()) if mig.get("disks") else "",
        ),
        source=str(path.resolve()),
    )


def _drivers(data: dict[str, Any], where: str, base: Path) -> tuple[DriverConfig, ...]:
    out = []
    for name, table in data.get("driver", {}).items():
        here = f"{where} [driver.{name}]"
        if (msg := check_name(name)) is not None:
            raise ConfigError(f"{here}: the driver name {msg}")
        if not isinstance(table, dict):
            raise ConfigError(f'{here}: must be a table with module = "..."')
        check_table(here, table, DRIVER_FIELDS, required=("module",))
        try:
            table = {**table, "module": backend_spec(table["module"], base)}
        except ValueError as e:
            raise ConfigError(f"{here}: module = {show(table['module'])}: {e}") from None
        out.append(_driver(name, table, here))
    _check_groups(out, where)
    return tuple(out)


def backend_spec(text: str, base: Path | None) -> str:
    """A backend as the driver host takes it: ``package.module[:Class]``, or a backend file
    ``*.py[:Class]`` made absolute (relative to ``base``; None: it must be absolute already).
    ValueError says what is wrong."""
    t = text.strip()
    file_part, sep, cls = t.partition(".py:")
    if sep or t.endswith(".py") or "/" in t:
        p = Path(file_part + ".py" if sep else t)
        if not p.is_absolute():
            if base is None:
                raise ValueError(f"the backend file {t!r} must be an absolute path")
            p = base / p
        p = p.resolve()
        if p.suffix != ".py":
            raise ValueError(f"{p} is not a Python file (*.py)")
        if not p.is_file():
            raise ValueError(f"the backend file {p} does not exist")
        if sep and not _CLASS_RE.match(cls):
            raise ValueError(f"{cls!r} is not a class name")
        return f"{p}:{cls}" if sep else str(p)
    if not _MODULE_RE.match(t):
        raise ValueError(
            f"{t!r} is neither a module (package.module[:Class], e.g. drivers.blk "
            "or drivers.blk.ram:RamBackend) nor a backend file "
            "(path/to/backend.py[:Class])"
        )
    return t


def _driver(name: str, table: dict[str, Any], here: str) -> DriverConfig:
    vals = typed(table, DRIVER_FIELDS)
    if vals.get("isolation") == "inline":
        extra = [k for k in SUPERVISION_KEYS if k in vals]
        if extra:
            them = "them" if len(extra) > 1 else "it"
            raise ConfigError(
                f"{here}: {', '.join(extra)} cannot be used with isolation = "
                '"inline": an inline driver runs inside the kernel process and '
                f'is not supervised; remove {them} or use isolation = "process"'
            )
    if "max_rss" in vals:
        vals["max_rss"] = parse_size(vals["max_rss"])  # DRIVER_FIELDS checked it
    backoff = vals.get("backoff", _DRIVER_DEFAULTS["backoff"])
    cap = vals.get("backoff_max", _DRIVER_DEFAULTS["backoff_max"])
    if cap < backoff:
        raise ConfigError(
            f"{here}: backoff_max = {cap:g} is less than backoff = {backoff:g}; "
            "backoff_max caps the delays that start at backoff: raise "
            "backoff_max or lower backoff"
        )
    if "strategy" in vals and "group" not in vals:
        raise ConfigError(
            f"{here}: strategy = {show(vals['strategy'])} needs a group (the "
            'drivers that restart together); add group = "<name>" or remove '
            "strategy"
        )
    return DriverConfig(name=name, **vals)


def _check_groups(drivers: list[DriverConfig], where: str) -> None:
    first: dict[str, DriverConfig] = {}
    for d in drivers:
        if d.group is None:
            continue
        if d.group in first and first[d.group].strategy != d.strategy:
            o = first[d.group]
            raise ConfigError(
                f"{where} [driver.{d.name}]: strategy = {show(d.strategy)} differs from "
                f"[driver.{o.name}] (strategy {show(o.strategy)}) in group {show(d.group)}: the "
                "drivers of a group must agree; give each of them the same strategy (default "
                "one_for_one)"
            )
        first.setdefault(d.group, d)


def default_run_dir() -> Path:
    env = os.environ.get("ISOVISOR_RUN_DIR")
    if env:
        return Path(env)
    return Path(f"/tmp/isovisor-{os.getuid()}") / "default"


__all__ = [
    "ACTIONS",
    "DRIVER_FIELDS",
    "ISOLATIONS",
    "KERNEL_FIELDS",
    "LOG_LEVELS",
    "MIN_MAX_RSS",
    "NAME_RE",
    "ConfigError",
    "DomainConfig",
    "DriverConfig",
    "KernelConfig",
    "StackConfig",
    "backend_spec",
    "default_run_dir",
    "load_domain_config",
    "load_stack_config",
]
