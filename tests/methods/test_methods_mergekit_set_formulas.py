"""The methods added from mergekit 0.1.5's set, checked against their formulas on hand-made tensors (the peer
tests in test_methods_mergekit_new.py check them against mergekit itself)."""

from __future__ import annotations

import math

import pytest
import torch
from methods_helpers import run

from mergescale.errors import ConfigError
from mergescale.methods import get_method
from mergescale.methods.arcee_fusion import importance, upper_fence
from mergescale.methods.sce import energy_weights, variance_mask

S = math.sqrt(0.5)


def test_nearswap_takes_close_values_and_moves_far_ones_by_t():
    a = torch.zeros(4)
    b = torch.tensor([0.05, 0.5, -2.0, 0.0])
    out = run("nearswap", [b], a, [{}], {"t": 0.1})
    # w = clamp(0.1 / max(|a − b|, 1e-6), 0, 1) = [1, 0.2, 0.05, 1]; θ = w·b + (1 − w)·a
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, -0.1, 0.0]))


def test_passthrough_copies_or_scales_its_one_input():
    x = torch.arange(6.0).view(2, 3)
    torch.testing.assert_close(run("passthrough", [x], None, [{}]), x)
    torch.testing.assert_close(run("passthrough", [x], None, [{"scale": 0.5}]), x * 0.5)
    coefs, base = get_method("passthrough").linear_coefficients([{"scale": 2.0}], {}, None)
    assert coefs == [2.0] and base == 0.0
    with pytest.raises(ConfigError, match="exactly one input"):
        run("passthrough", [x, x], None, [{}, {}])


def test_nuslerp_of_orthogonal_vectors_with_equal_weights_is_the_arc_midpoint():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run("nuslerp", [v0, v1], None, [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.tensor([S, S]))
    # t = w₁/(w₀ + w₁) = 0.25: sin(0.75·π/2)·v₀ + sin(0.25·π/2)·v₁
    out = run("nuslerp", [v0, v1], None, [{"weight": 3.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.tensor([math.sin(0.375 * math.pi), math.sin(0.125 * math.pi)]))


def test_nuslerp_around_a_base_and_row_wise():
    base = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    a = base + torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = base + torch.tensor([[0.0, 1.0], [0.0, 4.0]])
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    # per row: row 0 task vectors orthogonal (arc midpoint), row 1 colinear (lerp)
    out = run("nuslerp", [a, b], base, mp, {"nuslerp_flatten": False})
    torch.testing.assert_close(out, base + torch.tensor([[S, S], [0.0, 3.0]]))


def test_multislerp_of_two_orthogonal_unit_vectors_is_the_midpoint_and_keeps_the_mean_norm():
    out = run("multislerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])], None,
              [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.tensor([S, S]) * 2.0, atol=1e-6, rtol=1e-6)  # mean norm (1 + 3)/2


def test_multislerp_one_model_is_that_model_and_antipodal_pairs_lerp():
    x = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(run("multislerp", [x], torch.zeros(2), [{"weight": 1.0}]), x)
    out = run("multislerp", [x, -x], None, [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.zeros(2))
    with pytest.raises(ConfigError, match="weighted mean direction of the models is zero"):
        run("multislerp", [x, -x, 2 * x, -2 * x], None, [{"weight": 1.0}] * 4)


def test_karcher_mean_of_two_directions_is_their_geodesic_midpoint_scaled_by_the_mean_norm():
    out = run("karcher", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])], None, None, {"tol": 1e-9})
    torch.testing.assert_close(out, torch.tensor([S, S]) * 1.5, atol=1e-5, rtol=1e-5)


def test_karcher_mean_of_three_directions_is_the_point_of_equal_pull():
    # three unit vectors around the z axis, at 60° from it: the Karcher mean is the z axis
    r = math.sin(math.pi / 3)
    vs = [torch.tensor([r * math.cos(a), r * math.sin(a), 0.5]) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    out = run("karcher", vs, None, None, {"tol": 1e-9, "max_iter": 100})
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0]), atol=1e-5, rtol=1e-5)


