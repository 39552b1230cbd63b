"""What a console carries across a hot swap (docs/console.md, docs/hotswap.md).

A console's saved state (``isovisor.console``, version 1) is a
:class:`~drivers.state.DeviceState` whose ``home`` and ``medium`` are its log file, and whose
``data`` is::

    {"domain": "<domain>", "stats": {"<counter>": <int>, ...}, "input": "<queued input, hex>",
     "sink": {...}}

``sink`` is there only when the backend is a sink whose ``save_sink`` returned something (a
map, the next implementation's ``open_sink`` gets it), so ``drivers.console``'s state is as it
always was; a backend that does not know the key ignores it, so it needs no new version.

The backend-wide ``data`` is ``{"log_dir": ..., "socket_dir": ...}``.  The log files stay where
they are and the journal of an append in progress stays in the device's segment, so nothing is
moved: the next instance finishes that append when the kernel attaches the console again.  The
counters are in the device's ``data`` itself (version 1's layout), not under the base's
``{"stats", "class"}``: a console backend has ``carry_counters`` False and keeps them here.
Version 1 is the only layout so far, so there is no older state to upgrade.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from drivers.state import DeviceState, Medium, StateError


def log_medium(log_path: Path) -> Medium:
    """Where a console's data lives: its log file (``home`` and ``medium`` alike)."""
    return Medium("file", str(log_path))


def device_data(
    domain: str, stats: Any, queued: bytes | bytearray, sink: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A console's ``data``: its domain, its counters (a dataclass of integers), the input
    waiting for room in its ring and, if not empty, what its sink carries."""
    out: dict[str, Any] = {
        "domain": domain,
        "stats": dataclasses.asdict(stats),
        "input": bytes(queued).hex(),
    }
    if sink:
        out["sink"] = sink
    return out


def checked(saved: DeviceState, stats_type: type[Any], input_queue_bytes: int) -> DeviceState:
    """``saved`` if its ``data`` is a console's, with no more queued input than this backend
    holds (``input_queue_bytes``); StateError saying what is wrong if not."""
    where = f"state of console {saved.key}"
    stats, queued = saved.data.get("stats", {}), saved.data.get("input", "")
    if not isinstance(stats, dict) or not isinstance(queued, str):
        raise StateError(f"{where}: data.stats must be a map and data.input a hex string")
    if not isinstance(saved.data.get("sink", {}), dict):
        raise StateError(f"{where}: data.sink must be a map, got {saved.data['sink']!r:.40}")
    try:
        data = bytes.fromhex(queued)
    except ValueError:
        raise StateError(f"{where}: data.input is not a hex string") from None
    for f in dataclasses.fields(stats_type):
        v = stats.get(f.name, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise StateError(f"{where}: data.stats.{f.name} must be an integer >= 0, got {v!r:.40}")
    kept = data[: max(input_queue_bytes, 0)]
    if kept == data:
        return saved
    return dataclasses.replace(saved, data={**saved.data, "input": kept.hex()})


def restore(data: dict[str, Any], stats: Any) -> bytes:
    """Set ``stats`` (a dataclass of integers) from a :meth:`checked` ``data``; the queued
    input it carries."""
    saved = data.get("stats", {})
    for f in dataclasses.fields(stats):
        setattr(stats, f.name, saved.get(f.name, 0))
    return bytes.fromhex(data.get("input", ""))


def backend_data(log_dir: Path, socket_dir: Path) -> dict[str, Any]:
    return {"log_dir": str(log_dir), "socket_dir": str(socket_dir)}


def check_backend_data(data: dict[str, Any], log_dir: Path, log: logging.Logger) -> None:
    """Warn if the previous implementation logged elsewhere: an append it left undone then
    goes to this backend's file in full."""
    old_dir = data.get("log_dir")
    if isinstance(old_dir, str) and old_dir != str(log_dir):
        log.warning(
            "the previous implementation logged to %s, this one logs to %s: "
            "an append it left undone is written again in full",
            old_dir,
            log_dir,
        )


__all__ = [
    "backend_data",
    "check_backend_data",
    "checked",
    "device_data",
    "log_medium",
    "restore",
]
