"""Starting and stopping driver backends: one OS process each, or a thread of the kernel."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from isovisor.config import DriverConfig
from isovisor.paths import RunDir
from isovisor.procs import log_tail

STOP_TIMEOUT_S = 5.0


def child_env() -> dict[str, str]:
    """The environment for stack processes: this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


class DriverProcess:
    """One ``isolation = "process"`` driver: ``python -m drivers.host`` with its own log."""

    def __init__(self, cfg: DriverConfig, run_dir: RunDir) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.log_path = run_dir.driver_log(cfg.name)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        c, rd = self.cfg, self.run_dir
        return [sys.executable, "-m", "drivers.host", "--name", c.name, "--module", c.module,
                "--kernel", rd.kernel_drivers, "--listen", rd.driver_endpoint(c.name),
                "--options", json.dumps(c.options), "--parent-pid", str(os.getpid())]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=child_env(), start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(self.proc.pid).kill()
            self.proc.wait()
