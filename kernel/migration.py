"""Live migration between stacks: iterative pre-copy over CurveZMQ (docs/migration.md).

The source kernel runs one :class:`Outgoing` thread per migration; every kernel that listens
runs one :class:`Incoming` thread.  They talk over a DEALER (source) / ROUTER (destination) pair
on TCP, encrypted and authenticated with CurveZMQ: the destination accepts only keys listed in
its peers file (a ZAP handler checks each connection and logs the ones it refuses), and the
source knows the destination's key from its own peers file before it connects.

Source                                          Destination
``begin`` {name, config, bytes, disks}  ->      reserve: fresh zeroed RAM for the guest
``pages`` {runs} + data, ...            ->      copy into that RAM (pipelined, no answer)
``blocks`` {vdev, runs} + data, ...     ->      (--with-disks) into the disk's copy here
``sync`` {round}                        ->      answered when every page before it is in
    ... rounds of the pages dirtied meanwhile (kernel/dirty.py), until few enough are left
    to send within ``max_downtime`` (or ``max_rounds``); a guest that dirties faster than
    the link carries is throttled (auto-converge: its CPU cap halves each round) ...
pause the guest; last ``pages``; ``commit`` {vCPU, scheduler, clock, console}
                                        ->      create the domain from that RAM and state,
                                                unpause it; answer {domid}
destroy the source's copy

Nothing runs twice and nothing is lost: the guest is paused at the source from the stop-and-copy
until the destination has it running; if anything fails first (no answer within ``timeout``,
a refusal, the destination's death), the source sends ``abort``, gives the guest its CPU cap
back, resumes it, and the outcome event says why.  A destination frees a reception that hears
nothing for :data:`RECEPTION_IDLE_S`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgpack
import zmq
from zmq.auth.thread import ThreadAuthenticator

from domains.config import DomainConfig
from ipc.control import ControlError
from ipc.peers import KeyPair, Peer, PeerError, read_peers
from ipc.schema import ConfigError
from ipc.shm import SHM_DIR, SegmentError
from kernel import abi, saverestore
from kernel.devices import device_specs
from kernel.dirty import DirtyTracker
from kernel.diskcopy import DiskCopy, DiskCopyError, DiskReceiver
from kernel.memory import GuestMemory
from kernel.snapfile import SnapshotError

if TYPE_CHECKING:
    from kernel.domain import Domain, Emit
    from kernel.hypervisor import Hypervisor

log = logging.getLogger("isovisor.kernel")

PAGE: Final = abi.PAGE_SIZE
#: A destination frees a reception that hears nothing for this long (the source died).
RECEPTION_IDLE_S: Final = 30.0
#: Fixed part of the downtime estimate: pause, last scan, state, commit (ms), refined by
#: measuring the scan.
BASE_DOWNTIME_MS: Final = 5.0
#: Stop and copy once this few pages are left, whatever the estimate (Xen's rule: the scan of a
#: big guest alone can take longer than the downtime asked for).
STOP_PAGES: Final = 50
#: Rounds at the last throttle step without shrinking before the stop-and-copy anyway.
STALLED_ROUNDS: Final = 2
#: The throttle steps of auto-converge (% of one pCPU).
THROTTLE_STEPS: Final = (50, 25, 12, 6, 3, 1)


class MigrationFailed(Exception):
    """A migration cannot go on; the message is what the operator reads."""


@dataclass
class Options:
    max_downtime_ms: float = 50.0
    #: Pages sent while the guest runs go out at most this fast (MB/s; 0: no limit), as
    #: QEMU's max-bandwidth: a migration need not take the whole link.
    max_bandwidth_mbs: float = 0.0
    max_rounds: int = 30
    timeout_s: float = 10.0
    auto_converge: bool = True
    #: Copy the disks along (kernel/diskcopy.py): file images instead of moving them by
    #: reference, for stacks that do not share storage; memory disks, which move only so.
    with_disks: bool = False


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# -- source -----------------------------------------------------------------------------------
@dataclass
class Stats:
    rounds: int = 0
    pages_sent: int = 0
    pages_touched: set[int] = field(default_factory=set)
    round_pages: list[int] = field(default_factory=list)
    throttle: int = 0
    downtime_ms: float = 0.0
    total_ms: float = 0.0
    bandwidth_mbs: float = 0.0
    last_pages: int = 0
    disk_blocks: int = 0  # disk blocks sent (--with-disks), the stop-and-copy's included
    last_disk_blocks: int = 0  # of them in the stop-and-copy


class Outgoing(threading.Thread):
    """One domain going to one peer (a thread of the source kernel)."""

    _ids = itertools.count(1)

    def __init__(
        self,
        hv: Hypervisor,
        dom: Domain,
        peer: Peer,
        keys: KeyPair,
        ctx: zmq.Context,
        options: Options,
        emit: Emit,
        on_end: Callable[[Outgoing], None],
        origin: str = "",
    ) -> None:
        self.mid = f"{dom.name}-{next(self._ids)}-{time.monotonic_ns()}"
        super().__init__(name=f"migrate-{dom.name}", daemon=True)
        self.hv, self.dom, self.peer, self.keys, self.ctx = hv, dom, peer, keys, ctx
        self.opt = options
        self.origin = origin
        self.emit = emit
        self.on_end = on_end
        self.stats = Stats()
        self._sock: zmq.Socket | None = None
        self.copies: list[DiskCopy] = []
        self._paced = 0  # bytes sent under max_bandwidth since _pace_start
        self._pace_start = time.monotonic_ns()

    # transport
    def _connect(self) -> zmq.Socket:
        s: zmq.Socket = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        # a DEALER's send blocks while it has no connection (e.g. the destination refused our
        # key): bounded by the timeout, as every wait for the destination is
        s.setsockopt(zmq.SNDTIMEO, int(self.opt.timeout_s * 1000))
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.curve_secretkey = self.keys.secret
        s.curve_publickey = self.keys.public
        s.curve_serverkey = self.peer.key
        s.connect(self.peer.address)
        return s

    def _send(self, header: dict[str, Any], *data: bytes, flags: int = 0) -> None:
        assert self._sock is not None
        header["id"] = self.mid
        try:
            self._sock.send_multipart([_pack(header), *data], flags=flags, copy=False)
        except zmq.Again:
            raise self._unreachable("take", header["op"]) from None

    def _ask(self, header: dict[str, Any], *data: bytes) -> dict[str, Any]:
        """Send and wait for the answer (bounded by the timeout)."""
        sock = self._sock
        assert sock is not None
        self._send(header, *data)
        if not sock.poll(int(self.opt.timeout_s * 1000)):
            raise self._unreachable("answer", header["op"])
        reply = _unpack(sock.recv())
        if not isinstance(reply, dict) or not reply.get("ok"):
            why = reply.get("error") if isinstance(reply, dict) else repr(reply)
            raise MigrationFailed(f"peer {self.peer.name} refused {header['op']!r}: {why}")
        return reply

    def _unreachable(self, verb: str, op: str) -> MigrationFailed:
        return MigrationFailed(
            f"peer {self.peer.name} ({self.peer.address}) did not {verb} {op!r} within "
            f"{self.opt.timeout_s:g}s: it is down, not listening for migrations, or does not "
            "list this stack's key in its peers file"
        )

    def _progress(self, phase: str, **more: Any) -> None:
        self.emit(
            f"domain.{self.dom.name}.migrating",
            {"domid": self.dom.domid, "peer": self.peer.name, "phase": phase, **more},
        )

    # the migration
    def run(self) -> None:
        dom = self.dom
        t0 = time.monotonic_ns()
        was_paused = dom.paused
        cap = dom.cap
        outcome: dict[str, Any]
        paused_at: int | None = None
        tracker: DirtyTracker | None = None
        try:
            self._sock = self._connect()
            self._progress("connecting", address=self.peer.address)
            if self.opt.with_disks and self.hv.devices is not None:
                self.copies = self.hv.devices.start_copies(dom)
            self._ask(
                {
                    "op": "begin",
                    "name": dom.name,
                    "config": dom.config.to_wire(),
                    "bytes": dom.mem.size,
                    "origin": self.origin,
                    "disks": [
                        {"vdev": c.vdev, "bytes": c.size, "memory": c.memory} for c in self.copies
                    ],
                }
            )
            tracker = DirtyTracker(dom.mem.host_address, dom.mem.size)
            paused_at = self._precopy(tracker, cap)
            reply = self._stop_and_copy(tracker)
            done = time.monotonic_ns()
            self.stats.downtime_ms = (done - (paused_at or done)) / 1e6
            self.stats.total_ms = (done - t0) / 1e6
            outcome = {"outcome": "migrated", "reason": "", "dest_domid": reply.get("domid")}
        except (MigrationFailed, ControlError, DiskCopyError, zmq.ZMQError, OSError) as e:
            reason = str(e)
            outcome = {"outcome": "failed", "reason": reason}
            with contextlib.suppress(Exception):
                if self._sock is not None:
                    self._send({"op": "abort", "reason": reason}, flags=zmq.NOBLOCK)
            self._stay(cap, was_paused)
            log.error(
                "migration of %s to %s failed: %s; it runs here", dom.name, self.peer.name, reason
            )
        except Exception as e:  # a kernel bug: the guest must still run on here
            log.exception("migration of %s to %s failed", dom.name, self.peer.name)
            outcome = {"outcome": "failed", "reason": f"internal error: {e}"}
            self._stay(cap, was_paused)
        finally:
            if tracker is not None:
                tracker.close()
            for copy in self.copies:
                copy.close()
            if self._sock is not None:
                self._sock.close(0)
        s = self.stats
        payload = {
            "domid": dom.domid,
            "peer": self.peer.name,
            "address": self.peer.address,
            **outcome,
            "rounds": s.rounds,
            "pages_sent": s.pages_sent,
            "pages_touched": len(s.pages_touched),
            "round_pages": s.round_pages,
            "last_pages": s.last_pages,
            "throttle": s.throttle,
            "downtime_ms": round(s.downtime_ms, 3),
            "total_ms": round(s.total_ms or (time.monotonic_ns() - t0) / 1e6, 3),
            "bandwidth_mbs": round(s.bandwidth_mbs, 1),
            "disk_blocks": s.disk_blocks,
            "last_disk_blocks": s.last_disk_blocks,
            # (a destroy asked for meanwhile sets action first, exit only once a pCPU ran it)
            "source_running": outcome["outcome"] == "failed"
            and dom.exit is None
            and dom.action is None,
            "migration": self.mid,
        }
        if outcome["outcome"] == "migrated":
            log.info(
                "domain %s migrated to %s: %d rounds, %d pages sent (%d touched), downtime "
                "%.1f ms, total %.1f ms",
                dom.name,
                self.peer.name,
                s.rounds,
                s.pages_sent,
                len(s.pages_touched),
                s.downtime_ms,
                s.total_ms,
            )
            with contextlib.suppress(ControlError):
                self.hv.destroy(dom, f"migrated to {self.peer.name}")
        self.emit(f"domain.{dom.name}.migration", payload)
        self.on_end(self)

    def _stay(self, cap: int, was_paused: bool) -> None:
        """The guest stays here: its devices back, its own CPU cap, and running again."""
        dom, dm = self.dom, self.hv.devices
        if dm is not None and any(d.released for d in dom.devices.values()):
            dm.reattach(dom)
        if dm is not None and self.copies:
            dm.stop_copies(dom, self.copies)
        self.hv.sched.set_cap(dom, cap)
        if not was_paused and dom.exit is None:
            self.hv.sched.unpause(dom)

    def _scan(self, tracker: DirtyTracker) -> list[int]:
        with self.dom.mem_lock:
            self._alive()
            return tracker.scan()

    def _alive(self) -> None:
        """(mem_lock held) RAM is still mapped: the domain has not ended meanwhile."""
        dom = self.dom
        if dom.torn_down or dom.exit is not None:
            raise MigrationFailed(f"domain {dom.name!r} stopped during the migration")

    def _send_pages(self, tracker: DirtyTracker, pages: list[int]) -> None:
        with self.dom.mem_lock:
            self._alive()
            runs = tracker.take(pages)
        limit = self.opt.max_bandwidth_mbs * (1 << 20) / 1e9  # bytes per ns
        for first, count, data in runs:
            self._send({"op": "pages", "runs": [[first, count]]}, data)
            if limit and not self.dom.paused:  # (the stop-and-copy goes at full speed)
                self._paced += len(data)
                ahead = self._paced / limit - (time.monotonic_ns() - self._pace_start)
                if ahead > 0:
                    time.sleep(ahead / 1e9)
        self.stats.pages_sent += len(pages)
        self.stats.pages_touched.update(pages)

    def _send_disks(self, first_round: bool) -> int:
        """Every copied disk's blocks with data (round 0), else the ones written since they
        were sent; paced like the pages while the guest runs.  Returns the blocks sent."""
        limit = self.opt.max_bandwidth_mbs * (1 << 20) / 1e9
        n = 0
        for copy in self.copies:
            for first, count, data in copy.initial() if first_round else copy.dirty():
                self._send({"op": "blocks", "vdev": copy.vdev, "runs": [[first, count]]}, data)
                n += count
                if limit and not self.dom.paused:
                    self._paced += len(data)
                    ahead = self._paced / limit - (time.monotonic_ns() - self._pace_start)
                    if ahead > 0:
                        time.sleep(ahead / 1e9)
        self.stats.disk_blocks += n
        return n

    def _precopy(self, tracker: DirtyTracker, cap: int) -> int:
        """Rounds while the guest runs; returns when few enough pages are left."""
        s, opt, dom = self.stats, self.opt, self.dom
        bw = 0.0  # bytes per ms, measured
        throttle_step = -1
        stalled = 0  # rounds at the last throttle step that did not shrink
        previous = None
        while True:
            t_scan = time.monotonic_ns()
            pages = self._scan(tracker)
            scan_ms = (time.monotonic_ns() - t_scan) / 1e6
            blocks = sum(c.marked() for c in self.copies)  # (4 KiB each, as pages)
            send_ms = (len(pages) + blocks) * PAGE / bw if bw else 0.0
            if s.rounds > 0:
                expect = BASE_DOWNTIME_MS + scan_ms + send_ms
                if (
                    expect <= opt.max_downtime_ms
                    or len(pages) + blocks <= STOP_PAGES
                    or s.rounds >= opt.max_rounds
                ):
                    return self._pause()
            if dom.exit is not None or dom.action is not None:
                raise MigrationFailed(f"domain {dom.name!r} stopped during the migration")
            t = time.monotonic_ns()
            self._send_pages(tracker, pages)
            sent = len(pages) + self._send_disks(first_round=s.rounds == 0)
            self._ask({"op": "sync", "round": s.rounds})
            ms = max((time.monotonic_ns() - t) / 1e6, 0.001)
            if sent:
                bw = sent * PAGE / ms
                s.bandwidth_mbs = bw * 1000 / (1 << 20)
            s.round_pages.append(len(pages))
            s.rounds += 1
            self._progress("round", round=s.rounds, pages=len(pages), ms=round(ms, 3))
            # auto-converge: what is left takes longer to send than the downtime allowed, and
            # it did not halve in a round -> halve the guest's CPU; at the last step, a guest
            # that still does not slow down is stopped and copied (more rounds cannot help)
            stuck = (
                opt.auto_converge
                and previous is not None
                and s.rounds >= 3
                and bw > 0
                and len(pages) * PAGE / bw > opt.max_downtime_ms
                and len(pages) > previous // 2
            )
            if stuck and throttle_step + 1 == len(THROTTLE_STEPS):
                stalled += 1
                if stalled >= STALLED_ROUNDS:
                    self._progress("stalled", pages=len(pages))
                    return self._pause()
            if stuck and throttle_step + 1 < len(THROTTLE_STEPS):
                throttle_step += 1
                s.throttle = THROTTLE_STEPS[throttle_step]
                limit = s.throttle if not cap else min(cap, s.throttle)
                self.hv.sched.set_cap(dom, limit)
                self._progress("throttle", cap=limit)
            previous = len(pages)

    def _pause(self) -> int:
        dom = self.dom
        t = time.monotonic_ns()
        self.hv.sched.pause(dom)
        if not self.hv.sched.wait_off_cpu(dom, 5.0):
            raise MigrationFailed(f"domain {dom.name!r} did not stop running within 5s")
        return t

    def _stop_and_copy(self, tracker: DirtyTracker) -> dict[str, Any]:
        dom = self.dom
        dm = self.hv.devices
        if dom.devices:
            assert dm is not None
            dm.release(dom)  # before the last scan: a driver's last responses are in RAM too
        pages = self._scan(tracker)
        self.stats.last_pages = len(pages)
        self._send_pages(tracker, pages)
        self.stats.last_disk_blocks = self._send_disks(first_round=False)  # (written no more)
        with self.hv.sched.lock:
            if dom.exit is not None or dom.action is not None:
                raise MigrationFailed(f"domain {dom.name!r} stopped during the migration")
            sections = saverestore.capture(dom, self.origin)
        if dom.devices:
            assert dm is not None
            sections["devices"] = dm.device_sections(dom)
        del sections["memory"]
        self._progress("commit", pages=len(pages))
        return self._ask({"op": "commit", "sections": sections})


# -- destination ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskTarget:
    """Where a disk copied along goes here: an image file under ``[migration] disks``, or
    for a memory disk a shared-memory file the new device takes as its medium."""

    path: Path
    size: int
    memory: bool


def disk_targets(
    disks_dir: Path | None, name: str, h: dict[str, Any], scratch: str = ""
) -> dict[str, DiskTarget]:
    """The disks a ``begin`` says come along, by vdev: a file disk's image goes to
    ``disks_dir/NAME-VDEV.img``, a memory disk's to ``/dev/shm/<scratch>.VDEV.disk``.
    MigrationFailed if this stack takes no images or an entry is malformed."""
    disks = h.get("disks") or []
    out: dict[str, DiskTarget] = {}
    for d in disks if isinstance(disks, list) else [disks]:
        vdev = d.get("vdev") if isinstance(d, dict) else None
        size = d.get("bytes") if isinstance(d, dict) else None
        memory = d.get("memory", False) if isinstance(d, dict) else None
        if (
            not isinstance(vdev, str)
            or not vdev.isalnum()
            or not isinstance(size, int)
            or not isinstance(memory, bool)
        ):
            raise MigrationFailed(f"malformed disk entry {d!r:.80} in begin")
        if not 0 < size <= 1 << 44:
            raise MigrationFailed(f"disk {vdev}: size {size} is out of range")
        if memory:
            out[vdev] = DiskTarget(SHM_DIR / f"{scratch}.{vdev}.disk", size, True)
        elif disks_dir is None:
            raise MigrationFailed(
                "this stack takes no disk images: set disks = DIR in the [migration] table "
                "of its supervisor.toml to receive migrations --with-disks"
            )
        else:
            out[vdev] = DiskTarget(disks_dir / f"{name}-{vdev}.img", size, False)
    return out


def retarget(wire: Any, targets: dict[str, DiskTarget]) -> Any:
    """A wire config whose copied file disks name their images here (a memory disk keeps
    its entry: its medium is the device's own)."""
    if not targets or not isinstance(wire, dict) or not isinstance(wire.get("disk"), list):
        return wire
    disks = []
    for d in wire["disk"]:
        t = targets.get(str(d.get("vdev"))) if isinstance(d, dict) else None
        if t is not None:
            kind = d.get("type", "file")
            if kind != ("memory" if t.memory else "file"):
                raise MigrationFailed(f"disk {d.get('vdev')} is a {kind} disk in the config")
            if not t.memory:
                d = {**d, "target": str(t.path)}
        disks.append(d)
    missing = set(targets) - {d.get("vdev") for d in disks if isinstance(d, dict)}
    if missing:
        raise MigrationFailed(f"disks {sorted(missing)} are not in the domain's config")
    return {**wire, "disk": disks}


@dataclass
class Reception:
    mid: str
    name: str
    config: DomainConfig
    mem: GuestMemory
    origin: str
    seen: float
    pages: int = 0
    #: The disks copied along, by vdev (--with-disks), and where their images go here
    disks: dict[str, DiskReceiver] = field(default_factory=dict)
    targets: dict[str, DiskTarget] = field(default_factory=dict)


class Incoming(threading.Thread):
    """Accepts migrations on ``listen`` for the kernel (one thread; one reception per
    migration under way)."""

    def __init__(
        self,
        hv: Hypervisor,
        ctx: zmq.Context,
        listen: str,
        keys: KeyPair,
        peers: Path,
        emit: Emit,
        disks: Path | None = None,
    ) -> None:
        super().__init__(name="migrate-in", daemon=True)
        self.hv, self.ctx, self.keys, self.peers_path, self.emit = hv, ctx, keys, peers, emit
        #: Where disk images copied along (--with-disks) are put; None: none are taken.
        self.disks_dir = disks
        self.receptions: dict[str, Reception] = {}
        #: Fault injection (tests): the kernel process dies on receiving this operation.
        self.die_at: str | None = None
        self._stop = threading.Event()
        self._shm = itertools.count(1)
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("isovisor.kernel.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=self)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.curve_server = True
        self.sock.curve_secretkey = keys.secret
        self.sock.curve_publickey = keys.public
        self.sock.bind(listen)
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ZAP: called by the authenticator's thread for every connection
    def callback(self, domain: str, key: bytes) -> bool:
        try:
            peers = read_peers(self.peers_path)
        except PeerError as e:
            log.error("migration: refused a connection: %s", e)
            return False
        z85 = bytes(key)  # pyzmq hands it over in Z85
        for p in peers.values():
            if p.key == z85:
                return True
        log.warning(
            "migration: refused a connection from an unknown key %s (not in %s)",
            z85.decode(),
            self.peers_path,
        )
        self.emit("migration.refused", {"key": z85.decode(), "peers": str(self.peers_path)})
        return False

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.sock.poll(200):
                    frames = self.sock.recv_multipart(copy=False)
                    self._handle(frames)
                self._expire()
        finally:
            for r in list(self.receptions.values()):
                self._free(r, "the kernel is stopping")
            self.sock.close(0)
            self.auth.stop()

    def _reply(self, ident: Any, **body: Any) -> None:
        self.sock.send_multipart([ident, _pack(body)])

    def _handle(self, frames: list[Any]) -> None:
        ident = frames[0]
        try:
            header = _unpack(frames[1].bytes)
            if not isinstance(header, dict) or not isinstance(header.get("id"), str):
                raise MigrationFailed("malformed message (no id)")
            op = header.get("op")
            mid = header["id"]
            if op == self.die_at:
                log.error("migration: dying on %r, as injected (migration_inject)", op)
                logging.shutdown()
                os._exit(70)
            if op == "begin":
                self._begin(mid, header)
                self._reply(ident, ok=True)
                return
            r = self.receptions.get(mid)
            if r is None:
                if op in ("pages", "blocks", "abort"):
                    return  # after an abort or an expiry: nothing to do, nobody waits
                raise MigrationFailed(f"no migration {mid!r} under way here")
            r.seen = time.monotonic()
            if op == "pages":
                self._pages(r, header, frames[2:])
            elif op == "blocks":
                self._blocks(r, header, frames[2:])
            elif op == "sync":
                self._reply(ident, ok=True, round=header.get("round"), pages=r.pages)
            elif op == "commit":
                domid = self._commit(r, header)
                self._reply(ident, ok=True, domid=domid)
            elif op == "abort":
                self._free(r, f"the source aborted: {header.get('reason', '')}")
            else:
                raise MigrationFailed(f"unknown operation {op!r}")
        except (MigrationFailed, ControlError, SnapshotError, DiskCopyError) as e:
            log.warning("migration: %s", e)
            with contextlib.suppress(zmq.ZMQError):
                self._reply(ident, ok=False, error=str(e))
        except Exception as e:
            log.exception("migration: internal error")
            with contextlib.suppress(zmq.ZMQError):
                self._reply(ident, ok=False, error=f"internal error on the destination: {e}")

    def _begin(self, mid: str, h: dict[str, Any]) -> None:
        try:
            config = DomainConfig.from_wire(h.get("config"))  # (its name is checked here)
            scratch = f"{self.hv.shm_prefix}mig{next(self._shm)}"
            targets = disk_targets(self.disks_dir, config.name, h, scratch)
            if targets:
                config = DomainConfig.from_wire(retarget(h.get("config"), targets))
        except ConfigError as e:
            raise MigrationFailed(f"the domain's config is invalid here: {e}") from None
        specs = tuple(device_specs(config))
        if specs:
            dm = self.hv.devices
            if dm is None:
                raise MigrationFailed("this kernel has no driver channel for the domain's devices")
            try:
                dm.check_backends(specs, f"migration of {config.name}")
            except ControlError as e:
                raise MigrationFailed(str(e)) from None
        if config.name in self.hv.domains or any(
            r.name == config.name for r in self.receptions.values()
        ):
            raise MigrationFailed(f"a domain named {config.name!r} already exists here")
        size = h.get("bytes")
        if size != config.memory * 1024 * 1024:
            raise MigrationFailed(f"memory size {size!r} does not match the config")
        try:
            mem = GuestMemory(f"{self.hv.shm_prefix}mig{next(self._shm)}.ram", size)
        except (SegmentError, ValueError) as e:
            raise MigrationFailed(str(e)) from None
        origin = str(h.get("origin", ""))
        r = Reception(mid, config.name, config, mem, origin, time.monotonic())
        try:
            for vdev, t in targets.items():
                r.disks[vdev] = DiskReceiver(vdev, t.path, t.size)
        except DiskCopyError:
            for rec in r.disks.values():
                rec.discard()
            mem.close()
            raise
        r.targets = targets
        self.receptions[mid] = r
        # before the guest can print here: the supervisor notes where its console log goes on
        self.emit(
            f"domain.{config.name}.incoming",
            {"origin": origin, "migration": mid, "console": config.console_driver or ""},
        )
        log.info("migration %s: receiving domain %s (%d MiB)", mid, config.name, config.memory)

    def _pages(self, r: Reception, h: dict[str, Any], data: list[Any]) -> None:
        runs = h.get("runs")
        if not isinstance(runs, list) or len(runs) != len(data):
            raise MigrationFailed("malformed pages message")
        buf = r.mem.segment.buf
        limit = r.mem.size // PAGE
        for run, frame in zip(runs, data, strict=True):
            first, count = run
            view = frame.buffer
            if not (first >= 1 and count >= 1 and first + count <= limit):
                raise MigrationFailed(f"page run {first}+{count} is outside the guest's RAM")
            if len(view) != count * PAGE:
                raise MigrationFailed(f"page run {first}+{count} carries {len(view)} bytes")
            buf[first * PAGE : (first + count) * PAGE] = view
            r.pages += count

    def _blocks(self, r: Reception, h: dict[str, Any], data: list[Any]) -> None:
        runs, rec = h.get("runs"), r.disks.get(str(h.get("vdev")))
        if rec is None or not isinstance(runs, list) or len(runs) != len(data):
            raise MigrationFailed("malformed blocks message")
        for run, frame in zip(runs, data, strict=True):
            if not (isinstance(run, list) and len(run) == 2):
                raise MigrationFailed("malformed blocks message")
            rec.write(run[0], run[1], frame.buffer)

    def _commit(self, r: Reception, h: dict[str, Any]) -> int:
        t0 = time.monotonic_ns()
        sections = h.get("sections")
        if not isinstance(sections, dict):
            raise MigrationFailed("malformed commit (no sections)")
        domain = sections.get("domain")
        if r.disks and isinstance(domain, dict):  # its disks are the copies made here
            domain["config"] = retarget(domain.get("config"), r.targets)
        sections["memory"] = {"bytes": r.mem.size, "page": PAGE, "runs": []}
        sections["pages"] = b""
        restored = saverestore.Restored.check(sections, f"migration of {r.name}")
        restored.memory = r.mem
        restored.media = {v: t.path for v, t in r.targets.items() if t.memory}
        restored.origin = r.origin or restored.origin
        restored.started_ns = t0
        del self.receptions[r.mid]
        try:
            for rec in r.disks.values():
                rec.commit()
        except OSError as e:
            self._discard_disks(r)
            r.mem.close()
            raise MigrationFailed(f"cannot put the copied disk images in place: {e}") from None
        try:
            dom = self.hv.create(restored.config, restore=restored)
        except BaseException:
            if restored.memory is not None:  # not taken by a domain: ours to free
                r.mem.close()
            for rec in r.disks.values():  # the guest runs on at the source
                rec.final.unlink(missing_ok=True)
            raise
        log.info("migration %s: domain %s runs here (id %d)", r.mid, r.name, dom.domid)
        return dom.domid

    def _expire(self) -> None:
        now = time.monotonic()
        for r in list(self.receptions.values()):
            if now - r.seen > RECEPTION_IDLE_S:
                self._free(r, f"nothing heard from the source for {RECEPTION_IDLE_S:g}s")

    @staticmethod
    def _discard_disks(r: Reception) -> None:
        for rec in r.disks.values():
            rec.discard()

    def _free(self, r: Reception, why: str) -> None:
        self.receptions.pop(r.mid, None)
        r.mem.close()
        self._discard_disks(r)
        log.warning("migration %s of domain %s abandoned: %s", r.mid, r.name, why)
