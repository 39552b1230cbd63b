"""The entropy backend (drivers.rng) in-process on real shared memory: what the DeviceBackend
base gives a class with no code of its own — the handshake, serving, refusing bad requests,
recovery from the in-flight log (no request lost or answered twice), poison, faults and the
state a hot swap carries."""

from __future__ import annotations

import gc
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from devices import rng
from drivers.devicebackend import DeviceBackend, Lifecycle
from drivers.rng import RngBackend
from drivers.state import BackendState, StateError
from ipc.ring import HEADER_BYTES, FrontRing
from ipc.shm import SHM_DIR, Segment
from ipc.store import DevState
from tests.fakehost import RecordingHost

PREFIX = f"isovisor.test-rng.{os.getpid()}."
STORE = "/driver/rng0/rng/1/0"


class Crash(Exception):
    """An injected death: the test abandons the instance, as after SIGKILL."""


class Guest:
    """The frontend's side of one rng device: a segment the size the kernel makes."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.segment = Segment(f"{PREFIX}{key}", rng.SEGMENT_BYTES, create=True)
        self.mem = memoryview(self.segment.buf)
        self.front = FrontRing(
            self.mem[: HEADER_BYTES + rng.RING_SLOTS * rng.SLOT_SIZE], rng.RING_SLOTS, rng.SLOT_SIZE
        )
        self.next_id = 1
        self.asked: dict[int, tuple[int, int]] = {}  # id -> (offset, length)

    def attach_message(self, **change: Any) -> dict[str, Any]:
        return {
            "key": self.key,
            "domid": 1,
            "domain": "g",
            "vdev": "rng0",
            "devid": 0,
            "segment": self.segment.name,
            "window": rng.WINDOW_BYTES,
            "inflight_offset": rng.INFLIGHT_OFFSET,
            "store": STORE,
            "scratch": "x",
            "class": "rng",
            **change,
        }

    def ask(self, length: int, offset: int | None = None) -> int:
        rid = self.next_id
        self.next_id += 1
        slot = (rid - 1) % rng.RING_SLOTS
        off = rng.DATA_OFFSET + slot * rng.MAX_REQUEST_BYTES if offset is None else offset
        self.asked[rid] = (off, length)
        self.front.put_request(rng.REQUEST.pack(rid, off, length))
        self.front.push_requests()
        return rid

    def answers(self) -> list[tuple[int, int, int]]:
        out = []
        while self.front.unconsumed_responses():
            rid, status, _, length = rng.RESPONSE.unpack_from(self.front.get_response())
            out.append((rid, status, length))
        return out

    def bytes_of(self, rid: int) -> bytes:
        off, length = self.asked[rid]
        return bytes(self.mem[off : off + length])

    def close(self) -> None:
        self.segment.unlink()  # first: nothing is left behind even if a view lingers
        del self.front  # its views of the segment
        gc.collect()
        self.mem.release()
        self.segment.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest(7)
    try:
        yield g
    finally:
        g.close()


def start(
    g: Guest, cls: type[DeviceBackend] = RngBackend, *, resume: bool = False, **options: Any
) -> tuple[DeviceBackend, RecordingHost]:
    host = RecordingHost("rng0", Crash)
    b = cls(host, options)
    b.attach(g.attach_message())
    assert host.store[f"{STORE}/state"] == str(int(DevState.INIT_WAIT))
    b.fe_state(g.key, int(DevState.CONNECTED if resume else DevState.INITIALISED))
    assert host.store[f"{STORE}/state"] == str(int(DevState.CONNECTED))
    return b, host


def test_requests_get_fresh_random_bytes_and_bad_ones_an_error(guest: Guest) -> None:
    b, host = start(guest)
    ids = [guest.ask(n) for n in (1, 64, rng.MAX_REQUEST_BYTES)]
    bad = [
        guest.ask(0),
        guest.ask(rng.MAX_REQUEST_BYTES + 1),
        guest.ask(16, offset=0x10),
    ]  # the ring page: outside the data area
    b.kick(guest.key)
    got = guest.answers()
    assert got == [
        (ids[0], 0, 1),
        (ids[1], 0, 64),
        (ids[2], 0, 256),
        *[(r, rng.STATUS_ERROR, 0) for r in bad],
    ]
    a, c = guest.bytes_of(ids[1]), guest.bytes_of(ids[2])
    assert len(set(c)) > 100 and a != c[:64]
    assert b.statistics()["requests"] == 6 and b.statistics()["errors"] == 3
    assert host.notifies[guest.key] >= 1 and not host.faults
    b.close()


def test_a_guest_index_that_moves_backwards_breaks_only_its_device(guest: Guest) -> None:
    b, host = start(guest)
    guest.ask(8)
    b.kick(guest.key)
    guest.mem[:8].cast("Q")[0] = 1 << 40  # req_prod far past what the ring can hold
    b.kick(guest.key)
    assert host.faults and "req_prod" in host.faults[0][1]
    assert b.devices[guest.key].state is Lifecycle.BROKEN
    b.close()


class DiesOn(RngBackend):
    """Dies (as SIGKILL would) executing the request of length ``length``."""

    length = 33

    def perform(self, d: Any, raw: bytes) -> bytes:
        if rng.REQUEST.unpack_from(raw)[2] == self.length:
            raise Crash("killed while executing")
        return super().perform(d, raw)


def test_a_new_instance_redoes_what_the_dead_one_took_once_each(guest: Guest) -> None:
    """Killed in the middle of a batch: the replacement answers every request exactly once,
    in ring order, from the in-flight log."""
    dying, _ = start(guest, DiesOn)
    ids = [guest.ask(n) for n in (8, 16, 33, 40)]
    with pytest.raises(Crash):
        dying.kick(guest.key)
    assert guest.answers() == []  # nothing was published before it died
    b, host = start(guest, resume=True)
    assert guest.answers() == [(ids[0], 0, 8), (ids[1], 0, 16), (ids[2], 0, 33), (ids[3], 0, 40)]
    assert host.recoveries and host.recoveries[0][:2] == (guest.key, 3)  # 3 redone, 1 new
    later = guest.ask(5)
    b.kick(guest.key)
    assert guest.answers() == [(later, 0, 5)]
    b.close()


def test_a_request_that_kills_every_instance_is_answered_as_poison(guest: Guest) -> None:
    first, _ = start(guest, DiesOn, poison_after=2)
    rid = guest.ask(33)
    with pytest.raises(Crash):
        first.kick(guest.key)
    for _ in range(1):  # the second instance dies on the redo too
        with pytest.raises(Crash):
            start(guest, DiesOn, resume=True, poison_after=2)
    b, host = start(guest, DiesOn, resume=True, poison_after=2)
    assert guest.answers() == [(rid, rng.STATUS_ERROR, 0)]
    assert host.poisons and "read id=0x1 offset=0x1000 length=33" in host.poisons[0][2]
    assert b.statistics()["poisoned"] == 1
    b.close()


@pytest.mark.parametrize(
    "kind, check",
    [
        ("bad_id", lambda got, rid: got[0][0] != rid and got[0][1] == 0),
        ("bad_status", lambda got, rid: got[0] == (rid, 7, 8)),
    ],
)
def test_response_faults_spoil_exactly_one_response(guest: Guest, kind: str, check: Any) -> None:
    b, host = start(guest)
    b.set_faults([{"id": 1, "type": kind, "times": 1}])
    rid = guest.ask(8)
    b.kick(guest.key)
    got = guest.answers()
    assert check(got, rid), got
    assert host.fired == [(1, kind, "g/rng0")]
    nxt = guest.ask(8)
    b.kick(guest.key)
    assert guest.answers() == [(nxt, 0, 8)]
    b.close()


def test_a_duplicate_response_repeats_the_previous_one_even_one_request_at_a_time(
    guest: Guest,
) -> None:
    """A guest with one request in flight gets batches of one: the fault copies the previous
    batch's response over the new one, so the guest sees an id it already had answered."""
    b, host = start(guest)
    first = guest.ask(8)
    b.kick(guest.key)
    assert guest.answers() == [(first, 0, 8)]
    b.set_faults([{"id": 1, "type": "duplicate", "times": 1}])
    guest.ask(8)
    b.kick(guest.key)
    assert guest.answers() == [(first, 0, 8)]  # the second request's answer is lost
    assert host.fired == [(1, "duplicate", "g/rng0")]
    b.close()


