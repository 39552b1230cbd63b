"""The driver jail (drivers/jail.py): a forked child enters a jail and tries what a
compromised backend would; every attempt must fail, and what it was handed must still work.

Root only (entering a jail needs it; a non-root stack is refused, which is tested too)."""

from __future__ import annotations

import ctypes
import json
import os
import select
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drivers import jail

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="entering a jail needs root")

_PTRACE_ATTACH = 16


def _in_child(fn: Callable[[], dict[str, Any]], timeout: float = 30.0) -> dict[str, Any]:
    """Run ``fn`` in a forked child; its result (or its exception, as text) through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            out: dict[str, Any] = fn()
        except BaseException as e:
            out = {"raised": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    try:
        data = b""
        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            if not ready:
                os.kill(pid, 9)
                raise AssertionError(f"the jailed child gave no answer in {timeout} s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert data, "the jailed child died without an answer"
    result: dict[str, Any] = json.loads(data)
    return result


def _errno_of(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return type(e).__name__
    except MemoryError:
        return "MemoryError"
    return "allowed"


@pytest.fixture
def cell(tmp_path: Path) -> tuple[jail.JailSpec, Path, Path]:
    """A spec with its own writable directory, and a secret file outside it."""
    stack = str(tmp_path)
    uid, gid = jail.uid_for(stack, "blk0"), jail.gid_for(stack)
    scratch = tmp_path / "root"
    own = tmp_path / "own"
    scratch.mkdir()
    own.mkdir()
    os.chown(own, uid, gid)
    secret = tmp_path / "other-disk.img"
    secret.write_bytes(b"another guest's disk")
    secret.chmod(0o644)
    spec = jail.JailSpec(
        uid=uid,
        gid=gid,
        scratch=str(scratch),
        readonly=(*jail.python_paths(), *jail.system_paths(), "/dev", "/proc"),
        writable=(str(own),),
        nproc=8,
        nofile=64,
    )
    return spec, own, secret


@pytest.fixture
def segment() -> Any:
    """A root-owned 0600 file under /dev/shm, as the kernel makes a guest's RAM segment."""
    path = Path(f"/dev/shm/isovisor.jailtest.{os.getpid()}.ram")
    path.write_bytes(b"guest RAM: the ticker guest's name")
    path.chmod(0o600)
    yield path
    path.unlink(missing_ok=True)


def test_a_jailed_process_reaches_nothing_it_was_not_handed(
    cell: tuple[jail.JailSpec, Path, Path], segment: Path
) -> None:
    spec, own, secret = cell
    parent = os.getpid()
    assert "xml.dom.minidom" not in sys.modules

    def probe() -> dict[str, Any]:
        jail.enter(spec)
        libc = ctypes.CDLL(None, use_errno=True)
        out: dict[str, Any] = {"status": jail.status()}
        out["segment"] = _errno_of(lambda: segment.read_bytes())
        out["parent_mem"] = _errno_of(lambda: open(f"/proc/{parent}/mem", "rb").close())
        out["ptrace"] = (
            "allowed"
            if libc.ptrace(_PTRACE_ATTACH, parent, None, None) == 0
            else os.strerror(ctypes.get_errno())
        )
        out["signal"] = _errno_of(lambda: os.kill(parent, 0))
        out["other_disk"] = _errno_of(lambda: secret.read_bytes())
        out["root_home"] = _errno_of(lambda: os.listdir("/root/.cache"))
        out["write_sources"] = _errno_of(
            lambda: open(Path(jail.__file__).with_name("evil.py"), "w").close()
        )
        (own / "state").write_text("mine")
        out["own"] = (own / "state").read_text()
        import xml.dom.minidom  # noqa: F401  (imported after the jail: the sources are there)

        out["imported"] = "xml.dom.minidom" in sys.modules
        return out

    got = _in_child(probe)
    assert "raised" not in got, got
    st = got["status"]
    assert (st["uid"], st["gid"], st["groups"]) == (spec.uid, spec.gid, [])
    assert (st["no_new_privs"], st["dumpable"], st["cap_eff"], st["cap_bnd"]) == (1, 0, 0, 0)
    assert got["segment"] == "PermissionError"  # the guest's RAM, root's and 0600
    assert got["parent_mem"] == "PermissionError"  # the supervisor's memory
    assert got["ptrace"] == "Operation not permitted"
    assert got["signal"] == "PermissionError"
    assert got["other_disk"] == "FileNotFoundError"  # world-readable, but no path to it
    assert got["root_home"] == "FileNotFoundError"
    assert got["write_sources"] == "OSError"  # EROFS: the sources are read-only
    assert got["own"] == "mine"
    assert got["imported"] is True
    assert (own / "state").stat().st_uid == spec.uid


