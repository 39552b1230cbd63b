"""The code base stays ruff-clean and mypy-clean (config in pyproject.toml)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the [test] extra)")
    r = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(120)
def test_ruff_format_clean() -> None:
    """Every Python file is as `ruff format` writes it (run `ruff format .` to fix)."""
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is in the [test] extra"
    r = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(300)
def test_mypy_clean() -> None:
    """0 errors on every package below the CLI and on the CLI and supervisor (mypy is in the
    [test] extra, so the README's test command always has it)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "kernel",
            "ipc",
            "drivers",
            "devices",
            "domains",
            "isovisor",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _imports_of(paths: list[Path], forbidden: str) -> list[str]:
    """``path:line: module`` for each import of ``forbidden`` or a module below it (``import
    a.b``, ``from a import b``, ``from .. import b``)."""
    found = []
    for path in paths:
        package = path.relative_to(ROOT).parent.parts
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = [*package[: len(package) + 1 - node.level]] if node.level else []
                module = ".".join([*base, *filter(None, [node.module])])
                names = [module, *(f"{module}.{a.name}" for a in node.names)]
            else:
                continue
            hit = next((n for n in names if n == forbidden or n.startswith(forbidden + ".")), None)
            if hit is not None:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {hit}")
    return found


def test_nothing_below_the_supervisor_imports_the_cli_or_the_supervisor() -> None:
    """kernel/, drivers/, ipc/, domains/ and devices/ import nothing from isovisor/ (the CLI
    and the supervisor daemon): what they share with it lives in a neutral module
    (ipc/schema.py, domains/config.py, devices/)."""
    paths = [
        path
        for folder in ("kernel", "drivers", "ipc", "domains", "devices")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "build" not in path.relative_to(ROOT).parts[1:2]  # domains/build/: generated
    ]
    offenders = _imports_of(paths, "isovisor")
    assert not offenders, "\n".join(offenders)


def test_the_supervisor_does_not_import_the_cli() -> None:
    """isovisor/supervisor/ (the daemon and its parts) imports nothing from isovisor/cli/: the
    CLI sits above the supervisor (it runs one in the foreground for `up`), and what both use
    lives in the shared modules of isovisor/ (config.py, paths.py, procs.py)."""
    offenders = _imports_of(
        sorted((ROOT / "isovisor" / "supervisor").rglob("*.py")), "isovisor.cli"
    )
    assert not offenders, "\n".join(offenders)
