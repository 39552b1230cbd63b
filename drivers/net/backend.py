"""The net backend: a learning switch between the vifs of guests, with an optional TAP uplink.

One driver process serves any number of vifs (one per ``attach`` key) of any number of guests.
Each vif is a shared-memory segment laid out as ``ipc.netif`` says: a tx ring (the guest's
frames), an rx ring (empty buffers the guest posts, filled here), their buffer areas, and,
beyond the guest's window, the tx ring's in-flight log and the *delivery log*.  Vifs join
bridges (``drivers.net.switch``); frames never cross bridges; the uplink (``drivers.net.tap``)
is one more port of its bridge.

Forwarding a tx request at ring index ``i`` of source vif S (``_forward``)::

    InflightLog.begin(i); mark it executing
    decode it (junk: tx response STATUS_ERROR, counted bad_frames)
    copy the frame out of S's tx buffer (the guest may rewrite it meanwhile)
    source MAC != S's MAC (or multicast): dropped, counted spoofed, tx response OKAY
    learn the source, pick the ports (switch.Bridge.forward)
    for each guest destination D: take one posted rx buffer; note the rx index k of its
        response (junk rx requests are answered STATUS_ERROR and skipped, counted bad_frames);
        no buffer, or frames already waiting for D: the entry is PENDING
    write the delivery record (tag i+1 last) -- before any destination's rx ring is pushed
    copy the frame into each reserved buffer, put the rx responses
    write the frame to the TAP if the uplink is a destination (at most once)
    tx response OKAY -- or, if some destination is PENDING, the request is *held*
    ... at the end of the batch: push every rx ring, then the tx rings (each notification only
    if the guest asked for it), then InflightLog.end

A held request stays in flight (S takes no more tx requests, which is the backpressure) and
waits in each PENDING destination's queue; when D posts buffers (its kick) the frame is put
there, the record's entry is set to the rx index (one word), and once no destination is left
the tx response goes out.  After ``rx_wait_ms`` a destination that still has no buffer is given
up (counted rx_full_drops on it).  Frames from the uplink wait in the same queues (at most
RX_QUEUE_FRAMES per vif), but nothing is held for them.

Exactly once (docs/net.md, "Recovery"): a replacement resumes every vif: the rx ring from its
published ``rsp_prod`` (unpublished work is redone), the tx ring from the in-flight log (records
from ``rsp_prod`` on, in ring order; poison after ``poison_after`` deaths).  Redoing request i
with a delivery record tagged i+1, a destination whose entry is not PENDING has the frame
already; a PENDING one gets it; the uplink counts as sent.  Whether an entry written by the dead
instance was delivered is decided once, when the replacement first maps both the source and the
destination, by comparing its rx index with the destination's published rx ``rsp_prod`` at that
moment (before this instance pushed anything there); entries not delivered are made PENDING in
the shared record then, so the answer never depends on what this instance pushes afterwards.

Guests are untrusted: a bad index in either ring is a ``fault`` for that vif (the kernel crashes
that guest) and the vif is not served any more; nothing a guest writes stops the switch.

The frame hook (docs/sdk.md, "A network backend"): a subclass that overrides
:meth:`NetBackend.filter_frame` sees every frame at the ingress of its port, after the source
check and before the switch learns from it: it returns the frame to switch (the same, or
rewritten) or None to drop it.  The path is chosen once, when the backend is built: only a
subclass that overrides the hook has ``_forward_filtering`` in front of ``_forward`` (and
``_uplink_frame_filtered`` in front of ``_uplink_frame``); ``drivers.net`` itself pays nothing.
A rewritten frame is checked again as the guest's own would be (size, source), so a hook cannot
make a guest spoof; one that fails is dropped and counted (``filter_invalid``).  The hook runs
with the request flagged executing: what it raises is a bug that ends the process (fail-stop),
the replacement redoes the request and calls the hook again on the frame read again from guest
memory, and ``poison_after`` deaths answer it with an error.  On a redo with a delivery record
the destinations are those of the record, so the hook must decide the same for the same frame
(or keep its decisions in the state); a frame it drops on a redo is answered OKAY, like one it
dropped the first time.

Fault injection (drivers/faults.py, docs/campaigns.md): the request a fault fires on is a tx
request being switched (``op`` = "tx"; ``sector`` = a byte offset of the vif's region the frame
covers).  While a fault is armed, ``forward`` is ``_forward_injecting``, which asks the injector
about each tx request and carries out what fires (``_carry_out``): a crash with the request
flagged executing (so ``poison`` ends as a poison answer), a delay, a leak, a tx response never
given (``drop``, ``bad_index``: the vif's tx ring is no longer served), a spoiled tx response
(``bad_id``, ``bad_status``, ``duplicate``), or one flipped byte in the frame every destination
gets (``corrupt_data``).  ``bad_op`` is refused: tx responses carry no operation.

The vif's side of what every backend shares is drivers/backendbase.py's: a vif is a
:class:`Vif` (a :class:`~drivers.backendbase.BaseDevice`); the base checks the options and the
attach message, maps the segment (:meth:`NetBackend.check_region`: the vif geometry), runs the
frontend-state machine and calls :meth:`NetBackend.connect` (both rings, the in-flight and
delivery logs), :meth:`NetBackend.service` (a kick) and :meth:`NetBackend.disconnect` (the vif
stops being a port).  The uplink is :mod:`drivers.net.uplink`, the MAC tables
:mod:`drivers.net.switch`, what a hot swap carries :mod:`drivers.net.persist`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol

from devices import vif as vifclass
from drivers.backendbase import Attach, BackendBase, BaseDevice, Lifecycle
from drivers.backendkit import int_option, msg_field
from drivers.faults import Fault, RequestInfo
from drivers.net import persist
from drivers.net.switch import (
    MAX_PORTS,
    UPLINK,
    Bridge,
    BridgeFull,
    announcement,
    is_multicast,
    source_problem,
)
from drivers.net.uplink import DEFAULT_HOST_ADDR, Uplink, check_bridge
from drivers.state import BackendState
from ipc import netif
from ipc.netif import FrameError
from ipc.ring import BackRing, InflightLog, InflightRecord, RingError, inflight_bytes
from ipc.shm import Segment

_MASK: Final = (1 << 64) - 1
_HALF: Final = 1 << 63
#: A delivery-record entry's rx index while the frame has not been put in that destination's
#: ring (no buffer yet, or the entry was found undelivered after a crash).
PENDING: Final = _MASK
_SLOTS: Final = netif.RING_SLOTS
_SLOT: Final = netif.SLOT_SIZE
_INFLIGHT_BYTES: Final = inflight_bytes(_SLOTS, _SLOT)
_REC_WORDS: Final = netif.DELIVERY_RECORD // 8
_RX_RSP_PROD: Final = netif.RX_RING_OFFSET + 16
#: Frames from the uplink that may wait for one vif's rx buffers before more are dropped.
RX_QUEUE_FRAMES: Final = 256
#: tx requests one kick may serve before the vif goes to the back of the queue.
_TURN_FRAMES: Final = 256
#: tx requests taken before the responses and rx rings are published.
_MAX_BATCH: Final = 64
_pack_tx_rsp = netif.encode_tx_response
_pack_rx_rsp = netif.encode_rx_response
_OKAY: Final = netif.STATUS_OKAY
_ERROR: Final = netif.STATUS_ERROR
#: The states in which a vif is a port of its bridge (or about to be one again).
_PORT: Final = (Lifecycle.CONNECTED, Lifecycle.WAITING)

OPTIONS: dict[str, str] = {
    "uplink": '"none" (default): guests reach only each other; "tap": a TAP uplink in a '
    "network namespace joins the bridge named by `bridge` (needs root)",
    "tap": 'the TAP interface name (uplink = "tap"; default "iv" + the driver name; at most '
    "15 characters)",
    "netns": 'the network namespace of the TAP, a name under /run/netns (uplink = "tap"; '
    'default "isovisor-" + the driver name; created if missing)',
    "host_addr": f'the TAP\'s address in the namespace (uplink = "tap"; default '
    f"{DEFAULT_HOST_ADDR}; inside 198.18.0.0/15 or 169.254.0.0/16)",
    "bridge": 'the bridge the uplink joins (uplink = "tap"; default "br0")',
    "rx_wait_ms": "how long a frame waits for a destination guest to post rx buffers before "
    "it is dropped for that guest (0..60000, default 500; 0 = drop at once)",
    "poison_after": "a tx request that this many driver instances in a row died executing is "
    "answered with an error instead of being redone (1..100, default 3)",
    "mac_age_s": "seconds a learned MAC address is remembered after it was last seen as a "
    "source (1..86400, default 300)",
}
_UPLINK_ONLY: Final = ("tap", "netns", "host_addr", "bridge")


@dataclass
class VifStats:
    """Per-vif counters (``statistics()``; docs/net.md, "Counters")."""

    tx_frames: int = 0
    rx_frames: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    bad_frames: int = 0
    spoofed: int = 0
    rx_full_drops: int = 0
    flooded: int = 0
    uplink_tx: int = 0
    uplink_rx: int = 0
    announced: int = 0


COUNTERS: Final = tuple(f.name for f in dataclasses.fields(VifStats))


def delivered(rsp_prod: int, index: int) -> bool:
    """Is the response at rx ring ``index`` published when the ring's ``rsp_prod`` is this?"""
    return ((rsp_prod - index - 1) & _MASK) < _HALF


