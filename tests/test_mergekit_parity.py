"""The same YAML through mergekit (the tool users have today) and through mergescale gives the same weights."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergescale.api import merge
from mergescale.io.checkpoint import iter_tensors, open_checkpoint

mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

pytestmark = pytest.mark.slow

CASES = {
    "linear": ({"weight": [1.0, 2.0, 0.5]}, {}, False),
    "linear_unnormalized": ({"weight": [0.3, 0.3, 0.3]}, {"normalize": False}, False),
    "task_arithmetic": ({"weight": [0.6, 1.0, 0.3]}, {"lambda": 0.8}, True),
    "ties": ({"weight": [1.0, 0.5, 0.8], "density": [0.3, 0.5, 0.2]}, {}, True),
    "ties_unnormalized": ({"weight": [1.0, 0.5, 0.8], "density": [0.3, 0.5, 0.2]}, {"normalize": False, "lambda": 1.3}, True),
    "breadcrumbs": ({"weight": [1.0, 1.0, 1.0], "density": [0.8, 0.7, 0.9], "gamma": [0.05, 0.1, 0.02]}, {}, True),
    "breadcrumbs_ties": ({"weight": [1.0, 1.0, 1.0], "density": [0.8, 0.7, 0.9], "gamma": [0.05, 0.1, 0.02]}, {}, True),
    "dare_ties": ({"weight": [1.0, 0.5, 0.8], "density": [1.0, 1.0, 1.0]}, {}, True),  # density 1: no random drop
    "model_stock": ({}, {}, True),
    "slerp": ({}, {"t": 0.3}, True),
}


def _config(case: str, models: dict) -> dict:
    model_params, params, with_base = CASES[case]
    method = case.removesuffix("_unnormalized")
    experts = [models["expert0"]] if method == "slerp" else [models["expert0"], models["expert1"], models["expert2"]]
    entries = []
    for i, e in enumerate(experts):
        p = {k: v[i] for k, v in model_params.items()}
        entries.append({"model": str(e), **({"parameters": p} if p else {})})
    if method == "slerp":
        entries.insert(0, {"model": str(models["base"])})  # mergekit's slerp lists the base among the models
    cfg = {"merge_method": method, "models": entries, "dtype": "float32"}
    if with_base:
        cfg["base_model"] = str(models["base"])
    if params:
        cfg["parameters"] = params
    return cfg


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_weights_as_mergekit(llama_models, tmp_path, case):
    cfg = _config(case, llama_models)
    mergekit_merge.run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(cfg))),
        str(tmp_path / "mergekit"),
        options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False),
    )
    merge(cfg, tmp_path / "ours", progress=False)
    theirs = dict(iter_tensors(open_checkpoint(tmp_path / "mergekit")))
    ours = dict(iter_tensors(open_checkpoint(tmp_path / "ours")))
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")


def test_linear_with_unlisted_base_merges_it_with_top_level_weight(llama_models, tmp_path):
    """mergekit appends base_model to a linear merge even when it is not under models."""
    cfg = {
        "merge_method": "linear",
        "base_model": str(llama_models["base"]),
        "models": [{"model": str(llama_models["expert0"]), "parameters": {"weight": 2.0}},
                   {"model": str(llama_models["expert1"]), "parameters": {"weight": 1.0}}],
        "parameters": {"weight": 0.5},
        "dtype": "float32",
    }
    mergekit_merge.run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mergekit"),
                             options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    merge(cfg, tmp_path / "ours", progress=False)
    theirs = dict(iter_tensors(open_checkpoint(tmp_path / "mergekit")))
    for name, t in iter_tensors(open_checkpoint(tmp_path / "ours")):
        torch.testing.assert_close(t, theirs[name], rtol=1e-5, atol=1e-6)
