"""The supervisor daemon: starts the kernel and the domains, serves the CLI, relays events.

One supervisor runs per run directory.  It owns the kernel process (started in its own session
and told to die with us), forwards domain commands to it, and republishes the kernel's events on
its own PUB socket for ``isovisor console -f`` and other watchers.  On ``down``, SIGINT or
SIGTERM it stops the kernel, removes every shared-memory segment of the stack, its sockets and
its pid file.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ipc.control import (
    ControlError,
    Request,
    pack,
    prop,
    serve_one,
)
from ipc.events import Subscriber, subscribe
from isovisor.config import ConfigError, DomainConfig, DriverConfig, StackConfig, load_domain_config
from isovisor.driverproc import DriverProcess
from isovisor.kernelproc import KernelProcess
from isovisor.paths import RunDir, shm_prefix_for

log = logging.getLogger("isovisor.supervisor")

EventSink = Callable[[str, dict[str, Any]], None]
#: How long a driver may take from start to its hello reaching the kernel.
DRIVER_START_TIMEOUT_S = 20.0


class Supervisor:
    def __init__(self, cfg: StackConfig, run_dir: RunDir, *, on_event: EventSink | None = None
                 ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.on_event = on_event
        self.kernel = KernelProcess(run_dir, shm_prefix=shm_prefix_for(os.getpid()),
                                    pcpus=cfg.kernel.pcpus,
                                    timeslice_ms=cfg.kernel.timeslice_ms)
        self._running = True
        self.exit_status = 0
        self.drivers: dict[str, DriverProcess] = {}
        self.driver_state: dict[str, str] = {d.name: "stopped" for d in cfg.drivers}
        self._commands: dict[str, Callable[[Request], dict[str, Any]]] = {
            "ping": self._ping, "status": self._ping, "list": self._forward,
            "console": self._forward, "destroy": self._forward, "pause": self._forward,
            "unpause": self._forward, "create": self._create, "down": self._down,
            "sync": self._sync, "devices": self._forward, "store": self._forward,
            "drivers": self._drivers,
        }

    # -- life cycle ----------------------------------------------------------------------------
    def run(self) -> int:
        rd = self.run_dir
        rd.prepare()
        other = rd.running_pid()
        if other is not None and other != os.getpid():
            raise ControlError(f"a stack is already running in {rd.path} (supervisor pid "
                               f"{other}); stop it with `isovisor down` or use another --run-dir")
        for s in rd.sockets():
            s.unlink(missing_ok=True)
        rd.pidfile.write_text(f"{os.getpid()}\n")
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 500)
        self.ksub: Subscriber | None = None
        old_int = signal.signal(signal.SIGINT, self._signalled)
        old_term = signal.signal(signal.SIGTERM, self._signalled)
        try:
            self.pub.bind(rd.events)
            self.kernel.start()
            assert self.kernel.client is not None
            # Established (sync handshake) before the first domain exists: no event is lost.
            self.ksub = subscribe(rd.kernel_events, [""], self.kernel.client)
            self._publish("supervisor.kernel.started", {"pid": self.kernel.pid})
            log.info("kernel started (pid %s)", self.kernel.pid)
            for drv in self.cfg.drivers:  # drivers first: domains attach to them
                try:
                    self._start_driver(drv)
                except ControlError as e:
                    log.error("%s", e)
                    self.driver_state[drv.name] = "failed"
                    self._publish(f"supervisor.driver.{drv.name}.failed", {"reason": str(e)})
            for path in self.cfg.domains:
                try:
                    self._create_from(path)
                except ControlError as e:  # one bad domain does not stop the others
                    log.error("cannot create domain from %s: %s", path, e)
                    self._publish("supervisor.domain.failed", {"path": path, "reason": str(e)})
            self.router.bind(rd.control)  # the CLI sees the stack only once it is up
            self._publish("supervisor.up", {"pid": os.getpid()})
            self._loop()
        finally:
            self._teardown()
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        return self.exit_status

    def _signalled(self, signum: int, _frame: object) -> None:
        log.info("received %s: stopping the stack", signal.Signals(signum).name)
        self._running = False

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        assert self.ksub is not None
        poller.register(self.ksub.socket, zmq.POLLIN)
        while self._running:
            try:
                ready = dict(poller.poll(200))
            except zmq.ZMQError as e:
                if e.errno == zmq.EINTR:  # type: ignore[attr-defined]
                    continue
                raise
            if self.ksub.socket in ready or self.ksub.pending:
                self._relay_events()
            if self.router in ready:
                self._handle(self.router.recv_multipart())
            self._check_drivers()
            if not self.kernel.alive():
                code = self.kernel.proc.returncode if self.kernel.proc else None
                log.error("kernel exited unexpectedly (status %s); stopping the stack.\n%s",
                          code, self.kernel.log_tail())
                self._publish("supervisor.kernel.exited", {"status": code})
                self.exit_status = 1
                self._running = False

    def _teardown(self) -> None:
        self.kernel.stop()  # destroys the domains, which detaches their devices
        for drv in self.drivers.values():
            drv.stop()
        self._relay_events()
        self._publish("supervisor.down", {"pid": os.getpid()})
        if self.ksub is not None:
            self.ksub.close()
        for s in (self.router, self.pub):
            s.close()
        self.ctx.term()
        for s in self.run_dir.sockets():
            s.unlink(missing_ok=True)
        self.run_dir.pidfile.unlink(missing_ok=True)
        log.info("stack stopped")

    # -- drivers -------------------------------------------------------------------------------
    def _start_driver(self, drv: DriverConfig) -> None:
        """Start one driver and wait for the kernel to announce it ready."""
        proc: DriverProcess | None = None
        if drv.isolation == "inline":
            self.kernel.call("driver_load", timeout=30.0, name=drv.name, module=drv.module,
                             options=drv.options)
        else:
            proc = DriverProcess(drv, self.run_dir)
            proc.start()
            self.drivers[drv.name] = proc
        deadline = time.monotonic() + DRIVER_START_TIMEOUT_S
        assert self.ksub is not None
        while True:
            left = deadline - time.monotonic()
            ev = self.ksub.recv(min(0.1, max(left, 0)))
            if ev is not None:
                self._relay(*ev)
                if ev[0] == f"driver.{drv.name}.ready":
                    break
            if proc is not None and not proc.alive():
                assert proc.proc is not None
                raise ControlError(f"driver {drv.name} ({drv.module}) exited with status "
                                   f"{proc.proc.returncode} while starting; its log "
                                   f"{proc.log_path} ends with:\n{proc.log_tail()}")
            if left <= 0:
                if proc is not None:
                    proc.stop()
                raise ControlError(f"driver {drv.name} ({drv.module}) did not connect to the "
                                   f"kernel within {DRIVER_START_TIMEOUT_S:g}s; see "
                                   f"{self.run_dir.driver_log(drv.name)}")
        self.driver_state[drv.name] = "running"
        log.info("driver %s started (%s, pid %s)", drv.name, drv.isolation,
                 proc.pid if proc else self.kernel.pid)

    def _check_drivers(self) -> None:
        for name, proc in self.drivers.items():
            if self.driver_state[name] == "running" and not proc.alive():
                assert proc.proc is not None
                code = proc.proc.returncode
                self.driver_state[name] = "exited"
                log.error("driver %s exited (status %s); its devices stop being served.\n%s",
                          name, code, proc.log_tail())
                self._publish(f"supervisor.driver.{name}.exited", {"status": code,
                                                                    "pid": proc.pid})

    def _drivers(self, req: Request) -> dict[str, Any]:
        connected = {d["name"]: d for d in self.kernel.call("drivers")["drivers"]}
        out = []
        for d in self.cfg.drivers:
            proc = self.drivers.get(d.name)
            pid = proc.pid if proc else connected.get(d.name, {}).get("pid")
            out.append({"name": d.name, "module": d.module, "isolation": d.isolation,
                        "state": self.driver_state[d.name], "pid": pid,
                        "connected": d.name in connected})
        return {"drivers": out}

    def _check_disks(self, cfg: DomainConfig) -> None:
        declared = {d.name for d in self.cfg.drivers}
        for disk in cfg.disks:
            if disk.backend not in declared:
                raise ControlError(
                    f"{cfg.source}: disk {disk.vdev} uses backend {disk.backend!r}, which "
                    f"{self.cfg.source or 'supervisor.toml'} does not declare (drivers: "
                    f"{', '.join(sorted(declared)) or 'none'}); add [driver.{disk.backend}] "
                    "or fix backend=")

    # -- events --------------------------------------------------------------------------------
    def _relay_events(self) -> None:
        if self.ksub is None:
            return
        while (ev := self.ksub.recv(0)) is not None:
            self._relay(*ev)

    def _relay(self, topic: str, payload: dict[str, Any]) -> None:
        self.pub.send_multipart([topic.encode(), pack(payload)])
        if self.on_event is not None:
            try:
                self.on_event(topic, payload)
            except Exception:
                log.exception("event printer failed")

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.pub.send_multipart([topic.encode(), pack(payload)])
        if self.on_event is not None:
            self.on_event(topic, payload)

    # -- commands ------------------------------------------------------------------------------
    def _handle(self, frames: list[bytes]) -> None:
        serve_one(self.router, frames, self._commands, "supervisor", log)

    def _ping(self, req: Request) -> dict[str, Any]:
        return {"pid": os.getpid(), "kernel_pid": self.kernel.pid, "name": self.cfg.name,
                "config": self.cfg.source, "run_dir": str(self.run_dir.path)}

    def _forward(self, req: Request) -> dict[str, Any]:
        if self.kernel.client is None:
            raise ControlError("the kernel is not running")
        # Longer than the kernel's own 10 s destroy wait, so its clearer error wins.
        reply = self.kernel.client.request(req.command, req.properties, timeout=30.0)
        reply.pop("status", None)
        reply.pop("id", None)
        return reply

    def _create(self, req: Request) -> dict[str, Any]:
        return self._create_from(prop(req, "path", str))

    def _create_from(self, path: str) -> dict[str, Any]:
        try:
            cfg = load_domain_config(path)
        except ConfigError as e:
            raise ControlError(str(e)) from None
        self._check_disks(cfg)
        reply = self.kernel.call("create", timeout=30.0, config=cfg.to_wire())
        return {"domid": reply["domid"], "name": reply["name"]}

    def _sync(self, req: Request) -> dict[str, Any]:
        token = prop(req, "token", str)
        self.pub.send_multipart([f"sync.{token}".encode(), pack({})])
        return {}

    def _down(self, req: Request) -> dict[str, Any]:
        self._running = False
        return {"pid": os.getpid()}


def main(argv: list[str] | None = None) -> int:
    """``python -m isovisor.supervisor CONFIG RUN_DIR``: the detached daemon."""
    from isovisor.config import load_stack_config
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m isovisor.supervisor CONFIG RUN_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s")
    try:
        cfg = load_stack_config(args[0])
        return Supervisor(cfg, RunDir(Path(args[1]))).run()
    except (ConfigError, ControlError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
