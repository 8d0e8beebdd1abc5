"""Which checkpoints to average: a window of N checkpoints, at least V apart, ending at or before END (pure).

The rule: start from the newest checkpoint at or before END and walk back towards older ones, taking a
checkpoint whenever it lies at least V (steps, or tokens) before the last one taken, until N are taken. So the
window always ends at the newest usable checkpoint, and checkpoints saved more often than every V are thinned.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from mergescale.errors import ConfigError
from mergescale.io.discover import CheckpointRef

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBGT]?)\s*(tokens?|toks?|steps?)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Interval:
    """A minimum spacing between averaged checkpoints, in optimizer steps or in tokens."""

    value: int
    unit: Literal["steps", "tokens"]

    def __str__(self) -> str:
        return (
            f"{self.value} steps"
            if self.unit == "steps"
            else f"{_human(self.value).removesuffix('tok')} tokens"
        )


def _human(tokens: int) -> str:
    """A token count as ``parse_interval`` reads it back: ``2B``, ``2.5B``, ``300M``, or ``123457tok``."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if (
            tokens >= scale
            and tokens % (scale // 1000) == 0
            and (tokens < 1000 * scale or tokens % scale == 0)
        ):
            whole, frac = divmod(tokens, scale)
            return f"{whole}.{frac * 1000 // scale:03d}".rstrip("0").rstrip(".") + suffix
    return f"{tokens}tok"


def parse_interval(value: str | int | Interval | None) -> Interval | None:
    """``500`` or ``"500"`` -> 500 steps; ``"2B"``, ``"2.5B"``, ``"500M"``, ``"4000tok"`` -> tokens.

    A plain number counts steps; a K/M/B(G)/T suffix or a ``tokens`` unit counts tokens.
    """
    if value is None or isinstance(value, Interval):
        return value
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"--interval must not be negative, got {value}")
        return Interval(value, "steps")
    m = _INTERVAL.match(value)
    if not m:
        raise ConfigError(
            f"--interval {value!r} is not a number of steps (500) or of tokens (2B, 500M, 4000K)"
        )
    number, suffix, unit = Decimal(m.group(1)), m.group(2).upper(), (m.group(3) or "").lower()
    tokens = bool(suffix) or unit.startswith("tok")
    if unit.startswith("step") and suffix:
        raise ConfigError(f"--interval {value!r}: a K/M/B/T suffix counts tokens, not steps")
    amount = number * _SUFFIX[suffix]
    if amount != int(amount):
        raise ConfigError(f"--interval {value!r} is not a whole number of {'tokens' if tokens else 'steps'}")
    return Interval(int(amount), "tokens" if tokens else "steps")


def _coord(ref: CheckpointRef, unit: Literal["steps", "tokens"]) -> int:
    value = ref.step if unit == "steps" else ref.tokens
    if value is None:
        if unit == "tokens":
            raise ConfigError(
                f"{ref.label} has no token count (its trainer_state.json lacks num_input_tokens_seen); give "
                f"--interval in steps, or --tokens-per-step"
            )
        raise ConfigError(f"{ref.label} has no step number, so --interval and --end cannot apply")
    return value


def _greedy(coords: Sequence[int], spacing: int, limit: int | None) -> list[int]:
    """Indices (newest first) picked walking back from the last coordinate with at least ``spacing`` between."""
    picked = [len(coords) - 1]
    for i in range(len(coords) - 2, -1, -1):
        if limit is not None and len(picked) >= limit:
            break
        if coords[picked[-1]] - coords[i] >= spacing:
            picked.append(i)
    return picked


def _largest_spacing(coords: Sequence[int], n: int) -> int:
    """The largest spacing for which :func:`_greedy` still finds ``n`` checkpoints (0 if none does)."""
    lo, hi = 0, max(coords[-1] - coords[0], 0)
    while lo < hi:  # fewer are picked as the spacing grows: binary search the last spacing that fits
        mid = (lo + hi + 1) // 2
        if len(_greedy(coords, mid, n)) >= n:
            lo = mid
        else:
            hi = mid - 1
    return lo


def select_window(
    checkpoints: Sequence[CheckpointRef],
    *,
    window: int | None = None,
    interval: str | int | Interval | None = None,
    end: int | None = None,
) -> list[CheckpointRef]:
    """The checkpoints to average, oldest first.

    Args:
        checkpoints: a run's checkpoints, oldest first.
        window: how many (N); None takes every checkpoint the other rules allow.
        interval: minimum spacing V between chosen checkpoints (see :func:`parse_interval`); None for 0.
        end: the last step that may be used (default: the newest checkpoint).

    Raises:
        ConfigError: no checkpoint at or before END, a step or token count that a rule needs is unknown, or
            fewer than N checkpoints fit; the message lists what the run has and suggests a window that fits.
    """
    spacing = parse_interval(interval)
    if window is not None and window < 1:
        raise ConfigError(f"--window must be at least 1, got {window}")
    if not checkpoints:
        raise ConfigError("the run has no checkpoints")
    pool = list(checkpoints)
    if end is not None:
        pool = [c for c in pool if _coord(c, "steps") <= end]
        if not pool:
            raise ConfigError(
                f"no checkpoint at or before step {end}; the run's first checkpoint is at step {checkpoints[0].step}"
            )
    if spacing is None or spacing.value == 0:
        picked = list(range(len(pool) - 1, -1, -1))[: window or len(pool)]
        coords: list[int] = []
    else:
        coords = [_coord(c, spacing.unit) for c in pool]
        picked = _greedy(coords, spacing.value, window)
    if window is not None and len(picked) < window:
        raise ConfigError(_too_few(checkpoints, pool, window, spacing, end, len(picked), coords))
    return [pool[i] for i in sorted(picked)]


def _too_few(
    everything: Sequence[CheckpointRef],
    pool: Sequence[CheckpointRef],
    window: int,
    spacing: Interval | None,
    end: int | None,
    fits: int,
    coords: Sequence[int],
) -> str:
    rule = f" at least {spacing} apart" if spacing is not None and spacing.value else ""
    at_end = f" at or before step {end}" if end is not None else ""
    steps = [c.step for c in everything]
    shown = ", ".join(str(s) for s in steps) if len(steps) <= 12 else f"{steps[0]} ... {steps[-1]}"
    hint = f"--window {fits}"
    if spacing is not None and spacing.value and len(pool) >= window:
        wide = _largest_spacing(coords, window)
        value = wide if spacing.unit == "steps" else _human(wide)
        hint += f", or --interval {value} for {window} checkpoints"
    return (
        f"asked for {window} checkpoints{rule}{at_end}, but only {fits} fit; the run has {len(everything)} "
        f"checkpoints (steps {shown}); try {hint}"
    )
