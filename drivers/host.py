"""The generic driver host: one loop that connects a backend module to the kernel.

Run as a process::

    python -m drivers.host --name blk0 --module drivers.blk --kernel ipc://K --listen ipc://L \\
        [--options JSON] [--parent-pid N] [--log-level INFO] [--spare] \\
        [--watchdog-ms N] [--request-timeout-ms N] [--debug PDB_SOCKET]

or inside the kernel process with :func:`start_inline` (a daemon thread, inproc:// endpoints).

The host binds a PULL socket at its endpoint, connects a PUSH to the kernel, instantiates
``module.Backend(host, options)`` and says ``["hello", {...}]``.  Each round it drains *every*
message that has arrived, handles ``attach``/``detach``/``fe_state``/``fault`` in order, and
then calls ``backend.kick(key)`` once per device that was kicked (any number of kicks collapse
into one).  Malformed messages are logged and ignored.

Supervision (docs/recovery.md):

* Fail-stop: in a process, an exception escaping a backend handler (or the loop) is logged with
  its traceback and the process exits with status 70 (EX_SOFTWARE), so the supervisor replaces
  it.  Inline (a kernel thread, which nobody can restart) it is logged and the loop goes on.
* ``--spare``: everything is built (module, backend, sockets) but the host says ``["spare",
  {...}]`` instead of hello and waits for ``["activate"]`` on its endpoint; then it says hello
  and serves.  Other messages before that are logged and ignored.
* ``--watchdog-ms N``: a ``["heartbeat", name, seq]`` every N/4 ms from the loop itself, so a
  loop stuck anywhere sends none.  hello carries ``watchdog_ms`` and ``request_timeout_ms``.
* Faults (drivers/faults.py, docs/campaigns.md): ``["faults", [spec, ...]]`` is the
  supervisor's table (it replaces the last one); ``["fault", spec]`` adds one fault of the
  host's own (the kernel's ``driver_inject``).  A fault with ``now`` (the kinds in
  :data:`drivers.faults.HOST_KINDS`) is carried out at once; any other fires on a request,
  once, and is then forgotten.
* Hot swap (docs/hotswap.md): ``["drain"]`` makes an active host save its backend's state,
  suspend it (every device let go) and say ``["saved", {name, pid, state}]``; it is then
  *drained*: it serves nothing and sends no heartbeat.  ``["restore", state]`` makes a spare
  (the new implementation) or a drained host (a rollback, with a fresh backend) restore that
  state, say ``["restored", {name, pid, state}]`` (its state now) and hello; if the backend
  refuses, ``["restore_failed", {name, pid, error, traceback}]``.

Doorbells (docs/devices.md): the host connects to the kernel's doorbell socket (beside
``--kernel``) before its hello; a device attached with ``"doorbells": true`` is kicked through
its kick eventfd, and ``host.notify`` rings its notify eventfd.  Its shared-memory segment comes
with the eventfds as a descriptor: the backend's ``attach`` finds it as ``dev["segment_fd"]``
and maps the region from it (never by name under /dev/shm); the host closes that descriptor
when ``attach`` returns (the mapping keeps the segment), so a backend must not keep or close it.
``ISOVISOR_DRIVER_POLL_US=N`` makes the loop busy-poll for up to N µs after a round that served
kicks (off by default).

``--module`` names the backend class: ``package.module`` (its ``Backend``),
``package.module:Class``, ``/path/to/file.py`` (its ``Backend``, or its only backend class) or
``/path/to/file.py:Class``.  With ``--report FILE``, a host that cannot start, or that ends by
fail-stop, writes ``{"error", "where", "traceback"}`` there as JSON: what failed (the exception's
type and message), the last frame of the traceback in the developer's own code (``file:line, in
function``, or ""), and the traceback; the supervisor shows it (``isovisor up``, ``status``).
``--swappable`` (a hot swap's new implementation) also requires save, suspend and restore.

A backend sees this API: ``host.name``, ``host.log``, ``host.notify(key)``,
``host.store_write(path, value)`` (only below ``/driver/<name>/``), ``host.fault(key, message)``,
``host.error(key, message)``, ``host.kick_again(key)`` (have ``kick(key)`` called again next
round, so one busy device cannot starve the others), ``host.recovered(key, replayed,
done_ns)``, ``host.poison(key, index, description)``, ``host.fault_fired(id, type, device)``
and ``host.carry_out(kind)`` (a fault the host does itself: die, hang, leak).  See
docs/devices.md and docs/recovery.md for the messages.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import resource
import signal
import socket
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol, cast

import msgpack
import zmq

from drivers import debugger, jail, keeper
from drivers.faults import HOST_KINDS, PROCESS_KINDS, Fault, class_of_module
from drivers.state import BackendState
from ipc import doorbell, iotrace
from ipc.iotrace import Stage
from ipc.lifetime import die_with_parent

#: The loop's longest sleep (heartbeats and a backend's timer_ms() wake it sooner).
POLL_MS = 1000
#: Messages taken per round at most (so a flood cannot keep the loop from acting).
MAX_DRAIN = 10_000
SNDHWM = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
#: The longest busy-poll window of a driver loop, in µs (see DriverHost._wait); 0: none.
POLL_MAX_US_ENV = "ISOVISOR_DRIVER_POLL_US"
DEFAULT_POLL_MAX_US = 0
_POLL_START_NS = 20_000
#: Exit status after an unhandled exception (sysexits.h EX_SOFTWARE).
EXIT_SOFTWARE = 70
#: Exit status of an injected ``exit``.
EXIT_INJECTED = 3
DEFAULT_REQUEST_TIMEOUT_MS = 10_000
#: What the host does for each fault kind it carries out itself (``HOST_KINDS``).
CARRY_OUT: dict[str, str] = {
    "exit": f"exit at once with status {EXIT_INJECTED}",
    "exception": f"raise an exception, as a backend bug would (a process exits with status "
    f"{EXIT_SOFTWARE})",
    "segv": "a real invalid memory access: the process dies by SIGSEGV",
    "abort": "abort(): the process dies by SIGABRT",
    "hang": "the loop blocks forever and sends no more heartbeats",
    "leak_mem": "allocate (and touch) 64 MiB more, kept until the process ends",
    "leak_fd": "open 256 more file descriptors, kept until the process ends",
}
assert frozenset(CARRY_OUT) == HOST_KINDS
#: Ids of the host's own faults (``["fault", spec]``) start here, far above the supervisor's.
OWN_FAULT_IDS = 1 << 40
LEAK_FDS = 256
LEAK_BYTES = 64 << 20
_PAGE = 4096
#: Faults to arm at start (a JSON list; isovisor.supervisor.driverproc sets it).
FAULTS_ENV = "ISOVISOR_DRIVER_FAULTS"
#: What every backend class has (the ``Backend`` protocol below).
REQUIRED_METHODS = ("attach", "detach", "fe_state", "kick", "close")
#: What a backend needs to be hot-swapped in or out (drivers.blk.backend.BlockBackend has them).
SWAP_METHODS = ("save", "suspend", "restore")
_PR_SET_DUMPABLE = 4


class HostError(Exception):
    """The driver cannot start (bad module, bad options, bad endpoint)."""


class InjectedFault(Exception):
    """Raised by ``carry_out("exception")``: escapes like a bug in the backend would."""


class Backend(Protocol):
    """What a driver module's ``Backend(host, options)`` provides."""

    def attach(self, dev: dict[str, Any]) -> None: ...
    def detach(self, key: int) -> None: ...
    def fe_state(self, key: int, state: int) -> None: ...
    def kick(self, key: int) -> None: ...
    def close(self) -> None: ...


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def poll_max_us() -> int:
    """The busy-poll window's maximum: ``ISOVISOR_DRIVER_POLL_US`` if it is an integer >= 0."""
    text = os.environ.get(POLL_MAX_US_ENV, "")
    return int(text) if text.isdigit() else DEFAULT_POLL_MAX_US


