"""A backend that keeps the data in a format of its own (examples/sdk/compressdisk.py: a log of
compressed blocks) never loses a write a guest was told was done, whenever it dies (issue 22
item 2; drivers/blk/export.py): in a hot swap's restore, while it opens the disk, in its
probation (rolled back to drivers.blk, which reads the image), while it is drained, after the
swap is committed (restarted from its own log), and when the stack stops with it serving.
Two blkstress guests check every byte they read, and ``finish()`` checks both images block by
block against what the guests wrote.

The crashing variants are the example plus a subclass, written to a file of the test's own."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from isovisor.testing import MiniStack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sdk" / "compressdisk.py"

VARIANTS = '''

# -- the test's crashing variants ------------------------------------------------------------
import signal as _signal
from pathlib import Path as _Path


def _die() -> None:
    os.kill(os.getpid(), _signal.SIGKILL)


class CrashInRestore(CompressDisk):
    """Killed while taking the devices over (restore_device, before any attach)."""

    def restore_device(self, saved):
        _die()


class CrashOpening(CompressDisk):
    """Killed while building its log from the image, half way through."""

    def open_disk(self, dev):
        path = self.side_file(dev, "zlog")
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(b"half a log")
        _die()


class CrashInProbation(CompressDisk):
    """Serves (and acknowledges) 3000 writes in its probation, then is killed."""

    def open_disk(self, dev):
        storage = super().open_disk(dev)
        backend, write = self, storage.write_from

        def write_from(offset, buf):
            backend.writes = getattr(backend, "writes", 0) + 1
            if backend.writes > 3000:
                _die()
            write(offset, buf)

        storage.write_from = write_from
        return storage


class CrashOnceInDrain(CompressDisk):
    """Killed the first time it is drained for a swap (after the framework exported its
    written blocks, while it saves its own data)."""

    def save_device(self, dev, storage):
        marker = _Path(__file__).with_suffix(".drained")
        if not marker.exists():
            marker.write_text("crashed once")
            _die()
        return {}
'''


@pytest.fixture
def variants(tmp_path: Path) -> Path:
    path = tmp_path / "crashdisk.py"
    path.write_text(EXAMPLE.read_text() + VARIANTS)
    return path


def killed_and_replaced(s: MiniStack) -> None:
    """SIGKILL blk0's process; return once a new instance serves."""
    pid = s.driver()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: s.driver()["pid"] not in (pid, None) and s.driver()["state"] == "RUNNING",
        60,
        f"blk0 restarted after SIGKILL of pid {pid}",
    )


def test_every_crash_of_a_swap_to_it_rolls_back_with_every_write(
    isovisor_stack: MiniStack, variants: Path
) -> None:
    """drivers.blk -> a compressing backend that dies in its restore, then in its open, then
    in its probation after acknowledging 3000 writes: each swap is rolled back to drivers.blk,
    which serves from the image; the guests see no error and no lost write.  The pause
    reported for the probation rollback is the guests' pause, not the time the new backend
    served.  Then the backend is swapped in for good, and the stack stops with it serving:
    the images hold every write."""
    s = isovisor_stack.start("drivers.blk", guests=2, ops=60_000, blocks=512)
    for cls, reason in (("CrashInRestore", "crash"), ("CrashOpening", "crash")):
        r = s.swap(f"{variants}:{cls}")
        assert (r["outcome"], r["reason"]) == ("rolled_back", reason), r
        s.more_io(1000)
    r = s.swap(f"{variants}:CrashInProbation", probation=60)
    assert (r["outcome"], r["reason"]) == ("rolled_back", "crash"), r
    assert "killed by SIGKILL" in r["error"] or "signal 9" in r["error"], r["error"]
    # it served 3000 writes (a second or more) before it died: that was no pause
    assert r["rollback_stall_ms"] < r["stall_ms"] + 900, r
    assert s.driver()["module"] == "drivers.blk"
    s.more_io(2000)
    r = s.swap(EXAMPLE)
    assert r["outcome"] == "swapped", r
    s.more_io(3000)
    s.finish()  # the stack stops with compressdisk serving: its blocks exported to the images


def test_after_the_commit_a_crash_and_a_crash_while_draining_lose_nothing(
    isovisor_stack: MiniStack, variants: Path
) -> None:
    """The compressing backend swapped in for good, then SIGKILLed: its replacement replays
    its log, and the blocks written since the commit are still marked for export.  Swapped to
    a version that dies while drained (the swap fails, the usual recovery replaces it), then
    to drivers.blk, which finds every write in the images."""
    s = isovisor_stack.start("drivers.blk", guests=2, ops=60_000, blocks=512)
    r = s.swap(f"{variants}:CrashOnceInDrain")
    assert r["outcome"] == "swapped", r
    s.more_io(3000)
    killed_and_replaced(s)
    s.more_io(3000)
    r = s.swap("drivers.blk")
    assert (r["outcome"], r["reason"]) == ("failed", "old_died"), r
    wait_until(lambda: s.driver()["state"] == "RUNNING", 60, "blk0 replaced after its drain")
    s.more_io(3000)
    r = s.swap("drivers.blk")
    assert r["outcome"] == "swapped", r
    s.more_io(2000)
    s.finish()
