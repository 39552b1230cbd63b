"""Campaign reports (docs/campaigns.md, "The journal" and "The report"): numbers, verdict, pages.

Everything here works on synthetic journals: no processes are started.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.campaign.report import (
    OUTCOMES,
    per_type,
    percentile,
    render_html,
    render_markdown,
    summarize,
    verdict,
    write_report,
)

ROOT = Path(__file__).resolve().parent.parent

# --- a small factory of synthetic journals -------------------------------------------------

_DETECTED = {"recovered", "poison_error", "guest_error", "guest_lost", "kernel_crash"}


def fault(
    type_: str = "sigkill",
    outcome: str = "recovered",
    *,
    seq: int = 0,
    at_s: float = 1.0,
    **kw: Any,
) -> dict[str, Any]:
    """A fault entry shaped like the journal's, consistent with its outcome."""
    f: dict[str, Any] = {
        "seq": seq,
        "at_s": at_s,
        "type": type_,
        "driver": "blk0",
        "args": {},
        "target_pid": 1234,
        "manifested": outcome != "not_manifested",
        "detected": outcome in _DETECTED,
        "detected_by": "exit" if outcome in _DETECTED else None,
        "reason": "",
        "recovered": outcome == "recovered",
        "recovery_ms": 10.0 if outcome == "recovered" else None,
        "replayed": 0,
        "new_pid": None,
        "guest_errors": 1 if outcome == "guest_error" else 0,
        "data_mismatches": 1 if outcome == "silent_corruption" else 0,
        "outcome": outcome,
    }
    f.update(kw)
    return f


def guest(name: str = "w1", exit: str | None = "poweroff", errors: int = 0) -> dict[str, Any]:
    g: dict[str, Any] = {"name": name, "ops": 1000, "errors": errors, "mismatches": 0, "code": 0}
    if exit is not None:
        g["exit"] = exit
    return g


def journal(
    faults: list[dict[str, Any]],
    guests: list[dict[str, Any]] | None = None,
    *,
    name: str = "smoke",
    isolation: str = "process",
    seed: int = 7,
    throughput: list[list[float]] | None = None,
    kernel_crashes: int = 0,
    interrupted: bool = False,
) -> dict[str, Any]:
    for i, f in enumerate(faults, 1):
        f["seq"] = f["seq"] or i
    return {
        "campaign": {
            "name": name,
            "plan": "plans/smoke.toml",
            "seed": seed,
            "isolation": isolation,
            "started": "2024-01-01T00:00:00",
            "finished": "2024-01-01T00:00:41",
            "interrupted": interrupted,
            "duration_s": 41.2,
            "machine": {"cpus": 2, "python": "3.11.7"},
        },
        "schedule": [
            {"seq": f["seq"], "at_s": f["at_s"], "fault": 0, "type": f["type"]} for f in faults
        ],
        "faults": faults,
        "guests": [guest()] if guests is None else guests,
        "throughput": (
            [[0.5 * i, 20000.0 + 100 * (i % 7)] for i in range(1, 80)]
            if throughput is None
            else throughput
        ),
        "summary": {"kernel_crashes": kernel_crashes},
    }


def mixed() -> list[dict[str, Any]]:
    """One of every outcome, spread over types, plus extra recovered sigkills."""
    return [
        fault("sigkill", "recovered", recovery_ms=12.0, at_s=1.0),
        fault("sigkill", "recovered", recovery_ms=18.0, at_s=2.0),
        fault("sigkill", "recovered", recovery_ms=15.0, at_s=3.0),
        fault("slow", "tolerated", at_s=4.0),
        fault("hang", "not_manifested", at_s=5.0),
        fault("poison", "poison_error", recovery_ms=40.0, at_s=6.0),
        fault("exception", "guest_error", recovery_ms=22.0, guest_errors=3, at_s=7.0),
        fault("corrupt_data", "silent_corruption", data_mismatches=2, at_s=8.0),
        fault("segv", "guest_lost", at_s=9.0),
        fault("abort", "kernel_crash", at_s=10.0),
    ]


# --- the summary -----------------------------------------------------------------------------


def test_outcomes_are_the_documented_ones() -> None:
    doc = (ROOT / "docs" / "campaigns.md").read_text()
    section = doc.split("`outcome` is one of:", 1)[1].split("##", 1)[0]
    assert tuple(re.findall(r"^\* `(\w+)`:", section, re.M)) == OUTCOMES


