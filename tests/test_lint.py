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


def test_nothing_below_the_supervisor_imports_the_cli_or_the_supervisor() -> None:
    """kernel/, drivers/, ipc/, domains/ and devices/ import nothing from isovisor/ (the CLI
    and the supervisor daemon): what they share with it lives in a neutral module
    (ipc/schema.py, domains/config.py, devices/)."""
    offenders = []
    for folder in ("kernel", "drivers", "ipc", "domains", "devices"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "build" in path.relative_to(ROOT).parts[1:2]:
                continue  # domains/build/: generated
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {n}"
                    for n in names
                    if n == "isovisor" or n.startswith("isovisor.")
                ]
    assert not offenders, "\n".join(offenders)
