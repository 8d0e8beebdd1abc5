"""Offline checkpoint averaging: one average, or a sweep of many from one read of the checkpoints.

A weighted average M = Σᵢ wᵢ·Mᵢ is the engine's ``linear`` method with ``normalize: False`` and the strategy's
weights, so it streams exactly like ``mergescale merge``: one tensor name at a time, each checkpoint's tensor
added into a float32 accumulator and dropped (two checkpoints are never in memory), written as sharded
safetensors into a temporary folder renamed into place at the end. A sweep is one plan with several outputs:
each checkpoint tensor is read once and added into every average whose window holds that checkpoint.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergescale import __version__
from mergescale.device import check_device
from mergescale.dtypes import parse_dtype
from mergescale.engine.plan import OutputSpec, build_plan
from mergescale.engine.stream import StreamStats, run_plan
from mergescale.errors import ConfigError, InputModelError, NonFiniteError, OutputError, TensorMismatchError
from mergescale.io.atomic import check_apart_from_inputs, check_output_folder, write_text_atomic
from mergescale.io.checkpoint import TensorSource, open_checkpoint
from mergescale.io.discover import (
    CheckpointRef,
    RunInfo,
    checkpoints_from_paths,
    discover_run,
    step_from_name,
)
from mergescale.io.folders import CONFIG_JSON, TOKENIZER_FILES, find_folder
from mergescale.io.writer import MemorySink, ModelFolderSink
from mergescale.pma.record import PMA_JSON, SWEEP_JSON, AveragedCheckpoint, PMARecord, SweepRecord
from mergescale.pma.weights import DEFAULT_ALPHA, strategy_weights
from mergescale.pma.window import parse_interval, select_window


@dataclass(frozen=True)
class PMASettings:
    """What to average: a strategy and a window (see :func:`average_checkpoints` for the fields)."""

    strategy: str = "sma"
    window: int | None = None
    interval: str | int | None = None
    end: int | None = None
    alpha: float = DEFAULT_ALPHA
    weights: tuple[float, ...] | None = None

    @property
    def kind(self) -> str:
        return "custom" if self.weights is not None else self.strategy

    def label(self, n: int) -> str:
        """A folder name for these settings over ``n`` checkpoints, e.g. ``ema0.2-N6-V2B-end6000``."""
        name = self.kind + (f"{self.alpha:g}" if self.kind == "ema" else "") + f"-N{n}"
        if self.interval is not None and str(self.interval) not in ("0", ""):
            name += f"-V{str(self.interval).replace(' ', '')}"
        if self.end is not None:
            name += f"-end{self.end}"
        return name


@dataclass
class PMAResult:
    """One average: which checkpoints, with which weights, where it went and what it cost.

    ``stats`` is None for a dry run, and shared by every result of a sweep (one read produced them all).
    Averages computed in memory (``mergescale.pma.along_run``, ``mergescale.pma.ablation``) carry their
    tensors in ``state_dict`` and the newest checkpoint's ``config.json`` in ``config`` instead of ``out_dir``.
    """

    settings: PMASettings
    checkpoints: list[CheckpointRef]
    weights: list[float]
    record: PMARecord
    out_dir: Path | None = None
    stats: StreamStats | None = None
    skipped: list[Path] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] | None = None

    @property
    def steps(self) -> list[int | None]:
        return [c.step for c in self.checkpoints]

    @property
    def tokens(self) -> list[int | None]:
        return [c.tokens for c in self.checkpoints]

    @property
    def label(self) -> str:
        assert self.record.label is not None  # an offline record always has one
        return self.record.label


@dataclass
class _Planned:
    result: PMAResult
    sink_dir: Path | None  # None: kept in memory (result.state_dict)


def load_run(
    run_dir: str | Path | None,
    checkpoints: Sequence[str | Path] | None = None,
    *,
    tokens_per_step: int | None = None,
) -> RunInfo:
    """The run's checkpoints: discovered in ``run_dir``, or the explicit ``checkpoints`` list."""
    if checkpoints:
        return checkpoints_from_paths(list(checkpoints), tokens_per_step=tokens_per_step)
    if run_dir is None:
        raise ConfigError("give a run folder or an explicit list of checkpoints")
    return discover_run(run_dir, tokens_per_step=tokens_per_step)


