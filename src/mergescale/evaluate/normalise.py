"""The merging study's normalised scores (pure functions on score tables, no model code).

"What Matters for Model Merging at Scale?" (Yadav et al., 2024, arXiv 2410.03617), section "Metrics":

* held-in: a model's score on a task ÷ the score of that task's own expert (1.0 = as good as the specialist);
* held-out: a model's score on a task ÷ the base model's score on it (> 1.0 = better zero-shot generalisation);
* aggregation: task → mean within its category → mean over categories → mean and standard deviation over seeds
  (the per-seed values are kept).

The multitask baseline is normalised by the same functions. Beyond the paper: retention (merged ÷ expert) per
task with the count of tasks below 0.9, the worst category, and the difference to the multitask model.

Conventions: scores are higher-is-better (accuracy, F1, ...). A ratio whose reference is zero (or NaN), or whose
reference or score is missing, is *undefined*: ``None`` with a :class:`NormalisationWarning`, never infinity.
Means skip undefined values; a category (or a whole aggregate) with no defined value is itself undefined.
The standard deviation over seeds is the sample standard deviation (n − 1); undefined for fewer than 2 seeds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Score = float | None  # None = undefined


class NormalisationWarning(UserWarning):
    """A normalised score is undefined (zero or missing reference, missing score)."""


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def ratio(
    score: float | None, reference: float | None, *, task: str = "?", reference_name: str = "reference"
) -> Score:
    """``score / reference``, or None (with a warning) when either is missing or the reference is zero."""
    if not _defined(score):
        warnings.warn(
            f"task {task!r}: no score; its normalised score is undefined", NormalisationWarning, stacklevel=2
        )
        return None
    if not _defined(reference):
        warnings.warn(
            f"task {task!r}: no {reference_name} score; normalised score undefined",
            NormalisationWarning,
            stacklevel=2,
        )
        return None
    if reference == 0:
        warnings.warn(
            f"task {task!r}: the {reference_name} scores 0; normalised score undefined",
            NormalisationWarning,
            stacklevel=2,
        )
        return None
    return float(score) / float(reference)  # type: ignore[arg-type]


def normalise(
    scores: Mapping[str, float | None], references: Mapping[str, float | None], *, tasks: Iterable[str] | None = None,
    reference_name: str = "reference",
) -> dict[str, Score]:  # fmt: skip
    """Per task, ``scores[task] / references[task]`` (undefined where a side is missing or the reference is 0).

    ``tasks`` selects which tasks to normalise (default: every task in ``scores``).
    """
    names = list(scores) if tasks is None else list(tasks)
    return {t: ratio(scores.get(t), references.get(t), task=t, reference_name=reference_name) for t in names}


def normalise_held_in(
    scores: Mapping[str, float | None],
    expert_scores: Mapping[str, float | None],
    *,
    tasks: Iterable[str] | None = None,
) -> dict[str, Score]:
    """Held-in: each task's score ÷ the score of that task's own expert (``expert_scores[task]``)."""
    return normalise(scores, expert_scores, tasks=tasks, reference_name="expert")


def normalise_held_out(
    scores: Mapping[str, float | None],
    base_scores: Mapping[str, float | None],
    *,
    tasks: Iterable[str] | None = None,
) -> dict[str, Score]:
    """Held-out: each task's score ÷ the base model's score on it."""
    return normalise(scores, base_scores, tasks=tasks, reference_name="base")


def mean_defined(values: Iterable[float | None]) -> Score:
    """Mean of the defined values; None when there are none."""
    kept = [float(v) for v in values if _defined(v)]  # type: ignore[arg-type]
    return sum(kept) / len(kept) if kept else None


@dataclass(frozen=True)
class Aggregate:
    """Normalised scores of one model on one task set: per task, per category and overall."""

    tasks: dict[str, Score]
    categories: dict[str, Score]
    mean: Score  # mean over categories of the category means
    worst_category: str | None  # the category with the lowest defined mean


def aggregate(normalised: Mapping[str, float | None], categories: Mapping[str, str]) -> Aggregate:
    """Task → mean within category → mean over categories (the paper's order; each category counts once,
    whatever its number of tasks). ``categories`` maps each task to its category."""
    by_cat: dict[str, list[float | None]] = {}
    for task, value in normalised.items():
        if task not in categories:
            raise KeyError(f"task {task!r} has no category; known tasks: {', '.join(sorted(categories))}")
        by_cat.setdefault(categories[task], []).append(value)
    cat_means = {cat: mean_defined(values) for cat, values in sorted(by_cat.items())}
    defined = {c: v for c, v in cat_means.items() if v is not None}
    worst = min(defined, key=lambda c: (defined[c], c)) if defined else None
    return Aggregate(
        tasks=dict(normalised),
        categories=cat_means,
        mean=mean_defined(cat_means.values()),
        worst_category=worst,
    )


@dataclass(frozen=True)
class SeedSummary:
    """Mean and sample standard deviation over seeds, with the per-seed values kept."""

    mean: Score
    std: Score
    values: tuple[Score, ...]
    n: int  # seeds with a defined value


def over_seeds(values: Sequence[float | None]) -> SeedSummary:
    """Mean and sample standard deviation (n − 1) of per-seed values; undefined seeds are left out."""
    kept = [float(v) for v in values if _defined(v)]  # type: ignore[arg-type]
    if len(kept) < len(values):
        warnings.warn(
            f"{len(values) - len(kept)} of {len(values)} seeds have no defined value",
            NormalisationWarning,
            stacklevel=2,
        )
    mu = sum(kept) / len(kept) if kept else None
    std = None
    if mu is not None and len(kept) >= 2:
        std = math.sqrt(sum((v - mu) ** 2 for v in kept) / (len(kept) - 1))
    return SeedSummary(mean=mu, std=std, values=tuple(values), n=len(kept))


@dataclass(frozen=True)
class Retention:
    """Merged ÷ expert per task, and the tasks retaining less than ``threshold`` of their expert's score."""

    per_task: dict[str, Score]
    threshold: float
    below: list[str] = field(default_factory=list)

    @property
    def n_below(self) -> int:
        return len(self.below)


