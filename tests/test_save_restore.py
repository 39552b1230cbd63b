"""``isovisor save`` / ``restore``: a running guest into a snapshot file and back, in the same
stack or another, with its clock and console going on; bad snapshots refused whole."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from kernel import snapfile
from kernel.pager import PACE_ENV
from tests.conftest import ISOVISOR, Stack, command_line, shm_segments, wait_until
from tests.test_console import check_lines


def _console(st: Stack, name: str) -> str:
    return bytes(st.call("console", name=name)["data"]).decode()


def _ticks(text: str) -> list[int]:
    return [int(k) for k in re.findall(r"^ticker: tick (\d+) ", text, re.M)]


def _snapshot_console(path: Path) -> str:
    """The console text a snapshot carries."""
    return bytes(snapfile.read(path)["console"]["data"]).decode()


def _up_with(st: Stack, name: str, image: str, extra: str) -> None:
    st.up()
    st.create(st.domain_config(name, image, extra=extra, on_poweroff="preserve"))


def _contiguous_after(st: Stack, name: str, more: int) -> list[int]:
    """Once the ticker has printed ``more`` more ticks, pause it and return its ticks."""
    n = len(_ticks(_console(st, name)))
    wait_until(lambda: len(_ticks(_console(st, name))) >= n + more, what=f"{more} more ticks")
    st.call("pause", name=name)
    return _ticks(_console(st, name))


def test_a_guest_saved_in_one_stack_resumes_in_another_and_its_clock_goes_on(
    stack: Stack, peer: Stack
) -> None:
    """Guests that run until stopped (so a slow host cannot have them end before the save):
    a ticker asleep in a poll between ticks, and clockcheck reading the clock flat out."""
    stack.up()
    peer.up()
    stack.create(stack.domain_config("cc", "clockcheck", extra="report_ms=50"))
    stack.create(stack.domain_config("tick", "ticker", extra="interval_ms=20"))
    wait_until(lambda: _console(stack, "cc").count("report") >= 4, what="clockcheck reports")
    wait_until(lambda: len(_ticks(_console(stack, "tick"))) >= 5, what="ticks before the save")
    snaps = {n: stack.dir / f"{n}.snap" for n in ("tick", "cc")}
    r = stack.cli("save", "tick", str(snaps["tick"]))
    assert r.returncode == 0, r.stderr
    assert "saved domain tick" in r.stdout and "destroyed" in r.stdout
    stack.call("save", name="cc", path=str(snaps["cc"]))
    assert stack.domains() == {}  # saved without -c: gone from the source
    before = _ticks(_snapshot_console(snaps["tick"]))
    t0 = time.time()
    r = peer.cli("restore", str(snaps["tick"]))
    assert r.returncode == 0, r.stderr
    assert "restored domain tick" in r.stdout
    peer.call("restore", path=str(snaps["cc"]))
    # every tick exactly once: those printed before the save came along in the console
    ticks = _contiguous_after(peer, "tick", 10)
    assert ticks == list(range(1, len(ticks) + 1)), ticks
    assert before and ticks[: len(before)] == before and len(ticks) > len(before)
    wait_until(lambda: _console(peer, "cc").count("epoch=1 ") >= 3, what="reports after")
    peer.call("pause", name="cc")
    t1 = time.time()
    cc = _console(peer, "cc")
    last = re.findall(r"backward=(\d+) .*epoch=(\d+) wall_s=(\d+) hc_behind=(\d+)", cc)[-1]
    assert last[0] == "0", "the clock went backwards"
    assert last[1] == "1", "one restore: epoch 1"
    assert last[3] == "0", "HC_TIME and the guest's own reading disagree"
    # the wall clock is right after the restore (not the time of the save)
    walls = [int(w) for w in re.findall(r"epoch=1 wall_s=(\d+)", cc)]
    assert walls and all(int(t0) - 1 <= w <= int(t1) + 1 for w in walls), (walls, t0, t1)


def test_a_checkpoint_runs_on_and_a_paused_restore_waits_for_unpause(
    stack: Stack, peer: Stack
) -> None:
    peer.up()
    _up_with(stack, "tick", "ticker", "interval_ms=20")
    wait_until(lambda: len(_ticks(_console(stack, "tick"))) >= 3, what="first ticks")
    snap = stack.dir / "tick.snap"
    r = stack.cli("save", "--checkpoint", "tick", str(snap))
    assert r.returncode == 0 and "it runs on" in r.stdout, r.stdout + r.stderr
    saved = _ticks(_snapshot_console(snap))
    # the original goes on
    wait_until(lambda: len(_ticks(_console(stack, "tick"))) > len(saved) + 2, what="ticks go on")
    assert "p" not in stack.domains()["tick"]["state"]
    r = peer.cli("restore", "--paused", str(snap))
    assert r.returncode == 0 and "paused" in r.stdout, r.stdout + r.stderr
    assert "p" in peer.domains()["tick"]["state"]
    assert _ticks(_console(peer, "tick")) == saved  # nothing ran yet
    peer.call("unpause", name="tick")
    ticks = _contiguous_after(peer, "tick", 10)
    assert ticks == list(range(1, len(ticks) + 1)) and len(ticks) >= len(saved) + 10, ticks


def test_a_bad_snapshot_is_refused_with_the_section_and_nothing_is_created(
    stack: Stack, peer: Stack
) -> None:
    _up_with(stack, "tick", "ticker", "interval_ms=20 count=1000")
    peer.up()
    wait_until(lambda: _ticks(_console(stack, "tick")), what="a tick")
    good = stack.dir / "tick.snap"
    assert stack.cli("save", "-c", "tick", str(good)).returncode == 0
    data = good.read_bytes()
    pages_at = data.index(b"pages\0")
    bad = {
        "cut": (data[: len(data) // 2], "truncated"),
        "flipped": (
            data[: pages_at + 40] + bytes([data[pages_at + 40] ^ 0x55]) + data[pages_at + 41 :],
            "section 'pages'",
        ),
        "version": (data[:8] + (7).to_bytes(4, "little") + data[12:], "format version 7"),
        "empty": (b"", "not a snapshot"),
    }
    mine = f"isovisor.{peer.pids[0]}."  # the peer's segments (named after its supervisor)
    segments = shm_segments(mine)
    for what, (content, expect) in bad.items():
        p = peer.dir / f"{what}.snap"
        p.write_bytes(content)
        r = peer.cli("restore", str(p))
        assert r.returncode == 1, (what, r.stdout)
        message = " ".join(r.stderr.split())
        assert expect in message and "nothing was restored" in message, (what, message)
    assert peer.domains() == {}
    assert shm_segments(mine) == segments == []
    # the corrupted pages were found by the pager while the guest already ran (a lazy
    # restore): no event of it got out (its hypercalls, console output too, were held)
    assert "domain.tick." not in (peer.run_dir / "supervisor.log").read_text()
    # the good one restores; a second restore of it finds the name taken
    assert peer.cli("restore", "--paused", str(good)).returncode == 0
    r = peer.cli("restore", str(good))
    assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
    assert list(peer.domains()) == ["tick"]


def test_save_errors_name_the_problem(stack: Stack) -> None:
    _up_with(stack, "tick", "ticker", "interval_ms=20 count=1000")
    r = stack.cli("save", "nosuch", str(stack.dir / "x.snap"))
    assert r.returncode == 1 and "no domain named" in r.stderr
    r = stack.cli("save", "tick", str(stack.dir / "missing" / "x.snap"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = stack.cli("restore", str(stack.dir / "nothing.snap"))
    assert r.returncode == 1 and "no such file" in r.stderr
    assert "tick" in stack.domains()


BLK = '[driver.blk0]\nmodule = "drivers.blk"\n'


def disk_requests(st: Stack) -> int:
    return sum(d["requests"] for d in st.call("devices")["devices"])


def start_blkstress(st: Stack, ops: int, seed: int) -> None:
    """A blkstress guest "bs" on an image file in ``st``'s directory (a disk other stacks see
    at the same path), once its I/O is under way."""
    st.create(
        st.domain_config(
            "bs",
            "blkstress",
            memory=8,
            extra=f"ops={ops} qd=32 mix=60 seed={seed} blocks=1024 bs=4096 timeout=30000",
            on_poweroff="preserve",
            on_crash="preserve",
            disk=[f"target={st.dir / 'bs.img'}, vdev=xvda, access=rw, backend=blk0, size=4M"],
        )
    )
    wait_until(lambda: disk_requests(st) > 2000, what="disk I/O under way")


def assert_blkstress_verified(st: Stack, ops: int) -> None:
    """ "bs" ends in ``st`` having done ``ops`` requests without an error, every block
    verified."""
    row = wait_until(lambda: st.domains()["bs"]["exit_kind"] and st.domains()["bs"], 90)
    text = _console(st, "bs")
    assert row["exit_code"] == 0, text[-800:]
    assert re.search(rf"blkstress: ops={ops} errors=0 .* mismatches=0", text), text[-800:]
    assert "verify blocks=1024 mismatches=0" in text


def test_a_guest_doing_disk_io_saved_midway_finishes_verified_in_another_stack(
    stack: Stack, peer: Stack
) -> None:
    """blkstress, mid-run, with requests in its ring: saved (its disk by reference, its ring
    and in-flight log in the snapshot), restored in another stack whose blk0 takes the ring
    over; it finishes with every block verified.  A blkstress on a memory disk is saved with
    the disk's data, and verifies in the other stack too."""
    stack.up(extra=BLK)
    peer.up(extra=BLK)
    mem = stack.domain_config(
        "md",
        "blkstress",
        memory=8,
        on_poweroff="preserve",
        extra="ops=40000 qd=32 mix=60 seed=4 blocks=256 bs=4096 timeout=30000",
        disk=["vdev=xvda, type=memory, size=1M, backend=blk0"],
    )
    stack.create(mem)
    start_blkstress(stack, 30000, 3)
    for name in ("md", "bs"):
        snap = stack.dir / f"{name}.snap"
        stack.call("save", name=name, path=str(snap))
        peer.call("restore", path=str(snap))
    assert_blkstress_verified(peer, 30000)
    row = wait_until(lambda: peer.domains()["md"]["exit_kind"] and peer.domains()["md"], 90)
    text = _console(peer, "md")
    assert row["exit_code"] == 0, text[-800:]
    assert re.search(r"blkstress: ops=40000 errors=0 .* mismatches=0", text), text[-800:]
    assert "verify blocks=256 mismatches=0" in text


