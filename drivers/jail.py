"""The driver jail: what a driver process gives up before any backend code is imported.

A backend parses bytes a guest controls, and a hot swap loads code a developer is still
writing, so a driver process must reach nothing it was not handed (issue 17; Firecracker's
jailer and crosvm's minijail are the models).  :func:`enter`, called by the driver host as root
before it imports the backend, does this, in this order:

1. *Resource limits* (``setrlimit``): no core files, at most ``nofile`` descriptors, at most
   ``nproc`` processes and threads of the jail's uid, at most ``address_space`` bytes of
   address space.  They are set first: the process-count limit is counted per real uid, and
   the descriptors and memory limits must hold before anything of the backend's runs.
2. *A file system of its own* (a mount namespace and ``pivot_root``): the new root is an empty
   read-only tmpfs into which only the listed paths are bind-mounted, read-only unless listed
   as writable: the Python installation and the project's sources (so imports still work), the
   system's libraries and ``/etc``, ``/dev``, ``/proc``, and what the driver is given (its own
   directory for its socket and report, the kernel's two driver sockets).  Nothing else has a
   path: not another stack's run directory, not a disk image it was not given, not
   ``/root``.  The host's mount table is untouched (the namespace is private).
3. *Its own identity* (``setgroups([])``, ``setresgid``, ``setresuid``): a dedicated uid per
   driver and the stack's driver gid.  Leaving uid 0 clears every capability (the process does
   not ask to keep them), so it can no more open a root-owned file such as a guest's RAM
   segment under ``/dev/shm``, signal or ``ptrace`` a process of another uid, or read its
   ``/proc/PID/mem``.
4. ``PR_SET_NO_NEW_PRIVS`` (no ``execve`` can give privileges back) and
   ``PR_SET_DUMPABLE`` 0 (no process of the same uid can ``ptrace`` it or read its memory).

:func:`enter` then checks the result (the effective and permitted capability sets are empty,
the uid is the jail's) and raises :class:`JailError` with what failed; a driver host that
cannot enter its jail does not start.

The parent-death signal (``PR_SET_PDEATHSIG``) is cleared by Linux when the uid changes: a
caller that relies on it sets it again after :func:`enter`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

#: Dedicated uids are taken from [UID_BASE, UID_BASE + UID_SPAN): far above any uid a
#: distribution gives a user or a system account, below the 32-bit "no uid" value.
UID_BASE: Final = 1_600_000_000
UID_SPAN: Final = 1 << 24

_CLONE_NEWNS: Final = 0x00020000
_MS_RDONLY: Final = 0x1
_MS_NOSUID: Final = 0x2
_MS_NODEV: Final = 0x4
_MS_REMOUNT: Final = 0x20
_MS_BIND: Final = 0x1000
_MS_REC: Final = 0x4000
_MS_PRIVATE: Final = 0x40000
_MNT_DETACH: Final = 0x2
_SYS_PIVOT_ROOT: Final = 155  # x86-64
_PR_CAPBSET_DROP: Final = 24
_PR_SET_DUMPABLE: Final = 4
_PR_GET_DUMPABLE: Final = 3
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_GET_NO_NEW_PRIVS: Final = 39


class JailError(Exception):
    """A jail could not be entered, or a spec is malformed."""


def uid_for(stack: str, driver: str) -> int:
    """The dedicated uid of driver ``driver`` of the stack at ``stack`` (its run directory):
    the same for every instance, spare and swap candidate of that driver, and (with odds of
    one in 16 million for a pair) different from every other driver's on the host."""
    return UID_BASE + zlib.crc32(f"{stack}\0{driver}".encode()) % UID_SPAN


def gid_for(stack: str) -> int:
    """The gid every driver of the stack at ``stack`` runs with: the group the kernel's
    driver sockets are opened to."""
    return UID_BASE + zlib.crc32(f"{stack}\0".encode()) % UID_SPAN


