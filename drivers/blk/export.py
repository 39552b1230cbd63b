"""Keeping a block state's medium current when an implementation stores data its own way.

The rule this module enforces (docs/sdk.md, "Data in a format of your own"): **the medium a
block state names holds every write a guest was told was done, in raw form** (byte ``i`` of the
disk at byte ``i`` of the medium).  A rollback, a swap to another implementation and the next
start of the stack all hand a device over by that medium alone; an implementation that keeps
the data elsewhere (compressed, encrypted, in a log) must never be able to break it, even if
it is killed with SIGKILL and no code of its own runs again.

:func:`raw_view` tells whether a ``Storage`` reads and writes the medium itself (an
``_FdStorage`` from ``open_medium``, or any storage with an ``fd`` on the same file).  Every
other storage is *opaque*, and the framework serves it through :class:`Exported`:

* **write-through while a rollback is possible** (from the restore of a hot swap until the
  swap is committed): every write and discard is applied to the opaque storage and then to the
  medium, before the guest's response is published.  Nothing has to run after a crash: the
  medium the rollback state names is already current.
* **a dirty map afterwards**: each write or discard first marks its 4 KiB blocks in a map kept
  in tmpfs beside the device's scratch disk (``/dev/shm/<scratch>.dirty``, one byte a block),
  so the marks outlive a crash of the driver process; :meth:`Exported.export` copies the
  marked blocks from the opaque storage to the medium and clears them.  The framework exports
  when the state is saved (a swap drains the backend) and when a device goes for good (the
  domain is destroyed, the stack stops), so the next owner finds the data in the medium.

The kernel removes the dirty map with the device (kernel/devices.py).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

from drivers.blk.storage import SHM_DIR, Storage, StorageError, open_medium
from drivers.state import Medium

#: The dirty map's grain: one byte per block of this many bytes.
BLOCK = 4096
_COPY = 1 << 20


def _medium_path(m: Medium) -> Path:
    return SHM_DIR / m.target if m.type == "memory" else Path(m.target)


def raw_view(storage: Storage, medium: Medium) -> bool:
    """Does ``storage`` read and write ``medium``'s bytes directly (an ``fd`` on that very
    file)?  False for any other storage: the framework then keeps ``medium`` current itself."""
    fd = getattr(storage, "fd", None)
    if not isinstance(fd, int) or isinstance(fd, bool):
        return False
    try:
        mine = os.fstat(fd)
        theirs = os.stat(_medium_path(medium))
    except (OSError, StorageError):
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def dirty_map_path(scratch: str) -> Path | None:
    """Where the dirty map of the device with scratch disk ``scratch`` lives (None: no
    scratch name, so no map can outlive the process)."""
    return SHM_DIR / f"{scratch}.dirty" if scratch else None


def mirror_map_path(scratch: str) -> Path | None:
    """Where the write map of a disk that a migration copies along lives (``--with-disks``,
    docs/migration.md): one byte per :data:`BLOCK`, set by the driver after each write or
    discard, cleared by the kernel before it reads the block to send it."""
    return SHM_DIR / f"{scratch}.mirror" if scratch else None


class DirtyMap:
    """One byte per :data:`BLOCK` of a disk of ``size`` bytes: 1 where the opaque storage
    holds a write the medium has not got yet.  In tmpfs (``path``) so that a replacement
    instance sees what a crashed one left unexported; in memory if there is no path."""

    def __init__(self, path: Path | None, size: int) -> None:
        self.blocks = (size + BLOCK - 1) // BLOCK
        self.path = path
        self._fd = -1
        if path is None:
            self._map: mmap.mmap | bytearray = bytearray(self.blocks)
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            had = os.fstat(fd).st_size
            if had != self.blocks:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, self.blocks)
                if had:  # left by a disk of another size: every block is suspect
                    os.pwrite(fd, b"\x01" * self.blocks, 0)
            self._map = mmap.mmap(fd, self.blocks)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def mark(self, offset: int, length: int) -> None:
        first, last = offset // BLOCK, (offset + max(length, 1) - 1) // BLOCK
        self._map[first : last + 1] = b"\x01" * (last - first + 1)

    def runs(self) -> list[tuple[int, int]]:
        """The marked blocks as (first block, count) runs."""
        out: list[tuple[int, int]] = []
        m, i = self._map, 0
        while True:
            i = m.find(b"\x01", i)
            if i < 0:
                return out
            j = m.find(b"\x00", i)
            j = self.blocks if j < 0 else j
            out.append((i, j - i))
            i = j

    def clear(self, first: int, count: int) -> None:
        self._map[first : first + count] = bytes(count)

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Exported(Storage):
    """An opaque storage served so that ``medium`` stays current (the module docstring).
    ``through``: write-through (a rollback is possible), else dirty-map mode."""

    def __init__(
        self,
        inner: Storage,
        medium: Medium,
        dirty: DirtyMap,
        *,
        through: bool,
        log: logging.Logger,
        label: str,
    ) -> None:
        self.inner = inner
        self.medium = medium
        self.size = inner.size
        self.readonly = inner.readonly
        self.dirty = dirty
        self.log = log
        self.label = label
        self._mirror: Storage | None = None
        if through:
            self._mirror = self._open_medium()

    def __repr__(self) -> str:
        how = "written through to" if self._mirror is not None else "exported to"
        return f"{self.inner!r}, {how} {self.medium.type} {self.medium.target}"

    @property
    def through(self) -> bool:
        return self._mirror is not None

    def _open_medium(self) -> Storage:
        m = Medium(self.medium.type, self.medium.target, self.size, "rw")
        try:
            return open_medium(m)
        except StorageError as e:
            raise StorageError(
                f"device {self.label}: its data must also be kept in raw form in the medium "
                f"its state names ({m.type} {m.target}), which cannot be opened: {e}"
            ) from None

    # -- Storage ---------------------------------------------------------------------------
    def read_into(self, offset: int, buf: memoryview) -> None:
        self.inner.readv_into(offset, (buf,))

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.inner.readv_into(offset, bufs)

    def write_from(self, offset: int, buf: memoryview) -> None:
        self.writev_from(offset, (buf,))

    def writev_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        mirror = self._mirror
        if mirror is None:
            self.dirty.mark(offset, sum(len(b) for b in bufs))
            self.inner.writev_from(offset, bufs)
            return
        self.inner.writev_from(offset, bufs)
        mirror.writev_from(offset, bufs)

    def discard(self, offset: int, length: int) -> None:
        mirror = self._mirror
        if mirror is None:
            self.dirty.mark(offset, length)
            self.inner.discard(offset, length)
            return
        self.inner.discard(offset, length)
        mirror.discard(offset, length)

    def flush(self) -> None:
        self.inner.flush()
        if self._mirror is not None:
            self._mirror.flush()

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.end()

    def end(self) -> None:
        """Stop serving: the medium and the dirty map are let go (the opaque storage is the
        implementation's to close, in ``release_disk``)."""
        self._end_mirror()
        self.dirty.close()

    # -- the framework's -------------------------------------------------------------------
    def _end_mirror(self) -> None:
        mirror, self._mirror = self._mirror, None
        if mirror is not None:
            mirror.close()

    def commit(self) -> None:
        """The swap is final: no rollback needs the medium any more; keep it current by the
        dirty map from now on (it is current now: nothing is marked)."""
        if self._mirror is not None:
            self._mirror.flush()
            self._end_mirror()

    def export(self) -> int:
        """Bring the medium up to date: the blocks marked dirty copied from the opaque
        storage, then cleared.  Returns the bytes copied (0 while writing through)."""
        if self._mirror is not None:
            self._mirror.flush()
            return 0
        runs = self.dirty.runs()
        if not runs:
            return 0
        target = self._open_medium()
        copied = 0
        try:
            buf = bytearray(_COPY)
            view = memoryview(buf)
            for first, count in runs:
                start = first * BLOCK
                end = min(self.size, (first + count) * BLOCK)
                pos = start
                while pos < end:
                    n = min(_COPY, end - pos)
                    self.inner.readv_into(pos, (view[:n],))
                    target.writev_from(pos, (view[:n],))
                    pos += n
                copied += end - start
            target.flush()
        finally:
            target.close()
        for first, count in runs:
            self.dirty.clear(first, count)
        self.log.info(
            "device %s: %d bytes in %d run(s) exported to %s %s",
            self.label,
            copied,
            len(runs),
            self.medium.type,
            self.medium.target,
        )
        return copied


__all__ = ["BLOCK", "DirtyMap", "Exported", "dirty_map_path", "raw_view"]