def choose(
    info: RunInfo,
    settings: PMASettings,
    *,
    dtype: torch.dtype | None = None,
    skip_incomplete: bool = False,
    last_step: int | None = None,
) -> PMAResult:
    """Select the window and compute the weights (nothing is read or written).

    A step folder without weights inside the window's span (from its oldest checkpoint to ``end``, or
    ``last_step``, or beyond the newest) would silently shift the window to other checkpoints than asked: it is
    an error naming the folder, unless ``skip_incomplete``, which leaves it out and records it
    (``PMAResult.skipped``, ``pma.json``'s ``skipped_incomplete``).
    """
    chosen = select_window(
        info.checkpoints, window=settings.window, interval=settings.interval, end=settings.end
    )
    limit = settings.end if settings.end is not None else last_step
    skipped = incomplete_in_window(info, chosen, limit)
    if skipped and not skip_incomplete:
        folder, why = skipped[0]
        steps = [c.step for c in chosen]
        raise InputModelError(
            f"{folder}: checkpoint folder has {why}, inside the window (steps {steps[0]} to {steps[-1]} without "
            f"it); finish or remove it, or pass --skip-incomplete to average without it"
        )
    weights = strategy_weights(settings.strategy, len(chosen), alpha=settings.alpha, weights=settings.weights)
    interval = parse_interval(settings.interval)
    record = PMARecord(
        mergescale_version=__version__,
        label=settings.label(len(chosen)),
        strategy=settings.kind,
        alpha=settings.alpha if settings.kind == "ema" else None,
        window=len(chosen),
        interval=None if interval is None else str(settings.interval),
        end=settings.end,
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        raw_weights=list(settings.weights) if settings.weights is not None else None,
        checkpoints=[
            AveragedCheckpoint(
                name=c.name, path=str(c.path.resolve()), step=c.step, tokens=c.tokens, weight=w
            )
            for c, w in zip(chosen, weights, strict=True)
        ],
        skipped_incomplete=[folder.name for folder, _ in skipped],
    )
    return PMAResult(
        settings=settings,
        checkpoints=chosen,
        weights=weights,
        record=record,
        skipped=[folder for folder, _ in skipped],
    )


def incomplete_in_window(
    info: RunInfo, chosen: Sequence[CheckpointRef], last_step: int | None
) -> list[tuple[Path, str]]:
    """The step folders without weights (``info.skipped``) that lie at or after the window's oldest checkpoint and
    at or before ``last_step`` (None: no limit): had they held weights, the window would have differed."""
    first = chosen[0].step if chosen else None
    out = []
    for folder, why in info.skipped:
        step = step_from_name(folder.name)
        if step is None or first is None or (step >= first and (last_step is None or step <= last_step)):
            out.append((folder, why))
    return out


