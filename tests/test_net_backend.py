"""The net backend (drivers.net) in-process: this test plays the kernel (a fake host that records
notifications, store writes, faults) and the guests' frontends (FrontRings over real vif
segments of ``netif.SEGMENT_END`` bytes), and drives the backend class directly.

Crashes are simulated by making a step of one backend instance raise, abandoning that instance
(its ``close()`` touches no ring, like a process that died) and resuming every vif with a new
instance over the same segments, as the kernel does after a restart: attach each vif again,
then ``fe_state`` Connected.  The TAP tests need root; they skip saying which privilege is
missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from drivers.host import where_in_backend
from drivers.net import Backend
from drivers.net import backend as netbackend
from drivers.net import tap as tapmod
from drivers.net.backend import PENDING, DeliveryLog, NetBackend, delivered
from drivers.net.switch import UPLINK, Bridge, BridgeFull, MacTable, source_problem
from drivers.net.uplink import Uplink, default_netns
from drivers.state import BackendState, StateError
from ipc import netif
from ipc.netif import (
    BUF_SIZE,
    RX_BUF_OFFSET,
    RX_RING_OFFSET,
    STATUS_ERROR,
    STATUS_OKAY,
    TX_BUF_OFFSET,
)
from ipc.ring import FrontRing, InflightLog, RingError, inflight_bytes
from ipc.schema import STACK_ENV
from ipc.shm import Segment
from isovisor.testing import wait_until
from tests.fakehost import RecordingHost

PREFIX = f"isovisor-nettest.{os.getpid()}."
DRIVER = "net0"
MAC_A, MAC_B, MAC_C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
MAC_D = "02:00:00:00:00:0d"
ETHERTYPE = 0x88B5  # IEEE local experimental
INFLIGHT_BYTES = inflight_bytes(netif.RING_SLOTS, netif.SLOT_SIZE)


class FakeHost(RecordingHost):
    """The driver host's API, recording what the backend asks of it (tests/fakehost.py)."""

    def __init__(self) -> None:
        super().__init__(DRIVER, Crash)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mac(text: str) -> bytes:
    """Any MAC address (parse_mac accepts only a vif's unicast ones)."""
    return bytes(int(p, 16) for p in text.split(":"))


def eth(
    dst: str | bytes, src: str | bytes, payload: bytes = b"", ethertype: int = ETHERTYPE
) -> bytes:
    d = mac(dst) if isinstance(dst, str) else dst
    s = mac(src) if isinstance(src, str) else src
    return d + s + struct.pack("!H", ethertype) + payload


BROADCAST = b"\xff" * 6


class Guest:
    """A guest's frontend over a vif segment: both rings, buffers, and what it got back."""

    def __init__(self, key: int, name: str, mac_text: str, bridge: str = "br0") -> None:
        self.key = key
        self.name = name
        self.mac_text = mac_text
        self.mac = mac(mac_text)
        self.store = f"/driver/{DRIVER}/vif/{key}/0"
        self.segment = Segment(f"{PREFIX}{name}", netif.SEGMENT_END, create=True)
        self.view = memoryview(self.segment.buf)
        self.attach_msg: dict[str, Any] = {
            "key": key,
            "domid": key,
            "domain": name,
            "vdev": "eth0",
            "devid": 0,
            "segment": self.segment.name,
            "window": netif.WINDOW_BYTES,
            "inflight_offset": netif.INFLIGHT_OFFSET,
            "store": self.store,
            "scratch": f"{self.segment.name}.scratch",
            "class": "vif",
            "vif": {"mac": mac_text, "bridge": bridge, "ip": None},
        }
        self.tx: FrontRing | None = None
        self.rx: FrontRing | None = None
        self.next_id = 1
        self.tx_slot = 0
        self.rx_slot = 0
        self.sent: list[int] = []  # ids of the tx requests queued
        self.tx_done: list[tuple[int, int]] = []  # (id, status)
        self.frames: list[bytes] = []  # frames received, in order
        self.rx_errors: list[tuple[int, int]] = []  # (id, offset) of refused rx requests
        self.kicks = 0

    # -- handshake -------------------------------------------------------------------------
    def init_rings(self) -> None:
        v = self.view
        self.tx = FrontRing(v[: netif.RING_BYTES], netif.RING_SLOTS, netif.SLOT_SIZE)
        self.rx = FrontRing(
            v[RX_RING_OFFSET : RX_RING_OFFSET + netif.RING_BYTES], netif.RING_SLOTS, netif.SLOT_SIZE
        )

    def attach(self, be: NetBackend) -> None:
        be.attach(self.attach_msg)

    def connect(self, be: NetBackend) -> None:
        self.attach(be)
        self.init_rings()
        be.fe_state(self.key, 3)

    def resume(self, be: NetBackend) -> None:
        """After attach: tell a new instance the frontend is connected (the kernel's part)."""
        be.fe_state(self.key, 4)

    # -- traffic --------------------------------------------------------------------------------
    def queue(self, frame: bytes) -> int:
        """Queue one frame in the tx ring (not yet published); its id."""
        assert self.tx is not None
        off = TX_BUF_OFFSET + (self.tx_slot % netif.RING_SLOTS) * BUF_SIZE
        self.tx_slot += 1
        self.view[off : off + len(frame)] = frame
        return self.queue_raw(netif.encode_tx(self._id(), off, len(frame)))

    def queue_raw(self, req: bytes) -> int:
        assert self.tx is not None
        rid = netif.TX_REQUEST.unpack_from(req)[0]
        self.tx.put_request(req)
        self.sent.append(rid)
        return rid

    def _id(self) -> int:
        rid = self.next_id
        self.next_id += 1
        return rid

    def push(self, be: NetBackend) -> None:
        """Publish tx requests; kick only if the backend asked for it (as a guest does)."""
        assert self.tx is not None
        if self.tx.push_requests():
            self.kicks += 1
            be.kick(self.key)

    def send(self, be: NetBackend, *frames: bytes) -> list[int]:
        ids = [self.queue(f) for f in frames]
        self.push(be)
        return ids

    def post(self, be: NetBackend | None, n: int, *, junk: bool = False) -> None:
        """Post ``n`` empty rx buffers (``junk``: too small ones); kick if asked."""
        assert self.rx is not None
        for _ in range(n):
            off = RX_BUF_OFFSET + (self.rx_slot % netif.RING_SLOTS) * BUF_SIZE
            self.rx_slot += 1
            self.rx.put_request(netif.encode_rx(self._id(), off, 100 if junk else BUF_SIZE))
        if self.rx.push_requests() and be is not None:
            self.kicks += 1
            be.kick(self.key)

    def poll(self) -> None:
        """Consume every response on both rings."""
        assert self.tx is not None and self.rx is not None
        while self.tx.unconsumed_responses():
            rid, status, r1, r2 = netif.TX_RESPONSE.unpack(self.tx.get_response())
            assert (r1, r2) == (0, 0)
            self.tx_done.append((rid, status))
        while self.rx.unconsumed_responses():
            rid, off, size, status = netif.RX_RESPONSE.unpack(self.rx.get_response())
            if status == STATUS_OKAY:
                assert off >= RX_BUF_OFFSET and off + size <= netif.WINDOW_BYTES
                self.frames.append(bytes(self.view[off : off + size]))
            else:
                assert status == STATUS_ERROR and size == 0
                self.rx_errors.append((rid, off))

    def got(self) -> list[bytes]:
        self.poll()
        return self.frames

    def done(self) -> list[tuple[int, int]]:
        self.poll()
        return self.tx_done

    def close(self) -> None:
        self.tx = self.rx = None
        self.view.release()
        with contextlib.suppress(BufferError):
            self.segment.close()
        self.segment.unlink()


class Rig:
    """Guests and backend instances; everything is released at the end."""

    def __init__(self) -> None:
        self.guests: list[Guest] = []
        self.backends: list[NetBackend] = []
        self.host = FakeHost()
        self.clock = Clock()

    def backend(
        self, options: dict[str, Any] | None = None, cls: type[NetBackend] = Backend
    ) -> NetBackend:
        be = cls(self.host, options or {})
        be.clock = self.clock
        self.backends.append(be)
        return be

    def guest(self, name: str, mac_text: str, bridge: str = "br0") -> Guest:
        g = Guest(len(self.guests) + 1, name, mac_text, bridge)
        self.guests.append(g)
        return g

    def restart(
        self,
        old: NetBackend,
        options: dict[str, Any] | None = None,
        order: list[Guest] | None = None,
    ) -> NetBackend:
        """``old`` died: a new instance (of its class) gets attach for every vif, then
        fe_state Connected (in ``order``)."""
        old.close()
        be = self.backend(options, type(old))
        for g in self.guests:
            g.attach(be)
        for g in order or self.guests:
            g.resume(be)
        return be

    def teardown(self) -> None:
        for be in self.backends:
            be.close()
        for g in self.guests:
            g.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.teardown()
        left = sorted(p for p in os.listdir("/dev/shm") if p.startswith(PREFIX))
        for name in left:
            os.unlink(f"/dev/shm/{name}")
        assert not left, f"shared-memory segments left behind: {left}"


