"""The console driver's two ZeroMQ endpoints in ``socket_dir`` (docs/console.md): live output
(PUB, ``console.pub``) and input (PULL, ``console.in``).

Live readers: each append is one message of three frames, the domain's name (UTF-8; subscribe
to it, and compare the frame exactly, since ZeroMQ topics match by prefix), the offset in the
log file where the bytes start (u64, little-endian) and the bytes.  Offsets of one domain's
messages are contiguous, except that a replacement backend publishes again the whole append its
predecessor died in (from that append's start), and a reader may miss messages (slow joiner, a
full queue).  A reader therefore subscribes, reads the file to its end, and stitches messages
on by offset: drop what lies below what it has, read a gap from the file.
:class:`ipc.consif.Follower` does exactly that.

Input: messages of two frames, ``[domain (UTF-8), bytes]``; the backend queues them for the
domain's ``in`` ring.

The endpoints are bound when the backend first serves a device (so a warm spare does not take
them from the running instance) and released by ``suspend`` (a hot swap) and ``close``.  The
input socket is waited on through the host's ``fds()``/``readable(fd)`` hook.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

import zmq

from ipc import consif
from ipc.consif import encode_offset

PUB_NAME: Final = consif.PUB_NAME
INPUT_NAME: Final = consif.INPUT_NAME
#: Unix socket paths longer than this cannot be bound (isovisor.paths uses the same limit).
MAX_SOCKET_PATH: Final = 100
SNDHWM: Final = 10_000
RCVHWM: Final = 10_000


class Endpoints:
    """The live-output and input sockets of one backend instance."""

    def __init__(self, socket_dir: Path, log: logging.Logger) -> None:
        """ValueError if a socket path in ``socket_dir`` is too long to bind."""
        for name in (PUB_NAME, INPUT_NAME):
            path = socket_dir / name
            if len(str(path)) > MAX_SOCKET_PATH:
                raise ValueError(
                    f"socket_dir {socket_dir} is too long for a Unix socket: "
                    f"{path} has {len(str(path))} bytes, at most "
                    f"{MAX_SOCKET_PATH}; choose a shorter socket_dir or run_dir"
                )
        self.log = log
        self.pub_endpoint = f"ipc://{socket_dir / PUB_NAME}"
        self.input_endpoint = f"ipc://{socket_dir / INPUT_NAME}"
        self._ctx: zmq.Context[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._input: zmq.Socket[Any] | None = None
        #: The input socket's descriptor while bound (the host waits on it).
        self.fd: int | None = None
        self._bind_failed = False
        #: Messages the PUB socket refused (readers catch up from the file).
        self.publish_errors = 0

    def bind(self) -> bool:
        """Bind both endpoints (once; again after :meth:`close`).  True if they were bound
        now; an error is logged (once per streak), and the backend goes on without them."""
        if self._pub is not None:
            return False
        ctx = self._ctx = self._ctx or zmq.Context()
        pub = ctx.socket(zmq.PUB)
        inp = ctx.socket(zmq.PULL)
        try:
            for s in (pub, inp):
                s.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, SNDHWM)
            inp.setsockopt(zmq.RCVHWM, RCVHWM)
            pub.bind(self.pub_endpoint)
            inp.bind(self.input_endpoint)
        except zmq.ZMQError as e:
            pub.close(0)
            inp.close(0)
            if not self._bind_failed:
                self.log.error(
                    "cannot bind the console endpoints %s and %s: %s; logs are "
                    "written, but there is no live output or input until the next "
                    "attach binds them",
                    self.pub_endpoint,
                    self.input_endpoint,
                    e,
                )
            self._bind_failed = True
            return False
        self._bind_failed = False
        self._pub, self._input = pub, inp
        self.fd = int(inp.getsockopt(zmq.FD))
        return True

    def publish(self, domain: str, offset: int, data: bytes) -> None:
        """One append to live readers (dropped, and counted, if the socket cannot take it)."""
        pub = self._pub
        if pub is None:
            return
        try:
            pub.send_multipart((domain.encode(), encode_offset(offset), data), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.publish_errors += 1

    def receive(self, limit: int) -> list[list[bytes]]:
        """The input messages waiting, at most ``limit`` (all of them if fewer: the socket's
        descriptor only signals new arrivals)."""
        sock = self._input
        out: list[list[bytes]] = []
        if sock is None:
            return out
        while len(out) < limit:
            try:
                out.append(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        return out

    def close(self) -> None:
        """Release both endpoints (the context stays, for the next :meth:`bind`)."""
        for s in (self._pub, self._input):
            if s is not None:
                s.close(0)
        self._pub = self._input = None
        self.fd = None

    def terminate(self) -> None:
        """:meth:`close`, and end the ZeroMQ context."""
        self.close()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


__all__ = ["INPUT_NAME", "MAX_SOCKET_PATH", "PUB_NAME", "Endpoints"]
