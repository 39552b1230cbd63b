"""What a block device carries across a hot swap (docs/hotswap.md, docs/sdk.md).

A disk's saved state (``isovisor.blk``, version 1) is a :class:`~drivers.state.DeviceState`:
``home`` the configured disk, ``scratch`` the memory disk the kernel reserves for the device,
``medium`` where the data is now, and ``data`` what the implementation's ``save_device``
returned (no counters: they restart with each instance).  This module builds the state of a
device being attached, moves data between media, and tidies a scratch disk up once a swap is
final.  Version 1 is the only layout so far, so there is no older state to upgrade: a
``BlockBackend`` refuses any other version (the base's ``upgrade_state``), and an
implementation that changes the layout of its own ``data`` upgrades it (docs/sdk.md, "State
versions and the upgrade hook").
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from typing import Any

from drivers.blk.storage import SHM_DIR, StorageError, _FdStorage, open_medium
from drivers.devicebackend import Attach
from drivers.state import DeviceState, Medium

_COPY_CHUNK = 4 << 20


def device_state(a: Attach, disk: dict[str, Any], saved: DeviceState | None) -> DeviceState:
    """The device ``a`` attaches (its ``disk`` the configured one), with its data where a
    restore left it (``saved``), if any.  StateError if ``disk`` is malformed."""
    home = Medium.from_wire(disk, "the attach message's disk")
    if saved is None:
        return DeviceState(a.key, a.label, home, a.scratch, home)
    return dataclasses.replace(saved, label=a.label, home=home, scratch=a.scratch)


def move_home(saved: DeviceState, log: logging.Logger) -> DeviceState:
    """``saved`` with its data on its home disk: copied there if another implementation kept
    it elsewhere."""
    if saved.medium.same_place(saved.home):
        return saved
    n = copy_medium(saved.medium, saved.home)
    log.info(
        "device %d (%s): %d bytes moved from %s %s to its disk %s",
        saved.key,
        saved.label,
        n,
        saved.medium.type,
        saved.medium.target,
        saved.home.target,
    )
    return dataclasses.replace(saved, medium=saved.home)


def drop_scratch(dev: DeviceState, medium: Medium, log: logging.Logger) -> None:
    """Remove ``dev``'s scratch memory disk if it no longer holds the data (``medium``): the
    copy a previous implementation kept there, which no rollback can need any more."""
    if not dev.scratch or medium.same_place(Medium("memory", dev.scratch)):
        return
    path = SHM_DIR / dev.scratch
    if path.exists():
        path.unlink(missing_ok=True)
        log.info(
            "device %d (%s): the memory copy %s of the previous implementation removed",
            dev.key,
            dev.label,
            dev.scratch,
        )


def copy_medium(src: Medium, dst: Medium) -> int:
    """Copy every byte of ``src`` over ``dst`` (a memory ``dst`` is created afresh, of the
    same size); the bytes copied.  Both are locked while copying, as any open is."""
    source = open_medium(Medium(src.type, src.target, None, "ro"))
    try:
        size = source.size
        if dst.type == "memory":
            (SHM_DIR / dst.target).unlink(missing_ok=True)
        target = open_medium(Medium(dst.type, dst.target, size, "rw"))
        try:
            if target.size != size:
                raise StorageError(
                    f"cannot copy {src.target} ({size} bytes) over {dst.target} "
                    f"({target.size} bytes): the sizes differ"
                )
            assert isinstance(source, _FdStorage) and isinstance(target, _FdStorage)
            _copy_fd(source.fd, target.fd, size, f"copying {src.target} to {dst.target}")
            return size
        finally:
            target.close()
    finally:
        source.close()


def _copy_fd(src: int, dst: int, size: int, what: str) -> None:
    """Copy ``size`` bytes from offset 0 of ``src`` to ``dst``: in the kernel where it can
    (copy_file_range; sendfile across file systems), else through one buffer."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, done)
            if n <= 0:
                raise StorageError(f"{what}: unexpected end at byte {done} of {size}")
            done += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    try:  # across file systems: sendfile still copies in the kernel
        os.lseek(dst, done, os.SEEK_SET)
        while done < size:
            n = os.sendfile(dst, src, done, size - done)
            if n <= 0:
                raise StorageError(f"{what}: unexpected end at byte {done} of {size}")
            done += n
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    buf = bytearray(min(_COPY_CHUNK, size))
    view = memoryview(buf)
    while done < size:
        n = os.preadv(src, [view[: min(len(buf), size - done)]], done)
        if n <= 0:
            raise StorageError(f"{what}: unexpected end at byte {done} of {size}")
        k = 0
        while k < n:
            k += os.pwrite(dst, view[k:n], done + k)
        done += n