def three(
    rig: Rig,
    options: dict[str, Any] | None = None,
    *,
    bridge_c: str = "br0",
    buffers: int = 16,
    cls: type[NetBackend] = Backend,
) -> tuple[NetBackend, Guest, Guest, Guest]:
    be = rig.backend(options, cls)
    a, b, c = rig.guest("a", MAC_A), rig.guest("b", MAC_B), rig.guest("c", MAC_C, bridge_c)
    for g in (a, b, c):
        g.connect(be)
        if buffers:
            g.post(be, buffers)
    return be, a, b, c


class Crash(Exception):
    """A driver instance dies here."""


@contextlib.contextmanager
def crash_at(
    monkeypatch: pytest.MonkeyPatch, target: Any, name: str, after: int = 0
) -> Iterator[list[int]]:
    """Make ``target.name`` raise Crash on its call number ``after`` + 1 (the calls before
    run normally); the patch is gone when the block ends.  Yields the call counter."""
    real = getattr(target, name)
    calls = [0]

    def dying(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            raise Crash(f"{name} (call {calls[0]})")
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(target, name, dying)
        yield calls


# --- options and the handshake -----------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"uplink": "bridge"}, 'uplink must be "none" or "tap", got \'bridge\''),
        ({"netns": "x"}, 'option(s) netns apply only with uplink = "tap" (uplink is "none")'),
        ({"tap": "t", "bridge": "br1"}, "option(s) tap, bridge apply only with uplink"),
        ({"rx_wait_ms": -1}, "rx_wait_ms must be an integer 0..60000, got -1"),
        ({"rx_wait_ms": "500"}, "rx_wait_ms must be an integer 0..60000, got '500'"),
        ({"poison_after": 0}, "poison_after must be an integer 1..100, got 0"),
        ({"mac_age_s": True}, "mac_age_s must be an integer 1..86400, got True"),
        ({"mtu": 9000}, "unknown net backend option(s) mtu; allowed: uplink, tap,"),
    ],
)
def test_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Backend(FakeHost(), options)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tap": "a-name-of-16-chr"}, "tap must be an interface name of 1-15 letters"),
        ({"tap": "bad/name"}, "tap must be an interface name of 1-15 letters"),
        ({"netns": "../etc"}, "netns must be a network namespace name of 1-64 letters"),
        ({"host_addr": "198.18.0.1"}, "host_addr must be an IPv4 address with a prefix length"),
        ({"host_addr": "10.0.0.1/8"}, "host_addr 10.0.0.1/8 is outside 198.18.0.0/15"),
        ({"host_addr": "198.18.0.300/15"}, "is not an IPv4 address with a prefix length"),
        ({"bridge": "Br0"}, "bridge must be a short lower-case name"),
    ],
)
def test_uplink_options_are_checked(options: dict[str, Any], message: str) -> None:
    # Name checks come before the privilege check, so they hold for every user.
    with pytest.raises(ValueError, match=re.escape(message)):
        Backend(FakeHost(), {"uplink": "tap", **options})


@pytest.mark.timeout(10)
def test_the_default_tap_name_must_fit() -> None:
    host = FakeHost()
    host.name = "a-very-long-driver-name"
    with pytest.raises(
        ValueError,
        match=r"default TAP name 'iva-very-long-driver-name' .* "
        "longer than 15 characters: set option tap",
    ):
        Backend(host, {})


def test_the_default_namespace_is_named_after_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stacks on one host (a migration's two ends) each get a namespace of their own."""
    monkeypatch.delenv(STACK_ENV, raising=False)
    assert default_netns("net0") == "isovisor-net0"
    monkeypatch.setenv(STACK_ENV, "default")
    assert default_netns("net0") == "isovisor-net0"
    monkeypatch.setenv(STACK_ENV, "b")
    assert default_netns("net0") == "isovisor-b-net0"
    log = logging.getLogger("test")
    assert Uplink("net0", {"uplink": "tap"}, log, time.monotonic).netns == "isovisor-b-net0"
    mine = Uplink("net0", {"uplink": "tap", "netns": "mine"}, log, time.monotonic)
    assert mine.netns == "mine"
    monkeypatch.setenv(STACK_ENV, "s" * 60)
    with pytest.raises(ValueError, match="longer than 64 characters: set option netns"):
        Uplink("net0", {"uplink": "tap"}, log, time.monotonic)


@pytest.mark.timeout(10)
def test_handshake_mac_and_state_in_the_store(rig: Rig) -> None:
    be = rig.backend()
    a = rig.guest("a", MAC_A)
    a.attach(be)
    assert rig.host.store[f"{a.store}/mac"] == MAC_A
    assert rig.host.store[f"{a.store}/state"] == "2"
    a.init_rings()
    be.fe_state(a.key, 3)
    assert rig.host.store[f"{a.store}/state"] == "4"
    be.fe_state(a.key, 5)
    assert rig.host.store[f"{a.store}/state"] == "6"
    be.fe_state(a.key, 3)  # the frontend comes back with fresh rings
    assert rig.host.store[f"{a.store}/state"] == "4"
    assert not rig.host.faults and not rig.host.errors


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"window": 4096}, "window 0x1000 is not a vif region's 0x42000 bytes"),
        ({"inflight_offset": 0}, "in-flight log offset 0x0 is not a vif region's"),
        ({"class": "vbd"}, "attach class 'vbd': this driver serves network interfaces"),
        ({"vif": {"mac": "01:00:5e:00:00:01", "bridge": "br0"}}, "is a multicast address"),
        ({"vif": {"mac": "02:00:00:00:00:0a", "bridge": "BR"}}, "vif bridge must be a short"),
        ({"vif": {"bridge": "br0"}}, "attach vif message lacks 'mac'"),
        ({"segment": "no-such-segment"}, "cannot map device segment no-such-segment"),
    ],
)
def test_bad_attach_messages_are_refused(rig: Rig, change: dict[str, Any], message: str) -> None:
    be = rig.backend()
    a = rig.guest("a", MAC_A)
    be.attach({**a.attach_msg, **change})
    assert rig.host.store[f"{a.store}/state"] == "6"
    assert message in rig.host.store[f"{a.store}/error"]
    assert rig.host.errors and rig.host.errors[0][0] == a.key


@pytest.mark.timeout(10)
def test_a_mac_is_taken_once_per_bridge(rig: Rig) -> None:
    be = rig.backend()
    a, b = rig.guest("a", MAC_A), rig.guest("b", MAC_A)
    other = rig.guest("c", MAC_A, "br1")
    a.attach(be)
    b.attach(be)
    assert rig.host.store[f"{b.store}/state"] == "6"
    assert (
        "MAC 02:00:00:00:00:0a is used on bridge br0 by a/eth0 already"
        in rig.host.store[f"{b.store}/error"]
    )
    other.attach(be)  # another bridge: fine
    assert rig.host.store[f"{other.store}/state"] == "2"


# --- switching -----------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_frames_flow_only_within_their_bridge(rig: Rig) -> None:
    be, a, b, c = three(rig, bridge_c="br1")
    f1 = eth(BROADCAST, MAC_A, b"to everyone on br0")
    f2 = eth(MAC_C, MAC_A, b"to c, who is on br1")
    ids = a.send(be, f1, f2)
    assert a.done() == [(i, STATUS_OKAY) for i in ids]
    assert b.got() == [f1, f2]  # c's MAC is unknown on br0: flooded there, to b only
    assert c.got() == []
    c.send(be, eth(BROADCAST, MAC_C, b"from br1"))
    assert a.got() == [] and b.got() == [f1, f2]
    assert be.stats()[a.key].flooded == 2


@pytest.mark.timeout(10)
def test_unknown_unicast_floods_until_the_destination_is_learned(rig: Rig) -> None:
    be, a, b, c = three(rig)
    first = eth(MAC_B, MAC_A, b"b is unknown yet")
    a.send(be, first)
    assert b.got() == [first] and c.got() == [first]  # flooded
    reply = eth(MAC_A, MAC_B, b"now the switch knows b")
    b.send(be, reply)
    assert a.got() == [reply] and c.got() == [first]  # a was learned from its first frame
    second = eth(MAC_B, MAC_A, b"unicast now")
    a.send(be, second)
    assert b.got() == [first, second] and c.got() == [first]
    to_self = eth(MAC_A, MAC_A, b"never back where it came from")
    a.send(be, to_self)
    assert a.got() == [reply] and b.got() == [first, second] and c.got() == [first]
    st = be.stats()
    assert (st[a.key].flooded, st[b.key].flooded) == (1, 0)
    assert st[a.key].tx_frames == 3 and st[b.key].rx_frames == 2
    assert st[b.key].rx_bytes == len(first) + len(second)
    assert be.statistics()["mac_entries"] == 2


