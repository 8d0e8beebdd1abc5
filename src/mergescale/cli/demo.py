"""``mergescale demo``: the built-in offline job."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def demo_command(
    out_dir: Path = typer.Option(Path("mergescale-demo"), "--out", "-o", help="Where models and merges go."),
    experts: int = typer.Option(3, help="How many tiny experts to create."),
    seed: int = typer.Option(0, help="Seed for the tiny models and DARE's masks."),
) -> None:
    """Create tiny models offline, merge them with linear, task arithmetic, TIES and DARE-TIES, load the results."""
    from mergescale.demo import run_demo

    rows = run_demo(out_dir, n_experts=experts, seed=seed)
    table = Table(title=f"merges of {experts} tiny experts (in {out_dir}/merges)")
    for col in ("method", "seconds", "GB/s", "‖merged − base‖", "loads + runs"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.method, f"{r.seconds:.2f}", f"{r.gb_per_s:.2f}", f"{r.distance_to_base:.3f}",
                      "yes" if r.loads else "NO")
    console.print(table)
    if not all(r.loads for r in rows):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
