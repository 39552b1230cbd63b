"""Build guest programs into flat images, reproducibly and with a content-addressed cache.

A guest is freestanding C (``int main(void)``) linked with the runtime in
``domains/runtime`` (entry, hypercall stubs, console, printf, parameters) by the
machine's gcc, then turned into a flat binary with ``objcopy -O binary``.  The
image is loaded at ``IMAGE_BASE`` and entered at its first byte.

The ABI header ``isovisor_abi.h`` is generated from :func:`kernel.abi.c_header`
for every build, so the guest and the kernel cannot disagree.

Images are cached in ``$ISOVISOR_CACHE_DIR`` (default ``~/.cache/isovisor/guests``)
under a name containing a sha256 over everything that goes into the build: the
runtime sources, the program source, the generated header, the flags, this file
and the ``--version`` output of the compiler and objcopy.  Editing any of them
rebuilds.  Files are written atomically (temporary file + ``os.replace``), so
parallel builds of the same program are safe, and building the same source twice
gives byte-identical images.

Command line: ``python -m domains.build [NAME|FILE.c ...]`` builds the named
programs (all built-in ones by default) and prints one line per image.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import devices
from kernel import abi

DOMAINS_DIR = Path(__file__).resolve().parent
RUNTIME_DIR = DOMAINS_DIR / "runtime"
GUESTS_DIR = DOMAINS_DIR / "guests"
LINKER_SCRIPT = RUNTIME_DIR / "guest.ld"
HEADER_NAME = "isovisor_abi.h"

#: Bump when the build procedure changes in a way the hash would not see.
BUILD_FORMAT = "isovisor-guest-build-1"

#: Names of the built-in guest programs (``domains/guests/<name>.c``).
GUEST_PROGRAMS: tuple[str, ...] = tuple(sorted(p.stem for p in GUESTS_DIR.glob("*.c")))

#: Compiler flags, in order.  ``-fno-tree-loop-distribute-patterns`` keeps gcc
#: from compiling the runtime's memset/memcpy loops into calls to themselves;
#: ``-lgcc`` (appended after the sources) supplies helpers such as 128-bit
#: division to programs that need them.
CFLAGS: tuple[str, ...] = (
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-ffreestanding",
    "-nostdlib",
    "-nostartfiles",
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-ident",
    "-fno-tree-loop-distribute-patterns",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
)
LIBS: tuple[str, ...] = ("-lgcc",)

_TIMEOUT_S = 300
_RUNTIME_SUFFIXES = (".c", ".S", ".h", ".ld")
_MISSING_CC_HINT = "install gcc, e.g. `apt-get install gcc`, or set CC"


class BuildError(Exception):
    """A guest could not be built: the message says what failed, where, and what to do."""


@dataclass(frozen=True)
class Toolchain:
    """The compiler (argv prefix, e.g. ``("gcc",)`` or ``("ccache", "gcc")``) and objcopy."""

    cc: tuple[str, ...]
    objcopy: str
    #: ``--version`` output of both tools; part of the cache key.
    version: str


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except FileNotFoundError as e:
        raise BuildError(f"{what}: cannot run {cmd[0]!r}: {e.strerror}") from e
    except PermissionError as e:
        raise BuildError(f"{what}: cannot run {cmd[0]!r}: {e.strerror}") from e
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"{what}: `{shlex.join(cmd)}` did not finish in {_TIMEOUT_S} s") from e


def _find_cc() -> tuple[str, ...]:
    env_cc = os.environ.get("CC", "").strip()
    if env_cc:
        argv = shlex.split(env_cc)
        exe = shutil.which(argv[0])
        if exe is None:
            raise BuildError(
                f"the C compiler named by CC={env_cc!r} was not found "
                f"({argv[0]!r} is not an executable file or on PATH): "
                "fix CC, or unset it to use gcc or cc from PATH"
            )
        return (exe, *argv[1:])
    for name in ("gcc", "cc"):
        exe = shutil.which(name)
        if exe is not None:
            return (exe,)
    raise BuildError(f"no C compiler found (tried $CC, gcc, cc): {_MISSING_CC_HINT}")


def _find_objcopy(cc: tuple[str, ...]) -> str:
    env = os.environ.get("OBJCOPY", "").strip()
    if env:
        exe = shutil.which(env)
        if exe is None:
            raise BuildError(
                f"the objcopy named by OBJCOPY={env!r} was not found: fix OBJCOPY or unset it"
            )
        return exe
    compiler = Path(cc[-1])
    candidates: list[str] = []
    # x86_64-linux-gnu-gcc-12 -> x86_64-linux-gnu-objcopy next to it
    m = re.match(r"^(.*-)(?:gcc|cc|clang)(?:-[\d.]+)?$", compiler.name)
    if m:
        candidates.append(str(compiler.parent / f"{m.group(1)}objcopy"))
    proc = _run([*cc, "-print-prog-name=objcopy"], "looking for objcopy")
    prog = proc.stdout.strip()
    if proc.returncode == 0 and prog and os.sep in prog:
        candidates.append(prog)
    candidates.append(str(compiler.parent / "objcopy"))
    for cand in candidates:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    for name in ("objcopy", "llvm-objcopy"):
        exe = shutil.which(name)
        if exe is not None:
            return exe
    raise BuildError(
        f"objcopy not found (looked next to {cc[-1]} and on PATH): install binutils, "
        "e.g. `apt-get install binutils`, or set OBJCOPY"
    )


@functools.lru_cache(maxsize=8)
def _toolchain_for(env_cc: str, env_objcopy: str, env_path: str) -> Toolchain:
    del env_cc, env_objcopy, env_path  # the cache key; the functions read os.environ
    cc = _find_cc()
    proc = _run([*cc, "-dumpmachine"], "checking the C compiler's target")
    target = proc.stdout.strip()
    if proc.returncode != 0 or not target:
        raise BuildError(
            f"`{shlex.join([*cc, '-dumpmachine'])}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()}: {_MISSING_CC_HINT}"
        )
    if not target.startswith(("x86_64-", "amd64-")):
        raise BuildError(
            f"the C compiler {cc[-1]} targets {target}, but guests are x86-64: install an "
            "x86-64 compiler (e.g. `apt-get install gcc-x86-64-linux-gnu`) and set "
            "CC=x86_64-linux-gnu-gcc"
        )
    cc_version = _run([*cc, "--version"], "asking the C compiler for its version")
    objcopy = _find_objcopy(cc)
    oc_version = _run([objcopy, "--version"], "asking objcopy for its version")
    if oc_version.returncode != 0:
        raise BuildError(
            f"`{objcopy} --version` failed (exit {oc_version.returncode}): "
            f"{oc_version.stderr.strip()}: install binutils or set OBJCOPY"
        )
    version = f"target {target}\n{cc_version.stdout}\n{oc_version.stdout}"
    return Toolchain(cc=cc, objcopy=objcopy, version=version)


def find_toolchain() -> Toolchain:
    """Find the compiler ($CC, else gcc, else cc) and objcopy ($OBJCOPY, else next to the
    compiler, else on PATH) and check that the compiler targets x86-64."""
    return _toolchain_for(
        os.environ.get("CC", ""), os.environ.get("OBJCOPY", ""), os.environ.get("PATH", "")
    )


def abi_header() -> str:
    """The generated ``isovisor_abi.h``."""
    return abi.c_header()


def generated_headers() -> dict[str, str]:
    """Every generated header, by file name: the kernel ABI and each device class's protocol
    (``devices/``)."""
    headers = {HEADER_NAME: abi.c_header()}
    for c in devices.CLASSES:
        headers.update(c.c_headers())
    return headers


def runtime_sources() -> list[Path]:
    """The runtime files that are compiled and linked into every guest (.S and .c)."""
    return sorted(p for p in RUNTIME_DIR.iterdir() if p.suffix in (".c", ".S") and p.is_file())


def default_cache_dir() -> Path:
    """``$ISOVISOR_CACHE_DIR``, else ``~/.cache/isovisor/guests``."""
    env = os.environ.get("ISOVISOR_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "isovisor" / "guests"


def _cache_key(source: Path, toolchain: Toolchain) -> str:
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    add("format", BUILD_FORMAT.encode())
    add("build.py", Path(__file__).read_bytes())
    for p in sorted(RUNTIME_DIR.iterdir()):
        if p.is_file() and p.suffix in _RUNTIME_SUFFIXES:
            add(f"runtime/{p.name}", p.read_bytes())
    add("source", source.read_bytes())
    # headers next to a user's source may be included by it
    if source.parent != GUESTS_DIR:
        for p in sorted(source.parent.glob("*.h")):
            add(f"local/{p.name}", p.read_bytes())
    for hname, text in generated_headers().items():
        add(f"header/{hname}", text.encode())
    add("flags", "\0".join([*CFLAGS, *LIBS]).encode())
    add("cc-args", "\0".join(toolchain.cc[1:]).encode())  # e.g. CC="gcc -march=..."
    add("toolchain", toolchain.version.encode())
    return h.hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "guest"


def _elf_entry(elf: Path) -> int:
    head = elf.read_bytes()[:32]
    if len(head) < 32 or head[:4] != b"\x7fELF" or head[4] != 2:
        raise BuildError(f"the linker output {elf} is not a 64-bit ELF file")
    (entry,) = struct.unpack_from("<Q", head, 24)
    return int(entry)


def _compile(source: Path, name: str, cache_dir: Path, toolchain: Toolchain, key: str) -> Path:
    final_bin = cache_dir / f"{name}-{key[:20]}.bin"
    final_elf = final_bin.with_suffix(".elf")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=cache_dir))
    except OSError as e:
        raise BuildError(
            f"cannot create the guest image cache directory {cache_dir}: {e.strerror}: "
            "make it writable or set ISOVISOR_CACHE_DIR to a writable directory"
        ) from e
    try:
        for hname, text in generated_headers().items():
            (tmp / hname).write_text(text)
        elf = tmp / f"{name}.elf"
        flat = tmp / f"{name}.bin"
        prefix_maps = {str(DOMAINS_DIR): ".", str(source.parent): ".", str(tmp): "."}
        cmd = [
            *toolchain.cc,
            *CFLAGS,
            *(f"-ffile-prefix-map={k}={v}" for k, v in prefix_maps.items()),
            "-I",
            str(tmp),
            "-I",
            str(RUNTIME_DIR),
            "-T",
            str(LINKER_SCRIPT),
            "-o",
            str(elf),
            *(str(p) for p in runtime_sources()),
            str(source),
            *LIBS,
        ]
        proc = _run(cmd, f"compiling {source}")
        if proc.returncode != 0:
            hint = "fix the errors above"
            if "undefined reference" in proc.stderr:
                hint += (
                    "; guests are freestanding: there is no libc, only the isovisor runtime"
                    f" (see {RUNTIME_DIR / 'isovisor.h'})"
                )
            raise BuildError(
                f"compiling guest {source} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.rstrip()}\n{hint}\ncommand: {shlex.join(cmd)}"
            )
        entry = _elf_entry(elf)
        if entry != abi.IMAGE_BASE:
            raise BuildError(
                f"guest {source} links _start at {entry:#x}, not IMAGE_BASE "
                f"{abi.IMAGE_BASE:#x}: {LINKER_SCRIPT} disagrees with kernel/abi.py; fix it"
            )
        ocmd = [toolchain.objcopy, "-O", "binary", str(elf), str(flat)]
        proc = _run(ocmd, f"converting {elf} to a flat image")
        if proc.returncode != 0:
            raise BuildError(
                f"`{shlex.join(ocmd)}` failed (exit {proc.returncode}):\n{proc.stderr.rstrip()}"
            )
        if flat.stat().st_size == 0:
            raise BuildError(f"guest {source} produced an empty image; check {LINKER_SCRIPT}")
        os.replace(elf, final_elf)
        os.replace(flat, final_bin)
    except OSError as e:
        raise BuildError(
            f"building guest {source} into {cache_dir} failed: {e}: "
            "check that the cache directory is writable (or set ISOVISOR_CACHE_DIR)"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final_bin


def build_source(path: Path, *, cache_dir: Path | None = None, name: str | None = None) -> Path:
    """Build a guest from the C file ``path`` (with the runtime) unless cached; return the
    flat image's path.  The ELF with symbols is kept next to it (same name, ``.elf``)."""
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise BuildError(f"guest source {source} does not exist")
    toolchain = find_toolchain()
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(source, toolchain)
    label = _safe_name(name if name is not None else source.stem)
    cached = cdir / f"{label}-{key[:20]}.bin"
    if cached.is_file():
        return cached
    return _compile(source, label, cdir, toolchain, key)


