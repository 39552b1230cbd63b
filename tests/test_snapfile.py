"""The snapshot file format (kernel/snapfile.py), the checks a restore makes before it creates
anything (kernel/saverestore.py), and the guest clock's parameters (kernel/clock.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

from kernel import abi, clock, saverestore, snapfile
from kernel.snapfile import SnapshotError
from kernel.vcpu import read_registers, write_registers

PAGE = abi.PAGE_SIZE


def _sections(pages: list[bytes] | None = None) -> dict[str, Any]:
    regs = read_registers(Uc(UC_ARCH_X86, UC_MODE_64))
    regs["RIP"] = abi.IMAGE_BASE
    pages = [b"\x01" * PAGE, b"\x02" * PAGE] if pages is None else pages
    return {
        "domain": {
            "config": {
                "name": "g",
                "image": "hello",
                "image_path": "/nonexistent/hello",
                "memory": 4,
                "source": "g.toml",
            },
            "name": "g",
            "domid": 3,
            "origin": "unit",
            "saved_at": 0,
            "abi": abi.ABI_VERSION,
            "restarts": 0,
        },
        "vcpu": {"registers": regs},
        "sched": {
            "pending": 0,
            "polling": False,
            "blocking": False,
            "runnable": True,
            "poll_mask": 0,
            "wake_in": None,
            "watchdog_ns": 0,
            "watchdog_left": 0,
            "upcall_handler": 0,
            "in_upcall": False,
            "upcall_return": False,
            "upcall": None,
        },
        "clock": {"guest_ns": 5_000_000, "epoch": 0, "wall_ns": 0},
        "memory": {"bytes": 4 << 20, "page": PAGE, "runs": [[1, len(pages)]] if pages else []},
        "pages": pages,
        "console": {"start": 0, "data": b"hello\n"},
        "devices": [],
    }


def _offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Each section's (header offset, payload length)."""
    out, off = {}, 24
    for name in snapfile.SECTIONS:
        length = struct.unpack_from("<Q", data, off + 16)[0]
        out[name] = (off, length)
        off += 32 + length
    return out


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    p = tmp_path / "g.snap"
    snapfile.write(p, _sections())
    return p


def test_a_snapshot_reads_back_as_written_and_checks_out(snap: Path) -> None:
    s = snapfile.read(snap)
    assert s["pages"] == b"\x01" * PAGE + b"\x02" * PAGE
    assert s["console"]["data"] == b"hello\n"
    r = saverestore.Restored.check(s, "here")
    assert r.config.name == "g" and r.runs == [(1, 2)] and r.guest_ns == 5_000_000


def test_no_temporary_file_is_left_and_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "g.snap"
    snapfile.write(p, _sections())
    good = p.read_bytes()

    def broken() -> Any:
        yield b"\x01" * PAGE
        raise OSError(28, "No space left on device")

    bad = _sections()
    bad["pages"] = broken()
    with pytest.raises(OSError):
        snapfile.write(p, bad)
    assert p.read_bytes() == good
    assert [f.name for f in tmp_path.iterdir()] == ["g.snap"]


