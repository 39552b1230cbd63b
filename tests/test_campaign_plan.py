"""Campaign plans: every mistake is reported at its file:line, and schedules follow the seed."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.schema import ConfigError
from isovisor.campaign.plan import (
    FAULT_TYPES,
    OUTSIDE_TYPES,
    FaultEntry,
    Plan,
    PlanError,
    ScheduledFault,
    StackSpec,
    Workload,
    describe,
    injection_count,
    load_plan,
    schedule,
    schedule_to_json,
)
from isovisor.config import DRIVER_FIELDS, KERNEL_FIELDS, DriverConfig, load_stack_config
from tests.conftest import write

pytestmark = pytest.mark.timeout(60)

DOCS_PLAN = """\
[campaign]
name = "smoke"            # free text, shown in the report
seed = 1                  # default seed; --seed overrides
duration = 40             # seconds of injection (or `faults = N`: stop after N injections)
gap = 0.3                 # seconds between two injections, at least (the driver must be
                          # RUNNING with a warm spare again, too)
isolation = "process"     # or "inline"; --isolation overrides

[stack]                   # optional; these are the defaults
pcpus = 2
driver = "blk0"           # the driver the faults go to
watchdog_sec = 0.5
request_timeout_sec = 1.0
max_rss = "256M"
max_fds = 512

[[workload]]
image = "blkstress"       # a guest program with end-to-end verification
domains = 2
extra = "qd=32 mix=60 blocks=1024"
disk_size = "8M"

[[fault]]
type = "sigkill"
weight = 5                # relative share of the injections (default 1)
# count = 3               # or: exactly this many injections of this fault (overrides weight)

[[fault]]
type="slow"
latency_ms=50
jitter_ms = 10
count = 3
op = "read"

[[fault]]
type = "poison"
sector = 4096
"""

# Line numbers matter: the error tests below edit single lines of this plan.
BASE = """\
# a small plan
[campaign]
name = "t"
duration = 10

[[workload]]
image = "blkstress"
domains = 2

[[fault]]
type = "sigkill"
weight = 2

