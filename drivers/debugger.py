"""``breakpoint()`` in a driver process (docs/configuration.md#debugging-a-driver).

A driver process has no terminal: its stdin is /dev/null.  Python's default ``breakpoint()``
would start a pdb that reads end-of-file at once, quits and raises ``BdbQuit`` in the backend,
which the host's fail-stop rule takes for a bug: exit 70, then a replacement (or, in a swap's
probation, a rollback).  :func:`install` gives the process a hook of its own instead (unless
``PYTHONBREAKPOINT`` is set: then that is what the developer asked for):

* in debug mode (``debug = true``, ``isovisor driver swap --debug``) ``breakpoint()`` opens
  the standard library's pdb on a UNIX socket in the driver's directory of the run directory
  (``driver-<name>/debug.pdb``, or ``debug.<pid>.pdb`` beside it while another instance of
  the driver is stopped at one), logs
  ``driver <name> stopped at a breakpoint ...: connect with socat - UNIX-CONNECT:<path>``
  and waits for a client.  The driver stays stopped there as long as the developer likes,
  which is why debug mode also turns the hang checks off.  ``c`` resumes the driver and, when
  no breakpoint is left, ends the connection; ``q``, end-of-file or a dropped connection do
  the same (they detach the debugger: the driver goes on, it is not ended);
* otherwise ``breakpoint()`` is logged, once per place, and skipped: a driver stopped there
  would be killed as hung.

The socket is created in the driver's directory (mode 0700, the driver's own: its jail's uid,
docs/jail.md) with mode 0600: pdb runs any Python statement it is given, so only the driver's
uid and root may connect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pdb
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final

#: How often a breakpoint waiting for its client looks whether the driver is being stopped.
ACCEPT_POLL_S: Final = 0.5


class SocketPdb(pdb.Pdb):
    """pdb on a connected socket.  Leaving it never ends the program: ``q``, EOF and a
    dropped connection clear the breakpoints and let the driver go on."""

    def __init__(self, conn: socket.socket, on_close: Callable[[], None] | None = None) -> None:
        self._conn = conn
        # Two files, not one "rw": a text file drops the lines it has read ahead when it is
        # written to, so commands piped in together would be lost after the first answer.
        self._in: IO[str] = conn.makefile("r", encoding="utf-8", errors="replace", newline="\n")
        self._out: IO[str] = conn.makefile("w", encoding="utf-8", errors="replace", newline="\n")
        self._on_close = on_close
        self._closed = False
        self._detaching = False
        super().__init__(stdin=self._in, stdout=self._out, nosigint=True)
        self.use_rawinput = False

    # -- leaving -------------------------------------------------------------------------------
    def do_continue(self, arg: str) -> bool | None:
        if not self.breaks:
            self._detaching = True
        return super().do_continue(arg)

    do_c = do_cont = do_continue

    def do_quit(self, arg: str) -> bool | None:
        """q(uit)
        Detach the debugger: breakpoints are cleared and the driver goes on (it is not ended;
        `isovisor driver restart NAME` replaces it)."""
        self.message("detaching: the driver goes on")
        return self._detach()

    do_q = do_exit = do_quit

    def do_EOF(self, arg: str) -> bool | None:
        return self._detach()

    def do_run(self, arg: str) -> bool | None:
        """run/restart are not available in a driver."""
        self.error("a driver cannot be restarted from pdb: use `isovisor driver restart NAME`")
        return None

    do_restart = do_run

    def _detach(self) -> bool:
        self.clear_all_breaks()
        self._detaching = True
        self.set_continue()
        return True

    def interaction(self, frame: FrameType | None, traceback: TracebackType | Any) -> None:
        if self._closed:  # a breakpoint set in an earlier session, after it ended
            self.clear_all_breaks()
            self.set_continue()
            return
        try:
            super().interaction(frame, traceback)
        except OSError:  # the client went away while pdb wrote or read
            self._detach()
        if self._detaching:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in (self._in, self._out, self._conn):
            with contextlib.suppress(OSError):
                c.close()
        if self._on_close is not None:
            self._on_close()


def _listening(path: Path) -> bool:
    """Is a socket bound to ``path`` now (a live process listens there)?  /proc/net/unix lists
    the paths of the bound UNIX sockets; a file left by a killed process is not among them."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return True  # cannot tell: leave it alone
    return any(ln.split()[-1] == str(path) for ln in lines if len(ln.split()) >= 8)


