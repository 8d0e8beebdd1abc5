"""Randomised methods depend on (seed, tensor name, model index) only: not on call order, copies or threads."""

from __future__ import annotations

import pytest
import torch
from methods_helpers import make_inputs

from mergescale.errors import ConfigError
from mergescale.methods import METHODS, get_method

SHAPE = (300, 200)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g)
    return base, [base + torch.randn(SHAPE, generator=g) for _ in range(3)]


def _dare(tensors, base, *, name="model.layers.3.self_attn.q_proj.weight", seed=1234, method="dare_linear"):
    mp = [{"weight": 1.0, "density": 0.5} for _ in tensors]
    return get_method(method)(make_inputs(tensors, base, mp, {"rescale": False}, name=name, seed=seed))


def _kept(out, base):
    return out != base  # entries whose task vector survived (τ has no exact zeros here)


def test_same_result_across_calls_and_call_order():
    base, ts = _case()
    a1 = _dare(ts, base, name="a")
    b1 = _dare(ts, base, name="b")
    b2 = _dare(ts, base, name="b")
    a2 = _dare(ts, base, name="a")
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_masks_differ_across_names_seeds_and_model_indices():
    base, (t,) = _case()[0], _case()[1][:1]
    one = _dare([t], base, name="a")
    assert not torch.equal(_kept(one, base), _kept(_dare([t], base, name="b"), base))
    assert not torch.equal(_kept(one, base), _kept(_dare([t], base, name="a", seed=99), base))
    # the same model at index 0 and 1 gets independent masks: some entries are kept by exactly one of them
    both = _dare([t, t], base, name="a")  # base + m₀τ + m₁τ, no normalize, no rescale
    once = torch.isclose(both, base + (t - base))
    assert 0.4 < once.float().mean() < 0.6


def test_same_result_on_a_copy_of_the_tensors():
    base, ts = _case()
    out = _dare(ts, base, method="dare_ties")
    copies = [t.clone().contiguous() for t in ts]
    assert torch.equal(out, _dare(copies, base.clone(), method="dare_ties"))


def test_same_result_with_one_or_two_threads():
    base, ts = _case()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _dare(ts, base, method="dare_ties")
        torch.set_num_threads(1)
        one = _dare(ts, base, method="dare_ties")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)  # masks equal; sums may round differently
    assert torch.equal(_kept(one, base), _kept(two, base))


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown merge method 'tiez'; available: arcee_fusion, breadcrumbs, .*ties"):
        get_method("tiez")


def test_registered_methods():
    assert set(METHODS.names()) == {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "slerp", "model_stock",
        # the rest of mergekit 0.1.5's set
        "nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl",
        # ours: low-rank estimation and data-aware methods
        "lore", "fisher", "regmean",
    }
    randomized = {n for n in METHODS.names() if get_method(n).randomized}
    assert randomized == {"dare_ties", "dare_linear", "della", "della_linear"}
    linear = {n for n in METHODS.names() if get_method(n).linear_coefficients is not None}
    assert linear == {"linear", "task_arithmetic", "passthrough"}
    assert {n for n in METHODS.names() if get_method(n).statistics} == {"fisher", "regmean"}
    density = get_method("ties").param_spec("density")
    assert density.check(0.0) and density.check(1.5) and density.check(1.0) is None


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "breadcrumbs_ties"])
def test_chunking_does_not_change_results(method, monkeypatch):
    """CPU sweeps run in cache-sized chunks, accelerators in one: the same masks and thresholds either way."""
    from mergescale.methods import selection, sparsify, task_arithmetic

    g = torch.Generator().manual_seed(9)
    base = torch.randn(700, 500, generator=g)  # 350k entries: several sweep chunks at the CPU sizes
    ts = [base + torch.randn(700, 500, generator=g) for _ in range(3)]
    mp = [{"weight": w, "density": d, "gamma": 0.02} for w, d in ((1.0, 0.3), (0.5, 0.6), (0.8, 0.9))]
    params = {"normalize": True, "rescale": True}
    chunked = get_method(method)(make_inputs(ts, base, mp, params, seed=3))
    for module in (selection, sparsify):
        monkeypatch.setattr(module, "SWEEP_CHUNK", 1 << 30)
    monkeypatch.setattr(task_arithmetic, "_CHUNK_BYTES", 1 << 40)
    whole = get_method(method)(make_inputs(ts, base, mp, params, seed=3))
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)  # only float sums may round differently
    assert torch.equal(chunked == base, whole == base)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_cuda_gives_the_cpu_result(method):
    g = torch.Generator().manual_seed(10)
    base = torch.randn(300, 400, generator=g)
    spec = get_method(method)
    k = spec.max_models or 3
    ts = [base + torch.randn(300, 400, generator=g) for _ in range(k)]
    mp = [{p.name: p.default for p in spec.model_params} for _ in range(k)]
    for i, p in enumerate(mp):
        p.update({key: v for key, v in {"weight": 1.0 - 0.2 * i, "density": 0.4 + 0.2 * i}.items() if key in p})
    params = {"t": 0.3} if method in ("slerp", "nearswap") else {}
    cpu = spec(make_inputs(ts, base, mp, params, seed=4))
    inputs = make_inputs(ts, base, mp, params, seed=4)
    inputs.tensors, inputs.base = inputs.tensors.cuda(), inputs.base.cuda()
    gpu = spec(inputs)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
