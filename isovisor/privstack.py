"""A whole isovisor stack in a private directory, driven through the real CLI.

``isovisor up --detach`` starts it and ``isovisor down`` stops it; whatever happens,
:meth:`PrivateStack.close` also kills any process of the stack still alive and removes its
shared-memory segments.  Benchmarks (bench/) and fault-injection campaigns use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ipc.control import Client
from ipc.events import Subscriber, subscribe
from isovisor.paths import RunDir, shm_prefix_for
from isovisor.procs import reap

ISOVISOR = [sys.executable, "-m", "isovisor.cli"]


def domain_toml(name: str, image: str, memory: int, **keys: Any) -> str:
    lines = [f'name = "{name}"', f'image = "{image}"', f"memory = {memory}"]
    for k, v in keys.items():
        lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}")
    return "\n".join(lines) + "\n"


class PrivateStack:
    """A detached ``isovisor up`` stack in a short private /tmp directory.

    Started and stopped through the real CLI (``isovisor up --detach`` / ``isovisor down``);
    whatever happens, :meth:`close` kills any process of the stack still alive, removes its
    shared-memory segments and deletes the directory.
    """

    def __init__(
        self,
        pcpus: int,
        timeslice_ms: int = 10,
        extra_toml: str = "",
        *,
        directory: Path | None = None,
        keep: bool = False,
        name: str = "bench",
        on_cpu: Callable[[float], None] | None = None,
        restore: str = "lazy",
        console: str | None = None,
    ) -> None:
        """``directory``: where the stack lives (default: a new short /tmp directory, which
        :meth:`close` deletes unless ``keep``); ``on_cpu`` gets the CPU seconds of each stack
        process at close (the benchmarks' load accounting)."""
        self.pcpus = pcpus
        self.timeslice_ms = timeslice_ms
        self.restore = restore  # [kernel] restore
        self.console = console  # [domains] console: the console driver of every domain
        self.extra_toml = extra_toml  # appended to supervisor.toml, e.g. [driver.<name>] tables
        self.name = name
        self.keep = keep or directory is not None
        self.on_cpu = on_cpu
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory or Path(tempfile.mkdtemp(prefix="ivb-", dir="/tmp"))
        self.run_dir = self.dir / "run"
        self.rd = RunDir(self.run_dir)
        self.pids: list[int] = []
        self.supervisor_pid: int | None = None
        self.kernel_pid: int | None = None
        self._client: Client | None = None

    # configs
    def domain_config(self, name: str, image: str, memory: int = 4, **keys: Any) -> Path:
        p = self.dir / f"{name}.toml"
        p.write_text(domain_toml(name, image, memory, **keys))
        return p

    def create(self, cfg: Path) -> dict[str, Any]:
        """Create a domain from config file ``cfg``: what ``isovisor create`` asks the
        supervisor, without starting a CLI process (~0.45 s each)."""
        return self.call("create", path=str(cfg.resolve()))

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["ISOVISOR_RUN_DIR"] = str(self.run_dir)
        env["COLUMNS"] = "200"
        # own session: a Ctrl-C meant for the benchmark must not kill `isovisor down` midway
        return subprocess.run(
            [*ISOVISOR, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )

    def up(self, domains: list[Path] = ()) -> None:  # type: ignore[assignment]
        start = ", ".join(f'"{p.name}"' for p in domains)
        toml = self.dir / "supervisor.toml"
        toml.write_text(
            f'[supervisor]\nname = "{self.name}"\n[kernel]\npcpus = {self.pcpus}\n'
            f'timeslice_ms = {self.timeslice_ms}\nrestore = "{self.restore}"\n'
            f"[domains]\nstart = [{start}]\n"
            + (f'console = "{self.console}"\n' if self.console else "")
            + (f"{self.extra_toml.strip()}\n" if self.extra_toml else "")
        )
        try:
            r = self.cli("up", "--detach", str(toml), timeout=90)
        finally:
            self._note_pids()
        if r.returncode != 0:
            raise RuntimeError(f"isovisor up failed ({r.returncode}): {r.stdout}{r.stderr}")
        ping = self.client.call("ping")
        self.supervisor_pid, self.kernel_pid = ping["pid"], ping["kernel_pid"]
        self.pids = list(dict.fromkeys([*self.pids, ping["pid"], ping["kernel_pid"]]))

    def _note_pids(self) -> None:
        """Find this stack's processes: the pid file, and any process naming our private dir
        on its command line (a supervisor interrupted before it wrote its pid file)."""
        found: list[int] = []
        pid = self.rd.running_pid()
        if pid is not None:
            self.supervisor_pid = self.supervisor_pid or pid
            found.append(pid)
        mark = str(self.dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmdline = p.info["cmdline"] or ()
            if p.pid != os.getpid() and any(mark in a for a in cmdline):
                found.append(p.pid)
                if self.supervisor_pid is None and "isovisor.supervisor" in cmdline:
                    self.supervisor_pid = p.pid
        for q in list(found):
            with contextlib.suppress(psutil.Error):
                found += [c.pid for c in psutil.Process(q).children(recursive=True)]
        self.pids = list(dict.fromkeys([*self.pids, *found]))

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.rd.control, timeout=15)
        return self._client

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        return self.client.call(command, **props)

    def domains(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.call("list")["domains"]}

    def subscribe(self, topics: list[str]) -> Subscriber:
        return subscribe(self.rd.events, topics, self.client)

    def close(self) -> None:
        """Stop the stack.  Ctrl-C or SIGTERM during the clean-up is held until it is done."""
        held: list[int] = []
        handlers = {
            sig: signal.signal(sig, lambda n, _f: held.append(n))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self._close()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
        if held:
            raise KeyboardInterrupt

    def _close(self) -> None:
        self._note_pids()
        for pid in self.pids:  # CPU these used, for the "other load" estimate
            with contextlib.suppress(psutil.Error):
                c = psutil.Process(pid).cpu_times()
                if self.on_cpu is not None:
                    self.on_cpu(c.user + c.system)
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.rd.running_pid() is not None:
            with contextlib.suppress(Exception):
                self.cli("down", timeout=60)
        leaked = reap(self.pids)
        if self.supervisor_pid is not None:
            prefix = shm_prefix_for(self.supervisor_pid)
            for seg in Path("/dev/shm").glob(prefix + "*"):
                seg.unlink(missing_ok=True)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        if leaked:
            print(
                f"isovisor: killed stack processes that outlived `isovisor down`: {leaked}",
                file=sys.stderr,
            )

    def __enter__(self) -> PrivateStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
