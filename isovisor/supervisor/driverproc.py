"""One driver process instance: ``python -m drivers.host`` with its own endpoint and pidfd.

An instance is started active (it says hello at once) or as a warm spare (``--spare``: it
loads its backend, tells the kernel it is ready, and says hello only when the supervisor sends
``["activate"]`` to its endpoint).  Each instance of driver ``<name>`` listens on its own
``driver-<name>/<n>.sock``.  Its pidfd becomes readable when it dies, so the supervisor's
event loop notices a death at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import psutil
import zmq

import devices
from devices.base import DeviceClass
from drivers import jail
from drivers.host import FAULTS_ENV
from ipc import doorbell
from ipc.control import pack
from isovisor.config import DEVICE_CLASS_NAMES, DriverConfig
from isovisor.paths import RunDir
from isovisor.procs import log_tail
from isovisor.supervisor.supervision import CpuMeter

#: What the supervisor's log says of a driver in debug mode (``debug = true``, ``driver swap
#: --debug``): the kernel's hang checks are off because the process gets ``--watchdog-ms 0
#: --request-timeout-ms 0``, the stopped-process check because DriverManager skips it.
DEBUG_MODE: Final = (
    "debug mode: no hang checks (heartbeat watchdog, request timeout, stopped process); "
    "breakpoint() opens pdb on a socket in the run directory"
)


#: A jailed driver's limits on open files (unless ``max_fds`` says) and on processes and
#: threads of its uid (the driver's own threads, its keeper, what a fault injection forks).
JAIL_NOFILE: Final = 1024
JAIL_NPROC: Final = 64
#: A jailed driver's address space (``RLIMIT_AS``): a driver process maps some hundreds of MiB
#: (the interpreter, libraries, thread stacks, its devices' regions).
JAIL_ADDRESS_SPACE: Final = 4 << 30


def child_env() -> dict[str, str]:
    """The environment for stack processes: this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def jail_state(cfg: DriverConfig) -> str | None:
    """What ``isovisor drivers`` says of a driver's jail: "jailed", "not jailed: <why>", or
    None (an inline driver has no process of its own)."""
    if not cfg.supervised:
        return None
    if not cfg.jailed:
        return 'not jailed: isolation = "process-unjailed"'
    why = jail_blocker(cfg)
    return "jailed" if why is None else f"not jailed: {why}"


def kernel_driver_sockets(rd: RunDir) -> list[str]:
    """The kernel's sockets a driver connects to: its driver endpoint and, beside it, its
    doorbell socket (the only ones a jailed driver can reach: docs/jail.md)."""
    paths = [rd.kernel_drivers.removeprefix("ipc://")]
    bells = doorbell.path_for(rd.kernel_drivers)
    if bells is not None:
        paths.append(bells)
    return paths


def device_class(cfg: DriverConfig) -> DeviceClass | None:
    """The device class driver ``cfg`` serves: its (first) module's, else ``device_class``."""
    cls = devices.of_module(cfg.class_module)
    if cls is None and cfg.device_class:
        cls = devices.by_name(cfg.device_class)
    return cls


def jail_blocker(cfg: DriverConfig) -> str | None:
    """Why driver ``cfg`` (``isolation = "process"``) cannot run jailed here and now, or None:
    its device class is not known before its backend is loaded, or cannot be jailed yet with
    these options (devices/base.py)."""
    cls = device_class(cfg)
    if cls is None:
        return (
            f"the device class of {cfg.class_module} is not known before it is loaded: give "
            f"device_class = one of {', '.join(DEVICE_CLASS_NAMES)} in [driver.{cfg.name}] to "
            "jail it"
        )
    return cls.jail_blocker(cfg.options)


@dataclass(frozen=True)
class Usage:
    """What one resource check saw."""

    stopped: bool
    rss: int
    cpu_percent: float | None  # over the last 5 s, once known
    fds: int | None = None  # open file descriptors


