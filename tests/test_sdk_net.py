"""The network backend SDK: a frame hook (``NetBackend.filter_frame``) and its example,
``examples/sdk/netfilter.py`` (docs/sdk.md, "A network backend").

Unit tests of the example run in-process on real vif segments (tests/test_net_backend.py's
rig).  End to end, two ``netpair`` guests exchange verified frames while the switch goes
``drivers.net`` -> the example (dropping a UDP port a ``netecho`` client sends to) -> killed ->
the example again (its counters carried over) -> ``drivers.net``, and they finish with nothing
lost, repeated or corrupt.  And a hook with a bug for one frame ends three driver processes
(status 70, the traceback's last frame in the hook's file) before that frame is answered with
an error as poison, and nothing else is lost.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from drivers.state import BackendState, StateError
from isovisor.cli.swapclient import swap
from isovisor.paths import RunDir
from isovisor.testing import backend_class
from tests.conftest import Stack, wait_until
from tests.test_net import MAC_A, MAC_B, netpair_configs, pair_line
from tests.test_net_backend import BROADCAST, MAC_C, Rig, eth, three
from tests.test_recovery import Events, driver_row, kill_with_a_warm_spare

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sdk" / "netfilter.py"


def netfilter() -> Any:
    """The example's module, loaded as the driver host loads it."""
    return sys.modules[backend_class(EXAMPLE).__module__]


def udp(dst: str | bytes, src: str, port: int, payload: bytes = b"ping") -> bytes:
    """An IPv4 UDP frame to ``port`` (checksums left 0: the switch does not look at them)."""
    ip = bytes([0x45, 0, 0, 28 + len(payload), 0, 1, 0, 0, 64, 17, 0, 0])
    ip += bytes([198, 18, 0, 3, 198, 18, 0, 2])
    header = (49152).to_bytes(2, "big") + port.to_bytes(2, "big")
    header += (8 + len(payload)).to_bytes(2, "big") + bytes(2)
    return eth(dst, src, ip + header + payload, 0x0800)


@contextmanager
def rigged() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.teardown()


# --- the example, in-process ---------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_the_example_reads_its_options_and_ports() -> None:
    mod = netfilter()
    assert mod.udp_port(udp(MAC_B, MAC_A, 7)) == 7
    assert mod.udp_port(eth(MAC_B, MAC_A, b"not ip")) is None
    fragment = bytearray(udp(MAC_B, MAC_A, 7))
    fragment[20:22] = (185).to_bytes(2, "big")  # a later fragment: no UDP header in it
    assert mod.udp_port(bytes(fragment)) is None
    assert mod.numbers({"p": 7}, "p", 0xFFFF) == {7}
    assert mod.numbers({"p": "0x86dd, 0x88cc"}, "p", 0xFFFF) == {0x86DD, 0x88CC}
    assert mod.numbers({}, "p", 0xFFFF) == set()
    for bad in ("seven", 70000, "7,-1"):
        with pytest.raises(ValueError, match=r"p must be numbers 0\.\.0xffff"):
            mod.numbers({"p": bad}, "p", 0xFFFF)
    with rigged() as rig, pytest.raises(ValueError, match="unknown net backend option"):
        rig.backend({"drop_tcp_ports": 22}, mod.NetFilter)


@pytest.mark.timeout(20)
def test_the_example_drops_counts_and_carries_its_counts_across_a_swap() -> None:
    mod = netfilter()
    with rigged() as rig:
        opts = {"drop_udp_ports": "7, 9", "drop_ethertypes": 0x86DD}
        be, a, b, c = three(rig, opts, cls=mod.NetFilter)
        keep = [udp(BROADCAST, MAC_A, 8), eth(BROADCAST, MAC_A, b"netpair", 0x88B5)]
        drop = [
            udp(BROADCAST, MAC_A, 7),
            udp(BROADCAST, MAC_A, 9),
            eth(BROADCAST, MAC_A, b"v6", 0x86DD),
        ]
        a.send(be, *keep, *drop)
        c.send(be, udp(BROADCAST, MAC_C, 7))
        assert b.got() == keep
        st = be.statistics()
        own = ["a/eth0.seen", "a/eth0.dropped", "c/eth0.seen", "c/eth0.dropped"]
        assert list(st)[:5] == [*own, "vifs"]  # its own first, then the switch's
        assert (st["a/eth0.seen"], st["a/eth0.dropped"], st["c/eth0.dropped"]) == (5, 3, 1)
        assert st["filtered"] == 4
        wire = be.save().to_wire()
        be.suspend()
        be2 = rig.backend(opts, mod.NetFilter)
        be2.restore(BackendState.from_wire(wire))
        assert be2.statistics()["a/eth0.seen"] == 5  # before any vif is attached again
        with pytest.raises(StateError, match=r"state\.data\.backend\.seen must map vifs"):
            rig.backend(opts, mod.NetFilter).restore(
                BackendState("isovisor.net", 1, "x", (), {"backend": {"seen": {"a/eth0": "x"}}})
            )


