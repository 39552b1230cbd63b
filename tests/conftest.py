"""Shared fixtures: private stacks with guaranteed clean-up, and CLI runners."""

from __future__ import annotations

import compileall
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ipc.control import Client  # noqa: E402
from ipc.events import Subscriber, subscribe  # noqa: E402
from isovisor.paths import RunDir  # noqa: E402
from isovisor.procs import log_tail, reap  # noqa: E402
from isovisor.testing import TEST_FAILED  # noqa: E402
from isovisor.testing import wait_until as _plugin_wait_until  # noqa: E402

ISOVISOR = [sys.executable, "-m", "isovisor.cli"]


def cli(
    *args: str, run_dir: Path | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the isovisor CLI as a user would; returns the completed process."""
    env = dict(os.environ)
    env.pop("ISOVISOR_RUN_DIR", None)
    if run_dir is not None:
        env["ISOVISOR_RUN_DIR"] = str(run_dir)
    env["COLUMNS"] = "200"
    return subprocess.run(
        [*ISOVISOR, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def domain_toml(name: str, image: str, memory: int = 4, **keys: Any) -> str:
    lines = [f'name = "{name}"', f'image = "{image}"', f"memory = {memory}"]
    for k, v in keys.items():
        lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}")
    return "\n".join(lines) + "\n"


@dataclass
class Stack:
    """A detached stack in a private run dir; every process it started is reaped at the end."""

    dir: Path
    run_dir: Path
    pids: list[int] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return cli(*args, run_dir=self.run_dir, timeout=timeout, cwd=self.dir)

    def client(self) -> Client:
        return Client(RunDir(self.run_dir).control, timeout=15)

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        with self.client() as c:
            return c.call(command, **props)

    def domains(self) -> dict[str, dict[str, Any]]:
        """The domains by name, as ``isovisor list --json`` prints them (asked over the
        control socket: a CLI process costs ~0.45 s, and tests of the CLI run it themselves)."""
        return {d["name"]: d for d in self.call("list")["domains"]}

    def create(self, cfg: Path) -> dict[str, Any]:
        """Create a domain from config file ``cfg``, as ``isovisor create`` does (over the
        control socket; the CLI's own tests run it)."""
        return self.call("create", path=str(cfg.resolve()))

    def subscribe(self, topics: list[str]) -> Subscriber:
        with self.client() as c:
            return subscribe(RunDir(self.run_dir).events, topics, c)

    def domain_config(self, name: str, image: str, **keys: Any) -> Path:
        return write(self.dir / f"{name}.toml", domain_toml(name, image, **keys))

    def up(  # type: ignore[assignment]
        self, domains: list[Path] = (), pcpus: int = 2, extra: str = "", name: str = "test"
    ) -> None:
        start = ", ".join(f'"{p.name}"' for p in domains)
        write(
            self.dir / "supervisor.toml",
            f'[supervisor]\nname = "{name}"\n[kernel]\npcpus = {pcpus}\n{extra}\n'
            f"[domains]\nstart = [{start}]\n",
        )
        r = self.cli("up", "--detach", str(self.dir / "supervisor.toml"))
        assert r.returncode == 0, f"up failed: {r.stdout}{r.stderr}"
        ping = self.call("ping")
        self.pids += [ping["pid"], ping["kernel_pid"]]
        self.pids += [
            d["pid"]
            for d in self.call("drivers")["drivers"]
            if d["isolation"] == "process" and d["pid"]
        ]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the project's modules to bytecode once.  Every test starts Python processes (the
    CLI, the supervisor, the kernel, drivers); where PYTHONDONTWRITEBYTECODE is set, as on CI,
    each of them would otherwise compile every module it imports again, about 0.2 s each."""
    for package in ("isovisor", "kernel", "drivers", "devices", "domains", "ipc"):
        compileall.compile_dir(ROOT / package, quiet=1)


def wait_event(
    sub: Subscriber, topic: str, timeout: float = 30, match: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Wait for an event on ``topic`` (exact); fail the test after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        ev = sub.recv(max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise AssertionError(f"no {topic!r} event within {timeout}s")
        t, p = ev
        if t == topic and all(p.get(k) == v for k, v in (match or {}).items()):
            return p


def wait_events(sub: Subscriber, topics: list[str], timeout: float = 30) -> dict[str, Any]:
    """Wait for one event on each of ``topics``, in whatever order they come (waiting for them
    one after the other would drop one that came before the one awaited); their payloads by
    topic."""
    import time

    deadline = time.monotonic() + timeout
    got: dict[str, Any] = {}
    while len(got) < len(set(topics)):
        ev = sub.recv(max(0.0, deadline - time.monotonic()))
        if ev is None:
            missing = sorted(set(topics) - set(got))
            raise AssertionError(f"no {missing} event(s) within {timeout}s")
        if ev[0] in topics:
            got.setdefault(ev[0], ev[1])
    return got


def command_line(p: psutil.Process) -> str:
    """``p``'s command line, or "" once it has ended (a zombie not reaped yet has none: a
    short-lived child of the stack, such as a compiler or an ``ip`` command, can be one)."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def process_name(p: psutil.Process) -> str:
    """``p``'s name (``/proc/<pid>/comm``), or "" once it has ended and been reaped (a
    supervisor reaps its drivers' keepers while a test looks at its children)."""
    try:
        return p.name()
    except psutil.Error:
        return ""


