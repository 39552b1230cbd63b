"""Probe: the floors under issue 16's I/O targets on this machine, measured in one run.

What a round trip of isovisor cannot go below, whatever the kernel and the driver host do:

* ``eventfd ping-pong``: two Python processes, each blocked in ``read(2)`` on its eventfd,
  waking each other in turn (two cross-process wake-ups a round trip; what a QD1 request pays
  with no polling).
* ``shm spin ping-pong``: the same two processes spinning on a shared-memory word instead
  (no wake-up at all; each holds a core, which a 2-core host running a vCPU cannot spare).
* ``pread 4 KiB``: a plain Python ``pread`` loop on a file in the page cache (the backend's
  own work, without any ring).
* ``datagram pair``: one Python process sending 1,500-byte datagrams to another over an
  ``AF_UNIX`` ``SOCK_DGRAM`` socketpair, as fast as it reads them (the network ceiling the
  issue's 100,000 frames/s is set against).

    python3 bench/probes/floors.py [--rounds N]
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import struct
import sys
import tempfile
import time


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def eventfd_pingpong(n: int) -> list[float]:
    a, b = os.eventfd(0), os.eventfd(0)
    pid = os.fork()
    if pid == 0:
        for _ in range(n + 100):
            os.eventfd_read(a)
            os.eventfd_write(b, 1)
        os._exit(0)
    rtts = []
    for i in range(n + 100):
        t = time.perf_counter_ns()
        os.eventfd_write(a, 1)
        os.eventfd_read(b)
        if i >= 100:
            rtts.append((time.perf_counter_ns() - t) / 1000)
    os.waitpid(pid, 0)
    os.close(a)
    os.close(b)
    return rtts


def spin_pingpong(n: int) -> list[float]:
    m = mmap.mmap(-1, 4096)
    word = struct.Struct("Q")
    pid = os.fork()
    if pid == 0:
        for seen in range(1, n + 101):
            while word.unpack_from(m, 0)[0] != seen:
                pass
            word.pack_into(m, 8, seen)
        os._exit(0)
    rtts = []
    for i in range(1, n + 101):
        t = time.perf_counter_ns()
        word.pack_into(m, 0, i)
        while word.unpack_from(m, 8)[0] != i:
            pass
        if i > 100:
            rtts.append((time.perf_counter_ns() - t) / 1000)
    os.waitpid(pid, 0)
    m.close()
    return rtts


def pread_rate(seconds: float) -> float:
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom(4096 * 1024))
        f.flush()
        fd = f.fileno()
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for k in range(0, 256):
                os.pread(fd, 4096, (k * 7919 % 1024) * 4096)
            n += 256
        return n / seconds


def datagram_rate(count: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    frame = os.urandom(1500)
    pid = os.fork()
    if pid == 0:
        a.close()
        for _ in range(count):
            b.recv(2048)
        b.send(b"done")
        os._exit(0)
    b.close()
    t = time.perf_counter()
    for _ in range(count):
        a.send(frame)
    a.recv(16)
    rate = count / (time.perf_counter() - t)
    os.waitpid(pid, 0)
    a.close()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}")
    for r in range(args.rounds):
        e = eventfd_pingpong(3000)
        s = spin_pingpong(3000)
        p = pread_rate(1.0)
        d = datagram_rate(50_000)
        print(
            f"round {r + 1}: eventfd ping-pong RTT median {statistics.median(e):.1f} µs "
            f"p99 {_pct(e, 0.99):.1f}; shm spin RTT median {statistics.median(s):.1f} µs "
            f"p99 {_pct(s, 0.99):.1f}; pread 4 KiB {p:,.0f}/s; datagram pair {d:,.0f}/s"
        )
        sys.stdout.flush()
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