def test_summary_counts_on_a_mixed_journal() -> None:
    faults = mixed()
    s = summarize(faults, [guest("w1"), guest("w2", "crash", errors=4)], kernel_crashes=0)
    assert s["injected"] == 10
    assert s["manifested"] == 9  # all but the not_manifested hang
    assert s["detected"] == 7  # 3 recovered, poison, guest_error, lost, crash
    assert s["recovered"] == 3
    assert s["guest_errors"] == 4  # the guests' own count
    assert s["guests_lost"] == 1
    assert s["kernel_crashes"] == 1  # from the kernel_crash outcome
    assert s["silent_corruptions"] == 1  # faults, not mismatches
    assert (s["poison_clean"], s["poison_total"]) == (1, 1)
    # eligible: 3 sigkill, exception, segv, abort (not slow/tolerated, not hang/not manifested,
    # not poison, not corrupt_data)
    assert s["transparent_eligible"] == 6 and s["transparent_recovered"] == 3
    assert s["transparent_rate"] == pytest.approx(0.5)
    # recovery over 12, 15, 18, 22, 40
    assert s["recovery_ms_median"] == 18.0
    assert s["recovery_ms_p99"] == 40.0
    assert s["recovery_ms_max"] == 40.0
    documented = {
        "injected",
        "manifested",
        "detected",
        "recovered",
        "guest_errors",
        "guests_lost",
        "kernel_crashes",
        "silent_corruptions",
        "poison_clean",
        "poison_total",
        "recovery_ms_median",
        "recovery_ms_p99",
        "recovery_ms_max",
        "transparent_rate",
    }
    assert documented <= set(s)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["sigkill", "slow", "poison", "corrupt_data", "hang"]),
            st.sampled_from(OUTCOMES),
            st.booleans(),
            st.integers(0, 2),
        ),
        max_size=40,
    )
)
def test_summary_counts_add_up(spec: list[tuple[str, str, bool, int]]) -> None:
    faults = [fault(t, o, detected=d, data_mismatches=m) for t, o, d, m in spec]
    s = summarize(faults, [guest()])
    outcomes = {o: sum(1 for f in faults if f["outcome"] == o) for o in OUTCOMES}
    assert sum(outcomes.values()) == s["injected"] == len(faults)
    assert 0 <= s["recovered"] <= s["detected"] <= s["manifested"] <= s["injected"]
    assert s["manifested"] == s["injected"] - outcomes["not_manifested"]
    assert s["recovered"] == outcomes["recovered"]
    assert s["poison_clean"] <= s["poison_total"]
    rows = per_type(faults)
    for key in ("injected", "manifested", "detected", "recovered", "silent_corruptions"):
        assert sum(r[key] for r in rows) == s[key]
    if s["transparent_rate"] is not None:
        assert 0.0 <= s["transparent_rate"] <= 1.0


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        (list(range(1, 101)), 50, 50),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 101)), 100, 100),
        ([10.0, 20.0, 30.0, 40.0], 50, 20.0),
        ([40.0, 10.0, 30.0, 20.0], 99, 40.0),
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([7.5], 50, 7.5),
        ([7.5], 99, 7.5),
        ([5.0, 1.0], 0, 1.0),
    ],
)
def test_percentile_nearest_rank(values: list[float], p: float, expected: float) -> None:
    assert percentile(values, p) == expected


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None


def test_recovery_stats_on_known_data() -> None:
    faults = [fault("sigkill", "recovered", recovery_ms=float(v)) for v in range(100, 0, -1)]
    faults.append(fault("sigkill", "recovered", recovery_ms=None))
    faults.append(fault("sigkill", "recovered", recovery_ms="n/a"))
    s = summarize(faults, [])
    assert (s["recovery_ms_median"], s["recovery_ms_p99"], s["recovery_ms_max"]) == (50, 99, 100)


def test_recovery_stats_none_without_times() -> None:
    s = summarize([fault("slow", "tolerated"), fault("sigkill", "recovered", recovery_ms=None)], [])
    assert s["recovery_ms_median"] is None
    assert s["recovery_ms_p99"] is None
    assert s["recovery_ms_max"] is None


