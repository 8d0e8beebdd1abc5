"""The window ablation: N × V × strategy at chosen end steps (early, middle, late in the run).

The pre-training paper (Li et al. 2025, https://arxiv.org/abs/2505.12082) varies the number of merged
checkpoints N, their spacing V and the strategy (SMA, EMA α, WMA) at several points of training. Every average
of one end step comes from one read of the checkpoints its windows use: they are the outputs of one merge plan
(what ``mergescale pma --sweep`` runs), so each is bit for bit the average ``mergescale pma`` computes alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergescale.dtypes import parse_dtype
from mergescale.errors import ConfigError, OutputError
from mergescale.io.atomic import check_output_folder
from mergescale.pma.along_run import SkippedPoint
from mergescale.pma.average import PMAResult, PMASettings, _Planned, _stream, choose, load_run
from mergescale.pma.weights import DEFAULT_ALPHA


def ablation_settings(
    windows: Sequence[int],
    intervals: Sequence[str | int | None] = (None,),
    strategies: Sequence[str | tuple[str, float]] = ("sma", ("ema", 0.2), "wma"),
) -> list[PMASettings]:
    """The grid N × V × strategy as settings (no end step): strategies as names, or ``("ema", alpha)``.

    >>> [s.label(s.window) for s in ablation_settings([3, 6], strategies=["sma", ("ema", 0.1)])]
    ['sma-N3', 'ema0.1-N3', 'sma-N6', 'ema0.1-N6']
    """
    if not windows:
        raise ConfigError("the ablation needs at least one window size N")
    grid: list[PMASettings] = []
    for n, v, strat in itertools.product(windows, intervals or (None,), strategies):
        name, alpha = (strat, DEFAULT_ALPHA) if isinstance(strat, str) else strat
        grid.append(PMASettings(strategy=name, window=int(n), interval=v, alpha=float(alpha)))
    return grid


@dataclass
class AblationStep:
    """The averages of one end step, from one read; the settings whose window did not fit there."""

    end: int
    results: list[PMAResult]
    skipped: list[SkippedPoint]


def iter_ablation(
    run_dir: str | Path | None,
    settings: Sequence[PMASettings],
    ends: Sequence[int],
    *,
    out_dir: str | Path | None = None,
    checkpoints: Sequence[str | Path] | None = None,
    tokens_per_step: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> Iterator[AblationStep]:
    """For each end step in ``ends``, every average of ``settings`` (end set to that step) from one read of the
    checkpoints their windows use, yielded step by step: in memory (``result.state_dict``) or, with
    ``out_dir``, written to ``out_dir/<label>/`` (labels such as ``ema0.2-N6-V50-end800``). Settings whose
    window does not fit at a step (too early for N and V) are listed in ``skipped``; identical averages
    (alpha given to SMA) are computed once.
    """
    info = load_run(run_dir, checkpoints, tokens_per_step=tokens_per_step)
    out_dtype = parse_dtype(dtype, key="--dtype")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder")
    if not ends:
        raise ConfigError("give at least one end step")
    steps: list[tuple[int, list[PMAResult], list[SkippedPoint]]] = []
    for t in ends:
        chosen: dict[str, PMAResult] = {}
        skipped: list[SkippedPoint] = []
        for s in settings:
            if s.end is not None:
                raise ConfigError("ablation settings have no end step: the ablation sets it (use ends=)")
            at = replace(s, end=int(t), alpha=s.alpha if s.kind == "ema" else DEFAULT_ALPHA)
            try:
                r = choose(info, at, dtype=out_dtype)
            except ConfigError as exc:
                skipped.append(SkippedPoint(at, int(t), str(exc)))
                continue
            chosen.setdefault(r.label, r)
        steps.append((int(t), list(chosen.values()), skipped))
        if out is not None:
            for r in chosen.values():
                check_output_folder(out / r.label, overwrite=overwrite)  # before anything is written
    for t, results, skipped in steps:
        if results:
            planned = [_Planned(r, None if out is None else out / r.label) for r in results]
            _stream(info, planned, out_dtype, device=device, overwrite=overwrite, progress=progress,
                    max_shard_size="5GB")  # fmt: skip
        yield AblationStep(t, results, skipped)