def average_checkpoints(
    run_dir: str | Path | None,
    out_dir: str | Path,
    *,
    strategy: str = "sma",
    window: int | None = None,
    interval: str | int | None = None,
    end: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    weights: Sequence[float] | None = None,
    checkpoints: Sequence[str | Path] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    tokens_per_step: int | None = None,
    max_shard_size: int | str = "5GB",
    skip_incomplete: bool = False,
) -> PMAResult:
    """Average checkpoints of a pre-training run into a Hugging Face folder at ``out_dir``.

    The window: the ``window`` (N) newest checkpoints at or before step ``end`` (default the newest) that lie at
    least ``interval`` (V: steps as a number, tokens with a suffix such as ``"2B"``) apart; every checkpoint
    the rules allow when ``window`` is None. The weights over M₁ … M_N, oldest first (Li et al. 2025,
    https://arxiv.org/abs/2505.12082):

    - ``sma``: wᵢ = 1/N;
    - ``ema``: A₁ = M₁, Aᵢ = α·Mᵢ + (1 − α)·Aᵢ₋₁, i.e. w₁ = (1 − α)^(N−1), wᵢ = α(1 − α)^(N−i);
    - ``wma``: wᵢ = i / Σⱼ j;
    - ``weights``: given weights divided by their sum (strategy ``custom``).

    Streams through the merge engine (float32 accumulation, one tensor at a time); the output keeps the input
    dtype unless ``dtype``, takes ``config.json`` and tokenizer files from the newest checkpoint, and holds
    ``pma.json`` (:class:`PMARecord`). ``dry_run`` only selects and weighs: nothing is read or written.
    A step folder without weights inside the window's span is an error unless ``skip_incomplete`` (then it is
    left out, listed in ``PMAResult.skipped`` and ``pma.json``).

    Raises:
        ConfigError: bad window, interval, alpha or weights; too few checkpoints.
        InputModelError, TensorMismatchError: unreadable checkpoint; a step folder without weights inside the
            window; tensor names or shapes that differ.
        NonFiniteError: a NaN or Inf in any averaged checkpoint.
        OutputError: ``out_dir`` is not empty (without ``overwrite``).
        Nothing is written to ``out_dir`` on any error.
    """
    check_device(device)
    settings = PMASettings(
        strategy=strategy,
        window=window,
        interval=interval,
        end=end,
        alpha=alpha,
        weights=tuple(float(w) for w in weights) if weights is not None else None,
    )
    out_dtype = parse_dtype(dtype, key="--dtype")
    info = load_run(run_dir, checkpoints, tokens_per_step=tokens_per_step)
    result = choose(info, settings, dtype=out_dtype, skip_incomplete=skip_incomplete)
    out = Path(out_dir)
    if dry_run:
        return result
    check_output_folder(out, overwrite=overwrite)
    check_apart_from_checkpoints(out, info.checkpoints)
    planned = [_Planned(result, out)]
    _stream(
        info,
        planned,
        out_dtype,
        device=device,
        overwrite=overwrite,
        progress=progress,
        max_shard_size=max_shard_size,
    )
    return result


SWEEP_KEYS = ("strategy", "window", "interval", "end", "alpha")


