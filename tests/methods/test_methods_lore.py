"""LoRE-Merging against its formulation (Liu et al. 2025): coordinate descent on Σᵢ‖θ₀ + δᵢ − θᵢ‖² + μ‖δᵢ‖_*
with rank δᵢ ≤ r, and a constructed case where it interferes less than task arithmetic."""

from __future__ import annotations

import pytest
import torch
from methods_helpers import make_inputs, run

from mergescale.methods import get_method
from mergescale.methods.lore import lore_estimate, low_rank_threshold


def _reference(thetas, rank, mu, iterations, lam, weights, start=None):
    """The algorithm written out with exact SVDs."""
    theta0 = thetas.mean(0) if start is None else start.clone()
    deltas = [None] * len(thetas)
    for _ in range(iterations):
        for i, th in enumerate(thetas):
            u, s, vh = torch.linalg.svd(th - theta0, full_matrices=False)
            r = min(rank, s.numel()) if rank else s.numel()
            deltas[i] = u[:, :r] @ torch.diag((s[:r] - mu / 2).clamp(min=0)) @ vh[:r]
        theta0 = torch.stack([th - d for th, d in zip(thetas, deltas, strict=True)]).mean(0)
    return theta0 + lam * sum(w * d for w, d in zip(weights, deltas, strict=True))


def _experts(k=3, shape=(12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.3 * torch.randn(shape, generator=g) for _ in range(k)]


@pytest.mark.parametrize(("rank", "mu", "iterations", "lam"), [(2, 0.0, 1, 1.0), (3, 0.5, 4, 0.7), (0, 1.0, 2, 1.0)])
def test_lore_is_its_formula(rank, mu, iterations, lam):
    _, experts = _experts()
    weights = [1.0, 0.5, 2.0]
    params = {"rank": rank, "mu": mu, "iterations": iterations, "lambda": lam}
    out = run("lore", experts, None, [{"weight": w} for w in weights], params)
    expected = _reference(torch.stack(experts), rank, mu, iterations, lam, weights)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_lore_starts_from_the_base_when_given():
    base, experts = _experts(seed=1)
    out = run("lore", experts, base, [{}] * 3, {"rank": 2, "iterations": 1})
    expected = _reference(torch.stack(experts), 2, 0.0, 1, 1.0, [1.0] * 3, start=base)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_each_round_does_not_increase_the_objective():
    _, experts = _experts(k=4, seed=2)
    thetas = torch.stack(experts)
    mu = 0.4

    def objective(theta0, deltas):
        fit = sum(float(((theta0 + d - t) ** 2).sum()) for d, t in zip(deltas, thetas, strict=True))
        return fit + mu * sum(float(torch.linalg.svdvals(d).sum()) for d in deltas)

    values = [objective(*lore_estimate(thetas, rank=3, mu=mu, iterations=n)) for n in range(1, 6)]
    assert all(b <= a + 1e-6 for a, b in zip(values, values[1:], strict=False)), values


def test_low_rank_threshold_keeps_the_top_singular_values_shrunk():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(8, 6, generator=g)
    out = low_rank_threshold(a, rank=2, shrink=0.1)
    s = torch.linalg.svdvals(a)
    assert int(torch.linalg.matrix_rank(out)) == 2
    torch.testing.assert_close(torch.linalg.svdvals(out)[:2], s[:2] - 0.1)


def test_randomized_svd_of_large_matrices_is_deterministic_and_close_to_the_exact_one():
    g = torch.Generator().manual_seed(4)
    low = torch.randn(200, 4, generator=g) @ torch.randn(4, 150, generator=g)  # rank 4
    a = low + 1e-3 * torch.randn(200, 150, generator=g)
    exact = low_rank_threshold(a, rank=4, shrink=0.0)
    fast1 = low_rank_threshold(a, rank=4, shrink=0.0, generator=torch.Generator().manual_seed(0))
    fast2 = low_rank_threshold(a, rank=4, shrink=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast1, fast2)
    torch.testing.assert_close(fast1, exact, atol=1e-3, rtol=1e-3)
    inputs = make_inputs([a, a + 0.01], None, [{}, {}], {"rank": 4}, seed=5)
    assert torch.equal(get_method("lore")(inputs), get_method("lore")(make_inputs([a, a + 0.01], None, [{}, {}],
                                                                                   {"rank": 4}, seed=5)))


def test_vectors_are_one_row_matrices():
    experts = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    out = run("lore", experts, None, [{}, {}], {"rank": 1, "iterations": 2})
    # a (1, n) matrix is exactly rank 1: δᵢ = θᵢ − θ₀, θ₀ stays the mean, θ₀ + Σδᵢ = the mean again
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 2.0]))


def test_lore_interferes_less_than_task_arithmetic_on_low_rank_tasks_with_noise():
    """k experts = base + a rank-2 task update + small full-rank noise (the part of fine-tuning that carries no
    task and interferes when summed). The ideal merge is base + Σ task updates. Task arithmetic, even knowing
    the base, adds every expert's noise; LoRE, without the base, keeps each expert's rank-2 part and averages
    the noise into its base estimate."""
    g = torch.Generator().manual_seed(5)
    m, n, k = 64, 48, 4
    base = torch.randn(m, n, generator=g)
    tasks = [torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) * 0.3 for _ in range(k)]
    noise = [0.05 * torch.randn(m, n, generator=g) for _ in range(k)]
    experts = [base + t + e for t, e in zip(tasks, noise, strict=True)]
    ideal = base + sum(tasks)
    ta = run("task_arithmetic", experts, base, [{"weight": 1.0}] * k, {})
    lore = run("lore", experts, None, [{}] * k, {"rank": 2, "iterations": 5})
    err_ta = float(torch.linalg.norm(ta - ideal))
    err_lore = float(torch.linalg.norm(lore - ideal))
    assert err_lore < 0.5 * err_ta, (err_lore, err_ta)
