"""``mergescale demo``: build the offline world, run both papers' studies on it, write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()

_WHAT = {
    "world": "generate the tasks, train the models (cached after the first run)",
    "study": "merge and evaluate the grid; average checkpoints along the runs",
    "report": "figures, tables and the findings",
}


def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo folder: world/, study/, report/ (rerun: cached).")] = Path(
        "demo"
    ),
    preset: Annotated[
        str, typer.Option(help="quick (~6 min on 2 cores), full (the full world: much longer) or micro (seconds, for tests).")
    ] = "quick",
    workers: Annotated[
        int | None, typer.Option(min=1, help="Processes for the world build and the study (default: 2).")
    ] = None,
    seed: Annotated[int, typer.Option(help="The world's seed.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Generate a world of tasks and train tiny Llamas on it, run the merging study (the paper's grid) and the
    pre-training averaging experiments on them, and write report.html with the papers' figures and a verdict on
    every finding."""
    from mergescale.cli.report import print_findings
    from mergescale.cli.study import _StudyProgress
    from mergescale.cli.world import _StageProgress
    from mergescale.demo import run_demo

    world_bars, study_bars = _StageProgress(), _StudyProgress()
    bars = {"world": world_bars, "study": study_bars}
    active: list = []

    def phase(name: str, event: str, fields: dict) -> None:
        if event == "start":
            console.print(f"[bold]{name}[/]: {_WHAT[name]}", highlight=False)
            if not quiet and name in bars:
                bars[name].__enter__()
                active.append(bars[name])
        elif active and bars.get(name) is active[-1]:
            active.pop().__exit__(None, None, None)

    try:
        result = run_demo(
            out, preset=preset, workers=workers, seed=seed, report=phase,
            world_report=None if quiet else world_bars.report, study_report=None if quiet else study_bars.report,
        )  # fmt: skip
    finally:
        while active:
            active.pop().__exit__(None, None, None)
    table = Table(title=f"demo ({result.preset}) in {result.seconds:.0f} s", title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("")
    for p in result.phases:
        table.add_row(p.phase, f"{p.seconds:.1f}", "cached" if p.cached else "")
    console.print(table)
    console.print(
        f"{result.merges} merges and {result.evaluations} task evaluations in [bold]{result.study}[/]",
        highlight=False,
    )
    print_findings(result.findings, console)
    console.print(f"report: [bold]{result.report / 'report.html'}[/] (and report.md)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