NET = '[driver.net0]\nmodule = "drivers.net"\n'
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def netpair_guests(st: Stack, count: int, b_extra: str = "") -> None:
    """Guests a and b on br0 of net0 exchanging ``count`` frames each with retransmission
    (``resend``): frames lost while one is away are sent again, and each arrives once.
    ``b_extra``: more parameters for b."""
    for name, mine, other in (("a", MAC_A, MAC_B), ("b", MAC_B, MAC_A)):
        st.create(
            st.domain_config(
                name,
                "netpair",
                memory=4,
                on_poweroff="preserve",
                extra=f"peer={other} count={count} size=200 resend=100 timeout=30000"
                + (f" {b_extra}" if name == "b" and b_extra else ""),
                vif=[f"mac={mine}, bridge=br0, backend=net0"],
            )
        )
    for name in ("a", "b"):
        wait_until(lambda n=name: "peer up" in _console(st, n), what=f"netpair {name} up")


def netpair_result(st: Stack, name: str) -> dict[str, int]:
    """The counters of ``name``'s last two lines, once it has ended with exit code 0."""
    wait_until(lambda: st.domains()[name]["exit_kind"], timeout=90, what=f"netpair {name} ends")
    text = _console(st, name)
    assert st.domains()[name]["exit_code"] == 0, text[-1500:]
    ends = ("netpair: frontend", "netpair: sent")
    lines = [ln for ln in text.splitlines() if ln.startswith(ends)]
    return {k: int(v) for ln in lines[-2:] for k, v in re.findall(r"(\w+)=(-?\d+)", ln)}