def test_transparent_rate_denominator() -> None:
    excluded = [
        fault("poison", "poison_error"),
        fault("corrupt_data", "silent_corruption"),
        fault("slow", "tolerated"),
        fault("hang", "not_manifested"),
    ]
    assert summarize(excluded, [])["transparent_rate"] is None
    assert summarize([], [])["transparent_rate"] is None

    s = summarize([*excluded, fault("sigkill", "recovered"), fault("exit", "guest_error")], [])
    assert (s["transparent_recovered"], s["transparent_eligible"]) == (1, 2)
    assert s["transparent_rate"] == pytest.approx(0.5)

    # a slow response past the request timeout is detected and recovered: it counts
    s = summarize([fault("slow", "recovered"), fault("slow", "guest_error")], [])
    assert s["transparent_rate"] == pytest.approx(0.5)
    # a silent corruption from a type that should have been recovered counts against the rate
    s = summarize([fault("duplicate", "silent_corruption"), fault("sigkill", "recovered")], [])
    assert s["transparent_rate"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("guests", "lost"),
    [
        ([guest("a"), guest("b", "reboot")], 0),
        ([guest("a", "crash"), guest("b")], 1),
        ([guest("a", "hung"), guest("b", "crash")], 2),
        ([guest("a", None), guest("b")], 1),  # no exit recorded
        ([{**guest("a"), "exit": None}], 1),
        ([{**guest("a"), "exit": ""}], 1),
    ],
)
def test_guests_lost(guests: list[dict[str, Any]], lost: int) -> None:
    assert summarize([fault()], guests)["guests_lost"] == lost


def test_guest_lost_outcome_counts_even_if_guest_list_says_fine() -> None:
    s = summarize([fault("segv", "guest_lost")], [guest("a"), guest("b")])
    assert s["guests_lost"] == 1


def test_kernel_crashes_from_argument_and_outcome() -> None:
    assert summarize([fault()], [], kernel_crashes=2)["kernel_crashes"] == 2
    assert summarize([fault("abort", "kernel_crash")], [])["kernel_crashes"] == 1
    assert summarize([fault()], [])["kernel_crashes"] == 0


def test_silent_corruptions_count_faults() -> None:
    faults = [
        fault("corrupt_data", "silent_corruption", data_mismatches=5),
        fault("sigkill", "guest_error", data_mismatches=1),
        fault("sigkill", "recovered", data_mismatches=0),
    ]
    assert summarize(faults, [])["silent_corruptions"] == 2


def test_poison_counts() -> None:
    faults = [
        fault("poison", "poison_error"),
        fault("poison", "guest_error"),
        fault("poison", "not_manifested"),
    ]
    s = summarize(faults, [])
    assert (s["poison_clean"], s["poison_total"]) == (1, 2)


def test_guest_errors_are_the_guests_count() -> None:
    s = summarize(
        [fault("exit", "guest_error", guest_errors=2)], [guest("a", errors=3), guest("b", errors=1)]
    )
    assert s["guest_errors"] == 4


# --- the verdict -----------------------------------------------------------------------------


def _good() -> list[dict[str, Any]]:
    return [
        *(fault("sigkill", "recovered", recovery_ms=10.0 + i) for i in range(38)),
        fault("poison", "poison_error"),
        fault("slow", "tolerated"),
    ]


def test_verdict_pass() -> None:
    v = verdict(summarize(_good(), [guest()]))
    assert v.startswith("PASS: ")
    assert "38 of 38 manifested non-deterministic faults recovered transparently (100.0%)" in v
    assert "0 guests lost" in v and "0 kernel crashes" in v
    assert "poison 1/1 answered cleanly" in v
    assert "recovery p99 47.0 ms" in v
    assert "\n" not in v


def test_verdict_fails_on_a_lost_guest() -> None:
    v = verdict(summarize(_good(), [guest(), guest("w2", "hung")]))
    assert v.startswith("FAIL: ") and "1 guest lost" in v


def test_verdict_fails_on_a_kernel_crash() -> None:
    v = verdict(summarize(_good(), [guest()], kernel_crashes=1))
    assert v.startswith("FAIL: ") and "1 kernel crash" in v


def test_verdict_rate_threshold() -> None:
    at = [*(fault("sigkill", "recovered") for _ in range(999)), fault("sigkill", "guest_error")]
    assert verdict(summarize(at, [guest()])).startswith("PASS: ")  # exactly 99.9%
    below = [*at[:998], fault("sigkill", "guest_error"), fault("sigkill", "guest_error")]
    v = verdict(summarize(below, [guest()]))
    assert v.startswith("FAIL: ")
    assert "998 of 1000" in v and "(99.8%)" in v and "below 99.9%" in v


