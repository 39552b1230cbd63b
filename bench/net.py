"""Network: UDP echo latency and frame rates through the ``drivers.net`` switch process, against
a plain host-to-host Python UDP echo, and what 100 SIGKILLs of the switch cost a ping.

A private stack (pcpus=2) runs ``[driver.net0]`` (drivers.net, its own process, warm spare on)
with three bridges: ``br1`` holds a ``netecho`` server guest (198.18.1.2) for the guest client
runs, ``br2`` the ``netpair`` guests, and ``br0`` a ``netecho`` server guest (198.18.0.2) that
the host reaches through the TAP uplink in a network namespace of this bench (root only).

Measured in repetitions, the kinds interleaved (order rotated every repetition) so that each
figure and its baseline see the same machine:

1. **guest -> guest**: a ``netecho`` client guest (``mode=client``, one request at a time) sends
   ``--count`` UDP echo requests of ``--size`` payload bytes to the server guest on br1.  Its own
   figures (``rtt_us_median``, ``rtt_us_p99``, guest clock = host CLOCK_MONOTONIC) are the
   latency; echoes/s is ``count`` over the host-observed time between its ``client peer=``
   console line (sent just before the first request) and its summary line (printed after the
   last one).  Frames/s: two ``netpair`` guests on br2 each send ``--pair-count`` frames of the
   same frame size to the other (window 32); frames/s = both counts over the longer guest's
   time from "peer up" to its end (guest clock).
2. **host -> guest**: :func:`isovisor.nettools.udp_echo` from the stack's network namespace to
   the br0 server guest through the TAP: the same number of requests, same payload size, one at
   a time; per-request RTT and echoes/s (requests over the loop's wall time).
3. **ceiling**: the same :func:`~isovisor.nettools.udp_echo` loop, in this process, to a plain
   Python UDP echo server process on 127.0.0.1 (``recvfrom`` / ``sendto``): same number of round
   trips, same payload size.  For netpair's frames/s, two host Python processes exchange
   ``--pair-count`` datagrams of the same payload size each way on 127.0.0.1 with netpair's flow
   control (window 32, an ack every 8).  Ratios are isovisor / ceiling, per repetition (median
   of those).

Per repetition, a latency figure is that run's median and p99; the table gives the median over
repetitions of each (and the largest per-run p99).

4. **net backend kills** (root only): a helper process pings the br0 guest from the namespace
   every 10 ms while the bench SIGKILLs the switch's active pid (from the supervisor's ``status``)
   ``--kills`` times, each once the warm spare is ready again and at least 0.3 s after the
   previous recovery.  Per kill: pings lost (sent from 50 ms before the kill to 50 ms before the
   next), the stall (kill -> the first reply to a ping sent after the kill), the recovery time
   (kill -> ``done_ns`` of the kernel's ``driver.net0.replayed``; and the supervisor's
   ``driver.net0.recovered`` ``recovery_ms``: its detection -> done), and the pings lost that
   were sent after that recovery (must be 0).  Then a run of the same length without kills.

Parts 2 and 4 need root, /dev/net/tun and ``ip`` (:func:`isovisor.nettools.privilege_problem`);
without them they are skipped with a line saying why.  Every process, the stack's shared memory,
the TAP and the namespace are removed at the end, on Ctrl-C and on failure.

    python3 bench/net.py [--quick] [--reps N] [--count N] [--size S] [--pair-count N]
                         [--kills N] [--wait-quiet S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import (
    GATE,
    QUIET_PCT,
    Result,
    Row,
    bench_main,
    fmt_load,
    machine_state,
    median,
    parse_kv,
    pctl,
    private_stack,
    wait_topic,
)
from swap import RunLoad

from drivers.net import tap as tapmod
from ipc.events import Subscriber
from ipc.lifetime import die_with_parent
from isovisor import nettools
from isovisor.privstack import PrivateStack

NAME = "net"
TITLE = (
    "Network: UDP echo and frame rates through the net driver vs a host Python UDP echo; "
    "pings across SIGKILLs of the switch"
)

SRV_IP = "198.18.1.2"  # the guest echo server for guest clients (br1)
SRV_MAC = "02:00:00:00:01:02"
CLI_IP = "198.18.1.3"
CLI_MAC = "02:00:00:00:01:03"
ECHO_IP = "198.18.0.2"  # the guest echo server the host reaches through the TAP (br0)
ECHO_MAC = "02:00:00:00:00:02"
PAIR_MACS = ("02:00:00:00:02:0a", "02:00:00:00:02:0b")
PING_INTERVAL_S = 0.010
#: a ping sent from this long before a kill up to this long before the next counts for the kill
ATTRIBUTE_NS = 50_000_000
#: pings are never sent closer than this to a previous recovery
SETTLE_S = 0.3
UDP_HEADERS = 14 + 20 + 8  # Ethernet + IPv4 + UDP


def driver_toml(netns: str | None, tap: str) -> str:
    t = (
        '[driver.net0]\nmodule = "drivers.net"\nintensity = 100000\nperiod = 1.0\n'
        "watchdog_sec = 1.0\n"
    )
    if netns is not None:
        t += (
            f'[driver.net0.options]\nuplink = "tap"\nnetns = "{netns}"\ntap = "{tap}"\n'
            'bridge = "br0"\n'
        )
    return t


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions of each latency/throughput run (default 10, quick 3)",
    )
    ap.add_argument(
        "--count", type=int, default=None, help="UDP round trips per run (default 2000, quick 300)"
    )
    ap.add_argument("--size", type=int, default=64, help="UDP payload bytes (default 64)")
    ap.add_argument(
        "--pair-count",
        type=int,
        default=None,
        help="netpair frames each way per run (default 5000, quick 1000)",
    )
    ap.add_argument(
        "--kills",
        type=int,
        default=None,
        help="SIGKILLs of the net driver during the pings (default 100, quick 5)",
    )


# --- helper processes (this file run as `net.py _pinger ...` / `net.py _echo`) ----------------


def _echo_server_main() -> int:
    """A plain UDP echo server on 127.0.0.1 (the ceiling): prints its port, echoes every
    datagram to its sender, ends after echoing ``quit``."""
    die_with_parent()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    while True:
        data, addr = sock.recvfrom(65535)
        sock.sendto(data, addr)
        if data == b"quit":
            return 0


def _hostpair_main(count: int, size: int, window: int, timeout_s: float) -> int:
    """One side of the host streaming ceiling for netpair: prints its UDP port, reads the
    peer's port and then ``go`` on stdin, sends ``count`` datagrams of ``size`` bytes to the
    peer with at most ``window`` beyond the peer's last ack (netpair's flow control: acks every
    window/4 data datagrams), and ends once all its own are acked and all the peer's are in;
    prints ``start_ns end_ns received``."""
    die_with_parent()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    peer = ("127.0.0.1", int(sys.stdin.readline()))
    sock.connect(peer)
    sys.stdin.readline()  # go
    sock.setblocking(False)
    ack_every = max(1, window // 4)
    pad = bytes(size)
    sent = acked = received = unacked = 0
    t0 = time.monotonic_ns()
    deadline = time.monotonic() + timeout_s
    while (acked < count or received < count) and time.monotonic() < deadline:
        while sent < count and sent < acked + window:
            sock.send(b"D" + struct.pack("!I", sent) + pad[5:])
            sent += 1
        select.select([sock], [], [], 0.01)
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                break
            if data[:1] == b"D":
                received += 1
                unacked += 1
                if unacked >= ack_every or received == count:
                    sock.send(b"A" + struct.pack("!I", received))
                    unacked = 0
            elif data[:1] == b"A":
                acked = max(acked, struct.unpack_from("!I", data, 1)[0])
    t1 = time.monotonic_ns()
    # the peer may still wait for our last ack if it was sent before it listened: repeat it
    with contextlib.suppress(OSError):
        sock.send(b"A" + struct.pack("!I", received))
    print(t0, t1, received, flush=True)
    return 0


def _pinger_main(netns: str, addr: str, interval_s: float, grace_s: float) -> int:
    """ICMP echo to ``addr`` from ``netns`` every ``interval_s`` until a line arrives on stdin
    (or it closes); after ``grace_s`` more for late replies, prints JSON: every ping's send time
    and reply time (CLOCK_MONOTONIC ns; null: no reply)."""
    die_with_parent()
    sock = nettools.socket_in(netns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    payload = bytes(range(56))
    sent: list[int] = []
    recv: list[int | None] = []
    errors = 0
    stop_at: float | None = None
    next_t = time.monotonic()
    stdin = sys.stdin.fileno()
    while True:
        now = time.monotonic()
        if stop_at is None and now >= next_t:
            seq = len(sent)
            head = struct.pack("!BBHHH", nettools.ICMP_ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF)
            pkt = (
                struct.pack(
                    "!BBHHH",
                    nettools.ICMP_ECHO_REQUEST,
                    0,
                    nettools.checksum(head + payload),
                    ident,
                    seq & 0xFFFF,
                )
                + payload
            )
            sent.append(time.monotonic_ns())
            recv.append(None)
            try:
                sock.sendto(pkt, (addr, 0))
            except OSError:
                errors += 1  # e.g. no carrier while no driver instance holds the TAP: lost
            next_t += interval_s
            if next_t < now:  # we were late: keep the spacing, do not send a burst
                next_t = now + interval_s
        if stop_at is not None and now >= stop_at:
            break
        wake = stop_at if stop_at is not None else next_t
        ready, _, _ = select.select(
            [sock, stdin] if stop_at is None else [sock], [], [], max(0.0, wake - time.monotonic())
        )
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            at = time.monotonic_ns()
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            typ, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
            if typ != nettools.ICMP_ECHO_REPLY or rid != ident:
                continue
            # the latest ping with these low 16 bits (replies come within seconds)
            s = len(sent) - 1 - ((len(sent) - 1 - rseq) & 0xFFFF)
            if 0 <= s < len(sent) and recv[s] is None:
                recv[s] = at
        if stdin in ready:
            os.read(stdin, 4096)
            stop_at = time.monotonic() + grace_s
    print(json.dumps({"sent": sent, "recv": recv, "send_errors": errors}), flush=True)
    return 0


@contextlib.contextmanager
def _child(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    """This file run as a helper process; killed and reaped whatever happens."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


