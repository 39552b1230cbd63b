"""Bad configs give errors naming the file, the key and what is allowed."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from isovisor.config import (
    DRIVER_FIELDS,
    SUPERVISION_KEYS,
    ConfigError,
    DomainConfig,
    DriverConfig,
    load_domain_config,
    load_stack_config,
)
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
    assert (
        'unknown key "memroy" (did you mean "memory"?); allowed keys: name, image, memory, '
        "vcpus, weight, cap, on_poweroff, on_reboot, on_crash, extra, " in msg
    )


def test_wrong_type(tmp_path: Path) -> None:
    msg = domain_error(tmp_path, 'name = "a"\nimage = "hello"\nmemory = "16M"\n')
    assert msg.endswith(
        ': memory = "16M" must be an integer (guest RAM in MiB, 2..4096), got a string'
    )


def test_out_of_range_and_bad_choice(tmp_path: Path) -> None:
    assert domain_error(tmp_path, 'name = "a"\nimage = "hello"\nweight = 0\n').endswith(
        ": weight = 0 must be between 1 and 65535 (scheduler weight, 1..65535, default 256)"
    )
    assert domain_error(tmp_path, 'name = "a"\nimage = "hello"\non_crash = "restat"\n').endswith(
        ': on_crash = "restat" is not an action; choose one of: destroy, restart, '
        'preserve (did you mean "restart"?) (action when the guest crashes)'
    )
    assert "only 1 is supported" in domain_error(
        tmp_path, 'name = "a"\nimage = "hello"\nvcpus = 2\n'
    )


def test_missing_required_and_missing_image(tmp_path: Path) -> None:
    assert domain_error(tmp_path, 'name = "a"\n').endswith(
        ': missing required key "image" (a built-in guest program name, a .c file, or a flat '
        "binary)"
    )
    msg = domain_error(tmp_path, 'name = "a"\nimage = "nothere.bin"\n')
    assert ': image = "nothere.bin": guest image ' in msg


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    assert "invalid TOML" in domain_error(tmp_path, 'name = "a\n')
    with pytest.raises(ConfigError, match="file not found"):
        load_domain_config(tmp_path / "absent.toml")


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    assert domain_error(tmp_path, 'name = "a"\nimage = "hello"\ncap = true\n').endswith(
        ": cap = true must be an integer (CPU cap in percent of one CPU, 0 = no cap), got a boolean"
    )


def test_supervisor_toml_errors(tmp_path: Path) -> None:
    p = write(tmp_path / "s.toml", "[kernel]\npcpu = 2\n")
    with pytest.raises(ConfigError) as e:
        load_stack_config(p)
    assert str(e.value) == (
        f'{p} [kernel]: unknown key "pcpu" (did you mean "pcpus"?); '
        "allowed keys: pcpus, timeslice_ms, restore"
    )
    p = write(tmp_path / "s.toml", '[kernel]\nrestore = "later"\n')
    with pytest.raises(ConfigError) as e:
        load_stack_config(p)
    assert str(e.value).startswith(f'{p} [kernel]: restore = "later" must be "lazy" or "eager"')
    assert load_stack_config(write(tmp_path / "s.toml", "")).kernel.restore == "lazy"
    p = write(tmp_path / "s.toml", '[domains]\nstart = ["nope.toml"]\n')
    with pytest.raises(ConfigError, match=r'start\[0\] = "nope.toml": no such file'):
        load_stack_config(p)
    p = write(tmp_path / "s.toml", "[supervisor]\nname = 5\n")
    with pytest.raises(ConfigError) as e:
        load_stack_config(p)
    assert str(e.value) == (
        f"{p} [supervisor]: name = 5 must be a string (the stack's name, "
        "shown by the CLI and in logs), got an integer"
    )


def test_default_supervisor_toml_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load_stack_config(root / "supervisor.toml")
    assert len(cfg.domains) >= 3
    names = {load_domain_config(p).name for p in cfg.domains}
    assert {"hello", "crc32", "ticker"} <= names


@pytest.mark.e2e
def test_cli_reports_config_errors(tmp_path: Path) -> None:
    p = write(tmp_path / "dom.toml", 'name = "a"\nimage = "hello"\nmemroy = 4\n')
    r = cli("run", str(p))
    assert r.returncode == 1
    assert "isovisor: error:" in r.stderr and 'unknown key "memroy"' in r.stderr
    s = write(tmp_path / "s.toml", "[kernel]\ntimeslice_ms = 0\n")
    r = cli("up", str(s), run_dir=tmp_path / "run")
    assert r.returncode == 1 and "timeslice_ms" in r.stderr and "between 1 and 1000" in r.stderr


@pytest.mark.e2e
def test_cli_usage_errors() -> None:
    r = cli("frobnicate")
    assert r.returncode == 2 and "No such command 'frobnicate'" in r.stderr
    r = cli("list", run_dir=Path("/tmp/iv-nonexistent-run-dir"))
    assert r.returncode == 1 and "no stack is running in /tmp/iv-nonexistent-run-dir" in r.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "tagret=x.img, vdev=xvda, backend=blk0",
            "unknown disk key 'tagret' (did you mean 'target'?)",
        ),
        ("target=x.img, vdev=sda, backend=blk0, size=1M", "vdev='sda' is not supported"),
        ("target=x.img, vdev=xvda, size=1M", "backend='' must name a driver"),
        ("target=x.img, vdev=xvda, backend=blk0", "does not exist; give size="),
        ("target=x.img, vdev=xvda, backend=blk0, size=1000", "a multiple of 512"),
        ("target=x.img, vdev=xvda, backend=blk0, size=1M, access=rx", "access='rx' must be rw"),
        ("vdev=xvda, type=memory, backend=blk0", "needs size="),
        ("x.img, xvda", "is not key=value"),
    ],
)
def test_disk_specs_are_checked(tmp_path: Path, spec: str, message: str) -> None:
    p = write(tmp_path / "d.toml", f'name = "a"\nimage = "hello"\ndisk = ["{spec}"]\n')
    with pytest.raises(ConfigError) as e:
        load_domain_config(p)
    assert message in str(e.value) and "disk[0]" in str(e.value)


def test_disks_parse_and_survive_the_wire(tmp_path: Path) -> None:
    p = write(
        tmp_path / "d.toml",
        'name = "a"\nimage = "hello"\ndisk = ['
        '"target=img/a.img, vdev=xvda, access=ro, backend=blk0, size=64M", '
        '"vdev=xvdb, type=memory, size=16M, backend=blk0"]\n',
    )
    cfg = load_domain_config(p)
    a, b = cfg.of_class("vbd")
    assert cfg.devices == (a, b)
    assert (a.target, a.size, a.read_only, a.devid) == (
        str(tmp_path / "img/a.img"),
        64 << 20,
        True,
        51712,
    )
    assert (b.type, b.target, b.size, b.devid) == ("memory", None, 16 << 20, 51728)
    assert DomainConfig.from_wire(cfg.to_wire()) == cfg
    dup = write(
        tmp_path / "e.toml",
        'name = "a"\nimage = "hello"\ndisk = ['
        '"vdev=xvda, type=memory, size=1M, backend=b", '
        '"vdev=xvda, type=memory, size=1M, backend=b"]\n',
    )
    with pytest.raises(ConfigError, match="vdev xvda is used twice"):
        load_domain_config(dup)


def test_driver_tables_are_checked(tmp_path: Path) -> None:
    ok = write(
        tmp_path / "s.toml",
        '[driver.blk0]\nmodule = "drivers.blk"\n'
        '[driver.blk1]\nmodule = "drivers.blk"\nisolation = "inline"\n'
        "[driver.blk1.options]\nmax_batch = 8\n",
    )
    cfg = load_stack_config(ok)
    assert [(d.name, d.isolation, d.options) for d in cfg.drivers] == [
        ("blk0", "process", {}),
        ("blk1", "inline", {"max_batch": 8}),
    ]
    for text, msg in (
        ('[driver.b]\nmodul = "x"\n', 'unknown key "modul"'),
        (
            '[driver.b]\nmodule = "x"\nisolation = "vm"\n',
            'isolation = "vm" is not an isolation; choose one of: process, process-unjailed, '
            "inline",
        ),
        ('[driver.b]\nmodule = "x y"\n', "is neither a module"),
        ("[driver.b]\n", 'missing required key "module"'),
    ):
        with pytest.raises(ConfigError) as e:
            load_stack_config(write(tmp_path / "t.toml", text))
        assert msg in str(e.value), str(e.value)


# --- supervision keys of [driver.<name>] (docs/recovery.md) ------------------------------------


def driver_stack(tmp_path: Path, body: str) -> Path:
    return write(tmp_path / "s.toml", f'[driver.blk0]\nmodule = "drivers.blk"\n{body}\n')


def test_driver_supervision_defaults(tmp_path: Path) -> None:
    (d,) = load_stack_config(driver_stack(tmp_path, "")).drivers
    assert (d.restart, d.intensity, d.period, d.backoff, d.backoff_max, d.start_secs) == (
        "permanent",
        10,
        30.0,
        0.0,
        5.0,
        1.0,
    )
    assert (d.watchdog_sec, d.request_timeout_sec, d.max_rss, d.max_cpu) == (2.0, 10.0, None, None)
    assert (d.graceful_timeout, d.spare, d.group, d.strategy, d.supervised) == (
        5.0,
        True,
        None,
        "one_for_one",
        True,
    )


@pytest.mark.parametrize(
    ("line", "attr", "value"),
    [
        ('restart = "transient"', "restart", "transient"),
        ('restart = "temporary"', "restart", "temporary"),
        ("intensity = 0", "intensity", 0),
        ("period = 60", "period", 60.0),
        ("period = 0.5", "period", 0.5),
        ("backoff = 0.25", "backoff", 0.25),
        ("backoff_max = 30", "backoff_max", 30.0),
        ("start_secs = 0", "start_secs", 0.0),
        ("watchdog_sec = 0", "watchdog_sec", 0.0),
        ("watchdog_sec = 0.25", "watchdog_sec", 0.25),
        ("request_timeout_sec = 3", "request_timeout_sec", 3.0),
        ('max_rss = "512M"', "max_rss", 512 << 20),
        ('max_rss = "1GiB"', "max_rss", 1 << 30),
        ("max_cpu = 80", "max_cpu", 80.0),
        ("max_cpu = 12.5", "max_cpu", 12.5),
        ("graceful_timeout = 0", "graceful_timeout", 0.0),
        ("spare = false", "spare", False),
        ('group = "storage"', "group", "storage"),
    ],
)
def test_driver_supervision_keys_accept_good_values(
    tmp_path: Path, line: str, attr: str, value: object
) -> None:
    (d,) = load_stack_config(driver_stack(tmp_path, line)).drivers
    assert getattr(d, attr) == value
    assert type(getattr(d, attr)) is type(value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'restart = "always"',
            'restart = "always" is not a restart policy; choose one of: '
            "permanent, transient, temporary (when a failed driver is restarted: "
            "permanent (always), transient (only after an abnormal exit) or "
            "temporary (never))",
        ),
        ("restart = 1", "restart = 1 must be a string (when a failed driver is restarted: "),
        ("intensity = -1", "intensity = -1 must be between 0 and 1000000 (restarts allowed "),
        ("intensity = 2.5", "intensity = 2.5 must be an integer (restarts allowed "),
        ("period = 0", "period = 0 must be more than 0 (the window in seconds for 'intensity')"),
        (
            'period = "30s"',
            'period = "30s" must be a number (the window in seconds for '
            "'intensity'), got a string",
        ),
        (
            "period = true",
            "period = true must be a number (the window in seconds for 'intensity'), got a boolean",
        ),
        ("period = inf", "period = inf must be a finite number (the window in seconds for "),
        ("backoff = -1", "backoff = -1 must be at least 0 (seconds before the 2nd restart "),
        ("backoff_max = -0.5", "backoff_max = -0.5 must be at least 0 (the longest delay "),
        ("backoff = 2\nbackoff_max = 1", "backoff_max = 1 is less than backoff = 2"),
        ("start_secs = -1", "start_secs = -1 must be at least 0 (seconds a driver must stay up "),
        (
            "watchdog_sec = 0.05",
            "watchdog_sec = 0.05 must be 0 (off) or at least 0.1 (heartbeat "
            "deadline in seconds, 0 = off)",
        ),
        (
            "request_timeout_sec = 0",
            "request_timeout_sec = 0 must be at least 0.1 (seconds a request may stay outstanding ",
        ),
        (
            'max_rss = "lots"',
            'max_rss = "lots" is not a size: give a number with an optional K, M, '
            'G or T suffix (binary units), e.g. "512M" (RSS limit: ',
        ),
        ("max_rss = 512", "max_rss = 512 must be a string (RSS limit: "),
        ('max_rss = "1M"', 'max_rss = "1M" is below 16M: a driver process alone uses more'),
        ("max_fds = 8", "max_fds = 8 must be between 16 and 1048576 (open file descriptors "),
        ("max_cpu = 0", "max_cpu = 0 must be more than 0 and at most 100 (CPU limit in percent "),
        ("max_cpu = 150", "max_cpu = 150 must be more than 0 and at most 100"),
        (
            "graceful_timeout = -1",
            "graceful_timeout = -1 must be at least 0 (seconds from SIGTERM ",
        ),
        (
            'spare = "yes"',
            'spare = "yes" must be true or false (keep a warm spare process ready), got a string',
        ),
        ('group = "a b"', 'group = "a b" must start with a letter or digit'),
        (
            'strategy = "one_for_one"',
            'strategy = "one_for_one" needs a group (the drivers that '
            'restart together); add group = "<name>" or remove strategy',
        ),
        (
            'group = "g"\nstrategy = "all_for_one"',
            'strategy = "all_for_one" is not a restart '
            "strategy; choose one of: one_for_one, "
            "rest_for_one, one_for_all (did you mean "
            '"one_for_one"?) (which drivers of the group '
            "restart when one fails)",
        ),
        (
            "restrat = 1",
            'unknown key "restrat" (did you mean "restart"?); allowed keys: module, '
            "isolation, options, restart, ",
        ),
    ],
)
def test_driver_supervision_keys_reject_bad_values(tmp_path: Path, line: str, message: str) -> None:
    p = driver_stack(tmp_path, line)
    with pytest.raises(ConfigError) as e:
        load_stack_config(p)
    assert str(e.value).startswith(f"{p} [driver.blk0]: {message}"), str(e.value)


def test_the_docs_state_the_driver_defaults() -> None:
    """docs/configuration.md's Default column is DRIVER_FIELDS' default, i.e. DriverConfig's."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    table = docs[docs.index("### Driver supervision") :]
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", table, re.M))
    d = DriverConfig(name="blk0", module="drivers.blk")
    for key in SUPERVISION_KEYS:
        default = DRIVER_FIELDS[key].default
        assert getattr(d, key) == default
        cell = rows[key].strip().strip("`")
        assert (None if cell == "none" else tomllib.loads(f"v = {cell}")["v"]) == default, key


