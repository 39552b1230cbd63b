"""Shared-memory request/response rings with Xen ``io/ring.h`` semantics, and the in-flight log.

Layout of a ring inside a shared region (all fields little-endian u64)::

    +0   req_prod    written by the frontend: requests [0, req_prod) are published
    +8   req_event   written by the backend: "notify me when req_prod passes this"
    +16  rsp_prod    written by the backend: responses [0, rsp_prod) are published
    +24  rsp_event   written by the frontend: "notify me when rsp_prod passes this"
    +32  (reserved up to +64)
    +64  slots[n]    n = a power of two; slot i % n holds request i, later its response

Indices run free (they wrap at 2**64, never at n), exactly as in Xen, so "how many" is always
``(a - b) mod 2**64``.  Each side keeps private indices (``req_prod_pvt``/``rsp_cons`` in the
frontend, ``req_cons``/``rsp_prod_pvt`` in the backend) and publishes them with one whole-word
store: the shared words are elements of a ``memoryview.cast("Q")``, never ``struct.pack_into``,
which zeroes a field before writing it and lets a reader in another process see a torn value.
Slot contents are written before the index that publishes them; x86 keeps stores in order, and
so does the single-threaded Python code on each side.

Notification hold-off: a producer notifies only when the new producer index passes the
consumer's ``*_event`` (``RING_PUSH_*_AND_CHECK_NOTIFY``); a consumer that finds nothing sets its
``*_event`` to "one more" and then checks again before sleeping (``RING_FINAL_CHECK_FOR_*``), so
an item published in between is never left without a wake-up.

The peer is untrusted.  The backend validates the guest's ``req_prod`` before using it: an index
that moves backwards, or that claims more requests than free slots, raises :class:`RingError`
instead of making the backend read slots it must not.  Request bytes are *copied* out of the
slot before anyone parses them (the guest can rewrite the slot at any time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

HEADER_BYTES: Final = 64
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 1, 2, 3
_MASK: Final = (1 << 64) - 1


class RingError(Exception):
    """The peer broke the ring protocol (a bad index); the message says which and how."""


def ring_bytes(nr_slots: int, slot_size: int) -> int:
    """Bytes a ring of ``nr_slots`` slots of ``slot_size`` bytes occupies."""
    return HEADER_BYTES + nr_slots * slot_size


def _check_geometry(buf: memoryview, nr_slots: int, slot_size: int) -> None:
    if nr_slots < 1 or nr_slots & (nr_slots - 1):
        raise ValueError(f"ring size {nr_slots} is not a power of two")
    if slot_size < 8 or slot_size % 8:
        raise ValueError(f"slot size {slot_size} is not a positive multiple of 8")
    if len(buf) < ring_bytes(nr_slots, slot_size):
        raise ValueError(f"{len(buf)} bytes cannot hold a ring of {nr_slots} x {slot_size}")


@dataclass(frozen=True)
class RingStatistics:
    pushed: int
    consumed: int
    notifications: int
    peak_outstanding: int


class _Side:
    def __init__(self, buf: memoryview, nr_slots: int, slot_size: int) -> None:
        _check_geometry(buf, nr_slots, slot_size)
        self._buf = buf
        self._idx = buf[:HEADER_BYTES].cast("Q")
        self.nr_slots = nr_slots
        self.slot_size = slot_size
        self.pushed = 0
        self.consumed = 0
        self.notifications = 0
        self.peak_outstanding = 0

    def _slot(self, index: int) -> memoryview:
        off = HEADER_BYTES + (index % self.nr_slots) * self.slot_size
        return self._buf[off:off + self.slot_size]

    def _write(self, index: int, data: bytes) -> None:
        if len(data) > self.slot_size:
            raise ValueError(f"{len(data)} bytes do not fit a {self.slot_size}-byte slot")
        slot = self._slot(index)
        slot[:len(data)] = data
        slot[len(data):] = bytes(self.slot_size - len(data))

    def _push(self, prod: int, event: int, new: int) -> bool:
        """RING_PUSH_*_AND_CHECK_NOTIFY: publish ``new`` as the producer index at word
        ``prod``; notify only if it passed the peer's ``event`` word."""
        old = self._idx[prod]
        self._idx[prod] = new
        self.pushed += (new - old) & _MASK
        notify = ((new - self._idx[event]) & _MASK) < ((new - old) & _MASK)
        self.notifications += notify
        return notify

    def statistics(self) -> RingStatistics:
        return RingStatistics(self.pushed, self.consumed, self.notifications,
                              self.peak_outstanding)