# --- end to end --------------------------------------------------------------------------------

COUNT = 90_000  # frames each netpair guest sends: the steps below take ~46,000 of them here
DRIVER = """[driver.net0]
module = "{module}"
watchdog_sec = 1.0
intensity = 50
period = 60.0
"""


def start(stack: Stack, module: str, *, count: int) -> Events:
    """The stack: net0 running ``module``, and the netpair guests a and b on br0."""
    cfgs = netpair_configs(stack, count)
    stack.up([], extra=DRIVER.format(module=module))
    events = Events(stack.subscribe(["domain.", "driver."]), stack)
    for cfg in cfgs:
        stack.create(cfg)
    return events


def summary(stack: Stack, events: Events, name: str) -> tuple[int, dict[str, int], str]:
    """Guest ``name`` powered off: (exit code, its netpair summary, its console)."""
    p = events.wait(f"domain.{name}.shutdown", timeout=240)
    con = stack.call("console", name=name)["data"].decode()
    return p["code"], pair_line(con), con


def requests(stack: Stack) -> dict[str, int]:
    return {d["domain"]: d["requests"] for d in stack.call("devices")["devices"]}


def more_frames(stack: Stack, n: int) -> None:
    """Wait until a and b have each sent ``n`` more frames (the switch serves them)."""
    start = requests(stack)
    wait_until(
        lambda: all(requests(stack)[g] >= start[g] + n for g in ("a", "b")),
        timeout=60,
        what=f"a and b sending {n} more frames",
    )


def stats(stack: Stack, pred: Any, what: str) -> dict[str, Any]:
    """net0's statistics once ``pred(statistics, pid)`` holds (refreshed every second)."""

    def ok() -> dict[str, Any] | None:
        row = driver_row(stack, "net0")
        st = dict(row.get("statistics") or {})
        try:
            return st if st and pred(st, row["pid"]) else None
        except KeyError:
            return None

    try:
        return wait_until(ok, timeout=30, what=what)
    except AssertionError as e:
        raise AssertionError(
            f"{e}; statistics: {driver_row(stack, 'net0').get('statistics')}"
        ) from None


def echo_client(stack: Stack, events: Events, name: str, mac: str, count: int) -> str:
    """Run a netecho client on br1 against the server ``echo`` until it powers off."""
    cfg = stack.domain_config(
        name,
        "netecho",
        memory=4,
        on_poweroff="preserve",
        extra=f"mode=client peer=198.18.0.2 count={count} timeout=100",
        vif=[f"mac={mac}, bridge=br1, backend=net0, ip=198.18.0.{mac[-1]}"],
    )
    stack.create(cfg)
    events.wait(f"domain.{name}.shutdown", timeout=120)
    return str(stack.call("console", name=name)["data"].decode())


