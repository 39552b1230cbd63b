"""The driver SDK's example tests (examples/sdk/test_*.py: a block, a network and a console
backend), run as a developer runs them: ``python -m pytest examples/sdk/...`` in a fresh
process, from the repository root, with the isovisor pytest plugin loaded through its entry
point (no conftest of ours is involved).  One test here per example test, so a failure names
the example that failed.  Also: the plugin is registered with the installed package, and its
block verifier agrees with tests/blkdata.py.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from isovisor.testing import _expected_block, check_image
from tests import blkdata

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [
    ROOT / "examples" / "sdk" / f"test_{name}.py"
    for name in ("countingdisk", "netfilter", "linesink")
]


def _example_tests() -> list[str]:
    """``examples/sdk/test_x.py::test_y`` for each example test."""
    out = []
    for path in EXAMPLES:
        tree = ast.parse(path.read_text())
        out += [
            f"{path.relative_to(ROOT)}::{n.name}"
            for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
        ]
    return out


def _plugin_registered() -> bool:
    return any(
        ep.name == "isovisor" and ep.value == "isovisor.testing"
        for ep in importlib.metadata.entry_points(group="pytest11")
    )


def test_the_plugin_is_registered_with_the_package() -> None:
    assert _plugin_registered(), (
        "the pytest11 entry point isovisor = isovisor.testing is not installed: "
        "run `python3 -m pip install -e .` again (pyproject.toml declares it)"
    )


def test_there_are_example_tests() -> None:
    tests = _example_tests()
    for path in EXAMPLES:  # every example file has a test
        assert any(t.startswith(f"{path.relative_to(ROOT)}::") for t in tests), path
    assert len(tests) >= 6, tests


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", _example_tests())
def test_example(name: str) -> None:
    # without the entry point (an install older than the plugin) load the plugin by hand
    plugin = [] if _plugin_registered() else ["-p", "isovisor.testing"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *plugin,
            name,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=290,
    )
    assert r.returncode == 0, f"{name} failed:\n{r.stdout}\n{r.stderr}"
    assert "1 passed" in r.stdout, r.stdout


def test_the_plugin_verifier_agrees_with_blkdata() -> None:
    for seed, block, gen, bs in ((11, 0, 1, 4096), (12, 7, 99, 512), (3, 1000, 12345, 8192)):
        assert _expected_block(seed, block, gen, bs) == blkdata.expected_block(seed, block, gen, bs)
    image = bytearray(
        blkdata.expected_block(5, 0, 3, 512) + bytes(512) + blkdata.expected_block(5, 2, 9, 512)
    )
    assert check_image(image, seed=5, blocks=3, bs=512) == {0: 3, 1: None, 2: 9}
    image[2 * 512 + 100] ^= 1
    with pytest.raises(AssertionError, match="block 2 gen 9: wrong data from byte 100"):
        check_image(image, seed=5, blocks=3, bs=512)
    image[2 * 512 + 8] = 1  # the header names block 1: written to the wrong place
    with pytest.raises(AssertionError, match="block 2: header"):
        check_image(image, seed=5, blocks=3, bs=512)