@pytest.mark.timeout(10)
def test_learned_addresses_age_out(rig: Rig) -> None:
    be, a, b, c = three(rig, {"mac_age_s": 10})
    b.send(be, eth(MAC_A, MAC_B, b"b speaks"))
    a.send(be, eth(MAC_B, MAC_A, b"known: to b only"))
    assert len(c.got()) == 1  # only b's own first frame (a was unknown then)
    rig.clock.now += 11
    a.send(be, eth(MAC_B, MAC_A, b"aged out: flooded again"))
    assert len(c.got()) == 2


@pytest.mark.timeout(10)
def test_broadcast_and_multicast_reach_every_other_port(rig: Rig) -> None:
    be, a, b, c = three(rig)
    bc = eth(BROADCAST, MAC_B, b"broadcast")
    mc = eth("01:00:5e:00:00:fb", MAC_B, b"multicast")
    b.send(be, bc, mc)
    assert a.got() == [bc, mc] and c.got() == [bc, mc] and b.got() == []


@pytest.mark.timeout(10)
def test_spoofed_and_multicast_sources_are_dropped_and_counted(rig: Rig) -> None:
    be, a, b, c = three(rig)
    ids = a.send(
        be,
        eth(BROADCAST, MAC_B, b"pretends to be b"),
        eth(BROADCAST, "03:00:00:00:00:0a", b"multicast source"),
        eth(BROADCAST, MAC_A, b"honest"),
    )
    assert a.done() == [(i, STATUS_OKAY) for i in ids]  # a wire drops silently
    assert b.got() == [eth(BROADCAST, MAC_A, b"honest")]
    st = be.stats()[a.key]
    assert (st.spoofed, st.tx_frames) == (2, 1)
    # b's address was not learned on a's port: a frame to b still reaches b
    c.send(be, eth(MAC_B, MAC_C, b"to b"))
    assert b.got()[-1] == eth(MAC_B, MAC_C, b"to b")


@pytest.mark.timeout(10)
def test_malformed_tx_requests_are_answered_with_errors(rig: Rig) -> None:
    be, a, b, _ = three(rig)
    off = TX_BUF_OFFSET
    good = eth(BROADCAST, MAC_A, b"fine")
    a.view[off : off + len(good)] = good
    bad = [
        netif.encode_tx(901, off, netif.MAX_FRAME + 1),  # oversized
        netif.encode_tx(902, off, netif.MIN_FRAME - 1),  # undersized
        netif.encode_tx(903, RX_BUF_OFFSET, 64),  # in the rx buffer area
        netif.encode_tx(904, 0, 64),  # over the rings
        netif.encode_tx(905, RX_BUF_OFFSET - 10, 64),  # runs past the tx area
        netif.encode_tx(906, off, 64, flags=1),
    ]
    for r in bad:
        a.queue_raw(r)
    a.queue_raw(netif.encode_tx(907, off, len(good)))
    a.push(be)
    assert a.done() == [(i, STATUS_ERROR) for i in range(901, 907)] + [(907, STATUS_OKAY)]
    assert b.got() == [good]
    assert be.stats()[a.key].bad_frames == 6
    assert not rig.host.faults


@pytest.mark.timeout(10)
def test_junk_rx_requests_are_refused_and_skipped(rig: Rig) -> None:
    be, a, b, c = three(rig, buffers=0)
    c.post(be, 4)
    b.post(be, 2, junk=True)
    assert b.rx is not None
    b.rx.put_request(netif.encode_rx(77, 0x100, BUF_SIZE))  # over the rings, not a buffer
    b.rx.put_request(netif.encode_rx(78, RX_BUF_OFFSET, BUF_SIZE, flags=2))
    b.rx.push_requests()
    b.post(be, 1)
    f = eth(BROADCAST, MAC_A, b"into the good buffer")
    a.send(be, f)
    assert b.got() == [f]
    assert [rid for rid, _ in b.rx_errors] == [1, 2, 77, 78]
    assert b.rx_errors[2] == (77, 0x100)  # the offset is echoed
    assert be.stats()[b.key].bad_frames == 4
    assert a.done() == [(a.sent[0], STATUS_OKAY)] and c.got() == [f]


@pytest.mark.timeout(10)
def test_a_batch_is_published_with_one_notification_per_guest(rig: Rig) -> None:
    be, a, b, c = three(rig)
    before = rig.host.notifies.copy()
    frames = [eth(MAC_B, MAC_A, bytes([i]) * 40) for i in range(10)]
    b.send(be, eth(MAC_A, MAC_B))  # learn b
    a.poll()
    before = rig.host.notifies.copy()
    kicks = a.kicks
    a.send(be, *frames)
    assert rig.host.notifies[a.key] - before[a.key] == 1  # its tx responses
    assert rig.host.notifies[b.key] - before[b.key] == 1  # its rx responses
    assert rig.host.notifies[c.key] == before[c.key]
    assert b.got() == frames
    # a did not ask again (its rsp_event did not move): no notification for the next batch
    a.send(be, *frames[:3])
    assert rig.host.notifies[a.key] - before[a.key] == 1
    assert len(a.done()) == 13
    # a asks (the final check before sleeping): the next batch notifies it again
    assert a.tx is not None and not a.tx.final_check_for_responses()
    a.send(be, frames[0])
    assert rig.host.notifies[a.key] - before[a.key] == 2
    assert a.kicks - kicks == 3  # each push kicked: the backend re-armed before going idle


@pytest.mark.timeout(10)
def test_a_guest_breaking_its_ring_is_faulted_and_the_others_go_on(rig: Rig) -> None:
    be, a, b, c = three(rig)
    words = b.view[RX_RING_OFFSET : RX_RING_OFFSET + 64].cast("Q")
    words[0] = 10_000  # b's rx req_prod: far more buffers than the ring holds
    del words
    f = eth(BROADCAST, MAC_A, b"b is broken now")
    a.send(be, f)
    assert rig.host.faults and rig.host.faults[0][0] == b.key
    assert "rx ring" in rig.host.faults[0][1]
    assert c.got() == [f] and a.done()[-1][1] == STATUS_OKAY
    words = a.view[:64].cast("Q")
    words[0] = 5_000  # a's tx req_prod
    del words
    be.kick(a.key)
    assert [k for k, _ in rig.host.faults] == [b.key, a.key]
    c.send(be, eth(BROADCAST, MAC_C, b"still switching"))
    assert be.statistics()["vifs"] == 3
    assert not a.got()  # a and b are no ports any more


# --- full rx rings ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_full_rx_ring_holds_the_sender_until_buffers_come(rig: Rig) -> None:
    be, a, b, c = three(rig, buffers=0)
    a.post(be, 4)
    c.post(be, 4)
    frames = [eth(BROADCAST, MAC_A, b"frame %d" % i) for i in range(3)]
    a.send(be, *frames)
    assert c.got() == frames[:1]  # the first frame reached c; it waits for b
    assert a.done() == [] and be.timer_ms() == 500
    b.post(be, 1)  # the backend asked to be kicked for rx buffers
    assert b.kicks == 1
    assert b.got() == frames[:1] and a.done() == [(a.sent[0], STATUS_OKAY)]
    assert c.got() == frames[:2]  # the next frame went as far as it could
    b.post(be, 5)
    assert b.got() == frames and c.got() == frames
    assert [s for _, s in a.done()] == [STATUS_OKAY] * 3
    assert be.stats()[b.key].rx_full_drops == 0
    assert be.timer_ms() is None


@pytest.mark.timeout(10)
def test_frames_for_a_guest_that_never_takes_them_are_dropped_after_rx_wait(rig: Rig) -> None:
    be, a, b, c = three(rig, {"rx_wait_ms": 200}, buffers=0)
    c.post(be, 8)
    f = eth(BROADCAST, MAC_A, b"b never posts buffers")
    a.send(be, f)
    assert a.done() == [] and be.timer_ms() == 200
    rig.clock.now += 0.1
    be.timer()
    assert a.done() == []
    rig.clock.now += 0.15
    assert be.timer_ms() == 0
    be.timer()
    assert a.done() == [(1, STATUS_OKAY)] and c.got() == [f]
    assert be.stats()[b.key].rx_full_drops == 1
    b.post(be, 2)
    assert b.got() == []  # the dropped frame does not come back
    g = eth(BROADCAST, MAC_A, b"a is free again")
    a.send(be, g)
    assert c.got() == [f, g] and b.got() == [g]