def test_verdict_rate_is_rounded_down() -> None:
    faults = [
        *(fault("sigkill", "recovered") for _ in range(1999)),
        fault("sigkill", "guest_error"),
    ]
    v = verdict(summarize(faults, [guest()]))
    assert v.startswith("PASS: ") and "(99.9%)" in v and "100.0%" not in v


def test_verdict_fails_when_poison_not_clean() -> None:
    faults = [*_good(), fault("poison", "guest_error")]
    v = verdict(summarize(faults, [guest()]))
    assert v.startswith("FAIL: ") and "poison 1/2 answered cleanly" in v


def test_silent_corruption_alone_still_passes_but_is_mentioned() -> None:
    faults = [*_good(), fault("corrupt_data", "silent_corruption")]
    v = verdict(summarize(faults, [guest()]))
    assert v.startswith("PASS: ")
    assert "1 silent corruption" in v and "undetectable by restarts" in v
    assert "silent" not in verdict(summarize(_good(), [guest()]))


def test_verdict_without_eligible_faults() -> None:
    v = verdict(summarize([], [guest()]))
    assert v.startswith("PASS: ") and "no manifested non-deterministic faults" in v
    assert "no recovery times" in v


def test_verdict_on_a_stored_summary_without_the_extra_keys() -> None:
    stored = {
        "injected": 40,
        "manifested": 38,
        "detected": 37,
        "recovered": 36,
        "guest_errors": 1,
        "guests_lost": 0,
        "kernel_crashes": 0,
        "silent_corruptions": 1,
        "poison_clean": 1,
        "poison_total": 1,
        "recovery_ms_median": 12.0,
        "recovery_ms_p99": 19.0,
        "recovery_ms_max": 31.0,
        "transparent_rate": 0.9737,
    }
    v = verdict(stored)
    assert v.startswith("FAIL: ") and "97.3%" in v and "recovery p99 19.0 ms" in v


# --- per type and markdown -------------------------------------------------------------------


def test_per_type_rows_in_first_appearance_order() -> None:
    rows = per_type(mixed())
    assert [r["type"] for r in rows] == [
        "sigkill",
        "slow",
        "hang",
        "poison",
        "exception",
        "corrupt_data",
        "segv",
        "abort",
    ]
    sk = rows[0]
    assert (sk["injected"], sk["manifested"], sk["detected"], sk["recovered"]) == (3, 3, 3, 3)
    assert (sk["recovery_ms_median"], sk["recovery_ms_p99"], sk["recovery_ms_max"]) == (
        15.0,
        18.0,
        18.0,
    )
    assert rows[1]["tolerated"] == 1 and rows[1]["detected"] == 0
    assert rows[2]["manifested"] == 0
    assert rows[4]["guest_errors"] == 3
    assert rows[5]["silent_corruptions"] == 1
    assert rows[6]["guests_lost"] == 1
    assert rows[0]["outcomes"] == {"recovered": 3}