def parse_sweep(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["strategy=sma,ema", "window=3,6"]`` -> ``{"strategy": ["sma", "ema"], "window": [3, 6]}``."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ConfigError(f"sweep axis {spec!r} is not KEY=V1,V2,... (keys: {', '.join(SWEEP_KEYS)})")
        if key not in SWEEP_KEYS:
            raise ConfigError(f"cannot sweep {key!r}; sweepable: {', '.join(SWEEP_KEYS)}")
        if key in grid:
            raise ConfigError(f"sweep axis {key!r} given twice")
        items = [v.strip() for v in values.split(",") if v.strip()]
        try:
            if key in ("window", "end"):
                grid[key] = [int(v) for v in items]
            elif key == "alpha":
                grid[key] = [float(v) for v in items]
            else:
                grid[key] = items
        except ValueError:
            raise ConfigError(f"sweep axis {key!r}: {values!r} are not all numbers") from None
    return grid


def sweep_settings(base: PMASettings, grid: Mapping[str, Sequence[Any]]) -> list[PMASettings]:
    """Every combination of the grid's values over ``base`` (the cartesian product, in axis order)."""
    keys = list(grid)
    return [
        replace(base, **dict(zip(keys, combo, strict=True))) for combo in itertools.product(*grid.values())
    ]


def sweep_checkpoints(
    run_dir: str | Path | None,
    out_dir: str | Path,
    grid: Mapping[str, Sequence[Any]],
    *,
    strategy: str = "sma",
    window: int | None = None,
    interval: str | int | None = None,
    end: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    checkpoints: Sequence[str | Path] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    tokens_per_step: int | None = None,
    max_shard_size: int | str = "5GB",
    skip_incomplete: bool = False,
) -> list[PMAResult]:
    """Many averages from ONE read of the checkpoints: every combination of ``grid`` (e.g.
    ``{"strategy": ["sma", "ema", "wma"], "window": [3, 6, 10]}``) over the other settings, each written to
    ``out_dir/<label>/`` (e.g. ``ema0.2-N6``) with its ``pma.json``, plus ``out_dir/sweep.json`` listing them.

    Each tensor of each checkpoint in the union of the windows is read once and added into every average
    that uses it. Errors are raised before anything is written, as for :func:`average_checkpoints`; identical
    combinations (e.g. ``alpha`` swept with ``sma``) are written once.
    """
    check_device(device)
    base = PMASettings(strategy=strategy, window=window, interval=interval, end=end, alpha=alpha)
    out_dtype = parse_dtype(dtype, key="--dtype")
    info = load_run(run_dir, checkpoints, tokens_per_step=tokens_per_step)
    results: dict[str, PMAResult] = {}
    for settings in sweep_settings(base, grid):
        if settings.kind != "ema":
            settings = replace(settings, alpha=DEFAULT_ALPHA)  # alpha means nothing here: do not duplicate
        result = choose(info, settings, dtype=out_dtype, skip_incomplete=skip_incomplete)
        results.setdefault(result.label, result)
    out = Path(out_dir)
    if dry_run:
        return list(results.values())
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder")
    planned = [_Planned(r, out / label) for label, r in results.items()]
    check_apart_from_checkpoints(out, info.checkpoints)
    for p in planned:
        check_output_folder(p.sink_dir, overwrite=overwrite)
    if (out / SWEEP_JSON).exists() and not overwrite:
        raise OutputError(f"{out / SWEEP_JSON} exists (use --overwrite to replace it)")
    created = not out.exists()
    try:
        read = _stream(
            info, planned, out_dtype, device=device, overwrite=overwrite, progress=progress,
            max_shard_size=max_shard_size,
        )  # fmt: skip
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the sinks made it for their temporaries; leave no trace of a failed sweep
        raise
    record = SweepRecord(
        mergescale_version=__version__,
        checkpoints_read=[str(c.path) for c in read],
        outputs={label: r.record for label, r in results.items()},
    )
    write_text_atomic(out / SWEEP_JSON, record.to_json())
    return list(results.values())


def check_apart_from_checkpoints(out: Path, checkpoints: Sequence[CheckpointRef]) -> None:
    """The output folder must not be, lie inside or contain a checkpoint of the run (its weights folder or its
    step folder), averaged or not: --overwrite would replace it. The run folder may hold it (``-o runs/r/pma``)."""
    check_apart_from_inputs(
        out, [(f"checkpoint {c.name}", p) for c in checkpoints for p in dict.fromkeys([c.path, c.folder])]
    )


def average_output(
    result: PMAResult,
    folder: Path | None,
    sources: Sequence[TensorSource],
    index: Mapping[Path, int],
    root: Path | None,
    dtype: torch.dtype | None,
    *,
    max_shard_size: int | str,
    overwrite: bool,
) -> OutputSpec:
    """One average as an output of the engine's plan: the ``linear`` method (not normalised) with the result's
    weights over its checkpoints (``index``: checkpoint path -> position in ``sources``).

    It goes to memory (``folder`` None), or to a model folder with the newest checkpoint's config.json,
    ``pma.json``, and the tokenizer and generation files of the newest checkpoint's folder that holds its
    config or tokenizer (its weights folder, its step folder or the run folder ``root``).
    """
    from mergescale.methods import get_method  # registers the methods on first use

    newest = result.checkpoints[-1]
    sink: ModelFolderSink | MemorySink = MemorySink()
    if folder is not None:
        sink = ModelFolderSink(
            folder,
            config=sources[index[newest.path]].config,
            copy_from=find_folder([newest.path, newest.folder, root], (CONFIG_JSON, *TOKENIZER_FILES)),
            extra_files={PMA_JSON: result.record.to_json()},
            max_shard_size=max_shard_size,
            overwrite=overwrite,
        )
    return OutputSpec(
        label=result.label,
        method=get_method("linear"),
        models=[index[c.path] for c in result.checkpoints],
        base=None,
        model_params=[{"weight": w} for w in result.weights],
        params={"normalize": False},
        sink=sink,
        dtype=dtype,
    )


def _stream(
    info: RunInfo,
    planned: Sequence[_Planned],
    dtype: torch.dtype | None,
    *,
    device: str,
    overwrite: bool,
    progress: bool,
    max_shard_size: int | str,
) -> list[CheckpointRef]:
    """Read the union of the planned windows once and write every average; returns the checkpoints read.

    Each average is one output of the plan using the engine's ``linear`` method, accumulated input by input
    (one float32 accumulator per average for the tensor in flight).
    """
    union: dict[Path, CheckpointRef] = {}
    for p in planned:
        for c in p.result.checkpoints:
            union.setdefault(c.path, c)
    refs = sorted(union.values(), key=lambda c: info.checkpoints.index(c))
    index = {c.path: i for i, c in enumerate(refs)}
    sources = [open_checkpoint(c.path) for c in refs]
    labels = [c.label for c in refs]
    outputs = [
        average_output(
            p.result, p.sink_dir, sources, index, info.root, dtype, max_shard_size=max_shard_size, overwrite=overwrite
        )
        for p in planned
    ]
    try:
        check_same_tensors(sources, labels)
        plan = build_plan(sources, labels, outputs)
        with never_average_diverged("end the window before it (--end STEP) or see `mergescale pma recover`"):
            stats = run_plan(plan, device=device, check_finite=True, progress=progress)
    finally:
        for source in sources:
            source.close()
    for p, sink in zip(planned, (o.sink for o in outputs), strict=True):
        p.result.out_dir = p.sink_dir
        p.result.stats = stats
        if isinstance(sink, MemorySink):
            p.result.state_dict = sink.state_dict
            p.result.config = sources[index[p.result.checkpoints[-1].path]].config
    return refs


@contextmanager
def never_average_diverged(remedy: str) -> Iterator[None]:
    """A NaN or Inf in a checkpoint means the run diverged there: refuse it with ``remedy`` (the merge's
    ``--allow-nonfinite`` does not apply to averages); an overflow of the average itself passes unchanged."""
    try:
        yield
    except NonFiniteError as exc:
        if not exc.in_input:
            raise
        raise NonFiniteError(f"{exc}; a diverged checkpoint is never averaged: {remedy}") from None


def check_same_tensors(sources: Sequence[Any], labels: Sequence[str]) -> None:
    """All checkpoints of a run must hold the same tensor names and shapes; blame the odd one out.

    The engine compares every input with the first, so a bad *first* checkpoint would look like all the
    others being wrong; here the layout most checkpoints share (the newest's on a tie) is the reference.
    """
    layouts = [{n: tuple(i.shape) for n, i in src.info().items()} for src in sources]
    keys = [tuple(sorted(lay.items())) for lay in layouts]
    counts = Counter(keys)
    ref = max(range(len(keys) - 1, -1, -1), key=lambda i: counts[keys[i]])  # ties: the newest
    for i, lay in enumerate(layouts):
        if keys[i] == keys[ref]:
            continue
        others = f"{counts[keys[ref]]} other checkpoint{'s' if counts[keys[ref]] > 1 else ''}"
        missing = sorted(set(layouts[ref]) - set(lay))
        if missing:
            raise TensorMismatchError(f"{labels[i]} is missing tensor {missing[0]!r} that {others} have")
        extra = sorted(set(lay) - set(layouts[ref]))
        if extra:
            raise TensorMismatchError(f"{labels[i]} has tensor {extra[0]!r} that {others} lack")
        name = next(n for n in lay if lay[n] != layouts[ref][n])
        raise TensorMismatchError(
            f"{labels[i]}: tensor {name!r} has shape {lay[name]} but {layouts[ref][name]} in {others}"
        )

