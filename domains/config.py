"""Domain configs: one domain as xl.cfg would describe it (``domains/configs/*.toml``).

Keys follow xl.cfg where one exists; each device class's key (``disk``, ``vif``, ``console``)
is parsed by its class (``devices/``).  A config travels to the kernel as a plain dict
(:meth:`DomainConfig.to_wire`) and is re-validated there (:meth:`DomainConfig.from_wire`), so
the kernel and the supervisor share this module; it imports nothing from either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import devices
from devices import DeviceSpec, SpecError
from ipc.schema import (
    ConfigError,
    Field,
    at_most_bytes,
    check_name,
    check_table,
    in_range,
    read_toml,
    show,
)
from kernel import abi

ACTIONS: Final = ("destroy", "restart", "preserve")
#: Longest ``extra`` (the guest's command line, without its NUL), in bytes.
EXTRA_MAX: Final = abi.SI_CMDLINE_MAX - 1


_DOMAIN_FIELDS: Final = {
    "name": Field(str, "the domain's unique name", check_name),
    "image": Field(str, "a built-in guest program name, a .c file, or a flat binary"),
    "memory": Field(
        int,
        f"guest RAM in MiB, {abi.MIN_MEMORY_MIB}..{abi.MAX_MEMORY_MIB}",
        in_range(abi.MIN_MEMORY_MIB, abi.MAX_MEMORY_MIB),
    ),
    "vcpus": Field(int, "number of virtual CPUs; only 1 is supported", in_range(1, 1)),
    "weight": Field(int, "scheduler weight, 1..65535, default 256", in_range(1, 65535)),
    "cap": Field(int, "CPU cap in percent of one CPU, 0 = no cap", in_range(0, 100)),
    "on_poweroff": Field(
        str, "action when the guest powers off", choices=ACTIONS, what="an action"
    ),
    "on_reboot": Field(str, "action when the guest reboots", choices=ACTIONS, what="an action"),
    "on_crash": Field(str, "action when the guest crashes", choices=ACTIONS, what="an action"),
    "extra": Field(
        str, f"parameters passed to the guest, at most {EXTRA_MAX} bytes", at_most_bytes(EXTRA_MAX)
    ),
    # each device class's key ("disk", "vif", "console", ...): devices/
    **{c.config_key: Field(c.config_type, c.config_help) for c in devices.CLASSES},
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
        return dataclasses.replace(
            self, console=console, devices=_devices(raw, self.name, self.source, None)
        )

    def of_class(self, name: str) -> tuple[DeviceSpec, ...]:
        """The devices of class ``name`` ("vbd", "vif", ...), in config order."""
        return tuple(d for d in self.devices if d.device_class == name)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], where: str, base_dir: Path | None = None, resolve: bool = True
    ) -> DomainConfig:
        check_table(where, data, _DOMAIN_FIELDS, required=("name", "image"))
        image_path = ""
        if resolve:
            from domains.build import BuildError, resolve_image

            try:
                image_path = str(resolve_image(data["image"], base_dir or Path.cwd()))
            except BuildError as e:
                raise ConfigError(f"{where}: image = {show(data['image'])}: {e}") from None
        data = dict(data)
        specs = _devices(data, data["name"], where, base_dir)
        return cls(**_without_devices(data), devices=specs, image_path=image_path, source=where)

    def to_wire(self) -> dict[str, Any]:
        wire = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "devices"
        }
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
        return cls(
            **{
                **_without_devices(data),
                "devices": specs,
                "image_path": image_path,
                "source": source,
            }
        )


def _devices(
    data: dict[str, Any], domain: str, where: str, base_dir: Path | None
) -> tuple[DeviceSpec, ...]:
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
    check_table(where, data, _DOMAIN_FIELDS, required=("name", "image"))
    return data


def load_domain_config(path: str | Path, *, resolve: bool = True) -> DomainConfig:
    path = Path(path).resolve() if Path(path).exists() else Path(path)
    data = read_toml(path)
    return DomainConfig.from_dict(data, str(path), base_dir=path.parent, resolve=resolve)