[[fault]]   # the second one
type = "segv"
"""


def plan_file(tmp_path: Path, text: str) -> Path:
    return write(tmp_path / "plan.toml", text)


def error_at(tmp_path: Path, text: str, line: int) -> str:
    """Load a bad plan; check the "file:line: " prefix; return the rest of the message."""
    p = plan_file(tmp_path, text)
    with pytest.raises(PlanError) as e:
        load_plan(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert e.value.line == line and e.value.path == str(p)
    return msg[len(f"{p}:{line}: ") :]


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# --- valid plans ----------------------------------------------------------------------------------


def test_docs_plan_round_trip(tmp_path: Path) -> None:
    p = plan_file(tmp_path, DOCS_PLAN)
    plan = load_plan(p)
    assert plan == Plan(
        path=p,
        name="smoke",
        seed=1,
        duration=40.0,
        faults_total=None,
        gap=0.3,
        isolation="process",
        stack=StackSpec(),
        workloads=(
            Workload(
                image="blkstress",
                domains=2,
                extra="qd=32 mix=60 blocks=1024",
                disk_size="8M",
                line=17,
            ),
        ),
        faults=(
            FaultEntry(index=0, type="sigkill", weight=5.0, line=23),
            FaultEntry(
                index=1, type="slow", count=3, op="read", latency_ms=50.0, jitter_ms=10.0, line=28
            ),
            FaultEntry(index=2, type="poison", sector=4096, line=35),
        ),
    )
    assert isinstance(plan.duration, float) and isinstance(plan.faults[0].weight, float)
    assert plan.workloads[0].disk_bytes == 8 << 20
    assert plan.stack.max_rss_bytes == 256 << 20
    assert plan.faults[1].args() == {"op": "read", "latency_ms": 50.0, "jitter_ms": 10.0}
    assert plan.faults[0].args() == {} and plan.faults[0].outside
    assert not plan.faults[2].outside
    assert describe(plan) == (
        f"{p}: OK — 2 workload guests (blkstress), 3 fault entries, "
        "~133 injections over 40 s, seed 1"
    )


def test_defaults_and_faults_mode(tmp_path: Path) -> None:
    p = write(
        tmp_path / "tiny.toml",
        '[campaign]\nfaults = 7\n[[workload]]\nimage = "blkstress"\n[[fault]]\ntype = "exit"\n',
    )
    plan = load_plan(p)
    assert (plan.name, plan.seed, plan.duration, plan.faults_total, plan.gap, plan.isolation) == (
        "tiny",
        1,
        None,
        7,
        0.3,
        "process",
    )
    assert plan.stack == StackSpec(
        pcpus=2,
        driver="blk0",
        watchdog_sec=0.5,
        request_timeout_sec=1.0,
        max_rss="256M",
        max_fds=512,
    )
    assert plan.workloads == (
        Workload(image="blkstress", domains=1, extra="", disk_size="8M", line=3),
    )
    assert describe(plan) == (
        f"{p}: OK — 1 workload guest (blkstress), 1 fault entry, "
        "7 injections at least 0.3 s apart, seed 1"
    )


def test_fault_types_table() -> None:
    assert set(FAULT_TYPES) == {
        "sigkill",
        "sigstop",
        "segv",
        "abort",
        "exception",
        "exit",
        "hang",
        "slow",
        "drop",
        "duplicate",
        "bad_id",
        "bad_status",
        "bad_op",
        "bad_index",
        "corrupt_data",
        "leak_mem",
        "leak_fd",
        "recovery_crash",
        "poison",
    }
    assert frozenset({"sigkill", "sigstop", "recovery_crash"}) == OUTSIDE_TYPES
    assert all(isinstance(v, str) and v and "\n" not in v for v in FAULT_TYPES.values())


def test_every_inside_type_loads_with_filters(tmp_path: Path) -> None:
    entries = []
    for kind in FAULT_TYPES:
        if kind in OUTSIDE_TYPES:
            entries.append(f'[[fault]]\ntype = "{kind}"\ncount = 1\n')
        else:
            entries.append(
                f'[[fault]]\ntype = "{kind}"\nsector = 8\nop = "write"\n'
                'domain = "w1"\nvdev = "xvda"\nprobability = 50\ninterval = 2\n'
                "times = -1\nfail_nth = 3\n"
            )
    text = '[campaign]\nfaults = 40\n[[workload]]\nimage = "blkstress"\n' + "".join(entries)
    plan = load_plan(plan_file(tmp_path, text))
    assert [f.type for f in plan.faults] == list(FAULT_TYPES)
    segv = plan.faults[list(FAULT_TYPES).index("segv")]
    assert (
        segv.sector,
        segv.op,
        segv.domain,
        segv.vdev,
        segv.probability,
        segv.interval,
        segv.times,
        segv.fail_nth,
    ) == (8, "write", "w1", "xvda", 50.0, 2, -1, 3)


# --- errors: file:line, table, key, value, what is allowed ----------------------------------------


def test_bad_type_names_line_entry_and_choices(tmp_path: Path) -> None:
    msg = error_at(tmp_path, edit('type = "segv"', 'type = "sigkil"'), 15)
    assert msg.startswith(
        '[[fault]] #2: type = "sigkil" is not a fault type; choose one of: '
        "sigkill, sigstop, recovery_crash, segv,"
    )
    assert "poison" in msg and 'did you mean "sigkill"?' in msg


def test_key_without_spaces_and_comment_lines(tmp_path: Path) -> None:
    text = edit('type = "segv"', '# type = "nope"\n\n   type="sigkil"   # typo')
    msg = error_at(tmp_path, text, 17)
    assert msg.startswith('[[fault]] #2: type = "sigkil" is not a fault type')


def test_header_lookalikes_inside_values_are_not_tables(tmp_path: Path) -> None:
    text = edit(
        "domains = 2",
        'domains = 2\nextra = """\n[[fault]]\ntype = "x"\n"""\ndisk_size = [\n  "8M"\n]',
        BASE,
    )
    # the multi-line string and array do not start a [[fault]]; disk_size is reported
    msg = error_at(tmp_path, text, 13)
    assert msg.startswith('[[workload]] #1: disk_size = ["8M"] must be a string')
    text = edit(
        "weight = 2",
        "weight = 2\ncount = 0",
        edit("domains = 2", 'domains = 2\nextra = """\n[[fault]]\ntype = "x"\n"""'),
    )
    msg = error_at(tmp_path, text, 17)
    assert msg.startswith("[[fault]] #1: count = 0 must be between 1 and 100000")


@pytest.mark.parametrize(
    ("table", "old", "new", "line", "start"),
    [
        (
            "campaign",
            'name = "t"',
            'nmae = "t"',
            3,
            '[campaign]: unknown key "nmae" (did you mean "name"?); allowed keys: name, seed, '
            "duration, faults, gap, isolation",
        ),
        (
            "workload",
            "domains = 2",
            "domain = 2",
            8,
            '[[workload]] #1: unknown key "domain" (did you mean "domains"?); allowed keys: image, '
            "domains, extra, disk_size",
        ),
        (
            "fault",
            'type = "segv"',
            'type = "segv"\nprobabilty = 5',
            16,
            '[[fault]] #2: unknown key "probabilty" (did you mean "probability"?); allowed '
            "keys: type, "
            "weight, count, probability, interval, times, fail_nth, domain, vdev, op, sector, "
            "latency_ms, jitter_ms",
        ),
        (
            "stack",
            "# a small plan",
            "[stack]\ncpus = 2",
            2,
            '[stack]: unknown key "cpus" (did you mean "pcpus"?); allowed keys: pcpus, driver, '
            "module, watchdog_sec, request_timeout_sec, max_rss, max_fds",
        ),
    ],
)
def test_unknown_keys_list_the_allowed_ones(
    tmp_path: Path, table: str, old: str, new: str, line: int, start: str
) -> None:
    assert error_at(tmp_path, edit(old, new), line) == start


def test_unknown_table_and_top_level_key(tmp_path: Path) -> None:
    msg = error_at(tmp_path, BASE + "\n[campain]\nseed = 2\n", 17)
    assert msg == (
        'unknown table "campain" (did you mean "campaign"?); allowed: [campaign], '
        "[stack], [[workload]], [[fault]]"
    )
    msg = error_at(tmp_path, "seed = 3\n" + BASE, 1)
    assert msg.startswith('unknown key "seed"')


@pytest.mark.parametrize(
    ("old", "new", "line", "expected"),
    [
        # [campaign]
        (
            "duration = 10",
            "duration = 0",
            4,
            "[campaign]: duration = 0 must be more than 0 (seconds of injection)",
        ),
        (
            "duration = 10",
            "duration = inf",
            4,
            "[campaign]: duration = inf must be a finite number (seconds of injection)",
        ),
        (
            "duration = 10",
            'duration = "10s"',
            4,
            '[campaign]: duration = "10s" must be a number (seconds of injection), got a string',
        ),
        (
            'name = "t"',
            "seed = -1",
            3,
            "[campaign]: seed = -1 must be at least 0 (the default seed; --seed overrides)",
        ),
        (
            'name = "t"',
            'seed = "one"',
            3,
            '[campaign]: seed = "one" must be an integer (the default seed; --seed overrides), '
            "got a string",
        ),
        (
            'name = "t"',
            "gap = -0.5",
            3,
            "[campaign]: gap = -0.5 must be at least 0 (seconds between two injections, at least)",
        ),
        (
            'name = "t"',
            'isolation = "thread"',
            3,
            '[campaign]: isolation = "thread" is not an isolation; choose one of: process, inline '
            "(how the driver runs: process (its own OS process) or inline (a thread of the kernel "
            "process, for comparison))",
        ),
        (
            "duration = 10",
            "duration = 10\nfaults = 5",
            5,
            "[campaign]: give either duration = SECONDS or faults = N, not both",
        ),
        (
            "duration = 10",
            "",
            2,
            "[campaign]: missing duration = SECONDS (seconds of injection) or faults = N "
            "(stop after N "
            "injections)",
        ),
        (
            "duration = 10",
            "faults = 0",
            4,
            "[campaign]: faults = 0 must be between 1 and 100000 (stop after this many "
            "injections, at "
            "most 100000)",
        ),
        (
            "duration = 10",
            "duration = 10\ngap = 0",
            5,
            "[campaign]: gap = 0 cannot be used with duration: the gap decides how many injections "
            "fit into it; give gap > 0 or use faults = N instead of duration",
        ),
        (
            "duration = 10",
            "duration = 10\ngap = 0.00001",
            5,
            "[campaign]: gap = 1e-05 fits 1000000 injections into duration = 10; at most "
            "100000 are "
            "allowed: raise gap",
        ),
        # [[workload]]
        (
            "domains = 2",
            "domains = 17",
            8,
            "[[workload]] #1: domains = 17 must be between 1 and 16 (how many guests run it)",
        ),
        (
            "domains = 2",
            "domains = true",
            8,
            "[[workload]] #1: domains = true must be an integer (how many guests run it), "
            "got a boolean",
        ),
        (
            'image = "blkstress"',
            'image = ""',
            7,
            '[[workload]] #1: image = "" must not be empty (a guest program with end-to-end '
            'verification, e.g. "blkstress")',
        ),
        (
            'image = "blkstress"',
            'disk_size = "8X"',
            7,
            '[[workload]] #1: disk_size = "8X" is not a size',
        ),
        (
            'image = "blkstress"',
            "extra = 5",
            7,
            "[[workload]] #1: extra = 5 must be a string (parameters passed to each guest), got an "
            "integer",
        ),
        (
            'image = "blkstress"',
            "",
            6,
            '[[workload]] #1: missing required key "image" (a guest program with end-to-end '
            'verification, e.g. "blkstress")',
        ),
        # [[fault]] knobs and filters
        (
            'type = "segv"',
            'type = "segv"\nprobability = 101',
            16,
            "[[fault]] #2: probability = 101 must be between 0 and 100 (percent: the chance "
            "that an "
            "eligible request fails)",
        ),
        (
            'type = "segv"',
            'type = "segv"\ninterval = 0',
            16,
            "[[fault]] #2: interval = 0 must be at least 1",
        ),
        (
            'type = "segv"',
            'type = "segv"\ntimes = 0',
            16,
            "[[fault]] #2: times = 0 must be -1 (unlimited) or at least 1",
        ),
        (
            'type = "segv"',
            'type = "segv"\ntimes = -2',
            16,
            "[[fault]] #2: times = -2 must be -1 (unlimited) or at least 1",
        ),
        (
            'type = "segv"',
            'type = "segv"\nfail_nth = -1',
            16,
            "[[fault]] #2: fail_nth = -1 must be at least 0",
        ),
        ("weight = 2", "weight = 0", 12, "[[fault]] #1: weight = 0 must be more than 0"),
        (
            "weight = 2",
            "count = 1.5",
            12,
            "[[fault]] #1: count = 1.5 must be an integer (exactly this many injections of this "
            "fault), got a number",
        ),
        (
            'type = "segv"',
            'type = "segv"\nop = "trim"',
            16,
            '[[fault]] #2: op = "trim" is not an operation; choose one of: read, write, flush, '
            "discard",
        ),
        (
            'type = "segv"',
            'type = "segv"\nsector = -1',
            16,
            "[[fault]] #2: sector = -1 must be at least 0",
        ),
        (
            'type = "segv"',
            'type = "segv"\nvdev = "sda"',
            16,
            '[[fault]] #2: vdev = "sda" is not a device name: use xvda .. xvdz',
        ),
        ('type = "segv"', "", 14, '[[fault]] #2: missing required key "type" (what to inject)'),
        # type-specific rules
        (
            'type = "segv"',
            'type = "poison"',
            14,
            '[[fault]] #2: type = "poison" needs sector = N (the sector whose requests kill the '
            "driver; for a block driver, the request's sectors cover this sector)",
        ),
        (
            'type = "segv"',
            'type = "segv"\nlatency_ms = 5',
            16,
            '[[fault]] #2: latency_ms = 5 only applies to type = "slow", not "segv"; remove '
            "latency_ms",
        ),
        (
            'type = "segv"',
            'type = "slow"\njitter_ms = -1',
            16,
            "[[fault]] #2: jitter_ms = -1 must be at least 0",
        ),
        (
            "weight = 2",
            'op = "read"',
            12,
            '[[fault]] #1: op = "read" cannot be used with type = "sigkill": it is carried '
            "out from "
            "outside the driver (a signal)",
        ),
        (
            'type = "segv"',
            'type = "recovery_crash"\n\nprobability = 50',
            17,
            '[[fault]] #2: probability = 50 cannot be used with type = "recovery_crash"',
        ),
        (
            'type = "segv"',
            'type = "sigstop"\ntimes = 2',
            16,
            '[[fault]] #2: times = 2 cannot be used with type = "sigstop"',
        ),
        # [stack]
        (
            "# a small plan",
            '[stack]\nmax_rss = "10M"',
            2,
            '[stack]: max_rss = "10M" is below 16M: a driver process alone uses more',
        ),
        ("# a small plan", "[stack]\npcpus = 0", 2, "[stack]: pcpus = 0 must be between 1 and 64"),
        (
            "# a small plan",
            "[stack]\nwatchdog_sec = 0.05",
            2,
            "[stack]: watchdog_sec = 0.05 must be 0 (off) or at least 0.1",
        ),
        (
            "# a small plan",
            '[stack]\ndriver = "blk 0"',
            2,
            '[stack]: driver = "blk 0" must start with a letter or digit and contain only letters, '
            "digits, '_', '.', '-' (at most 63 characters) (the driver the faults go to)",
        ),
    ],
)
def test_value_errors(tmp_path: Path, old: str, new: str, line: int, expected: str) -> None:
    assert error_at(tmp_path, edit(old, new), line).startswith(expected)


# --- one schema: [stack] is checked as supervisor.toml is -----------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "watchdog_sec = 0.05",
        'watchdog_sec = "2s"',
        "watchdog_sec = inf",
        "watchdog_sec = true",
        "request_timeout_sec = 0",
        'max_rss = "10M"',
        'max_rss = "lots"',
        "max_rss = 512",
        "max_fds = 8",
        "max_fds = 1.5",
        "module = 5",
        "pcpus = 0",
        "pcpus = 65",
        "sparee = true",
    ],
)
def test_a_stack_key_is_explained_as_in_supervisor_toml(tmp_path: Path, line: str) -> None:
    """One mechanism: the same bad value gives the same sentence, help text included, in a
    stack file's [driver.<name>] (or [kernel]) and in a plan's [stack]; only the place differs."""
    key = line.split(" = ")[0]
    if key == "pcpus":
        table, where, body = "kernel", "[kernel]", f"[kernel]\n{line}\n"
    else:
        table, where, body = "driver", "[driver.blk0]", f"[driver.blk0]\n{line}\n"
        if key != "module":
            body = body.replace("\n", '\nmodule = "drivers.blk"\n', 1)
    sup = write(tmp_path / "supervisor.toml", body)
    with pytest.raises(ConfigError) as e:
        load_stack_config(sup)
    assert str(e.value).startswith(f"{sup} {where}: "), str(e.value)
    sentence = str(e.value)[len(f"{sup} {where}: ") :]
    in_plan = error_at(tmp_path, edit("# a small plan", f"[stack]\n{line}"), 2)
    if key == "sparee":  # a stack's key that a campaign's [stack] does not take
        assert sentence.startswith('unknown key "sparee" (did you mean "spare"?)')
        assert in_plan == (
            '[stack]: unknown key "sparee"; allowed keys: pcpus, driver, module, '
            "watchdog_sec, request_timeout_sec, max_rss, max_fds"
        )
        return
    assert in_plan == f"[stack]: {sentence}"
    fields = KERNEL_FIELDS if table == "kernel" else DRIVER_FIELDS
    assert sentence.startswith(f"{line} ") and f"({fields[key].help})" in sentence, sentence


def test_isolation_is_explained_in_supervisor_toml_and_in_a_campaign(tmp_path: Path) -> None:
    sup = write(
        tmp_path / "supervisor.toml", '[driver.blk0]\nmodule = "drivers.blk"\nisolation = "inlin"\n'
    )
    with pytest.raises(ConfigError) as e:
        load_stack_config(sup)
    assert str(e.value) == (
        f'{sup} [driver.blk0]: isolation = "inlin" is not an isolation; choose one of: process, '
        f'process-unjailed, inline (did you mean "inline"?) ({DRIVER_FIELDS["isolation"].help})'
    )
    assert "jailed" in DRIVER_FIELDS["isolation"].help
    # a campaign compares a process with the kernel's thread: no unjailed choice there
    assert error_at(tmp_path, edit('name = "t"', 'isolation = "inlin"'), 3) == (
        '[campaign]: isolation = "inlin" is not an isolation; choose one of: process, inline '
        '(did you mean "inline"?) (how the driver runs: process (its own OS process) or inline '
        "(a thread of the kernel process, for comparison))"
    )


def test_a_campaigns_driver_defaults_differ_from_a_stacks_only_where_documented(
    tmp_path: Path,
) -> None:
    """watchdog_sec, request_timeout_sec, max_rss, max_fds: shorter or set on purpose (a
    comment in plan.py and docs/campaigns.md say why); every other driver default is a stack's."""
    stack = DriverConfig(name="blk0", module="drivers.blk")
    camp = StackSpec()
    assert (stack.watchdog_sec, stack.request_timeout_sec, stack.max_rss, stack.max_fds) == (
        2.0,
        10.0,
        None,
        None,
    )
    assert (camp.watchdog_sec, camp.request_timeout_sec, camp.max_rss_bytes, camp.max_fds) == (
        0.5,
        1.0,
        256 << 20,
        512,
    )
    assert Plan(path=Path("p"), name="p").isolation == stack.isolation == "process"
    # docs/campaigns.md's [stack] example is "the defaults", each with a stack's beside it
    docs = (Path(__file__).resolve().parents[1] / "docs" / "campaigns.md").read_text()
    example = re.search(r"## The plan file\n\n```toml\n(.*?)```", docs, re.S)
    assert example is not None
    assert load_plan(plan_file(tmp_path, example.group(1))).stack == camp
    for key in ("watchdog_sec", "request_timeout_sec", "max_rss", "max_fds"):
        default = getattr(stack, key)
        shown = "none" if default is None else repr(default)
        assert re.search(rf"^{key} = .*# a stack's default: {shown}$", example.group(1), re.M)
    assert "`watchdog_sec` 0.5 s, not the 2 s of a stack" in " ".join(docs.split())


