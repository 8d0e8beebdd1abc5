"""linear: Σ wᵢθᵢ / Σ wᵢ, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from methods_helpers import make_inputs, run

from mergescale.errors import ConfigError
from mergescale.methods import get_method

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
B = torch.tensor([[5.0, -2.0], [0.0, 8.0]])
BASE = torch.tensor([[10.0, 10.0], [10.0, 10.0]])


def test_weighted_average_normalized_by_default():
    out = run("linear", [A, B], None, [{"weight": 1.0}, {"weight": 3.0}])
    # (1·A + 3·B) / 4, entry by entry
    expected = torch.tensor([[(1 + 15) / 4, (2 - 6) / 4], [(3 + 0) / 4, (4 + 24) / 4]])
    assert out.dtype == torch.float32 and out.shape == (2, 2)
    torch.testing.assert_close(out, expected)


def test_unnormalized_is_the_weighted_sum():
    out = run("linear", [A, B], None, [{"weight": 0.5}, {"weight": 2.0}], {"normalize": False})
    torch.testing.assert_close(out, torch.tensor([[10.5, -3.0], [1.5, 18.0]]))


def test_single_model_is_itself():
    torch.testing.assert_close(run("linear", [A], None, [{"weight": 0.3}]), A)


def test_base_listed_with_a_weight_is_averaged_like_any_model():
    out = run("linear", [A, B], BASE, [{"weight": 1.0}, {"weight": 1.0}], base_params={"weight": 2.0})
    torch.testing.assert_close(out, (A + B + 2 * BASE) / 4)


def test_base_without_params_does_not_take_part():
    out = run("linear", [A, B], BASE, [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, (A + B) / 2)


def test_base_listed_without_weight_is_an_error():
    with pytest.raises(ConfigError, match=r"up_proj.*weight"):
        run("linear", [A, B], BASE, [{"weight": 1.0}, {"weight": 1.0}], base_params={})


def test_weights_summing_to_zero_with_normalize_name_the_tensor():
    with pytest.raises(ConfigError, match=r"linear: tensor 'model.layers.0.mlp.up_proj.weight'.*sum to 0"):
        run("linear", [A, B], None, [{"weight": 1.0}, {"weight": -1.0}])
    # without normalize they are fine
    out = run("linear", [A, B], None, [{"weight": 1.0}, {"weight": -1.0}], {"normalize": False})
    torch.testing.assert_close(out, A - B)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("base_params", [None, {"weight": 0.7}])
def test_linear_coefficients_reproduce_fn(normalize, base_params):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(7, 5, generator=g) for _ in range(3)]
    base = torch.randn(7, 5, generator=g)
    mp = [{"weight": 0.2}, {"weight": 1.5}, {"weight": -0.4}]
    inputs = make_inputs(ts, base, mp, {"normalize": normalize}, base_params=base_params)
    method = get_method("linear")
    coefs, c_base = method.linear_coefficients(inputs.model_params, inputs.params, inputs.base_params)
    by_coefficients = sum(c * t for c, t in zip(coefs, ts, strict=True)) + c_base * base
    torch.testing.assert_close(method(inputs), by_coefficients)
