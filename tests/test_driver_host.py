"""The driver host as a real process (``python -m drivers.host``) against a fake kernel: warm
spares, heartbeats and injected faults (docs/recovery.md).  The test is the kernel: it binds
the PULL socket the driver connects to and PUSHes to the driver's endpoint.  Every wait is on a
message or on the process's exit, never a fixed sleep."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from devices import rng
from drivers.host import EXIT_INJECTED, EXIT_SOFTWARE, start_inline
from ipc import doorbell
from ipc.ring import HEADER_BYTES, FrontRing
from ipc.shm import Segment, SegmentError
from ipc.store import DevState
from isovisor.procs import reap

ROOT = Path(__file__).resolve().parent.parent
NAME = "drv0"
MODULE = "drivers.blk"
WAIT = 10.0
MiB = 1 << 20


class Peer:
    """The kernel's side: a PULL for the driver's messages (all of them kept, with the time
    they arrived) and a PUSH to the driver's endpoint."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(endpoint)
        self.push: zmq.Socket[Any] | None = None
        self.seen: list[tuple[float, list[Any]]] = []
        self.senders: set[bytes] = set()  # the name:pid frame before each message

    def close(self) -> None:
        self.pull.close(0)
        if self.push is not None:
            self.push.close(0)

    def recv(self, timeout: float) -> list[Any] | None:
        """The next message, or None if none arrives within ``timeout`` seconds."""
        if not self.pull.poll(max(0, int(timeout * 1000))):
            return None
        sender, raw = self.pull.recv_multipart()
        msg = msgpack.unpackb(raw)
        assert isinstance(msg, list) and msg, msg
        self.senders.add(sender)
        self.seen.append((time.monotonic(), msg))
        return msg

    def expect(self, kind: str, timeout: float = WAIT) -> list[Any]:
        """Take messages until one of type ``kind`` arrives; return it."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(deadline - time.monotonic())
            if msg is None:
                raise AssertionError(
                    f"no {kind!r} message within {timeout}s; seen: {self.kinds()[-10:]}"
                )
            if msg[0] == kind:
                return msg

    def kinds(self) -> list[str]:
        return [m[0] for _, m in self.seen]

    def connect(self, endpoint: str) -> None:
        if self.push is not None:
            self.push.close(0)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(endpoint)

    def send(self, *msg: Any) -> None:
        assert self.push is not None
        self.push.send(msgpack.packb(list(msg)))


class Driver:
    """One driver host process and its log file."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, endpoint: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.endpoint = endpoint

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = WAIT) -> int:
        """Its exit status (negative: the signal that killed it)."""
        return self.proc.wait(timeout)


class Harness:
    """Starts driver processes against the peer; kills and reaps every one at the end."""

    def __init__(self, tmp: Path, ctx: zmq.Context[Any]) -> None:
        self.tmp = tmp
        self.peer = Peer(ctx, f"ipc://{tmp}/kernel.sock")
        self.drivers: list[Driver] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> Driver:
        n = len(self.drivers)
        endpoint = f"ipc://{self.tmp}/driver-{NAME}.{n}.sock"
        log_path = self.tmp / f"driver.{n}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "drivers.host",
                    "--name",
                    NAME,
                    "--module",
                    MODULE,
                    "--kernel",
                    self.peer.endpoint,
                    "--listen",
                    endpoint,
                    "--parent-pid",
                    str(os.getpid()),
                    "--log-level",
                    "INFO",
                    *args,
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
            )
        d = Driver(proc, log_path, endpoint)
        self.drivers.append(d)
        return d

    def start_active(
        self, *args: str, env: dict[str, str] | None = None
    ) -> tuple[Driver, dict[str, Any]]:
        """Start a driver, wait for its hello and connect to it."""
        d = self.start(*args, env=env)
        hello = self.peer.expect("hello")[1]
        assert hello["pid"] == d.proc.pid
        self.peer.connect(hello["endpoint"])
        return d, hello

    def close(self) -> None:
        reap([d.proc.pid for d in self.drivers])
        for d in self.drivers:
            d.proc.wait(5)
        self.peer.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    tmp = Path(tempfile.mkdtemp(prefix="ivhost-", dir="/tmp"))  # short: ipc:// paths are limited
    ctx: zmq.Context[Any] = zmq.Context()
    h = Harness(tmp, ctx)
    shm_before = set(Path("/dev/shm").iterdir())
    try:
        yield h
    finally:
        h.close()
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)
        leaked = {p for p in set(Path("/dev/shm").iterdir()) - shm_before if NAME in p.name}
        assert not leaked, f"shared-memory segments left behind: {leaked}"


def heartbeats_until_silent(peer: Peer, silence: float) -> list[list[Any]]:
    """Heartbeats taken until none arrives for ``silence`` seconds."""
    got = []
    while (msg := peer.recv(silence)) is not None:
        assert msg[0] == "heartbeat", msg
        got.append(msg)
    return got