@pytest.mark.timeout(10)
def test_rx_wait_zero_drops_at_once(rig: Rig) -> None:
    be, a, b, c = three(rig, {"rx_wait_ms": 0}, buffers=0)
    c.post(be, 4)
    a.send(be, eth(BROADCAST, MAC_A, b"x"))
    assert a.done() == [(1, STATUS_OKAY)]
    assert be.stats()[b.key].rx_full_drops == 1 and be.timer_ms() is None


@pytest.mark.timeout(10)
def test_detaching_a_destination_releases_its_senders(rig: Rig) -> None:
    be, a, b, c = three(rig, buffers=0)
    c.post(be, 4)
    a.send(be, eth(BROADCAST, MAC_A, b"b is going away"))
    assert a.done() == []
    be.detach(b.key)
    assert a.done() == [(1, STATUS_OKAY)]
    assert be.statistics()["vifs"] == 2


# --- recovery: exactly once -------------------------------------------------------------------


def learn_b(be: NetBackend, a: Guest, b: Guest) -> None:
    b.send(be, eth(MAC_A, MAC_B, b"b announces itself"))
    a.got()
    b.done()


POINTS: dict[str, tuple[Any, str]] = {
    # name: (what raises, its method)
    "before the delivery record": (DeliveryLog, "write"),
    "after the record, before the rx push": (NetBackend, "_push_rx"),
    "after the rx push, before the tx push": (NetBackend, "_push_tx"),
    "after the tx push, before the in-flight record ends": (InflightLog, "end"),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("order", ["source first", "destination first"])
def test_a_frame_accepted_before_a_crash_is_delivered_exactly_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, point: str, order: str
) -> None:
    be, a, b, c = three(rig)
    learn_b(be, a, b)
    f = eth(MAC_B, MAC_A, b"exactly once, please")
    target, name = POINTS[point]
    with crash_at(monkeypatch, target, name), pytest.raises(Crash):
        a.send(be, f)
    resumed = [a, b, c] if order == "source first" else [b, c, a]
    be2 = rig.restart(be, order=resumed)
    assert b.got() == [f], point
    # died before the record: nothing went out, and the new instance's empty MAC table floods
    flooded = [f] if point == "before the delivery record" else []
    assert c.got() == [eth(MAC_A, MAC_B, b"b announces itself"), *flooded]
    assert [s for _, s in a.done()] == [STATUS_OKAY], point
    assert sorted(k for k, _, _ in rig.host.recoveries) == [1, 2, 3]
    replayed = {k: n for k, n, _ in rig.host.recoveries}
    assert replayed[a.key] == (0 if point.startswith("after the tx push") else 1)
    # the resumed switch goes on normally
    g = eth(MAC_B, MAC_A, b"and the next one")
    a.send(be2, g)
    assert b.got() == [f, g]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("pushed", [0, 1])
def test_a_broadcast_cut_short_reaches_every_port_exactly_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, pushed: int
) -> None:
    be, a, b, c = three(rig)
    f = eth(BROADCAST, MAC_A, b"to b and c")
    with crash_at(monkeypatch, NetBackend, "_push_rx", after=pushed), pytest.raises(Crash):
        a.send(be, f)
    rig.restart(be, order=[c, a, b])
    assert b.got() == [f] and c.got() == [f]
    assert [s for _, s in a.done()] == [STATUS_OKAY]


@pytest.mark.timeout(20)
def test_two_senders_redone_in_any_order_each_arrive_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames of a and c wait for b's buffers; both are put in b's ring and the instance dies
    before publishing it.  The replacement redoes c first: putting c's frame in b's ring moves
    b's rsp_prod past the index a's record names, and a's frame must still count as not
    delivered (the records were decided when the vifs were mapped, not when redone)."""
    be, a, b, c = three(rig, buffers=0)
    a.post(be, 4)
    c.post(be, 4)
    fa, fc = eth(MAC_B, MAC_A, b"from a"), eth(MAC_B, MAC_C, b"from c")
    a.send(be, fa)
    c.send(be, fc)
    assert a.done() == [] and c.done() == []  # both held: b has no buffers
    assert c.got() == [fa] and a.got() == [fc]  # (flooded: b is unknown)
    with crash_at(monkeypatch, NetBackend, "_push_rx"), pytest.raises(Crash):
        b.post(be, 4)
    be2 = rig.restart(be, order=[c, a, b])
    assert sorted(b.got()) == sorted([fa, fc])
    assert [s for _, s in a.done()] == [STATUS_OKAY]
    assert [s for _, s in c.done()] == [STATUS_OKAY]
    assert not be2.timer_ms()


@pytest.mark.timeout(20)
def test_a_held_frame_survives_the_instance_that_held_it(rig: Rig) -> None:
    be, a, b, c = three(rig, buffers=0)
    c.post(be, 4)
    f = eth(BROADCAST, MAC_A, b"c has it, b waits")
    a.send(be, f)
    assert c.got() == [f] and a.done() == []
    be2 = rig.restart(be)  # dies holding it (nothing is in flight but the held request)
    assert a.done() == [] and b.got() == []
    # b and c had nothing to redo; a's redo is not finished while its frame waits for b
    assert [k for k, _, _ in rig.host.recoveries] == [b.key, c.key]
    b.post(be2, 2)
    assert b.got() == [f] and c.got() == [f]
    assert a.done() == [(1, STATUS_OKAY)]
    assert [(k, n) for k, n, _ in rig.host.recoveries] == [(b.key, 0), (c.key, 0), (a.key, 1)]


# --- a vif that moves to another switch (save and restore, live migration) ----------------------


def moved_in(rig: Rig, g: Guest, *, ip: str | None = None) -> tuple[NetBackend, Guest]:
    """``g``'s segment, as the kernel of another stack carries it over, attached to that
    stack's switch with ``announce`` beside a guest ``d`` that has rx buffers."""
    be2 = rig.backend()
    d = rig.guest("d", "02:00:00:00:00:0d")
    d.connect(be2)
    d.post(be2, 8)
    g.attach_msg = {**g.attach_msg, "announce": True, "vif": {**g.attach_msg["vif"], "ip": ip}}
    g.attach(be2)
    g.resume(be2)
    return be2, d


@pytest.mark.timeout(10)
def test_a_moved_vif_announces_itself_and_its_held_frame_goes_out_once(rig: Rig) -> None:
    """A unicast frame held for a full rx ring when the vif is detached to move went nowhere:
    the switch it moves to sends it (after the announcement); the old one never does."""
    be, a, b, _ = three(rig, buffers=0)
    learn_b(be, a, b)
    f = eth(MAC_B, MAC_A, b"held for b")
    a.send(be, f)
    assert a.done() == []
    be.detach(a.key)  # the kernel lets it go to save or migrate it
    assert a.done() == []  # still in flight: the next switch sends it
    be2, d = moved_in(rig, a, ip="198.18.0.10")
    got = d.got()
    assert len(got) == 2 and got[1] == f, got  # flooded: b's MAC is unknown there
    arp = got[0]
    assert arp[:6] == b"\xff" * 6 and arp[6:12] == mac(MAC_A) and arp[12:14] == b"\x08\x06"
    assert arp[28:32] == arp[38:42] == ipaddress.IPv4Address("198.18.0.10").packed
    assert a.done() == [(1, STATUS_OKAY)]
    assert be2.stats()[a.key].announced == 1
    b.post(be, 4)
    assert b.got() == []  # the old switch forgot it
    g = eth(MAC_D, MAC_A, b"after the move")
    a.send(be2, g)
    assert d.got()[2:] == [g]


@pytest.mark.timeout(10)
def test_a_moved_vif_whose_broadcast_reached_some_ports_is_answered_not_resent(rig: Rig) -> None:
    """A broadcast that reached c while b had no buffer: the detach answers it (b misses
    it, counted), so the next switch does not send it again; without an ip it announces
    itself with a RARP, as QEMU does."""
    be, a, b, c = three(rig, buffers=0)
    c.post(be, 4)
    f = eth(BROADCAST, MAC_A, b"c has it, b waits")
    a.send(be, f)
    assert c.got() == [f] and a.done() == []
    be.detach(a.key)
    assert a.done() == [(1, STATUS_OKAY)]
    assert be.stats()[b.key].rx_full_drops == 1
    _, d = moved_in(rig, a)
    got = d.got()
    assert len(got) == 1 and got[0][12:14] == b"\x80\x35" and got[0][6:12] == mac(MAC_A), got
    assert a.done() == [(1, STATUS_OKAY)]  # no second response: nothing was redone


