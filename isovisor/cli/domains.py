"""``isovisor list``, ``devices``, ``console``, ``create``, ``destroy``, ``pause`` and
``unpause``: the domains of a running stack and their devices."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ipc.control import ControlError
from ipc.events import Subscriber, subscribe
from isovisor.cli.common import RunDirOpt, _call, _client, _run_dir, _uptime, err, fail, out
from isovisor.config import ConfigError, load_domain_config
from isovisor.paths import RunDir


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
    import devices as devclasses  # here: the other verbs need none of the device classes

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


destroy = _domain_verb("destroy", "destroyed")
pause = _domain_verb("pause", "paused")
unpause = _domain_verb("unpause", "unpaused")
