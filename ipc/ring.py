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
        return self._buf[off : off + self.slot_size]

    def _write(self, index: int, data: bytes) -> None:
        if len(data) > self.slot_size:
            raise ValueError(f"{len(data)} bytes do not fit a {self.slot_size}-byte slot")
        slot = self._slot(index)
        slot[: len(data)] = data
        slot[len(data) :] = bytes(self.slot_size - len(data))

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
        return RingStatistics(self.pushed, self.consumed, self.notifications, self.peak_outstanding)


class FrontRing(_Side):
    """The requesting side (a guest's frontend; Python for tests and tools)."""

    def __init__(
        self, buf: memoryview, nr_slots: int, slot_size: int, *, init: bool = True
    ) -> None:
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
            raise RingError(
                "ring full: a frontend never has more than ring-size requests "
                "outstanding; wait for responses"
            )
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
            raise RingError(
                f"backend published rsp_prod={self._idx[_RSP_PROD]} but only "
                f"{(self.req_prod_pvt - self.rsp_cons) & _MASK} requests are "
                f"outstanding from rsp_cons={self.rsp_cons}"
            )
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

    def __init__(
        self,
        buf: memoryview,
        nr_slots: int,
        slot_size: int,
        *,
        req_cons: int | None = None,
        rsp_prod_pvt: int | None = None,
    ) -> None:
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
                "requests (the index moved backwards or past the ring size)"
            )
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

    # -- fault injection only: what a buggy backend does ----------------------------------------
    def response_at(self, index: int) -> bytes:
        """The slot of a queued response (``slot_size`` bytes)."""
        return bytes(self._slot(index))

    def rewrite_response(self, index: int, data: bytes) -> None:
        """Overwrite a queued, not yet published response."""
        self._write(index, data)

    def publish_rsp_prod_beyond(self, extra: int) -> int:
        """Publish rsp_prod ``extra`` past the guest's req_prod (an impossible index);
        returns it."""
        value = (self._idx[_REQ_PROD] + extra) & _MASK
        self._idx[_RSP_PROD] = value
        return value


# --- in-flight log ------------------------------------------------------------------------------

#: Per-record header, three u64 words: seq (0 = free), the ring index of the request, and the
#: record's state: bit 0 = executing, bits 8..63 = deaths.
_REC_HEADER: Final = 24
_SEQ, _INDEX, _STATE = 0, 1, 2
#: The state word of a record that is executing and has no deaths (see InflightLog.words).
EXECUTING: Final = 1
_EXECUTING: Final = EXECUTING
_DEATH_SHIFT: Final = 8
_NOT_EXECUTING: Final = ~_EXECUTING  # a mask: keeps the deaths, clears the flag


def inflight_bytes(nr_slots: int, slot_size: int) -> int:
    """Bytes an in-flight log for ``nr_slots`` slots of ``slot_size`` bytes occupies."""
    return nr_slots * (_REC_HEADER + slot_size)


@dataclass(frozen=True)
class InflightRecord:
    seq: int
    index: int
    request: bytes
    #: The backend was acting on this request when it stopped (it died in the middle of it).
    executing: bool = False
    #: Backend instances that died while acting on this request (counted by their successors).
    deaths: int = 0


