"""countingdisk: a block backend that serves each disk from its image file and counts what it
does, per device.  The example of the driver SDK tutorial (docs/sdk.md).

Run it in place of ``drivers.blk``, under running guests::

    isovisor driver swap blk0 --to-file examples/sdk/countingdisk.py
    isovisor driver stats blk0
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from drivers.sdk import BlockBackend, DeviceState, Storage, StorageError

COUNTERS = ("reads", "writes", "bytes_read", "bytes_written", "flushes", "discards")


class CountingStorage(Storage):
    """One image file, read and written with preadv/pwritev, and what was done to it."""

    def __init__(self, path: str, size: int | None, readonly: bool) -> None:
        flags = (os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open image {path}: {e.strerror}") from None
        actual = os.fstat(self.fd).st_size
        if actual == 0 and size and not readonly:
            os.ftruncate(self.fd, size)  # a new image: sparse, at the configured size
            actual = size
        if size is not None and actual != size:
            os.close(self.fd)
            raise StorageError(
                f"image {path} is {actual} bytes, but the disk is configured with size {size}"
            )
        self.path, self.size, self.readonly = path, actual, readonly
        self.counts = dict.fromkeys(COUNTERS, 0)

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        n = os.preadv(self.fd, bufs, offset)
        if n != sum(len(b) for b in bufs):
            raise StorageError(f"short read at byte {offset} of {self.path}")
        self.counts["reads"] += 1
        self.counts["bytes_read"] += n

    def writev_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        n = os.pwritev(self.fd, bufs, offset)
        if n != sum(len(b) for b in bufs):
            raise StorageError(f"short write at byte {offset} of {self.path}")
        self.counts["writes"] += 1
        self.counts["bytes_written"] += n

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.readv_into(offset, [buf])

    def write_from(self, offset: int, buf: memoryview) -> None:
        self.writev_from(offset, [buf])

    def flush(self) -> None:
        os.fdatasync(self.fd)
        self.counts["flushes"] += 1

    def discard(self, offset: int, length: int) -> None:
        os.pwrite(self.fd, bytes(length), offset)  # reads as zeros from now on
        self.counts["discards"] += 1

    def close(self) -> None:
        os.close(self.fd)


class CountingDisk(BlockBackend):
    """Serve each device's image file through a :class:`CountingStorage`."""

    def open_disk(self, dev: DeviceState) -> Storage:
        m = dev.medium  # where the data is now: the configured image (dev.home) here
        if m.type != "file":
            raise StorageError(f"{dev.label}: countingdisk serves image files, not a {m.type} disk")
        storage = CountingStorage(m.target, m.size, m.access == "ro")
        storage.counts.update(dev.data.get("counts", {}))  # carried over by a hot swap
        return storage

    def save_device(self, dev: DeviceState, storage: Storage) -> dict[str, Any]:
        assert isinstance(storage, CountingStorage)
        return {"counts": dict(storage.counts)}  # becomes dev.data of the next backend

    def statistics(self) -> dict[str, int | float | str]:
        out = super().statistics()  # devices, requests, errors, batches, notifications
        for d in self.devices.values():
            assert isinstance(d.storage, CountingStorage)
            for k in ("reads", "writes", "bytes_read", "bytes_written"):
                out[f"{d.label}.{k}"] = d.storage.counts[k]
        return out