# --- spares -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_spare_waits_for_activate_then_says_hello(harness: Harness) -> None:
    peer = harness.peer
    d = harness.start("--spare", "--watchdog-ms", "400", "--request-timeout-ms", "5000")
    spare = peer.expect("spare")[1]
    assert spare == {"name": NAME, "pid": d.proc.pid, "endpoint": d.endpoint, "module": MODULE}
    peer.connect(spare["endpoint"])  # as the supervisor does
    peer.send("kick", 1)  # anything before activate is ignored
    peer.send("fault", {"type": "exit", "now": True})
    peer.send("activate")
    hello = peer.expect("hello")[1]
    assert hello == {**spare, "watchdog_ms": 400, "request_timeout_ms": 5000, "statistics": True}
    assert peer.kinds() == ["spare", "hello"]  # no heartbeat from a spare
    assert peer.expect("heartbeat") == ["heartbeat", NAME, 1]  # an active driver beats
    assert peer.senders == {f"{NAME}:{d.proc.pid}".encode()}  # every message says who sent it
    log = d.log()
    assert "spare: ignoring ['kick', 1] before activation" in log
    assert "spare: ignoring ['fault', {'type': 'exit', 'now': True}] before activation" in log
    assert d.proc.poll() is None
    d.proc.terminate()
    assert d.wait() == 0


@pytest.mark.timeout(30)
def test_a_spare_stops_cleanly_on_sigterm(harness: Harness) -> None:
    d = harness.start("--spare")
    harness.peer.expect("spare")
    d.proc.terminate()
    assert d.wait() == 0
    assert "hello" not in harness.peer.kinds()


# --- heartbeats -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_heartbeats_go_out_every_quarter_watchdog_even_when_idle(harness: Harness) -> None:
    watchdog = 0.4
    period = watchdog / 4
    _, hello = harness.start_active("--watchdog-ms", "400")
    assert hello["watchdog_ms"] == 400 and hello["request_timeout_ms"] == 10_000
    t_hello = harness.peer.seen[-1][0]
    beats = [harness.peer.expect("heartbeat", timeout=watchdog) for _ in range(12)]
    assert [b[2] for b in beats] == list(range(1, 13))
    assert all(b[1] == NAME for b in beats)
    times = [t_hello] + [t for t, m in harness.peer.seen if m[0] == "heartbeat"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = (times[-1] - times[0]) / len(gaps)
    assert 0.8 * period < mean < 1.5 * period, gaps
    assert max(gaps) < watchdog, gaps  # never late enough to look hung


@pytest.mark.timeout(30)
def test_no_heartbeats_without_a_watchdog(harness: Harness) -> None:
    d, hello = harness.start_active()
    assert hello["watchdog_ms"] == 0
    # the next thing it does: no heartbeat in between
    harness.peer.send("fault", {"type": "exit", "now": True})
    assert d.wait() == EXIT_INJECTED
    assert harness.peer.recv(0.2) is None
    assert harness.peer.kinds() == ["hello"]


# --- injected faults ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("kind", "status"),
    [("segv", -11), ("abort", -6), ("exit", EXIT_INJECTED), ("exception", EXIT_SOFTWARE)],
)
def test_injected_faults_end_the_process_as_they_would_for_real(
    harness: Harness, kind: str, status: int
) -> None:
    # faulthandler on (as a developer might have it) must not turn a crash into anything else
    d, _ = harness.start_active("--watchdog-ms", "400", env={"PYTHONFAULTHANDLER": "1"})
    harness.peer.send("fault", {"type": kind, "now": True})
    assert d.wait() == status
    log = d.log()
    assert f"carrying out a fault: {kind}" in log
    assert "Fatal Python error" not in log
    if kind == "exception":
        assert (
            "fault({'type': 'exception', 'now': True},) failed in the backend: unhandled "
            "exception; exiting with status 70" in log
        )
        assert "InjectedFault: injected fault" in log  # with its traceback


@pytest.mark.timeout(30)
def test_hang_stops_the_heartbeats(harness: Harness) -> None:
    period = 0.1
    d, _ = harness.start_active("--watchdog-ms", "400")
    harness.peer.expect("heartbeat")
    harness.peer.expect("heartbeat")
    harness.peer.send("fault", {"type": "hang", "now": True})
    # at most one heartbeat already on its way, then silence: the loop is stuck
    late = heartbeats_until_silent(harness.peer, 3 * period)
    assert len(late) <= 1, late
    assert harness.peer.recv(3 * period) is None
    assert d.proc.poll() is None, "a hung driver is alive (the supervisor kills it)"
    assert "carrying out a fault: hang" in d.log()
    d.proc.kill()
    assert d.wait() == -9


