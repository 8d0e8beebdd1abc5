"""Averaging weights for a window of N checkpoints M₁ … M_N, ordered oldest to newest (pure functions).

Every strategy returns N floats that sum to 1; the average is M = Σᵢ wᵢ·Mᵢ. The strategies come from
"Model Merging in Pre-training of Large Language Models" (Li et al., 2025, https://arxiv.org/abs/2505.12082):

- ``sma`` (simple moving average): wᵢ = 1/N.
- ``ema`` (exponential moving average): the recursion A₁ = M₁, Aᵢ = α·Mᵢ + (1 − α)·Aᵢ₋₁ unrolled, so
  w₁ = (1 − α)^(N−1) and wᵢ = α·(1 − α)^(N−i) for i > 1. Seeding the recursion with M₁ makes the weights sum
  to 1 (the paper's closed form α(1 − α)^(N−i) alone does not; we follow the recursion).
- ``wma`` (weighted moving average): wᵢ = i / Σⱼ j = 2i / (N(N+1)), the newest checkpoint heaviest.
- ``custom``: user weights, divided by their sum (which must be positive).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from mergescale.errors import ConfigError
from mergescale.registry import Registry

StrategyFn = Callable[[int, float], list[float]]
"""(number of checkpoints, alpha) -> weights, oldest first."""

STRATEGIES: Registry[StrategyFn] = Registry("PMA strategy")

DEFAULT_ALPHA = 0.2  # the paper found α = 0.2 better than α = 0.1


def _check_n(n: int) -> None:
    if n < 1:
        raise ConfigError(f"a window needs at least one checkpoint, got {n}")


@STRATEGIES.decorator("sma")
def sma_weights(n: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """Simple moving average: wᵢ = 1/N (``alpha`` is ignored)."""
    _check_n(n)
    return [1.0 / n] * n


@STRATEGIES.decorator("ema")
def ema_weights(n: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """Exponential moving average, A₁ = M₁ and Aᵢ = α·Mᵢ + (1 − α)·Aᵢ₋₁ (oldest first).

    Unrolled: w₁ = (1 − α)^(N−1), wᵢ = α·(1 − α)^(N−i) for i > 1; they sum to 1. α = 1 keeps only the newest
    checkpoint. Raises :class:`ConfigError` unless 0 < α ≤ 1.
    """
    _check_n(n)
    if not (0.0 < alpha <= 1.0) or math.isnan(alpha):
        raise ConfigError(f"EMA alpha must be in (0, 1], got {alpha}")
    weights = [alpha * (1.0 - alpha) ** (n - i) for i in range(1, n + 1)]
    weights[0] = (1.0 - alpha) ** (n - 1)
    return weights


@STRATEGIES.decorator("wma")
def wma_weights(n: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """Linearly weighted moving average: wᵢ = i / Σⱼ j = 2i / (N(N+1)), newest heaviest (``alpha`` ignored)."""
    _check_n(n)
    total = n * (n + 1) / 2
    return [i / total for i in range(1, n + 1)]


def custom_weights(weights: Sequence[float], n: int) -> list[float]:
    """User-given weights for N checkpoints (oldest first), divided by their sum.

    Raises :class:`ConfigError` when there are not exactly N of them, one is not finite, or they do not sum to
    a positive number.
    """
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise ConfigError(f"--weights gives {len(ws)} weights but the window has {n} checkpoints")
    if not all(math.isfinite(w) for w in ws):
        raise ConfigError(f"--weights must be finite numbers, got {ws}")
    total = math.fsum(ws)
    if not total > 0.0:
        raise ConfigError(f"--weights must sum to a positive number, got {ws} (sum {total:g})")
    return [w / total for w in ws]


def strategy_weights(
    strategy: str, n: int, *, alpha: float = DEFAULT_ALPHA, weights: Sequence[float] | None = None
) -> list[float]:
    """The weights of ``strategy`` (``sma``, ``ema``, ``wma`` or ``custom``) for N checkpoints, oldest first.

    Giving ``weights`` means ``custom`` (with the default strategy ``sma`` too); any other strategy with
    ``weights`` is an error.

    >>> strategy_weights("ema", 3, alpha=0.5)
    [0.25, 0.25, 0.5]
    """
    if weights is not None:
        # explicit weights make the strategy "custom"; "sma" is accepted as it is the API's default
        if strategy not in ("custom", "sma"):
            raise ConfigError(
                f"--weights sets the weights itself; it cannot be combined with strategy {strategy!r}"
            )
        return custom_weights(weights, n)
    if strategy == "custom":
        raise ConfigError("strategy 'custom' needs weights (--weights w1,w2,...)")
    return STRATEGIES.get(strategy)(n, alpha)


def strategy_names() -> list[str]:
    """Every strategy name, ``custom`` included."""
    return [*STRATEGIES.names(), "custom"]


def parse_weights(text: str) -> list[float]:
    """``"1,2,3"`` -> [1.0, 2.0, 3.0]; a clear error for anything else."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--weights must be numbers separated by commas, got {text!r}") from None
