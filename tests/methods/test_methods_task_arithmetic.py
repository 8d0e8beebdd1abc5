"""The task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) against its formulas."""

from __future__ import annotations

import pytest
import torch
from methods_helpers import make_inputs, run

from mergescale.errors import ConfigError
from mergescale.methods import get_method
from mergescale.methods.random_masks import bernoulli_mask

ZERO = torch.zeros(5)


def mp(weights, densities=None, **extra):
    densities = densities or [1.0] * len(weights)
    return [{"weight": w, "density": d, **extra} for w, d in zip(weights, densities, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# task arithmetic


def test_task_arithmetic_formula():
    base = torch.tensor([1.0, 1.0, 1.0])
    t1, t2 = base + torch.tensor([1.0, 2.0, 3.0]), base + torch.tensor([3.0, -2.0, 1.0])
    out = run("task_arithmetic", [t1, t2], base, mp([1.0, 0.5]), {"lambda": 0.5})
    torch.testing.assert_close(out, base + 0.5 * torch.tensor([2.5, 1.0, 3.5]))  # λ·(1·τ1 + 0.5·τ2), no normalize
    out = run("task_arithmetic", [t1, t2], base, mp([1.0, 0.5]), {"lambda": 0.5, "normalize": True})
    torch.testing.assert_close(out, base + 0.5 * torch.tensor([2.5, 1.0, 3.5]) / 1.5)


def test_task_arithmetic_ignores_density_and_zero_sum_needs_no_normalize():
    base = torch.zeros(3)
    t1, t2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, -2.0, 1.0])
    out = run("task_arithmetic", [t1, t2], base, mp([1.0, -1.0], [0.1, 0.1]))
    torch.testing.assert_close(out, t1 - t2)
    with pytest.raises(ConfigError, match=r"task_arithmetic: tensor 'model.layers.0.mlp.up_proj.weight'.*sum to 0"):
        run("task_arithmetic", [t1, t2], base, mp([1.0, -1.0]), {"normalize": True})


@pytest.mark.parametrize("params", [{}, {"normalize": True, "lambda": 0.3}])
def test_task_arithmetic_coefficients_reproduce_fn(params):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    ts = [base + torch.randn(6, 4, generator=g) for _ in range(3)]
    inputs = make_inputs(ts, base, mp([0.2, 1.0, 0.7]), params, base_params={"weight": 9.0})
    method = get_method("task_arithmetic")
    coefs, c_base = method.linear_coefficients(inputs.model_params, inputs.params, inputs.base_params)
    torch.testing.assert_close(method(inputs), sum(c * t for c, t in zip(coefs, ts, strict=True)) + c_base * base)


def test_methods_return_float32_of_the_input_shape_and_no_models_gives_the_base():
    base = torch.randn(3, 2, 4)
    out = run("ties", [base + 1, base - 2], base, mp([1.0, 1.0], [0.5, 0.5]))
    assert out.shape == (3, 2, 4) and out.dtype == torch.float32
    empty = make_inputs(torch.empty(0, 3, 2, 4), base, [])
    torch.testing.assert_close(get_method("ties")(empty), base)


# ---------------------------------------------------------------------------------------------------------------
# TIES: trim, elect, disjoint mean


def test_sign_election_and_disjoint_mean():
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    t2 = torch.tensor([-3.0, -1.0, 2.0, 0.0])
    t3 = torch.tensor([1.0, 4.0, -1.0, 0.0])
    base = torch.zeros(4)
    # Σ = [-1, 1, 4, 0] → elected [-, +, +, + (0 elects +)]; agreeing entries: [-3], [4], [3, 2], none
    out = run("ties", [t1, t2, t3], base, mp([1.0, 1.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([-3.0, 4.0, 2.5, 0.0]))
    out = run("ties", [t1, t2, t3], base, mp([1.0, 1.0, 1.0]), {"normalize": False, "lambda": 2.0})
    torch.testing.assert_close(out, 2.0 * torch.tensor([-3.0, 4.0, 5.0, 0.0]))


def test_election_uses_weighted_task_vectors():
    t1, t2 = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -3.0])
    # weights 3 and 1: Σ wτ = [2, 0] → both elect +; only model 1 agrees: mean of wτ over agreeing w = 3/3 = 1
    out = run("ties", [t1, t2], torch.zeros(2), mp([3.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]))
    # a negative weight flips the vote: wτ = [1·1, -1·-1] = [1, 1] both agree; Σ wτ / Σ w over agreeing = 2/0 → 1
    out = run("ties", [t1, t2], torch.zeros(2), mp([1.0, -1.0]), {"normalize": False})
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0]))


def test_trim_keeps_top_density_fraction():
    tau = torch.tensor([0.5, -3.0, 2.0, -1.0, 0.1])
    out = run("ties", [tau], ZERO, mp([2.0], [0.4]))  # k = ⌊0.4·5⌋ = 2; one model: the mean is τ' itself
    torch.testing.assert_close(out, torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))
    out = run("ties", [tau], ZERO, mp([2.0], [0.4]), {"normalize": False})
    torch.testing.assert_close(out, torch.tensor([0.0, -6.0, 4.0, 0.0, 0.0]))


