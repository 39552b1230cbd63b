"""Disk images behind a block backend: a file (or block device) on the host, or a memory disk.

All I/O goes straight between the image's file descriptor and the caller's memoryviews
(``os.preadv``/``os.pwritev``), so a request's data is copied once, by the kernel, between the
page cache and the guest's device region.

Images are locked like QEMU locks them (``flock``): a writable open takes an exclusive lock, a
read-only open a shared one, so two devices can never write one image at the same time.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from drivers.state import Medium
from ipc.blkif import SECTOR_SIZE

SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20


class StorageError(Exception):
    """An image cannot be opened or created; the message says which and why."""


class ReadOnlyError(StorageError):
    """A write or discard on a read-only disk."""


def _fallocate_function() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _fallocate_function()


class Storage:
    """A disk of ``size`` bytes.  Offsets and lengths are in bytes; the backend keeps them
    within ``size`` and sector-aligned."""

    size: int
    readonly: bool

    @property
    def sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def read_into(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order from consecutive bytes starting at ``offset``."""
        for b in bufs:
            self.read_into(offset, b)
            offset += len(b)

    def write_from(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def writev_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            self.write_from(offset, b)
            offset += len(b)

    def flush(self) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _FdStorage(Storage):
    """Storage over a file descriptor: a regular file, a block device or a tmpfs file."""

    def __init__(self, fd: int, size: int, readonly: bool, what: str) -> None:
        self._fd = fd
        self.size = size
        self.readonly = readonly
        self.what = what
        self._punch = _fallocate is not None

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<{type(self).__name__} {self.what} {self.size} bytes {mode}>"

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise StorageError(f"{self.what} is closed")
        return self._fd

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.readv_into(offset, (buf,))

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        want = sum(len(b) for b in bufs)
        got = os.preadv(self.fd, bufs, offset)
        if got == want:
            return
        # A short read: finish buffer by buffer; past the end of the image reads zeros.
        for b in bufs:
            n = len(b)
            done = min(got, n)
            got -= done
            offset += done
            while done < n:
                k = os.preadv(self._fd, (b[done:],), offset)
                if k == 0:
                    b[done:] = bytes(n - done)
                    offset += n - done
                    break
                done += k
                offset += k

    def write_from(self, offset: int, buf: memoryview) -> None:
        self.writev_from(offset, (buf,))

    def writev_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.what} is read-only")
        want = sum(len(b) for b in bufs)
        put = os.pwritev(self.fd, bufs, offset)
        if put == want:
            return
        for b in bufs:
            n = len(b)
            done = min(put, n)
            put -= done
            offset += done
            while done < n:
                k = os.pwritev(self._fd, (b[done:],), offset)
                done += k
                offset += k

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (it reads back as zeros afterwards)."""
        if self.readonly:
            raise ReadOnlyError(f"{self.what} is read-only")
        fd = self.fd
        if self._punch and _fallocate is not None:
            if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, f"discard on {self.what}: {os.strerror(err)}")
            self._punch = False  # the file system cannot punch holes: write zeros from now on
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            k = os.pwrite(fd, zeros[: min(len(zeros), end - offset)], offset)
            offset += k

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # also drops the flock


def _open_image(
    path: Path, size: int | None, readonly: bool, what: str, create_missing: bool
) -> tuple[int, int]:
    """Open (creating it sparse if allowed and missing) and lock an image; (fd, size)."""
    if size is not None and (size <= 0 or size % SECTOR_SIZE):
        raise StorageError(f"{what}: size {size} is not a positive multiple of {SECTOR_SIZE} bytes")
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    created = False
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if not create_missing:
            raise StorageError(
                f"{what} does not exist (a read-only disk is never created)"
            ) from None
        if size is None:
            raise StorageError(
                f"{what} does not exist and no size was given to create it: give size=... (bytes)"
            ) from None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot create {what}: {e.strerror}") from None
        created = True
    except OSError as e:
        raise StorageError(f"cannot open {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            actual = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            actual = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise StorageError(f"{what} is neither a regular file nor a block device")
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(
                f"{what} is in use: another disk has it open "
                f"{'for writing' if readonly else ''}".rstrip()
            ) from None
        if created:
            assert size is not None
            os.ftruncate(fd, size)  # sparse: blocks are allocated as the guest writes
            if readonly:
                os.close(fd)
                return _open_image(path, size, readonly, what, create_missing=False)
            return fd, size
        if size is not None and actual != size:
            raise StorageError(
                f"{what} is {actual} bytes but the disk is configured with size "
                f"{size}; fix the size or remove the image"
            )
        if actual < SECTOR_SIZE:
            raise StorageError(
                f"{what} is {actual} bytes, smaller than one {SECTOR_SIZE}-byte sector"
            )
        return fd, actual
    except StorageError:
        os.close(fd)
        if created:
            path.unlink(missing_ok=True)
        raise
    except OSError as e:
        os.close(fd)
        if created:
            path.unlink(missing_ok=True)
        raise StorageError(f"cannot set up {what}: {e.strerror}") from None


class FileStorage(_FdStorage):
    """An image file (or block device) on the host.  A missing image is created sparse at
    ``size``; an existing one must have that size if ``size`` is given."""

    def __init__(
        self, path: str | os.PathLike[str], size: int | None = None, readonly: bool = False
    ) -> None:
        p = Path(path)
        what = f"image {p}"
        fd, actual = _open_image(p, size, readonly, what, create_missing=not readonly)
        super().__init__(fd, actual, readonly, what)
        self.path = p


class MemoryStorage(_FdStorage):
    """A memory disk: a tmpfs file ``/dev/shm/<shm_name>``, created (zero-filled, sparse) at
    ``size`` or reopened if a previous driver instance created it.  Its owner (the kernel)
    removes it; :meth:`close` does not."""

    def __init__(self, shm_name: str, size: int | None = None, readonly: bool = False) -> None:
        if not _SHM_NAME.match(shm_name):
            raise StorageError(
                f"invalid memory-disk name {shm_name!r}: use 1-200 letters, digits, '.', '_', '-'"
            )
        p = SHM_DIR / shm_name
        what = f"memory disk {p}"
        fd, actual = _open_image(p, size, readonly, what, create_missing=True)
        super().__init__(fd, actual, readonly, what)
        self.path = p


def open_storage(disk: dict[str, Any]) -> Storage:
    """Open the disk an ``attach`` message describes (StorageError if impossible)."""
    if not isinstance(disk, dict):
        raise StorageError(f"disk description must be a mapping, got {disk!r}")
    kind = disk.get("type")
    access = disk.get("access", "rw")
    target = disk.get("target")
    size = disk.get("size")
    if access not in ("rw", "ro"):
        raise StorageError(f"disk access {access!r} is neither 'rw' nor 'ro'")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise StorageError(f"disk size {size!r} is not an integer")
    if not isinstance(target, str) or not target:
        raise StorageError(f"disk target {target!r} must be a non-empty string")
    readonly = access == "ro"
    if kind == "file":
        if not target.startswith("/"):
            raise StorageError(f"image path {target!r} is not absolute")
        return FileStorage(target, size, readonly)
    if kind == "memory":
        return MemoryStorage(target, size, readonly)
    raise StorageError(f"disk type {kind!r} is neither 'file' nor 'memory'")


def open_medium(m: Medium) -> Storage:
    """Open the disk ``m`` names (StorageError if impossible)."""
    return open_storage(m.to_wire())
