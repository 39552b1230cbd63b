"""The supervisor daemon: starts the kernel, the drivers and the domains, serves the CLI,
relays events and replaces failed drivers.

One supervisor runs per run directory.  It owns the kernel process (started in its own session
and told to die with us), forwards domain commands to it, and republishes the kernel's events on
its own PUB socket for ``isovisor console -f``, ``isovisor events`` and other watchers.  Driver
processes are supervised (``drivermgr.py``, docs/recovery.md): one event loop polls the control
socket, the kernel's events and every driver process's pidfd.  On ``down``, SIGINT or SIGTERM it
stops the kernel and the drivers, removes every shared-memory segment of the stack, its sockets
and its pid file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

import devices
from drivers import jail, keeper
from ipc.control import (
    ControlError,
    Request,
    pack,
    prop,
    serve_one,
)
from ipc.events import Subscriber, subscribe
from ipc.schema import STACK_ENV
from isovisor.config import ConfigError, DomainConfig, DriverConfig, StackConfig, load_domain_config
from isovisor.paths import RunDir, RunDirError, shm_prefix_for
from isovisor.supervisor.consolerelay import ConsoleRelay
from isovisor.supervisor.drivermgr import DriverManager, EventSink
from isovisor.supervisor.driverproc import DriverProcess, jail_blocker, kernel_driver_sockets
from isovisor.supervisor.kernelproc import KernelProcess
from isovisor.supervisor.supervision import State
from kernel import snapfile

log = logging.getLogger("isovisor.supervisor")
#: How long an inline driver may take from driver_load to its hello.
DRIVER_START_TIMEOUT_S = 20.0
#: The event loop's poll timeout: the granularity of timers (backoff, SIGKILL after SIGTERM)
#: while one may fall due (DriverManager.timing), and of the kernel's liveness check.
LOOP_POLL_MS = 50
#: ... and when none may: an idle stack's supervisor wakes 5 times a second (bench/idle.py).
IDLE_POLL_MS = 200
#: Seconds between two looks for ended keepers to reap (drivers/keeper.py).
KEEPER_REAP_S = 1.0
#: Relayed events not written to the log (too many, or meaningless there).
_UNLOGGED = ("console.", "sync.")


class Supervisor:
    def __init__(
        self, cfg: StackConfig, run_dir: RunDir, *, on_event: EventSink | None = None
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.on_event = on_event
        # every process of the stack inherits its name (a net driver's default namespace
        # is named after it: two stacks on one host must not share one)
        os.environ[STACK_ENV] = cfg.name
        self.kernel = KernelProcess(
            run_dir,
            shm_prefix=shm_prefix_for(os.getpid()),
            pcpus=cfg.kernel.pcpus,
            timeslice_ms=cfg.kernel.timeslice_ms,
            restore=cfg.kernel.restore,
            migration=cfg.migration,
        )
        self._running = True
        self.exit_status = 0
        self.mgr: DriverManager | None = None
        #: What did not start at `up`: drivers by name and domains by config path, with the
        #: reason (``ping`` answers them: `isovisor up --detach` prints them).
        self.start_failures: dict[str, dict[str, str]] = {"drivers": {}, "domains": {}}
        self._commands: dict[str, Callable[[Request], dict[str, Any]]] = {
            "ping": self._ping,
            "status": self._status,
            "list": self._forward,
            "console": self._console,
            "console_input": self._console_input,
            "destroy": self._forward,
            "pause": self._forward,
            "unpause": self._forward,
            "create": self._create,
            "save": self._save,
            "restore": self._restore,
            "migrate": self._save,
            "down": self._down,
            "sync": self._sync,
            "devices": self._forward,
            "store": self._forward,
            "drivers": self._drivers,
            "driver": self._driver,
            "fault": self._fault,
            "driver_swap": self._driver_swap,
        }

    # -- life cycle ----------------------------------------------------------------------------
    def run(self) -> int:
        rd = self.run_dir
        rd.prepare()
        try:
            rd.check_driver_sockets([d.name for d in self.cfg.drivers])
        except RunDirError as e:
            raise ControlError(str(e)) from None
        self._check_jails()
        other = rd.running_pid()
        if other is not None and other != os.getpid():
            raise ControlError(
                f"a stack is already running in {rd.path} (supervisor pid "
                f"{other}); stop it with `isovisor down` or use another --run-dir"
            )
        for s in rd.sockets():
            s.unlink(missing_ok=True)
        rd.pidfile.write_text(f"{os.getpid()}\n")
        # Stack processes (kernel, drivers) find the run dir here: a console driver keeps its
        # log files and sockets below it (docs/console.md).
        os.environ["ISOVISOR_RUN_DIR"] = str(rd.path)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 500)
        self.ksub: Subscriber | None = None
        self.poller = zmq.Poller()
        self._start_keepers()
        self._next_reap = 0.0
        self.mgr = DriverManager(self.cfg, rd, self.kernel, self.ctx, self.poller, self._publish)
        self.consoles = ConsoleRelay(self.cfg, rd.path, self.ctx, self.poller, self._publish)
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
            self._open_kernel_to_jails()
            for drv in self.cfg.drivers:  # drivers first: domains attach to them
                try:
                    self._start_driver(drv)
                except ControlError as e:
                    log.error("%s", e)
                    if drv.supervised:
                        self.mgr.start_failed(drv.name, str(e))
                    else:
                        self.mgr.inline_failure[drv.name] = str(e)
                    self.start_failures["drivers"][drv.name] = str(e)
                    self._publish(f"supervisor.driver.{drv.name}.failed", {"reason": str(e)})
            for path in self.cfg.domains:
                try:
                    self._create_from(path)
                except ControlError as e:  # one bad domain does not stop the others
                    log.error("cannot create domain from %s: %s", path, e)
                    self.start_failures["domains"][path] = str(e)
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
        poller, mgr = self.poller, self.mgr
        assert self.ksub is not None and mgr is not None
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.ksub.socket, zmq.POLLIN)
        while self._running:
            try:
                ready = dict(poller.poll(LOOP_POLL_MS if mgr.timing() else IDLE_POLL_MS))
            except zmq.ZMQError as e:
                if e.errno == zmq.EINTR:  # type: ignore[attr-defined]
                    continue
                raise
            for fd in [k for k in ready if isinstance(k, int)]:  # driver pidfds: deaths
                mgr.on_exit_fd(fd)
            if self.ksub.socket in ready or self.ksub.pending:
                self._relay_events()
            if self.router in ready:
                self._handle(self.router.recv_multipart())
            for sock in self.consoles.sockets():
                if sock in ready:
                    self.consoles.on_ready(sock)
            self.consoles.tick()
            mgr.tick()
            if time.monotonic() >= self._next_reap:  # keepers whose drivers have ended
                self._next_reap = time.monotonic() + KEEPER_REAP_S
                keeper.reap()
            if not self.kernel.alive():
                code = self.kernel.proc.returncode if self.kernel.proc else None
                log.error(
                    "kernel exited unexpectedly (status %s); stopping the stack.\n%s",
                    code,
                    self.kernel.log_tail(),
                )
                self._publish("supervisor.kernel.exited", {"status": code})
                self.exit_status = 1
                self._running = False

    def _check_jails(self) -> None:
        """Jailed drivers (``isolation = "process"``, docs/jail.md) need a root supervisor;
        say which drivers run unjailed, and why."""
        jailed = []
        for d in self.cfg.drivers:
            if d.isolation == "process-unjailed":
                log.warning(
                    'driver %s runs unjailed (isolation = "process-unjailed"): its backend can '
                    "reach whatever the supervisor's user can",
                    d.name,
                )
            elif d.jailed:
                why = jail_blocker(d)
                if why is None:
                    jailed.append(d.name)
                else:
                    log.warning("driver %s runs unjailed: %s", d.name, why)
        if jailed and os.geteuid() != 0:
            raise ControlError(
                f"driver{'s' if len(jailed) > 1 else ''} {', '.join(jailed)}: isolation = "
                f'"process" runs each driver in a jail, which needs a root supervisor (this one '
                f"runs as uid {os.geteuid()}): run the stack as root, or set isolation = "
                '"process-unjailed" for these drivers in supervisor.toml (docs/jail.md)'
            )
        # (also for a stack with no jailed driver yet: a hot swap may bring one)
        self.run_dir.jail_root.mkdir(exist_ok=True, mode=0o700)

    def _open_kernel_to_jails(self) -> None:
        """Let jailed drivers connect to the kernel's driver sockets: their group, mode 0660
        (the kernel's other sockets stay the supervisor user's alone)."""
        if os.geteuid() != 0:  # (no jail then: _check_jails refused any)
            return
        gid = jail.gid_for(str(self.run_dir.path))
        for p in kernel_driver_sockets(self.run_dir):
            try:
                os.chown(p, 0, gid)
                os.chmod(p, 0o660)
            except OSError as e:
                raise ControlError(f"cannot open {p} to the jailed drivers: {e}") from None

    def _start_keepers(self) -> None:
        """Every driver process gets a keeper (drivers/keeper.py), which comes back to us to be
        reaped when its driver ends; without a C compiler, none (and a warning)."""
        if not any(d.supervised for d in self.cfg.drivers):
            return
        try:
            keeper.become_subreaper()
            from domains.build import default_cache_dir

            DriverProcess.keeper = keeper.build(default_cache_dir())
        except keeper.KeeperError as e:
            log.warning(
                "driver processes run without keepers, so the death of one is seen about "
                "3 ms later (docs/recovery.md, The keeper): %s",
                e,
            )

    def _teardown(self) -> None:
        self.kernel.stop()  # destroys the domains, which detaches their devices
        if self.mgr is not None:
            self.mgr.stop_all()  # active instances and spares
        keeper.reap(kill=True)  # their drivers are gone: end them now
        self._relay_events()
        self.consoles.close()
        self._publish("supervisor.down", {"pid": os.getpid()})
        if self.ksub is not None:
            self.ksub.close()
        for s in (self.router, self.pub):
            s.close()
        self.ctx.term()
        for path in self.run_dir.sockets():
            path.unlink(missing_ok=True)
        for path in self.run_dir.path.glob("driver-*/*.report.json"):  # reports nobody read
            path.unlink(missing_ok=True)
        for path in [*self.run_dir.path.glob("driver-*/"), self.run_dir.jail_root]:
            with contextlib.suppress(OSError):  # (a console's files may be in one: kept)
                path.rmdir()
        self.run_dir.pidfile.unlink(missing_ok=True)
        log.info("stack stopped")

    # -- drivers -------------------------------------------------------------------------------
    def _start_driver(self, drv: DriverConfig) -> None:
        """Start one driver and wait for the kernel to announce it ready (its hello)."""
        assert self.mgr is not None and self.ksub is not None
        if drv.supervised:
            inst = self.mgr.start(drv.name)
            pid: int | None = inst.pid
        else:
            self.kernel.call(
                "driver_load", timeout=30.0, name=drv.name, module=drv.module, options=drv.options
            )
            inst, pid = None, self.kernel.pid
        limit = drv.start_timeout if drv.supervised else DRIVER_START_TIMEOUT_S
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            ev = self.ksub.recv(min(0.1, max(left, 0)))
            if ev is not None:
                self._relay(*ev)
                if inst is None and ev[0] == f"driver.{drv.name}.ready":
                    break
            if inst is not None and self.mgr.state(drv.name) == State.RUNNING:
                break
            if inst is not None and not inst.alive():
                raise ControlError(self.mgr.start_error(inst))
            if left <= 0:
                raise ControlError(
                    f"driver {drv.name} ({drv.module}) did not connect to the "
                    f"kernel within {limit:g}s (start_timeout); see "
                    f"{self.run_dir.driver_log(drv.name)}"
                )
        log.info("driver %s started (%s, pid %s)", drv.name, drv.isolation, pid)

    def _kernel_drivers(self) -> dict[str, dict[str, Any]]:
        """The kernel's view of the connected drivers ({} if it does not answer)."""
        try:
            return {d["name"]: d for d in self.kernel.call("drivers", timeout=5.0)["drivers"]}
        except ControlError as e:
            log.warning("kernel `drivers` failed: %s", e.reason)
            return {}

    def _drivers(self, req: Request) -> dict[str, Any]:
        assert self.mgr is not None
        return {"drivers": self.mgr.rows(self._kernel_drivers())}

    def _status(self, req: Request) -> dict[str, Any]:
        """The ping fields (``status`` used to be an alias of ``ping``) and the drivers."""
        return {**self._ping(req), **self._drivers(req)}

    def _driver(self, req: Request) -> dict[str, Any]:
        assert self.mgr is not None
        action = prop(req, "action", str)
        if action not in ("start", "stop", "restart"):
            raise ControlError(
                f"property 'action' of command 'driver' must be start, stop or "
                f"restart, got {action!r}"
            )
        return self.mgr.command(action, prop(req, "name", str))

    def _driver_swap(self, req: Request) -> dict[str, Any]:
        """``isovisor driver swap``: starts the swap and answers at once (``swap_id``); the
        outcome is the event ``driver.<name>.swap`` (docs/hotswap.md)."""
        assert self.mgr is not None
        probation, timeout = req.properties.get("probation"), req.properties.get("timeout")
        for what, v in (("probation", probation), ("timeout", timeout)):
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
                raise ControlError(
                    f"property {what!r} of command 'driver_swap' must be a "
                    f"number of seconds, got {v!r}"
                )
        # the new instance's own settings (None: the driver's): --option, --log-level, --debug
        options, level, debug = (req.properties.get(k) for k in ("options", "log_level", "debug"))
        for what, v, kind, shape in (
            ("options", options, dict, "a map of option names to values"),
            ("log_level", level, str, "a log level"),
            ("debug", debug, bool, "a boolean"),
        ):
            if v is not None and not isinstance(v, kind):
                raise ControlError(
                    f"property {what!r} of command 'driver_swap' must be {shape}, got {v!r}"
                )
        return {
            "swap": self.mgr.swap(
                prop(req, "name", str),
                prop(req, "target", str),
                probation,
                timeout,
                options=options,
                log_level=level,
                debug=debug,
            )
        }

    def _fault(self, req: Request) -> dict[str, Any]:
        """``isovisor fault add|list|remove|reset`` (docs/campaigns.md)."""
        assert self.mgr is not None
        action = prop(req, "action", str)
        if action == "add":  # (wrapped: a reply's own "id" is the request id)
            return {"fault": self.mgr.fault_add(prop(req, "driver", str), prop(req, "spec", dict))}
        if action == "list":
            return {"faults": self.mgr.faults.list()}
        if action == "remove":
            return {"fault": self.mgr.fault_remove(prop(req, "fault_id", int))}
        if action == "reset":
            driver = req.properties.get("driver")
            if driver is not None and not isinstance(driver, str):
                raise ControlError("property 'driver' of command 'fault' must be a string")
            return self.mgr.fault_reset(driver)
        raise ControlError(
            f"property 'action' of command 'fault' must be add, list, remove or "
            f"reset, got {action!r}"
        )

    def _check_devices(self, cfg: DomainConfig) -> None:
        """Every device of ``cfg`` names a driver this stack declares, and one that is not
        down (the kernel only knows that a driver is not connected; we know why)."""
        assert self.mgr is not None
        declared = {d.name for d in self.cfg.drivers}
        for dev in cfg.devices:
            if dev.backend in declared:
                why = self.mgr.not_serving(dev.backend)
                if why is not None:
                    raise ControlError(
                        f"{cfg.source}: {devices.of_spec(dev).what(dev)} uses backend "
                        f"{dev.backend!r}, which is not running: {why}"
                    )
                continue
            cls = devices.of_spec(dev)
            raise ControlError(
                f"{cfg.source}: {cls.what(dev)} uses backend {dev.backend!r}, which "
                f"{self.cfg.source or 'supervisor.toml'} does not declare (drivers: "
                f"{', '.join(sorted(declared)) or 'none'}); add [driver.{dev.backend}] with "
                f'module = "{cls.modules[0]}", or fix {cls.config_key} = in the domain\'s '
                "config"
            )

    # -- events --------------------------------------------------------------------------------
    def _relay_events(self) -> None:
        if self.ksub is None:
            return
        while (ev := self.ksub.recv(0)) is not None:
            self._relay(*ev)

    def _relay(self, topic: str, payload: dict[str, Any]) -> None:
        """Republish a kernel event, then let the driver supervision act on it."""
        if topic.startswith("console.") and self.consoles.kernel_console(topic[8:], payload):
            return  # merged into the console driver's stream of that domain
        self._publish(topic, payload)
        if topic.startswith("domain."):
            self.consoles.on_kernel_event(topic, payload)
        if self.mgr is not None:
            self.mgr.on_kernel_event(topic, payload)

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.pub.send_multipart([topic.encode(), pack(payload)])
        if not topic.startswith(_UNLOGGED):
            log.info(
                "event %s %s",
                topic,
                " ".join(f"{k}={v}" for k, v in payload.items()),
                extra={"event": topic, "fields": payload},
            )
        if self.on_event is not None:
            try:
                self.on_event(topic, payload)
            except Exception:
                log.exception("event printer failed")

    # -- commands ------------------------------------------------------------------------------
    def _handle(self, frames: list[bytes]) -> None:
        serve_one(self.router, frames, self._commands, "supervisor", log)

    def _ping(self, req: Request) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "kernel_pid": self.kernel.pid,
            "name": self.cfg.name,
            "config": self.cfg.source,
            "run_dir": str(self.run_dir.path),
            "start_failures": self.start_failures,
        }

    def _forward(self, req: Request) -> dict[str, Any]:
        if self.kernel.client is None:
            raise ControlError("the kernel is not running")
        # Longer than the kernel's own 10 s destroy wait, so its clearer error wins.
        reply = self.kernel.client.request(req.command, req.properties, timeout=30.0)
        reply.pop("status", None)
        reply.pop("id", None)
        return reply

    def _restore(self, req: Request) -> dict[str, Any]:
        """Forwarded; for a domain whose console a driver serves, its new life in the console
        log starts where the log ends now (before the guest can print)."""
        snap = snapfile.read_domain(Path(str(req.properties.get("path", ""))))
        cfg = snap.get("config") if snap else None
        driver = cfg.get("console") if isinstance(cfg, dict) else None
        name = cfg.get("name") if isinstance(cfg, dict) else None
        if not (isinstance(driver, str) and driver and isinstance(name, str)):
            return self._forward(req)
        self.consoles.forget_incoming(name)
        start = self.consoles.before_create(driver, name)
        reply = self._forward(req)
        self.consoles.created(driver, reply["name"], reply["domid"], start)
        return reply

    def _save(self, req: Request) -> dict[str, Any]:
        """``save`` and ``migrate``: forwarded with this stack's name as the origin."""
        req.properties.setdefault("origin", self.cfg.name)
        return self._forward(req)

    def _create(self, req: Request) -> dict[str, Any]:
        return self._create_from(prop(req, "path", str), prop(req, "paused", bool, False))

    def _create_from(self, path: str, paused: bool = False) -> dict[str, Any]:
        try:
            cfg = load_domain_config(path)
        except ConfigError as e:
            raise ControlError(str(e)) from None
        if not cfg.console and self.cfg.console:
            cfg = cfg.with_console(self.cfg.console)  # the stack's default
        self._check_devices(cfg)
        driver = cfg.console_driver
        start = self.consoles.before_create(driver, cfg.name) if driver else 0
        reply = self.kernel.call("create", timeout=30.0, config=cfg.to_wire(), paused=paused)
        if driver:
            self.consoles.created(driver, reply["name"], reply["domid"], start)
        return {"domid": reply["domid"], "name": reply["name"]}

    def _console(self, req: Request) -> dict[str, Any]:
        """A domain's console: from its console driver's log, else the kernel's."""
        ref = req.properties.get("name")
        life = self.consoles.find(str(ref)) if ref is not None else None
        return self.consoles.history(life) if life is not None else self._forward(req)

    def _console_input(self, req: Request) -> dict[str, Any]:
        data = req.properties.get("data")
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise ControlError(
                "property 'data' of command 'console_input' must be bytes or a string"
            )
        return self.consoles.send_input(prop(req, "name", str), data)

    def _sync(self, req: Request) -> dict[str, Any]:
        token = prop(req, "token", str)
        self.pub.send_multipart([f"sync.{token}".encode(), pack({})])
        return {}

    def _down(self, req: Request) -> dict[str, Any]:
        self._running = False
        return {"pid": os.getpid()}


class LogFormatter(logging.Formatter):
    """One JSON object per line (ts, level, logger, msg, and an event's fields) for log files;
    readable text when ``json_lines`` is False (a terminal)."""

    _RESERVED = ("ts", "level", "logger", "msg", "event", "exc")

    def __init__(self, json_lines: bool) -> None:
        super().__init__("%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s")
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        if not self.json_lines:
            return super().format(record)
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
            fields = getattr(record, "fields", {})
            out.update({k: v for k, v in fields.items() if k not in self._RESERVED})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=_json_default)


def _json_default(v: object) -> object:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return repr(v)


def setup_logging(level: int = logging.INFO) -> None:
    """The daemon's logging: JSON lines into a file, text on a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(json_lines=not sys.stderr.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """``python -m isovisor.supervisor CONFIG RUN_DIR``: the detached daemon."""
    from isovisor.config import load_stack_config

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m isovisor.supervisor CONFIG RUN_DIR", file=sys.stderr)
        return 2
    setup_logging()
    try:
        cfg = load_stack_config(args[0])
        return Supervisor(cfg, RunDir(Path(args[1]))).run()
    except (ConfigError, ControlError) as e:
        log.error("%s", e)
        return 1
