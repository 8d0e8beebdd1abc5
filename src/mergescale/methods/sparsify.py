"""Sparsification of one task vector τ = θ − θ_base: the first step of the task-arithmetic family.

Four ways, with mergekit 0.1.5's semantics (``mergekit/sparsify.py``), n = entries of the tensor (per tensor):

- ``magnitude`` (TIES, https://arxiv.org/abs/2306.01708): keep the k = max(1, ⌊density·n⌋) entries of largest
  |τ|, zero the rest. Exact, ties broken as in :mod:`mergescale.methods.selection`.
- ``magnitude_outliers`` (Model Breadcrumbs, https://arxiv.org/abs/2312.06795): drop the n_top = ⌊γ·n⌋ largest
  and the smallest, keeping target = ⌊density·n⌋ entries: ascending ranks [n_bot, n_bot + target) with
  n_bot = max(0, n − target − n_top) (so fewer than n_top are dropped when density + γ > 1, as in mergekit).
- ``random`` (DARE, https://arxiv.org/abs/2311.03099): drop each entry independently with probability
  1 − density; the mask comes from the model's seeded generator (:mod:`mergescale.methods.random_masks`).
- ``della_magprune`` (DELLA, https://arxiv.org/abs/2406.11617): drop with a probability that falls with the
  entry's magnitude rank in its row: keep probability (density − ε) + 2ε·r/(C − 1), r = 0 for the smallest of the
  C entries of the row (dim 1; a 1-D tensor is one row; equal magnitudes ranked by index; one column: r/(C−1)
  taken as 0, where mergekit would fail on 0/0).

``density >= 1`` leaves τ untouched (no rescaling either), exactly like mergekit.

Rescaling (``rescale``): mergekit rescales the kept entries so the L1 norm of τ is unchanged,
τ' ← τ'·‖τ‖₁/‖τ'‖₁ (skipped when either norm is below 1e-7). The DARE paper instead divides by the keep
probability, τ' ← τ'/density; ``rescale_by_density`` selects that (our extension, random methods only).

Work is split in two so the caller can stream: :func:`prepare_` turns the model's row θ into τ in place and
decides what survives (sweeping memory once); the returned :class:`KeepRule` then zeroes the dropped entries
of any chunk of τ while the caller combines the models chunk by chunk, and carries the rescale factor for the
caller to fold into the model's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mergescale.errors import ConfigError
from mergescale.methods.random_masks import LazyBernoulli, uniform
from mergescale.methods.selection import (
    SWEEP_CHUNK,
    Threshold,
    nonzero_bytes,
    round8,
    top_k_thresholds_,
    zero_positions_,
)

Sparsification = Literal["magnitude", "magnitude_outliers", "random", "della_magprune"]
RANDOM: tuple[Sparsification, ...] = ("random", "della_magprune")

_RESCALE_EPS = 1e-7  # mergekit's threshold below which a norm is treated as zero and no rescale happens


@dataclass(frozen=True)
class KeepRule:
    """What survives of one model's τ, applied chunk by chunk, and its rescale factor.

    ``keep``: keep the top ``keep.k`` magnitudes (others zeroed); ``drop``: then zero the top ``drop.k``.
    Neither (the identity, or a random mask already applied by :func:`prepare_`) leaves chunks unchanged.
    """

    scale: float = 1.0
    keep: Threshold | None = None
    drop: Threshold | None = None

    def apply_(self, xc: torch.Tensor, start: int) -> None:
        """Zero, in place, the dropped entries of the chunk ``xc`` = τ[start : start + len] (flat)."""
        if self.keep is not None:
            torch.hardshrink(xc, self.keep.below, out=xc)  # keeps |x| >= value
            zero_positions_(xc, start, self.keep.surplus_equal)
        if self.drop is not None:
            big = torch.hardshrink(xc, self.drop.value)  # (c,) the entries with |x| > value, 0 elsewhere
            xc.sub_(big)
            zero_positions_(xc, start, self.drop.kept_equal)


def _l1_factor(before: float, after: float) -> float:
    """‖τ‖₁ / ‖τ'‖₁ as mergekit computes it, 1 when either is (near) zero."""
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return 1.0
    return before / after


