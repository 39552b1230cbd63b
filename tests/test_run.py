"""`isovisor run`: real guests run to completion in a private kernel process."""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import pytest

from tests.conftest import cli, domain_toml, write
from tests.guestdata import xorshift_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def run(tmp_path: Path, name: str, image: str, *args: str, **keys: object):
    cfg = write(tmp_path / f"{name}.toml", domain_toml(name, image, **keys))
    return cli("run", str(cfg), *args)


def test_hello_prints_and_exits_zero(tmp_path: Path) -> None:
    r = run(tmp_path, "hi", "hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Hello from hi (domid 1)!", "hello: done"]


def test_crc32_guest_matches_zlib(tmp_path: Path) -> None:
    r = run(tmp_path, "crc", "crc32", memory=8, extra="bytes=65536 seed=12345 rounds=3")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    want = zlib.crc32(xorshift_bytes(65536, 12345))
    assert line.startswith(f"crc32: bytes=65536 seed=12345 rounds=3 crc=0x{want:08x} ns="), line


def test_primes_guest(tmp_path: Path) -> None:
    r = run(tmp_path, "p", "primes", extra="n=100000")
    assert (r.returncode, r.stdout.strip()) == (0, "primes: below 100000: 9592")


def test_guest_exit_code_is_propagated(tmp_path: Path) -> None:
    r = run(tmp_path, "c", "crash", extra="mode=nonsense")
    assert r.returncode == 2
    assert "crash: unknown mode" in r.stdout


def test_timeout_stops_a_guest_that_runs_forever(tmp_path: Path) -> None:
    r = run(tmp_path, "t", "ticker", "--timeout", "1", extra="interval_ms=100")
    assert r.returncode == 124
    assert "ticker: tick 1 " in r.stdout
    assert "still running after the timeout" in r.stderr


def test_virtual_time_advances_with_sleeps(tmp_path: Path) -> None:
    r = run(tmp_path, "t", "ticker", extra="interval_ms=50 count=4")
    assert r.returncode == 0, r.stderr
    times = [int(line.rsplit("=", 1)[1]) for line in r.stdout.splitlines()]
    assert len(times) == 4
    assert all(b > a for a, b in itertools.pairwise(times))  # monotonic
    assert times[-1] >= 200  # four sleeps of 50 ms


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("ud", "invalid opcode (#UD)"),
        ("wild", "write to 0x40000000000"),
        ("null", "the NULL guard page"),
        ("nullwrite", "write to 0x8 (8 bytes) at rip="),
        ("nullexec", "instruction fetch from 0x10 "),
        ("pastram", "outside guest RAM (0..0x400000) and its device regions"),
        ("divzero", "divide error (#DE)"),
        ("jump", "instruction fetch from 0x7f0000000000"),
        ("hang", "watchdog expired"),
        ("self", "guest reported a crash"),
    ],
)
def test_faults_end_the_guest_with_a_reason(tmp_path: Path, mode: str, reason: str) -> None:
    r = run(tmp_path, f"c-{mode}", "crash", extra=f"mode={mode}")
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert f"crash: mode={mode}" in r.stdout
    assert reason in r.stderr


def test_code_written_at_run_time_runs_as_written(tmp_path: Path) -> None:
    """Fresh code on the heap rewritten before each call, the image's own text patched, an
    instruction patching the next one in its block, and a page both stored to and run: no
    stale translation ever runs (kernel/fasttlb.py keeps stores into code on the slow path)."""
    r = run(tmp_path, "smc", "smc", extra="rounds=2000")
    assert r.returncode == 0, (r.stdout, r.stderr)
    for check in ("fresh", "text", "inline", "data"):
        assert f"smc: {check} ok=2000 bad=0" in r.stdout, r.stdout
    assert "smc: done bad=0" in r.stdout


def test_bad_hypercalls_get_errors_not_crashes(tmp_path: Path) -> None:
    r = run(tmp_path, "bad", "badcalls")
    assert r.returncode == 0, r.stderr
    got = dict(line.split(": ", 1)[1].split("=") for line in r.stdout.splitlines() if "=" in line)
    assert got == {
        "unknown": "-38",
        "efault": "-14",
        "null_ptr": "-14",
        "huge": "-90",
        "wrap": "-14",
    }
    assert r.stdout.splitlines()[-1] == "badcalls: done"


def test_image_larger_than_memory_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x90" * (3 * 1024 * 1024))
    cfg = write(tmp_path / "big.toml", 'name = "big"\nimage = "big.bin"\nmemory = 4\n')
    r = cli("run", str(cfg))
    assert r.returncode == 1
    assert "does not fit in domain 'big' with memory = 4 MiB" in r.stderr
    assert "raise 'memory'" in r.stderr


def test_raw_image_file_runs(tmp_path: Path) -> None:
    # hlt-free, hypercall-only image: mov [HCALL_BLOCK], SHUTDOWN ... written by hand
    from kernel import abi

    code = bytes.fromhex(
        "48c70425"
        + abi.HCALL_BLOCK_ADDR.to_bytes(4, "little").hex()
        + abi.HC_SHUTDOWN.to_bytes(4, "little").hex()  # mov qword [block+0], HC_SHUTDOWN
        + "48c70425"
        + (abi.HCALL_BLOCK_ADDR + 8).to_bytes(4, "little").hex()
        + "00000000"  # args[0] = POWEROFF
        + "48c70425"
        + (abi.HCALL_BLOCK_ADDR + 16).to_bytes(4, "little").hex()
        + "07000000"  # args[1] = 7
        + "0f05"  # syscall
        + "ebfe"
    )  # jmp $
    (tmp_path / "raw.bin").write_bytes(code)
    cfg = write(tmp_path / "raw.toml", 'name = "raw"\nimage = "raw.bin"\nmemory = 2\n')
    assert cli("run", str(cfg)).returncode == 7


def test_run_follows_restarts_until_the_restart_limit(tmp_path: Path) -> None:
    r = run(tmp_path, "loop", "crash", extra="mode=ud", on_crash="restart")
    assert r.returncode == 125
    assert r.stdout.count("crash: mode=ud") == 6  # first boot + 5 restarts
    assert r.stderr.count("); restarting\n") == 5
    assert "not restarting again" in r.stderr