def test_a_guest_on_the_network_saved_and_restored_midway_loses_and_repeats_no_frame(
    stack: Stack,
) -> None:
    """netpair, mid-run: a is saved (its vif's rings and logs in the snapshot) while b goes
    on sending into nothing (b has no window: it does not wait for acks), then restored; the
    frames sent meanwhile are gone as on any network, b sends them again, and both end with
    every frame received exactly once."""
    stack.up(extra=NET)
    netpair_guests(stack, 20000, b_extra="window=0")
    snap = stack.dir / "a.snap"
    stack.call("save", name="a", path=str(snap))
    assert "a" not in stack.domains()
    assert "netpair: sent=" not in _snapshot_console(snap), "a ended before its save"
    stack.call("restore", path=str(snap))
    a, b = netpair_result(stack, "a"), netpair_result(stack, "b")
    for r in (a, b):
        assert r["received"] == 20000 and r["errors"] == 0, r
        assert r["lost"] == r["dup"] == r["reordered"] == r["corrupt"] == 0, r
    assert b["resent"] > 0, b  # b's frames to the saved a were lost, and sent again


def test_a_console_writer_saved_midway_prints_every_line_once(stack: Stack) -> None:
    """conecho prints numbered lines through con0 flat out; saved in the middle (the output
    still in its ring goes to the log as the driver lets the console go) and restored in the
    same stack, its log holds every line exactly once, in order."""
    stack.up(extra='[driver.con0]\nmodule = "drivers.console"\n')
    # 6 MB of lines: with stores at full speed (kernel/fasttlb.py) conecho prints 3,000 lines
    # in under 50 ms, faster than the wait below notices 200 and the save lands
    n = 100_000
    stack.create(
        stack.domain_config(
            "ce", "conecho", memory=4, on_poweroff="preserve", console="con0", extra=f"lines={n}"
        )
    )
    log = stack.run_dir / "consoles" / "ce.log"
    text = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    wait_until(lambda: text().count("conecho: line") >= 200, what="lines before the save")
    snap = stack.dir / "ce.snap"
    stack.call("save", name="ce", path=str(snap))
    saved = text().count("conecho: line")
    assert saved < n, "the guest ended before the save: the test proves nothing"
    stack.call("restore", path=str(snap))
    wait_until(lambda: f"conecho: done lines={n}" in text(), timeout=90, what="conecho ends")
    check_lines(text(), n)


