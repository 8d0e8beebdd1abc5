"""``mergescale study run|show|export``: run a merging study, print its tables, export its scores."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mergescale.errors import ConfigError

console = Console()


def run(
    spec: Annotated[Path, typer.Argument(help="The study spec (YAML).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Study folder (created; rerun to resume).")],
    world: Annotated[
        Path | None, typer.Option("--world", help="Use this built world instead of the spec's 'world'.")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes evaluating side by side (1: this process).")] = 1,
    threads: Annotated[int, typer.Option(min=1, help="Torch CPU threads per worker.")] = 1,
    ray: Annotated[bool, typer.Option("--ray", help="Run draws as Ray tasks on a local runtime.")] = False,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Join the Ray cluster at this address (implies --ray).")
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option("--max-memory", help="Memory all workers may hold in models, e.g. 8GB (default: half the RAM)."),
    ] = None,
    force_new: Annotated[
        bool, typer.Option("--force-new", help="Start OUT afresh when it holds another study.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run (or resume) a study: every merge of the grid, evaluated, recorded in OUT/study.sqlite."""
    from mergescale.study.runner import parse_memory, run_study

    memory = parse_memory(max_memory)
    progress = None if quiet else _StudyProgress()
    try:
        if progress is not None:
            progress.__enter__()
        summary = run_study(
            spec,
            out,
            workers=workers,
            threads=threads,
            ray=ray,
            ray_address=ray_address,
            max_memory=memory,
            force_new=force_new,
            world=world,
            report=progress.report if progress is not None else None,
        )
    finally:
        if progress is not None:
            progress.__exit__(None, None, None)
    console.print(
        f"study [bold]{out}[/]: {summary.cells} cells, {summary.ran} evaluated now ({summary.draws} draws), "
        f"{summary.cached} cached, in {summary.seconds:.1f} s"
        + (f"; {summary.stale} stored cells of an earlier spec kept aside" if summary.stale else "")
    )
    for w in summary.warnings[:5]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if len(summary.warnings) > 5:
        console.print(f"[yellow]warning:[/] ... and {len(summary.warnings) - 5} more", highlight=False)
    print_tables(out)


def show(study: Annotated[Path, typer.Argument(help="A study folder.")]) -> None:
    """Print a study's tables: normalised held-in / held-out per group × method × k, and the baselines."""
    print_tables(study)


