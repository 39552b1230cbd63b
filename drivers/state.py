"""A backend's saved state: typed, versioned, and checked before anyone restores it.

A hot swap (docs/hotswap.md) moves a driver from one backend implementation to another.  The
old backend ``save()``\\s a :class:`BackendState`; the new one ``restore()``\\s it.  What travels
between them is only this: a *kind* (which device class the state describes, e.g.
``isovisor.blk``; two implementations with the same kind can take over from each other), a
*version* of that kind's layout, the implementation that saved it, one :class:`DeviceState` per
device it served, and backend-wide ``data``.

Versions: a backend declares ``state_version``.  A state of an older version goes through the
backend's ``upgrade_state`` hook first (which must return a state of the backend's version); a
state of a newer version, or of another kind, is refused with :class:`StateError`, and the swap
is rolled back.

On the wire (msgpack, between processes) a state is a plain map; :meth:`BackendState.to_wire`
and :meth:`BackendState.from_wire` convert, and ``from_wire`` says exactly which field of a
received state is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final

#: The layout of the wire form itself (not of any backend's state).
WIRE_FORMAT: Final = 1
MEDIUM_TYPES: Final = ("file", "memory")


class StateError(Exception):
    """A state cannot be restored: malformed, of another kind, or of a version the backend
    cannot upgrade from.  The message says which and what to do."""


@dataclass(frozen=True)
class Medium:
    """Where a device's data lives: an image file (``file``) or a memory disk in /dev/shm
    (``memory``, ``target`` is its name there)."""

    type: str
    target: str
    size: int | None = None
    access: str = "rw"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "target": self.target, "size": self.size, "access": self.access}

    @classmethod
    def from_wire(cls, v: object, where: str) -> Medium:
        if not isinstance(v, dict):
            raise StateError(f"{where} must be a map {{type, target, size, access}}, got {v!r:.80}")
        kind, target, size = v.get("type"), v.get("target"), v.get("size")
        access = v.get("access", "rw")
        if kind not in MEDIUM_TYPES:
            raise StateError(
                f"{where}.type must be one of {', '.join(MEDIUM_TYPES)}, got {kind!r:.40}"
            )
        if not isinstance(target, str) or not target:
            raise StateError(f"{where}.target must be a non-empty string, got {target!r:.80}")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise StateError(f"{where}.size must be a positive integer or absent, got {size!r:.40}")
        if access not in ("rw", "ro"):
            raise StateError(f"{where}.access must be 'rw' or 'ro', got {access!r:.40}")
        return cls(kind, target, size, access)

    def same_place(self, other: Medium) -> bool:
        """Do both name the same bytes (type and target)?"""
        return (self.type, self.target) == (other.type, other.target)


@dataclass(frozen=True)
class DeviceState:
    """One device as a backend left it.

    ``home`` is the disk the configuration gives the device; ``scratch`` the memory-disk name
    the kernel reserves for the device (a backend may keep a copy of the data there); ``medium``
    where the data is *now* (``home`` unless the backend moved it); ``data`` whatever else the
    backend wants its successor to know (msgpack-able: maps, lists, str, int, float, bool)."""

    key: int
    label: str
    home: Medium
    scratch: str
    medium: Medium
    data: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "home": self.home.to_wire(),
            "scratch": self.scratch,
            "medium": self.medium.to_wire(),
            "data": self.data,
        }

    @classmethod
    def from_wire(cls, v: object, where: str) -> DeviceState:
        if not isinstance(v, dict):
            raise StateError(f"{where} must be a map, got {v!r:.80}")
        key, label, scratch, data = (
            v.get("key"),
            v.get("label"),
            v.get("scratch"),
            v.get("data", {}),
        )
        if not isinstance(key, int) or isinstance(key, bool) or key < 0:
            raise StateError(f"{where}.key must be an integer >= 0, got {key!r:.40}")
        if not isinstance(label, str):
            raise StateError(f"{where}.label must be a string, got {label!r:.40}")
        if not isinstance(scratch, str):
            raise StateError(f"{where}.scratch must be a string, got {scratch!r:.40}")
        if not isinstance(data, dict):
            raise StateError(f"{where}.data must be a map, got {data!r:.80}")
        return cls(
            key,
            label,
            Medium.from_wire(v.get("home"), f"{where}.home"),
            scratch,
            Medium.from_wire(v.get("medium"), f"{where}.medium"),
            data,
        )


@dataclass(frozen=True)
class BackendState:
    """What a backend saves and its successor restores (see the module docstring)."""

    kind: str
    version: int
    implementation: str
    devices: tuple[DeviceState, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)

    def device(self, key: int) -> DeviceState | None:
        return next((d for d in self.devices if d.key == key), None)

    def to_wire(self) -> dict[str, Any]:
        return {
            "format": WIRE_FORMAT,
            "kind": self.kind,
            "version": self.version,
            "implementation": self.implementation,
            "devices": [d.to_wire() for d in self.devices],
            "data": self.data,
        }

    @classmethod
    def from_wire(cls, v: object) -> BackendState:
        if not isinstance(v, dict):
            raise StateError(f"a saved state must be a map, got {type(v).__name__}")
        if v.get("format") != WIRE_FORMAT:
            raise StateError(
                f"saved state format {v.get('format')!r:.20} is not "
                f"{WIRE_FORMAT}: it was written by another isovisor version"
            )
        kind, version, impl = v.get("kind"), v.get("version"), v.get("implementation")
        devices, data = v.get("devices"), v.get("data", {})
        if not isinstance(kind, str) or not kind:
            raise StateError(f"state.kind must be a non-empty string, got {kind!r:.40}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StateError(f"state.version must be an integer >= 1, got {version!r:.40}")
        if not isinstance(impl, str):
            raise StateError(f"state.implementation must be a string, got {impl!r:.40}")
        if not isinstance(devices, list):
            raise StateError(f"state.devices must be a list, got {devices!r:.80}")
        if not isinstance(data, dict):
            raise StateError(f"state.data must be a map, got {data!r:.80}")
        devs = tuple(DeviceState.from_wire(d, f"state.devices[{i}]") for i, d in enumerate(devices))
        return cls(kind, version, impl, devs, data)


def accept(
    state: BackendState,
    *,
    kind: str,
    version: int,
    who: str,
    upgrade: Callable[[BackendState], BackendState],
) -> BackendState:
    """``state`` as backend ``who`` (of ``kind``, ``version``) can restore it: upgraded if
    older, else StateError saying why it is refused."""
    if state.kind != kind:
        raise StateError(
            f"{who} restores states of kind {kind!r}, but this state is of kind "
            f"{state.kind!r} (saved by {state.implementation}): these backends "
            "serve different device classes and cannot take over from each other"
        )
    if state.version > version:
        raise StateError(
            f"the state saved by {state.implementation} is version "
            f"{state.version}, newer than {who} understands (version {version}); "
            "swap to an implementation that knows this version"
        )
    if state.version == version:
        return state
    try:
        up = upgrade(state)
    except StateError:
        raise
    except Exception as e:
        raise StateError(
            f"{who}.upgrade_state failed on a version {state.version} state: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(up, BackendState) or up.version != version or up.kind != kind:
        got = f"version {up.version}" if isinstance(up, BackendState) else type(up).__name__
        raise StateError(
            f"{who}.upgrade_state must return a {kind!r} state of version {version}, returned {got}"
        )
    return up


def with_version(state: BackendState, version: int, **changes: Any) -> BackendState:
    """A copy of ``state`` at ``version`` (for upgrade hooks)."""
    return replace(state, version=version, **changes)
