"""The console backend in-process: a fake host stands in for drivers.host, real shared-memory
segments for the kernel's device regions, and :class:`ipc.consif.ConsoleFront` for the guest.

The crash tests stop an instance at chosen points of an append (``checkpoint`` raising
SimulatedCrash, a ``write_log`` that writes part of the bytes, a journal whose stores stop after
k words), abandon it as SIGKILL would, and attach a new instance to the same segment (``attach``
then ``fe_state`` 4, as the kernel does after a restart): the log must hold every byte once."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from drivers.backendbase import Lifecycle
from drivers.console.backend import MAX_SOCKET_PATH, Console, ConsoleBackend, SimulatedCrash
from drivers.host import start_inline
from drivers.state import BackendState, StateError
from ipc import consif
from ipc.consif import ConsoleFront, Follower, Journal, decode_offset
from ipc.shm import Segment
from isovisor.testing import wait_until
from tests.fakehost import RecordingHost

DRIVER = "cons0"
PREFIX = f"isovisor-test-cons.{os.getpid()}."
WAIT = 10.0


class FakeHost(RecordingHost):
    """The driver host's API, recording what the backend asks of it (tests/fakehost.py)."""

    def __init__(self) -> None:
        super().__init__(DRIVER, SimulatedCrash)


class Guest:
    """One domain's console device: the segment (created as the kernel would) and a Python
    frontend over its window."""

    def __init__(self, key: int, domid: int, domain: str) -> None:
        self.key = key
        self.domid = domid
        self.domain = domain
        self.segment = Segment(f"{PREFIX}dom{domid}.console", consif.SEGMENT_BYTES, create=True)
        self.mem = memoryview(self.segment.buf)
        self.front: ConsoleFront | None = None
        self.sent = bytearray()  # everything the guest published, in order
        self.pending = b""  # written by the program, not yet in the ring

    @property
    def store(self) -> str:
        return f"/driver/{DRIVER}/console/{self.domid}/0"

    def attach_message(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "domid": self.domid,
            "domain": self.domain,
            "vdev": "console",
            "devid": 0,
            "segment": self.segment.name,
            "window": consif.WINDOW_BYTES,
            "inflight_offset": consif.INFLIGHT_OFFSET,
            "store": self.store,
            "scratch": f"{self.segment.name}.scratch",
            "class": "console",
        }

    def init(self) -> ConsoleFront:
        self.front = ConsoleFront(self.mem[: consif.WINDOW_BYTES], init=True)
        return self.front

    def write(self, data: bytes) -> tuple[int, bool]:
        """Publish as much of ``data`` as fits: (bytes, kick?)."""
        assert self.front is not None
        n, kick = self.front.write(data)
        self.sent += data[:n]
        return n, kick

    def read_all(self) -> bytes:
        assert self.front is not None
        data, _ = self.front.read()
        return data

    def close(self) -> None:
        self.front = None
        self.mem.release()
        with contextlib.suppress(BufferError):
            self.segment.close()
        self.segment.unlink()


class Rig:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="icons.", dir="/tmp"))
        self.guests: list[Guest] = []
        self.backends: list[ConsoleBackend] = []

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def backend(
        self,
        cls: type[ConsoleBackend] = ConsoleBackend,
        host: FakeHost | None = None,
        **options: Any,
    ) -> tuple[ConsoleBackend, FakeHost]:
        host = host or FakeHost()
        opts = {"log_dir": str(self.log_dir), "socket_dir": str(self.dir / "s"), **options}
        b = cls(host, opts)  # type: ignore[arg-type]
        self.backends.append(b)
        return b, host

    def guest(self, key: int, domid: int, domain: str) -> Guest:
        g = Guest(key, domid, domain)
        self.guests.append(g)
        return g

    def log(self, domain: str) -> bytes:
        path = self.log_dir / f"{domain}.log"
        return path.read_bytes() if path.exists() else b""

    def close(self) -> None:
        for b in self.backends:
            with contextlib.suppress(Exception):
                b.close()
        for g in self.guests:
            g.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def connect(b: ConsoleBackend, host: FakeHost, g: Guest) -> None:
    """The handshake: attach (InitWait), the frontend initialises the page (Initialised),
    the backend connects (Connected)."""
    b.attach(g.attach_message())
    assert host.store[f"{g.store}/state"] == "2", host.errors
    g.init()
    b.fe_state(g.key, 3)
    assert host.store[f"{g.store}/state"] == "4"


def resume(b: ConsoleBackend, host: FakeHost, g: Guest) -> None:
    """What the kernel sends a new instance for a connected console."""
    b.attach(g.attach_message())
    assert host.store[f"{g.store}/state"] == "2", host.errors
    b.fe_state(g.key, 4)
    assert host.store[f"{g.store}/state"] == "4"


def pour(b: ConsoleBackend, g: Guest, data: bytes) -> int:
    """The guest writes ``data``, kicking when the ring asks and when it is full (a real
    frontend would sleep on its port there; the backend's kick stands in for the wake-up).
    Returns the kicks the ring asked for."""
    kicks = 0
    while data:
        n, kick = g.write(data)
        data = data[n:]
        if kick:
            kicks += 1
        if kick or (data and n == 0) or not data:
            b.kick(g.key)
    return kicks


def abandon(b: ConsoleBackend) -> None:
    """What SIGKILL leaves of an instance: nothing flushed, committed or cleaned up; its
    sockets, files and mappings simply go away."""
    b.endpoints.terminate()
    for d in list(b.devices.values()):
        d.ring = None
        d.journal = None
        with contextlib.suppress(OSError):
            os.close(d.fd)
        for v in (d.journal_view, d.region, d.mem):
            v.release()
        gc.collect()
        with contextlib.suppress(BufferError):  # a test's own view: unmapped when it goes
            d.segment.close()
    b.devices.clear()


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- the data path ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_output_reaches_the_log_in_order_with_hold_off(rig: Rig) -> None:
    b, host = rig.backend()
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    data = blob(20_000, 1)  # ten times the ring, so the indices wrap many times
    kicks = pour(b, g, data)
    assert rig.log("web") == data
    assert kicks < 40  # hold-off: a kick only when the backend asked for one
    assert g.front is not None and g.front.get("out_cons") == len(data)
    stats = b.statistics()
    assert stats["out_bytes"] == len(data) and stats["web.out_bytes"] == len(data)
    assert stats["devices"] == 1 and stats["faults"] == 0
    # a guest waiting for room is notified when the backend consumes
    assert g.write(b"x" * consif.OUT_SIZE)[0] == consif.OUT_SIZE
    g.front.wait_for_room()
    before = host.notifies[g.key]
    b.kick(g.key)
    assert host.notifies[g.key] == before + 1
    assert rig.log("web") == data + b"x" * consif.OUT_SIZE
    assert host.faults == [] and host.errors == []


