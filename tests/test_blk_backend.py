"""The block driver end to end: this test plays the kernel (sockets, store, device segments) and
the guest's frontend (a FrontRing over the device region), against ``python -m drivers.host``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from drivers.blk.backend import Backend
from drivers.blk.storage import FileStorage, MemoryStorage, ReadOnlyError, StorageError
from drivers.host import check_store_path, start_inline
from ipc import blkif
from ipc.blkif import (
    DATA_OFFSET,
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    STATUS_EOPNOTSUPP,
    STATUS_ERROR,
    STATUS_OKAY,
    decode_response,
    encode_request,
)
from ipc.ring import FrontRing, InflightLog, InflightRecord, inflight_bytes, ring_bytes
from ipc.shm import Segment
from isovisor.procs import reap

ROOT = Path(__file__).resolve().parent.parent
PREFIX = f"isovisor-test.{os.getpid()}."
DRIVER = "blk0"
WAIT = 10.0
INFLIGHT_BYTES = inflight_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)
SEGMENT_BYTES = blkif.INFLIGHT_OFFSET + ((INFLIGHT_BYTES + 4095) & ~4095)
MiB = 1 << 20


class FakeKernel:
    """The kernel's side of the driver protocol: a PULL for driver messages, a PUSH to the
    driver, and a record of the store writes, notifications and faults it received."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(endpoint)
        self.push: zmq.Socket[Any] | None = None
        self.store: dict[str, str] = {}
        self.notifies: Counter[int] = Counter()
        self.faults: list[tuple[int, str]] = []
        self.errors: list[tuple[int, str]] = []
        self.recovered: list[tuple[int, int, int]] = []
        self.poisons: list[tuple[int, int, str]] = []
        self.hello: dict[str, Any] | None = None
        self.log: list[list[Any]] = []
        self.senders: set[bytes] = set()  # the name:pid frame before each message

    def close(self) -> None:
        self.pull.close(0)
        if self.push is not None:
            self.push.close(0)

    def _recv(self, timeout: float) -> bool:
        if not self.pull.poll(max(0, int(timeout * 1000))):
            return False
        sender, raw = self.pull.recv_multipart()
        msg = msgpack.unpackb(raw)
        self.senders.add(sender)
        self.log.append(msg)
        kind = msg[0]
        if kind == "hello":
            self.hello = msg[1]
        elif kind == "store":
            assert msg[1].startswith(f"/driver/{DRIVER}/"), msg
            self.store[msg[1]] = msg[2]
        elif kind == "notify":
            self.notifies[msg[1]] += 1
        elif kind == "fault":
            self.faults.append((msg[1], msg[2]))
        elif kind == "error":
            self.errors.append((msg[1], msg[2]))
        elif kind == "recovered":
            self.recovered.append((msg[1], msg[2], msg[3]))
        elif kind == "poison":
            self.poisons.append((msg[1], msg[2], msg[3]))
        else:
            raise AssertionError(f"unexpected message from the driver: {msg!r}")
        return True

    def drain(self) -> None:
        """Take whatever the driver has sent already (after it died, say)."""
        while self._recv(0.05):
            pass

    def wait(self, pred: Any, what: str, timeout: float = WAIT) -> None:
        """Take driver messages until ``pred()`` holds (the messages are the events)."""
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{what}: not seen within {timeout}s; last messages: {self.log[-10:]!r}"
                )
            self._recv(left)

    def connect_driver(self) -> None:
        self.wait(lambda: self.hello is not None, "driver hello")
        assert self.hello is not None
        if self.push is not None:
            self.push.close(0)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(self.hello["endpoint"])

    def send(self, *msg: Any) -> None:
        assert self.push is not None
        self.push.send(msgpack.packb(list(msg)))

    def send_raw(self, raw: bytes) -> None:
        assert self.push is not None
        self.push.send(raw)


