"""Slices configs beyond the corpus: the output config of a frankenmerge, and bad layer ranges."""

from __future__ import annotations

import json

import pytest
import torch

from mergescale.api import merge
from mergescale.errors import InputModelError
from mergescale.io.checkpoint import open_checkpoint
from mergescale.slices import layer_structure


def _frankenmerge(model, ranges):
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(model), "layer_range": list(r)}]} for r in ranges]}


def test_a_frankenmerge_config_has_the_new_depth_and_per_layer_lists_that_load(model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    models = model_factory("qwen2", n_experts=1)
    original = (models["expert0"] / "config.json").read_text()  # a session fixture: put back as it was
    cfg = json.loads(original)
    cfg["layer_types"] = ["full_attention", "sliding_attention"]  # tell the two layers apart
    cfg["use_sliding_window"], cfg["sliding_window"] = True, 16
    (models["expert0"] / "config.json").write_text(json.dumps(cfg))
    try:
        merge(_frankenmerge(models["expert0"], [(0, 2), (1, 2), (0, 1)]), tmp_path / "out", progress=False)
    finally:
        (models["expert0"] / "config.json").write_text(original)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 4
    src = open_checkpoint(models["expert0"])
    got = open_checkpoint(tmp_path / "out")
    assert torch.equal(got.read("model.layers.2.mlp.up_proj.weight"), src.read("model.layers.1.mlp.up_proj.weight"))
    assert torch.equal(got.read("model.layers.3.mlp.up_proj.weight"), src.read("model.layers.0.mlp.up_proj.weight"))


def test_a_layer_range_past_the_model_is_one_clear_error(llama_models, tmp_path):
    with pytest.raises(InputModelError, match=r"slices\[1\]: layer_range \[1, 3\] of .*expert0 is past its 2 layers"):
        merge(_frankenmerge(llama_models["expert0"], [(0, 2), (1, 3)]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_layer_structure():
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.b.weight",
             "model.layers.1.a.weight", "model.norm.weight", "lm_head.weight"]
    s = layer_structure(names, "m")
    assert s.prefix == "model.layers." and s.layers == {0: ("a.weight", "b.weight"), 1: ("a.weight",)}
    assert s.pre == ("model.embed_tokens.weight",) and s.post == ("model.norm.weight", "lm_head.weight")
    with pytest.raises(InputModelError, match="has 2 stacks of layers"):
        layer_structure(["encoder.layers.0.w", "decoder.layers.0.w"], "t5")
