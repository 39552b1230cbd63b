"""Where a stack keeps its sockets, logs and pid file (its *run directory*)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Unix socket paths longer than this cannot be bound (sun_path is 108 bytes).
_MAX_SOCKET_PATH = 100


class RunDirError(Exception):
    pass


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def control(self) -> str:
        return f"ipc://{self.path / 'control.sock'}"

    @property
    def events(self) -> str:
        return f"ipc://{self.path / 'events.sock'}"

    @property
    def kernel_control(self) -> str:
        return f"ipc://{self.path / 'kernel.sock'}"

    @property
    def kernel_events(self) -> str:
        return f"ipc://{self.path / 'kernel-events.sock'}"

    @property
    def kernel_drivers(self) -> str:
        """Where the kernel receives driver messages."""
        return f"ipc://{self.path / 'kernel-drivers.sock'}"

    def driver_dir(self, name: str) -> Path:
        """The directory of driver ``name``'s own files (its instances' sockets and reports,
        its debugger's socket): a jailed driver can write there and nowhere else in the run
        directory (drivers/jail.py)."""
        return self.path / f"driver-{name}"

    @property
    def jail_root(self) -> Path:
        """The empty directory jailed drivers build their root over (in their own mount
        namespaces: it stays empty here)."""
        return self.path / "jail"

    def driver_socket(self, name: str, instance: int) -> Path:
        """The socket file of one driver process: each instance has its own, so a dead
        instance's file never gets in a replacement's way."""
        return self.driver_dir(name) / f"{instance}.sock"

    def driver_endpoint(self, name: str, instance: int) -> str:
        return f"ipc://{self.driver_socket(name, instance)}"

    def driver_report(self, name: str, instance: int) -> Path:
        """Where instance ``instance`` of driver ``name`` says why it could not start or why
        it ended by fail-stop (``--report``: drivers/host.py)."""
        return self.driver_dir(name) / f"{instance}.report.json"

    def driver_log(self, name: str) -> Path:
        return self.path / f"driver-{name}.log"

    def driver_pdb(self, name: str) -> Path:
        """Where a driver in debug mode serves pdb when it stops at a ``breakpoint()``
        (drivers/debugger.py; ``debug.<pid>.pdb`` beside it while this one is taken)."""
        return self.driver_dir(name) / "debug.pdb"

    @property
    def pidfile(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def kernel_log(self) -> Path:
        return self.path / "kernel.log"

    def sockets(self) -> list[Path]:
        """Every socket file of the stack (including drivers' that exist now)."""
        fixed = [
            self.path / n
            for n in (
                "control.sock",
                "events.sock",
                "kernel.sock",
                "kernel-events.sock",
                "kernel-drivers.sock",
            )
        ]
        # (a debugger's socket outlives a driver process killed at a breakpoint)
        return (
            fixed
            + sorted(self.path.glob("driver-*/*.sock"))
            + sorted(self.path.glob("driver-*/*.pdb"))
        )

    def prepare(self) -> None:
        longest = max(len(str(p)) for p in self.sockets())
        if longest > _MAX_SOCKET_PATH:
            raise RunDirError(
                f"run directory {self.path} is too long for Unix sockets "
                f"({longest} > {_MAX_SOCKET_PATH} bytes): choose a shorter "
                "--run-dir or ISOVISOR_RUN_DIR"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {self.path}: {e.strerror}") from None

    def check_driver_sockets(self, names: list[str]) -> None:
        """Refuse driver names whose instance sockets would not fit in sun_path."""
        for name in names:
            longest = len(str(self.driver_socket(name, 99999)))
            if longest > _MAX_SOCKET_PATH:
                raise RunDirError(
                    f"driver name {name!r} is too long for a socket in "
                    f"{self.path} ({longest} > {_MAX_SOCKET_PATH} bytes): choose "
                    "a shorter driver name or a shorter --run-dir"
                )

    def running_pid(self) -> int | None:
        """The pid of a live supervisor using this run dir, if any."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"isovisor" in cmdline else None


def shm_prefix_for(pid: int) -> str:
    """Shared-memory names of one stack: unique per supervisor, easy to sweep."""
    return f"isovisor.{pid}."