@pytest.mark.parametrize(
    ("old", "new", "line", "expected"),
    [
        (
            "weight = 2",
            "count = 4",
            4,
            "[campaign]: duration = 10 fits only 3 injections at gap = 3 s, but the [[fault]] "
            "counts "
            "add up to 6; raise duration, lower gap or lower the counts",
        ),
    ],
)
def test_counts_must_fit_the_duration(
    tmp_path: Path, old: str, new: str, line: int, expected: str
) -> None:
    text = edit('type = "segv"', 'type = "segv"\ncount = 2', edit(old, new))
    text = edit('name = "t"', 'name = "t"\ngap = 3', text)
    assert error_at(tmp_path, text, line + 1) == expected


def test_counts_and_faults_total(tmp_path: Path) -> None:
    both_counted = edit(
        'type = "segv"', 'type = "segv"\ncount = 2', edit("weight = 2", "count = 4")
    )
    msg = error_at(tmp_path, edit("duration = 10", "faults = 5", both_counted), 4)
    assert msg.startswith(
        "[campaign]: faults = 5 is less than the [[fault]] counts, which add up to 6"
    )
    msg = error_at(tmp_path, edit("duration = 10", "faults = 9", both_counted), 4)
    assert msg.startswith(
        "[campaign]: faults = 9 but every [[fault]] has a count and they add up to 6"
    )
    # equal is fine; so is a weighted entry taking the rest
    assert (
        load_plan(
            plan_file(tmp_path, edit("duration = 10", "faults = 6", both_counted))
        ).faults_total
        == 6
    )
    plan = load_plan(
        plan_file(tmp_path, edit("duration = 10", "faults = 9", edit("weight = 2", "count = 4")))
    )
    assert [(f.count, f.weight) for f in plan.faults] == [(4, 1.0), (None, 1.0)]