def test_inline_drivers_take_no_supervision_keys(tmp_path: Path) -> None:
    p = driver_stack(tmp_path, 'isolation = "inline"\nspare = false\nintensity = 3')
    with pytest.raises(ConfigError) as e:
        load_stack_config(p)
    msg = str(e.value)
    assert 'intensity, spare cannot be used with isolation = "inline"' in msg
    assert "is not supervised" in msg
    (d,) = load_stack_config(driver_stack(tmp_path, 'isolation = "inline"')).drivers
    assert not d.supervised


def test_a_group_must_agree_on_its_strategy(tmp_path: Path) -> None:
    ok = write(
        tmp_path / "ok.toml",
        '[driver.a]\nmodule = "m"\ngroup = "g"\nstrategy = "one_for_all"\n'
        '[driver.b]\nmodule = "m"\ngroup = "g"\nstrategy = "one_for_all"\n'
        '[driver.c]\nmodule = "m"\ngroup = "h"\n',
    )
    cfg = load_stack_config(ok)
    assert [(d.group, d.strategy) for d in cfg.drivers] == [
        ("g", "one_for_all"),
        ("g", "one_for_all"),
        ("h", "one_for_one"),
    ]
    bad = write(
        tmp_path / "bad.toml",
        '[driver.a]\nmodule = "m"\ngroup = "g"\nstrategy = "rest_for_one"\n'
        '[driver.b]\nmodule = "m"\ngroup = "g"\n',
    )
    with pytest.raises(ConfigError) as e:
        load_stack_config(bad)
    assert str(e.value) == (
        f'{bad} [driver.b]: strategy = "one_for_one" differs from [driver.a] (strategy '
        '"rest_for_one") in group "g": the drivers of a group must agree; give each of them '
        "the same strategy (default one_for_one)"
    )


