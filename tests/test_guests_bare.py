"""Guest runtime, guest programs and domains/build.py, run on bare unicorn (no kernel)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.bare_unicorn import BareResult, run_bare
from domains import build
from domains.build import GUEST_PROGRAMS, BuildError
from kernel import abi
from tests.guestdata import xorshift_bytes

EXPECTED_PROGRAMS = {
    "hello",
    "crc32",
    "primes",
    "ticker",
    "busy",
    "hcbench",
    "crash",
    "badcalls",
    "blkstress",
    "blkprobe",
    "rmwcount",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest-cache")


@pytest.fixture(scope="module")
def images(cache_dir: Path) -> dict[str, Path]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = pool.map(lambda n: build.build_guest(n, cache_dir=cache_dir), GUEST_PROGRAMS)
        return dict(zip(GUEST_PROGRAMS, paths, strict=True))


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "cache"
    monkeypatch.setenv("ISOVISOR_CACHE_DIR", str(d))
    yield d


def run(image: Path, extra: str = "", mem_mib: int = 4, name: str = "bare") -> BareResult:
    res = run_bare(image, mem_mib, extra, name=name, timeout_s=20)
    assert res.error is None, f"{res.error}\n{res.output}"
    return res


# --- building ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_builds_every_program(images: dict[str, Path]) -> None:
    assert set(GUEST_PROGRAMS) >= EXPECTED_PROGRAMS
    for name, path in images.items():
        data = path.read_bytes()
        assert path.suffix == ".bin" and name in path.name
        assert 0 < len(data) < 64 * 1024
        assert data[0] == 0xFC, f"{name}: _start (cld) is not the first byte"
        assert path.with_suffix(".elf").is_file()
    # a cache hit returns the same file without rebuilding
    first = images["hello"]
    mtime = first.stat().st_mtime_ns
    assert build.build_guest("hello", cache_dir=first.parent) == first
    assert first.stat().st_mtime_ns == mtime


@pytest.mark.timeout(60)
def test_no_sse_in_guest_code(images: dict[str, Path]) -> None:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    for name, path in images.items():
        dis = subprocess.run(
            [objdump, "-d", str(path.with_suffix(".elf"))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "xmm" not in dis and "ymm" not in dis, f"{name} uses SSE/AVX registers"


#: Rebuilt in a second cache: one program per frontend of the runtime (block, net, console,
#: rng) and the plainest one (every program is built the same way; a rebuild of all 16 took
#: 19 s of the suite).
REBUILT = ("hello", "blkstress", "netpair", "conecho", "rngtest")


@pytest.mark.timeout(60)
def test_builds_are_reproducible(images: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other-cache"
    with ThreadPoolExecutor(max_workers=4) as pool:
        again = dict(
            zip(
                REBUILT,
                pool.map(lambda n: build.build_guest(n, cache_dir=other), REBUILT),
                strict=True,
            )
        )
    for name in REBUILT:
        assert again[name].parent == other
        assert again[name].name == images[name].name
        assert again[name].read_bytes() == images[name].read_bytes(), name


@pytest.mark.timeout(60)
def test_missing_cc_is_an_error_naming_cc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/bin/gcc-does-not-exist")
    cache = tmp_path / "cache"
    with pytest.raises(BuildError) as exc:
        build.build_guest("hello", cache_dir=cache)
    msg = str(exc.value)
    assert "CC" in msg and "/nonexistent/bin/gcc-does-not-exist" in msg
    assert not cache.exists() or not list(cache.glob("*.bin"))


@pytest.mark.timeout(60)
def test_no_compiler_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError, match=r"no C compiler found .*apt-get install gcc"):
        build.build_guest("hello", cache_dir=tmp_path / "cache")


@pytest.mark.timeout(60)
def test_compile_error_names_source_and_shows_stderr(user_cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "broken.c"
    src.write_text('#include "isovisor.h"\nint main(void) { return undefined_thing; }\n')
    with pytest.raises(BuildError) as exc:
        build.build_source(src)
    msg = str(exc.value)
    assert str(src) in msg and "undefined_thing" in msg
    assert not list(user_cache.glob("*.bin"))


@pytest.mark.timeout(60)
def test_resolve_image(user_cache: Path, tmp_path: Path) -> None:
    hello = build.resolve_image("hello", tmp_path)
    assert hello.parent == user_cache and hello.read_bytes()[0] == 0xFC
    (tmp_path / "mine.c").write_text(
        '#include "isovisor.h"\nint main(void) { puts("mine: ok"); return 3; }\n'
    )
    mine = build.resolve_image("mine.c", tmp_path)
    assert mine.parent == user_cache and mine.name.startswith("mine-")
    res = run(mine)
    assert res.output == "mine: ok\n" and res.exit_code == 3
    # a flat binary path is returned as is (relative to base_dir)
    (tmp_path / "img.bin").write_bytes(hello.read_bytes())
    assert build.resolve_image("img.bin", tmp_path) == tmp_path / "img.bin"
    with pytest.raises(BuildError) as exc:
        build.resolve_image("no/such/image.bin", tmp_path)
    assert str(tmp_path / "no/such/image.bin") in str(exc.value)
    assert all(p in str(exc.value) for p in GUEST_PROGRAMS)
    with pytest.raises(BuildError, match=r"nope\.c"):
        build.resolve_image("nope.c", tmp_path)
    # editing the source rebuilds into a new cache entry
    (tmp_path / "mine.c").write_text(
        '#include "isovisor.h"\nint main(void) { puts("mine: v2"); return 0; }\n'
    )
    mine2 = build.resolve_image("mine.c", tmp_path)
    assert mine2 != mine and run(mine2).output == "mine: v2\n"


# --- running the programs ------------------------------------------------------


@pytest.mark.timeout(60)
def test_hello(images: dict[str, Path]) -> None:
    res = run(images["hello"], name="dom-hello")
    assert res.lines == ["Hello from dom-hello (domid 0)!", "hello: done"]
    assert res.reason == abi.SHUTDOWN_POWEROFF and res.exit_code == 0
    # line-buffered console: one hypercall per line, plus the shutdown
    assert res.hypercalls == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("nbytes", "seed", "rounds"), [(65536, 7, 2), (1000, 0, 1), (0, 3, 1)])
def test_crc32_matches_zlib(images: dict[str, Path], nbytes: int, seed: int, rounds: int) -> None:
    import zlib

    res = run(images["crc32"], f"bytes={nbytes} seed={seed} rounds={rounds}")
    assert res.exit_code == 0
    m = re.fullmatch(
        r"crc32: bytes=(\d+) seed=(\d+) rounds=(\d+) crc=0x([0-9a-f]{8}) ns=(\d+)",
        res.output.strip(),
    )
    assert m, res.output
    assert (int(m[1]), int(m[2]), int(m[3])) == (nbytes, seed, rounds)
    assert int(m[4], 16) == zlib.crc32(xorshift_bytes(nbytes, seed))


@pytest.mark.timeout(60)
def test_crc32_too_big_crashes_cleanly(images: dict[str, Path]) -> None:
    res = run(images["crc32"], "bytes=8M", mem_mib=2)
    assert res.reason == abi.SHUTDOWN_CRASH
    assert "does not fit" in res.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("n", "count"), [(100000, 9592), (2, 0), (3, 1), (10, 4), (0x100, 54)])
def test_primes(images: dict[str, Path], n: int, count: int) -> None:
    res = run(images["primes"], f"n={n}")
    assert res.lines == [f"primes: below {n}: {count}"] and res.exit_code == 0


@pytest.mark.timeout(60)
def test_hcbench(images: dict[str, Path]) -> None:
    res = run(images["hcbench"], "calls=2000")
    assert re.fullmatch(r"hcbench: calls=2000 ns_per_call=\d+\.\d{3}", res.output.strip())
    assert res.exit_code == 0 and res.hypercalls >= 2000


@pytest.mark.timeout(60)
def test_badcalls(images: dict[str, Path]) -> None:
    res = run(images["badcalls"], mem_mib=2)
    assert res.exit_code == 0
    keys = [ln.split("=")[0] for ln in res.lines if ln.startswith("badcalls: ")]
    assert keys == [
        "badcalls: unknown",
        "badcalls: efault",
        "badcalls: null_ptr",
        "badcalls: huge",
        "badcalls: wrap",
        "badcalls: done",
    ]
    assert f"badcalls: unknown={-abi.ENOSYS}" in res.lines


@pytest.mark.timeout(60)
def test_ticker_counts(images: dict[str, Path]) -> None:
    res = run(images["ticker"], "interval_ms=5 count=3")
    assert [ln.split(" vtime_ms=")[0] for ln in res.lines] == [
        f"ticker: tick {k}" for k in (1, 2, 3)
    ]
    vt = [int(ln.split("vtime_ms=")[1]) for ln in res.lines]
    assert vt == sorted(vt) and vt[-1] >= 15


@pytest.mark.timeout(60)
def test_busy_spins_without_hypercalls(images: dict[str, Path]) -> None:
    res = run_bare(images["busy"], 2, "", timeout_s=0.3)
    assert res.lines == ["busy: started"] and res.reason is None
    assert res.hypercalls == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "fault"),
    [
        ("ud", "UC_ERR_INSN_INVALID"),
        ("wild", "UC_ERR_WRITE_UNMAPPED"),
        ("null", "UC_ERR_READ_UNMAPPED"),
        ("divzero", "UC_ERR_EXCEPTION"),
        ("jump", "UC_ERR_FETCH_UNMAPPED"),
    ],
)
def test_crash_modes_fault(images: dict[str, Path], mode: str, fault: str) -> None:
    res = run_bare(images["crash"], 2, f"mode={mode}", timeout_s=5)
    assert res.lines == [f"crash: mode={mode}"]
    assert res.error is not None and fault in res.error


@pytest.mark.timeout(60)
def test_crash_self_and_unknown(images: dict[str, Path]) -> None:
    res = run(images["crash"], "mode=self")
    assert res.lines == ["crash: mode=self", "crash: self-reported"]
    assert res.reason == abi.SHUTDOWN_CRASH
    res = run(images["crash"], "mode=bogus")
    assert res.lines == ["crash: mode=bogus", "crash: unknown mode"]
    assert res.reason == abi.SHUTDOWN_POWEROFF and res.exit_code == 2


# --- the runtime ------------------------------------------------------------------

# (format, C arguments, Python arguments); Python's % formatting (without the length
# modifiers) is C's for these.
PRINTF_CASES: list[tuple[str, str, tuple[object, ...]]] = [
    ("%d|%i|%d", "0, -5, 2147483647", (0, -5, 2147483647)),
    ("%d", "(int)0x80000000u", (-2147483648,)),
    ("[%5d|%-5d|%05d|%-05d]", "42, 42, 42, 42", (42, 42, 42, 42)),
    ("[%05d|%5d|%.5d|%+d|%8.3d]", "-42, -42, 42, 5, -7", (-42, -42, 42, 5, -7)),
    (
        "%ld|%lld|%lu",
        "(long)(-9223372036854775807L - 1), -1LL, 18446744073709551615UL",
        (-9223372036854775808, -1, 18446744073709551615),
    ),
    (
        "%x|%X|%08x|%lx|%llX",
        "255u, 255u, 0xbeefu, 0xdeadbeefcafeUL, 0xabcULL",
        (255, 255, 0xBEEF, 0xDEADBEEFCAFE, 0xABC),
    ),
    ("%u|%zu|%zd", "4294967295u, (size_t)12345, (long)-3", (4294967295, 12345, -3)),
    (
        "[%s|%10s|%-10s|%.3s|%s]",
        '"hello", "hi", "hi", "hello", ""',
        ("hello", "hi", "hi", "hel", ""),
    ),
    ("[%c|%3c|%-3c]", "'A', 'b', 'c'", ("A", "b", "c")),
    ("100%% [%*d] [%-*d]", "6, 42, 4, 7", (6, 42, 4, 7)),
]


@pytest.mark.timeout(60)
def test_printf_subset(user_cache: Path, tmp_path: Path) -> None:
    body = []
    expected = []
    for fmt, cargs, pyargs in PRINTF_CASES:
        body.append(f'    printf("{fmt}\\n", {cargs});')
        expected.append(re.sub(r"(?:ll|l|z)(?=[diuxX])", "", fmt) % pyargs)
    body.append('    printf("%p|%p\\n", (void *)0x1234, (void *)0);')
    expected.append("0x1234|0x0")
    body.append(
        '    char b[8]; int n = snprintf(b, 5, "%s", "hello world");'
        ' printf("snprintf %d [%s]\\n", n, b);'
    )
    expected.append("snprintf 11 [hell]")
    # longer than the console buffer, and longer than CONSOLE_WRITE_MAX
    body.append("    for (int i = 0; i < 3000; i++) putchar('a' + i % 26); putchar('\\n');")
    expected.append("".join(chr(ord("a") + i % 26) for i in range(3000)))
    body.append(
        "    static char big[10001]; for (int i = 0; i < 10000; i++) big[i] = '0' + i % 10;"
        " big[10000] = '\\n'; long w = console_write(big, 10001);"
        ' printf("wrote %ld\\n", w);'
    )
    expected.append("".join(str(i % 10) for i in range(10000)))
    expected.append("wrote 10001")
    body.append('    puts("puts line"); printf("no newline at exit");')
    expected.append("puts line")
    expected.append("no newline at exit")
    src = tmp_path / "printf_test.c"
    src.write_text(
        '#include "isovisor.h"\nint main(void)\n{\n' + "\n".join(body) + "\n    return 0;\n}\n"
    )
    res = run(build.build_source(src))
    assert res.lines == expected


@pytest.mark.timeout(60)
def test_params_and_start_info(user_cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "params.c"
    src.write_text(
        """#include "isovisor.h"
