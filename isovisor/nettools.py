"""Host-side network tools for reaching guests inside a stack's network namespace: ICMP echo
(``ping``) and a UDP echo client, from Python, for machines without iputils.

A socket belongs to the network namespace its creating thread was in when it was created, so
:func:`socket_in` enters the namespace (``setns``) only around the ``socket()`` call and returns
the calling thread to its own namespace at once.  Both need root (CAP_SYS_ADMIN for ``setns``,
CAP_NET_RAW for the ICMP socket); :func:`privilege_problem` says which is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import shutil
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

NETNS_DIR: Final = Path("/run/netns")
CLONE_NEWNET: Final = 0x40000000
ICMP_ECHO_REQUEST: Final = 8
ICMP_ECHO_REPLY: Final = 0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsError(OSError):
    """A network namespace cannot be entered; the message says why and what to do."""


def privilege_problem() -> str | None:
    """Why this process cannot create network namespaces and TAP devices, or None if it can."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces and TAP devices need root)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (load the tun module: modprobe tun)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace ``netns``."""
    path = NETNS_DIR / netns
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(
            2,
            f"network namespace {netns!r} does not exist ({path}); is the "
            "stack with its net driver running?",
        ) from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def socket_in(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created inside ``netns`` (None: the caller's own namespace)."""
    if netns is None:
        return socket.socket(family, kind, proto)
    with entered(netns):
        return socket.socket(family, kind, proto)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class PingResult:
    seq: int
    rtt_ms: float | None  # None: no reply within the timeout


def ping(
    addr: str,
    *,
    netns: str | None = None,
    count: int = 4,
    interval: float = 1.0,
    timeout: float = 1.0,
    size: int = 56,
    ident: int | None = None,
    on_reply: Callable[[int, float], None] | None = None,
) -> list[PingResult]:
    """ICMP echo requests to ``addr``, one every ``interval`` seconds; each reply matched by
    identifier and sequence number (late replies within ``timeout`` still count).
    ``on_reply(seq, rtt_ms)`` is called as each reply arrives."""
    ident = (os.getpid() if ident is None else ident) & 0xFFFF
    payload = bytes(range(256))[:size] if size <= 256 else bytes(size)
    sock = socket_in(netns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sent: dict[int, float] = {}
    rtts: dict[int, float] = {}
    try:
        sock.setblocking(False)
        deadline_last = 0.0
        next_send = time.monotonic()
        seq = 0
        while True:
            now = time.monotonic()
            if seq < count and now >= next_send:
                head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
                pkt = (
                    struct.pack(
                        "!BBHHH", ICMP_ECHO_REQUEST, 0, checksum(head + payload), ident, seq
                    )
                    + payload
                )
                sent[seq] = time.monotonic()
                sock.sendto(pkt, (addr, 0))
                seq += 1
                next_send += interval
                deadline_last = sent[seq - 1] + timeout
            if seq >= count and (now >= deadline_last or len(rtts) == count):
                break
            _await(sock, max(0.0, (next_send if seq < count else deadline_last) - time.monotonic()))
            while True:
                try:
                    data, _ = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                at = time.monotonic()
                ihl = (data[0] & 0x0F) * 4
                if len(data) < ihl + 8:
                    continue
                typ, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
                if (
                    typ == ICMP_ECHO_REPLY
                    and rid == ident
                    and rseq in sent
                    and rseq not in rtts
                    and at - sent[rseq] <= timeout
                ):
                    rtts[rseq] = (at - sent[rseq]) * 1000.0
                    if on_reply is not None:
                        on_reply(rseq, rtts[rseq])
    finally:
        sock.close()
    return [PingResult(s, rtts.get(s)) for s in range(count)]


def _await(sock: socket.socket, seconds: float) -> None:
    select.select([sock], [], [], seconds)


def udp_echo(
    addr: str, port: int, payloads: list[bytes], *, netns: str | None = None, timeout: float = 1.0
) -> list[tuple[bytes | None, float | None]]:
    """Send each payload to ``addr:port`` and wait for its echo: (reply, rtt ms) per payload,
    (None, None) when none came within ``timeout``."""
    sock = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM)
    out: list[tuple[bytes | None, float | None]] = []
    try:
        sock.settimeout(timeout)
        for p in payloads:
            t0 = time.monotonic()
            sock.sendto(p, (addr, port))
            reply: bytes | None = None
            rtt: float | None = None
            end = t0 + timeout
            while time.monotonic() < end:
                sock.settimeout(max(0.001, end - time.monotonic()))
                try:
                    data, src = sock.recvfrom(65535)
                except TimeoutError:
                    break
                if src[0] == addr and data == p:
                    reply, rtt = data, (time.monotonic() - t0) * 1000.0
                    break
            out.append((reply, rtt))
    finally:
        sock.close()
    return out
