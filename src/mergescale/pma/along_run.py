"""Averages along a run: for each strategy setting, the window ending at every checkpoint step (or at chosen end
steps), computed in few passes over the checkpoints.

The pre-training paper (Li et al. 2025, https://arxiv.org/abs/2505.12082) plots the average of the window
ending at step t against t, beside the checkpoint at t and the annealed model. Each point is exactly what
``mergescale pma --end t`` averages (the same window rule, :func:`~mergescale.pma.window.select_window`, and
weights); the points of one setting share their reads and their sums: consecutive windows differ by one
checkpoint in and one out, so every checkpoint tensor is read and converted once for all windows and
strategies, and the windows are computed from that chunk in cache, a group of them per matrix product
(:mod:`mergescale.engine.sliding` says why a product rather than running sums).

Outputs go to memory (:class:`~mergescale.io.writer.MemorySink`, for small models evaluated on the spot) or to
model folders. Memory grows with the number of outputs computed together (each tensor of every window is
held until written), so :func:`iter_along_run` computes the curve in batches of at most ``max_outputs``
points: one pass per batch, each checkpoint tensor read once per batch that uses it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mergescale import __version__
from mergescale.dtypes import parse_dtype
from mergescale.engine import sliding as _sliding
from mergescale.engine.plan import build_plan
from mergescale.engine.sliding import SlidingPlan, WindowGroup, group_windows, run_sliding
from mergescale.engine.stream import StreamStats
from mergescale.errors import ConfigError, OutputError
from mergescale.io.atomic import check_output_folder, write_text_atomic
from mergescale.io.checkpoint import open_checkpoint
from mergescale.io.discover import CheckpointRef, RunInfo
from mergescale.io.writer import MemorySink
from mergescale.pma.average import (
    PMAResult,
    PMASettings,
    average_output,
    check_same_tensors,
    choose,
    load_run,
    never_average_diverged,
)
from mergescale.pma.record import SweepRecord

ALONG_RUN_JSON = "along_run.json"


@dataclass(frozen=True)
class SkippedPoint:
    """A requested (settings, end step) whose window does not fit, and why."""

    settings: PMASettings
    end: int
    reason: str


@dataclass
class AlongRunPlan:
    """Which averages a curve holds: ``points`` in end-step order (settings order within a step), each a
    :class:`~mergescale.pma.average.PMAResult` whose ``settings.end`` is its end step."""

    info: RunInfo
    points: list[PMAResult]
    skipped: list[SkippedPoint] = field(default_factory=list)
    dtype: torch.dtype | None = None

    def batches(self, max_outputs: int | None = None) -> list[list[PMAResult]]:
        """The points cut into consecutive batches of at most ``max_outputs`` (all in one when None)."""
        if max_outputs is not None and max_outputs < 1:
            raise ConfigError(f"max_outputs must be at least 1, got {max_outputs}")
        size = max_outputs or max(1, len(self.points))
        return [self.points[i : i + size] for i in range(0, len(self.points), size)]

    @property
    def checkpoints(self) -> list[CheckpointRef]:
        """Every checkpoint some point averages, oldest first."""
        used = {c.path for p in self.points for c in p.checkpoints}
        return [c for c in self.info.checkpoints if c.path in used]


def plan_along_run(
    run_dir: str | Path | None,
    settings: PMASettings | Sequence[PMASettings],
    *,
    ends: Sequence[int] | None = None,
    last: int | None = None,
    checkpoints: Sequence[str | Path] | None = None,
    tokens_per_step: int | None = None,
    dtype: str | torch.dtype | None = None,
) -> AlongRunPlan:
    """The points of the curves: for each of ``settings`` (strategy, window N, interval V, alpha; their ``end``
    must be None) the window ending at each step of ``ends``, or by default at every checkpoint step from the
    first where the window is full. ``last`` keeps only the newest ``last`` end steps of each setting.

    Nothing is read. Requested ends whose window does not fit (too early for N and V) are listed in
    ``skipped``; with the default ends they are simply not points.

    Raises:
        ConfigError: bad settings, or no point at all.
    """
    many = [settings] if isinstance(settings, PMASettings) else list(settings)
    if not many:
        raise ConfigError("give at least one strategy setting")
    if last is not None and last < 1:
        raise ConfigError(f"--ends must be at least 1, got {last}")
    info = load_run(run_dir, checkpoints, tokens_per_step=tokens_per_step)
    out_dtype = parse_dtype(dtype, key="--dtype")
    steps = [c.step for c in info.checkpoints]
    if ends is None and any(s is None for s in steps):
        raise ConfigError("the checkpoints have no step numbers; give the end steps explicitly")
    wanted = sorted(set(ends)) if ends is not None else [s for s in steps if s is not None]
    points: list[tuple[int, int, PMAResult]] = []
    skipped: list[SkippedPoint] = []
    seen: set[str] = set()
    for order, base in enumerate(many):
        if base.end is not None:
            raise ConfigError("a curve's settings have no end step: the curve sets it (use ends=)")
        mine: list[tuple[int, int, PMAResult]] = []
        for t in wanted:
            at = replace(base, end=t)
            try:
                result = choose(info, at, dtype=out_dtype)
            except ConfigError as exc:
                if ends is not None:
                    skipped.append(SkippedPoint(at, t, str(exc)))
                continue
            if result.label not in seen:
                seen.add(result.label)
                mine.append((t, order, result))
        points += mine[-last:] if last is not None else mine
    if not points:
        raise ConfigError(
            f"no window fits at any end step ({len(info.checkpoints)} checkpoints, steps "
            f"{steps[0]} ... {steps[-1]}); use a smaller window or interval"
        )
    points.sort(key=lambda p: (p[0], p[1]))
    return AlongRunPlan(info, [p[2] for p in points], skipped, out_dtype)


def groups_for(points: Sequence[PMAResult], index: dict[Path, int], size: int | None = None) -> list[WindowGroup]:
    """The window groups of a batch: consecutive points (in end order) of one setting, at most ``size`` per
    group (default ``mergescale.engine.sliding.GROUP``). ``index`` maps a checkpoint's path to its source
    index; outputs are positions in ``points``."""
    windows = [([index[c.path] for c in p.checkpoints], list(p.weights)) for p in points]
    keys = [replace(p.settings, end=None) for p in points]
    return group_windows(windows, keys, size or _sliding.GROUP)


def iter_along_run(
    plan: AlongRunPlan,
    *,
    out_dir: str | Path | None = None,
    max_outputs: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    workers: int | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Iterator[list[PMAResult]]:
    """Compute the plan's averages batch by batch (see :meth:`AlongRunPlan.batches`), yielding each batch's
    results once it is done: with ``out_dir`` each written to ``out_dir/<label>/`` (a model folder with
    ``pma.json``, as ``mergescale pma`` writes it), else held in memory as ``result.state_dict``. A batch's
    tensors are released when the caller drops its results.

    Raises:
        NonFiniteError: a NaN or Inf in a checkpoint some window uses (nothing of that batch is written).
        and everything :func:`~mergescale.pma.average.average_checkpoints` raises for bad checkpoints.
    """
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise OutputError(f"output path {out} exists and is not a folder")
        for p in plan.points:
            check_output_folder(out / p.label, overwrite=overwrite)
    for batch in plan.batches(max_outputs):
        stats = _run_batch(
            plan, batch, out, device=device, progress=progress, workers=workers, overwrite=overwrite,
            max_shard_size=max_shard_size,
        )  # fmt: skip
        for p in batch:
            p.stats = stats
        yield batch


def _run_batch(
    plan: AlongRunPlan,
    batch: list[PMAResult],
    out: Path | None,
    *,
    device: str,
    progress: bool,
    workers: int | None,
    overwrite: bool,
    max_shard_size: int | str,
) -> StreamStats:
    info = plan.info
    used = {c.path for p in batch for c in p.checkpoints}
    refs = [c for c in info.checkpoints if c.path in used]
    index = {c.path: i for i, c in enumerate(refs)}
    sources = [open_checkpoint(c.path) for c in refs]
    labels = [c.label for c in refs]
    outputs = [
        average_output(
            p, out / p.label if out is not None else None, sources, index, info.root, plan.dtype,
            max_shard_size=max_shard_size, overwrite=overwrite,
        )  # fmt: skip
        for p in batch
    ]
    try:
        check_same_tensors(sources, labels)
        sliding = SlidingPlan(build_plan(sources, labels, outputs), groups_for(batch, index))
        with never_average_diverged("end the curve before it or see `mergescale pma recover`"):
            stats = run_sliding(sliding, device=device, check_finite=True, progress=progress, workers=workers)
    finally:
        for source in sources:
            source.close()
    for p, sink in zip(batch, (o.sink for o in outputs), strict=True):
        if isinstance(sink, MemorySink):
            p.state_dict = sink.state_dict
            p.config = sources[index[p.checkpoints[-1].path]].config
        else:
            p.out_dir = sink.out_dir
    return stats


def along_run_averages(
    run_dir: str | Path | None,
    out_dir: str | Path,
    settings: PMASettings | Sequence[PMASettings],
    *,
    ends: Sequence[int] | None = None,
    last: int | None = None,
    checkpoints: Sequence[str | Path] | None = None,
    tokens_per_step: int | None = None,
    dtype: str | torch.dtype | None = None,
    max_outputs: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    workers: int | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> list[PMAResult]:
    """Every point of the curves (see :func:`plan_along_run`) written to ``out_dir/<label>/`` (e.g.
    ``sma-N10-end1200``), plus ``out_dir/along_run.json`` listing them; returns the points.

    Errors are raised before anything of a batch is written.
    """
    plan = plan_along_run(
        run_dir, settings, ends=ends, last=last, checkpoints=checkpoints, tokens_per_step=tokens_per_step,
        dtype=dtype,
    )  # fmt: skip
    out = Path(out_dir)
    if (out / ALONG_RUN_JSON).exists() and not overwrite:
        raise OutputError(f"{out / ALONG_RUN_JSON} exists (use --overwrite to replace it)")
    done: list[PMAResult] = []
    for batch in iter_along_run(
        plan, out_dir=out, max_outputs=max_outputs, device=device, progress=progress, workers=workers,
        overwrite=overwrite, max_shard_size=max_shard_size,
    ):  # fmt: skip
        done += batch
    record = SweepRecord(
        mergescale_version=__version__,
        checkpoints_read=[str(c.path) for c in plan.checkpoints],
        outputs={p.label: p.record for p in done},
    )
    write_text_atomic(out / ALONG_RUN_JSON, record.to_json())
    return done


def read_along_run(out_dir: str | Path) -> SweepRecord:
    """The ``along_run.json`` of a folder written by :func:`along_run_averages`."""
    path = Path(out_dir) / ALONG_RUN_JSON
    try:
        return SweepRecord.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a valid {ALONG_RUN_JSON} ({exc})") from None
