"""Starting, talking to and stopping the kernel process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from ipc.control import Client, ControlError, ServerUnreachable
from ipc.shm import sweep
from isovisor.config import MigrationConfig
from isovisor.paths import RunDir
from isovisor.procs import log_tail
from isovisor.supervisor.driverproc import child_env

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class KernelStartError(Exception):
    pass


class KernelProcess:
    """One kernel process of a stack (or of an `isovisor run`)."""

    def __init__(
        self,
        run_dir: RunDir,
        *,
        shm_prefix: str,
        pcpus: int,
        timeslice_ms: int,
        restore: str = "lazy",
        log_path: Path | None = None,
        migration: MigrationConfig | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.shm_prefix = shm_prefix
        self.pcpus = pcpus
        self.timeslice_ms = timeslice_ms
        self.restore = restore
        self.log_path = log_path or run_dir.kernel_log
        self.migration = migration
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Client | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "kernel",
            "--control",
            self.run_dir.kernel_control,
            "--events",
            self.run_dir.kernel_events,
            "--drivers",
            self.run_dir.kernel_drivers,
            "--shm-prefix",
            self.shm_prefix,
            "--pcpus",
            str(self.pcpus),
            "--timeslice-ms",
            str(self.timeslice_ms),
            "--restore",
            self.restore,
            "--parent-pid",
            str(os.getpid()),
        ]
        m = self.migration
        if m is not None:
            cmd += ["--keys", m.keys, "--peers", m.peers]
            if m.listen:
                cmd += ["--migrate-listen", m.listen]
            if m.disks:
                cmd += ["--migrate-disks", m.disks]
        env = child_env()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.client = Client(self.run_dir.kernel_control, timeout=10.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise KernelStartError(
                    f"kernel exited with status {self.proc.returncode} "
                    f"while starting; see {self.log_path}:\n" + self.log_tail()
                )
            try:
                self.client.call("ping", timeout=0.5)
                return
            except ServerUnreachable:
                if time.monotonic() > deadline:
                    self.kill()
                    raise KernelStartError(
                        f"kernel did not answer within {START_TIMEOUT_S:g}s; see {self.log_path}"
                    ) from None

    def call(self, command: str, timeout: float | None = None, **props: Any) -> dict[str, Any]:
        if self.client is None:
            raise ControlError("kernel is not running")
        return self.client.call(command, timeout=timeout, **props)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Ask the kernel to destroy its domains and exit; kill it if it does not."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ControlError):
                self.call("shutdown", timeout=STOP_TIMEOUT_S)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(self.proc.pid).kill()
            self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        sweep(self.shm_prefix)