@pytest.mark.timeout(420)
def test_the_example_serves_verified_traffic_swapped_in_killed_and_swapped_out(
    stack: Stack,
) -> None:
    events = start(stack, "drivers.net", count=COUNT)
    try:
        rd, pid = RunDir(stack.run_dir), driver_row(stack, "net0")["pid"]
        more_frames(stack, 3000)
        # drivers.net -> the example, dropping UDP port 7 (echo), under the running guests
        r = swap(rd, "net0", str(EXAMPLE), wait=60, probation=0.3, options={"drop_udp_ports": 7})
        assert r["outcome"] == "swapped" and r["old_pid"] == pid and r["pid"] != pid, r
        stack.pids.append(pid := r["pid"])
        echo = stack.domain_config(
            "echo",
            "netecho",
            memory=4,
            extra="port=7",
            vif=["mac=02:00:00:00:01:02, bridge=br1, backend=net0, ip=198.18.0.2"],
        )
        stack.create(echo)
        con = echo_client(stack, events, "c3", "02:00:00:00:01:03", 20)
        line = [ln for ln in con.splitlines() if ln.startswith("netecho: client sent=")]
        assert line and "sent=20 received=0 lost=20 " in line[-1] and "errors=0" in line[-1], con
        st = stats(
            stack,
            lambda st, p: p == pid and st["c3/eth0.dropped"] == 20 and st["a/eth0.seen"] > 1000,
            "the example's counts of the first client",
        )
        assert st["filtered"] == 20 and st["echo/eth0.dropped"] == 0, st
        assert st["b/eth0.seen"] > 1000 and st["a/eth0.dropped"] == st["b/eth0.dropped"] == 0, st
        # killed: the replacement is the example too, with its options, counting afresh
        kill_with_a_warm_spare(stack, events, "net0")
        row = driver_row(stack, "net0")
        assert row["module"] == str(EXAMPLE) and row["pid"] != pid, row
        stack.pids.append(pid := row["pid"])
        more_frames(stack, 2000)
        echo_client(stack, events, "c4", "02:00:00:00:01:04", 10)
        st = stats(
            stack,
            lambda st, p: p == pid and st["c4/eth0.dropped"] == 10,
            "the replacement's counts of the second client",
        )
        assert st["filtered"] == 10 and "c3/eth0.seen" not in st, st
        # the example -> the example: its own counts are carried over (backend_data)
        r = swap(rd, "net0", str(EXAMPLE), wait=60, probation=0.3)
        assert r["outcome"] == "swapped" and r["pid"] != pid, r
        stack.pids.append(pid := r["pid"])
        st = stats(
            stack,
            lambda st, p: p == pid and "c4/eth0.dropped" in st,
            "the counts carried into the next instance",
        )
        assert st["c4/eth0.dropped"] == 10 and st["filtered"] == 0, st
        more_frames(stack, 2000)
        # and back to drivers.net (options replace the example's, which it would refuse)
        r = swap(rd, "net0", "drivers.net", wait=60, probation=0.3, options={"rx_wait_ms": 500})
        assert r["outcome"] == "swapped" and r["pid"] != pid, r
        stack.pids.append(r["pid"])
        st = stats(stack, lambda st, p: p == r["pid"], "drivers.net's statistics")
        assert "filtered" not in st and not any(k.endswith(".seen") for k in st), st
        for name in ("a", "b"):
            code, s, con = summary(stack, events, name)
            assert code == 0, con
            assert (s["sent"], s["received"], s["lost"], s["dup"], s["reordered"]) == (
                COUNT,
                COUNT,
                0,
                0,
                0,
            ), con
            assert (s["corrupt"], s["other"], s["errors"]) == (0, 0, 0), con
        row = driver_row(stack, "net0")
        assert row["swaps"] == 3 and row["restarts"] >= 1, row
    finally:
        events.sub.close()


BUGGY = """\
from drivers.net.backend import NetBackend, Vif

DEADLY = bytes.fromhex("4e505231") + (4321).to_bytes(4, "big")  # netpair data frame 4321


class Buggy(NetBackend):
    def filter_frame(self, src: Vif | None, frame: bytes) -> bytes | None:
        if src is not None and src.label == "a/eth0" and frame[14:22] == DEADLY:
            return frame[: 1 // 0]  # a bug, for this one frame of a's
        return frame
"""


@pytest.mark.timeout(300)
def test_a_hook_that_raises_ends_each_instance_until_the_frame_is_answered_as_poison(
    stack: Stack,
) -> None:
    """Frame 4321 of a makes the hook raise: each driver process that switches it exits with
    status 70, saying where in the hook; the third death makes it poison: a gets a tx error
    for that one frame, b misses that one frame, and every other frame arrives once."""
    buggy = stack.dir / "buggy.py"
    buggy.write_text(BUGGY)
    count = 20_000
    events = start(stack, str(buggy), count=count)
    try:
        poison = events.wait("driver.net0.poison", timeout=180)
        assert poison["domain"] == "a", poison
        ends = [p for t, p in events.seen if t == "driver.net0.exit"]
        assert [p.get("reason") for p in ends] == ["exit:70"] * 3, ends
        row = driver_row(stack, "net0")
        error = row["last_error"]
        assert error["where"] == f"{buggy}:9, in filter_frame", error
        assert "ZeroDivisionError" in error["error"], error
        tb = error["traceback"]
        frames = [ln.strip() for ln in tb.splitlines() if ln.strip().startswith('File "')]
        assert frames[-1] == f'File "{buggy}", line 9, in filter_frame', tb  # the last frame
        assert "\nZeroDivisionError: integer division or modulo by zero\n" in tb, tb
        assert "raised for the frame at tx ring index" in tb and "(a/eth0), redone:" in tb, tb
        code_a, sa, con_a = summary(stack, events, "a")
        code_b, sb, con_b = summary(stack, events, "b")
    finally:
        events.sub.close()
    assert (sb["received"], sb["lost"], sb["dup"], sb["corrupt"]) == (count - 1, 1, 0, 0), con_b
    assert (sa["received"], sa["lost"], sa["dup"], sa["corrupt"]) == (count, 0, 0, 0), con_a
    assert "tx_errors=1 " in con_a and sa["errors"] == 1, con_a
    assert code_a == code_b == 1  # netpair fails a run with a lost frame or an error
    by = driver_row(stack, "net0")["restarts_by_reason"]
    assert by == {"exit:70": 3}, by
