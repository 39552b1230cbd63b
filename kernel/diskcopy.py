"""Disk images copied along with a live migration (``isovisor migrate --with-disks``, as QEMU's
drive-mirror; docs/migration.md, "Disks").

The source's kernel reads a file disk's image while the guest runs and its driver writes it.
The driver marks each block it wrote in the device's *write map* (one byte per 4 KiB block in
tmpfs, ``/dev/shm/<scratch>.mirror``; drivers/blk/backend.py ``mirror_writes``) after the write
is done; :class:`DiskCopy` clears a block's mark *before* it reads the block.  So a write is
either done before the read (the read sees it) or marked after the clear (the block goes again
in a later round); none is missed.  Round 0 sends every block that holds data (holes and
blocks of zeroes stay holes at the destination); each later round, the marked blocks; the
stop-and-copy, once the driver has let the device go, the last marks.

:class:`DiskReceiver` is the destination's side: one image file per disk, written as
``<name>.partial`` and renamed into place only when the guest is committed there.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

#: The grain of the write map and of what is sent.
BLOCK: Final = 4096
#: Blocks per message frame at most (1 MiB).
RUN_BLOCKS: Final = 256
_ZERO: Final = bytes(BLOCK)


class DiskCopyError(Exception):
    """A disk cannot be copied or received; the message says which and why."""


def _runs(marks: bytes | mmap.mmap, value: bytes) -> Iterator[tuple[int, int]]:
    """(first, count) runs of bytes equal to ``value`` (one byte), at most RUN_BLOCKS long."""
    other = b"\x00" if value == b"\x01" else b"\x01"
    n, i = len(marks), 0
    while True:
        i = marks.find(value, i)
        if i < 0:
            return
        j = marks.find(other, i)
        j = n if j < 0 else j
        for k in range(i, j, RUN_BLOCKS):
            yield k, min(RUN_BLOCKS, j - k)
        i = j


class DiskCopy:
    """One file disk of a migrating domain: its image (opened read-only here) and the write
    map its driver keeps once asked (:meth:`open_map`, after the driver said ``on``)."""

    def __init__(
        self, vdev: str, image: str, write_map: Path | None = None, *, memory: bool = False
    ) -> None:
        self.vdev, self.image, self.map_path = vdev, image, write_map
        #: A memory disk (its data in a shared-memory file of the source stack).
        self.memory = memory
        try:
            self.fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DiskCopyError(f"disk {vdev}: cannot read its image {image}: {e}") from None
        self.size = os.fstat(self.fd).st_size
        self.blocks = (self.size + BLOCK - 1) // BLOCK
        self._map: mmap.mmap | None = None
        self.blocks_sent = 0

    def open_map(self) -> None:
        if self.map_path is None:
            raise DiskCopyError(f"disk {self.vdev}: no write map to open")
        try:
            fd = os.open(self.map_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DiskCopyError(f"disk {self.vdev}: its driver's write map: {e}") from None
        try:
            if os.fstat(fd).st_size != self.blocks:
                raise DiskCopyError(
                    f"disk {self.vdev}: the write map {self.map_path} has "
                    f"{os.fstat(fd).st_size} entries for {self.blocks} blocks of {self.image}"
                )
            self._map = mmap.mmap(fd, self.blocks)
        finally:
            os.close(fd)

    def _read(self, first: int, count: int) -> bytes:
        return os.pread(self.fd, count * BLOCK, first * BLOCK)

    def initial(self) -> Iterator[tuple[int, int, bytes]]:
        """(first block, count, data) of every run of blocks that hold something: the
        image's data extents (SEEK_DATA), without the blocks of zeroes in them."""
        for start, end in self._extents():
            for first in range(start, end, RUN_BLOCKS):
                count = min(RUN_BLOCKS, end - first)
                data = self._read(first, count)
                chunks = (data[k * BLOCK : (k + 1) * BLOCK] for k in range(count))
                nonzero = bytes(c != _ZERO[: len(c)] for c in chunks)
                for a, n in _runs(nonzero, b"\x01"):
                    self.blocks_sent += n
                    yield first + a, n, data[a * BLOCK : (a + n) * BLOCK]

    def _extents(self) -> Iterator[tuple[int, int]]:
        """[start, end) block ranges that may hold data (the whole image where the file
        system cannot tell holes)."""
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    return
                yield 0, self.blocks  # no SEEK_DATA here: everything
                return
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            yield start // BLOCK, min(self.blocks, (end + BLOCK - 1) // BLOCK)
            pos = end

    def marked(self) -> int:
        """Blocks written since they were last sent."""
        return 0 if self._map is None else self._map[:].count(1)

    def dirty(self) -> Iterator[tuple[int, int, bytes]]:
        """(first, count, data) of the blocks written since they were last sent; each run's
        marks are cleared before it is read."""
        m = self._map
        if m is None:
            return
        for first, count in list(_runs(m, b"\x01")):
            m[first : first + count] = bytes(count)
            self.blocks_sent += count
            yield first, count, self._read(first, count)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class DiskReceiver:
    """The destination's copy of one disk: ``final`` written as ``final.partial`` until
    :meth:`commit` renames it into place (:meth:`discard` removes it instead)."""

    def __init__(self, vdev: str, final: Path, size: int) -> None:
        self.vdev, self.final, self.size = vdev, final, size
        self.partial = final.with_name(final.name + ".partial")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(
                self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise DiskCopyError(f"disk {vdev}: cannot create {self.partial}: {e}") from None
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            self.discard()
            raise DiskCopyError(f"disk {vdev}: cannot size {self.partial}: {e}") from None
        self.blocks = 0

    def write(self, first: int, count: int, data: bytes | memoryview) -> None:
        off = first * BLOCK
        if not (
            first >= 0
            and 1 <= count <= RUN_BLOCKS
            and (count - 1) * BLOCK < len(data) <= count * BLOCK
            and off + len(data) <= self.size
        ):
            raise DiskCopyError(
                f"disk {self.vdev}: block run {first}+{count} of {len(data)} bytes does not "
                f"fit its {self.size} bytes"
            )
        os.pwrite(self.fd, data, off)
        self.blocks += count

    def commit(self) -> None:
        """Make the copy durable and put it in place."""
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.partial, self.final)

    def discard(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.partial.unlink(missing_ok=True)