def test_trim_ties_in_magnitude_keep_the_lowest_index():
    tau = torch.tensor([0.5, 1.0, -1.0, 1.0, -1.0])
    out = run("ties", [tau], ZERO, mp([1.0], [0.4]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0]))


def test_trim_rounds_k_down_like_mergekit_but_keeps_at_least_one():
    tau = torch.arange(1.0, 101.0)  # n = 100
    out = run("ties", [tau], torch.zeros(100), mp([1.0], [0.29]))  # int(0.29·100) = int(28.999…) = 28
    assert int((out != 0).sum()) == 28 and out[-28:].eq(tau[-28:]).all()
    out = run("ties", [tau[:10]], torch.zeros(10), mp([1.0], [0.01]))  # max(1, int(0.1)) = 1
    torch.testing.assert_close(out, torch.tensor([0.0] * 9 + [10.0]))


def test_all_zero_task_vectors_and_density_one():
    base = torch.tensor([1.0, -2.0, 3.0])
    for params in ({}, {"rescale": True}):
        torch.testing.assert_close(run("ties", [base, base], base, mp([1.0, 1.0], [0.3, 0.3]), params), base)
    t1, t2 = base + torch.tensor([1.0, -1.0, 0.5]), base + torch.tensor([0.1, 0.2, -0.3])
    # density 1: no trimming, only election: [+, -, +] → [mean(1, .1), -1, .5]
    out = run("ties", [t1, t2], base, mp([1.0, 1.0]))
    torch.testing.assert_close(out, base + torch.tensor([0.55, -1.0, 0.5]))


def test_ties_rescale_matches_l1_norm():
    tau = torch.tensor([0.5, -3.0, 2.0, -1.0, 0.1])
    out = run("ties", [tau], ZERO, mp([1.0], [0.4]), {"rescale": True, "normalize": False})
    torch.testing.assert_close(out, torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]) * (6.6 / 5.0))


def test_ties_zero_weights_sum_is_fine_per_entry():
    t1, t2 = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 1.0])
    out = run("ties", [t1, t2], torch.zeros(2), mp([1.0, -1.0]))
    # wτ = [1, -2], [-2, -1]: Σ = [-1, -3] → elect -, -; agreeing: model 2 at entry 0, both at entry 1
    # entry 0: -2 / -1 = 2; entry 1: (-2 - 1) / (1 - 1 = 0 → 1) = -3
    torch.testing.assert_close(out, torch.tensor([2.0, -3.0]))


# ---------------------------------------------------------------------------------------------------------------
# breadcrumbs


def test_breadcrumbs_drops_largest_and_smallest():
    tau = torch.arange(1.0, 11.0)[torch.tensor([3, 9, 0, 5, 2, 8, 1, 7, 4, 6])]
    out = run("breadcrumbs", [tau], torch.zeros(10), mp([1.0], [0.5], gamma=0.2))
    # target 5, n_top 2, n_bot 3: keep magnitudes 4…8
    torch.testing.assert_close(out, torch.where((tau >= 4) & (tau <= 8), tau, 0.0))
    # density + γ > 1: n_bot = max(0, 10 − 8 − 5) = 0, only the 2 largest are dropped
    out = run("breadcrumbs", [tau], torch.zeros(10), mp([1.0], [0.8], gamma=0.5))
    torch.testing.assert_close(out, torch.where(tau <= 8, tau, 0.0))
    # density 1: untouched, γ ignored
    torch.testing.assert_close(run("breadcrumbs", [tau], torch.zeros(10), mp([1.0], [1.0], gamma=0.5)), tau)


def test_breadcrumbs_rescale_and_ties_variant():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    out = run("breadcrumbs", [tau], torch.zeros(10), mp([1.0], [0.5], gamma=0.2), {"rescale": True})
    kept = torch.where((tau.abs() >= 4) & (tau.abs() <= 8), tau, 0.0)
    torch.testing.assert_close(out, kept * (55.0 / 30.0))
    # breadcrumbs_ties with one model is the same as breadcrumbs normalized
    out = run("breadcrumbs_ties", [tau], torch.zeros(10), mp([2.0], [0.5], gamma=0.2), {"normalize": True})
    torch.testing.assert_close(out, kept)


def test_breadcrumbs_ties_at_both_cuts():
    tau = torch.tensor([2.0, 1.0, 2.0, 3.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0])
    # target 5, n_top 2, n_bot 3 → descending positions 2…6 of the stable order by (-|τ|, index):
    # order: 3@3, 3@4, 3@7, 2@0, 2@2, 2@6, 2@9, 1@1, 1@5, 1@8 → keep indices 7, 0, 2, 6, 9
    out = run("breadcrumbs", [tau], torch.zeros(10), mp([1.0], [0.5], gamma=0.2))
    expected = torch.zeros(10)
    expected[[7, 0, 2, 6, 9]] = tau[[7, 0, 2, 6, 9]]
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------------------
# DARE and DELLA