@pytest.mark.timeout(20)
def test_dying_again_during_the_redo_still_delivers_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    be, a, b, _ = three(rig)
    learn_b(be, a, b)
    f = eth(MAC_B, MAC_A, b"survives two deaths")
    with crash_at(monkeypatch, NetBackend, "_push_tx"), pytest.raises(Crash):
        a.send(be, f)  # b has it; a's response is not out
    with crash_at(monkeypatch, NetBackend, "_push_tx"), pytest.raises(Crash):
        rig.restart(be)
    with crash_at(monkeypatch, InflightLog, "end"), pytest.raises(Crash):
        rig.restart(rig.backends[-1])
    rig.restart(rig.backends[-1])
    assert b.got() == [f]
    assert [s for _, s in a.done()] == [STATUS_OKAY]
    assert not rig.host.poisons  # nobody died *executing* it


@pytest.mark.timeout(20)
def test_a_frame_that_kills_poison_after_instances_is_refused(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = {"poison_after": 2}
    be, a, b, c = three(rig, opts)
    f = eth(BROADCAST, MAC_A, b"deadly")
    # two instances in a row die while forwarding it
    with crash_at(monkeypatch, netbackend, "source_problem"), pytest.raises(Crash):
        a.send(be, f)
    with crash_at(monkeypatch, netbackend, "source_problem"), pytest.raises(Crash):
        rig.restart(be, opts)
    be = rig.backends[-1]
    words = a.view[netif.INFLIGHT_OFFSET : netif.INFLIGHT_OFFSET + INFLIGHT_BYTES].cast("Q")
    assert words[2] >> 8 == 1  # the first death is counted; the second instance is executing
    del words
    rig.restart(be, opts)
    assert a.done() == [(17, STATUS_ERROR)]  # ids 1..16 went to its rx buffers
    assert b.got() == [] and c.got() == []
    ((key, index, description),) = rig.host.poisons
    assert (key, index) == (a.key, 0)
    assert (
        "tx frame id=0x11" in description and "2 driver instances died executing it" in description
    )
    assert {k: n for k, n, _ in rig.host.recoveries}[a.key] == 0


@pytest.mark.timeout(20)
def test_a_redo_checks_the_source_again(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame is read from the guest's buffer again when redone: rewriting its source
    meanwhile does not get a spoofed frame past the switch."""
    be, a, b, c = three(rig)
    f = eth(BROADCAST, MAC_A, b"b gets it, then the switch dies")
    with crash_at(monkeypatch, NetBackend, "_push_rx", after=1), pytest.raises(Crash):
        a.send(be, f)
    a.view[TX_BUF_OFFSET + 6 : TX_BUF_OFFSET + 12] = mac(MAC_B)
    be2 = rig.restart(be)
    assert b.got() == [f] and c.got() == []
    assert [s for _, s in a.done()] == [STATUS_OKAY]
    assert be2.stats()[a.key].spoofed == 1


@pytest.mark.timeout(20)
def test_unpublished_rx_work_is_redone_from_the_published_index(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Junk rx requests answered but not published before a crash are answered again."""
    be, a, b, _ = three(rig, buffers=0)
    b.post(be, 1, junk=True)
    b.post(be, 1)
    f = eth(BROADCAST, MAC_A, b"after the junk")
    with crash_at(monkeypatch, NetBackend, "_push_rx"), pytest.raises(Crash):
        a.send(be, f)
    rig.restart(be)
    assert b.got() == [f] and [rid for rid, _ in b.rx_errors] == [1]


# --- the delivery log and the switch, directly ------------------------------------------------


@pytest.mark.timeout(10)
def test_delivery_records_torn_and_resolved() -> None:
    buf = memoryview(bytearray(netif.RING_SLOTS * netif.DELIVERY_RECORD))
    log = DeliveryLog(buf)
    assert log.find(5) is None
    log.write(5, [[7, 100], [UPLINK, 0], [9, 40]])
    assert log.find(5) == [[7, 100], [UPLINK, 0], [9, 40]]
    assert log.find(5 + netif.RING_SLOTS) is None  # another request of the same slot
    log.words[5 * netif.DELIVERY_RECORD // 8] = 0  # torn: the tag is written last
    assert log.find(5) is None
    log.write(5, [[7, 100], [UPLINK, 0], [9, 40]])
    # 7's rsp_prod is 100 (index 100 not published), 9's is 41 (index 40 is)
    assert log.resolve([5], {7: 100, 9: 41, 3: 0}) == 1
    assert log.find(5) == [[7, PENDING], [UPLINK, 0], [9, 40]]
    assert delivered(41, 40) and not delivered(40, 40)
    assert delivered(0, (1 << 64) - 1)  # indices wrap
    log.release()


@pytest.mark.timeout(10)
def test_switch_tables_and_ports() -> None:
    t = MacTable(age_s=5, max_entries=2)
    t.learn(mac(MAC_A), 1, 0.0)
    t.learn(mac(MAC_B), 2, 1.0)
    t.learn(mac(MAC_A), 3, 2.0)  # moved
    assert t.lookup(mac(MAC_A), 2.0) == 3 and t.moves == 1
    t.learn(mac(MAC_C), 4, 3.0)  # evicts the least recently seen (b)
    assert t.lookup(mac(MAC_B), 3.0) is None and len(t) == 2
    assert t.lookup(mac(MAC_A), 7.5) is None  # aged out
    assert t.expire(100.0) == 1 and len(t) == 0
    t2 = MacTable(age_s=5)
    t.learn(mac(MAC_A), 1, 10.0)
    assert t2.load(t.to_wire(12.0), 50.0, "rows") == 1
    assert t2.lookup(mac(MAC_A), 52.0) == 1 and t2.lookup(mac(MAC_A), 53.5) is None
    with pytest.raises(ValueError, match=r"rows\[0\] must be \[mac text"):
        t2.load([["x", -1, 0]], 0.0, "rows")
    br = Bridge("br0")
    for p in range(1, 32):
        br.add_port(p)
    with pytest.raises(BridgeFull, match="bridge br0 has 31 ports already"):
        br.add_port(99)
    assert len(br.forward(1, BROADCAST + mac(MAC_A), 0.0).ports) == 30
    assert source_problem(eth(BROADCAST, MAC_A), mac(MAC_A)) is None
    assert "is not the interface's" in (source_problem(eth(BROADCAST, MAC_B), mac(MAC_A)) or "")


@pytest.mark.timeout(10)
def test_a_full_bridge_refuses_another_vif(rig: Rig) -> None:
    be = rig.backend()
    for i in range(32):
        g = rig.guest(f"g{i}", f"02:00:00:00:01:{i:02x}")
        g.attach(be)
    last = rig.guests[-1]
    assert rig.host.store[f"{last.store}/state"] == "6"
    assert "bridge br0 is full: 31 vifs already" in rig.host.store[f"{last.store}/error"]


# --- hot swap ----------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_save_suspend_restore_carries_tables_counters_and_held_frames(rig: Rig) -> None:
    be, a, b, c = three(rig, buffers=0)
    a.post(be, 4)
    c.post(be, 4)
    b.post(be, 1)
    learn = eth(MAC_A, MAC_C, b"c is learned")
    c.send(be, learn)
    assert a.got() == [learn] and b.got() == [learn]  # (a is unknown: flooded)
    f = eth(MAC_B, MAC_A, b"b is unknown: flooded; waits for b")
    a.send(be, f)
    assert c.got() == [f] and a.done() == []
    state = be.save()
    assert state.kind == "isovisor.net" and state.version == 1
    wire = state.to_wire()
    be.suspend()
    be2 = rig.backend()
    be2.restore(BackendState.from_wire(wire))
    for g in rig.guests:
        g.attach(be2)
    for g in rig.guests:
        g.resume(be2)
    assert be2.stats()[c.key].tx_frames == 1  # counters carried over
    b.post(be2, 2)
    assert b.got() == [learn, f] and c.got() == [f]  # exactly once: c had it already
    assert a.done() == [(a.sent[0], STATUS_OKAY)]
    g = eth(MAC_C, MAC_A, b"c is known: not flooded")
    a.send(be2, g)
    assert c.got() == [f, g] and b.got() == [learn, f]
    assert be2.save().to_wire()["data"]["bridges"]["br0"]


@pytest.mark.timeout(10)
def test_restore_refuses_other_kinds_and_bad_tables() -> None:
    be = Backend(FakeHost(), {})
    with pytest.raises(StateError, match=r"restores states of kind 'isovisor\.net'"):
        be.restore(BackendState("isovisor.blk", 1, "drivers.blk:Backend"))
    with pytest.raises(StateError, match="newer than"):
        be.restore(BackendState("isovisor.net", 2, "x"))
    with pytest.raises(StateError, match=r"state.data.bridges.br0\[0\]"):
        be.restore(BackendState("isovisor.net", 1, "x", (), {"bridges": {"br0": [[1, 2]]}}))


# --- the frame hook (filter_frame; docs/sdk.md, "A network backend") ----------------------

DROP_TYPE, PAD_TYPE = 0x88B6, 0x88B7  # frames of these EtherTypes: dropped, padded to 60 bytes


class Hooked(NetBackend):
    """A frame hook that records its calls, drops one EtherType, pads another to 60 bytes and
    sends frames whose payload starts with b"to c" to c alone (a rewritten destination)."""

    def configure(self, options: dict[str, Any]) -> None:
        super().configure(options)
        self.calls: list[tuple[str | None, bytes]] = []

    def filter_frame(self, src: netbackend.Vif | None, frame: bytes) -> bytes | None:
        self.calls.append((None if src is None else src.label, frame))
        kind = int.from_bytes(frame[12:14], "big")
        if kind == DROP_TYPE:
            return None
        if kind == PAD_TYPE:
            return frame + bytes(60 - len(frame))
        if frame[14:18] == b"to c":
            return mac(MAC_C) + frame[6:]
        return frame


class Rewriting(NetBackend):
    """A hook that returns, for a frame whose payload starts with a name below, what that
    name says: only the last one is fine."""

    BAD: ClassVar[dict[bytes, Callable[[bytes], object]]] = {
        b"spoof": lambda f: f[:6] + mac(MAC_B) + f[12:],  # another guest's source
        b"mcast": lambda f: f[:6] + mac("03:00:00:00:00:01") + f[12:],  # a multicast source
        b"short": lambda f: f[:10],
        b"long": lambda f: f + bytes(netif.MAX_FRAME),
        b"text": lambda f: f.decode("latin-1"),
        b"array": lambda f: bytearray(f),  # fine: bytes-like
    }

    def filter_frame(self, src: netbackend.Vif | None, frame: bytes) -> bytes | None:
        make = self.BAD.get(frame[14:].split(b" ")[0])
        return frame if make is None else make(frame)  # type: ignore[return-value]


class Deadly(NetBackend):
    """A hook with a bug: it raises for frames whose payload starts with b"deadly"."""

    def filter_frame(self, src: netbackend.Vif | None, frame: bytes) -> bytes | None:
        if frame[14:].startswith(b"deadly"):
            raise ZeroDivisionError("a bug in the hook")
        return frame


@pytest.mark.timeout(10)
def test_without_a_hook_nothing_is_called_and_the_statistics_keep_their_keys(rig: Rig) -> None:
    be, a, _, _ = three(rig)
    assert not be.filtering and be.forward == be._forward
    h = Hooked(rig.host, {})
    assert h.filtering and h.forward == h._forward_filtering
    a.send(be, eth(BROADCAST, MAC_A, b"plain"))
    st = be.statistics()
    assert "filtered" not in st and "filter_invalid" not in st
    head = ["vifs", "bridges", "mac_entries", *netbackend.COUNTERS, "notifications"]
    assert list(st)[: len(head)] == head
    assert list(st)[len(head)] == "uplink"


@pytest.mark.timeout(10)
def test_the_hook_passes_drops_and_rewrites_frames(rig: Rig) -> None:
    be, a, b, c = three(rig, cls=Hooked)
    assert isinstance(be, Hooked)
    hello = eth(BROADCAST, MAC_C, b"c is here")
    c.send(be, hello)
    assert a.got() == b.got() == [hello]
    plain = eth(BROADCAST, MAC_A, b"passes as it is")
    dropped = eth(BROADCAST, MAC_A, b"dropped", DROP_TYPE)
    short = eth(BROADCAST, MAC_A, b"padded", PAD_TYPE)
    to_c = eth(BROADCAST, MAC_A, b"to c only")
    ids = a.send(be, plain, dropped, short, to_c)
    assert a.done() == [(i, STATUS_OKAY) for i in ids]  # a drop is silent, as on a wire
    padded = short + bytes(60 - len(short))
    # the switch picks the destinations from the frame the hook returned: c alone
    assert b.got() == [hello, plain, padded]
    assert c.got() == [plain, padded, mac(MAC_C) + to_c[6:]]
    assert be.calls == [("c/eth0", hello)] + [("a/eth0", f) for f in (plain, dropped, short, to_c)]
    st = be.statistics()
    assert (st["filtered"], st["filter_invalid"]) == (1, 0)
    assert list(st).index("filtered") == list(st).index("notifications") + 1
    assert (st["a/eth0.tx_frames"], st["a/eth0.tx_bytes"]) == (
        3,
        len(plain) + len(padded) + len(to_c),
    )
    # a spoofed frame is dropped before the hook, as without one
    be.calls.clear()
    a.send(be, eth(BROADCAST, MAC_B, b"pretends to be b"))
    assert be.calls == [] and be.stats()[a.key].spoofed == 1


@pytest.mark.timeout(10)
def test_a_rewritten_frame_is_checked_again_and_refused_with_the_hook_named(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    be, a, b, c = three(rig, cls=Rewriting)
    frames = [eth(BROADCAST, MAC_A, name + b" frame") for name in Rewriting.BAD]
    ids = a.send(be, *frames)
    assert a.done() == [(i, STATUS_OKAY) for i in ids]
    assert b.got() == c.got() == [frames[-1]]  # only the bytearray passes
    st = be.statistics()
    assert (st["filter_invalid"], st["filtered"], st["a/eth0.spoofed"]) == (5, 0, 0)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 5, errors
    hook = f"Rewriting.filter_frame ({__file__}:"
    assert all(m.startswith(f"frame from vif 1 (a/eth0) dropped: {hook}") for m in errors), errors
    assert (
        "rewrote the frame's source: source MAC 02:00:00:00:00:0b is not the interface's"
        in (errors[0])
    )
    assert "source MAC 03:00:00:00:00:01 is a multicast address" in errors[1]
    assert "returned a frame of 10 bytes (a frame has 14..1514)" in errors[2]
    assert f"returned a frame of {len(frames[3]) + netif.MAX_FRAME} bytes" in errors[3]
    assert "returned str, not bytes or None" in errors[4]
    # b's address was not learned on a's port from the spoofing rewrite: c's frame to b
    # is flooded (b is unknown), not sent to a alone
    to_b = eth(MAC_B, MAC_C, b"to b")
    c.send(be, to_b)
    assert b.got()[-1] == to_b


@pytest.mark.timeout(20)
@pytest.mark.parametrize("drop_on_redo", [False, True])
def test_the_hook_is_called_again_on_a_redo_and_a_drop_then_answers_okay(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, drop_on_redo: bool
) -> None:
    """The instance dies after b's rx ring was pushed, before c's: the next one redoes the
    request with the frame read from a's buffer again.  If its hook passes the frame, c gets
    it (b, which had it, not again); if it drops it, a is answered OKAY and c never gets it."""
    be, a, b, c = three(rig, cls=Hooked)
    f = eth(BROADCAST, MAC_A, b"redone")
    with crash_at(monkeypatch, NetBackend, "_push_rx", after=1), pytest.raises(Crash):
        a.send(be, f)
    assert b.got() == [f] and c.got() == []
    if drop_on_redo:  # the guest rewrote its buffer: the hook sees what is there now
        a.view[TX_BUF_OFFSET + 12 : TX_BUF_OFFSET + 14] = DROP_TYPE.to_bytes(2, "big")
    be2 = rig.restart(be)
    assert isinstance(be2, Hooked)
    assert [s for _, s in a.done()] == [STATUS_OKAY]
    ((src, again),) = be2.calls
    assert src == "a/eth0" and again[14:] == f[14:]
    assert b.got() == [f] and c.got() == ([] if drop_on_redo else [f])
    assert be2.statistics()["filtered"] == int(drop_on_redo)


@pytest.mark.timeout(20)
def test_an_exception_in_the_hook_is_fail_stop_then_poison(rig: Rig) -> None:
    """The exception escapes the backend (the driver host ends the process with status 70)
    with the request flagged executing; its traceback ends in the hook, which the host names
    as where it failed.  The next instance redoes the request, calls the hook again, dies
    again; after poison_after deaths the request is answered with an error, and the switch
    goes on."""
    opts = {"poison_after": 2}
    be, a, b, c = three(rig, opts, cls=Deadly)
    f = eth(BROADCAST, MAC_A, b"deadly frame")
    with pytest.raises(ZeroDivisionError) as e:
        a.send(be, f)
    last = e.traceback[-1]
    assert last.name == "filter_frame" and last.path == Path(__file__)
    line = Deadly.filter_frame.__code__.co_firstlineno + 2  # the raise
    assert where_in_backend(e.value) == f"{__file__}:{line}, in filter_frame"
    (note,) = e.value.__notes__
    assert "Deadly.filter_frame" in note
    assert "raised for the frame at tx ring index 0 of vif 1 (a/eth0): a driver process" in note
    log = InflightLog(
        a.view[netif.INFLIGHT_OFFSET : netif.INFLIGHT_OFFSET + INFLIGHT_BYTES],
        netif.RING_SLOTS,
        netif.SLOT_SIZE,
    )
    assert [(r.index, r.executing) for r in log.pending()] == [(0, True)]
    del log
    with pytest.raises(ZeroDivisionError) as e:
        rig.restart(be, opts)  # the redo calls the hook again
    assert "of vif 1 (a/eth0), redone:" in e.value.__notes__[0]
    be3 = rig.restart(rig.backends[-1], opts)
    assert a.done() == [(a.sent[0], STATUS_ERROR)]
    ((key, index, description),) = rig.host.poisons
    assert (key, index) == (a.key, 0) and "2 driver instances died executing it" in description
    assert b.got() == [] and c.got() == []
    g = eth(BROADCAST, MAC_A, b"harmless")
    a.send(be3, g)
    assert b.got() == [g] and c.got() == [g]


@pytest.mark.timeout(10)
def test_frames_from_the_uplink_go_through_the_hook_with_no_source_vif(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    be, a, b, _ = three(rig, cls=Hooked)
    assert isinstance(be, Hooked)
    host = "02:00:00:00:00:99"
    short = eth(BROADCAST, host, b"padded", PAD_TYPE)
    passes = eth(BROADCAST, host, b"passes")
    frames = [
        eth(BROADCAST, host, b"dropped", DROP_TYPE),
        eth(BROADCAST, MAC_B, b"a guest's source: refused before the hook"),
        short,
        passes,
    ]
    monkeypatch.setattr(be.uplink, "read", lambda: list(frames))
    be._from_tap()
    assert be.calls == [(None, frames[0]), (None, short), (None, passes)]
    assert a.got() == b.got() == [short + bytes(60 - len(short)), passes]
    st = be.statistics()
    assert (st["filtered"], st["uplink_spoofed"], st["uplink_frames_in"]) == (1, 1, 2)

    class ToGuestSource(NetBackend):
        def filter_frame(self, src: netbackend.Vif | None, frame: bytes) -> bytes | None:
            return frame[:6] + mac(MAC_A) + frame[12:]

    be2 = rig.backend(cls=ToGuestSource)
    rig.guest("d", "02:00:00:00:00:0d").connect(be2)
    rig.guest("e", MAC_A).connect(be2)
    monkeypatch.setattr(be2.uplink, "read", lambda: [eth(BROADCAST, host, b"x")])
    be2._from_tap()
    assert be2.filter_invalid == 1
    assert "frame from the uplink dropped: " in caplog.text
    assert "ToGuestSource.filter_frame (" in caplog.text
    assert "rewrote the frame's source to 02:00:00:00:00:0a, a multicast address or a guest's" in (
        caplog.text
    )


class Carrying(Hooked):
    """A hook whose subclass carries its own data across a hot swap."""

    def backend_data(self) -> dict[str, Any]:
        return {"calls": len(self.calls)}

    def restore_backend_data(self, data: dict[str, Any]) -> None:
        self.carried = data


@pytest.mark.timeout(20)
def test_a_hooked_backend_carries_its_own_data_through_a_hot_swap(rig: Rig) -> None:
    be, a, b, _ = three(rig, cls=Carrying)
    a.send(be, eth(BROADCAST, MAC_A, b"one"), eth(BROADCAST, MAC_A, b"two"))
    wire = be.save().to_wire()
    assert wire["data"]["backend"] == {"calls": 2} and wire["version"] == 1
    be.suspend()
    be2 = rig.backend(cls=Carrying)
    be2.restore(BackendState.from_wire(wire))
    assert isinstance(be2, Carrying) and be2.carried == {"calls": 2}
    for g in rig.guests:
        g.attach(be2)
    for g in rig.guests:
        g.resume(be2)
    a.send(be2, eth(BROADCAST, MAC_A, b"three"))
    assert len(b.got()) == 3 and be2.stats()[a.key].tx_frames == 3
    # drivers.net saves nothing of its own (the layout is as before) and takes the state of
    # a hooked backend, ignoring what it does not know; the hooked one gets {} from it
    plain = rig.backend()
    plain.restore(BackendState.from_wire(be2.save().to_wire()))
    assert "backend" not in plain.save().to_wire()["data"]
    be3 = rig.backend(cls=Carrying)
    be3.restore(plain.save())
    assert isinstance(be3, Carrying) and be3.carried == {}
    with pytest.raises(StateError, match=r"state\.data\.backend must be a map"):
        rig.backend(cls=Carrying).restore(BackendState("isovisor.net", 1, "x", (), {"backend": 7}))


# --- the TAP uplink ------------------------------------------------------------------------------

PRIVILEGE = tapmod.privilege_problem()
HOST_IP, GUEST_IP = "198.18.0.1", "198.18.0.2"


@pytest.fixture
def netns() -> Iterator[str]:
    if PRIVILEGE is not None:
        pytest.skip(f"the TAP uplink tests need a network namespace and a TAP device: {PRIVILEGE}")
    name = f"ivnt{os.getpid()}"
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        (tapmod.MARKER_DIR / name).unlink(missing_ok=True)


def ip_checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(
    dst_mac: str, src_mac: str, src: str, dst: str, sport: int, dport: int, payload: bytes
) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        1,
        0x4000,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    head = head[:10] + struct.pack("!H", ip_checksum(head)) + head[12:]
    return eth(dst_mac, src_mac, head + udp, 0x0800)


def udp_payload(frame: bytes, dport: int) -> bytes | None:
    """The UDP payload of an IPv4/UDP frame to ``dport``, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    _, port, length, _ = struct.unpack_from("!HHHH", frame, 14 + ihl)
    return frame[14 + ihl + 8 : 14 + ihl + length] if port == dport else None


@pytest.mark.timeout(60)
def test_the_tap_uplink_carries_frames_both_ways(rig: Rig, netns: str) -> None:
    opts = {"uplink": "tap", "tap": netns, "netns": netns}
    be = rig.backend(opts)
    a = rig.guest("a", MAC_A)
    a.connect(be)
    a.post(be, 16)
    assert be.uplink.tap is not None and be.uplink.netns_created, (
        "the TAP did not open (see the log)"
    )
    (fd,) = be.fds()
    host_mac = tapmod.link_mac(netns, netns)
    assert (
        f"inet {HOST_IP}/15"
        in subprocess.run(
            ["ip", "-n", netns, "addr", "show", "dev", netns], capture_output=True, text=True
        ).stdout
    )
    subprocess.run(
        ["ip", "-n", netns, "neigh", "replace", GUEST_IP, "lladdr", MAC_A, "dev", netns], check=True
    )
    with tapmod.in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((HOST_IP, 0))
        sock.settimeout(10)
        port = sock.getsockname()[1]
        # host -> guest
        sock.sendto(b"hello guest", (GUEST_IP, 9999))

        def arrived() -> bytes | None:
            be.readable(fd)
            return next((p for f in a.got() if (p := udp_payload(f, 9999)) is not None), None)

        assert (
            wait_until(arrived, timeout=10, what="the datagram in the guest's rx ring")
            == b"hello guest"
        )
        frame = next(f for f in a.got() if udp_payload(f, 9999) is not None)
        assert frame[:6] == mac(MAC_A) and frame[6:12] == mac(host_mac)
        st = be.stats()[a.key]
        assert st.uplink_rx >= 1 and be.uplink.stats.frames_in >= 1
        # guest -> host: the switch learned the host's MAC on the uplink
        a.send(be, udp_frame(host_mac, MAC_A, GUEST_IP, HOST_IP, 5555, port, b"hello host"))
        data, src = sock.recvfrom(2048)
        assert (data, src) == (b"hello host", (GUEST_IP, 5555))
        assert be.stats()[a.key].uplink_tx == 1 and a.done()[-1][1] == STATUS_OKAY
        assert be.statistics()["uplink"] == f"tap {netns} in {netns}"
        # a frame from the host side with a guest's MAC as its source is refused
        with tapmod.in_netns(netns):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            raw.bind((netns, 0))
            raw.send(eth(BROADCAST, MAC_A, b"spoofed from the host side"))
        finally:
            raw.close()
        wait_until(
            lambda: (be.readable(fd), be.uplink.stats.spoofed)[1],
            timeout=10,
            what="the spoofed frame counted",
        )
    finally:
        sock.close()
    # a replacement instance attaches to the same (persistent) TAP by name
    be.close()
    be2 = rig.backend(opts)
    a.attach(be2)
    a.resume(be2)
    assert be2.uplink.tap is not None and not be2.uplink.netns_created
    # At `isovisor down` (["retire"]) the instance then serving removes the TAP, and the
    # namespace too, because isovisor created it (the marker), whichever instance did.
    removed = be2.cleanup()
    assert removed == [f"TAP {netns} in network namespace {netns}", f"network namespace {netns}"]
    assert not tapmod.netns_exists(netns)
    assert tapmod.remove(netns, netns) == []


@pytest.mark.timeout(60)
def test_cleanup_removes_what_the_instance_created(rig: Rig, netns: str) -> None:
    be = rig.backend({"uplink": "tap", "tap": netns, "netns": netns})
    a = rig.guest("a", MAC_A)
    a.attach(be)
    assert be.uplink.tap is not None and be.uplink.netns_created
    assert be.cleanup() == [
        f"TAP {netns} in network namespace {netns}",
        f"network namespace {netns}",
    ]
    assert not tapmod.netns_exists(netns) and not (tapmod.MARKER_DIR / netns).exists()
    assert tapmod.remove(netns, netns) == []  # nothing left: no error


@pytest.mark.timeout(30)
def test_a_tap_held_elsewhere_is_retried(rig: Rig, netns: str) -> None:
    opts = {"uplink": "tap", "tap": netns, "netns": netns}
    holder, _ = tapmod.Tap.open(netns, netns, "198.18.0.1/15")
    try:
        be = rig.backend(opts)
        a = rig.guest("a", MAC_A)
        a.connect(be)
        assert be.uplink.tap is None and be.statistics()["uplink"] == f"tap {netns}: not open"
        assert be.timer_ms() == 1000
        holder.close()
        rig.clock.now += 1
        be.timer()
        assert be.uplink.tap is not None
    finally:
        holder.close()


# --- fault injection (drivers/faults.py; docs/campaigns.md) ------------------------------------


def faulty(
    rig: Rig, options: dict[str, Any] | None = None
) -> tuple[NetBackend, Guest, Guest, Guest]:
    be, a, b, c = three(rig, options)
    learn_b(be, a, b)
    return be, a, b, c


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"type": "bad_op"},
            "fault type 'bad_op' does not apply to a net driver (device class vif)"
            ": a tx response carries no operation",
        ),
        ({"type": "exit", "op": "read"}, "op 'read' is not one of tx"),
    ],
)
def test_faults_a_net_driver_cannot_carry_out_are_refused(
    rig: Rig, spec: dict[str, Any], message: str
) -> None:
    be = rig.backend()
    with pytest.raises(ValueError) as e:
        be.set_faults([{"id": 1, **spec}])
    assert message in str(e.value)
    assert be.forward == be._forward  # nothing armed


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["bad_id", "bad_status", "duplicate"])
def test_a_spoiled_tx_response_and_nothing_else(rig: Rig, kind: str) -> None:
    be, a, b, _ = faulty(rig)
    be.set_faults([{"id": 7, "type": kind, "op": "tx", "domain": "a"}])
    f, g = eth(MAC_B, MAC_A, b"one"), eth(MAC_B, MAC_A, b"two")
    ids = a.send(be, f, g)
    expected = {
        "bad_id": [(ids[0] ^ 0x5EED << 40, STATUS_OKAY), (ids[1], STATUS_OKAY)],
        "bad_status": [(ids[0], 7), (ids[1], STATUS_OKAY)],
        "duplicate": [(ids[0], STATUS_OKAY), (ids[0], STATUS_OKAY)],
    }[kind]
    assert a.done() == expected
    assert b.got()[-2:] == [f, g]  # the frames themselves went out once each
    assert rig.host.fired == [(7, kind, "a/eth0")]
    assert be.forward == be._forward  # spent: the switch asks nothing any more


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["drop", "bad_index"])
def test_drop_and_bad_index_stop_the_tx_ring_and_a_replacement_redoes_it(
    rig: Rig, kind: str
) -> None:
    be, a, b, _ = faulty(rig)
    be.set_faults([{"id": 1, "type": kind}])
    f, g = eth(MAC_B, MAC_A, b"never answered"), eth(MAC_B, MAC_A, b"never taken")
    a.send(be, f)
    a.send(be, g)
    assert b.got() == []
    req_prod, rsp_prod = struct.unpack_from("<QxxxxxxxxQ", a.view, 0)
    assert (req_prod, rsp_prod) == (2, 4 if kind == "bad_index" else 0)
    if kind == "bad_index":  # the frontend sees it; the kernel rewinds to its rsp_cons
        with pytest.raises(RingError, match="rsp_prod=4 but only 2 requests"):
            a.done()
        struct.pack_into("<Q", a.view, 16, 0)
    assert a.done() == []
    h = eth(MAC_A, MAC_B, b"rx still works")
    b.send(be, h)
    assert a.got()[-1] == h
    rig.restart(be)
    assert b.got()[-2:] == [f, g]  # once each
    assert [s for _, s in a.done()] == [STATUS_OKAY, STATUS_OKAY]


@pytest.mark.timeout(10)
def test_corrupt_data_flips_a_byte_of_the_frame_every_destination_gets(rig: Rig) -> None:
    be, a, b, c = faulty(rig)
    be.set_faults([{"id": 1, "type": "corrupt_data"}])
    f = eth(BROADCAST, MAC_A, b"payload")
    a.send(be, f)
    bad = f[:14] + bytes([f[14] ^ 0xFF]) + f[15:]
    assert b.got()[-1] == bad and c.got()[-1] == bad
    assert bytes(a.view[TX_BUF_OFFSET : TX_BUF_OFFSET + len(f)]) == f  # its buffer put right
    assert a.done() == [(a.sent[-1], STATUS_OKAY)]


@pytest.mark.timeout(10)
def test_corrupt_data_waits_for_a_frame_another_guest_receives(rig: Rig) -> None:
    be, a, b, _ = faulty(rig)
    be.set_faults([{"id": 1, "type": "corrupt_data"}])
    nowhere = eth(MAC_B, MAC_B, b"to its own port")  # b's MAC is learned: no destination
    b.send(be, nowhere)
    assert b.done()[-1] == (b.sent[-1], STATUS_OKAY) and rig.host.fired == []
    f = eth(MAC_B, MAC_A, b"payload")
    a.send(be, f)
    assert b.got()[-1] == f[:14] + bytes([f[14] ^ 0xFF]) + f[15:]
    assert [k for _, k, _ in rig.host.fired] == ["corrupt_data"]


@pytest.mark.timeout(10)
def test_slow_and_leaks_serve_the_request_normally(rig: Rig) -> None:
    be, a, b, _ = faulty(rig)
    be.set_faults(
        [
            {"id": 1, "type": "slow", "latency_ms": 1},
            {"id": 2, "type": "leak_mem"},
            {"id": 3, "type": "leak_fd"},
        ]
    )
    frames = [eth(MAC_B, MAC_A, bytes([i])) for i in range(3)]
    a.send(be, *frames)
    assert b.got()[-3:] == frames
    assert [s for _, s in a.done()] == [STATUS_OKAY] * 3
    assert [k for _, k, _ in rig.host.fired] == ["slow", "leak_mem", "leak_fd"]
    assert rig.host.injected == ["leak_mem", "leak_fd"] and rig.host.fds == 256


@pytest.mark.timeout(20)
def test_a_poison_fault_kills_each_instance_until_the_frame_is_answered_as_poison(rig: Rig) -> None:
    opts = {"poison_after": 2}
    be, a, b, _ = faulty(rig, opts)
    # the frames a sends from its tx buffer 2: here the third one
    spec = [
        {
            "id": 1,
            "type": "poison",
            "sector": TX_BUF_OFFSET + 2 * BUF_SIZE + 10,
            "domain": "a",
            "times": -1,
        }
    ]
    be.set_faults(spec)
    frames = [eth(MAC_B, MAC_A, b"first"), eth(MAC_B, MAC_A, b"second")]
    a.send(be, *frames)

    def replacement(old: NetBackend) -> NetBackend:
        """The next instance, armed before it resumes anything (as a spare is)."""
        old.close()
        new = rig.backend(opts)
        new.set_faults(spec)
        for g in rig.guests:
            g.attach(new)
        return new

    with pytest.raises(Crash):
        a.send(be, eth(MAC_B, MAC_A, b"deadly"))  # instance 1 dies executing it
    be = replacement(be)
    with pytest.raises(Crash):
        a.resume(be)  # instance 2 dies redoing it
    be = replacement(be)
    for g in rig.guests:
        g.resume(be)  # instance 3 answers it as poison
    ((key, _, description),) = rig.host.poisons
    assert key == a.key and "2 driver instances died executing it" in description
    assert a.done()[-1] == (a.sent[-1], STATUS_ERROR)
    assert b.got() == frames
    assert [k for _, k, _ in rig.host.fired] == ["poison", "poison"]
