"""Typed configuration: ``supervisor.toml`` and domain configs.

Keys follow xl.cfg where one exists.  Every loader rejects unknown keys and wrong types with a
:class:`ConfigError` naming the file, the key and what is allowed (Firecracker's
``deny_unknown_fields``).  Domain configs travel to the kernel as plain dicts
(:meth:`DomainConfig.to_wire`) and are re-validated there (:meth:`DomainConfig.from_wire`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import devices
from devices import DeviceSpec, SpecError
from devices.kvspec import parse_size
from kernel import abi

ACTIONS: Final = ("destroy", "restart", "preserve")
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(Exception):
    """A configuration file or value is wrong; the message says where and what to do."""


# --- small typed field checker -------------------------------------------------------------

@dataclass(frozen=True)
class _Field:
    kind: type | tuple[type, ...]
    help: str
    check: Callable[[Any], str | None] | None = None


def _range(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _at_least(lo: float, *, exclusive: bool = False) -> Callable[[Any], str | None]:
    if exclusive:
        return lambda v: None if v > lo else f"must be greater than {lo:g}"
    return lambda v: None if v >= lo else f"must be at least {lo:g}"


def _name(v: str) -> str | None:
    return None if NAME_RE.match(v) else (
        "must start with a letter or digit and contain only letters, digits, '_', '.', '-' "
        "(at most 63 characters)")


def _check_table(where: str, table: dict[str, Any], fields: dict[str, _Field],
                 required: tuple[str, ...] = ()) -> None:
    for key, val in table.items():
        f = fields.get(key)
        if f is None:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{where}: unknown key {key!r}{did}; allowed keys: "
                              f"{', '.join(sorted(fields))}")
        kinds = f.kind if isinstance(f.kind, tuple) else (f.kind,)
        if not isinstance(val, kinds) or (isinstance(val, bool) and bool not in kinds):
            words = [k for k in kinds if not (k is int and float in kinds)]  # "a number"
            want = " or ".join(_type_word(k) for k in words)
            raise ConfigError(f"{where}: key {key!r} must be {want} ({f.help}), "
                              f"got {_type_word(type(val))} {val!r}")
        if f.check is not None and (msg := f.check(val)) is not None:
            raise ConfigError(f"{where}: key {key!r} = {val!r} {msg} ({f.help})")
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}: missing required key {key!r} ({fields[key].help})")


def _type_word(t: type) -> str:
    return {int: "an integer", str: "a string", bool: "true or false", list: "a list",
            dict: "a table", float: "a number"}.get(t, t.__name__)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


# --- domain configs --------------------------------------------------------------------------

_DOMAIN_FIELDS: Final = {
    "name": _Field(str, "the domain's unique name", _name),
    "image": _Field(str, "a built-in guest program name, a .c file, or a flat binary"),
    "memory": _Field(int, f"guest RAM in MiB, {abi.MIN_MEMORY_MIB}..{abi.MAX_MEMORY_MIB}",
                     _range(abi.MIN_MEMORY_MIB, abi.MAX_MEMORY_MIB)),
    "vcpus": _Field(int, "number of virtual CPUs; only 1 is supported", _range(1, 1)),
    "weight": _Field(int, "scheduler weight, 1..65535, default 256", _range(1, 65535)),
    "cap": _Field(int, "CPU cap in percent of one CPU, 0 = no cap", _range(0, 100)),
    "on_poweroff": _Field(str, "action when the guest powers off", _choice(ACTIONS)),
    "on_reboot": _Field(str, "action when the guest reboots", _choice(ACTIONS)),
    "on_crash": _Field(str, "action when the guest crashes", _choice(ACTIONS)),
    "extra": _Field(str, f"parameters passed to the guest, at most {abi.SI_CMDLINE_MAX - 1} "
                         "bytes", lambda v: None if len(v.encode()) < abi.SI_CMDLINE_MAX
                    else "is too long"),
    # each device class's key ("disk", "vif", "console", ...): devices/
    **{c.config_key: _Field(c.config_type, c.config_help) for c in devices.CLASSES},
}

@dataclass(frozen=True)
class DomainConfig:
    """One domain, as xl.cfg would describe it."""

    name: str
    image: str
    image_path: str = ""  # resolved absolute path of the flat binary
    memory: int = 16
    vcpus: int = 1
    weight: int = 256
    cap: int = 0
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    extra: str = ""
    #: Every device, of every class (devices/), in region order: each class's config key
    #: ("disk", "vif", ...) parsed by its class.
    devices: tuple[DeviceSpec, ...] = ()
    #: The ``console`` key as written: a console driver's name, "kernel", or "" (the stack's
    #: default; the kernel's console when the stack has none).  A driver's name is also a
    #: console device in ``devices``.
    console: str = ""
    source: str = ""  # the file this came from, for messages

    @property
    def console_driver(self) -> str | None:
        return None if self.console in ("", "kernel") else self.console

    def with_console(self, console: str) -> DomainConfig:
        """This config with ``console`` set (the stack's default for one that left it empty)."""
        raw = {c.config_key: c.to_wire(self.of_class(c.name)) for c in devices.CLASSES}
        raw["console"] = console
        return dataclasses.replace(self, console=console,
                                   devices=_devices(raw, self.name, self.source, None))

    def of_class(self, name: str) -> tuple[DeviceSpec, ...]:
        """The devices of class ``name`` ("vbd", "vif", ...), in config order."""
        return tuple(d for d in self.devices if d.device_class == name)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str, base_dir: Path | None = None,
                  resolve: bool = True) -> DomainConfig:
        _check_table(where, data, _DOMAIN_FIELDS, required=("name", "image"))
        image_path = ""
        if resolve:
            from domains.build import BuildError, resolve_image
            try:
                image_path = str(resolve_image(data["image"], base_dir or Path.cwd()))
            except BuildError as e:
                raise ConfigError(f"{where}: key 'image' = {data['image']!r}: {e}") from None
        data = dict(data)
        specs = _devices(data, data["name"], where, base_dir)
        return cls(**_without_devices(data), devices=specs, image_path=image_path,
                   source=where)

    def to_wire(self) -> dict[str, Any]:
        wire = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "devices"}
        for c in devices.CLASSES:
            if c.config_key not in wire:  # ("console" is a field already: kept as written)
                wire[c.config_key] = c.to_wire(self.of_class(c.name))
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> DomainConfig:
        """Re-validate a config received over the control socket (no image building)."""
        if not isinstance(data, dict):
            raise ConfigError(f"domain config must be a map, got {type(data).__name__}")
        data = dict(data)
        image_path = data.pop("image_path", "")
        source = data.pop("source", "") or "control message"
        if not isinstance(image_path, str) or not image_path:
            raise ConfigError(f"{source}: domain config has no resolved 'image_path'")
        if not isinstance(source, str):
            raise ConfigError("domain config 'source' must be a string")
        data = _validated(data, source)
        specs = _devices(data, data["name"], source, None)
        return cls(**{**_without_devices(data), "devices": specs, "image_path": image_path,
                      "source": source})