def test_missing_and_misshapen_tables(tmp_path: Path) -> None:
    msg = error_at(tmp_path, edit("[campaign]\n", "", edit('name = "t"\nduration = 10\n', "")), 1)
    assert msg.startswith("missing the [campaign] table")
    text = BASE.split("[[fault]]")[0]
    assert error_at(tmp_path, text, 1).startswith(
        "no [[fault]] table: a campaign needs at least one"
    )
    text = edit('[[workload]]\nimage = "blkstress"\ndomains = 2\n', "")
    assert error_at(tmp_path, text, 1).startswith("no [[workload]] table")
    msg = error_at(tmp_path, edit("[[workload]]", "[workload]"), 6)
    assert msg == "[workload] must be an array of tables: write [[workload]], one per entry"
    msg = error_at(tmp_path, edit("[campaign]", "[[campaign]]"), 2)
    assert msg == "[[campaign]] must be a single table: write [campaign], not [[campaign]]"


def test_inline_table_points_at_its_line(tmp_path: Path) -> None:
    text = edit('[campaign]\nname = "t"\nduration = 10\n', "campaign = { duration = -1 }\n")
    assert error_at(tmp_path, text, 2).startswith("[campaign]: duration = -1 must be more than 0")


def test_toml_syntax_errors_have_lines(tmp_path: Path) -> None:
    msg = error_at(tmp_path, edit("weight = 2", "weight = "), 12)
    assert msg.startswith("invalid TOML: Invalid value (column")
    msg = error_at(tmp_path, BASE + 'extra = [\n  "a",\n', 17)
    assert msg.startswith("invalid TOML:") and "end of the file" in msg
    p = write(tmp_path / "bin.toml", "")
    p.write_bytes(b'[campaign]\nname = "\xff"\n')
    with pytest.raises(PlanError, match=rf"^{p}:2: invalid TOML: the file is not UTF-8"):
        load_plan(p)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as e:
        load_plan(tmp_path / "absent.toml")
    assert str(e.value) == f"{tmp_path / 'absent.toml'}: file not found" and e.value.line == 0


