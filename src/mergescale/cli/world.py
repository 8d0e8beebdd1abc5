"""``mergescale world build|show``: build the offline world, print its evaluation matrix and quality checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergescale.errors import OutputError

console = Console()


def build(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="World folder (created; rerun to resume or refresh).")
    ],
    preset: Annotated[
        str, typer.Option(help="quick (~6 min on 2 cores), full (~1 h) or micro (tests).")
    ] = "quick",
    seed: Annotated[int, typer.Option(help="Seed of the world, the data order and the initialisation.")] = 0,
    workers: Annotated[
        int | None, typer.Option(help="Processes training side by side (default: 2 on 2+ cores).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads per process (default 1: best for tiny models).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Generate the world and its tasks, pre-train, instruction-tune and fine-tune its models, and evaluate them."""
    from mergescale.world.build import build_world

    if quiet:
        result = build_world(out, preset, seed=seed, workers=workers, threads=threads)
    else:
        with _StageProgress() as progress:
            result = build_world(
                out, preset, seed=seed, workers=workers, threads=threads, report=progress.report
            )
    console.print(
        f"built [bold]{out}[/] ({result.preset}, seed {result.seed}) in {result.seconds:.1f} s: "
        f"{len(result.ran)} stages ran, {len(result.skipped)} cached"
    )
    _print_scores(result.scores)


def show(world: Annotated[Path, typer.Argument(help="A built world folder.")]) -> None:
    """Print a built world's evaluation matrix and quality checks from its scores.json."""
    path = world / "scores.json"
    if not path.is_file():
        raise OutputError(f"{path}: not found; build the world first (mergescale world build -o {world})")
    _print_scores(json.loads(path.read_text(encoding="utf-8")))


def _print_scores(scores: dict, out: Console | None = None) -> None:
    """The evaluation matrix, two tables per base (held-in, then held-out) with short task names, and the
    quality checks: every cell fits an 80-column terminal or log file whole (numbers never wrap or shrink)."""
    from mergescale.world.summary import SHORT, matrix, quality_checks, sizes

    out = out or console
    held_in, held_out = scores["held_in"], scores["held_out"]
    tasks = [*held_in, *held_out]
    for size in sizes(scores):
        for kind in ("pt", "it"):
            rows = matrix(scores, size, kind)
            for part, names in (("held-in", held_in), ("held-out", held_out)):
                own = " (bold: the expert's own task)" if part == "held-in" else ""
                table = Table(title=f"{size} / {kind}: {part} tasks, primary metric{own}", title_justify="left")
                table.add_column("model", no_wrap=True)
                for t in names:
                    table.add_column(SHORT.get(t, t), justify="right", no_wrap=True)
                for label, values in rows:
                    by_task = dict(zip(tasks, values, strict=True))
                    cells = [f"[bold]{by_task[t]:.2f}[/]" if t == label else f"{by_task[t]:.2f}" for t in names]
                    table.add_row(SHORT.get(label, label), *cells)
                out.print(table)
    shortened = [f"{short} = {name}" for name, short in SHORT.items() if short != name and name in tasks]
    if shortened:
        out.print("columns: " + ", ".join(shortened), highlight=False)
    checks = Table(title="quality checks", title_justify="left")
    checks.add_column("check", overflow="fold")
    checks.add_column("value", justify="right", no_wrap=True)
    checks.add_column("ok", no_wrap=True)
    checks.add_column("detail", overflow="fold")
    for c in quality_checks(scores):
        checks.add_row(c.name, f"{c.value:+.4f}", "[green]yes[/]" if c.passed else "[red]no[/]", c.detail)
    out.print(checks)


class _StageProgress:
    """One bar for the current stage (step and loss while training) and a log line per finished stage."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.bars: dict[str, int] = {}

    def __enter__(self) -> _StageProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def report(self, stage: str, step: int, total: int, loss: float | None) -> None:
        if step == -1:
            bar = self.bars.pop(stage, None)
            if bar is not None:
                self.progress.remove_task(bar)
            return
        if stage not in self.bars:
            self.bars[stage] = self.progress.add_task(stage, total=total or None, loss="")
        self.progress.update(
            self.bars[stage],
            completed=step,
            total=total or None,
            loss=f"loss {loss:.3f}" if loss is not None else "",
        )


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        help="The offline world: generated tasks and tiny models trained from scratch.", no_args_is_help=True
    )
    sub.command("build")(build)
    sub.command("show")(show)
    app.add_typer(sub, name="world")