def _devices(data: dict[str, Any], domain: str, where: str,
             base_dir: Path | None) -> tuple[DeviceSpec, ...]:
    """Every device a domain config's keys declare, class by class (devices/)."""
    specs: list[DeviceSpec] = []
    try:
        for c in devices.CLASSES:
            if c.config_key in data:
                specs += c.parse(data[c.config_key], domain, where, base_dir)
    except SpecError as e:
        raise ConfigError(str(e)) from None
    return tuple(specs)


def _without_devices(data: dict[str, Any]) -> dict[str, Any]:
    """The keys that are DomainConfig fields (a device key is one only if it is a field too,
    as ``console`` is)."""
    fields = {f.name for f in dataclasses.fields(DomainConfig)}
    return {k: v for k, v in data.items() if k in fields}


def _validated(data: dict[str, Any], where: str) -> dict[str, Any]:
    _check_table(where, data, _DOMAIN_FIELDS, required=("name", "image"))
    return data


def load_domain_config(path: str | Path, *, resolve: bool = True) -> DomainConfig:
    path = Path(path).resolve() if Path(path).exists() else Path(path)
    data = _read_toml(path)
    return DomainConfig.from_dict(data, str(path), base_dir=path.parent, resolve=resolve)


# --- supervisor.toml -----------------------------------------------------------------------