def build_guest(name: str, *, cache_dir: Path | None = None) -> Path:
    """Build the built-in program ``name`` (one of :data:`GUEST_PROGRAMS`) unless cached;
    return the flat image's path."""
    if name not in GUEST_PROGRAMS:
        raise BuildError(
            f"no built-in guest program {name!r} (in {GUESTS_DIR}); "
            f"the programs are: {', '.join(GUEST_PROGRAMS)}"
        )
    return build_source(GUESTS_DIR / f"{name}.c", cache_dir=cache_dir, name=name)


def resolve_image(image: str, base_dir: Path) -> Path:
    """Turn a domain config's ``image`` into a flat image path.

    A bare built-in program name is built with :func:`build_guest`; a name ending in
    ``.c`` is built with :func:`build_source` (relative to ``base_dir``); anything else
    is the path of an existing flat binary (relative to ``base_dir``).
    """
    if image in GUEST_PROGRAMS:
        return build_guest(image)
    path = Path(image).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if image.endswith(".c"):
        if not path.is_file():
            raise BuildError(
                f"guest source {path} does not exist (image = {image!r}); give an existing "
                f".c file, a flat image, or a built-in program: {', '.join(GUEST_PROGRAMS)}"
            )
        return build_source(path)
    if not path.is_file():
        raise BuildError(
            f"guest image {path} does not exist (image = {image!r}); give the path of a flat "
            f"binary, a .c file to build, or a built-in program: {', '.join(GUEST_PROGRAMS)}"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m domains.build",
        description="Build isovisor guest programs into flat images.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"built-in programs ({', '.join(GUEST_PROGRAMS)}) or .c files; default: all",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="override the cache")
    args = parser.parse_args(argv)
    names: list[str] = args.names or list(GUEST_PROGRAMS)
    try:
        for name in names:
            if name in GUEST_PROGRAMS:
                path = build_guest(name, cache_dir=args.cache_dir)
            elif name.endswith(".c"):
                path = build_source(Path(name), cache_dir=args.cache_dir)
            else:
                raise BuildError(
                    f"{name!r} is neither a built-in program nor a .c file; "
                    f"the programs are: {', '.join(GUEST_PROGRAMS)}"
                )
            print(f"{name} {path} {path.stat().st_size} bytes")
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
