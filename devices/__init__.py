"""The device-class registry: every class the stack knows, each declared once in its own module
(``devices/base.py`` says what a declaration holds; docs/architecture.md, "Adding a device
class", walks through one).

The kernel, the supervisor, the CLI and the fault tables loop over :data:`CLASSES` and ask
:func:`by_name`, :func:`of_spec` or :func:`of_module`; none of them names a class.  The order of
:data:`CLASSES` is the order of a domain's devices in its device table and regions.
"""

from __future__ import annotations

from typing import Final

from devices import console, rng, vbd, vif
from devices.base import DeviceClass, DeviceSpec, Medium, Region, SpecError, WhileFailed

#: The registry: one entry per class, in region order.
CLASSES: Final[tuple[DeviceClass, ...]] = (vbd.CLASS, vif.CLASS, console.CLASS, rng.CLASS)

_BY_NAME: Final = {c.name: c for c in CLASSES}
_BY_MODULE: Final = {m: c for c in CLASSES for m in c.modules}
assert len(_BY_NAME) == len(CLASSES), "two device classes with one name"
assert len({c.config_key for c in CLASSES}) == len(CLASSES), "two classes with one config key"
assert len({c.kind for c in CLASSES}) == len(CLASSES), "two classes with one device-table kind"


def by_name(name: str) -> DeviceClass:
    """The class called ``name``; KeyError naming the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no device class {name!r}; the classes are {', '.join(_BY_NAME)}") from None


def of_spec(spec: DeviceSpec) -> DeviceClass:
    """The class of a device a domain config declares."""
    return _BY_NAME[spec.device_class]


def of_module(module: str | None) -> DeviceClass | None:
    """The class a driver module serves (``module`` or ``module:Class``), None if not known (a
    backend loaded from a file, say)."""
    return _BY_MODULE.get((module or "").partition(":")[0].strip())


def modules() -> tuple[str, ...]:
    """Every driver module whose class is known."""
    return tuple(_BY_MODULE)


__all__ = [
    "CLASSES",
    "DeviceClass",
    "DeviceSpec",
    "Medium",
    "Region",
    "SpecError",
    "WhileFailed",
    "by_name",
    "modules",
    "of_module",
    "of_spec",
]
