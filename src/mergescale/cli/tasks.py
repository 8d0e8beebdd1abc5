"""``mergescale tasks``: validate task files and export them for lm-evaluation-harness."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()
tasks_app = typer.Typer(
    help="Check evaluation tasks and suites, export them to lm-evaluation-harness.", no_args_is_help=True
)


@tasks_app.command("validate")
def validate_command(
    path: Path = typer.Argument(..., help="A task YAML, a folder of task YAMLs or a suite.yaml."),
) -> None:
    """Check every task file and every data row; print a summary, or one error naming file, line and field."""
    from mergescale.evaluate.tasks import SUITE_FILE_NAMES, load_suite, load_tasks

    is_suite = path.name in SUITE_FILE_NAMES or (
        path.is_dir() and any((path / n).is_file() for n in SUITE_FILE_NAMES)
    )
    suite = load_suite(path) if is_suite else None
    tasks = suite.tasks if suite is not None else load_tasks(path)
    table = Table(title=f"{len(tasks)} valid task(s)" + (f" in suite {suite.name!r}" if suite else ""))
    for col in ("task", "kind", "category", "set", "metrics", "few-shot", "train", "validation", "test"):
        table.add_column(col)
    for t in tasks:
        counts = t.validate_data()
        table.add_row(
            t.name, t.kind, t.category or "", suite.split_of(t.name) if suite else "", ", ".join(t.metrics or []),
            str(t.num_fewshot), *(str(counts.get(s, "")) for s in ("train", "validation", "test")),
        )  # fmt: skip
    console.print(table)


@tasks_app.command("export-lm-eval")
def export_command(
    suite: Path = typer.Argument(..., help="A suite.yaml, task YAML or folder of task YAMLs."),
    out_dir: Path = typer.Argument(..., help="Folder for the lm-evaluation-harness task YAMLs."),
    prefix: str = typer.Option(
        "", "--prefix", help="Prefix for the harness task names (avoids name clashes)."
    ),
) -> None:
    """Write each task as an lm-evaluation-harness task YAML over the same JSONL files."""
    from mergescale.evaluate.export import export_lm_eval
    from mergescale.evaluate.tasks import load_tasks

    written = export_lm_eval(load_tasks(suite), out_dir, prefix=prefix)
    for path in written:
        console.print(f"wrote {path}")
    names = ",".join(p.stem for p in written)
    console.print(
        f"run with: lm_eval --model hf --model_args pretrained=MODEL --include_path {out_dir} --tasks {names}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(tasks_app, name="tasks")
