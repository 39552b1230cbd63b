"""Named shared-memory segments under /dev/shm, without multiprocessing's resource tracker.

``multiprocessing.shared_memory`` registers every segment with a resource-tracker process that
unlinks it when *any* attaching process exits, and it starts that tracker as an extra child.
isovisor's segments have one owner (the kernel) and a known name prefix per stack, so the
supervisor can sweep them after a crash; a plain ``os.open`` + ``mmap`` is all that needs.

Invariant: a segment's mmap must not be closed while unicorn (or a ctypes pointer) still maps
it; :class:`Segment` keeps the ctypes anchor private and drops it in :meth:`close`.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import queue
import re
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
            if create and reserve_later:
                os.ftruncate(fd, size)
            elif create:
                # Reserve every page now: a sparse segment on a full tmpfs would make the first
                # touch of a page SIGBUS the whole kernel process instead of failing here.
                os.posix_fallocate(fd, 0, size)
            else:
                size = os.fstat(fd).st_size
            self._mm: mmap.mmap | None = mmap.mmap(fd, size)
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
        self.size = size
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._mm)
        self.address = ctypes.addressof(self._anchor)

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