# --- the schedule ---------------------------------------------------------------------------------


def mkplan(
    *entries: tuple[str, float, int | None],
    duration: float | None = 40.0,
    faults_total: int | None = None,
    gap: float = 0.3,
) -> Plan:
    faults = tuple(
        FaultEntry(index=i, type=t, weight=w, count=c, sector=0)
        for i, (t, w, c) in enumerate(entries)
    )
    return Plan(
        path=Path("p.toml"),
        name="p",
        duration=duration,
        faults_total=faults_total,
        gap=gap,
        workloads=(Workload("blkstress"),),
        faults=faults,
    )


MIXED = mkplan(("sigkill", 5, None), ("segv", 1, 4), ("hang", 2, None), ("poison", 1, 2))


def test_schedule_is_reproducible() -> None:
    a = schedule(MIXED, 7)
    random.seed(12345)  # the global generator plays no part
    random.random()
    assert schedule(MIXED, 7) == a
    b = schedule(MIXED, 8)
    assert [s.fault for s in a] != [s.fault for s in b]
    assert len(a) == len(b) == 133
    assert [s.seq for s in a] == list(range(1, 134))
    assert all(s.type == MIXED.faults[s.fault].type for s in a)


def test_schedule_golden() -> None:
    # journal.json records schedules: a change here changes every recorded campaign
    s = schedule(
        mkplan(
            ("sigkill", 1, None), ("segv", 1, None), ("hang", 1, 2), duration=None, faults_total=10
        ),
        1,
    )
    assert [x.fault for x in s] == [1, 1, 0, 1, 0, 1, 0, 2, 0, 2]
    assert [x.at_s for x in s][:3] == [0.28598, 0.61811, 0.905469]


