"""Doorbells: the data path's wake-ups, as eventfds handed to a driver with ``SCM_RIGHTS``,
together with the device's shared-memory region.

Each device has two eventfds, made and owned by the kernel for the device's whole life (like
its shared-memory segment): the *kick* doorbell, which the kernel rings when the guest notifies
the device's port and the driver waits on, and the *notify* doorbell, which the driver rings
when it has published responses and the kernel waits on.  Ringing is one ``write(2)`` and
waking one ``read(2)``: no message is encoded, and no ZeroMQ I/O thread sits between the two
ends, which halves the thread hand-offs of a round trip (``bench/iopath.py``).  Several rings
before the other end looks count as one wake-up (the count is returned, for the flood check);
both ends re-read the ring after every wake-up, so nothing depends on how many there were.

ZeroMQ cannot carry file descriptors, so they travel over a Unix ``SOCK_SEQPACKET``
connection beside it: the kernel listens at :func:`path_for` its driver endpoint; a driver host
connects before its hello and says who it is (:func:`hello`); with each ``attach`` the kernel
first sends ``["bells", key]`` with three descriptors on that connection, the kick and notify
eventfds and the device's shared-memory segment (open read-write: the driver maps it with
``ipc.shm.Segment.from_fd`` and never opens it by name under /dev/shm), and then the ZeroMQ
``attach`` with ``"doorbells": true``.  The descriptors are queued in the driver's socket
before the attach can arrive, so the driver finds them without waiting.  Control (attach,
detach, faults, hot swap) stays on ZeroMQ.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Final

import msgpack

from ipc import fdpass

#: Largest message on the doorbell connection.
MAX_MESSAGE: Final = 256
#: Descriptors a ``bells`` message carries: kick, notify, segment.
BELL_FDS: Final = 3


def path_for(endpoint: str) -> str | None:
    """The doorbell socket beside a driver endpoint ``ipc://DIR/NAME.sock``: ``DIR/NAME.fds``
    (never longer than the endpoint's own path); None for other transports."""
    if not endpoint.startswith("ipc://"):
        return None
    return str(Path(endpoint[len("ipc://") :]).with_suffix(".fds"))


def make() -> int:
    """A new doorbell (non-blocking, closed on exec)."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def ring(fd: int) -> None:
    """Ring ``fd``.  A counter at its limit (2^64 - 2 rings nobody took) is rung already."""
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, 1)


def take(fd: int) -> int:
    """How many times ``fd`` rang since it was last taken (0: not at all)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def listen(path: str) -> socket.socket:
    """The kernel's doorbell socket at ``path`` (a stale file there is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def connect(path: str, name: str, pid: int) -> socket.socket:
    """A driver host's connection to the kernel's doorbell socket, introduced as
    ``name:pid`` (the sender its ZeroMQ messages carry)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        sock.send(hello(name, pid))
    except OSError:
        sock.close()
        raise
    return sock


def hello(name: str, pid: int) -> bytes:
    data: bytes = msgpack.packb(["bell", f"{name}:{pid}"])
    return data


def parse_hello(data: bytes) -> str | None:
    """The ``name:pid`` a connection's first message gives, or None if it is not one."""
    try:
        msg = msgpack.unpackb(data)
    except Exception:
        return None
    if isinstance(msg, list) and len(msg) == 2 and msg[0] == "bell" and isinstance(msg[1], str):
        return msg[1]
    return None


def send_bells(sock: socket.socket, key: int, kick: int, notify: int, segment: int) -> None:
    """Hand device ``key``'s two doorbells and its shared-memory segment (a descriptor open
    read-write on it) over ``sock`` (the kernel's end).  The kernel keeps its descriptors."""
    socket.send_fds(sock, [msgpack.packb(["bells", key])], [kick, notify, segment])


def receive_bells(sock: socket.socket) -> tuple[int, int, int, int] | None:
    """The next ``(key, kick, notify, segment)`` waiting on ``sock`` (a driver's end), or
    None if none is; the three descriptors are the caller's to close.  A message of another
    shape (not ``["bells", key]``, or not exactly three descriptors) is an error: its
    descriptors are closed."""
    # Room for one descriptor more than expected, so that a message with too many is seen
    # (what does not fit is dropped by the system, but one too many is enough to refuse it).
    got = fdpass.receive(sock, MAX_MESSAGE, BELL_FDS + 1)
    if got is None:
        return None
    data, fds = got
    if not data:
        raise ConnectionError("the kernel closed the doorbell connection")
    msg: Any
    try:
        msg = msgpack.unpackb(data)
    except Exception:
        msg = None
    if (
        isinstance(msg, list)
        and len(msg) == 2
        and msg[0] == "bells"
        and isinstance(msg[1], int)
        and not isinstance(msg[1], bool)
        and len(fds) == BELL_FDS
    ):
        return msg[1], fds[0], fds[1], fds[2]
    for fd in fds:
        os.close(fd)
    raise ValueError(
        f"malformed doorbell message {data[:64]!r} with {len(fds)} descriptors "
        f'(expected ["bells", key] with {BELL_FDS})'
    )