@pytest.mark.timeout(30)
def test_leak_grows_the_rss_by_64_mib_per_message(harness: Harness) -> None:
    d, _ = harness.start_active("--watchdog-ms", "400")
    proc = psutil.Process(d.proc.pid)
    harness.peer.expect("heartbeat")
    rss0 = proc.memory_info().rss
    harness.peer.send("fault", {"type": "leak_mem", "now": True})
    harness.peer.send("fault", {"type": "leak_mem", "now": True})
    deadline = time.monotonic() + WAIT
    while proc.memory_info().rss < rss0 + 2 * 64 * MiB - 8 * MiB:
        assert time.monotonic() < deadline, "the RSS did not grow by 128 MiB"
        harness.peer.expect("heartbeat")  # the loop goes on: its heartbeats pace this check
    assert d.proc.poll() is None
    assert "leaked 128 MiB so far" in d.log()


@pytest.mark.timeout(30)
def test_bad_faults_and_stray_activates_are_ignored(harness: Harness) -> None:
    d, _ = harness.start_active()
    harness.peer.send("fault", {"type": "melt", "now": True})
    harness.peer.send("fault", {"type": "slow", "now": True})
    harness.peer.send("fault", "exit")
    harness.peer.send("activate")
    # messages are handled in order: this one comes last
    harness.peer.send("fault", {"type": "exit", "now": True})
    assert d.wait() == EXIT_INJECTED
    log = d.log()
    assert (
        "fault {'type': 'melt', 'now': True} refused: type 'melt' is not a fault a driver "
        "carries out" in log
    )
    assert (
        "fault {'type': 'slow', 'now': True} refused: now = true fires a fault on no "
        "request, which only the driver host's own kinds can do (abort, exception, exit, "
        "hang, leak_fd, leak_mem, segv); slow needs a request" in log
    )
    assert "ignoring a malformed fault message ['fault', 'exit']" in log
    assert "ignoring activate: this driver is active already" in log


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_bad_watchdog_arguments_exit_with_status_2(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "drivers.host",
            "--name",
            NAME,
            "--module",
            MODULE,
            "--kernel",
            f"ipc://{tmp_path}/k",
            "--listen",
            f"ipc://{tmp_path}/d",
            "--watchdog-ms",
            "-5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 2 and "-5 is negative" in r.stderr, r.stderr


# --- inline -------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_inline_driver_refuses_faults_that_would_take_the_kernel_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    peer = Peer(ctx, f"inproc://kernel-{os.getpid()}")
    drv = None
    try:
        drv = start_inline(NAME, MODULE, {}, ctx, peer.endpoint, f"inproc://{NAME}-{os.getpid()}")
        hello = peer.expect("hello")[1]
        assert hello["pid"] == os.getpid() and hello["watchdog_ms"] == 0
        peer.connect(hello["endpoint"])
        with caplog.at_level(logging.WARNING, logger=f"isovisor.driver.{NAME}"):
            for kind in ("exit", "segv", "abort", "hang", "exception", "leak_mem"):
                peer.send("fault", {"type": kind, "now": True})
            peer.send("attach", {"key": 5})  # answered with an error: all of the above is done
            assert peer.expect("error")[1] == 5
        text = caplog.text
        for kind, harm in (
            ("exit", "kill"),
            ("segv", "kill"),
            ("abort", "kill"),
            ("hang", "stall"),
        ):
            assert (
                f"refusing to carry out fault {kind!r}: this driver runs inline, so it would "
                f"{harm} the kernel" in text
            )
        assert (
            "fault({'type': 'exception', 'now': True},) failed in the backend; the driver "
            "goes on" in text
        )
        assert "leaked 64 MiB so far" in text
        assert drv.alive
        drv.stop()
        assert not drv.alive
    finally:
        if drv is not None:
            drv.stop()
        peer.close()
        ctx.term()


# --- what a backend's failures say --------------------------------------------------------------

LEVEL_DISK = """\
from typing import Any

from drivers.sdk import BlockBackend, DeviceState, FileStorage, Storage


class Backend(BlockBackend):
    OPTIONS = {**BlockBackend.OPTIONS, "level": "compression level, 0..9"}

    def configure(self, options: dict[str, Any]) -> None:
        super().configure(options)
        self.level = options.get("level", 0)
        if not 0 <= self.level <= 9:
            raise ValueError(f"level must be 0..9, got {self.level}")
        self.reports = 0

    def open_disk(self, dev: DeviceState) -> Storage:
        m = dev.medium
        return FileStorage(m.target, m.size, readonly=m.access == "ro")

    def statistics(self) -> dict[str, int | float | str]:
        self.reports += 1
        counts = {} if self.reports <= 2 else {"g1/xvda.imports": 7}
        return {"imports": counts["g1/xvda.imports"]}
"""


def line_of(source: str, text: str) -> int:
    """The number of the (only) line of ``source`` that contains ``text``."""
    (n,) = [i for i, line in enumerate(source.splitlines(), 1) if text in line]
    return n


@pytest.mark.timeout(30)
def test_a_statistics_that_raises_is_answered_with_its_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """["report"] to a backend whose statistics() raises: ["statistics"] with no values and
    the error, with where in the backend it was raised; the traceback is logged once for
    the same error, and the next answer that works has no error."""
    f = tmp_path / "leveldisk.py"
    f.write_text(LEVEL_DISK)
    ctx: zmq.Context[Any] = zmq.Context()
    peer = Peer(ctx, f"inproc://kernel-{os.getpid()}")
    drv = None
    try:
        with caplog.at_level(logging.INFO, logger=f"isovisor.driver.{NAME}"):
            drv = start_inline(NAME, str(f), {}, ctx, peer.endpoint, f"inproc://{NAME}-stats")
            peer.connect(peer.expect("hello")[1]["endpoint"])
            at = f"{f}:{line_of(LEVEL_DISK, 'counts[')}, in statistics"
            for _ in range(2):
                peer.send("report")
                assert peer.expect("statistics")[1] == {
                    "name": NAME,
                    "pid": os.getpid(),
                    "values": {},
                    "error": f"statistics() raised KeyError: 'g1/xvda.imports' (at {at})",
                }
            peer.send("report")
            assert peer.expect("statistics")[1] == {
                "name": NAME,
                "pid": os.getpid(),
                "values": {"imports": 7},
            }
        failures = [r for r in caplog.records if "statistics() raised" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info is not None, caplog.text
        assert "statistics() answers again" in caplog.text
    finally:
        if drv is not None:
            drv.stop()
        peer.close()
        ctx.term()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"level": 12}, True),  # the backend's own check, in its configure()
        ({"levle": 1}, False),  # the framework's: no frame of the backend's code
    ],
)
def test_a_constructor_that_raises_says_what_and_where(
    tmp_path: Path, options: dict[str, Any], where: bool
) -> None:
    """Inline: HostError with the exception's type and message; its cause's traceback has
    the frame of the backend's code it was raised in (none for the framework's checks)."""
    from drivers.host import HostError, where_in_backend

    f = tmp_path / "leveldisk.py"
    f.write_text(LEVEL_DISK)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with pytest.raises(HostError) as e:
            start_inline(NAME, str(f), options, ctx, "inproc://nobody", f"inproc://{NAME}-ctor")
        if where:
            assert str(e.value) == (
                "the backend's constructor raised ValueError: level must be 0..9, got 12"
            )
            at = f"{f}:{line_of(LEVEL_DISK, 'raise ValueError')}, in configure"
            assert where_in_backend(e.value.__cause__) == at  # type: ignore[arg-type]
        else:
            assert str(e.value).startswith(
                "the backend's constructor raised ValueError: unknown block backend "
                "option(s) levle (did you mean level?); allowed: "
            ), e.value
            assert where_in_backend(e.value.__cause__) == ""  # type: ignore[arg-type]
    finally:
        ctx.term()