def test_counts_exact_and_weights_roughly_honoured() -> None:
    plan = mkplan(
        ("sigkill", 1, None),
        ("segv", 2, None),
        ("hang", 3, None),
        ("poison", 100, 11),
        duration=None,
        faults_total=6011,
    )
    got = Counter(s.fault for s in schedule(plan, 3))
    assert got[3] == 11
    drawn = 6000
    for index, share in ((0, 1 / 6), (1, 2 / 6), (2, 3 / 6)):
        assert abs(got[index] / drawn - share) < 0.03, (index, got)


def test_times_spread_over_the_duration() -> None:
    s = schedule(MIXED, 1)
    spacing = 40 / 133
    at = [x.at_s for x in s]
    assert all(b > a for a, b in pairwise(at))
    assert at[0] > 0 and at[-1] < 40
    for i, t in enumerate(at):
        assert abs(t - (i + 0.5) * spacing) <= 0.1 * spacing + 1e-6
    assert len({round(t - (i + 0.5) * spacing, 6) for i, t in enumerate(at)}) > 100  # jittered


def test_faults_mode_times_follow_the_gap() -> None:
    s = schedule(mkplan(("sigkill", 1, None), duration=None, faults_total=20, gap=0.5), 9)
    assert len(s) == 20
    for x in s:
        assert abs(x.at_s - x.seq * 0.5) <= 0.05 + 1e-6
    s = schedule(
        mkplan(("sigkill", 1, None), duration=None, faults_total=5, gap=0.5), 9, expected_gap=2.0
    )
    assert abs(s[-1].at_s - 10) <= 0.2 + 1e-6
    s = schedule(mkplan(("sigkill", 1, None), duration=None, faults_total=50, gap=0), 9)
    at = [x.at_s for x in s]
    assert all(b > a for a, b in pairwise(at))


