"""``mergescale report STUDY_DIR... -o REPORT_DIR``: the papers' figures, tables and findings of study folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()

_VERDICT_STYLE = {
    "reproduced": "green",
    "not reproduced": "red",
    "inconclusive": "yellow",
    "not measurable here": "dim",
}


def report_command(
    studies: Annotated[
        list[Path], typer.Argument(metavar="STUDY_DIR", help="Study folders (several are reported together).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (written atomically).")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT even when it is a non-empty folder that is not a report.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write OUT/report.html (+ report.md, figures/, tables/) and print the findings table."""
    from mergescale.report.build import build_report

    if quiet:
        result = build_report(studies, out, overwrite=overwrite)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
            transient=True,
        ) as progress:  # fmt: skip
            bars: dict[str, int] = {}

            def tick(what: str, done: int, total: int) -> None:
                if what not in bars:
                    bars[what] = progress.add_task(what, total=total)
                progress.update(bars[what], completed=done, total=total)

            result = build_report(studies, out, overwrite=overwrite, progress=tick)
    print_findings(result.findings, console)
    drawn = len(result.figures) // 2
    console.print(
        f"report: [bold]{result.html}[/] ({drawn} figures, {len(result.tables)} tables; also report.md) "
        f"in {result.seconds:.1f} s",
        highlight=False,
    )


def findings_table(findings: Sequence) -> Table:
    """The findings as a terminal table that fits 80 columns whole (claims wrap, verdicts and counts never)."""
    table = Table(title="findings (details, rule and numbers: report.md)", title_justify="left")
    table.add_column("#", no_wrap=True)
    table.add_column("claim", overflow="fold", ratio=1)
    table.add_column("verdict", no_wrap=True)
    table.add_column("for/against/≈", justify="right", no_wrap=True)
    for f in findings:
        style = _VERDICT_STYLE.get(f.verdict.value, "")
        counts = " / ".join(str(n) for n in f.counts) if f.comparisons else "–"
        table.add_row(f.id, f.short, f"[{style}]{f.verdict.value}[/]" if style else f.verdict.value, counts)
    return table


def print_findings(findings: Sequence, out: Console) -> None:
    out.print(findings_table(findings))
    out.print(
        "≈: within the spread over seeds (PMA: within the tolerance). A verdict needs half of the comparisons "
        "decided and 75 % of those one way.",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
