"""``mergescale merge CONFIG OUT_DIR`` and ``mergescale calibrate CONFIG``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from mergescale.errors import NonFiniteError

console = Console()
err_console = Console(stderr=True)


@contextmanager
def _config_warnings_printed() -> Iterator[None]:
    """Show the config's warnings (keys mergekit ignores) as yellow lines instead of Python's warning format."""
    from mergescale.config import ConfigWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, ConfigWarning):
                    err_console.print(f"[bold yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def merge_command(
    config: Path = typer.Argument(..., help="Merge config in mergekit's YAML format."),
    out_dir: Path = typer.Argument(..., help="Output folder (a Hugging Face model folder)."),
    device: str = typer.Option("cpu", help="Where the arithmetic runs: cpu, cuda, cuda:1, ..."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 5GB, 500MB, 2GiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Merge even if inputs hold NaN/Inf."),
    strict: bool = typer.Option(
        False, "--strict", help="Refuse keys and parameters mergekit would ignore (default: warn and go on)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    max_memory: str = typer.Option(
        None, "--max-memory", metavar="SIZE",
        help="Peak memory budget, e.g. 16GB: large tensors of stacked methods (TIES, DARE, ...) are merged over "
             "row blocks that fit. Default: blocks of at most 256 MiB.",
    ),  # fmt: skip
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only print the memory the merge will need (reads headers only; writes nothing)."
    ),
) -> None:
    """Merge models described by a mergekit-style YAML config, streaming tensor by tensor."""
    from mergescale.api import merge, plan_memory

    if dry_run:
        with _config_warnings_printed():
            planned = plan_memory(config, max_memory=max_memory, device=device, strict=strict)
        for line in planned.describe():
            console.print(line, highlight=False, soft_wrap=True)
        return
    with _config_warnings_printed():
        try:
            result = merge(
                config,
                out_dir,
                device=device,
                overwrite=overwrite,
                max_shard_size=max_shard_size,
                allow_nonfinite=allow_nonfinite,
                progress=not quiet,
                strict=strict,
                max_memory=max_memory,
            )
        except NonFiniteError as exc:
            if not exc.in_input:
                raise
            raise NonFiniteError(f"{exc} (pass --allow-nonfinite to merge anyway)", in_input=True) from None
    s = result.stats
    console.print(
        f"[green]merged[/] {s.tensors} tensors into {out_dir} in {s.seconds:.1f} s "
        f"({s.bytes_read / 1e9:.2f} GB read, {s.gb_per_s:.2f} GB/s; peak memory {s.peak_rss / 1e9:.2f} GB, "
        f"planned {s.planned_peak / 1e9:.2f} GB)"
    )


def calibrate_command(
    config: Path = typer.Argument(..., help="Merge config of a data-aware method (fisher, regmean)."),
    device: str = typer.Option("cpu", help="Where the models run: cpu, cuda, ..."),
    force: bool = typer.Option(False, "--force", help="Recompute statistics that already exist."),
    strict: bool = typer.Option(False, "--strict", help="Refuse keys mergekit would ignore."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run each model of CONFIG on its calibration examples and store the statistics its method needs."""
    from mergescale.calibration import calibrate
    from mergescale.config import load_config

    with _config_warnings_printed():
        cfg = load_config(config, strict=strict)
        paths = calibrate(cfg, device=device, force=force, progress=not quiet)
    if not paths:
        console.print(f"merge_method {cfg.merge_method!r} needs no calibration")
    for model, kinds in paths.items():
        for kind, path in kinds.items():
            console.print(f"[green]{kind}[/] of {model}: {path}")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
    app.command("calibrate")(calibrate_command)