@pytest.mark.timeout(30)
def test_logs_append_across_reboots_and_detach_takes_the_last_words(rig: Rig) -> None:
    (rig.log_dir).mkdir(parents=True, exist_ok=True)
    (rig.log_dir / "db.log").write_bytes(b"earlier life\n")
    b, host = rig.backend()
    g = rig.guest(1, 7, "db")
    connect(b, host, g)
    g.write(b"panic: the end\n")  # no kick: the domain is destroyed before the backend looks
    b.detach(g.key)
    assert rig.log("db") == b"earlier life\npanic: the end\n"
    assert b.devices == {}
    # the frontend closing also flushes and closes
    g2 = rig.guest(2, 8, "db")
    connect(b, host, g2)
    g2.write(b"second boot\n")
    b.fe_state(g2.key, 5)
    assert host.store[f"{g2.store}/state"] == "6"
    assert rig.log("db").endswith(b"panic: the end\nsecond boot\n")


@pytest.mark.timeout(30)
def test_live_readers_get_offsets_that_stitch_with_the_file(rig: Rig) -> None:
    b, host = rig.backend()
    g = rig.guest(1, 5, "web")
    other = rig.guest(2, 6, "web2")  # its topic starts with "web": readers compare exactly
    connect(b, host, g)
    connect(b, host, other)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"web")
    sub.connect(b.pub_endpoint)
    follower = Follower(ctx, b.pub_endpoint, rig.log_dir / "web.log", "web")
    try:
        probe = iter(range(10_000))

        def subscribed() -> bool:  # the slow joiner: publish until messages arrive
            pour(b, g, f"probe {next(probe)}\n".encode())
            return bool(sub.poll(50))

        wait_until(subscribed, WAIT, "subscription")
        data = blob(9000, 2)
        pour(b, g, data)
        pour(b, other, b"not for web readers\n")
        got: list[tuple[int, bytes]] = []

        def received() -> bool:
            while sub.poll(0):
                topic, off, chunk = sub.recv_multipart()
                if topic == b"web":
                    got.append((decode_offset(off), chunk))
            return bool(got) and got[-1][0] + len(got[-1][1]) == len(rig.log("web"))

        wait_until(received, WAIT, "every append published")
        log = rig.log("web")
        for (off, chunk), nxt in itertools.pairwise(got):
            assert log[off : off + len(chunk)] == chunk
            assert nxt[0] == off + len(chunk)  # contiguous: no gap, no overlap
        assert log.endswith(data)
        # the follower: the file first, then live data, each byte once
        text = bytearray()
        wait_until(
            lambda: text.extend(follower.read(50)) or bytes(text) == log,
            WAIT,
            "follower caught up with the file",
        )
        more = blob(3000, 3)
        pour(b, g, more)
        wait_until(
            lambda: text.extend(follower.read(50)) or bytes(text) == log + more,
            WAIT,
            "follower got the live data",
        )
        # a message the reader never sees (a full queue, a crash before publishing): the
        # next message's offset shows the gap, which the follower reads from the file
        publish = b._publish
        b._publish = lambda d, offset, data: None  # type: ignore[method-assign]
        pour(b, g, b"lost on the wire\n")
        b._publish = publish  # type: ignore[method-assign]
        pour(b, g, b"seen live\n")
        wait_until(
            lambda: text.extend(follower.read(50)) or bytes(text) == rig.log("web"),
            WAIT,
            "follower filled the gap",
        )
        assert bytes(text).endswith(b"lost on the wire\nseen live\n")
        assert b"not for web readers" not in text
    finally:
        follower.close()
        sub.close(0)
        ctx.term()


@pytest.mark.timeout(30)
def test_input_reaches_the_in_ring_bounded_with_drops_counted(rig: Rig) -> None:
    b, host = rig.backend(input_queue_bytes=2000)
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    assert g.front is not None
    assert b.fds() and len(b.fds()) == 1
    fd = b.fds()[0]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(b.input_endpoint)
    try:
        push.send_multipart([b"web", b"ls -l\n"])
        wait_until(lambda: b.readable(fd) or g.front.get("in_prod") == 6, WAIT, "input")  # type: ignore[union-attr]
        assert host.notifies[g.key] == 1  # in_event was 1: the guest asked for it
        assert g.read_all() == b"ls -l\n"
        # more than ring + queue: the ring takes 1024, the queue 2000, the rest is dropped
        data = blob(5000, 4)
        push.send_multipart([b"web", data])
        wait_until(lambda: b.readable(fd) or b.statistics()["in_dropped"] > 0, WAIT, "drops")
        stats = b.statistics()
        assert stats["in_dropped"] == 5000 - consif.IN_SIZE - 2000
        assert stats["in_queued"] == 2000 and stats["web.in_dropped"] == stats["in_dropped"]
        received = bytearray()
        while len(received) < consif.IN_SIZE + 2000:
            chunk, kick = g.front.read()
            received += chunk
            assert chunk, "the backend should have refilled the ring"
            if kick:  # the backend set in_cons_event: it has input waiting for this room
                b.kick(g.key)
        assert bytes(received) == data[: consif.IN_SIZE + 2000]
        assert b.statistics()["in_bytes"] == 6 + consif.IN_SIZE + 2000
        # input for no such domain, and malformed messages, are counted and dropped
        push.send_multipart([b"nosuch", b"abc"])
        push.send_multipart([b"web", b"x", b"extra frame"])
        push.send_multipart([b"\xff\xfe", b"x"])
        wait_until(
            lambda: b.readable(fd) or b.statistics()["malformed_input"] == 2,
            WAIT,
            "malformed input counted",
        )
        assert b.statistics()["unknown_input"] == 3
        assert host.faults == []
    finally:
        push.close(0)
        ctx.term()


@pytest.mark.timeout(30)
def test_input_queued_before_the_guest_connects_is_delivered_on_connect(rig: Rig) -> None:
    b, _ = rig.backend()
    g = rig.guest(1, 5, "web")
    b.attach(g.attach_message())
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(b.input_endpoint)
    try:
        push.send_multipart([b"web", b"early\n"])
        wait_until(
            lambda: b.readable(b.fds()[0]) or b.statistics()["in_queued"] == 6, WAIT, "queued"
        )
        g.init()
        b.fe_state(g.key, 3)
        assert g.read_all() == b"early\n"
    finally:
        push.close(0)
        ctx.term()


# --- exactly once across a crash -----------------------------------------------------------------


class CrashAt(ConsoleBackend):
    """Dies at ``point`` of its ``nth`` append: a checkpoint name, or ``mid-append`` (only
    ``part`` bytes of the append reach the file)."""

    point = ""
    nth = 1
    part = 0

    def __init__(self, host: Any, options: dict[str, Any]) -> None:
        super().__init__(host, options)
        self.appends = 0

    def checkpoint(self, where: str) -> None:
        if where == "journaled":
            self.appends += 1
        if where == self.point and self.appends == self.nth:
            raise SimulatedCrash(where)

    def write_log(self, d: Console, data: bytes) -> None:
        if self.point == "mid-append" and self.appends == self.nth:
            super().write_log(d, data[: self.part])
            raise SimulatedCrash("mid-append")
        super().write_log(d, data)


