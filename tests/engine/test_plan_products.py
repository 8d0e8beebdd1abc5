"""Plans whose outputs name their own inputs (slices, frankenmerges): one read per input tensor whatever the
outputs, and the same results as each merge alone. Also the study's contract: every method through
``plan_merges([(config, sink), ...])``."""

from __future__ import annotations

import pytest
import torch

from mergescale.api import merge_to_memory, plan_merges
from mergescale.config import load_config
from mergescale.engine.stream import run_plan
from mergescale.io.checkpoint import open_checkpoint
from mergescale.io.writer import MemorySink
from mergescale.methods import METHODS, get_method


def _frankenmerge(m):
    return load_config({
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(m["expert0"]), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(m["expert0"]), "layer_range": [1, 2]}]}],  # layer 1 twice
    })


def _linear(m):
    return load_config({"merge_method": "linear", "models": [
        {"model": str(m["expert0"]), "parameters": {"weight": 1.0}},
        {"model": str(m["expert1"]), "parameters": {"weight": 3.0}}]})


def _bytes(folder, names=None):
    info = open_checkpoint(folder).info()
    return sum(i.nbytes for n, i in info.items() if names is None or n in names)


def test_a_repeated_layer_is_read_once_and_written_under_each_index(llama_models):
    sink = MemorySink()
    plan = plan_merges([(_frankenmerge(llama_models), sink)])
    stats = run_plan(plan, progress=False)
    assert stats.bytes_read == _bytes(llama_models["expert0"])  # every input tensor once
    out = sink.state_dict
    src = open_checkpoint(llama_models["expert0"])
    for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(out[f"model.layers.2.{rest}"], src.read(f"model.layers.1.{rest}"))
        assert torch.equal(out[f"model.layers.1.{rest}"], src.read(f"model.layers.1.{rest}"))
    layer = {n.removeprefix("model.layers.1.") for n in src.info() if n.startswith("model.layers.1.")}
    assert {n.removeprefix("model.layers.2.") for n in out if n.startswith("model.layers.2.")} == layer


def test_outputs_with_other_tensor_lists_share_one_read_and_keep_their_bits(llama_models):
    alone = [merge_to_memory(cfg).state_dict for cfg in (_frankenmerge(llama_models), _linear(llama_models))]
    sinks = [MemorySink(), MemorySink()]
    plan = plan_merges([(_frankenmerge(llama_models), sinks[0]), (_linear(llama_models), sinks[1])])
    stats = run_plan(plan, progress=False)
    assert stats.bytes_read == _bytes(llama_models["expert0"]) + _bytes(llama_models["expert1"])
    for got, want in zip((s.state_dict for s in sinks), alone, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name  # the linear sums are bit-identical too


def _study_config(method: str, m) -> dict:
    """Every registered method (but the data-aware ones, tested with their statistics) with workable settings."""
    spec = get_method(method)
    k = spec.max_models or 3
    experts = [str(m[f"expert{i}"]) for i in range(k)]
    cfg: dict = {"merge_method": method, "models": [{"model": e} for e in experts], "dtype": "float32"}
    if spec.base != "unused" and not spec.merges_base:
        cfg["base_model"] = str(m["base"])
    for p in spec.model_params:
        if p.required:
            for i, e in enumerate(cfg["models"]):
                e.setdefault("parameters", {})[p.name] = 0.5 + 0.25 * i
    if method in ("slerp", "nearswap"):
        cfg["parameters"] = {"t": 0.3}
    return cfg


@pytest.mark.parametrize("method", sorted(n for n in METHODS.names() if not get_method(n).statistics))
def test_every_method_runs_through_plan_merges_with_the_others(llama_models, method):
    """The study runner's path: several configs in one plan give what each gives alone."""
    cfg = load_config(_study_config(method, llama_models))
    other = _linear(llama_models)
    sinks = [MemorySink(), MemorySink()]
    run_plan(plan_merges([(cfg, sinks[0]), (other, sinks[1])]), progress=False)
    alone = merge_to_memory(cfg).state_dict
    assert sinks[0].state_dict.keys() == alone.keys()
    for name, t in alone.items():
        torch.testing.assert_close(sinks[0].state_dict[name], t, atol=0, rtol=0, msg=name)