NOT_SWAPPABLE = """\
class Backend:
    def __init__(self, host, options):
        host.log.info("a backend without hot swap")

    def attach(self, dev): ...
    def detach(self, key): ...
    def fe_state(self, key, state): ...
    def kick(self, key): ...
    def close(self): ...
"""


@pytest.mark.timeout(30)
def test_a_start_failure_is_reported_with_where_and_the_traceback(harness: Harness) -> None:
    """``--report FILE``: a process whose backend's constructor raises exits with status 2
    and writes {error, where, traceback} there; its log says the same, with the
    traceback."""
    f = harness.tmp / "leveldisk.py"
    f.write_text(LEVEL_DISK)
    report = harness.tmp / "report.json"
    d = harness.start("--module", str(f), "--options", '{"level": 12}', "--report", str(report))
    assert d.wait() == 2
    got = json.loads(report.read_text())
    error = "the backend's constructor raised ValueError: level must be 0..9, got 12"
    at = f"{f}:{line_of(LEVEL_DISK, 'raise ValueError')}, in configure"
    assert (got["error"], got["where"]) == (error, at), got
    assert got["traceback"].startswith("Traceback (most recent call last):\n"), got
    assert got["traceback"].endswith("ValueError: level must be 0..9, got 12\n"), got
    assert f'File "{f}", line' in got["traceback"]
    assert f"driver {NAME} could not start: {error} (at {at})\nTraceback" in d.log()


