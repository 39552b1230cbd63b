"""drivers/blk/export.py without a stack: which storage is a raw view of its medium, the
write-through and the dirty map (in tmpfs, so it outlives the process that marked it), the
export of the marked blocks; and the memory backend on a new image (issue 22 items 2 and 7).
tests/test_sdk_opaque.py kills a real such backend in every phase of a swap."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from drivers.blk.export import BLOCK, DirtyMap, Exported, raw_view
from drivers.blk.storage import SHM_DIR, FileStorage, MemoryStorage, Storage
from drivers.state import Medium

log = logging.getLogger("test")
SIZE = 64 * BLOCK


class DictStorage(Storage):
    """A disk kept in a dict of blocks: opaque to the framework (no fd)."""

    def __init__(self, size: int) -> None:
        self.size, self.readonly = size, False
        self.data = bytearray(size)
        self.closed = False

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            b[:] = self.data[offset : offset + len(b)]
            offset += len(b)

    def writev_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            self.data[offset : offset + len(b)] = b
            offset += len(b)

    def discard(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"isovisor-test.{os.getpid()}.export"
    yield name
    for p in SHM_DIR.glob(f"{name}*"):
        p.unlink()


def test_raw_view_is_an_fd_on_the_very_medium(tmp_path: Path, shm_name: str) -> None:
    img = tmp_path / "d.img"
    f = FileStorage(img, SIZE)
    m = MemoryStorage(shm_name, SIZE)
    try:
        assert raw_view(f, Medium("file", str(img)))
        assert raw_view(m, Medium("memory", shm_name))
        assert not raw_view(f, Medium("memory", shm_name))  # the right kind, another file
        assert not raw_view(DictStorage(SIZE), Medium("file", str(img)))  # no fd: opaque
        assert not raw_view(f, Medium("file", str(tmp_path / "missing.img")))
    finally:
        f.close()
        m.close()


def test_write_through_puts_every_write_in_the_medium_before_it_returns(
    tmp_path: Path, shm_name: str
) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"\x11" * SIZE)
    inner = DictStorage(SIZE)
    inner.data[:] = b"\x11" * SIZE
    io = Exported(
        inner,
        Medium("file", str(img)),
        DirtyMap(SHM_DIR / f"{shm_name}.dirty", SIZE),
        through=True,
        log=log,
        label="1 (g1/xvda)",
    )
    io.writev_from(3 * BLOCK + 512, [memoryview(b"\xaa" * 512), memoryview(b"\xbb" * 1024)])
    io.discard(10 * BLOCK, 2 * BLOCK)
    # no export, no close: what a rollback after a SIGKILL finds
    want = bytearray(b"\x11" * SIZE)
    want[3 * BLOCK + 512 : 3 * BLOCK + 2048] = b"\xaa" * 512 + b"\xbb" * 1024
    want[10 * BLOCK : 12 * BLOCK] = bytes(2 * BLOCK)
    assert img.read_bytes() == want == inner.data
    assert io.dirty.runs() == []  # nothing to export: the medium is current
    io.commit()  # the swap is final: from now on, marks
    io.writev_from(20 * BLOCK, [memoryview(b"\xcc" * BLOCK)])
    assert img.read_bytes() == want  # not written through any more
    assert io.dirty.runs() == [(20, 1)]
    io.end()


def test_the_dirty_map_outlives_the_process_and_export_copies_only_marked_blocks(
    tmp_path: Path, shm_name: str
) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(SIZE))
    medium = Medium("file", str(img))
    path = SHM_DIR / f"{shm_name}.dirty"
    inner = DictStorage(SIZE)
    io = Exported(inner, medium, DirtyMap(path, SIZE), through=False, log=log, label="1")
    io.writev_from(5 * BLOCK, [memoryview(b"\x01" * (2 * BLOCK))])
    io.writev_from(40 * BLOCK + 512, [memoryview(b"\x02" * 512)])  # part of a block
    io.end()  # the process dies: the marks stay in tmpfs
    inner.data[30 * BLOCK : 31 * BLOCK] = b"\x03" * BLOCK  # never marked: not exported

    again = DirtyMap(path, SIZE)
    assert again.runs() == [(5, 2), (40, 1)]
    io = Exported(inner, medium, again, through=False, log=log, label="1")
    assert io.export() == 3 * BLOCK
    got = img.read_bytes()
    assert got[5 * BLOCK : 7 * BLOCK] == b"\x01" * (2 * BLOCK)
    assert got[40 * BLOCK + 512 : 40 * BLOCK + 1024] == b"\x02" * 512
    assert got[30 * BLOCK : 31 * BLOCK] == bytes(BLOCK)
    assert io.dirty.runs() == [] and io.export() == 0
    io.end()
    # a map left by a disk of another size: every block is suspect
    assert DirtyMap(path, 2 * SIZE).runs() == [(0, 128)]


def test_the_memory_backend_creates_a_new_image_as_drivers_blk_does(tmp_path: Path) -> None:
    """drivers.blk.ram as the configured module for a rw image that does not exist yet: the
    image is created sparse at the configured size (as drivers.blk creates it), loaded into
    memory, and written back when the device goes."""
    from drivers.blk.ram import RamBackend
    from ipc import blkif
    from ipc.ring import inflight_bytes
    from ipc.shm import Segment
    from tests.fakehost import RecordingHost

    seg = Segment(
        f"isovisor-test.{os.getpid()}.ram",
        blkif.INFLIGHT_OFFSET + inflight_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE),
        create=True,
    )
    img = tmp_path / "new.img"
    home = Medium("file", str(img), 8 * BLOCK, "rw")
    attach = {
        "key": 3,
        "domid": 1,
        "domain": "g1",
        "vdev": "xvda",
        "devid": 51712,
        "segment": seg.name,
        "window": blkif.WINDOW_BYTES,
        "inflight_offset": blkif.INFLIGHT_OFFSET,
        "store": "/driver/blk0/vbd/1/51712",
        "scratch": f"{seg.name}.scratch",
        "class": "vbd",
        "disk": home.to_wire(),
    }
    host = RecordingHost("blk0", RuntimeError)
    b = RamBackend(host, {})
    try:
        b.attach(dict(attach))
        d = b.devices[3]
        assert img.stat().st_size == 8 * BLOCK
        assert d.storage.size == 8 * BLOCK
        assert b.save().devices[0].medium == Medium("memory", f"{seg.name}.scratch")
        b.detach(3)
    finally:
        seg.close()
        seg.unlink()
        (SHM_DIR / f"{seg.name}.scratch").unlink(missing_ok=True)
