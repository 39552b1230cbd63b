"""The generic driver host: one loop that connects a backend module to the kernel.

Run as a process::

    python -m drivers.host --name blk0 --module drivers.blk --kernel ipc://K --listen ipc://L \\
        [--options JSON] [--parent-pid N] [--log-level INFO]

or inside the kernel process with :func:`start_inline` (a daemon thread, inproc:// endpoints).

The host binds a PULL socket at its endpoint, connects a PUSH to the kernel, instantiates
``module.Backend(host, options)`` and says ``["hello", {...}]``.  Each round it drains *every*
message that has arrived, handles ``attach``/``detach``/``fe_state`` in order, and then calls
``backend.kick(key)`` once per device that was kicked (any number of kicks collapse into one).
Malformed messages are logged and ignored; an exception in a backend handler is logged and the
loop goes on.

A backend sees this API: ``host.name``, ``host.log``, ``host.notify(key)``,
``host.store_write(path, value)`` (only below ``/driver/<name>/``), ``host.fault(key, message)``
and ``host.kick_again(key)`` (have ``kick(key)`` called again next round, so one busy device
cannot starve the others).  See docs/devices.md for the messages.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import zmq

from isovisor.procs import die_with_parent

POLL_MS = 200
#: Messages taken per round at most (so a flood cannot keep the loop from acting).
MAX_DRAIN = 10_000
SNDHWM = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class HostError(Exception):
    """The driver cannot start (bad module, bad options, bad endpoint)."""


class Backend(Protocol):
    """What a driver module's ``Backend(host, options)`` provides."""

    def attach(self, dev: dict[str, Any]) -> None: ...
    def detach(self, key: int) -> None: ...
    def fe_state(self, key: int, state: int) -> None: ...
    def kick(self, key: int) -> None: ...
    def close(self) -> None: ...


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: message type -> (argument checks, description for error messages)
_SIGNATURES: dict[str, tuple[tuple[Callable[[object], bool], ...], str]] = {
    "attach": ((lambda v: isinstance(v, dict),), '["attach", {dev}]'),
    "detach": ((_is_int,), '["detach", key:int]'),
    "kick": ((_is_int,), '["kick", key:int]'),
    "fe_state": ((_is_int, _is_int), '["fe_state", key:int, state:int]'),
}


def check_store_path(name: str, path: object) -> str:
    """``path`` if a driver called ``name`` may write it, else ValueError saying why."""
    prefix = f"/driver/{name}/"
    if not isinstance(path, str):
        raise ValueError(f"store path must be a string, got {type(path).__name__}")
    if not path.startswith(prefix) or path == prefix:
        raise ValueError(f"driver {name} may write only below {prefix}, not {path!r}")
    for seg in path[1:].split("/"):
        if not _PATH_SEGMENT.match(seg) or seg in (".", ".."):
            raise ValueError(f"store path {path!r} has an invalid segment {seg!r}")
    return path