def export(
    study: Annotated[Path, typer.Argument(help="A study folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="FILE.csv or FILE.parquet")],
) -> None:
    """Export one row per (cell, task, split, metric) as CSV or Parquet."""
    from mergescale.study.export import export_rows
    from mergescale.study.results import load_study

    n = export_rows(load_study(study), output)
    console.print(f"wrote {n} rows to {output}")


def print_tables(study_dir: Path) -> None:
    """The paper's tables: per group and split, normalised score (mean ± std over seeds) per method × k, with
    the multitask model on the same held-in tasks; sized for an 80-column terminal or log file."""
    from mergescale.study.results import load_study

    results = load_study(study_dir)
    _print_pma(results)
    rows = results.summary()
    if not rows:
        if not (results.pma_points or results.pma_curves):
            console.print("no merge has been evaluated yet")
        return
    ks = sorted({r.k for r in rows})
    for group in results.groups:
        mine = [r for r in rows if r.group == group.name]
        if not mine:
            continue
        for part, attr in (("held-in, ÷ expert", "held_in"), ("held-out, ÷ base", "held_out")):
            table = Table(title=f"{group.name} ({_size(group)}) {part}", title_justify="left")
            table.add_column("method", overflow="fold", max_width=29)
            for k in ks:
                table.add_column(f"k={k}", justify="right", no_wrap=True, min_width=9)
            for label in dict.fromkeys(r.label for r in mine):
                cells = []
                for k in ks:
                    row = next((r for r in mine if r.label == label and r.k == k), None)
                    cells.append(_pm(getattr(row, attr)) if row else "")
                table.add_row(label, *cells)
            multitask = []
            for k in ks:
                row = next((r for r in mine if r.k == k), None)
                value = row.multitask_held_in.mean if row and attr == "held_in" else row.multitask_held_out if row else None
                multitask.append(_num(value))
            table.add_row("[dim]multitask[/]", *[f"[dim]{v}[/]" for v in multitask])
            console.print(table)
    merges = results.merges
    console.print(
        f"{len(merges)} merges from {len(results.draws)} reads; baselines: "
        f"{sum(c.kind != 'merge' for c in results.cells)} models. Mean ± sample std over seeds of the mean over "
        "categories; multitask: the multitask model on the same tasks."
    )


def _print_pma(results: Any) -> None:
    """The pre-training paper's numbers per run: the curves' last point, how often the average beats the
    checkpoint, PMA-init and spike recovery."""
    along = [p for p in results.pma_points if p.kind == "along"]
    runs = list(dict.fromkeys([p.run for p in along] + [k[0] for k in results.pma_results]))
    for run in runs:
        mine = [p for p in along if p.run == run]
        if mine:
            table = Table(
                title=f"PMA along run {run}: held-out loss at the last step; 'beats last': points where the "
                "average's loss is below the checkpoint's; 'gain': share of the anneal's gain recovered",
                title_justify="left",
            )
            for col, justify in (("average", "left"), ("beats last", "right"), ("step", "right"),
                                 ("avg", "right"), ("last", "right"), ("anneal", "right"),
                                 ("gain", "right")):  # fmt: skip
                table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
            for label in dict.fromkeys(_pma_label(p) for p in mine):
                pts = sorted((p for p in mine if _pma_label(p) == label), key=lambda p: p.end_step)
                beats = [p.loss < p.last_loss for p in pts if p.loss is not None and p.last_loss is not None]
                end = pts[-1]
                table.add_row(
                    label, f"{sum(beats)}/{len(beats)}", str(end.end_step), _num3(end.loss), _num3(end.last_loss),
                    _num3(end.annealed_loss), "–" if end.recovered is None else f"{end.recovered:.0%}",
                )  # fmt: skip
            console.print(table)
        res = {k[1:]: v for k, v in results.pma_results.items() if k[0] == run}
        if any(k[0] == "pma_init" for k in res):
            console.print(
                f"PMA-init on {run}: held-out loss {_num4(res.get(('pma_init', 'pma', 'heldout_loss')))} from the "
                f"average vs {_num4(res.get(('pma_init', 'last', 'heldout_loss')))} from the last checkpoint; "
                f"gradient-norm std {_num4(res.get(('pma_init', 'pma', 'grad_norm_std')))} vs "
                f"{_num4(res.get(('pma_init', 'last', 'grad_norm_std')))}"
            )
        if any(k[0] == "spike" for k in res):
            detected = res.get(("spike", "spiked", "detected_step"))
            console.print(
                f"spike on {run}: injected at step {_int(res.get(('spike', 'spiked', 'injected_step')))}, detected "
                f"at {_int(detected)}; held-out loss resumed from the average "
                f"{_num4(res.get(('spike', 'average', 'heldout_loss')))}, from the rollback "
                f"{_num4(res.get(('spike', 'rollback', 'heldout_loss')))}, unspiked "
                f"{_num4(res.get(('spike', 'unspiked', 'heldout_loss')))}"
            )


def _pma_label(p: Any) -> str:
    name = p.strategy + (f"{p.alpha:g}" if p.alpha is not None else "")
    return f"{name} N={p.n}" + (f" V={p.interval}" if p.interval else "")


def _num3(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _num4(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _int(v: float | None) -> str:
    return "–" if v is None else str(int(v))


def _size(group: Any) -> str:
    parts = [p for p in (group.size, group.base_kind) if p]
    if group.parameters:
        parts.append(f"{group.parameters:,} params")
    return ", ".join(parts) or "group"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _pm(s: Any) -> str:
    if s.mean is None:
        return "–"
    return f"{s.mean:.2f}" + (f"±{s.std:.2f}" if s.std is not None else "")


class _StudyProgress:
    """Bars for jobs and cells, with the ETA and the job in flight."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[current]}"),
            console=console,
        )
        self.jobs: int | None = None
        self.cells: int | None = None
        self.start = time.perf_counter()

    def __enter__(self) -> _StudyProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def report(self, event: str, fields: dict[str, Any]) -> None:
        if event == "plan":
            self.jobs = self.progress.add_task("jobs", total=fields["jobs"], current="")
            self.cells = self.progress.add_task("cells", total=fields["to_run"], current="")
        elif event == "start" and self.jobs is not None:
            self.progress.update(self.jobs, current=fields["label"])
        elif event == "done" and self.jobs is not None and self.cells is not None:
            self.progress.advance(self.jobs)
            self.progress.advance(self.cells, fields["cells"])


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Merging studies: grids of merges and evaluations, resumable.", no_args_is_help=True)
    sub.command("run")(run)
    sub.command("show")(show)
    sub.command("export")(export)
    app.add_typer(sub, name="study")


__all__ = ["ConfigError", "register"]