def test_which_drivers_are_jailed_and_why_not() -> None:
    from isovisor.supervisor.driverproc import jail_state

    def state(module: str, **kw: object) -> str | None:
        return jail_state(DriverConfig("d0", module, **kw))  # type: ignore[arg-type]

    assert state("drivers.rng") == "jailed"
    assert state("drivers.console") == "jailed"
    assert state("drivers.net") == "jailed"
    assert state("drivers.net", options={"uplink": "tap"}).startswith(  # type: ignore[union-attr]
        'not jailed: a TAP uplink (uplink = "tap") is set up by the driver itself'
    )
    assert state("drivers.blk").startswith("not jailed: a block driver opens its disk images")  # type: ignore[union-attr]
    assert state("drivers.rng", isolation="process-unjailed") == (
        'not jailed: isolation = "process-unjailed"'
    )
    assert state("drivers.rng", isolation="inline") is None
    # a backend file: its class is not known before it is loaded, unless the table says it
    assert state("/tmp/mine.py") == (
        "not jailed: the device class of /tmp/mine.py is not known before it is loaded: give "
        "device_class = one of vbd, vif, console, rng in [driver.d0] to jail it"
    )
    assert state("/tmp/mine.py", device_class="rng") == "jailed"
    assert state("/tmp/mine.py", device_class="vbd").startswith("not jailed: a block driver")  # type: ignore[union-attr]
    # a hot swap keeps the class of the module the driver was configured with
    assert state("/tmp/mine.py", origin="drivers.console") == "jailed"