class Device:
    """One virtual disk: its segment (created as the kernel would) and a Python frontend."""

    def __init__(
        self, kernel: FakeKernel, key: int, domid: int, disk: dict[str, Any], vdev: str = "xvda"
    ) -> None:
        self.kernel = kernel
        self.key = key
        self.devid = 51712 + 16 * (ord(vdev[-1]) - ord("a"))
        self.store = f"/driver/{DRIVER}/vbd/{domid}/{self.devid}"
        self.segment = Segment(f"{PREFIX}dom{domid}.{vdev}", SEGMENT_BYTES, create=True)
        self.view = memoryview(self.segment.buf)
        self.front: FrontRing | None = None
        self.next_id = 1
        self.attach_msg = {
            "key": key,
            "domid": domid,
            "domain": f"dom{domid}",
            "vdev": vdev,
            "devid": self.devid,
            "segment": self.segment.name,
            "window": blkif.WINDOW_BYTES,
            "inflight_offset": blkif.INFLIGHT_OFFSET,
            "store": self.store,
            "disk": disk,
        }

    def state(self) -> str | None:
        return self.kernel.store.get(f"{self.store}/state")

    def inflight(self) -> InflightLog:
        return InflightLog(
            self.view[blkif.INFLIGHT_OFFSET : blkif.INFLIGHT_OFFSET + INFLIGHT_BYTES],
            blkif.RING_SLOTS,
            blkif.SLOT_SIZE,
        )

    def pending(self) -> list[InflightRecord]:
        """What the in-flight log holds now (as a replacement driver would read it)."""
        return self.inflight().pending()

    def state_word(self, index: int) -> int:
        """The raw state word of ``index``'s record: bit 0 executing, bits 8.. deaths."""
        at = blkif.INFLIGHT_OFFSET + (index % blkif.RING_SLOTS) * (24 + blkif.SLOT_SIZE) + 16
        return int.from_bytes(self.view[at : at + 8], "little")

    def resume(self) -> None:
        """What the kernel does for a replacement driver: attach again, then tell it the
        frontend is connected already."""
        self.kernel.store[f"{self.store}/state"] = "1"  # the kernel resets the backend's state
        self.attach()
        self.kernel.send("fe_state", self.key, 4)

    def attach(self, expect: str = "2") -> None:
        self.kernel.send("attach", self.attach_msg)
        self.kernel.wait(lambda: self.state() in ("2", "6"), f"device {self.key} attach")
        assert self.state() == expect, self.kernel.store
        if expect == "6":  # a refused disk is reported as an error (after the store writes)
            self.kernel.wait(
                lambda: any(k == self.key for k, _ in self.kernel.errors),
                f"error for device {self.key}",
            )

    def connect(self) -> None:
        self.front = FrontRing(
            self.view[: ring_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)],
            blkif.RING_SLOTS,
            blkif.SLOT_SIZE,
        )
        self.kernel.send("fe_state", self.key, 3)
        self.kernel.wait(lambda: self.state() == "4", f"device {self.key} connected")

    def close(self) -> None:
        self.front = None
        self.view.release()
        with contextlib.suppress(BufferError):
            self.segment.close()
        self.segment.unlink()

    # -- I/O ------------------------------------------------------------------------------------
    def submit(self, reqs: list[bytes]) -> None:
        front = self.front
        assert front is not None
        for r in reqs:
            front.put_request(r)
        if front.push_requests():
            self.kernel.send("kick", self.key)

    def collect(self, count: int) -> list[tuple[int, int, int]]:
        """Wait for ``count`` responses: check the ring, and sleep on notifications only after
        a failed final check (as a guest does)."""
        front = self.front
        assert front is not None
        out: list[tuple[int, int, int]] = []
        while len(out) < count:
            while front.unconsumed_responses() and len(out) < count:
                out.append(decode_response(front.get_response()))
            if len(out) == count or front.final_check_for_responses():
                continue
            self.kernel.wait(
                lambda: self.kernel.notifies[self.key] > 0, f"notification for device {self.key}"
            )
            self.kernel.notifies[self.key] -= 1
        return out

    def run(self, reqs: list[bytes]) -> list[tuple[int, int, int]]:
        """Issue requests keeping the ring full; responses in order."""
        assert self.front is not None
        out: list[tuple[int, int, int]] = []
        pending = list(reqs)
        while pending or len(out) < len(reqs):
            k = min(self.front.free_slots(), len(pending))
            if k:
                self.submit(pending[:k])
                del pending[:k]
            out += self.collect(1)
            if not pending:
                out += self.collect(len(reqs) - len(out))
        return out

    def request(
        self, op: int, sector: int = 0, segs: list[tuple[int, int]] | None = None, **kw: Any
    ) -> bytes:
        rid = self.next_id
        self.next_id += 1
        return encode_request(rid, op, sector, segs or [], **kw)

    def write(self, sector: int, data: bytes, at: int = DATA_OFFSET) -> int:
        self.view[at : at + len(data)] = data
        ((_, op, status),) = self.run([self.request(OP_WRITE, sector, [(at, len(data))])])
        assert op == OP_WRITE
        return status

    def read(self, sector: int, nbytes: int, at: int = DATA_OFFSET) -> tuple[int, bytes]:
        self.view[at : at + nbytes] = b"\xee" * nbytes  # no stale data can pass for a good read
        ((_, op, status),) = self.run([self.request(OP_READ, sector, [(at, nbytes)])])
        assert op == OP_READ
        return status, bytes(self.view[at : at + nbytes])


def pattern(tag: int, n: int) -> bytes:
    return bytes((tag * 7 + i * 13 + (i >> 9)) & 0xFF for i in range(n))


