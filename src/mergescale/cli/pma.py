"""``mergescale pma RUN_DIR -o OUT`` (average checkpoints, or a sweep of averages) and ``mergescale pma recover``.

``pma`` is a command group whose default command is ``average``: ``mergescale pma RUN -o OUT`` is
``mergescale pma average RUN -o OUT``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

console = Console()


class _DefaultAverage(TyperGroup):
    """Routes ``pma ARGS`` to ``pma average ARGS`` unless ARGS start with a sub-command name or ask for help."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # a click Context (typer's own or click's)
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["average", *args]
        return super().parse_args(ctx, args)


pma_app = typer.Typer(
    cls=_DefaultAverage,
    help=(
        "Pre-training checkpoint averaging. `mergescale pma RUN_DIR -o OUT` averages the newest checkpoints "
        "of a run (same as `pma average`); `pma recover RUN_DIR -o OUT` handles loss spikes."
    ),
    no_args_is_help=True,
)


def _fmt_tokens(tokens: int | None) -> str:
    if tokens is None:
        return "-"
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return str(tokens)


def _table(result: Any, title: str) -> Table:
    table = Table(title=title)
    for col in ("#", "checkpoint", "step", "tokens", "weight"):
        table.add_column(col, justify="right" if col != "checkpoint" else "left")
    for i, (ref, w) in enumerate(zip(result.checkpoints, result.weights, strict=True), start=1):
        table.add_row(
            str(i),
            ref.name,
            str(ref.step) if ref.step is not None else "-",
            _fmt_tokens(ref.tokens),
            f"{w:.6f}",
        )
    return table


def _sweep_table(results: list[Any]) -> Table:
    table = Table(title=f"sweep: {len(results)} averages")
    for col in ("output", "strategy", "N", "steps", "weights (oldest first)"):
        table.add_column(col)
    for r in results:
        steps = [s for s in r.steps if s is not None]
        span = f"{steps[0]} … {steps[-1]}" if len(steps) > 1 else (str(steps[0]) if steps else "-")
        weights = ", ".join(f"{w:.3f}" for w in r.weights[:6]) + (" …" if len(r.weights) > 6 else "")
        table.add_row(r.label, r.record.strategy, str(len(r.checkpoints)), span, weights)
    return table


def _describe(result: Any) -> str:
    rec = result.record
    alpha = f" alpha={rec.alpha:g}" if rec.alpha is not None else ""
    return f"{rec.label}: {rec.strategy}{alpha} over {rec.window} checkpoints"


