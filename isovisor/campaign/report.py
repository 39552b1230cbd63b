"""Campaign reports: the summary numbers, ``report.md`` and ``report.html`` (docs/campaigns.md).

Everything here is a pure function of a journal (the dict stored in ``journal.json``): no
processes, no I/O except :func:`write_report`.  The summary is recomputed from the journal's
``faults`` and ``guests`` so that a report always agrees with the rows it shows; only
``kernel_crashes`` is taken from the journal's own ``summary`` (it cannot be derived from the
faults alone).

The HTML page is self-contained: inline CSS, two hand-written inline SVG plots per journal, no
scripts and no external files.  Every piece of text that comes from a journal is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

OUTCOMES: Final = (
    "recovered",
    "tolerated",
    "not_manifested",
    "poison_error",
    "guest_error",
    "silent_corruption",
    "guest_lost",
    "kernel_crash",
)
"""The values of a fault's ``outcome``, in the order of docs/campaigns.md."""

TRANSPARENT_THRESHOLD: Final = 0.999
"""The transparent rate a campaign needs to PASS."""

# Fault types that a restart mechanism is not expected to "recover": a poison request is
# answered with an error by design, and a flipped byte is invisible to the stack.
_NOT_RECOVERABLE: Final = frozenset({"poison", "corrupt_data"})
_LOST_EXITS: Final = frozenset({"crash", "hung"})
_DETECTED_OUTCOMES: Final = frozenset({"recovered", "poison_error"})

_COLOURS: Final = {
    "recovered": "#2e7d32",
    "tolerated": "#9ccc65",
    "not_manifested": "#9e9e9e",
    "poison_error": "#1565c0",
    "guest_error": "#ef6c00",
    "silent_corruption": "#8e24aa",
    "guest_lost": "#c62828",
    "kernel_crash": "#212121",
}
_OTHER_COLOUR: Final = "#795548"
_DASH: Final = "–"

# Presentation attributes for the SVG elements (the plots stay readable outside the page).
_S_GRID: Final = 'class="grid" stroke="#e6e6e6"'
_S_AXIS: Final = 'class="axis" stroke="#888"'
_S_TICK: Final = 'class="tick" font-size="11" fill="#555"'
_S_LABEL: Final = 'class="label" font-size="12" fill="#333"'
_S_NOTE: Final = 'class="note" font-size="12" fill="#999" font-style="italic"'
_S_MEDIAN: Final = 'class="median" stroke="#000" stroke-width="2"'
_S_TPUT: Final = 'class="tput" fill="none" stroke="#1976d2" stroke-width="1.5"'
_S_FMARK: Final = 'class="fmark" stroke-opacity="0.4" stroke-dasharray="3 3"'


# --- small helpers -------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    """``v`` as a finite float, or None when it is not a number (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _int(v: Any) -> int:
    n = _num(v)
    return int(n) if n is not None else 0


def _outcome(f: dict[str, Any]) -> str:
    o = f.get("outcome")
    return str(o) if o else "unknown"


def _type(f: dict[str, Any]) -> str:
    t = f.get("type")
    return str(t) if t is not None else "?"


def _is_manifested(f: dict[str, Any]) -> bool:
    """A fault manifested unless its outcome says otherwise (the flag decides without one)."""
    o: object = f.get("outcome")
    if o:
        return o != "not_manifested"
    return bool(f.get("manifested"))


def _is_detected(f: dict[str, Any]) -> bool:
    return _is_manifested(f) and (bool(f.get("detected")) or _outcome(f) in _DETECTED_OUTCOMES)


def _is_silent(f: dict[str, Any]) -> bool:
    return _outcome(f) == "silent_corruption" or _int(f.get("data_mismatches")) > 0


def _is_transparent_eligible(f: dict[str, Any]) -> bool:
    return _is_manifested(f) and _type(f) not in _NOT_RECOVERABLE and _outcome(f) != "tolerated"