def _md_rows(md: str, section: str) -> dict[str, list[str]]:
    """The table rows under the heading ``section``: first cell (stripped of `*) -> cells."""
    part = md.split(section, 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in part.splitlines():
        if line.startswith("|") and not line.startswith("|:") and not line.startswith("|-"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows[cells[0].strip("`*")] = [c.strip("*") for c in cells[1:]]
    return rows


def test_markdown_has_one_row_per_type_with_the_right_numbers() -> None:
    md = render_markdown(journal(mixed(), [guest(), guest("w2", "crash", errors=4)]))
    rows = _md_rows(md, "## Faults by type")
    assert list(rows) == [
        "Fault type",
        "sigkill",
        "slow",
        "hang",
        "poison",
        "exception",
        "corrupt_data",
        "segv",
        "abort",
        "Total",
    ]
    assert rows["Fault type"][:6] == [
        "Injected",
        "Manifested",
        "Detected",
        "Recovered transparently",
        "Guest-visible errors",
        "Silent corruptions",
    ]
    assert rows["sigkill"] == ["3", "3", "3", "3", "0", "0", "15.0", "18.0", "18.0"]
    assert rows["exception"] == ["1", "1", "1", "0", "3", "0", "22.0", "22.0", "22.0"]
    assert rows["slow"][6:] == ["–", "–", "–"]
    assert rows["Total"] == ["10", "9", "7", "3", "3", "1", "18.0", "40.0", "40.0"]
    assert "Campaign report: smoke" in md
    assert "seed 7" in md and "isolation process" in md and "duration 41.2 s" in md
    assert "interrupted no" in md


def test_markdown_verdict_and_reproduce_lines() -> None:
    md = render_markdown(journal(_good(), seed=42))
    verdicts = [line for line in md.splitlines() if line.startswith("**PASS: ")]
    assert len(verdicts) == 1
    assert "`isovisor campaign run plans/smoke.toml --seed 42 --isolation process`" in md


def test_markdown_interrupted_and_unattributed_errors() -> None:
    md = render_markdown(journal([fault()], [guest(errors=2)], interrupted=True))
    assert "interrupted yes" in md and "The run was interrupted" in md
    assert "2 guest-visible errors not attributed to a fault" in md


def test_markdown_escapes_table_breaking_names() -> None:
    md = render_markdown(journal([fault("a|b")], name="<script>x</script>"))
    assert "<script>" not in md
    assert r"`a\|b`" in md
    assert "a|b" not in md.replace(r"a\|b", "")


def test_markdown_with_no_faults() -> None:
    md = render_markdown(journal([], [], throughput=[]))
    assert "No faults were injected." in md and "PASS: " in md


def test_compare_section_only_with_compare() -> None:
    a = journal(_good())
    b = journal(
        [*_good()[:30], fault("sigkill", "kernel_crash")], isolation="inline", kernel_crashes=1
    )
    assert "Side by side" not in render_markdown(a)
    md = render_markdown(a, compare=b)
    assert "## Side by side: smoke (process) vs smoke (inline)" in md
    cmp_rows = _md_rows(md, "## Side by side")
    assert cmp_rows["sigkill"][:2] == ["38 / 31", "38 / 30"]  # injected, recovered
    totals = _md_rows(md, "### Key totals")
    assert totals["kernel crashes"] == ["0", "1"]
    assert totals["guests lost"] == ["0", "0"]
    assert totals["transparent rate"] == ["100.0%", "96.7%"]
    assert "- smoke (inline): FAIL: " in md


def test_compare_labels_are_told_apart() -> None:
    md = render_markdown(journal([fault()]), compare=journal([fault()]))
    assert r"smoke (process) \[A\] vs smoke (process) \[B\]" in md


# --- HTML ------------------------------------------------------------------------------------

_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class _Checker(HTMLParser):
    """Records tag balance problems and counts elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.attrs.append((tag, dict(attrs)))
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.attrs.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_html(page: str) -> _Checker:
    c = _Checker()
    c.feed(page)
    c.close()
    assert c.errors == [], c.errors[:5]
    assert c.stack == [], c.stack
    return c


def test_checker_catches_unbalanced_tags() -> None:
    with pytest.raises(AssertionError):
        check_html("<html><body><table><tr><td>x</tr></table></body></html>")
    with pytest.raises(AssertionError):
        check_html("<svg><g></svg>")


def test_html_is_balanced_with_one_svg_per_plot() -> None:
    j = journal(mixed(), [guest(), guest("w2", "crash")])
    page = render_html(j)
    c = check_html(page)
    assert page.startswith("<!DOCTYPE html>")
    assert c.counts["svg"] == 2
    assert c.counts["table"] >= 2
    # a dot per recovery time, a marker per fault, coloured by outcome
    dots = [a for t, a in c.attrs if t == "circle" and a.get("class") == "rec"]
    assert len(dots) == sum(1 for f in j["faults"] if f["recovery_ms"] is not None)
    marks = [a for t, a in c.attrs if t == "circle" and a.get("class") == "fault"]
    assert len(marks) == len(j["faults"])
    assert {m["data-outcome"] for m in marks} == set(OUTCOMES)
    colours = {m["data-outcome"]: m["fill"] for m in marks}
    assert len(set(colours.values())) == len(OUTCOMES)
    assert c.counts.get("polyline") == 1
    text = " ".join(c.text)
    assert "PASS" in text or "FAIL" in text
    assert "recovery time (ms" in text and "time (s)" in text


def test_html_is_self_contained() -> None:
    page = render_html(journal(mixed()), compare=journal(mixed(), isolation="inline"))
    lowered = page.lower()
    for bad in ("<script", "<link", " src=", "href=", "@import", "url("):
        assert bad not in lowered, bad


def test_html_per_type_table_rows() -> None:
    page = render_html(journal(mixed()))
    table = page.split("<h3>Faults by type</h3>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table)
    cells = [re.findall(r"<t[dh]>(.*?)</t[dh]>", r) for r in rows]
    assert len(cells) == 1 + 8 + 1  # head, one per type, total
    assert cells[1] == [
        "<code>sigkill</code>",
        "3",
        "3",
        "3",
        "3",
        "0",
        "0",
        "15.0",
        "18.0",
        "18.0",
    ]
    assert cells[-1][:5] == ["Total", "10", "9", "7", "3"]


def test_html_log_axis_ticks_in_ms() -> None:
    faults = [fault("sigkill", "recovered", recovery_ms=v) for v in (0.5, 3.0, 40.0, 500.0)]
    c = check_html(render_html(journal(faults)))
    text = c.text
    for label in ("0.1", "1", "10", "100", "1k"):
        assert label in text
    assert any("log scale" in t for t in text)


def test_html_linear_axis_for_a_narrow_range() -> None:
    faults = [fault("sigkill", "recovered", recovery_ms=v) for v in (10.0, 12.0, 19.0)]
    c = check_html(render_html(journal(faults)))
    assert any("linear scale" in t for t in c.text)
    assert "20" in c.text


@pytest.mark.parametrize(
    "faults",
    [
        [],
        [fault("sigkill", "recovered", recovery_ms=None), fault("slow", "tolerated")],
        [fault("hang", "not_manifested", at_s=None)],
    ],
)
def test_html_renders_degenerate_journals(faults: list[dict[str, Any]]) -> None:
    page = render_html(journal(faults, [], throughput=[]))
    c = check_html(page)
    assert c.counts["svg"] == 2
    assert "no throughput samples" in page
    assert "no recovery times recorded" in page
    assert "nan" not in page.lower().replace("manifested", "")


def test_html_escapes_names() -> None:
    evil = "<script>alert(1)</script>"
    j = journal([fault(evil, "recovered", recovery_ms=5.0)], [guest(evil)], name=evil)
    page = render_html(j)
    check_html(page)
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    j["faults"][0]["outcome"] = '"><b>x'
    page = render_html(j)
    check_html(page)
    assert "<b>" not in page


def test_html_compare_section_only_with_compare() -> None:
    a = journal(mixed())
    b = journal(mixed()[:5], isolation="inline", kernel_crashes=1)
    assert "Side by side" not in render_html(a)
    page = render_html(a, compare=b)
    c = check_html(page)
    assert "Side by side: smoke (process) vs smoke (inline)" in page
    assert c.counts["svg"] == 4  # both plots for each run
    assert "Key totals" in page


# --- files -----------------------------------------------------------------------------------


def test_write_report(tmp_path: Path) -> None:
    j = journal(mixed())
    md, page = write_report(tmp_path / "out", j)
    assert (md, page) == (tmp_path / "out" / "report.md", tmp_path / "out" / "report.html")
    assert md.read_text(encoding="utf-8") == render_markdown(j)
    assert page.read_text(encoding="utf-8") == render_html(j)
    b = journal(mixed(), isolation="inline")
    md2, _ = write_report(tmp_path / "out", j, compare=b)
    assert "Side by side" in md2.read_text(encoding="utf-8")


# --- isovisor campaign report ---------------------------------------------------------------------


@pytest.mark.e2e
def test_the_report_command_rewrites_both_reports_side_by_side(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d, iso, outcome in ((a, "process", "recovered"), (b, "inline", "kernel_crash")):
        d.mkdir()
        (d / "journal.json").write_text(
            json.dumps(journal([fault("segv", outcome)], isolation=iso))
        )
    cli = [sys.executable, "-m", "isovisor.cli", "campaign", "report"]
    r = subprocess.run(
        [*cli, str(a), "--compare", str(b)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {a / 'report.md'}"), r
    md = (a / "report.md").read_text()
    assert "## Side by side: smoke (process) vs smoke (inline)" in md
    assert "| `segv` | 1 / 1 | 1 / 0 |" in md, md
    r = subprocess.run(
        [*cli, str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "give the directory of a campaign run" in r.stderr, r
