"""The kernel process's control server: a ZeroMQ ROUTER for commands, a PUB for events.

Only the main thread touches the ROUTER and PUB sockets.  Other threads (pCPUs) publish through
thread-local PUSH sockets into an inproc PULL that the main loop forwards to PUB, because ZeroMQ
sockets must not be shared between threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from domains.config import DomainConfig
from ipc.control import (
    ControlError,
    NotFound,
    Request,
    pack,
    prop,
    serve_one,
)
from ipc.peers import PeerError, load_keys, peer_named
from ipc.schema import ConfigError
from ipc.store import Store, StoreError
from kernel.devices import DeviceManager
from kernel.drivers import DriverHub
from kernel.failover import NOTIFY_FLOOD_PER_S, Recovery
from kernel.hypervisor import Hypervisor
from kernel.migration import Incoming, Options, Outgoing

log = logging.getLogger("isovisor.kernel")
_INPROC = "inproc://kernel-events"


class EventBus:
    """Thread-safe, globally ordered publishing: ``emit(topic, payload)`` from any thread.

    Events go into one queue, so their order is the real-time order of the ``emit`` calls
    whatever thread made them (a guest's console bytes, written on one pCPU, always precede its
    exit event, processed on another).  A per-thread PUSH socket only rings a doorbell that wakes
    the control thread's poller; it never blocks a pCPU (a full doorbell is simply skipped, the
    queued event is not lost).
    """

    #: Queued events beyond this are dropped (and counted) rather than eating memory.
    MAX_QUEUED = 100_000

    def __init__(self, ctx: zmq.Context) -> None:
        self._ctx = ctx
        self._local = threading.local()
        self._socks: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self.dropped = 0

    def emit(self, topic: str, payload: dict[str, Any]) -> None:
        if self._queue.qsize() >= self.MAX_QUEUED:
            self.dropped += 1
            return
        self._queue.put([topic.encode(), pack(payload)])
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 16)
            sock.connect(_INPROC)
            self._local.sock = sock
            with self._lock:
                self._socks.append(sock)
        with contextlib.suppress(zmq.Again):
            sock.send(b"", zmq.NOBLOCK)

    def drain(self) -> list[list[bytes]]:
        """All queued events, oldest first (control thread only)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        with self._lock:
            for s in self._socks:
                s.close(0)
            self._socks.clear()


