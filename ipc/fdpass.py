"""Receiving file descriptors over a Unix socket (``SCM_RIGHTS``), without blocking.

``socket.recv_fds`` cannot be used for that before Python 3.12: it drops its ``flags``
argument, so ``MSG_DONTWAIT`` is lost and the call blocks.  The kernel's pager
(``kernel/pager.py``) and the driver hosts' doorbells (``ipc/doorbell.py``) both read here.
"""

from __future__ import annotations

import array
import os
import socket
from typing import Final

_INT: Final = array.array("i")


def receive(sock: socket.socket, max_bytes: int, max_fds: int) -> tuple[bytes, list[int]] | None:
    """The next message waiting on ``sock`` and the descriptors that came with it (opened
    close-on-exec); None if nothing is waiting.  An empty message is the peer's end (any
    descriptors with it are closed, and none returned)."""
    try:
        data, ancdata, _, _ = sock.recvmsg(
            max_bytes,
            socket.CMSG_SPACE(max_fds * _INT.itemsize),
            socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
        )
    except BlockingIOError:
        return None
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return b"", []
    return data, list(fds)
