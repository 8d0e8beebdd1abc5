"""SCE and Arcee Fusion over row blocks (issue 17): the whole-tensor result bit for bit, whatever the blocks, the
lazy or materialized rows and the threads; their whole-tensor statistics (counts, exact order statistics, float
sums over the grid) the same for every blocking; degenerate inputs; the engine within a memory budget."""

from __future__ import annotations

import pytest
import torch

import mergescale.engine.memory as memory
import mergescale.methods.selection as selection
from mergescale.api import plan_merges
from mergescale.config import load_config
from mergescale.engine.stream import run_plan
from mergescale.errors import ConfigError
from mergescale.io.writer import MemorySink
from mergescale.methods import get_method
from mergescale.methods.arcee_fusion import importance, quartile_indices
from mergescale.methods.base import MethodInputs, TensorMeta
from mergescale.methods.blocked import run_in_memory
from mergescale.methods.selection import naive_top_k_mask


@pytest.fixture(autouse=True)
def _whole_stacks_unless_forced(monkeypatch):
    """These tests compare blocked runs with whole-stack runs: stacks are whole here unless a test forces blocks
    (by default every product that can block does, :data:`mergescale.engine.memory.WHOLE_BYTES`)."""
    monkeypatch.setattr(memory, "WHOLE_BYTES", 1 << 62)



def _inputs(k: int, shape: tuple[int, ...], seed: int, *, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-valued inputs (many equal variances and scores, as real ones have), or small integers (``ties``:
    most of them tie at every threshold)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        base = torch.randint(-3, 4, shape, generator=g).float()
        return base + torch.randint(-2, 3, (k, *shape), generator=g).float(), base
    base = torch.randn(shape, generator=g).to(torch.bfloat16).float()
    return (base + 0.3 * torch.randn((k, *shape), generator=g)).to(torch.bfloat16).float(), base


def _make(stack: torch.Tensor, base: torch.Tensor, params: dict | None = None) -> MethodInputs:
    return MethodInputs(name="model.layers.0.mlp.up_proj.weight", tensors=stack.clone(), base=base.clone(),
                        model_params=[{} for _ in range(stack.shape[0])], params=dict(params or {}))  # fmt: skip


BLOCKINGS = [(1, False, 1), (7, True, 2), (64, False, 2), (None, True, 1), (None, False, 2)]
"""(rows per block or None for one block, lazy rows, workers): materialized None is the function's own path."""


def _blocked_equal_whole(method: str, stack, base, params=None, blockings=BLOCKINGS) -> tuple[torch.Tensor, list]:
    """The function's result, after checking every blocking gives it bit for bit; and each blocking's merge."""
    m = get_method(method)
    whole = m(_make(stack, base, params))
    merges = []
    for rows, lazy, workers in blockings:
        inputs = _make(stack, base, params)
        merge = m.blocked(TensorMeta.of(inputs))
        got = run_in_memory(merge, inputs, rows_per_block=rows, lazy=lazy, workers=workers)
        assert torch.equal(got, whole), (method, params, tuple(base.shape), rows, lazy, workers)
        merges.append(merge)
    return whole, merges


# ---------------------------------------------------------------------------------------------------------------
# SCE
# ---------------------------------------------------------------------------------------------------------------
def _sce_reference(stack: torch.Tensor, base: torch.Tensor, fraction: float) -> torch.Tensor:
    """The formula written out (module docstring of :mod:`mergescale.methods.sce`), by torch's own reductions."""
    k = stack.shape[0]
    tau = (stack - base).reshape(k, -1)
    if fraction < 1.0:
        var = torch.var(tau, dim=0, unbiased=False)  # float32, as the selection ranks it
        keep = int(int(torch.count_nonzero(var)) * fraction)
        tau = tau * naive_top_k_mask(var, keep)
    tau = tau.double()
    energy = tau.square().mean(dim=1)
    w = energy / energy.sum() if float(energy.sum()) >= 1e-6 else torch.full((k,), 1.0 / k, dtype=torch.float64)
    majority = torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0)
    e = (tau.sign() == majority).double() * w.view(k, 1)
    merged = (tau * e).sum(dim=0) / e.sum(dim=0).clamp(min=1e-6)
    return (base.double().reshape(-1) + merged).view(base.shape).float()


SCE_SHAPES = [((40, 30), False), ((40, 30), True), ((513,), False), ((4, 5, 6), True)]