_SUPERVISOR_FIELDS: Final = {
    "name": _Field(str, "the stack's name, shown by the CLI and in logs", _name),
    "run_dir": _Field(str, "directory for sockets, logs and the pid file"),
}
_KERNEL_FIELDS: Final = {
    "pcpus": _Field(int, "physical CPU threads that run guests, 1..64", _range(1, 64)),
    "timeslice_ms": _Field(int, "scheduler time slice in ms, 1..1000", _range(1, 1000)),
}
_DOMAINS_FIELDS: Final = {
    "start": _Field(list, "domain config files to create at start-up, relative to this file"),
    "console": _Field(str, "the console driver every domain's console goes to unless its config "
                           "says otherwise (a [driver.<name>] running drivers.console); "
                           "\"kernel\" or empty: the kernel's built-in console",
                      lambda v: None if v in ("", "kernel") or _name(v) is None
                      else "must be a driver name or \"kernel\""),
}
_TOP_FIELDS: Final = {
    "supervisor": _Field(dict, "[supervisor] table"),
    "kernel": _Field(dict, "[kernel] table"),
    "driver": _Field(dict, "[driver.<name>] tables: driver backends"),
    "domains": _Field(dict, "[domains] table"),
}
ISOLATIONS: Final = ("process", "inline")
RESTART_POLICIES: Final = ("permanent", "transient", "temporary")
STRATEGIES: Final = ("one_for_one", "rest_for_one", "one_for_all")
_NUM: Final = (float, int)
#: Smallest max_rss accepted: a driver process alone is larger (Python, ZeroMQ, the backend).
MIN_MAX_RSS: Final = 16 << 20
_DRIVER_FIELDS: Final = {
    "module": _Field(str, "Python module of the backend, e.g. drivers.blk"),
    "isolation": _Field(str, "process (own OS process, the default) or inline (a thread of the "
                             "kernel process, for comparison)", _choice(ISOLATIONS)),
    "options": _Field(dict, "backend options, passed to the driver"),
    "restart": _Field(str, "when a failed driver is restarted: permanent (always), transient "
                           "(only after an abnormal exit) or temporary (never)",
                      _choice(RESTART_POLICIES)),
    "intensity": _Field(int, "restarts allowed within 'period' seconds before the driver "
                             "becomes FATAL, 0..1000000", _range(0, 1_000_000)),
    "period": _Field(_NUM, "the window in seconds for 'intensity'", _at_least(0, exclusive=True)),
    "backoff": _Field(_NUM, "seconds before the 2nd restart in a row without a stable run, "
                            "doubling for each further one; 0 = start at 0.05 s", _at_least(0)),
    "backoff_max": _Field(_NUM, "the longest delay before a restart, in seconds",
                          _at_least(0)),
    "start_secs": _Field(_NUM, "seconds a driver must stay up after its hello to count as "
                               "started", _at_least(0)),
    "start_timeout": _Field(_NUM, "seconds a started driver may take to say hello (its "
                                  "handshake) before it is killed, at least 1", _at_least(1)),
    "watchdog_sec": _Field(_NUM, "heartbeat deadline in seconds, 0 = off",
                           lambda v: None if v == 0 or v >= 0.1
                           else "must be 0 (off) or at least 0.1"),
    "request_timeout_sec": _Field(_NUM, "seconds a request may stay outstanding before the "
                                        "driver counts as hung, at least 0.1", _at_least(0.1)),
    "max_rss": _Field(str, 'RSS limit: a size with a K, M, G or T suffix, e.g. "512M"'),
    "max_fds": _Field(int, "open file descriptors allowed (checked with psutil), 16..1048576",
                      _range(16, 1_048_576)),
    "max_cpu": _Field(_NUM, "CPU limit in percent of one CPU, averaged over 5 s, more than 0 "
                            "and at most 100", lambda v: None if 0 < v <= 100
                      else "must be more than 0 and at most 100"),
    "graceful_timeout": _Field(_NUM, "seconds from SIGTERM to SIGKILL when stopping",
                               _at_least(0)),
    "spare": _Field(bool, "keep a warm spare process ready"),
    "group": _Field(str, "restart group: drivers that share it restart together per "
                         "'strategy'", _name),
    "strategy": _Field(str, "which drivers of the group restart when one fails",
                       _choice(STRATEGIES)),
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
    data = _read_toml(path)
    where = str(path)
    _check_table(where, data, _TOP_FIELDS)
    sup = data.get("supervisor", {})
    _check_table(f"{where} [supervisor]", sup, _SUPERVISOR_FIELDS)
    kern = data.get("kernel", {})
    _check_table(f"{where} [kernel]", kern, _KERNEL_FIELDS)
    doms = data.get("domains", {})
    _check_table(f"{where} [domains]", doms, _DOMAINS_FIELDS)
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
        if (msg := _name(name)) is not None:
            raise ConfigError(f"{here}: the driver name {msg}")
        if not isinstance(table, dict):
            raise ConfigError(f"{here}: must be a table with module = \"...\"")
        _check_table(here, table, _DRIVER_FIELDS, required=("module",))
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