class Rig:
    """A driver under test plus the fake kernel; everything is torn down at the end."""

    def __init__(self, tmp: Path, ctx: zmq.Context[Any]) -> None:
        self.tmp = tmp
        self.ctx = ctx
        self.kernel = FakeKernel(ctx, f"ipc://{tmp}/kernel.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.devices: list[Device] = []
        self.extra_shm: list[Path] = []
        self.log_path = tmp / "driver.log"

    def start(self, options: str = "{}") -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "drivers.host",
                    "--name",
                    DRIVER,
                    "--module",
                    "drivers.blk",
                    "--kernel",
                    self.kernel.endpoint,
                    "--listen",
                    f"ipc://{self.tmp}/driver.sock",
                    "--options",
                    options,
                    "--parent-pid",
                    str(os.getpid()),
                    "--log-level",
                    "INFO",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.kernel.connect_driver()
        assert self.kernel.hello is not None
        assert self.kernel.hello["pid"] == self.proc.pid
        assert self.kernel.hello["module"] == "drivers.blk"
        return self.proc

    def restart(self, options: str = "{}") -> subprocess.Popen[bytes]:
        """Kill the driver (as a crash would) and start a replacement."""
        assert self.proc is not None
        reap([self.proc.pid])
        self.proc.wait(5)
        self.kernel.hello = None
        return self.start(options)

    def device(
        self,
        key: int,
        domid: int,
        disk: dict[str, Any],
        vdev: str = "xvda",
        attach: str | None = "2",
        connect: bool = True,
    ) -> Device:
        d = Device(self.kernel, key, domid, disk, vdev)
        self.devices.append(d)
        if attach is not None:
            d.attach(attach)
            if connect and attach == "2":
                d.connect()
        return d

    def image(self, name: str = "disk.img") -> Path:
        return self.tmp / name

    def driver_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = WAIT) -> int:
        """The driver's exit status once it ends by itself (negative: killed by a signal)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def teardown(self) -> None:
        if self.proc is not None:
            reap([self.proc.pid])
            self.proc.wait(5)
        self.kernel.close()
        for d in self.devices:
            d.close()
        for p in self.extra_shm:
            p.unlink(missing_ok=True)


@pytest.fixture
def rig() -> Iterator[Rig]:
    tmp = Path(tempfile.mkdtemp(prefix="ivblk-", dir="/tmp"))  # short: ipc:// paths are limited
    ctx: zmq.Context[Any] = zmq.Context()
    r = Rig(tmp, ctx)
    try:
        yield r
    finally:
        r.teardown()
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)
        left = sorted(p.name for p in Path("/dev/shm").glob(PREFIX + "*"))
        for name in left:
            (Path("/dev/shm") / name).unlink(missing_ok=True)
        assert not left, f"shared-memory segments left behind: {left}"


def file_disk(path: Path, size: int | None = 4 * MiB, access: str = "rw") -> dict[str, Any]:
    return {"target": str(path), "type": "file", "access": access, "size": size}


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_write_then_read_back_through_the_ring(rig: Rig) -> None:
    rig.start()
    img = rig.image()
    dev = rig.device(1, 1, file_disk(img, 64 * MiB))
    st = rig.kernel.store
    assert st[f"{dev.store}/sectors"] == str(64 * MiB // 512)
    assert st[f"{dev.store}/sector-size"] == "512"
    assert st[f"{dev.store}/info"] == "0"
    assert st[f"{dev.store}/feature-flush-cache"] == "1"
    assert st[f"{dev.store}/feature-discard"] == "1"
    assert img.stat().st_size == 64 * MiB
    assert img.stat().st_blocks * 512 < MiB, "the image was not created sparse"

    # 64 writes of 4 KiB at scattered sectors, 32 in flight, each from its own buffer
    sectors = [(i * 7919) % (64 * MiB // 512 - 8) for i in range(64)]
    assert len(set(sectors)) == 64 and all(
        abs(a - b) >= 8 for a in sectors for b in sectors if a != b
    )
    reqs = [
        dev.request(OP_WRITE, s, [(DATA_OFFSET + (i % 32) * 4096, 4096)])
        for i, s in enumerate(sectors)
    ]
    # buffers are reused after 32: issue in two rounds so each write reads its own buffer
    for i in range(32):
        at = DATA_OFFSET + i * 4096
        dev.view[at : at + 4096] = pattern(i, 4096)
    res = dev.run(reqs[:32])
    for i in range(32, 64):
        at = DATA_OFFSET + (i % 32) * 4096
        dev.view[at : at + 4096] = pattern(i, 4096)
    res += dev.run(reqs[32:])
    assert [r[2] for r in res] == [STATUS_OKAY] * 64
    assert [r[0] for r in res] == list(range(1, 65))

    # read back, the last writer of each sector wins (sectors are distinct here)
    for i, s in enumerate(sectors):
        status, data = dev.read(s, 4096, at=DATA_OFFSET + 0x20000)
        assert status == STATUS_OKAY and data == pattern(i, 4096), f"sector {s}"
    # a multi-segment read gathers consecutive sectors into scattered buffers
    segs = [(DATA_OFFSET + 0x40000, 1024), (DATA_OFFSET + 0x10000, 3072)]
    ((_, _, status),) = dev.run([dev.request(OP_READ, sectors[5], segs)])
    assert status == STATUS_OKAY
    got = bytes(dev.view[segs[0][0] : segs[0][0] + 1024]) + bytes(
        dev.view[segs[1][0] : segs[1][0] + 3072]
    )
    assert got == pattern(5, 4096)

    with open(img, "rb") as f:
        for i, s in enumerate(sectors):
            f.seek(s * 512)
            assert f.read(4096) == pattern(i, 4096)
    assert rig.alive()
    # SIGTERM is a clean stop: the devices are detached (their counters logged), status 0
    assert rig.proc is not None
    rig.proc.terminate()
    assert rig.proc.wait(10) == 0
    assert "device 1 (dom1/xvda) detached: 129 requests, 0 errors" in rig.driver_log()


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_a_disk_copied_along_has_each_write_and_discard_marked_even_across_a_restart(
    rig: Rig,
) -> None:
    """``["mirror", key, true]`` (a migration --with-disks): the driver says ``on`` in the
    store and marks the 4 KiB blocks of every write and discard in the write map from then on;
    a replacement instance finds the map and goes on; ``false`` removes it."""
    rig.start()
    dev = rig.device(1, 1, file_disk(rig.image()), attach=None)
    dev.attach_msg["scratch"] = f"{PREFIX}dom1.xvda.scratch"
    wmap = Path("/dev/shm") / f"{PREFIX}dom1.xvda.scratch.mirror"
    rig.extra_shm.append(wmap)
    dev.attach()
    dev.connect()
    st = rig.kernel.store
    assert dev.write(0, pattern(1, 4096)) == STATUS_OKAY  # before: not marked
    rig.kernel.send("mirror", 1, True)
    rig.kernel.wait(lambda: st.get(f"{dev.store}/mirror") == "on", "mirror on")
    marked = lambda: {i for i, b in enumerate(wmap.read_bytes()) if b}  # noqa: E731
    assert wmap.stat().st_size == 4 * MiB // 4096 and marked() == set()
    assert dev.write(80, pattern(2, 4096)) == STATUS_OKAY  # block 10
    assert dev.write(8 * 300 + 4, pattern(3, 1024)) == STATUS_OKAY  # inside block 300
    ((_, _, status),) = dev.run([dev.request(OP_DISCARD, 8 * 500, nr_sectors=16)])
    assert status == STATUS_OKAY
    assert marked() == {10, 300, 500, 501}
    rig.restart()  # a crash: the map stays, and the next instance marks on
    dev.resume()
    rig.kernel.wait(lambda: dev.state() == "4", "resumed")
    assert dev.write(8 * 20, pattern(4, 4096)) == STATUS_OKAY
    assert marked() == {10, 20, 300, 500, 501}
    rig.kernel.send("mirror", 1, False)
    rig.kernel.wait(lambda: st.get(f"{dev.store}/mirror") == "off", "mirror off")
    assert not wmap.exists()
    rig.kernel.send("mirror", 7, True)  # an unknown device: logged, nothing else
    rig.kernel.send("mirror", "x", True)  # malformed: refused by the host
    assert dev.write(8 * 30, pattern(5, 4096)) == STATUS_OKAY and rig.alive()
    assert "mirror for unknown device 7" in rig.driver_log()


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_read_only_flush_discard_and_memory_disks(rig: Rig) -> None:
    rig.start('{"max_batch": 4}')
    ro_img = rig.image("ro.img")
    original = pattern(9, 1 * MiB)
    ro_img.write_bytes(original)
    ro = rig.device(1, 1, file_disk(ro_img, MiB, "ro"))
    assert rig.kernel.store[f"{ro.store}/info"] == "1"
    assert ro.read(16, 4096) == (STATUS_OKAY, original[16 * 512 : 16 * 512 + 4096])
    assert ro.write(16, b"\x01" * 4096) == STATUS_ERROR
    ((_, op, status),) = ro.run([ro.request(OP_DISCARD, 0, nr_sectors=8)])
    assert (op, status) == (OP_DISCARD, STATUS_ERROR)
    assert ro_img.read_bytes() == original

    rw = rig.device(2, 1, file_disk(rig.image("rw.img"), MiB), vdev="xvdb")
    data = pattern(3, 64 * 512)
    assert rw.write(0, data) == STATUS_OKAY
    res = rw.run([rw.request(OP_FLUSH), rw.request(OP_DISCARD, 8, nr_sectors=8)])
    assert [(op, s) for _, op, s in res] == [(OP_FLUSH, STATUS_OKAY), (OP_DISCARD, STATUS_OKAY)]
    status, back = rw.read(0, len(data))
    assert status == STATUS_OKAY
    assert back == data[: 8 * 512] + bytes(8 * 512) + data[16 * 512 :]

    mem_name = f"{PREFIX}mem0"
    rig.extra_shm.append(Path("/dev/shm") / mem_name)
    mem = rig.device(3, 2, {"target": mem_name, "type": "memory", "access": "rw", "size": 2 * MiB})
    assert rig.kernel.store[f"{mem.store}/sectors"] == str(2 * MiB // 512)
    reqs, expect = [], []
    for i in range(40):  # more than max_batch and more than the ring: several batches
        at = DATA_OFFSET + (i % 32) * 4096
        if i == 32:
            assert [s for _, _, s in mem.run(reqs)] == [STATUS_OKAY] * 32
            reqs = []
        mem.view[at : at + 4096] = pattern(100 + i, 4096)
        reqs.append(mem.request(OP_WRITE, i * 8, [(at, 4096)]))
        expect.append(pattern(100 + i, 4096))
    assert [s for _, _, s in mem.run(reqs)] == [STATUS_OKAY] * 8
    assert mem.read(0, 40 * 4096) == (STATUS_ERROR, b"\xee" * 40 * 4096)  # > 128 KiB
    for i in range(40):
        assert mem.read(i * 8, 4096) == (STATUS_OKAY, expect[i])
    shm_file = Path("/dev/shm") / mem_name
    assert shm_file.read_bytes()[: 40 * 4096] == b"".join(expect)
    assert rig.alive()


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_bad_disks_are_refused_in_the_store_with_an_error(rig: Rig) -> None:
    rig.start()
    missing = rig.device(1, 1, file_disk(rig.image("nope.img"), None), attach="6")
    assert "give size=" in rig.kernel.store[f"{missing.store}/error"]
    assert rig.kernel.errors[-1][0] == 1 and "give size=" in rig.kernel.errors[-1][1]
    assert rig.kernel.faults == []  # not the guest's fault: the kernel must not crash it
    wrong = rig.image("small.img")
    wrong.write_bytes(bytes(4096))
    bad = rig.device(2, 1, file_disk(wrong, MiB), vdev="xvdb", attach="6")
    assert (
        "is 4096 bytes but the disk is configured with size 1048576"
        in rig.kernel.store[f"{bad.store}/error"]
    )
    assert rig.kernel.errors[-1][0] == 2
    # one image cannot be written by two devices at once
    shared = rig.image("shared.img")
    rig.device(3, 2, file_disk(shared))
    twice = rig.device(4, 3, file_disk(shared), attach="6")
    assert "in use" in rig.kernel.store[f"{twice.store}/error"]
    assert rig.alive()


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_garbage_requests_and_messages_are_answered_and_others_keep_working(rig: Rig) -> None:
    rig.start()
    victim = rig.device(1, 1, file_disk(rig.image("a.img")))
    other = rig.device(2, 2, file_disk(rig.image("b.img")))
    assert other.write(3, pattern(1, 4096)) == STATUS_OKAY
    sectors = 4 * MiB // 512
    garbage = [
        (victim.request(OP_READ, sectors - 4, [(DATA_OFFSET, 4096)]), STATUS_ERROR),
        (victim.request(OP_READ, 0, [(DATA_OFFSET, 512)], nr_segments=9), STATUS_ERROR),
        (victim.request(OP_WRITE, 0, [(0x200, 512)]), STATUS_ERROR),  # the ring page
        (victim.request(OP_WRITE, 0, [(blkif.WINDOW_BYTES, 512)]), STATUS_ERROR),  # in-flight log
        (victim.request(7), STATUS_EOPNOTSUPP),
        (victim.request(OP_DISCARD, 0), STATUS_ERROR),
        (victim.request(OP_READ, 2**64 - 1, [(DATA_OFFSET, 512)]), STATUS_ERROR),
    ]
    res = victim.run([g for g, _ in garbage])
    assert [(rid, status) for rid, _, status in res] == [
        (i + 1, want) for i, (_, want) in enumerate(garbage)
    ]
    assert res[4][1] == 7  # the op is echoed
    # the kernel sends nonsense: logged and ignored
    for raw in (
        b"\xc1",
        msgpack.packb({"a": 1}),
        msgpack.packb([]),
        msgpack.packb(["bogus", 1]),
        msgpack.packb(["kick", "x"]),
        msgpack.packb(["fe_state", 1]),
        msgpack.packb(["attach", 5]),
        msgpack.packb(["kick", 99]),
        msgpack.packb(["detach", 98]),
        msgpack.packb(["attach", {"key": "k"}]),
    ):
        rig.kernel.send_raw(raw)
    assert victim.write(0, pattern(2, 4096)) == STATUS_OKAY
    assert victim.read(0, 4096) == (STATUS_OKAY, pattern(2, 4096))
    assert other.read(3, 4096) == (STATUS_OKAY, pattern(1, 4096))
    log = rig.driver_log()
    for what in (
        "not msgpack",
        "not a non-empty list",
        "unknown type 'bogus'",
        "malformed kick message",
        "malformed fe_state message",
        "malformed attach message",
        "request 0x1 refused (status -1): sector",
    ):
        assert what in log, f"{what!r} not in the driver log:\n{log}"
    assert rig.kernel.faults == []
    assert rig.alive()


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_hostile_ring_indices_fault_only_that_device(rig: Rig) -> None:
    rig.start()
    jump = rig.device(1, 1, file_disk(rig.image("a.img")))
    good = rig.device(2, 2, file_disk(rig.image("b.img")))
    back = rig.device(3, 3, file_disk(rig.image("c.img")))
    for d in (jump, good, back):
        assert d.write(1, pattern(d.key, 4096)) == STATUS_OKAY
    idx = jump.view[:64].cast("Q")
    idx[0] = idx[0] + blkif.RING_SLOTS + 1  # req_prod jumps past the ring
    rig.kernel.send("kick", jump.key)
    rig.kernel.wait(lambda: rig.kernel.faults, "fault for the jumping device")
    key, msg = rig.kernel.faults[0]
    assert key == jump.key and "req_prod=" in msg and "past the ring size" in msg
    idx.release()
    assert good.read(1, 4096) == (STATUS_OKAY, pattern(2, 4096))

    for _ in range(3):
        assert back.read(1, 4096) == (STATUS_OKAY, pattern(3, 4096))
    idx = back.view[:64].cast("Q")
    idx[0] = idx[0] - 2  # req_prod moves backwards
    idx.release()
    rig.kernel.send("kick", back.key)
    rig.kernel.wait(lambda: len(rig.kernel.faults) == 2, "fault for the backwards device")
    assert rig.kernel.faults[1][0] == back.key and "moved backwards" in rig.kernel.faults[1][1]
    assert good.write(2, pattern(4, 4096)) == STATUS_OKAY
    assert good.read(2, 4096) == (STATUS_OKAY, pattern(4, 4096))
    # detaching the broken devices and closing the frontend of the good one is orderly
    rig.kernel.send("detach", jump.key)
    rig.kernel.send("detach", back.key)
    rig.kernel.send("fe_state", good.key, 5)
    rig.kernel.wait(lambda: good.state() == "6", "backend closed")
    assert rig.alive()


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_replacement_driver_redoes_unfinished_requests_from_the_inflight_log(rig: Rig) -> None:
    rig.start()
    dev = rig.device(1, 1, file_disk(rig.image()))
    assert dev.write(0, pattern(1, 4096)) == STATUS_OKAY
    front = dev.front
    assert front is not None
    rig.restart()  # the driver dies; the segment (kernel-owned) and the image stay

    # What a driver that crashed mid-batch leaves behind: requests 1..3 published, 1 and 2
    # begun in the in-flight log and their slots already overwritten by (unpublished)
    # responses, 3 not taken yet; plus a stale record for request 0, answered but not retired.
    base = front.req_prod_pvt  # = rsp_prod: request 0 (the write above) is answered
    dev.view[DATA_OFFSET + 0x1000 : DATA_OFFSET + 0x2000] = pattern(2, 4096)
    reqs = [
        dev.request(OP_WRITE, 8, [(DATA_OFFSET + 0x1000, 4096)]),
        dev.request(OP_READ, 0, [(DATA_OFFSET + 0x3000, 4096)]),
        dev.request(OP_READ, 8, [(DATA_OFFSET + 0x5000, 4096)]),
    ]
    dev.submit(reqs)
    log = dev.inflight()
    # (the killed driver may have left request 0's record itself: it retires a record only
    # after publishing the response, and the test may have killed it in between)
    log.end(base - 1)
    log.begin(base - 1, dev.request(OP_WRITE, 100, [(DATA_OFFSET, 4096)]))  # stale
    for i in range(2):
        log.begin(base + i, reqs[i])
        slot = 64 + ((base + i) % blkif.RING_SLOTS) * blkif.SLOT_SIZE
        dev.view[slot : slot + blkif.SLOT_SIZE] = b"\xab" * blkif.SLOT_SIZE
    log.mark_executing(base + 1)  # the driver died in the middle of request 2
    del log

    t0 = time.monotonic_ns()
    dev.resume()
    res = dev.collect(3)
    t1 = time.monotonic_ns()
    assert res == [(2, OP_WRITE, STATUS_OKAY), (3, OP_READ, STATUS_OKAY), (4, OP_READ, STATUS_OKAY)]
    rig.kernel.wait(lambda: dev.state() == "4", "backend state Connected")
    # two requests redone (the third was never begun: it is simply served), reported with the
    # CLOCK_MONOTONIC time their responses were published
    rig.kernel.wait(lambda: rig.kernel.recovered, "recovered")
    ((key, replayed, done_ns),) = rig.kernel.recovered
    assert (key, replayed) == (dev.key, 2) and t0 < done_ns < t1
    # a death was counted for the executing one (one of the 3 allowed: it was redone)
    assert dev.state_word(base + 1) == 1 << 8 and dev.state_word(base) == 0
    assert (
        f"the request at ring index {base + 1} was executing when the previous driver "
        "instance died (1 death of 3 allowed)"
    ) in rig.driver_log()
    assert rig.kernel.poisons == []
    assert bytes(dev.view[DATA_OFFSET + 0x3000 : DATA_OFFSET + 0x4000]) == pattern(1, 4096)
    assert bytes(dev.view[DATA_OFFSET + 0x5000 : DATA_OFFSET + 0x6000]) == pattern(2, 4096)
    with open(rig.image(), "rb") as f:
        f.seek(100 * 512)
        assert f.read(4096) == bytes(4096), "the stale record was redone"
    assert dev.read(8, 4096) == (STATUS_OKAY, pattern(2, 4096))
    # everything before that read is retired (the read's own record may not be yet: the
    # driver retires it just after publishing the response)
    assert [r.index for r in dev.pending()] in ([], [base + 3])


def fault_options(kind: str, sector: int = 40, **more: int) -> str:
    return json.dumps({"fault_sector": sector, "fault_kind": kind, **more})


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_request_that_kills_poison_after_drivers_is_answered_with_an_error(rig: Rig) -> None:
    opts = fault_options("exit", poison_after=2)
    rig.start(opts)
    dev = rig.device(1, 1, file_disk(rig.image()))
    assert dev.write(0, pattern(1, 4096)) == STATUS_OKAY  # sectors 0..7: no fault
    front = dev.front
    assert front is not None
    base = front.req_prod_pvt
    dev.view[DATA_OFFSET + 0x1000 : DATA_OFFSET + 0x3000] = pattern(2, 8192)
    good = dev.request(OP_WRITE, 16, [(DATA_OFFSET + 0x1000, 4096)])
    poison = dev.request(OP_WRITE, 36, [(DATA_OFFSET + 0x2000, 4096)])  # 36..43 covers 40
    after = dev.request(OP_READ, 0, [(DATA_OFFSET + 0x4000, 4096)])
    dev.submit([good, poison, after])
    assert rig.wait_exit() == 3  # died acting on the poison request
    rec_good, rec_poison = dev.pending()
    assert (rec_good.index, rec_good.executing, rec_good.deaths) == (base, False, 0)
    assert (rec_poison.index, rec_poison.executing, rec_poison.deaths) == (base + 1, True, 0)
    assert rec_poison.request[: len(poison)] == poison

    # the second instance counts a death (1 < 2), redoes both, and dies on it again
    rig.restart(opts)
    dev.resume()
    assert rig.wait_exit() == 3
    assert [(r.executing, r.deaths) for r in dev.pending()] == [(False, 0), (True, 1)]
    assert front.unconsumed_responses() == 0  # nothing published by the dead instances

    # the third counts the second death: poison.  It redoes the other one, answers the
    # poison request with an error, reports it, and goes on serving.
    rig.restart(opts)
    t0 = time.monotonic_ns()
    dev.resume()
    res = dev.collect(3)
    assert res == [
        (2, OP_WRITE, STATUS_OKAY),
        (3, OP_WRITE, STATUS_ERROR),
        (4, OP_READ, STATUS_OKAY),
    ]
    rig.kernel.wait(lambda: rig.kernel.recovered and rig.kernel.poisons, "recovered, poison")
    ((key, index, description),) = rig.kernel.poisons
    assert (key, index) == (dev.key, base + 1)
    assert description.startswith(
        "write id=0x3 sector=36 nr_sectors=8 segments=[(0x3000, "
        "4096)]: 2 driver instances died executing it"
    )
    ((key, replayed, done_ns),) = rig.kernel.recovered
    assert (key, replayed) == (dev.key, 1) and done_ns > t0  # the poison one was not redone
    assert rig.alive()
    log = rig.driver_log()
    assert f"poison request at ring index {base + 1}: write id=0x3 sector=36" in log
    assert bytes(dev.view[DATA_OFFSET + 0x4000 : DATA_OFFSET + 0x5000]) == pattern(1, 4096)
    with open(rig.image(), "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == pattern(2, 8192)[:4096]  # the good write was redone
        f.seek(36 * 512)
        assert f.read(4096) == bytes(4096)  # the poison write never happened
    assert dev.read(16, 4096) == (STATUS_OKAY, pattern(2, 8192)[:4096])
    # all three are retired (the read's own record may still be there: see the test above)
    assert [r.index for r in dev.pending()] in ([], [base + 3])
    assert rig.kernel.faults == []


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_backend_exception_exits_70_and_the_replacement_redoes_the_request(rig: Rig) -> None:
    rig.start(fault_options("exception"))
    dev = rig.device(1, 1, file_disk(rig.image()))
    dev.view[DATA_OFFSET : DATA_OFFSET + 4096] = pattern(5, 4096)
    dev.submit([dev.request(OP_WRITE, 40, [(DATA_OFFSET, 4096)])])
    assert rig.wait_exit() == 70
    rig.kernel.drain()
    # a bug of the backend is not the guest's doing: no fault, the device is not broken
    assert rig.kernel.faults == []
    log = rig.driver_log()
    assert "unhandled exception; exiting with status 70" in log and "InjectedFault" in log
    (rec,) = dev.pending()
    assert rec.executing and rec.deaths == 0

    rig.restart()  # a replacement without the fault: the request is redone and succeeds
    t0 = time.monotonic_ns()
    dev.resume()
    assert dev.collect(1) == [(1, OP_WRITE, STATUS_OKAY)]
    rig.kernel.wait(lambda: rig.kernel.recovered, "recovered")
    ((key, replayed, done_ns),) = rig.kernel.recovered
    assert (key, replayed) == (dev.key, 1) and done_ns > t0
    assert dev.read(40, 4096) == (STATUS_OKAY, pattern(5, 4096))

    # a replacement with nothing to redo reports recovered too, with the connect time
    rig.restart()
    t0 = time.monotonic_ns()
    dev.resume()
    rig.kernel.wait(lambda: len(rig.kernel.recovered) == 2, "second recovered")
    key, replayed, done_ns = rig.kernel.recovered[1]
    assert (key, replayed) == (dev.key, 0) and done_ns > t0
    assert dev.read(40, 4096) == (STATUS_OKAY, pattern(5, 4096))
    assert rig.kernel.poisons == [] and rig.kernel.faults == []


class _QuietHost:
    name = DRIVER
    log = logging.getLogger("test.blk")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"poison_after": 0}, "poison_after must be an integer 1..100, got 0"),
        ({"poison_after": 101}, "poison_after must be an integer 1..100"),
        ({"poison_after": True}, "poison_after must be an integer"),
        ({"fault_sector": 3}, "give both or neither"),
        ({"fault_kind": "exit"}, "give both or neither"),
        ({"fault_sector": -1, "fault_kind": "exit"}, "fault_sector must be an integer"),
        ({"fault_sector": 1, "fault_kind": "melt"}, "fault_kind must be one of exit, exception"),
        (
            {"poison": 3},
            "unknown block backend option(s) poison (did you mean poison_after?); "
            "allowed: max_batch, poison_after,",
        ),
    ],
)
def test_recovery_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Backend(_QuietHost(), options)  # type: ignore[arg-type]
    b = Backend(_QuietHost(), {"poison_after": 100, "fault_sector": 0, "fault_kind": "leak"})
    assert b.poison_after == 100 and b.fault is not None and b.fault.kind == "leak"
    assert Backend(_QuietHost(), {}).poison_after == 3


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_driver_maps_only_its_device_segment(rig: Rig) -> None:
    ram = Segment(f"{PREFIX}guest-ram", MiB, create=True)  # fake guest RAM, never mentioned
    rig.extra_shm.append(ram.path)
    try:
        proc = rig.start()
        dev = rig.device(1, 1, file_disk(rig.image()))
        assert dev.write(0, pattern(0, 4096)) == STATUS_OKAY
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        ours = {line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line}
        assert str(dev.segment.path) in ours
        assert not {p for p in ours if PREFIX in p} - {str(dev.segment.path)}, ours
        # after detach the segment is unmapped
        rig.kernel.send("detach", dev.key)
        other = rig.device(2, 2, file_disk(rig.image("b.img")))  # a round trip: detach is done
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert str(dev.segment.path) not in maps
        assert str(other.segment.path) in maps
    finally:
        ram.close()
        ram.unlink()


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_bad_options_exit_with_status_2(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "drivers.host",
            "--name",
            DRIVER,
            "--module",
            "drivers.blk",
            "--kernel",
            f"ipc://{tmp_path}/k",
            "--listen",
            f"ipc://{tmp_path}/d",
            "--options",
            '{"max_batch": 4, "bogus": 1}',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 2, r.stderr
    assert "unknown block backend option(s) bogus" in r.stderr and "max_batch" in r.stderr


def test_storage_edges(tmp_path: Path) -> None:
    img = tmp_path / "e.img"
    st = FileStorage(img, 64 * 1024)
    try:
        buf = bytearray(b"\xff" * 8192)
        st.write_from(0, memoryview(b"\x11" * 8192))
        os.truncate(img, 4096)  # shrunk behind our back: the tail reads as zeros
        st.readv_into(0, [memoryview(buf)[:1024], memoryview(buf)[1024:]])
        assert buf == b"\x11" * 4096 + bytes(4096)
        st.write_from(0, memoryview(b"\x22" * 8192))
        st._punch = False  # a file system without hole punching: zeros are written
        st.discard(512, 1024)
        st.read_into(0, memoryview(buf))
        assert buf == b"\x22" * 512 + bytes(1024) + b"\x22" * (8192 - 1536)
        with pytest.raises(StorageError, match="in use"):
            FileStorage(img, None, readonly=True)
    finally:
        st.close()
    ro = FileStorage(img, None, readonly=True)
    try:
        assert ro.size == 8192 and ro.sectors == 16
        with pytest.raises(ReadOnlyError):
            ro.write_from(0, memoryview(bytes(512)))
    finally:
        ro.close()
    with pytest.raises(StorageError, match="never created"):
        FileStorage(tmp_path / "missing.img", 4096, readonly=True)
    with pytest.raises(StorageError, match="not a positive multiple of 512"):
        FileStorage(tmp_path / "odd.img", 1000)
    name = f"{PREFIX}mem-ro"
    try:
        mem = MemoryStorage(name, 4096, readonly=True)
        buf = bytearray(b"\x01" * 4096)
        mem.read_into(0, memoryview(buf))
        assert buf == bytes(4096) and mem.readonly
        mem.close()
        again = MemoryStorage(name, None)  # a later driver reopens it at its size
        assert again.size == 4096
        again.close()
        with pytest.raises(StorageError, match="is 4096 bytes but"):
            MemoryStorage(name, 8192)
    finally:
        (Path("/dev/shm") / name).unlink(missing_ok=True)


def test_store_paths_are_confined_to_the_driver() -> None:
    assert check_store_path("blk0", "/driver/blk0/vbd/1/51712/state")
    for bad in (
        "/driver/blk1/x",
        "/driver/blk0/",
        "/local/domain/1/x",
        "/driver/blk0/../x",
        "/driver/blk0//x",
        5,
    ):
        with pytest.raises(ValueError):
            check_store_path("blk0", bad)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_inline_driver_shares_the_kernels_context() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ivblk-", dir="/tmp"))
    ctx: zmq.Context[Any] = zmq.Context()
    kernel = FakeKernel(ctx, f"inproc://kernel-{os.getpid()}")
    drv = None
    dev = None
    try:
        drv = start_inline(
            DRIVER,
            "drivers.blk",
            {"max_batch": 8},
            ctx,
            kernel.endpoint,
            f"inproc://{DRIVER}-{os.getpid()}",
        )
        kernel.connect_driver()
        assert kernel.hello is not None and kernel.hello["pid"] == os.getpid()
        dev = Device(kernel, 7, 1, file_disk(tmp / "inline.img"))
        dev.attach()
        dev.connect()
        assert dev.write(10, pattern(7, 8192)) == STATUS_OKAY
        assert dev.read(10, 8192) == (STATUS_OKAY, pattern(7, 8192))
        drv.stop()
        assert not drv.alive
    finally:
        if drv is not None:
            drv.stop()
        kernel.close()
        if dev is not None:
            dev.close()
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)