class FrontRing(_Side):
    """The requesting side (a guest's frontend; Python for tests and tools)."""

    def __init__(self, buf: memoryview, nr_slots: int, slot_size: int, *,
                 init: bool = True) -> None:
        super().__init__(buf, nr_slots, slot_size)
        if init:  # SHARED_RING_INIT + FRONT_RING_INIT
            self._idx[_REQ_PROD] = self._idx[_RSP_PROD] = 0
            self._idx[_REQ_EVENT] = self._idx[_RSP_EVENT] = 1
        self.req_prod_pvt = self._idx[_REQ_PROD]
        self.rsp_cons = self._idx[_RSP_PROD] if not init else 0

    def free_slots(self) -> int:
        """Requests that may still be queued: never more than the ring holds in flight."""
        return self.nr_slots - ((self.req_prod_pvt - self.rsp_cons) & _MASK)

    def put_request(self, data: bytes) -> None:
        if self.free_slots() <= 0:
            raise RingError("ring full: a frontend never has more than ring-size requests "
                            "outstanding; wait for responses")
        self._write(self.req_prod_pvt, data)
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _MASK
        out = (self.req_prod_pvt - self.rsp_cons) & _MASK
        self.peak_outstanding = max(self.peak_outstanding, out)

    def push_requests(self) -> bool:
        """Publish queued requests; True if the backend asked to be notified."""
        return self._push(_REQ_PROD, _REQ_EVENT, self.req_prod_pvt)

    def unconsumed_responses(self) -> int:
        n = (self._idx[_RSP_PROD] - self.rsp_cons) & _MASK
        if n > ((self.req_prod_pvt - self.rsp_cons) & _MASK):
            raise RingError(f"backend published rsp_prod={self._idx[_RSP_PROD]} but only "
                            f"{(self.req_prod_pvt - self.rsp_cons) & _MASK} requests are "
                            f"outstanding from rsp_cons={self.rsp_cons}")
        return n

    def get_response(self) -> bytes:
        if not self.unconsumed_responses():
            raise RingError("no response to consume")
        data = bytes(self._slot(self.rsp_cons))
        self.rsp_cons = (self.rsp_cons + 1) & _MASK
        self.consumed += 1
        return data

    def final_check_for_responses(self) -> bool:
        """Before sleeping: ask for a wake-up at the next response, then look once more."""
        if self.unconsumed_responses():
            return True
        self._idx[_RSP_EVENT] = (self.rsp_cons + 1) & _MASK
        return self.unconsumed_responses() > 0