def _recovery_times(faults: Iterable[dict[str, Any]]) -> list[float]:
    return [v for f in faults if (v := _num(f.get("recovery_ms"))) is not None]


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of ``values`` (None when there are none).

    The values are sorted and the one at rank ``ceil(p / 100 * n)`` (1-based, at least 1) is
    returned, so the result is always one of the values: the median of ``[10, 20, 30, 40]`` is
    20, its p99 is 40, and the p99 of 1..100 is 99.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _recovery_stats(faults: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    times = _recovery_times(faults)
    return {
        "recovery_ms_median": percentile(times, 50),
        "recovery_ms_p99": percentile(times, 99),
        "recovery_ms_max": max(times) if times else None,
    }


def _guest_lost(g: dict[str, Any]) -> bool:
    exit_ = g.get("exit")
    return not exit_ or exit_ in _LOST_EXITS


# --- the numbers ---------------------------------------------------------------------------


def summarize(
    faults: list[dict[str, Any]], guests: list[dict[str, Any]], *, kernel_crashes: int = 0
) -> dict[str, Any]:
    """The journal's ``summary`` object, computed from its faults and guests.

    Definitions (a "fault" is one entry of the journal's ``faults``):

    * ``injected``: the number of faults.
    * ``manifested``: faults whose ``outcome`` is not ``not_manifested`` (a fault without an
      outcome counts when its ``manifested`` flag is true).
    * ``detected``: manifested faults with ``detected`` true, or whose outcome is ``recovered``
      or ``poison_error`` (those imply detection).
    * ``recovered``: faults whose outcome is ``recovered``.  So recovered <= detected <=
      manifested <= injected always holds.
    * ``guest_errors``: the sum of the guests' own ``errors`` counts (this includes errors that
      no fault was blamed for; the per-type tables sum the faults' ``guest_errors`` instead).
    * ``guests_lost``: guests whose ``exit`` is ``crash`` or ``hung`` or missing; at least the
      number of faults whose outcome is ``guest_lost`` (each such fault lost a guest).
    * ``kernel_crashes``: the ``kernel_crashes`` argument, at least the number of faults whose
      outcome is ``kernel_crash``.
    * ``silent_corruptions``: faults whose outcome is ``silent_corruption`` or whose
      ``data_mismatches`` is above 0 (faults are counted, not mismatches).
    * ``poison_total``: manifested faults of type ``poison`` (a poison fault that never fired
      has nothing to answer); ``poison_clean``: those whose outcome is ``poison_error``.
    * ``recovery_ms_median`` / ``recovery_ms_p99`` / ``recovery_ms_max``: over the faults that
      have a numeric ``recovery_ms``, nearest-rank (see :func:`percentile`); None without any.
    * ``transparent_rate``: ``transparent_recovered / transparent_eligible``, where the eligible
      faults are the manifested ones that are not of type ``poison`` or ``corrupt_data`` and
      whose outcome is not ``tolerated`` (i.e. the non-deterministic faults that needed a
      recovery), and ``transparent_recovered`` counts those with outcome ``recovered``.  None
      when no fault is eligible.

    Two keys beyond the documented ones are included so that the verdict can say "N of M":
    ``transparent_recovered`` and ``transparent_eligible``.
    """
    eligible = [f for f in faults if _is_transparent_eligible(f)]
    transparent_recovered = sum(1 for f in eligible if _outcome(f) == "recovered")
    poison = [f for f in faults if _type(f) == "poison" and _is_manifested(f)]
    lost_by_fault = sum(1 for f in faults if _outcome(f) == "guest_lost")
    crashes_by_fault = sum(1 for f in faults if _outcome(f) == "kernel_crash")
    summary: dict[str, Any] = {
        "injected": len(faults),
        "manifested": sum(1 for f in faults if _is_manifested(f)),
        "detected": sum(1 for f in faults if _is_detected(f)),
        "recovered": sum(1 for f in faults if _outcome(f) == "recovered"),
        "guest_errors": sum(_int(g.get("errors")) for g in guests),
        "guests_lost": max(sum(1 for g in guests if _guest_lost(g)), lost_by_fault),
        "kernel_crashes": max(int(kernel_crashes), crashes_by_fault),
        "silent_corruptions": sum(1 for f in faults if _is_silent(f)),
        "poison_clean": sum(1 for f in poison if _outcome(f) == "poison_error"),
        "poison_total": len(poison),
        **_recovery_stats(faults),
        "transparent_rate": (transparent_recovered / len(eligible)) if eligible else None,
        "transparent_recovered": transparent_recovered,
        "transparent_eligible": len(eligible),
    }
    return summary


def _row(type_: str, faults: Sequence[dict[str, Any]]) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    for f in faults:
        outcomes[_outcome(f)] = outcomes.get(_outcome(f), 0) + 1
    return {
        "type": type_,
        "injected": len(faults),
        "manifested": sum(1 for f in faults if _is_manifested(f)),
        "detected": sum(1 for f in faults if _is_detected(f)),
        "recovered": outcomes.get("recovered", 0),
        "tolerated": outcomes.get("tolerated", 0),
        "guest_errors": sum(_int(f.get("guest_errors")) for f in faults),
        "silent_corruptions": sum(1 for f in faults if _is_silent(f)),
        "guests_lost": outcomes.get("guest_lost", 0),
        **_recovery_stats(faults),
        "outcomes": outcomes,
    }


def per_type(faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per fault type, in the order the types first appear in ``faults``.

    Each row has ``type``, ``injected``, ``manifested``, ``detected``, ``recovered``,
    ``tolerated`` (counted as in :func:`summarize`), ``guest_errors`` (the sum of the faults'
    ``guest_errors``), ``silent_corruptions``, ``guests_lost`` (faults whose outcome is
    ``guest_lost``), ``recovery_ms_median`` / ``_p99`` / ``_max`` and ``outcomes`` (outcome ->
    count).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for f in faults:
        groups.setdefault(_type(f), []).append(f)
    return [_row(t, fs) for t, fs in groups.items()]


def totals(faults: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-type row computed over all faults (the tables' totals row)."""
    return _row("total", faults)


def _pct(rate: float) -> str:
    """A rate as a percentage with one decimal, rounded down (99.95% is not shown as 100.0%)."""
    return f"{math.floor(rate * 1000 + 1e-9) / 10:.1f}%"


def _ms(v: Any) -> str:
    n = _num(v)
    return _DASH if n is None else f"{n:.1f}"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def verdict(summary: dict[str, Any]) -> str:
    """One line: PASS or FAIL, then the numbers that decide it.

    FAIL when a guest was lost, the kernel crashed, the transparent rate is below 99.9%, or a
    manifested poison fault was not answered with a clean error.  Silent corruptions are
    reported but do not fail a campaign by themselves: wrong data that the driver returns
    without dying is the one class a restart mechanism cannot detect.
    """
    lost = _int(summary.get("guests_lost"))
    crashes = _int(summary.get("kernel_crashes"))
    rate = _num(summary.get("transparent_rate"))
    p_clean = _int(summary.get("poison_clean"))
    p_total = _int(summary.get("poison_total"))
    silent = _int(summary.get("silent_corruptions"))

    reasons: list[str] = []
    if lost > 0:
        reasons.append(_plural(lost, "guest") + " lost")
    if crashes > 0:
        reasons.append(_plural(crashes, "kernel crash", "kernel crashes"))
    if rate is not None and rate < TRANSPARENT_THRESHOLD:
        reasons.append(f"transparent rate below {TRANSPARENT_THRESHOLD:.1%}")
    if p_clean < p_total:
        reasons.append(f"{p_total - p_clean} poison request(s) not answered cleanly")

    parts: list[str] = []
    eligible = summary.get("transparent_eligible")
    if rate is None:
        parts.append("no manifested non-deterministic faults to recover")
    elif isinstance(eligible, int) and not isinstance(eligible, bool):
        done = _int(summary.get("transparent_recovered"))
        parts.append(
            f"{done} of {eligible} manifested non-deterministic faults recovered "
            f"transparently ({_pct(rate)})"
        )
    else:
        parts.append(f"manifested non-deterministic faults recovered transparently: {_pct(rate)}")
    parts.append(_plural(lost, "guest") + " lost")
    parts.append(_plural(crashes, "kernel crash", "kernel crashes"))
    parts.append(f"poison {p_clean}/{p_total} answered cleanly" if p_total else "no poison")
    p99 = _num(summary.get("recovery_ms_p99"))
    parts.append(f"recovery p99 {p99:.1f} ms" if p99 is not None else "no recovery times")
    if silent:
        parts.append(
            _plural(silent, "silent corruption")
            + " (undetectable by restarts; not a failure by itself)"
        )
    line = ("FAIL" if reasons else "PASS") + ": " + ", ".join(parts)
    if reasons:
        line += "; fails on: " + ", ".join(reasons)
    return line


# --- journal access ------------------------------------------------------------------------


def _campaign(journal: dict[str, Any]) -> dict[str, Any]:
    c = journal.get("campaign")
    return c if isinstance(c, dict) else {}


def _list(journal: dict[str, Any], key: str) -> list[Any]:
    v = journal.get(key)
    return v if isinstance(v, list) else []


def _faults(journal: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in _list(journal, "faults") if isinstance(f, dict)]


def _guests(journal: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in _list(journal, "guests") if isinstance(g, dict)]


def _throughput(journal: dict[str, Any]) -> list[tuple[float, float]]:
    points: list[tuple[float, float]] = []
    for p in _list(journal, "throughput"):
        if isinstance(p, list | tuple) and len(p) >= 2:
            t, v = _num(p[0]), _num(p[1])
            if t is not None and v is not None:
                points.append((t, v))
    return sorted(points)


def journal_summary(journal: dict[str, Any]) -> dict[str, Any]:
    """:func:`summarize` over a journal; kernel crashes come from the journal's summary."""
    stored = journal.get("summary")
    crashes = _int(stored.get("kernel_crashes")) if isinstance(stored, dict) else 0
    return summarize(_faults(journal), _guests(journal), kernel_crashes=crashes)


def _label(journal: dict[str, Any]) -> str:
    c = _campaign(journal)
    return f"{c.get('name', 'campaign')} ({c.get('isolation', '?')})"


def _reproduce(journal: dict[str, Any]) -> str:
    c = _campaign(journal)
    cmd = f"isovisor campaign run {c.get('plan') or 'PLAN.toml'}"
    if c.get("seed") is not None:
        cmd += f" --seed {c['seed']}"
    if c.get("isolation"):
        cmd += f" --isolation {c['isolation']}"
    return cmd


def _header_facts(journal: dict[str, Any]) -> list[tuple[str, str]]:
    c = _campaign(journal)
    dur = _num(c.get("duration_s"))
    return [
        ("seed", str(c.get("seed", "?"))),
        ("isolation", str(c.get("isolation", "?"))),
        ("duration", f"{dur:.1f} s" if dur is not None else _DASH),
        ("interrupted", "yes (partial results)" if c.get("interrupted") else "no"),
        ("started", str(c.get("started") or _DASH)),
    ]


_TABLE_COLUMNS: Final = (
    ("injected", "Injected"),
    ("manifested", "Manifested"),
    ("detected", "Detected"),
    ("recovered", "Recovered transparently"),
    ("guest_errors", "Guest-visible errors"),
    ("silent_corruptions", "Silent corruptions"),
    ("recovery_ms_median", "Recovery median (ms)"),
    ("recovery_ms_p99", "Recovery p99 (ms)"),
    ("recovery_ms_max", "Recovery max (ms)"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    return _ms(row.get(key)) if key.startswith("recovery_ms") else str(row.get(key, 0))


def _outcome_columns(*journals: dict[str, Any]) -> list[str]:
    seen = {_outcome(f) for j in journals for f in _faults(j)}
    return [o for o in OUTCOMES if o in seen] + sorted(seen - set(OUTCOMES))


def _types(*journals: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for j in journals:
        for f in _faults(j):
            if _type(f) not in out:
                out.append(_type(f))
    return out


def _key_totals(s: dict[str, Any]) -> list[tuple[str, str]]:
    rate = _num(s.get("transparent_rate"))
    return [
        ("injected", str(s["injected"])),
        ("manifested", str(s["manifested"])),
        ("recovered", str(s["recovered"])),
        ("guests lost", str(s["guests_lost"])),
        ("kernel crashes", str(s["kernel_crashes"])),
        ("silent corruptions", str(s["silent_corruptions"])),
        ("poison answered cleanly", f"{s['poison_clean']}/{s['poison_total']}"),
        ("transparent rate", _pct(rate) if rate is not None else _DASH),
        ("recovery p99 (ms)", _ms(s.get("recovery_ms_p99"))),
    ]


# --- markdown ------------------------------------------------------------------------------


def _md(text: Any) -> str:
    """Plain text safe in a markdown line or table cell (no markup, no raw HTML)."""
    s = str(text)
    for ch in "\\`*|<>[]":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def _mdcode(text: Any) -> str:
    """Text as an inline code span, safe in a table cell."""
    s = " ".join(str(text).replace("`", "'").split())
    return "`" + s.replace("|", "\\|") + "`"


def _md_table(
    head: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None
) -> list[str]:
    """A markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: lrrr...)."""
    align = align or "l" + "r" * (len(head) - 1)
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _md_type_table(faults: list[dict[str, Any]]) -> list[str]:
    rows = [
        [_mdcode(r["type"]), *(_cell(r, k) for k, _ in _TABLE_COLUMNS)] for r in per_type(faults)
    ]
    tot = totals(faults)
    rows.append(["**Total**", *(f"**{_cell(tot, k)}**" for k, _ in _TABLE_COLUMNS)])
    return _md_table(["Fault type", *(h for _, h in _TABLE_COLUMNS)], rows)


def render_markdown(journal: dict[str, Any], *, compare: dict[str, Any] | None = None) -> str:
    """``report.md`` for ``journal``; with ``compare`` (e.g. the inline run), side by side too."""
    c = _campaign(journal)
    faults, guests = _faults(journal), _guests(journal)
    s = journal_summary(journal)
    out = [f"# Campaign report: {_md(c.get('name', 'campaign'))}", ""]
    out.append(" · ".join(f"{k} {_md(v)}" for k, v in _header_facts(journal)))
    if c.get("interrupted"):
        out += ["", "**The run was interrupted: these numbers cover only part of the plan.**"]
    out += ["", "## Faults by type", ""]
    if faults:
        out += _md_type_table(faults)
    else:
        out.append("No faults were injected.")

    cols = _outcome_columns(journal)
    if faults:
        out += ["", "### Outcomes", ""]
        rows = [
            [_mdcode(r["type"]), *(str(r["outcomes"].get(o, 0)) for o in cols)]
            for r in per_type(faults)
        ]
        out += _md_table(["Fault type", *(_mdcode(o) for o in cols)], rows)

    out += ["", "## Guests", ""]
    if guests:
        rows = [
            [
                _md(g.get("name", "?")),
                str(_int(g.get("ops"))),
                str(_int(g.get("errors"))),
                str(_int(g.get("mismatches"))),
                _md(g.get("exit") or "missing") + (" (lost)" if _guest_lost(g) else ""),
            ]
            for g in guests
        ]
        out += _md_table(["Guest", "Ops", "Errors", "Mismatches", "Exit"], rows, "lrrrl")
    else:
        out.append("No guest results were recorded.")
    unattributed = s["guest_errors"] - totals(faults)["guest_errors"]
    if unattributed > 0:
        out += ["", f"{_plural(unattributed, 'guest-visible error')} not attributed to a fault."]

    out += ["", "## Verdict", "", f"**{_md(verdict(s))}**", ""]
    out.append(
        f"How to reproduce: {_mdcode(_reproduce(journal))} (the schedule is the same "
        "for the same plan and seed; what the stack does about each fault varies with "
        "timing)."
    )

    if compare is not None:
        out += ["", *_md_compare(journal, compare)]
    return "\n".join(out) + "\n"


def _labels(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    """Names for two journals side by side: "name (isolation)", told apart if they are equal."""
    la, lb = _label(a), _label(b)
    return (f"{la} [A]", f"{lb} [B]") if la == lb else (la, lb)


def _compare_cells(
    a: dict[str, Any], b: dict[str, Any]
) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The side-by-side table of two runs: its outcome columns, and per fault type the
    ``"A / B"`` cells (injected, then each outcome)."""
    cols = _outcome_columns(a, b)
    ra = {r["type"]: r for r in per_type(_faults(a))}
    rb = {r["type"]: r for r in per_type(_faults(b))}

    def pair(key: str, outcome: str | None = None) -> str:
        def get(r: dict[str, Any] | None) -> int:
            if r is None:
                return 0
            return int(r[key] if outcome is None else r[key].get(outcome, 0))

        return f"{get(x)} / {get(y)}"

    cells = []
    for t in _types(a, b):
        x, y = ra.get(t), rb.get(t)
        cells.append((t, [pair("injected"), *(pair("outcomes", o) for o in cols)]))
    return cols, cells


def _md_compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    la, lb = (_md(x) for x in _labels(a, b))
    sa, sb = journal_summary(a), journal_summary(b)
    out = [
        f"## Side by side: {la} vs {lb}",
        "",
        "Cells read `A / B` with A = " + la + " and B = " + lb + ".",
        "",
    ]
    cols, cells = _compare_cells(a, b)
    rows = [[_mdcode(t), *counts] for t, counts in cells]
    if rows:
        out += _md_table(["Fault type", "Injected", *(_mdcode(o) for o in cols)], rows)
    else:
        out.append("Neither run injected a fault.")
    out += ["", "### Key totals", ""]
    out += _md_table(
        ["", la, lb],
        [[k, v, w] for (k, v), (_, w) in zip(_key_totals(sa), _key_totals(sb), strict=True)],
    )
    out += ["", f"- {la}: {_md(verdict(sa))}", f"- {lb}: {_md(verdict(sb))}"]
    return out


# --- SVG plots -----------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _colour(outcome: str) -> str:
    return _COLOURS.get(outcome, _OTHER_COLOUR)


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / target if span > 0 else 1.0
    mag: float = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10 * mag


def _linear_ticks(hi: float) -> tuple[float, list[float]]:
    """An axis from 0 to a round number at or above ``hi``, and its ticks."""
    hi = hi if hi > 0 else 1.0
    step = _nice_step(hi)
    n = math.ceil(hi / step - 1e-9)
    return n * step, [i * step for i in range(n + 1)]


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        b += 1
    mults = (1, 2, 5) if b - a <= 3 else (1,)
    ticks = [m * 10.0**k for k in range(a, b + 1) for m in mults if m * 10.0**k <= 10.0**b]
    return 10.0**a, 10.0**b, ticks


def _fmt_tick(v: float) -> str:
    if v >= 1000 and v % 1000 == 0:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _svg_open(width: int, height: int, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif" role="img" '
        f'aria-label="{_e(title)}">'
        f"<title>{_e(title)}</title>"
    )


def _svg_recovery(faults: list[dict[str, Any]]) -> str:
    """A strip plot: one row per fault type, one dot per recovery time, a bar at the median."""
    rows = per_type(faults)
    times = _recovery_times(faults)
    width, left, right, top, row_h = 760, 150, 24, 16, 28
    title = "Recovery time per fault type"
    if not times:
        return (
            _svg_open(width, 56, title)
            + f'<text x="16" y="32" {_S_NOTE}>no recovery times recorded</text></svg>'
        )
    bottom = top + row_h * len(rows)
    shown = [
        o
        for o in _outcome_columns({"faults": faults})
        if any(_outcome(f) == o and _num(f.get("recovery_ms")) is not None for f in faults)
    ]
    legend, last_row = _legend([(o, _colour(o)) for o in shown], left, width - right, bottom + 58)
    lo, hi = min(times), max(times)
    log = lo > 0 and hi / lo > 20
    if log:
        d0, d1, ticks = _log_ticks(lo, hi)
    else:
        d0 = 0.0
        d1, ticks = _linear_ticks(hi)
    span = width - left - right

    def x(v: float) -> float:
        if log:
            return (
                left
                + (math.log10(max(v, d0)) - math.log10(d0))
                / (math.log10(d1) - math.log10(d0))
                * span
            )
        return left + max(v, 0.0) / d1 * span

    parts = [_svg_open(width, last_row + 10, title)]
    for t in ticks:
        xt = x(t)
        parts.append(f'<line x1="{xt:.1f}" y1="{top}" x2="{xt:.1f}" y2="{bottom}" {_S_GRID}/>')
        parts.append(
            f'<text x="{xt:.1f}" y="{bottom + 16}" text-anchor="middle" '
            f"{_S_TICK}>{_e(_fmt_tick(t))}</text>"
        )
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{width - right}" y2="{bottom}" {_S_AXIS}/>')
    scale = "log scale" if log else "linear scale"
    parts.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{bottom + 36}" '
        f'text-anchor="middle" {_S_LABEL}>recovery time (ms, {scale}); '
        "black bar: median</text>"
    )
    for i, r in enumerate(rows):
        cy = top + row_h * i + row_h / 2
        mine = [
            f for f in faults if _type(f) == r["type"] and _num(f.get("recovery_ms")) is not None
        ]
        parts.append(
            f'<text x="{left - 8}" y="{cy + 4:.1f}" text-anchor="end" '
            f"{_S_LABEL}>{_e(r['type'])} ({len(mine)})</text>"
        )
        if not mine:
            parts.append(
                f'<text x="{left + 6}" y="{cy + 4:.1f}" {_S_NOTE}>no recovery times</text>'
            )
            continue
        for j, f in enumerate(mine):
            v = _num(f.get("recovery_ms")) or 0.0
            cyj = cy + (j % 5 + 1) // 2 * (4 if j % 2 else -4)  # 0, +4, -4, +8, -8
            tip = f"#{f.get('seq', '?')} {_type(f)}: {v:.1f} ms, {_outcome(f)}"
            parts.append(
                f'<circle class="rec" cx="{x(v):.1f}" cy="{cyj:.1f}" r="3.5" '
                f'fill="{_colour(_outcome(f))}" fill-opacity="0.75">'
                f"<title>{_e(tip)}</title></circle>"
            )
        med = _num(r["recovery_ms_median"])
        if med is not None:
            parts.append(
                f'<line x1="{x(med):.1f}" y1="{cy - 10:.1f}" x2="{x(med):.1f}" '
                f'y2="{cy + 10:.1f}" {_S_MEDIAN}>'
                f"<title>{_e(f'median {med:.1f} ms')}</title></line>"
            )
    parts += legend
    parts.append("</svg>")
    return "".join(parts)


def _legend(
    items: Sequence[tuple[str, str | None]], left: int, right: int, y0: int
) -> tuple[list[str], int]:
    """Legend entries wrapped into rows from ``y0``; ``None`` as colour draws the I/O line.

    Returns the SVG fragments and the baseline of the last row.
    """
    parts: list[str] = []
    lx, ly = left, y0
    for text, col in items:
        w = 22 + 7 * len(text) + 16
        if lx + w > right and lx > left:
            lx, ly = left, ly + 18
        if col is None:
            parts.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 16}" y2="{ly - 4}" {_S_TPUT}/>')
        else:
            parts.append(f'<circle cx="{lx + 8}" cy="{ly - 4}" r="4.5" fill="{col}"/>')
        parts.append(f'<text x="{lx + 22}" y="{ly}" {_S_TICK}>{_e(text)}</text>')
        lx += w
    return parts, ly


def _svg_timeline(journal: dict[str, Any]) -> str:
    """Guest I/O throughput over time, a marker per fault at its ``at_s``, and a legend."""
    faults = _faults(journal)
    points = _throughput(journal)
    width, left, right, top, bottom = 760, 64, 24, 24, 230
    dur = _num(_campaign(journal).get("duration_s")) or 0.0
    t_hi = max(
        [
            dur,
            1.0,
            *(t for t, _ in points),
            *(v for f in faults if (v := _num(f.get("at_s"))) is not None),
        ]
    )
    t_max, t_ticks = _linear_ticks(t_hi)
    y_max, y_ticks = _linear_ticks(max((v for _, v in points), default=0.0))
    legend, last_row = _legend(
        [("guest I/O (ops/s)", None), *((o, _colour(o)) for o in _outcome_columns(journal))],
        left,
        width - right,
        bottom + 56,
    )

    def x(t: float) -> float:
        return left + t / t_max * (width - left - right)

    def y(v: float) -> float:
        return bottom - v / y_max * (bottom - top)

    parts = [_svg_open(width, last_row + 10, "Faults against guest I/O throughput")]
    for t in t_ticks:
        parts.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{bottom}" {_S_GRID}/>')
        parts.append(
            f'<text x="{x(t):.1f}" y="{bottom + 16}" text-anchor="middle" '
            f"{_S_TICK}>{_e(_fmt_tick(t))}</text>"
        )
    for v in y_ticks if points else [0.0]:
        parts.append(
            f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" {_S_GRID}/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" '
            f"{_S_TICK}>{_e(_fmt_tick(v))}</text>"
        )
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{width - right}" y2="{bottom}" {_S_AXIS}/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" {_S_AXIS}/>')
    mid_x, mid_y = (left + width - right) / 2, (top + bottom) / 2
    parts.append(
        f'<text x="{mid_x:.0f}" y="{bottom + 34}" text-anchor="middle" {_S_LABEL}>time (s)</text>'
    )
    parts.append(
        f'<text x="14" y="{mid_y:.0f}" text-anchor="middle" {_S_LABEL} '
        f'transform="rotate(-90 14 {mid_y:.0f})">guest I/O (ops/s)</text>'
    )
    if points:
        pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        parts.append(f'<polyline {_S_TPUT} points="{pts}"/>')
    else:
        parts.append(
            f'<text x="{mid_x:.0f}" y="{mid_y:.0f}" text-anchor="middle" '
            f"{_S_NOTE}>no throughput samples</text>"
        )
    for f in faults:
        at = _num(f.get("at_s"))
        if at is None:
            continue
        o, col = _outcome(f), _colour(_outcome(f))
        tip = f"#{f.get('seq', '?')} {_type(f)} at {at:.2f} s: {o}"
        parts.append(
            f'<line x1="{x(at):.1f}" y1="{top + 6}" x2="{x(at):.1f}" y2="{bottom}" '
            f'stroke="{col}" {_S_FMARK}/>'
        )
        parts.append(
            f'<circle class="fault" data-outcome="{_e(o)}" cx="{x(at):.1f}" '
            f'cy="{top + 6}" r="4.5" fill="{col}"><title>{_e(tip)}</title></circle>'
        )
    parts += legend
    parts.append("</svg>")
    return "".join(parts)


# --- HTML ----------------------------------------------------------------------------------

_CSS: Final = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1600px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; } tr.total td { font-weight: bold; background: #fafafa; }
code { font-family: ui-monospace, monospace; }
.verdict { font-weight: bold; padding: .5em .8em; border-radius: 4px; }
.pass { background: #e8f5e9; border: 1px solid #2e7d32; }
.fail { background: #ffebee; border: 1px solid #c62828; }
.warn { color: #b71c1c; font-weight: bold; }
.facts { color: #555; }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(780px, 1fr));
           gap: 2em; }
svg { background: #fff; border: 1px solid #eee; max-width: 100%; height: auto; }
figure { margin: .5em 0; }
"""


def _html_table(
    head: Sequence[str], rows: Iterable[Sequence[str]], total: Sequence[str] | None = None
) -> str:
    """A table; ``head``, ``rows`` and ``total`` are already-escaped HTML fragments."""
    out = ["<table><thead><tr>", *(f"<th>{h}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        out += ["<tr>", *(f"<td>{c}</td>" for c in r), "</tr>"]
    if total is not None:
        out += ['<tr class="total">', *(f"<td>{c}</td>" for c in total), "</tr>"]
    out.append("</tbody></table>")
    return "".join(out)


def _verdict_html(s: dict[str, Any]) -> str:
    v = verdict(s)
    cls = "pass" if v.startswith("PASS") else "fail"
    return f'<p class="verdict {cls}">{_e(v)}</p>'


def _html_section(journal: dict[str, Any], heading: str | None) -> str:
    faults, guests = _faults(journal), _guests(journal)
    s = journal_summary(journal)
    out = ["<section>"]
    if heading is not None:
        out.append(f"<h2>{_e(heading)}</h2>")
    facts = ", ".join(f"{k} {v}" for k, v in _header_facts(journal))
    out.append(f'<p class="facts">{_e(facts)}</p>')
    if _campaign(journal).get("interrupted"):
        out.append(
            '<p class="warn">The run was interrupted: these numbers cover only part of '
            "the plan.</p>"
        )
    out.append(_verdict_html(s))
    out.append("<h3>Faults by type</h3>")
    if faults:
        rows = [
            [f"<code>{_e(r['type'])}</code>", *(_e(_cell(r, k)) for k, _ in _TABLE_COLUMNS)]
            for r in per_type(faults)
        ]
        tot = totals(faults)
        out.append(
            _html_table(
                ["Fault type", *(_e(h) for _, h in _TABLE_COLUMNS)],
                rows,
                ["Total", *(_e(_cell(tot, k)) for k, _ in _TABLE_COLUMNS)],
            )
        )
        cols = _outcome_columns(journal)
        out.append("<h3>Outcomes</h3>")
        out.append(
            _html_table(
                ["Fault type", *(f"<code>{_e(o)}</code>" for o in cols)],
                [
                    [f"<code>{_e(r['type'])}</code>", *(str(r["outcomes"].get(o, 0)) for o in cols)]
                    for r in per_type(faults)
                ],
            )
        )
    else:
        out.append("<p>No faults were injected.</p>")
    out.append("<h3>Totals</h3>")
    out.append(_html_table(["", "value"], [[_e(k), _e(v)] for k, v in _key_totals(s)]))
    out.append("<h3>Guests</h3>")
    if guests:
        out.append(
            _html_table(
                ["Guest", "Ops", "Errors", "Mismatches", "Exit"],
                [
                    [
                        _e(g.get("name", "?")),
                        str(_int(g.get("ops"))),
                        str(_int(g.get("errors"))),
                        str(_int(g.get("mismatches"))),
                        _e(g.get("exit") or "missing") + (" (lost)" if _guest_lost(g) else ""),
                    ]
                    for g in guests
                ],
            )
        )
    else:
        out.append("<p>No guest results were recorded.</p>")
    unattributed = s["guest_errors"] - totals(faults)["guest_errors"]
    if unattributed > 0:
        out.append(
            f"<p>{_plural(unattributed, 'guest-visible error')} not attributed to a fault.</p>"
        )
    out.append("<h3>Recovery time per fault type</h3>")
    out.append(f'<figure class="plot recovery">{_svg_recovery(faults)}</figure>')
    out.append("<h3>Faults against guest I/O throughput</h3>")
    out.append(f'<figure class="plot timeline">{_svg_timeline(journal)}</figure>')
    out.append(f"<p>How to reproduce: <code>{_e(_reproduce(journal))}</code></p>")
    out.append("</section>")
    return "".join(out)


def _html_compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    la, lb = _labels(a, b)
    sa, sb = journal_summary(a), journal_summary(b)
    cols, cells = _compare_cells(a, b)
    rows = [[f"<code>{_e(t)}</code>", *counts] for t, counts in cells]
    out = [
        '<section class="compare">',
        f"<h2>Side by side: {_e(la)} vs {_e(lb)}</h2>",
        f"<p>Cells read <code>A / B</code> with A = {_e(la)} and B = {_e(lb)}.</p>",
    ]
    if rows:
        out.append(
            _html_table(["Fault type", "Injected", *(f"<code>{_e(o)}</code>" for o in cols)], rows)
        )
    else:
        out.append("<p>Neither run injected a fault.</p>")
    out.append("<h3>Key totals</h3>")
    out.append(
        _html_table(
            ["", _e(la), _e(lb)],
            [
                [_e(k), _e(v), _e(w)]
                for (k, v), (_, w) in zip(_key_totals(sa), _key_totals(sb), strict=True)
            ],
        )
    )
    out.append("</section>")
    return "".join(out)


def render_html(journal: dict[str, Any], *, compare: dict[str, Any] | None = None) -> str:
    """``report.html``: a self-contained page (inline CSS and SVG, no scripts, no links)."""
    name = _campaign(journal).get("name", "campaign")
    title = f"Campaign report: {name}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if compare is None:
        out.append(_html_section(journal, None))
    else:
        out.append(_html_compare(journal, compare))
        out.append('<div class="columns">')
        la, lb = _labels(journal, compare)
        out.append(_html_section(journal, la))
        out.append(_html_section(compare, lb))
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(
    out_dir: Path, journal: dict[str, Any], *, compare: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(render_markdown(journal, compare=compare), encoding="utf-8")
    page.write_text(render_html(journal, compare=compare), encoding="utf-8")
    return md, page