def crashing(point: str, nth: int = 1, part: int = 0) -> type[ConsoleBackend]:
    return type("Crash", (CrashAt,), {"point": point, "nth": nth, "part": part})


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("point", "replayed"),
    [
        ("journaled", 1500),  # the entry is written, nothing appended
        ("mid-append", 1500 - 600),  # 600 of the 1500 bytes reached the file
        ("appended", 0),  # every byte in the file, out_cons not advanced
        ("published", 0),  # readers have them too
    ],
)
def test_a_new_instance_finishes_the_append_exactly_once(
    rig: Rig, point: str, replayed: int
) -> None:
    b1, host1 = rig.backend(crashing(point, nth=2, part=600))
    g = rig.guest(1, 5, "web")
    connect(b1, host1, g)
    first, second, third = b"first line\n" * 10, blob(1500, 5), b"written while it was down\n"
    pour(b1, g, first)
    g.write(second)
    with pytest.raises(SimulatedCrash):
        b1.kick(g.key)
    assert g.front is not None and g.front.get("out_cons") == len(first)  # not committed
    expected_file = {"journaled": first, "mid-append": first + second[:600]}.get(
        point, first + second
    )
    assert rig.log("web") == expected_file
    abandon(b1)
    g.write(third)  # the kick would be dropped by the kernel: no backend runs
    b2, host2 = rig.backend()
    resume(b2, host2, g)
    assert rig.log("web") == first + second + third
    assert [(k, r) for k, r, _ in host2.recoveries] == [(g.key, replayed)]
    assert b2.statistics()["recovered_bytes"] == replayed
    assert g.front.get("out_cons") == len(first + second + third)
    # and it goes on serving
    pour(b2, g, b"after\n")
    assert rig.log("web") == first + second + third + b"after\n"
    assert host2.faults == [] and host2.errors == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("first_append", [True, False])
@pytest.mark.parametrize("stores", range(7))
def test_dying_while_the_journal_entry_is_written(
    rig: Rig, first_append: bool, stores: int
) -> None:
    """The entry's stores stop after ``stores`` words (6 is all of them): whatever the mix of
    old and new words, the new instance appends every byte once.  The first append after a
    fresh journal is the case where the old entry's cons_at already equals the new one."""
    b1, host1 = rig.backend()
    g = rig.guest(1, 5, "web")
    connect(b1, host1, g)
    before = b"" if first_append else b"earlier output\n"
    if before:
        pour(b1, g, before)
    d = b1.devices[g.key]
    assert d.journal is not None
    journal_words = d.journal._q

    class StopAfter:
        def __init__(self, words: memoryview) -> None:
            self.words = words
            self.left = stores

        def __getitem__(self, i: int) -> int:
            return int(self.words[i])

        def __setitem__(self, i: int, v: int) -> None:
            if self.left == 0:
                raise SimulatedCrash(f"after {stores} journal stores")
            self.left -= 1
            self.words[i] = v

    d.journal._q = StopAfter(journal_words)  # type: ignore[assignment]
    data = blob(700, stores)
    g.write(data)
    if stores == 6:  # the whole entry is written: stop at the checkpoint after it instead
        d.journal._q = journal_words
        b1.checkpoint = lambda where: (_ for _ in ()).throw(SimulatedCrash(where))  # type: ignore[method-assign]
    with pytest.raises(SimulatedCrash):
        b1.kick(g.key)
    del d, journal_words
    abandon(b1)
    b2, host2 = rig.backend()
    resume(b2, host2, g)
    assert rig.log("web") == before + data
    assert host2.faults == []


@pytest.mark.timeout(120)
def test_random_crashes_never_lose_or_duplicate_a_byte(rig: Rig) -> None:
    """Many instances, each killed at a random point of a random append (or not at all), some
    while finishing their predecessor's append, with the guest writing random amounts in
    between: the log is exactly what it wrote."""
    rnd = random.Random(2024)
    g = rig.guest(1, 5, "web")
    b, host = rig.backend()
    connect(b, host, g)
    crashes = 0

    def arm(x: ConsoleBackend) -> None:
        point = rnd.choice(["journaled", "mid-append", "appended", "published"])
        if point == "mid-append":
            x.write_log = _partial_write(x, rnd.randrange(0, 64))  # type: ignore[method-assign]
        else:
            x.checkpoint = _crash_at(point)  # type: ignore[method-assign]

    def disarm(x: ConsoleBackend) -> None:
        x.checkpoint = ConsoleBackend.checkpoint.__get__(x)  # type: ignore[method-assign]
        x.write_log = ConsoleBackend.write_log.__get__(x)  # type: ignore[method-assign]

    def replace(dead: ConsoleBackend) -> tuple[ConsoleBackend, FakeHost]:
        nonlocal crashes
        while True:
            crashes += 1
            abandon(dead)
            new, new_host = rig.backend()
            if rnd.random() < 0.3:
                arm(new)  # may die while finishing its predecessor's append
            try:
                resume(new, new_host, g)
            except SimulatedCrash:
                dead = new
                continue
            disarm(new)
            return new, new_host

    for step in range(120):
        for _ in range(rnd.randrange(1, 4)):
            g.write(rnd.randbytes(rnd.randrange(1, 1200)))
        if rnd.random() < 0.4:
            b.kick(g.key)
            continue
        arm(b)
        try:
            b.kick(g.key)
        except SimulatedCrash:
            b, host = replace(b)
        else:
            disarm(b)
        assert host.faults == [], step
    b.kick(g.key)
    assert crashes > 30
    assert rig.log("web") == bytes(g.sent)


def _crash_at(point: str) -> Callable[[str], None]:
    def checkpoint(where: str) -> None:
        if where == point:
            raise SimulatedCrash(where)

    return checkpoint


def _partial_write(b: ConsoleBackend, part: int) -> Callable[[Console, bytes], None]:
    def write_log(d: Console, data: bytes) -> None:
        ConsoleBackend.write_log(b, d, data[:part])
        raise SimulatedCrash("mid-append")

    return write_log


@pytest.mark.timeout(30)
def test_a_replaced_log_file_gets_the_whole_append_again(rig: Rig) -> None:
    b1, host1 = rig.backend(crashing("appended"))
    g = rig.guest(1, 5, "web")
    connect(b1, host1, g)
    g.write(b"half-logged\n")
    with pytest.raises(SimulatedCrash):
        b1.kick(g.key)
    abandon(b1)
    (rig.log_dir / "web.log").rename(rig.log_dir / "web.log.1")  # rotated meanwhile
    b2, host2 = rig.backend()
    resume(b2, host2, g)
    assert rig.log("web") == b"half-logged\n"  # at least once: nothing lost
    assert (rig.log_dir / "web.log.1").read_bytes() == b"half-logged\n"


@pytest.mark.timeout(30)
def test_a_failed_write_keeps_the_output_in_the_ring_and_retries(rig: Rig) -> None:
    b, host = rig.backend()
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    real = ConsoleBackend.write_log
    failures = iter([OSError(28, "No space left on device")])

    def flaky(d: Console, data: bytes) -> None:
        e = next(failures, None)
        if e is not None:
            real(b, d, data[:5])
            raise e
        real(b, d, data)

    b.write_log = flaky  # type: ignore[method-assign]
    g.write(b"0123456789\n")
    b.kick(g.key)
    assert host.errors and "No space left on device" in host.errors[0][1]
    assert g.front is not None and g.front.get("out_cons") == 0
    g.write(b"more\n")
    b.kick(g.key)  # finishes the pending append first, then the rest
    assert rig.log("web") == b"0123456789\nmore\n"
    assert len(host.errors) == 1 and b.statistics()["write_errors"] == 1


