"""``mergescale eval``: evaluate a model on task files (or harness tasks) and write a results JSON."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def eval_command(
    model: str = typer.Argument(..., help="A Hugging Face model folder or Hub id."),
    tasks: str = typer.Option(
        ...,
        "--tasks",
        "-t",
        help="A task YAML, a folder of them or a suite.yaml; with --backend lm-eval: NAME,...",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the results JSON."),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Score only the first N examples of each task."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Examples per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32, bfloat16, float16 or auto (the checkpoint's)."
    ),
    log_samples: bool = typer.Option(
        False, "--log-samples", help="Also write samples.jsonl next to the results."
    ),
    split: str = typer.Option("test", "--split", help="Data split to score: test, validation or train."),
    backend: str = typer.Option(
        "mergescale", "--backend", help="mergescale (fast scorer) or lm-eval (the harness)."
    ),
    include_path: Path | None = typer.Option(
        None, "--include-path", help="Extra harness task folder (lm-eval)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Let the model run code it ships (its auto_map). Off: refused."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Evaluate MODEL on --tasks and write per-task metrics, category means and the model's identity."""
    from mergescale.evaluate import evaluate
    from mergescale.evaluate.results import check_results_path

    check_results_path(output, samples=log_samples)  # before the evaluation, not after it
    results = evaluate(
        model, tasks, limit=limit, batch_size=batch_size, device=device, dtype=dtype, log_samples=log_samples,
        progress=not quiet, split=split, backend=backend, include_path=include_path,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    results.save(output)
    table = Table(title=f"{results.model.name or model}  (hash {results.model.hash})")
    for col in ("task", "category", "n", "metrics", "seconds"):
        table.add_column(col)
    for name, r in results.tasks.items():
        metrics = "  ".join(f"{k}={v:.4f}" for k, v in r.metrics.items())
        table.add_row(name, r.category, str(r.n), metrics, f"{r.seconds:.2f}")
    console.print(table)
    console.print(f"wrote {output}" + (" and samples.jsonl" if results.samples else ""))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
