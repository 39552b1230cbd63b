"""The pieces of a hot swap that need no stack: states and their versions, loading a backend
by name or file, checking a swap target (docs/hotswap.md, docs/sdk.md)."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import pytest

from drivers.blk.backend import Backend, copy_medium
from drivers.blk.ram import RamBackend
from drivers.host import HostError, load_backend
from drivers.state import (
    BackendState,
    DeviceState,
    Medium,
    StateError,
    accept,
    with_version,
)
from ipc.control import ControlError
from isovisor.cli.swapclient import target_of
from isovisor.supervisor.hotswap import check_target

HOME = Medium("file", "/images/g1.img", 8 << 20, "rw")


def state(version: int = 1, kind: str = "isovisor.blk") -> BackendState:
    dev = DeviceState(7, "g1/xvda", HOME, "isovisor.1.dom1.xvda.scratch", HOME, {"n": 1})
    return BackendState(kind, version, "drivers.blk:Backend", (dev,), {"x": [1, 2]})


def test_a_state_survives_the_wire() -> None:
    s = state()
    assert BackendState.from_wire(s.to_wire()) == s


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda w: w.update(format=9), "format 9 is not 1"),
        (lambda w: w.update(kind=""), "state.kind must be a non-empty string"),
        (lambda w: w.update(version=0), "state.version must be an integer >= 1"),
        (lambda w: w.update(devices={}), "state.devices must be a list"),
        (lambda w: w["devices"][0].update(key=-1), "state.devices[0].key must be an integer"),
        (
            lambda w: w["devices"][0]["medium"].update(type="tape"),
            "state.devices[0].medium.type must be one of file, memory",
        ),
        (lambda w: w["devices"][0]["home"].update(size=0), "state.devices[0].home.size"),
    ],
)
def test_a_malformed_state_is_refused_naming_the_field(mutate: Any, words: str) -> None:
    w = state().to_wire()
    mutate(w)
    with pytest.raises(StateError, match=words.replace("[", r"\[").replace("]", r"\]")):
        BackendState.from_wire(w)


def no_upgrade(s: BackendState) -> BackendState:
    raise StateError("no upgrade hook")


def test_versions_same_older_newer_and_another_kind() -> None:
    assert accept(state(2), kind="isovisor.blk", version=2, who="B", upgrade=no_upgrade) == state(2)
    up = accept(
        state(1),
        kind="isovisor.blk",
        version=2,
        who="B",
        upgrade=lambda s: with_version(s, 2, data={**s.data, "upgraded": True}),
    )
    assert up.version == 2 and up.data["upgraded"] is True
    with pytest.raises(StateError, match="version 3, newer than B understands"):
        accept(state(3), kind="isovisor.blk", version=2, who="B", upgrade=no_upgrade)
    with pytest.raises(StateError, match=r"of kind 'isovisor\.net'"):
        accept(
            state(1, "isovisor.net"), kind="isovisor.blk", version=1, who="B", upgrade=no_upgrade
        )
    with pytest.raises(StateError, match="no upgrade hook"):
        accept(state(1), kind="isovisor.blk", version=2, who="B", upgrade=no_upgrade)
    with pytest.raises(StateError, match=r"must return a 'isovisor\.blk' state of version 2"):
        accept(state(1), kind="isovisor.blk", version=2, who="B", upgrade=lambda s: s)


def test_the_default_upgrade_hook_refuses_with_the_versions() -> None:
    with pytest.raises(StateError, match="no upgrade_state hook for version 0"):
        Backend.upgrade_state(dataclasses.replace(state(), version=0))


def write(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_backends_load_by_module_class_or_file(tmp_path: Path) -> None:
    assert load_backend("drivers.blk") == (Backend, "drivers.blk:Backend")
    assert load_backend("drivers.blk.ram:RamBackend", swappable=True) == (
        RamBackend,
        "drivers.blk.ram:RamBackend",
    )
    f = write(
        tmp_path,
        "mine.py",
        """
        from drivers.sdk import BlockBackend, open_medium

        class Mine(BlockBackend):
            def open_disk(self, dev):
                return open_medium(dev.medium)
    """,
    )
    cls, name = load_backend(str(f), swappable=True)  # its only backend class
    assert cls.__name__ == "Mine" and name == f"{f}:Mine"
    assert load_backend(f"{f}:Mine")[1] == f"{f}:Mine"


@pytest.mark.parametrize(
    ("spec", "body", "words"),
    [
        ("no_such_pkg.mod", None, "no module named 'no_such_pkg.mod'"),
        ("drivers.blk:Nope", None, "has no class 'Nope'"),
        ("FILE", "def f(:\n", "syntax error in"),
        ("FILE", "import not_a_module_at_all\n", "No module named 'not_a_module_at_all'"),
        (
            "FILE",
            "class Backend:\n    def attach(self, d): pass\n",
            "does not implement the backend interface: it has no detach, fe_state, kick, close",
        ),
        (
            "FILE",
            "from drivers.sdk import BlockBackend\nclass Backend(BlockBackend):\n    pass\n",
            "it must define open_disk",
        ),
        ("FILE", "X = 1\n", "has no Backend class; name the class"),
        ("FILE:Backend", "Backend = 3\n", "is not a class"),
    ],
)
def test_bad_backends_are_refused_with_the_reason(
    tmp_path: Path, spec: str, body: str | None, words: str
) -> None:
    if body is not None:
        f = write(tmp_path, "bad.py", body)
        spec = spec.replace("FILE", str(f))
    with pytest.raises(HostError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_backend(spec, swappable=True)


def test_a_swap_needs_save_suspend_and_restore(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "old.py",
        """
        class Backend:
            def attach(self, d): pass
            def detach(self, k): pass
            def fe_state(self, k, s): pass
            def kick(self, k): pass
            def close(self): pass
    """,
    )
    assert load_backend(str(f))[1].endswith(":Backend")  # fine to run
    with pytest.raises(HostError, match="it has no save, suspend, restore"):
        load_backend(str(f), swappable=True)  # not to swap in


def test_swap_targets_are_checked_before_anything_starts(tmp_path: Path) -> None:
    f = write(tmp_path, "b.py", "")
    assert check_target("drivers.blk.ram:RamBackend") == "drivers.blk.ram:RamBackend"
    assert check_target(f"{f}:Mine") == f"{f}:Mine"
    assert check_target(str(f)) == str(f)
    for bad, words in [
        ("", "name the new backend"),
        ("not a module", "is neither a module"),
        ("b.py", "must be an absolute path"),
        (str(tmp_path / "none.py"), "does not exist"),
        (str(tmp_path), "is not a Python file"),
        (f"{f}:1x", "is not a class name"),
    ]:
        with pytest.raises(ControlError, match=words):
            check_target(bad)
    assert target_of(to_file=f"{f}:K") == f"{f}:K"
    with pytest.raises(ValueError, match="exactly one"):
        target_of()


def test_copy_medium_moves_a_disk_into_memory_and_back(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    data = bytes(range(256)) * 4096 * 2  # 2 MiB
    img.write_bytes(data)
    file = Medium("file", str(img), None, "rw")
    ram = Medium("memory", f"isovisor-test-{img.stat().st_ino}.scratch", None, "rw")
    try:
        assert copy_medium(file, ram) == len(data)
        img.write_bytes(bytes(len(data)))
        assert copy_medium(ram, file) == len(data)
        assert img.read_bytes() == data
    finally:
        (Path("/dev/shm") / ram.target).unlink(missing_ok=True)


def test_a_block_state_keeps_version_1_of_its_layout(tmp_path: Path) -> None:
    """On the DeviceBackend base a disk's saved state is still version 1 of ``isovisor.blk``
    as every block backend writes it: ``data`` is ``save_device``'s alone (no counters),
    ``home`` the configured disk, ``medium`` where the data is.  Such a state restores into
    drivers.blk.ram and back into drivers.blk, the data moved into memory and home again, and
    the statistics are the block driver's five."""
    import os

    from ipc import blkif
    from ipc.ring import inflight_bytes
    from ipc.shm import Segment
    from tests.fakehost import RecordingHost

    log_bytes = inflight_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)
    seg = Segment(
        f"isovisor-test.{os.getpid()}.state", blkif.INFLIGHT_OFFSET + log_bytes, create=True
    )
    img = tmp_path / "g1.img"
    img.write_bytes(b"\x5a" * 4096)
    home = Medium("file", str(img), 4096, "rw")
    scratch = f"{seg.name}.scratch"
    attach = {
        "key": 7,
        "domid": 1,
        "domain": "g1",
        "vdev": "xvda",
        "devid": 51712,
        "segment": seg.name,
        "window": blkif.WINDOW_BYTES,
        "inflight_offset": blkif.INFLIGHT_OFFSET,
        "store": "/driver/blk0/vbd/1/51712",
        "scratch": scratch,
        "class": "vbd",
        "disk": home.to_wire(),
    }
    dev = DeviceState(7, "g1/xvda", home, scratch, home, {})
    saved = BackendState("isovisor.blk", 1, "drivers.blk:Backend", (dev,))
    try:
        for cls, medium in ((RamBackend, Medium("memory", scratch)), (Backend, home)):
            b = cls(RecordingHost("blk0", RuntimeError), {})
            b.restore(BackendState.from_wire(saved.to_wire()))
            b.attach(dict(attach))
            assert list(b.statistics())[:5] == [
                "devices",
                "requests",
                "errors",
                "batches",
                "notifications",
            ]
            saved = b.save()
            b.suspend()
            assert (saved.kind, saved.version, saved.data) == ("isovisor.blk", 1, {})
            assert saved.devices == (dataclasses.replace(dev, medium=medium),)
        assert img.read_bytes() == b"\x5a" * 4096
    finally:
        seg.close()
        seg.unlink()
        (Path("/dev/shm") / scratch).unlink(missing_ok=True)
