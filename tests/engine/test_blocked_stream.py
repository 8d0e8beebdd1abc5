"""The engine's blocked path: stacked methods over row blocks of mapped inputs give the whole-stack result bit
for bit, within a memory budget that is planned from headers and checked before anything is read."""

from __future__ import annotations

import pytest
import torch

import mergescale.engine.memory as memory
from mergescale.api import plan_merges
from mergescale.config import load_config
from mergescale.engine.stream import run_plan
from mergescale.errors import NonFiniteError
from mergescale.io.writer import MemorySink


@pytest.fixture(autouse=True)
def _whole_stacks_unless_forced(monkeypatch):
    """These tests compare blocked runs with whole-stack runs: stacks are whole here unless a test forces blocks
    (by default every product that can block does, :data:`mergescale.engine.memory.WHOLE_BYTES`)."""
    monkeypatch.setattr(memory, "WHOLE_BYTES", 1 << 62)



def _config(method: str, models, base=None, model_params=None, **params):
    c = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": {"weight": 0.2 + 0.3 * i, **(model_params or {})}}
                   for i, m in enumerate(models)],  # fmt: skip
        "parameters": params,
        "dtype": "bfloat16",
    }
    if base is not None:
        c["base_model"] = str(base)
    return load_config(c)


def _run(configs, **kwargs):
    sinks = [MemorySink() for _ in configs]
    stats = run_plan(plan_merges(list(zip(configs, sinks, strict=True))), progress=False, **kwargs)
    return [s.state_dict for s in sinks], stats


def _force_blocks(monkeypatch, block_bytes: int) -> None:
    """Every stacked product its method can block runs over blocks of about ``block_bytes``."""
    monkeypatch.setattr(memory, "WHOLE_BYTES", 0)
    monkeypatch.setattr(memory, "BLOCK_BYTES", block_bytes)


SWEEP = [
    ("ties", {"density": 0.3}, {}),
    ("dare_ties", {"density": 0.5}, {}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1}, {"rescale": True}),
    ("della", {"density": 0.5, "epsilon": 0.2}, {}),
    ("ties", {}, {}),  # density 1: dense sign election
]


@pytest.mark.parametrize("block_bytes", [1, 5000])
def test_blocked_runs_give_the_whole_stack_results(llama_models, monkeypatch, block_bytes):
    """One-row blocks (1 byte: the smallest block) and a few rows per block, for every blocked preset in one
    plan (one read feeds them all, a linear output among them), on two worker threads."""
    experts = [llama_models[f"expert{i}"] for i in range(3)]
    base = llama_models["base"]
    configs = [_config(m, experts, base, mp, **p) for m, mp, p in SWEEP]
    configs.append(_config("linear", experts))
    want, whole = _run(configs, workers=2)
    assert whole.blocked == 0
    _force_blocks(monkeypatch, block_bytes)
    got, stats = _run(configs, workers=2)
    assert stats.blocked == len(SWEEP) * len(want[0]) - len(SWEEP) * sum(
        1 for t in want[0].values() if not t.dtype.is_floating_point
    )
    for g, w, (method, _, _) in zip(got, want, [*SWEEP, ("linear", {}, {})], strict=True):
        assert g.keys() == w.keys()
        for name in w:
            assert torch.equal(g[name], w[name]), (method, name)


def test_blocked_products_alone_read_inputs_as_unpopulated_maps(llama_models, monkeypatch):
    experts = [llama_models[f"expert{i}"] for i in range(2)]
    config = _config("ties", experts, llama_models["base"], {"density": 0.4})
    (want,), _ = _run([config])
    _force_blocks(monkeypatch, 3000)
    (got,), stats = _run([config], workers=1)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert stats.blocked > 0 and stats.peak_rss > 0 and stats.planned_peak > 0