# --- the stack ---------------------------------------------------------------------------------


def _net_row(s: PrivateStack) -> dict[str, Any]:
    return next(d for d in s.call("status")["drivers"] if d["name"] == "net0")


def _net_pid(s: PrivateStack, warm: bool = False, timeout: float = 30) -> int:
    """The active instance's pid; with ``warm``, once its spare is ready too."""
    deadline = time.monotonic() + timeout
    while True:
        d = _net_row(s)
        if (
            d.get("state") == "RUNNING"
            and isinstance(d.get("pid"), int)
            and (d.get("spare_ready") or not warm)
        ):
            return int(d["pid"])
        if time.monotonic() > deadline:
            raise RuntimeError(f"net0 not running{' with a warm spare' if warm else ''}: {d}")
        time.sleep(0.02)  # a status poll: spare readiness has an event, but not its end


def _console(s: PrivateStack, name: str) -> str:
    return s.call("console", name=name)["data"].decode(errors="replace")


def _last_line(console: str, prefix: str) -> dict[str, str]:
    lines = [ln for ln in console.splitlines() if ln.startswith(prefix)]
    if not lines:
        raise RuntimeError(f"no line starting with {prefix!r} in:\n{console[-2000:]}")
    return parse_kv(lines[-1])


def _server(s: PrivateStack, name: str, mac: str, bridge: str, ip: str) -> None:
    cfg = s.domain_config(
        name,
        "netecho",
        4,
        on_poweroff="preserve",
        on_crash="preserve",
        extra="port=7",
        vif=[f"mac={mac}, bridge={bridge}, backend=net0, ip={ip}"],
    )
    s.call("create", path=str(cfg))