def test_faults_the_class_cannot_carry_out_are_refused_with_the_reason() -> None:
    b = RngBackend(RecordingHost("rng0", Crash), {})
    with pytest.raises(ValueError, match=r"corrupt_data.*random bytes have no right value"):
        b.set_faults([{"id": 1, "type": "corrupt_data"}])
    with pytest.raises(ValueError, match=r"unknown rng backend option.*allowed: max_batch"):
        RngBackend(RecordingHost("rng0", Crash), {"levle": 1})


def test_a_hot_swap_carries_the_counters_and_in_flight_requests(guest: Guest) -> None:
    old, _ = start(guest)
    guest.ask(8)
    old.kick(guest.key)
    assert len(guest.answers()) == 1
    state = BackendState.from_wire(old.save().to_wire())
    old.suspend()
    queued = guest.ask(12)  # the guest goes on while nobody serves
    new = RngBackend(RecordingHost("rng0", Crash), {})
    new.restore(state)
    new.attach(guest.attach_message())
    new.fe_state(guest.key, int(DevState.CONNECTED))
    assert guest.answers() == [(queued, 0, 12)]
    assert new.statistics()["requests"] == 2
    with pytest.raises(StateError, match=r"kind 'isovisor.rng'.*'isovisor.console'"):
        new.restore(BackendState("isovisor.console", 1, "x"))
    new.close()


