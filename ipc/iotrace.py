"""Timestamps of the I/O path's stages, for ``bench/iopath.py``.

Off unless the environment variable ``ISOVISOR_IOTRACE`` names a directory when the module is
first imported; then every process that marks a stage (the kernel, each driver process, the
supervisor) writes
fixed-size records ``(t_ns, stage, key)`` into a memory-mapped file of its own,
``<dir>/<pid>.trace``.  ``t_ns`` is ``CLOCK_MONOTONIC``, one clock for every process of the
host, so the records of all processes merge into one timeline.  Records go into the page cache
as they are made: a process that is killed loses none, and no flush is needed.

A record costs a clock read and a ``pack_into`` (about half a microsecond); off, a mark is one
test of :data:`ON`.  Threads of one process take record slots from one counter (``next()`` on
``itertools.count`` is atomic under the GIL); :func:`read` drops the slots never written.

Two families of stages: the I/O path's (:data:`ON`, for ``bench/iopath.py``) and a driver
recovery's (:data:`RECOVERY`, for ``bench/recovery.py --trace``).  ``ISOVISOR_IOTRACE_WHAT``
picks one (``io`` or ``recovery``; both when unset), so a recovery trace under heavy I/O is not
drowned in, nor its records crowded out by, the I/O path's.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import time
from enum import IntEnum
from pathlib import Path
from typing import Final

ENV: Final = "ISOVISOR_IOTRACE"
RECORD: Final = struct.Struct("<qII")
#: Records per process (16 MiB of sparse file); later marks are dropped.
CAPACITY: Final = 1 << 20
#: Bytes of the file written when it is opened (16,384 records), so that a mark does not take
#: a page fault, which on a disk file system can cost milliseconds (a tmpfs directory, such as
#: one in /dev/shm, is cheaper still for the rest).
PREFAULT: Final = 256 << 10


class Stage(IntEnum):
    """Where a mark is made.  ``key`` is a device key unless the name says domid."""

    #: kernel, pCPU thread: the guest's HC_EVTCHN_SEND on a device port (before the doorbell)
    KICK = 1
    #: kernel, pCPU thread: the doorbell to the driver rung
    KICKED = 2
    #: driver: its loop woke up (key 0)
    DRIVER_WAKE = 3
    #: driver: ``backend.kick(key)`` called
    DRIVER_KICK = 4
    #: driver: the backend rang the guest's doorbell (``host.notify``)
    DRIVER_NOTIFY = 5
    #: kernel: a driver's notification taken by the kernel
    NOTIFIED = 6
    #: kernel: the event made pending and the domain woken or its vCPU stopped
    WOKEN = 7
    #: kernel, pCPU thread: a domain's vCPU about to run guest code (key = domid)
    RUN = 8
    #: kernel, pCPU thread: the guest blocked or polled until an event (key = domid)
    SLEEP = 9
    #: kernel, pCPU thread: an upcall entered (key = domid)
    UPCALL = 10

    # A driver recovery (key = the pid named, else a device key):
    #: supervisor: a driver's pidfd became readable (key = the dead pid)
    SV_DEATH = 20
    #: supervisor: ``activate`` sent to the spare (key = the spare's pid)
    SV_ACTIVATE = 21
    #: driver: the spare took ``activate`` (key = its pid)
    D_ACTIVATED = 22
    #: driver: ``hello`` sent (key = its pid)
    D_HELLO = 23
    #: kernel: the hello taken (key = the new pid)
    K_HELLO = 24
    #: kernel: every device's attach and frontend state queued for the new instance (key = pid)
    K_REATTACH = 25
    #: driver: an ``attach`` taken (key = device key)
    D_ATTACH = 26
    #: driver: a device resumed, its redone responses published (key = device key)
    D_RESUMED = 27
    #: kernel: a device's ``recovered`` taken (key = device key)
    K_RECOVERED = 28
    #: supervisor: the driver's ``replayed`` event taken (key = the new pid)
    SV_REPLAYED = 29


WHAT_ENV: Final = "ISOVISOR_IOTRACE_WHAT"
_what = os.environ.get(WHAT_ENV, "")
#: Mark the I/O path's stages (KICK .. UPCALL)?
ON: Final = bool(os.environ.get(ENV)) and _what in ("", "io")
#: Mark a recovery's stages (SV_DEATH .. SV_REPLAYED)?
RECOVERY: Final = bool(os.environ.get(ENV)) and _what in ("", "recovery")
_mm: mmap.mmap | None = None
_slots = itertools.count()
_pack = RECORD.pack_into
_size = RECORD.size


def _open() -> mmap.mmap:
    path = Path(os.environ[ENV]) / f"{os.getpid()}.trace"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, CAPACITY * _size)
        mm = mmap.mmap(fd, CAPACITY * _size)
    finally:
        os.close(fd)
    mm[:PREFAULT] = bytes(PREFAULT)  # the first marks must not pay for page faults
    return mm


def mark(stage: Stage, key: int = 0) -> None:
    """Record ``stage`` for ``key`` now (call only when :data:`ON`)."""
    global _mm, _slots
    t = time.monotonic_ns()
    if _mm is None or _mm_pid != os.getpid():
        _reopen()
    i = next(_slots)
    if i < CAPACITY:
        assert _mm is not None
        _pack(_mm, i * _size, t, stage, key & 0xFFFFFFFF)


_mm_pid = 0


def _reopen() -> None:
    """Open this process's file (again after a fork: a child must not write its parent's)."""
    global _mm, _slots, _mm_pid
    _mm = _open()
    _slots = itertools.count()
    _mm_pid = os.getpid()


def read(directory: str | Path) -> list[tuple[int, int, Stage, int]]:
    """Every record under ``directory``, as ``(t_ns, pid, stage, key)`` sorted by time."""
    out: list[tuple[int, int, Stage, int]] = []
    for path in Path(directory).glob("*.trace"):
        pid = int(path.stem)
        data = path.read_bytes()
        for t, stage, key in RECORD.iter_unpack(data[: len(data) - len(data) % _size]):
            if t and stage in Stage._value2member_map_:
                out.append((t, pid, Stage(stage), key))
    out.sort()
    return out


if ON or RECOVERY:  # open the file now: the first mark must not pay for opening it
    _reopen()
