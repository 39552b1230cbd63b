"""``isovisor up``, ``down``, ``events`` and ``run``: a stack's life, its event stream, and one
guest in a private kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from ipc.control import Client, ControlError
from ipc.events import Subscriber, subscribe
from isovisor.cli.common import (
    EXIT_CRASHED,
    EXIT_TIMEOUT,
    RunDirOpt,
    _call,
    _client,
    _run_dir,
    err,
    fail,
    out,
)
from isovisor.config import ConfigError, default_run_dir, load_domain_config, load_stack_config
from isovisor.paths import RunDir, RunDirError, shm_prefix_for
from isovisor.procs import wait_gone

if TYPE_CHECKING:  # imported where used: every CLI call would pay for the kernel's modules
    from isovisor.supervisor.kernelproc import KernelProcess


class ConsolePrinter:
    """Prints console bytes as whole lines, prefixed with the domain name when asked."""

    COLORS = ("cyan", "green", "magenta", "yellow", "blue", "bright_red")

    def __init__(self, prefix: bool) -> None:
        self.prefix = prefix
        self._partial: dict[str, bytes] = {}
        self._colors: dict[str, str] = {}

    def _tag(self, name: str) -> str:
        color = self._colors.setdefault(name, self.COLORS[len(self._colors) % len(self.COLORS)])
        return f"[{color}]{name:>10} |[/] "

    def feed(self, name: str, data: bytes) -> None:
        if not self.prefix:
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()
            return
        buf = self._partial.get(name, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[name] = rest
        for line in lines:
            out.print(
                self._tag(name) + escape(line.decode(errors="replace")), markup=True, soft_wrap=True
            )

    def flush(self, name: str) -> None:
        rest = self._partial.pop(name, b"")
        if rest:
            self.feed(name, rest + b"\n")

    def event(self, topic: str, payload: dict[str, Any]) -> None:
        if topic.startswith("console."):
            self.feed(topic[len("console.") :], payload.get("data", b""))
            return
        parts = topic.split(".")
        if parts[0] == "domain" and len(parts) >= 3:
            name, what = ".".join(parts[1:-1]), parts[-1]
            if what in ("shutdown", "crashed", "destroyed"):
                self.flush(name)
            msg = _describe(what, payload)
            if msg:
                style = "red" if what == "crashed" else "dim"
                out.print(
                    self._tag(name) + f"[{style}]{escape(msg)}[/]", markup=True, soft_wrap=True
                )
        elif topic == "supervisor.domain.failed":
            out.print(
                f"[red]cannot create {payload['path']}: {escape(payload['reason'])}[/]",
                markup=True,
                soft_wrap=True,
            )
        elif topic == "supervisor.kernel.exited":
            out.print(
                f"[red]kernel exited unexpectedly (status {payload.get('status')})[/]", markup=True
            )
        elif parts[0] == "driver" and parts[-1] in _DRIVER_NEWS:
            name, what = ".".join(parts[1:-1]), parts[-1]
            style = "red" if what in ("exit", "fatal", "hang", "violation", "poison") else "dim"
            out.print(
                self._tag(name) + f"[{style}]-- driver {escape(what)}: "
                f"{escape(_fields(payload))}[/]",
                markup=True,
                soft_wrap=True,
            )


#: Driver events the foreground `up` prints (spawn, ready, spare and replayed are routine).
_DRIVER_NEWS = (
    "exit",
    "recovered",
    "fatal",
    "hang",
    "violation",
    "poison",
    "stopped",
    "spare_exit",
)


def _fields(payload: dict[str, Any]) -> str:
    """``k=v k2=v2``: an event payload on one line."""
    return " ".join(f"{k}={_value(v)}" for k, v in payload.items())


def _value(v: object) -> str:
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if isinstance(v, str):
        return v if v and not any(c.isspace() or c in "'\"" for c in v) else repr(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, default=str, separators=(",", ":"))
    return str(v)


def _describe(what: str, p: dict[str, Any]) -> str:
    return {
        "created": f"-- domain created (id {p.get('domid')})",
        "shutdown": f"-- {p.get('reason')} ({p.get('policy')}: {p.get('action')})",
        "crashed": f"-- CRASHED: {p.get('reason')} ({p.get('policy')}: {p.get('action')})",
        "restarted": f"-- restarted as id {p.get('domid')}",
    }.get(what, "")


# --- up / down ---------------------------------------------------------------------------------


def up(
    config: Annotated[Path, typer.Argument(help="Stack file.")] = Path("supervisor.toml"),
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once the stack is up.")
    ] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Start the supervisor, the kernel and the domains listed in CONFIG."""
    try:
        cfg = load_stack_config(config)
        for path in cfg.domains:  # validate (and build images) before starting anything
            load_domain_config(path)
    except ConfigError as e:
        fail(str(e))
    rd = RunDir(run_dir or (Path(cfg.run_dir) if cfg.run_dir else default_run_dir()))
    try:
        rd.prepare()
        rd.check_driver_sockets([d.name for d in cfg.drivers])
    except RunDirError as e:
        fail(str(e))
    if (pid := rd.running_pid()) is not None:
        fail(
            f"a stack is already running in {rd.path} (supervisor pid {pid}); stop it with "
            "`isovisor down` or use another --run-dir"
        )
    if detach:
        _up_detached(config, rd)
        return
    import logging

    from isovisor.supervisor.daemon import Supervisor
    from isovisor.supervisor.kernelproc import KernelStartError

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="supervisor: %(levelname)s %(message)s"
    )
    printer = ConsolePrinter(prefix=True)
    out.print(
        f"[bold]isovisor[/] stack {cfg.name!r} starting from {config} "
        f"(run dir {rd.path}); Ctrl-C stops it",
        markup=True,
    )
    try:
        status = Supervisor(cfg, rd, on_event=printer.event).run()
    except ControlError as e:
        fail(e.reason)
    except KernelStartError as e:
        fail(str(e))
    out.print("[bold]isovisor[/] stack stopped", markup=True)
    raise typer.Exit(status)


