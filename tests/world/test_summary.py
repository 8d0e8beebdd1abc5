"""The world's quality checks on synthetic score tables built to pass and to fail each check."""

from __future__ import annotations

import copy

import pytest

from mergescale.world.summary import EXPERT_MARGIN, MULTITASK_RETENTION, quality_checks

HELD_IN = ["a", "b"]
HELD_OUT = ["x"]


def _scores() -> dict:
    """Two sizes; every check passes: experts beat their base by 0.3, the multitask keeps 0.9 of them, the IT
    base beats the PT base on held-out tasks, the anneal and the SMA lower the validation loss."""
    models = {}
    for size in ("s", "l"):
        for kind, held_out in (("pt", 0.4), ("it", 0.5)):
            base = {"a": 0.2, "b": 0.3, "x": held_out}
            models[f"{size}/{kind}/base"] = base
            for t in HELD_IN:
                models[f"{size}/{kind}/experts/{t}"] = base | {t: base[t] + 0.3}
            models[f"{size}/{kind}/multitask"] = base | {t: 0.9 * (base[t] + 0.3) for t in HELD_IN}
    entries = {
        mid: {"size": mid.split("/")[0], "base": mid.split("/")[1], "role": "x", "task": None,
              "scores": {t: {"acc": v} for t, v in s.items()}}
        for mid, s in models.items()
    }  # fmt: skip
    pretrain = {
        size: {"last_stable_loss": 1.0, "annealed_loss": 0.9, "sma": {"window": 3, "loss": 0.95}} for size in ("s", "l")
    }
    return {
        "held_in": HELD_IN,
        "held_out": HELD_OUT,
        "primary_metric": {t: "acc" for t in (*HELD_IN, *HELD_OUT)},
        "models": entries,
        "pretrain": pretrain,
    }


def _set(scores: dict, model: str, task: str, value: float) -> dict:
    out = copy.deepcopy(scores)
    out["models"][model]["scores"][task]["acc"] = value
    return out


def _check(scores: dict, name: str):
    return next(c for c in quality_checks(scores) if c.name == name)


def test_every_check_passes_on_a_good_world() -> None:
    checks = quality_checks(_scores())
    assert len(checks) == 2 * (2 * 2 + 3)
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]


@pytest.mark.parametrize(
    ("model", "task", "value", "check"),
    [
        # the largest size needs the margin; a smaller one only a gain
        ("l/pt/experts/a", "a", 0.2 + EXPERT_MARGIN - 0.01, "l/pt: expert - base on own task (min)"),
        ("s/it/experts/b", "b", 0.3, "s/it: expert - base on own task (min)"),
        ("s/pt/multitask", "a", 0.0, "s/pt: multitask / expert on held-in (mean)"),
        ("l/it/base", "x", 0.3, "l: IT base - PT base on held-out (mean)"),
    ],
)
def test_each_check_fails_where_it_should(model: str, task: str, value: float, check: str) -> None:
    assert _check(_scores(), check).passed
    assert not _check(_set(_scores(), model, task, value), check).passed


def test_margins_and_pretraining_checks() -> None:
    good = _scores()
    assert _check(_set(good, "s/pt/experts/a", "a", 0.21), "s/pt: expert - base on own task (min)").passed
    ratio = _check(good, "s/pt: multitask / expert on held-in (mean)").value
    assert ratio == pytest.approx(0.9) and ratio >= MULTITASK_RETENTION
    bad = copy.deepcopy(good)
    bad["pretrain"]["s"]["annealed_loss"] = 1.01
    bad["pretrain"]["l"]["sma"]["loss"] = 1.0
    assert not _check(bad, "s: annealed - last stable (val loss)").passed
    assert not _check(bad, "l: SMA of last 3 - last stable (val loss)").passed
    zero = _set(_set(good, "s/pt/experts/a", "a", 0.0), "s/pt/experts/b", "b", 0.0)
    assert not _check(zero, "s/pt: multitask / expert on held-in (mean)").passed  # no defined ratio
