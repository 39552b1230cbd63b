"""countingdisk, version 2: what countingdisk.py becomes when its saved state changes layout.

Version 1 saves each device's counters as ``{"counts": {"reads": n, "bytes_read": b, ...}}``.
Version 2 keeps them per operation, ``{"ops": {"read": n, ...}, "bytes": {"read": b, ...}}``,
and also times the I/O (``busy_ns``).  So it declares ``state_version = 2`` and converts a
version-1 state in :meth:`CountingDisk.upgrade_state`: a swap from version 1 (or from any
other version-1 ``isovisor.blk`` backend, such as drivers.blk) goes through that hook and the
counters carry on.  A swap back to a version-1 backend is refused by that backend (it cannot
read a newer state) and rolled back (docs/sdk.md, "State versions").
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

from drivers.sdk import (
    BackendState,
    BlockBackend,
    DeviceState,
    StateError,
    Storage,
    StorageError,
    with_version,
)

OPS = ("read", "write", "flush", "discard")


class CountingStorage(Storage):
    """One image file, read and written with preadv/pwritev; counts and times each op."""

    def __init__(self, path: str, size: int | None, readonly: bool) -> None:
        flags = (os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open image {path}: {e.strerror}") from None
        actual = os.fstat(self.fd).st_size
        if actual == 0 and size and not readonly:
            os.ftruncate(self.fd, size)
            actual = size
        if size is not None and actual != size:
            os.close(self.fd)
            raise StorageError(
                f"image {path} is {actual} bytes, but the disk is configured with size {size}"
            )
        self.path, self.size, self.readonly = path, actual, readonly
        self.ops = dict.fromkeys(OPS, 0)
        self.bytes = {"read": 0, "write": 0}
        self.busy_ns = 0
        self.upgraded_from = 0  # the state version this device's counters were upgraded from

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        t = time.perf_counter_ns()
        n = os.preadv(self.fd, bufs, offset)
        self.busy_ns += time.perf_counter_ns() - t
        if n != sum(len(b) for b in bufs):
            raise StorageError(f"short read at byte {offset} of {self.path}")
        self.ops["read"] += 1
        self.bytes["read"] += n

    def writev_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        t = time.perf_counter_ns()
        n = os.pwritev(self.fd, bufs, offset)
        self.busy_ns += time.perf_counter_ns() - t
        if n != sum(len(b) for b in bufs):
            raise StorageError(f"short write at byte {offset} of {self.path}")
        self.ops["write"] += 1
        self.bytes["write"] += n

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.readv_into(offset, [buf])

    def write_from(self, offset: int, buf: memoryview) -> None:
        self.writev_from(offset, [buf])

    def flush(self) -> None:
        os.fdatasync(self.fd)
        self.ops["flush"] += 1

    def discard(self, offset: int, length: int) -> None:
        os.pwrite(self.fd, bytes(length), offset)
        self.ops["discard"] += 1

    def close(self) -> None:
        os.close(self.fd)


def _upgrade_device_data(v1: dict[str, Any]) -> dict[str, Any]:
    """A device's data as version 1 saved it (``{}`` from a backend that counts nothing) in
    the version-2 layout."""
    c = v1.get("counts", {})
    return {
        "ops": {
            "read": c.get("reads", 0),
            "write": c.get("writes", 0),
            "flush": c.get("flushes", 0),
            "discard": c.get("discards", 0),
        },
        "bytes": {"read": c.get("bytes_read", 0), "write": c.get("bytes_written", 0)},
        "busy_ns": 0,
        "upgraded_from": 1,
    }


class CountingDisk(BlockBackend):
    """Serve each device's image file through a :class:`CountingStorage` (version 2)."""

    state_version = 2

    @classmethod
    def upgrade_state(cls, state: BackendState) -> BackendState:
        if state.version != 1:
            raise StateError(
                f"countingdisk v2 upgrades version 1 states, not version {state.version}"
            )
        devices = tuple(
            dataclasses.replace(d, data=_upgrade_device_data(d.data)) for d in state.devices
        )
        return with_version(state, 2, devices=devices)

    def open_disk(self, dev: DeviceState) -> Storage:
        m = dev.medium
        if m.type != "file":
            raise StorageError(f"{dev.label}: countingdisk serves image files, not a {m.type} disk")
        storage = CountingStorage(m.target, m.size, m.access == "ro")
        storage.ops.update(dev.data.get("ops", {}))
        storage.bytes.update(dev.data.get("bytes", {}))
        storage.busy_ns = dev.data.get("busy_ns", 0)
        storage.upgraded_from = dev.data.get("upgraded_from", 0)
        return storage

    def save_device(self, dev: DeviceState, storage: Storage) -> dict[str, Any]:
        assert isinstance(storage, CountingStorage)
        return {
            "ops": dict(storage.ops),
            "bytes": dict(storage.bytes),
            "busy_ns": storage.busy_ns,
            "upgraded_from": storage.upgraded_from,
        }

    def statistics(self) -> dict[str, int | float | str]:
        out = super().statistics()
        for d in self.devices.values():
            s = d.storage
            assert isinstance(s, CountingStorage)
            out[f"{d.label}.reads"] = s.ops["read"]
            out[f"{d.label}.writes"] = s.ops["write"]
            out[f"{d.label}.bytes_read"] = s.bytes["read"]
            out[f"{d.label}.bytes_written"] = s.bytes["write"]
            out[f"{d.label}.busy_ms"] = round(s.busy_ns / 1e6, 1)
            out[f"{d.label}.upgraded_from"] = s.upgraded_from
        return out