@pytest.mark.parametrize("params", [{}, {"select_topk": 0.3}, {"select_topk": 0.9}, {"select_topk": 0.0}])
@pytest.mark.parametrize("shape,ties", SCE_SHAPES, ids=[f"{s}{'-ties' if t else ''}" for s, t in SCE_SHAPES])
def test_sce_tiny_blocks_give_the_whole_tensor_result_bit_for_bit(shape, ties, params):
    stack, base = _inputs(3, shape, seed=shape[0], ties=ties)
    whole, _ = _blocked_equal_whole("sce", stack, base, params)
    want = _sce_reference(stack, base, float(params.get("select_topk", 1.0)))
    torch.testing.assert_close(whole, want, atol=1e-6, rtol=1e-5)


def test_sce_selection_and_energies_are_the_same_whatever_the_blocks():
    """300×250 = 75,000 entries: the selection's band from the sample, the energies over two grid chunks' worth of
    rows... The statistics themselves, not only the float32 result: the count, the exact threshold and the float
    sums of τᵢ² (per-block float sums would differ in their last bits)."""
    stack, base = _inputs(4, (300, 250), seed=2)
    stack[:, :100] = base[:100] + 10.0 * (stack[:, :100] - base[:100])  # rows of very different energy
    blockings = [(None, False, 1), (7, True, 2), (41, False, 1), (113, True, 1)]
    _, merges = _blocked_equal_whole("sce", stack, base, {"select_topk": 0.4}, blockings)
    first = merges[0]
    assert first.count == int(torch.count_nonzero(torch.var(stack - base, dim=0, unbiased=False)))
    for merge in merges[1:]:
        assert merge.count == first.count
        assert merge.threshold == first.threshold
        assert merge.energy.values == first.energy.values
        assert torch.equal(merge.weights, first.weights)
    # the selection keeps exactly ⌊0.4·count⌋ entries, those a stable sort of σ² ranks first
    keep = int(first.count * 0.4)
    assert first.threshold.n_greater + min(first.threshold.quota, first.threshold.n_equal) == keep


def test_sce_selection_recovers_exactly_when_its_band_misses(monkeypatch):
    """A sample from the first rows only, whose variances are 100× smaller: the band misses, the selection
    takes its histogram passes, and every blocking still gives the whole-tensor result (and the formula's)."""
    monkeypatch.setattr(selection, "_sample_indices", lambda n, device, size=selection._SAMPLE: torch.arange(size) % 3000)
    stack, base = _inputs(3, (300, 250), seed=3)
    scale = torch.ones(300, 1)
    scale[12:] = 100.0
    stack = (base + (stack - base) * scale).to(torch.bfloat16).float()
    whole, merges = _blocked_equal_whole("sce", stack, base, {"select_topk": 0.3}, [(None, False, 1), (9, True, 2)])
    torch.testing.assert_close(whole, _sce_reference(stack, base, 0.3), atol=1e-4, rtol=1e-5)


def _sce_degenerate() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(20, 9, generator=g)
    d = torch.randn(20, 9, generator=g)
    return [
        ("zero task vectors", torch.stack([base, base, base]), base),
        ("identical models", torch.stack([base + d, base + d]), base),
        ("opposite task vectors", torch.stack([base + d, base - d]), base),
        ("one model", (base + d).unsqueeze(0), base),
        ("tiny task vectors", torch.stack([base + 1e-5 * d, base - 2e-5 * d]), base),  # energies < 1e-6: uniform
        ("1-D", torch.stack([base[:, 0] + d[:, 0], base[:, 0] - 0.5 * d[:, 1]]), base[:, 0].clone()),
        ("0-dim", torch.tensor([1.0, -2.0, 0.5]), torch.tensor(0.25)),
    ]


@pytest.mark.parametrize("params", [{}, {"select_topk": 0.5}])
@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _sce_degenerate()])
def test_sce_degenerate_inputs_are_blocked_bit_for_bit(case, params):
    name, stack, base = _sce_degenerate()[case]
    whole, _ = _blocked_equal_whole("sce", stack, base, params)
    torch.testing.assert_close(whole, _sce_reference(stack, base, float(params.get("select_topk", 1.0))),
                               atol=1e-6, rtol=1e-5)  # fmt: skip
    if name in ("zero task vectors",) or (name in ("identical models", "one model") and params):
        assert torch.equal(whole, base)  # nothing varies across models: nothing selected, or nothing to add
    if name == "identical models" and not params:
        torch.testing.assert_close(whole, stack[0])


# ---------------------------------------------------------------------------------------------------------------
# Arcee Fusion
# ---------------------------------------------------------------------------------------------------------------
ARCEE_SHAPES = [((40, 30), False), ((40, 30), True), ((6, 5, 7), False), ((513,), False), ((1, 9), False),
                ((2, 2), True), ((3,), False), ((1,), False), ((), False)]  # fmt: skip


