"""The keeper: a driver process's address space outlives the driver by a few milliseconds, so
that its death is seen at once (docs/recovery.md, "The keeper").

On this kind of machine a process that dies spends most of its exit unmapping its memory:
about 3.2 ms for a 26 MiB driver here (0.4 ms per MiB of its own memory), before its pidfd
becomes readable and the supervisor can start the recovery.  A second process that shares the
memory (``clone(CLONE_VM)``) takes that cost off the path: while it lives the memory has two
users, so the dying driver only drops its reference, closes its files (releasing its locks)
and is gone.  The keeper (``drivers/keeper.c``) holds no file but the driver's pidfd, waits on
it, lingers 250 ms while the recovery runs, and ends at nice 19, paying for the teardown where
it delays nobody.

The supervisor builds the keeper once (:func:`build`, with the machine's C compiler, cached
beside the guests) and passes it to each driver process (``--keeper PATH``); the driver starts
it first thing (:func:`start`).  A keeper is the driver's child; when the driver ends it is
re-parented to the supervisor (a child subreaper), which reaps it (:func:`reap`).  Without a C
compiler there are no keepers: recovery works the same, only later.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Final

#: The keeper's name (``/proc/<pid>/comm``): its command line is its driver's (one memory).
NAME: Final = "iv-keeper"
SOURCE: Final = Path(__file__).with_name("keeper.c")
CFLAGS: Final = ("-O2", "-fPIC", "-shared", "-nostdlib", "-fno-stack-protector")
_STACK_BYTES: Final = 64 << 10
_CLONE_VM: Final = 0x100
_PR_SET_CHILD_SUBREAPER: Final = 36

#: Kept for the life of the process: the keepers' stacks, and the libraries their code is in.
_alive: list[object] = []


class KeeperError(Exception):
    """The keeper cannot be built or started (the message says why)."""


def build(cache_dir: Path, cc: str | None = None) -> Path:
    """The keeper library, compiled into ``cache_dir`` unless a copy of this source with these
    flags is there already."""
    compiler = cc or os.environ.get("CC", "").strip() or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise KeeperError("no C compiler (tried $CC, gcc, cc): install gcc, or set CC")
    try:
        key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(CFLAGS).encode()).hexdigest()[:16]
        lib = cache_dir / f"keeper-{key}.so"
        if lib.exists():
            return lib
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keeper-", suffix=".so", dir=cache_dir)
        os.close(fd)
    except OSError as e:
        raise KeeperError(f"cannot build the keeper into {cache_dir}: {e}") from e
    try:
        r = subprocess.run(
            [*compiler.split(), *CFLAGS, "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise KeeperError(f"{compiler} could not build {SOURCE}: {r.stderr.strip()[-500:]}")
        os.replace(tmp, lib)  # atomic: a concurrent build loses nothing
    except (OSError, subprocess.SubprocessError) as e:
        raise KeeperError(f"cannot run {compiler} to build {SOURCE}: {e}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib


def load(lib: Path) -> ctypes.CDLL:
    """Load the keeper library ``lib`` (before a jail hides its path: drivers/jail.py)."""
    try:
        code = ctypes.CDLL(str(lib))
        code.isovisor_keeper  # noqa: B018  (the entry point must be there)
    except (OSError, AttributeError) as e:
        raise KeeperError(f"cannot load the keeper from {lib}: {e}") from e
    return code


def start(lib: Path | ctypes.CDLL) -> int:
    """Start this process's keeper from library ``lib`` (a path, or what :func:`load` gave);
    its pid.  A jailed driver starts it after entering its jail, so that the keeper, which
    shares its memory, has no more privileges than the driver."""
    code = lib if isinstance(lib, ctypes.CDLL) else load(lib)
    fn = ctypes.cast(code.isovisor_keeper, ctypes.c_void_p)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.clone.restype = ctypes.c_int
    libc.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    stack = mmap.mmap(-1, _STACK_BYTES)
    top = ctypes.addressof(ctypes.c_char.from_buffer(stack)) + _STACK_BYTES
    pidfd = os.pidfd_open(os.getpid())
    everything = set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, everything)  # the keeper inherits the mask
    try:
        pid = libc.clone(fn, top, _CLONE_VM | signal.SIGCHLD, pidfd)
        err = ctypes.get_errno()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(pidfd)  # the keeper has its own copy
    if pid < 0:
        raise KeeperError(f"clone failed: {os.strerror(err)}")
    _alive.extend((stack, code))
    return int(pid)


def become_subreaper() -> None:
    """Make this process (the supervisor) the reaper of its descendants' orphans: the keepers
    of its drivers come to it when their drivers end."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise KeeperError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def reap(kill: bool = False) -> int:
    """Reap this process's children that are ended keepers (with ``kill``, end the others
    first: at the supervisor's end, their drivers are gone); how many."""
    n = 0
    for pid in _children():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) S ...": the comm is in parentheses, the state follows
        comm, _, rest = stat.partition(b"(")[2].rpartition(b")")
        if comm != NAME.encode():
            continue
        if rest.split()[:1] != [b"Z"]:
            if not kill:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            if os.waitpid(pid, 0 if kill else os.WNOHANG)[0] == pid:
                n += 1
        except ChildProcessError:
            pass
    return n


def _children() -> list[int]:
    out: list[int] = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out
