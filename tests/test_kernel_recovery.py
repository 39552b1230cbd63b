"""The kernel's side of driver recovery (docs/recovery.md), against drivers played by the test.

A real kernel process runs real guests (blkstress, blkprobe under unicorn); the block driver is a
thread of this test speaking the driver protocol by hand (hello, store writes, a small in-memory
block server over the real rings and in-flight log), so every step of a driver's death and
replacement happens exactly when the test says.  A few checks of pure logic run in-process with
a fake clock.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import zmq

from devices.vbd import CLASS as VBD
from domains.config import DomainConfig
from ipc import blkif, consif
from ipc.blkif import (
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    STATUS_ERROR,
    STATUS_OKAY,
    RequestError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from ipc.consif import ConsoleBack
from ipc.control import Client, ControlError, ServerUnreachable
from ipc.events import Subscriber, subscribe
from ipc.ring import BackRing, FrontRing, InflightLog, RingError, inflight_bytes, ring_bytes
from ipc.shm import Segment
from kernel import abi
from kernel.drivers import DriverLink, Malformed, parse_hello
from kernel.failover import NOTIFY_FLOOD_PER_S, Recovery, answer_with_errors
from tests.conftest import wait_until as poll_until

ROOT = Path(__file__).resolve().parent.parent
RING_BYTES = ring_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)
INFLIGHT_BYTES = inflight_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)
WAIT = 20.0
_MASK = (1 << 64) - 1


# --- a kernel process --------------------------------------------------------------------------


@dataclass
class Kernel:
    """One kernel process in a private directory, and the fake drivers talking to it."""

    dir: Path
    prefix: str
    proc: subprocess.Popen[bytes] | None = None
    drivers: list[FakeDriver] = field(default_factory=list)
    #: More arguments for ``python -m kernel`` (a test's ``kernel_args`` marker).
    args: tuple[str, ...] = ()

    @property
    def control(self) -> str:
        return f"ipc://{self.dir}/k.sock"

    @property
    def events(self) -> str:
        return f"ipc://{self.dir}/ev.sock"

    @property
    def driver_endpoint(self) -> str:
        return f"ipc://{self.dir}/drv.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "kernel.log"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "kernel",
            "--control",
            self.control,
            "--events",
            self.events,
            "--drivers",
            self.driver_endpoint,
            "--shm-prefix",
            self.prefix,
            "--pcpus",
            "2",
            "--parent-pid",
            str(os.getpid()),
            *self.args,
        ]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        deadline = time.monotonic() + WAIT
        while True:
            assert self.proc.poll() is None, f"kernel exited at start:\n{self.log()}"
            try:
                self.call("ping", timeout=0.5)
                return
            except ServerUnreachable:
                assert time.monotonic() < deadline, f"kernel did not answer:\n{self.log()}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def call(self, command: str, timeout: float = 10.0, **props: Any) -> dict[str, Any]:
        with Client(self.control, timeout=timeout) as c:
            return c.call(command, **props)

    def subscribe(self, topics: list[str]) -> Events:
        with Client(self.control, timeout=10) as c:
            return Events(subscribe(self.events, topics, c))

    def driver(self, name: str, pid: int, **kw: Any) -> FakeDriver:
        """Start a fake driver instance; returns once the kernel has its hello."""
        drv = FakeDriver(self, name, pid, **kw)
        self.drivers.append(drv)
        drv.start()
        wait_until(
            lambda: (self.driver_row(name) or {}).get("pid") == pid,
            f"driver {name} (pid {pid}) connected",
        )
        return drv

    def create(self, name: str, image: str, extra: str, backend: str, size: str = "4M") -> None:
        data = {
            "name": name,
            "image": image,
            "memory": 8,
            "on_poweroff": "preserve",
            "on_crash": "preserve",
            "extra": extra,
            "disk": [f"vdev=xvda, backend={backend}, type=memory, size={size}"],
        }
        cfg = DomainConfig.from_dict(data, str(self.dir / f"{name}.toml"), base_dir=self.dir)
        self.call("create", config=cfg.to_wire())

    def console(self, name: str) -> str:
        return self.call("console", name=name)["data"].decode()

    def device(self, domain: str) -> dict[str, Any]:
        (dev,) = [d for d in self.call("devices")["devices"] if d["domain"] == domain]
        return dev

    def driver_row(self, name: str) -> dict[str, Any] | None:
        rows = {r["name"]: r for r in self.call("drivers")["drivers"]}
        return rows.get(name)

    def stop(self) -> bool:
        """Stop the drivers and the kernel; True if the kernel shut down by itself."""
        for drv in self.drivers:
            drv.stop()
        clean = False
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ControlError):
                self.call("shutdown", timeout=5)
            try:
                self.proc.wait(20)
                clean = True
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        return clean


@pytest.fixture
def kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    d = Path(tempfile.mkdtemp(prefix="krt-", dir="/tmp"))
    marker = request.node.get_closest_marker("kernel_args")
    k = Kernel(
        dir=d,
        prefix=f"isovisor-krt.{os.getpid()}.{d.name}.",
        args=tuple(marker.args) if marker else (),
    )
    try:
        k.start()
        yield k
    finally:
        clean = k.stop()
        log = k.log()
        left = sorted(p.name for p in Path("/dev/shm").glob(k.prefix + "*"))
        for name in left:
            (Path("/dev/shm") / name).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
        assert not clean or not left, f"shared-memory segments left behind: {left}"
        assert "Traceback" not in log, f"the kernel logged an exception:\n{log}"


class Events:
    """A subscription that remembers every event it has taken."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sub.close()

    def wait(self, topic: str, timeout: float = WAIT, **match: Any) -> dict[str, Any]:
        """The first event on ``topic`` whose payload has ``match`` (seen before, or next)."""
        for t, p in self.seen:
            if t == topic and all(p.get(k) == v for k, v in match.items()):
                return p
        deadline = time.monotonic() + timeout
        while True:
            ev = self.sub.recv(max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise AssertionError(
                    f"no {topic} {match} within {timeout}s; saw {[t for t, _ in self.seen]}"
                )
            self.seen.append(ev)
            if ev[0] == topic and all(ev[1].get(k) == v for k, v in match.items()):
                return ev[1]

    def drain(self) -> None:
        while (ev := self.sub.recv(0)) is not None:
            self.seen.append(ev)

    def count(self, topic: str) -> int:
        return sum(t == topic for t, _ in self.seen)


def wait_until(pred: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """conftest.wait_until, polling every 20 ms (heartbeat ages change within 100s of ms)."""
    return poll_until(pred, timeout=timeout, what=what, interval=0.02)


def summary(console: str) -> dict[str, int]:
    line = [ln for ln in console.splitlines() if ln.startswith("blkstress: ops=")]
    assert line, f"no blkstress summary line in:\n{console}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line[-1])}


# --- a driver played by the test ----------------------------------------------------------------


@dataclass(eq=False)
class FakeDevice:
    key: int
    store: str
    segment: Segment
    disk: bytearray
    mem: memoryview
    ring: BackRing | None = None
    journal: InflightLog | None = None
    records_at_connect: int | None = None
    #: A console device (attach class "console"): its rings once connected, and what it took.
    is_console: bool = False
    console: ConsoleBack | None = None
    output: bytearray = field(default_factory=bytearray)

    def close(self) -> None:
        self.ring = self.journal = self.console = None
        self.mem.release()
        with contextlib.suppress(BufferError):
            self.segment.close()


class FakeDriver:
    """A driver instance in a thread of the test: it binds its own endpoint, says hello, keeps
    every message it gets, runs the backend handshake, and serves rings from an in-memory disk
    (``disks``, shared with its successors) unless told to ``stall`` (take that many requests
    into the in-flight log and never answer) or it is ``paused`` (it ignores kicks; a console's
    output stays in its ring); ``bad_ids`` answers with response ids that match no request.
    A console device's output it takes into ``FakeDevice.output``; with ``lose_wakeups`` it
    never notifies the guest that room came (as an instance killed between consuming and
    notifying would), and with ``quiet`` it resumes a console without writing its backend state
    (each write raises the guest's port)."""

    def __init__(
        self,
        kernel: Kernel,
        name: str,
        pid: int,
        *,
        disks: dict[str, bytearray] | None = None,
        stall: int | None = None,
        hello: dict[str, Any] | None = None,
        bad_ids: bool = False,
        spare: bool = False,
        restore: str = "ok",
        lose_wakeups: bool = False,
        quiet: bool = False,
        paused: bool = False,
    ) -> None:
        self.kernel = kernel
        self.name = name
        self.pid = pid
        self.endpoint = f"ipc://{kernel.dir}/drv-{name}.{pid}.sock"
        self.disks = {} if disks is None else disks
        self.stall = stall
        self.bad_ids = bad_ids
        self.lose_wakeups = lose_wakeups
        self.quiet = quiet
        self.hello_extra = hello or {}
        self.paused = paused
        #: A hot swap's new instance: says "spare" and waits for ["restore", state].
        self.spare = spare
        #: What it does with a restore: "ok", "fail" (restore_failed) or "ignore" (hangs).
        self.restore_mode = restore
        self.drained = False
        self.saved = {"saved_by": pid, "devices": 0}
        self.messages: list[list[Any]] = []
        self.devices: dict[int, FakeDevice] = {}
        self.cond = threading.Condition()
        self._outbox: queue.SimpleQueue[bytes | Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._push: zmq.Socket[Any] | None = None
        self.thread = threading.Thread(target=self._main, name=f"fake-{name}", daemon=True)

    # -- the test's side ---------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()
        assert self._ready.wait(WAIT), "fake driver did not start"

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(WAIT)

    def send(self, msg: list[Any] | bytes) -> None:
        """Send a message to the kernel (raw bytes as they are)."""
        self._outbox.put(msg if isinstance(msg, bytes) else msgpack.packb(msg))

    def run(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the driver's thread and wait for it."""
        done = threading.Event()

        def call() -> None:
            try:
                fn()
            finally:
                done.set()

        self._outbox.put(call)
        assert done.wait(WAIT), "the fake driver's thread did not run the call"

    def wait_for(
        self, pred: Callable[[list[list[Any]]], Any], what: str, timeout: float = WAIT
    ) -> Any:
        with self.cond:
            val = self.cond.wait_for(lambda: pred(self.messages) or self._error, timeout)
        assert self._error is None, f"fake driver failed: {self._error!r}"
        assert val, f"{what}: not received within {timeout}s; got {self.messages[-8:]!r}"
        return val

    # -- the driver's thread --------------------------------------------------------------------
    def _main(self) -> None:
        ctx = zmq.Context.instance()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.LINGER, 2000)
        self._push = push
        try:
            pull.bind(self.endpoint)
            push.connect(self.kernel.driver_endpoint)
            self._send(
                [
                    "spare" if self.spare else "hello",
                    {
                        "name": self.name,
                        "pid": self.pid,
                        "endpoint": self.endpoint,
                        "module": "tests.fake",
                        **({} if self.spare else self.hello_extra),
                    },
                ]
            )
            self._ready.set()
            while not self._stop.is_set():
                self._flush_outbox()
                if pull.poll(10):
                    while True:
                        try:
                            raw = pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(msgpack.unpackb(raw))
        except BaseException as e:  # reported to the test by wait_for
            self._error = e
            with self.cond:
                self.cond.notify_all()
        finally:
            self._ready.set()
            for dev in self.devices.values():
                dev.close()
            self.devices.clear()
            pull.close(0)
            push.close()

    def _flush_outbox(self) -> None:
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            if callable(item):
                item()
            else:
                assert self._push is not None
                self._push.send(item)

    def _send(self, msg: list[Any]) -> None:
        assert self._push is not None
        self._push.send(msgpack.packb(msg))

    def _handle(self, msg: list[Any]) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()
        kind = msg[0]
        me = {"name": self.name, "pid": self.pid}
        if kind == "drain":
            for dev in self.devices.values():
                dev.close()
            self.devices.clear()
            self.drained = True
            self.saved = {"saved_by": self.pid, "devices": len(self.disks)}
            self._send(["saved", {**me, "state": self.saved}])
        elif kind == "restore" and self.restore_mode == "fail":
            self._send(
                [
                    "restore_failed",
                    {
                        **me,
                        "error": "StateError: refused on purpose",
                        "traceback": "Traceback: fake",
                    },
                ]
            )
        elif kind == "restore" and self.restore_mode == "ok":
            self.drained = self.spare = False
            self._send(["restored", {**me, "state": {"saved_by": self.pid, "restored": msg[1]}}])
            self._send(
                [
                    "hello",
                    {**me, "endpoint": self.endpoint, "module": "tests.fake", **self.hello_extra},
                ]
            )
        elif self.drained or self.spare:
            return
        elif kind == "attach":
            self._attach(msg[1])
        elif kind == "detach":
            dev = self.devices.pop(msg[1], None)
            if dev is not None:
                dev.close()
        elif kind == "fe_state" and msg[1] in self.devices:
            dev = self.devices[msg[1]]
            if msg[2] == 3 or (msg[2] == 4 and dev.ring is None and dev.console is None):
                self._connect(dev, resume=msg[2] == 4)
        elif kind == "kick" and msg[1] in self.devices and not self.paused:
            self.serve(self.devices[msg[1]])

    def _attach(self, a: dict[str, Any]) -> None:
        old = self.devices.pop(a["key"], None)
        if old is not None:
            old.close()
        if a["class"] == consif.CLASS_NAME:
            seg = Segment(a["segment"], 0, create=False)
            dev = FakeDevice(
                a["key"], a["store"], seg, bytearray(), memoryview(seg.buf), is_console=True
            )
            self.devices[dev.key] = dev
            if not self.quiet:
                self._send(["store", f"{dev.store}/state", "2"])
            return
        disk = self.disks.setdefault(a["disk"]["target"], bytearray(a["disk"]["size"]))
        seg = Segment(a["segment"], 0, create=False)
        dev = FakeDevice(a["key"], a["store"], seg, disk, memoryview(seg.buf))
        self.devices[dev.key] = dev
        for k, v in (
            ("sectors", str(len(disk) // 512)),
            ("sector-size", "512"),
            ("info", "0"),
            ("feature-flush-cache", "1"),
            ("feature-discard", "1"),
            ("state", "2"),
        ):
            self._send(["store", f"{dev.store}/{k}", v])

    def _connect(self, dev: FakeDevice, *, resume: bool) -> None:
        if dev.is_console:
            dev.console = ConsoleBack(dev.mem[: consif.WINDOW_BYTES])
            if not (resume and self.quiet):
                self._send(["store", f"{dev.store}/state", "4"])
            if resume:
                self._send(["recovered", dev.key, 0, time.monotonic_ns()])
            self.serve(dev)
            return
        dev.ring = BackRing(dev.mem[:RING_BYTES], blkif.RING_SLOTS, blkif.SLOT_SIZE)
        dev.journal = InflightLog(
            dev.mem[blkif.INFLIGHT_OFFSET : blkif.INFLIGHT_OFFSET + INFLIGHT_BYTES],
            blkif.RING_SLOTS,
            blkif.SLOT_SIZE,
        )
        records = dev.journal.pending()
        dev.records_at_connect = len(records)
        redo = (
            [r for r in records if (r.index - dev.ring.rsp_prod_pvt) & _MASK < blkif.RING_SLOTS]
            if resume
            else []
        )
        for rec in records:
            if rec not in redo:
                dev.journal.end(rec.index)
        self._send(["store", f"{dev.store}/state", "4"])
        if resume:
            dev.ring.req_cons = (dev.ring.rsp_prod_pvt + len(redo)) & _MASK
            for rec in redo:
                dev.ring.put_response(self._perform(dev, rec.request))
            if dev.ring.push_responses():
                self._send(["notify", dev.key])
            for rec in redo:
                dev.journal.end(rec.index)
            self._send(["recovered", dev.key, len(redo), time.monotonic_ns()])
        self.serve(dev)

    def serve(self, dev: FakeDevice) -> None:
        """Answer what the ring holds, then re-arm req_event (or, stalling, take requests
        into the in-flight log and answer nothing)."""
        if dev.console is not None:
            self._take_output(dev, dev.console)
            return
        ring, journal = dev.ring, dev.journal
        if ring is None or journal is None:
            return
        while True:
            taken = []
            while ring.unconsumed_requests():
                if self.stall is not None and len(journal.pending()) >= self.stall:
                    return
                index = ring.req_cons
                raw = ring.get_request()
                journal.begin(index, raw)
                taken.append(index)
                if self.stall is None:
                    rsp = self._perform(dev, raw)
                    if self.bad_ids:  # a buggy driver: the response names no request
                        rsp = (int.from_bytes(rsp[:8], "little") ^ 0xDEAD).to_bytes(
                            8, "little"
                        ) + rsp[8:]
                    ring.put_response(rsp)
            if self.stall is not None:
                return
            if ring.push_responses():
                self._send(["notify", dev.key])
            for index in taken:
                journal.end(index)
            if not ring.final_check_for_requests():
                return

    def _take_output(self, dev: FakeDevice, ring: ConsoleBack) -> None:
        notify = False
        while True:
            n = ring.out_available()
            if n:
                dev.output += ring.out_peek(ring.out_cons, n)
                notify |= ring.out_commit(ring.out_cons + n)
            if not ring.out_final_check():
                break
        if notify and not self.lose_wakeups:
            self._send(["notify", dev.key])

    def serve_all(self) -> None:
        for dev in self.devices.values():
            self.serve(dev)

    @staticmethod
    def _perform(dev: FakeDevice, raw: bytes) -> bytes:
        try:
            req = decode_request(raw, window=blkif.WINDOW_BYTES, sectors=len(dev.disk) // 512)
        except RequestError as e:
            return encode_response(e.id, e.op, e.status)
        pos = req.sector * 512
        for off, length in req.segments:
            if req.op == OP_READ:
                dev.mem[off : off + length] = dev.disk[pos : pos + length]
            elif req.op == OP_WRITE:
                dev.disk[pos : pos + length] = dev.mem[off : off + length]
            pos += length
        if req.op == OP_DISCARD:
            dev.disk[pos : pos + req.nr_sectors * 512] = bytes(req.nr_sectors * 512)
        return encode_response(req.id, req.op, STATUS_OKAY)


def kinds(msgs: list[list[Any]]) -> list[str]:
    return [m[0] for m in msgs]


# --- a driver is replaced while a guest does I/O ----------------------------------------------


@pytest.mark.timeout(60)
def test_a_new_instance_gets_every_device_back_and_the_guest_never_notices(kernel: Kernel) -> None:
    """driver_lost with a stale pid keeps the link; with the right one it drops it, and the
    guest's kicks are dropped (0), not refused; the next hello re-attaches the device with the
    frontend's state, the new instance redoes the request its predecessor died on and resumes
    the ring, the kernel reports it recovered, and the guest finishes without an error."""
    disks: dict[str, bytearray] = {}
    with kernel.subscribe(["driver.blk0.", "device.", "domain.g."]) as ev:
        a = kernel.driver("blk0", 4001, disks=disks)
        first = ev.wait("driver.blk0.replayed", pid=4001)  # no device yet: at once
        assert (first["devices"], first["replayed"]) == (0, 0), first
        kernel.create(
            "g", "blkstress", "ops=3000 qd=8 mix=60 seed=7 blocks=256 timeout=30000", "blk0"
        )
        wait_until(lambda: kernel.device("g")["requests"] > 200, "the guest doing I/O")
        a.run(lambda: setattr(a, "paused", True))  # from now on it serves no kick

        # a late driver_lost for an older instance must not drop this one
        assert kernel.call("driver_lost", name="blk0", pid=9999)["dropped"] is False
        row = kernel.driver_row("blk0")
        assert row is not None and row["connected"] and row["pid"] == 4001, row
        assert kernel.call("driver_lost", name="blk0", pid=4001)["dropped"] is True
        row = kernel.driver_row("blk0")
        assert row is not None and not row["connected"] and row["devices"] == 1, row

        # the dying instance answers what it has; the guest queues more and kicks: dropped
        kicks = kernel.device("g")["kicks"]
        a.run(a.serve_all)
        wait_until(lambda: kernel.device("g")["kicks"] > kicks, "a kick with no driver")

        def die_during_a_request() -> None:  # it takes one of the new requests, then dies
            a.stall = 1
            a.serve_all()

        a.run(die_during_a_request)
        a.stop()
        assert kernel.device("g")["outstanding"] > 0
        assert "HC_EVTCHN_SEND" not in kernel.console("g")  # the kick did not fail

        b = kernel.driver("blk0", 4002, disks=disks)
        got = b.wait_for(lambda m: "fe_state" in kinds(m) and m, "attach and fe_state")
        assert kinds(got)[:2] == ["attach", "fe_state"], got
        assert got[1] == ["fe_state", got[0][1]["key"], 4]  # Connected: the backend resumes
        rec = ev.wait("device.g.xvda.recovered")
        assert rec["driver"] == "blk0" and rec["domid"] == got[0][1]["domid"], rec
        assert rec["replayed"] == 1, rec  # the request the old instance died on, redone
        rep = ev.wait("driver.blk0.replayed", pid=4002)
        assert rep["devices"] == 1 and rep["replayed"] == 1, rep
        assert rep["done_ns"] == rec["done_ns"]
        done = ev.wait("domain.g.shutdown", timeout=40)
    con = kernel.console("g")
    s = summary(con)
    assert done["code"] == 0 and s["errors"] == 0 and s["ops"] == 3000, con
    assert "HC_EVTCHN_SEND" not in con


def console_out_indices(dev: FakeDevice) -> tuple[int, int, int]:
    """A console device's (out_prod, out_cons, out_cons_event), as its page holds them."""
    w = dev.mem[: consif.HEADER_BYTES].cast("Q")
    try:
        return (w[consif.OUT_PROD // 8], w[consif.OUT_CONS // 8], w[consif.OUT_CONS_EVENT // 8])
    finally:
        w.release()


def console_waits_for_room_it_has(dev: FakeDevice) -> bool:
    """The ring is empty and the backend's out_cons has passed the guest's out_cons_event
    ("wake me when out_cons passes this"): with its domain blocked, a guest asleep on a
    wake-up that never came."""
    out_prod, out_cons, asked = console_out_indices(dev)
    return out_prod == out_cons and (out_cons - asked) & _MASK < 1 << 63


@pytest.mark.timeout(60)
@pytest.mark.parametrize("then", ["a new instance", "failing mode"])
def test_a_wakeup_the_dead_instance_owed_is_raised_by_the_kernel(kernel: Kernel, then: str) -> None:
    """A console driver consumes the guest's output and is killed before it notifies: the guest,
    asleep until room comes, would sleep for good, since the ring is empty and neither the next
    instance (one that rewrites no backend state) nor the kernel in failing mode has anything
    to notify for.  The kernel raises the guest's event itself on each device's recovery and
    on failing mode, and the guest prints every line exactly once."""
    lines = 1000  # 61 KB: the kernel's console history (64 KiB) keeps all it takes over
    with kernel.subscribe(["driver.conF.", "device.", "domain.c."]) as ev:
        # Paused: it takes no output on a kick, so the guest fills the ring (2 KiB) and sleeps
        # waiting for room.  A driver taking output as the kicks come may keep pace with the
        # guest, which then prints every line without ever sleeping and powers off: whether
        # the guest ever waited for room was up to the host's scheduler.
        a = kernel.driver("conF", 6001, lose_wakeups=True, paused=True)
        cfg = DomainConfig.from_dict(
            {
                "name": "c",
                "image": "conecho",
                "memory": 4,
                "on_poweroff": "preserve",
                "on_crash": "preserve",
                "extra": f"lines={lines}",
                "console": "conF",
            },
            str(kernel.dir / "c.toml"),
            base_dir=kernel.dir,
        )
        kernel.call("create", config=cfg.to_wire())
        served: list[int] = []  # out_prod when the driver last took the guest's output
        stuck: list[bool] = []

        def take_output_once_asleep(dev: FakeDevice, asleep: bool) -> bool:
            """On the driver's thread: a full ring and its guest asleep (seen before the ring,
            and nothing consumes while paused, so asleep on this ring) -> take it all and
            lose the wake-up (False: look again).  True once the ring is as that left it (the
            guest wrote nothing since) and its guest was seen asleep after it."""
            out_prod, out_cons, _ = console_out_indices(dev)
            if asleep and (out_prod - out_cons) & _MASK == consif.OUT_SIZE:
                a.serve(dev)
                served[:] = [out_prod]
                return False
            return served == [out_prod] and console_waits_for_room_it_has(dev)

        def probe() -> bool:
            # The domain's state first, then the ring: a guest blocked after the driver took
            # its output and with no byte written since sleeps on the wake-up it lost.  (A
            # guest woken by a late event in between writes, fills the ring, sleeps again,
            # and the driver takes that.)
            (dom,) = [d for d in kernel.call("list")["domains"] if d["name"] == "c"]
            asleep = dom["state"][1] == "b"
            stuck.clear()
            a.run(
                lambda: stuck.extend(
                    take_output_once_asleep(d, asleep)
                    for d in a.devices.values()
                    if d.console is not None
                )
            )
            return stuck == [True] and asleep

        wait_until(probe, "the guest asleep on a wake-up the driver never sent")
        taken: list[bytes] = []
        a.run(lambda: taken.extend(bytes(d.output) for d in a.devices.values()))
        a.stop()
        assert kernel.call("driver_lost", name="conF", pid=6001)["dropped"] is True
        if then == "a new instance":
            b = kernel.driver("conF", 6002, quiet=True)
            ev.wait("device.c.console.recovered")
            done = ev.wait("domain.c.shutdown", timeout=40)
            b.run(lambda: taken.extend(bytes(d.output) for d in b.devices.values()))
        else:
            kernel.call("driver_fail", name="conF", reason="restarted too often")
            done = ev.wait("domain.c.shutdown", timeout=40)
            taken.append(kernel.console("c").encode())
    out = b"".join(taken).decode()
    got = [ln for ln in out.splitlines() if ln.startswith("conecho: line ")]
    assert done["code"] == 0, out[-2000:]
    assert got == [
        f"conecho: line {i:09d} abcdefghijklmnopqrstuvwxyz0123456789" for i in range(lines)
    ], (len(got), out[-2000:])
    assert f"conecho: done lines={lines} echoed=0" in out, out[-2000:]


@pytest.mark.timeout(60)
@pytest.mark.kernel_args("--notify-flood", "5000")
def test_a_driver_flooding_notifications_is_reported_and_the_guest_still_runs(
    kernel: Kernel,
) -> None:
    """A connected instance sending ``notify`` for its device as fast as a process can: the
    kernel keeps up, publishes one violation naming the flood, and the guest is unharmed.
    (The threshold is 5,000 a second here, not the default 50,000: how fast a loaded 2-core
    host lets the kernel take notifications is no part of what this test checks.)"""
    a = kernel.driver("blk0", 4101)
    kernel.create("g", "blkstress", "ops=200 qd=4 mix=60 seed=3 blocks=64 timeout=30000", "blk0")
    key = a.wait_for(lambda m: "attach" in kinds(m) and m, "attach")[0][1]["key"]
    a.run(lambda: setattr(a, "paused", True))  # the guest waits for its driver meanwhile
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(kernel.driver_endpoint)
    frames = [b"blk0:4101", msgpack.packb(["notify", key])]
    try:
        with kernel.subscribe(["driver.blk0.", "domain.g."]) as ev:
            deadline = time.monotonic() + 20
            while not ev.count("driver.blk0.violation") and time.monotonic() < deadline:
                for _ in range(2000):
                    push.send_multipart(frames)
                ev.drain()
            v = ev.wait("driver.blk0.violation", timeout=5)
        assert v["pid"] == 4101 and v["reporter"] == "kernel", v
        assert v["reason"].startswith("notification flood: more than 5000 "), v
    finally:
        push.close()
    assert kernel.device("g")["notifies"] > 5_000
    a.run(lambda: setattr(a, "paused", False))
    a.run(a.serve_all)  # the driver still serves: the guest finishes its I/O
    wait_until(lambda: "blkstress: ops=" in kernel.console("g"), "the guest's summary")
    assert summary(kernel.console("g"))["errors"] == 0


@pytest.mark.timeout(60)
def test_many_replacements_leak_no_kernel_sockets(kernel: Kernel) -> None:
    """Each instance has its own endpoint; the kernel's sockets to dead ones get closed."""
    assert kernel.proc is not None
    fd_dir = Path(f"/proc/{kernel.proc.pid}/fd")
    disks: dict[str, bytearray] = {}
    drv = kernel.driver("blkR", 3000, disks=disks)
    kernel.create(
        "r", "blkstress", "ops=1000000 qd=4 mix=50 seed=5 blocks=64 timeout=30000", "blkR"
    )
    fds: list[int] = []
    for i in range(1, 16):
        before = kernel.device("r")["requests"]
        wait_until(lambda b=before: kernel.device("r")["requests"] > b + 20, "guest I/O")
        drv.run(lambda d=drv: setattr(d, "paused", True))
        assert kernel.call("driver_lost", name="blkR", pid=drv.pid)["dropped"]
        drv.run(drv.serve_all)
        drv.stop()
        drv = kernel.driver("blkR", 3000 + i, disks=disks)
        fds.append(len(list(fd_dir.iterdir())))
    assert max(fds[5:]) <= fds[2] + 3, fds
    assert "HC_EVTCHN_SEND" not in kernel.console("r")


# --- commands -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_driver_lost_checks_the_pid_and_driver_inject_checks_its_arguments(kernel: Kernel) -> None:
    a = kernel.driver("blkC", 8001)
    wait_until(lambda: kernel.driver_row("blkC"), "the driver connected")
    assert kernel.call("driver_lost", name="blkC", pid=8000)["dropped"] is False
    row = kernel.driver_row("blkC")
    assert row is not None and row["connected"] and row["pid"] == 8001, row
    assert (row["failing"], row["devices"], row["outstanding"], row["watchdog_ms"]) == (
        False,
        0,
        0,
        0,
    ), row
    assert 0 <= row["last_seen_ms"] < 10_000, row

    with pytest.raises(ControlError) as e:
        kernel.call("driver_inject", name="blkC", kind="meltdown")
    assert "unknown kind 'meltdown'" in str(e.value)
    assert "exit, exception, segv, abort, hang, leak, leak_mem, leak_fd, bad_id" in str(e.value)
    with pytest.raises(ControlError, match="driver 'nosuch' is not connected"):
        kernel.call("driver_inject", name="nosuch", kind="exit")
    with pytest.raises(ControlError, match="needs property 'pid'"):
        kernel.call("driver_lost", name="blkC")
    with pytest.raises(ControlError, match="property 'name' must name a driver"):
        kernel.call("driver_fail", name="", reason="x")
    r = kernel.call("driver_inject", name="blkC", kind="hang")
    assert (r["name"], r["kind"]) == ("blkC", "hang"), r
    # The same path as the supervisor's fault table: a fault, armed to fire at once.
    a.wait_for(lambda m: ["fault", {"type": "hang", "now": True}] in m, "the fault message")
    kernel.call("driver_inject", name="blkC", kind="bad_id")
    a.wait_for(lambda m: ["fault", {"type": "bad_id"}] in m, "a fault for the next request")

    assert kernel.call("driver_lost", name="blkC", pid=8001)["dropped"] is True
    assert kernel.driver_row("blkC") is None  # no link, no device, not failing
    with pytest.raises(ControlError, match="not connected"):
        kernel.call("driver_inject", name="blkC", kind="exit")


# --- hangs ----------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_silent_driver_is_reported_hung_once_per_instance(kernel: Kernel) -> None:
    with kernel.subscribe(["driver.blkH."]) as ev:
        a = kernel.driver("blkH", 7001, hello={"watchdog_ms": 600})
        ev.wait("driver.blkH.ready", pid=7001)

        def last_seen() -> int:
            row = kernel.driver_row("blkH")
            assert row is not None and row["watchdog_ms"] == 600, row
            return int(row["last_seen_ms"])

        wait_until(lambda: last_seen() >= 300, "some silence")
        a.send(["heartbeat", "blkH", 1])  # a heartbeat is a sign of life
        wait_until(lambda: last_seen() < 300, "the heartbeat counted")
        hang = ev.wait("driver.blkH.hang", timeout=5)
        assert hang["pid"] == 7001 and hang["since_ms"] >= 600, hang
        assert "no heartbeat" in hang["reason"] and "watchdog 600 ms" in hang["reason"], hang
        wait_until(lambda: last_seen() >= 1500, "a second watchdog period")
        ev.drain()
        assert ev.count("driver.blkH.hang") == 1, ev.seen  # once per instance
        assert ev.count("driver.blkH.ready") == 1
        # a new instance is watched afresh
        kernel.driver("blkH", 7002, hello={"watchdog_ms": 600})
        hang = ev.wait("driver.blkH.hang", timeout=5, pid=7002)
        assert hang["since_ms"] >= 600, hang


@pytest.mark.timeout(40)
def test_an_unanswered_request_is_a_hang_and_driver_fail_answers_it(kernel: Kernel) -> None:
    """A driver that took no request for longer than its request timeout is reported hung;
    once the supervisor gives up on it (driver_fail) the kernel answers with an error and the
    guest goes on."""
    with kernel.subscribe(["driver.blkT.", "domain.p."]) as ev:
        kernel.driver("blkT", 6001, stall=0, hello={"request_timeout_ms": 400})
        kernel.create("p", "blkprobe", "action=write sector=8 count=1 timeout=0", "blkT")
        hang = ev.wait("driver.blkT.hang")
        assert hang["pid"] == 6001 and hang["since_ms"] >= 400, hang
        assert "xvda has 1 request(s) outstanding" in hang["reason"], hang
        assert "request timeout 400 ms" in hang["reason"], hang
        row = kernel.driver_row("blkT")
        assert row is not None and (row["outstanding"], row["devices"]) == (1, 1), row
        assert "blkprobe: write" not in kernel.console("p")  # still waiting

        r = kernel.call("driver_fail", name="blkT", reason="hung")
        assert r == {**r, "dropped": True, "devices": 1, "answered": 1}, r
        ev.wait("driver.blkT.failing", reason="hung")
        ev.wait("domain.p.shutdown")
    con = kernel.console("p")
    assert "blkprobe: write status=-1" in con and "blkprobe: done" in con, con
    row = kernel.driver_row("blkT")
    assert row is not None and row["failing"] and not row["connected"], row
    assert row["outstanding"] == 0, row


# --- failing mode ---------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_driver_fail_answers_every_request_with_an_error_until_a_new_hello(kernel: Kernel) -> None:
    """Requests the dead driver had taken (in the in-flight log) and those it never saw are
    answered with errors, then every later request on its kick; blkstress finishes with
    errors instead of waiting forever.  A new instance ends it, with the logs cleared."""
    with kernel.subscribe(["driver.blkF.", "domain.s."]) as ev:
        a = kernel.driver("blkF", 5001, stall=3)
        kernel.create(
            "s", "blkstress", "ops=200 qd=8 mix=50 seed=3 blocks=64 timeout=30000", "blkF"
        )
        wait_until(lambda: kernel.device("s")["outstanding"] == 8, "8 requests outstanding")
        taken: list[int] = []
        a.run(
            lambda: taken.extend(
                len(d.journal.pending()) for d in a.devices.values() if d.journal is not None
            )
        )
        assert taken == [3], taken  # 3 taken by the driver, 5 never seen by it
        key = a.wait_for(lambda m: [x[1]["key"] for x in m if x[0] == "attach"], "attach")[0]
        segment = a.wait_for(lambda m: [x[1]["segment"] for x in m if x[0] == "attach"], "attach")[
            0
        ]
        a.stop()
        assert kernel.call("driver_lost", name="blkF", pid=5001)["dropped"] is True

        r = kernel.call("driver_fail", name="blkF", reason="restarted too often")
        assert (r["dropped"], r["devices"], r["answered"]) == (False, 1, 8), r
        assert ev.wait("driver.blkF.failing") == {"reason": "restarted too often"}
        done = ev.wait("domain.s.shutdown", timeout=30)
        con = kernel.console("s")
        s = summary(con)
        assert done["code"] == 1 and s["ops"] == 200 and s["errors"] >= 200, con
        assert "failed: status -1" in con, con
        dev = kernel.device("s")
        assert dev["failed_requests"] >= 200 and dev["outstanding"] == 0, dev
        row = kernel.driver_row("blkF")
        assert (
            row is not None and row["failing"] and row["failing_reason"] == "restarted too often"
        ), row

        # a late write of the dead instance leaves a record behind; the next hello clears it
        stale = Segment(segment, 0, create=False)
        try:
            view = memoryview(stale.buf)
            journal = InflightLog(
                view[blkif.INFLIGHT_OFFSET : blkif.INFLIGHT_OFFSET + INFLIGHT_BYTES],
                blkif.RING_SLOTS,
                blkif.SLOT_SIZE,
            )
            journal.begin(int.from_bytes(view[16:24], "little"), b"\0" * 16)
            del journal
            view.release()
        finally:
            stale.close()
        b = kernel.driver("blkF", 5002)
        b.wait_for(lambda m: ["fe_state", key, 4] in m, "re-attach with the frontend state")
        rep = ev.wait("driver.blkF.replayed", pid=5002)
        assert (rep["devices"], rep["replayed"]) == (1, 0), rep
    records: list[int | None] = []
    b.run(lambda: records.extend(d.records_at_connect for d in b.devices.values()))
    assert records == [0], records
    row = kernel.driver_row("blkF")
    assert row is not None and row["connected"] and not row["failing"], row


# --- driver messages ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_poison_spare_and_recovered_reports_and_malformed_ones_are_ignored(kernel: Kernel) -> None:
    with kernel.subscribe(["driver.", "device.m.", "domain.m."]) as ev:
        a = kernel.driver("blkM", 9001)
        kernel.create("m", "blkprobe", "action=info", "blkM")
        ev.wait("domain.m.shutdown")
        key = a.wait_for(lambda m: [x[1]["key"] for x in m if x[0] == "attach"], "attach")[0]
        junk: list[Any] = [
            b"\xc1",
            ["heartbeat"],
            ["heartbeat", 5, 1],
            ["heartbeat", "blkM", "one"],
            ["heartbeat", "nosuch", 1],
            ["spare"],
            ["spare", 3],
            ["spare", {"name": "blkS", "pid": "1", "endpoint": "x", "module": "m"}],
            ["recovered", "k", 1, 2],
            ["recovered", key, -1, 0],
            ["recovered", key, 1],
            ["recovered", 99999, 0, 0],
            ["recovered", True, 0, 0],
            ["poison", key, "x", "y"],
            ["poison", key, 0, 5],
            ["poison", key, -2, "y"],
            ["poison", 99999, 0, "y"],
            [
                "hello",
                {
                    "name": "blkBad",
                    "pid": 1,
                    "endpoint": "ipc:///nowhere",
                    "module": "m",
                    "watchdog_ms": -1,
                },
            ],
            [
                "hello",
                {
                    "name": "blkBad",
                    "pid": 1,
                    "endpoint": "ipc:///nowhere",
                    "module": "m",
                    "request_timeout_ms": "10s",
                },
            ],
            [
                "hello",
                {
                    "name": "blkBad",
                    "pid": 1,
                    "endpoint": "ipc:///nowhere",
                    "module": "m",
                    "watchdog_ms": True,
                },
            ],
        ]
        for msg in junk:
            a.send(msg)
        a.send(["poison", key, 5, "write sector 800, 1 segment, id 7"])
        poison = ev.wait("driver.blkM.poison")
        assert poison == {
            "pid": 9001,
            "domain": "m",
            "vdev": "xvda",
            "index": 5,
            "request": "write sector 800, 1 segment, id 7",
        }, poison
        a.send(["recovered", key, 2, 12345])
        rec = ev.wait("device.m.xvda.recovered")
        assert rec == {"domid": rec["domid"], "driver": "blkM", "replayed": 2, "done_ns": 12345}, (
            rec
        )
        a.send(
            [
                "spare",
                {
                    "name": "blkS",
                    "pid": 9100,
                    "endpoint": "ipc:///spare.sock",
                    "module": "drivers.blk",
                },
            ]
        )
        assert ev.wait("driver.blkS.spare") == {"pid": 9100, "endpoint": "ipc:///spare.sock"}
        ev.drain()
    names = {r["name"] for r in kernel.call("drivers")["drivers"]}
    assert names == {"blkM"}, names  # neither the spare nor a malformed hello got a link
    assert [t for t, _ in ev.seen if t.startswith("driver.blkM.")].count(
        "driver.blkM.replayed"
    ) == 1  # the one after the first hello, not one per report
    assert kernel.call("ping")["status"] == "ok"
    log = kernel.log()
    for what in (
        "undecodable message",
        "malformed heartbeat",
        "malformed spare",
        "malformed recovered",
        "malformed poison",
        "malformed hello from driver blkBad",
    ):
        assert what in log, what
    assert "Traceback" not in log, log


@pytest.mark.timeout(30)
def test_a_malformed_message_from_a_connected_instance_is_a_violation(kernel: Kernel) -> None:
    """A message after a ``name:pid`` frame naming the connected instance is that instance's:
    if malformed, it is a violation (once per instance).  Garbage naming another pid, or no
    sender, can only be logged."""
    kernel.driver("blkX", 9801)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(kernel.driver_endpoint)
    try:
        with kernel.subscribe(["driver.blkX."]) as ev:
            push.send_multipart([b"blkX:1234", b"\xc1"])  # not the connected pid
            push.send(msgpack.packb(["heartbeat", 5, 1]))  # anonymous
            push.send_multipart([b"blkX:9801", msgpack.packb(["recovered", "k", 1, 2])])
            v = ev.wait("driver.blkX.violation")
            assert v["pid"] == 9801 and v["reporter"] == "kernel", v
            assert v["reason"].startswith("malformed message: malformed recovered"), v
            push.send_multipart([b"blkX:9801", b"\xc1"])
            push.send_multipart([b"blkX:9801", msgpack.packb(["store", "/driver/blkX/a", "1"])])
            # Query the root, which always exists: /driver/blkX may not exist until the write lands.
            wait_until(
                lambda: kernel.call("store", path="/")["nodes"].get("/driver/blkX/a") == "1",
                "the store write after them",
            )
            ev.drain()
        assert [t for t, _ in ev.seen].count("driver.blkX.violation") == 1
    finally:
        push.close()
    log = kernel.log()
    assert "from sender b'blkX:1234' (no such connected instance)" in log, log
    assert "from an anonymous sender" in log and "from driver blkX (pid 9801)" in log, log


@pytest.mark.timeout(60)
def test_bad_responses_are_held_taken_back_and_redone_by_the_next_instance(kernel: Kernel) -> None:
    """A driver answers with ids that match no request: the frontend reports a violation and
    holds instead of failing; the next instance's hello makes the kernel take the bad
    responses back, the new instance redoes those requests, and the guest verifies every
    byte and finishes with no error."""
    disks: dict[str, bytearray] = {}
    with kernel.subscribe(["driver.blkV.", "device.v.", "domain.v."]) as ev:
        a = kernel.driver("blkV", 9501, disks=disks, bad_ids=True)
        kernel.create(
            "v", "blkstress", "ops=2000 qd=8 mix=60 seed=3 blocks=128 timeout=30000", "blkV"
        )
        v = ev.wait("driver.blkV.violation")
        assert (v["pid"], v["reporter"], v["domain"], v["vdev"], v["held"]) == (
            9501,
            "frontend",
            "v",
            "xvda",
            True,
        ), v
        assert "bad response" in v["reason"] and "matches no request" in v["reason"], v
        wait_until(lambda: "holding from response 0" in kernel.console("v"), "the hold")
        a.stop()
        assert kernel.call("driver_lost", name="blkV", pid=9501)["dropped"] is True

        kernel.driver("blkV", 9502, disks=disks)
        rew = ev.wait("device.v.xvda.rewound")
        assert rew["index"] == 0 and rew["reopened"] >= 1 and rew["driver"] == "blkV", rew
        rec = ev.wait("device.v.xvda.recovered")
        assert rec["replayed"] == rew["reopened"], (rec, rew)
        done = ev.wait("domain.v.shutdown", timeout=40)
    con = kernel.console("v")
    s = summary(con)
    assert done["code"] == 0 and s["errors"] == 0 and s["ops"] == 2000, con
    assert "resumed at response 0" in con, con


@pytest.mark.timeout(30)
def test_bad_responses_of_a_driver_that_is_failed_become_errors(kernel: Kernel) -> None:
    """No instance follows (driver_fail): the held requests are answered with errors, so the
    guest sees a clean error rather than waiting forever."""
    with kernel.subscribe(["driver.blkW.", "device.w.", "domain.w."]) as ev:
        a = kernel.driver("blkW", 9601, bad_ids=True)
        kernel.create("w", "blkprobe", "action=write sector=0 count=1 timeout=20000", "blkW")
        assert ev.wait("driver.blkW.violation")["held"] is True
        a.stop()
        kernel.call("driver_fail", name="blkW", reason="test gives up")
        assert ev.wait("device.w.xvda.rewound")["index"] == 0
        ev.wait("domain.w.shutdown")
    con = kernel.console("w")
    assert "blkprobe: write status=-1" in con and "resumed at response 0" in con, con


# --- pure logic, in-process -----------------------------------------------------------------------


def _requests(front: FrontRing, ids: list[int]) -> list[bytes]:
    reqs = [
        encode_request(i, op, 8, [(blkif.DATA_OFFSET, 512)] if op in (OP_READ, OP_WRITE) else [])
        for i, op in zip(ids, [OP_READ, OP_WRITE, OP_FLUSH, 9, OP_READ, OP_WRITE], strict=False)
    ]
    for r in reqs:
        front.put_request(r)
    front.push_requests()
    return reqs


def test_answer_with_errors_answers_from_rsp_prod_in_ring_order_and_clears_the_log() -> None:
    buf = bytearray(VBD.region.segment_bytes)
    mv = memoryview(buf)
    front = FrontRing(mv[:RING_BYTES], blkif.RING_SLOTS, blkif.SLOT_SIZE)
    reqs = _requests(front, [10, 11, 12, 13, 14, 15])
    # the dead backend: answered and published #0 but died before retiring its record, and
    # had taken #1 and #2
    back = BackRing(mv[:RING_BYTES], blkif.RING_SLOTS, blkif.SLOT_SIZE)
    journal = InflightLog(
        mv[blkif.INFLIGHT_OFFSET : blkif.INFLIGHT_OFFSET + INFLIGHT_BYTES],
        blkif.RING_SLOTS,
        blkif.SLOT_SIZE,
    )
    for i in range(3):
        journal.begin(i, back.get_request())
    back.put_response(encode_response(10, OP_READ, STATUS_OKAY))
    back.push_responses()
    assert decode_response(front.get_response()) == (10, OP_READ, STATUS_OKAY)
    assert not front.final_check_for_responses()  # the guest now waits for a notification
    front._slot(1)[:8] = (999).to_bytes(8, "little")  # the guest scribbles on a taken slot

    answered, notify = answer_with_errors(buf, blkif.WINDOW_BYTES, 2048, VBD)
    assert (answered, notify) == (5, True)
    got = [decode_response(front.get_response()) for _ in range(5)]
    assert got == [
        (11, OP_WRITE, STATUS_ERROR),
        (12, OP_FLUSH, STATUS_ERROR),
        (13, 9, STATUS_ERROR),
        (14, OP_READ, STATUS_ERROR),
        (15, OP_WRITE, STATUS_ERROR),
    ]  # #1 from its record, not the scribble
    assert not front.unconsumed_responses()
    assert journal.pending() == []
    words = mv[:32].cast("Q")
    assert words[1] == words[0] + 1  # req_event re-armed: the guest's next request kicks
    assert answer_with_errors(buf, blkif.WINDOW_BYTES, 2048, VBD) == (0, False)
    words[0] = words[2] + 1000  # a hostile req_prod
    with pytest.raises(RingError, match="req_prod"):
        answer_with_errors(buf, blkif.WINDOW_BYTES, 2048, VBD)
    del words, front, back, journal, reqs


def test_a_notification_flood_is_a_violation_once_per_link() -> None:
    now = [100.0]
    events: list[tuple[str, dict[str, Any]]] = []
    link = DriverLink("d", "ipc:///d", 42, "m", "process")
    hub = SimpleNamespace(links={"d": link}, known={"d"})
    manager = SimpleNamespace(hub=hub, emit=lambda t, p: events.append((t, p)))
    rec = Recovery(manager, clock=lambda: now[0])  # type: ignore[arg-type]
    for _ in range(NOTIFY_FLOOD_PER_S):
        rec.notified("d")
    assert events == []  # at the limit, not over it
    now[0] += 1.0  # a new second: the count starts again
    for _ in range(NOTIFY_FLOOD_PER_S):
        rec.notified("d")
    assert events == []
    rec.notified("d")
    for _ in range(10):
        rec.notified("d")
    assert [t for t, _ in events] == ["driver.d.violation"]
    assert events[0][1]["pid"] == 42 and events[0][1]["reporter"] == "kernel"
    assert "notification flood" in events[0][1]["reason"]
    assert link.last_seen == now[0]


@pytest.mark.parametrize(
    "extra,ok",
    [
        ({}, True),
        ({"watchdog_ms": 0, "request_timeout_ms": 1}, True),
        ({"watchdog_ms": 250, "request_timeout_ms": 0}, True),
        ({"watchdog_ms": -1}, False),
        ({"watchdog_ms": 1.5}, False),
        ({"watchdog_ms": True}, False),
        ({"request_timeout_ms": -5}, False),
        ({"request_timeout_ms": "10"}, False),
        ({"pid": "7"}, False),
        ({"name": ""}, False),
    ],
)
def test_hello_fields_are_checked(extra: dict[str, Any], ok: bool) -> None:
    info = {"name": "d", "pid": 7, "endpoint": "ipc:///d", "module": "m", **extra}
    if not ok:
        with pytest.raises(Malformed, match="malformed hello"):
            parse_hello(["hello", info])
        return
    link = parse_hello(["hello", info])
    assert link.watchdog_ms == extra.get("watchdog_ms", 0)
    assert link.request_timeout_ms == extra.get("request_timeout_ms", 10_000)


def test_the_hold_exists_before_the_violation_is_published() -> None:
    """The supervisor may kill the driver and the spare say hello within milliseconds of the
    violation event: that hello must already find the hold (found by a 2,000-fault campaign,
    where a spare's hello won the race and resumed from a bogus rsp_prod)."""
    link = DriverLink("d", "ipc:///d", 42, "m", "process")
    dev = SimpleNamespace(
        spec=SimpleNamespace(backend="d", vdev="xvda"),
        gone=False,
        broken=False,
        hold=None,
        lock=threading.Lock(),
        label="g/xvda",
        dom=SimpleNamespace(name="g"),
        cls=VBD,
    )
    seen: list[Any] = []

    def emit(topic: str, payload: dict[str, Any]) -> None:
        seen.append((topic, dev.hold))

    manager = SimpleNamespace(
        hub=SimpleNamespace(links={"d": link}, known={"d"}),
        emit=emit,
        ring_indices=lambda d: (105, 100),
    )
    rec = Recovery(manager)  # type: ignore[arg-type]
    assert rec.frontend_fault(dev, abi.FAULT_UNKNOWN_ID, "bad id", 100) is True  # type: ignore[arg-type]
    assert [(t, h.index if h else None) for t, h in seen] == [("driver.d.violation", 100)]
