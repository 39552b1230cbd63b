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
    ConfigError,
    Field,
    at_least,
    check_name,
    check_table,
    in_range,
    one_of,
    read_toml,
)

# --- supervisor.toml -----------------------------------------------------------------------

_SUPERVISOR_FIELDS: Final = {
    "name": Field(str, "the stack's name, shown by the CLI and in logs", check_name),
    "run_dir": Field(str, "directory for sockets, logs and the pid file"),
}
_KERNEL_FIELDS: Final = {
    "pcpus": Field(int, "physical CPU threads that run guests, 1..64", in_range(1, 64)),
    "timeslice_ms": Field(int, "scheduler time slice in ms, 1..1000", in_range(1, 1000)),
}
_DOMAINS_FIELDS: Final = {
    "start": Field(list, "domain config files to create at start-up, relative to this file"),
    "console": Field(str, "the console driver every domain's console goes to unless its config "
                           "says otherwise (a [driver.<name>] running drivers.console); "
                           "\"kernel\" or empty: the kernel's built-in console",
                      lambda v: None if v in ("", "kernel") or check_name(v) is None
                      else "must be a driver name or \"kernel\""),
}
_TOP_FIELDS: Final = {
    "supervisor": Field(dict, "[supervisor] table"),
    "kernel": Field(dict, "[kernel] table"),
    "driver": Field(dict, "[driver.<name>] tables: driver backends"),
    "domains": Field(dict, "[domains] table"),
}
ISOLATIONS: Final = ("process", "inline")
RESTART_POLICIES: Final = ("permanent", "transient", "temporary")
STRATEGIES: Final = ("one_for_one", "rest_for_one", "one_for_all")
_NUM: Final = (float, int)
#: Smallest max_rss accepted: a driver process alone is larger (Python, ZeroMQ, the backend).
MIN_MAX_RSS: Final = 16 << 20
_DRIVER_FIELDS: Final = {
    "module": Field(str, "Python module of the backend, e.g. drivers.blk"),
    "isolation": Field(str, "process (own OS process, the default) or inline (a thread of the "
                             "kernel process, for comparison)", one_of(ISOLATIONS)),
    "options": Field(dict, "backend options, passed to the driver"),
    "restart": Field(str, "when a failed driver is restarted: permanent (always), transient "
                           "(only after an abnormal exit) or temporary (never)",
                      one_of(RESTART_POLICIES)),
    "intensity": Field(int, "restarts allowed within 'period' seconds before the driver "
                             "becomes FATAL, 0..1000000", in_range(0, 1_000_000)),
    "period": Field(_NUM, "the window in seconds for 'intensity'", at_least(0, exclusive=True)),
    "backoff": Field(_NUM, "seconds before the 2nd restart in a row without a stable run, "
                            "doubling for each further one; 0 = start at 0.05 s", at_least(0)),
    "backoff_max": Field(_NUM, "the longest delay before a restart, in seconds",
                          at_least(0)),
    "start_secs": Field(_NUM, "seconds a driver must stay up after its hello to count as "
                               "started", at_least(0)),
    "start_timeout": Field(_NUM, "seconds a started driver may take to say hello (its "
                                  "handshake) before it is killed, at least 1", at_least(1)),
    "watchdog_sec": Field(_NUM, "heartbeat deadline in seconds, 0 = off",
                           lambda v: None if v == 0 or v >= 0.1
                           else "must be 0 (off) or at least 0.1"),
    "request_timeout_sec": Field(_NUM, "seconds a request may stay outstanding before the "
                                        "driver counts as hung, at least 0.1", at_least(0.1)),
    "max_rss": Field(str, 'RSS limit: a size with a K, M, G or T suffix, e.g. "512M"'),
    "max_fds": Field(int, "open file descriptors allowed (checked with psutil), 16..1048576",
                      in_range(16, 1_048_576)),
    "max_cpu": Field(_NUM, "CPU limit in percent of one CPU, averaged over 5 s, more than 0 "
                            "and at most 100", lambda v: None if 0 < v <= 100
                      else "must be more than 0 and at most 100"),
    "graceful_timeout": Field(_NUM, "seconds from SIGTERM to SIGKILL when stopping",
                               at_least(0)),
    "spare": Field(bool, "keep a warm spare process ready"),
    "group": Field(str, "restart group: drivers that share it restart together per "
                         "'strategy'", check_name),
    "strategy": Field(str, "which drivers of the group restart when one fails",
                       one_of(STRATEGIES)),
}
#: Keys that only mean something for a supervised (isolation = "process") driver.
SUPERVISION_KEYS: Final = tuple(k for k in _DRIVER_FIELDS
                                if k not in ("module", "isolation", "options"))
