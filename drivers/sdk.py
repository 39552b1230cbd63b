"""The driver SDK: everything a backend implementation needs, in one import.

::

    from drivers.sdk import BlockBackend, DeviceState, FileStorage, Storage

    class Backend(BlockBackend):
        def open_disk(self, dev: DeviceState) -> Storage:
            return FileStorage(dev.medium.target, dev.medium.size, dev.medium.access == "ro")

The framework (:class:`BlockBackend`) serves the rings, keeps the in-flight log, recovers after
a crash, injects faults and saves/restores state for hot swaps; an implementation says how a
device's disk is opened (:meth:`BlockBackend.open_disk` returns a :class:`Storage`: read,
write, flush, discard) and, optionally, where it keeps data (``restore_device``,
``medium_of``, ``release_disk``), what it reports (``statistics``) and how it upgrades an older
state (``upgrade_state``).  A backend that keeps the data in a format of its own just returns
its own Storage: the framework keeps the device's medium current for whoever takes the device
over (drivers/blk/export.py), and ``side_file`` gives it a place for its data.  docs/sdk.md is
the tutorial; the pytest plugin (``isovisor.testing``) starts a stack around a backend in a few
lines.

The network and console classes take the same shape with smaller hooks: a :class:`NetBackend`
subclass overrides ``filter_frame(src, frame)`` to drop or rewrite the frames the switch
forwards (docs/sdk.md, "A network backend"); a :class:`ConsoleBackend` subclass overrides
``output(console, offset, data)`` to send each console's output somewhere else, at least once and
in order (docs/sdk.md, "A console backend").
"""

from drivers.blk.backend import Backend, BlockBackend, copy_medium, open_medium
from drivers.blk.ram import RamBackend
from drivers.blk.storage import FileStorage, MemoryStorage, Storage, StorageError
from drivers.console.backend import Console, ConsoleBackend
from drivers.net.backend import NetBackend, Vif
from drivers.state import BackendState, DeviceState, Medium, StateError, with_version

__all__ = [
    "Backend",
    "BackendState",
    "BlockBackend",
    "Console",
    "ConsoleBackend",
    "DeviceState",
    "FileStorage",
    "Medium",
    "MemoryStorage",
    "NetBackend",
    "RamBackend",
    "StateError",
    "Storage",
    "StorageError",
    "Vif",
    "copy_medium",
    "open_medium",
    "with_version",
]