class KernelServer:
    def __init__(
        self,
        *,
        control: str,
        events: str,
        pcpus: int,
        timeslice_ms: int,
        shm_prefix: str,
        drivers: str | None = None,
        keys: str | None = None,
        peers: str | None = None,
        migrate_listen: str | None = None,
        migrate_disks: str | None = None,
        restore: str = "lazy",
        notify_flood: int = NOTIFY_FLOOD_PER_S,
    ) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(control)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 1000)
        self.pub.bind(events)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(_INPROC)
        self.bus = EventBus(self.ctx)
        self.hv = Hypervisor(
            pcpus=pcpus,
            timeslice_ms=timeslice_ms,
            shm_prefix=shm_prefix,
            emit=self.bus.emit,
            restore=restore,
        )
        self.store = Store()
        self.hub = DriverHub(
            self.ctx,
            [drivers] if drivers else [],
            on_message=self._on_driver_message,
            on_hello=self._on_driver_hello,
            on_tick=self._on_driver_tick,
            on_violation=self._on_driver_violation,
        )
        self.hv.devices = DeviceManager(
            sched=self.hv.sched,
            emit=self.bus.emit,
            shm_prefix=shm_prefix,
            hub=self.hub,
            store=self.store,
        )
        self.hv.devices.recovery.flood_per_s = notify_flood
        self.hub.start()
        self.keys_dir = Path(keys) if keys else None
        self.peers = Path(peers) if peers else None
        self.migrate_disks = Path(migrate_disks) if migrate_disks else None
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: Incoming | None = None
        if migrate_listen:
            self._listen(migrate_listen)
        self._running = True
        self._commands: dict[str, Callable[[Request], dict[str, Any]]] = {
            "ping": self._ping,
            "create": self._create,
            "destroy": self._destroy,
            "pause": self._pause,
            "unpause": self._unpause,
            "list": self._list,
            "console": self._console,
            "save": self._save,
            "restore": self._restore,
            "migrate": self._migrate,
            "migration_inject": self._migration_inject,
            "shutdown": self._shutdown,
            "sync": self._sync,
            "devices": self._devices,
            "drivers": self._drivers,
            "driver_load": self._driver_load,
            "store": self._store,
            "driver_lost": self._driver_lost,
            "driver_fail": self._driver_fail,
            "driver_inject": self._driver_inject,
            "driver_faults": self._driver_faults,
            "driver_swap": self._driver_swap,
            "driver_swap_rollback": self._driver_swap_rollback,
            "driver_swap_end": self._driver_swap_end,
        }

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        while self._running:
            ready = dict(poller.poll(1000))
            if self.pull in ready:
                self._forward_events()
            if self.router in ready:
                self._handle(self.router.recv_multipart())
        if self.incoming is not None:
            self.incoming.stop()
            self.incoming.join(timeout=5)
        self.hv.shutdown()
        self.hub.stop()
        self._forward_events()
        self.bus.close()
        for s in (self.router, self.pub, self.pull):
            s.close()
        self.ctx.term()

    def stop(self) -> None:
        self._running = False

    def _forward_events(self) -> None:
        with contextlib.suppress(zmq.Again):
            while True:
                self.pull.recv(zmq.NOBLOCK)  # doorbells carry no data
        for frames in self.bus.drain():
            self.pub.send_multipart(frames)

    def _handle(self, frames: list[bytes]) -> None:
        serve_one(self.router, frames, self._commands, "kernel", log)

    # -- commands ------------------------------------------------------------------------------
    def _ping(self, req: Request) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "domains": len(self.hv.domains),
            "events_dropped": self.bus.dropped,
            "migration": self.incoming.endpoint if self.incoming is not None else None,
            # lazy restore (kernel/paging.py): the pager's pid, None when restores are eager
            "pager": self.hv.pager.status() if self.hv.pager is not None else None,
        }

    # -- migration -------------------------------------------------------------------------
    def _listen(self, endpoint: str) -> None:
        """Accept migrations on ``endpoint``; without a key pair, log why and accept none."""
        try:
            if self.keys_dir is None or self.peers is None:
                raise PeerError("--migrate-listen needs --keys and --peers")
            keys = load_keys(self.keys_dir)
            self.incoming = Incoming(
                self.hv, self.ctx, endpoint, keys, self.peers, self.bus.emit, self.migrate_disks
            )
        except (PeerError, zmq.ZMQError) as e:
            log.error("not accepting migrations on %s: %s", endpoint, e)
            return
        self.incoming.start()
        log.info(
            "accepting migrations on %s from the keys in %s", self.incoming.endpoint, self.peers
        )

    def _migration_inject(self, req: Request) -> dict[str, Any]:
        """Make this kernel die when a migration coming in reaches ``phase`` (tests: the
        destination killed at each phase)."""
        phase = prop(req, "phase", str)
        if phase not in ("begin", "pages", "sync", "commit"):
            raise ControlError("migration_inject: phase must be begin, pages, sync or commit")
        if self.incoming is None:
            raise ControlError("migration_inject: this kernel accepts no migrations")
        self.incoming.die_at = phase
        return {"phase": phase}

    def _migration_ended(self, out: Outgoing) -> None:
        self.outgoing.pop(out.dom.name, None)  # (a dict operation: atomic across threads)

    def _migrate(self, req: Request) -> dict[str, Any]:
        """Live-migrate a domain to a peer (``xl migrate``); the outcome is the event
        ``domain.<name>.migration``."""
        dom = self.hv.find(self._ref(req))
        if dom.exit is not None or dom.action is not None:
            raise ControlError(f"domain {dom.name!r} is stopping or stopped; nothing to migrate")
        if dom.devices:
            assert self.hv.devices is not None
            self.hv.devices.check_movable(
                dom, "migrated", copies=prop(req, "with_disks", bool, False)
            )
        if dom.name in self.outgoing:
            raise ControlError(f"domain {dom.name!r} is being migrated already")
        if self.keys_dir is None or self.peers is None:
            raise ControlError("this kernel was started without --keys and --peers")
        try:
            peer = peer_named(self.peers, prop(req, "peer", str))
            keys = load_keys(self.keys_dir)
        except PeerError as e:
            raise ControlError(str(e)) from None
        opt = Options(
            max_downtime_ms=prop(req, "max_downtime_ms", (int, float), 50.0),
            max_rounds=prop(req, "max_rounds", int, 30),
            timeout_s=prop(req, "timeout_s", (int, float), 10.0),
            auto_converge=prop(req, "auto_converge", bool, True),
            max_bandwidth_mbs=prop(req, "max_bandwidth_mbs", (int, float), 0.0),
            with_disks=prop(req, "with_disks", bool, False),
        )
        if not (
            0 < opt.max_downtime_ms <= 60_000
            and 1 <= opt.max_rounds <= 1000
            and 0.1 <= opt.timeout_s <= 600
            and 0 <= opt.max_bandwidth_mbs <= 1e6
        ):
            raise ControlError(
                "migrate: max_downtime_ms must be in (0, 60000], max_rounds in 1..1000, "
                "timeout_s in 0.1..600 and max_bandwidth_mbs in 0..1000000 (0: no limit)"
            )
        out = Outgoing(
            self.hv,
            dom,
            peer,
            keys,
            self.ctx,
            opt,
            self.bus.emit,
            self._migration_ended,
            origin=prop(req, "origin", str, ""),
        )
        self.outgoing[dom.name] = out
        out.start()
        return {
            "domid": dom.domid,
            "name": dom.name,
            "peer": peer.name,
            "address": peer.address,
            "migration": out.mid,
        }

    def _create(self, req: Request) -> dict[str, Any]:
        try:
            cfg = DomainConfig.from_wire(prop(req, "config", dict))
        except ConfigError as e:
            raise ControlError(str(e)) from None
        dom = self.hv.create(cfg, paused=prop(req, "paused", bool, False))
        return {"domid": dom.domid, "name": dom.name}

    def _ref(self, req: Request) -> str | int:
        ref: str | int = prop(req, "name", (str, int))
        return ref

    def _destroy(self, req: Request) -> dict[str, Any]:
        dom = self.hv.find(self._ref(req))
        self.hv.destroy(dom)
        return {"domid": dom.domid, "name": dom.name}

    def _pause(self, req: Request) -> dict[str, Any]:
        dom = self.hv.find(self._ref(req))
        if dom.exit is not None:
            raise ControlError(f"domain {dom.name!r} has already stopped ({dom.exit.reason})")
        self.hv.sched.pause(dom)
        return {"domid": dom.domid}

    def _unpause(self, req: Request) -> dict[str, Any]:
        dom = self.hv.find(self._ref(req))
        if dom.exit is not None:
            raise ControlError(f"domain {dom.name!r} has already stopped ({dom.exit.reason})")
        self.hv.sched.unpause(dom)
        return {"domid": dom.domid}

    def _snapshot_path(self, req: Request) -> Path:
        path = prop(req, "path", str)
        if not os.path.isabs(path):
            raise ControlError(
                f"command {req.command!r}: path {path!r} is relative; the kernel needs an "
                "absolute path (the CLI resolves it)"
            )
        return Path(path)

    def _save(self, req: Request) -> dict[str, Any]:
        """Save a domain to a snapshot file (``xl save``; ``checkpoint`` = ``-c``)."""
        dom = self.hv.find(self._ref(req))
        return self.hv.save(
            dom,
            self._snapshot_path(req),
            checkpoint=prop(req, "checkpoint", bool, False),
            origin=prop(req, "origin", str, ""),
        )

    def _restore(self, req: Request) -> dict[str, Any]:
        """Create a domain from a snapshot file (``xl restore``; ``paused`` = ``-p``)."""
        dom = self.hv.restore(self._snapshot_path(req), paused=prop(req, "paused", bool, False))
        return {"domid": dom.domid, "name": dom.name, "epoch": dom.clock.epoch}

    def _list(self, req: Request) -> dict[str, Any]:
        return {"domains": self.hv.list()}

    def _console(self, req: Request) -> dict[str, Any]:
        dom = self.hv.find(self._ref(req))
        start, data = dom.console_history()
        return {
            "domid": dom.domid,
            "name": dom.name,
            "start": start,
            "end": start + len(data),
            "data": data,
        }

    def _on_driver_message(self, msg: list[Any]) -> None:
        assert self.hv.devices is not None
        self.hv.devices.on_message(msg)

    def _on_driver_hello(self, link: Any) -> None:
        assert self.hv.devices is not None
        self.hv.devices.on_hello(link)

    def _on_driver_violation(self, link: Any, reason: str) -> None:
        if self.hv.devices is not None:
            self.hv.devices.recovery.violation(link, reason)

    def _on_driver_tick(self) -> None:
        if self.hv.devices is not None:
            self.hv.devices.on_tick()

    @property
    def _recovery(self) -> Recovery:
        assert self.hv.devices is not None
        return self.hv.devices.recovery

    def _devices(self, req: Request) -> dict[str, Any]:
        assert self.hv.devices is not None
        return {"devices": self.hv.devices.info()}

    def _drivers(self, req: Request) -> dict[str, Any]:
        """Every driver the kernel knows: connected ones, failing ones, and those whose
        devices wait for a replacement instance (``connected`` tells them apart)."""
        return {"drivers": self._recovery.rows()}

    def _driver_name(self, req: Request) -> str:
        name: str = prop(req, "name", str)
        if not name:
            raise ControlError(
                f"command {req.command!r}: property 'name' must name a driver "
                "(as in [driver.<name>] of supervisor.toml), got an empty string"
            )
        return name

    def _driver_lost(self, req: Request) -> dict[str, Any]:
        """The supervisor saw instance ``pid`` of driver ``name`` die: drop its link, unless a
        newer instance holds it already."""
        name, pid = self._driver_name(req), prop(req, "pid", int)
        return {"dropped": self._recovery.lost(name, pid)}

    def _driver_fail(self, req: Request) -> dict[str, Any]:
        """The supervisor gave up on driver ``name``: the kernel answers its requests with
        errors until a new instance says hello."""
        name = self._driver_name(req)
        reason = prop(req, "reason", str, "failed (no reason given)")
        return self._recovery.fail(name, reason)

    def _driver_inject(self, req: Request) -> dict[str, Any]:
        """Have driver ``name`` fail on purpose (tests, fault campaigns)."""
        name, kind = self._driver_name(req), prop(req, "kind", str)
        self._recovery.inject(name, kind)
        return {"name": name, "kind": kind}

    def _driver_faults(self, req: Request) -> dict[str, Any]:
        """Arm these faults in driver ``name`` (the supervisor's fault table; checked by the
        driver, which logs what it refuses)."""
        name, faults = self._driver_name(req), prop(req, "faults", list)
        if not all(isinstance(f, dict) for f in faults):
            raise ControlError("driver_faults: faults must be a list of tables (drivers/faults.py)")
        if not self.hub.send_control(name, ["faults", faults]):
            known = ", ".join(sorted(self.hub.links)) or "none"
            raise NotFound(
                f"driver_faults: driver {name!r} is not connected (connected drivers: {known})"
            )
        return {"name": name, "faults": len(faults)}

    def _driver_swap(self, req: Request) -> dict[str, Any]:
        """Hot swap (kernel/swap.py): drain driver ``name`` and hand its state to the spare
        ``pid`` listening at ``endpoint``; roll back after ``timeout_ms`` without a hello."""
        assert self.hv.devices is not None
        swaps = self.hv.devices.swaps
        return swaps.begin(
            self._driver_name(req),
            prop(req, "pid", int),
            prop(req, "endpoint", str),
            prop(req, "timeout_ms", int, 5000),
        )

    def _driver_swap_rollback(self, req: Request) -> dict[str, Any]:
        """The swap's new instance ``pid`` died in its first requests: back to the old one."""
        assert self.hv.devices is not None
        swaps = self.hv.devices.swaps
        return swaps.rollback(
            self._driver_name(req), prop(req, "pid", int), prop(req, "reason", str, "died")
        )

    def _driver_swap_end(self, req: Request) -> dict[str, Any]:
        """Forget driver ``name``'s swap (committed after its probation, or abandoned)."""
        assert self.hv.devices is not None
        return self.hv.devices.swaps.end(self._driver_name(req))

    def _driver_load(self, req: Request) -> dict[str, Any]:
        """Run a driver inline: the same driver host, as a thread of this process."""
        name, module = prop(req, "name", str), prop(req, "module", str)
        options = prop(req, "options", dict)
        try:
            self.hub.load_inline(name, module, options)
        except Exception as e:
            raise ControlError(f"cannot load inline driver {name!r} ({module}): {e}") from None
        return {"name": name}

    def _store(self, req: Request) -> dict[str, Any]:
        """Every node under a path, as {path: value} (like xenstore-ls)."""
        path = prop(req, "path", str)
        try:
            return {"nodes": self.store.snapshot(path)}
        except StoreError as e:
            raise ControlError(str(e)) from None

    def _sync(self, req: Request) -> dict[str, Any]:
        """Publish ``sync.<token>``: lets a subscriber prove its subscription is live."""
        token = prop(req, "token", str)
        self.pub.send_multipart([f"sync.{token}".encode(), pack({})])
        return {}

    def _shutdown(self, req: Request) -> dict[str, Any]:
        self._running = False
        return {"domains": len(self.hv.domains)}