@pytest.mark.timeout(30)
def test_report_does_not_require_hot_swap_but_swappable_does(harness: Harness) -> None:
    """Every supervised instance gets ``--report``; only a hot swap's new implementation
    (``--swappable``) must also have save, suspend and restore."""
    f = harness.tmp / "plain.py"
    f.write_text(NOT_SWAPPABLE)
    report = harness.tmp / "report.json"
    d, _ = harness.start_active("--module", str(f), "--report", str(report))
    assert d.proc.poll() is None and not report.exists()
    d = harness.start("--module", str(f), "--report", str(report), "--swappable")
    assert d.wait() == 2
    assert json.loads(report.read_text())["error"] == (
        f"{f}:Backend does not implement the backend interface: it has no save, suspend, "
        "restore (subclass the drivers.sdk class of its device: BlockBackend, NetBackend or "
        "ConsoleBackend; see docs/sdk.md)"
    )


# --- doorbells --------------------------------------------------------------------------------

ECHO_BACKEND = '''
import os


class Backend:
    """Notifies a device's frontend once per kick, and counts the kicks."""

    def __init__(self, host, options):
        self.host = host

    def attach(self, dev):
        assert "doorbells" not in dev, dev  # the host takes the flag
        fd = dev.get("segment_fd")  # open while attach() runs: report its size (-1: none)
        size = -1 if fd is None else os.fstat(fd).st_size
        self.host.store_write(f"/driver/{self.host.name}/{dev['key']}", str(size))

    def detach(self, key):
        pass

    def fe_state(self, key, state):
        pass

    def kick(self, key):
        self.host.notify(key)

    def close(self):
        pass
'''


def memfd(tag: str, size: int = 4096) -> tuple[int, str]:
    """A stand-in for a device's segment: an anonymous file of ``size`` bytes, and its name
    (unique to this test run)."""
    name = f"ivseg-{os.getpid()}-{tag}"
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, name


def copies(pid: int, name: str) -> int:
    """How many descriptors process ``pid`` holds on memfd ``name``."""
    n = 0
    for entry in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(entry.path) == f"/memfd:{name} (deleted)"
    return n


def stored(peer: Peer, path: str) -> list[str]:
    """Every value the driver wrote to ``path`` so far (messages already taken)."""
    return [m[2] for _, m in peer.seen if m[0] == "store" and m[1] == path]


def rang(fd: int, timeout: float = WAIT) -> int:
    """Wait until eventfd ``fd`` rings; how many times it rang."""
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"eventfd {fd} did not ring within {timeout}s"
    return doorbell.take(fd)


def synced(peer: Peer, token: int) -> None:
    """A full round of the driver's loop since every message before this one."""
    peer.send("sync", token)
    while peer.expect("synced")[1]["token"] != token:
        pass


@pytest.mark.timeout(30)
def test_doorbells_carry_kicks_and_notifications_without_zeromq(harness: Harness) -> None:
    """A driver connects to the kernel's doorbell socket (beside the kernel endpoint, named
    from it) and says who it is before its hello; an attach that says ``doorbells`` finds the
    device's two eventfds queued there: a ring of the kick eventfd makes the backend's kick()
    run, and its notify() rings the notify eventfd, with no ZeroMQ message either way.  After
    the detach the driver no longer listens to that kick eventfd.  The device's segment comes
    with the eventfds: the backend's attach() finds it open as ``segment_fd``, and the host
    closes its copy once attach() returned."""
    listener = doorbell.listen(str(harness.tmp / "kernel.fds"))
    backend = harness.tmp / "echo.py"
    backend.write_text(ECHO_BACKEND)
    kick, notify = doorbell.make(), doorbell.make()
    seg, seg_name = memfd("echo", 3 * 4096)
    try:
        d = harness.start("--module", str(backend))
        hello = harness.peer.expect("hello")[1]
        harness.peer.connect(hello["endpoint"])
        listener.settimeout(WAIT)
        conn, _ = listener.accept()  # made before the hello: already waiting
        conn.settimeout(WAIT)
        assert doorbell.parse_hello(conn.recv(doorbell.MAX_MESSAGE)) == f"{NAME}:{d.proc.pid}"
        doorbell.send_bells(conn, 7, kick, notify, seg)
        harness.peer.send("attach", {"key": 7, "doorbells": True})
        assert rang(notify) == 1  # the host looks at a device once when it takes its bells
        for _ in range(3):
            doorbell.ring(kick)
            assert rang(notify) == 1
        synced(harness.peer, 1)
        assert "notify" not in harness.peer.kinds()
        assert stored(harness.peer, f"/driver/{NAME}/7") == [str(3 * 4096)]
        assert copies(d.proc.pid, seg_name) == 0
        harness.peer.send("detach", 7)
        synced(harness.peer, 2)
        doorbell.ring(kick)
        synced(harness.peer, 3)
        assert doorbell.take(notify) == 0
        assert doorbell.take(kick) == 1  # nobody took it: the driver closed its copy
        conn.close()
    finally:
        listener.close()
        for fd in (kick, notify, seg):
            os.close(fd)
    assert d.proc.poll() is None