def test_injection_totals() -> None:
    assert injection_count(MIXED) == 133
    assert injection_count(MIXED, expected_gap=1.0) == 40
    assert injection_count(MIXED, expected_gap=0.1) == 133  # gap is a minimum
    assert injection_count(MIXED, expected_gap=20.0) == 6  # at least the counts
    assert len(schedule(MIXED, 1, expected_gap=20.0)) == 6
    assert injection_count(mkplan(("segv", 1, 3), ("hang", 1, 4))) == 7  # all counted
    assert injection_count(mkplan(("segv", 1, None), duration=0.1)) == 1  # at least one
    assert injection_count(mkplan(("segv", 1, None), duration=1.2, gap=0.4)) == 3  # float-safe


def test_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seed"):
        schedule(MIXED, -1)
    with pytest.raises(ValueError, match="expected_gap"):
        schedule(MIXED, 1, expected_gap=-1.0)
    with pytest.raises(ValueError, match="no \\[\\[fault\\]\\]"):
        schedule(mkplan(), 1)


def test_schedule_to_json() -> None:
    s = schedule(MIXED, 2)[:2]
    out = schedule_to_json(s)
    assert out[0] == {"seq": 1, "at_s": s[0].at_s, "fault": s[0].fault, "type": s[0].type}
    assert json.loads(json.dumps(out)) == out
    assert [ScheduledFault(**d) for d in out] == s