@dataclass(frozen=True)
class JailSpec:
    """What a driver process keeps.  Paths are absolute; a listed path that does not exist is
    skipped (an optional library directory), except the writable ones."""

    uid: int
    gid: int
    #: Where the new root is built: an existing empty directory the driver may not otherwise
    #: reach (its tmpfs is mounted over it inside the namespace only).
    scratch: str
    readonly: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    nofile: int = 256
    nproc: int = 64
    address_space: int | None = 8 << 30

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JailSpec:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise JailError(f"the jail spec is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise JailError("the jail spec must be a JSON object")
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(raw) - known)
        if extra:
            raise JailError(f"the jail spec has unknown keys: {', '.join(extra)}")
        try:
            spec = cls(
                uid=int(raw["uid"]),
                gid=int(raw["gid"]),
                scratch=str(raw["scratch"]),
                readonly=tuple(str(p) for p in raw.get("readonly", ())),
                writable=tuple(str(p) for p in raw.get("writable", ())),
                nofile=int(raw.get("nofile", 256)),
                nproc=int(raw.get("nproc", 64)),
                address_space=(
                    None if raw.get("address_space") is None else int(raw["address_space"])
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise JailError(f"the jail spec is malformed: {e!r}") from None
        for p in (spec.scratch, *spec.readonly, *spec.writable):
            if not os.path.isabs(p):
                raise JailError(f"the jail spec's path {p!r} is not absolute")
        if spec.uid <= 0 or spec.gid <= 0:
            raise JailError("a jail's uid and gid must not be root's")
        return spec


@dataclass
class Entered:
    """What :func:`enter` did (for the driver's log)."""

    uid: int
    gid: int
    paths: list[str] = field(default_factory=list)


def python_paths() -> list[str]:
    """The directories this interpreter imports from: its installation and every
    ``sys.path`` directory (the project's sources among them, for an editable install)."""
    here = str(Path(__file__).resolve().parents[1])
    out: list[str] = [here]  # an editable install finds the project through its finder
    cwd = os.getcwd()
    for p in (sys.base_prefix, sys.prefix, sys.exec_prefix, *sys.path):
        # not the directory ``python -m`` or a script put first (the caller's, anything)
        if not p or not os.path.isabs(p) or p == cwd or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        if real != "/":
            out.append(real)
    return out


def system_paths() -> list[str]:
    """What a dynamically linked Python needs from the system, read-only."""
    return ["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc"]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(e)} (errno {errno.errorcode.get(e, e)})")


def _mount(
    libc: ctypes.CDLL, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None
) -> None:
    rc = libc.mount(
        None if src is None else src.encode(),
        dst.encode(),
        None if fstype is None else fstype.encode(),
        ctypes.c_ulong(flags),
        None if data is None else data.encode(),
    )
    _check(rc, f"mount {src or fstype} on {dst}")


def _minimal(paths: list[str]) -> list[str]:
    """The paths with every one inside another dropped (a bind of the outer covers it)."""
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return sorted(out)


def _bind(libc: ctypes.CDLL, src: str, target: str) -> None:
    real = os.path.realpath(src)
    if os.path.isdir(real):
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        with open(target, "a"):
            pass
    _mount(libc, real, target, None, _MS_BIND | _MS_REC, None)


def _build_root(libc: ctypes.CDLL, spec: JailSpec) -> list[str]:
    """Step 2: a private mount namespace whose root holds only the spec's paths."""
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE, None)
    new = spec.scratch
    _mount(libc, "tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    readonly = [p for p in spec.readonly if os.path.exists(p)]
    for p in spec.writable:
        if not os.path.exists(p):
            raise JailError(f"the jail's writable path {p} does not exist")
    mounted: list[str] = []
    for p in _minimal(readonly):
        _bind(libc, p, new + p)
        if p not in ("/dev", "/proc"):  # device nodes and /proc/self need no write access
            _mount(libc, None, new + p, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None)
        mounted.append(p)
    # a writable path inside a read-only bind gets a read-write bind of its own on top
    for p in spec.writable:
        _bind(libc, p, new + p)
        mounted.append(p)
    os.chdir(new)
    _check(libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", _MNT_DETACH), "detaching the old root")
    os.chdir("/")
    _mount(libc, None, "/", None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None)
    return mounted


def _limits(spec: JailSpec) -> None:
    """Step 1."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (spec.nofile, spec.nofile))
        resource.setrlimit(resource.RLIMIT_NPROC, (spec.nproc, spec.nproc))
        if spec.address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (spec.address_space, spec.address_space))
    except (ValueError, OSError) as e:
        raise JailError(f"setting the jail's resource limits: {e}") from None


def _identity(libc: ctypes.CDLL, spec: JailSpec) -> None:
    """Step 3 (and the capability bounding set emptied first, as Firecracker's jailer does:
    nothing can bring a capability back)."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    try:
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
    except OSError as e:
        raise JailError(f"taking the jail's identity {spec.uid}:{spec.gid}: {e}") from None


def capabilities() -> dict[str, int]:
    """This process's capability sets (``CapInh``, ``CapPrm``, ``CapEff``, ``CapBnd``,
    ``CapAmb``) from ``/proc/self/status``."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cap"):
                k, v = line.split(":", 1)
                out[k] = int(v.strip(), 16)
    return out


def enter(spec: JailSpec) -> Entered:
    """Enter the jail ``spec`` describes (as root, once, before any backend code runs)."""
    if os.geteuid() != 0:
        raise JailError(
            "entering a jail needs root (the stack's supervisor runs as uid "
            f"{os.geteuid()}): run the stack as root, or choose "
            'isolation = "process-unjailed"'
        )
    libc = _libc()
    _limits(spec)
    mounted = _build_root(libc, spec)
    _identity(libc, spec)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    caps = capabilities()
    if any(caps.get(k) for k in ("CapEff", "CapPrm", "CapAmb", "CapInh", "CapBnd")):
        raise JailError(f"capabilities left after entering the jail: {caps}")
    if os.getuid() != spec.uid or os.geteuid() != spec.uid:
        raise JailError(f"the jail's uid did not take: uid {os.getuid()}, euid {os.geteuid()}")
    return Entered(spec.uid, spec.gid, mounted)


def status() -> dict[str, Any]:
    """What a jailed process can say of itself (tests, ``isovisor status``)."""
    libc = _libc()
    caps = capabilities()
    root_entries: list[str] = []
    with contextlib.suppress(OSError):
        root_entries = sorted(os.listdir("/"))
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "no_new_privs": libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        "dumpable": libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0),
        "cap_eff": caps.get("CapEff", -1),
        "cap_bnd": caps.get("CapBnd", -1),
        "root": root_entries,
    }
