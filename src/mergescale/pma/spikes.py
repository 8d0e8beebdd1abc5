"""Loss-spike detection on a training-loss log, and which checkpoints precede a spike (pure).

A logged loss Lᵢ is a **spike** when, against the median m and the median absolute deviation MAD of the
previous ``window`` finite losses,

    Lᵢ ≥ factor · m        or        (Lᵢ − m) / σ ≥ zscore,  σ = max(1.4826 · MAD, 0.01 · m)

(1.4826 · MAD estimates the standard deviation of Gaussian noise; the floor keeps a very smooth curve from
flagging a 1% wobble). A NaN or Inf loss is always a spike. A falling loss (early training) never triggers:
both tests look upward only.

A spike has **recovered** when ``recover_points`` consecutive later losses are all finite and at most
(1 + ``tolerance``) · m, with m frozen at the spike; the scan then resumes after the recovery. The first spike
that never recovers ends the scan: what follows a collapse says nothing new.

The paper ("Model Merging in Pre-training of LLMs", Li et al., 2025, https://arxiv.org/abs/2505.12082)
recovers from an unrecovered spike by averaging the checkpoints saved before it; :func:`checkpoints_before`
picks them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from mergescale.errors import ConfigError

MAD_TO_SIGMA = 1.4826  # MAD · 1.4826 = σ for Gaussian noise
SIGMA_FLOOR = 0.01  # σ is at least 1% of the median


@dataclass(frozen=True)
class SpikeRule:
    """Thresholds of the detector (defaults suit logs written every 1–50 steps).

    Attributes:
        window: how many previous logged losses form the rolling median.
        factor: a loss at least ``factor`` × the median is a spike.
        zscore: a loss at least ``zscore`` robust standard deviations above the median is a spike.
        tolerance: recovered means back to at most (1 + tolerance) × the pre-spike median...
        recover_points: ...for this many consecutive logged losses.
        min_history: no judgement before this many finite losses have been logged.
    """

    window: int = 20
    factor: float = 1.3
    zscore: float = 8.0
    tolerance: float = 0.05
    recover_points: int = 3
    min_history: int = 5

    def __post_init__(self) -> None:
        if self.window < 2 or self.min_history < 2 or self.recover_points < 1:
            raise ConfigError("spike window and min history must be at least 2, recover points at least 1")
        if not self.factor > 1.0 or not self.zscore > 0.0 or not self.tolerance >= 0.0:
            raise ConfigError(
                f"spike factor must exceed 1, z-score be positive and tolerance non-negative "
                f"(got {self.factor}, {self.zscore}, {self.tolerance})"
            )


@dataclass(frozen=True)
class Spike:
    """One detected spike.

    Attributes:
        step: the step of the first spiking loss.
        loss: that loss.
        baseline: the rolling median before it.
        ratio: loss / baseline (inf for a NaN/Inf loss).
        z: (loss − baseline) / σ (inf for a NaN/Inf loss).
        peak: the highest loss (inf if any was not finite) until recovery or the end of the log.
        last_good_step: the step of the last logged loss before the spike.
        recovered_at: the step where the loss was back near the baseline, or None when it never was.
    """

    step: int
    loss: float
    baseline: float
    ratio: float
    z: float
    peak: float
    last_good_step: int
    recovered_at: int | None

    @property
    def recovered(self) -> bool:
        return self.recovered_at is not None


def _robust_stats(history: Sequence[float]) -> tuple[float, float]:
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history)
    sigma = max(MAD_TO_SIGMA * mad, SIGMA_FLOOR * abs(median))
    return median, sigma


def _recovery(losses: Sequence[float], start: int, ceiling: float, need: int) -> int | None:
    """Index of the first run of ``need`` consecutive finite losses ≤ ceiling after ``start``, or None."""
    run = 0
    for j in range(start + 1, len(losses)):
        if math.isfinite(losses[j]) and losses[j] <= ceiling:
            run += 1
            if run == need:
                return j - need + 1
        else:
            run = 0
    return None


def detect_spikes(
    steps: Sequence[int], losses: Sequence[float], rule: SpikeRule | None = None
) -> list[Spike]:
    """Every spike of a loss log (steps increasing), up to and including the first that never recovers."""
    rule = rule or SpikeRule()
    if len(steps) != len(losses):
        raise ConfigError(f"{len(steps)} steps but {len(losses)} losses")
    spikes: list[Spike] = []
    i = 0
    while i < len(losses):
        history = [x for x in losses[max(0, i - rule.window) : i] if math.isfinite(x)]
        if len(history) < rule.min_history:
            i += 1
            continue
        median, sigma = _robust_stats(history)
        loss = losses[i]
        finite = math.isfinite(loss)
        ratio = loss / median if finite and median > 0 else math.inf
        z = (loss - median) / sigma if finite and sigma > 0 else math.inf
        if finite and ratio < rule.factor and z < rule.zscore:
            i += 1
            continue
        back = _recovery(losses, i, (1.0 + rule.tolerance) * median, rule.recover_points)
        stretch = losses[i : back if back is not None else len(losses)]
        peak = max((x if math.isfinite(x) else math.inf) for x in stretch)
        spikes.append(
            Spike(
                step=int(steps[i]),
                loss=float(loss),
                baseline=median,
                ratio=ratio,
                z=z,
                peak=peak,
                last_good_step=int(steps[i - 1]),
                recovered_at=int(steps[back]) if back is not None else None,
            )
        )
        if back is None:
            break
        i = back + rule.recover_points
    return spikes


def first_unrecovered(spikes: Sequence[Spike]) -> Spike | None:
    """The first spike the run never recovered from, or None."""
    return next((s for s in spikes if not s.recovered), None)


def checkpoints_before(steps: Sequence[int | None], spike: Spike, k: int) -> list[int]:
    """Indices of the (up to) ``k`` newest checkpoints whose weights were used only before the spike, oldest first.

    A checkpoint saved at step c holds the weights after update c; the first forward pass that uses them is at
    step c + 1. The loss logged at step s averages the forward passes since the previous log, so checkpoint c is
    known to be healthy only when c < ``spike.last_good_step`` (its weights fed a normal logged loss).
    """
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    before = [i for i, s in enumerate(steps) if s is not None and s < spike.last_good_step]
    return before[-k:]
