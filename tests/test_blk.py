"""Guests doing verified block I/O through the block backend, end to end.

Real parts only: guests are blkstress / blkprobe machine code under unicorn in the kernel
process, the backend is `python -m drivers.host` (its own OS process) or the same host inline,
and the data lands in real image files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.blkdata import check_image, fnv1a32
from tests.conftest import Stack, wait_event, wait_events

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DRIVER = '[driver.blk0]\nmodule = "drivers.blk"\n'
INLINE = '[driver.blk0]\nmodule = "drivers.blk"\nisolation = "inline"\n'


def disk(
    target: str = "", vdev: str = "xvda", access: str = "rw", size: str = "", kind: str = "file"
) -> str:
    parts = [f"vdev={vdev}", f"access={access}", "backend=blk0", f"type={kind}"]
    if target:
        parts.append(f"target={target}")
    if size:
        parts.append(f"size={size}")
    return ", ".join(parts)


def guest(
    stack: Stack, name: str, image: str, disks: list[str], extra: str, memory: int = 8
) -> Path:
    return stack.domain_config(
        name,
        image,
        memory=memory,
        on_poweroff="preserve",
        on_crash="preserve",
        extra=extra,
        disk=disks,
    )


def run_guest(stack: Stack, cfg: Path, name: str, timeout: float = 60) -> tuple[str, dict]:
    """Create a domain, wait until it stops, return (console, stop event payload)."""
    with stack.subscribe([f"domain.{name}."]) as sub:
        stack.create(cfg)
        p = _wait_stop(sub, name, timeout)
    return stack.call("console", name=name)["data"].decode(), p


def _wait_stop(sub: Any, name: str, timeout: float) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        ev = sub.recv(max(0.0, deadline - time.monotonic()))
        assert ev is not None, f"domain {name} did not stop within {timeout}s"
        topic, p = ev
        if topic in (f"domain.{name}.shutdown", f"domain.{name}.crashed"):
            return {**p, "topic": topic}


def summary(console: str) -> dict[str, int]:
    line = [ln for ln in console.splitlines() if ln.startswith("blkstress: ops=")]
    assert line, f"no blkstress summary line in:\n{console}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line[-1])}


def driver_pid(stack: Stack) -> int:
    (drv,) = stack.call("drivers")["drivers"]
    return int(drv["pid"])


def test_guests_write_and_verify_through_the_driver_process(stack: Stack) -> None:
    d = stack.dir
    g1 = guest(
        stack,
        "g1",
        "blkstress",
        [disk("a.img", size="8M")],
        "ops=1500 qd=32 mix=60 seed=11 blocks=512",
    )
    g2 = guest(
        stack,
        "g2",
        "blkstress",
        [disk(kind="memory", size="4M")],
        "ops=800 qd=4 mix=50 seed=22 blocks=256",
    )
    g3 = guest(
        stack,
        "g3",
        "blkstress",
        [disk("c.img", size="2M", vdev="xvdb")],
        "ops=300 qd=1 mix=50 seed=33 bs=8192 blocks=128",
    )
    stack.up([], extra=DRIVER)
    pid = driver_pid(stack)
    with stack.subscribe(["domain."]) as sub:
        for cfg in (g1, g2, g3):
            stack.create(cfg)
        got = wait_events(sub, [f"domain.{n}.shutdown" for n in ("g1", "g2", "g3")], 60)
    stops = {n: got[f"domain.{n}.shutdown"] for n in ("g1", "g2", "g3")}
    for name, p in stops.items():
        con = stack.call("console", name=name)["data"].decode()
        s = summary(con)
        assert p["code"] == 0 and s["errors"] == 0, con
        assert s["upcalls"] > 0, con  # completions arrived as virtual interrupts
    assert summary(stack.call("console", name="g1")["data"].decode())["ops"] == 1500
    # the data written is in the image file, block by block, at the right offsets
    gens = check_image((d / "a.img").read_bytes(), seed=11, bs=4096, blocks=512)
    assert sum(g is not None for g in gens.values()) > 300
    assert not any((d / "a.img").read_bytes()[512 * 4096 :])  # nothing beyond the working set
    assert (d / "a.img").stat().st_size == 8 << 20
    gens3 = check_image((d / "c.img").read_bytes(), seed=33, bs=8192, blocks=128)
    assert any(g is not None for g in gens3.values())
    devs = {x["domain"]: x for x in stack.call("devices")["devices"]}
    assert set(devs) == {"g1", "g2", "g3"}
    g1dev = devs["g1"]
    assert (g1dev["frontend_state"], g1dev["backend_state"]) == ("connected", "connected")
    assert g1dev["sectors"] == 8 << 11 and g1dev["requests"] >= 1500
    # notification hold-off: far fewer kicks and notifications than requests at QD32
    assert g1dev["kicks"] + g1dev["notifies"] < 0.5 * g1dev["requests"], g1dev
    # the backend maps each device region and no guest RAM at all
    maps = Path(f"/proc/{pid}/maps").read_text()
    prefix = f"isovisor.{stack.pids[0]}."
    mapped = set(re.findall(rf"/dev/shm/({re.escape(prefix)}\S+)", maps))
    assert mapped == {devs[n]["segment"] for n in ("g1", "g2", "g3")}, mapped
    assert not any(m.endswith(".ram") for m in mapped)
    assert driver_pid(stack) == pid and psutil.pid_exists(pid)
    # destroying a domain detaches its disk: the region disappears from the backend
    assert stack.cli("destroy", "g1").returncode == 0
    assert "g1" not in {x["domain"] for x in stack.call("devices")["devices"]}


def test_read_only_flush_discard_and_a_region_bound_backend(stack: Stack) -> None:
    d = stack.dir
    (d / "ro.img").write_bytes(b"\x5a" * (1 << 20))
    (d / "rw.img").write_bytes(b"\x11" * (1 << 20))
    stack.up([], extra=DRIVER)

    def probe(name: str, target: str, access: str, extra: str) -> str:
        cfg = guest(stack, name, "blkprobe", [disk(target, access=access)], extra)
        con, p = run_guest(stack, cfg, name)
        assert p["topic"].endswith(".shutdown") and p["code"] == 0, con
        assert "blkprobe: done" in con
        stack.cli("destroy", name)  # releases the image for the next probe
        return con

    con = probe("info", "ro.img", "ro", "action=info")
    assert "blkprobe: sectors=2048 sector_size=512 ro=1" in con
    con = probe("rowrite", "ro.img", "ro", "action=write sector=0 count=8 byte=0xAB")
    assert "blkprobe: write status=-1" in con
    assert (d / "ro.img").read_bytes() == b"\x5a" * (1 << 20)  # untouched
    con = probe("roread", "ro.img", "ro", "action=read sector=4 count=1")
    assert "blkprobe: read status=0" in con
    assert "blkprobe: read head=" + "5a" * 16 in con
    assert f"sum={fnv1a32(b'Z' * 512):#010x}" in con
    con = probe("w", "rw.img", "rw", "action=write sector=10 count=3 byte=0xC3")
    assert "blkprobe: write status=0" in con
    img = (d / "rw.img").read_bytes()
    assert img[10 * 512 : 13 * 512] == b"\xc3" * 1536
    assert img[: 10 * 512] == b"\x11" * 5120 and img[13 * 512 : 14 * 512] == b"\x11" * 512
    assert "blkprobe: flush status=0" in probe("f", "rw.img", "rw", "action=flush")
    con = probe("dis", "rw.img", "rw", "action=discard sector=16 count=8")
    assert "blkprobe: discard status=0" in con
    img = (d / "rw.img").read_bytes()
    assert img[16 * 512 : 24 * 512] == bytes(4096) and img[24 * 512] == 0x11
    # A request naming memory outside the device region is refused: the backend cannot reach
    # the guest's RAM, where the secret is.
    con = probe("secret", "rw.img", "rw", "action=secret sector=100")
    m = re.search(r"blkprobe: secret status=(-?\d+)", con)
    assert m and int(m.group(1)) == -1, con
    assert b"ISOVISOR-SECRET" not in (d / "rw.img").read_bytes()


def test_garbage_requests_get_errors_and_a_broken_ring_stops_only_its_guest(stack: Stack) -> None:
    stack.up([], extra=DRIVER)
    pid = driver_pid(stack)
    worker = guest(
        stack,
        "worker",
        "blkstress",
        [disk("w.img", size="4M")],
        "ops=3000 qd=16 mix=50 seed=5 blocks=256",
    )
    with stack.subscribe(["domain.worker."]) as sub:
        stack.create(worker)
        bad = guest(stack, "bad", "blkprobe", [disk("b.img", size="1M")], "action=badreq")
        con, p = run_guest(stack, bad, "bad")
        lines = re.findall(r"blkprobe: badreq kind=(\w+) status=(-?\d+)", con)
        assert len(lines) >= 20, con
        for kind, status in lines:  # every malformed request is answered with an error
            assert int(status) == (-2 if kind == "op" else -1), (kind, status, con)
        stack.cli("destroy", "bad")
        jump = guest(stack, "jump", "blkprobe", [disk("b.img", size="1M")], "action=ringjump")
        con, p = run_guest(stack, jump, "jump")
        assert p["topic"] == "domain.jump.crashed", (p, con)
        assert "driver blk0 reports" in p["reason"] and "req_prod" in p["reason"], p
        done = wait_event(sub, "domain.worker.shutdown", 60)
    con = stack.call("console", name="worker")["data"].decode()
    assert done["code"] == 0 and summary(con)["errors"] == 0, con
    assert driver_pid(stack) == pid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_inline_isolation_runs_the_same_driver_inside_the_kernel(stack: Stack) -> None:
    g = guest(
        stack,
        "g",
        "blkstress",
        [disk("i.img", size="4M")],
        "ops=1000 qd=32 mix=50 seed=9 blocks=256",
    )
    stack.up([], extra=INLINE)
    (drv,) = stack.call("drivers")["drivers"]
    kernel_pid = stack.pids[1]
    assert drv["isolation"] == "inline" and drv["pid"] == kernel_pid and drv["connected"]
    con, p = run_guest(stack, g, "g")
    assert p["code"] == 0 and summary(con)["errors"] == 0, con
    gens = check_image((stack.dir / "i.img").read_bytes(), seed=9, bs=4096, blocks=256)
    assert any(v is not None for v in gens.values())


def test_disk_errors_are_reported_not_crashes(stack: Stack) -> None:
    (stack.dir / "adir").mkdir()
    stack.up([], extra=DRIVER)
    # a backend that is not declared: refused before anything is created
    cfg = stack.domain_config(
        "nob", "blkstress", disk=["target=x.img, vdev=xvda, backend=blk9, size=1M"]
    )
    r = stack.cli("create", str(cfg))
    assert r.returncode == 1 and "backend 'blk9'" in r.stderr and "[driver.blk9]" in r.stderr
    # a typo in a disk key names the key and the likely fix
    cfg = stack.domain_config("typo", "blkstress", disk=["tagret=x.img, vdev=xvda, backend=blk0"])
    r = stack.cli("create", str(cfg))
    assert r.returncode == 1 and "unknown disk key 'tagret' (did you mean 'target'?)" in r.stderr
    # an image the driver cannot open: the guest is told why and exits; nothing crashes
    cfg = guest(stack, "dirdisk", "blkstress", [disk("adir", size="1M")], "ops=10")
    con, p = run_guest(stack, cfg, "dirdisk")
    assert p["topic"] == "domain.dirdisk.shutdown" and p["code"] == 2, (p, con)
    assert "adir" in con and "closed" in con.lower(), con
    dev = stack.call("devices")["devices"][0]
    assert dev["backend_state"] == "closed" and dev["error"]
    assert driver_pid(stack) and stack.call("drivers")["drivers"][0]["connected"]


def test_garbage_from_a_driver_is_refused_and_the_kernel_carries_on(stack: Stack) -> None:
    import msgpack
    import zmq

    from isovisor.paths import RunDir

    g = guest(stack, "g", "blkstress", [disk("g.img", size="2M")], "ops=400 qd=8 seed=3")
    stack.up([], extra=DRIVER)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(RunDir(stack.run_dir).kernel_drivers)
    for junk in (
        b"\xc1not msgpack",
        msgpack.packb({"a": 1}),
        msgpack.packb([]),
        msgpack.packb(["notify", "seven"]),
        msgpack.packb(["notify", 99999]),
        msgpack.packb(["store", "/local/domain/1/device/x", "1"]),
        msgpack.packb(["fault", 1]),
        msgpack.packb(["hello", {"name": 5}]),
        msgpack.packb(["frobnicate", 1, 2]),
    ):
        push.send(junk)
    push.close()
    ctx.term()
    con, p = run_guest(stack, g, "g")
    assert p["code"] == 0 and summary(con)["errors"] == 0, con
    log = RunDir(stack.run_dir).kernel_log.read_text()
    for what in (
        "undecodable message",
        "not a [type, ...] list",
        "malformed hello",
        "store write outside /driver/",
        "unknown or malformed message",
    ):
        assert what in log, what
    assert stack.call("ping")["pid"] == stack.pids[0]
