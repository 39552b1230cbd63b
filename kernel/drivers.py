"""The kernel's end of the driver channels: who is connected, and messages both ways.

Every driver binds a ZeroMQ PULL socket (its *endpoint*) and connects a PUSH socket to the
kernel's driver endpoint, where one thread of this module receives.  Messages are msgpack lists
(``docs/devices.md``).  The kernel sends from whatever thread it is on (a pCPU thread for a
guest's kick, the control thread for an attach) through a thread-local PUSH socket per driver
endpoint, never blocking: a driver that does not drain its queue loses kicks, not the kernel's
time (kicks are level-triggered in effect: a backend always re-reads the ring).  Control messages
(attach, detach, fe_state) must arrive in the order they were made, whatever thread made them, so
they go through one queue and are sent by the drivers thread alone (one pipe per driver, FIFO).

Inline drivers (``isolation = "inline"``) run the same driver host in a thread of this process,
reached over ``inproc://`` endpoints of the same ZeroMQ context; the host module is imported by
name, never statically.

Driver instances come and go (``docs/recovery.md``): a link is replaced by the next ``hello`` of
the same name and dropped by ``driver_lost``.  Each thread's PUSH socket to an endpoint that no
link uses any more is closed the next time that thread sends, so restarts do not leak sockets.
The drivers thread also calls ``on_tick`` every :data:`TICK_S` seconds (the device layer's
watchdog).

The data path's wake-ups do not use ZeroMQ when a driver connected to the doorbell socket
(``ipc/doorbell.py``): each device's kick and notify eventfds, and a descriptor on its
shared-memory segment, go to the driver with its ``attach``, a kick is a write to the kick
eventfd (from the pCPU thread), and the drivers thread waits on every device's notify eventfd
through one epoll beside its ZeroMQ socket.  These descriptors are closed on the drivers thread
only, so a descriptor number it is about to read or send is never one reused meanwhile.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

import msgpack
import zmq

from ipc import doorbell, iotrace
from ipc.iotrace import Stage

log = logging.getLogger("isovisor.kernel")

INPROC_ENDPOINT: Final = "inproc://kernel-drivers"
#: Module that hosts drivers (process and inline); loaded by name.
HOST_MODULE: Final = "drivers.host"
_SNDHWM: Final = 100_000
#: Seconds between two calls of ``on_tick`` (the hang and flood checks).
TICK_S: Final = 0.1
#: Messages taken from the driver socket per wake-up before the tick gets a chance to run.
_DRAIN: Final = 2000
#: ``request_timeout_ms`` when a hello does not say.
DEFAULT_REQUEST_TIMEOUT_MS: Final = 10_000

Handler = Callable[[list[Any]], None]


class Malformed(ValueError):
    """A driver message of a known kind with the wrong shape.  Raised by the handlers; the
    hub logs it and, if the message names its sender, reports a violation by that driver."""


@dataclass(eq=False)
class DriverLink:
    """A connected driver instance, and what the kernel watches about it.

    ``last_seen`` is the monotonic time of the last message attributed to this instance;
    the ``*_reported`` flags make the hang and violation events fire once per link; ``awaiting``
    holds the device keys whose ``recovered`` report the kernel waits for since the hello.
    """

    name: str
    endpoint: str
    pid: int
    module: str
    isolation: str
    watchdog_ms: int = 0
    request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS
    last_seen: float = field(default_factory=time.monotonic)
    hang_reported: bool = False
    violation_reported: bool = False
    notify_window: float = 0.0
    notify_count: int = 0
    awaiting: set[int] = field(default_factory=set)
    recovered: int = 0
    replayed: int = 0
    done_ns: int = 0
    replay_reported: bool = False
    #: The instance answers ``["report"]`` with its backend's statistics (said in hello).
    reports: bool = False
    statistics: dict[str, Any] = field(default_factory=dict)
    #: Why the last ``statistics()`` gave no values (it raised, or returned no dict), or None.
    statistics_error: str | None = None
    #: The instance's doorbell connection (None: kicks and notifications go over ZeroMQ).
    bell: socket.socket | None = None

    def touch(self, now: float | None = None) -> None:
        """Note a sign of life from this instance."""
        self.last_seen = time.monotonic() if now is None else now


class DriverHub:
    """The driver channels: links by name, ordered control messages, and the receiving thread."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoints: list[str],
        on_message: Handler,
        on_hello: Callable[[DriverLink], None],
        on_tick: Callable[[], None] | None = None,
        on_violation: Callable[[DriverLink, str], None] | None = None,
    ) -> None:
        self.ctx = ctx
        #: Called on the drivers thread with (device key, rings) when a notify doorbell rang.
        self.on_notify: Callable[[int, int], None] | None = None
        #: A live device's ``(kick_fd, notify_fd, segment_fd)``, or None (set by the device
        #: layer; called on the drivers thread, the only one that closes them).
        self.bells_of: Callable[[int], tuple[int, int, int] | None] | None = None
        #: Called with a notify doorbell just before this hub waits on it, and just before it
        #: is closed (the scheduler's idle pCPUs wait on it too, registered first:
        #: Scheduler.watch_fd / unwatch_fd).
        self.before_watch: Callable[[int], None] | None = None
        self.before_close: Callable[[int], None] | None = None
        self.on_message = on_message
        self.on_hello = on_hello
        self.on_tick = on_tick
        self.on_violation = on_violation
        self.links: dict[str, DriverLink] = {}
        #: Every driver name that has ever said hello (a kick for one of them while it has no
        #: link is dropped, not refused).
        self.known: set[str] = set()
        self._endpoints_version = 0
        #: The endpoint of each driver's warm spare, connected ahead of its hello so that the
        #: first control message after a failover does not wait for a connection.
        self._standby: dict[str, str] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._all_socks: list[zmq.Socket] = []
        self._inline: dict[str, Any] = {}
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        for ep in [*endpoints, INPROC_ENDPOINT]:
            self.pull.bind(ep)
        #: The doorbell socket (beside the first ipc:// endpoint), or None.
        self.bell_path = next((p for p in map(doorbell.path_for, endpoints) if p is not None), None)
        self._bell_listener = doorbell.listen(self.bell_path) if self.bell_path else None
        #: Doorbell connections by descriptor, with the ``name:pid`` they said (None: not yet).
        self._bell_conns: dict[int, tuple[socket.socket, str | None]] = {}
        self._epoll = select.epoll()
        #: notify eventfd -> device key (the drivers thread waits on them through the epoll,
        #: and idle pCPU threads through theirs)
        self._notify_keys: dict[int, int] = {}
        #: Held while a notify doorbell is looked up and read (any thread), and while one is
        #: closed: a descriptor number read after its close could be another eventfd's.
        self._bells_lock = threading.Lock()
        self._closing: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self._poller = zmq.Poller()
        #: (driver name, or None for an endpoint of its own, endpoint, message)
        self._ctl: queue.SimpleQueue[tuple[str | None, str, list[Any]]] = queue.SimpleQueue()
        self._running = True
        self.thread = threading.Thread(target=self._loop, name="drivers", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- sending (any thread) --------------------------------------------------------------------
    def send_control(self, name: str, msg: list[Any]) -> bool:
        """Queue an ordered control message for driver ``name``; False if it is not
        connected.  Sent by the drivers thread, in the order of these calls."""
        if name not in self.links:
            return False
        self._queue_control(name, "", msg)
        return True

    def send_control_to(self, endpoint: str, msg: list[Any]) -> None:
        """Queue a control message for the instance at ``endpoint``, whether or not it is a
        driver's link (a hot swap's spare, or the drained instance of a rollback)."""
        self._queue_control(None, endpoint, msg)

    def _queue_control(self, name: str | None, endpoint: str, msg: list[Any]) -> None:
        self._ctl.put((name, endpoint, msg))
        if threading.current_thread() is self.thread:
            self._flush_control()  # already on the sending thread: no doorbell round trip
        else:
            self._send_on(INPROC_ENDPOINT, [_DOORBELL])

    def send(self, name: str, msg: list[Any]) -> bool:
        """Send a kick-like ``msg`` to driver ``name`` now, from this thread; False if it is
        not connected or not draining."""
        link = self.links.get(name)
        if link is None:
            return False
        return self._send_on(link.endpoint, msg)

    def kick(self, name: str, key: int, kick_fd: int) -> bool:
        """The guest kicked device ``key`` of driver ``name``: ring its kick doorbell if the
        driver took doorbells, else send ``["kick", key]``; False if it is not connected."""
        link = self.links.get(name)
        if link is None:
            return False
        if link.bell is not None:
            doorbell.ring(kick_fd)
            return True
        return self._send_on(link.endpoint, ["kick", key])

    # -- doorbells -----------------------------------------------------------------------------
    def watch_notify(self, fd: int, key: int) -> None:
        """Wait on notify doorbell ``fd`` of device ``key`` (any thread).  ``EPOLLEXCLUSIVE``,
        and registered after ``before_watch`` registered it in the idle pCPUs' epolls
        (Scheduler.watch_fd): a ring then wakes this thread only when no pCPU is waiting."""
        if self.before_watch is not None:
            self.before_watch(fd)
        with self._bells_lock:
            self._notify_keys[fd] = key
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)

    def close_bells(self, fds: list[int]) -> None:
        """Stop waiting on a device's doorbells and close them and its segment descriptor,
        on the drivers thread (any thread may call this)."""
        if threading.current_thread() is self.thread or not self.thread.is_alive():
            self._close_bells(fds)
            return
        self._closing.put(fds)
        self._send_on(INPROC_ENDPOINT, [_DOORBELL])

    def _close_bells(self, fds: list[int]) -> None:
        with self._bells_lock:
            for fd in fds:
                if self._notify_keys.pop(fd, None) is not None:
                    with contextlib.suppress(OSError):
                        self._epoll.unregister(fd)
                    if self.before_close is not None:
                        self.before_close(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _take_notifies(self) -> None:
        """Every notify doorbell that rang: ``on_notify(key, rings)``."""
        for fd, _ in self._epoll.poll(0):
            try:
                self.take_notify(fd)
            except Exception:
                log.exception("driver channel: error handling notify doorbell %d", fd)

    def take_notify(self, fd: int) -> None:
        """Notify doorbell ``fd`` may have rung: ``on_notify(key, rings)`` if it did (any
        thread: the drivers thread, or an idle pCPU's).  Whoever reads it first gets the
        rings; the other reads 0."""
        with self._bells_lock:
            key = self._notify_keys.get(fd)
            rings = doorbell.take(fd) if key is not None else 0
        if key is not None and rings and self.on_notify is not None:
            self.on_notify(key, rings)

    def _accept_bells(self) -> None:
        """Take new doorbell connections and the ``name:pid`` each says first."""
        if self._bell_listener is None:
            return
        while True:
            try:
                conn, _ = self._bell_listener.accept()
            except BlockingIOError:
                break
            except OSError as e:
                log.warning("doorbell socket: accept failed: %s", e)
                break
            conn.setblocking(False)
            self._bell_conns[conn.fileno()] = (conn, None)
            self._poller.register(conn.fileno(), zmq.POLLIN)
        for fd, (_conn, who) in list(self._bell_conns.items()):
            if who is None:
                self._read_bell(fd)

    def _read_bell(self, fd: int) -> None:
        """A doorbell connection is readable: its introduction, or its end."""
        conn, who = self._bell_conns[fd]
        try:
            data = conn.recv(doorbell.MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        said = doorbell.parse_hello(data) if data and who is None else None
        if said is not None:
            self._bell_conns[fd] = (conn, said)
            return
        if data:
            log.warning("doorbell socket: unexpected message %r from %s; closed", data[:64], who)
        self._poller.unregister(fd)
        del self._bell_conns[fd]
        for link in list(self.links.values()):
            if link.bell is conn:
                link.bell = None
        conn.close()

    def _bell_of(self, link: DriverLink) -> socket.socket | None:
        """The doorbell connection instance ``link`` introduced itself on, if any."""
        self._accept_bells()
        who = f"{link.name}:{link.pid}"
        return next((c for c, w in self._bell_conns.values() if w == who), None)

    def _with_bells(self, link: DriverLink, msg: list[Any]) -> list[Any]:
        """An ``attach`` to ``link``: hand its device's doorbells and segment descriptor over
        first, and say so."""
        body = msg[1]
        bell = link.bell
        if bell is None or not isinstance(body, dict) or self.bells_of is None:
            return msg
        key = body.get("key")
        if not isinstance(key, int):
            return msg
        fds = self.bells_of(key)
        if fds is None:
            return msg
        try:
            doorbell.send_bells(bell, key, *fds)
        except OSError as e:
            log.warning(
                "driver %s: doorbells of device %s not handed over (%s); it is kicked over "
                "ZeroMQ from now on",
                link.name,
                key,
                e,
            )
            link.bell = None
            return msg
        return ["attach", {**body, "doorbells": True}]

    def preconnect(self, name: str, endpoint: str) -> None:
        """Driver ``name`` has a warm spare at ``endpoint``: connect the drivers thread's
        socket to it now (call on the drivers thread)."""
        with self._lock:
            old = self._standby.get(name)
            self._standby[name] = endpoint
            if old is not None and old != endpoint:
                self._endpoints_version += 1  # the previous spare's socket can go
        self._socket_to(endpoint)

    def _socket_to(self, endpoint: str) -> zmq.Socket:
        """This thread's PUSH socket to ``endpoint`` (created and connected on first use)."""
        socks: dict[str, zmq.Socket] | None = getattr(self._local, "socks", None)
        if socks is None:
            socks = self._local.socks = {}
        if getattr(self._local, "version", 0) != self._endpoints_version:
            self._prune(socks)
        sock = socks.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, _SNDHWM)
            sock.connect(endpoint)
            socks[endpoint] = sock
            with self._lock:
                self._all_socks.append(sock)
        return sock

    def _send_on(self, endpoint: str, msg: list[Any]) -> bool:
        """Send on this thread's PUSH socket to ``endpoint`` (created on first use)."""
        sock = self._socket_to(endpoint)
        try:
            sock.send(msgpack.packb(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _prune(self, socks: dict[str, zmq.Socket]) -> None:
        """Close this thread's sockets to endpoints no link uses any more."""
        self._local.version = self._endpoints_version
        live = (
            {li.endpoint for li in list(self.links.values())}
            | {INPROC_ENDPOINT}
            | set(self._standby.values())
        )
        for endpoint in [e for e in socks if e not in live]:
            sock = socks.pop(endpoint)
            with self._lock:
                if sock in self._all_socks:
                    self._all_socks.remove(sock)
            with contextlib.suppress(zmq.ZMQError):
                sock.close(0)

    # -- links (any thread) ------------------------------------------------------------------
    def drop(self, name: str, pid: int | None = None) -> DriverLink | None:
        """Forget the link of ``name`` (only if its pid is ``pid``, when given); the link
        dropped, or None."""
        with self._lock:
            link = self.links.get(name)
            if link is None or (pid is not None and link.pid != pid):
                return None
            del self.links[name]
            self._endpoints_version += 1
        log.info("driver %s (pid %d) disconnected", name, link.pid)
        return link

    # -- inline drivers ----------------------------------------------------------------------------
    def load_inline(self, name: str, module: str, options: dict[str, Any]) -> None:
        if name in self._inline:
            raise ValueError(f"an inline driver named {name!r} is already loaded")
        host = importlib.import_module(HOST_MODULE)
        self._inline[name] = host.start_inline(
            name,
            module,
            options,
            self.ctx,
            INPROC_ENDPOINT,
            f"inproc://driver-{name}",
            bells=self.bell_path,
        )

    # -- receiving (the drivers thread) -----------------------------------------------------------
    def _loop(self) -> None:
        poller = self._poller
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self._epoll.fileno(), zmq.POLLIN)
        listener = self._bell_listener.fileno() if self._bell_listener is not None else -1
        if listener >= 0:
            poller.register(listener, zmq.POLLIN)
        next_tick = time.monotonic() + TICK_S
        while self._running:
            wait_ms = max(0, int((next_tick - time.monotonic()) * 1000) + 1)
            try:
                for what, _ in poller.poll(wait_ms):
                    if what is self.pull:
                        self._receive_some()
                    elif what == listener:
                        self._accept_bells()
                    elif what in self._bell_conns:
                        self._read_bell(what)
                    else:
                        self._take_notifies()
            except zmq.ZMQError:
                if not self._running:
                    return
                raise
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                self._tick()

    def _receive_some(self) -> None:
        """Dispatch the messages waiting (at most _DRAIN, so the tick is never starved)."""
        for _ in range(_DRAIN):
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._dispatch(frames[-1], frames[0] if len(frames) == 2 else None)

    def _tick(self) -> None:
        if self.on_tick is None:
            return
        try:
            self.on_tick()
        except Exception:
            log.exception("driver channel: the periodic driver check failed")

    def _dispatch(self, raw: bytes, sender: bytes | None = None) -> None:
        """Handle one message.  ``sender`` is the ``name:pid`` frame a driver host puts before
        each message (None without one): a malformed message from a connected instance is a
        protocol violation by it; an anonymous one can only be logged."""
        try:
            msg = msgpack.unpackb(raw)
        except Exception as e:
            self._malformed(sender, f"undecodable message ({len(raw)} bytes): {e}")
            return
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            self._malformed(sender, f"message is not a [type, ...] list: {msg!r:.200}")
            return
        if msg[0] == _DOORBELL:
            self._flush_control()
            return
        try:
            if msg[0] == "hello":
                self._hello(msg)
            else:  # the device layer checks the device key (or store path) it names
                self.on_message(msg)
        except Malformed as e:
            self._malformed(sender, str(e))
        except Exception:
            log.exception("driver channel: error handling message %.200r", msg)

    def sender_link(self, sender: bytes | None) -> DriverLink | None:
        """The connected instance a ``name:pid`` sender frame names, if any."""
        if sender is None:
            return None
        name, _, pid = sender.decode("utf-8", "replace").rpartition(":")
        link = self.links.get(name)
        return link if link is not None and str(link.pid) == pid else None

    def _malformed(self, sender: bytes | None, reason: str) -> None:
        link = self.sender_link(sender)
        who = (
            f"driver {link.name} (pid {link.pid})"
            if link
            else (
                f"sender {sender[:80]!r} (no such connected instance)"
                if sender
                else "an anonymous sender"
            )
        )
        log.warning("driver channel: %s from %s ignored", reason, who)
        if link is not None and self.on_violation is not None:
            self.on_violation(link, f"malformed message: {reason}")

    def _flush_control(self) -> None:
        while True:
            try:
                fds = self._closing.get_nowait()
            except queue.Empty:
                break
            self._close_bells(fds)
        while True:
            try:
                name, endpoint, msg = self._ctl.get_nowait()
            except queue.Empty:
                return
            if name is None:
                if not self._send_on(endpoint, msg):
                    log.warning(
                        "control message %r to %s not delivered (not draining)", msg[0], endpoint
                    )
                continue
            link = self.links.get(name)
            if link is not None and msg[0] == "attach":
                msg = self._with_bells(link, msg)
            if link is None or not self._send_on(link.endpoint, msg):
                log.warning(
                    "driver %s: control message %r not delivered (driver gone or not draining)",
                    name,
                    msg[0],
                )

    def _hello(self, msg: list[Any]) -> None:
        link = parse_hello(msg)
        if iotrace.RECOVERY:
            iotrace.mark(Stage.K_HELLO, link.pid)
        link.bell = self._bell_of(link)
        with self._lock:
            old = self.links.get(link.name)
            self.links[link.name] = link
            self.known.add(link.name)
            if self._standby.get(link.name) == link.endpoint:
                del self._standby[link.name]
            if old is not None and old.endpoint != link.endpoint:
                self._endpoints_version += 1
        log.info(
            "driver %s connected: pid %d, %s, endpoint %s, watchdog %d ms, request timeout %d ms, "
            "%s%s",
            link.name,
            link.pid,
            link.isolation,
            link.endpoint,
            link.watchdog_ms,
            link.request_timeout_ms,
            "doorbells" if link.bell is not None else "kicks over ZeroMQ",
            f" (replaces pid {old.pid})" if old is not None else "",
        )
        self.on_hello(link)

    # -- teardown ------------------------------------------------------------------------------
    def stop(self) -> None:
        for name, inline in list(self._inline.items()):
            try:
                inline.stop()
            except Exception:
                log.exception("stopping inline driver %s", name)
        self._inline.clear()
        self._running = False
        self.thread.join(timeout=2)
        with self._lock:
            for s in self._all_socks:
                with contextlib.suppress(zmq.ZMQError):
                    s.close(0)
            self._all_socks.clear()
        self.pull.close(0)
        for conn, _ in self._bell_conns.values():
            conn.close()
        self._bell_conns.clear()
        if self._bell_listener is not None:
            self._bell_listener.close()
            assert self.bell_path is not None
            with contextlib.suppress(OSError):
                os.unlink(self.bell_path)
        self._close_bells(list(self._notify_keys))
        self._epoll.close()


#: A message the kernel sends itself to make the drivers thread flush the control queue.
_DOORBELL: Final = "_flush"


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_hello(msg: list[Any]) -> DriverLink:
    """The link a ``hello`` describes; Malformed if it is not one."""
    info = msg[1] if len(msg) == 2 and isinstance(msg[1], dict) else {}
    name, endpoint = info.get("name"), info.get("endpoint")
    pid, module = info.get("pid"), info.get("module")
    if not (
        isinstance(name, str)
        and name
        and isinstance(endpoint, str)
        and endpoint
        and _is_int(pid)
        and isinstance(module, str)
    ):
        raise Malformed(
            f'malformed hello {msg!r:.200} (expected ["hello", {{name, endpoint, pid, module}}])'
        )
    watchdog = info.get("watchdog_ms", 0)
    timeout = info.get("request_timeout_ms", DEFAULT_REQUEST_TIMEOUT_MS)
    if not (_is_int(watchdog) and watchdog >= 0 and _is_int(timeout) and timeout >= 0):
        raise Malformed(
            f"malformed hello from driver {name}: watchdog_ms and "
            "request_timeout_ms must be integers >= 0 (0: no such check), got "
            f"{watchdog!r} and {timeout!r}"
        )
    isolation = "inline" if endpoint.startswith("inproc://") else "process"
    return DriverLink(
        name,
        endpoint,
        pid,
        module,
        isolation,
        watchdog_ms=watchdog,
        request_timeout_ms=timeout,
        reports=info.get("statistics") is True,
    )
