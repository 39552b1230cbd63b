"""``isovisor campaign validate|run|report``: fault-injection campaigns (docs/campaigns.md)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from isovisor.cli.common import err, fail, out

campaign_app = typer.Typer(
    no_args_is_help=True, help="Run fault-injection campaigns from a plan file."
)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


PlanArg = Annotated[Path, typer.Argument(help="Campaign plan (TOML, docs/campaigns.md).")]


def _load(plan_path: Path) -> Any:
    from isovisor.campaign.plan import PlanError, load_plan

    try:
        return load_plan(plan_path)
    except PlanError as e:
        fail(str(e), 2)


@campaign_app.command("validate")
def campaign_validate(plan: PlanArg) -> None:
    """Check a plan completely (every key, every value) without running anything."""
    from isovisor.campaign.plan import describe

    out.print(describe(_load(plan)))


@campaign_app.command("run")
def campaign_run(
    plan: PlanArg,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the schedule (default: the plan's).")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where journal.json and the reports go (default: ./campaign-<name>-<seed>).",
        ),
    ] = None,
    isolation: Annotated[
        str | None, typer.Option(help="process or inline (default: the plan's).")
    ] = None,
    faults: Annotated[
        int | None,
        typer.Option(
            help="Inject this many faults instead of "
            "what the plan says (drawn by the plan's "
            "weights; counts are kept)."
        ),
    ] = None,
) -> None:
    """Start a private stack, run the plan's guests and faults, write journal and reports."""
    import dataclasses

    from isovisor.campaign.runner import Campaign

    p = _load(plan)
    if faults is not None:
        counted = sum(e.count or 0 for e in p.faults)
        if faults < max(1, counted) or (all(e.count for e in p.faults) and faults != counted):
            fail(
                f"--faults {faults}: the plan's counts need {counted}, and other totals only "
                "work when some [[fault]] has no count",
                2,
            )
        p = dataclasses.replace(p, faults_total=faults, duration=None)
    if isolation not in (None, "process", "inline"):
        fail(f"--isolation must be process or inline, got {isolation!r}", 2)
    s = p.seed if seed is None else seed
    if s < 0:
        fail(f"--seed must be >= 0, got {s}", 2)
    target = out_dir or Path(f"campaign-{p.name}-{s}")
    # Ctrl-C and SIGTERM both end the run cleanly: the stack is stopped, the journal written
    # (SIGINT is restored too: a shell's background job starts with it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[left]}"),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(f"{p.name} (seed {s})", total=None, left="starting the stack")

        def progress(done: int, total: int, left: float) -> None:
            bar.update(task, completed=done, total=total, left=f"~{left:.0f} s of injections left")

        try:
            journal = Campaign(p, s, target, isolation=isolation, progress=progress).run()
        except KeyboardInterrupt:
            fail(f"interrupted: the journal of what ran is in {target / 'journal.json'}", 130)
        except RuntimeError as e:
            fail(f"campaign failed: {e}; the stack's logs are in {target}")
    from isovisor.campaign.report import verdict

    sm = journal["summary"]
    out.print(
        f"{sm['injected']} faults injected in {time.monotonic() - t0:.0f} s; "
        f"report: {target / 'report.md'} and {target / 'report.html'}"
    )
    out.print(verdict(sm))


@campaign_app.command("report")
def campaign_report(
    run: Annotated[Path, typer.Argument(help="Output directory of a campaign run.")],
    compare: Annotated[
        Path | None,
        typer.Option(
            help="Another run's directory (e.g. the "
            "same plan with --isolation inline), "
            "shown side by side."
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Where report.md and report.html go (default: RUN)."),
    ] = None,
) -> None:
    """Write report.md and report.html again from journal.json, optionally beside another."""
    from isovisor.campaign.report import verdict, write_report

    journal = _journal(run)
    other = _journal(compare) if compare is not None else None
    md, html = write_report(out_dir or run, journal, compare=other)
    out.print(f"wrote {md} and {html}")
    out.print(verdict(journal["summary"]))


def _journal(run: Path) -> dict[str, Any]:
    path = run / "journal.json" if run.is_dir() else run
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}; give the directory of a campaign run", 2)
    except ValueError as e:
        fail(f"{path} is not a campaign journal (JSON): {e}", 2)
    if not isinstance(data, dict) or not isinstance(data.get("faults"), list):
        fail(f"{path} is not a campaign journal: it has no list of faults", 2)
    return data