class DeliveryLog:
    """The delivery log of one vif's tx ring (``netif.DELIVERY_OFFSET``): one record per tx
    slot, ``DELIVERY_RECORD`` bytes of u64 words: tag (the tx request's ring index + 1; 0 =
    none), count, then ``count`` pairs (destination key, rx index; key 0 = the uplink).  A
    record is written tag-last after zeroing the tag, so a torn record has no valid tag; an
    entry's rx index changes later by one whole-word store (PENDING -> the index)."""

    def __init__(self, buf: memoryview) -> None:
        self.words = buf[: _SLOTS * netif.DELIVERY_RECORD].cast("Q")

    @staticmethod
    def _base(index: int) -> int:
        return (index % _SLOTS) * _REC_WORDS

    def find(self, index: int) -> list[list[int]] | None:
        """The entries ``[key, rx index]`` of the record for tx index ``index``, or None if
        there is none (never written, torn, or another request's)."""
        w, b = self.words, self._base(index)
        if w[b] != (index + 1) & _MASK:
            return None
        n = w[b + 1]
        if n > netif.MAX_DESTINATIONS:
            return None
        return [[w[b + 2 + 2 * j], w[b + 3 + 2 * j]] for j in range(n)]

    def write(self, index: int, entries: list[list[int]]) -> None:
        if len(entries) > netif.MAX_DESTINATIONS:
            raise ValueError(f"{len(entries)} destinations do not fit a delivery record")
        w, b = self.words, self._base(index)
        w[b] = 0
        w[b + 1] = len(entries)
        for j, (key, k) in enumerate(entries):
            w[b + 2 + 2 * j] = key
            w[b + 3 + 2 * j] = k
        w[b] = (index + 1) & _MASK  # last: a record with this tag is complete

    def set_index(self, index: int, j: int, rx_index: int) -> None:
        """Entry ``j`` of the record for ``index`` now has ``rx_index`` (one word)."""
        self.words[self._base(index) + 3 + 2 * j] = rx_index

    def forget(self, index: int) -> None:
        """The record for tx ``index`` (if it is that one's) no longer exists: a redo of
        the request sends it as new."""
        b = self._base(index)
        if self.words[b] == (index + 1) & _MASK:
            self.words[b] = 0

    def clear(self) -> None:
        for slot in range(_SLOTS):
            self.words[slot * _REC_WORDS] = 0

    def resolve(self, indices: Iterable[int], bases: dict[int, int]) -> int:
        """For the records of tx ``indices``: an entry naming a key of ``bases`` (key ->
        that destination's published rx rsp_prod, read before this instance pushed anything
        there) whose rx index is not published is made PENDING.  Returns how many were."""
        n = 0
        for index in indices:
            entries = self.find(index)
            if entries is None:
                continue
            for j, (key, k) in enumerate(entries):
                base = bases.get(key)
                if key != UPLINK and base is not None and k != PENDING and not delivered(base, k):
                    self.set_index(index, j, PENDING)
                    n += 1
        return n

    def release(self) -> None:
        self.words.release()


@dataclass(eq=False)
class _Held:
    """A tx request in flight until its PENDING destinations have the frame (or gave up)."""

    source: Vif
    index: int
    id: int
    frame: bytes
    #: destination key -> its entry in the delivery record
    waiting: dict[int, int]
    deadline: float


@dataclass(eq=False)
class _Queued:
    """A frame from the uplink waiting for a vif's rx buffers."""

    frame: bytes
    deadline: float


@dataclass(eq=False)
class Vif(BaseDevice):
    """A vif: the base's device (its attach message, segment and :class:`Lifecycle` state)
    with its rings, logs and the frames that wait for it."""

    stats: VifStats = field(default_factory=VifStats)
    #: Its MAC address and bridge, and the guest's IPv4 address (vif ip=), for the host's
    #: neighbour entry through the uplink (set by ``open_device``).
    mac: bytes = field(init=False)
    bridge: str = field(init=False)
    ip: str | None = None
    dlog: DeliveryLog = field(init=False)
    #: tx indices pending in the in-flight log when this instance attached the vif
    live: frozenset[int] = frozenset()
    #: its rings had been used when this instance attached it (it is resuming after a restart)
    was_used: bool = False
    tx: BackRing | None = None
    rx: BackRing | None = None
    inflight: InflightLog | None = None
    #: frames for this vif waiting for rx buffers, oldest first
    queue: deque[_Held | _Queued] = field(default_factory=deque)
    queued_frames: int = 0  # _Queued items in queue
    #: this vif's own tx request that waits for destinations (it takes no more meanwhile)
    held: _Held | None = None
    #: in-flight records a resumed vif still has to redo, in ring order
    backlog: deque[InflightRecord] = field(default_factory=deque)
    redo_left: set[int] = field(default_factory=set)
    #: after a resume: rx slots before this index may hold the dead instance's unpublished
    #: responses instead of the guest's requests (see _reread)
    rx_reread_end: int | None = None
    recovering: bool = False
    replayed: int = 0
    redo_done_ns: int = 0
    notifications: int = 0
    bad_logged: int = 0
    spoof_logged: int = 0


class _Forward(Protocol):
    """Switches the tx request at ``index`` of vif ``s``: True if it is answered, False if it
    is held (``NetBackend._forward``)."""

    def __call__(self, s: Vif, index: int, raw: bytes, b: _Batch, *, redo: bool) -> bool: ...


@dataclass(eq=False)
class _Spoil:
    """A response fault due for a vif's next tx response (``bad_id``, ``bad_status``), or, for
    ``duplicate``, the next two: the first is copied over the second."""

    kind: str
    copy: bytes | None = None


#: In-driver faults that end or stall the instance while it executes the request.
_DYING: Final = frozenset({"segv", "abort", "exit", "hang", "exception", "poison"})
#: Ethernet header bytes: ``corrupt_data`` flips the first byte after them.
_ETH_HEADER: Final = 14
#: Fault types that apply only to a frame another guest will receive.
_NEEDS_A_RECEIVER: Final = ("corrupt_data",)


def spoil_tx_response(kind: str, rsp: bytes) -> bytes:
    """The tx response ``rsp`` made bad the way ``kind`` (bad_id, bad_status) says."""
    rid, status, r1, r2 = netif.TX_RESPONSE.unpack_from(rsp)
    if kind == "bad_id":
        rid ^= 0x5EED << 40  # another sequence number: a stale or duplicate id
    elif kind == "bad_status":
        status = 7
    else:
        raise ValueError(f"cannot spoil a tx response with {kind!r}")
    return netif.TX_RESPONSE.pack(rid, status, r1, r2)


class _Batch:
    """What one handler changed: rings to publish, records to retire, vifs to look at again."""

    def __init__(self) -> None:
        self.rx: dict[int, Vif] = {}
        self.tx: dict[int, Vif] = {}
        self.ended: list[tuple[Vif, int]] = []
        self.unblocked: dict[int, Vif] = {}
        self.starved: dict[int, Vif] = {}


def _hook_name(cls: type) -> str:
    """``Class.filter_frame (file:line)``: the frame hook ``cls`` defines, for log lines."""
    fn = cls.filter_frame  # type: ignore[attr-defined]
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"{getattr(fn, '__qualname__', 'filter_frame')}{where}"


def describe_tx(raw: bytes) -> tuple[int, str]:
    """(id, a one-line description) of a tx request as the in-flight log holds it."""
    try:
        rid, off, size = netif.decode_tx(raw)
    except FrameError as e:
        return e.id, f"undecodable tx request id={e.id:#x} ({e})"
    return rid, f"tx frame id={rid:#x} offset={off:#x} size={size}"