class DriverProcess:
    """One instance of an ``isolation = "process"`` driver."""

    #: The keeper library every instance is started with (``--keeper``; drivers/keeper.py),
    #: set by the supervisor once it is built; None: no keepers.
    keeper: ClassVar[Path | None] = None

    def __init__(
        self,
        cfg: DriverConfig,
        run_dir: RunDir,
        instance: int,
        *,
        spare: bool = False,
        report: bool = False,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.instance = instance
        self.spare = spare  # started with --spare (stays True after activation)
        self.endpoint = run_dir.driver_endpoint(cfg.name, instance)
        self.socket_path = run_dir.driver_socket(cfg.name, instance)
        self.log_path = run_dir.driver_log(cfg.name)
        #: ``report``: a hot swap's new implementation (``--swappable``: it must support
        #: save/restore).  Every instance says in its ``--report`` file why it could not
        #: start or why it ended by fail-stop (:meth:`take_report`).
        self.swappable = report
        self.report_path: Path | None = run_dir.driver_report(cfg.name, instance)
        self._report: dict[str, str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self._ps: psutil.Process | None = None
        self._cpu = CpuMeter()
        self._control: zmq.Socket[Any] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    @functools.cached_property
    def jail_spec(self) -> jail.JailSpec | None:
        """The jail this instance enters (drivers/jail.py), or None: not jailed (``isolation =
        "process-unjailed"``, or :func:`jail_blocker` says why not).  Made once: both
        :meth:`prepare_dirs` and :meth:`command` need it at each start."""
        c, rd = self.cfg, self.run_dir
        if not c.jailed or jail_blocker(c) is not None:
            return None
        stack = str(rd.path)
        cls = device_class(c)
        writable = [rd.driver_dir(c.name)]
        if cls is not None:
            writable += cls.jail_writable(c.options, rd.path)
        # (python_paths() holds this checkout, which child_env puts on PYTHONPATH)
        readonly = [*jail.python_paths(), *jail.system_paths(), "/dev", "/proc"]
        readonly += kernel_driver_sockets(rd)
        file = c.module.partition(":")[0]
        if file.endswith(".py"):
            readonly.append(str(Path(file).resolve()))
        return jail.JailSpec(
            uid=jail.uid_for(stack, c.name),
            gid=jail.gid_for(stack),
            scratch=str(rd.jail_root),
            readonly=tuple(readonly),
            writable=tuple(str(p) for p in writable),
            # (twice max_fds: the supervisor replaces a driver past max_fds with that reason;
            # the host's kernel stops one that leaks faster than it looks)
            nofile=2 * c.max_fds if c.max_fds else JAIL_NOFILE,
            nproc=JAIL_NPROC,
            address_space=JAIL_ADDRESS_SPACE,
        )

    def command(self) -> list[str]:
        c, rd = self.cfg, self.run_dir
        cmd = [
            sys.executable,
            "-m",
            "drivers.host",
            "--name",
            c.name,
            "--module",
            c.module,
            "--kernel",
            rd.kernel_drivers,
            "--listen",
            self.endpoint,
            "--options",
            json.dumps(c.options),
            "--parent-pid",
            str(os.getpid()),
            # debug mode: no heartbeats and no request deadline (the kernel's hang checks go
            # off with them: docs/configuration.md#debugging-a-driver)
            "--watchdog-ms",
            "0" if c.debug else str(round(c.watchdog_sec * 1000)),
            "--request-timeout-ms",
            "0" if c.debug else str(round(c.request_timeout_sec * 1000)),
            "--log-level",
            c.log_level,
        ]
        if c.debug:
            cmd += ["--debug", str(rd.driver_pdb(c.name))]
        if self.report_path is not None:
            cmd += ["--report", str(self.report_path)]
        if self.swappable:
            cmd.append("--swappable")
        if self.keeper is not None:
            cmd += ["--keeper", str(self.keeper)]
        if self.jail_spec is not None:
            cmd += ["--jail", self.jail_spec.to_json()]
        return [*cmd, "--spare"] if self.spare else cmd

    def start(self, faults: list[dict[str, Any]] | None = None) -> None:
        """Start the process; ``faults`` are armed before it serves anything (the fault
        table's unlimited faults: a poison request must kill every instance)."""
        self.prepare_dirs()
        env = child_env()
        if faults:
            env[FAULTS_ENV] = json.dumps(faults)
        if self.report_path is not None:  # an earlier stack's instance of the same number
            self.report_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.pidfd = os.pidfd_open(self.proc.pid)

    def prepare_dirs(self) -> None:
        """Make the driver's own directory, and its class's writable ones, its jail's uid's
        (or the supervisor's, unjailed)."""
        spec = self.jail_spec
        dirs = (
            [Path(p) for p in spec.writable] if spec else [self.run_dir.driver_dir(self.cfg.name)]
        )
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if spec is not None and os.geteuid() == 0:
                for p in [d, *d.iterdir()]:  # files an earlier (unjailed) run left
                    with contextlib.suppress(OSError):
                        os.chown(p, spec.uid, spec.gid, follow_symlinks=False)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> int | None:
        """The exit status if the process has died (collecting it), else None.  Never blocks:
        a pidfd number seen readable may already belong to a newer instance."""
        assert self.proc is not None
        return self.proc.poll()

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def connect(self, ctx: zmq.Context) -> None:
        """Open the supervisor's channel to this instance's endpoint now (a spare's, at
        spawn), so that activating it later costs one send, not a connection."""
        if self._control is None:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 10)  # until the instance has bound it
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(self.endpoint)
            self._control = sock

    def send(self, ctx: zmq.Context, msg: list[Any]) -> bool:
        """Send ``msg`` to the instance (queued until it listens); False if its queue is
        full."""
        self.connect(ctx)
        assert self._control is not None
        try:
            self._control.send(pack(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def activate(self, ctx: zmq.Context) -> None:
        """Tell a spare to take over: ``["activate"]`` on its own endpoint."""
        self.send(ctx, ["activate"])

    def close_control(self) -> None:
        if self._control is not None:
            self._control.close(0)
            self._control = None

    def _process(self) -> psutil.Process:
        """The psutil handle of the instance (made once)."""
        if self._ps is None:
            self._ps = psutil.Process(self.pid)
        return self._ps

    def usage(self, now: float) -> Usage | None:
        """Status, RSS and CPU average (psutil); None if the process is gone."""
        try:
            ps = self._process()
            with ps.oneshot():
                status = ps.status()
                rss = ps.memory_info().rss
                t = ps.cpu_times()
                fds = ps.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return Usage(
            status == psutil.STATUS_STOPPED, rss, self._cpu.add(now, t.user + t.system), fds
        )

    def is_stopped(self) -> bool:
        """Whether the process is stopped (SIGSTOP); False if it is gone."""
        try:
            return bool(self._process().status() == psutil.STATUS_STOPPED)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def remove_socket(self) -> None:
        """A killed instance cannot remove its socket file itself."""
        self.socket_path.unlink(missing_ok=True)

    def take_report(self) -> dict[str, str] | None:
        """What the instance wrote to its ``--report`` file (``error``, ``where``,
        ``traceback``: drivers/host.py), removing the file; None if it wrote nothing.  Once
        the file is read its contents are kept: each caller after the first gets them too."""
        if self._report is not None or self.report_path is None:
            return self._report
        try:
            data = json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            return None
        finally:
            self.report_path.unlink(missing_ok=True)
        if not isinstance(data, dict):
            return None
        self._report = {k: str(data.get(k, "")) for k in ("error", "where", "traceback")}
        return self._report
