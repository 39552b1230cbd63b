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
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import zmq

log = logging.getLogger("isovisor.kernel")

INPROC_ENDPOINT: Final = "inproc://kernel-drivers"
#: Module that hosts drivers (process and inline); loaded by name.
HOST_MODULE: Final = "drivers.host"
_SNDHWM: Final = 100_000

Handler = Callable[[list[Any]], None]


@dataclass
class DriverLink:
    """A connected driver instance."""

    name: str
    endpoint: str
    pid: int
    module: str
    isolation: str


class DriverHub:
    def __init__(self, ctx: zmq.Context, endpoints: list[str], on_message: Handler,
                 on_hello: Callable[[DriverLink], None]) -> None:
        self.ctx = ctx
        self.on_message = on_message
        self.on_hello = on_hello
        self.links: dict[str, DriverLink] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._all_socks: list[zmq.Socket] = []
        self._inline: dict[str, Any] = {}
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        for ep in [*endpoints, INPROC_ENDPOINT]:
            self.pull.bind(ep)
        self._ctl: queue.SimpleQueue[tuple[str, list[Any]]] = queue.SimpleQueue()
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
        self._ctl.put((name, msg))
        self._send_on(INPROC_ENDPOINT, [_DOORBELL])
        return True

    def send(self, name: str, msg: list[Any]) -> bool:
        """Send a kick-like ``msg`` to driver ``name`` now, from this thread; False if it is
        not connected or not draining."""
        link = self.links.get(name)
        if link is None:
            return False
        return self._send_on(link.endpoint, msg)

    def _send_on(self, endpoint: str, msg: list[Any]) -> bool:
        """Send on this thread's PUSH socket to ``endpoint`` (created on first use)."""
        socks: dict[str, zmq.Socket] | None = getattr(self._local, "socks", None)
        if socks is None:
            socks = self._local.socks = {}
        sock = socks.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, _SNDHWM)
            sock.connect(endpoint)
            socks[endpoint] = sock
            with self._lock:
                self._all_socks.append(sock)
        try:
            sock.send(msgpack.packb(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    # -- inline drivers ----------------------------------------------------------------------------
    def load_inline(self, name: str, module: str, options: dict[str, Any]) -> None:
        if name in self._inline:
            raise ValueError(f"an inline driver named {name!r} is already loaded")
        host = importlib.import_module(HOST_MODULE)
        self._inline[name] = host.start_inline(name, module, options, self.ctx,
                                               INPROC_ENDPOINT, f"inproc://driver-{name}")

    # -- receiving (the drivers thread) -----------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        while self._running:
            try:
                if not poller.poll(200):
                    continue
                raw = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if not self._running:
                    return
                raise
            self._dispatch(raw)

    def _dispatch(self, raw: bytes) -> None:
        try:
            msg = msgpack.unpackb(raw)
        except Exception as e:
            log.warning("driver channel: undecodable message (%d bytes) ignored: %s", len(raw), e)
            return
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            log.warning("driver channel: message is not a [type, ...] list, ignored: %.200r",
                        msg)
            return
        if msg[0] == _DOORBELL:
            self._flush_control()
            return
        if msg[0] == "hello":
            self._hello(msg)
            return
        # Other messages carry no sender: the device layer checks the device key (or the
        # store path) against the drivers it knows.
        try:
            self.on_message(msg)
        except Exception:
            log.exception("driver channel: error handling message %.200r", msg)

    def _flush_control(self) -> None:
        while True:
            try:
                name, msg = self._ctl.get_nowait()
            except queue.Empty:
                return
            link = self.links.get(name)
            if link is None or not self._send_on(link.endpoint, msg):
                log.warning("driver %s: control message %r not delivered (driver gone or not "
                            "draining)", name, msg[0])

    def _hello(self, msg: list[Any]) -> None:
        info = msg[1] if len(msg) == 2 and isinstance(msg[1], dict) else {}
        name, endpoint = info.get("name"), info.get("endpoint")
        pid, module = info.get("pid"), info.get("module")
        if not (isinstance(name, str) and isinstance(endpoint, str) and isinstance(pid, int)
                and isinstance(module, str)):
            log.warning("driver channel: malformed hello %.200r ignored (expected [\"hello\", "
                        "{name, endpoint, pid, module}])", msg)
            return
        isolation = "inline" if endpoint.startswith("inproc://") else "process"
        link = DriverLink(name, endpoint, pid, module, isolation)
        with self._lock:
            self.links[name] = link
        log.info("driver %s connected: pid %d, %s, endpoint %s", name, pid, isolation, endpoint)
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


#: A message the kernel sends itself to make the drivers thread flush the control queue.
_DOORBELL: Final = "_flush"