def _bind(preferred: Path) -> socket.socket:
    """A listening socket at ``preferred`` (a stale file there is removed), or at
    ``<stem>.<pid>.pdb`` beside it if another instance listens there."""
    path = preferred
    if path.exists():
        if _listening(path):
            path = preferred.with_name(f"{preferred.stem}.{os.getpid()}{preferred.suffix}")
        path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


class Breakpoints:
    """The ``sys.breakpointhook`` of a driver process (the module docstring)."""

    def __init__(
        self,
        name: str,
        log: logging.Logger,
        socket_path: str | os.PathLike[str] | None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.name = name
        self.log = log
        #: Where pdb listens in debug mode; None: not in debug mode (breakpoints are skipped).
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.stopping = stopping
        self._skipped: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        frame = sys._getframe(1)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        if self.socket_path is None:
            if where not in self._skipped:
                self._skipped.add(where)
                self.log.warning(
                    "breakpoint() at %s skipped: driver %s is not in debug mode (a driver "
                    "stopped there would be killed as hung); set debug = true in "
                    "[driver.%s], or swap with --debug",
                    where,
                    self.name,
                    self.name,
                )
            return
        self.stop_here(frame, where)

    def stop_here(self, frame: FrameType, where: str) -> None:
        """Serve pdb at ``frame`` for the first client that connects."""
        assert self.socket_path is not None
        try:
            listener = _bind(self.socket_path)
        except OSError as e:
            self.log.error(
                "breakpoint() at %s skipped: cannot listen at %s for the debugger: %s",
                where,
                self.socket_path,
                e,
            )
            return
        path = listener.getsockname()
        self.log.warning(
            "driver %s stopped at a breakpoint at %s (pid %d): connect with "
            "socat - UNIX-CONNECT:%s",
            self.name,
            where,
            os.getpid(),
            path,
        )
        _flush()
        conn = None
        try:
            listener.settimeout(ACCEPT_POLL_S)
            while conn is None:
                if self.stopping():
                    self.log.warning(
                        "driver %s is stopping: leaving the breakpoint at %s", self.name, where
                    )
                    return
                with contextlib.suppress(TimeoutError):
                    conn, _ = listener.accept()
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        conn.settimeout(None)
        self.log.warning("debugger connected at %s: the driver waits for it", where)
        _flush()
        debugger = SocketPdb(
            conn, lambda: self.log.warning("debugger detached: driver %s goes on", self.name)
        )
        debugger.set_trace(frame)


def _flush() -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()


def install(
    name: str,
    log: logging.Logger,
    socket_path: str | os.PathLike[str] | None,
    stopping: Callable[[], bool] = lambda: False,
) -> Breakpoints | None:
    """Make ``breakpoint()`` in this process debug over ``socket_path`` (debug mode), or log
    and skip it (``socket_path`` None).  Nothing is changed if ``PYTHONBREAKPOINT`` is set:
    None then."""
    if os.environ.get("PYTHONBREAKPOINT"):
        log.info(
            "breakpoint() follows PYTHONBREAKPOINT=%s (from the environment)",
            os.environ["PYTHONBREAKPOINT"],
        )
        return None
    hook = Breakpoints(name, log, socket_path, stopping)
    sys.breakpointhook = hook
    return hook


__all__ = ["Breakpoints", "SocketPdb", "install"]