entry_st = st.tuples(
    st.sampled_from(sorted(FAULT_TYPES)),
    st.floats(0.01, 100),
    st.one_of(st.none(), st.integers(1, 30)),
)


@settings(max_examples=150, deadline=None)
@given(
    entries=st.lists(entry_st, min_size=1, max_size=6),
    seed=st.integers(0, 2**64),
    faults_mode=st.booleans(),
    extra=st.integers(0, 50),
    duration=st.floats(0.5, 60),
    gap=st.floats(0.05, 2),
)
def test_any_seed_honours_the_counts(
    entries: list[tuple[str, float, int | None]],
    seed: int,
    faults_mode: bool,
    extra: int,
    duration: float,
    gap: float,
) -> None:
    counted = sum(c for _, _, c in entries if c is not None)
    all_counted = all(c is not None for _, _, c in entries)
    if faults_mode:
        plan = mkplan(
            *entries,
            duration=None,
            gap=gap,
            faults_total=counted + (0 if all_counted else extra) or 1,
        )
    else:
        plan = mkplan(*entries, duration=duration, gap=gap)
    s = schedule(plan, seed)
    assert s == schedule(plan, seed)
    got = Counter(x.fault for x in s)
    for e in plan.faults:
        if e.count is not None:
            assert got[e.index] == e.count
    assert len(s) == injection_count(plan) >= max(counted, 1)
    at = [x.at_s for x in s]
    assert at[0] > 0 and all(b > a for a, b in pairwise(at))
    if not faults_mode:
        assert at[-1] < duration


# --- the CLI ------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isovisor.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.e2e
def test_cli_validate_accepts_the_example_plans() -> None:
    root = Path(__file__).resolve().parents[1]
    for plan in ("campaign-smoke.toml", "campaign-default.toml"):
        r = _cli("campaign", "validate", str(root / "examples" / plan))
        assert r.returncode == 0 and ": OK — 2 workload guests (blkstress)" in r.stdout, r


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_refuses_a_bad_plan_with_file_line_and_status_2(tmp_path: Path, command: str) -> None:
    plan = tmp_path / "bad.toml"
    plan.write_text(
        '[campaign]\nfaults = 3\n\n[[workload]]\nimage = "blkstress"\n\n'
        '[[fault]]\ntype = "sigkil"\n'
    )
    r = _cli(
        "campaign",
        command,
        str(plan),
        *(["--out", str(tmp_path / "o")] if command == "run" else []),
    )
    assert r.returncode == 2, r
    err = " ".join(r.stderr.split())
    assert f'{plan}:8: [[fault]] #1: type = "sigkil" is not a fault type' in err, err
    assert not (tmp_path / "o").exists()  # nothing was started
