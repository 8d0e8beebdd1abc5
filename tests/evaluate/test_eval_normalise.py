"""The study's normalised scores on hand-made tables (expected values computed by hand in the comments)."""

from __future__ import annotations

import math

import pytest

from mergescale.evaluate.normalise import (
    NormalisationWarning,
    aggregate,
    normalise_held_in,
    normalise_held_out,
    normalised_scores,
    over_seeds,
    retention,
    versus_multitask,
)

CATEGORIES = {"qa1": "qa", "qa2": "qa", "sent1": "sentiment", "nli1": "nli", "nli2": "nli", "coref1": "coref"}
EXPERT = {"qa1": 0.80, "qa2": 0.50, "sent1": 0.90}
BASE = {"nli1": 0.40, "nli2": 0.50, "coref1": 0.60}
MERGED = {"qa1": 0.72, "qa2": 0.50, "sent1": 0.45, "nli1": 0.44, "nli2": 0.45, "coref1": 0.66}


def test_held_in_divides_by_each_tasks_expert_and_held_out_by_the_base() -> None:
    held_in = normalise_held_in(MERGED, EXPERT, tasks=["qa1", "qa2", "sent1"])
    assert held_in == pytest.approx({"qa1": 0.9, "qa2": 1.0, "sent1": 0.5})
    held_out = normalise_held_out(MERGED, BASE, tasks=["nli1", "nli2", "coref1"])
    assert held_out == pytest.approx({"nli1": 1.1, "nli2": 0.9, "coref1": 1.1})


def test_aggregation_is_task_then_category_then_overall() -> None:
    # qa: mean(0.9, 1.0) = 0.95; sentiment: 0.5; overall = mean(0.95, 0.5) = 0.725
    # (a plain mean over the three tasks would be 0.8: each category must count once)
    agg = aggregate({"qa1": 0.9, "qa2": 1.0, "sent1": 0.5}, CATEGORIES)
    assert agg.categories == pytest.approx({"qa": 0.95, "sentiment": 0.5})
    assert agg.mean == pytest.approx(0.725)
    assert agg.worst_category == "sentiment"
    with pytest.raises(KeyError, match="task 'other' has no category"):
        aggregate({"other": 1.0}, CATEGORIES)


def test_normalised_scores_of_a_merge_and_of_the_multitask_model() -> None:
    merged = normalised_scores(
        MERGED, expert_scores=EXPERT, base_scores=BASE, categories=CATEGORIES,
        held_in=["qa1", "qa2", "sent1"], held_out=["nli1", "nli2", "coref1"],
    )  # fmt: skip
    assert merged.held_in.mean == pytest.approx(0.725)
    # nli: mean(1.1, 0.9) = 1.0; coref: 1.1 -> 1.05
    assert merged.held_out.mean == pytest.approx(1.05)
    multitask = normalised_scores(
        {"qa1": 0.88, "qa2": 0.55, "sent1": 0.90, "nli1": 0.48, "nli2": 0.50, "coref1": 0.60},
        expert_scores=EXPERT, base_scores=BASE, categories=CATEGORIES,
        held_in=["qa1", "qa2", "sent1"], held_out=["nli1", "nli2", "coref1"],
    )  # fmt: skip
    # multitask held-in: qa mean(1.1, 1.1) = 1.1 (above 1 is possible), sentiment 1.0 -> 1.05
    assert multitask.held_in.mean == pytest.approx(1.05)
    assert multitask.held_out.mean == pytest.approx((1.1 + 1.0) / 2)
    vs = versus_multitask(merged.held_out.mean, multitask.held_out.mean)
    assert vs.delta == pytest.approx(0.0) and vs.beats is False
    vs = versus_multitask(merged.held_in.mean, multitask.held_in.mean)
    assert vs.delta == pytest.approx(-0.325) and vs.beats is False
    assert versus_multitask(1.2, 1.1).beats is True
    assert versus_multitask(None, 1.1).delta is None


def test_zero_reference_is_undefined_with_a_warning_never_infinite() -> None:
    with pytest.warns(NormalisationWarning, match="task 'qa2': the expert scores 0"):
        held_in = normalise_held_in(MERGED, {**EXPERT, "qa2": 0.0}, tasks=["qa1", "qa2", "sent1"])
    assert held_in["qa2"] is None
    agg = aggregate(held_in, CATEGORIES)
    assert agg.categories["qa"] == pytest.approx(0.9)  # the undefined task is left out of its category
    assert agg.mean == pytest.approx((0.9 + 0.5) / 2)
    assert all(v is None or math.isfinite(v) for v in [*held_in.values(), *agg.categories.values()])


def test_missing_tasks_and_missing_references() -> None:
    scores = {k: v for k, v in MERGED.items() if k != "sent1"}
    with pytest.warns(NormalisationWarning, match="task 'sent1': no score"):
        held_in = normalise_held_in(scores, EXPERT, tasks=["qa1", "qa2", "sent1"])
    agg = aggregate(held_in, CATEGORIES)
    assert agg.categories == {"qa": pytest.approx(0.95), "sentiment": None}
    assert agg.mean == pytest.approx(0.95) and agg.worst_category == "qa"
    with pytest.warns(NormalisationWarning, match="task 'coref1': no base score"):
        held_out = normalise_held_out(MERGED, {"nli1": 0.4, "nli2": 0.5}, tasks=["nli1", "coref1"])
    assert held_out == {"nli1": pytest.approx(1.1), "coref1": None}
    # nothing defined at all: the aggregate is undefined, not zero
    with pytest.warns(NormalisationWarning):
        empty = aggregate(normalise_held_in({}, EXPERT, tasks=["qa1"]), CATEGORIES)
    assert empty.mean is None and empty.worst_category is None


def test_mean_and_sample_std_over_seeds_keep_per_seed_values() -> None:
    summary = over_seeds([0.7, 0.8, 0.9])
    assert summary.mean == pytest.approx(0.8)
    assert summary.std == pytest.approx(0.1)  # sqrt(((-.1)^2 + 0 + .1^2) / (3 - 1))
    assert summary.values == (0.7, 0.8, 0.9) and summary.n == 3
    with pytest.warns(NormalisationWarning, match="1 of 3 seeds"):
        partial = over_seeds([0.7, None, 0.9])
    assert partial.mean == pytest.approx(0.8) and partial.n == 2 and partial.values == (0.7, None, 0.9)
    single = over_seeds([0.5])
    assert single.mean == 0.5 and single.std is None


def test_retention_counts_tasks_below_threshold() -> None:
    r = retention(MERGED, EXPERT, tasks=["qa1", "qa2", "sent1"])
    assert r.per_task == pytest.approx({"qa1": 0.9, "qa2": 1.0, "sent1": 0.5})
    assert r.below == ["sent1"] and r.n_below == 1  # 0.9 itself is not below 0.9
    assert retention(MERGED, EXPERT, tasks=["qa1", "qa2", "sent1"], threshold=0.95).n_below == 2
