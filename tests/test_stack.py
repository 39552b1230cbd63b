"""The supervisor, the kernel process and the CLI verbs, driven as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from isovisor.paths import RunDir
from isovisor.procs import gone
from tests.conftest import Stack, shm_segments, wait_event

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_up_list_console_down_leaves_nothing_behind(stack: Stack) -> None:
    hello = stack.domain_config("hello", "hello", on_poweroff="preserve")
    tick = stack.domain_config("tick", "ticker", extra="interval_ms=50")
    stack.up([hello, tick])
    sup_pid, kernel_pid = stack.pids
    assert psutil.Process(kernel_pid).ppid() == sup_pid
    with stack.subscribe(["console.tick"]) as sub:
        wait_event(sub, "console.tick")
    doms = stack.domains()
    assert set(doms) == {"hello", "tick"}
    h = doms["hello"]
    assert h["state"] == "---s--" and h["exit_code"] == 0 and h["memory"] == 4
    assert doms["tick"]["state"][2:] == "----"  # running or blocked, not paused/shutdown
    r = stack.cli("console", "hello")
    assert r.stdout == "Hello from hello (domid 1)!\nhello: done\n"
    assert shm_segments(f"isovisor.{sup_pid}.")  # guest RAM lives in shared memory
    table = stack.cli("list").stdout
    assert "Name" in table and "State" in table and "tick" in table
    r = stack.cli("down")
    assert r.returncode == 0, r.stderr
    assert gone(sup_pid)
    assert not psutil.pid_exists(kernel_pid)
    assert shm_segments(f"isovisor.{sup_pid}.") == []
    assert not RunDir(stack.run_dir).pidfile.exists()
    assert not any(p.exists() for p in RunDir(stack.run_dir).sockets())


def test_sigterm_to_supervisor_stops_the_stack(stack: Stack) -> None:
    stack.up([stack.domain_config("tick", "ticker")])
    sup, kern = (psutil.Process(p) for p in stack.pids)
    sup.terminate()
    sup.wait(30)
    kern.wait(30)
    assert shm_segments(f"isovisor.{stack.pids[0]}.") == []


def test_second_up_in_same_run_dir_is_refused(stack: Stack) -> None:
    stack.up([])
    r = stack.cli("up", "--detach", str(stack.dir / "supervisor.toml"))
    assert r.returncode == 1
    assert f"a stack is already running in {stack.run_dir}" in r.stderr


def test_create_pause_unpause_destroy(stack: Stack) -> None:
    stack.up([])
    cfg = stack.domain_config("tick", "ticker", extra="interval_ms=100")
    with stack.subscribe(["console.tick", "domain.tick."]) as sub:
        r = stack.cli("create", str(cfg))
        assert r.returncode == 0 and "created domain tick (id 1)" in r.stdout
        first = wait_event(sub, "console.tick")["data"].decode()
        assert stack.cli("pause", "tick").returncode == 0
        assert stack.domains()["tick"]["state"][2] == "p"
        paused_at = stack.call("console", name="tick")["end"]
        last = stack.call("console", name="tick")["data"].decode().splitlines()[-1]
        # While paused: no new console output for well over one tick interval.
        while (ev := sub.recv(0.6)) is not None:
            assert ev[0] != "console.tick" or ev[1]["offset"] < paused_at, ev
        assert stack.cli("unpause", "tick").returncode == 0
        nxt = wait_event(sub, "console.tick", match={"offset": paused_at})["data"].decode()
        first = last
        v1 = int(first.split("vtime_ms=")[1])
        v2 = int(nxt.split("vtime_ms=")[1])
        # Virtual time excludes the pause: consecutive ticks stay ~100 ms apart.
        assert 90 <= v2 - v1 <= 250, (first, nxt)
        r = stack.cli("destroy", "tick")
        assert r.returncode == 0 and "destroyed domain tick" in r.stdout
        wait_event(sub, "domain.tick.destroyed")
    assert stack.domains() == {}


def test_verbs_on_unknown_domain_and_duplicate_names(stack: Stack) -> None:
    cfg = stack.domain_config("tick", "ticker")
    stack.up([cfg])
    for verb in ("destroy", "pause", "unpause", "console"):
        r = stack.cli(verb, "ghost")
        assert r.returncode == 1
        assert "no domain named or numbered 'ghost' (domains: tick)" in r.stderr
    r = stack.cli("create", str(cfg))
    assert r.returncode == 1 and "a domain named 'tick' already exists" in r.stderr
    bad = stack.dir / "bad.toml"
    bad.write_text('name = "x"\nimage = "hello"\nmemory = "lots"\n')
    r = stack.cli("create", str(bad))
    assert r.returncode == 1 and 'memory = "lots" must be an integer' in r.stderr


def test_malformed_control_messages_get_errors(stack: Stack) -> None:
    stack.up([stack.domain_config("tick", "ticker")])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(RunDir(stack.run_dir).control)
    try:
        probes = [
            (b"\xc1\xc1 not msgpack", "not valid msgpack"),
            (msgpack.packb("just a string"), "must be a msgpack map"),
            (msgpack.packb({"command": "explode"}), "unknown supervisor command 'explode'"),
            (
                msgpack.packb({"command": "pause", "properties": {"name": 3.5}}),
                "property 'name' of command 'pause' must be str or int",
            ),
            (
                msgpack.packb({"command": "create", "properties": {}}),
                "command 'create' needs property 'path'",
            ),
        ]
        for body, fragment in probes:
            sock.send_multipart([b"", body])
            assert sock.poll(10_000), "no reply to a malformed message"
            reply = msgpack.unpackb(sock.recv_multipart()[-1])
            assert reply["status"] == "error" and fragment in reply["reason"], reply
            assert isinstance(reply["errno"], int) and reply["code"]
    finally:
        sock.close(0)
    assert "tick" in stack.domains()  # the stack still works


def _follow_from_the_start(stack: Stack, config: Path) -> subprocess.CompletedProcess[str]:
    """Create ``config`` paused, attach `console -f`, and start the domain only once the CLI
    says it is following: the domain cannot end (and vanish) before the CLI has found it."""
    name = config.stem
    r = stack.cli("create", "--paused", str(config))
    assert r.returncode == 0 and f"created domain {name}" in r.stdout, r.stdout + r.stderr
    assert stack.domains()[name]["state"][2] == "p"  # created paused: not one instruction run
    assert stack.call("console", name=name)["data"] == b""
    p = subprocess.Popen(
        [sys.executable, "-m", "isovisor.cli", "console", "-f", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ISOVISOR_RUN_DIR": str(stack.run_dir)},
    )
    try:
        assert p.stderr is not None
        banner = p.stderr.readline()
        assert banner.startswith(f"following domain {name} (id "), banner + p.stderr.read()
        assert stack.cli("unpause", name).returncode == 0
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, banner + err)


def test_console_follow_streams_new_output(stack: Stack) -> None:
    # 20 ticks over ~3 s, then it powers off and is destroyed, which ends `console -f`.
    stack.up([])
    p = _follow_from_the_start(
        stack, stack.domain_config("tick", "ticker", extra="interval_ms=150 count=20")
    )
    # No line is lost or repeated; -f returned when the domain was destroyed.
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [ln.split()[2] for ln in lines] == [str(i) for i in range(1, 21)], p.stdout


def test_console_follow_joins_mid_way_without_a_seam(stack: Stack) -> None:
    # 20 ticks over ~3 s: the CLI attaches once 5 are out, prints the history, then follows.
    stack.up([stack.domain_config("tick", "ticker", extra="interval_ms=150 count=20")])
    with stack.subscribe(["console.tick"]) as sub:
        seen = b""
        while b"tick 5 " not in seen:
            seen += wait_event(sub, "console.tick")["data"]
    stack.call("pause", name="tick")  # hold the rest until the CLI is attached
    p = subprocess.Popen(
        [sys.executable, "-m", "isovisor.cli", "console", "-f", "tick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ISOVISOR_RUN_DIR": str(stack.run_dir)},
    )
    try:
        assert p.stderr is not None
        banner = p.stderr.readline()
        assert banner.startswith("following domain tick (id "), banner + p.stderr.read()
        stack.call("unpause", name="tick")
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # No line is lost or repeated at the seam between history and live output.
    assert p.returncode == 0, err
    assert [ln.split()[2] for ln in out.splitlines()] == [str(i) for i in range(1, 21)], out


def test_list_json_fields(stack: Stack) -> None:
    stack.up([stack.domain_config("tick", "ticker", weight=512, cap=50)])
    r = stack.cli("list", "--json")
    d = json.loads(r.stdout)[0]
    assert {k: d[k] for k in ("name", "id", "memory", "vcpus", "weight", "cap")} == {
        "name": "tick",
        "id": 1,
        "memory": 4,
        "vcpus": 1,
        "weight": 512,
        "cap": 50,
    }
    assert len(d["state"]) == 6 and d["uptime"] >= 0 and d["cpu_time"] >= 0


def test_domain_failing_at_startup_does_not_stop_the_stack(stack: Stack) -> None:
    big = stack.dir / "big.bin"
    big.write_bytes(b"\x90" * (3 * 1024 * 1024))
    bad = stack.dir / "big.toml"
    bad.write_text('name = "big"\nimage = "big.bin"\nmemory = 2\n')
    stack.up([bad, stack.domain_config("tick", "ticker")])
    assert set(stack.domains()) == {"tick"}
    log = RunDir(stack.run_dir).log.read_text()
    assert "does not fit in domain 'big'" in log


def test_run_dir_too_long_is_a_clear_error(tmp_path: Path) -> None:
    from tests.conftest import cli

    long = tmp_path / ("x" * 90)
    r = cli("up", "--detach", str(Path(__file__).parent.parent / "supervisor.toml"), run_dir=long)
    assert r.returncode == 1 and "too long for Unix sockets" in r.stderr


def test_kernel_killed_supervisor_cleans_up_and_exits(stack: Stack) -> None:
    stack.up([stack.domain_config("tick", "ticker")])
    sup_pid, kernel_pid = stack.pids
    assert shm_segments(f"isovisor.{sup_pid}.")
    psutil.Process(kernel_pid).kill()  # SIGKILL: the kernel cannot clean up after itself
    psutil.Process(sup_pid).wait(30)
    assert shm_segments(f"isovisor.{sup_pid}.") == []  # swept by the supervisor
    log = RunDir(stack.run_dir).log.read_text()
    assert "kernel exited unexpectedly (status -9)" in log


def test_supervisor_killed_kernel_follows(stack: Stack) -> None:
    stack.up([stack.domain_config("tick", "ticker")])
    sup_pid, kernel_pid = stack.pids
    kernel = psutil.Process(kernel_pid)
    psutil.Process(sup_pid).kill()
    kernel.wait(30)  # parent-death signal: the kernel stops, freeing guest RAM itself
    assert shm_segments(f"isovisor.{sup_pid}.") == []
    # The stale pid file does not block the next `up` in the same run dir.
    stack.pids.clear()
    stack.up([])


def test_console_follow_continues_across_restarts(stack: Stack) -> None:
    # Each life prints two ticks and powers off; on_poweroff=restart brings it back until
    # the restart limit (5 in 10 s) leaves it destroyed, which ends `console -f`.
    stack.up([])
    p = _follow_from_the_start(
        stack,
        stack.domain_config(
            "phoenix", "ticker", extra="interval_ms=150 count=2", on_poweroff="restart"
        ),
    )
    assert p.returncode == 0, p.stderr
    ticks = [ln.split()[2] for ln in p.stdout.splitlines()]
    # Every life, the first included, printed completely and in order.
    assert ticks == ["1", "2"] * (len(ticks) // 2) and len(ticks) >= 4, p.stdout


def test_foreground_up_shows_every_guests_output_and_stops_on_ctrl_c(stack: Stack) -> None:
    import os
    import signal
    import subprocess
    import sys

    hello = stack.domain_config("hello", "hello")  # prints at once, before anyone could attach
    tick = stack.domain_config("tick", "ticker", extra="interval_ms=50")
    stack.up([hello, tick])  # writes supervisor.toml; this detached stack is only a template
    assert stack.cli("down").returncode == 0
    stack.pids.clear()
    p = subprocess.Popen(
        [sys.executable, "-m", "isovisor.cli", "up", str(stack.dir / "supervisor.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ISOVISOR_RUN_DIR": str(stack.run_dir), "COLUMNS": "200"},
    )
    try:
        lines = []
        assert p.stdout is not None
        for line in p.stdout:  # read until the ticker proves the stack is running
            lines.append(line)
            if "ticker: tick 2 " in line:
                break
        stack.pids += [stack.call("ping")["pid"], stack.call("ping")["kernel_pid"]]
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out = "".join(lines) + rest
    assert p.returncode == 0, err
    assert "hello | Hello from hello (domid 1)!" in out
    assert "hello | -- guest powered off with code 0 (on_poweroff: destroy)" in out
    assert out.rstrip().endswith("isovisor stack stopped")


def test_the_default_stack_runs_its_domains_and_drivers(stack: Stack) -> None:
    """What README's `isovisor up` starts: every domain of ./supervisor.toml, and the block,
    net and console drivers, each in its own process; every console goes through con0."""
    root = Path(__file__).resolve().parent.parent
    with_sub = stack.cli("up", "--detach", str(root / "supervisor.toml"))
    assert with_sub.returncode == 0, with_sub.stderr
    ping = stack.call("ping")
    stack.pids += [ping["pid"], ping["kernel_pid"]]
    drvs = {d["name"]: d for d in stack.call("drivers")["drivers"]}
    stack.pids += [d["pid"] for d in drvs.values()]
    assert set(drvs) == {"blk0", "net0", "con0"}, drvs
    for drv in drvs.values():
        assert drv["isolation"] == "process" and drv["connected"], drv
        assert psutil.Process(drv["pid"]).ppid() == ping["pid"]
    names = ("blkstress", "netpair-a", "netpair-b")
    with stack.subscribe([f"domain.{n}." for n in names]) as sub:
        for n in names:
            if stack.domains()[n]["state"][3] != "s":
                wait_event(sub, f"domain.{n}.shutdown", 60)
    con = stack.cli("console", "blkstress").stdout
    assert "blkstress: ops=20000 errors=0" in con, con
    for n in names[1:]:
        con = stack.cli("console", n).stdout
        assert "netpair: sent=20000 received=20000 lost=0 dup=0 reordered=0 corrupt=0" in con
    assert "Hello from hello" in (stack.run_dir / "consoles" / "hello.log").read_text()
    assert {"hello", "crc32", "primes", "ticker", *names} <= set(stack.domains())
    table = stack.cli("devices").stdout
    assert "blkstress" in table and "xvda" in table and "blk0" in table and "eth0" in table
    assert stack.cli("down").returncode == 0
    for drv in drvs.values():
        assert gone(drv["pid"])