# --- hostile guests -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda f: f.set("out_prod", consif.OUT_SIZE + 1), "claims 2049 bytes after out_cons=0"),
        (lambda f: f.set("out_prod", (1 << 64) - 3), "claims 18446744073709551613 bytes"),
        (lambda f: f.set("in_cons", 5), "in_cons=5 is invalid"),
    ],
)
def test_garbage_indices_are_a_fault_and_the_others_keep_working(
    rig: Rig, tamper: Callable[[ConsoleFront], None], message: str
) -> None:
    b, host = rig.backend()
    bad, good = rig.guest(1, 5, "evil"), rig.guest(2, 6, "fine")
    connect(b, host, bad)
    connect(b, host, good)
    assert bad.front is not None
    tamper(bad.front)
    b.kick(bad.key)
    if not host.faults:  # an in_cons problem shows when there is input to deliver
        b.devices[bad.key].inq += b"input"
        b.kick(bad.key)
    assert len(host.faults) == 1 and host.faults[0][0] == bad.key
    assert message in host.faults[0][1], host.faults
    b.kick(bad.key)  # a broken console is not served any more
    assert len(host.faults) == 1
    pour(b, good, b"still logging\n")
    assert rig.log("fine") == b"still logging\n"
    assert b.statistics()["faults"] == 1


@pytest.mark.timeout(30)
def test_out_prod_moving_backwards_is_refused(rig: Rig) -> None:
    b1, host1 = rig.backend(crashing("journaled"))
    g = rig.guest(1, 5, "evil")
    connect(b1, host1, g)
    g.write(b"x" * 100)
    with pytest.raises(SimulatedCrash):
        b1.kick(g.key)
    abandon(b1)
    assert g.front is not None
    g.front.set("out_prod", 40)  # below the append in progress
    b2, host2 = rig.backend()
    resume(b2, host2, g)
    assert len(host2.faults) == 1
    assert "no longer covers the append in progress, bytes [0, 100)" in host2.faults[0][1]
    # and a live backend sees out_prod go back below what it saw
    b3, host3 = rig.backend()
    g2 = rig.guest(2, 6, "evil2")
    connect(b3, host3, g2)
    assert g2.front is not None
    pour(b3, g2, b"y" * 100)
    g2.front.set("out_prod", 50)
    b3.kick(g2.key)
    assert host3.faults and "claims" in host3.faults[0][1]
    # an append that failed (disk full) has seen out_prod; the guest then takes bytes back
    b4, host4 = rig.backend()
    g3 = rig.guest(3, 7, "evil3")
    connect(b4, host4, g3)
    assert g3.front is not None

    def full(d: Console, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    b4.write_log = full  # type: ignore[method-assign]
    g3.write(b"z" * 100)
    b4.kick(g3.key)
    assert host4.errors and host4.faults == []
    g3.front.set("out_prod", 60)
    b4.kick(g3.key)
    assert host4.faults == [
        (g3.key, "console out ring: frontend out_prod moved backwards from 100 to 60")
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"domain": "../etc"}, "domain name '../etc' cannot name a log file"),
        ({"window": 0x800}, "window 0x800 must hold the console page"),
        ({"inflight_offset": 0x800}, "journal at 0x800 (64 bytes) must lie after the window"),
        ({"inflight_offset": consif.SEGMENT_BYTES}, "must lie after the window"),
        ({"class": "vbd"}, "attach field 'class' is 'vbd'"),
        ({"segment": "no-such-segment"}, "cannot map device segment no-such-segment"),
        ({"key": "1"}, "attach field 'key' is '1', expected int"),
    ],
)
def test_bad_attach_messages_are_refused_with_a_clear_error(
    rig: Rig, change: dict[str, Any], message: str
) -> None:
    b, host = rig.backend()
    g = rig.guest(1, 5, "web")
    b.attach({**g.attach_message(), **change})
    assert b.devices == {}
    if isinstance(change.get("key", 1), int):
        assert host.errors and message in host.errors[0][1], host.errors
        assert host.store[f"{g.store}/state"] == "6"
        assert message in host.store[f"{g.store}/error"]


@pytest.mark.timeout(30)
def test_one_console_per_domain(rig: Rig) -> None:
    b, host = rig.backend()
    g1, g2 = rig.guest(1, 5, "web"), rig.guest(2, 6, "web")
    connect(b, host, g1)
    b.attach(g2.attach_message())
    assert host.errors == [
        (2, "domain web already has console device 1 attached (one console per domain)")
    ]


# --- options, hot swap, the real host loop -------------------------------------------------


