"""The ``isovisor`` command line: operate a stack over its control socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer
from rich.markup import escape
from rich.table import Table

import devices as devclasses
from ipc.control import Client, ControlError
from ipc.events import Subscriber, subscribe
from isovisor.clicampaign import campaign_app, fault_app
from isovisor.clicommon import (
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
from isovisor.clinet import net_app
from isovisor.cliswap import driver_stats, driver_swap
from isovisor.config import ConfigError, default_run_dir, load_domain_config, load_stack_config
from isovisor.kernelproc import KernelProcess, KernelStartError
from isovisor.paths import RunDir, RunDirError, shm_prefix_for

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="isovisor: run guests on a microkernel-style hypervisor.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


@app.command()
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

    from isovisor.supervisor import Supervisor

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
    root = str(Path(__file__).resolve().parent.parent)
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


@app.command()
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
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        fail(f"the supervisor (pid {pid}) did not stop within {timeout:g}s")
    out.print("stack stopped")


# --- domains -----------------------------------------------------------------------------------


@app.command("list")
def list_(
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List domains as `xl list` does."""
    doms = _call(_run_dir(run_dir), "list")["domains"]
    if as_json:
        print(json.dumps(doms, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col, just in (
        ("Name", "left"),
        ("ID", "right"),
        ("Mem", "right"),
        ("VCPUs", "right"),
        ("State", "left"),
        ("Time(s)", "right"),
        ("Weight", "right"),
        ("Cap", "right"),
        ("Uptime", "right"),
        ("Note", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for d in doms:
        t.add_row(
            d["name"],
            str(d["id"]),
            str(d["memory"]),
            str(d["vcpus"]),
            d["state"],
            f"{d['cpu_time']:.1f}",
            str(d["weight"]),
            str(d["cap"]),
            _uptime(d["uptime"]),
            d["reason"] or "",
        )
    out.print(t)


@app.command()
def devices(
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List virtual disks and network interfaces (`xl block-list`, `xl network-list`) with their
    handshake state and counters."""
    devs = _call(_run_dir(run_dir), "devices")["devices"]
    if as_json:
        print(json.dumps(devs, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col in (
        "Domain",
        "Vdev",
        "BE",
        "Port",
        "State(fe/be)",
        "Access",
        "Sectors",
        "Target",
        "Requests",
        "Kicks",
        "Notifies",
        "Error",
    ):
        t.add_column(col)
    for d in devs:
        try:  # Access/Sectors/Target: what the class puts there (a vif: bridge, ip, mac)
            access, sectors, target = devclasses.by_name(d.get("class", "")).cells(d)
        except KeyError:  # a class this CLI does not know (a newer kernel)
            access, sectors, target = "?", "?", "?"
        t.add_row(
            d["domain"],
            d["vdev"],
            d["backend"],
            str(d["port"]),
            f"{d['frontend_state']}/{d['backend_state']}",
            access,
            sectors,
            target,
            str(d["requests"]),
            str(d["kicks"]),
            str(d["notifies"]),
            d["error"],
        )
    out.print(t)


@app.command()
def drivers(
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the stack's driver backends: isolation, process id, state."""
    drvs = _call(_run_dir(run_dir), "drivers")["drivers"]
    if as_json:
        print(json.dumps(drvs, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col in ("Name", "Module", "Isolation", "PID", "State", "Connected"):
        t.add_column(col)
    for d in drvs:
        live = d["state"] in ("STARTING", "RUNNING", "STOPPING")
        t.add_row(
            d["name"],
            d["module"],
            d["isolation"],
            str(d["pid"] if live else "-"),
            d["state"],
            "yes" if d["connected"] else "no",
        )
    out.print(t)


@app.command()
def status(
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the driver list as JSON.")] = False,
) -> None:
    """Supervised drivers: state, process, uptime, restarts by reason, last failure, load."""
    drvs = _call(_run_dir(run_dir), "status")["drivers"]
    if as_json:
        print(json.dumps(drvs, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col, just in (
        ("Name", "left"),
        ("State", "left"),
        ("PID", "right"),
        ("Uptime", "right"),
        ("Restarts", "left"),
        ("Last failure", "left"),
        ("Devices", "right"),
        ("In-flight", "right"),
        ("Backend", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for d in drvs:
        live = d["state"] in ("STARTING", "RUNNING", "STOPPING")
        style = {"RUNNING": "green", "FATAL": "bold red", "BACKOFF": "yellow", "EXITED": "red"}.get(
            d["state"], ""
        )
        last = d.get("last_failure") or (
            "-" if d.get("supervised", True) else "inline: not supervised"
        )
        t.add_row(
            d["name"],
            f"[{style}]{d['state']}[/]" if style else d["state"],
            str(d["pid"]) if live and d.get("pid") else "-",
            _uptime(d["uptime_s"]) if live and d.get("uptime_s") is not None else "-",
            _restarts(d),
            escape(last),
            _count(d.get("devices")),
            _count(d.get("outstanding")),
            escape(_backend(d)),
        )
    out.print(t)


def _backend(d: dict[str, Any]) -> str:
    """The implementation, and its swaps: one under way, or how many and the last outcome."""
    text = str(d.get("module") or "-")
    if d.get("swap"):
        return f"{text} (swap: {d['swap']})"
    last = d.get("last_swap")
    if last:
        stall = last.get("stall_ms")
        took = f", {stall:.0f} ms" if isinstance(stall, int | float) else ""
        text += f" ({d.get('swaps')} swap(s), last {last.get('outcome')}{took})"
    return text


def _restarts(d: dict[str, Any]) -> str:
    by = d.get("restarts_by_reason") or {}
    if not by:
        return str(d.get("restarts", 0))
    parts = ", ".join(f"{r} {n}" for r, n in sorted(by.items(), key=lambda x: -x[1]))
    return f"{d.get('restarts', 0)} ({parts})"


def _count(v: Any) -> str:
    if v is None:
        return "-"
    return str(len(v)) if isinstance(v, list | dict) else str(v)


driver_app = typer.Typer(
    no_args_is_help=True, help="Start, stop, restart or hot-swap a supervised driver process."
)
app.add_typer(driver_app, name="driver")
driver_app.command("swap")(driver_swap)
driver_app.command("stats")(driver_stats)
app.add_typer(fault_app, name="fault")
app.add_typer(campaign_app, name="campaign")
app.add_typer(net_app, name="net")
NameArg = Annotated[str, typer.Argument(help="Driver name, as in [driver.<name>].")]
WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to wait for the result.")]


@driver_app.command("start")
def driver_start(name: NameArg, run_dir: RunDirOpt = None, wait: WaitOpt = 30.0) -> None:
    """Start a STOPPED, EXITED, BACKOFF or FATAL driver (a fresh restart count)."""
    _driver_action("start", name, run_dir, wait)


@driver_app.command("stop")
def driver_stop(name: NameArg, run_dir: RunDirOpt = None, wait: WaitOpt = 30.0) -> None:
    """Stop a driver: SIGTERM, SIGKILL after graceful_timeout; its devices wait for a start."""
    _driver_action("stop", name, run_dir, wait)


@driver_app.command("restart")
def driver_restart(name: NameArg, run_dir: RunDirOpt = None, wait: WaitOpt = 30.0) -> None:
    """Replace a driver's process (reason `manual`; not counted toward intensity)."""
    _driver_action("restart", name, run_dir, wait)


def _driver_row(rd: RunDir, name: str) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {d["name"]: d for d in _call(rd, "status")["drivers"]}
    return rows.get(name, {})


def _driver_action(action: str, name: str, run_dir: Path | None, wait: float) -> None:
    rd = _run_dir(run_dir)
    before = _driver_row(rd, name)
    r = _call(rd, "driver", action=action, name=name)
    old = before.get("pid") if before.get("state") in ("STARTING", "RUNNING") else None
    deadline = time.monotonic() + wait
    while True:
        row = _driver_row(rd, name)
        state, pid = row.get("state"), row.get("pid")
        if action == "stop" and state == "STOPPED":
            out.print(f"stopped driver {name}")
            return
        if action != "stop" and state == "RUNNING" and pid != old:
            was = f" (was pid {old})" if old else ""
            out.print(f"{action}ed driver {name}: pid {pid}{was}")
            return
        if action != "stop" and state in ("FATAL", "EXITED"):
            fail(f"driver {name} is {state}: {row.get('last_failure')}")
        if time.monotonic() > deadline:
            fail(
                f"driver {name} is still {state} after {wait:g}s (asked: {action}, reply "
                f"state {r.get('state')}); see `isovisor status` and "
                f"{rd.driver_log(name)}"
            )
        time.sleep(0.05)  # a status poll: the reply comes before the process is up


@app.command()
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


def _uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@app.command()
def console(
    name: Annotated[str, typer.Argument(help="Domain name or id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
    interactive: Annotated[
        bool,
        typer.Option(
            "--interactive",
            "-i",
            help="Follow, and send what you type to the guest, a line at a time (needs a "
            "console driver; Ctrl-D or Ctrl-C ends).",
        ),
    ] = False,
    send: Annotated[
        str | None,
        typer.Option(
            "--send",
            help="Send this text to the guest's console input and exit (a newline is added).",
        ),
    ] = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Print a domain's console (the last 64 KiB), and follow it with -f."""
    rd = _run_dir(run_dir)
    if send is not None:
        r = _call(rd, "console_input", name=name, data=(send + "\n").encode())
        out.print(f"sent {r['bytes']} bytes to {r['name']}")
        return
    if interactive:
        follow = True
        threading.Thread(target=_type_into, args=(rd, name), daemon=True).start()
    with _client(rd) as c:
        sub = (
            subscribe(rd.events, ["console.", "domain.", "supervisor.down"], c) if follow else None
        )
        try:
            hist = c.call("console", name=name)
        except ControlError as e:
            if sub:
                sub.close()
            fail(e.reason)
    sys.stdout.write(hist["data"].decode(errors="replace"))
    sys.stdout.flush()
    if sub is None:
        return
    # As `virsh console`: say when following has begun (on stderr; stdout is the console).
    err.print(f"following domain {hist['name']} (id {hist['domid']}); Ctrl-C to stop")
    try:
        _follow(sub, hist["name"], hist["domid"], hist["end"])
    except KeyboardInterrupt:
        return
    finally:
        sub.close()


def _type_into(rd: RunDir, name: str) -> None:
    """Interactive console: each line typed goes to the guest's console input."""
    with _client(rd) as c:
        for line in sys.stdin:
            try:
                c.call("console_input", name=name, data=line.encode())
            except ControlError as e:
                err.print(f"isovisor: {e.reason}")
                os._exit(1)
    os._exit(0)  # Ctrl-D: done


def _follow(sub: Subscriber, name: str, domid: int, pos: int) -> None:
    """Print a domain's console from byte ``pos`` on, across restarts, until it is gone."""
    restarting = False
    while True:
        ev = sub.recv(None)
        assert ev is not None
        topic, p = ev
        if topic == "supervisor.down":
            return
        if p.get("domid", -1) > domid and topic in (f"console.{name}", f"domain.{name}.restarted"):
            domid, pos, restarting = p["domid"], 0, False  # ids only grow: a restart
        if p.get("domid") != domid:
            continue
        if topic == f"console.{name}":
            data, off = p["data"], p["offset"]
            if off + len(data) > pos:
                sys.stdout.write(data[max(0, pos - off) :].decode(errors="replace"))
                sys.stdout.flush()
                pos = off + len(data)
        elif topic in (f"domain.{name}.shutdown", f"domain.{name}.crashed"):
            restarting = p.get("action") == "restart"
        elif topic == f"domain.{name}.destroyed" and not restarting:
            return
        elif topic == f"domain.{name}.restart_failed":
            err.print(f"isovisor: domain {name} could not be restarted: {p.get('reason')}")
            return


@app.command()
def create(
    config: Annotated[Path, typer.Argument(help="Domain config file.")],
    paused: Annotated[
        bool,
        typer.Option(
            "--paused",
            "-p",
            help="Leave the domain paused before its first instruction; `unpause` starts it.",
        ),
    ] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Create a domain from a config file in the running stack."""
    try:
        load_domain_config(config)  # report config errors locally, with local paths
    except ConfigError as e:
        fail(str(e))
    r = _call(_run_dir(run_dir), "create", path=str(config.resolve()), paused=paused)
    how = " paused; start it with `isovisor unpause " + r["name"] + "`" if paused else ""
    out.print(f"created domain {r['name']} (id {r['domid']}){how}")


def _domain_verb(verb: str, past: str):
    def cmd(
        name: Annotated[str, typer.Argument(help="Domain name or id.")], run_dir: RunDirOpt = None
    ) -> None:
        r = _call(_run_dir(run_dir), verb, name=name)
        out.print(f"{past} domain {name} (id {r['domid']})")

    cmd.__doc__ = f"{verb.capitalize()} a domain."
    return cmd


app.command("destroy")(_domain_verb("destroy", "destroyed"))
app.command("pause")(_domain_verb("pause", "paused"))
app.command("unpause")(_domain_verb("unpause", "unpaused"))


# --- run ---------------------------------------------------------------------------------------


@app.command()
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
