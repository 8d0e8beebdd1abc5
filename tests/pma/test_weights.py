"""Each strategy's weights against its formula, computed independently (the recursion run on unit vectors)."""

from __future__ import annotations

import math

import pytest

from mergescale.errors import ConfigError
from mergescale.pma.weights import custom_weights, strategy_weights


def _recursion_weights(n: int, alpha: float) -> list[float]:
    """Run A₁ = M₁, Aᵢ = α·Mᵢ + (1 − α)·Aᵢ₋₁ on M = unit vectors: the coefficients of each Mᵢ in A_N."""
    a = [1.0] + [0.0] * (n - 1)
    for i in range(1, n):
        a = [(1 - alpha) * x for x in a]
        a[i] += alpha
    return a


@pytest.mark.parametrize("n", [1, 2, 4, 10])
@pytest.mark.parametrize("alpha", [0.1, 0.2, 0.5, 1.0])
def test_ema_is_the_recursion_and_sums_to_one(n, alpha):
    w = strategy_weights("ema", n, alpha=alpha)
    assert w == pytest.approx(_recursion_weights(n, alpha), abs=1e-15)
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-12)


def test_ema_closed_form_for_window_of_four():
    # w₁ = (1 − α)³, w₂ = α(1 − α)², w₃ = α(1 − α), w₄ = α with α = 0.2
    assert strategy_weights("ema", 4, alpha=0.2) == pytest.approx([0.512, 0.128, 0.16, 0.2])


@pytest.mark.parametrize("n", [1, 3, 6])
def test_sma_and_wma(n):
    assert strategy_weights("sma", n) == pytest.approx([1 / n] * n)
    total = n * (n + 1) / 2
    assert strategy_weights("wma", n) == pytest.approx([i / total for i in range(1, n + 1)])
    assert strategy_weights("wma", 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_custom_weights_are_normalised_and_checked():
    assert strategy_weights("custom", 3, weights=[1, 1, 2]) == pytest.approx([0.25, 0.25, 0.5])
    assert strategy_weights("sma", 2, weights=[3, 1]) == pytest.approx([0.75, 0.25])  # weights mean custom
    assert custom_weights([2, -1], 2) == pytest.approx(
        [2.0, -1.0]
    )  # extrapolation allowed when the sum is > 0
    with pytest.raises(ConfigError, match="sum to a positive number"):
        custom_weights([1, -1], 2)
    with pytest.raises(ConfigError, match="gives 2 weights but the window has 3"):
        custom_weights([1, 2], 3)
    with pytest.raises(ConfigError, match="cannot be combined with strategy 'ema'"):
        strategy_weights("ema", 2, weights=[1, 1])
    with pytest.raises(ConfigError, match="needs weights"):
        strategy_weights("custom", 2)


def test_bad_alpha_and_unknown_strategy():
    for alpha in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="alpha must be in"):
            strategy_weights("ema", 3, alpha=alpha)
    with pytest.raises(ConfigError, match="unknown PMA strategy 'foo'; available: ema, sma, wma"):
        strategy_weights("foo", 3)
