"""``mergescale merge CONFIG OUT_DIR``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def merge_command(
    config: Path = typer.Argument(..., help="Merge config in mergekit's YAML format."),
    out_dir: Path = typer.Argument(..., help="Output folder (a Hugging Face model folder)."),
    device: str = typer.Option("cpu", help="Where the arithmetic runs: cpu, cuda, cuda:1, ..."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 5GB, 500MB, 2GiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Merge even if inputs hold NaN/Inf."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge models described by a mergekit-style YAML config, streaming tensor by tensor."""
    from mergescale.api import merge

    result = merge(
        config,
        out_dir,
        device=device,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        allow_nonfinite=allow_nonfinite,
        progress=not quiet,
    )
    s = result.stats
    console.print(
        f"[green]merged[/] {s.tensors} tensors into {out_dir} in {s.seconds:.1f} s "
        f"({s.bytes_read / 1e9:.2f} GB read, {s.gb_per_s:.2f} GB/s)"
    )


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