def test_nonfinite_input_in_a_block_is_named(tmp_path, llama_models, monkeypatch):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    src = llama_models["expert1"]
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            t = tensors["model.embed_tokens.weight"]
            t[-1, -1] = float("nan")  # in the last block only
            save_file(tensors, bad / f.name, metadata={"format": "pt"})
        else:
            (bad / f.name).write_bytes(f.read_bytes())
    _force_blocks(monkeypatch, 2000)
    config = _config("ties", [llama_models["expert0"], bad], llama_models["base"], {"density": 0.5})
    with pytest.raises(NonFiniteError, match=r"bad.*model\.embed_tokens\.weight.*NaN"):
        _run([config])


def test_budget_sizes_blocks_and_refuses_what_cannot_hold_one(llama_models):
    experts = [llama_models[f"expert{i}"] for i in range(3)]
    config = _config("ties", experts, llama_models["base"], {"density": 0.3})
    (want,), _ = _run([config])
    sink = MemorySink()
    plan = plan_merges([(config, sink)])
    baseline = 10**9  # a fixed "process" size, so the test does not depend on this process's
    generous = memory.plan_memory(plan, max_memory=10**12, baseline=baseline)
    assert generous.blocked == 0
    need = generous.peak - baseline
    tight = memory.plan_memory(plan, max_memory=baseline + need - 1, baseline=baseline)
    assert tight.blocked > 0 and tight.peak <= baseline + need - 1
    with pytest.raises(memory.MemoryBudgetError, match=r"^--max-memory .* cannot hold one block of tensor"):
        memory.plan_memory(plan, max_memory=baseline + 1000, baseline=baseline)


@pytest.mark.parametrize("block_bytes", [1, 5000])
def test_geometric_methods_blocked_give_the_whole_stack_results(llama_models, monkeypatch, block_bytes):
    """model_stock (one angle per tensor, and per row) and SLERP: their statistics pass over blocks of mapped
    inputs gives the whole-stack result bit for bit, on two worker threads."""
    experts = [str(llama_models[f"expert{i}"]) for i in range(3)]
    base = str(llama_models["base"])

    def config(method: str, models: list[str], **params) -> object:
        return load_config({"merge_method": method, "base_model": base, "models": [{"model": m} for m in models],
                            "parameters": params, "dtype": "bfloat16"})  # fmt: skip

    configs = [config("model_stock", experts), config("model_stock", experts, filter_wise=True),
               config("slerp", experts[:1], t=0.3)]  # fmt: skip
    want, whole = _run(configs, workers=2)
    assert whole.blocked == 0
    _force_blocks(monkeypatch, block_bytes)
    got, stats = _run(configs, workers=2)
    floats = sum(1 for t in want[0].values() if t.dtype.is_floating_point)
    assert stats.blocked == len(configs) * floats
    for g, w, c in zip(got, want, configs, strict=True):
        assert g.keys() == w.keys()
        for name in w:
            assert torch.equal(g[name], w[name]), (c.merge_method, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,mp,params", SWEEP[:3])
def test_blocked_runs_on_cuda_match_the_whole_stack_on_cuda_and_the_cpu(llama_models, monkeypatch, method, mp, params):
    """``--device cuda`` blocks the same way (blocks converted to the device, one kernel per op): a tensor larger
    than the GPU's memory merges in blocks. Selections (thresholds, masks, elected signs) are exact on every
    device; only the sums' last bits may differ from the CPU's."""
    experts = [llama_models[f"expert{i}"] for i in range(3)]
    config = _config(method, experts, llama_models["base"], mp, **params)
    (cpu,), _ = _run([config])
    (whole,), stats_whole = _run([config], device="cuda")
    _force_blocks(monkeypatch, 5000)
    (blocked,), stats = _run([config], device="cuda")
    assert stats_whole.blocked == 0 and stats.blocked > 0
    for name in cpu:
        assert torch.allclose(blocked[name].float(), whole[name].float(), rtol=1e-2, atol=1e-6), name
        assert torch.allclose(blocked[name].float(), cpu[name].float(), rtol=1e-2, atol=1e-6), name