@pytest.mark.timeout(30)
def test_a_busy_polling_driver_serves_every_kick_and_sleeps_when_idle(harness: Harness) -> None:
    """With ``ISOVISOR_DRIVER_POLL_US`` the loop polls without sleeping for a while after a
    round that served a kick: every one of 300 kicks is served, whether it came during a
    window or after it, and once the kicks stop the process sleeps: over the next five
    heartbeats (40 ms apart) it uses a small part of one CPU, not the whole of it."""
    listener = doorbell.listen(str(harness.tmp / "kernel.fds"))
    backend = harness.tmp / "echo.py"
    backend.write_text(ECHO_BACKEND)
    kick, notify = doorbell.make(), doorbell.make()
    seg, _ = memfd("poll")
    try:
        poll = {"ISOVISOR_DRIVER_POLL_US": "50000"}
        d = harness.start("--module", str(backend), "--watchdog-ms", "160", env=poll)
        proc = psutil.Process(d.proc.pid)
        harness.peer.connect(harness.peer.expect("hello")[1]["endpoint"])
        listener.settimeout(WAIT)
        conn, _ = listener.accept()
        conn.settimeout(WAIT)
        conn.recv(doorbell.MAX_MESSAGE)
        doorbell.send_bells(conn, 7, kick, notify, seg)
        harness.peer.send("attach", {"key": 7, "doorbells": True})
        assert rang(notify) == 1
        for _ in range(300):
            doorbell.ring(kick)
            assert rang(notify) == 1
        harness.peer.expect("heartbeat")
        t0, wall0 = sum(proc.cpu_times()[:2]), time.monotonic()
        for _ in range(5):
            harness.peer.expect("heartbeat")
        idle = (sum(proc.cpu_times()[:2]) - t0) / (time.monotonic() - wall0)
        assert idle < 0.2, f"{idle:.0%} of a CPU without a kick"
        conn.close()
    finally:
        listener.close()
        for fd in (kick, notify, seg):
            os.close(fd)


@pytest.mark.timeout(30)
def test_without_a_doorbell_socket_kicks_and_notifications_go_over_zeromq(
    harness: Harness,
) -> None:
    """No kernel listens for doorbells: the driver says so in its log and serves ``kick``
    messages with ``notify`` messages, as before."""
    backend = harness.tmp / "echo.py"
    backend.write_text(ECHO_BACKEND)
    d = harness.start("--module", str(backend))
    harness.peer.connect(harness.peer.expect("hello")[1]["endpoint"])
    harness.peer.send("attach", {"key": 3})
    harness.peer.send("kick", 3)
    assert harness.peer.expect("notify") == ["notify", 3]
    assert stored(harness.peer, f"/driver/{NAME}/3") == ["-1"]  # no segment_fd: by name
    assert "no doorbells" in d.log() and "kernel.fds" in d.log()