class InflightLog:
    """One record per ring slot, in shared memory that outlives the backend (vhost-user's
    INFLIGHT_SHMFD idea): :meth:`begin` before acting on a request, :meth:`end` after its
    response is published.  A replacement backend calls :meth:`pending` and redoes exactly
    those requests, oldest first.  Sequence numbers start at 1 and never repeat in one log.

    Poison requests (docs/recovery.md): :meth:`mark_executing` just before the backend acts on a
    request and :meth:`clear_executing` right after, so a record found executing by a
    replacement is the one its predecessor died on; :meth:`record_death` counts that.  The flag
    and the count share one u64 word (bit 0 and bits 8..63): marking and clearing are a load and
    a store of that word, and recording a death is one store, so a backend that dies at any
    point leaves either the old or the new state, never half of a recorded death.

    The hot path of a backend may skip the method calls for a record it has just begun (its
    state is 0): ``w = log.state_words[index % log.nr_slots]``, then ``log.words[w] =
    EXECUTING`` before acting and ``log.words[w] = 0`` after; exactly what
    :meth:`mark_executing` and :meth:`clear_executing` do for a record without deaths.

    Record layout (``slot_size`` must be a multiple of 8 so every word is aligned)::

        +0   u64 seq      0 = free; written last by begin(), so a record with a seq is complete
        +8   u64 index    the request's ring index
        +16  u64 state    bit 0 executing, bits 8..63 deaths
        +24  request      slot_size bytes, a copy of the request
    """

    def __init__(self, buf: memoryview, nr_slots: int, slot_size: int) -> None:
        if nr_slots < 1 or slot_size < 8 or slot_size % 8:
            raise ValueError(
                f"in-flight log geometry {nr_slots} x {slot_size}: need at least "
                "one slot and a slot size that is a positive multiple of 8"
            )
        size = inflight_bytes(nr_slots, slot_size)
        if len(buf) < size:
            raise ValueError("buffer too small for the in-flight log")
        self._buf = buf
        self._q = buf[:size].cast("Q")  # every header word, aligned: whole-word stores
        self.nr_slots = nr_slots
        self.slot_size = slot_size
        self._rec = _REC_HEADER + slot_size
        self._stride = self._rec // 8
        #: Every header word, for whole-word stores.
        self.words = self._q
        #: Position in :attr:`words` of each slot's state word.
        self.state_words = tuple(slot * self._stride + _STATE for slot in range(nr_slots))
        pend = self.pending()
        self._next_seq = max((r.seq for r in pend), default=0) + 1

    def _word(self, index: int, which: int) -> int:
        """The position in ``_q`` of word ``which`` of the record for ring index ``index``."""
        return (index % self.nr_slots) * self._stride + which

    def begin(self, index: int, request: bytes) -> int:
        """Record ``request`` (ring index ``index``) as begun, not executing, no deaths;
        returns its sequence number.  RingError if its slot's record is still in use."""
        slot = index % self.nr_slots
        q, base = self._q, slot * self._stride
        if q[base + _SEQ]:
            raise RingError(
                f"in-flight record for slot {slot} is still in use (seq {q[base + _SEQ]})"
            )
        off = slot * self._rec + _REC_HEADER
        self._buf[off : off + len(request)] = request
        self._buf[off + len(request) : off + self.slot_size] = bytes(self.slot_size - len(request))
        q[base + _INDEX] = index
        q[base + _STATE] = 0
        seq = self._next_seq
        self._next_seq += 1
        q[base + _SEQ] = seq  # published last: a record with a seq is complete
        return seq

    def mark_executing(self, index: int) -> None:
        """The backend is about to act on this request (the hot path: one word)."""
        i = (index % self.nr_slots) * self._stride + _STATE
        q = self._q
        q[i] = q[i] | _EXECUTING

    def clear_executing(self, index: int) -> None:
        """The backend is done acting on this request (the hot path: one word)."""
        i = (index % self.nr_slots) * self._stride + _STATE
        q = self._q
        q[i] = q[i] & _NOT_EXECUTING

    def record_death(self, index: int) -> int:
        """A backend died acting on this request: clear the flag and count the death, in one
        store.  Returns the deaths now counted."""
        i = self._word(index, _STATE)
        deaths = (self._q[i] >> _DEATH_SHIFT) + 1
        self._q[i] = deaths << _DEATH_SHIFT
        return deaths

    def end(self, index: int) -> None:
        """The request's response is published: free its record."""
        self._q[self._word(index, _SEQ)] = 0

    def reopen(self, first: int, count: int) -> int:
        """Make the records of ring indices ``first .. first+count-1`` pending again, in ring
        order, for a replacement backend to redo: a record answered (ended) since is
        re-begun from the copy it still holds, with its death count kept.  Only records whose
        index word says they are that very request count (a slot whose record holds another
        index was never taken).  ``count`` is at most the number of slots.  Call it only
        while no backend uses the log.  Returns the number of records now pending in that
        range."""
        if not 0 <= count <= self.nr_slots:
            raise ValueError(f"cannot reopen {count} records of a {self.nr_slots}-slot log")
        q = self._q
        seq = max((r.seq for r in self.pending()), default=0)
        found = 0
        for k in range(count):
            index = (first + k) & _MASK
            base = (index % self.nr_slots) * self._stride
            if q[base + _INDEX] != index:
                continue
            seq += 1
            if not q[base + _SEQ]:  # answered: its flag is clear; keep its deaths
                q[base + _STATE] &= _NOT_EXECUTING
            q[base + _SEQ] = seq
            found += 1
        self._next_seq = seq + 1
        return found

    def pending(self) -> list[InflightRecord]:
        """Records begun and not ended, oldest first."""
        out = []
        q = self._q
        for slot in range(self.nr_slots):
            base = slot * self._stride
            seq = q[base + _SEQ]
            if seq:
                off = slot * self._rec + _REC_HEADER
                state = q[base + _STATE]
                out.append(
                    InflightRecord(
                        seq,
                        q[base + _INDEX],
                        bytes(self._buf[off : off + self.slot_size]),
                        bool(state & _EXECUTING),
                        state >> _DEATH_SHIFT,
                    )
                )
        return sorted(out, key=lambda r: r.seq)
