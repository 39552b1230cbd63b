"""The device-class registry (devices/): each class declared once, nobody else naming one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import devices
from devices import SpecError
from devices.console import ConsoleSpec
from devices.vbd import DiskSpec
from devices.vif import VifSpec
from drivers.faults import class_of_module, fault_classes
from isovisor.config import ConfigError, DomainConfig
from tests.conftest import write

ROOT = Path(__file__).resolve().parent.parent


def test_every_class_is_registered_once_with_what_the_stack_needs() -> None:
    names = [c.name for c in devices.CLASSES]
    assert names == ["vbd", "vif", "console", "rng"]
    for c in devices.CLASSES:
        assert devices.by_name(c.name) is c
        assert c.region.window <= c.region.segment_bytes and c.region.window % 4096 == 0
        assert c.region.segment_bytes % 4096 == 0
        assert c.modules and all(devices.of_module(m) is c for m in c.modules)
        assert fault_classes()[c.name].name == c.name
        assert class_of_module(f"{c.modules[0]}:Backend").name == c.name
    assert devices.of_module("/home/me/mydisk.py") is None
    assert class_of_module("/home/me/mydisk.py").name == "any"
    with pytest.raises(KeyError, match="no device class 'rng0'; the classes are vbd, vif"):
        devices.by_name("rng0")


@pytest.mark.parametrize(
    "key, value, spec",
    [
        (
            "disk",
            ["vdev=xvdb, type=memory, size=16M, backend=blk0"],
            DiskSpec("xvdb", "blk0", "memory", None, "rw", 16 << 20),
        ),
        (
            "vif",
            ["mac=02:00:00:00:00:0a, bridge=br1, backend=net0, ip=198.18.0.9"],
            VifSpec(0, "02:00:00:00:00:0a", "net0", "br1", "198.18.0.9"),
        ),
        ("console", "con0", ConsoleSpec("con0")),
    ],
)
def test_each_class_parses_its_key_and_its_wire_form_back(
    key: str, value: object, spec: object
) -> None:
    """What a config file says, and the same devices after a trip over the control socket."""
    cfg = DomainConfig.from_dict(
        {"name": "a", "image": "hello", key: value}, "a.toml", resolve=False
    )
    assert cfg.devices == (spec,)
    cls = devices.of_spec(cfg.devices[0])
    assert cls.config_key == key
    wire = {**cfg.to_wire(), "image_path": "/bin/true"}
    back = DomainConfig.from_wire(wire)
    assert back.devices == cfg.devices
    assert cls.parse(cls.to_wire(cfg.devices), "a", "here", None) == cfg.devices


def test_a_bad_entry_is_an_error_naming_the_entry_and_what_to_write(tmp_path: Path) -> None:
    p = write(
        tmp_path / "d.toml",
        'name = "a"\nimage = "hello"\nvif = ["mac=02:00:00:00:00:0a, backend=net0, ip=10.0.0.1"]\n',
    )
    with pytest.raises(
        ConfigError,
        match=r"d.toml: vif\[0\]: ip=10.0.0.1 is outside the "
        r"ranges guests may use",
    ):
        DomainConfig.from_dict(
            {
                "name": "a",
                "image": "hello",
                "vif": ["mac=02:00:00:00:00:0a, backend=net0, ip=10.0.0.1"],
            },
            str(p),
            resolve=False,
        )
    with pytest.raises(SpecError, match='console = "a b" must be a driver name'):
        devices.by_name("console").parse("a b", "a", "here", None)


def test_the_stack_default_console_becomes_a_console_device() -> None:
    cfg = DomainConfig.from_dict(
        {"name": "a", "image": "hello", "disk": ["vdev=xvda, type=memory, size=1M, backend=blk0"]},
        "a.toml",
        resolve=False,
    )
    assert [d.device_class for d in cfg.devices] == ["vbd"]
    con = cfg.with_console("con0")
    assert con.console_driver == "con0"
    assert con.devices == (*cfg.devices, ConsoleSpec("con0"))
    assert cfg.with_console("kernel").devices == cfg.devices


def test_devices_imports_no_backend_cli_or_supervisor() -> None:
    """The kernel and the CLI both import the registry: it must pull in neither a driver
    backend nor the CLI or the supervisor."""
    code = (
        "import sys, devices, drivers.faults; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('isovisor', 'drivers') or m.startswith('kernel.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == "['drivers', 'drivers.faults', 'kernel.abi']", out


def test_no_spec_type_or_class_ladder_outside_the_class_modules() -> None:
    """The kernel, the supervisor and the CLI loop over the registry: none of them names a
    spec type, and none tests a device's class by its name."""
    spec_types = re.compile(r"\b(DiskSpec|VifSpec|ConsoleSpec)\b")
    class_test = re.compile(
        r"""(class|cls\.name|device_class)["']?\)?\s*[!=]=\s*"""
        r"""["'](vbd|vif|console)"""
    )
    offenders = []
    for folder in ("kernel", "isovisor", "ipc"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for i, line in enumerate(text.splitlines(), 1):
                if spec_types.search(line) or class_test.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