def test_the_jails_limits_hold(cell: tuple[jail.JailSpec, Path, Path]) -> None:
    spec, _, _ = cell

    def probe() -> dict[str, Any]:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
        limited = jail.JailSpec(**{**spec.__dict__, "address_space": vm + (64 << 20)})
        jail.enter(limited)
        out: dict[str, Any] = {}
        out["memory"] = _errno_of(lambda: bytearray(512 << 20))
        fds: list[int] = []

        def many_files() -> None:
            while len(fds) < 1000:
                fds.append(os.open("/dev/null", os.O_RDONLY))

        out["files"] = _errno_of(many_files)
        for fd in fds:
            os.close(fd)
        r, w = os.pipe()
        kids: list[int] = []

        def many_processes() -> None:
            while len(kids) < 50:
                pid = os.fork()
                if pid == 0:
                    os.close(w)  # so that the read ends when the jailed process closes it
                    os.read(r, 1)
                    os._exit(0)
                kids.append(pid)

        out["processes"] = _errno_of(many_processes)
        out["forked"] = len(kids)
        os.close(w)
        for pid in kids:
            os.waitpid(pid, 0)
        return out

    got = _in_child(probe)
    assert "raised" not in got, got
    assert got["memory"] == "MemoryError"
    assert got["files"] == "OSError"  # EMFILE
    assert got["processes"] == "BlockingIOError"  # EAGAIN at the jail's nproc
    assert got["forked"] < spec.nproc


def test_a_jail_is_refused_to_a_process_that_is_not_root(
    cell: tuple[jail.JailSpec, Path, Path],
) -> None:
    spec, _, _ = cell

    def probe() -> dict[str, Any]:
        os.setresuid(65534, 65534, 65534)
        jail.enter(spec)
        return {}

    got = _in_child(probe)
    assert got["raised"].startswith("JailError: entering a jail needs root")
    assert 'isolation = "process-unjailed"' in got["raised"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"uid": 5, "gid": 5, "scratch": "/x", "color": 1}', "unknown keys: color"),
        ('{"uid": 5, "gid": 5, "scratch": "x"}', "path 'x' is not absolute"),
        ('{"uid": 0, "gid": 5, "scratch": "/x"}', "must not be root's"),
        ('{"gid": 5, "scratch": "/x"}', "malformed"),
    ],
)
def test_a_bad_jail_spec_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(jail.JailError, match=says):
        jail.JailSpec.from_json(text)


def test_a_spec_survives_its_json_and_ids_are_per_driver(
    cell: tuple[jail.JailSpec, Path, Path],
) -> None:
    spec, _, _ = cell
    assert jail.JailSpec.from_json(spec.to_json()) == spec
    assert jail.uid_for("/run/a", "blk0") == jail.uid_for("/run/a", "blk0")
    assert jail.uid_for("/run/a", "blk0") != jail.uid_for("/run/a", "net0")
    assert jail.uid_for("/run/a", "blk0") != jail.uid_for("/run/b", "blk0")
    assert jail.UID_BASE <= jail.uid_for("/run/a", "blk0") < jail.UID_BASE + jail.UID_SPAN