def test_a_lazy_restore_survives_its_pager_being_killed_and_every_page_is_right(
    stack: Stack, peer: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memwriter over 8 MiB, saved midway, restored in a stack whose pager fills RAM slowly
    (ISOVISOR_PAGER_PACE_MS): the guest runs while its pages come in, the pager is SIGKILLed
    in the middle of the fill, a new one finishes it, and memwriter finds every page it wrote
    (errors=0)."""
    stack.up()
    stack.create(
        stack.domain_config(
            "mw",
            "memwriter",
            memory=16,
            on_poweroff="preserve",
            extra="wws_kib=8192 seconds=3 report_ms=300",
        )
    )
    wait_until(lambda: "report 2 " in _console(stack, "mw"), what="memwriter's second report")
    snap = stack.dir / "mw.snap"
    stack.call("save", name="mw", path=str(snap))
    monkeypatch.setenv(PACE_ENV, "50")  # ~36 steps of 256 KiB: about 2 s
    peer.up()
    kernel = psutil.Process(peer.pids[1])
    pagers = [p for p in kernel.children() if "kernel.pager" in command_line(p)]
    assert len(pagers) == 1, [command_line(p) for p in kernel.children()]
    first = pagers[0]
    restore = subprocess.Popen(
        [*ISOVISOR, "restore", str(snap)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ISOVISOR_RUN_DIR": str(peer.run_dir)},
    )
    try:
        wait_until(
            lambda: any(f.path == str(snap) for f in first.open_files()),
            what="the pager to open the snapshot",
        )
        first.send_signal(signal.SIGKILL)
        _, err = restore.communicate(timeout=60)
    finally:
        if restore.poll() is None:
            restore.kill()
            restore.wait()
    assert restore.returncode == 0, err
    row = wait_until(lambda: peer.domains()["mw"]["exit_kind"] and peer.domains()["mw"], 60)
    text = _console(peer, "mw")
    assert row["exit_code"] == 0, text[-800:]
    assert re.search(r"memwriter: done written=\d+ pages=2048 errors=0", text), text[-800:]
    now = [p.pid for p in kernel.children() if "kernel.pager" in command_line(p)]
    assert now and first.pid not in now
    log = (peer.run_dir / "kernel.log").read_text()
    assert f"pager process {first.pid} ended" in log
