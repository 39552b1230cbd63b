"""Tests of the example backend, written the way docs/sdk.md tells a driver developer to write
them: with the ``isovisor_stack`` fixture of the isovisor pytest plugin (installed with the
package; nothing to import for the fixture) around a real stack, and plain unit tests for the
hooks that need none.

Run them with ``python3 -m pytest examples/sdk`` (CI runs them from tests/test_sdk_examples.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from drivers.sdk import BackendState, DeviceState, Medium, StateError
from isovisor.testing import MiniStack, backend_class

pytestmark = pytest.mark.timeout(240)  # every wait of the fixture is bounded too

HERE = Path(__file__).resolve().parent
V1 = HERE / "countingdisk.py"
V2 = HERE / "countingdisk_v2.py"


def counted(stats: dict[str, object], guest: str, what: str) -> int:
    v = stats.get(f"{guest}/xvda.{what}", 0)
    assert isinstance(v, int)
    return v


def test_serves_verified_io_and_counts_every_request(isovisor_stack: MiniStack) -> None:
    """Two guests do verified random I/O on the example backend; its statistics, as
    `isovisor status` shows them, count exactly the writes the guests made."""
    s = isovisor_stack.start(V1, guests=2, ops=20_000)
    summaries = s.wait_guests()  # exit 0, errors=0, mismatches=0
    for guest, summary in zip(s.guests, summaries, strict=True):
        # statistics are refreshed every second: wait for the final counts
        stats = s.wait_statistics(
            lambda st, g=guest, w=summary["writes"]: counted(st, g, "writes") == w,
            what=f"{guest}'s {summary['writes']} writes counted",
        )
        assert counted(stats, guest, "bytes_written") == summary["writes"] * 4096
        # blkstress reads every block it wrote again at the end: more reads than its summary
        assert counted(stats, guest, "reads") >= summary["reads"]
    r = s.cli("driver", "stats", "blk0")
    assert r.returncode == 0 and "g1/xvda.writes" in r.stdout, r.stdout + r.stderr
    s.finish()  # and the images hold exactly what the guests wrote


def test_swap_file_counting_memory_file_under_verified_io(isovisor_stack: MiniStack) -> None:
    """drivers.blk -> the example backend -> drivers.blk.ram -> drivers.blk, while two guests
    do verified I/O: every swap goes through, a new process serves after each, and the
    guests see no error and lose no data."""
    s = isovisor_stack.start("drivers.blk", guests=2, ops=80_000)
    pid = s.driver()["pid"]
    for target in (V1, "drivers.blk.ram:RamBackend", "drivers.blk"):
        r = s.swap(target)
        assert r["outcome"] == "swapped", r
        assert r["old_pid"] == pid and r["pid"] != pid, r
        pid = r["pid"]
        row = s.driver()
        assert (row["pid"], row["state"]) == (pid, "RUNNING"), row
        s.more_io(2000)  # the new backend serves
        if target == V1:
            s.wait_statistics(
                lambda st: counted(st, "g1", "writes") > 0 and counted(st, "g2", "writes") > 0,
                what="the example backend's counters",
            )
    assert s.driver()["swaps"] == 3
    s.finish()


def test_v1_to_v2_upgrades_the_state_and_v2_to_v1_is_refused(isovisor_stack: MiniStack) -> None:
    """countingdisk v1 -> v2 goes through v2's upgrade_state: the counters carry on in the new
    layout.  v2 -> v1 is refused by v1 (the state is newer than it understands) and rolled
    back: v2 goes on serving."""
    s = isovisor_stack.start(V1, guests=1, ops=120_000)
    before = s.wait_statistics(lambda st: counted(st, "g1", "reads") > 1000)
    r = s.swap(V2)
    assert r["outcome"] == "swapped", r
    v2_pid = r["pid"]
    after = s.wait_statistics(
        lambda st: counted(st, "g1", "upgraded_from") == 1,
        what="v2's statistics (with upgraded_from)",
    )
    assert counted(after, "g1", "reads") > counted(before, "g1", "reads")  # carried on
    assert "g1/xvda.busy_ms" in after
    r = s.swap(V1)
    assert (r["outcome"], r["reason"]) == ("rolled_back", "restore"), r
    assert "is version 2, newer than" in r["error"], r["error"]
    row = s.driver()
    assert (row["pid"], row["state"]) == (v2_pid, "RUNNING"), row
    s.more_io(2000)
    s.finish()


def _v1_state(data: dict[str, object]) -> BackendState:
    disk = Medium("file", "/images/g1.img", 8 << 20, "rw")
    dev = DeviceState(1, "g1/xvda", disk, "scratch-1", disk, data)
    return BackendState("isovisor.blk", 1, "countingdisk.py:CountingDisk", (dev,))


def test_upgrade_hook_converts_a_version_1_state() -> None:
    """The hook alone, no stack: a unit test of upgrade_state on a hand-made state."""
    v2 = backend_class(V2)
    counts = {
        "reads": 5,
        "writes": 7,
        "bytes_read": 20480,
        "bytes_written": 28672,
        "flushes": 1,
        "discards": 0,
    }
    up = v2.upgrade_state(_v1_state({"counts": counts}))  # type: ignore[attr-defined]
    assert up.version == 2 and up.kind == "isovisor.blk"
    data = up.devices[0].data
    assert data["ops"] == {"read": 5, "write": 7, "flush": 1, "discard": 0}
    assert data["bytes"] == {"read": 20480, "write": 28672} and data["upgraded_from"] == 1
    # a version-1 state of a backend that counts nothing (drivers.blk) starts from zero
    empty = v2.upgrade_state(_v1_state({})).devices[0].data  # type: ignore[attr-defined]
    assert empty["ops"]["read"] == 0


class _FakeHost:
    """The little of the driver host a backend touches when it is built and restores."""

    name = "blk0"
    implementation = "countingdisk.py:CountingDisk"

    log = logging.getLogger("countingdisk-test")


def test_a_newer_state_is_refused_with_a_clear_message() -> None:
    """What a v1 backend says about a version-2 state (the rollback in the test above)."""
    v1 = backend_class(V1)
    host = _FakeHost()
    backend = v1(host, {})
    newer = BackendState("isovisor.blk", 2, "countingdisk_v2.py:CountingDisk")
    with pytest.raises(StateError, match=r"is version 2, newer than .* understands"):
        backend.restore(newer)
