"""Results files: JSON round trip, samples.jsonl, scores and the model's identity."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mergescale import __version__
from mergescale.errors import InputModelError, TaskError
from mergescale.evaluate import EvalResults, evaluate
from mergescale.evaluate.loading import folder_hash, memory_hash


def test_results_round_trip_with_samples_and_category_means(
    suite_dir: Path, word_model: Path, tmp_path: Path
) -> None:
    results = evaluate(str(word_model), suite_dir, limit=6, log_samples=True, progress=False)
    assert results.mergescale_version == __version__ and results.backend == "mergescale"
    assert results.model.path == str(word_model.resolve()) and len(results.model.hash) == 16
    assert results.settings.limit == 6 and results.settings.dtype == "float32"
    assert {n: r.n for n, r in results.tasks.items()} == {"mc_a": 6, "gen": 6, "mc_b": 6, "ppl": 6}
    assert all(r.seconds > 0 for r in results.tasks.values())
    # category means of primary metrics: cat_x = mean(acc of mc_a, exact_match of gen)
    expected = (results.score("mc_a") + results.score("gen")) / 2
    assert results.categories["cat_x"].score == pytest.approx(expected)
    assert results.categories["cat_x"].tasks == ["mc_a", "gen"]
    assert results.score("mc_b") == results.tasks["mc_b"].metrics["acc_norm"]  # first of its metrics
    assert results.score("mc_b", "acc") == results.tasks["mc_b"].metrics["acc"]
    with pytest.raises(TaskError, match="no results for task 'zzz'; available: gen, mc_a, mc_b, ppl"):
        results.score("zzz")
    with pytest.raises(TaskError, match="task 'mc_a' has no metric 'f1'; available: acc, acc_norm"):
        results.score("mc_a", "f1")

    out = results.save(tmp_path / "run" / "results.json")
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[0]["task"] == "mc_a" and rows[0]["index"] == 0
    mc = rows[0]
    assert set(mc) >= {"task", "index", "loglikelihoods", "pred", "gold"}
    assert len(mc["loglikelihoods"]) == len(mc["loglikelihoods"]) and mc["pred"] == max(
        range(len(mc["loglikelihoods"])), key=lambda i: mc["loglikelihoods"][i]
    )
    gen = next(r for r in rows if r["task"] == "gen")
    assert set(gen) >= {"output", "references"}
    loaded = EvalResults.load(out)
    assert loaded.model_dump() == results.model_dump()
    assert len(loaded.samples) == 24
    assert not list((tmp_path / "run").glob(".*tmp"))  # atomic writes leave no temporary files


def test_nan_and_inf_survive_the_json_round_trip(tmp_path: Path) -> None:
    from mergescale.evaluate.results import ModelIdentity, TaskResult

    r = EvalResults(
        mergescale_version="x", model=ModelIdentity(source="memory", hash="0"),
        tasks={"t": TaskResult(category="c", kind="perplexity", primary_metric="loss",
                               metrics={"loss": math.nan, "ppl": math.inf}, n=1, seconds=0.1)},
    )  # fmt: skip
    loaded = EvalResults.load(r.save(tmp_path / "r.json"))
    assert math.isnan(loaded.score("t")) and loaded.score("t", "ppl") == math.inf
    (tmp_path / "bad.json").write_text('{"tasks": {}}')
    with pytest.raises(TaskError, match="not a mergescale results file: field 'mergescale_version'"):
        EvalResults.load(tmp_path / "bad.json")


def test_identity_hash_tracks_weights_not_location(word_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(word_model, copy)
    assert folder_hash(copy) == folder_hash(word_model)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(word_model)
    before = memory_hash(model)
    with torch.no_grad():
        model.lm_head.weight[-1, -1] += 1.0  # the last value of the last tensor
    assert memory_hash(model) != before
    model.save_pretrained(copy)
    assert folder_hash(copy) != folder_hash(word_model)


def test_model_errors_are_one_line(tmp_path: Path, word_model: Path, suite_dir: Path) -> None:
    with pytest.raises(InputModelError, match="not a Hugging Face model folder"):
        evaluate(str(tmp_path), suite_dir, progress=False)
    from eval_builders import tiny_llama

    with pytest.raises(
        InputModelError, match=r"model in memory \(LlamaForCausalLM, name_or_path=''\): pass tokenizer="
    ):
        evaluate(tiny_llama(200), suite_dir, progress=False)
    with pytest.raises(InputModelError, match="cannot evaluate a dict"):
        evaluate({}, suite_dir, progress=False)