class NetBackend(BackendBase[Vif]):
    """The switch (see the module docstring).  ``drivers.host`` builds it with ``(host,
    options)``; :data:`OPTIONS` lists the options."""

    device_class = vifclass.CLASS
    device_type = Vif
    stats_type = VifStats
    OPTIONS: ClassVar[dict[str, str]] = OPTIONS
    state_kind: ClassVar[str] = "isovisor.net"
    state_version: ClassVar[int] = 1
    STATISTICS: ClassVar[tuple[str, ...]] = COUNTERS
    DEVICE_STATISTICS: ClassVar[tuple[str, ...]] = COUNTERS

    def configure(self, options: dict[str, Any]) -> None:
        self.name = self.host.name
        self.uplink = Uplink(self.host.name, options, self.log, lambda: self.clock())
        self.rx_wait_s = int_option(options, "rx_wait_ms", 500, 0, 60_000) / 1000
        self.poison_after = int_option(options, "poison_after", 3, 1, 100)
        self.mac_age_s = float(int_option(options, "mac_age_s", 300, 1, 86_400))
        self.uplink.check_privilege()
        #: Seconds on a monotonic clock (tests replace it to make time pass).
        self.clock: Callable[[], float] = time.monotonic
        self.bridges: dict[str, Bridge] = {}
        #: (bridge, MAC) -> the vif that owns it
        self._owners: dict[tuple[str, bytes], int] = {}
        #: key -> the vif's published rx rsp_prod when this instance first mapped it
        self._base: dict[int, int] = {}
        #: (source, destination) pairs whose old delivery records were resolved
        self._resolved: set[tuple[int, int]] = set()
        #: Response faults due (the injector is the base's).
        self._spoil: dict[int, _Spoil] = {}
        #: Does this class override :meth:`filter_frame`?  Decided once: a switch without a
        #: hook never calls one, nor tests for one per frame.
        self.filtering = type(self).filter_frame is not NetBackend.filter_frame
        #: Frames the hook dropped, and rewritten frames refused (``statistics()`` reports
        #: both only when ``filtering``).  They count since this instance started.
        self.filtered = 0
        self.filter_invalid = 0
        self._hook = _hook_name(type(self)) if self.filtering else ""
        #: Switches one tx request without fault injection: ``_forward``, or
        #: ``_forward_filtering`` (the hook first) for a class that overrides the hook.
        self._switch: _Forward = self._forward_filtering if self.filtering else self._forward
        #: Switches one tx request: ``_switch``, or ``_forward_injecting`` while a fault is
        #: armed or due (so an unarmed switch pays nothing for the feature).
        self.forward: _Forward = self._switch

    # -- the frame hook (docs/sdk.md, "A network backend") -------------------------------
    def filter_frame(self, src: Vif | None, frame: bytes) -> bytes | None:
        """Override to filter or rewrite frames: return the frame to switch (``frame`` itself,
        or new bytes), or None to drop it.  The default is never called.

        ``src`` is the vif the frame came from (``src.label``, ``src.mac``, ``src.bridge``),
        or None for a frame from the TAP uplink.  The hook sees each frame at the ingress of
        its port, before the switch learns its source and picks its destinations (from the
        frame it returns), and after the checks: a guest's frame has the guest's source MAC,
        an uplink frame none of a guest's; a well-formed frame of 14..1514 bytes.  A returned
        frame is checked the same way: one of another size or (from a guest) with another
        source is dropped, logged as an error naming this hook and counted
        (``filter_invalid``).

        * A drop is silent, as on a wire: the guest's tx request is answered OKAY.  Frames
          dropped are counted (``filtered``).
        * The hook is called again when a frame is redone: after the driver process died (a
          crash, a kill, a hang) or in a hot swap, the next instance redoes the requests in
          flight, with the frame read again from the guest's memory, and destinations that
          had the frame already do not get it twice.  So decide the same for the same frame
          (keep any decision that depends on history in the state you carry), and count in
          your own statistics knowing that a redone frame is seen twice.  In a swap the next
          implementation redoes them with its own hook, or none (``drivers.net``).
        * An exception is a bug: the driver process exits with status 70 with the request
          still in flight, the replacement redoes it (calling the hook again), and after
          ``poison_after`` (3) instances died on it the request is answered with an error.
          Frames from the uplink are not redone: the TAP is a lossy port.
        * It runs on the driver's only loop, for every frame: keep it quick, never block.

        State: ``backend_data()`` / ``restore_backend_data(data)`` carry the subclass's own
        data across a hot swap (the net state's ``data.backend``); a crash starts afresh.
        """
        return frame

    # -- the host loop's hooks -------------------------------------------------------------------
    def fds(self) -> list[int]:
        """Descriptors the host loop polls for reading beside the kernel's messages."""
        return self.uplink.fds()

    def readable(self, fd: int) -> None:
        """``fd`` (one of :meth:`fds`) can be read: switch what the TAP has."""
        if fd in self.uplink.fds():
            self._from_tap()

    def timer_ms(self) -> int | None:
        """Milliseconds until :meth:`timer` has something to do (a frame's wait ends, or the
        TAP is to be tried again); None if nothing is due."""
        due = [v.queue[0].deadline for v in self.devices.values() if v.queue]
        if self._tap_wanted():
            due.append(self.uplink.retry_at)
        if not due:
            return None
        return max(0, math.ceil((min(due) - self.clock()) * 1000 - 1e-6))

    def timer(self) -> None:
        """Drop frames whose wait is over; retry the TAP.  Cheap when nothing is due."""
        b = _Batch()
        self._expire(b)
        self._settle(b)
        self._retry_tap()

    # -- the base's hooks: attaching -------------------------------------------------------------
    def wrong_class(self, cls: str) -> str:
        return f"attach class {cls!r}: this driver serves network interfaces (class 'vif')"

    def check_region(self, a: Attach, segment: Segment) -> str | None:
        if a.window != netif.WINDOW_BYTES:
            return f"window {a.window:#x} is not a vif region's {netif.WINDOW_BYTES:#x} bytes"
        if a.inflight_offset != netif.INFLIGHT_OFFSET:
            return (
                f"in-flight log offset {a.inflight_offset:#x} is not a vif "
                f"region's {netif.INFLIGHT_OFFSET:#x}"
            )
        if segment.size < netif.SEGMENT_END:
            return (
                f"segment {a.segment} has {segment.size:#x} bytes; a vif "
                f"region needs {netif.SEGMENT_END:#x}"
            )
        return None

    def open_device(self, v: Vif) -> None:
        """The vif's own checks (key, MAC, bridge, ip; a MAC used on the bridge already; a
        full bridge), then its logs looked at: what a predecessor left in flight."""
        a = v.attach
        if a.key == UPLINK or a.key < 0:
            raise ValueError(f"device key {a.key} is not allowed (0 names the uplink)")
        spec = msg_field(a.body, "vif", dict)
        mac = netif.parse_mac(msg_field(spec, "mac", str, "attach vif"))
        bridge = check_bridge(spec.get("bridge", "br0"), "vif bridge")
        ip = spec.get("ip")
        if ip is not None and (not isinstance(ip, str) or ipaddress.ip_address(ip).version != 4):
            raise ValueError(f"attach vif ip {ip!r} is not an IPv4 address")
        owner = self._owners.get((bridge, mac))
        if owner is not None:
            raise ValueError(
                f"MAC {netif.format_mac(mac)} is used on bridge {bridge} "
                f"by {self.devices[owner].label} already"
            )
        on_bridge = sum(1 for d in self.devices.values() if d.bridge == bridge)
        uplink_too = self.uplink.mode == "tap" and bridge == self.uplink.bridge
        if on_bridge + uplink_too >= MAX_PORTS:
            raise ValueError(
                f"bridge {bridge} is full: {on_bridge} vifs"
                f"{' and the uplink' if uplink_too else ''} already, and "
                f"a frame flooded on a bridge reaches at most "
                f"{netif.MAX_DESTINATIONS} other ports; put this vif on "
                "another bridge"
            )
        try:
            self.host.store_write(f"{a.store}/mac", netif.format_mac(mac))
        except ValueError as e:
            raise ValueError(f"cannot publish the vif parameters: {e}") from None
        v.mac, v.bridge, v.ip = mac, bridge, ip
        mem = v.mem
        if a.key not in self._base:
            self._base[a.key] = int.from_bytes(mem[_RX_RSP_PROD : _RX_RSP_PROD + 8], "little")
        log = InflightLog(
            mem[netif.INFLIGHT_OFFSET : netif.INFLIGHT_OFFSET + _INFLIGHT_BYTES], _SLOTS, _SLOT
        )
        v.live = frozenset(r.index for r in log.pending())
        del log
        v.was_used = any(
            mem[o : o + 8] != bytes(8) for o in (netif.TX_RING_OFFSET, netif.RX_RING_OFFSET)
        )
        v.dlog = DeliveryLog(mem[netif.DELIVERY_OFFSET : netif.SEGMENT_END])
        self._owners[(bridge, mac)] = a.key
        self._resolve(v)
        self.log.info(
            "vif %d (%s): mac %s on bridge %s", a.key, a.label, netif.format_mac(mac), bridge
        )

    def attached(self, v: Vif) -> None:
        if self._tap_wanted():
            self._open_tap()
        self._sync_neighbors()

    def close_device(self, v: Vif, *, handover: bool) -> None:
        """Unmap what the vif's logs were read through (no ring is touched); the vif leaves
        the tables.  Detached for good: its neighbour entry goes too."""
        self._forget(v)
        v.tx = v.rx = None
        v.inflight = None
        v.queue.clear()
        v.held = None
        v.dlog.release()
        if not handover:
            self._sync_neighbors()

    def summary(self, v: Vif) -> str:
        s = v.stats
        return (
            f"{s.tx_frames} frames sent, {s.rx_frames} received, {s.bad_frames} bad, "
            f"{s.spoofed} spoofed, {s.rx_full_drops} dropped for a full rx ring"
        )

    # -- the base's hooks: serving ---------------------------------------------------------------
    def connect(self, v: Vif, *, resume: bool) -> None:
        b = _Batch()
        if v.state is Lifecycle.CONNECTED:  # the frontend set its rings up again
            self._leave(v, b)
            v.state = Lifecycle.WAITING
        try:
            tx = BackRing(v.mem[: netif.RING_BYTES], _SLOTS, _SLOT)
            rx = BackRing(
                v.mem[netif.RX_RING_OFFSET : netif.RX_RING_OFFSET + netif.RING_BYTES], _SLOTS, _SLOT
            )
            log = InflightLog(
                v.mem[netif.INFLIGHT_OFFSET : netif.INFLIGHT_OFFSET + _INFLIGHT_BYTES],
                _SLOTS,
                _SLOT,
            )
        except (ValueError, RingError) as e:
            self._fault(v, f"cannot attach the rings: {e}", b)
            self._settle(b)
            return
        if resume:
            redo = self._recover(v, tx, log)
        else:
            for rec in log.pending():  # a freshly initialised ring has nothing in flight
                log.end(rec.index)
            v.dlog.clear()
            v.rx_reread_end = None
            redo = []
        v.tx, v.rx, v.inflight = tx, rx, log
        try:
            self._bridge(v.bridge).add_port(v.key)
        except BridgeFull as e:  # attach counted the room; cannot happen
            self._fault(v, str(e), b)
            self._settle(b)
            return
        self.connected(
            v, resume=resume, detail=f", redoing {len(redo)} unfinished tx requests" if redo else ""
        )
        if resume:
            v.rx_reread_end = int.from_bytes(
                v.mem[netif.RX_RING_OFFSET : netif.RX_RING_OFFSET + 8], "little"
            )
            v.backlog = deque(redo)
            v.redo_left = {r.index for r in redo}
            v.replayed = 0
            v.redo_done_ns = time.monotonic_ns()
            v.recovering = True
        if resume and v.attach.body.get("announce") is True and not v.stats.announced:
            self._announce(v, b)
        self._drain_queue(v, b)  # frames a redo of another vif left waiting for this one
        self._serve_tx(v, b)
        self._settle(b)

    def _announce(self, v: Vif, b: _Batch) -> None:
        """``v`` moved here (a restore or a live migration: the kernel's attach says
        ``announce``): tell the network where its MAC is now, as Clark et al.'s guests and
        QEMU's announce-self do.  One gratuitous ARP for its ``ip`` (a RARP without one), from
        its port as if the guest sent it: learned, flooded to the other vifs that have an rx
        buffer free and to the uplink, so a switch beyond the TAP learns it at once."""
        frame = announcement(v.mac, v.ip)
        bridge = self.bridges[v.bridge]
        now = self.clock()
        bridge.table.learn(v.mac, v.key, now)
        for p in bridge.forward(v.key, frame, now).ports:
            if p == UPLINK:
                self._to_uplink(v, frame)
            elif (free := self._free_buffer(p, b)) is not None:
                self._put_frame(free[0], free[1], frame, b)
        v.stats.announced += 1
        self.log.info(
            "vif %d (%s): moved here; announced %s%s",
            v.key,
            v.label,
            netif.format_mac(v.mac),
            f" at {v.ip}" if v.ip else "",
        )

    def drain(self, v: Vif, *, detaching: bool) -> None:
        """Detached while connected (the domain is destroyed, or its devices move with a save
        or a migration): ``v``'s tx requests under way are settled so that the in-flight log
        a next driver (in any stack) finds names no destination of this one.  A request that
        reached some destination is answered (the ones still waiting miss the frame, counted
        rx_full_drops, as when ``rx_wait_ms`` runs out); one that reached none loses its
        delivery record, so the next driver sends it as new: each frame goes out once."""
        if not detaching or v.tx is None:
            return
        b = _Batch()
        pending: list[tuple[int, int]] = []  # (tx index, request id), in ring order
        h, v.held = v.held, None
        if h is not None:
            pending.append((h.index, h.id))
            for key in h.waiting:
                d = self.devices.get(key)
                if d is not None and h in d.queue:
                    d.queue.remove(h)
        pending += [(r.index, describe_tx(r.request)[0]) for r in v.backlog]
        v.backlog.clear()
        v.redo_left.clear()
        v.recovering = False
        sent_on = True  # (answers stay in ring order: none after one left to the next driver)
        for index, rid in pending:
            entries = v.dlog.find(index)
            if entries is None:
                sent_on = False  # never went out: a new request to the next driver
            elif sent_on and any(key == UPLINK or k != PENDING for key, k in entries):
                for key, k in entries:
                    d = self.devices.get(key)
                    if key != UPLINK and k == PENDING and d is not None:
                        d.stats.rx_full_drops += 1
                self._answer(v, index, rid, _OKAY, b)
            else:
                sent_on = False
                v.dlog.forget(index)
        self._flush(b)

    def service(self, v: Vif) -> None:
        """The guest notified: it may have queued frames, posted rx buffers, or both."""
        b = _Batch()
        self._expire(b)
        self._drain_queue(v, b)
        self._serve_tx(v, b)
        self._settle(b)
        self._retry_tap()

    def disconnect(self, v: Vif) -> None:
        """The vif closed, broke or is detached: frames waiting for it are given up (their
        senders get their tx responses)."""
        b = _Batch()
        self._leave(v, b)
        self._settle(b)

    def hand_over(self, v: Vif) -> None:
        """Let go of the rings without touching them: what is in flight (a request held for
        a destination's buffers included) stays in the in-flight log for the next instance."""
        self._drop(v)
        v.tx = v.rx = None
        v.inflight = None

    def faults_changed(self) -> None:
        self._choose_forward()

    # -- the driver stops ------------------------------------------------------------------------
    def close(self) -> None:
        """The driver stops: let go of every vif without touching a ring (frames in flight stay
        in the in-flight logs for the next instance) and close the TAP, which stays (with its
        namespace) for that instance; :meth:`cleanup` removes them."""
        for key in list(self.devices):
            self._close(self.devices.pop(key), handover=True)
        self.uplink.close()

    def cleanup(self) -> list[str]:
        """:meth:`close`, then delete the TAP, and the namespace if this instance created it;
        what was removed.  For a driver that goes away for good."""
        self.close()
        return self.uplink.cleanup()

    # -- hot swap (drivers/net/persist.py) -------------------------------------------------------
    def device_data(self, v: Vif) -> dict[str, Any]:
        return persist.vif_data(netif.format_mac(v.mac), v.bridge)

    def save(self) -> BackendState:
        """The MAC tables, the counters and a subclass's :meth:`backend_data` (the vifs
        themselves are attached again by the kernel, and the rings carry everything in
        flight)."""
        return persist.to_state(super().save(), self.bridges, self.clock())

    def suspend(self) -> None:
        """Let go of every vif and the TAP for the next implementation; nothing is half-done
        between two messages (every handler publishes what it did), and a request held for a
        destination's buffers stays in the in-flight log, redone by the next one."""
        self.close()
        self.bridges.clear()
        self._owners.clear()
        self.log.info("suspended: every vif and the TAP released for the next implementation")

    def restore(self, state: BackendState) -> None:
        """Take over the MAC tables and counters of ``state`` (StateError if it cannot), and
        give a subclass's :meth:`restore_backend_data` what its predecessor's
        :meth:`backend_data` saved (``{}`` from one that saved nothing, as ``drivers.net``);
        the counters of a vif are applied when the kernel attaches it again."""
        state = self.accepted(state)
        learned, bridges, vifs = persist.from_state(state, COUNTERS, self._bridge, self.clock())
        self.restore_backend_data(persist.backend_data_of(state))
        self._restored.update(vifs)
        self.log.info(
            "restored %d MAC table entries on %d bridge(s) and the counters of %d "
            "vif(s) from the state of %s (version %d)",
            learned,
            bridges,
            len(vifs),
            state.implementation,
            state.version,
        )

    # -- statistics ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, int | float | str]:
        """Totals first (with a frame hook: ``filtered`` and ``filter_invalid`` after
        ``notifications``), then the uplink's counters, then each vif's
        (``domain/vdev.name``); the host passes on the first 64."""
        vifs = list(self.devices.values())
        out: dict[str, int | float | str] = {
            "vifs": len(vifs),
            "bridges": len(self.bridges),
            "mac_entries": sum(len(b.table) for b in self.bridges.values()),
        }
        for c in self.STATISTICS:
            out[c] = sum(getattr(v.stats, c) for v in vifs)
        out["notifications"] = sum(v.notifications for v in vifs)
        if self.filtering:
            out["filtered"] = self.filtered
            out["filter_invalid"] = self.filter_invalid
        out.update(self.uplink.statistics())
        for v in vifs:
            for c in self.DEVICE_STATISTICS:
                out[f"{v.label}.{c}"] = getattr(v.stats, c)
        return out

    def stats(self) -> dict[int, VifStats]:
        return {k: v.stats for k, v in self.devices.items()}

    # -- attaching -------------------------------------------------------------------------------
    def _bridge(self, name: str) -> Bridge:
        br = self.bridges.get(name)
        if br is None:
            br = self.bridges[name] = Bridge(name, self.mac_age_s)
        return br

    def _resolve(self, new: Vif) -> None:
        """Decide, for every pair of vifs mapped now that was not decided yet, which entries
        of the source's old delivery records were delivered (see DeliveryLog.resolve).  Runs
        when a vif is mapped (``new``), so before this instance can push anything into its rx
        ring."""
        vifs = [*self.devices.values(), new]
        for s in vifs:
            todo = {
                d.key: self._base[d.key]
                for d in vifs
                if d is not s and (s.key, d.key) not in self._resolved
            }
            if not todo:
                continue
            self._resolved.update((s.key, k) for k in todo)
            if s.live:
                n = s.dlog.resolve(s.live, todo)
                if n:
                    self.log.info(
                        "vif %d (%s): %d destination(s) of unfinished frames had not got them yet",
                        s.key,
                        s.label,
                        n,
                    )

    def _recover(self, v: Vif, ring: BackRing, log: InflightLog) -> list[InflightRecord]:
        """The records of tx requests begun and not answered: the contiguous run from the
        published rsp_prod (others are cleared), in ring order, with a death counted for the
        one found executing; ``ring.req_cons`` moves past the run."""
        start = ring.rsp_prod_pvt
        by_index = {rec.index: rec for rec in log.pending()}
        run: list[InflightRecord] = []
        while len(run) < ring.nr_slots and ((start + len(run)) & _MASK) in by_index:
            run.append(by_index.pop((start + len(run)) & _MASK))
        for index in by_index:
            log.end(index)
        ring.req_cons = (start + len(run)) & _MASK
        out = []
        for rec in run:
            if rec.executing:
                deaths = log.record_death(rec.index)
                self.log.warning(
                    "vif %d (%s): the tx request at ring index %d was executing "
                    "when the previous driver instance died (%d death%s of %d "
                    "allowed)",
                    v.key,
                    v.label,
                    rec.index,
                    deaths,
                    "" if deaths == 1 else "s",
                    self.poison_after,
                )
                rec = dataclasses.replace(rec, executing=False, deaths=deaths)
            out.append(rec)
        return out

    # -- leaving -----------------------------------------------------------------------------------
    def _leave(self, v: Vif, b: _Batch) -> None:
        """``v`` stops being a port: frames waiting for it are given up (a sender whose frame
        waits for nothing else gets its tx response), its own held request is forgotten."""
        br = self.bridges.get(v.bridge)
        if br is not None:
            br.remove_port(v.key)
        queue, v.queue = v.queue, deque()
        v.queued_frames = 0
        for item in queue:
            if isinstance(item, _Held):
                item.waiting.pop(v.key, None)
                if not item.waiting:
                    self._complete(item, b)
        self._drop(v)
        v.tx = v.rx = None
        v.inflight = None

    def _drop(self, v: Vif) -> None:
        """Forget ``v``'s own held request and redo work (they stay in its in-flight log)."""
        h = v.held
        if h is not None:
            for key in h.waiting:
                d = self.devices.get(key)
                if d is not None and h in d.queue:
                    d.queue.remove(h)
            v.held = None
        v.backlog.clear()
        v.redo_left.clear()
        v.recovering = False

    def _forget(self, v: Vif) -> None:
        self.devices.pop(v.key, None)
        if self._owners.get((v.bridge, v.mac)) == v.key:
            del self._owners[(v.bridge, v.mac)]
        br = self.bridges.get(v.bridge)
        if br is not None:
            br.remove_port(v.key)

    def _fault(self, v: Vif, message: str, b: _Batch) -> None:
        """The guest broke a ring of ``v``: fault it and serve it no more."""
        self._leave(v, b)
        v.state = Lifecycle.BROKEN
        self.host.fault(v.key, message)

    # -- the data path ---------------------------------------------------------------------------
    def _serve_tx(self, s: Vif, b: _Batch) -> None:
        """Forward ``s``'s tx requests (first those a resume must redo) until its ring is
        empty, a request is held, or its turn is over."""
        if s.state is not Lifecycle.CONNECTED or s.held is not None:
            return
        tx, log = s.tx, s.inflight
        assert tx is not None and log is not None
        budget = _TURN_FRAMES
        try:
            while s.held is None and s.state is Lifecycle.CONNECTED:
                if s.backlog:
                    self._redo(s, s.backlog.popleft(), b)
                    budget -= 1
                else:
                    n = tx.unconsumed_requests()
                    if not n:
                        self._flush(b)
                        if tx.final_check_for_requests():
                            continue
                        return
                    first = tx.req_cons
                    for j in range(min(n, _MAX_BATCH)):
                        raw = tx.get_request()
                        index = (first + j) & _MASK
                        log.begin(index, raw)
                        budget -= 1
                        if not self.forward(s, index, raw, b, redo=False):
                            break
                self._flush(b)
                if budget <= 0 and s.held is None and s.state is Lifecycle.CONNECTED:
                    self.host.kick_again(s.key)  # let the other vifs have a turn
                    return
        except RingError as e:
            self._fault(s, f"tx ring: {e}", b)

    def _redo(self, s: Vif, rec: InflightRecord, b: _Batch) -> None:
        if rec.deaths >= self.poison_after:
            rid, what = describe_tx(rec.request)
            description = (
                f"{what}: {rec.deaths} driver instances died executing it; "
                "answered with an error instead of being redone"
            )
            self.log.error(
                "vif %d (%s): poison tx request at ring index %d: %s",
                s.key,
                s.label,
                rec.index,
                description,
            )
            s.stats.bad_frames += 1
            self.host.poison(s.key, rec.index, description)
            self._answer(s, rec.index, rid, _ERROR, b)
            return
        s.replayed += 1
        self.forward(s, rec.index, rec.request, b, redo=True)

    def _forward(
        self, s: Vif, index: int, raw: bytes, b: _Batch, *, redo: bool, frame: bytes | None = None
    ) -> bool:
        """Switch the tx request at ``index`` (see the module docstring).  True if it is
        answered, False if it is held for destinations without rx buffers.  ``frame``: what
        the hook made of the guest's frame (``_forward_filtering``); None: the guest's."""
        log = s.inflight
        assert log is not None
        log.mark_executing(index)
        try:
            rid, off, size = netif.decode_tx(raw)
        except FrameError as e:
            self._bad(s, f"tx request refused: {e}", e.id)
            return self._answer(s, index, e.id, _ERROR, b)
        if frame is None:
            frame = bytes(s.region[off : off + size])
        else:
            size = len(frame)
        now = self.clock()
        reserved: dict[int, tuple[int, int, int]] = {}
        entries = s.dlog.find(index) if redo else None
        to_uplink = False
        if entries is None:  # first time (or its record was never completed: nothing went out)
            problem = source_problem(frame, s.mac)
            if problem is not None:
                self._spoofed(s, problem)
                return self._answer(s, index, rid, _OKAY, b)
            bridge = self.bridges[s.bridge]
            bridge.table.learn(frame[6:12], s.key, now)
            fwd = bridge.forward(s.key, frame, now)
            ports = fwd.ports
            if fwd.flooded:
                # After a restart the kernel resumes the vifs one by one, and the new MAC table
                # knows nobody: a vif that served traffic before and is not resumed yet is a
                # port too (the frame waits for it like for a full rx ring).  A vif whose guest
                # never connected is not: frames are not held for a frontend that may never come.
                ports += tuple(
                    k
                    for k, d in self.devices.items()
                    if d.bridge == s.bridge
                    and d.state is Lifecycle.WAITING
                    and d.was_used
                    and k != s.key
                )
            st = s.stats
            st.tx_frames += 1
            st.tx_bytes += size
            st.flooded += fwd.flooded
            entries = []
            for p in ports:
                if p == UPLINK:
                    to_uplink = True
                    entries.append([UPLINK, 0])
                    continue
                d = self.devices.get(p)
                if d is None or d.state not in _PORT:
                    continue
                got = None if d.queue or d.state is Lifecycle.WAITING else self._take_buffer(d, b)
                if d.state not in _PORT:  # its rx ring was broken
                    continue
                if got is not None:
                    reserved[len(entries)] = got
                entries.append([p, PENDING if got is None else got[0]])
            if not entries:
                return self._answer(s, index, rid, _OKAY, b)
            s.dlog.write(index, entries)  # before any destination's rx ring is pushed
        else:  # redo: destinations with an rx index have the frame, the uplink counts as sent
            problem = source_problem(frame, s.mac)  # read from the guest's memory again
            if problem is not None:
                self._spoofed(s, problem)
                return self._answer(s, index, rid, _OKAY, b)
            for j, (key, k) in enumerate(entries):
                if key == UPLINK or k != PENDING:
                    continue
                free = self._free_buffer(key, b)
                if free is not None:
                    s.dlog.set_index(index, j, free[1][0])
                    reserved[j] = free[1]
        waiting: dict[int, int] = {}
        for j, (key, k) in enumerate(entries):
            if key == UPLINK:
                continue
            d = self.devices.get(key)
            if d is None:
                continue
            got = reserved.get(j)
            if got is not None:
                self._put_frame(d, got, frame, b)
            elif k == PENDING and d.state in _PORT:
                waiting[key] = j
        if to_uplink:
            self._to_uplink(s, frame)
        if waiting:
            if self.rx_wait_s <= 0:
                for key in waiting:
                    self.devices[key].stats.rx_full_drops += 1
                return self._answer(s, index, rid, _OKAY, b)
            held = _Held(s, index, rid, frame, waiting, now + self.rx_wait_s)
            for key in waiting:
                d = self.devices[key]
                d.queue.append(held)
                b.starved[key] = d
            s.held = held
            log.clear_executing(index)
            return False
        return self._answer(s, index, rid, _OKAY, b)

    def _forward_filtering(self, s: Vif, index: int, raw: bytes, b: _Batch, *, redo: bool) -> bool:
        """``_forward`` for a class that overrides :meth:`filter_frame`: the guest's frame is
        checked, given to the hook, and what it returns is checked and switched (or the
        request is answered OKAY, dropped).  The request is flagged executing while the hook
        runs, so a hook that raises kills the instance on it: redone, then poison."""
        log = s.inflight
        assert log is not None
        log.mark_executing(index)
        try:
            rid, off, size = netif.decode_tx(raw)
        except FrameError:
            return self._forward(s, index, raw, b, redo=redo)  # refused there
        frame = bytes(s.region[off : off + size])
        problem = source_problem(frame, s.mac)
        if problem is not None:
            self._spoofed(s, problem)
            return self._answer(s, index, rid, _OKAY, b)
        try:
            out = self.filter_frame(s, frame)
        except Exception as e:
            e.add_note(
                f"{self._hook} raised for the frame at tx ring index {index} of vif {s.key} "
                f"({s.label}){', redone' if redo else ''}: a driver process ends here (status "
                "70) with the request in flight; the next instance redoes it, and answers it "
                f"with an error once {self.poison_after} instance(s) died on it"
            )
            raise
        if out is None:
            self.filtered += 1
            return self._answer(s, index, rid, _OKAY, b)
        if out is not frame:
            checked = self._rewritten(s, out, s.bridge)
            if checked is None:
                return self._answer(s, index, rid, _OKAY, b)
            out = checked
        return self._forward(s, index, raw, b, redo=redo, frame=out)

    def _rewritten(self, src: Vif | None, out: object, bridge: str) -> bytes | None:
        """``out``, what :meth:`filter_frame` returned in place of the frame it was given, if
        it may be switched: bytes of a frame's size whose source a guest (``src``) may send,
        or the uplink may (not multicast, not a guest's MAC on ``bridge``).  Else None: the
        frame is dropped, counted (``filter_invalid``) and logged as an error naming the
        hook."""
        problem: str | None
        if not isinstance(out, bytes | bytearray | memoryview):
            problem = f"returned {type(out).__name__}, not bytes or None"
        else:
            out = bytes(out)
            n = len(out)
            if not netif.MIN_FRAME <= n <= netif.MAX_FRAME:
                problem = (
                    f"returned a frame of {n} bytes (a frame has "
                    f"{netif.MIN_FRAME}..{netif.MAX_FRAME})"
                )
            elif src is not None:
                problem = source_problem(out, src.mac)
                problem = None if problem is None else f"rewrote the frame's source: {problem}"
            elif is_multicast(out[6:12]) or (bridge, out[6:12]) in self._owners:
                problem = (
                    f"rewrote the frame's source to {netif.format_mac(out[6:12])}, "
                    "a multicast address or a guest's"
                )
            else:
                problem = None
            if problem is None:
                return out
        self.filter_invalid += 1
        k = self.filter_invalid
        if k <= 20 or k % 1000 == 0:
            self.log.error(
                "frame from %s dropped: %s %s%s",
                "the uplink" if src is None else f"vif {src.key} ({src.label})",
                self._hook,
                problem,
                f" [{k} refused so far]" if k > 20 else "",
            )
        return None

    def _answer(self, s: Vif, index: int, rid: int, status: int, b: _Batch) -> bool:
        """Queue the tx response for ``index`` (published, and its record retired, at the next
        flush)."""
        tx, log = s.tx, s.inflight
        assert tx is not None and log is not None and tx.rsp_prod_pvt == index
        tx.put_response(_pack_tx_rsp(rid, status))
        log.clear_executing(index)
        b.tx[s.key] = s
        b.ended.append((s, index))
        return True

    def _free_buffer(self, key: int, b: _Batch) -> tuple[Vif, tuple[int, int, int]] | None:
        """Vif ``key`` and its next rx buffer, if it is connected, no frame waits for it
        already, and it has one (see :meth:`_take_buffer`)."""
        d = self.devices.get(key)
        if d is None or d.state is not Lifecycle.CONNECTED or d.queue:
            return None
        got = self._take_buffer(d, b)
        if got is None or d.state is not Lifecycle.CONNECTED:  # (none, or its ring broke)
            return None
        return d, got

    def _take_buffer(self, d: Vif, b: _Batch) -> tuple[int, int, int] | None:
        """The next good rx buffer ``d`` posted, as (rx index, id, offset), or None if there is
        none.  Junk rx requests are answered with STATUS_ERROR on the way; a bad index breaks
        ``d``."""
        rx = d.rx
        assert rx is not None
        try:
            while rx.unconsumed_requests():
                raw = rx.get_request()
                k = (rx.req_cons - 1) & _MASK
                try:
                    rid, off, _ = netif.decode_rx(raw)
                except FrameError as e:
                    if d.rx_reread_end is not None and self._reread(d, k, raw):
                        return k, e.id, netif.RX_REQUEST.unpack_from(raw)[1]
                    _, roff, _, _ = netif.RX_REQUEST.unpack_from(raw)
                    rx.put_response(_pack_rx_rsp(e.id, roff, 0, _ERROR))
                    b.rx[d.key] = d
                    self._bad(d, f"rx request refused: {e}", e.id)
                    continue
                return k, rid, off
        except RingError as e:
            self._fault(d, f"rx ring: {e}", b)
        return None

    @staticmethod
    def _reread(d: Vif, k: int, raw: bytes) -> bool:
        """Is the rx slot at ``k``, which does not decode as a request, a response the dead
        instance wrote over a good request and never published?  A slot holds a request and
        later its response; a replacement takes the rx ring back from the published rsp_prod,
        so up to the guest's req_prod at the resume a slot may hold such a response.  An OKAY
        response keeps the request's id and offset, and has its frame length where the
        request had the capacity, and 0 (the status) where it had the flags: that buffer is
        used again, with MAX_FRAME bytes (a good request had at least that).  An ERROR
        response (status -1) answered a bad request, so it is refused again.  What a guest
        could pass off this way is only a buffer of its own rx area that it made too short."""
        end = d.rx_reread_end
        if end is None or ((end - k - 1) & _MASK) >= _HALF:
            d.rx_reread_end = None  # past the window: requests are the guest's own again
            return False
        _, off, size, flags = netif.RX_REQUEST.unpack_from(raw)
        return bool(
            flags == _OKAY
            and size < netif.MAX_FRAME
            and off >= netif.RX_BUF_OFFSET
            and off + netif.MAX_FRAME <= netif.WINDOW_BYTES
        )

    def _put_frame(self, d: Vif, got: tuple[int, int, int], frame: bytes, b: _Batch) -> None:
        k, rid, off = got
        rx = d.rx
        assert rx is not None and rx.rsp_prod_pvt == k
        n = len(frame)
        d.region[off : off + n] = frame
        rx.put_response(_pack_rx_rsp(rid, off, n, _OKAY))
        b.rx[d.key] = d
        st = d.stats
        st.rx_frames += 1
        st.rx_bytes += n

    def _drain_queue(self, d: Vif, b: _Batch) -> None:
        """Put the frames waiting for ``d`` into the buffers it posted, oldest first; if some
        still wait, ask for a kick when it posts more (the final check)."""
        while d.queue and d.state is Lifecycle.CONNECTED:
            got = self._take_buffer(d, b)
            if got is None:
                if d.state is not Lifecycle.CONNECTED:
                    return
                rx = d.rx
                assert rx is not None
                try:
                    if rx.final_check_for_requests():
                        continue
                except RingError as e:
                    self._fault(d, f"rx ring: {e}", b)
                return
            item = d.queue.popleft()
            if isinstance(item, _Queued):
                d.queued_frames -= 1
                self._put_frame(d, got, item.frame, b)
                d.stats.uplink_rx += 1
                continue
            s = item.source
            j = item.waiting.pop(d.key)
            log = s.inflight
            assert log is not None
            log.mark_executing(item.index)
            s.dlog.set_index(item.index, j, got[0])  # before d's rx ring is pushed
            self._put_frame(d, got, item.frame, b)
            log.clear_executing(item.index)
            if not item.waiting:
                self._complete(item, b)

    def _complete(self, held: _Held, b: _Batch) -> None:
        """No destination of a held request waits any more: answer it; its vif may go on."""
        s = held.source
        if s.held is not held or s.state is not Lifecycle.CONNECTED:
            return
        s.held = None
        self._answer(s, held.index, held.id, _OKAY, b)
        b.unblocked[s.key] = s

    def _expire(self, b: _Batch) -> None:
        """Give up frames that waited ``rx_wait_ms`` for a vif's rx buffers."""
        now = self.clock()
        for d in list(self.devices.values()):
            q = d.queue
            while q and q[0].deadline <= now:
                item = q.popleft()
                d.stats.rx_full_drops += 1
                if isinstance(item, _Queued):
                    d.queued_frames -= 1
                    continue
                item.waiting.pop(d.key, None)
                self.log.debug(
                    "vif %d (%s): a frame of vif %d waited %g s for an rx buffer: dropped for it",
                    d.key,
                    d.label,
                    item.source.key,
                    self.rx_wait_s,
                )
                if not item.waiting:
                    self._complete(item, b)

    def _push_rx(self, v: Vif) -> bool:
        rx = v.rx
        return rx is not None and rx.push_responses()

    def _push_tx(self, v: Vif) -> bool:
        tx = v.tx
        return tx is not None and tx.push_responses()

    def _flush(self, b: _Batch) -> None:
        """Publish: every rx ring first, then the tx rings; notify each guest once if it
        asked; then retire the answered requests' in-flight records."""
        if not (b.rx or b.tx or b.ended):
            return
        notify: dict[int, Vif] = {}
        for v in b.rx.values():
            if self._push_rx(v):
                notify[v.key] = v
        b.rx.clear()
        for v in b.tx.values():
            if self._push_tx(v):
                notify[v.key] = v
        b.tx.clear()
        done_ns = time.monotonic_ns()
        for v in notify.values():
            v.notifications += 1
            self.host.notify(v.key)
        for v, index in b.ended:
            if v.inflight is not None:
                v.inflight.end(index)
            if v.recovering and index in v.redo_left:
                v.redo_left.discard(index)
                v.redo_done_ns = done_ns
        b.ended.clear()

    def _settle(self, b: _Batch) -> None:
        """Publish everything, and go on with vifs a completion unblocked and vifs that need
        to ask for rx buffers, until nothing is left; then report finished resumptions."""
        while True:
            self._flush(b)
            if b.unblocked:
                key = next(iter(b.unblocked))
                self._serve_tx(b.unblocked.pop(key), b)
                continue
            if b.starved:
                starved = list(b.starved.values())
                b.starved.clear()
                for d in starved:
                    self._drain_queue(d, b)
                continue
            break
        for v in self.devices.values():
            if v.recovering and not v.backlog and not v.redo_left:
                v.recovering = False
                self.log.info(
                    "vif %d (%s): resumed, %d tx request(s) redone", v.key, v.label, v.replayed
                )
                self.host.recovered(v.key, v.replayed, v.redo_done_ns)

    # -- the uplink (drivers/net/uplink.py) ------------------------------------------------------
    def _tap_wanted(self) -> bool:
        return self.uplink.wanted(bool(self.devices))

    def _retry_tap(self) -> None:
        if self._tap_wanted() and self.clock() >= self.uplink.retry_at:
            self._open_tap()

    def _open_tap(self) -> None:
        if self.uplink.open(self.devices.values()):
            self._bridge(self.uplink.bridge).add_port(UPLINK)

    def _sync_neighbors(self) -> None:
        self.uplink.sync_neighbors(self.devices.values())

    def _to_uplink(self, s: Vif, frame: bytes) -> None:
        """Mark-before-write (the delivery record names the uplink already): at most once."""
        if self.uplink.send(frame, s.key):
            s.stats.uplink_tx += 1

    def _from_tap(self) -> None:
        frames = self.uplink.read()
        if frames is None:  # the TAP failed: it is closed, and tried again later
            br = self.bridges.get(self.uplink.bridge)
            if br is not None:
                br.remove_port(UPLINK)
            return
        if not frames:
            return
        b = _Batch()
        self._expire(b)
        bridge = self._bridge(self.uplink.bridge)
        now = self.clock()
        switch = self._uplink_frame_filtered if self.filtering else self._uplink_frame
        for frame in frames:
            switch(bridge, frame, now, b)
        self._settle(b)

    def _uplink_frame(self, bridge: Bridge, frame: bytes, now: float, b: _Batch) -> None:
        up = self.uplink.stats
        if not netif.MIN_FRAME <= len(frame) <= netif.MAX_FRAME or is_multicast(frame[6:12]):
            up.bad += 1
            return
        src = frame[6:12]
        if (bridge.name, src) in self._owners:  # a guest's address: never learned off a guest
            up.spoofed += 1
            return
        up.frames_in += 1
        bridge.table.learn(src, UPLINK, now)
        for p in bridge.forward(UPLINK, frame, now).ports:
            d = self.devices.get(p)
            if d is None or d.state is not Lifecycle.CONNECTED:
                continue
            got = None if d.queue else self._take_buffer(d, b)
            if got is not None:
                self._put_frame(d, got, frame, b)
                d.stats.uplink_rx += 1
            elif d.state is Lifecycle.CONNECTED:
                if self.rx_wait_s <= 0 or d.queued_frames >= RX_QUEUE_FRAMES:
                    d.stats.rx_full_drops += 1
                    continue
                d.queue.append(_Queued(frame, now + self.rx_wait_s))
                d.queued_frames += 1
                b.starved[p] = d

    def _uplink_frame_filtered(self, bridge: Bridge, frame: bytes, now: float, b: _Batch) -> None:
        """``_uplink_frame`` for a class that overrides :meth:`filter_frame`: a frame that
        passes the uplink's checks goes through the hook first.  A hook that raises ends the
        instance; the frame is lost, as frames from the TAP may be."""
        src = frame[6:12]
        if (
            not netif.MIN_FRAME <= len(frame) <= netif.MAX_FRAME
            or is_multicast(src)
            or (bridge.name, src) in self._owners
        ):
            self._uplink_frame(bridge, frame, now, b)  # refused and counted there
            return
        try:
            out = self.filter_frame(None, frame)
        except Exception as e:
            e.add_note(
                f"{self._hook} raised for a frame from the uplink: a driver process ends here "
                "(status 70); the frame is lost (the uplink is not redone)"
            )
            raise
        if out is None:
            self.filtered += 1
            return
        if out is not frame:
            checked = self._rewritten(None, out, bridge.name)
            if checked is None:
                return
            out = checked
        self._uplink_frame(bridge, out, now, b)

    # -- fault injection (drivers/faults.py; docs/campaigns.md) ---------------------------------
    def _choose_forward(self) -> None:
        self._spoil = {k: sp for k, sp in self._spoil.items() if k in self.devices}
        self.forward = (
            self._forward_injecting if self.injector.armed or self._spoil else self._switch
        )

    def _forward_injecting(self, s: Vif, index: int, raw: bytes, b: _Batch, *, redo: bool) -> bool:
        """``forward`` while a fault is armed or due: ask the injector about this tx request
        (a malformed one is left to ``_forward``, which refuses it)."""
        try:
            _, off, size = netif.decode_tx(raw)
        except FrameError:
            return self._spoiled(s, index, self._switch(s, index, raw, b, redo=redo))
        domain, _, vdev = s.label.partition("/")
        skip = () if self._reaches_a_guest(s, off, size) else _NEEDS_A_RECEIVER
        f = self.injector.pick(RequestInfo(domain, vdev, "tx", off, size), skip)
        if f is None:
            return self._spoiled(s, index, self._switch(s, index, raw, b, redo=redo))
        self._choose_forward()  # from the next request on: no more questions, if it is spent
        self.host.fault_fired(f.id, f.type, s.label)
        return self._carry_out(f, s, index, raw, b, redo=redo)

    def _reaches_a_guest(self, s: Vif, off: int, size: int) -> bool:
        """Whether the frame ``s`` queued at ``off`` would go to another guest's connected vif
        now.  ``corrupt_data`` spoils only such a frame, so that a guest sees what it did (a
        hello sent before the peer's vif is connected, or a done after the peer left, reaches
        nobody: a campaign saw its corrupt_data fault make no mismatch)."""
        if size <= _ETH_HEADER:
            return False
        header = bytes(s.region[off : off + _ETH_HEADER])
        fwd = self.bridges[s.bridge].forward(s.key, header, self.clock())
        for p in fwd.ports:
            d = self.devices.get(p) if p != UPLINK else None
            if d is not None and d.state is Lifecycle.CONNECTED:
                return True
        return False

    def _carry_out(
        self, f: Fault, s: Vif, index: int, raw: bytes, b: _Batch, *, redo: bool
    ) -> bool:
        """Do to the tx request at ``index`` of ``s`` what ``f`` says; True if it is answered
        (as ``_forward``)."""
        kind = f.type
        if kind in _DYING:
            log = s.inflight
            assert log is not None
            log.mark_executing(index)  # it dies executing the request: a death, for poison
            self.host.carry_out(kind, really=f.really)
        elif kind == "slow":
            time.sleep(self.injector.delay_s(f))
        elif kind in ("drop", "bad_index"):
            return self._stop_tx(s, index, raw, kind, b)
        elif kind in ("bad_id", "bad_status", "duplicate"):
            self._spoil[s.key] = _Spoil(kind)
            self._choose_forward()
        elif kind == "corrupt_data":
            return self._forward_corrupted(s, index, raw, b, redo=redo)
        elif kind in ("leak_mem", "leak_fd"):
            self.host.carry_out(kind)
        return self._spoiled(s, index, self._switch(s, index, raw, b, redo=redo))

    def _spoiled(self, s: Vif, index: int, answered: bool) -> bool:
        """Apply the response fault due for ``s`` to the tx response just queued at ``index``
        (not yet published): ``bad_id``/``bad_status`` spoil it; ``duplicate`` keeps a copy of
        it and puts the copy in place of the vif's next response.  Returns ``answered``."""
        sp = self._spoil.get(s.key)
        tx = s.tx
        if sp is None or not answered or tx is None:
            return answered
        rsp = tx.response_at(index)
        if sp.kind == "duplicate" and sp.copy is None:
            sp.copy = rsp
            return answered
        tx.rewrite_response(
            index, sp.copy if sp.copy is not None else spoil_tx_response(sp.kind, rsp)
        )
        del self._spoil[s.key]
        self._choose_forward()
        self.log.warning(
            "vif %d (%s): fault injected: %s, the tx response at ring index %d%s",
            s.key,
            s.label,
            sp.kind,
            index,
            " is a copy of the previous one" if sp.kind == "duplicate" else "",
        )
        return answered

    def _stop_tx(self, s: Vif, index: int, raw: bytes, kind: str, b: _Batch) -> bool:
        """``drop`` / ``bad_index``: the request is never answered and ``s`` takes no more tx
        requests (its rx ring is still served), as a backend that lost track of it would.
        ``bad_index`` first publishes what was answered, then a tx ``rsp_prod`` three past the
        guest's ``req_prod``.  The kernel's request timeout (drop) or the frontend's check of
        ``rsp_prod`` (bad_index) gets the instance replaced, and the next one redoes it."""
        rid = netif.TX_REQUEST.unpack_from(raw)[0]
        s.held = _Held(s, index, rid, b"", {}, math.inf)  # waits for nothing: never completes
        what = "it is never answered"
        if kind == "bad_index":
            self._flush(b)
            tx = s.tx
            assert tx is not None
            what = f"tx rsp_prod {tx.publish_rsp_prod_beyond(3)} published beyond req_prod"
            s.notifications += 1
            self.host.notify(s.key)
        self.log.warning(
            "vif %d (%s): fault injected: %s at tx ring index %d: %s; its tx ring "
            "is no longer served",
            s.key,
            s.label,
            kind,
            index,
            what,
        )
        return False

    def _forward_corrupted(self, s: Vif, index: int, raw: bytes, b: _Batch, *, redo: bool) -> bool:
        """``corrupt_data``: switch the frame with its first byte after the Ethernet header
        flipped, so every destination gets the wrong byte (the guest's buffer is put right
        again at once)."""
        _, off, size = netif.decode_tx(raw)
        if size <= _ETH_HEADER:  # no payload to spoil
            return self._spoiled(s, index, self._switch(s, index, raw, b, redo=redo))
        at = off + _ETH_HEADER
        region = s.region
        region[at] ^= 0xFF
        try:
            answered = self._switch(s, index, raw, b, redo=redo)
        finally:
            region[at] ^= 0xFF
        self.log.warning(
            "vif %d (%s): fault injected: corrupt_data, byte %d of the frame at tx "
            "ring index %d flipped",
            s.key,
            s.label,
            _ETH_HEADER,
            index,
        )
        return self._spoiled(s, index, answered)

    # -- logging ---------------------------------------------------------------------------------
    def _bad(self, v: Vif, message: str, rid: int) -> None:
        """Count a refused request; log the first 20 per vif, then every 1000th."""
        v.stats.bad_frames += 1
        v.bad_logged += 1
        k = v.bad_logged
        if k <= 20 or k % 1000 == 0:
            self.log.warning(
                "vif %d (%s): request %#x: %s%s",
                v.key,
                v.label,
                rid,
                message,
                f" [{k} refused so far]" if k > 20 else "",
            )

    def _spoofed(self, v: Vif, problem: str) -> None:
        v.stats.spoofed += 1
        v.spoof_logged += 1
        k = v.spoof_logged
        if k <= 20 or k % 1000 == 0:
            self.log.warning(
                "vif %d (%s): frame dropped: %s%s",
                v.key,
                v.label,
                problem,
                f" [{k} dropped so far]" if k > 20 else "",
            )


#: ``python -m drivers.host --module drivers.net`` loads this.
Backend = NetBackend
