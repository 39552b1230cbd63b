"""The pager (kernel/pager.py, kernel/paging.py): guest RAM filled from a snapshot file while it
is already in use, as a lazy restore does, with no guest: this test's own reads are the page
faults."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import zlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kernel import uffd
from kernel.memory import GuestMemory
from kernel.pager import PACE_ENV
from kernel.paging import Pager
from kernel.snapfile import PagesRef
from tests.conftest import shm_segments, wait_until

PAGE = 4096
RAM = 8 * 1024 * 1024  # 2048 pages
PREFIX = f"isovisor.t{os.getpid()}pg."

pytestmark = pytest.mark.skipif(
    uffd.available() is not None, reason=f"no userfaultfd here: {uffd.available()}"
)


def _stored(seed: int) -> tuple[list[tuple[int, int]], dict[int, bytes]]:
    """Runs of stored pages over the RAM (holes between them), and each stored page's bytes."""
    rng = random.Random(seed)
    runs, pages, p = [], {}, 1
    while p < RAM // PAGE:
        n = min(rng.randint(1, 300), RAM // PAGE - p)
        runs.append((p, n))
        for q in range(p, p + n):
            pages[q] = q.to_bytes(4, "little") + rng.randbytes(60) + bytes(PAGE - 64)
        p += n + rng.randint(1, 40)
    return runs, pages


def _snapshot(
    path: Path, runs: list[tuple[int, int]], pages: dict[int, bytes], corrupt: bool = False
) -> PagesRef:
    """A file whose payload (at an odd offset, as in a real snapshot) is the stored pages."""
    payload = bytearray(b"".join(pages[q] for first, n in runs for q in range(first, first + n)))
    crc = zlib.crc32(payload)
    if corrupt:
        payload[len(payload) // 2] ^= 0x40
    path.write_bytes(b"x" * 1411 + payload + b"end")
    return PagesRef(path, 1411, len(payload), crc, f"snapshot {path}")


def _expected(pages: dict[int, bytes], q: int) -> bytes:
    return pages.get(q, bytes(PAGE))


_page = ctypes.create_string_buffer(PAGE)


def _read(mem: GuestMemory, q: int) -> bytes:
    """Page ``q`` of RAM, read as the kernel's rule asks while a fill runs: without the
    interpreter lock (ctypes.memmove releases it), so a fault that waits for the next pager
    does not stop the thread that starts it."""
    ctypes.memmove(_page, mem.host_address + q * PAGE, PAGE)
    return _page.raw


@pytest.fixture
def pager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pager]:
    monkeypatch.setenv(PACE_ENV, "25")  # 32 steps of 256 KiB: the fill lasts ~0.8 s or more
    p = Pager()
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(f"{PREFIX}ram", RAM, reserve_later=True)
    try:
        yield m
    finally:
        m.close()
        assert shm_segments(PREFIX) == []


@pytest.mark.timeout(60)
def test_pages_touched_in_any_order_while_the_pager_fills_hold_the_snapshot(
    pager: Pager, mem: GuestMemory, tmp_path: Path
) -> None:
    runs, pages = _stored(1)
    fill = pager.fill(mem, _snapshot(tmp_path / "s.snap", runs, pages), runs)
    order = list(range(1, RAM // PAGE))
    random.Random(2).shuffle(order)
    # the last pages first (the background pass goes in file order, so it reaches them last),
    # then stored pages and holes anywhere
    for q in [*range(RAM // PAGE - 1, RAM // PAGE - 40, -1), *order[:300]]:
        assert _read(mem, q) == _expected(pages, q), q
    assert fill.wait(30), "the pager did not finish"
    assert fill.ok, fill.error
    assert fill.stats["faults"] > 0  # those reads were served as faults
    for q in range(1, RAM // PAGE):
        assert _read(mem, q) == _expected(pages, q), q
    mem.bytes[5 * PAGE] = 7  # written after the fill: plain memory again
    assert mem.bytes[5 * PAGE] == 7


@pytest.mark.timeout(60)
def test_a_corrupted_page_fails_the_fill_and_names_the_section(
    pager: Pager, mem: GuestMemory, tmp_path: Path
) -> None:
    runs, pages = _stored(3)
    fill = pager.fill(mem, _snapshot(tmp_path / "s.snap", runs, pages, corrupt=True), runs)
    assert fill.wait(30)
    assert not fill.ok
    assert "section 'pages'" in fill.error and "fails its checksum" in fill.error, fill.error
    # the RAM is no longer registered: a page nobody filled reads as zeros, it does not hang
    assert _read(mem, RAM // PAGE - 1) in (bytes(PAGE), _expected(pages, RAM // PAGE - 1))


@pytest.mark.timeout(60)
def test_a_pager_killed_midway_is_replaced_and_the_fill_completes(
    monkeypatch: pytest.MonkeyPatch, mem: GuestMemory, tmp_path: Path
) -> None:
    monkeypatch.setenv(PACE_ENV, "60")  # 32 steps: ~2 s, so the kill lands in the middle
    pager = Pager()
    pager.start()
    try:
        _kill_midway(pager, mem, tmp_path)
    finally:
        pager.stop()


def _kill_midway(pager: Pager, mem: GuestMemory, tmp_path: Path) -> None:
    runs, pages = _stored(4)
    wait_until(lambda: pager.pid is not None, what="the pager to start")
    first = pager.pid
    assert first is not None
    fill = pager.fill(mem, _snapshot(tmp_path / "s.snap", runs, pages), runs)
    assert _read(mem, 100) == _expected(pages, 100)
    assert not fill.done.is_set()
    os.kill(first, signal.SIGKILL)
    for q in (1500, 7, 2000):  # faults wait for the next pager, they do not read zeros
        assert _read(mem, q) == _expected(pages, q), q
    assert fill.wait(30)
    assert fill.ok, fill.error
    assert pager.restarts == 1 and pager.pid not in (None, first)
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    for q in range(1, RAM // PAGE):
        assert _read(mem, q) == _expected(pages, q), q


@pytest.mark.timeout(60)
def test_a_cancelled_fill_ends_at_once(pager: Pager, mem: GuestMemory, tmp_path: Path) -> None:
    runs, pages = _stored(5)
    fill = pager.fill(mem, _snapshot(tmp_path / "s.snap", runs, pages), runs)
    fill.cancel()
    assert fill.done.is_set() and not fill.ok and "cancelled" in fill.error
    assert pager.status()["fills"] == 0
