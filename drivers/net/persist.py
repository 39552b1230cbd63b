"""What the net driver carries across a hot swap (docs/net.md, "Hot swap").

The vifs themselves are attached again by the kernel, and their rings and logs carry every
frame in flight, so a net driver's saved state (``isovisor.net``, version 1) has no devices.
Its ``data`` holds:

* ``bridges``: for each bridge, the MAC table as ``[mac, port, ms since seen]`` rows;
* ``vifs``: for each device key (as text), its ``label``, ``mac``, ``bridge`` and
  ``counters``; a vif restored and not attached again yet carries its ``counters`` only;
* ``backend`` (only when there is any): what a subclass of the switch saves of its own (its
  ``backend_data()``, a map: e.g. a frame hook's state, docs/sdk.md), given to the next
  implementation's ``restore_backend_data``.  One that has none ignores it (``drivers.net``),
  so the layout stays version 1.

Inside the backend a vif's saved part is a :class:`~drivers.state.DeviceState` as the base
(drivers/backendbase.py) keeps it: ``data`` is ``{"stats": counters, "class": {"mac",
"bridge"}}``.  :func:`to_state` turns the base's state into the version-1 layout, and
:func:`from_state` back (the MAC tables loaded on the way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from drivers.net.switch import Bridge
from drivers.net.uplink import check_bridge
from drivers.state import BackendState, DeviceState, Medium, StateError

#: A vif has no medium: its data is in its segment, which the kernel attaches again.
_NOWHERE: Final = Medium("memory", "")


def vif_data(mac: str, bridge: str) -> dict[str, Any]:
    """A vif's own part of its saved state."""
    return {"mac": mac, "bridge": bridge}


def to_state(state: BackendState, bridges: dict[str, Bridge], now: float) -> BackendState:
    """The version-1 state of a switch: the base's ``state`` (a device per vif, attached or
    restored; its ``data`` the backend's own) with ``bridges``' MAC tables as they are at
    ``now``."""
    vifs: dict[str, Any] = {}
    for dev in state.devices:
        counters, own = dev.data.get("stats", {}), dev.data.get("class", {})
        vifs[str(dev.key)] = (
            {"label": dev.label, **own, "counters": counters} if own else {"counters": counters}
        )
    data: dict[str, Any] = {
        "bridges": {n: b.table.to_wire(now) for n, b in sorted(bridges.items())},
        "vifs": vifs,
    }
    if state.data:  # the backend's own (BackendBase.save put backend_data() there)
        data["backend"] = dict(state.data)
    return BackendState(state.kind, state.version, state.implementation, (), data)


def backend_data_of(state: BackendState) -> dict[str, Any]:
    """What the saving backend's ``backend_data()`` returned (``{}`` if nothing); StateError
    if it is not a map."""
    own = state.data.get("backend", {})
    if not isinstance(own, dict):
        raise StateError(f"state.data.backend must be a map, got {own!r:.60}")
    return own


def from_state(
    state: BackendState, counters: tuple[str, ...], bridge: Callable[[str], Bridge], now: float
) -> tuple[int, int, dict[int, DeviceState]]:
    """Load the MAC tables of a version-1 ``state`` into ``bridge(name)`` (rows that have aged
    out at ``now`` are skipped); (MAC entries learned, bridges, each vif as the base keeps a
    restored device, by key).  StateError if the state is malformed."""
    data = state.data
    bridges = data.get("bridges", {})
    vifs = data.get("vifs", {})
    if not isinstance(bridges, dict):
        raise StateError(f"state.data.bridges must be a map, got {bridges!r:.60}")
    if not isinstance(vifs, dict):
        raise StateError(f"state.data.vifs must be a map, got {vifs!r:.60}")
    learned = 0
    for name, rows in bridges.items():
        try:
            check_bridge(name, "state.data.bridges key")
            learned += bridge(name).table.load(rows, now, f"state.data.bridges.{name}")
        except ValueError as e:
            raise StateError(str(e)) from None
    out: dict[int, DeviceState] = {}
    for k, info in vifs.items():
        where = f"state.data.vifs.{k}"
        if not isinstance(k, str) or not k.isdigit() or not isinstance(info, dict):
            raise StateError(f"{where} must be a map under a device key")
        carried = info.get("counters", {})
        if not isinstance(carried, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for n in (carried.get(c, 0) for c in counters)
        ):
            raise StateError(f"{where}.counters must map counter names to integers >= 0")
        label = info.get("label")
        out[int(k)] = DeviceState(
            int(k),
            label if isinstance(label, str) else f"vif {k}",
            _NOWHERE,
            "",
            _NOWHERE,
            {"stats": {c: int(carried.get(c, 0)) for c in counters}, "class": {}},
        )
    return learned, len(bridges), out


__all__ = ["backend_data_of", "from_state", "to_state", "vif_data"]