@pytest.mark.timeout(30)
def test_the_host_closes_every_segment_descriptor_it_is_handed(tmp_path: Path) -> None:
    """An inline host (in this process, so its descriptors are counted here): the segment
    descriptor of an attach is closed when the backend's attach() returns, on a first attach
    and on a re-attach; one that came for an attach never handled is closed when another for
    the same device replaces it, when the device is detached, and when the host stops."""
    sock_dir = Path(tempfile.mkdtemp(prefix="ivfds-", dir="/tmp"))  # ipc:// paths are short
    backend = tmp_path / "echo.py"
    backend.write_text(ECHO_BACKEND)
    ctx: zmq.Context[Any] = zmq.Context()
    peer = Peer(ctx, f"ipc://{sock_dir}/kernel.sock")
    bells = doorbell.path_for(peer.endpoint)
    assert bells is not None
    listener = doorbell.listen(bells)
    kick, notify = doorbell.make(), doorbell.make()
    segs = {tag: memfd(f"own-{tag}", (i + 1) * 4096) for i, tag in enumerate("ABCDE")}
    me = os.getpid()
    drv = None
    conn = None
    try:
        drv = start_inline(
            NAME,
            str(backend),
            {},
            ctx,
            peer.endpoint,
            f"ipc://{sock_dir}/driver.sock",
            bells=bells,
        )
        peer.connect(peer.expect("hello")[1]["endpoint"])
        listener.settimeout(WAIT)
        conn, _ = listener.accept()
        conn.settimeout(WAIT)
        conn.recv(doorbell.MAX_MESSAGE)

        def bell(key: int, tag: str) -> None:
            doorbell.send_bells(conn, key, kick, notify, segs[tag][0])

        def held(tag: str) -> int:  # the host's copies (this test holds one of each)
            return copies(me, segs[tag][1]) - 1

        bell(7, "A")
        peer.send("attach", {"key": 7, "doorbells": True})
        synced(peer, 1)
        assert stored(peer, f"/driver/{NAME}/7") == [str(4096)]
        assert held("A") == 0  # closed once attach() returned
        bell(9, "B")  # for an attach that never comes ...
        bell(7, "C")  # ... read with these, for a re-attach of 7
        peer.send("attach", {"key": 7, "doorbells": True})
        synced(peer, 2)
        assert stored(peer, f"/driver/{NAME}/7") == [str(4096), str(3 * 4096)]
        assert (held("B"), held("C")) == (1, 0)  # B parked, C closed after attach()
        bell(9, "D")  # replaces B, unused
        bell(7, "E")
        peer.send("attach", {"key": 7, "doorbells": True})
        synced(peer, 3)
        assert (held("B"), held("D"), held("E")) == (0, 1, 0)
        peer.send("detach", 9)  # never attached: what came for it is closed
        synced(peer, 4)
        assert held("D") == 0
        bell(11, "B")
        bell(7, "A")
        peer.send("attach", {"key": 7, "doorbells": True})
        synced(peer, 5)
        assert (held("A"), held("B")) == (0, 1)
        drv.stop()
        assert not drv.alive
        assert held("B") == 0  # the host stopped: nothing of it is left
        assert all(held(tag) == 0 for tag in segs)
    finally:
        if drv is not None:
            drv.stop()
        if conn is not None:
            conn.close()
        listener.close()
        peer.close()
        ctx.term()
        for fd in (kick, notify, *(fd for fd, _ in segs.values())):
            os.close(fd)
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.timeout(60)
def test_a_driver_process_maps_its_region_from_the_descriptor_alone(harness: Harness) -> None:
    """The entropy driver as its own process, handed a device whose segment has no name any
    more (unlinked from /dev/shm after the kernel's side opened it): it maps the region from
    the descriptor that came with the doorbells, takes the handshake and answers a request
    with random bytes in the guest's memory, which only a mapping of that segment can put
    there.  Mapping by name would have failed: the attach would be refused."""
    listener = doorbell.listen(str(harness.tmp / "kernel.fds"))
    seg = Segment(f"isovisor.test-{NAME}.{os.getpid()}.rng", rng.SEGMENT_BYTES, create=True)
    kick, notify = doorbell.make(), doorbell.make()
    mem = memoryview(seg.buf)
    store = f"/driver/{NAME}/rng/1/0"
    front: FrontRing | None = None
    conn: socket.socket | None = None
    try:
        seg_fd = seg.open_fd()
        seg.unlink()
        assert not seg.path.exists()
        front = FrontRing(
            mem[: HEADER_BYTES + rng.RING_SLOTS * rng.SLOT_SIZE], rng.RING_SLOTS, rng.SLOT_SIZE
        )
        d, _ = harness.start_active("--module", "drivers.rng")
        listener.settimeout(WAIT)
        conn, _ = listener.accept()
        conn.settimeout(WAIT)
        conn.recv(doorbell.MAX_MESSAGE)
        doorbell.send_bells(conn, 7, kick, notify, seg_fd)
        os.close(seg_fd)  # in flight: the driver's copy
        attach = {
            "key": 7,
            "domid": 1,
            "domain": "g",
            "vdev": "rng0",
            "devid": 0,
            "segment": seg.name,
            "window": rng.WINDOW_BYTES,
            "inflight_offset": rng.INFLIGHT_OFFSET,
            "store": store,
            "scratch": "",
            "class": "rng",
            "doorbells": True,
        }
        harness.peer.send("attach", attach)

        def state() -> str:
            msg = harness.peer.expect("store")
            while msg[1] != f"{store}/state":
                msg = harness.peer.expect("store")
            return str(msg[2])

        assert state() == str(int(DevState.INIT_WAIT)), d.log()
        harness.peer.send("fe_state", 7, int(DevState.INITIALISED))
        assert state() == str(int(DevState.CONNECTED)), d.log()
        off = rng.DATA_OFFSET + 5 * rng.MAX_REQUEST_BYTES
        front.put_request(rng.REQUEST.pack(1, off, 200))
        front.push_requests()
        doorbell.ring(kick)
        assert rang(notify) >= 1
        assert front.unconsumed_responses()
        rid, status, _, length = rng.RESPONSE.unpack_from(front.get_response())
        assert (rid, status, length) == (1, 0, 200)
        assert len(set(mem[off : off + 200])) > 50  # random bytes, written through the fd
        assert "error" not in harness.peer.kinds()
        assert "(region mapped from its descriptor)" in d.log()
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        for fd in (kick, notify):
            os.close(fd)
        front = None  # its views of the segment
        gc.collect()
        mem.release()
        seg.close()
        seg.unlink()


