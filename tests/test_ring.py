"""The shared ring (Xen io/ring.h semantics) and the in-flight log."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.ring import (
    EXECUTING,
    BackRing,
    FrontRing,
    InflightLog,
    RingError,
    inflight_bytes,
    ring_bytes,
)
from ipc.shm import Segment

N, SLOT = 8, 32
OPS = st.lists(
    st.sampled_from(["put", "push", "take", "answer", "publish", "collect"]), max_size=300
)


def make(n: int = N, start: int = 0) -> tuple[FrontRing, BackRing, memoryview]:
    buf = memoryview(bytearray(ring_bytes(n, SLOT)))
    front = FrontRing(buf, n, SLOT)
    if start:  # begin near the 2**64 wrap of the free-running indices
        idx = buf[:64].cast("Q")
        idx[0] = idx[2] = start
        idx[1] = idx[3] = (start + 1) % 2**64
        front = FrontRing(buf, n, SLOT, init=False)
        front.rsp_cons = start
    return front, BackRing(buf, n, SLOT), buf


@given(OPS, st.sampled_from([0, 2**64 - 5]))
def test_responses_come_back_in_order_and_complete(ops: list[str], start: int) -> None:
    front, back, _ = make(start=start)
    sent, taken, got = 0, [], []
    for op in ops:
        if op == "put" and front.free_slots():
            front.put_request(sent.to_bytes(8, "little"))
            sent += 1
        elif op == "push":
            front.push_requests()
        elif op == "take" and back.unconsumed_requests():
            taken.append(back.get_request())
        elif op == "answer" and taken:
            back.put_response(b"R" + taken.pop(0)[:8])
        elif op == "publish":
            back.push_responses()
        elif op == "collect" and front.unconsumed_responses():
            got.append(int.from_bytes(front.get_response()[1:9], "little"))
    assert got == list(range(len(got)))  # FIFO, nothing lost, nothing duplicated
    assert front.free_slots() >= 0


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["front", "back"]), st.integers(1, 4)), max_size=200))
def test_no_lost_wakeups(steps: list[tuple[str, int]]) -> None:
    """Model: a side sleeps only after a failed final check; a notify wakes it.  A request
    published while the backend sleeps always comes with a notification."""
    front, back, _ = make()
    back_sleeping = False
    for who, k in steps:
        if who == "front":
            for _ in range(min(k, front.free_slots())):
                front.put_request(b"x")
            if front.push_requests():
                back_sleeping = False
            # (responses are collected at once so the frontend never runs out of slots)
            while front.unconsumed_responses():
                front.get_response()
        elif not back_sleeping:
            while back.unconsumed_requests():
                back.get_request()
                back.put_response(b"y")
            back.push_responses()
            if not back.final_check_for_requests():
                back_sleeping = True
        assert not (back_sleeping and back.unconsumed_requests()), "lost wake-up"


def test_hold_off_batches_notifications() -> None:
    front, back, _ = make(n=32)
    for _round in range(100):
        for _ in range(32):
            front.put_request(b"q")
        front.push_requests()
        while back.final_check_for_requests():
            while back.unconsumed_requests():
                back.get_request()
                back.put_response(b"r")
            back.push_responses()
        while front.unconsumed_responses():
            front.get_response()
        front.final_check_for_responses()
    # one wake-up per batch of 32, not per request
    assert front.statistics().notifications == 100
    assert front.statistics().pushed == 3200


@given(st.integers(0, 2**64 - 1))
def test_hostile_req_prod_is_caught(prod: int) -> None:
    _, back, buf = make()
    buf[:64].cast("Q")[0] = prod
    if prod <= N:
        assert back.unconsumed_requests() == prod
    else:
        with pytest.raises(RingError, match=r"req_prod=.* is invalid"):
            back.unconsumed_requests()


def test_backwards_index_and_bogus_responses() -> None:
    front, back, buf = make()
    for _ in range(4):
        front.put_request(b"a")
    front.push_requests()
    for _ in range(4):
        back.get_request()
    buf[:64].cast("Q")[0] = 2  # the guest moves req_prod backwards
    with pytest.raises(RingError, match="moved backwards or past the ring size"):
        back.unconsumed_requests()
    _, back2, _ = make()
    with pytest.raises(RingError, match="response without a request"):
        back2.put_response(b"r")
    front3, _, buf3 = make()
    buf3[:64].cast("Q")[2] = 3  # the backend claims responses nobody asked for
    with pytest.raises(RingError, match="only 0 requests are outstanding"):
        front3.unconsumed_responses()


def test_request_is_copied_before_use() -> None:
    front, back, buf = make()
    front.put_request(b"original")
    front.push_requests()
    req = back.get_request()
    buf[64:72] = b"changed!"  # the guest rewrites the slot afterwards
    assert req[:8] == b"original"


@given(st.lists(st.booleans(), min_size=1, max_size=60))
def test_inflight_log_replays_in_order(ends: list[bool]) -> None:
    buf = memoryview(bytearray(inflight_bytes(N, SLOT)))
    log = InflightLog(buf, N, SLOT)
    live: list[int] = []
    for i, finish in enumerate(ends):
        if len(live) == N:
            log.end(live.pop(0))
        log.begin(i, i.to_bytes(4, "little"))
        live.append(i)
        if finish:
            log.end(live.pop(0))
    # A replacement backend attaches to the same memory and sees exactly what is unfinished.
    again = InflightLog(buf, N, SLOT)
    pend = again.pending()
    assert [r.index for r in pend] == live
    assert [int.from_bytes(r.request[:4], "little") for r in pend] == live
    assert all(a.seq < b.seq for a, b in itertools.pairwise(pend))
    assert not any(r.executing or r.deaths for r in pend)
    if live and len(live) < N:  # the next index's slot is free: its seq is newer than all
        assert again.begin(live[-1] + 1, b"z") > pend[-1].seq


LOG_OPS = st.lists(
    st.tuples(st.sampled_from(["begin", "end", "mark", "clear", "death"]), st.integers(0, N - 1)),
    max_size=200,
)


@given(LOG_OPS)
def test_inflight_log_keeps_executing_flags_and_deaths(ops: list[tuple[str, int]]) -> None:
    """Model: per live record (executing, deaths).  A replacement attaching to the same memory
    at any point sees exactly the model."""
    buf = memoryview(bytearray(inflight_bytes(N, SLOT)))
    log = InflightLog(buf, N, SLOT)
    model: dict[int, tuple[bool, int]] = {}  # slot -> (executing, deaths)
    for op, slot in ops:
        if op == "begin" and slot not in model:
            log.begin(slot + N, bytes([slot]) * 3)  # a later lap of the ring: same slot
            model[slot] = (False, 0)
        elif op == "end" and slot in model:
            log.end(slot + N)
            del model[slot]
        elif op == "mark" and slot in model:
            log.mark_executing(slot + N)
            model[slot] = (True, model[slot][1])
        elif op == "clear" and slot in model:
            log.clear_executing(slot + N)
            model[slot] = (False, model[slot][1])
        elif op == "death" and slot in model:
            assert log.record_death(slot + N) == model[slot][1] + 1
            model[slot] = (False, model[slot][1] + 1)
        seen = {r.index - N: (r.executing, r.deaths) for r in InflightLog(buf, N, SLOT).pending()}
        assert seen == model
    for r in InflightLog(buf, N, SLOT).pending():
        assert r.request[:3] == bytes([r.index - N]) * 3 and r.request[3:] == bytes(SLOT - 3)


def test_inflight_record_layout() -> None:
    """Three u64 header words (seq, index, state: bit 0 executing, bits 8.. deaths), then the
    request; the kernel sizes the device segment from inflight_bytes()."""
    assert inflight_bytes(N, SLOT) == N * (24 + SLOT)
    buf = memoryview(bytearray(inflight_bytes(N, SLOT)))
    log = InflightLog(buf, N, SLOT)
    seq = log.begin(2**64 - 3, b"abc")  # slot 5 of 8
    rec = 24 + SLOT
    words = buf[5 * rec : 5 * rec + 24].cast("Q")
    assert list(words) == [seq, 2**64 - 3, 0]
    assert bytes(buf[5 * rec + 24 : 6 * rec]) == b"abc" + bytes(SLOT - 3)
    log.mark_executing(2**64 - 3)
    assert words[2] == 1
    assert log.record_death(2**64 - 3) == 1 and words[2] == 1 << 8
    log.mark_executing(2**64 - 3)
    assert words[2] == 1 << 8 | 1
    assert log.record_death(2**64 - 3) == 2 and words[2] == 2 << 8
    (r,) = log.pending()
    assert (r.executing, r.deaths, r.index) == (False, 2, 2**64 - 3)
    log.end(2**64 - 3)
    assert words[0] == 0 and log.pending() == []
    # the next request in that slot starts afresh: not executing, no deaths
    log.begin(5, b"d")
    (r,) = log.pending()
    assert (r.executing, r.deaths) == (False, 0) and words[2] == 0
    # the inlined hot path stores exactly what mark/clear store for a fresh record
    w = log.state_words[5 % N]
    log.words[w] = EXECUTING
    assert log.pending()[0].executing
    log.words[w] = 0
    assert not log.pending()[0].executing
    words.release()
    with pytest.raises(ValueError, match="multiple of 8"):
        InflightLog(memoryview(bytearray(1024)), 4, 20)
    with pytest.raises(ValueError, match="too small"):
        InflightLog(memoryview(bytearray(inflight_bytes(N, SLOT) - 8)), N, SLOT)


def test_inflight_slot_in_use_is_refused() -> None:
    log = InflightLog(memoryview(bytearray(inflight_bytes(N, SLOT))), N, SLOT)
    log.begin(3, b"x")
    with pytest.raises(RingError, match="slot 3 is still in use"):
        log.begin(3 + N, b"y")


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_backend_in_another_process_over_shared_memory() -> None:
    n, count = 16, 2000
    seg = Segment(f"isovisor.test-ring.{id(object())}", ring_bytes(n, SLOT), create=True)
    child = None
    view = memoryview(seg.buf)
    try:
        front = FrontRing(view, n, SLOT)
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[1])!r})
            from ipc.ring import BackRing
            from ipc.shm import Segment
            seg = Segment({seg.name!r}, 0, create=False)
            back = BackRing(memoryview(seg.buf), {n}, {SLOT})
            done = 0
            while done < {count}:   # spin on the ring index: the event we wait for
                while back.unconsumed_requests():
                    req = back.get_request()
                    back.put_response(req[:8][::-1])
                    done += 1
                back.push_responses()
        """)
        child = subprocess.Popen([sys.executable, "-c", code])
        sent = got = 0
        while got < count:
            while sent < count and front.free_slots():
                front.put_request(sent.to_bytes(8, "big"))
                sent += 1
            front.push_requests()
            while front.unconsumed_responses():
                assert front.get_response()[:8] == got.to_bytes(8, "big")[::-1]
                got += 1
            assert child.poll() in (None, 0), "backend process died"
        assert child.wait(30) == 0
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        seg.unlink()  # first: even if unmapping fails below, nothing is left in /dev/shm
        front = None  # drop the ring's views of the segment before unmapping it
        view.release()
        seg.close()