def prepare_(
    theta: torch.Tensor,
    base: torch.Tensor,
    shape: torch.Size,
    method: Sparsification | None,
    density: float,
    *,
    rescale: bool = False,
    rescale_by_density: bool = False,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
    where: str = "",
) -> KeepRule:
    """Turn the flat float32 row ``theta`` into τ = θ − θ_base in place and decide what of it survives.

    Random methods apply their mask here (τ is final afterwards); magnitude methods only find their
    thresholds, applied later by :meth:`KeepRule.apply_`.

    Args:
        theta: one model's tensor, flattened (n,); becomes τ (masked, for random methods).
        base: the base model's tensor, flattened (n,).
        shape: the tensor's shape (DELLA ranks within rows).
        method: the sparsification, or None for none.
        density: fraction of entries kept (expected fraction for the random methods), in (0, 1].
        rescale: rescale the kept entries (mergekit: to the L1 norm of τ).
        rescale_by_density: with ``rescale``, divide by ``density`` instead (the DARE paper's rule).
        gamma: breadcrumbs' fraction of largest entries dropped.
        epsilon: DELLA's half-width of the keep-probability range.
        generator: the model's seeded CPU generator (random methods).
        where: "method: tensor ..., model ..." for error messages.
    """
    n = theta.numel()
    if method is None or density >= 1.0 or n == 0:
        theta.sub_(base)
        return KeepRule()
    if method == "magnitude":
        k = max(1, int(density * n))
        if k >= n:
            theta.sub_(base)
            return KeepRule()
        (keep,), before = top_k_thresholds_(theta, [k], subtract=base, with_sums=rescale)
        return KeepRule(_l1_factor(before, keep.top_sum) if rescale else 1.0, keep=keep)
    if method == "magnitude_outliers":
        target = int(density * n)
        if target == 0:
            theta.zero_()  # nothing kept (mergekit keeps ⌊density·n⌋ = 0 entries)
            return KeepRule()
        n_top = int(gamma * n)
        first = n - max(0, n - target - n_top) - target  # descending rank of the first kept entry
        ks = [k for k in (first + target, first) if 0 < k < n]
        if not ks:
            theta.sub_(base)
            return KeepRule()
        thresholds, before = top_k_thresholds_(theta, ks, subtract=base, with_sums=rescale)
        by_k = dict(zip(ks, thresholds, strict=True))
        keep, drop = by_k.get(first + target), by_k.get(first)
        if not rescale:
            return KeepRule(keep=keep, drop=drop)
        kept_sum = (keep.top_sum if keep else before) - (drop.top_sum if drop else 0.0)
        return KeepRule(_l1_factor(before, kept_sum), keep=keep, drop=drop)
    if method in RANDOM:
        if generator is None:
            raise ValueError(f"{where}: random sparsification needs a generator")
        if method == "random":
            return KeepRule(_dare_(theta, base, density, generator, rescale, rescale_by_density))
        theta.sub_(base)
        keep_mask = _della_keep_mask(theta.view(shape), density, epsilon, generator, where)
        before = float(theta.abs().sum()) if rescale else 0.0
        theta.mul_(keep_mask.view(-1))
        return KeepRule(_l1_factor(before, float(theta.abs().sum())) if rescale else 1.0)
    raise ValueError(f"unknown sparsification {method!r}")


def _dare_(
    tau: torch.Tensor, base: torch.Tensor, density: float, generator: torch.Generator, rescale: bool, by_density: bool
) -> float:
    """τ ← (θ − θ_base)·keep with keep ~ Bernoulli(density), in cache-sized chunks; returns the rescale factor.

    The mask is the draw of :func:`~mergescale.methods.random_masks.bernoulli_mask`: first bytes decide in
    the sweep (undecided entries are zeroed but remembered), the few undecided ones are resolved afterwards
    and restored when kept.
    """
    n = tau.numel()
    draw = LazyBernoulli(n, density, generator)
    first = draw.first.to(tau.device)  # (n,) uint8
    step = min(SWEEP_CHUNK, n) if tau.device.type == "cpu" else n
    keep = torch.empty(step, dtype=torch.float32, device=tau.device)  # (step,) 1.0 keep / 0.0 drop
    flags = torch.empty(round8(step), dtype=torch.uint8, device=tau.device)  # (step,) 1 where undecided
    l1 = rescale and not by_density
    before = after = 0.0
    tied_pos, tied_val = [], []
    for s in range(0, n, step):
        xc = tau[s : s + step]  # (c,) view
        xc.sub_(base[s : s + step])  # τ
        if l1:
            before += float(xc.abs().sum())  # torch.sum's cascade summation, as accurate as mergekit's
        bc = first[s : s + step]
        torch.eq(bc, draw.digit, out=flags[: xc.numel()])
        tied = nonzero_bytes(flags, xc.numel())  # (u,) undecided after the first byte
        if tied.numel():
            tied_val.append(xc[tied])
            tied_pos.append(tied.add_(s))
        xc.mul_(torch.lt(bc, draw.digit, out=keep[: xc.numel()]))
        if l1:
            after += float(xc.abs().sum())
    if tied_pos:
        pos, val = torch.cat(tied_pos), torch.cat(tied_val)  # (u,) ascending positions
        kept = draw.resolve(pos.cpu()).to(tau.device)
        tau[pos[kept]] = val[kept]
        if l1:
            after += float(val[kept].abs().sum())
    if not rescale:
        return 1.0
    return 1.0 / density if by_density else _l1_factor(before, after)


def check_della_range(density: float, epsilon: float, where: str) -> None:
    """DELLA's keep probabilities span density ± epsilon: the range must lie inside (0, 1). A density of 1 keeps
    everything and draws no probabilities, so it is not checked."""
    if density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        raise ConfigError(
            f"{where}: della needs density ± epsilon inside (0, 1), got density={density:g}, epsilon={epsilon:g}"
        )


def _della_keep_mask(
    tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, where: str
) -> torch.Tensor:
    """DELLA's MagPrune keep mask: keep probability grows linearly with the magnitude rank within each row."""
    check_della_range(density, epsilon, where)
    rows = tau if tau.dim() >= 2 else tau.reshape(1, -1)  # (R, C, ...) ranks are taken along dim 1
    cols = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)  # (R, C, ...) ascending magnitude
    rank = torch.empty_like(order)
    src = torch.arange(cols, device=tau.device).view(1, cols, *([1] * (rows.dim() - 2))).expand_as(order)
    rank.scatter_(1, order, src)  # (R, C, ...) rank 0 = smallest in its row
    del order
    probs = rank.to(torch.float32).div_(max(cols - 1, 1)).mul_(2.0 * epsilon).add_(density - epsilon)
    u = uniform(rows.shape, generator, device=tau.device)  # (R, C, ...)
    return (u < probs).view(tau.shape)