def test_a_doorbell_message_of_another_shape_is_refused_and_its_descriptors_closed() -> None:
    """What a driver reads on its doorbell connection is checked: a message that is not
    ``["bells", key]`` with exactly three descriptors (kick, notify, segment) raises ValueError
    naming it, and the descriptors that came with it are closed, not leaked: a key that is not
    an integer, two descriptors (the hand-over before the segment came with it), four."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = doorbell.make()
    try:
        assert doorbell.receive_bells(b) is None  # nothing waiting: no blocking
        for data, fds in (
            (["bells", "x"], [fd]),
            (["bells", 5], [fd, fd]),
            (["bells", 5], [fd, fd, fd, fd]),
            (["bells", True], [fd, fd, fd]),
        ):
            socket.send_fds(a, [msgpack.packb(data)], fds)
            before = len(os.listdir("/proc/self/fd"))
            with pytest.raises(
                ValueError, match=rf"malformed doorbell message .* with {len(fds)} desc"
            ):
                doorbell.receive_bells(b)
            assert len(os.listdir("/proc/self/fd")) == before
        doorbell.send_bells(a, 5, fd, fd, fd)
        key, k, n, g = doorbell.receive_bells(b) or (0, -1, -1, -1)
        assert key == 5 and os.path.samestat(os.fstat(k), os.fstat(fd))
        doorbell.ring(fd)
        assert doorbell.take(n) == 1  # one eventfd, four descriptors
        for mine in (k, n, g):
            os.close(mine)
        a.close()
        with pytest.raises(ConnectionError, match="closed the doorbell connection"):
            doorbell.receive_bells(b)
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_the_segment_comes_with_the_bells_and_maps_the_bytes_the_kernel_wrote() -> None:
    """The kernel's side: a segment made by name and a descriptor on it (``open_fd``), sent
    with the two eventfds; the driver's side maps the descriptor it receives (``from_fd``)
    and sees what the kernel wrote, and the kernel sees what it writes: one segment.  Mapped
    from the descriptor, it needs no name under /dev/shm: it is unlinked before."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kick, notify = doorbell.make(), doorbell.make()
    seg = Segment(f"isovisor.test-bells.{os.getpid()}", 3 * 4096, create=True)
    mapped: Segment | None = None
    try:
        seg.buf[100:105] = b"hello"
        seg_fd = seg.open_fd()
        try:
            doorbell.send_bells(a, 9, kick, notify, seg_fd)
        finally:
            os.close(seg_fd)  # the kernel's copy: the one in flight is the driver's
        seg.unlink()
        got = doorbell.receive_bells(b)
        assert got is not None and got[0] == 9
        _, k, n, g = got
        try:
            mapped = Segment.from_fd(g, seg.name)
        finally:
            for mine in (k, n, g):
                os.close(mine)  # the mapping outlives its descriptor
        assert mapped.size == 3 * 4096 and mapped.name == seg.name
        assert bytes(mapped.buf[100:105]) == b"hello"
        mapped.buf[4096:4099] = b"ack"
        assert bytes(seg.buf[4096:4099]) == b"ack"
        with pytest.raises(SegmentError, match="cannot open shared-memory segment"):
            seg.open_fd()  # its name is gone: only a descriptor reaches it now
    finally:
        if mapped is not None:
            mapped.close()
        seg.close()
        seg.unlink()
        for fd in (kick, notify):
            os.close(fd)
        a.close()
        b.close()


def test_a_segment_descriptor_that_cannot_be_a_region_is_refused_clearly() -> None:
    """``Segment.from_fd`` says what is wrong with a descriptor rather than mapping it: not a
    regular file, read-only, empty, closed.  The caller's descriptor stays open."""
    ev = doorbell.make()
    empty, _ = memfd("empty", 0)
    seg = Segment(f"isovisor.test-bells-ro.{os.getpid()}", 4096, create=True)
    ro = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd, why in (
            (ev, "not a regular file"),
            (ro, "not open for reading and writing"),
            (empty, "it is empty"),
        ):
            with pytest.raises(SegmentError, match=rf"cannot map .*descriptor {fd}\): {why}"):
                Segment.from_fd(fd, "dev")
            os.fstat(fd)  # still open
        with pytest.raises(SegmentError, match="invalid shared-memory name"):
            Segment.from_fd(ro, "../etc/passwd")
    finally:
        for fd in (ev, empty, ro):
            os.close(fd)
        seg.close()
        seg.unlink()


def test_doorbell_path_sits_beside_an_ipc_endpoint_and_is_never_longer() -> None:
    ep = "ipc:///tmp/run/kernel-drivers.sock"
    assert doorbell.path_for(ep) == "/tmp/run/kernel-drivers.fds"
    assert len(doorbell.path_for(ep) or "") < len(ep) - len("ipc://")
    assert doorbell.path_for("inproc://kernel-drivers") is None
    assert doorbell.path_for("tcp://127.0.0.1:5555") is None