def test_a_non_root_stack_with_jailed_drivers_is_refused_and_says_how_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ipc.control import ControlError
    from ipc.schema import STACK_ENV
    from isovisor.config import StackConfig
    from isovisor.paths import RunDir
    from isovisor.supervisor.daemon import Supervisor

    monkeypatch.setenv(STACK_ENV, "t")  # (the supervisor sets it for its stack processes)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    (tmp_path / "run").mkdir()

    def check(*drivers: DriverConfig) -> None:
        Supervisor(StackConfig(drivers=drivers), RunDir(tmp_path / "run"))._check_jails()

    with pytest.raises(ControlError) as e:
        check(DriverConfig("rng0", "drivers.rng"), DriverConfig("con0", "drivers.console"))
    assert str(e.value) == (
        'drivers rng0, con0: isolation = "process" runs each driver in a jail, which needs a '
        "root supervisor (this one runs as uid 1000): run the stack as root, or set isolation = "
        '"process-unjailed" for these drivers in supervisor.toml (docs/jail.md)'
    )
    # unjailed on purpose, or a class that cannot be jailed yet: started, with a warning each
    check(
        DriverConfig("rng0", "drivers.rng", isolation="process-unjailed"),
        DriverConfig("blk0", "drivers.blk"),
    )
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        m.startswith('driver rng0 runs unjailed (isolation = "process-unjailed")') for m in said
    )
    assert any(m.startswith("driver blk0 runs unjailed: a block driver opens") for m in said)
