"""userfaultfd(2), the few calls a lazy restore needs (docs/snapshots.md, "Lazy restore").

A userfaultfd registered on a range of guest RAM in *missing* mode turns the first touch of
each page not yet there into a message on the descriptor instead of a zero page; the touching
thread (a vCPU inside unicorn, or kernel code) sleeps until someone puts the page in with
``UFFDIO_COPY`` or ``UFFDIO_ZEROPAGE``.  Those calls work from another process that holds the
descriptor (passed with ``SCM_RIGHTS``), which is how the kernel's pager process serves them.
Linux has done this for shared memory (tmpfs) since 4.11.

Only the kernel process and its pager use this module: no driver ever maps guest RAM.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Final

#: ``userfaultfd`` on x86-64.
_NR_USERFAULTFD: Final = 323
_UFFD_API: Final = 0xAA
_UFFD_USER_MODE_ONLY: Final = 1
# ioctl numbers (_IOWR/_IOR(0xAA, n, struct ...) from linux/userfaultfd.h)
_UFFDIO_API: Final = 0xC018AA3F
_UFFDIO_REGISTER: Final = 0xC020AA00
_UFFDIO_UNREGISTER: Final = 0x8010AA01
_UFFDIO_WAKE: Final = 0x8010AA02
_UFFDIO_COPY: Final = 0xC028AA03
_UFFDIO_ZEROPAGE: Final = 0xC020AA04
_USERFAULTFD_IOC_NEW: Final = 0xAA00
_MODE_MISSING: Final = 1
_EVENT_PAGEFAULT: Final = 0x12
#: struct uffd_msg: u8 event, 7 bytes reserved, then for a page fault u64 flags, u64 address.
MSG_SIZE: Final = 32
_MSG_ADDRESS: Final = struct.Struct("<Q")
_COPY: Final = struct.Struct("<QQQQq")  # dst, src, len, mode, copy (out)
_ZERO: Final = struct.Struct("<QQQq")  # range start, len, mode, zeropage (out)
_RANGE: Final = struct.Struct("<QQ")

_libc = ctypes.CDLL(None, use_errno=True)


class UffdError(Exception):
    """userfaultfd cannot be used here; the message says why."""


def open_uffd() -> int:
    """A new non-blocking, close-on-exec userfaultfd, API handshake done.  Tries the system
    call, then ``/dev/userfaultfd`` (the way for processes without CAP_SYS_PTRACE when
    ``vm.unprivileged_userfaultfd`` is 0)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    fd = _libc.syscall(_NR_USERFAULTFD, flags)
    if fd < 0:
        err = ctypes.get_errno()
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise UffdError(
                f"userfaultfd(2) failed ({os.strerror(err)}) and /dev/userfaultfd cannot be "
                f"opened ({e.strerror})"
            ) from None
        try:
            fd = fcntl.ioctl(dev, _USERFAULTFD_IOC_NEW, flags)
        except OSError as e:
            raise UffdError(f"/dev/userfaultfd refused a new descriptor: {e.strerror}") from None
        finally:
            os.close(dev)
    try:
        fcntl.ioctl(fd, _UFFDIO_API, bytearray(struct.pack("<QQQ", _UFFD_API, 0, 0)))
    except OSError as e:
        os.close(fd)
        raise UffdError(f"the userfaultfd API handshake failed: {e.strerror}") from None
    return int(fd)


def register_missing(fd: int, start: int, length: int) -> None:
    """Report first touches of missing pages in [start, start+length) (page-aligned)."""
    try:
        fcntl.ioctl(
            fd, _UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", start, length, _MODE_MISSING, 0))
        )
    except OSError as e:
        raise UffdError(
            f"cannot register guest RAM with userfaultfd: {e.strerror} (shared memory needs "
            "Linux 4.11 or later)"
        ) from None


def unregister(fd: int, start: int, length: int) -> None:
    """Stop reporting faults in the range; threads waiting in one retry it as an ordinary
    fault."""
    fcntl.ioctl(fd, _UFFDIO_UNREGISTER, _RANGE.pack(start, length))


def wake(fd: int, start: int, length: int) -> None:
    fcntl.ioctl(fd, _UFFDIO_WAKE, _RANGE.pack(start, length))


def copy(fd: int, dst: int, src: int, length: int) -> tuple[int, bool]:
    """Put ``length`` bytes from our address ``src`` at ``dst`` in the registered range, and
    wake the threads waiting for them.  Returns the bytes done and whether the page after them
    is already there (EEXIST: skip it); fewer bytes without that mean "go on from there"
    (EAGAIN, the mapping was changing).  OSError for anything else (ENOENT: the range is no
    longer registered, its domain is gone)."""
    arg = bytearray(_COPY.pack(dst, src, length, 0, 0))
    return _fill(fd, _UFFDIO_COPY, arg, length, lambda: _COPY.unpack(arg)[4])


def zeropage(fd: int, dst: int, length: int) -> tuple[int, bool]:
    """Map zeroed pages at ``dst``; returns as :func:`copy`."""
    arg = bytearray(_ZERO.pack(dst, length, 0, 0))
    return _fill(fd, _UFFDIO_ZEROPAGE, arg, length, lambda: _ZERO.unpack(arg)[3])


def _fill(
    fd: int, request: int, arg: bytearray, length: int, done: Callable[[], int]
) -> tuple[int, bool]:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as e:
        n = max(done(), 0)
        if e.errno == errno.EEXIST:
            return n, True
        if e.errno == errno.EAGAIN:
            return n, False
        raise
    return length, False


def read_faults(fd: int) -> list[int]:
    """The addresses of the page faults waiting on ``fd`` (none: an empty list)."""
    out: list[int] = []
    while True:
        try:
            data = os.read(fd, MSG_SIZE * 64)
        except BlockingIOError:
            return out
        for at in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
            if data[at] == _EVENT_PAGEFAULT:
                out.append(_MSG_ADDRESS.unpack_from(data, at + 16)[0])
        if len(data) < MSG_SIZE * 64:
            return out


def available() -> str | None:
    """None if this process can use userfaultfd on shared memory, else why not."""
    try:
        fd = open_uffd()
    except UffdError as e:
        return str(e)
    os.close(fd)
    return None