def retention(
    scores: Mapping[str, float | None], expert_scores: Mapping[str, float | None], *, tasks: Iterable[str] | None = None,
    threshold: float = 0.9,
) -> Retention:  # fmt: skip
    """Retention per task (the held-in ratio) and the tasks below ``threshold`` (0.9 by default)."""
    per_task = normalise_held_in(scores, expert_scores, tasks=tasks)
    # 1e-9 of slack: 0.72 / 0.80 is 0.8999999999999999 in floating point, and is not "below 0.9".
    below = sorted(t for t, v in per_task.items() if v is not None and v < threshold - 1e-9)
    return Retention(per_task=per_task, threshold=threshold, below=below)


@dataclass(frozen=True)
class NormalisedScores:
    """A model's held-in and held-out aggregates."""

    held_in: Aggregate
    held_out: Aggregate


def normalised_scores(
    scores: Mapping[str, float | None],
    *,
    expert_scores: Mapping[str, float | None],
    base_scores: Mapping[str, float | None],
    categories: Mapping[str, str],
    held_in: Iterable[str],
    held_out: Iterable[str],
) -> NormalisedScores:
    """Both aggregates of one model (a merge, or the multitask baseline) in one call.

    ``held_in``: the held-in tasks this model is judged on (for a merge, the tasks of the experts it contains);
    ``held_out``: the held-out tasks.
    """
    return NormalisedScores(
        held_in=aggregate(normalise_held_in(scores, expert_scores, tasks=held_in), categories),
        held_out=aggregate(normalise_held_out(scores, base_scores, tasks=held_out), categories),
    )


@dataclass(frozen=True)
class Versus:
    """A merge's normalised score against the multitask model's."""

    delta: Score  # merged − multitask
    beats: bool | None  # merged > multitask


def versus_multitask(merged: float | None, multitask: float | None) -> Versus:
    """Δ = merged − multitask and whether the merge beats the multitask model (undefined if either is)."""
    if not _defined(merged) or not _defined(multitask):
        return Versus(delta=None, beats=None)
    return Versus(delta=float(merged) - float(multitask), beats=float(merged) > float(multitask))  # type: ignore[arg-type]
