"""The code base stays ruff-clean and mypy-clean (config in pyproject.toml)."""

from __future__ import annotations

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


@pytest.mark.timeout(300)
def test_mypy_clean() -> None:
    """0 errors on every package below the CLI and on the CLI and supervisor (mypy is in the
    [test] extra, so the README's test command always has it)."""
    r = subprocess.run([sys.executable, "-m", "mypy", "kernel", "ipc", "drivers", "devices",
                        "isovisor"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