@pytest.mark.parametrize("section", snapfile.SECTIONS[:-1])
def test_a_flipped_byte_in_any_section_is_caught_by_that_sections_checksum(
    snap: Path, section: str
) -> None:
    data = bytearray(snap.read_bytes())
    off, length = _offsets(bytes(data))[section]
    data[off + 32 + length // 2] ^= 0x40
    snap.write_bytes(data)
    with pytest.raises(SnapshotError, match=f"section '{section}' .*fails its checksum"):
        snapfile.read(snap)


def test_a_file_cut_anywhere_is_reported_truncated_with_the_section(snap: Path) -> None:
    data = snap.read_bytes()
    offsets = _offsets(data)
    rng = random.Random(7)
    cuts = {off + d for off, _ in offsets.values() for d in (0, 5, 32)}
    cuts |= {rng.randrange(24, len(data)) for _ in range(40)}
    for cut in sorted(c for c in cuts if c < len(data)):
        snap.write_bytes(data[:cut])
        with pytest.raises(SnapshotError) as e:
            snapfile.read(snap)
        msg = str(e.value)
        assert "truncated" in msg and "incomplete" in msg, (cut, msg)
        (within,) = [n for n, (off, length) in offsets.items() if off <= cut < off + 32 + length]
        assert f"section {within!r}" in msg, (cut, msg)


def test_a_restore_reads_the_pages_once_into_ram_and_checks_them_on_the_way(
    tmp_path: Path,
) -> None:
    """``defer_pages``: the pages stay in the file until the RAM is filled from it, in chunks,
    at the runs' places; a flipped byte there fails the fill, naming the section, and the RAM
    segment is gone again."""
    pages = [bytes([k + 1]) * PAGE for k in range(5)]
    s = _sections(pages)
    s["memory"]["runs"] = [[1, 2], [10, 3]]
    snap = tmp_path / "g.snap"
    snapfile.write(snap, s)
    got = snapfile.read(snap, defer_pages=True)
    ref = got["pages"]
    assert isinstance(ref, snapfile.PagesRef) and len(ref) == 5 * PAGE
    assert [bytes(c) for c in ref.chunks(3 * PAGE)] == [b"".join(pages[:3]), b"".join(pages[3:])]
    r = saverestore.Restored.check(got, "here")
    mem = r.take_memory(f"isovisor-snaptest.{os.getpid()}.ram", 4 << 20)
    try:
        ram = mem.segment.buf
        for page, content in zip((1, 2, 10, 11, 12), pages, strict=True):
            assert ram[page * PAGE : (page + 1) * PAGE] == content
        assert ram[3 * PAGE : 10 * PAGE] == bytes(7 * PAGE)
    finally:
        mem.close()
    data = bytearray(snap.read_bytes())
    off, length = _offsets(bytes(data))["pages"]
    data[off + 32 + length - 1] ^= 1
    snap.write_bytes(data)
    r = saverestore.Restored.check(snapfile.read(snap, defer_pages=True), "here")
    name = f"isovisor-snaptest.{os.getpid()}.bad"
    with pytest.raises(SnapshotError, match=r"section 'pages' \(bytes .*fails its checksum"):
        r.take_memory(name, 4 << 20)
    assert not (Path("/dev/shm") / name).exists()


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: b"NOTASNAP" + d[8:], "not an isovisor snapshot"),
        (lambda d: d[:8] + struct.pack("<I", 2) + d[12:], "format version 2"),
        (lambda d: d[:12] + struct.pack("<I", 4) + d[16:], "counts 4 sections"),
        (lambda d: d + b"junk", "4 bytes follow the end section"),
        (lambda d: d[:24] + b"vcpu\0" + d[29:], "found section 'vcpu' at byte 24"),
        (lambda d: b"ISOV", "shorter than a snapshot header"),
    ],
)
def test_other_damage_is_named(snap: Path, mutate: Any, expect: str) -> None:
    snap.write_bytes(mutate(snap.read_bytes()))
    with pytest.raises(SnapshotError, match=expect):
        snapfile.read(snap)


def _check(s: dict[str, Any]) -> str:
    with pytest.raises(SnapshotError) as e:
        saverestore.Restored.check(s, "snap")
    return str(e.value)


def test_sections_that_decode_but_do_not_fit_are_refused() -> None:
    s = _sections()
    s["pages"] = b"".join(s["pages"])
    s["memory"]["runs"] = [[1, 3]]
    assert "holds 8192 bytes" in _check(s)
    s["memory"]["runs"] = [[0, 2]]  # the NULL guard page is never stored
    assert "out of order" in _check(s)
    s["memory"]["runs"] = [[1, 2]]
    s["memory"]["bytes"] = 8 << 20
    assert "the config says 4 MiB" in _check(s)
    s["memory"]["bytes"] = 4 << 20
    s["vcpu"]["registers"].pop("RIP")
    assert "registers missing: RIP" in _check(s)
    s["vcpu"]["registers"]["RIP"] = -1
    assert "register RIP = -1 is malformed" in _check(s)
    s["vcpu"]["registers"]["RIP"] = 0x100000
    s["domain"]["abi"] = 99
    assert "guest ABI version 99" in _check(s)
    s["domain"]["abi"] = abi.ABI_VERSION
    s["sched"]["polling"] = 1
    assert "'polling' is int, not bool" in _check(s)
    s["sched"]["polling"] = False
    s["clock"]["epoch"] = 1 << 40  # the kernel publishes it in a u64 word, counting on
    assert "epoch = 1099511627776 is out of range" in _check(s)
    s["clock"]["epoch"] = 0
    s["sched"]["cpu_ns"] = "lots"
    assert "cpu_ns = 'lots' is invalid" in _check(s)