@pma_app.command("average")
def average_command(
    paths: list[Path] = typer.Argument(
        None,
        metavar="RUN_DIR",
        help="The run folder; or, with --checkpoints, the checkpoint folders (oldest first); sweep axes KEY=V1,V2 after --sweep.",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output model folder (a folder of folders with --sweep)."
    ),
    strategy: str = typer.Option("sma", "--strategy", "-s", help="sma, ema, wma (or custom via --weights)."),
    window: int | None = typer.Option(
        None, "--window", "-n", min=1, help="Number of checkpoints N (default: all that fit)."
    ),
    interval: str | None = typer.Option(
        None, "--interval", help="Minimum spacing V: steps (500) or tokens with a suffix (2B, 500M)."
    ),
    end: int | None = typer.Option(
        None, "--end", help="Last step that may be averaged (default: the newest)."
    ),
    alpha: float = typer.Option(0.2, "--alpha", help="EMA alpha in (0, 1]."),
    weights: str | None = typer.Option(
        None, "--weights", help="Custom weights w1,w2,... (oldest first), normalised."
    ),
    checkpoints: bool = typer.Option(
        False, "--checkpoints", help="The arguments are checkpoint folders, not a run."
    ),
    sweep: list[str] = typer.Option(
        None, "--sweep", help="Sweep axis KEY=V1,V2,... (strategy, window, interval, end, alpha); repeatable."
    ),
    along_run: bool = typer.Option(
        False,
        "--along-run",
        help="The curve: the window ending at every checkpoint step where it is full (one read, running sums).",
    ),
    ends: int | None = typer.Option(
        None, "--ends", min=1, help="With --along-run: only the newest T end steps."
    ),
    max_outputs: int | None = typer.Option(
        None, "--max-outputs", min=1, help="With --along-run: averages computed together (memory grows with it)."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype (default: the checkpoints' own)."),
    device: str = typer.Option("cpu", "--device", help="Where the arithmetic runs: cpu, cuda, ..."),
    tokens_per_step: int | None = typer.Option(
        None, "--tokens-per-step", min=1, help="Tokens per step, when trainer_state.json does not count them."
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output folders."),
    skip_incomplete: bool = typer.Option(
        False, "--skip-incomplete", help="Leave out step folders without weights (default: an error)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the checkpoints and weights, then exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Average the checkpoints of a pre-training run (streamed, one tensor at a time)."""
    from mergescale.errors import ConfigError
    from mergescale.pma.average import average_checkpoints, parse_sweep, sweep_checkpoints
    from mergescale.pma.weights import parse_weights

    paths = list(paths or [])
    axes = [p for p in paths if "=" in p.name and not p.exists()]
    paths = [p for p in paths if p not in axes]
    sweep = [*(sweep or []), *(str(a) for a in axes)]
    if axes and not sweep[: len(sweep) - len(axes)]:
        raise ConfigError(f"{axes[0]} looks like a sweep axis; put it after --sweep")
    if not paths:
        raise ConfigError("give a run folder (or checkpoint folders with --checkpoints)")
    if len(paths) > 1 and not checkpoints:
        raise ConfigError(f"{len(paths)} folders given; pass one run folder, or --checkpoints A B C")
    if out is None and not dry_run:
        raise ConfigError("give the output folder with -o OUT")
    run_dir = None if checkpoints else paths[0]
    explicit = paths if checkpoints else None
    common: dict[str, Any] = dict(
        strategy=strategy, window=window, interval=interval, end=end, alpha=alpha, checkpoints=explicit,
        dtype=dtype, device=device, overwrite=overwrite, dry_run=dry_run, progress=not quiet,
        tokens_per_step=tokens_per_step, max_shard_size=max_shard_size, skip_incomplete=skip_incomplete,
    )  # fmt: skip
    target = out if out is not None else Path("pma-out")
    if along_run:
        _along_run(run_dir, target, sweep, weights, ends, max_outputs, common)
        return
    if ends is not None or max_outputs is not None:
        raise ConfigError("--ends and --max-outputs go with --along-run")
    if sweep:
        if weights is not None:
            raise ConfigError("--weights cannot be swept; run it on its own")
        results = sweep_checkpoints(run_dir, target, parse_sweep(sweep), **common)
        for r in results:
            _report_skipped(r)
        console.print(_sweep_table(results))
        if dry_run:
            console.print(f"[yellow]dry run[/]: {len(results)} averages, nothing written")
            return
        stats = results[0].stats
        assert stats is not None
        console.print(
            f"[green]wrote[/] {len(results)} averages into {out} from one read of "
            f"{stats.bytes_read / 1e9:.2f} GB in {stats.seconds:.1f} s"
        )
        return
    custom = parse_weights(weights) if weights is not None else None
    if custom is not None and strategy == "sma":
        common["strategy"] = "custom"
    result = average_checkpoints(run_dir, target, weights=custom, **common)
    _report_skipped(result)
    console.print(_table(result, _describe(result)))
    if dry_run:
        console.print("[yellow]dry run[/]: nothing read or written")
        return
    s = result.stats
    assert s is not None
    console.print(
        f"[green]averaged[/] {len(result.checkpoints)} checkpoints into {out} in {s.seconds:.1f} s "
        f"({s.bytes_read / 1e9:.2f} GB read, {s.gb_per_s:.2f} GB/s)"
    )


def _report_skipped(result: Any) -> None:
    """Say which incomplete step folders --skip-incomplete left out, and the window used instead."""
    if result.skipped:
        names = ", ".join(p.name for p in result.skipped)
        steps = ", ".join(str(s) for s in result.steps)
        console.print(
            f"[yellow]skipped[/] {names} (no model weights); {result.label} averages steps {steps}",
            highlight=False,
        )


def _along_run(
    run_dir: Path | None,
    target: Path,
    sweep: list[str],
    weights: str | None,
    ends: int | None,
    max_outputs: int | None,
    common: dict[str, Any],
) -> None:
    from mergescale.errors import ConfigError
    from mergescale.pma.along_run import along_run_averages, plan_along_run
    from mergescale.pma.average import PMASettings, parse_sweep, sweep_settings
    from mergescale.pma.weights import parse_weights

    if common["end"] is not None:
        raise ConfigError("--along-run sets the end steps itself; use --ends T for the newest T")
    grid = parse_sweep(sweep) if sweep else {}
    if "end" in grid:
        raise ConfigError("--along-run sets the end steps itself; do not sweep end")
    custom = tuple(parse_weights(weights)) if weights is not None else None
    base = PMASettings(
        strategy="custom" if custom is not None and common["strategy"] == "sma" else common["strategy"],
        window=common["window"], interval=common["interval"], alpha=common["alpha"], weights=custom,
    )  # fmt: skip
    if base.window is None:
        raise ConfigError("--along-run needs --window N")
    settings = sweep_settings(base, grid) if grid else [base]
    kwargs = dict(
        ends=None, last=ends, checkpoints=common["checkpoints"], tokens_per_step=common["tokens_per_step"],
        dtype=common["dtype"],
    )  # fmt: skip
    if common["dry_run"]:
        plan = plan_along_run(run_dir, settings, **kwargs)  # type: ignore[arg-type]
        console.print(_sweep_table(plan.points))
        console.print(f"[yellow]dry run[/]: {len(plan.points)} averages, nothing written")
        return
    done = along_run_averages(
        run_dir, target, settings, **kwargs, max_outputs=max_outputs, device=common["device"],  # type: ignore[arg-type]
        progress=common["progress"], overwrite=common["overwrite"], max_shard_size=common["max_shard_size"],
    )  # fmt: skip
    stats = done[0].stats
    assert stats is not None
    console.print(
        f"[green]wrote[/] {len(done)} averages along the run into {target} from "
        f"{stats.bytes_read / 1e9:.2f} GB read in {stats.seconds:.1f} s"
    )


def _num(x: float) -> str:
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.4g}")


@pma_app.command("recover")
def recover_command(
    run_dir: Path = typer.Argument(..., help="The run folder (checkpoints and trainer_state.json)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write the recovery average."),
    k: int = typer.Option(3, "--k", "-k", min=1, help="Checkpoints before the spike to average."),
    loss_log: Path | None = typer.Option(
        None,
        "--loss-log",
        help="Loss log: trainer_state.json, CSV or JSONL with step and loss (default: the run's).",
    ),
    factor: float = typer.Option(1.3, "--factor", help="Spike: loss >= factor x rolling median."),
    zscore: float = typer.Option(8.0, "--zscore", help="Spike: loss >= median + zscore x robust std."),
    spike_window: int = typer.Option(
        20, "--spike-window", min=2, help="Logged losses in the rolling median."
    ),
    tolerance: float = typer.Option(
        0.05, "--tolerance", help="Recovered: back within this fraction of the median..."
    ),
    recover_points: int = typer.Option(3, "--recover-points", min=1, help="...for this many logged losses."),
    strategy: str = typer.Option(
        "sma", "--strategy", "-s", help="How to average the K checkpoints: sma, ema, wma."
    ),
    eval_data: Path | None = typer.Option(
        None, "--eval-data", help="Held-out text (one document per line) or JSONL with 'text': compare both."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype (default: the checkpoints' own)."),
    device: str = typer.Option("cpu", "--device", help="Where the arithmetic runs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="With --eval-data: let a model run code it ships (its auto_map)."
    ),
    skip_incomplete: bool = typer.Option(
        False, "--skip-incomplete", help="Leave out step folders without weights (default: an error)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report spikes and the plan; write nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Find loss spikes; for the first unrecovered one, average the K checkpoints before it into OUT."""
    from mergescale.errors import ConfigError
    from mergescale.pma.recovery import recover
    from mergescale.pma.spikes import SpikeRule

    if out is None and not dry_run:
        raise ConfigError("give the output folder with -o OUT (or --dry-run)")
    rule = SpikeRule(
        window=spike_window, factor=factor, zscore=zscore, tolerance=tolerance, recover_points=recover_points
    )
    result = recover(
        run_dir, out if out is not None else Path("pma-recover"), k=k, loss_log=loss_log, rule=rule,
        strategy=strategy, eval_data=eval_data, dtype=dtype, device=device, overwrite=overwrite, dry_run=dry_run,
        progress=not quiet, trust_remote_code=trust_remote_code, skip_incomplete=skip_incomplete,
    )  # fmt: skip
    console.print(f"loss log: {result.loss_log_source} ({len(result.loss_log)} entries)")
    if not result.spikes:
        console.print("[green]no loss spikes[/]: nothing to recover")
        return
    table = Table(title="loss spikes")
    for col in ("step", "loss", "median before", "ratio", "z", "peak", "recovered"):
        table.add_column(col, justify="right")
    for s in result.spikes:
        status = f"[green]yes, step {s.recovered_at}[/]" if s.recovered else "[red]no[/]"
        table.add_row(
            str(s.step), _num(s.loss), _num(s.baseline), _num(s.ratio), _num(s.z), _num(s.peak), status
        )
    console.print(table)
    if result.spike is None:
        console.print("[green]the run recovered from every spike[/]: nothing to do")
        return
    assert result.averaged is not None and result.rollback is not None
    _report_skipped(result.averaged)
    console.print(
        _table(
            result.averaged,
            f"average of the {len(result.averaged.checkpoints)} checkpoints before step {result.spike.step}",
        )
    )
    if dry_run:
        console.print(
            f"[yellow]dry run[/]: nothing written; the alternative is rolling back to {result.rollback.path}"
        )
        return
    console.print(f"[green]wrote[/] the average to {out}")
    console.print(f"alternative: roll back to {result.rollback.path} (step {result.rollback.step})")
    if result.eval_losses:
        avg, rb = result.eval_losses["average"], result.eval_losses["rollback"]
        console.print(
            f"held-out loss: average {avg:.4f} (ppl {math.exp(min(avg, 700)):.2f}), "
            f"rollback {rb:.4f} (ppl {math.exp(min(rb, 700)):.2f}); lower: [bold]{result.recommendation}[/]"
        )


@pma_app.command("study")
def study_command(
    run_dir: Path = typer.Argument(..., help="The run folder (checkpoint-<step>/ or step folders)."),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder (created; rerun to resume)."),
    annealed: Path | None = typer.Option(None, "--annealed", help="The annealed model (share of its gain)."),
    heldout: Path | None = typer.Option(
        None, "--heldout", help="Held-out text: a perplexity task YAML, or .txt / .jsonl documents."
    ),
    tasks: Path | None = typer.Option(None, "--tasks", help="Tasks scored along the run (suite or task YAML)."),
    data: Path | None = typer.Option(
        None, "--data", help="Training text (one document a line) for PMA-init and spike recovery."
    ),
    window: int = typer.Option(10, "--window", "-n", min=1, help="N checkpoints per average along the run."),
    interval: str | None = typer.Option(None, "--interval", help="V between averaged checkpoints: steps or 2B."),
    strategies: str = typer.Option("sma,ema,wma", "--strategies", help="Averages along the run: sma, ema, wma."),
    ablation: bool = typer.Option(True, "--ablation/--no-ablation", help="N x V x strategy at 3 end steps."),
    pma_init: bool = typer.Option(True, "--pma-init/--no-pma-init", help="Continued training from the average."),
    spike: bool = typer.Option(True, "--spike/--no-spike", help="A deliberate spike, recovered two ways."),
    heldout_limit: int | None = typer.Option(None, "--heldout-limit", min=1, help="Held-out documents scored."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes running experiments side by side."),
    device: str = typer.Option("cpu", "--device", help="Where models run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """The pre-training paper's experiments on one run (a study with a `pma:` section): PMA curves along the
    run, the window ablation, PMA-init and spike recovery; results in OUT/study.sqlite, shown at the end.
    PMA-init and spike recovery need --data."""
    from mergescale.cli.study import run as study_run_command
    from mergescale.study.spec import parse_spec

    wanted = [s.strip() for s in strategies.split(",") if s.strip()]
    spec = parse_spec(
        {
            "name": f"pma-{run_dir.resolve().name}",
            "eval": {"device": device},
            "pma": {
                "runs": [
                    {
                        "name": run_dir.resolve().name,
                        "run": str(run_dir.resolve()),
                        **{k: str(v.resolve()) for k, v in
                           {"annealed": annealed, "heldout": heldout, "tasks": tasks, "data": data}.items() if v},
                    }
                ],
                "strategies": [{"strategy": s} for s in wanted],
                "window": window,
                "interval": interval,
                "ablation": {} if ablation else None,
                "pma_init": {} if pma_init and data else None,
                "spike": {} if spike and data else None,
                "heldout_limit": heldout_limit,
            },
        },
        "mergescale pma study",
    )  # fmt: skip
    if (pma_init or spike) and data is None:
        console.print("[yellow]note:[/] PMA-init and spike recovery need --data (training text); skipped")
    study_run_command(spec, out, workers=workers, quiet=quiet)  # type: ignore[arg-type]


def register(app: typer.Typer) -> None:
    app.add_typer(pma_app, name="pma")
