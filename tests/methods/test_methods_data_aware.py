"""Fisher merging and RegMean against their formulas on small tensors (statistics given directly)."""

from __future__ import annotations

import pytest
import torch
from methods_helpers import make_inputs

from mergescale.errors import ConfigError
from mergescale.methods import get_method


def _fisher(tensors, fishers, weights=None, floor=1e-6):
    inputs = make_inputs(tensors, None, [{"weight": w} for w in (weights or [1.0] * len(tensors))],
                         {"fisher_floor": floor})
    if fishers is not None:
        inputs.statistics = {"fisher": torch.stack(fishers)}
    return get_method("fisher")(inputs)


def test_fisher_is_the_fisher_weighted_average():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 5.0])
    fa, fb = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 2.0])
    out = _fisher([a, b], [fa, fb], weights=[1.0, 2.0])
    # entry 0: (1·1·1 + 2·3·3)/(1·1 + 2·3); entry 1: both Fisher floored, so the weights alone; entry 2: 1:2 weights
    expected = torch.tensor([(1 + 18) / 7, (2 * 1 + 0 * 2) / 3, (1 * 2 * 3 + 2 * 2 * 5) / (2 + 4)])
    torch.testing.assert_close(out, expected)


def test_fisher_without_statistics_is_the_weighted_average():
    a, b = torch.ones(2, 2), 3 * torch.ones(2, 2)
    torch.testing.assert_close(_fisher([a, b], None, weights=[1.0, 3.0]), 2.5 * torch.ones(2, 2))


def test_fisher_refuses_statistics_of_another_shape():
    with pytest.raises(ConfigError, match="Fisher statistics of shape"):
        _fisher([torch.ones(2, 2), torch.ones(2, 2)], [torch.ones(4), torch.ones(4)])


def _regmean(weights, grams, alpha):
    inputs = make_inputs(weights, None, None, {"alpha": alpha})
    if grams is not None:
        inputs.statistics = {"gram": torch.stack(grams)}
    return get_method("regmean")(inputs)


def _problem(k=3, n_in=5, n_out=4, tokens=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, n_in, generator=g) for _ in range(k)]
    ws = [torch.randn(n_out, n_in, generator=g) for _ in range(k)]
    return xs, ws


def test_regmean_with_alpha_1_is_the_least_squares_fit_of_every_models_outputs():
    xs, ws = _problem()
    out = _regmean(ws, [x.T @ x for x in xs], alpha=1.0)
    # min_W Σᵢ ‖XᵢWᵀ − XᵢWᵢᵀ‖²: one least-squares problem over the stacked inputs
    a = torch.cat(xs).double()
    b = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)]).double()
    expected = torch.linalg.lstsq(a, b).solution.T.float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_regmean_alpha_scales_the_off_diagonals():
    xs, ws = _problem(seed=1)
    grams = [x.T @ x for x in xs]
    alpha = 0.6
    reg = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    expected = (sum(w @ g for w, g in zip(ws, reg, strict=True)) @ torch.linalg.inv(sum(reg)))
    torch.testing.assert_close(_regmean(ws, grams, alpha), expected, atol=1e-5, rtol=1e-5)
    # alpha 0: each input feature's column is averaged with the models' input energies as weights
    diag = torch.stack([torch.diag(g) for g in grams])  # (k, in)
    per_feature = sum(w * d for w, d in zip(ws, diag, strict=True)) / diag.sum(0)
    torch.testing.assert_close(_regmean(ws, grams, 0.0), per_feature, atol=1e-5, rtol=1e-5)


def test_regmean_averages_tensors_without_gram_matrices_and_survives_dead_features():
    ws = [torch.ones(3), 3 * torch.ones(3)]
    torch.testing.assert_close(_regmean(ws, None, 0.9), 2 * torch.ones(3))
    xs, w2 = _problem(k=2, seed=2)
    for x in xs:
        x[:, 0] = 0  # an input feature no example activates: Σ G is singular
    out = _regmean(w2, [x.T @ x for x in xs], alpha=0.9)
    assert bool(torch.isfinite(out).all())