_MODULE_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                               r"(:[A-Za-z_][A-Za-z0-9_]*)?$")
_CLASS_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class DriverConfig:
    """One ``[driver.<name>]`` table: a backend the supervisor starts before any domain.

    The supervision keys are documented in docs/recovery.md and docs/configuration.md.
    """

    name: str
    module: str
    isolation: str = "process"
    options: dict[str, Any] = field(default_factory=dict)
    restart: str = "permanent"
    intensity: int = 10
    period: float = 30.0
    backoff: float = 0.0
    backoff_max: float = 5.0
    start_secs: float = 1.0
    start_timeout: float = 20.0
    watchdog_sec: float = 2.0
    request_timeout_sec: float = 10.0
    max_rss: int | None = None  # bytes
    max_fds: int | None = None
    max_cpu: float | None = None  # percent of one CPU
    graceful_timeout: float = 5.0
    spare: bool = True
    group: str | None = None
    strategy: str = "one_for_one"

    @property
    def supervised(self) -> bool:
        """Inline drivers run inside the kernel: they cannot be restarted on their own."""
        return self.isolation == "process"


@dataclass(frozen=True)
class KernelConfig:
    pcpus: int = field(default_factory=lambda: max(1, min(2, os.cpu_count() or 1)))
    timeslice_ms: int = 10


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
    source: str = ""


def load_stack_config(path: str | Path) -> StackConfig:
    path = Path(path)
    data = read_toml(path)
    where = str(path)
    check_table(where, data, _TOP_FIELDS)
    sup = data.get("supervisor", {})
    check_table(f"{where} [supervisor]", sup, _SUPERVISOR_FIELDS)
    kern = data.get("kernel", {})
    check_table(f"{where} [kernel]", kern, _KERNEL_FIELDS)
    doms = data.get("domains", {})
    check_table(f"{where} [domains]", doms, _DOMAINS_FIELDS)
    start: list[str] = []
    for i, item in enumerate(doms.get("start", [])):
        if not isinstance(item, str):
            raise ConfigError(f"{where} [domains]: start[{i}] must be a string path, "
                              f"got {item!r}")
        p = (path.parent / item).resolve()
        if not p.is_file():
            raise ConfigError(f"{where} [domains]: start[{i}] = {item!r}: no such file {p}")
        start.append(str(p))
    run_dir = sup.get("run_dir", "")
    if run_dir:
        run_dir = str((path.parent / run_dir).resolve())
    drivers = _drivers(data, where, path.parent)
    console = doms.get("console", "")
    if console not in ("", "kernel") and console not in {d.name for d in drivers}:
        raise ConfigError(f"{where} [domains]: console = {console!r} names no driver; declare "
                          f"[driver.{console}] with module = \"drivers.console\", or use "
                          "\"kernel\" for the kernel's built-in console")
    return StackConfig(name=sup.get("name", "default"), run_dir=run_dir,
                       kernel=KernelConfig(**kern), drivers=drivers,
                       domains=tuple(start), console="" if console == "kernel" else console,
                       source=str(path.resolve()))