def test_page_runs_stores_exactly_the_pages_that_are_not_zero() -> None:
    size = 3 << 20
    buf = mmap.mmap(-1, size)
    rng = random.Random(3)
    written = [*sorted(rng.sample(range(size // PAGE), 60)), 0]  # page 0 is never stored
    for p in written:
        buf[p * PAGE + rng.randrange(PAGE)] = rng.randrange(1, 256)
    runs = saverestore.page_runs(ctypes.addressof(ctypes.c_char.from_buffer(buf)), size)
    stored = [p for first, n in runs for p in range(first, first + n)]
    assert stored == sorted(set(written) - {0})
    assert b"".join(saverestore.page_chunks(buf, runs)) == b"".join(
        buf[p * PAGE : (p + 1) * PAGE] for p in stored
    )


def test_registers_round_trip_through_a_snapshot_table() -> None:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    regs = read_registers(uc)
    regs.update(RAX=0xDEADBEEF, R15=1 << 63, XMM7=bytes(range(16)), RFLAGS=0x202)
    other = Uc(UC_ARCH_X86, UC_MODE_64)
    write_registers(other, regs)
    assert {k: v for k, v in read_registers(other).items() if k != "FPTAG"} == {
        k: v for k, v in regs.items() if k != "FPTAG"
    }


class _Source:
    """A TSC that the test moves by hand, 1 tick = 1 ns (mul = 2^32)."""

    def __init__(self) -> None:
        self.tsc = 1_000_000
        self.read = lambda: self.tsc

    def pair(self) -> tuple[int, int]:
        return self.tsc, self.tsc

    def mul(self, now: tuple[int, int]) -> int:
        return 1 << 32


def test_the_clock_never_steps_back_and_a_pause_does_not_show() -> None:
    words = memoryview(bytearray(abi.SHARED_INFO_ADDR + PAGE)).cast("Q")
    src = _Source()
    c = clock.GuestClock(words, src)  # type: ignore[arg-type]
    sh = abi.SHARED_INFO_ADDR // 8

    def guest_reads() -> int:
        assert words[sh + abi.SH_CLOCK_VERSION // 8] % 2 == 0
        return clock.extrapolate(
            src.tsc,
            words[sh + abi.SH_CLOCK_TSC // 8],
            words[sh + abi.SH_CLOCK_SYSTEM // 8],
            words[sh + abi.SH_CLOCK_MUL // 8],
        )

    c.publish(lambda mono: 500, paused_total=0)  # virtual time 500 ns now
    assert words[sh + abi.SH_CLOCK_FLAGS // 8] & abi.CLOCK_F_TSC
    src.tsc += 1000
    assert guest_reads() == 1500
    c.stopped_running()
    # the host says virtual time is only 1200 (its clock and the TSC disagree a little):
    # the next publication starts where the guest may have got to, not lower
    src.tsc += 10
    c.publish(lambda mono: 1200, paused_total=0)
    assert guest_reads() == 1500
    # a pause of 1 s: the old parameters would jump 1 s; virtual time did not move
    src.tsc += 1_000_000_000
    assert c.due(src.tsc, paused_total=1_000_000_000)
    c.publish(lambda mono: 1600, paused_total=1_000_000_000)
    assert guest_reads() == 1600
    assert words[sh + abi.SH_CLOCK_VERSION // 8] == 6  # three publications


def test_a_guest_that_scribbles_on_the_clock_words_cannot_break_a_publication() -> None:
    """The parameters live in guest RAM: whatever the guest wrote there, the next publication
    writes valid ones (the version only counts on, wrapping)."""
    words = memoryview(bytearray(abi.SHARED_INFO_ADDR + PAGE)).cast("Q")
    sh = abi.SHARED_INFO_ADDR // 8
    for off in range(abi.SH_CLOCK_VERSION, abi.SH_CLOCK_EPOCH + 8, 8):
        words[sh + off // 8] = (1 << 64) - 1
    c = clock.GuestClock(words, _Source())  # type: ignore[arg-type]
    c.publish(lambda mono: 7, paused_total=0)
    assert words[sh + abi.SH_CLOCK_VERSION // 8] % 2 == 0
    assert words[sh + abi.SH_CLOCK_SYSTEM // 8] == 7
    assert words[sh + abi.SH_CLOCK_FLAGS // 8] == abi.CLOCK_F_TSC | abi.CLOCK_F_STOPPED


def test_a_memory_disks_saved_data_is_checked() -> None:
    ok = {"bytes": 3 * PAGE + 100, "runs": [[1, 1], [3, 1]], "data": bytes(PAGE + 100)}
    saverestore._medium(ok, "md")  # the last block is short: the disk ends inside it
    for bad, what in (
        ({**ok, "data": bytes(PAGE)}, "4096 bytes where its runs hold 4196"),
        ({**ok, "runs": [[3, 1], [1, 1]]}, "out of order"),
        ({**ok, "runs": [[4, 1]]}, "outside its 12388 bytes"),
        ({**ok, "bytes": 0}, "size 0 is out of range"),
        ({**ok, "data": "x"}, "is malformed"),
    ):
        with pytest.raises(SnapshotError, match=what):
            saverestore._medium(bad, "md")
