"""A model with NaN / Inf weights never gets a score: an error naming the model and the task, or (asked for by a
study that must go on) an undefined score with a warning. Before: acc 0.375 with every log-likelihood NaN."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergescale.errors import NonFiniteError, NonFiniteScoreWarning
from mergescale.evaluate import EvalResults, Evaluator, evaluate, load_suite


def _broken(word_model: Path, folder: Path, value: float) -> Path:
    """A copy of ``word_model`` whose final norm holds ``value`` (NaN or Inf): every logit is then non-finite."""
    model = AutoModelForCausalLM.from_pretrained(word_model, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] = value
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(word_model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nan_model(word_model: Path, tmp_path_factory) -> Path:
    return _broken(word_model, tmp_path_factory.mktemp("broken") / "nan", math.nan)


def test_nan_weights_raise_naming_model_and_task(nan_model: Path, suite_dir: Path) -> None:
    suite = load_suite(suite_dir)
    for task in suite.tasks:  # every kind: multiple choice, generation, perplexity
        with pytest.raises(NonFiniteError) as raised:
            evaluate(str(nan_model), [task], limit=3, progress=False)
        message = str(raised.value)
        assert "\n" not in message and str(nan_model.resolve()) in message and f"task {task.name!r}" in message
        assert "NaN or infinite" in message and "no score" in message


def test_inf_weights_raise_too(word_model: Path, suite_dir: Path, tmp_path: Path) -> None:
    inf_model = _broken(word_model, tmp_path / "inf", math.inf)
    with pytest.raises(NonFiniteError, match="task 'mc_a'"):
        evaluate(str(inf_model), str(suite_dir / "mc_a" / "task.yaml"), limit=3, progress=False)


def test_cli_is_one_line_exit_1_and_writes_nothing(nan_model: Path, suite_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "mergescale", "eval", str(nan_model), "--tasks", str(suite_dir / "mc_a"), "-o", str(out),
         "--limit", "3", "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "task 'mc_a'" in lines[0], done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_undefined_marks_every_task_nan_warns_and_survives_saving(
    nan_model: Path, suite_dir: Path, tmp_path: Path
) -> None:
    with pytest.warns(NonFiniteScoreWarning) as warned:
        results = evaluate(str(nan_model), suite_dir, limit=3, progress=False, on_nonfinite="undefined")
    assert len(warned) == len(results.tasks) == 4
    for name, task in results.tasks.items():
        assert task.undefined is not None and "NaN or infinite" in task.undefined, name
        assert all(math.isnan(v) for v in task.metrics.values()), name
        assert math.isnan(results.score(name))
    assert all(math.isnan(c.score) for c in results.categories.values())
    path = results.save(tmp_path / "results.json")
    again = EvalResults.load(path)
    assert again.tasks["mc_a"].undefined == results.tasks["mc_a"].undefined
    assert math.isnan(again.score("mc_a"))
    assert json.loads(path.read_text().replace("NaN", "null"))["tasks"]["ppl"]["metrics"]["ppl"] is None


def test_evaluator_takes_the_same_choice_and_a_finite_model_is_unchanged(
    nan_model: Path, word_model: Path, suite_dir: Path
) -> None:
    task = load_suite(suite_dir).tasks[0]
    model = AutoModelForCausalLM.from_pretrained(nan_model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(nan_model)
    with pytest.raises(NonFiniteError):
        Evaluator(model, tok).run_task(task, limit=2)
    with pytest.warns(NonFiniteScoreWarning):
        result, _ = Evaluator(model, tok, on_nonfinite="undefined", name="broken").run_task(task, limit=2)
    assert result.undefined and math.isnan(result.metrics["acc"])
    good = AutoModelForCausalLM.from_pretrained(word_model, dtype=torch.float32)
    result, _ = Evaluator(good, tok, on_nonfinite="undefined").run_task(task, limit=2)
    assert result.undefined is None and math.isfinite(result.metrics["acc"])
    with pytest.raises(Exception, match="on_nonfinite must be"):
        Evaluator(good, tok, on_nonfinite="ignore")  # type: ignore[arg-type]


@pytest.mark.slow
def test_lm_eval_backend_raises_too(nan_model: Path, suite_dir: Path) -> None:
    pytest.importorskip("lm_eval")
    with pytest.raises(NonFiniteError, match="task 'mc_a'"):
        evaluate(str(nan_model), str(suite_dir / "mc_a" / "task.yaml"), limit=3, backend="lm-eval")