class BackRing(_Side):
    """The serving side (a driver backend), hardened against a hostile frontend."""

    def __init__(self, buf: memoryview, nr_slots: int, slot_size: int, *,
                 req_cons: int | None = None, rsp_prod_pvt: int | None = None) -> None:
        super().__init__(buf, nr_slots, slot_size)
        # A replacement backend resumes from the published response index.
        self.rsp_prod_pvt = self._idx[_RSP_PROD] if rsp_prod_pvt is None else rsp_prod_pvt
        self.req_cons = self.rsp_prod_pvt if req_cons is None else req_cons

    def unconsumed_requests(self) -> int:
        """Requests published and not yet taken, after validating the guest's ``req_prod``."""
        prod = self._idx[_REQ_PROD]
        avail = (prod - self.req_cons) & _MASK
        room = self.nr_slots - ((self.req_cons - self.rsp_prod_pvt) & _MASK)
        if avail > room:
            raise RingError(
                f"frontend req_prod={prod} is invalid: it claims {avail} new requests after "
                f"req_cons={self.req_cons}, but only {room} slots can hold unanswered "
                "requests (the index moved backwards or past the ring size)")
        return avail

    def get_request(self) -> bytes:
        """Copy the next request out of its slot (the guest may change the slot meanwhile)."""
        if not self.unconsumed_requests():
            raise RingError("no request to consume")
        data = bytes(self._slot(self.req_cons))
        self.req_cons = (self.req_cons + 1) & _MASK
        self.consumed += 1
        out = (self.req_cons - self.rsp_prod_pvt) & _MASK
        self.peak_outstanding = max(self.peak_outstanding, out)
        return data

    def final_check_for_requests(self) -> bool:
        if self.unconsumed_requests():
            return True
        self._idx[_REQ_EVENT] = (self.req_cons + 1) & _MASK
        return self.unconsumed_requests() > 0

    def put_response(self, data: bytes) -> None:
        if self.rsp_prod_pvt == self.req_cons:
            raise RingError("a response without a request: nothing is outstanding")
        self._write(self.rsp_prod_pvt, data)
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & _MASK

    def push_responses(self) -> bool:
        """Publish queued responses; True if the frontend asked to be notified."""
        return self._push(_RSP_PROD, _RSP_EVENT, self.rsp_prod_pvt)


# --- in-flight log ------------------------------------------------------------------------------

#: Per-record header: u64 seq (0 = free), u64 ring index of the request.
_REC_HEADER: Final = 16


def inflight_bytes(nr_slots: int, slot_size: int) -> int:
    return nr_slots * (_REC_HEADER + slot_size)


@dataclass(frozen=True)
class InflightRecord:
    seq: int
    index: int
    request: bytes


class InflightLog:
    """One record per ring slot, in shared memory that outlives the backend (vhost-user's
    INFLIGHT_SHMFD idea): :meth:`begin` before acting on a request, :meth:`end` after its
    response is published.  A replacement backend calls :meth:`pending` and redoes exactly
    those requests, oldest first.  Sequence numbers start at 1 and never repeat in one log.
    """

    def __init__(self, buf: memoryview, nr_slots: int, slot_size: int) -> None:
        if len(buf) < inflight_bytes(nr_slots, slot_size):
            raise ValueError("buffer too small for the in-flight log")
        self._buf = buf
        self.nr_slots = nr_slots
        self.slot_size = slot_size
        self._rec = _REC_HEADER + slot_size
        pend = self.pending()
        self._next_seq = max((r.seq for r in pend), default=0) + 1

    def _words(self, slot: int) -> memoryview:
        off = slot * self._rec
        return self._buf[off:off + _REC_HEADER].cast("Q")

    def begin(self, index: int, request: bytes) -> int:
        slot = index % self.nr_slots
        w = self._words(slot)
        if w[0]:
            raise RingError(f"in-flight record for slot {slot} is still in use (seq {w[0]})")
        off = slot * self._rec + _REC_HEADER
        self._buf[off:off + len(request)] = request
        self._buf[off + len(request):off + self.slot_size] = bytes(self.slot_size - len(request))
        w[1] = index
        seq = self._next_seq
        self._next_seq += 1
        w[0] = seq  # published last: a record with a seq is complete
        return seq

    def end(self, index: int) -> None:
        self._words(index % self.nr_slots)[0] = 0

    def pending(self) -> list[InflightRecord]:
        out = []
        for slot in range(self.nr_slots):
            w = self._words(slot)
            if w[0]:
                off = slot * self._rec + _REC_HEADER
                out.append(InflightRecord(w[0], w[1], bytes(self._buf[off:off + self.slot_size])))
        return sorted(out, key=lambda r: r.seq)
