"""Mixture-of-Experts checkpoints average (`mergescale pma`) and merge (`mergescale merge`, linear and TIES) to
the formula, and the outputs load in transformers.

transformers 5.24 keeps a layer's experts stacked in memory (``mlp.experts.gate_up_proj``: (E, 2I, H),
``mlp.experts.down_proj``: (E, H, I)) but ``save_pretrained`` writes them one tensor per expert (Mixtral:
``block_sparse_moe.experts.<e>.w1/w2/w3``; Qwen2-MoE / Qwen3-MoE: ``mlp.experts.<e>.gate_proj/up_proj/
down_proj``), and it loads both layouts. The merge methods are element-wise per tensor, so either layout merges
the same way; both are tested.
"""

from __future__ import annotations

import json

import pytest
import torch
from pma_helpers import load_weights, word_tokenizer
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergescale.api import merge
from mergescale.cli import app

STEPS = (100, 200, 300, 400)


def moe_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=24)  # fmt: skip
    return tf.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                             num_experts_per_tok=2, head_dim=8)  # fmt: skip


def save(model, folder, stacked: bool):
    """The Hugging Face layout (one tensor per expert), or the in-memory stacked layout as safetensors."""
    if stacked:
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
        model.config.save_pretrained(folder)
    else:
        model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module", params=[("mixtral", False), ("qwen2_moe", False), ("qwen3_moe", False),
                                        ("qwen3_moe", True)], ids=lambda p: p[0] + ("-stacked" if p[1] else ""))  # fmt: skip
def moe_run(request, tmp_path_factory):
    """A run of 4 checkpoints of a tiny MoE model, each the previous plus noise."""
    from transformers import AutoModelForCausalLM

    arch, stacked = request.param
    root = tmp_path_factory.mktemp(f"moe-{arch}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(arch))
    g = torch.Generator().manual_seed(1)
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        save(model, root / f"checkpoint-{step}", stacked)
    names = load_weights(root / "checkpoint-100")
    expert_keys = [k for k in names if "experts" in k]
    assert expert_keys
    assert all(names[k].dim() == 3 for k in expert_keys) == stacked  # the layout this case is about
    return root


def weighted(folders, weights):
    out: dict[str, torch.Tensor] = {}
    for f, w in zip(folders, weights, strict=True):
        for k, t in load_weights(f).items():
            out[k] = out.get(k, 0) + w * t.double()
    return out


def loads_and_runs(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape[-1] == 128 and bool(torch.isfinite(logits).all())
    return model


def test_pma_averages_moe_checkpoints(moe_run, tmp_path):
    out = tmp_path / "ema"
    res = CliRunner().invoke(app, ["pma", str(moe_run), "-o", str(out), "--strategy", "ema", "--window", "3", "-q"])
    assert res.exit_code == 0, res.output
    want = weighted([moe_run / f"checkpoint-{s}" for s in (200, 300, 400)], [0.64, 0.16, 0.2])
    got = load_weights(out)
    assert got.keys() == want.keys()
    for k, t in got.items():
        torch.testing.assert_close(t.double(), want[k], atol=1e-6, rtol=0)
    model = loads_and_runs(out)
    # the loaded model's stacked experts are the averaged ones, whichever layout the files had
    sd = model.state_dict()
    stacked = [k for k in sd if k.endswith("experts.down_proj")]
    assert stacked and sd[stacked[0]].dim() == 3
    assert json.loads((out / "pma.json").read_text())["window"] == 3


def test_along_run_on_moe_checkpoints(moe_run):
    from mergescale.pma.along_run import iter_along_run, plan_along_run
    from mergescale.pma.average import PMASettings

    [batch] = list(iter_along_run(plan_along_run(moe_run, [PMASettings("wma", 2)]), progress=False))
    assert [p.steps for p in batch] == [[100, 200], [200, 300], [300, 400]]
    want = weighted([moe_run / "checkpoint-300", moe_run / "checkpoint-400"], [1 / 3, 2 / 3])
    for k, t in batch[-1].state_dict.items():
        torch.testing.assert_close(t.double(), want[k], atol=1e-6, rtol=0)
    # scored in memory: the stored (per-expert) names are converted to the model's stacked ones
    from mergescale.pma.curves import ModelScorer

    scorer = ModelScorer(moe_run / "checkpoint-400", word_tokenizer())
    model = scorer.load(batch[-1].state_dict)
    stacked = {k: v for k, v in model.state_dict().items() if k.endswith("experts.down_proj")}
    assert stacked and all(v.dim() == 3 for v in stacked.values())
    folder = loads_and_runs(moe_run / "checkpoint-400").state_dict()
    scorer.load(load_weights(moe_run / "checkpoint-400"))
    assert all(torch.equal(v, folder[k]) for k, v in scorer.model.state_dict().items())


def ties_reference(base, experts, density):
    """TIES on one tensor (Yadav et al. 2023): trim each task vector to its top-k magnitudes, elect the sign of
    the sum, average the entries that agree with it (mergekit's normalisation by the agreeing weights)."""
    taus = []
    for x in experts:
        tau = (x - base).double().flatten()
        k = max(1, int(density * tau.numel()))
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[tau.abs().topk(k).indices] = True
        taus.append(torch.where(keep, tau, torch.zeros_like(tau)))
    t = torch.stack(taus)  # (m, n)
    sign = torch.sign(t.sum(0))
    agree = torch.sign(t) == sign
    mixed = (t * agree).sum(0)
    count = agree.double().sum(0)
    count[count.abs() < 1e-8] = 1.0
    return base.double() + (mixed / count).view(base.shape)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_moe_models(moe_run, tmp_path, method):
    base, *experts = [moe_run / f"checkpoint-{s}" for s in STEPS]
    if method == "linear":
        config = {"merge_method": "linear", "models": [{"model": str(e), "parameters": {"weight": w}}
                                                        for e, w in zip(experts, [1.0, 2.0, 1.0], strict=True)]}  # fmt: skip
    else:
        config = {"merge_method": "ties", "base_model": str(base),
                  "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts]}  # fmt: skip
    out = tmp_path / method
    merge(config, out, progress=False)
    got = load_weights(out)
    b = load_weights(base)
    xs = [load_weights(e) for e in experts]
    assert got.keys() == b.keys()
    for k, t in got.items():
        if method == "linear":
            want = (xs[0][k].double() + 2 * xs[1][k].double() + xs[2][k].double()) / 4
        else:
            want = ties_reference(b[k], [x[k] for x in xs], 0.5)
        torch.testing.assert_close(t.double(), want, atol=1e-6, rtol=0, msg=k)
    loads_and_runs(out)