def _up_detached(config: Path, rd: RunDir) -> None:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with open(rd.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "isovisor.supervisor", str(config.resolve()), str(rd.path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    with Client(rd.control, timeout=0.5) as c:
        while True:
            if proc.poll() is not None:
                tail = "\n".join(rd.log.read_text(errors="replace").splitlines()[-15:])
                fail(
                    f"the supervisor exited with status {proc.returncode} while starting; "
                    f"log {rd.log}:\n{tail}"
                )
            try:
                reply = c.call("ping")
                break
            except ControlError:
                if time.monotonic() > deadline:
                    proc.kill()
                    fail(f"the stack did not come up within 60s; see {rd.log}")
    out.print(
        f"stack up: supervisor pid {reply['pid']}, kernel pid {reply['kernel_pid']}, "
        f"run dir {rd.path}"
    )
    _start_failures(reply.get("start_failures") or {})


def _start_failures(failures: dict[str, dict[str, str]]) -> None:
    """Say what did not start: each driver (an error: `up` fails, though the stack runs on
    without it) and each domain (a warning, as one bad domain does not stop the others)."""
    drivers, domains = failures.get("drivers") or {}, failures.get("domains") or {}
    for reason in drivers.values():
        err.print(f"[bold red]isovisor: error:[/] {escape(reason)}", markup=True)
    for path, reason in domains.items():
        err.print(
            f"[yellow]isovisor: warning:[/] domain {escape(path)} was not created: "
            f"{escape(reason)}",
            markup=True,
        )
    if drivers:
        names = ", ".join(drivers)
        fail(
            f"the stack is up without driver(s) {names}: fix the cause, then `isovisor driver "
            f"start NAME` (a change to the stack's file takes `isovisor down` and `up`); "
            "`isovisor status` shows every driver"
        )


def down(
    run_dir: RunDirOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 30.0,
) -> None:
    """Stop every domain, the kernel and the supervisor; remove their resources."""
    rd = _run_dir(run_dir)
    pid = rd.running_pid()
    if pid is None:
        fail(f"no stack is running in {rd.path}")
    _call(rd, "down")
    if not wait_gone(pid, timeout):
        fail(f"the supervisor (pid {pid}) did not stop within {timeout:g}s")
    out.print("stack stopped")


def events(
    prefixes: Annotated[
        list[str] | None,
        typer.Argument(help="Topic prefixes, e.g. driver. or domain.g1. (default: every event)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line: ts, topic, payload.")
    ] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Print the stack's events as they happen, one per line, until Ctrl-C or `down`."""
    rd = _run_dir(run_dir)
    topics = prefixes or [""]
    with _client(rd) as c:
        try:
            sub = subscribe(rd.events, [*topics, "supervisor.down"], c)
        except ControlError as e:
            fail(e.reason)
    pid = rd.running_pid()
    try:
        while True:
            ev = sub.recv(1.0)
            if ev is None:
                if rd.running_pid() != pid:  # killed without a supervisor.down
                    fail(f"the supervisor (pid {pid}) is gone")
                continue
            topic, payload = ev
            if topic.startswith(tuple(topics)):
                _print_event(topic, payload, as_json)
            if topic == "supervisor.down":
                return
    except KeyboardInterrupt:
        return
    finally:
        sub.close()


def _print_event(topic: str, payload: dict[str, Any], as_json: bool) -> None:
    now = time.time()
    if as_json:
        line = json.dumps(
            {"ts": round(now, 6), "topic": topic, "payload": payload},
            default=lambda v: v.decode(errors="replace") if isinstance(v, bytes) else str(v),
        )
    else:
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        line = f"{stamp} {topic} {_fields(payload)}"
    print(line, flush=True)


# --- run ---------------------------------------------------------------------------------------


def run(
    config: Annotated[Path, typer.Argument(help="Domain config file.")],
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds (exit 124).")
    ] = None,
    pcpus: Annotated[int, typer.Option(min=1, max=64)] = 1,
) -> None:
    """Run one domain to completion in a private kernel; exit with the guest's exit code.

    Exit status: the guest's code when it powers off, 125 if it crashed, 124 on --timeout.
    """
    try:
        cfg = load_domain_config(config)
    except ConfigError as e:
        fail(str(e))
    if cfg.devices:
        fail(
            f"{config}: domain {cfg.name} has devices, which need driver backends; `run` starts "
            "only a kernel. Start a stack that declares the drivers (`isovisor up`) and use "
            "`isovisor create` and `isovisor console -f`"
        )
    from isovisor.supervisor.kernelproc import KernelProcess, KernelStartError

    tmp = Path(tempfile.mkdtemp(prefix="isovisor-run-", dir="/tmp"))
    rd = RunDir(tmp)
    try:
        rd.prepare()
    except RunDirError as e:
        tmp.rmdir()
        fail(str(e))
    kernel = KernelProcess(rd, shm_prefix=shm_prefix_for(os.getpid()), pcpus=pcpus, timeslice_ms=10)
    printer = ConsolePrinter(prefix=False)
    code = 0
    sub: Subscriber | None = None
    try:
        kernel.start()
        assert kernel.client is not None
        sub = subscribe(
            rd.kernel_events, [f"console.{cfg.name}", f"domain.{cfg.name}."], kernel.client
        )
        try:
            kernel.call("create", config=cfg.to_wire())
        except ControlError as e:
            fail(e.reason)
        deadline = None if timeout is None else time.monotonic() + timeout
        code = _stream_until_exit(sub, cfg.name, printer, deadline, kernel)
    except KernelStartError as e:
        fail(str(e))
    except KeyboardInterrupt:
        code = 130
    finally:
        if sub is not None:
            sub.close()
        kernel.stop()
        for p in tmp.iterdir():
            p.unlink(missing_ok=True)
        tmp.rmdir()
    raise typer.Exit(code)


def _stream_until_exit(
    sub: Subscriber,
    name: str,
    printer: ConsolePrinter,
    deadline: float | None,
    kernel: KernelProcess,
) -> int:
    while True:
        wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
        ev = sub.recv(wait)
        if ev is None:
            if deadline is not None and time.monotonic() >= deadline:
                err.print(f"isovisor: domain {name} still running after the timeout; destroying it")
                return EXIT_TIMEOUT
            if not kernel.alive():
                err.print(f"isovisor: the kernel exited unexpectedly; log:\n{kernel.log_tail()}")
                return 1
            continue
        topic, p = ev
        if topic == f"console.{name}":
            printer.feed(name, p["data"])
        elif topic == f"domain.{name}.shutdown" and p.get("action") != "restart":
            return int(p.get("code", 0))
        elif topic == f"domain.{name}.restart_failed":
            err.print(f"isovisor: domain {name} could not be restarted: {p.get('reason')}")
            return EXIT_CRASHED
        elif topic == f"domain.{name}.crashed":
            if p.get("action") == "restart":
                err.print(f"isovisor: domain {name} crashed ({p.get('reason')}); restarting")
                continue
            note = f" ({p['note']})" if p.get("note") else ""
            err.print(f"isovisor: domain {name} crashed: {p.get('reason')}{note}")
            return EXIT_CRASHED