class DriverHost:
    """Sockets, the backend and the loop.  Create it in the thread that will call :meth:`run`
    (ZeroMQ sockets belong to one thread)."""

    def __init__(self, name: str, module: str, options: dict[str, Any], ctx: zmq.Context[Any],
                 kernel_endpoint: str, listen_endpoint: str) -> None:
        if not _NAME_RE.match(name):
            raise HostError(f"invalid driver name {name!r}: use 1-64 letters, digits, '_', '.', "
                            "'-'")
        if not isinstance(options, dict):
            raise HostError(f"driver options must be a mapping, got {type(options).__name__}")
        self.name = name
        self.module_name = module
        self.endpoint = listen_endpoint
        self.log = logging.getLogger(f"isovisor.driver.{name}")
        self._stop = threading.Event()
        self._again: dict[int, None] = {}
        self._notify_cache: dict[int, bytes] = {}
        self._send_failures = 0
        self.backend: Backend | None = None
        try:
            mod = importlib.import_module(module)
        except Exception as e:
            raise HostError(f"cannot import driver module {module!r}: {e}") from e
        factory = getattr(mod, "Backend", None)
        if factory is None:
            raise HostError(f"driver module {module!r} has no Backend class")
        self._pull = ctx.socket(zmq.PULL)
        self._push = ctx.socket(zmq.PUSH)
        try:
            for s in (self._pull, self._push):
                s.setsockopt(zmq.LINGER, 0)
            self._push.setsockopt(zmq.SNDHWM, SNDHWM)
            self._pull.setsockopt(zmq.RCVHWM, SNDHWM)
            try:
                self._pull.bind(listen_endpoint)
            except zmq.ZMQError as e:
                raise HostError(f"cannot listen at {listen_endpoint}: {e}") from e
            try:
                self._push.connect(kernel_endpoint)
            except zmq.ZMQError as e:
                raise HostError(f"cannot connect to the kernel at {kernel_endpoint}: {e}") from e
            try:
                self.backend = factory(self, options)
            except (ValueError, TypeError) as e:
                raise HostError(f"invalid options for {module}: {e}") from e
        except BaseException:
            self._close_sockets()
            raise
        self._send(["hello", {"name": name, "pid": os.getpid(), "endpoint": listen_endpoint,
                              "module": module}])

    # -- the API backends use ------------------------------------------------------------------
    def notify(self, key: int) -> None:
        msg = self._notify_cache.get(key)
        if msg is None:
            msg = self._notify_cache[key] = msgpack.packb(["notify", key])
        self._send_raw(msg)

    def store_write(self, path: str, value: str) -> None:
        check_store_path(self.name, path)
        if not isinstance(value, str):
            raise ValueError(f"store value for {path} must be a string, got "
                             f"{type(value).__name__}")
        self._send(["store", path, value])

    def fault(self, key: int, message: str) -> None:
        self.log.error("device %d: fault: %s", key, message)
        self._send(["fault", key, message])

    def error(self, key: int, message: str) -> None:
        """The device cannot be served (e.g. its image cannot be opened); not the guest's
        fault, so the kernel only reports it."""
        self.log.error("device %d: cannot serve it: %s", key, message)
        self._send(["error", key, message])

    def kick_again(self, key: int) -> None:
        self._again[key] = None

    # -- the loop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to end (thread- and signal-safe); it finishes within POLL_MS."""
        self._stop.set()

    def run(self) -> None:
        """Serve until :meth:`stop`; then close the backend and the sockets."""
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    ready = poller.poll(0 if self._again else POLL_MS)
                except zmq.ZMQError as e:
                    if e.errno == zmq.ETERM:
                        break
                    raise
                raws = self._drain() if ready else []
                self._dispatch(raws)
        finally:
            self._shutdown()

    def _drain(self) -> list[bytes]:
        out = []
        recv = self._pull.recv
        while len(out) < MAX_DRAIN:
            try:
                out.append(recv(zmq.NOBLOCK))
            except zmq.Again:
                break
        return out

    def _parse(self, raw: bytes) -> list[Any] | None:
        try:
            msg = msgpack.unpackb(raw)
        except Exception as e:
            self.log.warning("ignoring a message that is not msgpack (%s): %r",
                             f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                             raw[:64])
            return None
        if not isinstance(msg, list) or not msg:
            self.log.warning("ignoring a message that is not a non-empty list: %s",
                             _short(msg))
            return None
        kind = msg[0]
        sig = _SIGNATURES.get(kind) if isinstance(kind, str) else None
        if sig is None:
            self.log.warning("ignoring a message of unknown type %s (known: %s)", _short(kind),
                             ", ".join(_SIGNATURES))
            return None
        checks, shape = sig
        args = msg[1:]
        if len(args) != len(checks) or not all(c(a) for c, a in zip(checks, args, strict=True)):
            self.log.warning("ignoring a malformed %s message %s: expected %s", kind,
                             _short(msg), shape)
            return None
        return msg

    def _dispatch(self, raws: list[bytes]) -> None:
        backend = self.backend
        assert backend is not None
        kicked, self._again = self._again, {}
        for raw in raws:
            msg = self._parse(raw)
            if msg is None:
                continue
            kind = msg[0]
            if kind == "kick":
                kicked[msg[1]] = None
                continue
            if kind == "detach":
                kicked.pop(msg[1], None)
            self._call(kind, getattr(backend, kind), *msg[1:])
        for key in kicked:
            self._call("kick", backend.kick, key)

    def _call(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.log.exception("%s%r failed in the backend; the driver goes on", what, args)

    # -- sending -------------------------------------------------------------------------------
    def _send(self, msg: list[Any]) -> None:
        self._send_raw(msgpack.packb(msg))

    def _send_raw(self, data: bytes) -> None:
        try:
            self._push.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self._send_failures += 1
            if self._send_failures <= 20 or self._send_failures % 1000 == 0:
                self.log.error("the kernel is not taking messages (%d queued): dropped %r "
                               "(%d dropped so far)", SNDHWM, msgpack.unpackb(data)[:2],
                               self._send_failures)

    # -- shutdown ------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:
                self.log.exception("closing the backend failed")
        self._close_sockets()

    def _close_sockets(self) -> None:
        for s in (self._pull, self._push):
            s.close(linger=0)


def _short(v: object, limit: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


# --- in-process drivers ---------------------------------------------------------------------------

class InlineDriver:
    """A driver host running in a daemon thread of this process."""

    def __init__(self, name: str, endpoint: str, thread: threading.Thread,
                 host: DriverHost) -> None:
        self.name = name
        self.endpoint = endpoint
        self.thread = thread
        self.host = host

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop (the backend is closed) and join the thread."""
        self.host.stop()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise TimeoutError(f"driver {self.name} did not stop within {timeout}s")


def start_inline(name: str, module: str, options: dict[str, Any], ctx: zmq.Context[Any],
                 kernel_endpoint: str, listen_endpoint: str) -> InlineDriver:
    """Run a driver host in a daemon thread sharing ``ctx``; returns once it listens and has
    said hello, or raises HostError if it cannot start."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            host = DriverHost(name, module, options, ctx, kernel_endpoint, listen_endpoint)
        except BaseException as e:
            box["error"] = e
            ready.set()
            return
        box["host"] = host
        ready.set()
        host.run()

    t = threading.Thread(target=main, name=f"driver-{name}", daemon=True)
    t.start()
    ready.wait()
    if "error" in box:
        t.join()
        err = box["error"]
        raise err if isinstance(err, HostError) else HostError(f"driver {name}: {err}") from err
    return InlineDriver(name, listen_endpoint, t, box["host"])


# --- process mode ---------------------------------------------------------------------------------



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m drivers.host",
                                 description="isovisor driver host process")
    ap.add_argument("--name", required=True, help="driver name (store: /driver/<name>/)")
    ap.add_argument("--module", required=True, help="backend module, e.g. drivers.blk")
    ap.add_argument("--kernel", required=True, help="the kernel's driver endpoint (PUSH to it)")
    ap.add_argument("--listen", required=True, help="endpoint to bind for kernel messages")
    ap.add_argument("--options", default="{}", help="backend options as a JSON object")
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s driver {args.name}[%(process)d] %(levelname)s "
                               "%(message)s")
    log = logging.getLogger(f"isovisor.driver.{args.name}")
    die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the parent died before we could ask to die with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        log.error("--options is not valid JSON: %s", e)
        return 2
    if not isinstance(options, dict):
        log.error("--options must be a JSON object, got %s", type(options).__name__)
        return 2
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        try:
            host = DriverHost(args.name, args.module, options, ctx, args.kernel, args.listen)
        except HostError as e:
            log.error("%s", e)
            return 2
        signal.signal(signal.SIGTERM, lambda *_: host.stop())
        log.info("driver %s (%s) listening at %s", args.name, args.module, args.listen)
        host.run()
        log.info("driver %s stopped", args.name)
        return 0
    finally:
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