def test_sce_weights_by_energy_and_erases_minority_signs():
    base = torch.zeros(3)
    t1, t2 = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 1.0, -2.0])
    # energies mean(τ²) = 2 and 14/3 → weights 0.3, 0.7; majority sign (Σ = [4, 0, 0]) is + everywhere
    torch.testing.assert_close(energy_weights(torch.stack([t1, t2])), torch.tensor([0.3, 0.7]))
    out = run("sce", [t1, t2], base, None, {})
    torch.testing.assert_close(out, torch.tensor([2.4, 1.0, 2.0]))


def test_sce_selects_the_entries_of_largest_variance():
    tau = torch.tensor([[1.0, 0.0, 5.0, 2.0], [1.0, 4.0, -5.0, 2.0]])  # variances 0, 4, 25, 0
    torch.testing.assert_close(variance_mask(tau, 0.5), torch.tensor([0.0, 0.0, 1.0, 0.0]))  # ⌊0.5·2⌋ = 1 kept
    torch.testing.assert_close(variance_mask(tau, 1.0), torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_arcee_fusion_importance_and_fence():
    theta = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    base = torch.zeros(2, 3)
    p0 = torch.softmax(theta[0], 0) + 1e-8
    q0 = torch.softmax(base[0], 0) + 1e-8
    kl0 = float((p0 * torch.log(p0 / q0)).sum())  # row 1 (a constant shift) has KL ≈ 0
    torch.testing.assert_close(importance(theta, base)[0], theta[0].abs() * kl0)
    assert float(importance(theta, base)[1].abs().max()) < 1e-6
    scores = torch.arange(100.0)  # quartiles at ⌊q·99⌋: 24, 49, 74 → fence 49 + 1.5·50 = 124
    assert float(upper_fence(scores)) == 124.0


def test_arcee_fusion_keeps_the_entries_above_the_upper_fence():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    theta = base + 0.05 * torch.randn(6, 10, generator=g)
    theta[2, 7] += 3.0  # an outlying change
    # the formula written out: per-row KL of the softmaxes, |δ|·KL, quartiles as sorted-entry lookups
    scores = torch.empty(6, 10)
    for r in range(6):
        p = [math.exp(x) for x in theta[r].tolist()]
        q = [math.exp(x) for x in base[r].tolist()]
        p = [x / sum(p) + 1e-8 for x in p]
        q = [x / sum(q) + 1e-8 for x in q]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        for c in range(10):
            scores[r, c] = abs(float(theta[r, c] - base[r, c])) * kl
    ordered = sorted(scores.reshape(-1).tolist())
    q1, q2, q3 = (ordered[int(q * 59)] for q in (0.25, 0.5, 0.75))
    keep = scores >= q2 + 1.5 * (q3 - q1)
    assert 0 < int(keep.sum()) < 60 and bool(keep[2, 7])
    out = run("arcee_fusion", [theta], base, [{}])
    torch.testing.assert_close(out, torch.where(keep, theta, base), atol=1e-6, rtol=1e-5)


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.zeros(4)
    t1, t2 = torch.tensor([1.0, 0.0, 2e-6, 3.0]), torch.tensor([1.0, 5.0, 0.0, 1.0])
    # changed (|τ| > 1e-5): model 1 entries 0, 3; model 2 entries 0, 1, 3 → counts 2, 1, 0, 2
    torch.testing.assert_close(run("ram", [t1, t2], base, None, {}), torch.tensor([1.0, 5.0, 0.0, 2.0]))
    # RAM+: model 2's unique entry boosted by 1 + r·clamp(shared/unique = 2, 0, α) = 1 + 0.1·0.2
    torch.testing.assert_close(run("ramplus_tl", [t1, t2], base, None, {}), torch.tensor([1.0, 5.1, 0.0, 2.0]))


def test_sce_variance_is_torch_var_bit_for_bit():
    from mergescale.methods.sce import population_variance

    g = torch.Generator().manual_seed(11)
    tau = 0.01 * torch.randn((4, 300_000), generator=g)
    assert torch.equal(population_variance(tau), torch.var(tau, dim=0, unbiased=False))