def _wait_up(s: PrivateStack, names: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for n in names:
        while "netecho: up" not in _console(s, n):
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest {n} did not come up:\n{_console(s, n)[-2000:]}")
            time.sleep(0.05)


def _run_guests(
    s: PrivateStack,
    sub: Subscriber,
    cfgs: dict[str, Path],
    marks: dict[str, str],
    timeout: float = 300,
) -> tuple[dict[str, str], dict[str, float]]:
    """Create the guests, wait until every one has shut down, destroy them.  Returns each
    guest's console and, per console marker in ``marks`` (``name:text`` -> text), the
    monotonic time at which the line holding it had fully arrived (console events)."""
    ends: dict[str, tuple[str, dict[str, Any]]] = {}
    buf = {n: "" for n in cfgs}
    seen: dict[str, float] = {}
    topics = {f"console.{n}" for n in cfgs} | {
        f"domain.{n}.{w}" for n in cfgs for w in ("shutdown", "crashed")
    }
    for cfg in cfgs.values():
        s.call("create", path=str(cfg))
    deadline = time.monotonic() + timeout
    while len(ends) < len(cfgs):
        ev = sub.recv(max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise RuntimeError(
                f"guests {sorted(set(cfgs) - set(ends))} did not end within {timeout:g} s"
            )
        topic, p = ev
        if topic not in topics:
            continue
        name = topic.split(".")[1]
        if topic.startswith("console."):
            at = time.monotonic()
            buf[name] += bytes(p.get("data", b"")).decode(errors="replace")
            for key, text in marks.items():
                if key.startswith(name + ":") and key not in seen:
                    i = buf[name].find(text)
                    if i >= 0 and "\n" in buf[name][i:]:
                        seen[key] = at
        else:
            ends.setdefault(name, (topic, p))
    out = {n: _console(s, n) for n in cfgs}
    for n, (topic, p) in ends.items():
        if topic.endswith("crashed"):
            raise RuntimeError(f"guest {n} crashed: {p}\n{out[n][-2000:]}")
    for n in cfgs:
        s.call("destroy", name=n)
    for n in cfgs:
        wait_topic(sub, {f"domain.{n}.destroyed"}, 60)
    return out, seen


def _g2g(s: PrivateStack, sub: Subscriber, count: int, size: int) -> dict[str, Any]:
    """One netecho client guest run against the br1 server."""
    cfg = s.domain_config(
        "cli",
        "netecho",
        4,
        on_poweroff="preserve",
        on_crash="preserve",
        extra=f"mode=client peer={SRV_IP} count={count} size={size} timeout=1000",
        vif=[f"mac={CLI_MAC}, bridge=br1, backend=net0, ip={CLI_IP}"],
    )
    cons, seen = _run_guests(
        s, sub, {"cli": cfg}, {"cli:a": "netecho: client peer=", "cli:b": "netecho: client sent="}
    )
    sm = {k: int(v) for k, v in _last_line(cons["cli"], "netecho: client sent=").items()}
    wall = seen["cli:b"] - seen["cli:a"] if "cli:a" in seen and "cli:b" in seen else None
    return {
        "median_us": float(sm["rtt_us_median"]),
        "p99_us": float(sm["rtt_us_p99"]),
        "lost": sm["lost"],
        "errors": sm["errors"],
        "received": sm["received"],
        "wall_s": wall,
        "per_s": count / wall if wall else None,
        "show": f"median {sm['rtt_us_median']} us, p99 {sm['rtt_us_p99']} us, lost "
        f"{sm['lost']}, errors {sm['errors']}"
        + (f", {count / wall:,.0f}/s host-observed" if wall else ""),
    }


def _pair(s: PrivateStack, sub: Subscriber, count: int, frame: int) -> dict[str, Any]:
    """Two netpair guests on br2, ``count`` frames each way."""
    cfgs = {}
    for i, name in enumerate(("pa", "pb")):
        cfgs[name] = s.domain_config(
            name,
            "netpair",
            4,
            on_poweroff="preserve",
            on_crash="preserve",
            extra=f"peer={PAIR_MACS[1 - i]} count={count} size={frame} timeout=5000",
            vif=[f"mac={PAIR_MACS[i]}, bridge=br2, backend=net0"],
        )
    cons, _ = _run_guests(s, sub, cfgs, {})
    active_s = []
    bad = 0
    for n in cfgs:
        fe = _last_line(cons[n], "netpair: frontend ")
        sm = {k: int(v) for k, v in _last_line(cons[n], "netpair: sent=").items()}
        up = [ln for ln in cons[n].splitlines() if ln.startswith("netpair: peer up after ")]
        up_ms = int(up[-1].split()[4]) if up else 0
        active_s.append((int(fe["ns"]) - up_ms * 1_000_000) / 1e9)
        bad += sm["lost"] + sm["dup"] + sm["reordered"] + sm["corrupt"] + sm["errors"]
    rate = 2 * count / max(active_s)
    return {
        "frames_s": rate,
        "bad": bad,
        "show": f"{rate:,.0f} frames/s both ways, lost+dup+reordered+corrupt+errors {bad}",
    }


def _hostpair(count: int, size: int) -> dict[str, Any]:
    """The streaming ceiling: two host processes exchange ``count`` UDP datagrams of ``size``
    payload bytes each way on 127.0.0.1, netpair's window 32."""
    args = ["_hostpair", str(count), str(size), "32", "30"]
    with _child(args) as a, _child(args) as b:
        assert a.stdin and a.stdout and b.stdin and b.stdout
        pa, pb = int(a.stdout.readline()), int(b.stdout.readline())
        a.stdin.write(f"{pb}\n")
        b.stdin.write(f"{pa}\n")
        a.stdin.flush()
        b.stdin.flush()
        a.stdin.write("go\n")
        b.stdin.write("go\n")
        a.stdin.flush()
        b.stdin.flush()
        ra = [int(x) for x in a.stdout.readline().split()]
        rb = [int(x) for x in b.stdout.readline().split()]
    if len(ra) != 3 or len(rb) != 3:
        raise RuntimeError(f"host pair failed: {ra} {rb}")
    lost = 2 * count - ra[2] - rb[2]
    rate = 2 * count / ((max(ra[1], rb[1]) - min(ra[0], rb[0])) / 1e9)
    return {
        "frames_s": rate,
        "lost": lost,
        "show": f"{rate:,.0f} datagrams/s both ways, lost {lost}",
    }


def _udp(addr: str, port: int, count: int, size: int, netns: str | None) -> dict[str, Any]:
    """``count`` echoes through nettools.udp_echo (one socket, one request at a time)."""
    payloads = [f"{i:08d}".encode().ljust(size, b"x") for i in range(count)]
    t0 = time.perf_counter()
    got = nettools.udp_echo(addr, port, payloads, netns=netns, timeout=1.0)
    wall = time.perf_counter() - t0
    rtts = [rtt * 1e3 for _, rtt in got if rtt is not None]  # ms -> us
    lost = count - len(rtts)
    if not rtts:
        raise RuntimeError(f"no UDP echo from {addr}:{port}")
    return {
        "median_us": median(rtts),
        "p99_us": pctl(rtts, 99),
        "lost": lost,
        "per_s": count / wall,
        "rtts_us": [round(x, 1) for x in rtts],
        "show": f"median {median(rtts):.0f} us, p99 {pctl(rtts, 99):.0f} us, lost {lost}, "
        f"{count / wall:,.0f}/s",
    }


# --- part 4: kills during pings ---------------------------------------------------------------


def _one_kill(s: PrivateStack, sub: Subscriber) -> dict[str, Any]:
    pid = _net_pid(s, warm=True)
    t_kill = time.monotonic_ns()
    os.kill(pid, signal.SIGKILL)
    rep: dict[str, Any] | None = None
    rec: dict[str, Any] | None = None
    deadline = time.monotonic() + 30
    while rep is None or rec is None:
        ev = sub.recv(max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise RuntimeError(f"no recovery of net0 pid {pid} within 30 s")
        topic, p = ev
        if topic == "driver.net0.replayed" and p.get("pid") != pid and rep is None:
            rep = p
        elif topic == "driver.net0.recovered" and p.get("old_pid") == pid:
            rec = p
    return {
        "pid": pid,
        "kill_ns": t_kill,
        "done_ns": int(rep["done_ns"]),
        "kill_to_done_ms": (int(rep["done_ns"]) - t_kill) / 1e6,
        "detect_to_done_ms": rec.get("recovery_ms"),
        "replayed": rep.get("replayed"),
        "detected_ns": rec.get("detected_ns"),
    }


def _pinger(netns: str) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    return _child(["_pinger", netns, ECHO_IP, str(PING_INTERVAL_S), "1.0"])


def _ping_results(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate("stop\n", timeout=30)
    return json.loads(out.strip().splitlines()[-1])


def _analyse_kills(
    kills: list[dict[str, Any]], pings: dict[str, Any], end_ns: int
) -> list[dict[str, Any]]:
    sent: list[int] = pings["sent"]
    recv: list[int | None] = pings["recv"]
    for k, kl in enumerate(kills):
        lo = kl["kill_ns"] - ATTRIBUTE_NS
        hi = kills[k + 1]["kill_ns"] - ATTRIBUTE_NS if k + 1 < len(kills) else end_ns
        mine = [i for i, t in enumerate(sent) if lo <= t < hi]
        lost = [i for i in mine if recv[i] is None]
        after = [i for i in lost if sent[i] > kl["done_ns"]]
        first = min(
            (r for i, r in enumerate(recv) if r is not None and sent[i] > kl["kill_ns"]),
            default=None,
        )
        kl.update(
            pings=len(mine),
            lost=len(lost),
            lost_after_recovery=len(after),
            lost_after_detail=[
                {
                    "sent_after_done_ms": (sent[i] - kl["done_ns"]) / 1e6,
                    "sent_after_kill_ms": (sent[i] - kl["kill_ns"]) / 1e6,
                }
                for i in after
            ],
            stall_ms=(first - kl["kill_ns"]) / 1e6 if first is not None else None,
            contiguous=not lost or lost[-1] - lost[0] + 1 == len(lost),
            lost_first_ms=(sent[lost[0]] - kl["kill_ns"]) / 1e6 if lost else None,
            lost_last_ms=(sent[lost[-1]] - kl["kill_ns"]) / 1e6 if lost else None,
        )
    return kills


def _count_window(pings: dict[str, Any], lo: int, hi: int) -> tuple[int, int, list[float]]:
    """Pings sent in [lo, hi): how many, how many lost, and the RTTs (ms) of the others."""
    n = lost = 0
    rtts = []
    for t, r in zip(pings["sent"], pings["recv"], strict=True):
        if lo <= t < hi:
            n += 1
            if r is None:
                lost += 1
            else:
                rtts.append((r - t) / 1e6)
    return n, lost, rtts


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C / SIGTERM wait until the body (a clean-up) is done, then take effect."""
    held: list[int] = []
    old = {
        sig: signal.signal(sig, lambda n, _f: held.append(n))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if held:
        raise KeyboardInterrupt


def _remove_uplink(netns: str, tap: str) -> list[str]:
    """Delete the bench's TAP, namespace and isovisor's marker for it (drivers.net.tap.remove,
    then plainly), once the stack is down; returns what was still there."""
    with _signals_held():
        left = []
        if tapmod.netns_exists(netns):
            left.append(f"network namespace {netns}")
            if (
                subprocess.run(
                    ["ip", "-n", netns, "link", "show", "dev", tap],
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            ):
                left.append(f"TAP {tap}")
        if (tapmod.MARKER_DIR / netns).exists():
            left.append(f"marker {tapmod.MARKER_DIR / netns}")
        try:
            tapmod.remove(netns, tap)
        except Exception as e:  # the plain way below still runs
            print(f"net: drivers.net.tap.remove({netns!r}, {tap!r}) failed: {e}", file=sys.stderr)
        if tapmod.netns_exists(netns):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        (tapmod.MARKER_DIR / netns).unlink(missing_ok=True)
        if tapmod.netns_exists(netns):
            print(f"net: network namespace {netns} could not be deleted", file=sys.stderr)
        return left


# --- the measurement --------------------------------------------------------------------------


class _Load:
    """CPU used by processes other than this bench (and its helpers) and its stack during one
    run, in % of one CPU (bench/swap.py's accounting: the stack's driver processes come and go,
    so they are counted through the supervisor)."""

    def __init__(self, s: PrivateStack) -> None:
        self.r = RunLoad(s.supervisor_pid)

    def percent(self) -> float:
        return round(self.r.percent(), 1)


def measure(args: argparse.Namespace, res: Result) -> None:
    reps = args.reps or (3 if args.quick else 10)
    count = args.count or (300 if args.quick else 2000)
    pair_count = args.pair_count or (1000 if args.quick else 5000)
    n_kills = args.kills if args.kills is not None else (5 if args.quick else 100)
    size = args.size
    frame = size + UDP_HEADERS
    if not 8 <= size <= 1472:
        raise SystemExit("--size must be 8..1472 (netecho's UDP payload limits)")
    ms = machine_state()
    print(
        f"machine at start: nproc {ms['nproc']}, load average {ms['loadavg']}, "
        f"{ms['cpu_model']}, {ms['memory']}, Linux {ms['kernel']}, Python {ms['python']}",
        file=sys.stderr,
    )
    problem = nettools.privilege_problem()
    if problem is not None:
        print(
            f"SKIP host -> guest UDP echo and the kills during pings (parts 2 and 4): {problem}",
            file=sys.stderr,
        )
    netns = f"ivb-net-{os.getpid()}" if problem is None else None
    tap = f"ivb{os.getpid()}"[:15]
    runs: list[dict[str, Any]] = []
    kills: list[dict[str, Any]] = []
    base_ping: dict[str, Any] = {}
    kill_ping: dict[str, Any] = {}
    try:
        with (
            private_stack(2, extra_toml=driver_toml(netns, tap)) as s,
            s.subscribe(["domain.", "console.", "driver.net0."]) as sub,
            _child(["_echo"]) as echo,
        ):
            GATE.extra_pids = lambda: s.pids
            assert echo.stdout is not None
            port = int(echo.stdout.readline())
            servers = ["srv"] + (["echo"] if netns else [])
            _server(s, "srv", SRV_MAC, "br1", SRV_IP)
            if netns:
                _server(s, "echo", ECHO_MAC, "br0", ECHO_IP)
            _wait_up(s, servers)
            if netns:  # ARP in both directions, and a first round of everything
                nettools.udp_echo(ECHO_IP, 7, [b"warm-up"] * 10, netns=netns, timeout=2.0)
            _udp("127.0.0.1", port, 100, size, None)
            _g2g(s, sub, 50, size)

            kinds = ["g2g", "h2g", "ceil", "pair", "hpair"]
            if netns is None:
                kinds.remove("h2g")
            for rep in range(reps):
                GATE.wait()
                order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
                for kind in order:
                    load = _Load(s)
                    if kind == "g2g":
                        r = _g2g(s, sub, count, size)
                    elif kind == "h2g":
                        assert netns is not None
                        r = _udp(ECHO_IP, 7, count, size, netns)
                    elif kind == "ceil":
                        r = _udp("127.0.0.1", port, count, size, None)
                    elif kind == "pair":
                        r = _pair(s, sub, pair_count, frame)
                    else:
                        r = _hostpair(pair_count, size)
                    r.update(rep=rep, kind=kind, other_pct=load.percent())
                    runs.append(r)
                    print(
                        f"  rep {rep + 1}/{reps} {kind:4}: {r['show']}; other processes "
                        f"{r['other_pct']:.0f}% CPU",
                        file=sys.stderr,
                    )

            if netns and n_kills:
                GATE.wait()
                load = _Load(s)
                with _pinger(netns) as pinger:
                    time.sleep(1.0)
                    t0 = time.monotonic_ns()
                    for _ in range(n_kills):
                        # the previous recovery is over and pings are flowing again
                        if kills:
                            wait = kills[-1]["done_ns"] / 1e9 + SETTLE_S - time.monotonic()
                            if wait > 0:
                                time.sleep(wait)
                        kills.append(_one_kill(s, sub))
                        if len(kills) % 10 == 0 or len(kills) == n_kills:
                            print(
                                f"  {len(kills)} kills: median kill -> done "
                                f"{median([k['kill_to_done_ms'] for k in kills]):.1f} ms",
                                file=sys.stderr,
                            )
                    _net_pid(s, warm=True)
                    t_last = max(time.monotonic_ns(), kills[-1]["done_ns"] + int(SETTLE_S * 1e9))
                    time.sleep(max(0.0, t_last / 1e9 - time.monotonic()))
                    t1 = time.monotonic_ns()
                    kill_other = load.percent()
                    # the baseline: the same length without kills, same pinger
                    load = _Load(s)
                    time.sleep(0.5)
                    b0 = time.monotonic_ns()
                    time.sleep((t1 - t0) / 1e9)
                    b1 = time.monotonic_ns()
                    base_other = load.percent()
                    pings = _ping_results(pinger)
                _analyse_kills(kills, pings, t1)
                n, lost, rtts = _count_window(pings, t0 - ATTRIBUTE_NS, t1)
                kill_ping = {
                    "t0": t0,
                    "t1": t1,
                    "sent": n,
                    "lost": lost,
                    "rtts_ms": rtts,
                    "send_errors": pings["send_errors"],
                    "other_pct": kill_other,
                }
                n, lost, rtts = _count_window(pings, b0, b1)
                base_ping = {"sent": n, "lost": lost, "rtts_ms": rtts, "other_pct": base_other}
                print(
                    f"  kills: {kill_ping['sent']} pings, {kill_ping['lost']} lost; "
                    f"without kills: {n} pings, {lost} lost",
                    file=sys.stderr,
                )

            for n in servers:  # end the servers cleanly, their summaries say what they saw
                if n == "srv":
                    cfg = s.domain_config(
                        "cliq",
                        "netecho",
                        4,
                        on_poweroff="preserve",
                        extra=f"mode=client peer={SRV_IP} count=1 quit=1",
                        vif=[f"mac={CLI_MAC}, bridge=br1, backend=net0, ip={CLI_IP}"],
                    )
                    _run_guests(s, sub, {"cliq": cfg}, {})
                else:
                    assert netns is not None
                    nettools.udp_echo(ECHO_IP, 7, [b"quit"], netns=netns, timeout=0.5)
                deadline = time.monotonic() + 30
                while "netecho: arp=" not in _console(s, n) and time.monotonic() < deadline:
                    time.sleep(0.05)
                with contextlib.suppress(RuntimeError):
                    res.samples.setdefault("servers", {})[n] = _last_line(
                        _console(s, n), "netecho: arp="
                    )
    finally:
        if netns is not None:
            left = _remove_uplink(netns, tap)
            if left:
                res.notes.append(
                    f"still there after `isovisor down`, removed by the bench: {', '.join(left)}"
                )
    _report(res, runs, kills, kill_ping, base_ping, args, reps, count, pair_count, n_kills, problem)
    ms = machine_state()
    print(f"machine at end: nproc {ms['nproc']}, load average {ms['loadavg']}", file=sys.stderr)


def _report(
    res: Result,
    runs: list[dict[str, Any]],
    kills: list[dict[str, Any]],
    kill_ping: dict[str, Any],
    base_ping: dict[str, Any],
    args: argparse.Namespace,
    reps: int,
    count: int,
    pair_count: int,
    n_kills: int,
    problem: str | None,
) -> None:
    size = args.size
    # repetitions with other processes at >= QUIET_PCT % of a CPU in any of their runs are left
    # out of the figures if at least half the repetitions remain
    noisy = {r["rep"] for r in runs if r["other_pct"] >= QUIET_PCT}
    quiet_reps = [i for i in range(reps) if i not in noisy]
    use = set(quiet_reps) if 2 * len(quiet_reps) >= reps else set(range(reps))

    def of(kind: str, key: str) -> list[float]:
        return [
            float(r[key])
            for r in runs
            if r["kind"] == kind and r["rep"] in use and r.get(key) is not None
        ]

    def per_rep_ratio(kind: str, key: str, base: str = "ceil") -> list[float]:
        by = {(r["rep"], r["kind"]): r for r in runs}
        return [
            float(by[(i, kind)][key]) / float(by[(i, base)][key])
            for i in sorted(use)
            if (i, kind) in by
            and (i, base) in by
            and by[(i, kind)].get(key)
            and by[(i, base)].get(key)
        ]

    def lat_row(label: str, kind: str) -> list[Row]:
        med, p99 = of(kind, "median_us"), of(kind, "p99_us")
        if not med:
            return []
        cmed, cp99 = of("ceil", "median_us"), of("ceil", "p99_us")
        rmed, rp99 = per_rep_ratio(kind, "median_us"), per_rep_ratio(kind, "p99_us")
        return [
            Row(
                f"{label}: RTT median",
                f"{median(med):,.0f} us",
                f"ceiling {median(cmed):,.0f} us; isovisor/ceiling {median(rmed):.1f}x "
                f"(per-rep {min(rmed):.1f}..{max(rmed):.1f}x); runs' medians "
                f"{min(med):,.0f}..{max(med):,.0f} us",
            ),
            Row(
                f"{label}: RTT p99",
                f"{median(p99):,.0f} us",
                f"ceiling {median(cp99):,.0f} us; isovisor/ceiling {median(rp99):.1f}x; "
                f"largest run p99 {max(p99):,.0f} us (ceiling {max(cp99):,.0f} us)",
            ),
        ]

    def rate_row(
        label: str, kind: str, key: str = "per_s", base: str = "ceil", base_what: str = "ceiling"
    ) -> list[Row]:
        xs, cs = of(kind, key), of(base, key)
        if not xs or not cs:
            return []
        rs = per_rep_ratio(kind, key, base)
        return [
            Row(
                label,
                f"{median(xs):,.0f}/s",
                f"{base_what} {median(cs):,.0f}/s; isovisor/ceiling {median(rs):.3f}x; "
                f"runs {min(xs):,.0f}..{max(xs):,.0f}/s",
            )
        ]

    lost_g = sum(int(r["lost"]) for r in runs if r["kind"] in ("g2g", "h2g", "ceil", "hpair"))
    err_g = sum(int(r.get("errors", 0)) for r in runs if r["kind"] == "g2g")
    bad_pair = sum(int(r["bad"]) for r in runs if r["kind"] == "pair")
    g2g_wall = [w / count * 1e6 for w in of("g2g", "wall_s")]
    res.rows += [
        *lat_row(f"guest -> guest UDP echo ({size} B, guest clock)", "g2g"),
        *(
            [
                Row(
                    "guest -> guest: host-observed wall per round trip",
                    f"{median(g2g_wall):,.0f} us",
                    "console line before the first request -> summary line, / count (mean, incl. "
                    "the console event hop)",
                )
            ]
            if g2g_wall
            else []
        ),
        *rate_row("guest -> guest echoes/s (one at a time, host-observed)", "g2g"),
        *rate_row(
            f"guest <-> guest frames/s (netpair, {size + UDP_HEADERS} B frames, both "
            "ways, window 32)",
            "pair",
            key="frames_s",
            base="hpair",
            base_what=f"host Python pair ({size} B UDP datagrams, both ways, same window and acks)",
        ),
        *lat_row(f"host -> guest UDP echo through the TAP ({size} B)", "h2g"),
        *rate_row("host -> guest echoes/s", "h2g"),
    ]
    cm, cp, cr = of("ceil", "median_us"), of("ceil", "p99_us"), of("ceil", "per_s")
    if cm:
        res.rows.append(
            Row(
                f"ceiling: host <-> host Python UDP echo, 127.0.0.1 ({size} B)",
                f"median {median(cm):,.0f} us",
                f"p99 {median(cp):,.0f} us; {median(cr):,.0f} echoes/s; same "
                "client code (nettools.udp_echo), same count and size",
            )
        )
    hp = of("hpair", "frames_s")
    if hp:
        res.rows.append(
            Row(
                "ceiling: host <-> host Python datagram pair, 127.0.0.1",
                f"{median(hp):,.0f} datagrams/s",
                f"{pair_count} each way, window 32, acks every 8 (netpair's flow "
                f"control); runs {min(hp):,.0f}..{max(hp):,.0f}/s",
            )
        )
    srv = res.samples.get("servers", {})
    err_s = sum(int(v.get("errors", 0)) + int(v.get("bad", 0)) for v in srv.values())
    res.rows.append(
        Row(
            "lost echoes / client errors / netpair faults / server errors",
            f"{lost_g} / {err_g} / {bad_pair} / {err_s}",
            f"over {len(runs)} runs (lost: echoes and host pair datagrams; netpair: "
            "lost+dup+reordered+corrupt+errors; servers: errors+bad frames, "
            + ", ".join(
                f"{n} answered udp={v.get('udp')} icmp={v.get('icmp')}" for n, v in srv.items()
            )
            + ")",
            "0",
            lost_g == 0 and err_g == 0 and bad_pair == 0 and err_s == 0,
        )
    )
    if problem is not None:
        res.rows.append(Row("host -> guest and kills during pings", "skipped", problem))
    elif kills:
        lost_k = [float(k["lost"]) for k in kills]
        after = sum(int(k["lost_after_recovery"]) for k in kills)
        stalls = [float(k["stall_ms"]) for k in kills if k["stall_ms"] is not None]
        k2d = [float(k["kill_to_done_ms"]) for k in kills]
        d2d = [float(k["detect_to_done_ms"]) for k in kills if k["detect_to_done_ms"] is not None]
        rt = kill_ping["rtts_ms"]
        first_l = [float(k["lost_first_ms"]) for k in kills if k["lost_first_ms"] is not None]
        last_l = [float(k["lost_last_ms"]) for k in kills if k["lost_last_ms"] is not None]
        res.rows += [
            Row(
                f"pings every {PING_INTERVAL_S * 1e3:g} ms across {len(kills)} SIGKILLs: lost",
                f"{kill_ping['lost']} of {kill_ping['sent']}",
                f"same-length run without kills: {base_ping['lost']} of {base_ping['sent']} "
                f"lost; ping RTT median {median(rt):.2f} ms (without kills "
                f"{median(base_ping['rtts_ms']):.2f} ms)"
                if base_ping.get("rtts_ms")
                else "",
            ),
            Row(
                "pings lost per kill",
                f"median {median(lost_k):.0f}",
                f"max {max(lost_k):.0f}, min {min(lost_k):.0f}",
            ),
            Row(
                "pings lost after the recovery (sent after the replacement's done_ns)",
                str(after),
                f"{sum(1 for k in kills if k['lost_after_recovery'])} kills with any",
                "0",
                after == 0,
            ),
            Row(
                "when the lost pings were sent (relative to the kill)",
                f"{min(first_l):+.1f} .. {max(last_l):+.1f} ms" if first_l else "-",
                "earliest .. latest over all kills; per kill the lost pings were "
                + (
                    "one contiguous run"
                    if all(k["contiguous"] for k in kills)
                    else "NOT always one contiguous run"
                ),
            ),
            Row(
                "stall: kill -> first reply to a ping sent after it",
                f"median {median(stalls):.1f} ms" if stalls else "-",
                f"p99 {pctl(stalls, 99):.1f} ms, max {max(stalls):.1f} ms over {len(stalls)} "
                "kills (10 ms ping spacing)"
                if stalls
                else "no reply after a kill",
            ),
            Row(
                "recovery: kill -> redone frames published (driver.net0.replayed done_ns)",
                f"median {median(k2d):.1f} ms",
                f"p99 {pctl(k2d, 99):.1f} ms, max "
                f"{max(k2d):.1f} ms; supervisor's detection -> done (driver.net0.recovered) "
                + (f"median {median(d2d):.1f} ms, p99 {pctl(d2d, 99):.1f} ms" if d2d else "n/a"),
            ),
        ]
    res.samples.update(
        {
            "runs": [{k: v for k, v in r.items() if k != "rtts_us"} for r in runs],
            "kills": kills,
            "kill_pings": {k: v for k, v in kill_ping.items() if k != "rtts_ms"},
            "base_pings": {k: v for k, v in base_ping.items() if k != "rtts_ms"},
        }
    )
    n_use = len(use)
    res.notes += [
        f"{reps} repetitions of {count} UDP echo round trips ({size} B payload, "
        f"{size + UDP_HEADERS} B frames) per kind, kinds interleaved and rotated; netpair "
        f"{pair_count} frames each way per repetition; private stack pcpus=2, [driver.net0] "
        "with a warm spare; every guest on its own vif of one drivers.net process",
        (
            f"figures from the {n_use} repetitions in which other processes used < {QUIET_PCT} % "
            f"of a CPU in every run"
            if n_use < reps
            else f"figures from all {reps} repetitions"
            + (
                ""
                if not noisy
                else f" ({len(noisy)} of them ran with other processes at >= "
                f"{QUIET_PCT} % of a CPU: MEASURED UNDER LOAD)"
            )
        ),
        "latency figures: median over repetitions of each run's median / p99; ratios per "
        "repetition (same conditions), then their median",
    ]
    if kills:
        res.notes.append(
            f"{len(kills)} kills (wanted {n_kills}); other processes "
            f"{kill_ping['other_pct']:.0f} % of a CPU during the kills, "
            f"{base_ping['other_pct']:.0f} % during the run without; ping send errors "
            f"{kill_ping['send_errors']} (counted lost)"
        )
    res.notes.append(f"load average at the end {fmt_load(os.getloadavg())}, nproc {os.cpu_count()}")


def _helper_main(argv: list[str]) -> int:
    """This file run as a helper process (Ctrl-C ends it quietly: the bench cleans up)."""
    try:
        if argv[0] == "_echo":
            return _echo_server_main()
        if argv[0] == "_hostpair":
            return _hostpair_main(int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4]))
        return _pinger_main(argv[1], argv[2], float(argv[3]), float(argv[4]))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_echo", "_hostpair", "_pinger"):
        sys.exit(_helper_main(sys.argv[1:]))
    sys.exit(bench_main(NAME, TITLE, measure, add_args))
