"""``isovisor migrate``: live pre-copy migration between two stacks over CurveZMQ, with the
guest's clock and console going on, unknown peers refused, and the guest running on at the
source whenever the destination dies or refuses before it has the guest running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from drivers.net import tap as tapmod
from ipc.control import Client, ControlError
from ipc.peers import create_keys
from isovisor import nettools
from isovisor.paths import RunDir
from tests.conftest import Stack, cli, shm_segments, wait_event, wait_until
from tests.test_save_restore import (
    BLK,
    NET,
    assert_blkstress_verified,
    disk_requests,
    netpair_guests,
    netpair_result,
    start_blkstress,
)

MIGRATION = '[migration]\nlisten = "tcp://127.0.0.1:0"\n'


def _pair(
    a: Stack, b: Stack, *, trust: bool = True, drivers: str = "", disks: bool = False
) -> None:
    """Two stacks that know each other as "a" and "b" (with ``trust=False``, b does not know
    a's key), both with the ``drivers`` tables (``disks``: b takes disk images, in its
    directory's ``disks``)."""
    key_a, key_b = (create_keys(s.dir / "keys")[0].public.decode() for s in (a, b))
    a.up(extra=MIGRATION + drivers)
    b.up(extra=MIGRATION + ('disks = "disks"\n' if disks else "") + drivers)
    ep_a, ep_b = (_kernel(s).call("ping")["migration"] for s in (a, b))
    assert ep_a.startswith("tcp://127.0.0.1:") and ep_b.startswith("tcp://127.0.0.1:")
    (a.dir / "peers").write_text(f"b {key_b} {ep_b}\n")
    (b.dir / "peers").write_text(f"a {key_a} {ep_a}\n" if trust else "# nobody\n")


def _kernel(s: Stack) -> Client:
    return Client(RunDir(s.run_dir).kernel_control, timeout=15)


def _console(st: Stack, name: str) -> str:
    return bytes(st.call("console", name=name)["data"]).decode()


def _migrate(src: Stack, name: str, peer: str, **opts: Any) -> dict[str, Any]:
    """Migrate through the control socket and wait for the outcome event."""
    sub = src.subscribe([f"domain.{name}.migration"])
    try:
        r = src.call("migrate", name=name, peer=peer, **opts)
        return wait_event(
            sub, f"domain.{name}.migration", timeout=60, match={"migration": r["migration"]}
        )
    finally:
        sub.close()


def test_twenty_migrations_keep_the_clock_and_every_console_line(stack: Stack, peer: Stack) -> None:
    _pair(stack, peer)
    stack.create(
        stack.domain_config(
            "cc", "clockcheck", memory=16, extra="report_ms=50", on_poweroff="preserve"
        )
    )
    wait_until(lambda: _console(stack, "cc").count("report") >= 3, what="first reports")
    here, there = (stack, "b"), (peer, "a")
    for i in range(20):
        src, dest = here if i % 2 == 0 else there
        out = _migrate(src, "cc", dest)
        assert out["outcome"] == "migrated", out
        assert out["pages_sent"] >= out["pages_touched"] > 0
        assert "cc" not in src.domains()  # the source's copy is gone
    # 20 moves: it is back where it started, and runs on
    cc = _console(stack, "cc")
    wait_until(lambda: _console(stack, "cc").count("epoch=20 ") >= 2, what="reports after")
    stack.call("pause", name="cc")
    cc = _console(stack, "cc")
    reports = re.findall(
        r"^clockcheck: report (\d+) .*backward=(\d+) .*epoch=(\d+) .*hc_behind=(\d+)$", cc, re.M
    )
    numbers = [int(k) for k, *_ in reports]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "a line lost or twice"
    assert numbers[0] == 1 or len(cc) >= 60_000  # the whole history, unless it outgrew 64 KiB
    assert all(b == "0" for _, b, _, _ in reports), "the clock went backwards"
    assert all(h == "0" for *_, h in reports), "HC_TIME disagreed with the guest's reading"
    epochs = [int(e) for _, _, e, _ in reports]
    assert epochs == sorted(epochs) and epochs[-1] == 20


def test_an_unknown_peer_is_refused_and_the_guest_runs_on(stack: Stack, peer: Stack) -> None:
    _pair(stack, peer, trust=False)
    stack.create(stack.domain_config("tick", "ticker", extra="interval_ms=20"))
    wait_until(lambda: "tick 2" in _console(stack, "tick"), what="ticks")
    sub = peer.subscribe(["migration.refused"])
    out = _migrate(stack, "tick", "b", timeout_s=1.0)
    refused = wait_event(sub, "migration.refused", timeout=10)
    sub.close()
    assert out["outcome"] == "failed"
    assert "does not list this stack's key" in out["reason"], out["reason"]
    assert refused["key"] == (stack.dir / "keys" / "stack.key").read_text().split('"')[1]
    assert "refused a connection from an unknown key" in (peer.run_dir / "kernel.log").read_text()
    assert peer.domains() == {}
    row = stack.domains()["tick"]
    assert "p" not in row["state"] and row["cap"] == 0
    n = len(_console(stack, "tick"))
    wait_until(lambda: len(_console(stack, "tick")) > n, what="the guest runs on")


def _stack_pids(s: Stack) -> list[int]:
    ping = s.call("ping")
    return [ping["pid"], ping["kernel_pid"]]


def test_the_destination_dying_at_each_phase_leaves_the_guest_running_at_the_source(
    stack: Stack, peer: Stack
) -> None:
    """The destination's kernel dies on receiving begin, pages, sync or commit (injected),
    or its kernel and supervisor are killed from outside in the middle of the rounds: the
    source reports why and its guest goes on, with its output whole."""
    _pair(stack, peer)
    stack.create(
        stack.domain_config(
            "mw", "memwriter", memory=8, extra="wws_kib=2048 seconds=600 report_ms=100"
        )
    )
    wait_until(lambda: "report 2 " in _console(stack, "mw"), what="memwriter runs")
    for phase in ("begin", "pages", "sync", "commit", "killed"):
        sup = _stack_pids(peer)[0]
        if phase == "killed":
            sub = stack.subscribe(["domain.mw.migrat"])  # progress and outcome, in order
            # paced at 4 MB/s, a round of its 2 MiB takes 0.5 s: however little CPU a loaded
            # host gives the writer meanwhile, it dirties more than the 50 pages that would
            # stop the rounds, so the kill lands in one of them
            r = stack.call(
                "migrate",
                name="mw",
                peer="b",
                timeout_s=1.0,
                max_downtime_ms=0.1,
                max_rounds=1000,
                max_bandwidth_mbs=4,
            )
            wait_event(sub, "domain.mw.migrating", match={"phase": "round"}, timeout=30)
            for pid in _stack_pids(peer):
                os.kill(pid, signal.SIGKILL)
            out = wait_event(
                sub, "domain.mw.migration", timeout=30, match={"migration": r["migration"]}
            )
            sub.close()
        else:
            _kernel(peer).call("migration_inject", phase=phase)
            pids = _stack_pids(peer)
            out = _migrate(stack, "mw", "b", timeout_s=1.0)
            wait_until(
                lambda pids=pids: (
                    not any(
                        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                        for p in pids[1:]
                    )
                ),
                what=f"the destination's kernel died at {phase}",
            )
        assert out["outcome"] == "failed", (phase, out)
        assert "did not answer" in out["reason"], (phase, out["reason"])
        row = stack.domains()["mw"]
        assert "p" not in row["state"] and row["cap"] == 0, (phase, row)
        n = _console(stack, "mw").count("report")
        wait_until(
            lambda n=n: _console(stack, "mw").count("report") > n + 1,
            what=f"the guest runs on after {phase}",
        )
        # a fresh destination for the next phase
        if RunDir(peer.run_dir).running_pid() is not None:
            peer.cli("down")
        wait_until(lambda: RunDir(peer.run_dir).running_pid() is None, what="old peer gone")
        left = shm_segments(f"isovisor.{sup}.")
        if phase == "killed":  # nobody was left to clean up after a SIGKILL: the test does
            for seg in left:
                (Path("/dev/shm") / seg).unlink()
        else:  # the supervisor swept its dead kernel's RAM, the reception's too
            assert left == [], (phase, left)
        _restart(stack, peer)
    stack.call("destroy", name="mw")


def _restart(a: Stack, b: Stack) -> None:
    b.up(extra=MIGRATION)
    ep = _kernel(b).call("ping")["migration"]
    key = (b.dir / "keys" / "stack.key").read_text().split('"')[1]
    (a.dir / "peers").write_text(f"b {key} {ep}\n")


def test_a_writer_faster_than_the_link_is_throttled_and_converges(
    stack: Stack, peer: Stack
) -> None:
    _pair(stack, peer)
    stack.create(
        stack.domain_config(
            "mw",
            "memwriter",
            memory=16,
            extra="wws_kib=1024 seconds=8 report_ms=200",
            on_poweroff="preserve",
        )
    )
    wait_until(lambda: "report 1 " in _console(stack, "mw"), what="memwriter runs")
    # a link capped at 4 MB/s (a round of its 1 MiB in 0.25 s): the writer outruns it however
    # little CPU a busy host gives it, even throttled to 1 %, so the rounds stall and it is
    # stopped and copied anyway
    out = _migrate(stack, "mw", "b", max_downtime_ms=20.0, max_rounds=40, max_bandwidth_mbs=4)
    assert out["outcome"] == "migrated", out
    assert out["throttle"] > 0, out  # auto-converge cut its CPU
    assert 3 <= out["rounds"] < 40, out  # and it converged before the round limit
    wait_until(lambda: peer.domains()["mw"]["exit_kind"], timeout=60, what="memwriter ends")
    text = _console(peer, "mw")
    assert re.search(r"memwriter: done written=\d+ pages=256 errors=0", text), text[-400:]
    assert peer.domains()["mw"]["cap"] == 0  # the throttle stays behind with the source


def test_a_guest_doing_disk_io_migrates_back_and_forth_and_verifies(
    stack: Stack, peer: Stack
) -> None:
    """blkstress moves four times mid-run between two stacks whose blk0 drivers see the same
    image: each destination's driver takes the ring over where the source's let it go."""
    _pair(stack, peer, drivers=BLK)
    start_blkstress(stack, 60000, 5)
    for i in range(4):
        src, dest = (stack, "b") if i % 2 == 0 else (peer, "a")
        out = _migrate(src, "bs", dest)
        assert out["outcome"] == "migrated", out
    assert_blkstress_verified(stack, 60000)


def test_a_disk_copied_along_while_the_guest_writes_it_verifies_at_the_destination(
    stack: Stack, peer: Stack
) -> None:
    """blkstress migrates --with-disks to a stack that keeps its own images: its disk is
    copied while it writes it (the blocks written meanwhile sent again), the destination runs
    it on its own copy, and wiping the source's image changes nothing there.  Without a
    disks directory the destination refuses, and the guest runs on.  A memory disk moves
    with --with-disks only, into the new device's own shared-memory medium."""
    _pair(stack, peer, drivers=BLK, disks=True)
    start_blkstress(stack, 30000, 7)
    out = _migrate(stack, "bs", "b", with_disks=True)
    assert out["outcome"] == "migrated", out
    assert out["disk_blocks"] > 0 and out["rounds"] >= 1, out
    copy = peer.dir / "disks" / "bs-xvda.img"
    assert copy.exists() and not list((peer.dir / "disks").glob("*.partial"))
    src = stack.dir / "bs.img"
    with open(src, "r+b") as f:  # the source's image is no longer the guest's
        f.write(b"\xee" * src.stat().st_size)
    assert_blkstress_verified(peer, 30000)
    disks = [d for d in peer.call("devices")["devices"] if d["vdev"] == "xvda"]
    assert disks and disks[0]["target"] == str(copy), disks
    # back to a stack that takes no images: refused, and it runs on where it is
    peer.create(
        peer.domain_config(
            "bs2",
            "blkstress",
            memory=8,
            extra="ops=100000000 blocks=64",
            disk=[f"target={peer.dir / 'bs2.img'}, vdev=xvda, access=rw, backend=blk0, size=1M"],
        )
    )
    wait_until(lambda: "bs2" in peer.domains(), what="bs2 created")
    out = _migrate(peer, "bs2", "a", with_disks=True)
    assert out["outcome"] == "failed" and "takes no disk images" in out["reason"], out
    assert out["source_running"] is True
    assert peer.domains()["bs2"]["exit_kind"] is None
    sup = peer.call("ping")["pid"]  # the driver stopped marking, and the map is gone
    wait_until(lambda: not list(Path("/dev/shm").glob(f"isovisor.{sup}.*.mirror")), what="no map")
    # a memory disk (its data in the source stack's shared memory) needs no disks directory:
    # refused without --with-disks, copied along with it
    peer.call("destroy", name="bs2")
    peer.create(
        peer.domain_config(
            "md",
            "blkstress",
            memory=8,
            on_poweroff="preserve",
            extra="ops=40000 qd=32 mix=60 seed=9 blocks=256 bs=4096 timeout=30000",
            disk=["vdev=xvda, type=memory, size=1M, backend=blk0"],
        )
    )
    wait_until(lambda: disk_requests(peer) > 2000, what="memory-disk I/O under way")
    with pytest.raises(ControlError, match="cannot be migrated without --with-disks"):
        peer.call("migrate", name="md", peer="a")
    out = _migrate(peer, "md", "a", with_disks=True)
    assert out["outcome"] == "migrated" and out["disk_blocks"] > 0, out
    row = wait_until(lambda: stack.domains()["md"]["exit_kind"] and stack.domains()["md"], 90)
    text = _console(stack, "md")
    assert row["exit_code"] == 0, text[-800:]
    assert re.search(r"blkstress: ops=40000 errors=0 .* mismatches=0", text), text[-800:]
    assert "verify blocks=256 mismatches=0" in text


def test_a_console_served_by_a_driver_goes_on_in_the_destinations_log(
    stack: Stack, peer: Stack
) -> None:
    """A ticker whose console con0 serves moves there and back: each stack's log file holds the
    ticks printed while it ran the guest, together every tick exactly once, and `console` at
    the destination shows the ticks from the move on."""
    con = '[driver.con0]\nmodule = "drivers.console"\n'
    _pair(stack, peer, drivers=con)
    stack.create(
        stack.domain_config(
            "tk", "ticker", extra="interval_ms=20 count=300", console="con0", on_poweroff="preserve"
        )
    )
    ticks = lambda s: [int(k) for k in re.findall(r"tick (\d+) ", _console(s, "tk"))]  # noqa: E731
    wait_until(lambda: len(ticks(stack)) >= 5, what="ticks before the move")
    assert _migrate(stack, "tk", "b")["outcome"] == "migrated"
    wait_until(lambda: len(ticks(peer)) >= 5, what="ticks at the destination")
    there = ticks(peer)
    assert there == list(range(there[0], there[0] + len(there))), there  # from the move on
    assert _migrate(peer, "tk", "a")["outcome"] == "migrated"
    wait_until(lambda: stack.domains()["tk"]["exit_kind"], timeout=60, what="the ticker ends")
    logs = [
        [
            int(k)
            for k in re.findall(r"tick (\d+) ", (s.run_dir / "consoles" / "tk.log").read_text())
        ]
        for s in (stack, peer)
    ]
    assert sorted(logs[0] + logs[1]) == list(range(1, 301)), logs
    assert logs[1] and logs[1] == list(range(logs[1][0], logs[1][-1] + 1))


def test_a_destination_dying_at_commit_gives_the_disk_back_to_the_source(
    stack: Stack, peer: Stack
) -> None:
    """The source's driver had let the disk go for the stop-and-copy when the destination's
    kernel died on the commit: the source attaches the disk again and resumes the guest, which
    finishes with every block verified."""
    _pair(stack, peer, drivers=BLK)
    start_blkstress(stack, 30000, 9)
    _kernel(peer).call("migration_inject", phase="commit")
    out = _migrate(stack, "bs", "b", timeout_s=1.0)
    assert out["outcome"] == "failed" and "did not answer 'commit'" in out["reason"], out
    assert_blkstress_verified(stack, 30000)


@pytest.mark.e2e
def test_keys_makes_a_key_pair_once_and_prints_the_peers_line(tmp_path: Path) -> None:
    toml = tmp_path / "supervisor.toml"
    toml.write_text('[supervisor]\nname = "hosta"\n[migration]\nlisten = "tcp://10.0.0.1:7100"\n')
    r = cli("keys", str(toml))
    assert r.returncode == 0, r.stderr
    public = (tmp_path / "keys" / "stack.key").read_text().split('"')[1]
    assert f"hosta {public} tcp://10.0.0.1:7100" in r.stdout and "created" in r.stdout
    assert (tmp_path / "keys" / "stack.key_secret").stat().st_mode & 0o077 == 0
    again = cli("keys", str(toml))
    assert again.returncode == 0 and "created" not in again.stdout and public in again.stdout
    (tmp_path / "peers").write_text(f"hostb {public[:-1]} tcp://10.0.0.2:7100\n")
    toml.write_text(toml.read_text() + "bogus = 1\n")
    bad = cli("keys", str(toml))
    assert bad.returncode == 1 and "bogus" in bad.stderr


def test_a_guest_destroyed_during_its_migration_ends_it_cleanly(stack: Stack, peer: Stack) -> None:
    """The guest is destroyed while its RAM is being sent (the scan holds the guest's RAM: the
    teardown waits for it): the migration fails saying so, the kernels live on, and the
    destination frees what it had reserved."""
    _pair(stack, peer)
    stack.create(
        stack.domain_config(
            "mw", "memwriter", memory=16, extra="wws_kib=8192 seconds=600 report_ms=100"
        )
    )
    # a report with passes=1: all 2048 pages are written (before, the guest zeroes zeroes and
    # dirties nothing, so a migration could finish in two rounds)
    wait_until(lambda: "passes=1" in _console(stack, "mw"), timeout=60, what="a full pass")
    sub = stack.subscribe(["domain.mw.migrat"])
    # paced at 16 MB/s, each round of its 8 MiB takes 0.5 s, in which the guest dirties far more
    # than the 50 pages that would stop it: the rounds go on until the destroy lands
    r = stack.call(
        "migrate",
        name="mw",
        peer="b",
        max_downtime_ms=0.1,
        max_rounds=1000,
        auto_converge=False,
        max_bandwidth_mbs=16,
    )
    wait_event(sub, "domain.mw.migrating", match={"phase": "round"}, timeout=30)
    stack.call("destroy", name="mw")
    out = wait_event(sub, "domain.mw.migration", match={"migration": r["migration"]}, timeout=30)
    sub.close()
    assert out["outcome"] == "failed" and "stopped during the migration" in out["reason"], out
    assert out["source_running"] is False
    assert _kernel(stack).call("ping")["domains"] == 0
    assert peer.domains() == {}
    dest_sup = peer.call("ping")["pid"]
    wait_until(lambda: not shm_segments(f"isovisor.{dest_sup}.mig"), what="the reception freed")


def test_a_pair_on_the_network_moved_one_guest_at_a_time_gets_every_frame_once(
    stack: Stack, peer: Stack
) -> None:
    """netpair a and b, mid-run, migrate one after the other with their vifs (MACs kept):
    while they are split between the two stacks, whose switches are not linked, b (no window)
    sends into nothing and sends again; once both are at the destination they finish, every
    frame received exactly once, and each vif announced itself on the destination's switch."""
    _pair(stack, peer, drivers=NET)
    netpair_guests(stack, 20000, b_extra="window=0")
    for name in ("a", "b"):
        out = _migrate(stack, name, "b")
        assert out["outcome"] == "migrated", out
        if name == "a":  # split: b cannot finish before it is at the destination too
            assert "netpair: sent=" not in _console(stack, "b"), "the pair ended before the move"
    a, b = netpair_result(peer, "a"), netpair_result(peer, "b")
    for r in (a, b):
        assert r["received"] == 20000 and r["errors"] == 0, r
        assert r["lost"] == r["dup"] == r["reordered"] == r["corrupt"] == 0, r
    assert b["resent"] > 0, b
    log = (peer.run_dir / "driver-net0.log").read_text()
    assert len(re.findall(r"vif \d+ \(([ab])/eth0\): moved here; announced", log)) == 2, log[-2000:]


@pytest.fixture
def two_stack_names() -> Iterator[tuple[str, str]]:
    """Names for two stacks whose net drivers' default namespaces are removed afterwards."""
    problem = nettools.privilege_problem()
    if problem is not None:
        pytest.skip(f"needs network namespaces and TAP devices: {problem}")
    names = (f"mig{os.getpid()}a", f"mig{os.getpid()}b")
    try:
        yield names
    finally:
        for name in names:
            ns = f"isovisor-{name}-net0"
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            (tapmod.MARKER_DIR / ns).unlink(missing_ok=True)


def test_a_migrated_guest_announces_its_mac_on_the_destinations_uplink(
    stack: Stack, peer: Stack, two_stack_names: tuple[str, str]
) -> None:
    """A netecho guest reached from the host through stack a's TAP moves to stack b: a
    gratuitous ARP for its address, from its MAC, comes out of b's TAP on resume (what a
    switch beyond the uplink learns the guest's new place from), and the host answers to
    pings through b's TAP at once.  Both net drivers use the default namespace and TAP
    names, which differ by stack: the two stacks on one host do not collide."""
    name_a, name_b = two_stack_names
    ns_a, ns_b = (f"isovisor-{n}-net0" for n in two_stack_names)
    key_a, key_b = (create_keys(s.dir / "keys")[0].public.decode() for s in (stack, peer))
    uplink = NET + '[driver.net0.options]\nuplink = "tap"\n'
    stack.up(extra=MIGRATION + uplink, name=name_a)
    peer.up(extra=MIGRATION + uplink, name=name_b)
    ep_a, ep_b = (_kernel(s).call("ping")["migration"] for s in (stack, peer))
    (stack.dir / "peers").write_text(f"b {key_b} {ep_b}\n")
    (peer.dir / "peers").write_text(f"a {key_a} {ep_a}\n")
    mac, ip = "02:00:00:00:01:02", "198.18.0.2"
    for st, name, m, addr in (
        (stack, "echo", mac, ip),
        (peer, "other", "02:00:00:00:01:03", "198.18.0.3"),
    ):
        st.create(
            st.domain_config(
                name,
                "netecho",
                memory=4,
                extra="port=7",
                vif=[f"mac={m}, bridge=br0, backend=net0, ip={addr}"],
            )
        )
        wait_until(lambda st=st, name=name: "netecho: up" in _console(st, name), what=f"{name} up")
    assert all(r.rtt_ms is not None for r in nettools.ping(ip, netns=ns_a, count=2, timeout=2.0))
    # b's TAP is open (its guest "other" attached): listen there for ARP before the move
    arp = nettools.socket_in(ns_b, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        arp.bind(("ivnet0", 0x0806))
        arp.settimeout(10.0)
        out = _migrate(stack, "echo", "b")
        assert out["outcome"] == "migrated", out
        while True:  # (the host's own ARP traffic may come first)
            frame = arp.recv(2048)
            if frame[6:12] == bytes.fromhex(mac.replace(":", "")):
                break
    finally:
        arp.close()
    assert frame[:6] == b"\xff" * 6 and frame[20:22] == b"\x00\x01"  # broadcast, a request
    assert frame[28:32] == frame[38:42] == socket.inet_aton(ip)  # gratuitous: for itself
    got = nettools.ping(ip, netns=ns_b, count=3, interval=0.05, timeout=2.0)
    assert all(r.rtt_ms is not None for r in got), got
