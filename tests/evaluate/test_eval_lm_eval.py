"""Our scorer == lm-evaluation-harness, offline: tasks exported with export-lm-eval and run by the harness's HF
backend give the same per-example log-likelihoods (within float32 noise, F32_LL) and the same acc / acc_norm as `evaluate`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from eval_builders import F32_LL

from mergescale.evaluate import evaluate, load_suite
from mergescale.evaluate.export import export_lm_eval

lm_eval = pytest.importorskip("lm_eval")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may try the network
os.environ["HF_DATASETS_OFFLINE"] = "1"


def our_samples(results, task: str) -> list[dict]:
    return [s for s in results.samples if s["task"] == task]


@pytest.mark.slow
def test_harness_on_exported_tasks_matches_our_scorer(
    bpe_model: Path, suite_dir: Path, tmp_path: Path
) -> None:
    """BPE tokenizer that prepends BOS (the harness's context/continuation split matters), 0- and 2-shot."""
    from lm_eval.tasks import TaskManager

    suite = load_suite(suite_dir)
    mc = [t for t in suite.tasks if t.kind == "multiple_choice"]
    export_lm_eval(mc, tmp_path / "lm")
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={bpe_model},dtype=float32", tasks=[t.name for t in mc], batch_size=8,
        device="cpu", log_samples=True, task_manager=TaskManager(include_path=str(tmp_path / "lm"), include_defaults=False),
        bootstrap_iters=0, verbosity="ERROR",
    )  # fmt: skip
    ours = evaluate(str(bpe_model), mc, log_samples=True, progress=False, batch_size=5)
    for task in mc:
        samples = sorted(theirs["samples"][task.name], key=lambda s: s["doc_id"])
        mine = our_samples(ours, task.name)
        assert len(samples) == len(mine) == len(task.rows())
        for s, m in zip(samples, mine, strict=True):
            lls = [r[0][0] for r in s["resps"]]
            assert m["loglikelihoods"] == pytest.approx(lls, **F32_LL)
            assert (m["acc"], m["acc_norm"]) == (s["acc"], s["acc_norm"])
        for metric in ("acc", "acc_norm"):
            assert ours.score(task.name, metric) == theirs["results"][task.name][f"{metric},none"]


@pytest.mark.slow
def test_lm_eval_backend_on_a_model_in_memory(word_model: Path, suite_dir: Path) -> None:
    """`evaluate(..., backend="lm-eval")` runs our suite through the harness (exported on the fly) and returns
    the same results format; every task kind agrees with our scorer (word-level tokenizer: no BOS added, so the
    harness's rolling log-likelihood is our perplexity convention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(word_model).eval()
    tok = AutoTokenizer.from_pretrained(word_model)
    theirs = evaluate(model, suite_dir, tokenizer=tok, backend="lm-eval", log_samples=True, limit=10)
    ours = evaluate(model, suite_dir, tokenizer=tok, log_samples=True, progress=False, limit=10)
    assert theirs.backend == "lm-eval" and theirs.model.hash == ours.model.hash
    assert list(theirs.tasks) == list(ours.tasks)
    for name, mine in ours.tasks.items():
        other = theirs.tasks[name]
        assert other.n == mine.n == 10 and other.category == mine.category
        if mine.kind != "perplexity":
            assert other.primary_metric == mine.primary_metric
            assert {k: other.metrics[k] for k in mine.metrics} == pytest.approx(mine.metrics, abs=1e-12)
    for s, m in zip(our_samples(theirs, "mc_b"), our_samples(ours, "mc_b"), strict=True):
        assert s["loglikelihoods"] == pytest.approx(m["loglikelihoods"], **F32_LL) and s["pred"] == m["pred"]
    for s, m in zip(our_samples(theirs, "gen"), our_samples(ours, "gen"), strict=True):
        assert s["output"] == m["output"]
    for s, m in zip(our_samples(theirs, "ppl"), our_samples(ours, "ppl"), strict=True):
        assert s["nll"] == pytest.approx(m["nll"], **F32_LL)


@pytest.mark.slow
def test_unknown_harness_task_is_a_task_error(word_model: Path) -> None:
    from mergescale.errors import TaskError

    with pytest.raises(TaskError, match="lm-eval has no task 'no_such_task_xyz'"):
        evaluate(str(word_model), "no_such_task_xyz", backend="lm-eval")
