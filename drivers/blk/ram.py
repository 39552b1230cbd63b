"""``drivers.blk.ram:RamBackend``: a block backend that serves each disk from memory.

Each device's data is copied into the memory disk the kernel reserves for it (its *scratch*
name, a tmpfs file in /dev/shm) and every request is served there, so reads and writes never
touch the image file.  The copy outlives a crash of the driver process (tmpfs is not process
memory), so a replacement instance picks it up and recovery stays transparent.  When the
device is detached for good (the domain goes away, the stack stops) the data is written back
to the configured disk; when another implementation takes the device over in a hot swap, that
one moves the data (``restore_device``) instead.

Use it to move a running disk into memory and back::

    isovisor driver swap blk0 --to drivers.blk.ram:RamBackend
    isovisor driver swap blk0 --to drivers.blk:Backend
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from drivers.blk.backend import BlockBackend
from drivers.blk.persist import copy_medium
from drivers.blk.storage import SHM_DIR, Storage, StorageError, open_medium
from drivers.state import DeviceState, Medium


class RamBackend(BlockBackend):
    """Serve every device from a copy of its disk in memory (see the module docstring)."""

    def _ram(self, dev: DeviceState) -> Medium:
        if not dev.scratch:
            raise StorageError(
                f"device {dev.label}: the kernel reserved no scratch memory "
                "disk for it (an attach message without 'scratch'), so it "
                "cannot be served from memory"
            )
        return Medium("memory", dev.scratch, None, "rw")

    def restore_device(self, saved: DeviceState) -> DeviceState:
        """Copy the device's data into memory (unless it is there already)."""
        ram = self._ram(saved)
        if not saved.medium.same_place(ram):
            n = copy_medium(saved.medium, ram)
            self.log.info(
                "device %d (%s): %d bytes copied from %s %s into memory",
                saved.key,
                saved.label,
                n,
                saved.medium.type,
                saved.medium.target,
            )
        return dataclasses.replace(saved, medium=ram)

    def open_disk(self, dev: DeviceState) -> Storage:
        ram = self._ram(dev)
        in_memory = dev.medium.same_place(ram)  # restore_device put it there
        # not restored, but a copy exists: an instance of ours died, and its copy is newer
        # than the disk
        left_by_crash = dev.medium.same_place(dev.home) and (SHM_DIR / ram.target).exists()
        if not (in_memory or left_by_crash):
            if dev.medium.same_place(dev.home) and dev.home.access == "rw":
                open_medium(dev.home).close()  # a new image is created, as drivers.blk does
            copy_medium(dev.medium, ram)  # first attach: load the disk into memory
        return open_medium(dataclasses.replace(ram, access=dev.home.access))

    def medium_of(self, dev: DeviceState, storage: Storage) -> Medium:
        return self._ram(dev)

    def release_disk(self, dev: DeviceState, storage: Storage, *, handover: bool) -> None:
        storage.close()
        if handover or dev.home.access == "ro":
            return
        ram = self._ram(dev)
        if Path(SHM_DIR / ram.target).exists():
            n = copy_medium(ram, dev.home)
            self.log.info(
                "device %d (%s): %d bytes written back to %s",
                dev.key,
                dev.label,
                n,
                dev.home.target,
            )

    def statistics(self) -> dict[str, int | float | str]:
        out = super().statistics()
        out["memory_bytes"] = sum(d.storage.size for d in self.devices.values())
        return out