int main(void)
{
    char buf[8];
    printf("a=%lu b=%lu c=%lu d=%lu flag=%lu missing=%lu\\n", param_u64("a", 1),
           param_u64("b", 2), param_u64("c", 3), param_u64("d", 4), param_u64("flag", 0),
           param_u64("missing", 99));
    printf("s=%s t=%s has=%d/%d\\n", param_str("s", "dflt", buf, sizeof buf),
           param_str("nope", "dflt", buf, sizeof buf), param_has("flag"), param_has("fla"));
    printf("name=%s domid=%lu mem=%lu cmdline=[%s]\\n", domain_name(), domid(), mem_bytes(),
           cmdline());
    printf("image=0x%lx size=%lu stack=0x%lx\\n", image_base(), image_size(), stack_top());
    void *p = heap_alloc(100, 64), *q = heap_alloc(1, 0);
    printf("heap %d %d %d\\n", ((u64)p & 63) == 0, (u64)q >= (u64)p + 100,
           heap_alloc(1ULL << 40, 0) == 0);
    param_u64("bad", 0);
    return 0;
}
"""
    )
    image = build.build_source(src)
    extra = "a=10 b=0x1F c=4k d=7 d=8 flag s=abcdefghijkl bad=12q"
    res = run_bare(image, 3, extra, name="pdom", timeout_s=10)
    assert res.lines[:6] == [
        "a=10 b=31 c=4096 d=8 flag=1 missing=99",
        "s=abcdefg t=dflt has=1/0",
        f"name=pdom domid=0 mem={3 << 20} cmdline=[{extra}]",
        f"image=0x100000 size={image.stat().st_size} stack=0x300000",
        "heap 1 1 1",
        "param bad: bad number '12q' (want decimal or 0x hex, optional k/M/G suffix)",
    ]
    assert res.reason == abi.SHUTDOWN_CRASH


@pytest.mark.timeout(60)
def test_bss_too_big_for_domain(user_cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "bigbss.c"
    src.write_text(
        '#include "isovisor.h"\nchar big[3 << 20];\n'
        "int main(void) { u64 i = 3 << 19; OPAQUE(i); big[i] = 1;"
        ' printf("big %d\\n", big[i]); return 0; }\n'
    )
    image = build.build_source(src)
    res = run(image, mem_mib=2)
    assert res.reason == abi.SHUTDOWN_CRASH and "give the domain more memory" in res.output
    res = run(image, mem_mib=8)
    assert res.lines == ["big 1"] and res.exit_code == 0