def test_dare_density_one_is_task_arithmetic():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, generator=g)
    ts = [base + torch.randn(4, 6, generator=g) for _ in range(3)]
    ta = run("task_arithmetic", ts, base, mp([1.0, 0.5, 0.2]), {"lambda": 0.9})
    torch.testing.assert_close(run("dare_linear", ts, base, mp([1.0, 0.5, 0.2]), {"lambda": 0.9}), ta)
    ties = run("ties", ts, base, mp([1.0, 0.5, 0.2]), {"normalize": False})
    torch.testing.assert_close(run("dare_ties", ts, base, mp([1.0, 0.5, 0.2])), ties)


def test_dare_drops_with_the_seeded_mask_and_rescales():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50, 40, generator=g)
    tau = torch.randn(50, 40, generator=g)
    inputs = make_inputs([base + tau], base, mp([1.0], [0.3]), {"rescale_by_density": True}, seed=11)
    keep = bernoulli_mask((50, 40), 0.3, inputs.generator(0))
    out = get_method("dare_linear")(inputs)
    torch.testing.assert_close(out - base, torch.where(keep, tau / 0.3, 0.0), atol=1e-5, rtol=1e-5)
    # mergekit's default: survivors rescaled so ‖τ'‖₁ = ‖τ‖₁
    out = run("dare_linear", [base + tau], base, mp([1.0], [0.3]), seed=11)
    delta = out - base
    torch.testing.assert_close(delta.abs().sum(), tau.abs().sum())
    assert torch.equal(delta != 0, keep)
    # no rescale: survivors unchanged
    out = run("dare_linear", [base + tau], base, mp([1.0], [0.3]), {"rescale": False}, seed=11)
    torch.testing.assert_close(out - base, torch.where(keep, tau, 0.0), atol=1e-6, rtol=1e-6)


def test_della_keep_probability_follows_magnitude_rank():
    tau = torch.arange(1.0, 101.0).repeat(4000, 1)  # (4000, 100) each row ranks 0…99
    out = run("della_linear", [tau], torch.zeros_like(tau), mp([1.0], [0.5], epsilon=0.4), {"rescale": False})
    kept = (out != 0).double().mean(dim=0)  # (100,) empirical keep probability per rank
    expected = 0.1 + 0.8 * torch.arange(100).double() / 99
    assert (kept - expected).abs().max() < 0.04


def test_della_epsilon_outside_the_density_range_is_an_error():
    with pytest.raises(ConfigError, match=r"della: tensor 'model.layers.0.mlp.up_proj.weight', model 0.*epsilon"):
        run("della", [torch.ones(3)], torch.zeros(3), mp([1.0], [0.2], epsilon=0.3))


# ---------------------------------------------------------------------------------------------------------------
# large tensors (sampled thresholds, several chunks) against a plain whole-tensor reference written here


def _reference(name, base, thetas, weights, densities, lam, normalize, rescale, gamma, masks):
    consensus = name in ("ties", "dare_ties", "breadcrumbs_ties")
    deltas = []
    for i, theta in enumerate(thetas):
        tau = (theta - base).reshape(-1)
        n = tau.numel()
        order = torch.argsort(tau.abs(), descending=True, stable=True)  # (n,) position → index
        keep = torch.zeros(n, dtype=torch.bool)
        if name == "ties":
            keep[order[: max(1, int(densities[i] * n))]] = True
        elif name.startswith("breadcrumbs"):
            target, n_top = int(densities[i] * n), int(gamma * n)
            first = n - max(0, n - target - n_top) - target
            keep[order[first : first + target]] = True
        else:
            keep = masks[i].reshape(-1)
        kept = torch.where(keep, tau, 0.0)
        if rescale and kept.abs().sum() > 1e-7:
            kept = kept * (tau.abs().sum() / kept.abs().sum())
        deltas.append(weights[i] * kept)
    d = torch.stack(deltas)  # (k, n)
    w = torch.tensor(weights).view(-1, 1)
    if consensus:
        elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = d.sign() == elected
        mixed, divisor = (d * agree).sum(0), (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = d.sum(0), w.sum()
    if normalize:
        mixed = mixed / divisor
    return (base.reshape(-1) + lam * mixed).view(base.shape)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"])
def test_large_tensors_match_the_whole_tensor_reference(name):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(640, 1000, generator=g).mul(0.02).bfloat16().float()
    thetas = [(base + torch.randn(640, 1000, generator=g).mul(0.002)).bfloat16().float() for _ in range(3)]
    weights, densities = [1.0, 0.6, -0.3], [0.2, 0.5, 0.9]
    params = {"lambda": 1.3, "normalize": True, "rescale": True}
    inputs = make_inputs(thetas, base, mp(weights, densities, gamma=0.05), params, seed=5)
    masks = [bernoulli_mask(base.shape, densities[i], inputs.generator(i)) for i in range(3)]
    expected = _reference(name, base, thetas, weights, densities, 1.3, True, True, 0.05, masks)
    torch.testing.assert_close(get_method(name)(inputs), expected, atol=1e-6, rtol=1e-5)
