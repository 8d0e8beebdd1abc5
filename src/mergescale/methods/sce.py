"""SCE: Select the task-vector entries whose values vary most across models, Calculate a weight per model from
its energy, Erase entries whose sign disagrees with the majority.

With τᵢ = θᵢ − θ_base for the k models:

1. select (``select_topk`` = ρ < 1): σ² = Var_i(τᵢ) entry by entry (population variance); keep the
   ⌊ρ·#{σ² ≠ 0}⌋ entries of largest σ² in every τᵢ, zero the rest;
2. calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²)   (wᵢ = 1/k when that sum is below 10⁻⁶);
3. erase: per entry the majority sign s = sign(Σᵢ τᵢ) (ties → +); eᵢ = [sign(τᵢ) = s];
4. θ = θ_base + Σᵢ wᵢeᵢτᵢ / max(Σᵢ wᵢeᵢ, 10⁻⁶).

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", https://arxiv.org/abs/2408.07990.

mergekit 0.1.5 semantics (``merge_methods/sce.py``), matched here: base required; no per-model parameters (no
weights: they come from step 2); ``select_topk`` (1.0) and ``int8_mask`` (false; mergekit's mask dtype, no effect
here) global. Ties in step 1 are broken by ``torch.topk``, as mergekit breaks them.
"""

from __future__ import annotations

import torch

from mergescale.errors import ConfigError
from mergescale.methods.base import MergeMethod, MethodInputs, ParamSpec

ZERO_ENERGY = 1e-6
MIN_DIVISOR = 1e-6


def variance_mask(tau: torch.Tensor, fraction: float) -> torch.Tensor:
    """Float32 mask of τ's entry shape keeping the ⌊fraction·#nonzero⌋ entries of largest variance over models."""
    var = torch.var(tau, dim=0, unbiased=False)  # (*shape)
    keep = int(int(torch.count_nonzero(var)) * fraction)
    mask = torch.zeros_like(var)
    if keep > 0:
        _, idx = torch.topk(var.abs().reshape(-1), k=keep, largest=True)
        mask.view(-1)[idx] = 1.0
    return mask


def energy_weights(tau: torch.Tensor) -> torch.Tensor:
    """(k,) wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²), uniform when the sum is below 10⁻⁶."""
    energy = tau.square().reshape(tau.shape[0], -1).mean(dim=1)  # (k,)
    total = float(energy.sum())
    if abs(total) < ZERO_ENERGY:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


def sce(inputs: MethodInputs) -> torch.Tensor:
    """SCE for one tensor, in float32."""
    if inputs.base is None:
        raise ConfigError(f"sce: tensor {inputs.name!r}: needs base_model")
    base = inputs.base.to(torch.float32)
    if inputs.k == 0:
        return base
    tau = inputs.tensors.to(torch.float32)  # (k, *shape) engine-owned
    tau.sub_(base)
    fraction = float(inputs.params.get("select_topk", 1.0))
    if fraction < 1.0:
        tau.mul_(variance_mask(tau, fraction) if fraction > 0 else torch.zeros_like(base))
    majority = (tau.sum(dim=0) >= 0).to(torch.float32).mul_(2).sub_(1)  # (*shape) ±1
    agree = (tau.sign() == majority).to(torch.float32)  # (k, *shape)
    weights = energy_weights(tau).view(-1, *([1] * base.dim()))  # (k, 1, ...)
    erased = agree.mul_(weights)  # (k, *shape) wᵢeᵢ
    merged = (tau * erased).sum(dim=0)
    return base.add_(merged.div_(erased.sum(dim=0).clamp_(min=MIN_DIVISOR)))


METHOD = MergeMethod(
    name="sce",
    fn=sce,
    base="required",
    global_params=(
        ParamSpec("select_topk", float, 1.0, doc="fraction of entries (by variance across models) kept"),
        ParamSpec("int8_mask", bool, False, doc="mergekit's mask dtype; no effect here"),
    ),
    min_models=1,
    reference="https://arxiv.org/abs/2408.07990",
    doc=__doc__ or "",
)
