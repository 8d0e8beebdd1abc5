"""Evaluating curves: held-out loss and task scores of averages in memory, the checkpoint at each end step and
the annealed model, and the share of the anneal's gain recovered."""

from __future__ import annotations

import json
import math

import pytest
from pma_helpers import word_tokenizer

from mergescale.pma.ablation import ablation_settings
from mergescale.pma.average import PMASettings, average_checkpoints
from mergescale.pma.curves import ModelScorer, ablation_points, curve_points, recovered_share
from mergescale.pma.heldout import folder_loss

TEXTS = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10 w11", "w3 w3 w3 w2 w1 w0 w5"]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "val.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    """A 4-row multiple-choice task in the evaluation format."""
    root = tmp_path_factory.mktemp("task")
    rows = [{"context": f"w{i} w{i + 1}", "choices": ["w5", "w6", "w7"], "gold": i % 3} for i in range(4)]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "task.yaml").write_text("name: toy\nkind: multiple_choice\ndata:\n  test: test.jsonl\nmetrics: [acc]\n")
    return root / "task.yaml"


def test_recovered_share_is_undefined_not_infinite():
    assert recovered_share(2.5, 3.0, 2.0) == 0.5
    assert recovered_share(3.5, 3.0, 2.0) == -0.5  # worse than the last checkpoint
    assert recovered_share(0.6, 0.5, 0.7) == pytest.approx(0.5)  # scores: higher is better, same formula
    assert recovered_share(2.5, 3.0, 3.0) is None
    assert recovered_share(None, 3.0, 2.0) is None and recovered_share(2.0, math.inf, 1.0) is None


def test_loss_of_a_state_dict_is_the_folder_loss(hf_run, heldout, tmp_path):
    scorer = ModelScorer(hf_run / "checkpoint-600", word_tokenizer(), heldout=heldout, batch_size=2)
    res = average_checkpoints(hf_run, tmp_path / "avg", window=3, progress=False)
    mine = scorer.score_folder(res.out_dir)
    want = folder_loss(res.out_dir, TEXTS, tokenizer_folder=hf_run / "checkpoint-600", batch_size=2)
    assert mine.loss == pytest.approx(want, rel=1e-6) and mine.scores == {}


def test_curve_points_with_tasks_and_annealed(hf_run, heldout, mc_task, tmp_path):
    scorer = ModelScorer(hf_run / "checkpoint-600", hf_run / "checkpoint-600", heldout=heldout, tasks=mc_task)
    annealed = hf_run / "checkpoint-100"  # any model will do as the "annealed" reference here
    points = curve_points(hf_run, [PMASettings("sma", 3), PMASettings("ema", 2)], scorer, annealed=annealed,
                   max_outputs=3)  # fmt: skip
    assert [(p.strategy, p.end_step) for p in points] == [
        ("ema", 200), ("sma", 300), ("ema", 300), ("sma", 400), ("ema", 400), ("sma", 500), ("ema", 500),
        ("sma", 600), ("ema", 600),
    ]
    ann = scorer.score_folder(annealed)
    for p in points:
        assert set(p.scores) == {"toy"} and 0.0 <= p.scores["toy"] <= 1.0
        assert p.last_loss == scorer.score_folder(hf_run / f"checkpoint-{p.steps[-1]}").loss
        assert p.annealed_loss == ann.loss
        assert p.recovered_share == pytest.approx((p.loss - p.last_loss) / (ann.loss - p.last_loss))
        assert p.beats_last == (p.loss < p.last_loss)
    sma600 = points[-2]
    direct = average_checkpoints(hf_run, tmp_path / "d", window=3, progress=False)
    assert sma600.loss == pytest.approx(scorer.score_folder(direct.out_dir).loss, rel=1e-5)
    assert sma600.alpha is None and points[-1].alpha == 0.2 and sma600.n == 3 and sma600.steps == (400, 500, 600)


def test_ablation_points(hf_run, heldout):
    scorer = ModelScorer(hf_run / "checkpoint-600", word_tokenizer(), heldout=heldout)
    points = ablation_points(hf_run, ablation_settings([2, 4], [None, 200], ["sma", "wma"]), [400, 600], scorer)
    labels = [p.label for p in points]
    assert "sma-N4-V200-end400" not in labels and "sma-N4-V200-end600" not in labels  # do not fit
    assert len(points) == 6 + 6 and all(p.annealed_loss is None and p.recovered_share is None for p in points)


def test_heldout_limit_scores_the_first_documents(hf_run, heldout):
    folder = hf_run / "checkpoint-600"
    scorer = ModelScorer(folder, word_tokenizer(), heldout=heldout, heldout_limit=1)
    want = folder_loss(folder, TEXTS[:1], tokenizer_folder=folder)
    assert scorer.score_folder(folder).loss == pytest.approx(want, rel=1e-6)