def test_an_attach_for_another_class_or_geometry_is_refused(guest: Guest) -> None:
    host = RecordingHost("rng0", Crash)
    b = RngBackend(host, {})
    b.attach(guest.attach_message(**{"class": "vbd"}))
    b.attach(guest.attach_message(window=0x2000))
    assert [k for k, _ in host.errors] == [guest.key, guest.key]
    assert "serves 'rng' devices only" in host.errors[0][1]
    assert "window 0x2000" in host.errors[1][1]
    assert host.store[f"{STORE}/state"] == str(int(DevState.CLOSED))
    assert not b.devices
    b.close()


def test_a_region_handed_over_as_a_descriptor_is_mapped_from_it_not_by_name(guest: Guest) -> None:
    """An attach with ``segment_fd`` (what the driver host puts there from the descriptor
    that came with the doorbells) is mapped from that descriptor: its ``segment`` names
    nothing under /dev/shm, and the device still serves the guest's ring in the guest's
    memory.  The same attach without the descriptor is refused (it would be opened by that
    name), and so is a ``segment_fd`` that is no region (an eventfd) or no descriptor.  The
    backend neither keeps nor closes the descriptor: that is the host's."""
    gone = f"{PREFIX}no-such-segment"
    assert not (SHM_DIR / gone).exists()
    host = RecordingHost("rng0", Crash)
    b = RngBackend(host, {})
    fd = guest.segment.open_fd()
    bell = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        b.attach(guest.attach_message(segment=gone))
        b.attach(guest.attach_message(segment=gone, segment_fd=bell))
        b.attach(guest.attach_message(segment=gone, segment_fd="3"))
        assert [m for _, m in host.errors] == [
            f"cannot map device segment {gone}: cannot open shared-memory segment "
            f"{SHM_DIR / gone}: [Errno 2] No such file or directory: '{SHM_DIR / gone}'",
            f"cannot map device segment {gone}: cannot map shared-memory segment {gone} "
            f"(descriptor {bell}): not a regular file",
            f"cannot map device segment {gone}: attach field 'segment_fd' is '3', expected a "
            "descriptor",
        ]
        host.errors.clear()
        b.attach(guest.attach_message(segment=gone, segment_fd=fd))
        assert not host.errors and host.store[f"{STORE}/state"] == str(int(DevState.INIT_WAIT))
        os.fstat(fd)  # still open: the host closes it
        b.fe_state(guest.key, int(DevState.INITIALISED))
        rid = guest.ask(64)
        b.kick(guest.key)
        assert guest.answers() == [(rid, 0, 64)]
        assert len(set(guest.bytes_of(rid))) > 20  # written through the mapping of fd
        assert b.devices[guest.key].segment.name == gone
    finally:
        b.close()
        os.close(fd)
        os.close(bell)


def test_the_response_layout_is_what_the_header_says() -> None:
    hdr = rng.c_header()
    assert "#define RNGIF_RSP_LENGTH (12)" in hdr and "#define RNGIF_DEV_KIND (4)" in hdr
    assert struct.calcsize("<QhHI") == 16