#: message type -> (argument checks, description for error messages)
_SIGNATURES: dict[str, tuple[tuple[Callable[[object], bool], ...], str]] = {
    "attach": ((lambda v: isinstance(v, dict),), '["attach", {dev}]'),
    "detach": ((_is_int,), '["detach", key:int]'),
    "kick": ((_is_int,), '["kick", key:int]'),
    "fe_state": ((_is_int, _is_int), '["fe_state", key:int, state:int]'),
    "fault": ((lambda v: isinstance(v, dict),), '["fault", {spec}]'),
    "activate": ((), '["activate"]'),
    "faults": ((lambda v: isinstance(v, list),), '["faults", [spec, ...]]'),
    "drain": ((), '["drain"]'),
    "report": ((), '["report"]'),
    "retire": ((), '["retire"]'),
    "committed": ((), '["committed"]'),
    "restore": ((lambda v: isinstance(v, dict),), '["restore", {state}]'),
    "sync": ((_is_int,), '["sync", token:int]'),
    "mirror": ((_is_int, lambda v: isinstance(v, bool)), '["mirror", key:int, on:bool]'),
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
    (ZeroMQ sockets belong to one thread).

    ``process`` says the host is a process of its own (fail-stop on a backend exception, every
    injectable fault allowed); ``spare`` makes it wait for ``["activate"]`` before it says
    hello; ``watchdog_ms`` > 0 makes the loop send a heartbeat every ``watchdog_ms / 4``;
    ``report`` is the ``--report`` file; ``swappable``: the backend must support hot swap."""

    def __init__(
        self,
        name: str,
        module: str,
        options: dict[str, Any],
        ctx: zmq.Context[Any],
        kernel_endpoint: str,
        listen_endpoint: str,
        *,
        process: bool = False,
        spare: bool = False,
        watchdog_ms: int = 0,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        report: str | None = None,
        swappable: bool = False,
        bells: str | None = None,
    ) -> None:
        if not _NAME_RE.match(name):
            raise HostError(
                f"invalid driver name {name!r}: use 1-64 letters, digits, '_', '.', '-'"
            )
        if not isinstance(options, dict):
            raise HostError(f"driver options must be a mapping, got {type(options).__name__}")
        for what, v in (("watchdog_ms", watchdog_ms), ("request_timeout_ms", request_timeout_ms)):
            if not _is_int(v) or v < 0:
                raise HostError(f"{what} must be an integer >= 0 (0 = none), got {v!r}")
        self.name = name
        self.module_name = module
        self.endpoint = listen_endpoint
        self.process = process
        self.spare = spare
        #: spare (waits for activate or restore), active (serves), drained (saved and
        #: suspended for a hot swap: waits for restore or the end).
        self.mode = "spare" if spare else "active"
        self.report = report
        self.options = options
        self.watchdog_ms = watchdog_ms
        self.request_timeout_ms = request_timeout_ms
        self.log = logging.getLogger(f"isovisor.driver.{name}")
        self._stop = threading.Event()
        # stop() writes a byte here: the loop's poll wakes at once, not after up to POLL_MS
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # no write to a descriptor closed (and reused)
        self._again: dict[int, None] = {}
        self._notify_cache: dict[int, bytes] = {}
        self._send_failures = 0
        self._heartbeat_s = watchdog_ms / 4000
        self._heartbeat_seq = 0
        self._next_heartbeat = 0.0
        self._leaked: list[bytearray] = []
        self._leaked_fds: list[int] = []
        self._table: list[Any] = []
        self._own: dict[int, dict[str, Any]] = {}
        self._own_seq = 0
        self._sender = f"{name}:{os.getpid()}".encode()
        self._statistics_error: str | None = None  # the last one (logged once)
        #: The doorbell connection to the kernel (ipc/doorbell.py), or None: kicks and
        #: notifications then go over ZeroMQ.
        self._bell: socket.socket | None = None
        #: device key -> (kick eventfd, notify eventfd), for the devices attached with them
        self._bells: dict[int, tuple[int, int]] = {}
        #: kick eventfd -> device key
        self._kick_keys: dict[int, int] = {}
        #: (kick, notify, segment) descriptors received for an attach not yet handled
        self._parked: dict[int, tuple[int, int, int]] = {}
        self._poller: zmq.Poller | None = None
        #: Adaptive busy polling after a round that served kicks (see _wait): the longest
        #: window, the current one, whether the last round served any.
        self.poll_max_ns = poll_max_us() * 1000
        self._poll_ns = 0
        self._hot = False
        self.backend: Backend | None = None
        factory, self.implementation = load_backend(module, swappable=swappable)
        self._factory = factory
        #: The backend's own source file: a traceback's frames there are the developer's.
        self.source = source_file(factory)
        self._pull = ctx.socket(zmq.PULL)
        self._push = ctx.socket(zmq.PUSH)
        try:
            self._open_sockets(kernel_endpoint, listen_endpoint)
            if bells is not None:
                try:
                    self._bell = doorbell.connect(bells, name, os.getpid())
                except OSError as e:
                    self.log.warning(
                        "no doorbells (%s: %s): kicks and notifications go over ZeroMQ", bells, e
                    )
            try:
                self.backend = factory(self, options)
            except Exception as e:  # its __init__, configure() or the options check
                raise HostError(f"the backend's constructor raised {_exception_text(e)}") from e
        except BaseException:
            self._close_sockets()
            raise
        faults = os.environ.get(FAULTS_ENV)
        if faults:  # the supervisor's unlimited faults, armed before anything is served
            try:
                self._set_faults(json.loads(faults))
            except ValueError as e:
                self.log.error("%s is not a JSON list of faults: %s", FAULTS_ENV, e)
        if spare:
            self._send(["spare", self._identity()])
        else:
            self._hello()

    def _open_sockets(self, kernel_endpoint: str, listen_endpoint: str) -> None:
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

    def _identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "endpoint": self.endpoint,
            "module": self.module_name,
        }

    def _hello(self) -> None:
        if iotrace.RECOVERY:
            iotrace.mark(Stage.D_HELLO, os.getpid())
        self._send(
            [
                "hello",
                {
                    **self._identity(),
                    "watchdog_ms": self.watchdog_ms,
                    "request_timeout_ms": self.request_timeout_ms,
                    "statistics": callable(getattr(self.backend, "statistics", None)),
                },
            ]
        )
        self._next_heartbeat = time.monotonic() + self._heartbeat_s

    # -- the API backends use ------------------------------------------------------------------
    def notify(self, key: int) -> None:
        if iotrace.ON:
            iotrace.mark(Stage.DRIVER_NOTIFY, key)
        bells = self._bells.get(key)
        if bells is not None:
            doorbell.ring(bells[1])
            return
        msg = self._notify_cache.get(key)
        if msg is None:
            msg = self._notify_cache[key] = msgpack.packb(["notify", key])
        self._send_raw(msg)

    def store_write(self, path: str, value: str) -> None:
        check_store_path(self.name, path)
        if not isinstance(value, str):
            raise ValueError(f"store value for {path} must be a string, got {type(value).__name__}")
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

    def recovered(self, key: int, replayed: int, done_ns: int) -> None:
        """A resumed device redid ``replayed`` requests, published at ``done_ns``
        (CLOCK_MONOTONIC)."""
        if iotrace.RECOVERY:
            iotrace.mark(Stage.D_RESUMED, key)
        self._send(["recovered", key, replayed, done_ns])

    def poison(self, key: int, index: int, description: str) -> None:
        """The request at ring ``index`` of device ``key`` was refused as poison."""
        self._send(["poison", key, index, description])

    def carry_out(self, kind: str, *, really: bool = False) -> None:
        """Carry out the fault ``kind`` (one of :data:`CARRY_OUT`; ``poison`` dies as ``segv``)
        now, for a fault that fired in the backend or one armed with ``now``.  Inline, the
        kinds that would kill or stall the kernel are refused, unless ``really`` (a campaign's
        inline comparison, which wants to see the damage)."""
        if kind == "poison":
            kind = "segv"
        if kind not in CARRY_OUT:
            raise ValueError(
                f"the driver host cannot carry out fault {kind!r} (it does "
                f"{', '.join(CARRY_OUT)}); the backend must"
            )
        if not self.process and kind in PROCESS_KINDS and not really:
            self.log.error(
                "refusing to carry out fault %r: this driver runs inline, so it would %s the "
                "kernel",
                kind,
                "stall" if kind == "hang" else "kill",
            )
            return
        self.log.warning("carrying out a fault: %s (%s)", kind, CARRY_OUT[kind])
        if kind == "leak_mem":
            self._leaked.append(_touched_allocation(LEAK_BYTES))
            self.log.warning("leaked %d MiB so far", len(self._leaked) * LEAK_BYTES >> 20)
            return
        if kind == "leak_fd":
            for _ in range(LEAK_FDS):
                self._leaked_fds.append(os.open(os.devnull, os.O_RDONLY))
            self.log.warning("leaked %d file descriptors so far", len(self._leaked_fds))
            return
        _flush_logs()
        _INJECTORS[kind]()

    def fault_fired(self, fault_id: int, kind: str, device: str) -> None:
        """An armed fault (drivers/faults.py) fired on a request of ``device``."""
        self.log.warning("fault %d (%s) fired on %s", fault_id, kind, device)
        self._own.pop(fault_id, None)  # the host's own faults fire once
        self._send(
            [
                "fault_fired",
                {
                    "name": self.name,
                    "pid": os.getpid(),
                    "id": fault_id,
                    "type": kind,
                    "device": device,
                },
            ]
        )

    def _set_faults(self, specs: list[Any]) -> None:
        """``["faults", [spec, ...]]``: the supervisor's table of armed faults."""
        previous, self._table = self._table, specs
        if not self._arm():
            self._table = previous

    def _add_fault(self, spec: dict[str, Any]) -> None:
        """``["fault", spec]``: one fault of the host's own (``driver_inject``), beside the
        supervisor's table: carried out now (``now``) or armed to fire once on a request."""
        spec = {k: v for k, v in spec.items() if k != "id"}
        try:
            fault = Fault.from_dict({**spec, "id": 0}, class_of_module(self.module_name))
        except ValueError as e:
            self.log.error("fault %s refused: %s", _short(spec), e)
            return
        if fault.now:
            self.carry_out(fault.type, really=fault.really)
            return
        fault_id = OWN_FAULT_IDS + self._own_seq
        self._own_seq += 1
        self._own[fault_id] = {**spec, "id": fault_id, "times": 1}
        if not self._arm():
            self._own.pop(fault_id)

    def _arm(self) -> bool:
        """Give the backend the supervisor's table and the host's own faults; False (logged)
        if it has no fault injection or refuses them."""
        specs = [*self._table, *self._own.values()]
        setter = getattr(self.backend, "set_faults", None)
        if setter is None:
            self.log.error(
                "cannot arm %d fault(s): backend %s has no fault injection (set_faults)",
                len(specs),
                self.module_name,
            )
            return False
        try:
            setter(specs)
        except ValueError as e:
            self.log.error("faults refused: %s", e)
            return False
        self.log.warning(
            "%d fault(s) armed: %s",
            len(specs),
            ", ".join(f"{s.get('id')}:{s.get('type')}" for s in specs if isinstance(s, dict))
            or "none",
        )
        return True

    # -- the loop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to end (thread- and signal-safe); it wakes at once and finishes."""
        self._stop.set()
        # not blocking: a SIGTERM may arrive while this thread closes the pipe, and then the
        # loop is ending anyway
        if self._wake_lock.acquire(blocking=False):
            try:
                if self._wake_w >= 0:
                    with contextlib.suppress(BlockingIOError):  # a byte is there already
                        os.write(self._wake_w, b"s")
            finally:
                self._wake_lock.release()

    def run(self) -> None:
        """Serve until :meth:`stop`; then close the backend and the sockets.  A spare first
        waits for ``["activate"]``.  In a process, an exception escaping the loop ends the
        process with status 70 (no clean-up: fail-stop)."""
        try:
            if self.spare and not self._await_activation():
                return
            self._loop()
        except Exception:
            if self.process:
                self._fail_stop("the driver loop")
            raise
        finally:
            self._shutdown()

    def _loop(self) -> None:
        poller = self._poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for fd in self._kick_keys:
            poller.register(fd, zmq.POLLIN)
        watched: set[int] = set()
        while not self._stop.is_set():
            watched = self._watch_fds(poller, watched)
            try:
                ready = self._wait(poller)
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM:
                    break
                raise
            if iotrace.ON:
                iotrace.mark(Stage.DRIVER_WAKE)
            raws = []
            for what, _ in ready:
                if what is self._pull:
                    raws = self._drain()
                elif isinstance(what, int) and what in self._kick_keys and doorbell.take(what):
                    self._again[self._kick_keys[what]] = None
            self._dispatch(raws)
            if self.mode != "active":
                continue  # drained: no heartbeat (the next instance's link is not ours)
            backend = self.backend
            for fd, _ in ready:
                if isinstance(fd, int) and fd in watched and backend is not None:
                    self._call("readable", backend.readable, fd)  # type: ignore[attr-defined]
            timer = getattr(backend, "timer", None)
            if timer is not None:
                self._call("timer", timer)
            if self._heartbeat_s:
                self._heartbeat()

    def _wait(self, poller: zmq.Poller) -> list[tuple[Any, int]]:
        """What is ready, after an adaptive busy poll when the last round served kicks.

        Sleeping costs a wake-up when the next kick comes (on this machine type ~15 µs to the
        kernel thread that rings, and as much again before this loop runs), so after serving
        a kick the loop first polls without sleeping for up to ``_poll_ns``, as KVM's halt
        polling and vhost's busy polling do.  The window adapts: it grows (doubling, up to
        ``poll_max_ns``) when the next kick came after the window but within the maximum, and
        halves when it came later or not at all; an idle driver does not poll at all.
        """
        timeout = self._poll_timeout()
        hot = self._hot and self.poll_max_ns > 0 and timeout > 0
        if hot and self._poll_ns:
            deadline = time.monotonic_ns() + self._poll_ns
            while True:
                ready = poller.poll(0)
                if ready:
                    return ready
                if time.monotonic_ns() >= deadline:
                    break
        t0 = time.monotonic_ns()
        ready = poller.poll(timeout)
        if hot:
            waited = time.monotonic_ns() - t0 + self._poll_ns
            if ready and waited <= self.poll_max_ns:
                self._poll_ns = min(self.poll_max_ns, max(2 * self._poll_ns, _POLL_START_NS))
            else:
                self._poll_ns //= 2
                if self._poll_ns < _POLL_START_NS:
                    self._poll_ns = 0
        return ready

    def _watch_fds(self, poller: zmq.Poller, watched: set[int]) -> set[int]:
        """Optional backend hook: ``fds()`` names file descriptors (e.g. a TAP device) the loop
        waits on beside the kernel's messages; ``readable(fd)`` is called when one is."""
        fds_fn = getattr(self.backend, "fds", None)
        now: set[int] = set()
        if fds_fn is not None and self.mode == "active":
            now = set(fds_fn())
        for fd in watched - now:
            poller.unregister(fd)
        for fd in now - watched:
            poller.register(fd, zmq.POLLIN)
        return now

    def _poll_timeout(self) -> int:
        """ms to wait for messages: none if a device wants another turn, else until the next
        heartbeat or the backend's own timed work is due (optional hook ``timer_ms() -> int |
        None``, then ``timer()`` runs every round), at most POLL_MS."""
        if self._again:
            return 0
        wait = POLL_MS
        timer_ms = getattr(self.backend, "timer_ms", None) if self.mode == "active" else None
        if timer_ms is not None:
            due = timer_ms()
            if due is not None:
                wait = max(0, min(wait, int(due)))
        if not self._heartbeat_s:
            return wait
        left = self._next_heartbeat - time.monotonic()
        return max(0, min(wait, math.ceil(left * 1000)))

    def _statistics(self) -> None:
        """``["report"]``: answer ``["statistics", {name, pid, values}]`` (the backend's
        ``statistics()``: at most 64 numbers or strings).  If ``statistics()`` raises, or
        does not return a dict, the answer is ``values`` ``{}`` and ``error`` says why (shown
        by ``isovisor driver stats``); its traceback is logged once per distinct error."""
        fn = getattr(self.backend, "statistics", None)
        if fn is None:
            return
        values: dict[str, Any] = {}
        error: str | None = None
        try:
            got = fn()
        except Exception as e:
            error = f"statistics() raised {_exception_text(e)}"
            where = where_in_backend(e, self.source)
            error += f" (at {where})" if where else ""
            if error != self._statistics_error:
                self.log.exception("%s; no statistics this time", error)
        else:
            if isinstance(got, dict):
                values = {
                    str(k): v
                    for k, v in got.items()
                    if isinstance(v, int | float | str) and not isinstance(v, bool)
                }
            else:
                error = f"statistics() returned {type(got).__name__}, not a dict"
                if error != self._statistics_error:
                    self.log.error("%s; no statistics this time", error)
        if error is None and self._statistics_error is not None:
            self.log.info("statistics() answers again")
        self._statistics_error = error
        report: dict[str, Any] = {
            "name": self.name,
            "pid": os.getpid(),
            "values": dict(list(values.items())[:64]),
        }
        if error is not None:
            report["error"] = error
        self._send(["statistics", report])

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._heartbeat_seq += 1
        self._send(["heartbeat", self.name, self._heartbeat_seq])
        self._next_heartbeat += self._heartbeat_s
        if self._next_heartbeat <= now:  # the loop was held up: no burst to catch up
            self._next_heartbeat = now + self._heartbeat_s

    def _await_activation(self) -> bool:
        """A spare waits here for ``["activate"]`` (or ``["restore", state]``: it is the new
        implementation of a hot swap), then says hello: True.  False if it was stopped first,
        or if its backend refused the state.  Anything else that arrives meanwhile is logged
        and ignored."""
        self.log.info("spare: waiting for activate at %s", self.endpoint)
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            if not any(s is self._pull for s, _ in poller.poll(POLL_MS)):
                continue
            try:
                raw = self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            msg = self._parse(raw)
            if msg is not None and msg[0] == "activate":
                if iotrace.RECOVERY:
                    iotrace.mark(Stage.D_ACTIVATED, os.getpid())
                self.spare = False
                self.mode = "active"
                self._hello()  # first: a log line here costs ms when the spare was long idle
                self.log.info("spare activated: said hello")
                return True
            if msg is not None and msg[0] == "restore":
                if self._restore(msg[1], fresh=False):
                    self.spare = False
                    return True
                continue  # refused: the kernel rolls back; the supervisor ends us
            if msg is not None and msg[0] == "faults":
                self._set_faults(msg[1])  # armed before it takes over (the supervisor's table)
                continue
            if msg is not None:
                self.log.warning("spare: ignoring %s before activation", _short(msg))
        return False

    # -- hot swap --------------------------------------------------------------------------------
    def drain(self) -> None:
        """``["drain"]``: save the backend's state, suspend it, say ``saved``; drained."""
        if self.mode != "active":
            self.log.warning("ignoring drain: this host is %s", self.mode)
            return
        backend = self.backend
        save, suspend = getattr(backend, "save", None), getattr(backend, "suspend", None)
        if save is None or suspend is None:
            self._send(
                [
                    "drain_failed",
                    {
                        "name": self.name,
                        "pid": os.getpid(),
                        "error": f"backend {self.implementation} cannot be drained: it has no "
                        "save() and suspend() (subclass drivers.sdk.BlockBackend, NetBackend or "
                        "ConsoleBackend)",
                    },
                ]
            )
            return
        started = time.monotonic_ns()
        try:
            state = save()
            wire = state.to_wire()
        except Exception as e:  # nothing was let go yet: the old backend goes on serving
            self.log.exception("drain: save() failed; the backend goes on serving")
            self._send(
                [
                    "drain_failed",
                    {
                        "name": self.name,
                        "pid": os.getpid(),
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                    },
                ]
            )
            return
        self._call("suspend", suspend)  # a failure here is fail-stop: recovery takes over
        self.mode = "drained"
        for key in list(self._bells):  # a rollback attaches every device again, with its bells
            self._drop_bells(key)
        self._again.clear()
        self.log.warning(
            "drained for a hot swap in %.2f ms: state of %d device(s) saved",
            (time.monotonic_ns() - started) / 1e6,
            len(wire["devices"]),
        )
        self._send(["saved", {"name": self.name, "pid": os.getpid(), "state": wire}])

    def _restore(self, wire: dict[str, Any], *, fresh: bool) -> bool:
        """``["restore", state]``: restore it (into a new backend if ``fresh``), say
        ``restored`` and hello: True.  If the backend refuses, say ``restore_failed``."""
        try:
            state = BackendState.from_wire(wire)
            backend = self._factory(self, self.options) if fresh else self.backend
            restore = getattr(backend, "restore", None)
            if restore is None:
                raise TypeError(f"backend {self.implementation} has no restore(state)")
            restore(state)
            now = backend.save().to_wire()  # type: ignore[union-attr]
        except Exception as e:
            self.log.error("restore refused: %s: %s", type(e).__name__, e, exc_info=True)
            self._send(
                [
                    "restore_failed",
                    {
                        "name": self.name,
                        "pid": os.getpid(),
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                    },
                ]
            )
            return False
        if fresh and self.backend is not backend:
            self._close_backend()
            self.backend = backend
        self.mode = "active"
        self.log.warning(
            "restored the state of %s (version %s, %d device(s)): serving",
            state.implementation,
            state.version,
            len(state.devices),
        )
        self._send(["restored", {"name": self.name, "pid": os.getpid(), "state": now}])
        self._hello()
        return True

    def _restore_in_place(self, wire: dict[str, Any]) -> None:
        """``["restore", state]`` to a serving instance, before its devices are attached: it
        replaces both instances of a hot swap that died, and takes over from their newest
        state.  A refusal escapes (fail-stop: the next instance tries again)."""
        restore = getattr(self.backend, "restore", None)
        if restore is None:
            self.log.error(
                "cannot restore a state: backend %s has no restore()", self.implementation
            )
            return
        restore(BackendState.from_wire(wire))

    def _close_backend(self) -> None:
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:
                self.log.exception("closing the backend failed")

    def _drain(self) -> list[bytes]:
        out: list[bytes] = []
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
            self.log.warning(
                "ignoring a message that is not msgpack (%s): %r",
                f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                raw[:64],
            )
            return None
        if not isinstance(msg, list) or not msg:
            self.log.warning("ignoring a message that is not a non-empty list: %s", _short(msg))
            return None
        kind = msg[0]
        sig = _SIGNATURES.get(kind) if isinstance(kind, str) else None
        if sig is None:
            self.log.warning(
                "ignoring a message of unknown type %s (known: %s)",
                _short(kind),
                ", ".join(_SIGNATURES),
            )
            return None
        checks, shape = sig
        args = msg[1:]
        if len(args) != len(checks) or not all(c(a) for c, a in zip(checks, args, strict=True)):
            self.log.warning(
                "ignoring a malformed %s message %s: expected %s", kind, _short(msg), shape
            )
            return None
        return msg

    def _dispatch(self, raws: list[bytes]) -> None:
        kicked, self._again = self._again, {}
        self._hot = False
        for raw in raws:
            msg = self._parse(raw)
            if msg is None:
                continue
            kind = msg[0]
            if kind == "faults":
                self._set_faults(msg[1])
                continue
            if kind == "restore":
                if self.mode == "active":
                    self._call("restore", self._restore_in_place, msg[1])
                elif self._restore(msg[1], fresh=True):
                    kicked.clear()
                continue
            if self.mode == "drained":
                continue  # a rollback (restore) re-attaches everything afresh
            if kind == "sync":  # every message before it is handled (a save waits for this)
                self._send(["synced", {"name": self.name, "pid": os.getpid(), "token": msg[1]}])
                continue
            if kind == "fault":
                self._call("fault", self._add_fault, msg[1])
                continue
            if kind == "kick":
                kicked[msg[1]] = None
                continue
            if kind == "activate":
                self.log.warning("ignoring activate: this driver is active already")
                continue
            if kind == "drain":
                self.drain()
                kicked.clear()
                continue
            if kind == "report":
                self._statistics()
                continue
            if kind == "retire":  # the stack goes down: remove what outlives instances
                hook = getattr(self.backend, "cleanup", None)
                if hook is not None:
                    self._call("cleanup", hook)
                self.stop()
                continue
            if kind == "committed":  # the framework's part first (BlockBackend), else the hook
                hook = getattr(self.backend, "swap_committed", None) or getattr(
                    self.backend, "committed", None
                )
                if hook is not None:
                    self._call("committed", hook)
                continue
            if kind == "mirror":  # a migration copies the disk along (only disks have it)
                hook = getattr(self.backend, "mirror_writes", None)
                if hook is None:
                    self.log.warning("ignoring mirror: this driver copies no disks")
                else:
                    self._call("mirror", hook, msg[1], msg[2])
                continue
            if kind == "detach":
                kicked.pop(msg[1], None)
            elif kind == "attach" and iotrace.RECOVERY:
                iotrace.mark(Stage.D_ATTACH, msg[1].get("key", 0))
            if kind == "attach":
                msg[1].pop("segment_fd", None)  # only ever the host's own (below)
                if msg[1].pop("doorbells", False):
                    self._call("attach", self._adopt_bells, msg[1])
            self.log.debug("%s %s", kind, _short(msg[1:], 400))
            try:
                self._call(kind, getattr(self.backend, kind), *msg[1:])
            finally:
                if kind == "attach":
                    self._close_segment_fd(msg[1])
            if kind == "detach":
                self._drop_bells(msg[1])
        if self.mode != "active":
            return
        backend = self.backend
        assert backend is not None
        self._hot = bool(kicked)
        for key in kicked:
            if iotrace.ON:
                iotrace.mark(Stage.DRIVER_KICK, key)
            self._call("kick", backend.kick, key)

    # -- doorbells -----------------------------------------------------------------------------
    def _adopt_bells(self, dev: dict[str, Any]) -> None:
        """An ``attach`` that says ``doorbells``: take the device's two eventfds and its
        segment descriptor, which the kernel queued on the doorbell connection before it sent
        the attach.  The segment's goes into the attach as ``segment_fd``, for the backend to
        map; :meth:`_close_segment_fd` closes it once the backend's ``attach`` returned."""
        key = dev.get("key")
        self._receive_bells()
        fds = self._parked.pop(key, None) if isinstance(key, int) else None
        if fds is None:
            raise RuntimeError(
                f"the attach of device {key!r} says doorbells, but the kernel's doorbell "
                "connection holds none for it"
            )
        assert isinstance(key, int)
        kick, notify, segment = fds
        dev["segment_fd"] = segment
        self._drop_bells(key)
        self._bells[key] = (kick, notify)
        self._kick_keys[kick] = key
        if self._poller is not None:
            self._poller.register(kick, zmq.POLLIN)
        self._again[key] = None  # a kick rung before the attach is not lost: look once

    @staticmethod
    def _close_segment_fd(dev: dict[str, Any]) -> None:
        """Close the segment descriptor :meth:`_adopt_bells` put in an attach, if any, and
        take it out of the attach (a backend may keep the dict: no stale number stays in it)."""
        fd = dev.pop("segment_fd", None)
        if isinstance(fd, int) and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _receive_bells(self) -> None:
        while self._bell is not None:
            try:
                got = doorbell.receive_bells(self._bell)
            except (ConnectionError, ValueError, OSError) as e:
                self.log.error("doorbell connection: %s; closed", e)
                self._bell.close()
                self._bell = None
                return
            if got is None:
                return
            key, kick, notify, segment = got
            for fd in self._parked.pop(key, ()):  # an attach that never came: not used
                os.close(fd)
            self._parked[key] = (kick, notify, segment)

    def _drop_bells(self, key: object) -> None:
        """Close this instance's copies of device ``key``'s doorbells (and any descriptors
        received for an attach of it that was not handled)."""
        for fd in self._parked.pop(key, ()) if isinstance(key, int) else ():
            os.close(fd)
        fds = self._bells.pop(key, None) if isinstance(key, int) else None
        if fds is None:
            return
        self._kick_keys.pop(fds[0], None)
        if self._poller is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(fds[0])
        for fd in fds:
            os.close(fd)

    def _call(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            if self.process:
                self._fail_stop(f"{what}{args!r} failed in the backend")
            self.log.exception("%s%r failed in the backend; the driver goes on", what, args)

    def _fail_stop(self, what: str) -> NoReturn:
        """Fail-stop: log the exception being handled and end the process (status 70) without
        any clean-up; the supervisor replaces the driver and the replacement redoes what was
        in flight."""
        self.log.critical(
            "%s: unhandled exception; exiting with status %d so that the driver is replaced",
            what,
            EXIT_SOFTWARE,
            exc_info=True,
        )
        exc = sys.exc_info()[1]
        write_report(
            self.report,
            f"{what}: {_exception_line()}",
            traceback.format_exc(),
            where_in_backend(exc, self.source) if exc is not None else "",
        )
        _flush_logs()
        os._exit(EXIT_SOFTWARE)

    # -- sending -------------------------------------------------------------------------------
    def _send(self, msg: list[Any]) -> None:
        self._send_raw(msgpack.packb(msg))

    def _send_raw(self, data: bytes) -> None:
        """Send one message, after the ``name:pid`` frame that tells the kernel who sent it."""
        try:
            self._push.send_multipart((self._sender, data), zmq.NOBLOCK)
        except zmq.Again:
            self._send_failures += 1
            if self._send_failures <= 20 or self._send_failures % 1000 == 0:
                self.log.error(
                    "the kernel is not taking messages (%d queued): dropped %r (%d dropped so far)",
                    SNDHWM,
                    msgpack.unpackb(data)[:2],
                    self._send_failures,
                )

    # -- shutdown ------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        self._close_backend()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for key in list(self._bells):
            self._drop_bells(key)
        for fds in self._parked.values():
            for fd in fds:
                os.close(fd)
        self._parked.clear()
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        for s in (self._pull, self._push):
            s.close(linger=0)
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1


def load_backend(
    spec: str, *, swappable: bool = False
) -> tuple[Callable[[DriverHost, dict[str, Any]], Backend], str]:
    """The backend class ``spec`` names (see the module docstring) and its canonical name
    (``module:Class`` or ``/abs/file.py:Class``).  HostError says what is wrong: no such module
    or file, a syntax error (with its line), no such class, or a class that lacks part of the
    interface (``swappable``: also save, suspend and restore)."""
    if not isinstance(spec, str) or not spec.strip():
        raise HostError(
            "the backend must be named: package.module[:Class] or /path/to/file.py[:Class]"
        )
    where, _, cls_name = spec.strip().rpartition(":") if ":" in spec else (spec, "", "")
    if not where:
        where, cls_name = spec, ""
    is_file = where.endswith(".py") or "/" in where
    mod = _import_file(where) if is_file else _import_module(where)
    origin = str(Path(where).resolve()) if is_file else where
    if cls_name:
        cls = getattr(mod, cls_name, None)
        if cls is None:
            raise HostError(
                f"{origin} has no class {cls_name!r} (it defines: "
                f"{', '.join(_classes(mod)) or 'no classes'})"
            )
    else:
        cls = getattr(mod, "Backend", None)
        if cls is None:
            own = [
                c
                for c in _classes(mod, own=True)
                if all(callable(getattr(getattr(mod, c), m, None)) for m in REQUIRED_METHODS)
            ]
            if len(own) != 1:
                raise HostError(
                    f"{origin} has no Backend class; name the class: "
                    f"{origin}:<Class> (backend classes there: "
                    f"{', '.join(own) or 'none'})"
                )
            cls_name = own[0]
            cls = getattr(mod, cls_name)
        else:
            cls_name = "Backend"
    name = f"{origin}:{cls_name}"
    if not inspect.isclass(cls):
        raise HostError(f"{name} is not a class but {type(cls).__name__}")
    need = REQUIRED_METHODS + (SWAP_METHODS if swappable else ())
    missing = [m for m in need if not callable(getattr(cls, m, None))]
    if missing:
        raise HostError(
            f"{name} does not implement the backend interface: it has no "
            f"{', '.join(missing)} (subclass the drivers.sdk class of its device: BlockBackend, "
            "NetBackend or ConsoleBackend; see docs/sdk.md)"
        )
    if inspect.isabstract(cls):
        abstract = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise HostError(
            f"{name} does not implement the backend interface: it must define "
            f"{abstract} (see docs/sdk.md)"
        )
    # the checks above stand in for the static type: a class with the backend interface
    return cast("Callable[[DriverHost, dict[str, Any]], Backend]", cls), name


def _classes(mod: Any, own: bool = False) -> list[str]:
    return [
        n
        for n, v in vars(mod).items()
        if inspect.isclass(v)
        and not n.startswith("_")
        and (not own or v.__module__ == mod.__name__)
    ]


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise HostError(
                f"no module named {name!r}: check the name, or give a file with --to-file"
            ) from e
        raise HostError(f"cannot import driver module {name!r}: {e}") from e
    except SyntaxError as e:
        raise HostError(
            f"cannot import driver module {name!r}: syntax error in "
            f"{e.filename}, line {e.lineno}: {e.msg}"
        ) from e
    except Exception as e:
        raise HostError(f"cannot import driver module {name!r}: {type(e).__name__}: {e}") from e


def _import_file(path: str) -> Any:
    p = Path(path).resolve()
    if not p.is_file():
        raise HostError(f"backend file {p} does not exist")
    # a fresh module name per path and content: a changed file is a new module (--watch)
    digest = hashlib.sha1(str(p).encode() + p.read_bytes()).hexdigest()[:12]
    modname = f"isovisor_backend_{re.sub(r'[^A-Za-z0-9_]', '_', p.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(modname, p)
    if spec is None or spec.loader is None:
        raise HostError(f"cannot load {p} as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        sys.modules.pop(modname, None)
        raise HostError(f"syntax error in {e.filename}, line {e.lineno}: {e.msg}") from e
    except Exception as e:
        sys.modules.pop(modname, None)
        raise HostError(f"importing {p} failed: {type(e).__name__}: {e}") from e
    return mod


def _exception_line() -> str:
    """``Type: message`` of the exception being handled."""
    v = sys.exc_info()[1]
    return _exception_text(v) if v is not None else "unknown error"


def _exception_text(e: BaseException) -> str:
    """``Type: message`` (the type alone if the message is empty)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


#: This checkout's packages: a traceback's frames in them are isovisor's, not a backend's.
_FRAMEWORK: tuple[str, ...] = tuple(
    str(Path(__file__).resolve().parents[1] / p) + os.sep
    for p in ("devices", "domains", "drivers", "ipc", "isovisor", "kernel")
)
#: Python's own modules and installed packages.
_LIBRARIES: tuple[str, ...] = tuple(
    sorted(
        {
            str(Path(p).resolve()) + os.sep
            for k, p in sysconfig.get_paths().items()
            if k in ("stdlib", "platstdlib", "purelib", "platlib")
        }
    )
)


def source_file(obj: object) -> str | None:
    """The file a backend class (or module) is defined in, resolved; None if unknown."""
    try:
        path = inspect.getsourcefile(obj)  # type: ignore[arg-type]
    except TypeError:
        return None
    return str(Path(path).resolve()) if path else None


def where_in_backend(exc: BaseException, source: str | None = None) -> str:
    """``file:line, in function`` of the last frame of ``exc``'s traceback that is in the
    backend developer's code, or "" if none is: a file outside isovisor's own packages
    (``drivers/``, ``kernel/`` ...) and outside Python's and installed packages' (the
    backend's own ``source`` counts even when it is installed)."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
            continue
        path = str(Path(frame.filename).resolve())
        if path.startswith(_FRAMEWORK):
            continue
        if path == source or not path.startswith(_LIBRARIES):
            return f"{path}:{frame.lineno}, in {frame.name}"
    return ""


def _user_traceback(e: HostError) -> str:
    """The traceback worth showing for a start failure: that of an exception raised by the
    backend's own code while it was imported; none for what the message already says all of
    (no such module or class, a syntax error with its line, a missing method)."""
    cause = e.__cause__
    if cause is None or isinstance(cause, ModuleNotFoundError | SyntaxError):
        return ""
    return "".join(traceback.format_exception(cause))


def write_report(path: str | None, error: str, tb: str, where: str = "") -> None:
    """Tell the supervisor why this instance could not start or ended (``--report``):
    ``error`` (what, with the exception's type and message), ``where`` (the frame in the
    developer's code, see :func:`where_in_backend`) and the traceback."""
    if not path:
        return
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps({"error": error, "where": where, "traceback": tb}))


# --- fault injection ------------------------------------------------------------------------------


def _flush_logs() -> None:
    """Push out what was logged before the process ends without clean-up."""
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _touched_allocation(nbytes: int) -> bytearray:
    """``nbytes`` with every page written, so they count in the RSS."""
    buf = bytearray(nbytes)
    buf[::_PAGE] = b"\x01" * len(range(0, nbytes, _PAGE))
    return buf


def _no_core_dump() -> None:
    """An injected crash must not leave (or spend time writing) a core file."""
    with contextlib.suppress(OSError, ValueError):
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0)


def _die_by_signal(sig: signal.Signals) -> None:
    """Make sure ``sig`` kills the process as itself: no Python or faulthandler handler."""
    _no_core_dump()
    faulthandler.disable()
    with contextlib.suppress(ValueError, OSError):  # ValueError: not the main thread
        signal.signal(sig, signal.SIG_DFL)


def _inject_exit() -> NoReturn:
    os._exit(EXIT_INJECTED)


def _inject_exception() -> NoReturn:
    raise InjectedFault("injected fault: an exception, as a bug in the backend would raise")


def _inject_segv() -> NoReturn:
    _die_by_signal(signal.SIGSEGV)
    ctypes.string_at(1)  # read address 1: a real invalid memory access, SIGSEGV
    os.kill(os.getpid(), signal.SIGSEGV)  # not reached
    raise AssertionError("still alive after SIGSEGV")


def _inject_abort() -> NoReturn:
    _die_by_signal(signal.SIGABRT)
    os.abort()


def _inject_hang() -> NoReturn:
    """The loop is stuck here: no more heartbeats, no message handled, SIGTERM only sets the
    stop flag nobody looks at.  Only an orphaned driver (its parent gone) ends itself."""
    parent = os.getppid()
    stuck = threading.Event()  # never set
    while not stuck.wait(1.0):
        if os.getppid() != parent:
            os._exit(EXIT_INJECTED)
    raise AssertionError("unreachable")


_INJECTORS: dict[str, Callable[[], None]] = {
    "exit": _inject_exit,
    "exception": _inject_exception,
    "segv": _inject_segv,
    "abort": _inject_abort,
    "hang": _inject_hang,
}


def _short(v: object, limit: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


# --- in-process drivers ---------------------------------------------------------------------------


class InlineDriver:
    """A driver host running in a daemon thread of this process."""

    def __init__(
        self, name: str, endpoint: str, thread: threading.Thread, host: DriverHost
    ) -> None:
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


def start_inline(
    name: str,
    module: str,
    options: dict[str, Any],
    ctx: zmq.Context[Any],
    kernel_endpoint: str,
    listen_endpoint: str,
    *,
    watchdog_ms: int = 0,
    request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
    bells: str | None = None,
) -> InlineDriver:
    """Run a driver host in a daemon thread sharing ``ctx``; returns once it listens and has
    said hello, or raises HostError if it cannot start.  An inline driver is not fail-stop (an
    exception in its backend is logged and it goes on) and refuses the injected faults that
    would kill or stall the kernel."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            host = DriverHost(
                name,
                module,
                options,
                ctx,
                kernel_endpoint,
                listen_endpoint,
                watchdog_ms=watchdog_ms,
                request_timeout_ms=request_timeout_ms,
                bells=bells,
            )
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
        if isinstance(err, HostError):
            raise err  # (its cause, if any, kept: the backend's exception)
        raise HostError(f"driver {name}: {err}") from err
    return InlineDriver(name, listen_endpoint, t, box["host"])


# --- process mode ---------------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative (0 means none)")
    return v


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m drivers.host", description="isovisor driver host process"
    )
    ap.add_argument("--name", required=True, help="driver name (store: /driver/<name>/)")
    ap.add_argument("--module", required=True, help="backend module, e.g. drivers.blk")
    ap.add_argument("--kernel", required=True, help="the kernel's driver endpoint (PUSH to it)")
    ap.add_argument("--listen", required=True, help="endpoint to bind for kernel messages")
    ap.add_argument("--options", default="{}", help="backend options as a JSON object")
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument(
        "--keeper",
        default="",
        help="the keeper library to start first (drivers/keeper.py; none if empty)",
    )
    ap.add_argument(
        "--jail",
        default="",
        help="a jail spec (JSON, drivers/jail.py) to enter before the backend is imported",
    )
    ap.add_argument(
        "--spare",
        action="store_true",
        help='start as a warm spare: say "spare", wait for ["activate"], then hello',
    )
    ap.add_argument(
        "--watchdog-ms",
        type=_non_negative_int,
        default=0,
        help="heartbeat deadline; a heartbeat goes out every N/4 ms (0: none)",
    )
    ap.add_argument(
        "--request-timeout-ms",
        type=_non_negative_int,
        default=DEFAULT_REQUEST_TIMEOUT_MS,
        help="reported in hello: a request outstanding longer is a hang",
    )
    ap.add_argument(
        "--debug",
        metavar="PDB_SOCKET",
        default=None,
        help="debug mode: breakpoint() opens pdb on this UNIX socket (without it, "
        "breakpoint() is logged and skipped); the supervisor also turns the hang checks off",
    )
    ap.add_argument(
        "--report",
        default=None,
        help="write why this instance could not start or ended (JSON) here",
    )
    ap.add_argument(
        "--swappable",
        action="store_true",
        help="a hot swap's new implementation: the backend must also support hot swap "
        "(save, suspend, restore)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s driver {args.name}[%(process)d] %(levelname)s %(message)s",
    )
    log = logging.getLogger(f"isovisor.driver.{args.name}")
    die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the parent died before we could ask to die with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    keeper_code = None
    if args.keeper:
        try:
            keeper_code = keeper.load(Path(args.keeper))
        except keeper.KeeperError as e:  # recovery works without it, ~3 ms later
            log.warning("no keeper: %s", e)
    if args.jail:
        try:
            entered = jail.enter(jail.JailSpec.from_json(args.jail))
        except jail.JailError as e:
            log.error("driver %s could not enter its jail: %s", args.name, e)
            with contextlib.suppress(OSError):
                write_report(args.report, f"could not enter the jail: {e}", "")
            return 2
        die_with_parent()  # (a change of uid clears the parent-death signal)
        if args.parent_pid and os.getppid() != args.parent_pid:
            return 1
        log.info(
            "driver %s jailed: uid %d, gid %d, %d paths",
            args.name,
            entered.uid,
            entered.gid,
            len(entered.paths),
        )
    if keeper_code is not None:  # after the jail: it shares our memory, so our privileges
        try:
            keeper.start(keeper_code)
        except keeper.KeeperError as e:
            log.warning("no keeper: %s", e)
    breakpoints = debugger.install(args.name, log, args.debug)
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
            host = DriverHost(
                args.name,
                args.module,
                options,
                ctx,
                args.kernel,
                args.listen,
                process=True,
                spare=args.spare,
                watchdog_ms=args.watchdog_ms,
                request_timeout_ms=args.request_timeout_ms,
                report=args.report,
                swappable=args.swappable,
                bells=doorbell.path_for(args.kernel),
            )
        except HostError as e:  # the module, the class or its constructor (the options)
            tb = _user_traceback(e)
            where = where_in_backend(e.__cause__) if e.__cause__ is not None else ""
            log.error(
                "driver %s could not start: %s%s%s",
                args.name,
                e,
                f" (at {where})" if where else "",
                f"\n{tb.rstrip()}" if tb else "",
            )
            write_report(args.report, str(e), tb, where)
            return 2
        except Exception as e:  # a bug of the host's own
            log.exception("driver %s: the host failed to start", args.name)
            write_report(
                args.report,
                f"the driver host failed to start: {_exception_text(e)}",
                traceback.format_exc(),
                where_in_backend(e),
            )
            return 2
        signal.signal(signal.SIGTERM, lambda *_: host.stop())
        if breakpoints is not None:  # a breakpoint waiting for its client gives way to a stop
            breakpoints.stopping = host._stop.is_set
        log.info(
            "driver %s (%s) listening at %s%s",
            args.name,
            args.module,
            args.listen,
            " as a spare" if args.spare else "",
        )
        if args.debug:
            log.warning(
                "driver %s is in debug mode: no hang checks (heartbeat watchdog, request "
                "timeout, stopped process); breakpoint() %s",
                args.name,
                f"opens pdb at {args.debug}"
                if breakpoints is not None
                else "follows PYTHONBREAKPOINT",
            )
        host.run()
        log.info("driver %s stopped", args.name)
        return 0
    finally:
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
