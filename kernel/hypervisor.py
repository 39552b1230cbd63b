"""The kernel's domain registry and lifecycle policy (create, destroy, on_* actions).

Everything here is callable from any thread: the control thread creates and destroys, pCPU
threads run exits (poweroff/reboot/crash) and restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Final

from domains.config import DomainConfig
from ipc.control import AlreadyExists, ControlError, NotFound
from ipc.shm import SegmentError
from kernel import saverestore, snapfile, uffd
from kernel.clock import host_tsc
from kernel.devices import DeviceManager, device_specs
from kernel.domain import Domain, Emit, Exit, ImageError
from kernel.paging import Pager
from kernel.saverestore import Restored
from kernel.scheduler import Scheduler
from kernel.snapfile import SnapshotError

log = logging.getLogger("isovisor.kernel")

#: A domain restarted this many times within RESTART_WINDOW_S is destroyed instead.
RESTART_LIMIT: Final = 5
RESTART_WINDOW_S: Final = 10.0
DESTROY_WAIT_S: Final = 10.0
#: A save waits this long for the domain's vCPU to stop (it stops between instructions).
SAVE_STOP_S: Final = 5.0
#: A lazy restore waits this long for the pager to fill and check the guest's RAM.
FILL_WAIT_S: Final = 60.0
#: How restores fill guest RAM: "lazy" (the pager, while the guest runs) or "eager".
RESTORE_MODES: Final = ("lazy", "eager")


class Hypervisor:
    def __init__(
        self,
        *,
        pcpus: int,
        timeslice_ms: int,
        shm_prefix: str,
        emit: Emit,
        restore: str = "eager",
    ) -> None:
        """``restore``: how a restore fills guest RAM (:data:`RESTORE_MODES`); "lazy" starts
        the pager process, or falls back to "eager" (logged) where userfaultfd is missing."""
        self.shm_prefix = shm_prefix
        self.emit = emit
        self._lock = threading.Lock()
        self._next_domid = 1
        self.domains: dict[str, Domain] = {}
        self._restart_times: dict[str, deque[float]] = {}
        host_tsc()  # calibrate the guest clock's scale now, not at the first create
        self.sched = Scheduler(pcpus, timeslice_ms * 1_000_000, self._on_exit)
        self.sched.start()
        self.devices: DeviceManager | None = None  # set by the server once drivers can connect
        self.pager: Pager | None = None
        if restore == "lazy":
            why = uffd.available()
            if why is None:
                self.pager = Pager()
                self.pager.start()
            else:
                log.warning("lazy restore unavailable: %s; restores read every page first", why)

    # -- lookup --------------------------------------------------------------------------------
    def find(self, ref: str | int) -> Domain:
        """A domain by name, or by id (an int, or a string of digits that is no name)."""
        with self._lock:
            if isinstance(ref, str) and ref in self.domains:
                return self.domains[ref]
            if isinstance(ref, int) or ref.isdigit():
                for d in self.domains.values():
                    if d.domid == int(ref):
                        return d
            names = ", ".join(sorted(self.domains)) or "none"
        raise NotFound(
            f"no domain named or numbered {ref!r} (domains: {names}); see `isovisor list`"
        )

    # -- create / destroy ----------------------------------------------------------------------
    def create(
        self,
        config: DomainConfig,
        restarted_from: Domain | None = None,
        paused: bool = False,
        restore: Restored | None = None,
    ) -> Domain:
        """Create a domain and hand it to the scheduler; ``paused`` holds its vCPU until
        ``unpause`` (``xl create -p``), so nothing it does can be missed by a reader.  With
        ``restore`` the domain resumes from a snapshot instead of booting its image."""
        restarts = restarted_from.restarts + 1 if restarted_from else 0
        if restore is not None:
            restarts = restore.restarts
        with self._lock:
            if config.name in self.domains:
                other = self.domains[config.name]
                raise AlreadyExists(
                    f"a domain named {config.name!r} already exists (id "
                    f"{other.domid}); destroy it first or choose another name"
                )
            dm = self.devices
            specs = tuple(device_specs(config))
            if specs:
                if dm is None:
                    raise ControlError(
                        "this kernel has no driver channel; disks, network "
                        "interfaces and console drivers are unavailable"
                    )
                dm.check_backends(specs, config.source)
            domid = self._next_domid
            self._next_domid += 1
            try:
                dom = Domain(
                    domid,
                    config,
                    f"{self.shm_prefix}dom{domid}.ram",
                    self.sched,
                    self.emit,
                    restarts,
                    restore,
                )
            except (ImageError, SegmentError) as e:
                raise ControlError(str(e)) from None
            except SnapshotError as e:  # the pages, checked as they were read
                raise ControlError(f"{e}; nothing was restored") from None
            except Exception as e:
                log.exception("creating domain %s failed", config.name)
                raise ControlError(f"cannot create domain {config.name!r}: {e}") from None
            if specs:
                assert dm is not None
                try:
                    dm.create(dom)
                    if restore is not None:
                        dm.load_regions(dom, restore.devices)
                        dm.load_media(dom, restore.media)
                except BaseException:
                    dom.teardown()
                    raise
            self.domains[config.name] = dom
        if restore is not None:
            dom.resume_from_ns = restore.started_ns or time.monotonic_ns()
        if dom.filling is None:  # else once its pages are checked (restore)
            self._bring_up(dom, restore, restarted_from)
        if paused:
            dom.paused, dom.paused_since = True, time.monotonic_ns()
        self.sched.add(dom)
        wake_in = restore.sched.get("wake_in") if restore is not None else None
        if dom.polling and wake_in is not None:
            self.sched.arm_wake(dom, wake_in)
        return dom

    def _bring_up(
        self, dom: Domain, restore: Restored | None, restarted_from: Domain | None
    ) -> None:
        """Connect the domain's devices and announce it."""
        config = dom.config
        if dom.devices:
            assert self.devices is not None
            frontends = (
                {d["vdev"]: d["frontend"] for d in restore.devices} if restore is not None else None
            )
            self.devices.connect(dom, frontends)
        log.info(
            "domain %s (id %d) created: %s, %d MiB, weight %d, cap %d",
            config.name,
            dom.domid,
            config.image,
            config.memory,
            config.weight,
            config.cap,
        )
        dom.announced = True
        self.emit(f"domain.{config.name}.created", {"domid": dom.domid, "restarts": dom.restarts})
        if restarted_from is not None:  # announced before the new domain can print anything
            self.emit(
                f"domain.{config.name}.restarted",
                {
                    "domid": dom.domid,
                    "old": restarted_from.domid,
                    "reason": restarted_from.exit.reason if restarted_from.exit else "",
                },
            )
        if restore is not None:
            self.emit(
                f"domain.{config.name}.restored",
                {
                    "domid": dom.domid,
                    "origin": restore.origin,
                    "epoch": dom.clock.epoch,
                    "console": config.console_driver or "",
                },
            )

    # -- save / restore (control thread) ----------------------------------------------------
    def save(self, dom: Domain, path: Path, *, checkpoint: bool, origin: str) -> dict[str, Any]:
        """Write ``dom`` to a snapshot file; then destroy it, or with ``checkpoint`` let it
        run on (``xl save -c``).  On any failure the domain runs on as before."""
        if dom.exit is not None or dom.action is not None:
            raise ControlError(f"domain {dom.name!r} is stopping or stopped; nothing to save")
        dm = self.devices
        if dom.devices:
            assert dm is not None
            dm.check_movable(dom, "saved", copies=True)  # (a memory disk's data goes along)
        was_paused = dom.paused
        t0 = time.monotonic_ns()
        self.sched.pause(dom)
        try:
            if not self.sched.wait_off_cpu(dom, SAVE_STOP_S):
                raise ControlError(
                    f"domain {dom.name!r} did not stop running within {SAVE_STOP_S:g}s; not saved"
                )
            if dom.devices:
                assert dm is not None
                dm.release(dom)  # the drivers let go; the rings stay as they are
            with self.sched.lock:
                if dom.exit is not None or dom.action is not None:
                    raise ControlError(f"domain {dom.name!r} stopped while being saved")
                sections = saverestore.capture(dom, origin)
            if dom.devices:
                assert dm is not None
                sections["devices"] = dm.device_sections(dom, media=True)
            with dom.mem_lock:  # (the domain can still end meanwhile: a device fault)
                if dom.torn_down:
                    raise ControlError(f"domain {dom.name!r} stopped while being saved")
                buf = dom.mem.segment.buf
                runs = saverestore.page_runs(dom.mem.host_address, dom.mem.size)
                sections["memory"]["runs"] = runs
                sections["pages"] = saverestore.page_chunks(buf, runs)
                try:
                    size = snapfile.write(path, sections)
                except OSError as e:
                    raise ControlError(
                        f"cannot write snapshot {path}: {e.strerror}; domain {dom.name!r} runs on"
                    ) from None
        except BaseException:
            if dm is not None and dom.devices:
                dm.reattach(dom)
            if not was_paused:
                self.sched.unpause(dom)
            raise
        stopped_ms = (time.monotonic_ns() - t0) / 1e6
        pages = sum(n for _, n in runs)
        log.info(
            "domain %s (id %d) saved to %s: %d pages, %d bytes, %.1f ms%s",
            dom.name,
            dom.domid,
            path,
            pages,
            size,
            stopped_ms,
            "; it runs on (checkpoint)" if checkpoint else "",
        )
        self.emit(
            f"domain.{dom.name}.saved",
            {"domid": dom.domid, "path": str(path), "checkpoint": checkpoint, "bytes": size},
        )
        if checkpoint:
            if dm is not None and dom.devices:
                dm.reattach(dom)
            if not was_paused:
                self.sched.unpause(dom)
        else:
            self.destroy(dom, f"saved to {path}")
        return {
            "domid": dom.domid,
            "name": dom.name,
            "path": str(path),
            "bytes": size,
            "pages": pages,
            "ms": round(stopped_ms, 3),
        }

    def restore(self, path: Path, *, paused: bool) -> Domain:
        """Create a domain from a snapshot file, checked whole before the domain exists (the
        pages as they are read into its RAM)."""
        t0 = time.monotonic_ns()
        try:
            sections = snapfile.read(path, defer_pages=True)  # (read while RAM is filled)
            restored = saverestore.Restored.check(sections, f"snapshot {path}")
        except SnapshotError as e:
            raise ControlError(f"{e}; nothing was restored") from None
        restored.started_ns = t0
        restored.pager = self.pager
        dom = self.create(restored.config, paused=paused, restore=restored)
        if dom.filling is not None:
            self._end_fill(dom, restored, f"snapshot {path}")
        return dom

    def _end_fill(self, dom: Domain, restored: Restored, where: str) -> None:
        """Wait for the pager to have filled and checked a lazily restored domain's RAM;
        then connect its devices, announce it and let its hypercalls go on.  If the pages
        fail their check, the domain is destroyed before anything it did was seen (its
        hypercalls were held, its devices not connected) and the restore fails."""
        fill = dom.filling
        assert fill is not None
        if not fill.wait(FILL_WAIT_S):
            fill.cancel()
            error = f"the pager did not fill the guest's RAM within {FILL_WAIT_S:g} s"
        elif not fill.ok:
            error = fill.error
        else:
            log.info(
                "domain %s: RAM filled and checked in %s ms (%s page faults served)",
                dom.name,
                fill.stats.get("ms"),
                fill.stats.get("faults"),
            )
            self._bring_up(dom, restored, None)
            self.sched.admit(dom)
            dom.mem.segment.reserve_in_background()
            return
        try:
            self.destroy(dom, f"its restore failed: {error}")
        except ControlError as e:
            log.error("%s", e)
        raise ControlError(f"{where}: {error}; nothing was restored")

    def destroy(self, dom: Domain, reason: str = "destroyed by request") -> None:
        """Destroy a domain and wait until its memory is freed."""
        if dom.preserved:
            # A preserved (shut-down or crashed) domain: no pCPU owns it any more.
            self._restart_times.pop(dom.name, None)
            self._finish(dom, Exit("destroy", reason))
            return
        if dom.exit is None:  # otherwise a pCPU is running its exit right now
            self.sched.request_exit(dom, Exit("destroy", reason))
        if not dom.gone.wait(DESTROY_WAIT_S):
            raise ControlError(f"domain {dom.name!r} did not stop within {DESTROY_WAIT_S:g}s")
        if dom.preserved and not dom.torn_down:  # it was being preserved as we asked
            self._finish(dom, Exit("destroy", reason))

    def destroy_all(self) -> None:
        for dom in list(self.domains.values()):
            try:
                self.destroy(dom, "kernel shutting down")
            except ControlError as e:
                log.error("%s", e)

    def shutdown(self) -> None:
        self.destroy_all()
        self.sched.stop()
        if self.pager is not None:
            self.pager.stop()

    # -- exits (pCPU thread that owns the domain) ------------------------------------------------
    def _on_exit(self, dom: Domain, exit: Exit) -> None:
        if exit.kind == "destroy" or not dom.announced:  # (a restore that failed its check)
            self._restart_times.pop(dom.name, None)
            self._finish(dom, exit)
            return
        action = {
            "poweroff": dom.config.on_poweroff,
            "reboot": dom.config.on_reboot,
            "crash": dom.config.on_crash,
        }[exit.kind]
        note = ""
        if action == "restart" and not self._restart_allowed(dom.name):
            action = "destroy"
            note = (
                f"; restarted {RESTART_LIMIT} times within {RESTART_WINDOW_S:g}s, "
                "not restarting again"
            )
        if action == "preserve":
            # Before the event: a `destroy` sent by someone who saw it must find it preserved.
            dom.preserved = True
        level = logging.ERROR if exit.kind == "crash" else logging.INFO
        log.log(
            level,
            "domain %s (id %d) %s: %s; on_%s = %s%s",
            dom.name,
            dom.domid,
            "crashed" if exit.kind == "crash" else "shut down",
            exit.reason,
            exit.kind,
            action,
            note,
        )
        event = "crashed" if exit.kind == "crash" else "shutdown"
        self.emit(
            f"domain.{dom.name}.{event}",
            {
                "domid": dom.domid,
                "kind": exit.kind,
                "reason": exit.reason,
                "code": exit.code,
                "policy": f"on_{exit.kind}",
                "action": action,
                "note": note.lstrip("; "),
            },
        )
        if action == "preserve":  # keep RAM and console for inspection until `destroy`
            dom.gone.set()  # nothing more will happen to it on its own
            return
        self._finish(dom, Exit(exit.kind, exit.reason + note, exit.code))
        if action == "restart":
            try:
                self.create(dom.config, restarted_from=dom)
            except ControlError as e:
                log.error("domain %s: restart failed: %s", dom.name, e)
                self.emit(
                    f"domain.{dom.name}.restart_failed", {"domid": dom.domid, "reason": str(e)}
                )

    def _restart_allowed(self, name: str) -> bool:
        now = time.monotonic()
        times = self._restart_times.setdefault(name, deque())
        while times and now - times[0] > RESTART_WINDOW_S:
            times.popleft()
        times.append(now)
        return len(times) <= RESTART_LIMIT

    def _finish(self, dom: Domain, exit: Exit) -> None:
        """Free a domain for good and announce it."""
        self.sched.remove(dom)
        with self._lock:
            if self.domains.get(dom.name) is dom:
                del self.domains[dom.name]
        if dom.exit is None:
            dom.exit = exit
        dom.teardown()
        if dom.devices and self.devices is not None:
            self.devices.remove(dom)
        if not dom.announced:  # never seen: a restore whose pages failed their check
            return
        # kind/code: what ended the domain (e.g. crash); reason: why it is now freed.
        self.emit(
            f"domain.{dom.name}.destroyed",
            {
                "domid": dom.domid,
                "reason": exit.reason,
                "kind": dom.exit.kind,
                "code": dom.exit.code,
            },
        )

    # -- reporting -----------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        now = time.monotonic_ns()
        with self._lock:
            doms = sorted(self.domains.values(), key=lambda d: d.domid)
        return [d.info(now) for d in doms]