@pytest.mark.timeout(30)
def test_options_are_checked(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    for options, message in [
        ({"colour": 1}, "unknown console backend option(s) colour; allowed: run_dir"),
        ({"log_dir": 3}, "log_dir must be a directory path (a non-empty string), got 3"),
        ({"log_dir": "/proc/nope"}, "log_dir /proc/nope: cannot create the directory"),
        ({"socket_dir": "/tmp/" + "d" * 100}, "is too long for a Unix socket"),
        ({"input_queue_bytes": -1}, "input_queue_bytes must be an integer 0..16777216, got -1"),
        ({"input_queue_bytes": True}, "input_queue_bytes must be an integer"),
        ({"run_dir": ""}, "run_dir must be a directory path"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ConsoleBackend(host, options)  # type: ignore[arg-type]
    monkeypatch.setenv("ISOVISOR_RUN_DIR", str(rig.dir / "run"))
    b = ConsoleBackend(host, {})  # type: ignore[arg-type]
    assert b.log_dir == b.socket_dir == rig.dir / "run" / "consoles"
    assert b.pub_endpoint == f"ipc://{rig.dir}/run/consoles/console.pub"
    assert b.input_endpoint == f"ipc://{rig.dir}/run/consoles/console.in"
    b2 = ConsoleBackend(host, {"run_dir": str(rig.dir / "r2")})  # type: ignore[arg-type]
    assert b2.log_dir == rig.dir / "r2" / "consoles"
    monkeypatch.delenv("ISOVISOR_RUN_DIR")
    monkeypatch.chdir(rig.dir)
    assert ConsoleBackend(host, {}).log_dir == rig.dir / "consoles"  # type: ignore[arg-type]
    assert len(str(rig.dir / "s" / "console.pub")) <= MAX_SOCKET_PATH
    for x in (b, b2):
        x.close()


@pytest.mark.timeout(30)
def test_hot_swap_carries_counters_queued_input_and_the_endpoints(rig: Rig) -> None:
    old, host = rig.backend(input_queue_bytes=4096)
    g = rig.guest(1, 5, "web")
    connect(old, host, g)
    pour(old, g, b"before the swap\n")
    old.devices[g.key].inq += b"k" * 3000  # the guest is not reading
    old.kick(g.key)  # 1024 go into the ring, 1976 wait
    g.write(b"queued in the ring while drained\n")
    state = old.save()
    assert (state.kind, state.version) == ("isovisor.console", 1)
    wire = msgpack.unpackb(msgpack.packb(state.to_wire()))
    old.suspend()
    assert old.fds() == [] and old.devices == {}
    new, host2 = rig.backend()
    new.restore(BackendState.from_wire(wire))
    resume(new, host2, g)
    assert rig.log("web") == b"before the swap\nqueued in the ring while drained\n"
    assert g.read_all() == b"k" * consif.IN_SIZE
    new.kick(g.key)
    stats = new.statistics()
    assert stats["out_bytes"] == len(rig.log("web")) and stats["in_bytes"] == 2048
    assert stats["in_queued"] == 3000 - 2048
    assert new.fds()  # the endpoints are bound by the new instance
    with pytest.raises(StateError, match=re.escape("restores states of kind 'isovisor.console'")):
        new.restore(BackendState("isovisor.blk", 1, "drivers.blk:Backend"))
    with pytest.raises(StateError, match="newer than"):
        new.restore(BackendState("isovisor.console", 2, "x:Y"))


@pytest.mark.timeout(30)
def test_the_real_host_loop_serves_input_through_the_fds_hook(rig: Rig) -> None:
    """drivers.host waits on the backend's input socket (fds/readable): input reaches the
    ring with no kick at all."""
    ctx = zmq.Context()
    kernel = ctx.socket(zmq.PULL)
    kernel.setsockopt(zmq.LINGER, 0)
    kernel.bind(f"inproc://kernel-cons-{os.getpid()}")
    drv = start_inline(
        DRIVER,
        "drivers.console",
        {"log_dir": str(rig.log_dir), "socket_dir": str(rig.dir / "s")},
        ctx,
        f"inproc://kernel-cons-{os.getpid()}",
        f"inproc://cons-{os.getpid()}",
    )
    to_driver = ctx.socket(zmq.PUSH)
    to_driver.setsockopt(zmq.LINGER, 0)
    to_driver.connect(f"inproc://cons-{os.getpid()}")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    store: dict[str, str] = {}
    try:
        g = rig.guest(1, 5, "web")

        def take() -> None:
            while kernel.poll(10):
                _, raw = kernel.recv_multipart()
                msg = msgpack.unpackb(raw)
                if msg[0] == "store":
                    store[msg[1]] = msg[2]

        to_driver.send(msgpack.packb(["attach", g.attach_message()]))
        wait_until(lambda: take() or store.get(f"{g.store}/state") == "2", WAIT, "InitWait")
        front = g.init()
        to_driver.send(msgpack.packb(["fe_state", g.key, 3]))
        wait_until(lambda: take() or store.get(f"{g.store}/state") == "4", WAIT, "Connected")
        front.write(b"hello from the guest\n")
        to_driver.send(msgpack.packb(["kick", g.key]))
        wait_until(lambda: rig.log("web") == b"hello from the guest\n", WAIT, "log")
        push.connect(f"ipc://{rig.dir / 's' / 'console.in'}")
        push.send_multipart([b"web", b"typed\n"])
        wait_until(lambda: front.get("in_prod") == 6, WAIT, "input without a kick")
        assert front.read()[0] == b"typed\n"
    finally:
        drv.stop()
        for s in (push, to_driver, kernel):
            s.close(0)
        ctx.term()


@pytest.mark.timeout(30)
def test_the_c_header_matches_the_protocol() -> None:
    header = consif.c_header()
    assert "#define CONSIF_OUT_SIZE 2048" in header
    assert "#define CONSIF_IN_OFFSET 2304" in header
    assert "#define CONSIF_JOURNAL_MAGIC 0x314e524a534e4f43ULL" in header
    assert "_MASK" not in header
    j = Journal(memoryview(bytearray(consif.JOURNAL_BYTES)))
    assert not j.valid and j.pending(0) is None
    j.reset(7, 100, 1, 2)
    assert j.valid and j.pending(7) is None  # length 0: never pending
    j.begin(7, 10, 100, 1, 2)
    assert j.pending(7) is not None and j.pending(17) is None


# --- the C frontend against the backend ----------------------------------------------------
# consfront.c and devfront.c compiled natively, with the runtime they call (device table, store,
# event channels, hypercalls) stubbed out to talk to this test over pipes, one line per call: the
# frontend runs for real on the device segment and the backend serves it in lockstep.  Kicks are
# answered late (when the frontend is about to sleep), as by a slow backend, so the ring does fill
# up.

_STUB_HYPERCALL_H = r"""
#ifndef ISOVISOR_HYPERCALL_H
#define ISOVISOR_HYPERCALL_H
#include <stdint.h>
#include "isovisor_abi.h"
long stub_hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                    uint64_t a5);
#define hypercall0(nr) stub_hypercall(nr, 0, 0, 0, 0, 0, 0)
#define hypercall1(nr, a) stub_hypercall(nr, a, 0, 0, 0, 0, 0)
#define hypercall2(nr, a, b) stub_hypercall(nr, a, b, 0, 0, 0, 0)
#define hypercall3(nr, a, b, c) stub_hypercall(nr, a, b, c, 0, 0, 0)
#define hypercall4(nr, a, b, c, d) stub_hypercall(nr, a, b, c, d, 0, 0)
#define hypercall5(nr, a, b, c, d, e) stub_hypercall(nr, a, b, c, d, e, 0)
#define hypercall6(nr, a, b, c, d, e, f) stub_hypercall(nr, a, b, c, d, e, f)
#endif
"""

_GLUE_C = r"""
#include "consfront.h"

void host_send(const char *line);
void host_recv(char *buf, u64 n);
void *host_region(void);
int host_evil(void);

static u64 clock_ns;
u64 time_ns(void) { return clock_ns += 1000000; }

int device_find(const char *name, struct isv_device *out)
{
    if (strcmp(name, "console") != 0)
        return -ENOENT;
    memset(out, 0, sizeof *out);
    out->kind = DEV_KIND_CONSOLE;
    out->port = 3;
    out->region = host_region();
    out->region_size = CONSFRONT_WINDOW_BYTES;
    memcpy(out->name, "console", 8);
    return 0;
}

u64 device_count(void) { return 1; }
int device_get(u64 i, struct isv_device *out) { return i ? -ENOENT : device_find("console", out); }
u64 evtchn_upcalls(u64 port) { (void)port; return 0; }

long evtchn_init(void) { return 0; }

long evtchn_send(u64 port)
{
    char l[32];
    snprintf(l, sizeof l, "K %lu", (unsigned long)port);
    host_send(l);
    return 0;
}

u64 evtchn_wait(u64 mask, u64 timeout_ns)
{
    (void)timeout_ns;
    char l[16];
    host_send("W");
    host_recv(l, sizeof l);
    return l[0] == 'N' ? mask : 0;
}

int store_path(char *buf, u64 buflen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, buflen, fmt, ap);
    va_end(ap);
    return n < 0 || (u64)n >= buflen ? -E2BIG : 0;
}

long store_read_at(const char *dir, const char *node, char *buf, u64 buflen)
{
    char l[600], v[600];
    snprintf(l, sizeof l, "R %s/%s", dir, node);
    host_send(l);
    host_recv(v, sizeof v);
    if (v[0] != '=')
        return -ENOENT;
    u64 n = strlen(v + 1);
    if (buflen) {
        u64 k = n < buflen - 1 ? n : buflen - 1;
        memcpy(buf, v + 1, k);
        buf[k] = 0;
    }
    return (long)n;
}

long store_read_u64_at(const char *dir, const char *node, u64 *out)
{
    char v[64];
    long r = store_read_at(dir, node, v, sizeof v);
    if (r < 0)
        return r;
    u64 x = 0;
    for (const char *p = v; *p >= '0' && *p <= '9'; p++)
        x = x * 10 + (u64)(*p - '0');
    *out = x;
    return 0;
}

long store_write_at(const char *dir, const char *node, const char *value)
{
    char l[600];
    snprintf(l, sizeof l, "S %s/%s %s", dir, node, value);
    host_send(l);
    return 0;
}

long stub_hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                    uint64_t a5)
{
    char l[600];
    (void)a0; (void)a4; (void)a5;
    if (nr == HC_CONSOLE_WRITE)
        snprintf(l, sizeof l, "C %.*s", (int)a1, (const char *)(uintptr_t)a0);
    else if (nr == HC_DEVICE_FAULT)
        snprintf(l, sizeof l, "F %lu %.*s", (unsigned long)a1, (int)a3,
                 (const char *)(uintptr_t)a2);
    else
        snprintf(l, sizeof l, "H %lu", (unsigned long)nr);
    for (char *p = l; *p; p++)
        if (*p == '\n')
            *p = ' ';
    host_send(l);
    return 0;
}

int harness_run(void)
{
    static struct consfront c;
    static char buf[10000];
    char l[200];
    int r = consfront_open(&c, CONSFRONT_HANDSHAKE_TIMEOUT_NS);
    snprintf(l, sizeof l, "O %d", r);
    host_send(l);
    if (r)
        return 1;
    for (u32 i = 0; i < sizeof buf; i++)
        buf[i] = (char)((i * 7) % 251);
    for (u32 off = 0; off < sizeof buf; off += 1000) {
        long w = consfront_write(&c, buf + off, 1000);
        if (w != 1000) { /* a backend fault: what was written, then a failed frontend */
            long again = consfront_write(&c, buf, 1);
            snprintf(l, sizeof l, "E %ld %u %ld", w, off, again);
            host_send(l);
            return 2;
        }
    }
    host_send("D");
    int in = consfront_wait_input(&c, POLL_FOREVER);
    char inbuf[64];
    long n = consfront_read(&c, inbuf, sizeof inbuf);
    long w1 = consfront_write(&c, "echo:", 5);
    long w2 = consfront_write(&c, inbuf, (u32)n);
    snprintf(l, sizeof l, "X %d %ld %ld %ld %lu %lu %lu", in, n, w1, w2,
             (unsigned long)c.bytes_out, (unsigned long)c.kicks, (unsigned long)c.waits);
    host_send(l);
    return 0;
}
"""

_HOST_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int harness_run(void);
static void *region;

void host_send(const char *line) { printf("%s\n", line); fflush(stdout); }
void host_recv(char *buf, unsigned long n)
{
    if (!fgets(buf, (int)n, stdin))
        exit(9);
    buf[strcspn(buf, "\n")] = 0;
}
void *host_region(void) { return region; }

int main(int argc, char **argv)
{
    if (argc != 3)
        return 8;
    int fd = open(argv[1], O_RDWR);
    if (fd < 0)
        return 7;
    region = mmap(NULL, (size_t)atol(argv[2]), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (region == MAP_FAILED)
        return 6;
    return harness_run();
}
"""


def _build_harness(tmp: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    from domains.build import RUNTIME_DIR, generated_headers

    for name in (
        "isovisor.h",
        "blkfront.h",
        "consfront.h",
        "consfront.c",
        "devfront.h",
        "devfront.c",
    ):
        shutil.copy(RUNTIME_DIR / name, tmp / name)  # next to the stub hypercall.h
    for name, text in generated_headers().items():
        (tmp / name).write_text(text)
    (tmp / "isovisor_consif.h").write_text(consif.c_header())  # checks the copies in .h
    (tmp / "hypercall.h").write_text(_STUB_HYPERCALL_H)
    (tmp / "glue.c").write_text(_GLUE_C)
    (tmp / "host.c").write_text(_HOST_C)
    exe = tmp / "harness"
    cmd = [
        gcc,
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-I",
        str(tmp),
        "-o",
        str(exe),
        str(tmp / "consfront.c"),
        str(tmp / "devfront.c"),
        str(tmp / "glue.c"),
        str(tmp / "host.c"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return exe


@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.parametrize("evil", [False, True])
def test_the_c_frontend_against_the_backend(rig: Rig, evil: bool) -> None:
    exe = _build_harness(rig.dir)
    b, host = rig.backend()
    g = rig.guest(1, 5, "cguest")
    b.attach(g.attach_message())
    shared = ConsoleFront(g.mem[: consif.WINDOW_BYTES], init=False)  # for the evil backend
    fe_store = {"device/console/0/backend": g.store}
    proc = subprocess.Popen(
        [str(exe), str(g.segment.path), str(consif.SEGMENT_BYTES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert proc.stdin is not None and proc.stdout is not None
    lines: list[str] = []
    kick_pending = False
    typed = False
    notified = host.notifies[g.key]
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            kind, _, rest = line.partition(" ")
            reply = None
            if kind == "R":
                value = fe_store.get(rest, host.store.get(rest))
                reply = "-" if value is None else f"={value}"
            elif kind == "S":
                path, _, value = rest.partition(" ")
                if path == "device/console/0/state":
                    b.fe_state(g.key, int(value))
            elif kind == "K":
                kick_pending = True
                if evil and shared.get("out_prod") >= 3000:  # a backend gone mad
                    shared.set("out_cons", shared.get("out_prod") + 5000)
                    kick_pending = False
            elif kind in ("W", "D", "X", "E"):
                if kick_pending:  # the slow backend gets to it now
                    kick_pending = False
                    b.kick(g.key)
                if kind == "W" and lines.count("D") and not typed:
                    typed = True
                    b.devices[g.key].inq += b"typed\n"
                    b.kick(g.key)
                if kind == "W":
                    reply = "N" if host.notifies[g.key] > notified else "T"
                    notified = host.notifies[g.key]
            if reply is not None:
                proc.stdin.write(reply + "\n")
                proc.stdin.flush()
            if kind in ("X", "E"):
                break
        assert proc.wait(30) == 0 if not evil else proc.wait(30) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "O 0" in lines, lines[:20]
    pattern = bytes((i * 7) % 251 for i in range(10_000))
    if evil:
        fault = [x for x in lines if x.startswith("F ")]
        assert fault and fault[0].startswith("F 3 console console: backend out_cons="), lines
        e = lines[-1].split()
        # a partial write, or the fault right at the start of a chunk (the frontend runs on
        # while the test reacts to its kick)
        assert e[0] == "E" and (0 <= int(e[1]) < 1000 or e[1] == "-120"), lines[-5:]
        assert e[3] == "-120", lines[-5:]
        return
    assert host.store[f"{g.store}/state"] == "4"
    x = lines[-1].split()
    assert x[:5] == ["X", "1", "6", "5", "6"], lines[-5:]
    assert int(x[5]) == 10_011 and int(x[7]) > 0  # bytes out; waits on a full ring
    assert int(x[6]) < 60  # kicks: only when the backend asked
    assert rig.log("cguest") == pattern + b"echo:typed\n"
    assert host.faults == [] and not [x for x in lines if x.startswith("F ")]


# --- fault injection (drivers/faults.py; docs/campaigns.md) ------------------------------------

CONSOLE_TAKES = "segv, abort, exception, exit, hang, slow, drop, corrupt_data, leak_mem, leak_fd"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "kind", ["duplicate", "bad_id", "bad_status", "bad_op", "bad_index", "poison"]
)
def test_a_console_driver_refuses_faults_it_cannot_carry_out(rig: Rig, kind: str) -> None:
    b, _ = rig.backend()
    with pytest.raises(ValueError) as e:
        b.set_faults([{"id": 1, "type": kind, "sector": 0}])
    assert str(e.value).startswith(
        f"fault type {kind!r} does not apply to a console driver (device class console): "
    )
    assert str(e.value).endswith(f"a console driver takes: {CONSOLE_TAKES}")
    with pytest.raises(ValueError, match="op 'read' is not one of write"):
        b.set_faults([{"id": 2, "type": "exit", "op": "read"}])
    assert b._write == b._write_all  # nothing armed


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["exit", "segv", "abort", "hang", "exception"])
def test_a_crash_fault_tears_an_append_and_the_next_instance_finishes_it(
    rig: Rig, kind: str
) -> None:
    b1, host1 = rig.backend()
    g = rig.guest(1, 5, "web")
    connect(b1, host1, g)
    first, second = b"first line\n" * 10, blob(1000, 7)
    pour(b1, g, first)
    b1.set_faults([{"id": 3, "type": kind, "op": "write", "sector": len(first) + 10}])
    g.write(second)
    with pytest.raises(SimulatedCrash):
        b1.kick(g.key)
    assert rig.log("web") == first + second[:500]  # half of the append reached the file
    assert host1.fired == [(3, kind, "web/console")] and host1.injected == [kind]
    abandon(b1)
    b2, host2 = rig.backend()
    resume(b2, host2, g)
    assert rig.log("web") == first + second  # every byte once
    assert [(k, r) for k, r, _ in host2.recoveries] == [(g.key, 500)]


@pytest.mark.timeout(30)
def test_drop_leaves_the_output_in_the_ring_for_the_next_instance(rig: Rig) -> None:
    b1, host1 = rig.backend()
    g = rig.guest(1, 5, "web")
    connect(b1, host1, g)
    b1.set_faults([{"id": 1, "type": "drop"}])
    pour(b1, g, b"never consumed\n")
    assert rig.log("web") == b"" and b1.devices[g.key].state is Lifecycle.STOPPED
    pour(b1, g, b"nor this\n")  # kicks change nothing: the kernel's request timeout will
    assert rig.log("web") == b"" and g.front is not None and g.front.get("out_cons") == 0
    abandon(b1)
    b2, host2 = rig.backend()
    resume(b2, host2, g)
    assert rig.log("web") == b"never consumed\nnor this\n"


@pytest.mark.timeout(30)
def test_corrupt_data_flips_a_byte_in_the_log_only(rig: Rig) -> None:
    b, host = rig.backend()
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    b.set_faults([{"id": 1, "type": "corrupt_data"}])
    data = b"0123456789\n"
    pour(b, g, data)
    assert rig.log("web") == data[:5] + bytes([data[5] ^ 0xFF]) + data[6:]
    assert g.front is not None and g.front.get("out_cons") == len(data)
    pour(b, g, b"fine again\n")  # spent: the driver asks nothing any more
    assert rig.log("web").endswith(b"fine again\n") and b._write == b._write_all


@pytest.mark.timeout(30)
def test_slow_and_leaks_write_the_append_normally(rig: Rig) -> None:
    b, host = rig.backend()
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    b.set_faults(
        [
            {"id": 1, "type": "slow", "latency_ms": 1},
            {"id": 2, "type": "leak_mem"},
            {"id": 3, "type": "leak_fd"},
        ]
    )
    for line in (b"one\n", b"two\n", b"three\n"):
        pour(b, g, line)
    assert rig.log("web") == b"one\ntwo\nthree\n"
    assert [k for _, k, _ in host.fired] == ["slow", "leak_mem", "leak_fd"]
    assert host.injected == ["leak_mem", "leak_fd"] and host.fds == 256


# --- the sink hook (ConsoleBackend.output, save_sink, open_sink) --------------------------------


class Calls:
    """What sinks saw, across instances: every ``output`` call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bytes]] = []

    def handled(self, domain: str) -> bytes:
        """The bytes of ``domain`` a sink that skips what lies below the end of what it
        handled would have taken: each once, in order (asserting there is no gap)."""
        out, end = bytearray(), None
        for dom, offset, data in self.calls:
            if dom != domain:
                continue
            if end is None:
                end = offset
            assert offset <= end, f"a gap: {end} handled, then a chunk at {offset}"
            out += data[end - offset :]
            end = max(end, offset + len(data))
        return bytes(out)


def sink(calls: Calls, base: type[ConsoleBackend] = ConsoleBackend) -> type[ConsoleBackend]:
    """A sink class (on ``base``) recording into ``calls``."""

    def output(self: ConsoleBackend, console: Console, offset: int, data: bytes) -> None:
        calls.calls.append((console.domain, offset, data))

    return type("Sink", (base,), {"output": output})


@pytest.mark.timeout(30)
def test_the_sink_gets_every_byte_once_in_order_with_its_offset_in_the_log(rig: Rig) -> None:
    rig.log_dir.mkdir(parents=True, exist_ok=True)
    (rig.log_dir / "db.log").write_bytes(b"an earlier life\n")
    calls = Calls()
    b, host = rig.backend(sink(calls))
    web, db = rig.guest(1, 5, "web"), rig.guest(2, 6, "db")
    connect(b, host, web)
    connect(b, host, db)
    for i in range(20):  # interleaved, each many times the ring
        pour(b, web, blob(1500 + i, i))
        pour(b, db, blob(900 + i, 100 + i))
    b.detach(db.key)  # the last words go to the sink too
    for g in (web, db):
        mine = [(o, d) for dom, o, d in calls.calls if dom == g.domain]
        assert all(0 < len(d) <= consif.OUT_SIZE for _, d in mine)
        assert all(o2 == o1 + len(d1) for (o1, d1), (o2, _) in itertools.pairwise(mine))
        log = rig.log(g.domain)
        assert all(log[o : o + len(d)] == d for o, d in mine)  # the offset is in the log file
        assert b"".join(d for _, d in mine) == bytes(g.sent)
    assert next(o for dom, o, _ in calls.calls if dom == "db") == len(b"an earlier life\n")
    stats = b.statistics()
    assert stats["sink_errors"] == 0 and b.has_sink and host.faults == [] and host.errors == []


@pytest.mark.timeout(30)
def test_a_console_driver_without_a_sink_does_not_call_the_hook_or_report_it(rig: Rig) -> None:
    b, host = rig.backend()
    assert not b.has_sink
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    pour(b, g, b"plain\n")
    assert "sink_errors" not in b.statistics()
    assert "sink" not in b.save().devices[0].data  # drivers.console's state is unchanged


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("point", "again"),
    [
        ("journaled", False),  # died before the bytes reached the file: offered once, later
        ("mid-append", False),
        ("appended", False),  # in the file, not offered yet
        ("published", True),  # offered, not committed: offered again, the same chunk
    ],
)
def test_a_replacement_offers_a_journaled_append_again_with_the_same_offset(
    rig: Rig, point: str, again: bool
) -> None:
    calls = Calls()
    b1, host1 = rig.backend(sink(calls, crashing(point, nth=2, part=600)))
    g = rig.guest(1, 5, "web")
    connect(b1, host1, g)
    first, second, third = b"first line\n" * 10, blob(1500, 5), b"written while it was down\n"
    pour(b1, g, first)
    g.write(second)
    with pytest.raises(SimulatedCrash):
        b1.kick(g.key)
    offered = len(calls.calls)
    assert offered == (2 if again else 1)
    abandon(b1)
    g.write(third)
    b2, host2 = rig.backend(sink(calls))
    resume(b2, host2, g)
    assert rig.log("web") == first + second + third
    # the replacement finishes the journaled append first: the whole append, at its offset
    assert calls.calls[offered] == ("web", len(first), second)
    if again:
        assert calls.calls[offered - 1] == calls.calls[offered]
    assert calls.calls[-1] == ("web", len(first + second), third)
    assert calls.handled("web") == rig.log("web")  # exactly once, skipping by offset


@pytest.mark.timeout(120)
def test_random_crashes_a_sink_that_skips_by_offset_sees_every_byte_once(rig: Rig) -> None:
    """Instances killed at random points of random appends, some while finishing their
    predecessor's: every chunk offered is in the log at its offset, and skipping what lies
    below the end handled gives exactly the log."""
    rnd = random.Random(7)
    calls = Calls()
    g = rig.guest(1, 5, "web")
    b, host = rig.backend(sink(calls))
    connect(b, host, g)
    crashes = 0
    for _ in range(80):
        g.write(rnd.randbytes(rnd.randrange(1, 1500)))
        if rnd.random() < 0.5:
            b.kick(g.key)
            continue
        b.checkpoint = _crash_at(rnd.choice(["journaled", "appended", "published"]))  # type: ignore[method-assign,assignment]
        with contextlib.suppress(SimulatedCrash):
            b.kick(g.key)
        b.checkpoint = ConsoleBackend.checkpoint.__get__(b)  # type: ignore[method-assign]
        if not g.front or g.front.get("out_cons") == len(g.sent):
            continue  # nothing was left undone
        crashes += 1
        abandon(b)
        b, host = rig.backend(sink(calls))
        resume(b, host, g)
    b.kick(g.key)
    assert crashes > 10
    log = rig.log("web")
    assert log == bytes(g.sent)
    assert all(log[o : o + len(d)] == d for _, o, d in calls.calls)
    assert calls.handled("web") == log
    assert len(calls.calls) > len({o for _, o, _ in calls.calls})  # some were offered twice


@pytest.mark.timeout(30)
def test_an_exception_in_the_sink_is_counted_and_the_log_gets_every_byte(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(ConsoleBackend):
        def output(self, console: Console, offset: int, data: bytes) -> None:
            raise RuntimeError(f"sink bug at {offset}")

    b, host = rig.backend(Failing)
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    data = blob(30 * 1000, 3)
    for k in range(0, len(data), 1000):  # 30 appends at least
        pour(b, g, data[k : k + 1000])
    assert rig.log("web") == data
    assert g.front is not None and g.front.get("out_cons") == len(data)
    stats = b.statistics()
    assert int(stats["sink_errors"]) >= 30 and stats["out_bytes"] == len(data)
    logged = [r for r in caplog.records if "the sink's output raised" in r.getMessage()]
    assert len(logged) == 20  # the first 20, then every 1000th
    assert logged[0].exc_info is not None and "sink bug at 0" in str(logged[0].exc_info[1])
    assert host.faults == [] and host.errors == []


@pytest.mark.timeout(30)
def test_a_hot_swap_carries_what_the_sink_saves_and_a_plain_driver_drops_it(rig: Rig) -> None:
    opened: list[tuple[str, dict[str, Any]]] = []

    class Counting(ConsoleBackend):
        """Counts the bytes it saw; carries the count across a swap."""

        def open_sink(self, console: Console, data: dict[str, Any]) -> None:
            opened.append((console.domain, data))
            self.seen = data.get("seen", 0)

        def output(self, console: Console, offset: int, data: bytes) -> None:
            self.seen += len(data)

        def save_sink(self, console: Console) -> dict[str, Any]:
            return {"seen": self.seen}

    def swap(old: ConsoleBackend, cls: type[ConsoleBackend]) -> tuple[ConsoleBackend, FakeHost]:
        wire = msgpack.unpackb(msgpack.packb(old.save().to_wire()))
        old.suspend()
        new, host = rig.backend(cls)
        new.restore(BackendState.from_wire(wire))
        resume(new, host, g)
        return new, host

    b, host = rig.backend(Counting)
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    pour(b, g, b"x" * 5000)
    assert b.save().devices[0].data["sink"] == {"seen": 5000}
    b, host = swap(b, Counting)
    pour(b, g, b"y" * 100)
    assert opened == [("web", {}), ("web", {"seen": 5000})]
    assert b.save().devices[0].data["sink"] == {"seen": 5100}
    b, host = swap(b, ConsoleBackend)  # drivers.console carries no sink data on
    assert "sink" not in b.save().devices[0].data
    b, host = swap(b, Counting)
    assert opened[-1] == ("web", {})
    assert rig.log("web") == b"x" * 5000 + b"y" * 100

    class Unsendable(Counting):
        def save_sink(self, console: Console) -> dict[str, Any]:
            return {"fd": object()}

    b2, host2 = rig.backend(
        Unsendable, log_dir=str(rig.dir / "logs2"), socket_dir=str(rig.dir / "s2")
    )
    g2 = rig.guest(2, 6, "other")
    connect(b2, host2, g2)
    state = b2.save()  # the swap goes on, without the sink's data
    assert "sink" not in state.devices[0].data and b2.statistics()["sink_errors"] == 1
    with pytest.raises(StateError, match=r"data\.sink must be a map"):
        b2.restore(
            BackendState.from_wire(
                {
                    **state.to_wire(),
                    "devices": [
                        {**d.to_wire(), "data": {**d.data, "sink": [1]}} for d in state.devices
                    ],
                }
            )
        )
