"""Debugging a driver and giving a swapped-in backend its own options (issue 22 items 4, 5).

Unit tests: the ``log_level`` and ``debug`` keys, ``--option`` parsing, the command line a
driver process gets, and ``breakpoint()`` in a driver process (drivers/debugger.py): skipped
with a warning outside debug mode, pdb on a UNIX socket in it.  End to end (a MiniStack): a
swap with ``--option``/``--log-level`` and what status and stats show of it; an unknown option
refused; a debug-mode driver stopped at a breakpoint or by SIGSTOP for longer than its
watchdog is left alone, and the same driver swapped out of debug mode is replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from typer.testing import CliRunner

from drivers import debugger
from drivers.debugger import Breakpoints
from isovisor.cli.app import app
from isovisor.cli.common import driver_setup
from isovisor.cli.swapclient import option_value, parse_options
from isovisor.config import ConfigError, DriverConfig, load_stack_config
from isovisor.paths import RunDir
from isovisor.supervisor.driverproc import DriverProcess
from isovisor.testing import MiniStack, wait_until
from tests.test_config import driver_stack

pytestmark = pytest.mark.timeout(240)

# --- configuration ---------------------------------------------------------------------------


def test_log_level_and_debug_default_and_parse(tmp_path: Path) -> None:
    (d,) = load_stack_config(driver_stack(tmp_path, "")).drivers
    assert (d.log_level, d.debug) == ("info", False)
    (d,) = load_stack_config(driver_stack(tmp_path, 'log_level = "debug"\ndebug = true')).drivers
    assert (d.log_level, d.debug) == ("debug", True)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'log_level = "loud"',
            'log_level = "loud" is not a log level; choose one of: debug, info, warning, error '
            "(the level of the driver's log, driver-<name>.log in the run directory)",
        ),
        (
            'log_level = "DEBUG"',
            'log_level = "DEBUG" is not a log level; choose one of: debug, info, warning, error',
        ),
        ("log_level = 10", "log_level = 10 must be a string"),
        ('debug = "yes"', 'debug = "yes" must be true or false (debug mode: no hang checks'),
        ("debug = 1", "debug = 1 must be true or false"),
    ],
)
def test_bad_log_level_and_debug_values_are_refused(
    tmp_path: Path, line: str, message: str
) -> None:
    p = driver_stack(tmp_path, line)
    with pytest.raises(ConfigError) as e:
        load_stack_config(p)
    assert str(e.value).startswith(f"{p} [driver.blk0]: {message}"), str(e.value)


def test_an_inline_driver_takes_neither(tmp_path: Path) -> None:
    p = driver_stack(tmp_path, 'isolation = "inline"\nlog_level = "debug"\ndebug = true')
    with pytest.raises(ConfigError) as e:
        load_stack_config(p)
    assert 'log_level, debug cannot be used with isolation = "inline"' in str(e.value)


def test_the_driver_process_gets_its_level_and_debug_mode(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)

    def args(**kw: Any) -> dict[str, str | None]:
        cmd = DriverProcess(DriverConfig("blk0", "drivers.blk", **kw), rd, 1).command()
        return {
            k: (cmd[cmd.index(k) + 1] if k in cmd else None)
            for k in ("--log-level", "--watchdog-ms", "--request-timeout-ms", "--debug")
        }

    assert args() == {
        "--log-level": "info",
        "--watchdog-ms": "2000",
        "--request-timeout-ms": "10000",
        "--debug": None,
    }
    # debug mode: no heartbeats and no request deadline (so no kernel hang checks), and
    # breakpoint() serves pdb in the run directory
    assert args(log_level="debug", debug=True, watchdog_sec=0.5) == {
        "--log-level": "debug",
        "--watchdog-ms": "0",
        "--request-timeout-ms": "0",
        "--debug": str(tmp_path / "driver-blk0" / "debug.pdb"),
    }


# --- --option ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8", 8),
        ("-3", -3),
        ("0x20", 32),
        ("1_000", 1000),
        ("2.5", 2.5),
        ("1e3", 1000.0),
        ("true", True),
        ("false", False),
        ('"42"', "42"),
        ("hello", "hello"),
        ("/tmp/x.img", "/tmp/x.img"),
        ("", ""),
        ("True", "True"),
        ("[1, 2]", "[1, 2]"),
    ],
)
def test_option_values_are_read_as_toml_scalars(text: str, value: object) -> None:
    got = option_value(text)
    assert got == value and type(got) is type(value)


def test_options_parse_and_bad_ones_name_the_argument() -> None:
    assert parse_options(["max_batch=8", "tag = hi there ", "on=true"]) == {
        "max_batch": 8,
        "tag": "hi there",
        "on": True,
    }
    assert parse_options(["url=a=b"]) == {"url": "a=b"}
    for bad, msg in (
        ("max_batch", "'max_batch' is not KEY=VALUE"),
        ("=8", "'=8' has no option name before '='"),
        (" =8", "has no option name"),
    ):
        with pytest.raises(ValueError, match=re.escape(msg)):
            parse_options([bad])
    with pytest.raises(ValueError, match="option 'a' is given twice: 'a=1' and 'a=2'"):
        parse_options(["a=1", "a=2"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--option", "max_batch"], "'max_batch' is not KEY=VALUE"),
        (["--option", "=8"], "'=8' has no option name before '='"),
        (["--option", "a=1", "--option", "a=2"], "option 'a' is given twice"),
        (["--log-level", "loud"], "'loud' is not one of"),
        (["--no-options", "--option", "a=1"], "give --option or --no-options, not both"),
    ],
)
def test_swap_cli_refuses_bad_arguments_before_asking_the_stack(
    tmp_path: Path, args: list[str], message: str
) -> None:
    r = CliRunner().invoke(
        app,
        ["driver", "swap", "blk0", "--to", "drivers.blk", "--run-dir", str(tmp_path), *args],
        env={"COLUMNS": "300"},
    )
    assert r.exit_code == 2, r.output
    flat = " ".join(r.output.replace("│", " ").split())
    assert f"Invalid value for '{args[0]}'" in flat and message in flat, r.output


def test_the_setup_line_says_where_the_log_is_and_how_the_driver_runs() -> None:
    row = {"log": "/r/driver-blk0.log", "log_level": "info", "debug": False, "options": {}}
    assert driver_setup(row) == "log /r/driver-blk0.log (level info)"
    row.update(debug=True, log_level="debug", options={"max_batch": 8, "tag": "x y"})
    assert driver_setup(row) == (
        "DEBUG MODE (no hang checks; breakpoint() opens pdb); log /r/driver-blk0.log "
        '(level debug); options max_batch = 8, tag = "x y"'
    )
    inline = {"log": "/r/kernel.log", "log_level": None, "debug": False, "options": {}}
    assert driver_setup(inline) == "log /r/kernel.log"


# --- breakpoint() in a driver process ------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def records() -> Iterator[tuple[logging.Logger, Records]]:
    log = logging.getLogger("test.driver.debugger")
    h = Records()
    log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        yield log, h
    finally:
        log.removeHandler(h)


def test_outside_debug_mode_a_breakpoint_is_logged_once_and_skipped(
    records: tuple[logging.Logger, Records],
) -> None:
    log, h = records
    hook = Breakpoints("blk0", log, None)
    for _ in range(3):
        hook()  # as breakpoint() calls it
    hook()  # another place
    skipped = [ln for ln in h.lines if "skipped" in ln]
    assert len(skipped) == 2, h.lines
    assert skipped[0].startswith(f"WARNING breakpoint() at {__file__}:")
    assert "driver blk0 is not in debug mode" in skipped[0]
    assert "set debug = true in [driver.blk0], or swap with --debug" in skipped[0]


def test_install_sets_the_hook_unless_pythonbreakpoint_is_set(
    monkeypatch: pytest.MonkeyPatch, records: tuple[logging.Logger, Records]
) -> None:
    log, h = records
    monkeypatch.setattr(sys, "breakpointhook", sys.breakpointhook)
    monkeypatch.setenv("PYTHONBREAKPOINT", "remote_pdb.set_trace")
    before = sys.breakpointhook
    assert debugger.install("blk0", log, None) is None
    assert sys.breakpointhook is before
    assert "breakpoint() follows PYTHONBREAKPOINT=remote_pdb.set_trace" in h.lines[-1]
    monkeypatch.delenv("PYTHONBREAKPOINT")
    hook = debugger.install("blk0", log, None)
    assert hook is not None and sys.breakpointhook is hook


class Client:
    """A developer's end of the pdb socket (what ``socat - UNIX-CONNECT:...`` does)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.buf = b""

    def until(self, marker: bytes = b"(Pdb) ") -> str:
        while marker not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"the debugger closed the connection; got {self.buf!r}")
            self.buf += chunk
        text, _, self.buf = self.buf.partition(marker)
        return text.decode()

    def send(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self.until()

    def closed(self) -> str:
        """What comes before the debugger ends the connection."""
        rest = self.buf
        while chunk := self.sock.recv(4096):
            rest += chunk
        self.sock.close()
        return rest.decode()


def stopping_in_a_thread(
    hook: Breakpoints,
) -> tuple[threading.Thread, dict[str, Any]]:
    """A thread that stops at ``hook`` (as breakpoint() would) and then records that it went
    on."""
    box: dict[str, Any] = {}

    def work() -> None:
        answer = 6
        hook()
        box["after"] = answer * 7

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, box


def test_in_debug_mode_a_breakpoint_serves_pdb_on_a_unix_socket(
    tmp_path: Path, records: tuple[logging.Logger, Records]
) -> None:
    log, h = records
    path = tmp_path / "driver-blk0.pdb"
    hook = Breakpoints("blk0", log, path)
    for leave in ("c", "q", None):  # continue, quit, or the client just goes away
        t, box = stopping_in_a_thread(hook)
        line = wait_until(
            lambda: next((ln for ln in h.lines if "stopped at a breakpoint" in ln), None),
            timeout=10,
            what="the breakpoint's log line",
        )
        h.lines.clear()
        assert re.fullmatch(
            rf"WARNING driver blk0 stopped at a breakpoint at {re.escape(__file__)}:\d+ "
            rf"\(pid {os.getpid()}\): connect with socat - UNIX-CONNECT:{re.escape(str(path))}",
            line,
        ), line
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o600
        c = Client(str(path))
        first = c.until()
        assert "-> box[" in first and "work()" in first, first  # the line after breakpoint()
        assert c.send("p answer * 7").strip() == "42"
        if leave is None:
            c.sock.close()
        else:
            c.sock.sendall(leave.encode() + b"\n")
            rest = c.closed()
            assert leave == "c" or "detaching: the driver goes on" in rest, rest
        t.join(10)
        assert not t.is_alive() and box == {"after": 42}, "the driver did not go on"
        assert not path.exists()
        assert any("debugger detached: driver blk0 goes on" in ln for ln in h.lines), h.lines


def test_commands_piped_in_together_are_each_answered(
    tmp_path: Path, records: tuple[logging.Logger, Records]
) -> None:
    """As ``printf 'p 1\\np 2\\nc\\n' | socat - UNIX-CONNECT:...`` sends them: one write."""
    log, _ = records
    path = tmp_path / "driver-blk0.pdb"
    t, box = stopping_in_a_thread(Breakpoints("blk0", log, path))
    wait_until(path.exists, timeout=10, what="the pdb socket")
    c = Client(str(path))
    c.sock.sendall(b"p answer + 1\np answer + 2\nc\n")
    rest = c.closed()
    assert rest.endswith("(Pdb) 7\n(Pdb) 8\n(Pdb) "), rest
    t.join(10)
    assert box == {"after": 42}, "the driver did not go on"


def test_a_breakpoint_waiting_for_its_client_gives_way_to_a_stop(
    tmp_path: Path, records: tuple[logging.Logger, Records]
) -> None:
    log, h = records
    path = tmp_path / "driver-blk0.pdb"
    stop = threading.Event()
    t, box = stopping_in_a_thread(Breakpoints("blk0", log, path, stop.is_set))
    wait_until(path.exists, timeout=10, what="the pdb socket")
    stop.set()
    t.join(10)
    assert box == {"after": 42} and not path.exists()
    assert "driver blk0 is stopping: leaving the breakpoint" in h.lines[-1]


def test_a_socket_in_use_or_left_over_is_not_in_the_way(tmp_path: Path) -> None:
    path = tmp_path / "driver-blk0.pdb"
    path.write_text("")  # left by a process killed at a breakpoint: replaced
    with debugger._bind(path) as s:
        assert s.getsockname() == str(path)
        # another instance is stopped there: this one takes driver-blk0.<pid>.pdb
        with debugger._bind(path) as other:
            assert other.getsockname() == str(tmp_path / f"driver-blk0.{os.getpid()}.pdb")


# --- end to end ----------------------------------------------------------------------------

TAGGED = """
from drivers.sdk import Backend as FileBackend


class Backend(FileBackend):
    OPTIONS = {
        **FileBackend.OPTIONS,
        "tag": "a word shown in the statistics",
        "weight": "a number shown in the statistics",
    }

    def statistics(self):
        breakpoint()  # not in debug mode: logged once and skipped, the driver goes on
        out = super().statistics()
        out["tag"] = str(self.options.get("tag", "-"))
        out["weight"] = self.options.get("weight", 0)
        return out
"""

STOPS_ONCE = """
from drivers.sdk import Backend as FileBackend


class Backend(FileBackend):
    stopped = False

    def statistics(self):
        if not Backend.stopped:
            Backend.stopped = True
            marker = "at the breakpoint"
            breakpoint()
        return super().statistics()
"""


def log_of(s: MiniStack) -> str:
    return (s.run_dir / "driver-blk0.log").read_text(errors="replace")


def no_event(s: MiniStack, topics: tuple[str, ...], seconds: float) -> None:
    """None of ``topics`` comes within ``seconds`` (a negative check: it has to wait)."""
    start = len(s.seen)
    with pytest.raises(AssertionError, match=re.escape("no 'driver.blk0.never'")):
        s.wait_event("driver.blk0.never", timeout=seconds)
    came = [t for t, _ in s.seen[start:] if t in topics]
    assert not came, came


@pytest.mark.e2e
def test_swap_with_options_and_log_level_and_what_status_shows(
    isovisor_stack: MiniStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    s = isovisor_stack.start("drivers.blk", guests=1, ops=400_000, options={"max_batch": 16})
    tagged = s.dir / "tagged.py"
    tagged.write_text(textwrap.dedent(TAGGED))
    log = str(s.run_dir / "driver-blk0.log")
    row = s.driver()
    assert (row["log"], row["log_level"], row["debug"], row["options"]) == (
        log,
        "info",
        False,
        {"max_batch": 16},
    )
    status = json.loads(s.cli("status", "--json").stdout)
    assert status[0]["log"] == log and status[0]["options"] == {"max_batch": 16}
    assert f"blk0: log {log} (level info); options max_batch = 16" in s.cli("status").stdout

    # an unknown option: refused (load), naming the allowed ones; nothing stopped
    pid = row["pid"]
    r = s.cli("driver", "swap", "blk0", "--to-file", str(tagged), "--option", "colour=red")
    assert r.returncode == 1, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert f"swap of blk0 to {tagged} refused (load):" in err, err
    assert "colour" in err and "allowed: max_batch," in err and ", tag, weight (what each" in err, (
        err
    )
    assert f"drivers.blk (pid {pid}) goes on serving" in err, err
    assert s.driver()["options"] == {"max_batch": 16}

    # options of its own and a log level for the new backend
    r = s.cli(
        "driver",
        "swap",
        "blk0",
        "--to-file",
        str(tagged),
        "--option",
        "tag=hello",
        "--option",
        "weight=2.5",
        "--log-level",
        "debug",
        "--probation",
        "0.3",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"swapped blk0: drivers.blk -> {tagged}" in r.stdout
    new = s.driver()
    assert new["pid"] != pid
    assert (new["options"], new["log_level"]) == ({"tag": "hello", "weight": 2.5}, "debug")
    assert new["last_swap"]["options"] == {"tag": "hello", "weight": 2.5}
    s.wait_statistics(lambda st: st.get("tag") == "hello" and st.get("weight") == 2.5)
    s.more_io(1000)
    text = log_of(s)
    assert re.search(rf"driver blk0\[{new['pid']}\] DEBUG attach ", text), text[-3000:]
    assert not re.search(rf"driver blk0\[{pid}\] DEBUG ", text), "the old instance was at info"
    # breakpoint() outside debug mode: logged, skipped, and the driver is the same process
    assert "skipped: driver blk0 is not in debug mode" in text
    stats = s.cli("driver", "stats", "blk0")
    assert f'log {log} (level debug); options tag = "hello", weight = 2.5' in stats.stdout
    stats_json = json.loads(s.cli("driver", "stats", "blk0", "--json").stdout)
    assert (stats_json["log"], stats_json["options"]) == (log, {"tag": "hello", "weight": 2.5})

    # they stay with the driver: a restart's process gets them
    r = s.cli("driver", "restart", "blk0")
    assert r.returncode == 0, r.stderr
    again = s.driver()
    assert again["pid"] != new["pid"] and again["options"] == {"tag": "hello", "weight": 2.5}
    cmd = psutil.Process(again["pid"]).cmdline()
    assert json.loads(cmd[cmd.index("--options") + 1]) == {"tag": "hello", "weight": 2.5}
    assert cmd[cmd.index("--log-level") + 1] == "debug"
    # the skipped breakpoints killed nothing: the one restart is ours
    assert s.driver()["restarts_by_reason"] == {"manual": 1}

    # --watch passes them on each swap
    r = s.cli(
        "driver", "swap", "blk0", "--watch", str(tagged), "--max-swaps", "1", "--option", "tag=w"
    )
    assert r.returncode == 0 and "swapped blk0" in r.stdout, r.stdout + r.stderr
    assert s.driver()["options"] == {"tag": "w"}
    s.wait_statistics(lambda st: st.get("tag") == "w" and st.get("weight") == 0)

    # --no-options: back to drivers.blk, which would refuse `tag`
    r = s.cli("driver", "swap", "blk0", "--to", "drivers.blk", "--no-options")
    assert r.returncode == 0 and "swapped blk0" in r.stdout, r.stdout + r.stderr
    assert (s.driver()["options"], s.driver()["module"]) == ({}, "drivers.blk")


@pytest.mark.e2e
def test_a_debug_mode_driver_is_not_killed_as_hung(
    isovisor_stack: MiniStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped at a breakpoint, then by SIGSTOP, each time for longer than its watchdog and
    request timeout: left alone.  Swapped out of debug mode, a SIGSTOP gets it replaced."""
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    s = isovisor_stack
    backend = s.dir / "stops_once.py"
    backend.write_text(textwrap.dedent(STOPS_ONCE))
    s.start(
        backend,
        guests=1,
        ops=80_000,  # the steps below take about 40,000
        driver={"debug": True, "watchdog_sec": 0.5, "request_timeout_sec": 1.0},
        wait_io=False,  # its first statistics() may stop it before the guest's disk connects
    )
    row = s.driver()
    pid = row["pid"]
    assert row["debug"] is True
    status = s.cli("status").stdout
    assert "blk0: DEBUG MODE (no hang checks; breakpoint() opens pdb); log " in status, status
    sup_log = (s.run_dir / "supervisor.log").read_text()
    assert "driver blk0: debug mode: no hang checks" in sup_log
    assert "driver blk0 is in debug mode: no hang checks" in log_of(s)

    # the first statistics() stops at breakpoint(): pdb on the socket the log names
    line = wait_until(
        lambda: re.search(
            r"stopped at a breakpoint at (\S+) \(pid (\d+)\): .*UNIX-CONNECT:(\S+)", log_of(s)
        ),
        timeout=20,
        what="the driver at its breakpoint",
    )
    assert line[1].startswith(str(backend)) and int(line[2]) == pid
    assert line[3] == str(s.run_dir / "driver-blk0" / "debug.pdb")
    c = Client(line[3])
    assert "statistics()" in c.until()
    assert c.send("p marker").strip() == "'at the breakpoint'"
    no_event(s, ("driver.blk0.hang", "driver.blk0.exit"), 2.5)  # > watchdog, request timeout
    c.sock.sendall(b"c\n")
    c.closed()
    wait_until(lambda: "debugger detached: driver blk0 goes on" in log_of(s), 10, "detached")
    s.more_io(1000)
    assert s.driver()["pid"] == pid

    # SIGSTOP: the supervisor's stopped-process check is off too
    os.kill(pid, signal.SIGSTOP)
    try:
        no_event(s, ("driver.blk0.hang", "driver.blk0.exit"), 2.5)
        row = s.driver()
        assert (row["pid"], row["state"], row["restarts"]) == (pid, "RUNNING", 0)
    finally:
        os.kill(pid, signal.SIGCONT)
    s.more_io(1000)

    # out of debug mode (swap --no-debug): a stopped driver is replaced
    r = s.cli("driver", "swap", "blk0", "--to", "drivers.blk", "--no-debug", "--probation", "0.3")
    assert r.returncode == 0, r.stdout + r.stderr
    row = s.driver()
    assert row["debug"] is False and row["pid"] != pid
    assert "DEBUG MODE" not in s.cli("status").stdout
    started = time.monotonic()
    os.kill(row["pid"], signal.SIGSTOP)
    rec = s.wait_event("driver.blk0.recovered", timeout=20, old_pid=row["pid"])
    assert rec["reason"] in ("stopped", "hang"), rec
    assert time.monotonic() - started < 10
    s.finish(timeout=180)


@pytest.mark.parametrize(
    "verb", [["driver", "stats"], ["driver", "swap"], ["driver", "restart"], ["fault", "add"]]
)
def test_a_driver_arguments_help_names_the_config_table(verb: list[str]) -> None:
    """The help of a driver name argument shows ``[driver.<name>]`` (rich markup once ate the
    brackets, leaving "as in .")."""
    r = CliRunner().invoke(app, [*verb, "--help"], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "Driver name, as in [driver.<name>]." in r.output, r.output
