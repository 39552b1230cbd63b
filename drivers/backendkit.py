"""What every device backend needs from and around the driver host (docs/sdk.md): the ``Host``
interface a backend calls, the checks of attach messages and options, and how a device that
cannot be served is refused.  Shared by ``drivers.blk``, ``drivers.net`` and ``drivers.console``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ipc.store import DevState


class Host(Protocol):
    """The driver host (``drivers/host.py``), as a backend sees it."""

    name: str
    log: logging.Logger

    def notify(self, key: int) -> None: ...
    def store_write(self, path: str, value: str) -> None: ...
    def fault(self, key: int, message: str) -> None: ...
    def error(self, key: int, message: str) -> None: ...
    def kick_again(self, key: int) -> None: ...
    def recovered(self, key: int, replayed: int, done_ns: int) -> None: ...
    def poison(self, key: int, index: int, description: str) -> None: ...
    def carry_out(self, kind: str, *, really: bool = False) -> None: ...
    def fault_fired(self, fault_id: int, kind: str, device: str) -> None: ...


def msg_field(dev: dict[str, Any], name: str, kind: type, where: str = "attach") -> Any:
    """``dev[name]``, which must be a ``kind`` (a bool is not an int); ValueError naming the
    field otherwise."""
    if name not in dev:
        raise ValueError(f"{where} message lacks {name!r}")
    v = dev[name]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise ValueError(f"{where} field {name!r} is {v!r:.60}, expected {kind.__name__}")
    return v


def int_option(options: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    """Option ``name`` (``default`` if absent): an integer in ``lo..hi``, else ValueError."""
    v = options.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer {lo}..{hi}, got {v!r}")
    return v


def refuse(
    host: Host, log: logging.Logger, what: str, key: object, store: object, message: str
) -> None:
    """Device ``key`` (a ``what``: "device", "vif", "console") cannot be served: say so in its
    backend directory (``error``, state Closed) if there is one, and to the kernel."""
    log.error("cannot attach %s %r: %s", what, key, message)
    if isinstance(store, str):
        try:
            host.store_write(f"{store}/error", message[:1024])
            host.store_write(f"{store}/state", str(int(DevState.CLOSED)))
        except ValueError as e:
            log.error("cannot report it in the store: %s", e)
    if isinstance(key, int) and not isinstance(key, bool):
        host.error(key, message)