def _drivers(data: dict[str, Any], where: str, base: Path) -> tuple[DriverConfig, ...]:
    out = []
    for name, table in data.get("driver", {}).items():
        here = f"{where} [driver.{name}]"
        if (msg := check_name(name)) is not None:
            raise ConfigError(f"{here}: the driver name {msg}")
        if not isinstance(table, dict):
            raise ConfigError(f"{here}: must be a table with module = \"...\"")
        check_table(here, table, _DRIVER_FIELDS, required=("module",))
        try:
            table = {**table, "module": backend_spec(table["module"], base)}
        except ValueError as e:
            raise ConfigError(f"{here}: module = {table['module']!r}: {e}") from None
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
        raise ValueError(f"{t!r} is neither a module (package.module[:Class], e.g. drivers.blk "
                         "or drivers.blk.ram:RamBackend) nor a backend file "
                         "(path/to/backend.py[:Class])")
    return t


def _driver(name: str, table: dict[str, Any], here: str) -> DriverConfig:
    vals = dict(table)
    if vals.get("isolation") == "inline":
        extra = [k for k in SUPERVISION_KEYS if k in vals]
        if extra:
            them = "them" if len(extra) > 1 else "it"
            raise ConfigError(f"{here}: {', '.join(extra)} cannot be used with isolation = "
                              "\"inline\": an inline driver runs inside the kernel process and "
                              f"is not supervised; remove {them} or use isolation = \"process\"")
    for key in ("period", "backoff", "backoff_max", "start_secs", "start_timeout", "watchdog_sec",
                "request_timeout_sec", "max_cpu", "graceful_timeout"):
        if key in vals:
            vals[key] = float(vals[key])
    if "max_rss" in vals:
        text = vals["max_rss"]
        size = parse_size(text)
        if size is None:
            raise ConfigError(f"{here}: key 'max_rss' = {text!r} is not a size: give a number "
                              "with an optional K, M, G or T suffix (binary units), e.g. "
                              "max_rss = \"512M\"")
        if size < MIN_MAX_RSS:
            raise ConfigError(f"{here}: key 'max_rss' = {text!r} is below 16M: a driver "
                              "process alone uses more, so it would be replaced over and over; "
                              "raise it (e.g. \"256M\") or remove the key")
        vals["max_rss"] = size
    backoff, cap = vals.get("backoff", 0.0), vals.get("backoff_max", 5.0)
    if cap < backoff:
        raise ConfigError(f"{here}: backoff_max = {cap:g} is less than backoff = {backoff:g}; "
                          "backoff_max caps the delays that start at backoff: raise "
                          "backoff_max or lower backoff")
    if "strategy" in vals and "group" not in vals:
        raise ConfigError(f"{here}: key 'strategy' needs a 'group' (the drivers that restart "
                          "together); add group = \"<name>\" or remove strategy")
    return DriverConfig(name=name, **vals)


def _check_groups(drivers: list[DriverConfig], where: str) -> None:
    first: dict[str, DriverConfig] = {}
    for d in drivers:
        if d.group is None:
            continue
        if d.group in first and first[d.group].strategy != d.strategy:
            o = first[d.group]
            raise ConfigError(
                f"{where} [driver.{d.name}]: strategy = {d.strategy!r} differs from "
                f"[driver.{o.name}] (strategy {o.strategy!r}) in group {d.group!r}: the drivers "
                "of a group must agree; give each of them the same strategy (default "
                "one_for_one)")
        first.setdefault(d.group, d)


def default_run_dir() -> Path:
    env = os.environ.get("ISOVISOR_RUN_DIR")
    if env:
        return Path(env)
    return Path(f"/tmp/isovisor-{os.getuid()}") / "default"


__all__ = ["ACTIONS", "ISOLATIONS", "MIN_MAX_RSS", "NAME_RE", "ConfigError", "DomainConfig",
           "DriverConfig", "KernelConfig", "StackConfig", "backend_spec", "default_run_dir",
           "load_domain_config", "load_stack_config"]
