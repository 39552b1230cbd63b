"""Named shared-memory segments under /dev/shm, without multiprocessing's resource tracker.

``multiprocessing.shared_memory`` registers every segment with a resource-tracker process that
unlinks it when *any* attaching process exits, and it starts that tracker as an extra child.
isovisor's segments have one owner (the kernel) and a known name prefix per stack, so the
supervisor can sweep them after a crash; a plain ``os.open`` + ``mmap`` is all that needs.

The owner opens a segment by name; a process it hands a segment to (a driver) gets a descriptor
instead (:meth:`Segment.open_fd` on the owner's side, passed with ``SCM_RIGHTS`` by
``ipc/doorbell.py``; :meth:`Segment.from_fd` on the other), so it never needs to open anything
under /dev/shm by path.

Invariant: a segment's mmap must not be closed while unicorn (or a ctypes pointer) still maps
it; :class:`Segment` keeps the ctypes anchor private and drops it in :meth:`close`.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import queue
import re
import stat
import threading
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class SegmentError(Exception):
    """A segment could not be created, attached or removed."""


class Segment:
    """One named shared-memory segment mapped into this process."""

    def __init__(self, name: str, size: int, *, create: bool, reserve_later: bool = False) -> None:
        """``reserve_later`` (with ``create``): map the segment sparse, for a caller that must
        not wait for the reservation (a restore) and that checked the filesystem has room to
        spare; it calls :meth:`reserve_in_background` once it has written what it had to (a
        reservation under way holds the file's lock: writes would wait for it)."""
        if not _NAME_RE.match(name):
            raise SegmentError(f"invalid shared-memory name {name!r}: use letters, digits, . _ -")
        self.name = name
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            raise SegmentError(
                f"shared-memory segment {self.path} already exists: another stack uses this "
                f"name, or a crashed one left it behind (if no stack uses it: rm {self.path})"
            ) from None
        except OSError as e:
            raise SegmentError(f"cannot open shared-memory segment {self.path}: {e}") from e
        try:
            st = os.fstat(fd)
            if create and reserve_later:
                os.ftruncate(fd, size)
            elif create:
                # Reserve every page now: a sparse segment on a full tmpfs would make the first
                # touch of a page SIGBUS the whole kernel process instead of failing here.
                os.posix_fallocate(fd, 0, size)
            else:
                size = st.st_size
            mm = mmap.mmap(fd, size)
        except OSError as e:
            os.close(fd)
            if create:
                self.path.unlink(missing_ok=True)
            free = os.statvfs(SHM_DIR)
            raise SegmentError(
                f"cannot allocate {size // (1024 * 1024)} MiB of shared memory for {self.path}: "
                f"{e.strerror} ({free.f_bavail * free.f_frsize // (1024 * 1024)} MiB free in "
                f"{SHM_DIR}); lower the domain's memory or enlarge {SHM_DIR}"
            ) from None
        os.close(fd)
        self._mapped(mm, size, st)

    def _mapped(self, mm: mmap.mmap, size: int, st: os.stat_result) -> None:
        """Take ``mm`` (``size`` bytes of the file ``st`` describes) as this segment's map."""
        self._mm: mmap.mmap | None = mm
        self.size = size
        #: (device, inode) of the segment's file, to tell it from a file put in its place.
        self._ident = (st.st_dev, st.st_ino)
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(self._anchor)

    @classmethod
    def from_fd(cls, fd: int, name: str) -> Segment:
        """The segment open at descriptor ``fd``, mapped whole for reading and writing: how a
        process its owner handed it to (``SCM_RIGHTS``) maps it without opening it by path.
        ``name`` is what messages call it (nothing is looked up by it).  The caller keeps
        ``fd`` and closes it when it likes: the mapping holds a reference of its own.
        SegmentError if ``fd`` is not open for reading and writing on a non-empty regular
        file, or cannot be mapped."""
        if not _NAME_RE.match(name):
            raise SegmentError(f"invalid shared-memory name {name!r}: use letters, digits, . _ -")
        what = f"shared-memory segment {name} (descriptor {fd})"
        try:
            st = os.fstat(fd)
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError as e:
            raise SegmentError(f"cannot map {what}: {e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise SegmentError(f"cannot map {what}: not a regular file")
        if mode != os.O_RDWR:
            raise SegmentError(f"cannot map {what}: not open for reading and writing")
        if st.st_size <= 0:
            raise SegmentError(f"cannot map {what}: it is empty")
        try:
            mm = mmap.mmap(fd, st.st_size)
        except (OSError, ValueError) as e:
            raise SegmentError(f"cannot map {what}: {e}") from None
        seg = cls.__new__(cls)
        seg.name = name
        seg.path = SHM_DIR / name
        seg._mapped(mm, st.st_size, st)
        return seg

    def open_fd(self) -> int:
        """A new descriptor on this segment (read-write, close-on-exec) for another process
        that must not open it by path (the kernel hands it to a driver); the caller closes
        it.  Only the owner calls this: it opens the segment's path.  SegmentError if that
        fails, or if the file there is no longer this segment's."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise SegmentError(f"cannot open shared-memory segment {self.path}: {e}") from e
        try:
            st = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise SegmentError(f"cannot open shared-memory segment {self.path}: {e}") from e
        if (st.st_dev, st.st_ino) != self._ident:
            os.close(fd)
            raise SegmentError(f"shared-memory segment {self.path} was replaced by another file")
        return fd

    def reserve_in_background(self) -> None:
        """Reserve every page of a segment made with ``reserve_later``, in a thread (one
        worker for all segments: starting a thread waits until it runs, which a loaded host
        makes a matter of milliseconds)."""
        _reserver().put((self.path, self.size))

    @property
    def buf(self) -> mmap.mmap:
        if self._mm is None:
            raise SegmentError(f"segment {self.name} is closed")
        return self._mm

    def close(self) -> None:
        """Unmap from this process (callers must have unmapped it from unicorn first)."""
        if self._mm is None:
            return
        self._anchor = None
        self._mm.close()
        self._mm = None

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


def sweep(prefix: str) -> list[str]:
    """Remove every segment whose name starts with ``prefix``; return the names removed."""
    removed = []
    if not prefix:
        raise SegmentError("refusing to sweep shared memory with an empty prefix")
    for p in SHM_DIR.glob(prefix + "*"):
        try:
            p.unlink()
            removed.append(p.name)
        except FileNotFoundError:
            pass
    return removed


_RESERVER: queue.SimpleQueue[tuple[Path, int]] | None = None
_RESERVER_LOCK = threading.Lock()


def _reserver() -> queue.SimpleQueue[tuple[Path, int]]:
    global _RESERVER
    with _RESERVER_LOCK:
        if _RESERVER is None:
            q: queue.SimpleQueue[tuple[Path, int]] = queue.SimpleQueue()
            threading.Thread(target=_reserve_all, args=(q,), name="reserve", daemon=True).start()
            _RESERVER = q
        return _RESERVER


def _reserve_all(q: queue.SimpleQueue[tuple[Path, int]]) -> None:
    while True:
        _reserve(*q.get())


def _reserve(path: Path, size: int) -> None:
    """Reserve every page of a segment made with ``reserve_later`` (a background thread)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # already removed
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        logging.getLogger("isovisor.shm").warning(
            "could not reserve the pages of %s (%s): a full %s could now fail it", path, e, SHM_DIR
        )
    finally:
        os.close(fd)


def room_for(size: int, factor: int = 2) -> bool:
    """Does the shared-memory filesystem have ``factor`` times ``size`` bytes free?"""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize >= factor * size
