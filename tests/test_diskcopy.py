"""kernel/diskcopy.py: what a migration --with-disks reads of an image and its write map, and
how the destination's copy is written and put in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernel.diskcopy import BLOCK, RUN_BLOCKS, DiskCopy, DiskCopyError, DiskReceiver
from kernel.migration import DiskTarget, MigrationFailed, disk_targets, retarget


def _image(path: Path, blocks: int, data: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(blocks * BLOCK)
        for block, content in data.items():
            f.seek(block * BLOCK)
            f.write(content)


def _block(tag: int) -> bytes:
    return bytes([tag]) * BLOCK


def _copy(tmp_path: Path, blocks: int, data: dict[int, bytes]) -> tuple[DiskCopy, Path]:
    img, wmap = tmp_path / "disk.img", tmp_path / "disk.mirror"
    _image(img, blocks, data)
    wmap.write_bytes(bytes(blocks))  # as the driver creates it
    c = DiskCopy("xvda", str(img), wmap)
    c.open_map()
    return c, wmap


def test_round_zero_sends_the_blocks_with_data_and_skips_holes_and_zeroes(tmp_path: Path) -> None:
    data = {3: _block(1), 4: _block(2), 100: _block(3), 101: bytes(BLOCK), 102: _block(4)}
    c, _ = _copy(tmp_path, 1024, data)
    try:
        runs = list(c.initial())
        assert [(f, n) for f, n, _ in runs] == [(3, 2), (100, 1), (102, 1)]
        assert runs[0][2] == _block(1) + _block(2) and runs[2][2] == _block(4)
        assert c.blocks_sent == 4
    finally:
        c.close()


def test_a_long_run_of_data_goes_in_frames_of_at_most_run_blocks(tmp_path: Path) -> None:
    c, _ = _copy(tmp_path, 600, {k: _block(k % 200 + 1) for k in range(600)})
    try:
        sizes = [n for _, n, _ in c.initial()]
        assert sizes == [RUN_BLOCKS, RUN_BLOCKS, 600 - 2 * RUN_BLOCKS]
    finally:
        c.close()


def test_marked_blocks_are_sent_once_and_a_mark_set_again_sends_them_again(
    tmp_path: Path,
) -> None:
    c, wmap = _copy(tmp_path, 64, {7: _block(7)})
    try:
        assert c.marked() == 0 and list(c.dirty()) == []
        with open(wmap, "r+b") as m:  # the driver: write, then mark
            m.seek(7)
            m.write(b"\x01\x01")
        assert c.marked() == 2
        got = list(c.dirty())
        assert got == [(7, 2, _block(7) + bytes(BLOCK))]
        assert c.marked() == 0 and list(c.dirty()) == []  # cleared before it was read
        with open(tmp_path / "disk.img", "r+b") as f, open(wmap, "r+b") as m:
            f.seek(8 * BLOCK)
            f.write(_block(9))
            m.seek(8)
            m.write(b"\x01")
        assert list(c.dirty()) == [(8, 1, _block(9))]
    finally:
        c.close()


def test_an_image_or_map_that_does_not_fit_is_an_error_naming_the_disk(tmp_path: Path) -> None:
    with pytest.raises(DiskCopyError, match=r"disk xvdb: cannot read its image .*nothing\.img"):
        DiskCopy("xvdb", str(tmp_path / "nothing.img"), tmp_path / "m")
    _image(tmp_path / "d.img", 16, {})
    (tmp_path / "m").write_bytes(bytes(8))
    c = DiskCopy("xvda", str(tmp_path / "d.img"), tmp_path / "m")
    try:
        with pytest.raises(DiskCopyError, match="has 8 entries for 16 blocks"):
            c.open_map()
    finally:
        c.close()


def test_the_destination_writes_a_partial_file_and_puts_it_in_place_at_commit(
    tmp_path: Path,
) -> None:
    final = tmp_path / "disks" / "bs-xvda.img"
    final.parent.mkdir()
    final.write_bytes(b"an older copy")
    r = DiskReceiver("xvda", final, 64 * BLOCK)
    r.write(3, 1, _block(3))
    r.write(63, 1, _block(5)[:100])  # (the last block of an image may be short)
    for first, count, data, what in (
        (64, 1, _block(1), "does not fit"),
        (60, 2, _block(1), "does not fit"),  # one block's bytes for two
        (0, RUN_BLOCKS + 1, b"", "does not fit"),
    ):
        with pytest.raises(DiskCopyError, match=f"disk xvda: block run .* {what}"):
            r.write(first, count, data)
    assert final.read_bytes() == b"an older copy"  # untouched until the commit
    r.commit()
    assert not r.partial.exists()
    got = final.read_bytes()
    assert len(got) == 64 * BLOCK and got[3 * BLOCK : 4 * BLOCK] == _block(3)
    assert got[63 * BLOCK : 63 * BLOCK + 100] == _block(5)[:100]
    assert got[: 3 * BLOCK] == bytes(3 * BLOCK)


def test_a_discarded_copy_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "x.img"
    r = DiskReceiver("xvda", final, 8 * BLOCK)
    r.write(0, 1, _block(1))
    r.discard()
    assert os.listdir(tmp_path) == []
    with pytest.raises(DiskCopyError, match="cannot create"):
        DiskReceiver("xvda", Path("/proc/no/such/dir/x.img"), BLOCK)


def test_a_destination_without_a_disks_directory_refuses_and_bad_entries_are_named(
    tmp_path: Path,
) -> None:
    begin = {"disks": [{"vdev": "xvda", "bytes": 4 << 20}]}
    with pytest.raises(MigrationFailed, match=r"takes no disk images: set disks = DIR"):
        disk_targets(None, "bs", begin)
    assert disk_targets(None, "bs", {}) == {}
    assert disk_targets(tmp_path, "bs", begin) == {
        "xvda": DiskTarget(tmp_path / "bs-xvda.img", 4 << 20, False)
    }
    mem = {"disks": [{"vdev": "xvdb", "bytes": 1 << 20, "memory": True}]}
    assert disk_targets(None, "bs", mem, "isovisor.1.mig2") == {
        "xvdb": DiskTarget(Path("/dev/shm/isovisor.1.mig2.xvdb.disk"), 1 << 20, True)
    }
    for bad, what in (
        ({"vdev": "../x", "bytes": 1}, "malformed disk entry"),
        ({"vdev": "xvda", "bytes": "1"}, "malformed disk entry"),
        ({"vdev": "xvda", "bytes": 1, "memory": 1}, "malformed disk entry"),
        ({"vdev": "xvda", "bytes": 0}, "out of range"),
    ):
        with pytest.raises(MigrationFailed, match=what):
            disk_targets(tmp_path, "bs", {"disks": [bad]})


def test_the_copied_disks_of_a_config_name_their_images_here(tmp_path: Path) -> None:
    wire = {
        "name": "bs",
        "disk": [
            {"vdev": "xvda", "type": "file", "target": "/src/bs.img"},
            {"vdev": "xvdb", "type": "file", "target": "/shared/base.img"},
            {"vdev": "xvdc", "type": "memory", "size": 1 << 20},
        ],
    }
    targets = {
        "xvda": DiskTarget(tmp_path / "bs-xvda.img", 1, False),
        "xvdc": DiskTarget(tmp_path / "c.disk", 1 << 20, True),
    }
    out = retarget(wire, targets)
    assert [d.get("target") for d in out["disk"]] == [
        str(tmp_path / "bs-xvda.img"),
        "/shared/base.img",
        None,  # a memory disk's data becomes its device's own medium
    ]
    assert wire["disk"][0]["target"] == "/src/bs.img"  # the original is left alone
    with pytest.raises(MigrationFailed, match=r"disks \['xvdd'\] are not in the domain's config"):
        retarget(wire, {"xvdd": DiskTarget(tmp_path / "d.img", 1, False)})
    with pytest.raises(MigrationFailed, match="disk xvdb is a file disk in the config"):
        retarget(wire, {"xvdb": DiskTarget(tmp_path / "b.disk", 1, True)})
