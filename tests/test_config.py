"""Bad configs give errors naming the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.config import ConfigError, DomainConfig, load_domain_config, load_stack_config
from tests.conftest import cli, write

pytestmark = pytest.mark.timeout(60)


def domain_error(tmp_path: Path, text: str) -> str:
    p = write(tmp_path / "dom.toml", text)
    with pytest.raises(ConfigError) as e:
        load_domain_config(p)
    assert str(p) in str(e.value)
    return str(e.value)


def test_typo_names_key_and_suggests(tmp_path: Path) -> None:
    msg = domain_error(tmp_path, 'name = "a"\nimage = "hello"\nmemroy = 4\n')
    assert "unknown key 'memroy'" in msg and "did you mean 'memory'?" in msg
    assert "allowed keys:" in msg


def test_wrong_type(tmp_path: Path) -> None:
    msg = domain_error(tmp_path, 'name = "a"\nimage = "hello"\nmemory = "16M"\n')
    assert "key 'memory' must be an integer" in msg and "got a string '16M'" in msg


def test_out_of_range_and_bad_choice(tmp_path: Path) -> None:
    assert "must be between 1 and 65535" in domain_error(
        tmp_path, 'name = "a"\nimage = "hello"\nweight = 0\n')
    assert "must be one of destroy, restart, preserve" in domain_error(
        tmp_path, 'name = "a"\nimage = "hello"\non_crash = "reboot"\n')
    assert "only 1 is supported" in domain_error(
        tmp_path, 'name = "a"\nimage = "hello"\nvcpus = 2\n')


def test_missing_required_and_missing_image(tmp_path: Path) -> None:
    assert "missing required key 'image'" in domain_error(tmp_path, 'name = "a"\n')
    msg = domain_error(tmp_path, 'name = "a"\nimage = "nothere.bin"\n')
    assert "key 'image' = 'nothere.bin'" in msg


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    assert "invalid TOML" in domain_error(tmp_path, 'name = "a\n')
    with pytest.raises(ConfigError, match="file not found"):
        load_domain_config(tmp_path / "absent.toml")


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    assert "must be an integer" in domain_error(
        tmp_path, 'name = "a"\nimage = "hello"\ncap = true\n')


def test_supervisor_toml_errors(tmp_path: Path) -> None:
    p = write(tmp_path / "s.toml", "[kernel]\npcpu = 2\n")
    with pytest.raises(ConfigError, match=r"\[kernel\]: unknown key 'pcpu' \(did you mean "
                                          r"'pcpus'\?\)"):
        load_stack_config(p)
    p = write(tmp_path / "s.toml", '[domains]\nstart = ["nope.toml"]\n')
    with pytest.raises(ConfigError, match=r"start\[0\] = 'nope.toml': no such file"):
        load_stack_config(p)
    p = write(tmp_path / "s.toml", "[supervisor]\nname = 5\n")
    with pytest.raises(ConfigError, match="key 'name' must be a string"):
        load_stack_config(p)


def test_default_supervisor_toml_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load_stack_config(root / "supervisor.toml")
    assert len(cfg.domains) >= 3
    names = {load_domain_config(p).name for p in cfg.domains}
    assert {"hello", "crc32", "ticker"} <= names


def test_cli_reports_config_errors(tmp_path: Path) -> None:
    p = write(tmp_path / "dom.toml", 'name = "a"\nimage = "hello"\nmemroy = 4\n')
    r = cli("run", str(p))
    assert r.returncode == 1
    assert "isovisor: error:" in r.stderr and "unknown key 'memroy'" in r.stderr
    s = write(tmp_path / "s.toml", "[kernel]\ntimeslice_ms = 0\n")
    r = cli("up", str(s), run_dir=tmp_path / "run")
    assert r.returncode == 1 and "timeslice_ms" in r.stderr and "between 1 and 1000" in r.stderr


def test_cli_usage_errors() -> None:
    r = cli("frobnicate")
    assert r.returncode == 2 and "No such command 'frobnicate'" in r.stderr
    r = cli("list", run_dir=Path("/tmp/iv-nonexistent-run-dir"))
    assert r.returncode == 1 and "no stack is running in /tmp/iv-nonexistent-run-dir" in r.stderr


@pytest.mark.parametrize(("spec", "message"), [
    ("tagret=x.img, vdev=xvda, backend=blk0", "unknown disk key 'tagret' (did you mean 'target'?)"),
    ("target=x.img, vdev=sda, backend=blk0, size=1M", "vdev='sda' is not supported"),
    ("target=x.img, vdev=xvda, size=1M", "backend='' must name a driver"),
    ("target=x.img, vdev=xvda, backend=blk0", "does not exist; give size="),
    ("target=x.img, vdev=xvda, backend=blk0, size=1000", "a multiple of 512"),
    ("target=x.img, vdev=xvda, backend=blk0, size=1M, access=rx", "access='rx' must be rw"),
    ("vdev=xvda, type=memory, backend=blk0", "needs size="),
    ("x.img, xvda", "is not key=value"),
])
def test_disk_specs_are_checked(tmp_path: Path, spec: str, message: str) -> None:
    p = write(tmp_path / "d.toml", f'name = "a"\nimage = "hello"\ndisk = ["{spec}"]\n')
    with pytest.raises(ConfigError) as e:
        load_domain_config(p)
    assert message in str(e.value) and "disk[0]" in str(e.value)


def test_disks_parse_and_survive_the_wire(tmp_path: Path) -> None:
    p = write(tmp_path / "d.toml", 'name = "a"\nimage = "hello"\ndisk = ['
              '"target=img/a.img, vdev=xvda, access=ro, backend=blk0, size=64M", '
              '"vdev=xvdb, type=memory, size=16M, backend=blk0"]\n')
    cfg = load_domain_config(p)
    a, b = cfg.disks
    assert (a.target, a.size, a.read_only, a.devid) == (str(tmp_path / "img/a.img"), 64 << 20,
                                                        True, 51712)
    assert (b.type, b.target, b.size, b.devid) == ("memory", None, 16 << 20, 51728)
    assert DomainConfig.from_wire(cfg.to_wire()) == cfg
    dup = write(tmp_path / "e.toml", 'name = "a"\nimage = "hello"\ndisk = ['
                '"vdev=xvda, type=memory, size=1M, backend=b", '
                '"vdev=xvda, type=memory, size=1M, backend=b"]\n')
    with pytest.raises(ConfigError, match="vdev xvda is used twice"):
        load_domain_config(dup)


def test_driver_tables_are_checked(tmp_path: Path) -> None:
    ok = write(tmp_path / "s.toml", '[driver.blk0]\nmodule = "drivers.blk"\n'
               '[driver.blk1]\nmodule = "drivers.blk"\nisolation = "inline"\n'
               '[driver.blk1.options]\nmax_batch = 8\n')
    cfg = load_stack_config(ok)
    assert [(d.name, d.isolation, d.options) for d in cfg.drivers] == [
        ("blk0", "process", {}), ("blk1", "inline", {"max_batch": 8})]
    for text, msg in (('[driver.b]\nmodul = "x"\n', "unknown key 'modul'"),
                      ('[driver.b]\nmodule = "x"\nisolation = "vm"\n', "must be one of"),
                      ('[driver.b]\nmodule = "x y"\n', "is not a Python module name"),
                      ('[driver.b]\n', "missing required key 'module'")):
        with pytest.raises(ConfigError, match=msg):
            load_stack_config(write(tmp_path / "t.toml", text))