def shm_segments(prefix: str = "isovisor.") -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(prefix + "*"))


def print_log_tails(run_dir: Path, lines: int = 40) -> None:
    """The ends of a stack's kernel, supervisor and driver logs, to stderr (a failed test's
    report shows them: the stack's directory is gone by the time anyone reads it)."""
    logs = [
        run_dir / "kernel.log",
        run_dir / "supervisor.log",
        *sorted(run_dir.glob("driver-*.log")),
    ]
    for p in logs:
        if p.exists():
            print(f"--- {p.name} ---\n{log_tail(p, lines)}", file=sys.stderr)


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from _private_stack(request)


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A second stack beside ``stack`` (save in one, restore in the other)."""
    yield from _private_stack(request)


def _private_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    d = Path(tempfile.mkdtemp(prefix="iv-", dir="/tmp"))
    s = Stack(dir=d, run_dir=d / "run")
    try:
        yield s
    finally:
        if request.node.stash.get(TEST_FAILED, False):
            with contextlib.suppress(Exception):
                print_log_tails(s.run_dir)
        if RunDir(s.run_dir).running_pid() is not None:
            with contextlib.suppress(Exception):
                s.cli("down", timeout=40)
        leaked = reap(s.pids)
        segs = [seg for pid in s.pids for seg in shm_segments(f"isovisor.{pid}.")]
        for seg in segs:
            (Path("/dev/shm") / seg).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
        assert not leaked, f"processes left running after the test: {leaked}"
        assert not segs, f"shared-memory segments left behind: {segs}"


# Poll an observable condition (a status query, not a fixed delay) until it holds, for state
# that no event announces (CPU time, counters, last-seen ages): the plugin's, shared.
wait_until = _plugin_wait_until


# Fixtures that start processes (a stack, a kernel, driver processes) or run guests: a test
# using one is end-to-end (marker ``e2e``; ``pytest -m "not e2e"`` runs the unit tests alone).
# Modules that are end-to-end throughout say so themselves (``pytestmark``), as do single tests
# that run the CLI or a driver as a subprocess.
E2E_FIXTURES: frozenset[str] = frozenset(
    {
        "stack",  # conftest: a detached stack in a private run dir
        "peer",  # conftest: a second one
        "isovisor_stack",  # the SDK plugin's (isovisor/testing.py) stack
        "kernel",  # test_kernel_recovery, test_vcpu_stop: a kernel running guests
        "harness",  # test_driver_host: driver processes
        "images",  # test_guests_bare: guests built and run under unicorn
        "user_cache",  # test_guests_bare: guests built (cc) into a private cache, and run
        "netns",  # test_net*, test_net_backend: a network namespace and a TAP device
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