@pytest.mark.parametrize("shape,ties", ARCEE_SHAPES, ids=[f"{s}{'-ties' if t else ''}" for s, t in ARCEE_SHAPES])
def test_arcee_fusion_tiny_blocks_give_the_whole_tensor_result_bit_for_bit(shape, ties):
    stack, base = _inputs(1, shape, seed=len(shape) + 3, ties=ties)
    whole, _ = _blocked_equal_whole("arcee_fusion", stack, base)
    # the formula: the quartiles of s by a sort (indices in float32 as mergekit computes them)
    scores = importance(stack[0], base).reshape(-1)
    ordered = scores.sort().values
    q1, q2, q3 = (ordered[i] for i in quartile_indices(scores.numel()))
    keep = (scores >= q2 + 1.5 * (q3 - q1)).view(base.shape)
    assert torch.equal(whole, torch.where(keep, base + (stack[0] - base), base))


def test_arcee_fusion_wide_rows_in_one_row_blocks():
    """Rows of 40,000 entries: one-row blocks reduce a row's KL alone, which torch may split between threads
    (summing it in another order): the rows must still give the bits of the whole-tensor pass. The KL and the
    fence themselves are compared: a last-bit change of them rarely moves an entry across the fence."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 40_000, generator=g)
    stack = (base + 0.3 * torch.randn(4, 40_000, generator=g)).unsqueeze(0)
    blockings = [(None, False, 1), (1, False, 1), (1, True, 2), (2, False, 1)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run on one thread; a lone row's reduction is split on two
    try:
        _, merges = _blocked_equal_whole("arcee_fusion", stack, base, blockings=blockings)
    finally:
        torch.set_num_threads(before)
    for merge in merges[1:]:
        assert torch.equal(merge.kl, merges[0].kl) and torch.equal(merge.fence, merges[0].fence)


def test_arcee_fusion_quartiles_are_exact_order_statistics_whatever_the_blocks(monkeypatch):
    """300×250 entries: the band from the sample of s (taken from the rows' KL after the first pass); then a
    sample that misses (the first rows only, 100× smaller changes), recovered exactly by the histogram passes."""
    stack, base = _inputs(1, (300, 250), seed=4)
    whole, merges = _blocked_equal_whole("arcee_fusion", stack, base, blockings=[(None, False, 1), (11, True, 2)])
    scores = importance(stack[0], base).reshape(-1)
    ordered = scores.sort().values
    q1, q2, q3 = (ordered[i] for i in quartile_indices(scores.numel()))
    for merge in merges:
        assert torch.equal(merge.fence, q2 + 1.5 * (q3 - q1))
    monkeypatch.setattr(selection, "_sample_indices", lambda n, device, size=selection._SAMPLE: torch.arange(size) % 3000)
    scale = torch.ones(300, 1)
    scale[12:] = 100.0
    stack = (base + (stack - base) * scale).to(torch.bfloat16).float()
    _, merges = _blocked_equal_whole("arcee_fusion", stack, base, blockings=[(None, False, 1), (13, True, 1)])
    scores = importance(stack[0], base).reshape(-1)
    ordered = scores.sort().values
    q1, q2, q3 = (ordered[i] for i in quartile_indices(scores.numel()))
    assert all(torch.equal(m.fence, q2 + 1.5 * (q3 - q1)) for m in merges)


def test_arcee_fusion_degenerate_inputs():
    """The same model (δ = 0: s = 0 everywhere, the fence 0, every zero δ kept: the base), rows shifted by a
    constant (KL 0 in those rows), a zero base: blocked bit for bit, with the formula's result."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(30, 8, generator=g)
    same, _ = _blocked_equal_whole("arcee_fusion", base.unsqueeze(0), base)
    assert torch.equal(same, base)
    theta = base + 0.2 * torch.randn(30, 8, generator=g)
    theta[::2] = base[::2] + 0.7  # a constant shift: softmax unchanged, KL ≈ 0, those rows keep the base
    shifted, _ = _blocked_equal_whole("arcee_fusion", theta.unsqueeze(0), base)
    assert torch.equal(shifted[::2], base[::2])
    zero, _ = _blocked_equal_whole("arcee_fusion", theta.unsqueeze(0), torch.zeros(30, 8))
    assert 0 < int((zero != 0).sum()) < zero.numel()


def test_methods_do_not_block_what_they_cannot_merge():
    one = MethodInputs(name="w", tensors=torch.ones(2, 3), base=torch.zeros(3), model_params=[{}, {}], params={})
    assert get_method("arcee_fusion").blocked(TensorMeta.of(one)) is None  # two models
    with pytest.raises(ConfigError, match="arcee_fusion: tensor 'w'"):
        get_method("arcee_fusion")(one)
    no_base = MethodInputs(name="w", tensors=torch.ones(2, 3), base=None, model_params=[{}, {}], params={})
    assert get_method("sce").blocked(TensorMeta.of(no_base)) is None
    with pytest.raises(ConfigError, match="sce: tensor 'w'"):
        get_method("sce")(no_base)
    assert get_method("sce").blocked(TensorMeta.of(_make(torch.ones(0, 3), torch.zeros(3)))) is None  # no models


# ---------------------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------------------
def _config(method: str, models, base, **params):
    return load_config({"merge_method": method, "base_model": str(base), "models": [{"model": str(m)} for m in models],
                        "parameters": params, "dtype": "bfloat16"})  # fmt: skip


def _run(configs, **kwargs):
    sinks = [MemorySink() for _ in configs]
    stats = run_plan(plan_merges(list(zip(configs, sinks, strict=True))), progress=False, **kwargs)
    return [s.state_dict for s in sinks], stats


def _with_a_large_tensor(models: dict, root) -> dict:
    """Copies of the tiny models with one more tensor of 800×1,200 entries (over three grid chunks, and a sampled
    selection band), whose whole stacks outweigh what its blocks and their statistics need."""
    from safetensors.torch import load_file, save_file

    out = {}
    for i, (name, src) in enumerate(sorted(models.items())):
        dst = root / name
        dst.mkdir()
        for f in src.iterdir():
            if f.suffix == ".safetensors":
                tensors = load_file(f)
                g = torch.Generator().manual_seed(0)
                big = torch.randn((800, 1200), generator=g)
                if name != "base":
                    big += 0.05 * torch.randn((800, 1200), generator=torch.Generator().manual_seed(i))
                tensors["model.extra.weight"] = big
                save_file(tensors, dst / f.name, metadata={"format": "pt"})
            else:
                (dst / f.name).write_bytes(f.read_bytes())
        out[name] = dst
    return out


def test_the_engine_blocks_them_within_a_budget_with_the_whole_stack_results(llama_models, tmp_path, monkeypatch):
    """sce (with and without selection) and arcee_fusion through the engine on two threads: with a budget that
    only their blocked merges fit (planned from the headers as the engine plans it), and over blocks of one row
    (the smallest) for every tensor, the outputs equal the unbudgeted run's bit for bit."""
    models = _with_a_large_tensor({k: v for k, v in llama_models.items() if k in ("base", "expert0", "expert1",
                                                                                  "expert2")}, tmp_path)  # fmt: skip
    experts = [models[f"expert{i}"] for i in range(3)]
    base = models["base"]
    configs = [_config("sce", experts, base), _config("sce", experts, base, select_topk=0.4),
               _config("arcee_fusion", experts[:1], base)]  # fmt: skip
    for config in configs:  # one at a time: the planner blocks a job's largest stack first, others whole
        (want,), whole = _run([config], workers=2)
        assert whole.blocked == 0
        # a budget 2 MB over what its blocked merge needs (one-row blocks), below what its whole stack needs
        plan = plan_merges([(config, MemorySink())])
        whole_need = memory.plan_memory(plan, baseline=0).peak
        with monkeypatch.context() as m:
            m.setattr(memory, "WHOLE_BYTES", 0)
            m.setattr(memory, "BLOCK_BYTES", 1)
            blocked_need = memory.plan_memory(plan, baseline=0).peak
        assert whole_need - blocked_need > 4 << 20, config.merge_method
        (got,), stats = _run([config], workers=2, max_memory=memory.current_rss() + blocked_need + (2 << 20))
        assert stats.blocked == 1  # the large tensor
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    # blocks of one row (the smallest) for every tensor of the tiny models
    experts, base = [llama_models[f"expert{i}"] for i in range(3)], llama_models["base"]
    configs = [_config("sce", experts, base), _config("sce", experts, base, select_topk=0.4),
               _config("arcee_fusion", experts[:1], base)]  # fmt: skip
    want, _ = _run(configs, workers=2)
    floats = sum(1 for t in want[0].values() if t.dtype.is_floating_point)
    monkeypatch.setattr(memory, "WHOLE_BYTES", 0)
    monkeypatch.setattr(memory, "BLOCK_BYTES", 1)
    got, stats = _run(configs, workers=2)
    assert stats.blocked == len(configs) * floats
    for g, w, c in zip(got, want, configs, strict=True):
        for name in w:
            assert torch.equal(g[name], w[name]), (c.merge_method, name)
